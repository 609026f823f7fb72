"""NetworkPolicy -> per-pod allow sets: a pure function, no kernel.

For each pod on this node: is it isolated for ingress / egress, and if so
which (peer, protocol, port range) triples may pass. Semantics, as upstream:

- A pod is isolated for a direction when some policy in its namespace selects
  it and lists that direction in policyTypes; allowed traffic is then the
  union of the rules of every such policy (policies never deny).
- A connection passes when the source's egress AND the destination's
  ingress allow it; a pod always reaches itself.
- Peers: podSelector alone = pods of the policy's namespace; with
  namespaceSelector = those pods in the matching namespaces; ipBlock = the
  CIDR minus its except list. Empty from/to = any peer; empty ports = any.
- Named ports resolve against the DESTINATION pod's container ports: the
  selected pod for ingress, each peer pod for egress.
- hostNetwork pods are never selected; as peers they count as their node's
  IPs (node_ips), or their own pod IPs when the node is not listed.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from .model import (NAMESPACE_NAME_LABEL, IPAddress, IPNetwork, NamespaceInfo, NetworkPolicy,
                    Peer, PodInfo, PolicyPort, Rule)

ANY_PORT = (0, 65535)


@dataclass(frozen=True)
class PortRange:
    protocol: str
    first: int
    last: int

    def matches(self, protocol: str, port: int) -> bool:
        return protocol == self.protocol and self.first <= port <= self.last


@dataclass(frozen=True)
class AllowRule:
    """peers None: any address; ports None: any protocol and port. origin
    names the policy rule it comes from ("ns/name/ingress/0"), for the
    monitor; it is not part of what the rule allows."""

    peers: frozenset[IPNetwork] | None
    ports: tuple[PortRange, ...] | None
    origin: str = field(default="", compare=False)

    def matches(self, ip: IPAddress, protocol: str, port: int) -> bool:
        if self.peers is not None and not any(ip in net for net in self.peers):
            return False
        return self.ports is None or any(r.matches(protocol, port) for r in self.ports)


@dataclass(frozen=True)
class PodPolicy:
    pod: PodInfo
    isolated_ingress: bool
    isolated_egress: bool
    ingress: tuple[AllowRule, ...]  # who may connect to the pod
    egress: tuple[AllowRule, ...]   # where the pod may connect


@dataclass(frozen=True)
class Compiled:
    pods: Mapping[tuple[str, str], PodPolicy]   # local pods by (namespace, name)
    by_ip: Mapping[IPAddress, tuple[str, str]]  # every local pod IP


class _World:
    """The cluster as the compiler sees it: pods, namespace labels, node IPs."""

    def __init__(self, pods: Iterable[PodInfo], namespaces: Iterable[NamespaceInfo],
                 node_ips: Mapping[str, Iterable[IPAddress]]):
        self.pods = list(pods)
        self.ns_labels = {ns.name: ns.labels for ns in namespaces}
        self.node_ips = {k: tuple(v) for k, v in node_ips.items()}
        self.peer_nets: dict[tuple[Peer, str], frozenset[IPNetwork]] = {}  # see _peer_networks
        # Pods by namespace, with their place in the list: a namespace
        # selector is matched once per namespace, not once per pod.
        self.by_namespace: dict[str, list[tuple[int, PodInfo]]] = {}
        for i, pod in enumerate(self.pods):
            self.by_namespace.setdefault(pod.namespace, []).append((i, pod))

    def namespace_labels(self, name: str) -> Mapping[str, str]:
        # A namespace we hold no object for still has the label the API
        # server puts on every namespace.
        return self.ns_labels.get(name, {NAMESPACE_NAME_LABEL: name})

    def addresses(self, pod: PodInfo) -> tuple[IPAddress, ...]:
        if pod.host_network:
            return self.node_ips.get(pod.node_name, pod.ips)
        return pod.ips

    def peer_pods(self, peer: Peer, policy_ns: str) -> list[PodInfo]:
        """The pods a selector peer picks, in the order of the pod list."""
        pod_sel, ns_sel = peer.pod_selector, peer.namespace_selector
        if ns_sel is None:
            spaces = [policy_ns]
        else:
            spaces = [ns for ns in self.by_namespace if ns_sel.matches(self.namespace_labels(ns))]
        found = [(i, pod) for ns in spaces for i, pod in self.by_namespace.get(ns, ())
                 if pod_sel is None or pod_sel.matches(pod.labels)]
        if len(spaces) > 1:
            found.sort(key=lambda item: item[0])
        return [pod for _, pod in found]


def compile_policies(pods: Iterable[PodInfo], namespaces: Iterable[NamespaceInfo],
                     policies: Iterable[NetworkPolicy], node_name: str,
                     node_ips: Mapping[str, Iterable[IPAddress]] | None = None) -> Compiled:
    """Allow sets for every pod on node_name that is not hostNetwork."""
    return PolicyCompiler().compile(pods, namespaces, policies, node_name, node_ips)


class PolicyCompiler:
    """compile_policies with a memory, for the agent's edits: while the pods,
    namespaces, node and node IPs stay equal (a NetworkPolicy edit), the
    peers' address sets are kept, and a local pod is compiled again only if
    the policies that select it changed. The result is exactly
    compile_policies' (everything kept is a function of what it is keyed on)."""

    def __init__(self) -> None:
        self._world_inputs: tuple | None = None
        self._world: _World | None = None
        # pod key -> (pod, the policies that select it, its result)
        self._pods: dict[tuple[str, str], tuple[PodInfo, tuple, PodPolicy]] = {}

    def compile(self, pods: Iterable[PodInfo], namespaces: Iterable[NamespaceInfo],
                policies: Iterable[NetworkPolicy], node_name: str,
                node_ips: Mapping[str, Iterable[IPAddress]] | None = None) -> Compiled:
        pods, namespaces = tuple(pods), tuple(namespaces)
        node_ips = {k: tuple(v) for k, v in (node_ips or {}).items()}
        inputs = (pods, namespaces, node_ips, node_name)
        if inputs != self._world_inputs:
            self._world_inputs, self._world, self._pods = inputs, _World(pods, namespaces, node_ips), {}
        world = self._world
        policies = list(policies)
        compiled: dict[tuple[str, str], PodPolicy] = {}
        by_ip: dict[IPAddress, tuple[str, str]] = {}
        kept: dict[tuple[str, str], tuple[PodInfo, tuple, PodPolicy]] = {}
        for pod in world.pods:
            if pod.node_name != node_name or pod.host_network:
                continue
            mine = tuple(p for p in policies if _selects(p, pod))
            held = self._pods.get(pod.key)
            if held is not None and held[0] is pod and held[1] == mine:
                result = held[2]
            else:
                result = _compile_pod(world, pod, mine)
            kept[pod.key] = (pod, mine, result)
            compiled[pod.key] = result
            for ip in pod.ips:
                by_ip[ip] = pod.key
        self._pods = kept
        return Compiled(compiled, by_ip)


