"""The YAML file source: one file or a folder of them, watched for changes.

Files hold multi-document YAML of Kubernetes objects (a `kind: List` too),
exactly as kubectl prints them. Any problem in any file rejects the whole
read: the caller keeps running what it had.

Parsing is yaml_load's: libyaml, read as Kubernetes reads YAML (1.1), with a
JSON fast path for `kubectl get -o json` files.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..gcpause import gc_paused
from ..model import DesiredState
from .errors import ConfigError, Problem, internal_error
from .kube_objects import BuildResult, SourceObject, build_state
from .yaml_load import LoadError, load_all

log = logging.getLogger(__name__)

_SUFFIXES = (".yaml", ".yml", ".json")
_DOC_START = re.compile(r"^---(?:[ \t].*)?$", re.MULTILINE)


def config_files(path: Path) -> list[Path]:
    """The files a config path stands for, in a stable order."""
    if path.is_dir():
        return sorted(p for p in path.iterdir()
                      if p.is_file() and p.suffix in _SUFFIXES and not p.name.startswith("."))
    if path.exists():
        return [path]
    raise ConfigError([Problem(str(path), "", "", "no such file or folder")])


def document_starts(text: str) -> list[int]:
    """First line of each YAML document in text (1-based).

    A document starts at each `---` marker, and at line 1 when content comes
    before the first marker (directives such as %YAML and comments are not
    content)."""
    starts, line, pos = [], 1, 0
    for m in _DOC_START.finditer(text):
        line += text.count("\n", pos, m.start())
        pos = m.start()
        starts.append(line)
    head = text[: _DOC_START.search(text).start()] if starts else text
    has_leading_doc = any(ln.strip() and not ln.lstrip().startswith(("#", "%"))
                          for ln in head.splitlines())
    return ([1] if has_leading_doc or not starts else []) + starts


def _document_at(starts: list[int], line: int) -> int:
    """Index of the document holding `line`."""
    index = 0
    for i, start in enumerate(starts):
        if start <= line:
            index = i
    return index


def parse_documents(path: Path, text: str) -> list[SourceObject]:
    starts = document_starts(text)
    try:
        docs = load_all(text)
    except LoadError as exc:
        where = str(path)
        if exc.line is not None:
            doc = _document_at(starts, exc.line)
            where += f": document {doc + 1} (line {starts[doc]})"
            reason = f"not valid YAML: line {exc.line}: {exc.message}"
        else:
            reason = f"not valid YAML: {exc.message}"
        raise ConfigError([Problem(where, "", "", reason)]) from None
    starts = (starts + [starts[-1]] * len(docs))[: len(docs)]
    return [SourceObject(doc, f"{path}: document {i + 1} (line {starts[i]})")
            for i, doc in enumerate(docs)]


def read_config(path: Path, node_name: str | None = None,
                cache: dict | None = None) -> BuildResult:
    """Reads and validates everything under path; raises ConfigError.

    With a cache (kept by the caller between reads), files whose inode, size
    and mtime are unchanged are not parsed again."""
    with gc_paused():
        return _read_config(path, node_name, cache if cache is not None else {})


def _read_config(path: Path, node_name: str | None, cache: dict) -> BuildResult:
    objects: list[SourceObject] = []
    problems: list[Problem] = []
    files = config_files(path)
    for stale in set(cache) - set(files):
        del cache[stale]
    for file in files:
        try:
            st = os.stat(file)
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
            if file in cache and cache[file][0] == stamp:
                objects.extend(cache[file][1])
                continue
            text = file.read_text(encoding="utf-8-sig")  # tolerate a byte order mark
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(Problem(str(file), "", "", f"cannot read: {exc}"))
            continue
        try:
            parsed = parse_documents(file, text)
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        cache[file] = (stamp, parsed)
        objects.extend(parsed)
    if problems:
        raise ConfigError(problems)
    result = build_state(objects, node_name=node_name)
    if result.problems:
        raise ConfigError(result.problems)
    return result


@dataclass(frozen=True)
class _Stamp:
    entries: tuple[tuple[str, int, int, int], ...]


def _stamp(path: Path) -> _Stamp:
    """What changes when any config file changes (name, inode, size, mtime)."""
    try:
        files = config_files(path)
    except ConfigError:
        return _Stamp(())
    entries = []
    for f in files:
        try:
            st = os.stat(f)
        except OSError:
            continue
        entries.append((str(f), st.st_ino, st.st_size, st.st_mtime_ns))
    return _Stamp(tuple(entries))


class FileSource:
    """Polls a config path; `poll()` returns new desired state when it changed."""

    def __init__(self, path: Path, node_name: str | None = None):
        self.path = path
        self.node_name = node_name
        self._last: _Stamp | None = None
        self._notes: list[str] = []
        self._parsed: dict = {}  # file -> (stamp, parsed documents)

    def health(self) -> dict:
        return {"ok": True}  # no thread to die: polling runs in the agent's loop

    def changed(self) -> bool:
        return _stamp(self.path) != self._last

    def poll(self) -> DesiredState | None:
        """None when nothing changed; raises ConfigError on a bad change
        (reported once per change, not on every poll)."""
        stamp = _stamp(self.path)
        if stamp == self._last:
            return None
        self._last = stamp
        try:
            result = read_config(self.path, self.node_name, self._parsed)
        except ConfigError:
            raise
        except Exception as exc:
            log.exception("reading %s failed", self.path)
            raise internal_error(str(self.path), exc) from None
        if result.notes != self._notes:
            for note in result.notes:
                log.info("%s", note)
            self._notes = result.notes
        return result.state
