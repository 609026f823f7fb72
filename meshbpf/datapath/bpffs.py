"""bpffs checks shared by every part of the datapath (loader, policy, lock):
is a folder on a bpffs mount, and the datapath's error type."""

from __future__ import annotations

import ctypes as ct
import os
from pathlib import Path


class DatapathError(Exception):
    pass


BPF_FS_MAGIC = 0xCAFE4A11  # statfs f_type of a bpffs mount (linux/magic.h)


def check_bpffs(folder: Path) -> None:
    """The folder must sit on a mounted bpffs."""
    folder = folder.resolve()
    with open("/proc/mounts") as f:
        bpf_mounts = [Path(m[1]) for m in (line.split() for line in f) if len(m) > 2 and m[2] == "bpf"]
    if not any(folder == m or m in folder.parents for m in bpf_mounts):
        raise DatapathError(f"{folder} is not on a bpffs mount; mount one with "
                            f"`mount -t bpf bpf /sys/fs/bpf`")


def make_pin_folder(folder: Path) -> None:
    """Creates the folder the agent pins to, or says in one line why it
    cannot: a read-only mount would otherwise fail later, in bcc's pinning
    of a map after the compile, with a traceback."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if os.statvfs(existing).f_flag & os.ST_RDONLY:
        raise DatapathError(f"{folder}: the bpffs mount is read-only; the agent pins its maps and "
                            f"links there (remount it read-write, e.g. `mount -o remount,rw {existing}`)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatapathError(f"{folder}: cannot create the pin folder: {exc.strerror}") from None


class _StatFs(ct.Structure):
    # struct statfs begins with f_type (a long on 64-bit Linux); the rest is
    # room for the fields we do not read.
    _fields_ = [("f_type", ct.c_long), ("_rest", ct.c_uint8 * 256)]


def is_bpffs(path: Path) -> bool:
    """True if path is a folder on a bpffs mount (by filesystem magic, so a
    plain folder with files named like our pins never counts)."""
    libc = ct.CDLL(None, use_errno=True)
    buf = _StatFs()
    if libc.statfs(os.fsencode(path), ct.byref(buf)) != 0:
        return False
    return (buf.f_type & 0xFFFFFFFF) == BPF_FS_MAGIC
