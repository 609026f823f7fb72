"""The same N services as a kubectl YAML file, a kube-proxy iptables-mode
ruleset and a kube-proxy nftables-mode ruleset.

Service i has cluster IP 10.96.0.0 + 1 + i, port 80/TCP, and four endpoints
on port 8080. Only the last service is ever connected to: its endpoints are
the bench servers on 127.0.0.11-14 (worst case for iptables, whose
KUBE-SERVICES chain is a list walked in order). The others get distinct
10.200.x.y endpoints, as in a real cluster, and never see a packet.

The rule layouts follow kube-proxy (pkg/proxy/iptables and pkg/proxy/nftables):
chain names are hashes of the service port name, rules carry its comments,
and the cluster CIDR masquerade and hairpin rules are there, so the kernel
walks what it would walk on a node.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
from dataclasses import dataclass

VIP_BASE = ipaddress.ip_address("10.96.0.0")
SERVICE_CIDR = "10.96.0.0/16"
EP_BASE = ipaddress.ip_address("10.200.0.0")
CLUSTER_CIDR = "10.244.0.0/16"   # the lab's pod addresses: clients there are not masqueraded
BACKENDS = ("127.0.0.11", "127.0.0.12", "127.0.0.13", "127.0.0.14")
SVC_PORT, EP_PORT = 80, 8080
NAMESPACE = "bench"


@dataclass(frozen=True)
class Svc:
    name: str
    vip: str
    endpoints: tuple[str, ...]

    @property
    def port_name(self) -> str:      # kube-proxy's ServicePortName string
        return f"{NAMESPACE}/{self.name}:http"


def services(n: int, target: int | None = None) -> list[Svc]:
    """Services 0..n-1; `target` (default the last) gets the real backends."""
    target = n - 1 if target is None else target
    return [service(i, real=(i == target)) for i in range(n)]


def service(i: int, real: bool = False) -> Svc:
    eps = BACKENDS if real else tuple(str(EP_BASE + 4 * i + k + 1) for k in range(4))
    return Svc(f"svc-{i:05d}", str(VIP_BASE + 1 + i), eps)


def target_vip(n: int) -> str:
    return f"{VIP_BASE + n}:{SVC_PORT}"


# --- kubectl YAML --------------------------------------------------------------

def kube_yaml(svcs: list[Svc]) -> str:
    """Service + EndpointSlice pairs, block style, as `kubectl get -o yaml` prints."""
    docs = []
    for s in svcs:
        eps = "".join(f"- addresses:\n  - {ip}\n  conditions:\n    ready: true\n"
                      for ip in s.endpoints)
        docs.append(
            f"apiVersion: v1\nkind: Service\nmetadata:\n  name: {s.name}\n"
            f"  namespace: {NAMESPACE}\nspec:\n  clusterIP: {s.vip}\n  clusterIPs:\n"
            f"  - {s.vip}\n  ports:\n  - name: http\n    port: {SVC_PORT}\n"
            f"    protocol: TCP\n    targetPort: {EP_PORT}\n  type: ClusterIP\n"
            f"---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n"
            f"metadata:\n  name: {s.name}-abcde\n  namespace: {NAMESPACE}\n  labels:\n"
            f"    kubernetes.io/service-name: {s.name}\naddressType: IPv4\nendpoints:\n{eps}"
            f"ports:\n- name: http\n  port: {EP_PORT}\n  protocol: TCP\n")
    return "---\n".join(docs)


# --- iptables (kube-proxy iptables mode) ---------------------------------------

def _hash(text: str) -> str:
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()[:16]


def _svc_chain(s: Svc) -> str:
    return "KUBE-SVC-" + _hash(s.port_name + "tcp")


def _sep_chain(s: Svc, ep: str) -> str:
    return "KUBE-SEP-" + _hash(s.port_name + "tcp" + f"{ep}:{EP_PORT}")


def _ipt_service_rule(s: Svc) -> str:
    return (f'-A KUBE-SERVICES -d {s.vip}/32 -p tcp -m comment --comment "{s.port_name} cluster IP" '
            f'-m tcp --dport {SVC_PORT} -j {_svc_chain(s)}')


def _ipt_chains(s: Svc, large: bool) -> tuple[list[str], list[str]]:
    """(chain declarations, rules) of one service's KUBE-SVC and KUBE-SEP chains.

    `large`: kube-proxy's "large cluster mode" (over 1000 endpoints), which
    drops the comments from the endpoint rules. KUBE-SERVICES keeps them."""
    svc = _svc_chain(s)
    comment = "" if large else f'-m comment --comment "{s.port_name}" '
    decl, rules = [f":{svc} - [0:0]"], [
        f'-A {svc} ! -s {CLUSTER_CIDR} -d {s.vip}/32 -p tcp -m comment --comment '
        f'"{s.port_name} cluster IP" -m tcp --dport {SVC_PORT} -j KUBE-MARK-MASQ']
    n = len(s.endpoints)
    for i, ep in enumerate(s.endpoints):
        sep = _sep_chain(s, ep)
        decl.append(f":{sep} - [0:0]")
        prob = "" if i == n - 1 else f"-m statistic --mode random --probability {1 / (n - i):.10f} "
        to_ep = "" if large else f'-m comment --comment "{s.port_name} -> {ep}:{EP_PORT}" '
        rules.append(f'-A {svc} {to_ep}{prob}-j {sep}')
        rules += [f'-A {sep} -s {ep}/32 {comment}-j KUBE-MARK-MASQ',
                  f'-A {sep} -p tcp {comment}-m tcp -j DNAT --to-destination {ep}:{EP_PORT}']
    return decl, rules


def _large(svcs: list[Svc]) -> bool:
    return sum(len(s.endpoints) for s in svcs) > 1000  # kube-proxy's largeClusterEndpointsThreshold


_NODEPORTS_RULE = ('-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this '
                   'must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS')


def iptables_restore(svcs: list[Svc]) -> str:
    """A full iptables-restore input: filter and nat tables as kube-proxy writes them."""
    filt = [
        "*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
        ":KUBE-EXTERNAL-SERVICES - [0:0]", ":KUBE-FORWARD - [0:0]", ":KUBE-NODEPORTS - [0:0]",
        ":KUBE-PROXY-FIREWALL - [0:0]", ":KUBE-SERVICES - [0:0]",
        '-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL',
        '-A INPUT -m comment --comment "kubernetes health check service ports" -j KUBE-NODEPORTS',
        '-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES',
        '-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL',
        '-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD',
        '-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL',
        '-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP",
        "COMMIT",
    ]
    decl = [":PREROUTING ACCEPT [0:0]", ":INPUT ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
            ":POSTROUTING ACCEPT [0:0]", ":KUBE-MARK-MASQ - [0:0]", ":KUBE-NODEPORTS - [0:0]",
            ":KUBE-POSTROUTING - [0:0]", ":KUBE-SERVICES - [0:0]"]
    rules = [
        '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING',
        "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000",
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
        "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000",
        # `! -s 127.0.0.0/8` is not kube-proxy's: MASQUERADE of loopback
        # traffic drops SYNs. It never matches the bench's marked traffic anyway.
        '-A KUBE-POSTROUTING ! -s 127.0.0.0/8 -m comment --comment "kubernetes service traffic '
        'requiring SNAT" -j MASQUERADE --random-fully',
    ]
    rules += [_ipt_service_rule(s) for s in svcs] + [_NODEPORTS_RULE]
    large = _large(svcs)
    for s in svcs:
        d, r = _ipt_chains(s, large)
        decl += d
        rules += r
    return "\n".join(filt + ["*nat"] + decl + rules + ["COMMIT"]) + "\n"


def iptables_add_one(svcs: list[Svc], new: Svc) -> str:
    """kube-proxy's partial sync (`iptables-restore --noflush`) adding `new`:
    KUBE-SERVICES is rewritten whole, plus the new service's chains."""
    d, r = _ipt_chains(new, _large(svcs + [new]))
    services_rules = [_ipt_service_rule(s) for s in svcs + [new]] + [_NODEPORTS_RULE]
    return "\n".join(["*nat", ":KUBE-SERVICES - [0:0]"] + d + services_rules + r + ["COMMIT"]) + "\n"


