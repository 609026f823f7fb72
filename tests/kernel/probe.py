"""Client programs the kernel tests run inside lab pods (real sockets).

    python probe.py <command> [args...]   -> one JSON object on stdout

Kept in one file so each test runs a real process in the pod's network
namespace and the lab cgroup, where meshbpf's hooks apply.
"""

from __future__ import annotations

import collections
import errno
import json
import socket
import struct
import sys
import time


def _http_get(host: str, port: int, timeout: float = 2.0) -> str:
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    return data.split(b"\r\n\r\n", 1)[1].decode().strip()


def whoami(host: str, port: str, count: str) -> dict:
    """count sequential connections; which backend answered each."""
    seen: collections.Counter = collections.Counter()
    errors: collections.Counter = collections.Counter()
    for _ in range(int(count)):
        try:
            seen[_http_get(host, int(port))] += 1
        except OSError as exc:
            errors[errno.errorcode.get(exc.errno, str(exc))] += 1
    return {"answers": dict(seen), "errors": dict(errors)}


def peername(host: str, port: str) -> dict:
    """What getpeername() reports for a TCP connection to host:port."""
    with socket.create_connection((host, int(port)), timeout=2) as s:
        peer = s.getpeername()
        return {"peer": [peer[0], peer[1]]}


def peername_after_churn(host: str, port: str, idle: str, churn: str) -> dict:
    """getpeername() of idle connections after many newer ones came and went."""
    held = [socket.create_connection((host, int(port)), timeout=2) for _ in range(int(idle))]
    for _ in range(int(churn)):
        socket.create_connection((host, int(port)), timeout=2).close()
    peers = sorted({f"{s.getpeername()[0]}:{s.getpeername()[1]}" for s in held})
    for s in held:
        s.close()
    return {"peers": peers}


SO_COOKIE = 57  # asm-generic/socket.h: the socket cookie BPF programs see


def hold_peer(host: str, port: str) -> dict:
    """One connection: its socket cookie and getpeername() on a first line,
    then getpeername() again after a line from stdin, at close."""
    with socket.create_connection((host, int(port)), timeout=5) as s:
        cookie = struct.unpack("Q", s.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0]
        print(json.dumps({"cookie": cookie, "peer": list(s.getpeername()[:2])}), flush=True)
        sys.stdin.readline()
        return {"peer": list(s.getpeername()[:2])}


def _dns_query(name: str) -> bytes:
    header = struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
    qname = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return header + qname + struct.pack("!HH", 16, 1)  # TXT, IN


def udp_peer(host: str, port: str, connected: str = "no") -> dict:
    """Send a DNS query; where recvfrom() says the reply came from."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        if connected == "yes":
            s.connect((host, int(port)))
            s.send(_dns_query("whoami.lab"))
        else:
            s.sendto(_dns_query("whoami.lab"), (host, int(port)))
        data, addr = s.recvfrom(4096)
        return {"from": [addr[0], addr[1]], "txt": _last_txt(data)}


def _last_txt(reply: bytes) -> str:
    """The TXT string that ends the reply: rdlength(2) | length(1) | text."""
    for n in range(1, min(64, len(reply) - 3)):
        if reply[-n - 1] == n and struct.unpack("!H", reply[-n - 3:-n - 1])[0] == n + 1:
            return reply[-n:].decode(errors="replace")
    return ""


def connect_error(host: str, port: str) -> dict:
    """errno and elapsed time of a TCP connect() that should be refused."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(5)
    start = time.monotonic()
    try:
        s.connect((host, int(port)))
        err = 0
    except OSError as exc:
        err = exc.errno or -1
    elapsed = time.monotonic() - start
    s.close()
    return {"errno": errno.errorcode.get(err, str(err)), "elapsed": elapsed}


def udp_send_error(host: str, port: str) -> dict:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.sendto(b"x", (host, int(port)))
            return {"errno": "0"}
        except OSError as exc:
            return {"errno": errno.errorcode.get(exc.errno, str(exc.errno))}


