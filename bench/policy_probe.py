"""Probes a TCP port with a new connection every INTERVAL seconds and prints
each change of outcome: `<CLOCK_MONOTONIC start of the attempt> allowed|denied`.

    python3 policy_probe.py ADDR PORT [INTERVAL] [TIMEOUT] [FIRST_SOURCE_PORT]

An attempt is "allowed" when the handshake completes (or is refused: the
packet reached the pod), "denied" when it is still pending after TIMEOUT
(a dropped SYN; keep TIMEOUT under TCP's first SYN retransmit, 1 s), and
"error-<ERRNO>" when it fails otherwise. Attempts overlap, so a change is seen within INTERVAL even
while denied attempts wait out their TIMEOUT. Outcomes are reported in the
order attempts started. Runs until stdin closes.

With FIRST_SOURCE_PORT, attempt k binds source port FIRST + k (cycling over
SOURCE_PORTS ports below the ephemeral range), so no two attempts share a
4-tuple for SOURCE_PORTS x INTERVAL seconds: a flow entry left by an
earlier attempt (meshbpf's flow map keeps entries until LRU eviction)
cannot answer for a later one. Without it the kernel picks ports, and
reuses them.
"""

from __future__ import annotations

import errno
import os
import selectors
import socket
import struct
import sys
import time


SOURCE_PORTS = 20000


def main() -> None:
    addr, port = sys.argv[1], int(sys.argv[2])
    interval = float(sys.argv[3]) if len(sys.argv) > 3 else 0.005
    timeout = float(sys.argv[4]) if len(sys.argv) > 4 else 0.9   # below TCP's first SYN retransmit (1 s)
    first_port = int(sys.argv[5]) if len(sys.argv) > 5 else 0
    attempt = 0
    sel = selectors.DefaultSelector()
    sel.register(sys.stdin, selectors.EVENT_READ, "stdin")
    pending: dict[socket.socket, float] = {}
    done: dict[float, str] = {}      # start -> outcome, until reported in order
    starts: list[float] = []
    last, next_at = None, time.monotonic()
    print("ready", flush=True)
    while True:
        now = time.monotonic()
        if now >= next_at:
            s = socket.socket()
            s.setblocking(False)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            if first_port:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("", first_port + attempt % SOURCE_PORTS))
            attempt += 1
            err = s.connect_ex((addr, port))
            if err not in (0, errno.EINPROGRESS):
                done[now] = "allowed" if err == errno.ECONNREFUSED else f"error-{errno.errorcode.get(err, err)}"
                s.close()
            else:
                pending[s] = now
                sel.register(s, selectors.EVENT_WRITE, "sock")
            starts.append(now)
            next_at = now + interval
        for key, _ in sel.select(max(0.0, min(next_at - time.monotonic(), 0.005))):
            if key.data == "stdin":
                if not os.read(sys.stdin.fileno(), 4096):
                    return
                continue
            s = key.fileobj
            sel.unregister(s)
            err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            # connected, or refused: either way the SYN got through
            done[pending.pop(s)] = "allowed" if err in (0, errno.ECONNREFUSED) else f"error-{errno.errorcode.get(err, err)}"
            s.close()
        now = time.monotonic()
        for s, start in list(pending.items()):
            if now - start > timeout:
                sel.unregister(s)
                del pending[s]
                done[start] = "denied"
                s.close()
        while starts and starts[0] in done:
            start = starts.pop(0)
            outcome = done.pop(start)
            if outcome != last:
                print(f"{start:.6f} {outcome}", flush=True)
                last = outcome


if __name__ == "__main__":
    main()
