"""kube-proxy's packet-flow tables (issue 12), ported as facts to the 2-node lab.

Source: kubernetes/kubernetes pkg/proxy/nftables/proxier_test.go and
pkg/proxy/iptables/proxier_test.go, every `packetFlowTest` (source, protocol,
destination in; backends "ip:port, ...", "DROP", "REJECT" or "" (no rule
matched) out, and whether kube-proxy masquerades) with the Services and
EndpointSlices its test function sets up. Only the facts are taken; each
Setup names its upstream test function and each Flow its upstream case name.

Where the upstream addresses went (the lab of meshbpf/lab/netlab.py, 2 nodes):

    upstream                              lab
    test-node (the proxier's own node)    node1 (ext0 10.243.0.11, fd00:243::11)
    endpoint with NodeName test-node      pods a1..a4 on node1 (10.244.0.2..5)
    endpoint on another node / no node    pods b1..b4 on node2 (10.244.1.2..5)
    pod client 10.0.0.2 / 10.180.0.2      pod client1 on node1 (10.244.0.6), not an endpoint
    ClusterIPs 172.30.0.N, 172.30.1.1     10.96.0.N, 10.96.1.1 (fd00:172:30::41 -> fd00:96::41)
    external IPs 192.168.99.N             10.240.0.N
    LB IPs 1.2.3.4, 5.6.7.8, 9.10.11.12   10.240.0.104, 10.240.0.108, 10.240.0.112
    external client 203.0.113.2           the router, 10.243.0.1 (fd00:243::1)
    blocked client 203.0.113.130          the router's second address 10.243.0.130
    LB source range 203.0.113.0/25        10.243.0.0/29 (the router's .1, not .130)
    node range 192.168.0.0/24             10.243.0.8/29 (the nodes' .11, .12)
    nodePorts 3001, 3002, 3003            30001, 30002, 30003 (inside the default range)
    healthCheckNodePort 3000N             3200N (away from the nodePorts)
    endpoint / target ports               as upstream (80, 8443, 5353, UDP 53)

Where "this node" matters (externalTrafficPolicy: Local), the Setup's `pinned`
addresses are routed by the router to node1 only (as a load balancer that
follows the health check would); everything else goes over the router's ECMP
to both nodes, so both agents translate.

`masq` is kube-proxy's. meshbpf masquerades (SNAT to the receiving node's
address) only when the backend is on another node and the policy is Cluster;
a backend on the receiving node sees the client's own address, and the
socket-LB (pod clients) never rewrites the source. The kernel test checks
that rule against `masq`, see tests/kernel/test_northsouth_flows.py.

Cases that do not apply carry `skip` (why). Cases where meshbpf answers
differently on purpose carry `ours` (its answer) and `why`. Cases meshbpf
does not pass yet carry `gap` (what it does instead); the kernel test reports
them and fails when one starts passing, so the mark goes with the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# --- the lab ------------------------------------------------------------------
NODE1_PODS = ["a1", "a2", "a3", "a4", "client1"]   # 10.244.0.2 .. .6
NODE2_PODS = ["b1", "b2", "b3", "b4", "client2"]   # 10.244.1.2 .. .6
BACKENDS = ["a1", "a2", "a3", "a4", "b1", "b2", "b3", "b4"]
NODES = {"node1": ("10.243.0.11", "fd00:243::11"), "node2": ("10.243.0.12", "fd00:243::12")}
ROUTER4, ROUTER6, BLOCKED4 = "10.243.0.1", "fd00:243::1", "10.243.0.130"
CLIENTS = ("router", "blocked", "client1", "node1")  # router's two addresses, a pod, the host

A1, A2, A3, A4, CLIENT1 = (f"10.244.0.{i}" for i in range(2, 7))
B1, B2, B3, B4 = (f"10.244.1.{i}" for i in range(2, 6))
A1_6, B1_6 = "fd00:244::2", "fd00:244:0:1::2"
NODE1 = NODES["node1"][0]
LB1, LB2, LB3 = "10.240.0.104", "10.240.0.108", "10.240.0.112"

# Why whole groups of upstream cases do not apply.
SNAT_TO_LB = ("a packet from the node whose source is the LB IP itself (something on the node SNATed "
              "it so): the lab's nodes do not hold the LB IPs, and no process of theirs sends from one")
NO_MASQ = ("the socket-LB short-circuits a pod's connect() to a NodePort/LB/external IP in the "
           "node, as kube-proxy does, by rewriting the connect() itself: no NAT on the wire, the "
           "backend sees the pod's own address")
SOCKET_REFUSES = ("the socket-LB refuses the pod's connect() at once (ECONNREFUSED), as for a "
                  "ClusterIP with no endpoints: the packet never reaches the north-south programs")
ALT_NODE_IP = "the lab's nodes have one address per family on ext0 (no --nodeport-addresses choice)"
LOCALHOST = ("meshbpf serves no NodePort on 127.0.0.1 or ::1, as kube-proxy's nftables mode (its iptables "
             "mode serves 127.0.0.1 only, with route_localnet): the socket-LB holds the node's device "
             "addresses, not loopback, and nothing listens there, so the node's stack refuses (RST)")
SCTP = "meshbpf skips SCTP ports"
NO_ROUTE = ("meshbpf passes a packet that matches no frontend untouched: no REJECT for a ClusterIP "
            "port that no Service has, no DROP for an unallocated ClusterIP. From a pod the socket-LB "
            "leaves the address; the packet loops between the lab's router and nodes until its TTL "
            "runs out: a TCP client gets ICMP time exceeded (EHOSTUNREACH, so REJECT here, not "
            "meshbpf's) or nothing when the kernel rate-limits the ICMP (seen on 5.10), a UDP "
            "client no answer; the test takes either as no answer")


@dataclass(frozen=True)
class Flow:
    case: str              # upstream packetFlowTest name
    client: str            # one of CLIENTS
    dest: str
    port: int
    output: str            # kube-proxy's: "ip:port, ..." | "DROP" | "REJECT" | "" | "ACCEPT"
    masq: bool = False     # kube-proxy's
    protocol: str = "TCP"
    skip: str = ""         # why it does not apply
    ours: str | None = None  # meshbpf's answer where it differs on purpose ...
    why: str = ""            # ... and why
    gap: str = ""            # a known gap: meshbpf does not answer as expected yet (what it does)

    @property
    def expected(self) -> str:
        return self.output if self.ours is None else self.ours


@dataclass(frozen=True)
class Setup:
    name: str                      # "<upstream test function>[/<subtest>]"
    files: tuple[str, ...]         # which upstream files hold it: "nftables", "iptables"
    objects: list[dict]
    flows: list[Flow]
    pinned: tuple[str, ...] = ()   # routed to node1 only
    node_names: dict[str, str] = field(default_factory=dict)


# --- kubectl-shaped objects -----------------------------------------------------
def _port(name, port, target=None, protocol="TCP", node_port=None) -> dict:
    p = {"name": name, "protocol": protocol, "port": port, "targetPort": target or port}
    if node_port:
        p["nodePort"] = node_port
    return p


def service(name, cluster_ip, ports, *, type_="ClusterIP", etp=None, itp=None, external_ips=(),
            lb_ips=(), hc_port=None, source_ranges=(), affinity=None, family="IPv4") -> dict:
    spec = {"type": type_, "clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
            "ipFamilies": [family], "ports": ports}
    if etp:
        spec["externalTrafficPolicy"] = etp
    if itp:
        spec["internalTrafficPolicy"] = itp
    if external_ips:
        spec["externalIPs"] = list(external_ips)
    if hc_port:
        spec["healthCheckNodePort"] = hc_port
    if source_ranges:
        spec["loadBalancerSourceRanges"] = list(source_ranges)
    if affinity:
        spec["sessionAffinity"] = "ClientIP"
        spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": affinity}}
    obj = {"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "namespace": "ns1"}, "spec": spec}
    if lb_ips:
        obj["status"] = {"loadBalancer": {"ingress": [{"ip": ip} for ip in lb_ips]}}
    return obj


def ep(address: str, ready=True, serving=None, terminating=None) -> dict:
    """An endpoint; its node is the pod's (a* node1, b* node2)."""
    cond = {"ready": ready}
    if serving is not None:
        cond["serving"] = serving
    if terminating is not None:
        cond["terminating"] = terminating
    node = "node1" if address.startswith(("10.244.0.", "fd00:244::")) else "node2"
    return {"addresses": [address], "conditions": cond, "nodeName": node}