def loop(host: str, port: str, seconds: str) -> dict:
    """New connections back to back for `seconds`; counts answers and failures."""
    result = whoami_until(host, int(port), time.monotonic() + float(seconds))
    return result


def load(host: str, port: str, settle: str = "20", gap: str = "0") -> dict:
    """New connections back to back until told to stop, for tests that must
    show an event happened while traffic flowed. Prints {"started": ...}
    after `settle` answers; after a line on stdin it makes `settle` more
    answers (or gives up after 60 s) and returns the CLOCK_MONOTONIC time of
    every answer (the clock the test reads too), so the test can count the
    connections made before, during and after its event. `gap` seconds
    between connections leave CPU to the rest (a one-vCPU emulated VM)."""
    import threading
    settle_n, stop_at, pause = int(settle), [], float(gap)
    seen: collections.Counter = collections.Counter()
    errors: collections.Counter = collections.Counter()
    times: list[float] = []

    def wait_for_stop():
        sys.stdin.readline()
        stop_at.append(time.monotonic())
    threading.Thread(target=wait_for_stop, daemon=True).start()
    started, give_up = False, time.monotonic() + 30
    while True:
        try:
            seen[_http_get(host, int(port))] += 1
            times.append(round(time.monotonic(), 4))
        except OSError as exc:
            errors[errno.errorcode.get(exc.errno, str(exc))] += 1
        if pause:
            time.sleep(pause)
        if not started and len(times) >= settle_n:
            print(json.dumps({"started": times[0]}), flush=True)
            started = True
        elif not started and time.monotonic() > give_up:
            print(json.dumps({"started": None}), flush=True)
            return {"answers": dict(seen), "errors": dict(errors), "times": times}
        if stop_at and (sum(t > stop_at[0] for t in times[-settle_n:]) >= settle_n
                        or time.monotonic() > stop_at[0] + 60):
            return {"answers": dict(seen), "errors": dict(errors), "times": times}


def whoami_until(host: str, port: int, deadline: float) -> dict:
    seen: collections.Counter = collections.Counter()
    errors: collections.Counter = collections.Counter()
    while time.monotonic() < deadline:
        try:
            seen[_http_get(host, port)] += 1
        except OSError as exc:
            errors[errno.errorcode.get(exc.errno, str(exc))] += 1
    return {"answers": dict(seen), "errors": dict(errors)}


