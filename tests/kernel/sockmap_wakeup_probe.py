"""Cheap behaviour probe: does a sockhash socket's blocking recv() return
EAGAIN when woken without data?

No programs, no cgroup, no namespace: a loopback TCP socket inserted into
a sockhash from user space already gets tcp_bpf's recvmsg (the psock swaps
sk_prot on insert). The main thread blocks in recv() on it; a signal
arrives at 0.3 s and the peer's byte at 1 s (margins for emulated VMs),
over plain TCP. Plain tcp_recvmsg gives EINTR, which Python retries (PEP 475); tcp_bpf_recvmsg
returns EAGAIN (sk_wait_event woke, no data), seen here as
BlockingIOError. A kernel that fixes the no-data wake-up prints eagain 0
with "insert". About 1 s; root only.

  python tests/kernel/sockmap_wakeup_probe.py [insert]
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import sys
import threading

from bcc import BPF
from bcc.libbcc import lib


def connected_pair() -> tuple[socket.socket, socket.socket]:
    with socket.socket() as ls:
        ls.bind(("127.0.0.1", 0))
        ls.listen(1)
        c = socket.create_connection(ls.getsockname())
        s, _ = ls.accept()
    return c, s


def insert(bpf: BPF, sock: socket.socket) -> None:
    # By fd: bcc's Table class does not know sockhash maps.
    fd = lib.bpf_table_fd(bpf.module, b"probe_hash")
    key, value = ctypes.c_uint32(1), ctypes.c_uint32(sock.fileno())
    if lib.bpf_update_elem(fd, ctypes.byref(key), ctypes.byref(value), 0) != 0:
        raise OSError(ctypes.get_errno(), "sockhash insert of the probe socket failed")


def blocked_read(reader: socket.socket, writer: socket.socket) -> dict:
    stats = {"eagain": 0, "signals": 0}

    def on_signal(signum, frame):
        stats["signals"] += 1

    old = signal.signal(signal.SIGUSR1, on_signal)
    kick = threading.Timer(0.3, signal.pthread_kill, (threading.main_thread().ident, signal.SIGUSR1))
    data = threading.Timer(1.0, writer.sendall, (b"x",))
    kick.start()
    data.start()
    try:
        while True:
            try:
                stats["got"] = reader.recv(16).decode()
                return stats
            except BlockingIOError:
                stats["eagain"] += 1
    finally:
        kick.join()
        data.join()
        signal.signal(signal.SIGUSR1, old)


def main(inserted: bool) -> dict:
    bpf = BPF(text="BPF_SOCKHASH(probe_hash, u32, 1);")
    try:
        c, s = connected_pair()
        with c, s:
            if inserted:
                insert(bpf, c)
            return {"kernel": os.uname().release, "inserted": inserted, **blocked_read(c, s)}
    finally:
        bpf.cleanup()


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:] == ["insert"])), flush=True)