def slice_(service_name, endpoints, ports, family="IPv4") -> dict:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{service_name}-1", "namespace": "ns1",
                         "labels": {"kubernetes.io/service-name": service_name}},
            "addressType": family, "endpoints": endpoints,
            "ports": [{"name": n, "protocol": proto, "port": p} for n, p, proto in ports]}


def both(*addrs: str, port: int = 80) -> str:
    return ", ".join(f"[{a}]:{port}" if ":" in a else f"{a}:{port}" for a in addrs)


P80 = [("p80", 80, "TCP")]

# --- the tables -------------------------------------------------------------------
SETUPS: list[Setup] = []


def _no_endpoints_reject() -> None:
    # TestNoEndpointsReject (nftables, iptables): LoadBalancer, no EndpointSlice at all.
    svc = service("svc1", "10.96.0.41", [_port("p80", 80, node_port=30001)], type_="LoadBalancer",
                  external_ips=["10.240.0.11"], lb_ips=[LB1])
    SETUPS.append(Setup("TestNoEndpointsReject", ("nftables", "iptables"), [svc], [
        Flow("pod to cluster IP with no endpoints", "client1", "10.96.0.41", 80, "REJECT"),
        Flow("external to external IP with no endpoints", "router", "10.240.0.11", 80, "REJECT"),
        Flow("pod to NodePort with no endpoints", "client1", NODE1, 30001, "REJECT"),
        Flow("external to NodePort with no endpoints", "router", NODE1, 30001, "REJECT"),
        Flow("pod to LoadBalancer IP with no endpoints", "client1", LB1, 80, "REJECT", ours="REJECT",
             why=SOCKET_REFUSES),
        Flow("external to LoadBalancer IP with no endpoints", "router", LB1, 80, "REJECT"),
    ]))


