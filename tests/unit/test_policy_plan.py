"""The policy planner (meshbpf/reconcile/policy.py) against the truth tables.

`Kernel` answers a verdict from a planned PolicyState exactly as the tc
programs will (bpf/lib/common.h): the endpoints of both ends by address, the
generation in force, longest-prefix lookups in the peer map and then the
port map. It is written from the map ABI, not from the planner, so the
planner is checked against the datapath's rules, the compiler
(compile.verdict) and the upstream e2e expectations at once.
"""

from __future__ import annotations

import ipaddress

import pytest

from meshbpf.policy.compile import compile_policies, verdict
from meshbpf.policy.model import IPBlock, LabelSelector, NetworkPolicy, Peer, PodInfo, PolicyPort, Rule
from meshbpf.reconcile import addr16
from meshbpf.reconcile.policy import NODE_RULE, SELF_RULE, plan_policy, rule_id
from meshbpf.reconcile.policy_keys import (DIR_IN, DIR_OUT, EP_ISOLATE_IN, EP_ISOLATE_OUT,
                                           PEER_ANY_PORT, PeerKey, PolicyState, PortKey)
from policy_world import ALL, compiled, ip_of, labels, netpol, world
from reconcile_checks import apply_entries, step_states
from test_policy_e2e import CASES

ip = ipaddress.ip_address
net = ipaddress.ip_network
PROTO = {"TCP": 6, "UDP": 17, "SCTP": 132}
NODE_IPS = ("192.168.50.1", "fd00::50:1")
IFINDEX = {tuple(p.split("/")): 100 + i for i, p in enumerate(ALL)}


def _mask(addr: bytes, bits: int, width: int) -> int:
    value = int.from_bytes(addr, "big") if isinstance(addr, bytes) else addr
    return value >> (width - bits) << (width - bits) if bits else 0


class Kernel:
    """The datapath's decision for a new flow, over the maps' content."""

    def __init__(self, state: PolicyState):
        self.state = state
        self.by_id = {ep.ep_id: ep for ep in state.endpoints.values()}
        self.peer_bits = sorted({k.addr_bits for k in state.peers}, reverse=True)
        self.port_bits = sorted({k.port_bits for k in state.ports}, reverse=True)

    def endpoint(self, addr: bytes):
        return self.by_id.get(self.state.addresses.get(addr))

    def peer(self, ep, direction: int, addr: bytes):
        for bits in self.peer_bits:
            key = PeerKey(ep.ep_id, ep.gen, direction, _mask(addr, bits, 128).to_bytes(16, "big"), bits)
            if key in self.state.peers:
                return self.state.peers[key]
        return None

    def decide(self, ep, direction: int, peer_addr: bytes, proto: int, port: int):
        """None: allowed without isolation; else the rule id that allows, or 0."""
        flag = EP_ISOLATE_IN if direction == DIR_IN else EP_ISOLATE_OUT
        if not ep.flags & flag:
            return None
        val = self.peer(ep, direction, peer_addr)
        if val is None:
            return 0
        if val.flags & PEER_ANY_PORT:
            return val.rule
        for bits in self.port_bits:
            key = PortKey(ep.ep_id, ep.gen, direction, proto, val.peer_set, _mask(port, bits, 16), bits)
            if key in self.state.ports:
                return self.state.ports[key].rule
        return 0

    def verdict(self, src, dst, protocol: str, port: int) -> bool:
        s, d = addr16(ip(src)), addr16(ip(dst))
        proto = PROTO[protocol]
        out = self.endpoint(s)
        if out is not None and self.decide(out, DIR_OUT, d, proto, port) == 0:
            return False
        into = self.endpoint(d)
        return into is None or self.decide(into, DIR_IN, s, proto, port) != 0


def planned(c, current: PolicyState | None = None, node_ips=NODE_IPS, endpoints=None, capacity=None):
    current = current or PolicyState()
    plan = plan_policy(current, c, IFINDEX if endpoints is None else endpoints, node_ips, capacity)
    return plan, plan.apply_to(current)


def case_objects(case):
    _, policies, checks, pod_labels, ns_labels = case
    return world(policies, pod_labels, ns_labels), checks


def table_mismatches(c, kernel: Kernel, checks) -> list[str]:
    out = []
    for protocol, port, expected in checks:
        for src in ALL:
            for dst in ALL:
                want = True if src == dst else expected.m[src, dst]
                got = kernel.verdict(ip_of(src), ip_of(dst), protocol, port)
                if got != want or got != verdict(c, ip_of(src), ip_of(dst), protocol, port):
                    out.append(f"{src} -> {dst} {protocol}/{port}: expected {want}, maps say {got}")
    return out


def compiler_mismatches(c, kernel: Kernel, addresses, protocols=("TCP", "UDP"), ports=(79, 80, 81, 82)):
    return [f"{s} -> {d} {proto}/{port}: compiler {verdict(c, s, d, proto, port)}"
            for s in addresses for d in addresses if s != d for proto in protocols for port in ports
            if kernel.verdict(s, d, proto, port) != verdict(c, s, d, proto, port)]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_maps_enforce_the_e2e_truth_table(case):
    objects, checks = case_objects(case)
    c = compiled(objects)
    _, state = planned(c)
    kernel = Kernel(state)
    problems = table_mismatches(c, kernel, checks)
    problems += compiler_mismatches(c, kernel, [ip_of(p) for p in ALL])
    assert not problems, "\n".join(problems[:30])


