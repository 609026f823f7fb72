"""Client for the packet-flow tests (test_northsouth_flows.py), run in a lab
namespace (the router, a pod):

    python ns_flow_probe.py tcp HOST PORT COUNT [BIND]   -> {"answers": {"a1 10.243.0.1 80": 3}, "errors": {...}}
                                                           (BIND: an address, or ADDRESS,PORT for one fixed flow)
    python ns_flow_probe.py udp HOST PORT COUNT [BIND]   -> {"answers": {"a1": 2}, "errors": {...}}
    python ns_flow_probe.py http HOST PORT               -> {"status": 200, "body": "..."} or {"error": ...}

Each attempt is a new socket, so a new source port (a new flow for hashing).
An attempt that fails is named as kube-proxy's tables name it: "REJECT" for a
TCP RST or an ICMP unreachable, "DROP" for no answer in WAIT seconds.
"""

from __future__ import annotations

import collections
import errno
import json
import socket
import struct
import sys
import urllib.error
import urllib.request

WAIT = 3.0
# ECONNRESET: a RST after the handshake (a listener closing as the test reaches it);
# EPERM: the socket-LB's refusal on kernels without bpf_set_retval (before 5.18).
REJECTED = {errno.ECONNREFUSED, errno.ECONNRESET, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN,
            errno.EPERM}


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _verdict(exc: OSError) -> str:
    if isinstance(exc, socket.timeout) or exc.errno == errno.ETIMEDOUT:
        return "DROP"
    if exc.errno in REJECTED:
        return "REJECT"
    return errno.errorcode.get(exc.errno or 0, str(exc))


def _bind(s: socket.socket, bind: str | None) -> None:
    if bind:
        addr, _, port = bind.partition(",")
        s.bind((addr, int(port or 0)))


def _tcp_once(host: str, port: int, bind: str | None) -> str:
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.settimeout(WAIT)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the same flow again, from another node
        _bind(s, bind)
        s.connect((host, port))
        s.sendall(f"GET /client HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    return data.split(b"\r\n\r\n", 1)[1].decode().strip()


def _dns_query() -> bytes:
    header = struct.pack("!HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0)
    return header + b"\x06whoami\x03lab\x00" + struct.pack("!HH", 16, 1)  # TXT, IN


def _udp_once(host: str, port: int, bind: str | None) -> str:
    with socket.socket(_family(host), socket.SOCK_DGRAM) as s:
        s.settimeout(WAIT)
        _bind(s, bind)
        s.connect((host, port))   # connected: an ICMP unreachable comes back as ECONNREFUSED
        s.send(_dns_query())
        reply = s.recv(4096)
    # The TXT string ends the reply: rdlength(2) | length(1) | text.
    for n in range(1, min(64, len(reply) - 3)):
        if reply[-n - 1] == n and struct.unpack("!H", reply[-n - 3:-n - 1])[0] == n + 1:
            return reply[-n:].decode(errors="replace")
    return f"unparsed reply {reply!r}"


def attempts(once, host: str, port: str, count: str, bind: str | None = None) -> dict:
    answers: collections.Counter = collections.Counter()
    errors: collections.Counter = collections.Counter()
    for _ in range(int(count)):
        try:
            answers[once(host, int(port), bind)] += 1
        except OSError as exc:
            errors[_verdict(exc)] += 1
    return {"answers": dict(answers), "errors": dict(errors)}


def http(host: str, port: str) -> dict:
    url = f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"
    try:
        with urllib.request.urlopen(url, timeout=WAIT) as resp:
            return {"status": resp.status, "body": resp.read().decode()}
    except urllib.error.HTTPError as exc:
        return {"status": exc.code, "body": exc.read().decode()}
    except OSError as exc:
        reason = getattr(exc, "reason", exc)
        return {"error": _verdict(reason) if isinstance(reason, OSError) else str(reason)}


def main() -> None:
    command, *args = sys.argv[1:]
    if command == "tcp":
        out = attempts(_tcp_once, *args)
    elif command == "udp":
        out = attempts(_udp_once, *args)
    else:
        out = http(*args)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
