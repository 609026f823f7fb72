"""Compiled NetworkPolicy -> the smallest ordered set of policy map writes.

Plain Python over plain values (reconcile/policy_keys.py): no BPF, no root.
The agent will call it, once the datapath's policy maps land, as:

    compiled = compile_policies(desired.pods, desired.namespaces,
                                desired.network_policies, node_name, node_ips_by_node)
    plan = plan_policy(current_policy_state,      # the pinned maps read back
                       compiled,
                       endpoints,                 # {(namespace, pod): host-side ifindex}
                       node_ips,                  # this node's own addresses
                       capacity)                  # {"endpoints": max_entries, "addresses": ...,
                                                  #  "peers": ..., "ports": ...}
    for problem in plan.problems:
        log.warning("%s", problem)
    for step in plan.steps():                     # in order; each step's entries in any order
        policy_maps.write(step)                   # the datapath's writer (meshbpf/datapath/)
    current_policy_state = plan.apply_to(current_policy_state)

What the datapath decides (bpf/lib/common.h), and so what the plan encodes:
an endpoint not isolated in a direction lets everything pass; if isolated,
the longest prefix of the peer's address in mbpf_pol_peer gives a peer set
(or ANY_PORT), and the longest port prefix in mbpf_pol_port under that peer
set decides. For each (endpoint, direction) every allowed network becomes a
prefix, and each prefix carries the rules whose networks CONTAIN it: the
longest prefix holding an address is contained in every allowed network that
holds the address, so its rules are exactly the rules that match it.

Make-before-break, per endpoint. An endpoint whose isolation flags change
(or a new one): its rules are written under the generation not in force,
the endpoint entry flips to it in one update, then the old generation is
deleted. An endpoint whose flags stay: only the difference is written, in
the generation in force, in an order where every new flow's decision is
wholly old or wholly new at each single write (_write_in_place). An
endpoint whose rules did not change gets no write.
"""

from __future__ import annotations

import functools
import heapq
import ipaddress
import zlib
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Mapping

from ..policy.compile import AllowRule, Compiled, PodPolicy
from ..policy.model import IPAddress, IPNetwork
from . import IPPROTO, StepPlan, _IdAllocator, addr16
from .policy_keys import (DIR_IN, DIR_OUT, EP_ISOLATE_IN, EP_ISOLATE_OUT, PEER_ANY_PORT, EpVal,
                          PeerKey, PeerVal, PolicyState, PolicyStep, PortKey, PortVal)

POLICY_IPPROTO = {**IPPROTO, "SCTP": 132}
MAP_NAMES = {"endpoints": "mbpf_pol_ep", "addresses": "mbpf_pol_epaddr",
             "peers": "mbpf_pol_peer", "ports": "mbpf_pol_port"}
SELF_RULE = "(the pod itself)"   # a pod always reaches itself
NODE_RULE = "(the node)"         # traffic to and from the node is always allowed

_V4_MAPPED = ipaddress.ip_network("::ffff:0:0/96")  # where the maps keep IPv4
_V4_MAPPED_INT = int(_V4_MAPPED.network_address)
_V4_ANY = ipaddress.ip_network("0.0.0.0/0")
_ANY = (_V4_ANY, ipaddress.ip_network("::/0"))

PeerEntries = dict[tuple[int, bytes, int], PeerVal]             # (dir, addr, bits)
PortEntries = dict[tuple[int, int, int, int, int], PortVal]     # (dir, proto, peer set, port, bits)


def rule_id(origin: str) -> int:
    """A stable u32 naming a policy rule ("ns/name/ingress/0"); never 0,
    which the conntrack map keeps for "not isolated"."""
    return zlib.crc32(origin.encode()) or 1


NetKey = tuple[int, int, int]   # a network as (version, first address, prefix length)


@dataclass(frozen=True)
class _Rule:
    origin: str
    nets: tuple[NetKey, ...]
    ports: tuple[tuple[int, int, int], ...] | None   # (proto, first, last); None: any


def _as_rule(allow: AllowRule) -> _Rule:
    ports = None if allow.ports is None else tuple(
        (POLICY_IPPROTO[r.protocol], r.first, r.last) for r in allow.ports)
    return _Rule(allow.origin, _peer_keys(allow.peers), ports)