def _cluster_ip_general() -> None:
    # TestClusterIPGeneral (nftables, iptables). Pod clients: the socket-LB's path.
    svc1 = service("svc1", "10.96.0.41", [_port("http", 80)])
    svc2 = service("svc2", "10.96.0.42", [
        _port("http", 80), _port("https", 443, 8443), _port("dns-udp", 53, protocol="UDP"),
        _port("dns-tcp", 53, 5353), _port("dns-sctp", 53, protocol="SCTP")])
    s1 = slice_("svc1", [ep(A1)], [("http", 80, "TCP")])
    s2 = slice_("svc2", [ep(A1), ep(B1)], [("http", 80, "TCP"), ("https", 8443, "TCP"),
                                           ("dns-udp", 53, "UDP"), ("dns-tcp", 5353, "TCP")])
    # Upstream's slice also has ("dns-sctp", 53, SCTP). meshbpf skips the Service's SCTP
    # port but then refuses the whole config: "ports[4].name: 'dns-sctp' matches no port
    # of Service ns1/svc2" (found by this port; reported, not fixed here).
    SETUPS.append(Setup("TestClusterIPGeneral", ("nftables", "iptables"), [svc1, svc2, s1, s2], [
        Flow("simple clusterIP", "client1", "10.96.0.41", 80, both(A1)),
        Flow("hairpin to cluster IP", "a1", "10.96.0.41", 80, both(A1), masq=True, ours=both(A1),
             why="the socket-LB rewrites the connect() of the pod itself: no NAT, no masquerade "
                 "needed; the backend sees its own address"),
        Flow("clusterIP with multiple endpoints", "client1", "10.96.0.42", 80, both(A1, B1)),
        Flow("clusterIP with TargetPort", "client1", "10.96.0.42", 443, both(A1, B1, port=8443)),
        Flow("clusterIP with TCP, UDP, and SCTP on same port (TCP)", "client1", "10.96.0.42", 53,
             both(A1, B1, port=5353)),
        Flow("clusterIP with TCP, UDP, and SCTP on same port (UDP)", "client1", "10.96.0.42", 53,
             both(A1, B1, port=53), protocol="UDP"),
        Flow("clusterIP with TCP, UDP, and SCTP on same port (SCTP)", "client1", "10.96.0.42", 53,
             both(A1, B1, port=53), protocol="SCTP", skip=SCTP),
        # nftables: REJECT; iptables: "" (no rule). meshbpf: no frontend, untouched.
        Flow("TCP-only port does not match UDP traffic", "client1", "10.96.0.42", 80, "REJECT",
             protocol="UDP", ours="DROP", why=NO_ROUTE),
        Flow("svc1 does not accept svc2's ports", "client1", "10.96.0.41", 443, "REJECT",
             ours="REJECT", why=NO_ROUTE),
        Flow("packet to unallocated cluster ip", "client1", "10.96.0.50", 80, "DROP",  # nftables only
             ours="REJECT", why=NO_ROUTE),
    ]))


def _load_balancer() -> None:
    # TestLoadBalancer (nftables, iptables): two LB IPs, source ranges (one with the
    # leading blank upstream keeps as a regression test), one endpoint elsewhere.
    svc = service("svc1", "10.96.0.41", [_port("p80", 80, node_port=30001)], type_="LoadBalancer",
                  lb_ips=[LB1, LB2], source_ranges=["10.243.0.8/29", " 10.243.0.0/29"])
    ok = both(B1)
    SETUPS.append(Setup("TestLoadBalancer", ("nftables", "iptables"), [svc, slice_("svc1", [ep(B1)], P80)], [
        Flow("pod to cluster IP", "client1", "10.96.0.41", 80, ok),
        Flow("external to nodePort", "router", NODE1, 30001, ok, masq=True),
        Flow("nodePort bypasses LoadBalancerSourceRanges", "blocked", NODE1, 30001, ok, masq=True),
        Flow("accepted external to LB1", "router", LB1, 80, ok, masq=True),
        Flow("accepted external to LB2", "router", LB2, 80, ok, masq=True),
        Flow("blocked external to LB1", "blocked", LB1, 80, "DROP"),
        Flow("blocked external to LB2", "blocked", LB2, 80, "DROP"),
        # The pod's packet leaves through the router and comes back (no short-circuit: the
        # socket-LB leaves a pod's packet to LB IPs with source ranges to tc, which checks
        # them; the node's, inside the ranges, it translates): its source, a pod address, is
        # outside the ranges either way.
        Flow("pod to LB1 (blocked by LoadBalancerSourceRanges)", "client1", LB1, 80, "DROP"),
        Flow("pod to LB2 (blocked by LoadBalancerSourceRanges)", "client1", LB2, 80, "DROP"),
        Flow("node to LB1 (allowed by LoadBalancerSourceRanges)", "node1", LB1, 80, ok, masq=True),
        Flow("node to LB2 (allowed by LoadBalancerSourceRanges)", "node1", LB2, 80, ok, masq=True),
        Flow("same node to LB1, SNATted to LB1 (implicitly allowed)", "node1", LB1, 80, ok, masq=True,
             skip=SNAT_TO_LB),
        Flow("same node to LB2, SNATted to LB2 (implicitly allowed)", "node1", LB2, 80, ok, masq=True,
             skip=SNAT_TO_LB),
    ]))


