"""The capture planner: meshed pods on this node -> ordered capture map writes.

Pure: (the meshed pods with their cgroup ids, the CaptureState the maps
hold) -> CapturePlan (CaptureSteps in order, and the state they lead to).

Make-before-break. A pod's prefix and port rules are keyed by its pod_id;
when they change, the pod gets a fresh pod_id, its new rules are written
under it first, then its settings entry switches to it in one write, and
only then are the old id's rules deleted. So a connect() always sees one
whole rule set, old or new, never a mix. Settings go in before the
addresses that lead inbound lookups to them; on removal the addresses go
first, then the settings, then the rules.

Istio's "exclude wins" (istio-iptables puts the RETURN rules of
excludeOutboundIPRanges before the REDIRECT rules of
includeOutboundIPRanges) becomes longest-prefix-match entries here: each
excluded range is an EXCLUDE prefix, each included range an INCLUDE
prefix unless it lies inside an excluded one (there the exclude must win,
but the longer include prefix would win the lookup, so it is left out); a
wildcard include is the F_OUT_ALL default.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Iterable

from ..capture.settings import PodCapture
from . import addr16
from .capture_keys import (DIR_IN, DIR_OUT, EXCLUDE, F_IN_ALL, F_INBOUND, F_OUT_ALL, F_OUTBOUND,
                           INCLUDE, CaptureState, CaptureStep, CapPod, CidrKey, PortKey)

ZERO16 = bytes(16)


@dataclass(frozen=True)
class MeshedPod:
    """A meshed pod running on this node: its settings and its cgroup's id."""

    cgroup_id: int
    settings: PodCapture


@dataclass
class CapturePlan:
    steps: list[CaptureStep] = field(default_factory=list)
    state: CaptureState = field(default_factory=CaptureState)
    problems: list[str] = field(default_factory=list)
    left_out: dict[tuple[str, str], str] = field(default_factory=dict)  # pod key -> why
    pod_ids: dict[int, int] = field(default_factory=dict)   # cgroup id -> pod_id in force

    @property
    def writes(self) -> int:
        return sum(len(s.entries) for s in self.steps)


def cidr_rules(pod_id: int, include: tuple | None, exclude: tuple) -> dict[CidrKey, int]:
    """The LPM entries of one pod's outbound ranges ("exclude wins")."""
    rules = {_cidr_key(pod_id, net): EXCLUDE for net in exclude}
    for net in include or ():
        if any(net.version == ex.version and net.subnet_of(ex) for ex in exclude):
            continue  # inside an excluded range: excluded whatever the prefix lengths
        rules.setdefault(_cidr_key(pod_id, net), INCLUDE)
    return rules


def _cidr_key(pod_id: int, net) -> CidrKey:
    bits = net.prefixlen + (96 if net.version == 4 else 0)
    return CidrKey(pod_id, addr16(net.network_address), bits)


def port_rules(pod_id: int, pod: PodCapture) -> dict[PortKey, int]:
    rules = {PortKey(pod_id, p, DIR_OUT): EXCLUDE for p in pod.exclude_out_ports}
    if pod.include_in_ports is None:
        rules.update({PortKey(pod_id, p, DIR_IN): EXCLUDE for p in pod.exclude_in_ports})
    else:  # only the named ports are captured; everything else is left alone
        rules.update({PortKey(pod_id, p, DIR_IN): INCLUDE for p in pod.include_in_ports
                      if p not in pod.exclude_in_ports})
    return rules


def flags(pod: PodCapture) -> int:
    out = 0
    if pod.outbound:
        out |= F_OUTBOUND | (F_OUT_ALL if pod.include_out is None else 0)
    if pod.inbound:
        out |= F_INBOUND | (F_IN_ALL if pod.include_in_ports is None else 0)
    return out


def _own_addresses(pod: PodCapture) -> tuple[bytes, bytes]:
    ip4 = next((ip for ip in pod.ips if ip.version == 4), None)
    ip6 = next((ip for ip in pod.ips if ip.version == 6), None)
    return (addr16(ip4) if ip4 else ZERO16, addr16(ip6) if ip6 else ZERO16)


def _rules_of(state: CaptureState, pod_id: int) -> tuple[dict, dict]:
    return ({k: v for k, v in state.cidrs.items() if k.pod_id == pod_id},
            {k: v for k, v in state.ports.items() if k.pod_id == pod_id})