def _selects(policy: NetworkPolicy, pod: PodInfo) -> bool:
    return policy.namespace == pod.namespace and policy.pod_selector.matches(pod.labels)


def _compile_pod(world: _World, pod: PodInfo, mine: tuple[NetworkPolicy, ...]) -> PodPolicy:
    """One local pod's result, from the policies that select it (in order)."""
    ingress_from = [p for p in mine if "Ingress" in p.policy_types]
    egress_from = [p for p in mine if "Egress" in p.policy_types]
    ingress = tuple(a for p in ingress_from for i, r in enumerate(p.ingress)
                    for a in _ingress_rule(world, p, r, pod, rule_origin(p, "ingress", i)))
    egress = tuple(a for p in egress_from for i, r in enumerate(p.egress)
                   for a in _egress_rule(world, p, r, rule_origin(p, "egress", i)))
    return PodPolicy(pod, bool(ingress_from), bool(egress_from), ingress, egress)


def rule_origin(policy: NetworkPolicy, direction: str, index: int) -> str:
    """The name of one rule of a policy: "ns/name/ingress/0"."""
    return f"{policy.namespace}/{policy.name}/{direction}/{index}"


def _ingress_rule(world: _World, policy: NetworkPolicy, rule: Rule, pod: PodInfo,
                  origin: str) -> list[AllowRule]:
    ports = _resolve_ports(rule.ports, pod)
    if ports == ():
        return []  # only named ports this pod does not have: matches nothing
    return [AllowRule(_peer_networks(world, policy, rule.peers), ports, origin)]


def _egress_rule(world: _World, policy: NetworkPolicy, rule: Rule, origin: str) -> list[AllowRule]:
    numeric = tuple(p for p in rule.ports if not isinstance(p.port, str))
    named = tuple(p for p in rule.ports if isinstance(p.port, str))
    peers = _peer_networks(world, policy, rule.peers)
    out = []
    if not rule.ports or numeric:
        out.append(AllowRule(peers, _resolve_ports(numeric, None) if rule.ports else None, origin))
    if named:
        # A name means a port of the destination pod: one rule per peer pod.
        for dest in _destination_pods(world, policy, rule.peers):
            ports = _resolve_ports(named, dest)
            addrs = world.addresses(dest)
            if ports and addrs:
                out.append(AllowRule(frozenset(_host_net(ip) for ip in addrs), ports, origin))
    return out