# --- nftables (kube-proxy nftables mode) ---------------------------------------

T = "ip kube-proxy"


def _nft_svc_chain(s: Svc) -> str:
    return f"service-{_hash(s.port_name + 'tcp')[:8]}-{NAMESPACE}/{s.name}/tcp/http"


def _nft_ep_chain(s: Svc, ep: str) -> str:
    return (f"endpoint-{_hash(s.port_name + 'tcp' + ep)[:8]}-{NAMESPACE}/{s.name}/tcp/http"
            f"__{ep}/{EP_PORT}")


def _nft_service(s: Svc) -> list[str]:
    """One service: its chain, its endpoint chains and its map elements, one
    statement per line as kube-proxy's knftables writes them."""
    svc = _nft_svc_chain(s)
    eps = [_nft_ep_chain(s, ep) for ep in s.endpoints]
    out = []
    # The kernel resolves a goto when the rule is added: endpoint chains first.
    for ep, chain in zip(s.endpoints, eps):
        out += [f"add chain {T} {chain}",
                f"add rule {T} {chain} ip saddr {ep} jump mark-for-masquerade",
                f"add rule {T} {chain} meta l4proto tcp dnat to {ep}:{EP_PORT}"]
    out += [f"add chain {T} {svc}",
            f"add rule {T} {svc} ip daddr {s.vip} tcp dport {SVC_PORT} ip saddr != {CLUSTER_CIDR} "
            f"jump mark-for-masquerade",
            f"add rule {T} {svc} numgen random mod {len(eps)} vmap {{ "
            + " , ".join(f"{i} : goto {c}" for i, c in enumerate(eps)) + " }",
            f"add element {T} cluster-ips {{ {s.vip} }}",
            f"add element {T} service-ips {{ {s.vip} . tcp . {SVC_PORT} : goto {svc} }}"]
    return out


