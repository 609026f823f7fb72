"""The capture planner (meshbpf/reconcile/capture.py): what it writes, in
which order, and that every connect() decided between two writes of a plan
is the old decision or the new one (make-before-break), checked with the
decision reference (meshbpf/reconcile/capture_decide.py) over the maps' content."""

from __future__ import annotations

import ipaddress
import random

import pytest

from meshbpf.reconcile.capture_decide import decide, lpm
from meshbpf.capture.settings import pod_capture
from meshbpf.model import CaptureSettings
from meshbpf.policy.model import PodInfo
from meshbpf.reconcile import addr16
from meshbpf.reconcile.capture import MeshedPod, cidr_rules, describe_rules, plan_capture
from meshbpf.reconcile.capture_keys import (DIR_IN, DIR_OUT, EXCLUDE, F_IN_ALL, F_INBOUND,
                                            F_OUT_ALL, F_OUTBOUND, INCLUDE, CaptureState, CidrKey,
                                            PortKey)

ip = ipaddress.ip_address
net = ipaddress.ip_network
ISTIO = CaptureSettings(enabled=True, mesh="istio")
STATUS = {"sidecar.istio.io/status": "{}"}
CG = {"a": 1001, "b": 1002, "c": 1003}
IPS = {"a": ("10.0.1.1", "fd00::1:1"), "b": ("10.0.1.2", "fd00::1:2"), "c": ("10.0.1.3",)}


def meshed(name: str, settings: CaptureSettings = ISTIO, **annotations) -> MeshedPod:
    notes = {**STATUS, **{f"traffic.sidecar.istio.io/{k}": v for k, v in annotations.items()}}
    pod = PodInfo("x", name, f"uid-{name}", {}, "node-a", False, {},
                  tuple(ip(a) for a in IPS[name]), notes)
    return MeshedPod(CG[name], pod_capture(pod, settings))


def apply(state: CaptureState, steps) -> CaptureState:
    out = state.copy()
    for step in steps:
        target = getattr(out, step.map)
        for key, value in step.entries.items():
            if step.op == "update":
                target[key] = value
            else:
                del target[key]   # deleting a missing key would be a plan bug
    return out


def entry_states(state: CaptureState, steps):
    """The maps after every single write, in plan order."""
    out = state.copy()
    yield out.copy()
    for step in steps:
        target = getattr(out, step.map)
        for key, value in step.entries.items():
            if step.op == "update":
                target[key] = value
            else:
                del target[key]
            yield out.copy()


def test_one_pod_with_defaults():
    p = plan_capture(CaptureState(), [meshed("a")])
    (cap,) = p.state.pods.values()
    assert cap.pod_id == 1 and (cap.proxy_uid, cap.out_port, cap.in_port) == (1337, 15001, 15006)
    assert cap.flags == F_OUTBOUND | F_OUT_ALL | F_INBOUND | F_IN_ALL
    assert cap.ip4 == addr16(ip("10.0.1.1")) and cap.ip6 == addr16(ip("fd00::1:1"))
    assert p.state.addresses == {addr16(ip("10.0.1.1")): 1001, addr16(ip("fd00::1:1")): 1001}
    assert p.state.cidrs == {}
    assert p.state.ports == {PortKey(1, port, DIR_IN): EXCLUDE for port in (15008, 15020, 15021, 15090)}
    # Rules and settings before the addresses that lead inbound lookups to them.
    assert [(s.map, s.op) for s in p.steps] == [("ports", "update"), ("pods", "update"),
                                                ("addresses", "update")]


def test_an_unchanged_plan_writes_nothing():
    first = plan_capture(CaptureState(), [meshed("a"), meshed("b", excludeOutboundPorts="5432")])
    again = plan_capture(first.state, [meshed("a"), meshed("b", excludeOutboundPorts="5432")])
    assert again.steps == [] and again.state == first.state