@functools.lru_cache(maxsize=4096)
def _peer_keys(nets: frozenset[IPNetwork] | None) -> tuple[NetKey, ...]:
    """_map_networks of a rule's peers. Cached: the compiler shares one set
    among the rules that name the same peers, and a set can hold thousands
    of pod addresses (the same tuple back also lets _direction_entries
    treat those rules as one group)."""
    return _map_networks(nets)


def _map_networks(nets: Iterable[IPNetwork] | None) -> tuple[NetKey, ...]:
    """The networks as the maps can hold them. IPv6 networks inside
    ::ffff:0:0/96 are dropped: they hold only IPv4-mapped IPv6 addresses,
    which no pod has and which the maps cannot tell from IPv4."""
    nets = _ANY if nets is None else nets
    return tuple((n.version, int(n.network_address), n.prefixlen) for n in nets
                 if n.version == 4 or not n.subnet_of(_V4_MAPPED))


def _prefix_key(version: int, first: int, bits: int) -> tuple[bytes, int]:
    """(16-byte address, prefix length over 128 bits) of a network given as
    its version, first address and prefix length."""
    if version == 4:
        return (_V4_MAPPED_INT | first).to_bytes(16, "big"), 96 + bits
    return first.to_bytes(16, "big"), bits


@dataclass(frozen=True)
class EndpointRules:
    """What one endpoint's entries hold, before its ep_id and generation."""

    flags: int
    peers: PeerEntries
    ports: PortEntries
    rules: Mapping[int, str]   # rule id -> origin, for the monitor

    def keyed(self, ep_id: int, gen: int) -> tuple[dict[PeerKey, PeerVal], dict[PortKey, PortVal]]:
        peers = {PeerKey(ep_id, gen, d, addr, bits): v for (d, addr, bits), v in self.peers.items()}
        ports = {PortKey(ep_id, gen, d, proto, ps, port, bits): v
                 for (d, proto, ps, port, bits), v in self.ports.items()}
        return peers, ports


def endpoint_rules(pod: PodPolicy, node_nets: Iterable[IPNetwork]) -> EndpointRules:
    """The entries one local pod needs: per isolated direction, its allow
    rules plus itself and the node, any port."""
    always = [_Rule(SELF_RULE, _map_networks(ipaddress.ip_network(ip) for ip in pod.pod.ips), None),
              _Rule(NODE_RULE, _map_networks(node_nets), None)]
    flags, peers, ports, names = 0, {}, {}, {}
    for direction, isolated, allows, flag in ((DIR_IN, pod.isolated_ingress, pod.ingress, EP_ISOLATE_IN),
                                              (DIR_OUT, pod.isolated_egress, pod.egress, EP_ISOLATE_OUT)):
        if not isolated:
            continue
        flags |= flag
        rules = [_as_rule(a) for a in _distinct(allows)] + [r for r in always if r.nets]
        names.update((rule_id(r.origin), r.origin) for r in rules)
        _direction_entries(direction, rules, peers, ports)
    return EndpointRules(flags, peers, ports, names)


def _distinct(allows: Iterable[AllowRule]) -> list[AllowRule]:
    """One rule per (peers, ports): several policies often allow the same
    thing; the first origin by name speaks for them."""
    first: dict[AllowRule, AllowRule] = {}
    for allow in sorted(allows, key=lambda a: a.origin):
        first.setdefault(allow, allow)  # equality ignores the origin
    return list(first.values())