def nft_ruleset(svcs: list[Svc]) -> str:
    """kube-proxy's first full sync: table, base chains, maps, then services."""
    base = [
        f'add table {T} {{ comment "rules for kube-proxy" ; }}',
        f"flush table {T}",
        f'add set {T} cluster-ips {{ type ipv4_addr ; comment "Active ClusterIPs" ; }}',
        f"add map {T} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; "
        f'comment "ClusterIP, ExternalIP and LoadBalancer IP traffic" ; }}',
        f"add map {T} no-endpoint-services {{ type ipv4_addr . inet_proto . inet_service : verdict ; }}",
        f"add map {T} firewall-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; }}",
        f"add chain {T} mark-for-masquerade",
        f"add rule {T} mark-for-masquerade mark set mark or 0x4000",
        f"add chain {T} masquerading",
        f"add rule {T} masquerading mark & 0x4000 == 0 return",
        f"add rule {T} masquerading mark set mark xor 0x4000",
        f"add rule {T} masquerading masquerade fully-random",
        f"add chain {T} services",
        f"add rule {T} services ip daddr . meta l4proto . th dport vmap @service-ips",
        f"add chain {T} service-endpoints-check",
        f"add rule {T} service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services",
        f"add chain {T} firewall-check",
        f"add rule {T} firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips",
        f"add chain {T} cluster-ips-check",
        f'add rule {T} cluster-ips-check ip daddr @cluster-ips reject comment "Reject traffic to invalid ports of ClusterIPs"',
        f'add rule {T} cluster-ips-check ip daddr {SERVICE_CIDR} drop comment "Drop traffic to unallocated ClusterIPs"',
        f"add chain {T} filter-input {{ type filter hook input priority -110 ; }}",
        f"add rule {T} filter-input ct state new jump service-endpoints-check",
        f"add chain {T} filter-output {{ type filter hook output priority -110 ; }}",
        f"add rule {T} filter-output ct state new jump service-endpoints-check",
        f"add rule {T} filter-output ct state new jump firewall-check",
        f"add chain {T} filter-output-post-dnat {{ type filter hook output priority -90 ; }}",
        f"add rule {T} filter-output-post-dnat ct state new jump cluster-ips-check",
        f"add chain {T} nat-prerouting {{ type nat hook prerouting priority -100 ; }}",
        f"add rule {T} nat-prerouting jump services",
        f"add chain {T} nat-output {{ type nat hook output priority -100 ; }}",
        f"add rule {T} nat-output jump services",
        f"add chain {T} nat-postrouting {{ type nat hook postrouting priority 100 ; }}",
        f"add rule {T} nat-postrouting jump masquerading",
    ]
    lines = base
    for s in svcs:
        lines += _nft_service(s)
    return "\n".join(lines) + "\n"