def plan_capture(current: CaptureState, pods: Iterable[MeshedPod]) -> CapturePlan:
    """Ordered writes taking the maps from `current` to exactly the pods given."""
    plan = CapturePlan()
    wanted = _unique(pods, plan.left_out)
    plan.problems = [f"pod {'/'.join(key)}: {why}" for key, why in plan.left_out.items()]
    # Ids in force, and any whose rules a failed write left behind: a fresh
    # id must start with no rules at all.
    used_ids = ({p.pod_id for p in current.pods.values()} | {k.pod_id for k in current.cidrs}
                | {k.pod_id for k in current.ports})
    target = CaptureState()
    for cg, pod in sorted(wanted.items()):
        old = current.pods.get(cg)
        ip4, ip6 = _own_addresses(pod)
        probe_id = old.pod_id if old else 0
        cidrs, ports = cidr_rules(probe_id, pod.include_out, pod.exclude_out), port_rules(probe_id, pod)
        if old is None or _rules_of(current, old.pod_id) != (cidrs, ports):
            # New rules: a fresh id, so the old ones stay whole until the switch.
            pod_id = _free_id(used_ids)
            cidrs = cidr_rules(pod_id, pod.include_out, pod.exclude_out)
            ports = port_rules(pod_id, pod)
        else:
            pod_id = old.pod_id
        target.pods[cg] = CapPod(ip4, ip6, pod.proxy_uid, pod_id, pod.out_port, pod.in_port,
                                 pod.dns_port, flags(pod))
        target.cidrs.update(cidrs)
        target.ports.update(ports)
        for ip in pod.ips:
            target.addresses[addr16(ip)] = cg
        plan.pod_ids[cg] = pod_id
    plan.steps = _steps(current, target)
    plan.state = target
    return plan


def _unique(pods: Iterable[MeshedPod], left_out: dict) -> dict[int, PodCapture]:
    """One pod per cgroup and per address; a second claimant is left out."""
    by_cgroup: dict[int, PodCapture] = {}
    owner: dict[bytes, str] = {}
    for mp in sorted(pods, key=lambda m: m.settings.key):
        pod = mp.settings
        name = "/".join(pod.key)
        if mp.cgroup_id in by_cgroup:
            left_out[pod.key] = (f"cgroup {mp.cgroup_id} already belongs to pod "
                                 f"{'/'.join(by_cgroup[mp.cgroup_id].key)}; not captured")
            continue
        clash = [owner[addr16(ip)] for ip in pod.ips if addr16(ip) in owner]
        if clash:
            left_out[pod.key] = f"its address is also pod {clash[0]}'s; not captured"
            continue
        by_cgroup[mp.cgroup_id] = pod
        owner.update({addr16(ip): name for ip in pod.ips})
    return by_cgroup


def _free_id(used: set[int]) -> int:
    pod_id = 1
    while pod_id in used:
        pod_id += 1
    used.add(pod_id)
    return pod_id


def _changed(old: dict, new: dict) -> dict:
    return {k: v for k, v in new.items() if old.get(k) != v}


def _gone(old: dict, new: dict) -> dict:
    return {k: None for k in old if k not in new}


def _steps(current: CaptureState, target: CaptureState) -> list[CaptureStep]:
    order = [
        ("cidrs", "update", _changed(current.cidrs, target.cidrs)),       # new ids' rules first
        ("ports", "update", _changed(current.ports, target.ports)),
        ("pods", "update", _changed(current.pods, target.pods)),           # then the switch
        ("addresses", "update", _changed(current.addresses, target.addresses)),
        ("addresses", "delete", _gone(current.addresses, target.addresses)),  # removals after
        ("pods", "delete", _gone(current.pods, target.pods)),
        ("cidrs", "delete", _gone(current.cidrs, target.cidrs)),
        ("ports", "delete", _gone(current.ports, target.ports)),
    ]
    return [CaptureStep(m, op, entries) for m, op, entries in order if entries]


def describe_rules(state: CaptureState, pod_id: int) -> dict:
    """A pod's rules as the maps hold them, for views."""
    cidrs, ports = _rules_of(state, pod_id)

    def net(k: CidrKey) -> str:
        ip = ipaddress.IPv6Address(k.addr)
        if ip.ipv4_mapped is not None and k.addr_bits >= 96:
            return f"{ip.ipv4_mapped}/{k.addr_bits - 96}"
        return f"{ip}/{k.addr_bits}"

    verdict = {INCLUDE: "include", EXCLUDE: "exclude"}
    return {"cidrs": {net(k): verdict[v] for k, v in sorted(cidrs.items())},
            "ports": {f"{'in' if k.dir == DIR_IN else 'out'}/{k.port}": verdict[v]
                      for k, v in sorted(ports.items())}}