def _node_ports() -> None:
    # TestNodePorts (nftables "ipv4"/"ipv6"; iptables' localhost-nodeports cases with meshbpf's answer).
    for family, cip, eps, node, client in (("ipv4", "10.96.0.41", (B1, A1), NODE1, "router"),
                                           ("ipv6", "fd00:96::41", (B1_6, A1_6), NODES["node1"][1], "router")):
        fam = "IPv4" if family == "ipv4" else "IPv6"
        svc = service("svc1", cip, [_port("p80", 80, node_port=30001)], type_="NodePort", family=fam)
        out = both(*eps)
        SETUPS.append(Setup(f"TestNodePorts/{family}", ("nftables", "iptables"),
                            [svc, slice_("svc1", [ep(e) for e in eps], P80, fam)], [
            Flow("pod to cluster IP", "client1", cip, 80, out),
            Flow("external to nodePort", client, node, 30001, out, masq=True),
            Flow("node to nodePort", "node1", node, 30001, out, masq=True),
            Flow("external to nodePort on secondary IP", client, node, 30001, out, masq=True, skip=ALT_NODE_IP),
            # iptables only (--iptables-localhost-nodeports, route_localnet); nftables has no such rule
            Flow("localhost to nodePort gets masqueraded", "node1", "127.0.0.1", 30001, out, masq=True,
                 ours="REJECT", why=LOCALHOST) if family == "ipv4" else
            Flow("localhost to nodePort is ignored", "node1", "::1", 30001, "", ours="REJECT", why=LOCALHOST),
        ]))


def _etp(policy: str) -> None:
    # TestExternalTrafficPolicyLocal / TestExternalTrafficPolicyCluster (nftables, iptables).
    local = policy == "Local"
    svc = service("svc1", "10.96.0.41", [_port("p80", 80, node_port=30001)], type_="LoadBalancer",
                  etp=policy, external_ips=["10.240.0.11"], lb_ips=[LB1],
                  hc_port=32000 if local else None)
    all_, ext = both(B1, A1), both(A1) if local else both(B1, A1)
    masq = not local
    m = "unmasqueraded" if local else "masqueraded"
    hits = "hits only local endpoint, unmasqueraded" if local else "hits both endpoints, masqueraded"
    pod_ext = {} if local else {"ours": all_, "why": NO_MASQ}
    SETUPS.append(Setup(f"TestExternalTrafficPolicy{policy}", ("nftables", "iptables"),
                        [svc, slice_("svc1", [ep(B1), ep(A1)], P80)], [
        Flow("pod to cluster IP hits both endpoints, unmasqueraded", "client1", "10.96.0.41", 80, all_),
        Flow(f"pod to external IP hits both endpoints, {m}", "client1", "10.240.0.11", 80, all_,
             masq=masq, **pod_ext),
        Flow(f"external to external IP {hits}", "router", "10.240.0.11", 80, ext, masq=masq),
        Flow(f"pod to LB IP hits {'only ' if local else ''}both endpoints, {m}", "client1", LB1, 80, all_,
             masq=masq, **pod_ext),
        Flow(f"external to LB IP {hits}", "router", LB1, 80, ext, masq=masq),
        Flow(f"pod to NodePort hits both endpoints, {m}", "client1", NODE1, 30001, all_, masq=masq,
             **pod_ext),
        Flow(f"external to NodePort {hits}", "router", NODE1, 30001, ext, masq=masq),
    ], pinned=("10.240.0.11", LB1) if local else ()))


def _internal_traffic_policy() -> None:
    # TestInternalTrafficPolicy (nftables, iptables): pod clients, the socket-LB's path;
    # upstream's three nodes are two here (node1 and everything else on node2).
    variants = [
        ("internalTrafficPolicy is cluster", "Cluster", [A1, B1, B2], "pod to ClusterIP hits all endpoints",
         both(A1, B1, B2)),
        ("internalTrafficPolicy is local and there is one local endpoint", "Local", [A1, B1, B2],
         "pod to ClusterIP hits only local endpoint", both(A1)),
        ("internalTrafficPolicy is local and there are multiple local endpoints", "Local", [A1, A2, B1],
         "pod to ClusterIP hits all local endpoints", both(A1, A2)),
        ("internalTrafficPolicy is local and there are no local endpoints", "Local", [B1, B2, B3],
         "no endpoints", "DROP"),
    ]
    for sub, itp, eps, case, out in variants:
        svc = service("svc1", "10.96.1.1", [_port("", 80)], itp=itp)
        flow = Flow(case, "client1", "10.96.1.1", 80, out)
        if out == "DROP":
            flow = Flow(case, "client1", "10.96.1.1", 80, out, ours="REJECT",
                        why="the socket-LB refuses a connect() to a Service with no usable endpoint "
                            "for this node at once (ECONNREFUSED), as it does for no endpoints at all")
        SETUPS.append(Setup(f"TestInternalTrafficPolicy/{sub}", ("nftables", "iptables"),
                            [svc, slice_("svc1", [ep(e) for e in eps], [("", 80, "TCP")])], [flow]))
    SETUPS.append(Setup("TestInternalTrafficPolicy/endpoints deleted", ("nftables", "iptables"),
                        [service("svc1", "10.96.1.1", [_port("", 80)], itp="Local")],
                        [Flow("endpoints deleted", "client1", "10.96.1.1", 80, "REJECT")]))


