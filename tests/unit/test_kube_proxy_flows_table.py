"""The ported kube-proxy packet-flow table (tests/data/kube_proxy_flows.py) is
consistent: every expected backend is an endpoint of the Service the flow's
destination names, the lab addresses are the lab's, every setup reads as
meshbpf reads a config, and every case that does not apply says why."""

from __future__ import annotations

import ipaddress
from dataclasses import replace

import pytest

from meshbpf.lab.netlab import pod_subnet4
from meshbpf.sources.yaml_file import read_config
from meshbpf.sources.yaml_load import dump_all
from tests.data import kube_proxy_flows as table
from tests.data.kube_proxy_flows import HOST_SETUPS, SETUPS, Flow, Setup

VERDICTS = {"DROP", "REJECT", "", "ACCEPT"}


def frontends(setup: Setup) -> dict[tuple[str, int, str], dict]:
    """(address, port, protocol) -> (Service, its port) for every way in."""
    # 127.0.0.1: iptables kube-proxy's --localhost-nodeports (a skipped case)
    node_addrs = [a for pair in table.NODES.values() for a in pair] + ["127.0.0.1"]
    out = {}
    for svc in (o for o in setup.objects if o["kind"] == "Service"):
        spec = svc["spec"]
        lb = [i["ip"] for i in svc.get("status", {}).get("loadBalancer", {}).get("ingress", [])]
        for port in spec["ports"]:
            proto = port["protocol"]
            for addr in [*spec["clusterIPs"], *spec.get("externalIPs", []), *lb]:
                out[(addr, port["port"], proto)] = (svc, port)
            if port.get("nodePort"):
                for addr in node_addrs:
                    out[(addr, port["nodePort"], proto)] = (svc, port)
    return out


def endpoints_of(setup: Setup, svc: dict, port: dict) -> set[str]:
    """Every "ip:port" the slices of that Service offer for that port."""
    found = set()
    for sl in setup.objects:
        if sl["kind"] != "EndpointSlice" or \
                sl["metadata"]["labels"]["kubernetes.io/service-name"] != svc["metadata"]["name"]:
            continue
        for sp in sl["ports"]:
            if sp["name"] == port["name"] and sp["protocol"] == port["protocol"]:
                for e in sl["endpoints"]:
                    found |= {f"[{a}]:{sp['port']}" if ":" in a else f"{a}:{sp['port']}"
                              for a in e["addresses"]}
    return found


def problems(setup: Setup, flow: Flow) -> list[str]:
    """What is wrong with one flow of a setup (empty: consistent)."""
    where = f"{setup.name} / {flow.case}"
    bad = []
    if flow.client not in (*table.CLIENTS, *table.BACKENDS):
        bad.append(f"{where}: unknown client {flow.client!r}")
    if flow.ours is not None and not flow.why:
        bad.append(f"{where}: `ours` without `why`")
    for out in {flow.output, flow.expected}:
        if out in VERDICTS:
            continue
        front = frontends(setup).get((flow.dest, flow.port, flow.protocol))
        if front is None:
            bad.append(f"{where}: {flow.dest}:{flow.port}/{flow.protocol} is no frontend of the setup")
            continue
        offered = endpoints_of(setup, *front)
        if flow.protocol == "SCTP":
            continue  # the lab's slices leave SCTP out (see the table)
        for backend in out.split(", "):
            if backend not in offered:
                bad.append(f"{where}: backend {backend} is not an endpoint of "
                           f"{front[0]['metadata']['name']} port {front[1]['name']!r}")
    if flow.output == "" and frontends(setup).get((flow.dest, flow.port, flow.protocol)):
        bad.append(f"{where}: no rule expected, but {flow.dest}:{flow.port} is a frontend")
    return bad


@pytest.mark.parametrize("setup", SETUPS + HOST_SETUPS, ids=lambda s: s.name)
def test_every_flow_is_consistent_with_its_setup(setup):
    assert setup.flows, setup.name
    assert [p for f in setup.flows for p in problems(setup, f)] == []


@pytest.mark.parametrize("setup", SETUPS + HOST_SETUPS, ids=lambda s: s.name)
def test_every_setup_reads_as_the_agent_reads_it(setup, tmp_path):
    path = tmp_path / "flows.yaml"
    path.write_text(dump_all(setup.objects))
    result = read_config(path, node_name="node1")
    assert not getattr(result, "problems", []), result.problems
    cluster_ips = {(str(f.address), f.port) for f in result.state.service_ports}
    for svc in (o for o in setup.objects if o["kind"] == "Service"):
        for port in svc["spec"]["ports"]:
            if port["protocol"] != "SCTP":
                ip = str(ipaddress.ip_address(svc["spec"]["clusterIP"]))
                assert any(a.endswith(ip) and p == port["port"] for a, p in cluster_ips), (setup.name, ip)