def nft_add_one(new: Svc) -> str:
    """kube-proxy's incremental sync adding one service: a small transaction."""
    return "\n".join(_nft_service(new)) + "\n"


# --- NodePorts (issue 12: bench/northsouth.py) ------------------------------------
#
# NodePort Services as kube-proxy lays them out for traffic from outside the
# node (externalTrafficPolicy Cluster): iptables KUBE-SERVICES -> (last rule,
# addrtype LOCAL) KUBE-NODEPORTS -> KUBE-EXT-<hash> (mark for masquerade) ->
# KUBE-SVC-<hash> -> KUBE-SEP-<hash> (DNAT); nftables' service-nodeports
# verdict map (proto . port -> goto external-<hash>) behind `fib daddr type
# local`. Every Service also has its ClusterIP rules, as on a node.

NODE_PORT_BASE = 20000   # 10 000 NodePorts do not fit kube-proxy's default 30000-32767


@dataclass(frozen=True)
class NpSvc:
    """A NodePort Service with one port."""

    name: str
    vip: str
    proto: str                   # "tcp" or "udp"
    port: int
    node_port: int
    target_port: int
    endpoints: tuple[str, ...]
    pname: str = "p"

    @property
    def port_name(self) -> str:  # kube-proxy's ServicePortName string
        return f"{NAMESPACE}/{self.name}:{self.pname}"


def nodeport_services(n: int, targets: list[tuple[str, str, tuple[str, ...], int]]) -> list[NpSvc]:
    """n NodePort Services: decoys with made-up 10.200.x.y endpoints, then the
    targets (name, proto, endpoints, target port) as the last ones (the end
    of every iptables chain walk). Service i has ClusterIP 10.96.0.0 + 1 + i
    and NodePort NODE_PORT_BASE + i."""
    if not 0 < len(targets) <= n:
        raise ValueError(f"{len(targets)} targets for {n} services")
    out = []
    for i in range(n):
        vip, node_port = str(VIP_BASE + 1 + i), NODE_PORT_BASE + i
        k = i - (n - len(targets))
        if k < 0:
            eps = tuple(str(EP_BASE + 4 * i + j + 1) for j in range(4))
            out.append(NpSvc(f"np-{i:05d}", vip, "tcp", SVC_PORT, node_port, EP_PORT, eps))
        else:
            name, proto, eps, target_port = targets[k]
            out.append(NpSvc(name, vip, proto, SVC_PORT, node_port, target_port, tuple(eps)))
    return out


def nodeport_yaml(svcs: list[NpSvc], node_of: dict[str, str]) -> str:
    """type: NodePort Services and their EndpointSlices (with nodeName: the
    endpoint's node from node_of, else a node of its own)."""
    docs = []
    for s in svcs:
        eps = "".join(f"- addresses:\n  - {ip}\n  conditions:\n    ready: true\n"
                      f"  nodeName: {node_of.get(ip, 'node-' + ip.replace('.', '-'))}\n"
                      for ip in s.endpoints)
        proto = s.proto.upper()
        docs.append(
            f"apiVersion: v1\nkind: Service\nmetadata:\n  name: {s.name}\n  namespace: {NAMESPACE}\n"
            f"spec:\n  clusterIP: {s.vip}\n  clusterIPs:\n  - {s.vip}\n  externalTrafficPolicy: Cluster\n"
            f"  ports:\n  - name: {s.pname}\n    port: {s.port}\n    nodePort: {s.node_port}\n"
            f"    protocol: {proto}\n    targetPort: {s.target_port}\n  type: NodePort\n"
            f"---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n"
            f"metadata:\n  name: {s.name}-abcde\n  namespace: {NAMESPACE}\n  labels:\n"
            f"    kubernetes.io/service-name: {s.name}\naddressType: IPv4\nendpoints:\n{eps}"
            f"ports:\n- name: {s.pname}\n  port: {s.target_port}\n  protocol: {proto}\n")
    return "---\n".join(docs)