def _terminating(policy: str) -> None:
    # TestTerminatingEndpointsTrafficPolicyLocal / ...Cluster (nftables, iptables).
    # Upstream's Service has no nodePort: the LB IP and the ClusterIP are the frontends.
    local = policy == "Local"
    svc = service("svc1", "10.96.1.1", [_port("", 80)], type_="LoadBalancer", etp=policy,
                  lb_ips=[LB1], hc_port=32000)
    ST = {"ready": False, "serving": True, "terminating": True}
    NS = {"ready": False, "serving": False, "terminating": True}
    R = {"ready": True, "serving": True, "terminating": False}

    def e(addr, cond):
        return ep(addr, **cond)
    if local:  # upstream: .1-.4 on test-node, .5 on node-1
        cases = [
            ("ready endpoints exist", [e(A1, R), e(A2, R), e(A3, ST), e(A4, NS), e(B1, R)],
             both(A1, A2, B1), both(A1, A2)),
            ("only terminating endpoints exist", [e(A2, ST), e(A3, ST), e(A4, NS), e(B1, R)],
             both(B1), both(A2, A3)),
            ("terminating endpoints on remote node", [e(B1, ST)], both(B1), "DROP"),
            ("no usable endpoints on any node", [e(A1, NS), e(B1, NS)], "REJECT", "REJECT"),
        ]
    else:      # upstream: .1, .2 on test-node, .3-.5 on another-node
        cases = [
            ("ready endpoints exist", [e(A1, R), e(A2, R), e(B1, ST), e(B2, NS), e(B3, R)],
             both(A1, A2, B3), both(A1, A2, B3)),
            ("only terminating endpoints exist", [e(A2, ST), e(A3, ST), e(B1, NS), e(B2, ST)],
             both(A2, A3, B2), both(A2, A3, B2)),
            ("terminating endpoints on remote node", [e(B1, ST)], both(B1), both(B1)),
            ("no usable endpoints on any node", [e(A1, NS), e(B1, NS)], "REJECT", "REJECT"),
        ]
    pinned = (LB1,) if local else ()
    gap = ""   # Local with no usable endpoint anywhere rejects, as kube-proxy does
    for sub, eps, to_cip, to_lb in cases:
        SETUPS.append(Setup(f"TestTerminatingEndpointsTrafficPolicy{policy}/{sub}", ("nftables", "iptables"),
                            [svc, slice_("svc1", eps, [("", 80, "TCP")])], [
            Flow("pod to clusterIP", "client1", "10.96.1.1", 80, to_cip),
            Flow("external to LB", "router", LB1, 80, to_lb, masq=not local and to_lb not in ("DROP", "REJECT"),
                 gap=gap if to_lb == "REJECT" else ""),
        ], pinned=pinned))
    SETUPS.append(Setup(f"TestTerminatingEndpointsTrafficPolicy{policy}/endpoints deleted",
                        ("nftables", "iptables"), [svc], [
        Flow("pod to clusterIP after endpoints deleted", "client1", "10.96.1.1", 80, "REJECT"),
        Flow("external to LB after endpoints deleted", "router", LB1, 80, "REJECT", gap=gap),
    ], pinned=pinned))


ITP_CIP = ("meshbpf's ClusterIP frontend for packets from outside the node uses every usable "
           "endpoint (Cluster semantics, the planner's rule); kube-proxy applies "
           "internalTrafficPolicy to them")


