"""One agent per bpffs folder.

Two agents on one folder would both read the same pinned maps and hand out
the same service IDs, sending traffic to the wrong Service. Each agent takes
an exclusive flock(2) on the folder itself before compiling or attaching.

Why the folder: bpffs holds no regular files, so a lock file cannot live
there, and a lock file under /run would only exclude agents sharing that
/run (not two containers with their own). flock on a directory fd works on
bpffs (bpffs has no flock of its own, so the generic VFS lock of
fs/locks.c applies; tested on the host kernel), follows the folder
into every mount namespace that has the same bpffs mounted (a DaemonSet's
hostPath), and is released by the kernel when the process dies, kill -9
included, so a crashed agent never leaves a stale lock behind.

Upgrades are kill-then-start (the DaemonSet's rolling update has maxSurge 0),
so the new agent waits up to a timeout for the old one to finish exiting.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from pathlib import Path

from .bpffs import check_bpffs, make_pin_folder

log = logging.getLogger(__name__)


class LockError(Exception):
    pass


class BpffsLock:
    def __init__(self, folder: Path):
        self.folder = folder
        self.fd: int | None = None

    def acquire(self, timeout: float, poll: float = 0.1) -> None:
        """Takes the lock, waiting up to `timeout` seconds for another agent
        to let go; raises LockError naming the holder when it does not."""
        if self.fd is not None:
            return  # taken already (the agent's start may take it early)
        check_bpffs(self.folder)
        make_pin_folder(self.folder)
        fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        deadline = time.monotonic() + timeout
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise LockError(
                        f"another meshbpf agent{holder_text(self.folder)} is running on {self.folder} "
                        f"(waited {timeout:g}s): two agents on one bpffs folder would hand out the "
                        f"same service IDs; stop it first, or give this one its own --bpffs") from None
                if not waited:
                    log.warning("waiting up to %gs for the agent%s on %s to exit",
                                timeout, holder_text(self.folder), self.folder)
                    waited = True
                time.sleep(poll)
        self.fd = fd

    def held_elsewhere(self) -> bool:
        """Whether another process holds the lock now (an agent still running
        or exiting), without waiting or keeping it."""
        try:
            fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # drops the probe's lock with it

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last fd drops the flock
            self.fd = None


def holder_text(folder: Path) -> str:
    pid = holder_pid(folder)
    return f" (pid {pid})" if pid else ""


def holder_pid(folder: Path, locks: str = "/proc/locks") -> int | None:
    """The pid holding a flock on `folder`, from /proc/locks (0 or absent
    when it lives in a pid namespace this process cannot see)."""
    try:
        st = os.stat(folder)
        with open(locks) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in lines:
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 24404 00:27:32743 0 EOF"; "->" marks a waiter
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == inode:
            pid = int(fields[4]) if fields[4].isdigit() else 0
            return pid or None
    return None
