"""Flow events: the ring buffer mbpf_events, read through libbpf.

Three kinds share it (common.h, "Flow event"): the policy programs emit one
per new flow decided and per drop, the socket-LB programs one per
translated or refused connect() / UDP send to a Service, and one per
connect() / UDP send that sidecar capture steered to a proxy. All emit only
while mbpf_pol_cfg.events is on; PolicyEvents turns it on while it reads.
The maps are opened alone, so the events of an agent that only load-balances
(no policy maps pinned) can be read too.
"""

from __future__ import annotations

import ctypes as ct
import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from . import libbpf
from .layout import EV_KIND_CAP, EV_KIND_LB, EV_KIND_OFF, CapEventC, LbEventC, PolCfgC, PolEventC
from .policy import PolicyError


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
    type: str = "policy"


@dataclass(frozen=True)
class LbEvent:
    ts_ns: int
    service: str           # the Service address "addr:port" the client asked for
    backend: str | None    # "addr:port" it was sent to; None: refused
    proto: int
    svc_id: int
    hook: str              # "connect" or "sendmsg" (unconnected UDP)
    verdict: str           # LB_VERDICTS
    cgroup_id: int         # the calling task's cgroup v2 id (its inode)
    netns_cookie: int      # 0 where the kernel cannot tell
    type: str = "lb"


@dataclass(frozen=True)
class CapEvent:
    ts_ns: int
    original: str          # "addr:port" the caller asked for
    to: str                # "addr:port" of the proxy it was steered to
    proto: int
    hook: str              # "connect", "sendmsg" (unconnected UDP: DNS) or "tc" (a client on another node)
    verdict: str           # CAP_DECISIONS: outbound, inbound or dns
    pod_cgroup_id: int     # the meshed pod's cgroup (the caller's, or for inbound the destination's)
    cgroup_id: int         # the calling task's cgroup v2 id
    netns_cookie: int      # 0 where the kernel cannot tell
    peer: str | None = None  # tc: "addr:port" of the client (no task, so no cgroup)
    type: str = "capture"


EVENT_VERDICTS = {0: "allow", 1: "deny", 2: "spoofed", 3: "malformed"}
LB_VERDICTS = {0: "translated", 1: "refused"}
LB_HOOKS = {0: "connect", 1: "sendmsg"}
CAP_DECISIONS = {1: "outbound", 2: "inbound", 3: "dns"}  # MBPF_CAP_EV_*
CAP_HOOKS = {**LB_HOOKS, 2: "tc"}  # MBPF_LB_EV_CONNECT, _SENDMSG, MBPF_CAP_EV_TC


def _endpoint_text(raw: bytes, port_net: int) -> str:
    ip = ipaddress.IPv6Address(raw)
    text = str(ip.ipv4_mapped or ip)
    port = socket.ntohs(port_net)
    return f"[{text}]:{port}" if ":" in text else f"{text}:{port}"


def _parse_policy(record: bytes) -> PolicyEvent:
    c = PolEventC.from_buffer_copy(record[:ct.sizeof(PolEventC)])
    return PolicyEvent(c.ts_ns, _endpoint_text(bytes(c.saddr), c.sport),
                       _endpoint_text(bytes(c.daddr), c.dport), c.proto, c.ep_id, c.ifindex,
                       "ingress" if c.dir == 0 else "egress", EVENT_VERDICTS.get(c.verdict, "?"),
                       c.rule)


def _parse_lb(record: bytes) -> LbEvent:
    c = LbEventC.from_buffer_copy(record[:ct.sizeof(LbEventC)])
    refused = c.verdict == 1
    return LbEvent(c.ts_ns, _endpoint_text(bytes(c.svc_addr), c.svc_port),
                   None if refused else _endpoint_text(bytes(c.backend_addr), c.backend_port),
                   c.proto, c.svc_id, LB_HOOKS.get(c.hook, "?"), LB_VERDICTS.get(c.verdict, "?"),
                   c.cgroup_id, c.netns_cookie)


def _parse_cap(record: bytes) -> CapEvent:
    c = CapEventC.from_buffer_copy(record[:ct.sizeof(CapEventC)])
    hook = CAP_HOOKS.get(c.hook, "?")
    return CapEvent(c.ts_ns, _endpoint_text(bytes(c.orig_addr), c.orig_port),
                    _endpoint_text(bytes(c.to_addr), c.to_port), c.proto, hook,
                    CAP_DECISIONS.get(c.decision, "?"), c.pod_cg, c.cgroup_id, c.netns_cookie,
                    _endpoint_text(bytes(c.peer_addr), c.peer_port) if hook == "tc" else None)


Event = PolicyEvent | LbEvent | CapEvent


def parse_event(record: bytes) -> Event:
    """A record of any kind, told apart by its kind byte (0.1.0's
    policy records have a zero there)."""
    if len(record) >= ct.sizeof(LbEventC) and record[EV_KIND_OFF] == EV_KIND_LB:
        return _parse_lb(record)
    if len(record) >= ct.sizeof(CapEventC) and record[EV_KIND_OFF] == EV_KIND_CAP:
        return _parse_cap(record)
    return _parse_policy(record)


class PolicyEvents:
    """Listens to the flow events: the programs emit them only while a
    reader has the switch in mbpf_pol_cfg on (this turns it on, close()
    turns it off), so nobody listening costs one array lookup per event."""

    def __init__(self, bpffs: Path):
        bpffs = Path(bpffs)
        if not (bpffs / "mbpf_events").exists():
            raise PolicyError(f"no event ring buffer under {bpffs} (kernel 5.8+ needed)")
        self.fds = {"mbpf_pol_cfg": libbpf.open_pinned(str(bpffs / "mbpf_pol_cfg"), ct.c_uint32, PolCfgC)}
        self.fds["mbpf_events"] = libbpf.obj_get(str(bpffs / "mbpf_events"))
        self._pending: list[Event] = []
        self._rb = libbpf.RingBuffer(self.fds["mbpf_events"],
                                     lambda rec: self._pending.append(parse_event(rec)))
        self._switch(True)

    def _switch(self, on: bool) -> None:
        libbpf.map_update(self.fds["mbpf_pol_cfg"], ct.c_uint32(0), PolCfgC(events=int(on)))

    def poll(self, timeout_ms: int = 100) -> list[Event]:
        self._rb.poll(timeout_ms)
        out, self._pending = self._pending, []
        return out

    def close(self) -> None:
        try:
            self._switch(False)
            self._rb.close()
        finally:
            for fd in self.fds.values():
                os.close(fd)
            self.fds.clear()

    def __enter__(self) -> "PolicyEvents":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
