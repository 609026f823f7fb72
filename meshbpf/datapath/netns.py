"""Running a function inside a named network namespace.

setns(2) acts on the calling thread only, so the function runs on a
short-lived thread of its own that enters the namespace: the caller never
leaves its own, whatever fails. What the function makes there (a socket, a
sysctl write) stays in that namespace. A missing namespace is an error, never
created (pyroute2's pushns would create it and keeps a process-wide stack).
"""

from __future__ import annotations

import ctypes
import os
import socket
import sys
import threading
from typing import Callable, TypeVar

CLONE_NEWNET = 0x40000000
SO_NETNS_COOKIE = 71   # include/uapi/asm-generic/socket.h (x86, arm64); kernel 5.14+
NETNS_DIR = "/run/netns"

T = TypeVar("T")


def run_in_netns(netns: str | None, fn: Callable[[], T]) -> T:
    """fn() in the named netns (None: here), on a thread of its own."""
    if netns is None:
        return fn()
    result: dict = {}

    def run() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(os.path.join(NETNS_DIR, netns), os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns to netns {netns}: {os.strerror(err)}")
            finally:
                os.close(fd)
            result["value"] = fn()
        except BaseException as exc:  # handed to the caller
            result["error"] = exc

    thread = threading.Thread(target=run, name=f"netns-{netns}", daemon=True)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def netns_cookie(netns: str | None) -> int | None:
    """The kernel's cookie of the named netns (None: here), the value
    bpf_get_netns_cookie() gives its sockets; None before kernel 5.14."""
    def read() -> int | None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            try:
                raw = s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
            except OSError:
                return None
        return int.from_bytes(raw, sys.byteorder)
    return run_in_netns(netns, read)