def _direction_entries(direction: int, rules: list[_Rule], peers: PeerEntries,
                       ports: PortEntries) -> None:
    # Rules by their index: sets of ints hash fast, rules with thousands of
    # networks do not. Rules with the very same networks (one cached tuple)
    # are grouped first, so each network is visited once per group.
    groups: dict[int, tuple[tuple[NetKey, ...], list[int]]] = {}
    for i, rule in enumerate(rules):
        groups.setdefault(id(rule.nets), (rule.nets, []))[1].append(i)
    by_net: dict[NetKey, list[int]] = {}
    for nets, members in groups.values():
        for net in nets:
            by_net.setdefault(net, []).extend(members)
    prefixes = set(by_net)
    if any(v == 6 and _holds_v4_mapped(first, bits) for v, first, bits in prefixes):
        # An IPv6 network holding ::ffff:0:0/96 would also match IPv4 peers
        # in the trie; the IPv4 /0 (rules or none) shadows it for them.
        prefixes.add((4, 0, 0))
    lengths: dict[int, list[int]] = {4: [], 6: []}
    for v, bits in sorted({(v, bits) for v, _, bits in by_net}):
        lengths[v].append(bits)
    peer_sets: dict[frozenset[int], PeerVal] = {}   # by the rules matching a prefix
    by_content: dict[frozenset, int] = {}           # peer set id by its port entries
    # In address order, so peer set numbers depend on nothing but the rules.
    for key, (v, first, bits) in sorted((_prefix_key(*n), n) for n in prefixes):
        width = 32 if v == 4 else 128
        # The rules of every network holding this one: its supernets at the
        # lengths in use, same family.
        matching = frozenset(i for length in lengths[v] if length <= bits
                             for i in by_net.get((v, first >> (width - length) << (width - length), length), ()))
        val = peer_sets.get(matching)
        if val is None:
            val = peer_sets[matching] = _peer_value(direction, rules, matching, by_content, ports)
        peers[(direction, *key)] = val


def _holds_v4_mapped(first: int, bits: int) -> bool:
    """Whether the IPv6 network (first, bits) holds ::ffff:0:0/96."""
    return bits <= 96 and (_V4_MAPPED_INT ^ first) >> (128 - bits) == 0


def _peer_value(direction: int, rules: list[_Rule], matching: frozenset[int],
                by_content: dict[frozenset, int], ports: PortEntries) -> PeerVal:
    """Prefixes whose rules allow the same ports share one peer set (keyed by
    content, so an edit that keeps a set's ports keeps the set: see
    _inplace_entries). No rules at all (an IPv4 /0 shadowing IPv6): a set
    with no ports, which denies."""
    any_port = sorted(rules[i].origin for i in matching if rules[i].ports is None)
    if any_port:
        return PeerVal(0, rule_id(any_port[0]), PEER_ANY_PORT)
    content = {(proto, port, bits): PortVal(rule_id(origin))
               for (proto, port, bits), origin in _port_prefixes(rules[i] for i in matching).items()}
    key = frozenset(content.items())
    peer_set = by_content.get(key)
    if peer_set is None:
        peer_set = by_content[key] = len(by_content) + 1
        for (proto, port, bits), val in content.items():
            ports[(direction, proto, peer_set, port, bits)] = val
    return PeerVal(peer_set, 0, 0)


def _port_prefixes(rules: Iterable[_Rule]) -> dict[tuple[int, int, int], str]:
    """The union of the rules' port ranges as (proto, port, bits) prefixes,
    each naming the first rule (by origin) that allows all of it."""
    ranges: dict[int, list[tuple[int, int, str]]] = {}
    for rule in rules:
        for proto, first, last in rule.ports or ():
            ranges.setdefault(proto, []).append((first, last, rule.origin))
    out = {}
    for proto, spans in ranges.items():
        for first, last, origin in _attributed_pieces(spans):
            for port, bits in _range_prefixes(first, last):
                out[(proto, port, bits)] = origin
    return out