PROBE_PORTS = (("TCP", 80), ("TCP", 81), ("UDP", 80), ("TCP", 82))
PROBES = [addr16(ip_of(p)) for p in ALL] + [addr16(ip(a)) for a in (
    *NODE_IPS, "10.0.0.1", "10.0.1.0", "10.0.2.255", "11.0.0.1", "fd00::1:1", "2001:db8::1")]


def decisions(kernel: Kernel, ifindex: int, probes) -> dict:
    """Allowed or not, for every new flow through one endpoint (both
    directions): what a half-written plan must never get wrong."""
    ep = kernel.state.endpoints.get(ifindex)
    out = {}
    for direction in (DIR_IN, DIR_OUT):
        for peer in probes:
            for protocol, port in PROBE_PORTS:
                d = None if ep is None else kernel.decide(ep, direction, peer, PROTO[protocol], port)
                out[direction, peer, protocol, port] = d != 0
    return out


def assert_safe_entry_by_entry(before: PolicyState, plan, probes=PROBES) -> PolicyState:
    """Applies the plan one map write at a time (a kernel reader can run
    between any two) and checks issue 10's rule at every state: each new
    flow's verdict at each endpoint is its old one where old == new, and
    one of the two where they differ. No write deletes a missing key."""
    after = plan.apply_to(before)
    ifindexes = sorted({*before.endpoints, *after.endpoints})
    old = {i: decisions(Kernel(before), i, probes) for i in ifindexes}
    new = {i: decisions(Kernel(after), i, probes) for i in ifindexes}
    kernel = Kernel(before.copy())
    kernel.peer_bits = sorted({k.addr_bits for k in [*before.peers, *after.peers]}, reverse=True)
    kernel.port_bits = sorted({k.port_bits for k in [*before.ports, *after.ports]}, reverse=True)
    state = kernel.state
    by_ep = {ep.ep_id: i for s in (before, after) for i, ep in s.endpoints.items()}
    for n, step in enumerate(plan.steps()):
        target = getattr(state, step.map)
        for key, value in step.entries.items():
            if step.op == "update":
                target[key] = value
            else:
                del target[key]
            kernel.by_id = {ep.ep_id: ep for ep in state.endpoints.values()}
            touched = [by_ep[key.ep_id]] if step.map in ("peers", "ports") and key.ep_id in by_ep \
                else ifindexes
            for i in touched:
                now = decisions(kernel, i, probes)
                wrong = [f for f, v in now.items() if v != old[i][f] and old[i][f] == new[i][f]]
                assert not wrong, f"endpoint {i}: step {n} ({step.map} {step.op} {key}) changes {wrong[:3]}"
    assert state == after
    return state


def in_force(state: PolicyState) -> dict:
    """Per endpoint (ifindex): its flags and the entries of its generation in force."""
    out = {}
    for ifindex, ep in state.endpoints.items():
        peers = {k._replace(gen=0): v for k, v in state.peers.items() if (k.ep_id, k.gen) == (ep.ep_id, ep.gen)}
        ports = {k._replace(gen=0): v for k, v in state.ports.items() if (k.ep_id, k.gen) == (ep.ep_id, ep.gen)}
        out[ifindex] = (ep.ep_id, ep.flags, peers, ports)
    return out


def assert_atomic_steps(before: PolicyState, plan) -> PolicyState:
    """Applies the plan step by step: after every step each endpoint's rules
    in force are all of its old ones or all of its new ones (so every peer
    set they name has all its ports), and no step deletes a missing key."""
    old, new = in_force(before), in_force(plan.apply_to(before))
    state = before
    for step, state in zip(plan.steps(), step_states(before, plan)):
        for ifindex, now in in_force(state).items():
            assert now in (old.get(ifindex), new.get(ifindex)), f"endpoint {ifindex} half-written at {step}"
    assert state == plan.apply_to(before)
    return state


def test_every_case_planned_on_top_of_the_previous_one():
    """The e2e cases in a row, as edits to one running node: each plan is
    atomic per endpoint, leaves nothing in the generations not in force,
    and enforces its truth table."""
    state = PolicyState()
    for case in CASES:
        objects, checks = case_objects(case)
        c = compiled(objects)
        plan = plan_policy(state, c, IFINDEX, NODE_IPS)
        state = assert_safe_entry_by_entry(state, plan)
        live = {(ep.ep_id, ep.gen) for ep in state.endpoints.values()}
        assert {(k.ep_id, k.gen) for k in [*state.peers, *state.ports]} <= live, case[0]
        assert not table_mismatches(c, Kernel(state), checks), case[0]
        assert not plan_policy(state, c, IFINDEX, NODE_IPS), f"{case[0]}: a second plan writes"


def test_unchanged_world_writes_nothing():
    objects, _ = case_objects(CASES[1])
    c = compiled(objects)
    plan, state = planned(c)
    assert plan.writes > 0
    again = plan_policy(state, c, IFINDEX, NODE_IPS)
    assert again.writes == 0 and list(again.steps()) == []


