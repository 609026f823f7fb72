"""A reader that spins on non-blocking recv(), and one that waits in epoll.

  python spin_probe.py server PORT MODE     (MODE: spin or epoll)
  python spin_probe.py client HOST PORT ROUNDS MODE

The server accepts one connection (listener and socket non-blocking, as
event loops and busy-pollers open them) and answers each REQ-byte request
until EOF. "spin" reads in a loop that retries at once on EAGAIN, as
sockperf --nonblocked and DPDK-style pollers do; "epoll" reads only when
epoll says the socket is readable, until EAGAIN. The client reads its
replies the same way and makes ROUNDS request/response exchanges. Both
report a sha256 of what they received and how many reads found nothing.
"""

from __future__ import annotations

import hashlib
import json
import selectors
import socket
import sys

REQ = 64


def _reply(req: bytes) -> bytes:
    return req[::-1]


class _Reader:
    def __init__(self, conn: socket.socket, mode: str):
        self.conn, self.mode, self.buf, self.empty = conn, mode, b"", 0
        self.sel = selectors.EpollSelector() if mode == "epoll" else None
        if self.sel:
            self.sel.register(conn, selectors.EVENT_READ)

    def read(self) -> bytes:
        """Some bytes, or b"" at EOF."""
        while True:
            try:
                return self.conn.recv(65536)
            except BlockingIOError:
                self.empty += 1
                if self.sel:
                    self.sel.select()

    def exact(self, n: int) -> bytes | None:
        while len(self.buf) < n:
            got = self.read()
            if not got:
                return None
            self.buf += got
        out, self.buf = self.buf[:n], self.buf[n:]
        return out


def _send(sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view):]
        except BlockingIOError:
            pass


def server(port: str, mode: str) -> dict:
    h = hashlib.sha256()
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as ls:
        ls.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("::", int(port)))
        ls.listen(8)
        ls.settimeout(60)  # non-blocking underneath
        print(json.dumps({"listening": True}), flush=True)
        conn, _ = ls.accept()
        with conn:
            conn.setblocking(False)
            reader, rounds = _Reader(conn, mode), 0
            while (req := reader.exact(REQ)) is not None:
                h.update(req)
                _send(conn, _reply(req))
                rounds += 1
    return {"rounds": rounds, "empty_reads": reader.empty, "sha": h.hexdigest()}


def client(host: str, port: str, rounds: str, mode: str) -> dict:
    h, bad = hashlib.sha256(), 0
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as c:
        c.settimeout(60)  # non-blocking underneath, from connect() on
        c.connect((host, int(port)))
        c.setblocking(False)
        reader = _Reader(c, mode)
        for i in range(int(rounds)):
            req = f"request {i:08d}|".encode().ljust(REQ, b".")
            _send(c, req)
            h.update(req)
            bad += reader.exact(REQ) != _reply(req)
    return {"rounds": int(rounds), "bad_replies": bad, "empty_reads": reader.empty, "sha": h.hexdigest()}


if __name__ == "__main__":
    print(json.dumps(globals()[sys.argv[1]](*sys.argv[2:])), flush=True)
