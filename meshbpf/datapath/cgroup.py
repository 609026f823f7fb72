"""Finding cgroup v2 and the cgroups meshbpf attaches to."""

from __future__ import annotations

import os
from pathlib import Path


class CgroupError(Exception):
    pass


def cgroup2_mount(mounts: str = "/proc/mounts") -> Path:
    """Where cgroup v2 is mounted (on hybrid hosts not /sys/fs/cgroup)."""
    with open(mounts) as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 3 and fields[2] == "cgroup2":
                return Path(fields[1])
    raise CgroupError("no cgroup2 mount in /proc/mounts: meshbpf needs cgroup v2")


def resolve(path: str | Path | None) -> Path:
    """A cgroup path: absolute, or relative to the cgroup2 mount; None is the root."""
    root = cgroup2_mount()
    if path is None or str(path) in ("", "/"):
        return root
    p = Path(path)
    full = p if p.is_absolute() and p.is_relative_to(root) else root / str(p).lstrip("/")
    if not (full / "cgroup.procs").exists():
        raise CgroupError(f"{full} is not a cgroup v2 folder (under {root})")
    return full


def cgroup_id(path: Path) -> int:
    """The kernel's cgroup id, which on cgroup v2 is the folder's inode."""
    return os.stat(path).st_ino


def open_cgroup(path: Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY)


def paths_by_id() -> dict[int, Path]:
    """Every cgroup folder by its id, from one walk of the tree."""
    found = {}
    for dirpath, _dirs, _files in os.walk(cgroup2_mount()):
        try:
            found[os.stat(dirpath).st_ino] = Path(dirpath)
        except OSError:
            continue  # removed meanwhile
    return found