def test_relabelled_pod_rewrites_only_the_endpoints_it_affects():
    policy = netpol("allow-from-b-updated", "x", labels(pod="a"),
                    ingress=[{"from": [{"podSelector": labels(pod="b", pod2="updated")}]}])
    _, state = planned(compiled(world([policy])))
    after = compiled(world([policy], pod_labels={"x/b": {"pod2": "updated"}}))
    plan = plan_policy(state, after, IFINDEX, NODE_IPS)
    x_a = state.endpoints[IFINDEX["x", "a"]]
    assert not plan.endpoint_updates   # its isolation stays: written in place
    touched = {k.ep_id for step in plan.steps() if step.map in ("peers", "ports") for k in step.entries}
    assert touched == {x_a.ep_id}
    assert not plan.address_updates and not plan.address_deletes
    assert Kernel(plan.apply_to(state)).verdict(ip_of("x/b"), ip_of("x/a"), "TCP", 80)


def test_new_generation_is_complete_before_the_flip_and_old_one_deleted_after():
    """A change of isolation (here: egress too) flips generations."""
    policy = netpol("p", "x", labels(pod="a"), ingress=[{"ports": [{"port": 80}]}])
    _, state = planned(compiled(world([policy])))
    changed = netpol("p", "x", labels(pod="a"), ingress=[{"ports": [{"port": 81}]}],
                     egress=[{"ports": [{"port": 53}]}])
    plan = plan_policy(state, compiled(world([changed])), IFINDEX, NODE_IPS)
    kinds = [(s.map, s.op) for s in plan.steps()]
    flip = kinds.index(("endpoints", "update"))
    assert kinds[:flip] == [("ports", "update"), ("peers", "update")]
    assert kinds[flip + 1:] == [("peers", "delete"), ("ports", "delete")]
    steps = list(plan.steps())
    assert all(k.gen == 1 for s in steps[:flip] for k in s.entries)
    assert all(k.gen == 0 for s in steps[flip + 1:] for k in s.entries)
    assert_atomic_steps(state, plan)
    assert_safe_entry_by_entry(state, plan)


def test_restart_reuses_ids_and_generations():
    c = compiled(world([netpol("deny", "x", ingress=[])]))
    _, state = planned(c)
    # Flip every endpoint once, as a running agent would have.
    c2 = compiled(world([netpol("deny", "x", ingress=[], egress=[])]))
    _, state = planned(c2, state)
    ids = {i: ep.ep_id for i, ep in state.endpoints.items()}
    assert {ep.gen for i, ep in state.endpoints.items() if i in (IFINDEX["x", "a"], IFINDEX["x", "b"])} == {1}
    # A new agent reads the maps back: an unchanged world writes nothing,
    # a changed one keeps every ep_id and flips from the generation in force.
    assert not plan_policy(state, c2, IFINDEX, NODE_IPS)
    plan, state = planned(c, state)
    assert {i: ep.ep_id for i, ep in state.endpoints.items()} == ids
    assert all(ep.gen == 0 for i, ep in plan.endpoint_updates.items())


def test_new_endpoint_gets_a_free_id_and_a_left_one_is_removed_whole():
    c = compiled(world([netpol("deny", "x", ingress=[])]))
    without_xa = {k: v for k, v in IFINDEX.items() if k != ("x", "a")}
    _, state = planned(c, endpoints=without_xa)
    plan, state = planned(c, state)
    new = plan.endpoint_updates[IFINDEX["x", "a"]]
    assert new.ep_id not in {ep.ep_id for i, ep in state.endpoints.items() if i != IFINDEX["x", "a"]}
    assert list(plan.address_updates) == [addr16(ip_of("x/a"))]
    plan, state = planned(c, state, endpoints=without_xa)
    assert plan.endpoint_deletes == [IFINDEX["x", "a"]]
    assert new.ep_id not in {k.ep_id for k in [*state.peers, *state.ports]}
    assert addr16(ip_of("x/a")) not in state.addresses
    assert [s.map for s in plan.steps()][-1] == "addresses"


def from_b(port: int) -> dict:
    return netpol("p", "x", labels(pod="a"), ingress=[{"from": [{"podSelector": labels(pod="b")}],
                                                       "ports": [{"port": port}]}])


def test_crash_leftovers_in_the_unused_generation_are_cleared_before_use():
    c = compiled(world([from_b(80)]))
    _, state = planned(c)
    x_a = state.endpoints[IFINDEX["x", "a"]]
    junk = PeerKey(x_a.ep_id, 1, DIR_IN, addr16(ip("10.9.9.9")), 128)
    orphan = PeerKey(999, 0, DIR_IN, addr16(ip("10.9.9.9")), 128)
    state.peers[junk] = state.peers[orphan] = next(iter(state.peers.values()))._replace(flags=PEER_ANY_PORT)
    plan, after = planned(compiled(world([from_b(81)])), state)
    assert junk in plan.stale_peer_deletes and orphan in plan.gone_peer_deletes
    assert not Kernel(after).verdict("10.9.9.9", ip_of("x/a"), "TCP", 81)
    assert Kernel(after).verdict(ip_of("x/b"), ip_of("x/a"), "TCP", 81)