def test_exclude_wins_over_include_as_longest_prefixes():
    rules = cidr_rules(7, (net("10.0.0.0/8"), net("10.1.2.0/24"), net("192.168.0.0/16")),
                       (net("10.1.0.0/16"), net("192.168.0.0/16")))
    v4 = lambda n: CidrKey(7, addr16(net(n).network_address), 96 + net(n).prefixlen)
    # 10.1.2.0/24 lies inside an excluded range: a longer INCLUDE would win the lookup.
    assert rules == {v4("10.0.0.0/8"): INCLUDE, v4("10.1.0.0/16"): EXCLUDE,
                     v4("192.168.0.0/16"): EXCLUDE}
    state = CaptureState(cidrs=rules)
    assert lpm(state, 7, addr16(ip("10.9.9.9"))) == INCLUDE
    assert lpm(state, 7, addr16(ip("10.1.2.3"))) == EXCLUDE
    assert lpm(state, 7, addr16(ip("192.168.1.1"))) == EXCLUDE
    assert lpm(state, 7, addr16(ip("8.8.8.8"))) is None
    assert lpm(state, 8, addr16(ip("10.9.9.9"))) is None   # another pod's rules


@pytest.mark.parametrize("include, exclude", [
    ("*", ""), ("10.0.0.0/8", ""), ("10.0.0.0/8", "10.1.0.0/16"), ("10.1.0.0/16", "10.0.0.0/8"),
    ("10.0.0.0/8,10.1.2.0/24", "10.1.0.0/16"), ("*", "10.0.0.0/8,fd00::/16"),
    ("fd00::/16", "fd00:1::/32"), ("0.0.0.0/0", "10.0.0.0/8"), ("", ""), ("10.0.0.0/8", "10.0.0.0/8"),
])
def test_outbound_ranges_decide_as_iptables_return_then_redirect(include, exclude):
    """Brute force: for addresses on both sides of every boundary, the maps
    decide exactly as 'excluded -> RETURN; included -> REDIRECT; else RETURN'."""
    m = meshed("a", includeOutboundIPRanges=include, excludeOutboundIPRanges=exclude)
    state = plan_capture(CaptureState(), [m]).state
    incl = None if include == "*" else [net(t) for t in include.split(",") if t]
    excl = [net(t) for t in exclude.split(",") if t]
    probes = ["10.0.0.1", "10.1.0.1", "10.1.2.3", "10.1.255.255", "10.2.0.0", "11.0.0.1",
              "192.168.0.1", "fd00::5", "fd00:1::5", "fd01::1", "2001:db8::1", "9.255.255.255"]
    for text in probes:
        dst = ip(text)
        expected = (not any(dst in n for n in excl)
                    and (incl is None or any(dst in n for n in incl)))
        got = decide(state, CG["a"], 1000, text, 80)
        assert got.captured == expected, (text, got)
        if expected:
            assert got.port == 15001 and got.address == IPS["a"][0 if dst.version == 4 else 1]


def test_a_rule_change_switches_to_a_fresh_pod_id_and_drops_the_old_rules_after():
    first = plan_capture(CaptureState(), [meshed("a", excludeOutboundPorts="5432")])
    p = plan_capture(first.state, [meshed("a", excludeOutboundPorts="3306")])
    assert p.state.pods[CG["a"]].pod_id == 2
    assert p.state.ports[PortKey(2, 3306, DIR_OUT)] == EXCLUDE
    assert not any(k.pod_id == 1 for k in p.state.ports)
    assert [(s.map, s.op) for s in p.steps] == [("ports", "update"), ("pods", "update"),
                                                ("ports", "delete")]


def test_a_settings_only_change_keeps_the_pod_id():
    first = plan_capture(CaptureState(), [meshed("a")])
    p = plan_capture(first.state, [meshed("a", settings=CaptureSettings(True, "istio", dns=True))])
    assert p.state.pods[CG["a"]].pod_id == 1 and p.state.pods[CG["a"]].dns_port == 15053
    assert [(s.map, s.op) for s in p.steps] == [("pods", "update")]


