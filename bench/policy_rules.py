"""NetworkPolicy -> iptables + ipset and nftables rules, for the benchmark only.

The baselines of bench/policy.py enforce the same NetworkPolicy objects
meshbpf reads, laid out as the iptables-based enforcers lay them out
(kube-router, Calico's iptables mode, kube-network-policies):

    FORWARD -> KUBE-ROUTER-FORWARD
        conntrack RELATED,ESTABLISHED  -> ACCEPT     (only new flows are checked)
        -d <local pod IP>              -> KUBE-POD-FW-<pod>   (pods isolated for ingress)
        -s <local pod IP>              -> KUBE-POD-FW-<pod>   (pods isolated for egress)
    KUBE-POD-FW-<pod>: clear the mark, jump to each policy chain that selects
        the pod in that direction, drop unless a policy set the mark
    KUBE-NWPLCY-<policy>: per rule and port,
        -m set --match-set KUBE-SRC-<rule> src -p tcp --dport P -j MARK 0x10000
    ipsets: one hash:ip per rule of the IPs of its selector peers (every
        matching pod of the cluster), one hash:net per rule of its ipBlocks
        (except ranges as `nomatch` entries).

nftables: the same chains in one `inet` table, the pod dispatch as verdict
maps (pod IP -> jump its chain) and the ipsets as named sets (ipBlock except
ranges carved out, since interval sets have no `nomatch`).

Only what the benchmark needs: IPv4, numeric ports (and endPort ranges,
protocol-only ports). A named port is refused with one line naming it.
Semantics that meshbpf adds and these layouts leave out (a pod reaching
itself, the node's own addresses) do not occur in the benchmark's traffic.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass, field

from meshbpf.policy.model import NamespaceInfo, NetworkPolicy, Peer, PodInfo, PolicyPort, Rule
from meshbpf.sources.kube_objects import SourceObject
from meshbpf.sources.kube_policy import read_policy_objects

MARK = "0x10000/0x10000"
DIRECTIONS = ("Ingress", "Egress")


class TranslateError(ValueError):
    pass


def short_hash(*parts: str) -> str:
    """kube-router names its chains and sets by a hash (16 base32-ish chars)."""
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16].upper()


@dataclass
class RuleSets:
    """The ipsets one rule's peers become; None means "any peer"."""
    ips: str | None = None      # hash:ip set name
    nets: str | None = None     # hash:net set name
    anyone: bool = False


@dataclass
class Layout:
    """What both translators print: sets, per-policy chains, per-pod chains."""
    ip_sets: dict[str, list[str]] = field(default_factory=dict)                     # name -> IPs
    net_sets: dict[str, tuple[list[str], list[str]]] = field(default_factory=dict)  # name -> (cidrs, excepts)
    # chain -> (direction, [(peers, port match)])
    policy_chains: dict[str, tuple[str, list[tuple[RuleSets, str]]]] = field(default_factory=dict)
    pod_chains: dict[tuple[str, str], tuple[str, list[str]]] = field(default_factory=dict)  # (dir, ip) -> (chain, policy chains)


def read(objects: list[dict]):
    inputs = read_policy_objects([SourceObject(o, f"object {i}") for i, o in enumerate(objects)])
    if inputs.problems:
        raise TranslateError(f"bad benchmark objects: {inputs.problems[0]}")
    return inputs


def layout(objects: list[dict], node_name: str) -> Layout:
    inputs = read(objects)
    world = _World(inputs.pods, inputs.namespaces)
    out = Layout()
    local = [p for p in world.pods if p.node_name == node_name and not p.host_network and _ipv4(p)]
    for policy in sorted(inputs.policies, key=lambda p: (p.namespace, p.name)):
        selected = [p for p in local if p.namespace == policy.namespace and policy.pod_selector.matches(p.labels)]
        for direction in DIRECTIONS:
            if direction not in policy.policy_types:
                continue
            rules = policy.ingress if direction == "Ingress" else policy.egress
            chain = f"KUBE-NWPLCY-{short_hash(policy.namespace, policy.name, direction)}"
            out.policy_chains[chain] = (direction, _policy_chain(world, out, policy, direction, rules))
            for pod in selected:
                key = (direction, _ipv4(pod))
                pod_chain = f"KUBE-POD-FW-{short_hash(pod.namespace, pod.name, direction)}"
                out.pod_chains.setdefault(key, (pod_chain, []))[1].append(chain)
    return out


