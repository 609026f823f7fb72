"""Policy flow events: the ring buffer mbpf_events, read through libbpf.

The tc programs emit an event per new flow decided and per drop, only
while mbpf_pol_cfg.events is on; PolicyEvents turns it on while it reads.
"""

from __future__ import annotations

import ctypes as ct
import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path

from . import libbpf
from .layout import PolEventC
from .policy import PolicyError, PolicyMaps


@dataclass(frozen=True)
class PolicyEvent:
    ts_ns: int
    src: str         # "addr:port" (IPv6 in brackets)
    dst: str
    proto: int
    ep_id: int
    ifindex: int
    direction: str   # "ingress" (to the pod) or "egress"
    verdict: str     # EVENT_VERDICTS
    rule: int


EVENT_VERDICTS = {0: "allow", 1: "deny", 2: "spoofed", 3: "malformed"}


def _endpoint_text(raw: bytes, port_net: int) -> str:
    ip = ipaddress.IPv6Address(raw)
    text = str(ip.ipv4_mapped or ip)
    port = socket.ntohs(port_net)
    return f"[{text}]:{port}" if ":" in text else f"{text}:{port}"


def parse_event(record: bytes) -> PolicyEvent:
    c = PolEventC.from_buffer_copy(record[:ct.sizeof(PolEventC)])
    return PolicyEvent(c.ts_ns, _endpoint_text(bytes(c.saddr), c.sport),
                       _endpoint_text(bytes(c.daddr), c.dport), c.proto, c.ep_id, c.ifindex,
                       "ingress" if c.dir == 0 else "egress", EVENT_VERDICTS.get(c.verdict, "?"),
                       c.rule)


class PolicyEvents:
    """Listens to the flow events: the programs emit them only while a
    reader has the switch in mbpf_pol_cfg on (this turns it on, close()
    turns it off), so nobody listening costs one array lookup per event."""

    def __init__(self, bpffs: Path):
        self.maps = PolicyMaps(bpffs)
        if "mbpf_events" not in self.maps.fds:
            self.maps.close()
            raise PolicyError("no event ring buffer here (kernel 5.8+ needed)")
        self._pending: list[PolicyEvent] = []
        self._rb = libbpf.RingBuffer(self.maps.fds["mbpf_events"],
                                     lambda rec: self._pending.append(parse_event(rec)))
        self.maps.set_events(True)

    def poll(self, timeout_ms: int = 100) -> list[PolicyEvent]:
        self._rb.poll(timeout_ms)
        out, self._pending = self._pending, []
        return out

    def close(self) -> None:
        self.maps.set_events(False)
        self._rb.close()
        self.maps.close()

    def __enter__(self) -> "PolicyEvents":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
