"""The socket-LB's external frontends (issue 12, hairpin): with north-south
on, a pod's connect() to a node address at a NodePort, to a LoadBalancer IP
or to an external IP is translated in the kernel like the ClusterIP, to the
Service's cluster-wide endpoints (reconcile.external_services). The
incremental path (sync/lb.py) keeps them equal to a full plan, node address
changes included."""

from __future__ import annotations

import ipaddress
import random

import pytest

from k8s_builders import build, endpoint_slice, ep, service
from meshbpf.admission import admit
from meshbpf.metrics import AgentMetrics
from meshbpf.reconcile import SVC_F_NODE_NETNS, LBState, SvcKey, addr16, lb_ip_flags, plan, wanted_services
from meshbpf.sources.kube_incremental import ServiceIndex
from meshbpf.sources.kube_objects import SourceObject, build_state
import meshbpf.sync.lb as lbsync_mod
from meshbpf.sync.lb import LBSync
from test_agent_loop import FakeMaps

TCP, UDP = 6, 17
ADDRS = tuple(ipaddress.ip_address(a) for a in ("10.243.0.11", "fd00:243::11"))
PORT = {"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080, "nodePort": 30080}


def k(addr: str, port: int, proto: int = TCP) -> SvcKey:
    return SvcKey(addr16(ipaddress.ip_address(addr)), port, proto)


def lb(name="web", cluster_ip="10.96.0.10", ingress=("10.240.0.7",), ports=(PORT,), **spec):
    svc = service(name, cluster_ip, type="LoadBalancer", ports=list(ports), **spec)
    svc["status"] = {"loadBalancer": {"ingress": [{"ip": ip} for ip in ingress]}}
    return svc


def desired(*objects):
    result = build(*objects, node_name="node-a")
    assert result.problems == []
    return result.state


def backends(wanted, key) -> set[str]:
    return {str(ipaddress.IPv6Address(be.addr).ipv4_mapped or ipaddress.IPv6Address(be.addr))
            for be, _ in wanted[key].backends}


TWO = [ep("10.244.0.5", node="node-a"), ep("10.244.1.5", node="node-b")]


def test_a_load_balancer_gets_a_frontend_per_node_address_lb_ip_and_external_ip():
    state = desired(lb(externalIPs=["10.240.0.9"]), endpoint_slice("web-1", "web", TWO))
    two = (*ADDRS, ipaddress.ip_address("10.243.0.12"))
    want = wanted_services(state, two)
    assert set(want) == {k("10.96.0.10", 80), k("10.243.0.11", 30080), k("10.243.0.12", 30080),
                         k("10.240.0.7", 80), k("10.240.0.9", 80)}   # no IPv6 node address: IPv4 port
    for key in want:
        assert backends(want, key) == {"10.244.0.5", "10.244.1.5"}
        assert want[key].owner == "default/web"   # admission keeps them with their Service


def test_dual_stack_and_udp_each_family_its_own_addresses_and_endpoints():
    udp = {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353, "nodePort": 30053}
    svc = lb("web", ["10.96.0.10", "fd00:96::10"], ingress=("10.240.0.7", "fd00:240::7"), ports=(udp,))
    state = desired(svc, endpoint_slice("web-1", "web", TWO, ports=[{"name": "dns", "port": 5353,
                                                                      "protocol": "UDP"}]),
                    endpoint_slice("web-2", "web", [ep("fd00:244::5", node="node-a")], address_type="IPv6",
                                   ports=[{"name": "dns", "port": 5353, "protocol": "UDP"}]))
    want = wanted_services(state, ADDRS)
    assert backends(want, k("fd00:243::11", 30053, UDP)) == {"fd00:244::5"}
    assert backends(want, k("fd00:240::7", 53, UDP)) == {"fd00:244::5"}
    assert backends(want, k("10.243.0.11", 30053, UDP)) == {"10.244.0.5", "10.244.1.5"}
    assert k("10.243.0.11", 30053, TCP) not in want and len(want) == 6


def test_none_when_north_south_is_off():
    state = desired(lb(externalIPs=["10.240.0.9"]), endpoint_slice("web-1", "web", TWO))
    assert set(wanted_services(state)) == {k("10.96.0.10", 80)}
    # on, but the node has no address on its devices: LB and external IPs only
    assert set(wanted_services(state, ())) == {k("10.96.0.10", 80), k("10.240.0.7", 80), k("10.240.0.9", 80)}


def test_external_frontends_use_every_endpoint_not_the_internal_traffic_policy():
    state = desired(lb(internalTrafficPolicy="Local", externalTrafficPolicy="Local"),
                    endpoint_slice("web-1", "web", TWO))
    want = wanted_services(state, ADDRS)
    assert backends(want, k("10.96.0.10", 80)) == {"10.244.0.5"}          # this node's, for the ClusterIP
    assert backends(want, k("10.243.0.11", 30080)) == {"10.244.0.5", "10.244.1.5"}  # KUBE-EXT -> KUBE-SVC
    assert backends(want, k("10.240.0.7", 80)) == {"10.244.0.5", "10.244.1.5"}


def test_node_port_and_cluster_ip_types():
    np_ = service("np", "10.96.0.11", type="NodePort", ports=[PORT])
    cip = service("cip", "10.96.0.12", externalIPs=["10.240.0.12"])
    want = wanted_services(desired(np_, cip), ADDRS)
    assert set(want) == {k("10.96.0.11", 80), k("10.243.0.11", 30080), k("10.96.0.12", 80),
                         k("10.240.0.12", 80)}
    assert want[k("10.243.0.11", 30080)].backends == ()  # no endpoints: the socket-LB refuses


def test_lb_ips_with_source_ranges_outside_the_node_stay_on_the_tc_path():
    svc = lb(loadBalancerSourceRanges=["10.243.0.0/29"], externalIPs=["10.240.0.9"])
    want = wanted_services(desired(svc), ADDRS)
    assert k("10.240.0.7", 80) not in want       # tc checks the ranges, as kube-proxy's firewall chain
    assert want[k("10.243.0.11", 30080)].flags == 0 and want[k("10.240.0.9", 80)].flags == 0


def test_lb_ips_with_source_ranges_holding_the_node_are_the_node_sockets_only():
    svc = lb(loadBalancerSourceRanges=["10.243.0.8/29"], externalIPs=["10.240.0.9"])
    want = wanted_services(desired(svc, endpoint_slice("web-1", "web", TWO)), ADDRS)
    assert want[k("10.240.0.7", 80)].flags == SVC_F_NODE_NETNS   # pods: tc, which sees their source
    assert backends(want, k("10.240.0.7", 80)) == {"10.244.0.5", "10.244.1.5"}
    assert want[k("10.240.0.9", 80)].flags == 0   # the ranges guard LB IPs only
    key = k("10.240.0.7", 80)
    assert plan(LBState(), want).service_updates[key].flags == SVC_F_NODE_NETNS


def test_an_lb_ip_the_node_holds_itself_is_not_judged_as_the_nodes_source():
    """kube-vip style: the VIP sits on the node's device, so it is among the
    node's addresses, outside the ranges; the node's packets leave with its
    own address (inside), so the LB IP is still the node's to translate."""
    svc = lb(loadBalancerSourceRanges=["10.243.0.8/29"])
    vip = ipaddress.ip_address("10.240.0.7")
    want = wanted_services(desired(svc), (*ADDRS, vip))
    assert want[k("10.240.0.7", 80)].flags == SVC_F_NODE_NETNS


def test_service_list_says_which_frontends_are_the_node_sockets_only():
    from meshbpf.cli.inspect_cmd import services_view
    svc = lb(loadBalancerSourceRanges=["10.243.0.8/29"])
    state = plan(LBState(), wanted_services(desired(svc), ADDRS)).apply_to(LBState())
    view = {s["frontend"]: s["node_only"] for s in services_view(state)}
    assert view["10.240.0.7:80/TCP"] is True and view["10.243.0.11:30080/TCP"] is False


V4, V6 = ipaddress.ip_address("10.243.0.11"), ipaddress.ip_address("fd00:243::11")
NODE2 = ipaddress.ip_address("10.243.0.12")


@pytest.mark.parametrize("ranges, addresses, family, flags", [
    ((), ADDRS, 4, 0),                                   # no ranges: everyone
    (("fd00:243::/64",), ADDRS, 4, 0),                   # none of the family: everyone, as tc
    (("10.243.0.8/29",), ADDRS, 4, SVC_F_NODE_NETNS),    # the node inside
    (("10.0.0.0/8", "fd00:243::/64"), ADDRS, 6, SVC_F_NODE_NETNS),
    (("10.243.0.0/29",), ADDRS, 4, None),                # the node outside: tc drops it
    (("10.243.0.11/32",), (V4, NODE2), 4, None),         # one address in, one out: tc decides
    (("10.243.0.8/29",), (V6,), 4, None),                # no address of the family to judge
])
def test_lb_ip_flags_decide_who_the_socket_lb_translates_for(ranges, addresses, family, flags):
    nets = tuple(ipaddress.ip_network(r) for r in ranges)
    assert lb_ip_flags(nets, addresses, family) == flags


def test_a_cluster_ip_keeps_its_key_and_the_first_service_wins_a_shared_external_ip():
    a = service("a", "10.96.0.10", externalIPs=["10.96.0.20", "10.240.0.5"])
    b = service("b", "10.96.0.20", externalIPs=["10.240.0.5"])
    c = service("c", "10.96.0.30")
    state = desired(c, b, a, endpoint_slice("a-1", "a", [ep("10.244.0.1")]),
                    endpoint_slice("b-1", "b", [ep("10.244.0.2")]))
    want = wanted_services(state, ADDRS)
    assert backends(want, k("10.96.0.20", 80)) == {"10.244.0.2"}   # b's ClusterIP, not a's external IP
    assert backends(want, k("10.240.0.5", 80)) == {"10.244.0.1"}   # a before b


def test_admission_counts_the_external_frontends():
    state = desired(lb("a", "10.96.0.10", ingress=("10.240.0.7",)),
                    lb("b", "10.96.0.11", ingress=("10.240.0.8",), ports=[dict(PORT, nodePort=30081)]),
                    endpoint_slice("a-1", "a", TWO), endpoint_slice("b-1", "b", TWO))
    want = wanted_services(state, ADDRS)
    assert len(want) == 6
    result = admit(LBState(), want, {"services": 4, "slots": 100, "backends": 100})
    assert [r.service for r in result.refused] == ["default/b"]
    assert set(result.wanted) == {k("10.96.0.10", 80), k("10.243.0.11", 30080), k("10.240.0.7", 80)}


# --- incremental == full ---------------------------------------------------------------

NAMES = [f"svc{i}" for i in range(6)]


def random_service(rng: random.Random, name: str) -> dict:
    i = NAMES.index(name)
    kind = rng.choice(("ClusterIP", "NodePort", "LoadBalancer"))
    port = {"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}
    spec = {"type": kind}
    if kind != "ClusterIP":
        port["nodePort"] = 30000 + rng.randint(0, 3)   # shared now and then: first claim wins
    if rng.random() < 0.4:  # sometimes another Service's ClusterIP
        spec["externalIPs"] = [rng.choice(("10.240.0.1", "10.240.0.2", "10.96.0.3"))]
    if rng.random() < 0.3:
        spec["internalTrafficPolicy"] = "Local"
    svc = service(name, f"10.96.0.{i + 1}", ports=[port], **spec)
    if kind == "LoadBalancer":
        svc["status"] = {"loadBalancer": {"ingress": [{"ip": f"10.240.1.{rng.randint(1, 3)}"}]}}
        if rng.random() < 0.3:   # node addresses inside, one of them, none: per ADDRESS_CHOICES
            ranges = rng.choice(("10.0.0.0/8", "10.243.0.10/31", "192.168.0.0/16"))
            svc["spec"]["loadBalancerSourceRanges"] = [ranges]
    return svc


def random_slice(rng: random.Random, name: str) -> dict:
    eps = [ep(f"10.244.{rng.randint(0, 1)}.{rng.randint(1, 6)}", node=rng.choice(("node-a", "node-b")),
              ready=rng.random() < 0.8) for _ in range(rng.randint(0, 3))]
    return endpoint_slice(f"{name}-1", name, eps)


def full(services: dict, slices: dict):
    objects = [SourceObject(o, "API server") for o in list(services.values()) + list(slices.values())]
    return build_state(objects, node_name="node-a")


ADDRESS_CHOICES = [None, (), ADDRS[:1], ADDRS, (ipaddress.ip_address("10.243.0.12"),)]


@pytest.mark.parametrize("seed", range(40))
def test_incremental_syncs_equal_a_full_plan_through_node_address_changes(seed, monkeypatch):
    full_plans = []
    monkeypatch.setattr(lbsync_mod, "plan", lambda *a: full_plans.append(1) or plan(*a))
    rng = random.Random(seed)
    services = {n: random_service(rng, n) for n in NAMES if rng.random() < 0.7}
    slices = {n: random_slice(rng, n) for n in NAMES}
    start = full(services, slices)
    index = ServiceIndex(start.state, services.values(), slices.values(), start.problems,
                         node_name="node-a")
    sync = LBSync(AgentMetrics(), lambda *a: pytest.fail(a[0] % a[1:]))
    sync.start(FakeMaps())
    addresses = rng.choice(ADDRESS_CHOICES)
    assert sync.sync(index.state, node_addresses=addresses)
    incremental = 0
    for _ in range(12):
        if rng.random() < 0.25:
            addresses = rng.choice(ADDRESS_CHOICES)
        else:
            name = rng.choice(NAMES)
            if rng.random() < 0.6:
                obj = random_service(rng, name) if rng.random() < 0.8 else None
                services.pop(name, None) if obj is None else services.__setitem__(name, obj)
                index.apply({("default", name): obj}, {})
            else:
                obj = random_slice(rng, name)
                slices[name] = obj
                index.apply({}, {("default", f"{name}-1"): obj})
        state = index.state
        assert state.service_ports == full(services, slices).state.service_ports
        planned_in_full = len(full_plans)
        assert sync.sync(state, node_addresses=addresses)
        incremental += len(full_plans) == planned_in_full
        want = wanted_services(state, addresses)
        assert plan(sync.maps.state, want).writes == 0, "the maps differ from a full plan"
        assert sync.programmed == want
    assert incremental > 0  # the incremental path ran, not only full plans


def test_a_cluster_ip_that_comes_and_goes_over_an_external_ip_incrementally(monkeypatch):
    full_plans = []
    monkeypatch.setattr(lbsync_mod, "plan", lambda *a: full_plans.append(1) or plan(*a))
    a = service("a", "10.96.0.10", externalIPs=["10.96.0.20"])
    b = service("b", "10.96.0.20")
    slices = {"a": endpoint_slice("a-1", "a", [ep("10.244.0.1")]),
              "b": endpoint_slice("b-1", "b", [ep("10.244.0.2")])}
    start = full({"a": a}, slices)
    index = ServiceIndex(start.state, [a], slices.values(), start.problems, node_name="node-a")
    sync = LBSync(AgentMetrics(), lambda *args: pytest.fail(args[0] % args[1:]))
    sync.start(FakeMaps())
    assert sync.sync(index.state, node_addresses=ADDRS) and len(full_plans) == 1
    held = wanted_services(index.state, ADDRS)
    assert backends(held, k("10.96.0.20", 80)) == {"10.244.0.1"}   # a's external IP
    for event, owner in (({("default", "b"): b}, "10.244.0.2"),     # b's ClusterIP takes the key
                         ({("default", "b"): None}, "10.244.0.1")):  # and gives it back
        index.apply(event, {})
        assert sync.sync(index.state, node_addresses=ADDRS)
        want = wanted_services(index.state, ADDRS)
        assert backends(want, k("10.96.0.20", 80)) == {owner}
        assert plan(sync.maps.state, want).writes == 0 and sync.programmed == want
    assert len(full_plans) == 1, "planned in full, not over the touched frontends"