class _World:
    def __init__(self, pods: list[PodInfo], namespaces: list[NamespaceInfo]):
        self.pods = [p for p in pods if not p.host_network]
        self.ns_labels = {n.name: n.labels for n in namespaces}
        self.by_ns: dict[str, list[PodInfo]] = {}
        for p in self.pods:
            self.by_ns.setdefault(p.namespace, []).append(p)

    def peer_ips(self, peer: Peer, namespace: str) -> list[str]:
        if peer.namespace_selector is None:
            spaces = [namespace]
        else:
            spaces = [ns for ns in self.by_ns if peer.namespace_selector.matches(self.ns_labels.get(ns, {}))]
        return [_ipv4(pod) for ns in spaces for pod in self.by_ns.get(ns, ())
                if (peer.pod_selector is None or peer.pod_selector.matches(pod.labels)) and _ipv4(pod)]


def _ipv4(pod: PodInfo) -> str | None:
    return next((str(ip) for ip in pod.ips if ip.version == 4), None)


def _policy_chain(world: _World, out: Layout, policy: NetworkPolicy, direction: str,
                  rules: tuple[Rule, ...]) -> list[tuple[RuleSets, str]]:
    lines = []
    for index, rule in enumerate(rules):
        sets = _rule_sets(world, out, policy, direction, index, rule)
        for port in rule.ports or (None,):
            lines.append((sets, _port_match(policy, port)))
    return lines


def _rule_sets(world: _World, out: Layout, policy: NetworkPolicy, direction: str, index: int,
               rule: Rule) -> RuleSets:
    if not rule.peers:
        return RuleSets(anyone=True)
    sets = RuleSets()
    ips = sorted({ip for peer in rule.peers if peer.ip_block is None
                  for ip in world.peer_ips(peer, policy.namespace)}, key=ipaddress.ip_address)
    blocks = [p.ip_block for p in rule.peers if p.ip_block is not None and p.ip_block.cidr.version == 4]
    tag = "SRC" if direction == "Ingress" else "DST"
    if any(p.ip_block is None for p in rule.peers):
        sets.ips = f"KUBE-{tag}-{short_hash(policy.namespace, policy.name, direction, str(index))}"
        out.ip_sets[sets.ips] = ips
    if blocks:
        sets.nets = f"KUBE-{tag}N-{short_hash(policy.namespace, policy.name, direction, str(index))}"
        out.net_sets[sets.nets] = ([str(b.cidr) for b in blocks],
                                   [str(e) for b in blocks for e in b.except_ if e.version == 4])
    return sets


def _port_match(policy: NetworkPolicy, port: PolicyPort | None) -> str:
    """'tcp 80', 'tcp 80:90', 'tcp' (every port) or '' (every protocol)."""
    if port is None:
        return ""
    if isinstance(port.port, str):
        raise TranslateError(f"NetworkPolicy {policy.namespace}/{policy.name}: named port "
                             f"{port.port!r} is not supported by the benchmark translator")
    proto = port.protocol.lower()
    if port.port is None:
        return proto
    return f"{proto} {port.port}" + (f":{port.end_port}" if port.end_port else "")


# --- iptables + ipset -------------------------------------------------------

def ipset_restore(lay: Layout) -> str:
    """For `ipset restore -exist`: a set that exists already is emptied and
    refilled (a full sync, as after a policy edit)."""
    lines = []
    for name, ips in lay.ip_sets.items():
        lines += [f"create {name} hash:ip family inet hashsize 1024 maxelem 65536", f"flush {name}"]
        lines += [f"add {name} {ip}" for ip in ips]
    for name, (cidrs, excepts) in lay.net_sets.items():
        lines += [f"create {name} hash:net family inet hashsize 1024 maxelem 65536", f"flush {name}"]
        lines += [f"add {name} {c}" for c in cidrs]
        lines += [f"add {name} {e} nomatch" for e in excepts]
    return "\n".join(lines) + "\n"


def _iptables_match(sets: RuleSets, flag: str, port: str) -> list[str]:
    """One iptables rule body per set of the rule (an IP set and a net set are two rules)."""
    ports = ""
    if port:
        proto, _, number = port.partition(" ")
        ports = f" -p {proto}" + (f" -m {proto} --dport {number}" if number else "")
    if sets.anyone:
        return [ports.strip()]
    return [f"-m set --match-set {name} {flag}{ports}" for name in (sets.ips, sets.nets) if name]