def _np_hash(s: NpSvc) -> str:
    return _hash(s.port_name + s.proto)  # kube-proxy: servicePortName + protocol


def _np_sep_chain(s: NpSvc, ep: str) -> str:
    return "KUBE-SEP-" + _hash(s.port_name + s.proto + f"{ep}:{s.target_port}")


def _np_ipt_service_rule(s: NpSvc) -> str:
    return (f'-A KUBE-SERVICES -m comment --comment "{s.port_name} cluster IP" -m {s.proto} -p {s.proto} '
            f'-d {s.vip}/32 --dport {s.port} -j KUBE-SVC-{_np_hash(s)}')


def _np_ipt_chains(s: NpSvc, large: bool) -> tuple[list[str], list[str], list[str]]:
    """(chain declarations, its KUBE-NODEPORTS rule, its chains' rules)."""
    h, p = _np_hash(s), s.proto
    svc, ext = f"KUBE-SVC-{h}", f"KUBE-EXT-{h}"
    comment = "" if large else f'-m comment --comment "{s.port_name}" '
    decl = [f":{svc} - [0:0]", f":{ext} - [0:0]"]
    nodeport = [f'-A KUBE-NODEPORTS -m comment --comment "{s.port_name}" -m {p} -p {p} '
                f'--dport {s.node_port} -j {ext}']
    rules = [f'-A {ext} -m comment --comment "masquerade traffic for {s.port_name} external destinations" '
             f'-j KUBE-MARK-MASQ',
             f"-A {ext} -j {svc}",
             f'-A {svc} ! -s {CLUSTER_CIDR} -d {s.vip}/32 -p {p} -m comment --comment '
             f'"{s.port_name} cluster IP" -m {p} --dport {s.port} -j KUBE-MARK-MASQ']
    n = len(s.endpoints)
    for i, ep in enumerate(s.endpoints):
        sep = _np_sep_chain(s, ep)
        decl.append(f":{sep} - [0:0]")
        prob = "" if i == n - 1 else f"-m statistic --mode random --probability {1 / (n - i):.10f} "
        to_ep = "" if large else f'-m comment --comment "{s.port_name} -> {ep}:{s.target_port}" '
        rules.append(f"-A {svc} {to_ep}{prob}-j {sep}")
        rules += [f"-A {sep} -s {ep}/32 {comment}-j KUBE-MARK-MASQ",
                  f"-A {sep} -p {p} {comment}-m {p} -j DNAT --to-destination {ep}:{s.target_port}"]
    return decl, nodeport, rules


def iptables_nodeport_restore(svcs: list[NpSvc]) -> str:
    """A full iptables-restore input (filter and nat) for NodePort Services,
    as kube-proxy's iptables mode writes it."""
    filt = [
        "*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
        ":KUBE-EXTERNAL-SERVICES - [0:0]", ":KUBE-FORWARD - [0:0]", ":KUBE-NODEPORTS - [0:0]",
        ":KUBE-PROXY-FIREWALL - [0:0]", ":KUBE-SERVICES - [0:0]",
        '-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL',
        '-A INPUT -m comment --comment "kubernetes health check service ports" -j KUBE-NODEPORTS',
        '-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES',
        '-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL',
        '-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD',
        '-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES',
        '-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL',
        '-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP",
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT',
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack '
        '--ctstate RELATED,ESTABLISHED -j ACCEPT',
        "COMMIT",
    ]
    decl = [":PREROUTING ACCEPT [0:0]", ":INPUT ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
            ":POSTROUTING ACCEPT [0:0]", ":KUBE-MARK-MASQ - [0:0]", ":KUBE-NODEPORTS - [0:0]",
            ":KUBE-POSTROUTING - [0:0]", ":KUBE-SERVICES - [0:0]"]
    rules = [
        '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING',
        "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000",
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
        "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000",
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" '
        '-j MASQUERADE --random-fully',
    ]
    rules += [_np_ipt_service_rule(s) for s in svcs] + [_NODEPORTS_RULE]
    large = sum(len(s.endpoints) for s in svcs) > 1000
    chains, nodeports = [], []
    for s in svcs:
        d, np, r = _np_ipt_chains(s, large)
        decl += d
        nodeports += np
        chains += r
    return "\n".join(filt + ["*nat"] + decl + rules + nodeports + chains + ["COMMIT"]) + "\n"