def _attributed_pieces(spans: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    """Overlapping (first, last, origin) spans as disjoint ones, each piece
    owned by the smallest origin covering it; neighbours with one owner merge."""
    cuts = sorted({f for f, _, _ in spans} | {last + 1 for _, last, _ in spans})
    pieces: list[tuple[int, int, str]] = []
    todo = sorted(spans, reverse=True)     # by first port; popped from the end
    covering: list[tuple[str, int]] = []   # heap of (origin, last) of spans begun
    for start, end in zip(cuts, cuts[1:]):
        while todo and todo[-1][0] <= start:
            _, last, origin = todo.pop()
            heapq.heappush(covering, (origin, last))
        while covering and covering[0][1] < start:
            heapq.heappop(covering)   # ended: a span ends only at a cut
        if not covering:
            continue
        owner = covering[0][0]
        if pieces and pieces[-1][1] == start - 1 and pieces[-1][2] == owner:
            pieces[-1] = (pieces[-1][0], end - 1, owner)
        else:
            pieces.append((start, end - 1, owner))
    return pieces


def _range_prefixes(first: int, last: int) -> Iterator[tuple[int, int]]:
    """[first, last] as the fewest 16-bit (port, prefix length) blocks."""
    while first <= last:
        size = (first & -first) if first else 1 << 16
        while first + size - 1 > last:
            size >>= 1
        yield first, 17 - size.bit_length()
        first += size


@dataclass
class PolicyPlan(StepPlan):
    """A policy plan; apply_to(state) and writes come from StepPlan."""

    address_updates: dict[bytes, int] = field(default_factory=dict)
    # Left over in a generation about to be written (an interrupted run).
    stale_peer_deletes: list[PeerKey] = field(default_factory=list)
    stale_port_deletes: list[PortKey] = field(default_factory=list)
    port_updates: dict[PortKey, PortVal] = field(default_factory=dict)
    peer_updates: dict[PeerKey, PeerVal] = field(default_factory=dict)
    # Edits written in the generation in force (_write_in_place): new peer
    # sets, prefixes added (by length), values changed, prefixes removed (by
    # length), peer sets no prefix names any more.
    inplace_port_updates: dict[PortKey, PortVal] = field(default_factory=dict)
    inplace_peer_adds: dict[int, dict[PeerKey, PeerVal]] = field(default_factory=dict)
    inplace_peer_changes: dict[PeerKey, PeerVal] = field(default_factory=dict)
    inplace_peer_removes: dict[int, list[PeerKey]] = field(default_factory=dict)
    inplace_port_deletes: list[PortKey] = field(default_factory=list)
    endpoint_updates: dict[int, EpVal] = field(default_factory=dict)
    old_peer_deletes: list[PeerKey] = field(default_factory=list)   # the generation flipped away from
    old_port_deletes: list[PortKey] = field(default_factory=list)
    endpoint_deletes: list[int] = field(default_factory=list)
    gone_peer_deletes: list[PeerKey] = field(default_factory=list)  # of endpoints that left, and orphans
    gone_port_deletes: list[PortKey] = field(default_factory=list)
    address_deletes: list[bytes] = field(default_factory=list)
    rules: dict[int, str] = field(default_factory=dict)   # rule id -> "ns/name/ingress/0"
    problems: list[str] = field(default_factory=list)

    step_type = PolicyStep

    def order(self) -> list[tuple[str, str, dict]]:
        """Make-before-break: (1) addresses of new endpoints, (2) the rules
        under each flipping endpoint's other generation, and the new peer
        sets of in-place edits, (3) in-place prefixes added, longest first,
        then changed, (4) the flips, (5) in-place prefixes removed, shortest
        first, (6) the old generations and the peer sets no prefix names,
        (7) endpoints that left, then their addresses. Steps of different
        endpoints touch different keys, so they can share a step."""
        adds, removes = self.inplace_peer_adds, self.inplace_peer_removes
        return [
            ("addresses", "update", self.address_updates),
            ("peers", "delete", dict.fromkeys(self.stale_peer_deletes)),
            ("ports", "delete", dict.fromkeys(self.stale_port_deletes)),
            ("ports", "update", {**self.port_updates, **self.inplace_port_updates}),
            ("peers", "update", self.peer_updates),
            *(("peers", "update", adds[bits]) for bits in sorted(adds, reverse=True)),
            ("peers", "update", self.inplace_peer_changes),
            ("endpoints", "update", self.endpoint_updates),
            *(("peers", "delete", dict.fromkeys(removes[bits])) for bits in sorted(removes)),
            ("peers", "delete", dict.fromkeys(self.old_peer_deletes)),
            ("ports", "delete", dict.fromkeys([*self.old_port_deletes, *self.inplace_port_deletes])),
            ("endpoints", "delete", dict.fromkeys(self.endpoint_deletes)),
            ("peers", "delete", dict.fromkeys(self.gone_peer_deletes)),
            ("ports", "delete", dict.fromkeys(self.gone_port_deletes)),
            ("addresses", "delete", dict.fromkeys(self.address_deletes)),
        ]


class _Entries:
    """The current rule entries, by (ep_id, generation)."""

    def __init__(self, state: PolicyState):
        self.peers: dict[tuple[int, int], dict[PeerKey, PeerVal]] = {}
        self.ports: dict[tuple[int, int], dict[PortKey, PortVal]] = {}
        for key, val in state.peers.items():
            self.peers.setdefault((key.ep_id, key.gen), {})[key] = val
        for key, val in state.ports.items():
            self.ports.setdefault((key.ep_id, key.gen), {})[key] = val

    def of(self, ep_id: int, gen: int) -> tuple[dict[PeerKey, PeerVal], dict[PortKey, PortVal]]:
        return self.peers.get((ep_id, gen), {}), self.ports.get((ep_id, gen), {})

    def ep_ids(self) -> set[int]:
        return {ep for ep, _ in self.peers} | {ep for ep, _ in self.ports}


class _Budget:
    """Room left in each map while the plan runs: updates land before any
    delete, so every key added counts against what the maps hold now."""

    def __init__(self, current: PolicyState, capacity: Mapping[str, int] | None):
        self.current = current
        self.capacity = dict(capacity or {})
        self.used = {name: len(getattr(current, name)) for name in MAP_NAMES}

    def take(self, adds: Mapping[str, Iterable]) -> list[str]:
        """Reserves room for these keys; returns what overflows (then nothing is reserved)."""
        needed = {name: sum(1 for k in keys if k not in getattr(self.current, name))
                  for name, keys in adds.items()}
        over = [f"needs {n} more {MAP_NAMES[name]} entries, {self.capacity[name] - self.used[name]} free"
                for name, n in needed.items()
                if name in self.capacity and self.used[name] + n > self.capacity[name]]
        if not over:
            for name, n in needed.items():
                self.used[name] += n
        return over


def plan_policy(current: PolicyState, compiled: Compiled,
                endpoints: Mapping[tuple[str, str], int], node_ips: Iterable[IPAddress | str],
                capacity: Mapping[str, int] | None = None) -> PolicyPlan:
    """What to write to turn `current` into the maps `compiled` needs for the
    local pods in `endpoints` (pods without an interface yet are left out).
    With `capacity` (map -> max entries), an endpoint whose entries do not
    fit keeps its previous rules (a new one denies its isolated directions)
    and the plan names it in `problems`; the others go ahead."""
    node_nets = tuple(ipaddress.ip_network(ip) for ip in node_ips)
    entries = _Entries(current)
    ep_ids = _IdAllocator({ep.ep_id for ep in current.endpoints.values()} | entries.ep_ids())
    budget = _Budget(current, capacity)
    plan = PolicyPlan()
    addresses: dict[bytes, int] = {}   # every address the maps should hold
    kept: dict[int, int] = {}          # ifindex -> ep_id of every endpoint that stays
    # Endpoints the maps hold come first: room goes to keeping them current.
    order = sorted(endpoints.items(), key=lambda kv: (kv[1] not in current.endpoints, kv[1], kv[0]))
    for key, ifindex in order:
        pod = compiled.pods.get(key)
        if pod is None or ifindex in kept:
            continue  # hostNetwork or unknown: not policed here
        old = current.endpoints.get(ifindex)
        ep_id = old.ep_id if old else ep_ids.take()
        kept[ifindex] = ep_id
        rules = endpoint_rules(pod, node_nets)
        plan.rules.update(rules.rules)
        own = _plan_endpoint(plan, current, entries, budget, ifindex, ep_id, pod, rules)
        addresses.update(dict.fromkeys(own, ep_id))
    _plan_departures(plan, current, entries, kept, addresses)
    return plan


def _plan_endpoint(plan: PolicyPlan, current: PolicyState, entries: _Entries, budget: _Budget,
                   ifindex: int, ep_id: int, pod: PodPolicy, rules: EndpointRules) -> list[bytes]:
    """Plans one endpoint; returns the addresses the maps keep for it."""
    old = current.endpoints.get(ifindex)
    label = f"{pod.pod.namespace}/{pod.pod.name}"
    own = [addr16(ip) for ip in pod.pod.ips]
    if old is not None and old.flags == rules.flags:
        return _plan_in_place(plan, current, entries, budget, label, old, rules, own)
    gen = 0 if old is None else old.gen ^ 1
    peers, ports = rules.keyed(ep_id, gen)
    over = budget.take({"endpoints": [ifindex] if old is None else [], "addresses": own,
                        "peers": peers, "ports": ports})
    if over and old is not None:
        plan.problems.append(f"policy for pod {label}: {'; '.join(over)}; "
                             f"its previous rules stay in force")
        return [a for a, owner in current.addresses.items() if owner == ep_id]
    if over:
        # Fail closed: a new pod that policy isolates gets no allow rules
        # rather than none of its isolation.
        peers, ports = {}, {}
        if budget.take({"endpoints": [ifindex], "addresses": own}):
            plan.problems.append(f"policy for pod {label}: {'; '.join(over)}; not enforced "
                                 f"({MAP_NAMES['endpoints']} or {MAP_NAMES['addresses']} is full)")
            return []
        plan.problems.append(f"policy for pod {label}: {'; '.join(over)}; "
                             f"it denies all traffic its policies isolate until they fit")
    _write_generation(plan, entries, ep_id, gen, peers, ports)
    plan.endpoint_updates[ifindex] = EpVal(ep_id, gen, rules.flags)
    if old is not None:
        old_peers, old_ports = entries.of(ep_id, old.gen)
        plan.old_peer_deletes.extend(old_peers)
        plan.old_port_deletes.extend(old_ports)
    _add_addresses(plan, current, ep_id, own)
    return own


def _plan_in_place(plan: PolicyPlan, current: PolicyState, entries: _Entries, budget: _Budget,
                   label: str, old: EpVal, rules: EndpointRules, own: list[bytes]) -> list[bytes]:
    """An endpoint whose isolation stays: its edit is written into the
    generation in force (the smallest write, and safe: _write_in_place)."""
    _write_generation(plan, entries, old.ep_id, old.gen ^ 1, {}, {})  # only clears leftovers
    held_peers, held_ports = entries.of(old.ep_id, old.gen)
    peers, ports = _renamed(rules, held_peers, held_ports, old.ep_id, old.gen)
    if peers == held_peers and ports == held_ports:
        return _plan_addresses(plan, current, budget, label, old.ep_id, own)
    over = budget.take({"addresses": own, "peers": peers, "ports": ports})
    if over:
        plan.problems.append(f"policy for pod {label}: {'; '.join(over)}; "
                             f"its previous rules stay in force")
        return [a for a, owner in current.addresses.items() if owner == old.ep_id]
    _write_in_place(plan, held_peers, held_ports, peers, ports)
    _add_addresses(plan, current, old.ep_id, own)
    return own


def _renamed(rules: EndpointRules, held_peers: Mapping[PeerKey, PeerVal],
             held_ports: Mapping[PortKey, PortVal], ep_id: int, gen: int
             ) -> tuple[dict[PeerKey, PeerVal], dict[PortKey, PortVal]]:
    """rules keyed under (ep_id, gen), each peer set numbered as the held set
    with the same port entries, or else by a number no held entry uses: an
    edit rewrites only the sets whose ports change, and never a set in use."""
    held: dict[tuple[int, int], dict] = {}   # (dir, peer set) -> {(proto, port, bits): val}
    for k, v in held_ports.items():
        held.setdefault((k.dir, k.peer_set), {})[(k.proto, k.port, k.port_bits)] = v
    for k, v in held_peers.items():
        if not v.flags & PEER_ANY_PORT:
            held.setdefault((k.dir, v.peer_set), {})   # a set with no ports
    by_content: dict[tuple[int, frozenset], int] = {}
    for (d, ps), content in sorted(held.items()):
        by_content.setdefault((d, frozenset(content.items())), ps)
    wanted: dict[tuple[int, int], dict] = {}
    for (d, proto, ps, port, bits), v in rules.ports.items():
        wanted.setdefault((d, ps), {})[(proto, port, bits)] = v
    for (d, _, _), v in rules.peers.items():
        if not v.flags & PEER_ANY_PORT:
            wanted.setdefault((d, v.peer_set), {})
    used = set(held)
    rename: dict[tuple[int, int], int] = {}
    for (d, ps), content in sorted(wanted.items()):
        number = by_content.get((d, frozenset(content.items())))
        if number is None:
            number = next(n for n in range(1, len(used) + 2) if (d, n) not in used)
            used.add((d, number))
        rename[(d, ps)] = number
    peers = {PeerKey(ep_id, gen, d, addr, bits):
             v if v.flags & PEER_ANY_PORT else v._replace(peer_set=rename[(d, v.peer_set)])
             for (d, addr, bits), v in rules.peers.items()}
    ports = {PortKey(ep_id, gen, d, proto, rename[(d, ps)], port, bits): v
             for (d, proto, ps, port, bits), v in rules.ports.items()}
    return peers, ports


def _write_in_place(plan: PolicyPlan, held_peers: Mapping[PeerKey, PeerVal],
                    held_ports: Mapping[PortKey, PortVal], peers: dict[PeerKey, PeerVal],
                    ports: dict[PortKey, PortVal]) -> None:
    """The difference between held and wanted entries of one generation, in
    an order where every new flow's decision is at all times wholly the old
    one or wholly the new one (per address: its longest prefix and that
    prefix's value are both old or both new):

    1. new peer sets (no prefix names them yet; a set in use never changes);
    2. prefixes added, longest first: an added prefix that becomes the
       longest match of an address is then its new longest match (longer
       new ones are in already), with its new value;
    3. values of kept prefixes: for the addresses they are the longest match
       of, they are it before and after;
    4. prefixes removed, shortest first: an address falls back only once no
       longer old prefix holds it, onto its new longest match, which holds
       its new value since 3;
    5. peer sets no prefix names any more.
    Proven entry by entry with the datapath simulator (test_policy_plan.py)."""
    plan.inplace_port_updates.update((k, v) for k, v in ports.items() if held_ports.get(k) != v)
    for k, v in peers.items():
        was = held_peers.get(k)
        if was is None:
            plan.inplace_peer_adds.setdefault(k.addr_bits, {})[k] = v
        elif was != v:
            plan.inplace_peer_changes[k] = v
    for k in held_peers:
        if k not in peers:
            plan.inplace_peer_removes.setdefault(k.addr_bits, []).append(k)
    plan.inplace_port_deletes.extend(k for k in held_ports if k not in ports)


def _plan_addresses(plan: PolicyPlan, current: PolicyState, budget: _Budget, label: str,
                    ep_id: int, own: list[bytes]) -> list[bytes]:
    """An unchanged endpoint's addresses (a pod's IPs rarely change)."""
    over = budget.take({"addresses": own})
    if over:
        plan.problems.append(f"policy for pod {label}: {'; '.join(over)}; its new addresses are left out")
        return [a for a, owner in current.addresses.items() if owner == ep_id]
    _add_addresses(plan, current, ep_id, own)
    return own


def _add_addresses(plan: PolicyPlan, current: PolicyState, ep_id: int, own: list[bytes]) -> None:
    for addr in own:
        if current.addresses.get(addr) != ep_id:
            plan.address_updates[addr] = ep_id


def _write_generation(plan: PolicyPlan, entries: _Entries, ep_id: int, gen: int,
                      peers: dict[PeerKey, PeerVal], ports: dict[PortKey, PortVal]) -> None:
    """Writes these entries under a generation not in force, deleting first
    whatever else an interrupted earlier run left there."""
    held_peers, held_ports = entries.of(ep_id, gen)
    plan.stale_peer_deletes.extend(k for k in held_peers if k not in peers)
    plan.stale_port_deletes.extend(k for k in held_ports if k not in ports)
    plan.peer_updates.update((k, v) for k, v in peers.items() if held_peers.get(k) != v)
    plan.port_updates.update((k, v) for k, v in ports.items() if held_ports.get(k) != v)


def _plan_departures(plan: PolicyPlan, current: PolicyState, entries: _Entries,
                     kept: Mapping[int, int], addresses: Mapping[bytes, int]) -> None:
    """Endpoints that left, their entries, entries of no endpoint (a crash
    before an endpoint was written) and addresses no endpoint keeps."""
    plan.endpoint_deletes.extend(i for i in current.endpoints if i not in kept)
    live = set(kept.values())
    plan.gone_peer_deletes.extend(k for k in current.peers if k.ep_id not in live)
    plan.gone_port_deletes.extend(k for k in current.ports if k.ep_id not in live)
    plan.address_deletes.extend(a for a in current.addresses if a not in addresses)
