"""The north-south planner (meshbpf/reconcile/northsouth.py)."""

from __future__ import annotations

import ipaddress
import socket
from array import array

import pytest

from k8s_builders import build, endpoint_slice, ep, service
from meshbpf.reconcile import addr16
from meshbpf.reconcile.northsouth import NodeContext, diff, plan
from meshbpf.reconcile.northsouth_keys import (BE_LOCAL, F_LOCAL, F_NODEPORT, WILDCARD4, WILDCARD6,
                                               NorthSouthState, NsKey, NsSrcKey)

TCP, UDP = socket.IPPROTO_TCP, socket.IPPROTO_UDP
M = 251  # a small prime of maglev.TABLE_SIZES keeps the tests quick
NODE = NodeContext("node-a", (ipaddress.ip_address("10.243.0.11"), ipaddress.ip_address("fd00:243::11")),
                   ipaddress.ip_address("10.243.0.11"), ipaddress.ip_address("fd00:243::11"))
PORT = {"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080, "nodePort": 30080}


def a16(text: str) -> bytes:
    return addr16(ipaddress.ip_address(text))


def key(addr: str | bytes, port: int, proto: int = TCP) -> NsKey:
    return NsKey(addr if isinstance(addr, bytes) else a16(addr), port, proto)


def lb(name="web", cluster_ip="10.96.0.10", ingress=("10.240.0.7",), ports=(PORT,), **spec):
    svc = service(name, cluster_ip, type="LoadBalancer", ports=list(ports), **spec)
    svc["status"] = {"loadBalancer": {"ingress": [{"ip": ip} for ip in ingress]}}
    return svc


def slice_of(name, *endpoints, family="IPv4"):
    return endpoint_slice(f"{name}-1", name, list(endpoints), address_type=family)


def desired(*objects):
    result = build(*objects, node_name=NODE.name)
    assert result.problems == []
    return result.state


def planned(*objects, current=None, node=NODE):
    result = plan(desired(*objects), node, current or NorthSouthState(), M)
    assert result.problems == []
    return result


def backends_of(state, svc_key):
    row = state.tables[state.frontends[svc_key].table_id]
    return {(state.backends[i].addr, state.backends[i].port) for i in set(row)}


TWO = (ep("10.244.0.5", node="node-a"), ep("10.244.1.5", node="node-b"))


def test_each_frontend_kind_of_a_load_balancer():
    state = planned(lb(externalIPs=["10.240.0.5"]), slice_of("web", *TWO)).state
    assert set(state.frontends) == {key("10.96.0.10", 80), key(WILDCARD4, 30080),
                                    key("10.240.0.5", 80), key("10.240.0.7", 80)}
    svcs = set(state.frontends.values())
    assert len({s.table_id for s in svcs}) == 1          # Cluster: one table for them all
    assert {s.count for s in svcs} == {2}
    assert state.frontends[key(WILDCARD4, 30080)].flags == F_NODEPORT
    assert state.frontends[key("10.240.0.7", 80)].flags == 0
    assert backends_of(state, key(WILDCARD4, 30080)) == {(a16("10.244.0.5"), 8080), (a16("10.244.1.5"), 8080)}
    assert len(state.tables[state.frontends[key("10.96.0.10", 80)].table_id]) == M
    local = {be.addr: be.flags for be in state.backends.values()}
    assert local == {a16("10.244.0.5"): BE_LOCAL, a16("10.244.1.5"): 0}
    assert state.node_addrs == {a16("10.243.0.11"), a16("fd00:243::11")}
    assert state.cfg.enabled == 1 and state.cfg.snat4 == a16("10.243.0.11")


def test_node_port_service_and_plain_cluster_ip_service():
    state = planned(service("np", "10.96.0.11", type="NodePort", ports=[PORT]), slice_of("np", *TWO),
                    service("plain", "10.96.0.12"), slice_of("plain", *TWO)).state
    assert set(state.frontends) == {key("10.96.0.11", 80), key(WILDCARD4, 30080)}


def test_udp_frontends_use_the_udp_protocol_number():
    port = dict(PORT, protocol="UDP")
    sl = endpoint_slice("dns-1", "dns", [ep("10.244.0.5")],
                        ports=[{"name": "http", "port": 8080, "protocol": "UDP"}])
    state = planned(service("dns", "10.96.0.13", type="NodePort", ports=[port]), sl).state
    assert set(state.frontends) == {key("10.96.0.13", 80, UDP), key(WILDCARD4, 30080, UDP)}


def test_local_policy_uses_this_nodes_endpoints_outside_and_every_endpoint_on_the_cluster_ip():
    state = planned(lb(externalTrafficPolicy="Local", healthCheckNodePort=31000), slice_of("web", *TWO)).state
    np, cip = state.frontends[key(WILDCARD4, 30080)], state.frontends[key("10.96.0.10", 80)]
    assert np.flags == F_LOCAL | F_NODEPORT and state.frontends[key("10.240.0.7", 80)].flags == F_LOCAL
    assert cip.flags == 0 and np.table_id != cip.table_id
    assert backends_of(state, key(WILDCARD4, 30080)) == {(a16("10.244.0.5"), 8080)}
    assert len(backends_of(state, key("10.96.0.10", 80))) == 2


def test_local_policy_without_a_local_endpoint_has_count_zero():
    state = planned(lb(externalTrafficPolicy="Local"), slice_of("web", TWO[1])).state
    assert state.frontends[key(WILDCARD4, 30080)].count == 0
    assert state.frontends[key(WILDCARD4, 30080)].flags == F_LOCAL | F_NODEPORT
    assert state.frontends[key("10.96.0.10", 80)].count == 1


def test_local_policy_with_no_endpoint_anywhere_rejects_like_cluster():
    """kube-proxy drops at a Local Service's node without a local endpoint
    (the load balancer's health check steers away), but rejects when the
    Service has no usable endpoint at all: count 0 without F_LOCAL."""
    not_ready = [{**e, "conditions": {"ready": False, "serving": False}} for e in
                 slice_of("web", *TWO)["endpoints"]]
    state = planned(lb(externalTrafficPolicy="Local"), {**slice_of("web", *TWO), "endpoints": not_ready}).state
    assert state.frontends[key(WILDCARD4, 30080)].count == 0
    assert state.frontends[key(WILDCARD4, 30080)].flags == F_NODEPORT
    state = planned(lb(externalTrafficPolicy="Local")).state
    assert state.frontends[key(WILDCARD4, 30080)].flags == F_NODEPORT


def test_no_endpoints_count_zero_and_no_table():
    state = planned(lb()).state
    assert {s.count for s in state.frontends.values()} == {0}
    assert state.tables == {} and state.backends == {}


def test_source_ranges_apply_to_load_balancer_ips_only():
    state = planned(lb(loadBalancerSourceRanges=["192.0.2.0/24", "fd00:1::/64"]), slice_of("web", *TWO)).state
    lb_svc = state.frontends[key("10.240.0.7", 80)]
    assert lb_svc.src_id != 0
    assert state.frontends[key(WILDCARD4, 30080)].src_id == 0
    assert state.frontends[key("10.96.0.10", 80)].src_id == 0
    # only this family's range, as a prefix over the 16-byte address
    assert state.sources == {NsSrcKey(lb_svc.src_id, a16("192.0.2.0"), 96 + 24): 1}


def test_a_changed_endpoint_rewrites_only_its_table_and_replanning_writes_nothing():
    objects = [lb("web", "10.96.0.10"), slice_of("web", *TWO),
               lb("api", "10.96.0.20", ingress=("10.240.0.8",), ports=[dict(PORT, nodePort=30081)]),
               slice_of("api", ep("10.244.0.9"))]
    first = planned(*objects)
    again = planned(*objects, current=first.state)
    assert again.steps == []
    objects[1] = slice_of("web", TWO[0], ep("10.244.1.6", node="node-b"))
    second = planned(*objects, current=first.state)
    web_table = first.state.frontends[key("10.96.0.10", 80)].table_id
    api_table = first.state.frontends[key("10.96.0.20", 80)].table_id
    steps = {(s.map, s.op): s.entries for s in second.steps}
    assert set(steps) == {("backends", "update"), ("tables", "update"), ("backends", "delete")}
    assert set(steps[("tables", "update")]) == {web_table}
    assert second.state.frontends[key("10.96.0.20", 80)].table_id == api_table
    assert second.state.tables[api_table] is first.state.tables[api_table]
    # the unchanged endpoint kept its backend id; the gone one is deleted
    kept = {v: k for k, v in first.state.backends.items()}
    assert all(kept.get(v, k) == k for k, v in second.state.backends.items())
    (gone,) = steps[("backends", "delete")]
    assert first.state.backends[gone].addr == a16("10.244.1.5")


def test_order_is_make_before_break():
    first = planned(lb("web"), slice_of("web", *TWO))
    order = [(s.map, s.op) for s in first.steps]
    assert order == [("cfg", "update"), ("node_addrs", "update"), ("backends", "update"),
                     ("tables", "update"), ("frontends", "update")]
    second = planned(lb("web2", "10.96.0.11", ingress=("10.240.0.9",), ports=[dict(PORT, nodePort=30090)],
                        loadBalancerSourceRanges=["192.0.2.0/24"]),
                     slice_of("web2", ep("10.244.0.7")), current=first.state)
    order = [(s.map, s.op) for s in second.steps]
    assert order == [("backends", "update"), ("tables", "update"), ("sources", "update"),
                     ("frontends", "update"), ("frontends", "delete"), ("tables", "delete"),
                     ("backends", "delete")]
    # the new table and backends never take ids the maps still hold
    assert not set(second.state.tables) & set(first.state.tables)
    assert not set(second.state.backends) & set(first.state.backends)


def test_ids_survive_an_agent_restart():
    """A new planner (empty cache) over what the maps hold keeps every id."""
    objects = (lb("web", externalTrafficPolicy="Local"), slice_of("web", *TWO),
               lb("api", "10.96.0.20", ingress=("10.240.0.8",), ports=[dict(PORT, nodePort=30081)],
                  loadBalancerSourceRanges=["192.0.2.0/24"]), slice_of("api", ep("10.244.0.9")))
    first = planned(*objects)
    read_back = first.state.copy()
    read_back.tables = {i: type(row)(row.typecode, row) for i, row in read_back.tables.items()}
    assert planned(*objects, current=read_back).steps == []


def test_a_deleted_table_read_back_as_zeroes_is_not_deleted_again():
    """NorthSouthMaps.read() also reads the row a count-0 frontend names
    (table 0); once deleted (zeroed) it is not written again."""
    objects = [lb("web"), slice_of("web", *TWO)]
    first = planned(*objects)
    objects[1] = slice_of("web")                    # no endpoints left
    second = planned(*objects, current=first.state)
    assert ("tables", "delete") in [(s.map, s.op) for s in second.steps]
    read_back = second.state.copy()
    read_back.tables[0] = array("I", bytes(4 * M))
    assert planned(*objects, current=read_back).steps == []


def test_dual_stack():
    svc = lb("web", ["10.96.0.10", "fd00:96::10"], ingress=("10.240.0.7", "fd00:240::7"))
    state = planned(svc, slice_of("web", *TWO),
                    endpoint_slice("web-2", "web", [ep("fd00:244::5", node="node-a")],
                                   address_type="IPv6")).state
    assert key("fd00:240::7", 80) in state.frontends and key("fd00:96::10", 80) in state.frontends
    assert backends_of(state, key("fd00:240::7", 80)) == {(a16("fd00:244::5"), 8080)}
    # a NodePort key per family, each with that family's endpoints
    assert backends_of(state, key(WILDCARD4, 30080)) == {(a16("10.244.0.5"), 8080), (a16("10.244.1.5"), 8080)}
    assert backends_of(state, key(WILDCARD6, 30080)) == {(a16("fd00:244::5"), 8080)}
    assert state.cfg.snat6 == a16("fd00:243::11")


def test_a_frontend_two_services_claim_goes_to_the_first_and_the_other_is_told():
    result = plan(desired(lb("a", "10.96.0.10"), lb("b", "10.96.0.11")), NODE, NorthSouthState(), M)
    assert len(result.problems) == 2     # node port 30080 and 10.240.0.7:80
    assert "Service default/b" in result.problems[0] and "default/a's" in result.problems[0]
    assert key("10.96.0.11", 80) in result.state.frontends


def test_the_table_is_the_same_on_every_node():
    objects = (lb("web"), slice_of("web", *TWO))
    a = planned(*objects).state
    b = planned(*objects, node=NodeContext("node-b", (ipaddress.ip_address("10.243.0.12"),))).state
    row_a = [a.backends[i][:2] for i in a.tables[a.frontends[key("10.96.0.10", 80)].table_id]]
    row_b = [b.backends[i][:2] for i in b.tables[b.frontends[key("10.96.0.10", 80)].table_id]]
    assert row_a == row_b


def test_no_room_for_a_table_leaves_that_port_out_with_a_problem():
    result = plan(desired(lb("a"), slice_of("a", *TWO), lb("b", "10.96.0.11", ingress=("10.240.0.8",),
                                                         ports=[dict(PORT, nodePort=30081)]),
                          slice_of("b", *TWO)), NODE, NorthSouthState(), M, max_tables=1)
    assert len(result.problems) == 1 and "default/b" in result.problems[0]
    assert set(result.state.tables) == {0}


def test_diff_of_equal_states_is_empty():
    state = planned(lb(), slice_of("web", *TWO)).state
    assert diff(state, state.copy()) == []


@pytest.mark.parametrize("size", [251, 16381])
def test_rows_name_only_backends_of_their_table(size):
    state = plan(desired(lb(), slice_of("web", *TWO)), NODE, NorthSouthState(), size).state
    (row,) = state.tables.values()
    assert len(row) == size and set(row) == set(state.backends)


def test_every_cluster_ip_when_asked():
    objects = (lb(), slice_of("web", *TWO), service("plain", "10.96.0.12"), slice_of("plain", *TWO))
    assert key("10.96.0.12", 80) not in planned(*objects).state.frontends
    result = plan(desired(*objects), NODE, NorthSouthState(), M, all_cluster_ips=True)
    assert result.problems == []
    plain = result.state.frontends[key("10.96.0.12", 80)]
    assert plain.count == 2 and plain.flags == 0 and plain.src_id == 0
    assert plain.table_id != result.state.frontends[key("10.96.0.10", 80)].table_id