def iptables_flush() -> str:
    """iptables-restore input that empties kube-proxy's tables again
    (restore without --noflush replaces each table it names)."""
    return "*filter\nCOMMIT\n*nat\nCOMMIT\n"


def _np_nft_names(s: NpSvc) -> tuple[str, str]:
    tail = f"{NAMESPACE}/{s.name}/{s.proto}/{s.pname}"
    h = _np_hash(s)[:8]
    return f"service-{h}-{tail}", f"external-{h}-{tail}"


def _np_nft_ep_chain(s: NpSvc, ep: str) -> str:
    tail = f"{NAMESPACE}/{s.name}/{s.proto}/{s.pname}"
    return f"endpoint-{_hash(s.port_name + s.proto + ep)[:8]}-{tail}__{ep}/{s.target_port}"


def _np_nft_service(s: NpSvc) -> list[str]:
    """One NodePort Service: endpoint chains, service chain, external chain,
    then its elements (a goto must name a chain that exists)."""
    svc, ext = _np_nft_names(s)
    eps = [_np_nft_ep_chain(s, ep) for ep in s.endpoints]
    out = []
    for ep, chain in zip(s.endpoints, eps):
        out += [f"add chain {T} {chain}",
                f"add rule {T} {chain} ip saddr {ep} jump mark-for-masquerade",
                f"add rule {T} {chain} meta l4proto {s.proto} dnat to {ep}:{s.target_port}"]
    out += [f"add chain {T} {svc}",
            f"add rule {T} {svc} ip daddr {s.vip} {s.proto} dport {s.port} ip saddr != {CLUSTER_CIDR} "
            f"jump mark-for-masquerade",
            f"add rule {T} {svc} numgen random mod {len(eps)} vmap {{ "
            + " , ".join(f"{i} : goto {c}" for i, c in enumerate(eps)) + " }",
            f"add chain {T} {ext}",
            f'add rule {T} {ext} jump mark-for-masquerade comment "masquerade traffic from outside the cluster"',
            f"add rule {T} {ext} goto {svc}",
            f"add element {T} cluster-ips {{ {s.vip} }}",
            f"add element {T} service-ips {{ {s.vip} . {s.proto} . {s.port} : goto {svc} }}",
            f"add element {T} service-nodeports {{ {s.proto} . {s.node_port} : goto {ext} }}"]
    return out


NFT_NODEPORT_BASE = [
    f'add map {T} service-nodeports {{ type inet_proto . inet_service : verdict ; comment "NodePort traffic" ; }}',
    f"add map {T} no-endpoint-nodeports {{ type inet_proto . inet_service : verdict ; }}",
    f"add rule {T} services fib daddr type local ip daddr != 127.0.0.0/8 "
    f"meta l4proto . th dport vmap @service-nodeports",
    f"add chain {T} nodeport-endpoints-check",
    f"add rule {T} nodeport-endpoints-check fib daddr type local ip daddr != 127.0.0.0/8 "
    f"meta l4proto . th dport vmap @no-endpoint-nodeports",
    f"add rule {T} filter-input ct state new jump nodeport-endpoints-check",
    f"add chain {T} filter-prerouting {{ type filter hook prerouting priority -110 ; }}",
    f"add rule {T} filter-prerouting ct state new jump firewall-check",
    f"add chain {T} filter-forward {{ type filter hook forward priority -110 ; }}",
    f"add rule {T} filter-forward ct state new jump service-endpoints-check",
    f"add rule {T} filter-forward ct state new jump cluster-ips-check",
]


def nft_nodeport_ruleset(svcs: list[NpSvc]) -> str:
    """kube-proxy's nftables mode, first full sync, for NodePort Services."""
    lines = nft_ruleset([]).splitlines() + NFT_NODEPORT_BASE
    for s in svcs:
        lines += _np_nft_service(s)
    return "\n".join(lines) + "\n"


def nft_delete() -> str:
    return f"delete table {T}\n"