def _internal_external_masquerade() -> None:
    # TestInternalExternalMasquerade, case "base" (nftables, iptables). Its other cases
    # ("no LocalTrafficDetector", "masqueradeAll") change kube-proxy flags meshbpf has no
    # counterpart of (it never detects local traffic by CIDR, never masquerades all).
    svc1 = service("svc1", "10.96.0.41", [_port("p80", 80, node_port=30001)], type_="LoadBalancer",
                   hc_port=32001, lb_ips=[LB1])
    svc2 = service("svc2", "10.96.0.42", [_port("p80", 80, node_port=30002)], type_="LoadBalancer",
                   hc_port=32002, etp="Local", lb_ips=[LB2])
    svc3 = service("svc3", "10.96.0.43", [_port("p80", 80, node_port=30003)], type_="LoadBalancer",
                   hc_port=32003, itp="Local", lb_ips=[LB3])
    slices = [slice_("svc1", [ep(A1), ep(B1)], P80), slice_("svc2", [ep(A2), ep(B2)], P80),
              slice_("svc3", [ep(A3), ep(B3)], P80)]
    s1, s2, s3 = both(A1, B1), both(A2, B2), both(A3, B3)
    flows = []
    for n, cip, np_, lb, out in ((1, "10.96.0.41", 30001, LB1, s1), (2, "10.96.0.42", 30002, LB2, s2),
                                 (3, "10.96.0.43", 30003, LB3, s3)):
        tag = {1: "", 2: " with eTP:Local", 3: " with iTP:Local"}[n]
        pod_cip = both(A3) if n == 3 else out

        def pod_ext(out: str) -> dict:  # every endpoint, also under iTP:Local (KUBE-EXT -> KUBE-SVC)
            return {} if n == 2 else {"ours": out, "why": NO_MASQ}
        flows += [
            Flow(f"pod to ClusterIP{tag}", "client1", cip, 80, pod_cip),
            Flow(f"pod to NodePort{tag}", "client1", NODE1, np_, out, masq=n != 2, **pod_ext(out)),
            Flow(f"pod to LB{tag}", "client1", lb, 80, out, masq=n != 2, **pod_ext(out)),
            Flow(f"node to ClusterIP{tag}", "node1", cip, 80, pod_cip, masq=True),
            # upstream sends "node to NodePort with eTP:Local" to 3001 (svc1's port) and expects svc1's endpoints
            Flow(f"node to NodePort{tag}", "node1", NODE1, 30001 if n == 2 else np_,
                 s1 if n == 2 else out, masq=True),
            Flow(f"node to LB{tag}", "node1", lb, 80, out, masq=True),
        ]
        ext_cip = Flow(f"external to ClusterIP{tag}", "router", cip, 80, pod_cip, masq=True)
        if n == 3:
            ext_cip = Flow(f"external to ClusterIP{tag}", "router", cip, 80, pod_cip, masq=True,
                           ours=s3, why=ITP_CIP)
        local_only = both(A2)
        flows += [
            ext_cip,
            Flow(f"external to NodePort{tag}", "router", NODE1, np_, local_only if n == 2 else out, masq=n != 2),
            Flow(f"external to LB{tag}", "router", lb, 80, local_only if n == 2 else out, masq=n != 2),
        ]
    SETUPS.append(Setup("TestInternalExternalMasquerade/base", ("nftables", "iptables"),
                        [svc1, svc2, svc3, *slices], flows, pinned=(LB2,)))


def _overall_rules() -> None:
    # iptables TestRunPacketFlowTests: the tracer's own cases over TestOverallIPTablesRules'
    # Services (the same Services as nftables TestOverallNFTablesRules).
    objs = [
        service("svc1", "10.96.0.41", [_port("p80", 80)]),
        service("svc2", "10.96.0.42", [_port("p80", 80, node_port=30001)], type_="LoadBalancer", etp="Local",
                lb_ips=[LB1], external_ips=["10.240.0.22"], hc_port=32000),
        service("svc3", "10.96.0.43", [_port("p80", 80, node_port=30003)], type_="NodePort"),
        # upstream's port has no nodePort (its fake allocates none; the API server would):
        # meshbpf refuses "spec.ports[0].nodePort: missing", so the lab gives one
        service("svc4", "10.96.0.44", [_port("p80", 80, node_port=30004)], type_="NodePort",
                external_ips=["10.240.0.33"]),
        service("svc5", "10.96.0.45", [_port("p80", 80, node_port=30002)], type_="LoadBalancer", etp="Cluster",
                lb_ips=[LB2], hc_port=32000, source_ranges=[" 10.243.0.0/29"], affinity=10800),
        service("svc6", "10.96.0.46", [_port("p80", 80)]),
        slice_("svc1", [ep(B1)], P80),
        slice_("svc2", [ep(B2)], P80),   # upstream: no NodeName, so not on test-node
        slice_("svc3", [ep(B3)], P80),
        slice_("svc4", [ep(B4), ep(A1)], P80),
        slice_("svc5", [ep(B3)], P80),
    ]
    SETUPS.append(Setup("TestRunPacketFlowTests", ("iptables",), objs, [
        Flow("no match", "client1", A2, 80, ""),   # a pod address: no rule, the pod answers itself
        Flow("single endpoint", "client1", "10.96.0.41", 80, both(B1)),
        Flow("multiple endpoints", "client1", "10.96.0.44", 80, both(B4, A1)),
        Flow("LOCAL, KUBE-MARK-MASQ", "node1", "10.240.0.22", 80, both(B2), masq=True),
        Flow("DROP", "router", "10.240.0.22", 80, "DROP"),
        Flow("ACCEPT (NodePortHealthCheck)", "router", NODE1, 32000, "ACCEPT"),
        Flow("REJECT", "client1", "10.96.0.46", 80, "REJECT"),
    ], pinned=("10.240.0.22",)))