def test_end_port_ranges_and_overlaps_match_the_compiler_on_every_port():
    policy = netpol("r", "x", labels(pod="a"), ingress=[
        {"ports": [{"port": 1000, "endPort": 2000}]},
        {"ports": [{"port": 1900, "endPort": 2100}, {"port": 7, "protocol": "UDP"},
                   {"port": 3000, "endPort": 3010}]},
        {"ports": [{"port": 65000, "endPort": 65535}]}])
    c = compiled(world([policy]))
    plan, state = planned(c)
    kernel = Kernel(state)
    src, dst = ip_of("y/a"), ip_of("x/a")
    wrong = [(proto, port) for proto in ("TCP", "UDP") for port in range(1, 65536, 1 if proto == "TCP" else 97)
             if kernel.verdict(src, dst, proto, port) != verdict(c, src, dst, proto, port)]
    assert not wrong
    assert kernel.verdict(src, dst, "UDP", 7) and not kernel.verdict(src, dst, "UDP", 1000)
    ep = state.endpoints[IFINDEX["x", "a"]]
    who = {port: plan.rules[kernel.decide(ep, DIR_IN, addr16(src), 6, port)] for port in (1000, 1950, 2050, 65535)}
    assert who == {1000: "x/r/ingress/0", 1950: "x/r/ingress/0", 2050: "x/r/ingress/1",
                   65535: "x/r/ingress/2"}
    # One range is a handful of prefixes, not a thousand ports.
    assert len(state.ports) < 40


def addresses_around(*nets: str) -> list:
    """Probe addresses: each network's edges and the ones just outside."""
    out = []
    for text in nets:
        n = net(text)
        first, last = int(n.network_address), int(n.broadcast_address)
        top = 2 ** n.max_prefixlen - 1
        out += [ipaddress.ip_address(v) if n.version == 6 else ipaddress.IPv4Address(v)
                for v in {first, last, max(first - 1, 0), min(last + 1, top)}]
    return out


def egress_world(*peers: Peer, node_ips=NODE_IPS):
    a = PodInfo("x", "a", "u", {"pod": "a"}, "node-1", False, {}, (ip("10.0.1.1"), ip("fd00::1:1")))
    policy = NetworkPolicy("x", "e", LabelSelector.of({"pod": "a"}), frozenset({"Egress"}), (),
                           (Rule(peers, (PolicyPort("TCP", 80),)),))
    c = compile_policies([a], [], [policy], "node-1")
    plan, state = planned(c, endpoints={("x", "a"): 7}, node_ips=node_ips)
    return c, Kernel(state)


def test_ip_block_except_is_carved_out_exactly():
    blocks = [IPBlock(net("10.0.0.0/8"), (net("10.0.2.0/24"), net("10.0.3.128/25"))),
              IPBlock(net("fd00::/16"), (net("fd00:1::/32"),))]
    c, kernel = egress_world(*(Peer(ip_block=b) for b in blocks))
    probes = addresses_around("10.0.0.0/8", "10.0.2.0/24", "10.0.3.128/25", "fd00::/16", "fd00:1::/32")
    wrong = [d for d in probes for port in (80, 81)
             if kernel.verdict("10.0.1.1" if d.version == 4 else "fd00::1:1", d, "TCP", port)
             != verdict(c, "10.0.1.1" if d.version == 4 else "fd00::1:1", d, "TCP", port)]
    assert not wrong
    assert kernel.verdict("10.0.1.1", "10.0.3.127", "TCP", 80)
    assert not kernel.verdict("10.0.1.1", "10.0.3.128", "TCP", 80)
    assert not kernel.verdict("10.0.1.1", "10.0.2.9", "TCP", 80)


def test_ipv6_any_does_not_let_ipv4_through():
    """IPv4 lives inside ::/0 in the maps (as ::ffff:a.b.c.d)."""
    c, kernel = egress_world(Peer(ip_block=IPBlock(net("::/0"))),
                             Peer(ip_block=IPBlock(net("10.0.1.0/24"))))
    assert kernel.verdict("fd00::1:1", "2001:db8::1", "TCP", 80)
    assert kernel.verdict("10.0.1.1", "10.0.1.9", "TCP", 80)
    assert not kernel.verdict("10.0.1.1", "10.0.2.9", "TCP", 80)
    assert not verdict(c, "10.0.1.1", "10.0.2.9", "TCP", 80)
    _, kernel = egress_world(Peer(ip_block=IPBlock(net("::/1"))))
    assert not kernel.verdict("10.0.1.1", "8.8.8.8", "TCP", 80)
    assert kernel.verdict("fd00::1:1", "::8.8.8.8", "TCP", 80)


def test_ipv4_mapped_ipv6_block_matches_no_ipv4_peer():
    """::ffff:10.0.0.0/104 holds only IPv4-mapped IPv6 addresses, which no
    pod has; in the maps it would be the IPv4 10.0.0.0/8."""
    c, kernel = egress_world(Peer(ip_block=IPBlock(net("::ffff:10.0.0.0/104"))))
    assert not verdict(c, "10.0.1.1", "10.0.2.9", "TCP", 80)
    assert not kernel.verdict("10.0.1.1", "10.0.2.9", "TCP", 80)


