"""UDP "flows" for the policy tests, run inside lab pods (real datagrams):

    python udp_flow_probe.py echo PORT
        answers every datagram to PORT (IPv4 and IPv6) with "echo:" + it,
        from the address it was sent to; prints {"listening": true}
    python udp_flow_probe.py client HOST PORT
        one UDP socket (one source port: one flow) kept for its whole life;
        prints {"port": its source port}, then for each line on stdin sends
        the line and prints {"reply": the answer or null after TIMEOUT s}
    python udp_flow_probe.py ask HOST PORT
        one datagram from a connected socket; prints {"error": the error it
        got back (ConnectionRefusedError: an ICMP port unreachable) or null}
"""

from __future__ import annotations

import json
import select
import socket
import sys
import time

TIMEOUT = 1.5  # a dropped datagram or reply: no answer (generous for emulated kernels)


def echo(port: str) -> None:
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # IPv4 too, as ::ffff:a.b.c.d
        s.bind(("::", int(port)))
        print(json.dumps({"listening": True}), flush=True)
        while True:
            data, peer = s.recvfrom(2048)
            s.sendto(b"echo:" + data, peer)


def client(host: str, port: str) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((host, int(port)))
        print(json.dumps({"port": s.getsockname()[1]}), flush=True)
        for line in sys.stdin:
            payload = line.strip()
            s.send(payload.encode())
            print(json.dumps({"reply": _answer(s, "echo:" + payload)}), flush=True)


def ask(host: str, port: str) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    error = None
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((host, int(port)))
        s.send(b"anyone?")
        if select.select([s], [], [], TIMEOUT)[0]:
            try:
                s.recv(2048)
            except OSError as exc:
                error = type(exc).__name__
    print(json.dumps({"error": error}), flush=True)


def _answer(s: socket.socket, expected: str) -> str | None:
    """The answer to this datagram (a late answer to an earlier one is skipped)."""
    end = time.monotonic() + TIMEOUT
    while (left := end - time.monotonic()) > 0 and select.select([s], [], [], left)[0]:
        try:
            got = s.recv(2048).decode()
        except OSError:  # an ICMP error: no answer
            continue
        if got == expected:
            return got
    return None


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    globals()[command](*args)