def _health_check_node_port() -> None:
    # iptables TestHealthCheckNodePort: the port is open while the Service exists.
    svc = service("svc1", "10.96.0.42", [_port("p80", 80, node_port=30001)], type_="LoadBalancer",
                  etp="Local", hc_port=32000)
    SETUPS.append(Setup("TestHealthCheckNodePort", ("iptables",), [svc], [
        Flow("firewall accepts HealthCheckNodePort", "router", NODE1, 32000, "ACCEPT"),
    ]))
    SETUPS.append(Setup("TestHealthCheckNodePort/service deleted", ("iptables",), [], [
        Flow("HealthCheckNodePort no longer has any rule", "router", NODE1, 32000, "",
             ours="REJECT", why="nothing listens on the port any more: the node's stack answers RST"),
    ]))


for _build in (_no_endpoints_reject, _cluster_ip_general, _load_balancer, _node_ports,
               lambda: _etp("Local"), lambda: _etp("Cluster"), _internal_traffic_policy,
               lambda: _terminating("Local"), lambda: _terminating("Cluster"),
               _internal_external_masquerade, _overall_rules, _health_check_node_port):
    _build()

# --- host processes: meshbpf's own cases, from kube-proxy's facts ---------------------
# Upstream's tables send from the node itself (`node1` above) to a NodePort, ClusterIPs
# and LB IPs, over TCP and IPv4. These send what they leave out -- external IPs, UDP,
# IPv6, source ranges that leave the node out, no endpoints -- and expect what kube-proxy's
# rules for the output path give (pkg/proxy/nftables/README.md: a host process's packet is
# DNATed in `output` as a pod's is in `prerouting`, with the same service map; the
# LoadBalancerSourceRanges firewall runs in `output` too; the no-endpoint rejects are
# checked in `output`; the eTP:Local short-circuit takes local sources, the node
# included, to every endpoint: "node to LB with eTP:Local" in TestInternalExternalMasquerade,
# "LOCAL, KUBE-MARK-MASQ" in TestRunPacketFlowTests). Not in SETUPS: no upstream test names them.
# Two pod cases sit with them: source ranges that hold node1 but not its pod (dropped, as
# the firewall chain drops the pod's source), and ranges that hold the pod (answered).
HOST_SETUPS: list[Setup] = []
POD_HAIRPIN = ("no answer: the socket-LB leaves a pod's packet to an LB IP with source ranges to tc "
               "(only tc sees its source), so it leaves through ext0 and the router brings it back to "
               "node1, whose tc DNATs it to a1 on the same node without SNAT; a1's reply to the pod is "
               "delivered on node1 and never passes ext0, so mbpf_ns_egress never translates it back "
               "and the client's socket drops it (a datapath gap: bpf/nodeport.c)")
DNS = [("p80", 80, "TCP"), ("dns", 53, "UDP")]
HOST_CASE = "meshbpf: host processes"


def _dns_ports(tcp_node_port: int, udp_node_port: int) -> list[dict]:
    return [_port("p80", 80, node_port=tcp_node_port), _port("dns", 53, protocol="UDP", node_port=udp_node_port)]