def iptables_restore(lay: Layout) -> str:
    chains = ["KUBE-ROUTER-FORWARD", *lay.policy_chains, *(c for c, _ in lay.pod_chains.values())]
    lines = ["*filter", *(f":{c} - [0:0]" for c in chains),
             "-A FORWARD -m comment --comment \"kube-router netpol\" -j KUBE-ROUTER-FORWARD",
             "-A KUBE-ROUTER-FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
             "-A KUBE-ROUTER-FORWARD -m conntrack --ctstate INVALID -j DROP"]
    for (direction, ip), (chain, _) in sorted(lay.pod_chains.items()):
        side = "-d" if direction == "Ingress" else "-s"
        lines.append(f"-A KUBE-ROUTER-FORWARD {side} {ip}/32 -j {chain}")
    for (direction, ip), (chain, policies) in sorted(lay.pod_chains.items()):
        lines.append(f"-A {chain} -j MARK --set-xmark 0x0/0x10000")
        lines += [f"-A {chain} -j {p}" for p in policies]
        lines.append(f"-A {chain} -m comment --comment \"default deny {direction.lower()} {ip}\" "
                     f"-m mark ! --mark {MARK} -j DROP")
    for chain, (direction, rules) in lay.policy_chains.items():
        flag = "src" if direction == "Ingress" else "dst"
        for sets, port in rules:
            for body in _iptables_match(sets, flag, port):
                lines.append(f"-A {chain} {body} -j MARK --set-xmark {MARK}".replace("  ", " "))
                lines.append(f"-A {chain} -m mark --mark {MARK} -j RETURN")
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def iptables_flush() -> str:
    """What takes the baseline out again (with `ipset destroy`)."""
    return "*filter\n:FORWARD ACCEPT [0:0]\n-F\n-X\nCOMMIT\n"


# --- nftables ---------------------------------------------------------------

TABLE = "mbbench"


def _nft_name(name: str) -> str:
    return name.lower().replace("-", "_")


def _carve(cidrs: list[str], excepts: list[str]) -> list[str]:
    """cidrs minus excepts, as networks (nft interval sets have no nomatch)."""
    nets = [ipaddress.ip_network(c) for c in cidrs]
    for e in map(ipaddress.ip_network, excepts):
        nets = [piece for n in nets
                for piece in ((n.address_exclude(e) if e.subnet_of(n) else [n]) if not n.subnet_of(e) else [])]
    return [str(n) for n in ipaddress.collapse_addresses(nets)]


def _nft_port(port: str) -> str:
    if not port:
        return ""
    proto, _, number = port.partition(" ")
    if not number:
        return f"meta l4proto {proto}"
    return f"{proto} dport {number.replace(':', '-')}"


def nft_script(lay: Layout) -> str:
    lines = [f"table inet {TABLE}", f"delete table inet {TABLE}", f"table inet {TABLE} {{"]
    for name, ips in lay.ip_sets.items():
        elements = f" elements = {{ {', '.join(ips)} }};" if ips else ""
        lines.append(f"  set {_nft_name(name)} {{ type ipv4_addr;{elements} }}")
    for name, (cidrs, excepts) in lay.net_sets.items():
        nets = _carve(cidrs, excepts)
        elements = f" elements = {{ {', '.join(nets)} }};" if nets else ""
        lines.append(f"  set {_nft_name(name)} {{ type ipv4_addr; flags interval;{elements} }}")
    for chain, (direction, rules) in lay.policy_chains.items():
        side = "saddr" if direction == "Ingress" else "daddr"
        body = []
        for sets, port in rules:
            matches = [""] if sets.anyone else [f"ip {side} @{_nft_name(n)}" for n in (sets.ips, sets.nets) if n]
            for m in matches:
                body.append(" ".join(x for x in (m, _nft_port(port), "meta mark set meta mark | 0x10000 return") if x))
        lines.append(f"  chain {_nft_name(chain)} {{" + "".join(f"\n    {b}" for b in body) + "\n  }")
    for (direction, ip), (chain, policies) in sorted(lay.pod_chains.items()):
        body = ["meta mark set meta mark & 0xfffeffff", *(f"jump {_nft_name(p)}" for p in policies),
                "meta mark & 0x10000 == 0 drop"]
        lines.append(f"  chain {_nft_name(chain)} {{" + "".join(f"\n    {b}" for b in body) + "\n  }")
    for direction, side in (("Ingress", "daddr"), ("Egress", "saddr")):
        entries = [f"{ip} : jump {_nft_name(c)}" for (d, ip), (c, _) in sorted(lay.pod_chains.items()) if d == direction]
        elements = f" elements = {{ {', '.join(entries)} }};" if entries else ""
        lines.append(f"  map pods_{direction.lower()} {{ type ipv4_addr : verdict;{elements} }}")
    lines += ["  chain forward {", "    type filter hook forward priority filter; policy accept;",
              "    ct state established,related accept", "    ct state invalid drop",
              "    ip daddr vmap @pods_ingress", "    ip saddr vmap @pods_egress", "  }", "}"]
    return "\n".join(lines) + "\n"


def nft_flush() -> str:
    return f"table inet {TABLE}\ndelete table inet {TABLE}\n"