def test_removal_goes_addresses_then_settings_then_rules():
    first = plan_capture(CaptureState(), [meshed("a"), meshed("b")])
    p = plan_capture(first.state, [meshed("b")])
    assert [(s.map, s.op) for s in p.steps] == [("addresses", "delete"), ("pods", "delete"),
                                                ("ports", "delete")]
    assert apply(first.state, p.steps) == p.state
    assert set(p.state.pods) == {CG["b"]}


def test_a_fresh_id_never_reuses_one_in_force_or_left_behind():
    held = plan_capture(CaptureState(), [meshed("a")]).state
    held.ports[PortKey(2, 9999, DIR_OUT)] = EXCLUDE   # left by a write that failed half-way
    p = plan_capture(held, [meshed("a"), meshed("b")])
    assert p.state.pods[CG["b"]].pod_id == 3
    assert PortKey(2, 9999, DIR_OUT) not in p.state.ports


def test_a_second_pod_claiming_a_cgroup_or_an_address_is_a_problem():
    a, b = meshed("a"), meshed("b")
    twin = MeshedPod(CG["a"], b.settings)
    p = plan_capture(CaptureState(), [a, twin])
    assert set(p.state.pods) == {CG["a"]} and p.state.pods[CG["a"]].ip4 == addr16(ip("10.0.1.1"))
    assert p.problems == ["pod x/b: cgroup 1001 already belongs to pod x/a; not captured"]


def test_describe_rules_shows_the_maps_as_a_user_reads_them():
    state = plan_capture(CaptureState(), [meshed("a", includeOutboundIPRanges="10.0.0.0/8",
                                                 excludeOutboundIPRanges="fd00::/16",
                                                 excludeOutboundPorts="22")]).state
    rules = describe_rules(state, 1)
    assert rules["cidrs"] == {"10.0.0.0/8": "include", "fd00::/16": "exclude"}
    assert rules["ports"]["out/22"] == "exclude" and rules["ports"]["in/15090"] == "exclude"


# --- make-before-break over random edits ------------------------------------------------

VARIANTS = [
    {}, {"includeOutboundIPRanges": "10.0.0.0/8"}, {"excludeOutboundIPRanges": "10.0.1.0/24"},
    {"includeOutboundIPRanges": "", "includeInboundPorts": "8080"},
    {"excludeInboundPorts": "8080", "excludeOutboundPorts": "80"},
    {"includeInboundPorts": "8080,9090", "excludeOutboundIPRanges": "fd00::/16"},
]
PROBES = [(caller, uid, dst, port) for caller in (None, *CG.values()) for uid in (0, 1337)
          for dst in ("10.0.1.1", "10.0.1.2", "10.0.1.3", "fd00::1:2", "10.2.0.1", "fd00::9")
          for port in (80, 8080, 9090, 15001, 15021)]


def decisions(state: CaptureState) -> list:
    return [decide(state, *probe) for probe in PROBES]


def test_every_state_between_two_writes_decides_as_before_or_as_after():
    """One pod meshed, unmeshed or edited per plan (a connect depends on its
    caller's pod and its destination's; two pods changing in one plan may
    show either's change first, which is as good as two plans)."""
    rng = random.Random(11)
    state = CaptureState()
    variant: dict[str, dict | None] = {n: None for n in CG}
    for _ in range(60):
        name = rng.choice(list(CG))
        variant[name] = rng.choice([None, *VARIANTS])
        pods = [meshed(n, **v) for n, v in variant.items() if v is not None]
        p = plan_capture(state, pods)
        before, after = decisions(state), decisions(p.state)
        for mid in entry_states(state, p.steps):
            for probe, b, m, a in zip(PROBES, before, decisions(mid), after):
                assert m in (b, a), (probe, b, m, a)
        state = apply(state, p.steps)
        assert state == p.state
        assert plan_capture(state, pods).steps == []
