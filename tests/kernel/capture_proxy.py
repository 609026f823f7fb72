"""A tiny sidecar proxy and its client, for the sidecar capture tests.

    capture_proxy.py proxy OUT_PORT IN_PORT UID [forward|getsockname]
        listens on OUT_PORT and IN_PORT (IPv4 and IPv6), then drops to UID,
        as Istio's proxy runs as 1337. Each accepted connection gets one JSON
        line: the port it came in on, the proxy's uid, what
        getsockopt(SO_ORIGINAL_DST) (IP6T_SO_ORIGINAL_DST on IPv6) answered,
        and what getsockname() answered ("sockname"). With "forward" it
        first connects to that original destination itself (an HTTP GET, as
        uid UID) and adds the answer: where the proxy's own connect went.
        "getsockname" forwards to what getsockname() named instead, as
        HAProxy 2.6 does for IPv6.
    capture_proxy.py get HOST PORT
        what an app sees: one HTTP GET to HOST:PORT; prints the proxy's JSON
        answer, a plain HTTP server's body, or the connect error.
    capture_proxy.py get-sockname HOST PORT
        the same, plus what getsockname() said on the app's own socket
        ("app_sockname").
    capture_proxy.py dns PORT UID HOST...
        the proxy's DNS port on each HOST (127.0.0.1 and ::1, where the
        Istio agent listens): answers every UDP datagram, and every query
        on a TCP connection, with its port, uid and the address it came to
        ("to").
    capture_proxy.py udp-get HOST PORT [UID]
        a DNS query (TXT whoami.lab) over a connected UDP socket (as glibc
        and dig send), as UID if given; prints the answer (the DNS port's
        JSON, or a real server's TXT as "txt"), where recvfrom() said it
        came from ("from") and what getpeername() said ("peer").
    capture_proxy.py udp-sendto HOST PORT [UID]
        the same with sendto()/recvfrom() on an unconnected socket (as
        musl, Go's and dnsmasq-style resolvers send).
    capture_proxy.py tcp-get HOST PORT
        the same query over TCP (as dig +tcp and resolvers after a truncated
        answer send); prints the answer and what getpeername() said ("peer").
"""

from __future__ import annotations

import errno
import json
import os
import selectors
import socket
import struct
import sys
import threading

SO_ORIGINAL_DST = 80  # SOL_IP; IP6T_SO_ORIGINAL_DST on SOL_IPV6 has the same number


def original_dst(conn: socket.socket) -> dict:
    try:
        if conn.family == socket.AF_INET:
            raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
            port, addr = struct.unpack("!2xH4s8x", raw)
            return {"orig": [socket.inet_ntop(socket.AF_INET, addr), port]}
        raw = conn.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
        port, addr = struct.unpack("!2xH4x16s4x", raw)
        return {"orig": [socket.inet_ntop(socket.AF_INET6, addr), port]}
    except OSError as exc:
        return {"orig_error": errno.errorcode.get(exc.errno, str(exc))}


