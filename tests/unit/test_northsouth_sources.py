"""Services' north-south fields (issue 12) as both sources read them."""

from __future__ import annotations

import ipaddress

from k8s_builders import build, endpoint_slice, ep, service
from meshbpf.model import Exposure
from meshbpf.sources.yaml_file import read_config
from meshbpf.sources.yaml_load import dump_all
from test_kubernetes_source import api, make_source  # noqa: F401 (fixtures)

PORTS = [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080, "nodePort": 30080}]


def lb_service(name="web", cluster_ips="10.96.0.10", **spec):
    svc = service(name, cluster_ips, type="LoadBalancer", ports=PORTS, **spec)
    svc["status"] = {"loadBalancer": {"ingress": [{"ip": "10.240.0.7"}, {"hostname": "lb.example"},
                                                  {"ip": "fd00:240::7"}]}}
    return svc


def ports_of(result):
    return sorted(result.state.service_ports.values(), key=lambda sp: sp.frontend.address.version)


def test_plain_cluster_ip_service_has_no_exposure():
    result = build(service("web"))
    (sp,) = result.state.service_ports.values()
    assert sp.exposure is None and sp.node_port == 0 and sp.external_endpoints is None


def test_load_balancer_fields():
    result = build(lb_service(externalIPs=["10.240.0.5"], externalTrafficPolicy="Local",
                              healthCheckNodePort=31000,
                              loadBalancerSourceRanges=["192.0.2.0/24", " 10.1.2.3/8"]))
    assert result.problems == []
    (sp,) = result.state.service_ports.values()
    assert sp.node_port == 30080
    assert sp.exposure == Exposure(
        "LoadBalancer", (ipaddress.ip_address("10.240.0.5"),),
        (ipaddress.ip_address("10.240.0.7"), ipaddress.ip_address("fd00:240::7")),
        True, 31000, (ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("10.0.0.0/8")))


def test_cluster_ip_service_with_external_ips_is_exposed_without_node_port():
    result = build(service("web", externalIPs=["10.240.0.5"]))
    (sp,) = result.state.service_ports.values()
    assert sp.exposure.type == "ClusterIP" and sp.exposure.external_ips
    assert not sp.exposure.local and sp.exposure.health_check_node_port == 0


def test_exposure_is_shared_by_the_ports_of_a_service():
    result = build(service("web", ["10.96.0.10", "fd00:96::10"], type="NodePort", ports=PORTS))
    v4, v6 = ports_of(result)
    assert v4.exposure is v6.exposure and v4.node_port == v6.node_port == 30080


def test_health_check_port_only_with_local_policy():
    result = build(lb_service(healthCheckNodePort=31000))
    (sp,) = result.state.service_ports.values()
    assert sp.exposure.health_check_node_port == 0


def test_bad_source_range_skips_that_service_only_with_a_one_line_error():
    result = build(lb_service("bad", loadBalancerSourceRanges=["10.0.0.0/8", "10.0.0/33"]),
                   lb_service("good", "10.96.0.11"))
    assert [sp.name for sp in result.state.service_ports.values()] == ["good"]
    (problem,) = result.problems
    text = str(problem)
    assert "\n" not in text
    assert "test.yaml: document 1" in text and "spec.loadBalancerSourceRanges[1]" in text
    assert "'10.0.0/33' is not a CIDR" in text


def test_bad_addresses_and_ports_name_their_field():
    cases = [
        (service("a", externalIPs=["nope"]), "spec.externalIPs[0]"),
        (service("b", type="NodePort"), "spec.ports[0].nodePort"),   # none given: not allocated
        (service("c", type="NodePort", ports=[dict(PORTS[0], nodePort=70000)]), "spec.ports[0].nodePort"),
        (lb_service("d", externalTrafficPolicy="Nowhere"), "spec.externalTrafficPolicy"),
    ]
    bad_lb = lb_service("e")
    bad_lb["status"]["loadBalancer"]["ingress"][0]["ip"] = "300.1.1.1"
    cases.append((bad_lb, "status.loadBalancer.ingress[0].ip"))
    for svc, field in cases:
        result = build(svc)
        assert not result.state.service_ports, field
        assert [p.path for p in result.problems] == [field]


def test_local_internal_policy_keeps_every_endpoint_for_outside_traffic():
    svc = service("web", type="NodePort", ports=[dict(PORTS[0], targetPort=None)],
                  internalTrafficPolicy="Local")
    sl = endpoint_slice("web-1", "web", [ep("10.244.0.5", node="node-a"), ep("10.244.1.5", node="node-b")],
                        ports=[{"name": "http", "port": 80, "protocol": "TCP"}])
    (sp,) = build(svc, sl, node_name="node-a").state.service_ports.values()
    assert [str(e.address) for e in sp.endpoints] == ["10.244.0.5"]
    assert [str(e.address) for e in sp.all_endpoints] == ["10.244.0.5", "10.244.1.5"]
    assert [e.node_name for e in sp.all_endpoints] == ["node-a", "node-b"]


def test_the_yaml_file_source_reads_them(tmp_path):
    path = tmp_path / "svc.yaml"
    path.write_text(dump_all([lb_service(externalTrafficPolicy="Local", healthCheckNodePort=31000)]))
    (sp,) = read_config(path).state.service_ports.values()
    assert sp.node_port == 30080 and sp.exposure.local and sp.exposure.health_check_node_port == 31000
    assert [str(ip) for ip in sp.exposure.lb_ips] == ["10.240.0.7", "fd00:240::7"]


def test_the_kubernetes_source_reads_them(api, make_source, tmp_path):  # noqa: F811
    path = tmp_path / "svc.yaml"
    sl = endpoint_slice("web-1", "web", [ep("10.244.0.5")])
    objects = [lb_service(externalTrafficPolicy="Local", healthCheckNodePort=31000,
                          loadBalancerSourceRanges=["192.0.2.0/24"]), sl]
    path.write_text(dump_all(objects))
    for obj in objects:
        api.apply(obj)
    state = make_source().first()
    assert state == read_config(path, node_name="node-a").state
    (sp,) = state.service_ports.values()
    assert sp.exposure.lb_ips and sp.exposure.source_ranges and sp.node_port == 30080
