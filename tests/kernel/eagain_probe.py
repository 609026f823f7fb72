"""Blocking-read clients and servers that count spurious EAGAINs.

The pattern of issue 15: "write, shutdown(SHUT_WR), blocking read to EOF",
as HTTP/1.0-style clients and many RPC tools do it. Every read here is a
plain blocking recv() (no timeout, no poll): on a blocking socket EAGAIN is
never a valid answer, so each one is counted, retried, and reported.

  python eagain_probe.py server PORT THINK_MS MODE [LISTEN_MODE]
  python eagain_probe.py client HOST PORT RUNS ROUNDS MODE
  python eagain_probe.py reader PORT SIGNAL_MS MODE [LISTEN_MODE]
  python eagain_probe.py trickle HOST PORT SECONDS GAP_MS

MODE "blocking": plain blocking sockets. MODE "timeout": sockets with a
timeout, which Python runs in non-blocking mode with poll() (as event
loops do); there an EAGAIN is "poll again", never an error. MODE
"connect-timeout" (clients only): a connect() with a timeout, then
blocking I/O, as Java's Socket.connect(address, timeout) does; MODE
"late-blocking" (clients only): a timeout until shutdown(SHUT_WR), then
blocking reads to EOF. A server's
listener is in its MODE unless LISTEN_MODE says otherwise: meshbpf judges
an accepted socket by its listener until it sends.

Each client run opens a connection, makes ROUNDS request/response
exchanges, then writes a last request, shuts down its sending side and
reads the server's answer to EOF. The server answers every request at once
and, at EOF, sends a closing message (after THINK_MS, as a server that
works out its answer; past the 40 ms delayed-ACK timeout the client's FIN
is ACKed alone, a wake-up without data) and closes. Both sides check every
byte (a sha256 over what each sent and received).

"reader" is the server that only reads: it accepts one connection and
reads it to EOF in a blocked recv() loop while SIGALRM interrupts it every
SIGNAL_MS (the handler only counts; Python retries EINTR, not EAGAIN).
"trickle" is its client, non-blocking (a timeout): small chunks every
GAP_MS for SECONDS, then close. The server's listener is in MODE too, as
thread-per-connection servers (blocking) and event loops (non-blocking)
open theirs.
"""

from __future__ import annotations

import hashlib
import json
import signal
import socket
import sys
import time

REQ = 64           # bytes per request and per reply
BYE = b"bye" * 100  # the server's last message, after the client's EOF


def _recv(sock: socket.socket, n: int, stats: dict) -> bytes:
    """One blocking recv(); a spurious EAGAIN is counted and retried."""
    while True:
        try:
            return sock.recv(n)
        except BlockingIOError:
            stats["eagain"] += 1
            if "bytes" in stats and len(stats.setdefault("eagain_at", [])) < 10:
                stats["eagain_at"].append(stats["bytes"])  # where in the stream (the reader)


def _recv_exact(sock: socket.socket, n: int, stats: dict) -> bytes:
    out = b""
    while len(out) < n:
        got = _recv(sock, n - len(out), stats)
        if not got:
            raise EOFError(f"EOF after {len(out)} of {n} bytes")
        out += got
    return out


def _request(run: int, i: int) -> bytes:
    return f"{run}:{i}:".encode().ljust(REQ, b"q")


def _reply(request: bytes) -> bytes:
    return hashlib.sha256(request).hexdigest().encode() + request[:REQ - 64]


def serve_one(conn: socket.socket, stats: dict, think_s: float) -> None:
    """Answers each request; at EOF, sends BYE and closes."""
    pending = b""
    while True:
        got = _recv(conn, 65536, stats)
        if not got:
            break
        pending += got
        while len(pending) >= REQ:
            conn.sendall(_reply(pending[:REQ]))
            pending = pending[REQ:]
    if pending:
        stats["errors"] += 1
    if think_s:
        time.sleep(think_s)
    conn.sendall(BYE)


def _set_mode(sock: socket.socket, mode: str) -> None:
    sock.settimeout(None if mode == "blocking" else 60)


def _listener(port: str, mode: str) -> socket.socket:
    """A dual-stack listener in `mode`; says so on stdout."""
    ls = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    ls.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("::", int(port)))
    ls.listen(64)
    _set_mode(ls, mode)
    print(json.dumps({"listening": True}), flush=True)
    return ls