def hold(host: str, port: str, seconds: str) -> dict:
    """One keep-alive connection, a request now and one after `seconds`
    (reading a line from stdin first if seconds is 'stdin')."""
    with socket.create_connection((host, int(port)), timeout=5) as s:
        def ask() -> str:
            s.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            head = b""
            while b"\r\n\r\n" not in head:
                head += s.recv(1)
            length = int([line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")][0])
            body = b""
            while len(body) < length:
                body += s.recv(length - len(body))
            return body.decode().strip()
        first = ask()
        print(json.dumps({"first": first}), flush=True)
        if seconds == "stdin":
            sys.stdin.readline()
        else:
            time.sleep(float(seconds))
        try:
            second = ask()
        except OSError as exc:
            second = f"error: {exc}"
        return {"first": first, "second": second}


# --- redirection: full-duplex transfers with checksums ---------------------

def _pattern(seed: int) -> bytes:
    import random
    return random.Random(seed).randbytes((1 << 20) + 7)  # not a multiple of any write size


def _send_stream(sock, size: int, total: int, seed: int, flags: int = 0) -> str:
    import hashlib
    pool, h, off, sent = _pattern(seed), hashlib.sha256(), 0, 0
    view = memoryview(pool)
    while sent < total:
        n = min(size, total - sent)
        if off + n > len(pool):
            off = 0
        chunk = view[off:off + n]
        if flags:
            while chunk:
                chunk = chunk[sock.send(chunk, flags):]
        else:
            sock.sendall(chunk)
        h.update(view[off:off + n])
        off += n
        sent += n
    return h.hexdigest()


def _recv_stream(sock) -> tuple[str, int]:
    """Reads to EOF the way event-driven servers do: poll, then a
    non-blocking read. (A blocking read on a spliced socket that another
    thread writes to at the same time can return EAGAIN: a kernel bug in
    tcp_bpf_recvmsg, see README.md. EAGAIN is how this loop waits anyway.)"""
    import hashlib
    import select
    h, n, buf = hashlib.sha256(), 0, bytearray(1 << 20)
    view = memoryview(buf)
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    while True:
        try:
            got = sock.recv_into(buf, 0, socket.MSG_DONTWAIT)
        except BlockingIOError:
            poller.poll()
            continue
        if not got:
            return h.hexdigest(), n
        h.update(view[:got])
        n += got


def _duplex(sock, size: int, total: int, seed: int, flags: int = 0) -> dict:
    """Send `total` bytes in `size` writes while receiving the peer's stream."""
    import threading
    out: dict = {}

    def sender():
        out["sent_sha"] = _send_stream(sock, size, total, seed, flags)
        sock.shutdown(socket.SHUT_WR)  # half-close: the peer reads to EOF
    t = threading.Thread(target=sender)
    t.start()
    out["recv_sha"], out["recv_bytes"] = _recv_stream(sock)
    t.join()
    return out


def _tune(sock, nodelay: str) -> None:
    if nodelay == "nodelay":
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def xfer_server(port: str, size: str, total: str, nodelay: str, mode: str = "duplex") -> dict:
    """Accept one connection and run a full-duplex transfer on it; with
    mode "sink", only read to EOF (a one-way upload)."""
    family = socket.AF_INET6
    with socket.socket(family, socket.SOCK_STREAM) as ls:
        ls.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("::", int(port)))
        ls.listen(1)
        ls.settimeout(600)  # a non-blocking listener, as event loops have: its sockets may join
        print(json.dumps({"listening": True}), flush=True)
        conn, _ = ls.accept()
        conn.settimeout(600)  # non-blocking with poll(), like xfer_client: redirection splices only those
        with conn:
            _tune(conn, nodelay)
            if mode == "sink":
                recv_sha, recv_bytes = _recv_stream(conn)
                return {"recv_sha": recv_sha, "recv_bytes": recv_bytes, "sent_sha": ""}
            return _duplex(conn, int(size), int(total), seed=2)


def xfer_client(host: str, port: str, size: str, total: str, nodelay: str, flags: str = "0") -> dict:
    with socket.create_connection((host, int(port)), timeout=120) as c:
        _tune(c, nodelay)
        return _duplex(c, int(size), int(total), seed=1, flags=int(flags))


def _recv_exact(sock, n: int) -> bytes:
    """n bytes, waiting with poll (see _recv_stream on blocking reads)."""
    import select
    out = bytearray()
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    while len(out) < n:
        try:
            got = sock.recv(n - len(out), socket.MSG_DONTWAIT)
        except BlockingIOError:
            poller.poll()
            continue
        if not got:
            raise ConnectionError(f"EOF after {len(out)} of {n} bytes")
        out += got
    return bytes(out)


def burst_server(port: str, size: str, burst: str, rounds: str) -> dict:
    """Reads `rounds` bursts of `burst` x `size` bytes, answering each with
    one byte (TCP_NODELAY); returns the sha256 of what it read."""
    import hashlib
    with socket.create_server(("::", int(port)), family=socket.AF_INET6, dualstack_ipv6=True) as ls:
        ls.settimeout(600)  # a non-blocking listener, as event loops have: its sockets may join
        print(json.dumps({"listening": True}), flush=True)
        conn, _ = ls.accept()
        conn.settimeout(600)  # non-blocking with poll(): redirection splices only those
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            h, n = hashlib.sha256(), 0
            for _ in range(int(rounds)):
                data = _recv_exact(conn, int(size) * int(burst))
                h.update(data)
                n += len(data)
                conn.sendall(b"k")
            return {"recv_sha": h.hexdigest(), "recv_bytes": n}


def burst_client(host: str, port: str, size: str, burst: str, rounds: str) -> dict:
    """`rounds` times: `burst` writes of `size` bytes (TCP_NODELAY), then
    wait for the server's one-byte reply."""
    import hashlib
    pool, h = _pattern(3), hashlib.sha256()
    with socket.create_connection((host, int(port)), timeout=60) as c:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        off = 0
        for _ in range(int(rounds)):
            for _ in range(int(burst)):
                chunk = pool[off:off + int(size)]
                off = (off + int(size)) % (len(pool) - int(size))
                c.sendall(chunk)
                h.update(chunk)
            assert _recv_exact(c, 1) == b"k"
    return {"sent_sha": h.hexdigest()}


def echo_server(port: str) -> dict:
    """Echoes one connection back until EOF, reading with poll."""
    import select
    with socket.create_server(("::", int(port)), family=socket.AF_INET6, dualstack_ipv6=True) as ls:
        ls.settimeout(600)  # a non-blocking listener, as event loops have: its sockets may join
        print(json.dumps({"listening": True}), flush=True)
        conn, _ = ls.accept()
        conn.setblocking(False)  # as event loops do: redirection splices only non-blocking sockets
        n, buf = 0, bytearray(1 << 16)
        poller = select.poll()
        poller.register(conn, select.POLLIN)
        with conn:
            while True:
                try:
                    got = conn.recv_into(buf, 0, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    poller.poll()
                    continue
                if not got:
                    conn.shutdown(socket.SHUT_WR)
                    return {"echoed": n}
                _send_all(conn, memoryview(buf)[:got], poller)
                n += got


def _send_all(conn: socket.socket, data: memoryview, poller) -> None:
    """sendall for a non-blocking socket: waits for room with poll."""
    import select
    while data:
        try:
            data = data[conn.send(data):]
        except BlockingIOError:
            poller.modify(conn, select.POLLOUT)
            poller.poll()
            poller.modify(conn, select.POLLIN)


def stream_client(host: str, port: str, size: str) -> dict:
    """A live connection for as long as the test wants: sends `size`-byte
    writes about every millisecond, reads the echo back, and answers each
    stdin line "mark" with the bytes sent so far; "stop" ends the stream.
    Returns sha256 of both directions, to check nothing was lost."""
    import hashlib
    import threading
    pool, size_n = _pattern(4), int(size)
    sent = {"bytes": 0, "sha": hashlib.sha256()}
    stop = threading.Event()
    with socket.create_connection((host, int(port)), timeout=60) as c:
        def sender():
            off = 0
            while not stop.is_set():
                chunk = pool[off:off + size_n]
                off = (off + size_n) % (len(pool) - size_n)
                c.sendall(chunk)
                sent["sha"].update(chunk)
                sent["bytes"] += len(chunk)
                time.sleep(0.001)
            c.shutdown(socket.SHUT_WR)
        result: dict = {}

        def receiver():
            result["recv_sha"], result["recv_bytes"] = _recv_stream(c)
        threads = [threading.Thread(target=sender), threading.Thread(target=receiver)]
        for t in threads:
            t.start()
        print(json.dumps({"connected": True}), flush=True)
        for line in sys.stdin:
            if line.strip() == "mark":
                print(json.dumps({"sent": sent["bytes"]}), flush=True)
            else:
                break
        stop.set()
        for t in threads:
            t.join(60)
    return {"sent_sha": sent["sha"].hexdigest(), "sent_bytes": sent["bytes"], **result}


COMMANDS = {f.__name__.replace("_", "-"): f for f in
            (whoami, peername, peername_after_churn, hold_peer, udp_peer, connect_error, udp_send_error, loop, load, hold,
             xfer_server, xfer_client, burst_server, burst_client, echo_server, stream_client)}

if __name__ == "__main__":
    print(json.dumps(COMMANDS[sys.argv[1]](*sys.argv[2:])), flush=True)
