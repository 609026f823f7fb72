"""Edge cases for redirection, run as real processes in lab pods.

    python edge_cases.py server <case> <dir>    prints {"listening": true}, then a result
    python edge_cases.py client <case> <host> <dir|count>
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import select
import socket
import sys
import threading

PORT = 7100
TIMEOUT = 60  # every socket has one: Python then runs it non-blocking, with
              # poll(), as event loops do; redirection splices only those
LISTEN_TIMEOUT = 3600  # the listener's: non-blocking too, or its sockets never join


def connect(host: str) -> socket.socket:
    return socket.create_connection((host, PORT), timeout=TIMEOUT)


def accept(ls: socket.socket) -> socket.socket:
    c, _ = ls.accept()
    c.settimeout(TIMEOUT)
    return c


def listener() -> socket.socket:
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("0.0.0.0", PORT))
    ls.listen(4096)
    ls.settimeout(LISTEN_TIMEOUT)
    print(json.dumps({"listening": True}), flush=True)
    return ls


def read_all(c: socket.socket) -> bytes:
    out = bytearray()
    while chunk := c.recv(1 << 16):
        out += chunk
    return bytes(out)


def server(case: str, workdir: str) -> dict:
    ls = listener()
    if case == "sendfile-peek":
        c = accept(ls)
        peeked = c.recv(1000, socket.MSG_PEEK)
        data = read_all(c)
        c.sendall(hashlib.sha256(data).hexdigest().encode())
        c.close()
        return {"peek_ok": len(peeked) > 0 and data.startswith(peeked), "server_bytes": len(data)}
    if case == "close-mid-stream":
        c = accept(ls)
        got = bytearray()
        while len(got) < 1 << 20:
            chunk = c.recv(1 << 16)
            if not chunk:
                break
            got += chunk
        c.close()  # while the peer is still writing
        # The last recv can overshoot 1 MiB (how the data is chunked varies by
        # kernel and load), so compare against two copies of the 1 MiB pattern.
        pattern = bytes(range(256)) * 4096 * 2
        return {"reader_got_prefix": len(got) >= 1 << 20 and bytes(got) == pattern[: len(got)],
                "reader_bytes": len(got)}
    if case == "echo":
        def serve(c):
            with c:
                while data := c.recv(65536):
                    c.sendall(data)
        while True:
            c = accept(ls)
            threading.Thread(target=serve, args=(c,), daemon=True).start()
    raise SystemExit(f"unknown case {case}")


def client(case: str, host: str, arg: str) -> dict:
    if case == "sendfile-peek":
        path = os.path.join(arg, "sendfile.bin")
        with open(path, "wb") as f:
            f.write(os.urandom(8 << 20))
        with connect(host) as c, open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            offset = 0
            while offset < size:
                try:
                    offset += os.sendfile(c.fileno(), f.fileno(), offset, size - offset)
                except BlockingIOError:
                    select.select([], [c], [], TIMEOUT)
            c.shutdown(socket.SHUT_WR)
            reply = read_all(c).decode()
        with open(path, "rb") as f:
            return {"sendfile_ok": reply == hashlib.sha256(f.read()).hexdigest()}
    if case == "close-mid-stream":
        pattern = bytes(range(256)) * 4096  # 1 MiB
        error = None
        with connect(host) as c:
            try:
                for _ in range(1000):
                    c.sendall(pattern)
            except OSError as exc:
                error = errno.errorcode.get(exc.errno, str(exc))
        return {"writer_error": error}
    if case == "concurrent":
        conns = [connect(host) for _ in range(int(arg))]
        ok = 0
        for i, c in enumerate(conns):
            c.sendall(f"ping {i}".encode())
        for i, c in enumerate(conns):
            ok += c.recv(100) == f"ping {i}".encode()
            c.close()
        return {"ok": ok}
    if case == "short":
        ok = 0
        for i in range(int(arg)):
            with connect(host) as c:
                # RST on close: 100 000 connections from one address would
                # otherwise run out of ports in TIME_WAIT.
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                c.sendall(b"hello")
                ok += c.recv(100) == b"hello"
        return {"ok": ok}
    if case == "held-echo":
        with connect(host) as c:
            c.sendall(b"first")
            print(json.dumps({"ok": c.recv(100) == b"first"}), flush=True)
            sys.stdin.readline()
            c.sendall(b"second")
            print(json.dumps({"ok": c.recv(100) == b"second"}), flush=True)
            sys.stdin.readline()
        return {"done": True}
    raise SystemExit(f"unknown case {case}")


if __name__ == "__main__":
    role, case = sys.argv[1], sys.argv[2]
    result = server(case, sys.argv[3]) if role == "server" else client(case, sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else "")
    print(json.dumps(result), flush=True)