def test_a_peer_inside_a_wider_allowed_network_gets_both_rules_ports():
    """x/b (10.0.1.2) is allowed on 81 by name and on 80 by a CIDR holding it:
    its /32 entry must carry the CIDR's rule too."""
    policy = netpol("p", "x", labels(pod="a"), ingress=[
        {"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}}], "ports": [{"port": 80}]},
        {"from": [{"podSelector": labels(pod="b")}], "ports": [{"port": 81}]}])
    c = compiled(world([policy]))
    kernel = Kernel(planned(c)[1])
    for port in (80, 81):
        assert kernel.verdict(ip_of("x/b"), ip_of("x/a"), "TCP", port)
    assert kernel.verdict(ip_of("x/c"), ip_of("x/a"), "TCP", 80)
    assert not kernel.verdict(ip_of("x/c"), ip_of("x/a"), "TCP", 81)
    assert not compiler_mismatches(c, kernel, [ip_of(p) for p in ALL] + [ip("11.0.0.1")])


def test_ipv4_any_does_not_let_ipv6_through():
    _, kernel = egress_world(Peer(ip_block=IPBlock(net("0.0.0.0/0"))))
    assert kernel.verdict("10.0.1.1", "8.8.8.8", "TCP", 80)
    assert not kernel.verdict("fd00::1:1", "2001:db8::1", "TCP", 80)


def test_node_ips_always_pass_both_ways():
    c = compiled(world([netpol("deny-all", "x", ingress=[], egress=[])]))
    plan, state = planned(c)
    kernel = Kernel(state)
    node, pod = NODE_IPS[0], ip_of("x/a")  # the e2e pods are IPv4 only; IPv6 below
    for protocol, port in (("TCP", 80), ("UDP", 53), ("TCP", 10250)):
        assert kernel.verdict(node, pod, protocol, port)
        assert kernel.verdict(pod, node, protocol, port)
    assert not kernel.verdict("192.168.50.2", ip_of("x/a"), "TCP", 80)
    assert not kernel.verdict(ip_of("y/a"), ip_of("x/a"), "TCP", 80)
    ep = state.endpoints[IFINDEX["x", "a"]]
    assert plan.rules[kernel.decide(ep, DIR_IN, addr16(ip(NODE_IPS[0])), 6, 80)] == NODE_RULE
    assert plan.rules[kernel.decide(ep, DIR_OUT, addr16(ip_of("x/a")), 6, 80)] == SELF_RULE
    _, kernel6 = egress_world(Peer(ip_block=IPBlock(net("10.9.0.0/16"))))
    assert kernel6.verdict("fd00::1:1", NODE_IPS[1], "UDP", 53)


def test_rule_ids_name_the_policy_rule():
    policy = netpol("web", "x", labels(pod="a"), ingress=[{"ports": [{"port": 80}]}])
    plan, _ = planned(compiled(world([policy])))
    assert plan.rules[rule_id("x/web/ingress/0")] == "x/web/ingress/0"
    assert rule_id("x/web/ingress/0") == rule_id("x/web/ingress/0") != rule_id("x/web/ingress/1")


def test_a_policy_too_big_for_the_maps_blocks_only_its_own_pod():
    small = netpol("small", "y", labels(pod="a"), ingress=[{"ports": [{"port": 80}]}])
    _, state = planned(compiled(world([small])))
    # x/a's new policy needs ~2 000 port prefixes; y/a's edit needs a few.
    huge = netpol("huge", "x", labels(pod="a"), ingress=[
        {"ports": [{"port": p, "endPort": p + 1} for p in range(1001, 9000, 4)]}])
    edited = netpol("small", "y", labels(pod="a"), ingress=[{"ports": [{"port": 81}]}])
    c = compiled(world([huge, edited]))
    capacity = {"endpoints": 64, "addresses": 64, "peers": 256, "ports": len(state.ports) + 50}
    plan, after = planned(c, state, capacity=capacity)
    assert len(plan.problems) == 1
    assert plan.problems[0].startswith("policy for pod x/a: needs ") and "mbpf_pol_port" in plan.problems[0]
    assert "previous rules stay in force" in plan.problems[0]
    kernel = Kernel(after)
    assert kernel.verdict(ip_of("x/b"), ip_of("x/a"), "TCP", 9000)   # x/a as before: not isolated
    assert kernel.verdict(ip_of("x/b"), ip_of("y/a"), "TCP", 81)     # y/a's edit went through
    assert not kernel.verdict(ip_of("x/b"), ip_of("y/a"), "TCP", 80)
    assert len(after.ports) <= capacity["ports"]


def test_a_new_pod_that_does_not_fit_fails_closed():
    huge = netpol("huge", "x", labels(pod="a"), ingress=[
        {"ports": [{"port": p, "endPort": p + 1} for p in range(1001, 9000, 4)]}])
    plan, state = planned(compiled(world([huge])), capacity={"ports": 100})
    assert [p.split(":")[0] for p in plan.problems] == ["policy for pod x/a"]
    assert not Kernel(state).verdict(ip_of("x/b"), ip_of("x/a"), "TCP", 1001)
    assert Kernel(state).verdict(ip_of("x/b"), ip_of("y/a"), "TCP", 1001)


@pytest.mark.parametrize("seed", range(20))
def test_random_blocks_and_ports_match_the_compiler(seed):
    """Random nested IPv4/IPv6 blocks with excepts and port ranges, several
    rules overlapping: the maps decide as the compiler at every edge."""
    import random
    rnd = random.Random(seed)
    bases = ["10.0.0.0/8", "10.0.0.0/16", "10.0.1.0/24", "0.0.0.0/0", "fd00::/16", "::/0", "fd00::1:0/112"]
    peers, probes = [], []
    for _ in range(rnd.randint(1, 4)):
        cidr = net(rnd.choice(bases))
        holes = [s for s in cidr.subnets(new_prefix=min(cidr.prefixlen + rnd.randint(1, 12), cidr.max_prefixlen))]
        excepts = tuple(sorted({rnd.choice(holes[:64]) for _ in range(rnd.randint(0, 3))}))
        peers.append(Peer(ip_block=IPBlock(cidr, excepts)))
        probes += addresses_around(str(cidr), *map(str, excepts))
    rules = []
    for i in range(rnd.randint(1, 3)):
        first = rnd.randint(1, 200)
        ports = (PolicyPort(rnd.choice(["TCP", "UDP"]), first, first + rnd.randint(0, 70)),)
        rules.append(Rule(tuple(rnd.sample(peers, rnd.randint(1, len(peers)))), ports if i else ()))
    a = PodInfo("x", "a", "u", {}, "node-1", False, {}, (ip("10.0.1.1"), ip("fd00::1:1")))
    policy = NetworkPolicy("x", "r", LabelSelector(), frozenset({"Egress", "Ingress"}),
                           tuple(rules), tuple(rules))
    c = compile_policies([a], [], [policy], "node-1")
    kernel = Kernel(planned(c, endpoints={("x", "a"): 7})[1])
    wrong = []
    for peer in set(probes):
        me = "10.0.1.1" if peer.version == 4 else "fd00::1:1"
        for proto in ("TCP", "UDP"):
            for port in (1, 2, 64, 65, 128, 199, 200, 270, 271):
                for s, d in ((me, peer), (peer, me)):
                    if kernel.verdict(s, d, proto, port) != verdict(c, s, d, proto, port):
                        wrong.append(f"{s} -> {d} {proto}/{port}")
    assert not wrong, wrong[:10]


def test_every_local_pod_owns_its_addresses_and_a_new_address_moves_only_those():
    """mbpf_pol_epaddr (the spoofing check) holds every local pod's addresses,
    isolated or not; a pod whose IP changes gets its address entries moved."""
    a = PodInfo("x", "a", "u", {}, "node-1", False, {}, (ip("10.0.1.1"), ip("fd00::1")))
    plan, state = planned(compile_policies([a], [], [], "node-1"), endpoints={("x", "a"): 7})
    ep = state.endpoints[7]
    assert ep.flags == 0 and state.addresses == {addr16(ip("10.0.1.1")): ep.ep_id, addr16(ip("fd00::1")): ep.ep_id}
    moved = PodInfo("x", "a", "u", {}, "node-1", False, {}, (ip("10.0.1.9"), ip("fd00::1")))
    plan, after = planned(compile_policies([moved], [], [], "node-1"), state, endpoints={("x", "a"): 7})
    assert plan.address_updates == {addr16(ip("10.0.1.9")): ep.ep_id}
    assert plan.address_deletes == [addr16(ip("10.0.1.1"))]
    assert not plan.endpoint_updates and not plan.peer_updates


def test_only_local_pods_with_an_interface_become_endpoints():
    """A hostNetwork pod is never policed; a pod without an interface yet
    (no ifindex) waits; a pod of another node is only a peer."""
    a = PodInfo("x", "a", "u", {}, "node-1", False, {}, (ip("10.0.1.1"),))
    waiting = PodInfo("x", "w", "u", {}, "node-1", False, {}, (ip("10.0.1.2"),))
    host = PodInfo("x", "h", "u", {}, "node-1", True, {}, (ip("192.168.50.1"),))
    remote = PodInfo("x", "r", "u", {}, "node-2", False, {}, (ip("10.0.2.1"),))
    deny = NetworkPolicy("x", "deny", LabelSelector(), frozenset({"Ingress"}))
    c = compile_policies([a, waiting, host, remote], [], [deny], "node-1")
    _, state = planned(c, endpoints={("x", "a"): 7, ("x", "h"): 8, ("x", "r"): 9})
    assert set(state.endpoints) == {7}
    assert set(state.addresses) == {addr16(ip("10.0.1.1"))}


def test_e2e_cases_as_live_edits_in_random_orders():
    """The e2e states in random orders (each pair of cases is an edit: new
    policies, relabelled pods and namespaces): safe at every map write, and
    each lands on its truth table with nothing left to write."""
    import random
    for seed in range(4):
        rnd = random.Random(seed)
        state = PolicyState()
        for case in rnd.sample(CASES, len(CASES)):
            objects, checks = case_objects(case)
            c = compiled(objects)
            state = assert_safe_entry_by_entry(state, plan_policy(state, c, IFINDEX, NODE_IPS))
            assert not table_mismatches(c, Kernel(state), checks), case[0]
            assert not plan_policy(state, c, IFINDEX, NODE_IPS), case[0]


NESTED = ["0.0.0.0/0", "10.0.0.0/8", "10.0.0.0/16", "10.0.1.0/24", "10.0.1.0/30", "10.0.2.0/24",
          "10.0.1.2/32", "10.0.3.0/25", "::/0", "fd00::/16", "fd00::1:0/112"]
EDIT_PROBES = PROBES + [addr16(ip(a)) for a in (
    "10.0.1.4", "10.0.3.200", "10.1.0.1", "10.0.1.3", "fd00::2", "fd00::1:ffff", "fd01::1", "::1")]


def random_peer(rnd) -> dict:
    kind = rnd.randrange(4)
    if kind == 0:
        return {"podSelector": labels(pod=rnd.choice("abc"))}
    if kind == 1:
        return {"namespaceSelector": labels(ns=rnd.choice("xyz"))}
    cidr = net(rnd.choice(NESTED))
    holes = [str(h) for h in NESTED if net(h).version == cidr.version and net(h) != cidr
             and net(h).subnet_of(cidr)]
    block = {"cidr": str(cidr)}
    if holes and rnd.random() < 0.4:
        block["except"] = [rnd.choice(holes)]
    return {"ipBlock": block}


def random_rule(rnd, side: str) -> dict:
    rule: dict = {side: [random_peer(rnd) for _ in range(rnd.randint(0, 2))]}
    if rnd.random() < 0.7:
        first = rnd.choice((79, 80, 81))
        port = {"port": first, "protocol": rnd.choice(("TCP", "UDP"))}
        if rnd.random() < 0.3:
            port["endPort"] = first + rnd.randint(1, 3)
        rule["ports"] = [port]
    return rule


def random_policy(rnd, name: str) -> dict:
    selector = rnd.choice([labels(pod="a"), labels(pod="b"), {}])
    ingress = [random_rule(rnd, "from") for _ in range(rnd.randint(0, 3))]
    egress = [random_rule(rnd, "to") for _ in range(rnd.randint(0, 2))] if rnd.random() < 0.3 else None
    return netpol(name, rnd.choice("xy"), selector, ingress=ingress, egress=egress)


def random_edit(rnd, policies: dict, pod_labels: dict) -> None:
    """One live edit: a policy added, removed or rewritten, or a pod relabelled."""
    what = rnd.random()
    if what < 0.25 and policies:
        del policies[rnd.choice(sorted(policies))]
    elif what < 0.4:
        pod_labels[rnd.choice(ALL)] = {"pod": rnd.choice("abcd")}
    elif what < 0.55 and policies:
        # A rule of one policy edited, its isolation kept: the in-place path.
        name = rnd.choice(sorted(policies))
        spec = policies[name]["spec"]
        rules = spec.get("ingress") or []
        if rules:
            rules[rnd.randrange(len(rules))] = random_rule(rnd, "from")
    else:
        name = f"p{rnd.randrange(6)}"
        policies[name] = random_policy(rnd, name)


@pytest.mark.parametrize("seed", range(12))
def test_random_live_edits_are_safe_at_every_map_write(seed):
    """Random edit sequences over nested IPv4/IPv6 blocks with excepts, pod
    selectors, ports and ranges: at every single map write each flow's
    verdict is its old one where old == new (a denied flow never passes, an
    allowed one is never refused), and each edit lands exactly on the
    compiler's verdicts with nothing left to write."""
    import copy
    import random
    rnd = random.Random(seed)
    policies: dict = {}
    pod_labels: dict = {}
    state = PolicyState()
    addresses = [ip(a) for a in ("10.0.1.4", "10.0.3.200", "11.0.0.1")] + [ip_of(p) for p in ALL]
    for _ in range(12):
        random_edit(rnd, policies, pod_labels)
        c = compiled(world(copy.deepcopy(list(policies.values())), pod_labels))
        plan = plan_policy(state, c, IFINDEX, NODE_IPS)
        if plan.writes > 1 and rnd.random() < 0.3:
            # The agent died mid-plan: the next one plans from what was written.
            state = apply_entries(state, plan, rnd.randrange(1, plan.writes))
            plan = plan_policy(state, c, IFINDEX, NODE_IPS)
        state = assert_safe_entry_by_entry(state, plan, EDIT_PROBES)
        assert not compiler_mismatches(c, Kernel(state), addresses, ports=(79, 80, 81, 83))
        assert not plan_policy(state, c, IFINDEX, NODE_IPS)


def test_a_one_rule_edit_writes_its_difference_in_place():
    """Issue 10: a rule that stops allowing one peer among many rewrites that
    peer's prefix and its peer set, not the pod's whole rule set, and needs
    no generation flip; the other pods get no write."""
    decoys = [netpol(f"decoy-{j}", "x", labels(pod="a"), ingress=[
        {"from": [{"ipBlock": {"cidr": f"10.{j}.0.0/16", "except": [f"10.{j}.1.0/24"]}}],
         "ports": [{"port": 9000 + j}]}]) for j in range(40, 90)]
    allow = netpol("zz", "x", labels(pod="a"), ingress=[{"from": [{"podSelector": labels(pod="b")}],
                                                          "ports": [{"port": 80}]}])
    deny = netpol("zz", "x", labels(pod="a"), ingress=[{"from": [{"podSelector": labels(pod="nobody")}],
                                                         "ports": [{"port": 80}]}])
    _, state = planned(compiled(world(decoys + [allow])))
    x_a = state.endpoints[IFINDEX["x", "a"]]
    for policy, allowed in ((deny, False), (allow, True), (deny, False)):
        c = compiled(world(decoys + [policy]))
        plan = plan_policy(state, c, IFINDEX, NODE_IPS)
        assert not plan.endpoint_updates
        assert {k.ep_id for s in plan.steps() for k in s.entries} == {x_a.ep_id}
        assert plan.writes <= 3, list(plan.steps())
        state = assert_safe_entry_by_entry(state, plan)
        assert state.endpoints[IFINDEX["x", "a"]] == x_a
        assert Kernel(state).verdict(ip_of("x/b"), ip_of("x/a"), "TCP", 80) is allowed
        assert not compiler_mismatches(c, Kernel(state), [ip_of(p) for p in ALL] + [ip("10.41.0.1")],
                                       ports=(80, 9041))


def block_rule(cidr: str, *ports: int) -> dict:
    return {"from": [{"ipBlock": {"cidr": cidr}}], "ports": [{"port": p} for p in ports]}


@pytest.mark.parametrize("before, after", [
    # A more specific prefix comes in while the wider one's ports change: it
    # must be in before the wider one changes (10.0.1.4 keeps port 80).
    ([block_rule("10.0.0.0/8", 80)], [block_rule("10.0.0.0/8", 81), block_rule("10.0.1.0/24", 80)]),
    # Two nested prefixes go, a wider one comes: the outer one must go
    # first, else 10.0.1.4 falls onto the /16 and loses port 80 it keeps.
    ([block_rule("10.0.1.0/24", 80), block_rule("10.0.0.0/16", 81)], [block_rule("10.0.0.0/8", 80, 81)]),
    # and back.
    ([block_rule("10.0.0.0/8", 80, 81)], [block_rule("10.0.1.0/24", 80), block_rule("10.0.0.0/16", 81)]),
])
def test_nested_prefixes_change_in_place_in_a_safe_order(before, after):
    _, state = planned(compiled(world([netpol("p", "x", labels(pod="a"), ingress=before)])))
    c = compiled(world([netpol("p", "x", labels(pod="a"), ingress=after)]))
    plan = plan_policy(state, c, IFINDEX, NODE_IPS)
    assert not plan.endpoint_updates   # in place, no flip
    state = assert_safe_entry_by_entry(state, plan, EDIT_PROBES)
    assert not compiler_mismatches(c, Kernel(state), [ip("10.0.1.4"), ip("10.2.0.1"), ip_of("x/a")])


def test_maps_of_the_previous_build_are_edited_in_place_safely():
    """0.1.0 numbered peer sets by the rules matching a prefix, so two sets
    could hold the same ports. An agent of this build edits such maps in
    place: safe at every write, right at the end, one set per content."""
    policy = netpol("p", "x", labels(pod="a"), ingress=[
        {"from": [{"ipBlock": {"cidr": "10.0.0.0/16"}}], "ports": [{"port": 80}]},
        {"from": [{"podSelector": labels(pod="b")}], "ports": [{"port": 80}]}])
    _, state = planned(compiled(world([policy])))
    x_a = state.endpoints[IFINDEX["x", "a"]]
    # Give one prefix its own copy of its set, as the old numbering did.
    key = next(k for k, v in state.peers.items() if k.ep_id == x_a.ep_id and k.addr_bits == 128
               and not v.flags)
    copy_of = state.peers[key].peer_set
    state.ports.update({k._replace(peer_set=99): v for k, v in list(state.ports.items())
                        if k.ep_id == x_a.ep_id and k.peer_set == copy_of})
    state.peers[key] = state.peers[key]._replace(peer_set=99)
    c = compiled(world([netpol("p", "x", labels(pod="a"), ingress=[
        {"from": [{"ipBlock": {"cidr": "10.0.0.0/16"}}], "ports": [{"port": 80}, {"port": 81}]}])]))
    plan = plan_policy(state, c, IFINDEX, NODE_IPS)
    assert not plan.endpoint_updates
    state = assert_safe_entry_by_entry(state, plan, EDIT_PROBES)
    sets: dict = {}
    for k, v in state.ports.items():
        if k.ep_id == x_a.ep_id:
            sets.setdefault((k.dir, k.peer_set), set()).add((k.proto, k.port, k.port_bits, v))
    named = {(k.dir, v.peer_set) for k, v in state.peers.items() if k.ep_id == x_a.ep_id and not v.flags}
    assert set(sets) <= named, "a peer set no prefix names was left"
    assert len({frozenset(s) for s in sets.values()}) == len(sets), "two sets with the same ports"
    assert not compiler_mismatches(c, Kernel(state), [ip_of(p) for p in ALL])
    assert not plan_policy(state, c, IFINDEX, NODE_IPS)