def _host_ipv4() -> None:
    LB_IN, LB_POD = "10.240.0.116", "10.240.0.120"
    ext, ext_local, ext_none = "10.240.0.11", "10.240.0.12", "10.240.0.14"
    objs = [
        service("svc1", "10.96.0.41", _dns_ports(30001, 30051), type_="LoadBalancer",
                external_ips=[ext], lb_ips=[LB1]),
        service("svc2", "10.96.0.42", _dns_ports(30002, 30052), type_="LoadBalancer", etp="Local",
                external_ips=[ext_local], lb_ips=[LB2], hc_port=32002),
        # the router's .1 only: the nodes' .11 and .12 are outside
        service("svc3", "10.96.0.43", _dns_ports(30003, 30053), type_="LoadBalancer",
                lb_ips=[LB3], source_ranges=["10.243.0.0/29"]),
        service("svc4", "10.96.0.44", _dns_ports(30004, 30054), type_="LoadBalancer", external_ips=[ext_none]),
        # the nodes' .11 and .12 inside; its one endpoint on node1
        service("svc5", "10.96.0.45", _dns_ports(30005, 30055), type_="LoadBalancer",
                lb_ips=[LB_IN], source_ranges=["10.243.0.8/29"]),
        # node1's pods inside, the nodes outside; its one endpoint on node1
        service("svc9", "10.96.0.49", _dns_ports(30009, 30059), type_="LoadBalancer",
                lb_ips=[LB_POD], source_ranges=["10.244.0.0/24"]),
        slice_("svc1", [ep(A1), ep(B1)], DNS),
        slice_("svc2", [ep(B2)], DNS),     # no endpoint on node1
        slice_("svc3", [ep(B3)], DNS),
        slice_("svc5", [ep(A1)], DNS),
        slice_("svc9", [ep(A1)], DNS),
    ]
    both_dns = both(A1, B1, port=53)
    HOST_SETUPS.append(Setup(f"{HOST_CASE}/ipv4", (), objs, [
        Flow("node to external IP", "node1", ext, 80, both(A1, B1), masq=True),
        Flow("node to external IP (UDP)", "node1", ext, 53, both_dns, masq=True, protocol="UDP"),
        Flow("node to LB", "node1", LB1, 80, both(A1, B1), masq=True),
        Flow("node to LB (UDP)", "node1", LB1, 53, both_dns, masq=True, protocol="UDP"),
        Flow("node to NodePort (UDP)", "node1", NODE1, 30051, both_dns, masq=True, protocol="UDP"),
        Flow("node to external IP with eTP:Local, no local endpoint", "node1", ext_local, 80, both(B2),
             masq=True),
        Flow("node to LB with eTP:Local, no local endpoint (UDP)", "node1", LB2, 53, both(B2, port=53),
             masq=True, protocol="UDP"),
        Flow("node to LB outside LoadBalancerSourceRanges", "node1", LB3, 80, "DROP"),
        Flow("node to LB outside LoadBalancerSourceRanges (UDP)", "node1", LB3, 53, "DROP", protocol="UDP"),
        Flow("node to LB inside LoadBalancerSourceRanges, endpoint on the node", "node1", LB_IN, 80, both(A1),
             masq=True),
        Flow("node to LB inside LoadBalancerSourceRanges, endpoint on the node (UDP)", "node1", LB_IN, 53,
             both(A1, port=53), masq=True, protocol="UDP"),
        # The ranges hold node1, not its pod: the pod's packet is still tc's, which drops it.
        Flow("pod to LB outside LoadBalancerSourceRanges that hold its node", "client1", LB_IN, 80, "DROP"),
        Flow("pod to LB inside LoadBalancerSourceRanges, endpoint on its node", "client1", LB_POD, 80,
             both(A1), gap=POD_HAIRPIN),
        Flow("node to NodePort of a Service with LoadBalancerSourceRanges", "node1", NODE1, 30003, both(B3),
             masq=True),
        Flow("node to external IP with no endpoints", "node1", ext_none, 80, "REJECT", ours="REJECT",
             why=SOCKET_REFUSES),
        Flow("node to external IP with no endpoints (UDP)", "node1", ext_none, 53, "REJECT", protocol="UDP",
             ours="REJECT", why=SOCKET_REFUSES),
    ], pinned=(ext_local, LB2, LB_IN, LB_POD)))


def _host_ipv6() -> None:
    ext, lb_in, lb_out, lb = "fd00:240::11", "fd00:240::108", "fd00:240::112", "fd00:240::104"
    v6 = {"family": "IPv6", "type_": "LoadBalancer"}
    objs = [
        service("svc6", "fd00:96::46", _dns_ports(30006, 30056), external_ips=[ext], lb_ips=[lb], **v6),
        # fd00:243::10/124 holds the nodes' ::11 and ::12, not the router's ::1; ::/124 the reverse
        service("svc7", "fd00:96::47", _dns_ports(30007, 30057), lb_ips=[lb_in],
                source_ranges=["fd00:243::10/124"], **v6),
        service("svc8", "fd00:96::48", _dns_ports(30008, 30058), lb_ips=[lb_out],
                source_ranges=["fd00:243::/124"], **v6),
        slice_("svc6", [ep(A1_6), ep(B1_6)], DNS, "IPv6"),
        slice_("svc7", [ep(B1_6)], DNS, "IPv6"),
        slice_("svc8", [ep(B1_6)], DNS, "IPv6"),
    ]
    both_dns = both(A1_6, B1_6, port=53)
    HOST_SETUPS.append(Setup(f"{HOST_CASE}/ipv6", (), objs, [
        Flow("node to external IP", "node1", ext, 80, both(A1_6, B1_6), masq=True),
        Flow("node to external IP (UDP)", "node1", ext, 53, both_dns, masq=True, protocol="UDP"),
        Flow("node to LB", "node1", lb, 80, both(A1_6, B1_6), masq=True),
        Flow("node to LB (UDP)", "node1", lb, 53, both_dns, masq=True, protocol="UDP"),
        Flow("node to NodePort (UDP)", "node1", NODES["node1"][1], 30056, both_dns, masq=True, protocol="UDP"),
        Flow("node to LB inside LoadBalancerSourceRanges", "node1", lb_in, 80, both(B1_6), masq=True),
        Flow("node to LB outside LoadBalancerSourceRanges", "node1", lb_out, 80, "DROP"),
    ]))


_host_ipv4()
_host_ipv6()

# Upstream tests with no packet flows (rule dumps, maps, metrics) are not ported:
# TestOverallNFTablesRules/TestOverallIPTablesRules (rule text; their Services are in
# TestRunPacketFlowTests above), TestBuildServiceMap*, TestUpdateEndpointsMap,
# TestHealthCheckNodePortWhenTerminating, TestSyncProxyRules*, TestNoEndpointsMetric,
# TestLoadBalancerIngressRouteTypeProxy, TestDropInvalidRule, TestMasqueradeRule.
