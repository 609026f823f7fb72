"""Server and prober for the NetworkPolicy truth tables, run inside lab pods:

    python matrix_probe.py serve NAME         -> TCP and UDP on 80 and 81, answering NAME
        (TCP: at accept, then once per line received), until killed
    python matrix_probe.py probe JSON TIMEOUT -> JSON is [[dst, proto, port, sport], ...];
        all probes at once (non-blocking), each from its own source port, so a
        tuple never repeats one that the datapath's conntrack let through
        before; prints [answer or null, ...] in the same order
    python matrix_probe.py flood HOST PORT TIMEOUT PAUSE -> TCP connections one after
        another (each waits for the server's answer, then resets, leaving no
        TIME_WAIT), PAUSE seconds apart, from source ports 32768 up, each once
        (a repeated tuple would ride on the conntrack entry of its first
        time), until a line on stdin or the ports run out; prints
        {"started": true} after the first, then {"ok": n, "failed": m, "errors": {...}}
    python matrix_probe.py hold HOST PORT     -> one TCP connection; prints {"answer": ...}
        at once, then one line per line on stdin (EOF closes it)
"""

from __future__ import annotations

import json
import select
import selectors
import socket
import struct
import sys
import time

PORTS = (80, 81)


def serve(name: str) -> None:
    answer = (name + "\n").encode()
    sel = selectors.DefaultSelector()
    for port in PORTS:
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind(("0.0.0.0", port))
        tcp.listen(4096)
        tcp.setblocking(False)
        sel.register(tcp, selectors.EVENT_READ, "accept")
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("0.0.0.0", port))
        udp.setblocking(False)
        sel.register(udp, selectors.EVENT_READ, "udp")
    print(json.dumps({"serving": name}), flush=True)
    while True:
        for key, _ in sel.select():
            sock = key.fileobj
            try:
                if key.data == "accept":
                    conn, _ = sock.accept()
                    conn.setblocking(False)
                    conn.send(answer)
                    sel.register(conn, selectors.EVENT_READ, "conn")
                elif key.data == "udp":
                    _, peer = sock.recvfrom(100)
                    sock.sendto(answer, peer)
                elif sock.recv(100):
                    sock.send(answer)
                else:
                    sel.unregister(sock)
                    sock.close()
            except OSError:  # a peer that reset, a full buffer: that probe's problem, not ours
                if key.data == "conn":
                    sel.unregister(sock)
                    sock.close()


def _open(dst: str, proto: str, port: int, sport: int) -> socket.socket:
    kind = socket.SOCK_STREAM if proto == "TCP" else socket.SOCK_DGRAM
    s = socket.socket(socket.AF_INET, kind)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", sport))
    s.setblocking(False)
    if proto == "TCP":
        s.connect_ex((dst, port))
    else:
        s.connect((dst, port))
        s.send(b"ping\n")
    return s


def probe(spec: str, timeout: str) -> list:
    probes = json.loads(spec)
    answers: list = [None] * len(probes)
    sel = selectors.DefaultSelector()
    for i, (dst, proto, port, sport) in enumerate(probes):
        try:
            sel.register(_open(dst, proto, port, sport), selectors.EVENT_READ, i)
        except OSError:
            pass  # refused at once: no answer
    end = time.monotonic() + float(timeout)
    while sel.get_map() and (left := end - time.monotonic()) > 0:
        for key, _ in sel.select(left):
            try:
                answers[key.data] = key.fileobj.recv(100).decode().strip() or None
            except OSError:
                pass  # refused, reset: no answer
            sel.unregister(key.fileobj)
            key.fileobj.close()
    for key in list(sel.get_map().values()):
        key.fileobj.close()
    return answers


def _attempt(host: str, port: int, sport: int, timeout: float) -> str | None:
    """None when answered, else why not."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.settimeout(timeout)
    try:
        s.bind(("0.0.0.0", sport))
    except OSError:
        s.close()
        return "skip"  # the port is taken: not a probe
    try:
        s.connect((host, port))
        return None if s.recv(100) else "no answer"
    except OSError as exc:
        return type(exc).__name__
    finally:
        s.close()


def flood(host: str, port: str, timeout: str, pause: str) -> dict:
    ok, errors = 0, {}
    started = False
    sports = iter(range(32768, 65536))
    while not select.select([sys.stdin], [], [], float(pause))[0]:
        sport = next(sports, None)
        if sport is None:
            sys.stdin.readline()
            break
        why = _attempt(host, int(port), sport, float(timeout))
        if why == "skip":
            continue
        if why is None:
            ok += 1
        else:
            errors[why] = errors.get(why, 0) + 1
        if not started:
            print(json.dumps({"started": True}), flush=True)
            started = True
    return {"ok": ok, "failed": sum(errors.values()), "errors": errors}


def hold(host: str, port: str) -> None:
    with socket.create_connection((host, int(port)), timeout=5) as s:
        f = s.makefile("r")
        print(json.dumps({"answer": f.readline().strip()}), flush=True)
        for _ in sys.stdin:
            try:
                s.sendall(b"ping\n")
                print(json.dumps({"answer": f.readline().strip() or None}), flush=True)
            except OSError as exc:
                print(json.dumps({"answer": None, "error": str(exc)}), flush=True)


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    result = globals()[command](*args)
    if result is not None:
        print(json.dumps(result), flush=True)