def http_get(host: str, port: int, timeout: float = 10.0, sockname: list | None = None) -> str:
    """The answer's body; sockname, if given, gets the app socket's own address."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        if sockname is not None:
            sockname[:] = s.getsockname()[:2]
        s.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return body.decode().strip() if head.startswith(b"HTTP/") else data.decode().strip()


def _read_request(conn: socket.socket) -> None:
    """Read the app's request before answering: closing with unread bytes
    would send a reset instead of the answer."""
    data = b""
    conn.settimeout(10)
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            return
        data += chunk


def handle(conn: socket.socket, port: int, mode: str) -> None:
    with conn:
        try:
            _read_request(conn)
        except OSError:
            return
        answer = {"port": port, "uid": os.getuid(), "peer": list(conn.getpeername()[:2]),
                  "sockname": list(conn.getsockname()[:2]), **original_dst(conn)}
        target = {"forward": answer.get("orig"), "getsockname": answer["sockname"]}.get(mode)
        if target:
            try:
                answer["upstream"] = http_get(*target)
            except OSError as exc:
                answer["upstream_error"] = errno.errorcode.get(exc.errno, str(exc))
        body = (json.dumps(answer) + "\n").encode()
        conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n"
                     % len(body) + body)


def listen(port: int) -> list[socket.socket]:
    socks = []
    for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((host, port))
        s.listen(128)
        socks.append(s)
    return socks


def serve(sock: socket.socket, mode: str) -> None:
    port = sock.getsockname()[1]
    while True:
        conn, _ = sock.accept()
        threading.Thread(target=handle, args=(conn, port, mode), daemon=True).start()


def proxy(out_port: str, in_port: str, uid: str, mode: str = "") -> None:
    socks = listen(int(out_port)) + listen(int(in_port))
    os.setgid(int(uid))
    os.setuid(int(uid))  # after bind, as a proxy drops privileges
    threads = [threading.Thread(target=serve, args=(s, mode), daemon=True) for s in socks]
    for t in threads:
        t.start()
    print(json.dumps({"ready": True}), flush=True)
    for t in threads:
        t.join()


def get(host: str, port: str, with_sockname: bool = False) -> None:
    sockname: list = []
    try:
        body = http_get(host, int(port), sockname=sockname)
    except OSError as exc:
        print(json.dumps({"error": errno.errorcode.get(exc.errno, str(exc))}))
        return
    answer = json.loads(body) if body.startswith("{") else {"body": body}
    print(json.dumps({**answer, "app_sockname": sockname} if with_sockname else answer))


def dns(port: str, uid: str, *hosts: str) -> None:
    sel = selectors.DefaultSelector()
    for host in hosts:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = socket.socket(family, socket.SOCK_DGRAM)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((host, int(port)))
        sel.register(s, selectors.EVENT_READ, host)
        t = socket.socket(family, socket.SOCK_STREAM)
        t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            t.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        t.bind((host, int(port)))
        t.listen(16)
        sel.register(t, selectors.EVENT_READ, host)
    os.setgid(int(uid))
    os.setuid(int(uid))
    print(json.dumps({"ready": True}), flush=True)
    while True:
        for key, _ in sel.select():
            answer = json.dumps({"dns_port": int(port), "uid": os.getuid(), "to": key.data}).encode()
            if key.fileobj.type == socket.SOCK_DGRAM:
                _, peer = key.fileobj.recvfrom(512)
                key.fileobj.sendto(answer, peer)
                continue
            conn, _ = key.fileobj.accept()
            with conn:
                try:
                    conn.settimeout(5)
                    tcp_read(conn)
                    conn.sendall(struct.pack("!H", len(answer)) + answer)
                except OSError:
                    pass


def dns_query(name: str = "whoami.lab") -> bytes:
    """A TXT query: id 0x1234, recursion desired, one question."""
    qname = b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\0"
    return struct.pack("!6H", 0x1234, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!2H", 16, 1)


def dns_answer(reply: bytes) -> dict:
    """The DNS port's JSON answer, or the first TXT string of a real one."""
    if reply.startswith(b"{"):
        return json.loads(reply)
    end = 12 + reply[12:].index(b"\0") + 5      # header, question name, type and class
    rdlen = struct.unpack("!H", reply[end + 10:end + 12])[0]  # a compressed name (2), type,
    rdata = reply[end + 12:end + 12 + rdlen]                   # class, ttl, rdlength
    return {"txt": rdata[1:1 + rdata[0]].decode()} if rdata else {"raw": reply.hex()}


def tcp_read(conn: socket.socket) -> bytes:
    """One DNS message over TCP: a two-byte length, then the message."""
    data = b""
    while len(data) < 2 or len(data) < 2 + struct.unpack("!H", data[:2])[0]:
        chunk = conn.recv(4096)
        if not chunk:
            raise ConnectionResetError(errno.ECONNRESET, "closed mid-message")
        data += chunk
    return data[2:]


def tcp_ask(host: str, port: str) -> None:
    try:
        with socket.create_connection((host, int(port)), timeout=5) as s:
            peer = list(s.getpeername()[:2])
            query = dns_query()
            s.sendall(struct.pack("!H", len(query)) + query)
            reply = tcp_read(s)
    except OSError as exc:  # socket.timeout is one
        print(json.dumps({"error": errno.errorcode.get(exc.errno, str(exc))}))
        return
    print(json.dumps({**dns_answer(reply), "peer": peer}))


def udp_ask(host: str, port: str, connected: bool, uid: str = "") -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if uid:
        os.setgid(int(uid))
        os.setuid(int(uid))
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        try:
            peer = {}
            if connected:
                s.connect((host, int(port)))
                peer = {"peer": list(s.getpeername()[:2])}
                s.send(dns_query())
            else:
                s.sendto(dns_query(), (host, int(port)))
            reply, source = s.recvfrom(512)
        except OSError as exc:  # socket.timeout is one
            print(json.dumps({"error": errno.errorcode.get(exc.errno, str(exc))}))
            return
    print(json.dumps({**dns_answer(reply), "from": list(source[:2]), **peer}))


if __name__ == "__main__":
    {"proxy": proxy, "get": get, "get-sockname": lambda host, port: get(host, port, True),
     "dns": dns, "udp-get": lambda *args: udp_ask(*args[:2], True, *args[2:]),
     "udp-sendto": lambda *args: udp_ask(*args[:2], False, *args[2:]),
     "tcp-get": tcp_ask}[sys.argv[1]](*sys.argv[2:])
