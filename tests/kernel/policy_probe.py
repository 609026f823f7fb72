"""Probes for the policy datapath tests, run inside lab pods:

    python policy_probe.py connects HOST PORT COUNT   -> {"ok": n, "failed": m}
    python policy_probe.py flood HOST PORT TIMEOUT    -> connect attempts back to back
        until a line on stdin; prints {"started": true} after the first
        attempt, then {"ok": n, "failed": m}
    python policy_probe.py listen PORT                -> accepts and closes, until killed
    python policy_probe.py udp-recv PORT UNTIL        -> {"got": [payloads]}, up to UNTIL
    python policy_probe.py spoof SRC DST PORT PAYLOAD  -> sends one UDP packet
        from SRC with scapy on eth0 (a raw frame: the stack cannot stop it)
"""

from __future__ import annotations

import json
import select
import socket
import sys
import time

TIMEOUT = 0.3  # a denied SYN is dropped: the attempt times out
ERRORS: dict[str, int] = {}  # why attempts failed


def _connect(host: str, port: int, timeout: float = TIMEOUT) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect((host, port))
            return True
        except OSError as exc:
            name = type(exc).__name__ + (f"/{exc.errno}" if exc.errno else "")
            ERRORS[name] = ERRORS.get(name, 0) + 1
            return False


def connects(host: str, port: str, count: str) -> dict:
    results = [_connect(host, int(port)) for _ in range(int(count))]
    return {"ok": sum(results), "failed": len(results) - sum(results)}


def flood(host: str, port: str, timeout: str) -> dict:
    ok = failed = 0
    started = False
    while not select.select([sys.stdin], [], [], 0)[0]:
        if _connect(host, int(port), float(timeout)):
            ok += 1
        else:
            failed += 1
        if not started:
            print(json.dumps({"started": True}), flush=True)
            started = True
    return {"ok": ok, "failed": failed, "errors": ERRORS}


def listen(port: str) -> dict:
    """Accepts and closes connections until killed, with a deep accept
    queue, so that a flood of connects is never dropped for want of room
    (Python's socketserver listens with a backlog of 5)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", int(port)))
        s.listen(4096)
        print(json.dumps({"listening": True}), flush=True)
        while True:
            conn, _ = s.accept()
            conn.close()


def udp_recv(port: str, until: str) -> dict:
    """Every datagram to port until one says `until` (or 60 s)."""
    got = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("0.0.0.0", int(port)))
        print(json.dumps({"listening": True}), flush=True)
        end = time.monotonic() + 60
        while until not in got and (left := end - time.monotonic()) > 0:
            if select.select([s], [], [], left)[0]:
                got.append(s.recv(100).decode())
    return {"got": got}


def spoof(src: str, dst: str, port: str, payload: str) -> dict:
    from scapy.all import Ether, IP, UDP, conf, get_if_hwaddr, sendp
    conf.verb = 0
    gw_mac = "ff:ff:ff:ff:ff:ff"  # broadcast: the bridge floods it to dst's port
    frame = Ether(src=get_if_hwaddr("eth0"), dst=gw_mac) / IP(src=src, dst=dst) / \
        UDP(sport=40000, dport=int(port)) / payload.encode()
    sendp(frame, iface="eth0")
    return {"sent": True}


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    print(json.dumps(globals()[command.replace("-", "_")](*args)), flush=True)