def server(port: str, think_ms: str = "0", mode: str = "blocking", listen_mode: str = "") -> dict:
    """Serves connections one after another until a client sends 'quit'.
    The listener is in `mode` too unless `listen_mode` says otherwise."""
    stats = {"eagain": 0, "errors": 0, "connections": 0}
    with _listener(port, listen_mode or mode) as ls:
        while True:
            conn, _ = ls.accept()
            _set_mode(conn, mode)
            with conn:
                first = _recv(conn, 4, stats)
                if first == b"quit":
                    return stats
                stats["connections"] += 1
                conn.sendall(b"ok!!")
                serve_one(conn, stats, float(think_ms) / 1000)


def reader(port: str, signal_ms: str, mode: str = "blocking", listen_mode: str = "") -> dict:
    """Reads one connection to EOF under a stream of signals; the listener
    is in `mode` too unless `listen_mode` says otherwise."""
    stats = {"eagain": 0, "errors": 0, "signals": 0, "bytes": 0}
    h = hashlib.sha256()

    def count(_sig, _frame):
        stats["signals"] += 1

    with _listener(port, listen_mode or mode) as ls:
        conn, _ = ls.accept()
        _set_mode(conn, mode)
        signal.signal(signal.SIGALRM, count)
        period = float(signal_ms) / 1000
        signal.setitimer(signal.ITIMER_REAL, period, period)
        with conn:
            while got := _recv(conn, 65536, stats):
                h.update(got)
                stats["bytes"] += len(got)
        signal.setitimer(signal.ITIMER_REAL, 0)
    stats["sha"] = h.hexdigest()
    return stats


def trickle(host: str, port: str, seconds: str, gap_ms: str) -> dict:
    """Small numbered chunks every gap_ms for `seconds`, then close."""
    h, sent, i = hashlib.sha256(), 0, 0
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as c:
        _set_mode(c, "timeout")
        c.connect((host, int(port)))
        end = time.monotonic() + float(seconds)
        while time.monotonic() < end:
            chunk = f"chunk {i:08d}|".encode().ljust(100, b".")
            c.sendall(chunk)
            h.update(chunk)
            sent, i = sent + len(chunk), i + 1
            time.sleep(float(gap_ms) / 1000)
    return {"bytes": sent, "chunks": i, "sha": h.hexdigest()}


def client_run(host: str, port: int, run: int, rounds: int, stats: dict, mode: str) -> None:
    # The mode is set before connect(), as applications do (connect-timeout:
    # blocking once connected).
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as c:
        _set_mode(c, "timeout" if mode in ("connect-timeout", "late-blocking") else mode)
        c.connect((host, port))
        if mode == "connect-timeout":
            _set_mode(c, "blocking")
        c.sendall(b"conn")
        if _recv_exact(c, 4, stats) != b"ok!!":
            raise AssertionError("bad greeting")
        for i in range(rounds):
            req = _request(run, i)
            c.sendall(req)
            if _recv_exact(c, REQ, stats) != _reply(req):
                stats["errors"] += 1
        last = _request(run, rounds)
        c.sendall(last)
        c.shutdown(socket.SHUT_WR)
        if mode == "late-blocking":
            _set_mode(c, "blocking")
        tail = b""
        while True:
            seen = stats["eagain"]
            got = _recv(c, 65536, stats)
            if stats["eagain"] != seen and len(stats.setdefault("eagain_at", [])) < 10:
                stats["eagain_at"].append(len(tail))  # after which byte of the answer
            if not got:
                break
            tail += got
        if tail != _reply(last) + BYE:
            stats["errors"] += 1


def client(host: str, port: str, runs: str, rounds: str, mode: str = "blocking") -> dict:
    stats = {"eagain": 0, "errors": 0, "runs": 0}
    for run in range(int(runs)):
        client_run(host, int(port), run, int(rounds), stats, mode)
        stats["runs"] += 1
    with socket.create_connection((host, int(port))) as c:
        c.sendall(b"quit")
    return stats


if __name__ == "__main__":
    cmd = {"server": server, "client": client, "reader": reader, "trickle": trickle}[sys.argv[1]]
    print(json.dumps(cmd(*sys.argv[2:])), flush=True)
