"""A pipelining Redis client that checks every byte it gets back.

  python resp_probe.py HOST PORT ROUNDS DEPTH SIZE

Each round writes DEPTH SETs of random SIZE-byte values in one write, reads
the DEPTH +OK replies, then DEPTH GETs in one write and reads the values
back, as a pipelined client (redis-py pipelines, redis-benchmark -P) does.
The socket has a timeout, so it is non-blocking with poll() like an event
loop's. Prints {"rounds": N, "mismatches": M, "bytes": B}.
"""

from __future__ import annotations

import json
import os
import socket
import sys


def _cmd(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


class Reader:
    def __init__(self, sock: socket.socket):
        self.sock, self.buf = sock, b""

    def _fill(self) -> None:
        got = self.sock.recv(1 << 16)
        if not got:
            raise EOFError("server closed")
        self.buf += got

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def exact(self, n: int) -> bytes:
        while len(self.buf) < n + 2:
            self._fill()
        data, self.buf = self.buf[:n], self.buf[n + 2:]
        return data

    def reply(self) -> bytes:
        head = self.line()
        if head[:1] == b"$":
            return self.exact(int(head[1:]))
        return head


def main(host: str, port: str, rounds: str, depth: str, size: str) -> dict:
    mismatches = moved = 0
    with socket.create_connection((host, int(port)), timeout=60) as s:
        r = Reader(s)
        for n in range(int(rounds)):
            keys = [b"k%d:%d" % (n, i) for i in range(int(depth))]
            values = [os.urandom(int(size)) for _ in keys]
            s.sendall(b"".join(_cmd(b"SET", k, v) for k, v in zip(keys, values)))
            mismatches += sum(r.reply() != b"+OK" for _ in keys)
            s.sendall(b"".join(_cmd(b"GET", k) for k in keys))
            mismatches += sum(r.reply() != v for v in values)
            moved += 2 * sum(map(len, values))
    return {"rounds": int(rounds), "mismatches": mismatches, "bytes": moved}


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:])), flush=True)
