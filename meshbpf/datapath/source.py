"""Turning bpf/*.c into the one translation unit bcc compiles.

bcc rewrites map calls such as ``mbpf_svc.lookup(&key)`` only in the main
file it is given; the same call inside an included header compiles to an
indirect call the verifier rejects. So quoted includes are expanded in place
here, with ``#line`` markers so compiler errors still name bpf/lib/*.h.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_QUOTED_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$')


def bpf_dir() -> Path:
    """Where the C sources are: MESHBPF_BPF_DIR if set; else meshbpf/_bpf in
    an installed wheel (setup.py maps bpf/ there); else bpf/ at the top of
    this checkout (an editable install, or running from the repository)."""
    override = os.environ.get("MESHBPF_BPF_DIR")
    if override:
        return Path(override)
    package = Path(__file__).resolve().parents[1]
    bundled = package / "_bpf"
    if bundled.is_dir():
        return bundled
    return package.parent / "bpf"


def program_text(files: list[str]) -> str:
    """One translation unit made of several bpf/*.c files (one per hook
    family): one compile, one set of maps."""
    seen: set[Path] = set()
    return "".join(expand(bpf_dir() / name, seen) for name in files)


def expand(path: Path, _seen: set[Path] | None = None) -> str:
    """Source of ``path`` with every quoted include inlined once."""
    seen = _seen if _seen is not None else set()
    path = path.resolve()
    seen.add(path)
    out = [f'#line 1 "{path}"']
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        match = _QUOTED_INCLUDE.match(line)
        if not match:
            out.append(line)
            continue
        target = (path.parent / match.group(1)).resolve()
        if not target.is_file():
            raise FileNotFoundError(f"{path}:{lineno}: include {match.group(1)!r} not found")
        if target not in seen:
            out.append(expand(target, seen))
        out.append(f'#line {lineno + 1} "{path}"')
    return "\n".join(out) + "\n"
