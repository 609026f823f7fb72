"""A reference of the capture decision, over the maps' content.

`decide()` answers what the connect hooks do with one connect(), following
the order bpf/lib/common.h and the capture design give (outbound for the
caller's pod first, then inbound for the destination's), and what the
sendmsg hooks do with one unconnected UDP datagram (the same outbound step,
so DNS only; no inbound step), with the LPM and
hash lookups done on a CaptureState. It is written from the map ABI, not
from the planner, so tests check the planner against the datapath's rules
and against Istio's own facts (tests/unit/test_capture_istio_table.py).
"""

from __future__ import annotations

import ipaddress
from typing import NamedTuple

from . import addr16
from .capture_keys import (DIR_IN, DIR_OUT, EXCLUDE, F_IN_ALL, F_INBOUND, F_OUT_ALL,
                           F_OUTBOUND, INCLUDE, CaptureState, CapPod, PortKey)

DNS_PORT = 53


class Decision(NamedTuple):
    direction: str        # "outbound", "dns", "inbound", or "" (left alone)
    address: str | None   # where the connect goes instead (None: unchanged), in the
                          # destination's form (IPv4, IPv6, or IPv4-mapped IPv6)
    port: int | None

    @property
    def captured(self) -> bool:
        return bool(self.direction)


LEFT_ALONE = Decision("", None, None)


def lpm(state: CaptureState, pod_id: int, addr: bytes) -> int | None:
    """mbpf_cap_cidr: the verdict of the longest prefix of pod_id holding addr."""
    value = int.from_bytes(addr, "big")
    best, verdict = -1, None
    for key, v in state.cidrs.items():
        if key.pod_id != pod_id or key.addr_bits <= best:
            continue
        shift = 128 - key.addr_bits
        if value >> shift == int.from_bytes(key.addr, "big") >> shift:
            best, verdict = key.addr_bits, v
    return verdict


def _is_loopback(ip) -> bool:
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None
                              and ip.ipv4_mapped.is_loopback)


def _is_v4(ip) -> bool:
    """IPv4, or IPv4-mapped on an IPv6 socket: IPv4 on the wire."""
    return ip.version == 4 or ip.ipv4_mapped is not None


def _own(pod: CapPod, v4: bool) -> bytes:
    return pod.ip4 if v4 else pod.ip6


def _as_dst(addr: bytes, dst) -> str:
    """A 16-byte map address written as the socket names it (dst's form)."""
    ip = ipaddress.IPv6Address(addr)
    return str(ip.ipv4_mapped if dst.version == 4 else ip)


# DNS goes to the proxy's DNS port on loopback (REDIRECT's target for a
# local packet, where the Istio agent listens), in map form.
LOOPBACK = {True: addr16(ipaddress.ip_address("127.0.0.1")), False: addr16(ipaddress.ip_address("::1"))}


def outbound(state: CaptureState, cgroup_id: int | None, uid: int, dst, port: int,
             proto: str = "TCP") -> Decision:
    pod = state.pods.get(cgroup_id) if cgroup_id is not None else None
    if pod is None or not (pod.flags & F_OUTBOUND or pod.dns_port) or uid == pod.proxy_uid:
        return LEFT_ALONE
    dns = port == DNS_PORT and pod.dns_port != 0
    # DNS over TCP or UDP whatever the outbound ranges (Istio's DNS rules come
    # first), to a loopback nameserver too (they come before its loopback
    # RETURN); otherwise TCP when outbound is captured, never to loopback.
    carried = proto in ("TCP", "UDP") if dns else (proto == "TCP" and pod.flags & F_OUTBOUND)
    if not carried or (_is_loopback(dst) and not dns):
        return LEFT_ALONE
    own = _own(pod, _is_v4(dst))
    if own == bytes(16):
        return LEFT_ALONE  # no own address of this family to send it to
    if addr16(dst) == own:
        return LEFT_ALONE  # the pod's own address: over lo, as istio-iptables leaves it
    if dns:
        return Decision("dns", _as_dst(LOOPBACK[_is_v4(dst)], dst), pod.dns_port)
    if state.ports.get(PortKey(pod.pod_id, port, DIR_OUT)) == EXCLUDE:
        return LEFT_ALONE
    verdict = lpm(state, pod.pod_id, addr16(dst))
    if verdict is None:
        verdict = INCLUDE if pod.flags & F_OUT_ALL else EXCLUDE
    if verdict != INCLUDE:
        return LEFT_ALONE
    return Decision("outbound", _as_dst(own, dst), pod.out_port)


def inbound(state: CaptureState, caller_cgroup: int | None, uid: int, dst, port: int,
            proto: str = "TCP") -> Decision:
    if proto != "TCP":
        return LEFT_ALONE
    cg = state.addresses.get(addr16(dst))
    pod = state.pods.get(cg) if cg is not None else None
    if pod is None or not pod.flags & F_INBOUND:
        return LEFT_ALONE
    if caller_cgroup == cg and uid == pod.proxy_uid:
        return LEFT_ALONE  # the pod's own proxy handing a connection to its app
    if port in (pod.in_port, pod.out_port):
        return LEFT_ALONE  # already the proxy's
    rule = state.ports.get(PortKey(pod.pod_id, port, DIR_IN))
    captured = rule != EXCLUDE if pod.flags & F_IN_ALL else rule == INCLUDE
    return Decision("inbound", str(dst), pod.in_port) if captured else LEFT_ALONE


def decide(state: CaptureState, caller_cgroup: int | None, uid: int, dst: str, port: int,
           proto: str = "TCP", hook: str = "connect") -> Decision:
    """What a connect(dst, port) by uid in caller_cgroup becomes, or with
    hook "sendmsg" an unconnected UDP sendto(dst, port). Socket-LB
    translation (between the two steps in the kernel) is left out: dst is
    taken as the final destination for the inbound step."""
    if hook not in ("connect", "sendmsg"):
        raise ValueError(f"capture decision: unknown hook {hook!r} (known: connect, sendmsg)")
    if hook == "sendmsg" and proto != "UDP":
        return LEFT_ALONE  # the kernel runs the sendmsg hooks for UDP only
    ip = ipaddress.ip_address(dst)
    out = outbound(state, caller_cgroup, uid, ip, port, proto)
    if out.captured or hook == "sendmsg":
        return out
    return inbound(state, caller_cgroup, uid, ip, port, proto)