def _destination_pods(world: _World, policy: NetworkPolicy, peers: tuple[Peer, ...]) -> list[PodInfo]:
    if not peers:
        return world.pods
    found: dict[tuple[str, str], PodInfo] = {}
    for peer in peers:
        if peer.ip_block is not None:
            nets = _block_networks(peer)
            candidates = [p for p in world.pods
                          if any(ip in n for ip in world.addresses(p) for n in nets)]
        else:
            candidates = world.peer_pods(peer, policy.namespace)
        for p in candidates:
            found.setdefault(p.key, p)
    return list(found.values())


def _peer_networks(world: _World, policy: NetworkPolicy,
                   peers: tuple[Peer, ...]) -> frozenset[IPNetwork] | None:
    if not peers:
        return None
    if len(peers) == 1 and peers[0].ip_block is None:
        return _selected_networks(world, peers[0], policy.namespace)  # shared: its hash is kept
    nets: set[IPNetwork] = set()
    for peer in peers:
        if peer.ip_block is not None:
            nets.update(_block_networks(peer))
            continue
        nets.update(_selected_networks(world, peer, policy.namespace))
    return frozenset(nets)


def _selected_networks(world: _World, peer: Peer, namespace: str) -> frozenset[IPNetwork]:
    """The addresses of the pods a selector peer picks. Many policies name
    the same peers: each is looked up once, and its set is shared."""
    key = (peer, namespace)
    if key not in world.peer_nets:
        world.peer_nets[key] = frozenset(_host_net(ip) for pod in world.peer_pods(peer, namespace)
                                         for ip in world.addresses(pod))
    return world.peer_nets[key]


def _block_networks(peer: Peer) -> list[IPNetwork]:
    """The CIDR with every except range carved out, as disjoint networks:
    the ranges between the sorted, merged holes, each summarized into the
    fewest CIDRs. One sweep: carving the holes one by one out of the pieces
    left by the ones before cost holes x pieces (2000 /32 holes in a /8
    took 40 s, in which the agent's loop did nothing else)."""
    block = peer.ip_block
    cidr = block.cidr
    out: list[IPNetwork] = []
    start = cidr.network_address  # first address not yet covered or carved
    for hole in ipaddress.collapse_addresses(block.except_):  # every hole is inside cidr (IPBlock)
        if hole.network_address > start:
            out.extend(ipaddress.summarize_address_range(start, hole.network_address - 1))
        if hole.broadcast_address == cidr.broadcast_address:
            return out  # carved to the end (and start + 1 could leave the address space)
        start = hole.broadcast_address + 1
    out.extend(ipaddress.summarize_address_range(start, cidr.broadcast_address))
    return out


@functools.lru_cache(maxsize=1 << 16)
def _host_net(ip: IPAddress) -> IPNetwork:
    # Cached, and from a tuple: every peer pod's address is met once per
    # rule, and ip_network(ip) would print and parse it each time.
    return ipaddress.ip_network((ip, ip.max_prefixlen))


def _resolve_ports(ports: tuple[PolicyPort, ...], dest: PodInfo | None) -> tuple[PortRange, ...] | None:
    """None: any port; () : nothing resolved (every name unknown on dest)."""
    if not ports:
        return None
    out = []
    for p in ports:
        if p.port is None:
            out.append(PortRange(p.protocol, *ANY_PORT))
        elif isinstance(p.port, int):
            out.append(PortRange(p.protocol, p.port, p.end_port or p.port))
        elif dest is not None:
            found = dest.named_ports.get(p.port)
            if found is not None and found[0] == p.protocol:
                out.append(PortRange(p.protocol, found[1], found[1]))
    return tuple(out)


def verdict(compiled: Compiled, src_ip: IPAddress, dst_ip: IPAddress, protocol: str,
            dport: int) -> bool:
    """True if the datapath must let (src -> dst, protocol, dport) through:
    the source pod's egress and the destination pod's ingress both allow it.
    Addresses of no local pod are not policed on their side."""
    src_ip, dst_ip = ipaddress.ip_address(src_ip), ipaddress.ip_address(dst_ip)
    src = compiled.pods.get(compiled.by_ip.get(src_ip))
    dst = compiled.pods.get(compiled.by_ip.get(dst_ip))
    if src is not None and src is dst:
        return True
    if src is not None and src.isolated_egress:
        if not any(r.matches(dst_ip, protocol, dport) for r in src.egress):
            return False
    if dst is not None and dst.isolated_ingress:
        if not any(r.matches(src_ip, protocol, dport) for r in dst.ingress):
            return False
    return True