def test_pinned_addresses_are_external_frontends():
    for setup in SETUPS + HOST_SETUPS:
        spec_addrs = {k[0] for k in frontends(setup)}
        assert set(setup.pinned) <= spec_addrs, setup.name
        assert not any(a.startswith(("10.96.", "10.243.")) for a in setup.pinned), setup.name


def test_lab_addresses_are_the_labs():
    for node, pods in ((1, table.NODE1_PODS), (2, table.NODE2_PODS)):
        for index, pod in enumerate(pods, 2):   # .1 is the bridge
            assert getattr(table, pod.upper(), None) in (None, str(pod_subnet4(node).network_address + index))
    assert (table.A1, table.B1, table.CLIENT1) == ("10.244.0.2", "10.244.1.2", "10.244.0.6")


def test_cases_are_named_once_and_skips_say_why():
    seen = set()
    for setup in SETUPS:
        assert setup.name.startswith("Test") and set(setup.files) <= {"nftables", "iptables"}
        for flow in setup.flows:
            assert (setup.name, flow.case) not in seen
            seen.add((setup.name, flow.case))
            assert flow.skip == "" or len(flow.skip) > 20
    assert len(seen) > 100
    for setup in HOST_SETUPS:   # meshbpf's own: no upstream name, node clients (and a pod beside them)
        assert not setup.name.startswith("Test") and not setup.files, setup.name
        assert "node1" in {f.client for f in setup.flows} <= {"node1", "client1"}, setup.name
        assert not any(f.skip for f in setup.flows)


def test_the_checker_catches_a_wrong_backend_and_a_missing_frontend():
    setup = next(s for s in SETUPS if s.name == "TestLoadBalancer")
    good = next(f for f in setup.flows if f.case == "external to nodePort")
    assert problems(setup, good) == []
    assert "not an endpoint" in problems(setup, replace(good, output=table.both(table.A3)))[0]
    assert "no frontend" in problems(setup, replace(good, port=30009))[0]
    assert "without `why`" in problems(setup, replace(good, ours="DROP"))[0]


def _socket_lb_flows():
    """Every runnable flow of a pod or of the node itself: the socket-LB's path
    (node1's processes are in the cgroup its programs are attached to)."""
    return [pytest.param(setup, flow, id=f"{setup.name}/{flow.case}") for setup in SETUPS + HOST_SETUPS
            for flow in setup.flows if not flow.skip and flow.client not in ("router", "blocked")]


def _ranged_lb_ips(setup: Setup) -> set[str]:
    """LB IPs of Services with loadBalancerSourceRanges: tc's, not the socket-LB's."""
    return {i["ip"] for o in setup.objects if o["kind"] == "Service" and o["spec"].get("loadBalancerSourceRanges")
            for i in o.get("status", {}).get("loadBalancer", {}).get("ingress", [])}


@pytest.mark.parametrize("setup, flow", _socket_lb_flows())
def test_pod_and_node_clients_get_the_expected_backends_from_the_socket_lb_plan(setup, flow, tmp_path):
    """What node1's socket-LB maps would hold for the flow's destination, with
    north-south on and node1's addresses (the kernel test sends the packets;
    127.0.0.1 and ::1 NodePorts get no frontend: REJECT):
    the expected backends, none for REJECT, no frontend where the packet is
    meant to leave the node untranslated. A frontend for the node's own
    sockets only (an LB IP whose source ranges hold node1) is none for a pod."""
    from meshbpf.reconcile import SVC_F_NODE_NETNS, SvcKey, addr16, wanted_services
    path = tmp_path / "flows.yaml"
    path.write_text(dump_all(setup.objects))
    state = read_config(path, node_name="node1").state
    node1 = tuple(ipaddress.ip_address(a) for a in table.NODES["node1"])
    proto = {"TCP": 6, "UDP": 17}[flow.protocol]
    want = wanted_services(state, node1).get(SvcKey(addr16(ipaddress.ip_address(flow.dest)), flow.port, proto))
    expected = flow.expected
    node_only = want is not None and bool(want.flags & SVC_F_NODE_NETNS)
    if node_only and flow.client != "node1":
        want = None   # sock_lb.c's svc_serves: a pod's packet goes on to tc
    if want is None:
        # untranslated: the destination answers, or tc (source ranges) or the lab's routing decides
        assert expected in ("", "DROP", "REJECT") or flow.dest in _ranged_lb_ips(setup), \
            f"no socket-LB frontend for {flow.dest}:{flow.port}"
        return
    assert flow.dest not in _ranged_lb_ips(setup) or node_only, "an LB IP with source ranges for every socket"
    got = {f"[{ipaddress.ip_address(be.addr)}]:{be.port}" if ipaddress.IPv6Address(be.addr).ipv4_mapped is None
           else f"{ipaddress.IPv6Address(be.addr).ipv4_mapped}:{be.port}" for be, _ in want.backends}
    if expected in ("DROP", "REJECT"):   # the socket-LB refuses a frontend with no backend
        assert got == set(), got
    else:
        assert got == set(expected.split(", ")), (got, expected)
