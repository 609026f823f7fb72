"""Services + EndpointSlices -> DesiredState, with kube-proxy's semantics."""

from __future__ import annotations

import copy
import ipaddress
import json

import pytest

from k8s_builders import build, endpoint_slice, ep, eps_of, fe, kube_list, service
from meshbpf.model import DEFAULT_AFFINITY_TIMEOUT
from meshbpf.sources.errors import ConfigError
from meshbpf.sources.yaml_file import read_config


def one_service(svc: dict, *slices: dict, node_name: str | None = None):
    result = build(svc, *slices, node_name=node_name)
    assert result.problems == []
    return result


# --- The kubectl fixtures ------------------------------------------------------

EXPECTED_FRONTENDS = {
    # frontend: (service, port name, affinity timeout)
    fe("10.96.40.17", 9090): ("default/api", "grpc", 0),
    fe("10.96.88.5", 9000): ("default/batch", "", 0),
    fe("10.96.77.7", 80): ("default/draining", "http", 0),
    fe("10.96.0.1", 443): ("default/kubernetes", "https", 0),
    fe("10.96.81.25", 8125, "UDP"): ("default/node-local", "statsd", 0),
    fe("10.96.30.3", 80): ("default/sticky", "http", 600),
    fe("10.96.12.34", 80): ("default/web", "http", 0),
    fe("10.96.12.34", 443): ("default/web", "https", 0),
    fe("fd00:10:96::1234", 80): ("default/web", "http", 0),
    fe("fd00:10:96::1234", 443): ("default/web", "https", 0),
    fe("10.96.0.10", 53, "UDP"): ("kube-system/kube-dns", "dns", 0),
    fe("10.96.0.10", 53, "TCP"): ("kube-system/kube-dns", "dns-tcp", 0),
    fe("10.96.0.10", 9153, "TCP"): ("kube-system/kube-dns", "metrics", 0),
    fe("10.96.140.2", 80): ("monitoring/grafana", "service", 0),
}


def test_kubectl_list_dump_gives_one_frontend_per_cluster_ip_and_port(cluster_list):
    result = read_config(cluster_list)
    got = {f: (sp.service, sp.port_name, sp.affinity_timeout)
           for f, sp in result.state.service_ports.items()}
    assert got == EXPECTED_FRONTENDS
    assert result.state.services() == {s for s, _, _ in EXPECTED_FRONTENDS.values()}


def test_kubectl_list_dump_resolves_endpoint_ports_from_the_slices(cluster_list):
    result = read_config(cluster_list)
    assert eps_of(result, fe("10.96.0.1", 443)) == [("172.18.0.2", 6443, True, True, False)]
    assert eps_of(result, fe("10.96.12.34", 80)) == [
        ("10.244.1.5", 8080, True, True, False), ("10.244.2.7", 8080, True, True, False)]
    assert eps_of(result, fe("10.96.12.34", 443)) == [
        ("10.244.1.5", 8443, True, True, False), ("10.244.2.7", 8443, True, True, False)]
    assert eps_of(result, fe("10.96.140.2", 80)) == [("10.244.2.60", 3000, True, True, False)]
    # A service whose pods are all gone has a frontend with no endpoints.
    assert eps_of(result, fe("10.96.88.5", 9000)) == []


def test_multidocument_dump_gives_the_same_state_as_the_list_dump(cluster_list, cluster_multidoc):
    as_list = read_config(cluster_list)
    as_docs = read_config(cluster_multidoc)
    assert as_docs.state == as_list.state
    assert len(as_docs.notes) == len(as_list.notes) == 2


def test_headless_and_externalname_services_are_skipped_with_a_note(cluster_list):
    result = read_config(cluster_list)  # raises on any problem
    services = result.state.services()
    assert "default/db-headless" not in services
    assert "default/external-db" not in services
    notes = "\n".join(result.notes)
    assert "default/db-headless" in notes and "headless" in notes
    assert "default/external-db" in notes and "ExternalName" in notes
    # The headless service's slice is ignored too: its pod is nowhere.
    addresses = {str(e.address) for sp in result.state.service_ports.values() for e in sp.endpoints}
    assert "10.244.1.40" not in addresses


def test_headless_service_written_by_hand_is_a_note_not_a_problem():
    result = build(service("db", "None", clusterIPs=["None"], ipFamilies=["IPv4"]),
                   endpoint_slice("db-1", "db", [ep("10.244.1.40")]))
    assert result.problems == []
    assert result.state.service_ports == {}
    assert any("headless" in n for n in result.notes)


def test_externalname_service_without_cluster_ip_is_a_note_not_a_problem():
    svc = service("ext", clusterIP=None, clusterIPs=None, ipFamilies=None,
                  ipFamilyPolicy=None, internalTrafficPolicy=None, selector=None,
                  type="ExternalName", externalName="db.example.com")
    result = build(svc)
    assert result.problems == []
    assert result.state.service_ports == {}
    assert any("ExternalName" in n and "default/ext" in n for n in result.notes)


def test_local_traffic_policy_keeps_only_this_nodes_endpoints(cluster_list):
    statsd = fe("10.96.81.25", 8125, "UDP")
    on_a = read_config(cluster_list, node_name="node-a")
    on_b = read_config(cluster_list, node_name="node-b")
    assert [a for a, *_ in eps_of(on_a, statsd)] == ["10.244.1.50"]
    assert [a for a, *_ in eps_of(on_b, statsd)] == ["10.244.2.50"]
    # Cluster policy services are not filtered.
    assert len(eps_of(on_b, fe("10.96.12.34", 80))) == 2


def test_local_traffic_policy_on_a_node_with_no_local_endpoint_gives_none():
    svc = service("statsd", internalTrafficPolicy="Local")
    sl = endpoint_slice("statsd-1", "statsd", [ep("10.244.1.5", node="node-a")])
    result = one_service(svc, sl, node_name="node-c")
    assert eps_of(result, fe("10.96.0.10", 80)) == []


# --- Merging slices and endpoint conditions -------------------------------------

def test_endpoints_merge_across_the_slices_of_a_service():
    result = one_service(
        service("web"),
        endpoint_slice("web-a", "web", [ep("10.244.1.1"), ep("10.244.1.2")]),
        endpoint_slice("web-b", "web", [ep("10.244.2.1")]),
    )
    assert [a for a, *_ in eps_of(result, fe("10.96.0.10", 80))] == [
        "10.244.1.1", "10.244.1.2", "10.244.2.1"]


def test_slices_of_other_services_and_namespaces_are_not_merged():
    result = one_service(
        service("web"),
        endpoint_slice("web-a", "web", [ep("10.244.1.1")]),
        endpoint_slice("api-a", "api", [ep("10.244.1.2")]),
        endpoint_slice("web-x", "web", [ep("10.244.1.3")], namespace="other"),
    )
    assert [a for a, *_ in eps_of(result, fe("10.96.0.10", 80))] == ["10.244.1.1"]


def test_an_endpoint_listed_in_two_slices_appears_once_preferring_the_ready_copy():
    result = one_service(
        service("web"),
        endpoint_slice("web-a", "web", [ep("10.244.1.1", ready=False, serving=False)]),
        endpoint_slice("web-b", "web", [ep("10.244.1.1", ready=True)]),
    )
    assert eps_of(result, fe("10.96.0.10", 80)) == [("10.244.1.1", 8080, True, True, False)]


def test_unset_conditions_mean_ready_serving_and_not_terminating():
    no_conditions = ep("10.244.1.1")
    del no_conditions["conditions"]
    empty_conditions = ep("10.244.1.2", ready=None, serving=None, terminating=None)
    assert empty_conditions["conditions"] == {}
    result = one_service(service("web"),
                         endpoint_slice("web-a", "web", [no_conditions, empty_conditions]))
    assert eps_of(result, fe("10.96.0.10", 80)) == [
        ("10.244.1.1", 8080, True, True, False), ("10.244.1.2", 8080, True, True, False)]


def test_serving_defaults_to_true_even_when_ready_is_false():
    result = one_service(service("web"), endpoint_slice("web-a", "web", [
        ep("10.244.1.1", ready=False, serving=None, terminating=True)]))
    assert eps_of(result, fe("10.96.0.10", 80)) == [("10.244.1.1", 8080, False, True, True)]


def test_terminating_only_counts_when_set():
    result = one_service(service("web"), endpoint_slice("web-a", "web", [
        ep("10.244.1.1", ready=False, serving=True, terminating=None),
        ep("10.244.1.2", ready=False, serving=True, terminating=True),
    ]))
    assert eps_of(result, fe("10.96.0.10", 80)) == [
        ("10.244.1.1", 8080, False, True, False), ("10.244.1.2", 8080, False, True, True)]


def test_not_ready_endpoints_are_kept_in_the_state_with_their_conditions(cluster_list):
    # Choosing which endpoints to use is the model's job (usable_endpoints);
    # the source keeps every endpoint with its conditions.
    result = read_config(cluster_list)
    assert eps_of(result, fe("10.96.77.7", 80)) == [
        ("10.244.1.20", 8080, False, True, True),
        ("10.244.2.21", 8080, False, False, True),
        ("10.244.2.22", 8080, False, False, False),
    ]
    assert eps_of(result, fe("10.96.40.17", 9090)) == [
        ("10.244.1.10", 9090, True, True, False),
        ("10.244.1.9", 9090, False, True, True),
        ("10.244.2.11", 9090, True, True, False),
    ]


def test_only_the_first_address_of_an_endpoint_is_used():
    two = ep("10.244.1.1")
    two["addresses"].append("10.244.1.99")
    result = one_service(service("web"), endpoint_slice("web-a", "web", [two]))
    assert [a for a, *_ in eps_of(result, fe("10.96.0.10", 80))] == ["10.244.1.1"]


def test_node_name_and_zone_are_carried_to_the_endpoint():
    result = one_service(service("web"), endpoint_slice("web-a", "web", [
        ep("10.244.1.1", node="node-b", zone="zone-b")]))
    (endpoint,) = result.state.service_ports[fe("10.96.0.10", 80)].endpoints
    assert (endpoint.node_name, endpoint.zone) == ("node-b", "zone-b")


def test_slice_without_service_name_label_is_skipped_with_a_note():
    sl = endpoint_slice("stray", "web", [ep("10.244.1.1")])
    del sl["metadata"]["labels"]["kubernetes.io/service-name"]
    result = build(service("web"), sl)
    assert result.problems == []
    assert eps_of(result, fe("10.96.0.10", 80)) == []
    assert any("default/stray" in n and "kubernetes.io/service-name" in n for n in result.notes)


def test_fqdn_slice_is_skipped_with_a_note():
    result = build(service("web"), endpoint_slice("web-fqdn", "web", [ep("db.example.com")],
                                                  address_type="FQDN"))
    assert result.problems == []
    assert eps_of(result, fe("10.96.0.10", 80)) == []
    assert any("FQDN" in n for n in result.notes)


# --- Port matching ---------------------------------------------------------------

DNS_PORTS = [
    {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
    {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53},
]


def test_slice_ports_match_service_ports_by_name():
    result = one_service(
        service("dns", ports=DNS_PORTS),
        endpoint_slice("dns-a", "dns", [ep("10.244.0.2")], ports=[
            {"name": "dns-tcp", "port": 5301, "protocol": "TCP"},
            {"name": "dns", "port": 5302, "protocol": "UDP"},
        ]),
    )
    assert eps_of(result, fe("10.96.0.10", 53, "UDP")) == [("10.244.0.2", 5302, True, True, False)]
    assert eps_of(result, fe("10.96.0.10", 53, "TCP")) == [("10.244.0.2", 5301, True, True, False)]


def test_slice_port_with_the_right_name_but_another_protocol_does_not_match():
    result = one_service(
        service("dns", ports=[{"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53}]),
        endpoint_slice("dns-a", "dns", [ep("10.244.0.2")],
                       ports=[{"name": "dns", "port": 53, "protocol": "TCP"}]),
    )
    assert eps_of(result, fe("10.96.0.10", 53, "UDP")) == []


def test_slice_port_protocol_defaults_to_tcp():
    result = one_service(
        service("web"),
        endpoint_slice("web-a", "web", [ep("10.244.1.1")], ports=[{"name": "http", "port": 8080}]),
    )
    assert eps_of(result, fe("10.96.0.10", 80)) == [("10.244.1.1", 8080, True, True, False)]


def test_unnamed_single_port_matches_the_slices_empty_port_name():
    svc = service("web", ports=[{"port": 80, "protocol": "TCP", "targetPort": "web"}])
    sl = endpoint_slice("web-a", "web", [ep("10.244.1.1")],
                        ports=[{"name": "", "port": 8081, "protocol": "TCP"}])
    result = one_service(svc, sl)
    sp = result.state.service_ports[fe("10.96.0.10", 80)]
    assert sp.port_name == ""
    assert eps_of(result, fe("10.96.0.10", 80)) == [("10.244.1.1", 8081, True, True, False)]


def test_named_target_port_is_resolved_by_the_slice_not_by_the_service():
    svc = service("web", ports=[{"name": "http", "port": 80, "protocol": "TCP",
                                 "targetPort": "http-alt"}])
    result = one_service(svc, endpoint_slice("web-a", "web", [ep("10.244.1.1")]))
    assert eps_of(result, fe("10.96.0.10", 80)) == [("10.244.1.1", 8080, True, True, False)]


def test_slice_port_without_a_number_gives_no_endpoints():
    result = one_service(
        service("web"),
        endpoint_slice("web-a", "web", [ep("10.244.1.1")],
                       ports=[{"name": "http", "port": None, "protocol": "TCP"}]),
    )
    assert eps_of(result, fe("10.96.0.10", 80)) == []


def test_slice_without_ports_uses_the_numeric_target_port():
    # The hand-written shorthand: no ports in the slice, the Service's
    # numeric targetPort is the endpoint port.
    result = one_service(service("web"),
                         endpoint_slice("web-a", "web", [ep("10.244.1.1")], ports=None))
    assert eps_of(result, fe("10.96.0.10", 80)) == [("10.244.1.1", 8080, True, True, False)]


def test_target_port_given_as_digit_string_is_a_number():
    svc = service("web", ports=[{"name": "http", "port": 80, "protocol": "TCP",
                                 "targetPort": "9090"}])
    result = one_service(svc, endpoint_slice("web-a", "web", [ep("10.244.1.1")], ports=None))
    assert eps_of(result, fe("10.96.0.10", 80)) == [("10.244.1.1", 9090, True, True, False)]


def test_sctp_port_is_skipped_with_a_note_and_the_other_ports_kept():
    svc = service("sig", ports=[
        {"name": "sctp", "port": 3868, "protocol": "SCTP", "targetPort": 3868},
        {"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080},
    ])
    result = build(svc, endpoint_slice("sig-a", "sig", [ep("10.244.1.1")]))
    assert result.problems == []
    assert set(result.state.service_ports) == {fe("10.96.0.10", 80)}
    assert any("SCTP" in n for n in result.notes)


def test_a_slice_port_for_the_skipped_sctp_port_is_skipped_too():
    """kube-controller-manager lists the SCTP port in the slice as well:
    it must not turn the skipped port into a problem of the whole slice."""
    svc = service("sig", ports=[
        {"name": "sctp", "port": 3868, "protocol": "SCTP", "targetPort": 3868},
        {"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080},
    ])
    slice_ports = [{"name": "sctp", "port": 3868, "protocol": "SCTP"},
                   {"name": "http", "port": 8080, "protocol": "TCP"}]
    result = build(svc, endpoint_slice("sig-a", "sig", [ep("10.244.1.1")], ports=slice_ports))
    assert result.problems == []
    assert eps_of(result, fe("10.96.0.10", 80)) == [("10.244.1.1", 8080, True, True, False)]


# --- Dual stack --------------------------------------------------------------------

def test_dual_stack_service_gets_a_frontend_per_family_with_that_familys_endpoints():
    svc = service("web", ["10.96.0.10", "fd00:96::10"], ipFamilyPolicy="PreferDualStack")
    result = one_service(
        svc,
        endpoint_slice("web-v4", "web", [ep("10.244.1.1"), ep("10.244.1.2")]),
        endpoint_slice("web-v6", "web", [ep("fd00:244::1")], address_type="IPv6"),
    )
    assert set(result.state.service_ports) == {fe("10.96.0.10", 80), fe("fd00:96::10", 80)}
    assert [a for a, *_ in eps_of(result, fe("10.96.0.10", 80))] == ["10.244.1.1", "10.244.1.2"]
    assert [a for a, *_ in eps_of(result, fe("fd00:96::10", 80))] == ["fd00:244::1"]


def test_ipv6_primary_dual_stack_service():
    svc = service("web", ["fd00:96::10", "10.96.0.10"], ipFamilyPolicy="RequireDualStack")
    assert svc["spec"]["ipFamilies"] == ["IPv6", "IPv4"]
    result = one_service(
        svc,
        endpoint_slice("web-v4", "web", [ep("10.244.1.1")]),
        endpoint_slice("web-v6", "web", [ep("fd00:244::1")], address_type="IPv6"),
    )
    assert [a for a, *_ in eps_of(result, fe("fd00:96::10", 80))] == ["fd00:244::1"]
    assert [a for a, *_ in eps_of(result, fe("10.96.0.10", 80))] == ["10.244.1.1"]


def test_single_stack_ipv4_service_ignores_ipv6_slices():
    result = one_service(
        service("web"),
        endpoint_slice("web-v6", "web", [ep("fd00:244::1")], address_type="IPv6"),
    )
    assert set(result.state.service_ports) == {fe("10.96.0.10", 80)}
    assert eps_of(result, fe("10.96.0.10", 80)) == []


# --- Session affinity ----------------------------------------------------------------

def test_client_ip_affinity_without_timeout_uses_kubernetes_default():
    result = one_service(service("web", sessionAffinity="ClientIP"))
    assert DEFAULT_AFFINITY_TIMEOUT == 10800
    assert result.state.service_ports[fe("10.96.0.10", 80)].affinity_timeout == 10800


def test_client_ip_affinity_with_empty_config_uses_kubernetes_default():
    result = one_service(service("web", sessionAffinity="ClientIP",
                                 sessionAffinityConfig={"clientIP": {}}))
    assert result.state.service_ports[fe("10.96.0.10", 80)].affinity_timeout == 10800


def test_client_ip_affinity_with_explicit_timeout():
    result = one_service(service("web", sessionAffinity="ClientIP",
                                 sessionAffinityConfig={"clientIP": {"timeoutSeconds": 30}}))
    assert result.state.service_ports[fe("10.96.0.10", 80)].affinity_timeout == 30


def test_affinity_applies_to_every_frontend_of_the_service():
    svc = service("web", ["10.96.0.10", "fd00:96::10"], sessionAffinity="ClientIP",
                  sessionAffinityConfig={"clientIP": {"timeoutSeconds": 77}},
                  ports=[{"name": "a", "port": 80, "targetPort": 80},
                         {"name": "b", "port": 81, "targetPort": 81}])
    result = one_service(svc)
    assert len(result.state.service_ports) == 4
    assert {sp.affinity_timeout for sp in result.state.service_ports.values()} == {77}


def test_no_session_affinity_means_timeout_zero():
    result = one_service(service("web", sessionAffinity=None),
                         service("api", "10.96.0.11", sessionAffinity="None",
                                 sessionAffinityConfig={"clientIP": {"timeoutSeconds": 30}}))
    assert {sp.affinity_timeout for sp in result.state.service_ports.values()} == {0}


# --- Invalid input: every problem names the place, the field and the reason ---------

def _svc_port(**changes):
    def mutate(objs):
        objs[0]["spec"]["ports"][0].update(changes)
        for k, v in changes.items():
            if v is None:
                del objs[0]["spec"]["ports"][0][k]
    return mutate


def _svc_spec(**changes):
    def mutate(objs):
        for k, v in changes.items():
            if v is None:
                objs[0]["spec"].pop(k, None)
            else:
                objs[0]["spec"][k] = v
    return mutate


def _slice(fn):
    def mutate(objs):
        fn(objs[1])
    return mutate


def _set(obj, path, value):
    *parents, last = path
    for p in parents:
        obj = obj[p]
    if value is _DELETE:
        del obj[last]
    else:
        obj[last] = value


_DELETE = object()

INVALID = [
    # (id, mutation, document with the problem, field path, reason fragment)
    ("service name missing", lambda o: _set(o[0], ["metadata", "name"], _DELETE),
     1, "metadata.name", "missing"),
    ("service port missing", _svc_port(port=None), 1, "spec.ports[0].port", "missing"),
    ("service port out of range", _svc_port(port=70000),
     1, "spec.ports[0].port", "70000 is not a port number"),
    ("service port not a number", _svc_port(port="http"),
     1, "spec.ports[0].port", "expected an integer"),
    ("service port is a boolean", _svc_port(port=True),
     1, "spec.ports[0].port", "expected an integer"),
    ("target port out of range", _svc_port(targetPort=0),
     1, "spec.ports[0].targetPort", "not a port number"),
    ("target port is a boolean", _svc_port(targetPort=True),
     1, "spec.ports[0].targetPort", "expected a port number or name"),
    ("protocol in lower case", _svc_port(protocol="tcp"),
     1, "spec.ports[0].protocol", "'tcp' is not TCP, UDP or SCTP"),
    ("cluster IP does not parse", _svc_spec(clusterIP="10.96.0.300", clusterIPs=["10.96.0.300"]),
     1, "spec.clusterIPs[0]", "'10.96.0.300' is not an IP address"),
    ("second cluster IP does not parse",
     _svc_spec(clusterIPs=["10.96.0.10", "fd00::zz"], ipFamilies=["IPv4", "IPv6"]),
     1, "spec.clusterIPs[1]", "'fd00::zz' is not an IP address"),
    ("cluster IP missing", _svc_spec(clusterIP=None, clusterIPs=None),
     1, "spec.clusterIP", "meshbpf does not allocate cluster IPs"),
    ("clusterIPs disagrees with clusterIP", _svc_spec(clusterIPs=["10.96.0.11"]),
     1, "spec.clusterIPs[0]", "differs from spec.clusterIP"),
    ("two cluster IPs of one family",
     _svc_spec(clusterIPs=["10.96.0.10", "10.96.0.11"], ipFamilies=None),
     1, "spec.clusterIPs", "at most one address per IP family"),
    ("ipFamilies does not match", _svc_spec(ipFamilies=["IPv6"]),
     1, "spec.ipFamilies[0]", "IPv6 does not match cluster IP 10.96.0.10"),
    ("ipFamilies nonsense", _svc_spec(ipFamilies=["IPv5"]),
     1, "spec.ipFamilies[0]", "'IPv5' is not IPv4 or IPv6"),
    ("no ports", _svc_spec(ports=[]), 1, "spec.ports", "needs at least one port"),
    ("second port without name",
     _svc_spec(ports=[{"name": "a", "port": 80}, {"port": 81}]),
     1, "spec.ports[1].name", "required when a Service has more than one port"),
    ("port name used twice",
     _svc_spec(ports=[{"name": "a", "port": 80}, {"name": "a", "port": 81}]),
     1, "spec.ports[1].name", "'a' is used twice"),
    ("unknown service type", _svc_spec(type="Ingress"), 1, "spec.type", "not a Service type"),
    ("unknown affinity", _svc_spec(sessionAffinity="Cookie"),
     1, "spec.sessionAffinity", "not None or ClientIP"),
    ("affinity timeout zero",
     _svc_spec(sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 0}}),
     1, "spec.sessionAffinityConfig.clientIP.timeoutSeconds", "out of range"),
    ("affinity timeout above a day",
     _svc_spec(sessionAffinity="ClientIP",
               sessionAffinityConfig={"clientIP": {"timeoutSeconds": 86401}}),
     1, "spec.sessionAffinityConfig.clientIP.timeoutSeconds", "out of range"),
    ("unknown internal traffic policy", _svc_spec(internalTrafficPolicy="Node"),
     1, "spec.internalTrafficPolicy", "not Cluster or Local"),
    ("unknown service field", _svc_spec(sessionAfinity="ClientIP"),
     1, "spec.sessionAfinity", "unknown field 'sessionAfinity' (did you mean 'sessionAffinity'?)"),
    ("unknown port field", _svc_port(targetport=8080),
     1, "spec.ports[0].targetport", "did you mean 'targetPort'?"),
    ("wrong api version", lambda o: _set(o[0], ["apiVersion"], "v2"),
     1, "apiVersion", "'v2' is not supported"),
    ("label value not a string", lambda o: _set(o[0], ["metadata", "labels", "tier"], 3),
     1, "metadata.labels.tier", "expected a string"),
    ("slice address does not parse",
     _slice(lambda s: _set(s, ["endpoints", 0, "addresses", 0], "10.244.1.300")),
     2, "endpoints[0].addresses[0]", "'10.244.1.300' is not an IP address"),
    ("slice address of the wrong family",
     _slice(lambda s: _set(s, ["endpoints", 0, "addresses", 0], "fd00::1")),
     2, "endpoints[0].addresses[0]", "not an IPv4 address"),
    ("slice endpoint without addresses",
     _slice(lambda s: _set(s, ["endpoints", 0, "addresses"], [])),
     2, "endpoints[0].addresses", "missing"),
    ("slice address type unknown", _slice(lambda s: _set(s, ["addressType"], "IP")),
     2, "addressType", "'IP' is not IPv4, IPv6 or FQDN"),
    ("slice port out of range", _slice(lambda s: _set(s, ["ports", 0, "port"], 0)),
     2, "ports[0].port", "0 is not a port number"),
    ("slice condition not a boolean",
     _slice(lambda s: _set(s, ["endpoints", 0, "conditions", "ready"], "yes")),
     2, "endpoints[0].conditions.ready", "expected a boolean"),
    ("unknown slice field",
     _slice(lambda s: _set(s, ["endpoints", 0, "condition"], {"ready": True})),
     2, "endpoints[0].condition", "did you mean 'conditions'?"),
    ("slice api version v1beta1",
     _slice(lambda s: _set(s, ["apiVersion"], "discovery.k8s.io/v1beta1")),
     2, "apiVersion", "use discovery.k8s.io/v1"),
    ("slice port name resolves to no service port",
     _slice(lambda s: _set(s, ["ports", 0, "name"], "htp")),
     2, "ports[0].name", "'htp' matches no port of Service default/web (its ports: 'http')"),
    ("named target port with a slice that lists no ports",
     lambda o: (_set(o[0], ["spec", "ports", 0, "targetPort"], "http"),
                _set(o[1], ["ports"], None)),
     1, "spec.ports[0].targetPort", "named port 'http' cannot be resolved"),
]


@pytest.mark.parametrize("mutate, doc, path, reason",
                         [case[1:] for case in INVALID], ids=[case[0] for case in INVALID])
def test_invalid_input_names_document_field_and_reason(mutate, doc, path, reason):
    objs = [service("web"), endpoint_slice("web-a", "web", [ep("10.244.1.1")])]
    mutate(objs)
    result = build(*objs)
    matching = [p for p in result.problems if p.path == path]
    assert matching, f"no problem at {path}: {[str(p) for p in result.problems]}"
    problem = matching[0]
    assert reason in problem.reason
    text = str(problem)
    assert "test.yaml" in text
    assert f"document {doc}" in text
    assert path in text
    assert reason in text


@pytest.mark.parametrize("mutate, doc, path, reason",
                         [case[1:] for case in INVALID], ids=[case[0] for case in INVALID])
def test_invalid_input_in_a_file_is_a_config_error_naming_file_document_field_and_reason(
        tmp_path, mutate, doc, path, reason):
    objs = [service("web"), endpoint_slice("web-a", "web", [ep("10.244.1.1")])]
    mutate(objs)
    # JSON documents are YAML documents; written one per `---` section.
    f = tmp_path / "services.yaml"
    f.write_text("".join("---\n" + json.dumps(o, indent=2) + "\n" for o in objs))
    with pytest.raises(ConfigError) as exc:
        read_config(f)
    texts = [str(p) for p in exc.value.problems if p.path == path]
    assert texts, [str(p) for p in exc.value.problems]
    assert str(f) in texts[0]
    assert f": document {doc} (line " in texts[0]
    assert f": {path}: " in texts[0]
    assert reason in texts[0]
    assert str(exc.value).count(str(f)) == len(exc.value.problems)


def test_valid_base_objects_of_the_invalid_cases_have_no_problems():
    # Guards the table above: every problem comes from the mutation.
    result = build(service("web"), endpoint_slice("web-a", "web", [ep("10.244.1.1")]))
    assert result.problems == []
    assert eps_of(result, fe("10.96.0.10", 80)) == [("10.244.1.1", 8080, True, True, False)]


def test_problem_names_the_object_it_is_about():
    objs = [service("web", namespace="shop", ports=[{"name": "http", "port": 0}])]
    (problem,) = build(*objs).problems
    assert problem.obj == "Service shop/web"
    assert "(Service shop/web)" in str(problem)


def test_a_service_with_a_problem_is_left_out_of_the_state():
    result = build(service("web", ports=[{"name": "http", "port": 0}]),
                   service("api", "10.96.0.11"))
    assert len(result.problems) == 1
    assert set(result.state.service_ports) == {fe("10.96.0.11", 80)}


def test_every_problem_is_reported_not_just_the_first():
    svc = service("web", ports=[{"name": "a", "port": 0}, {"name": "b", "port": 70000}],
                  sessionAffinity="Sticky")
    paths = {p.path for p in build(svc).problems}
    assert paths == {"spec.ports[0].port", "spec.ports[1].port", "spec.sessionAffinity"}


def test_problem_inside_a_kind_list_names_the_item():
    lst = kube_list(service("web"), service("api", "10.96.0.300"))
    (problem,) = build(lst).problems
    assert problem.where == "test.yaml: document 1 (line 1): items[1]"
    assert "items[1]" in str(problem) and "spec.clusterIPs[0]" in str(problem)


def test_service_defined_twice_is_a_problem_naming_the_first_definition():
    result = build(service("web"), service("web", "10.96.0.11"))
    (problem,) = result.problems
    assert "document 2" in problem.where
    assert problem.path == "metadata.name"
    assert "defined twice (first at test.yaml: document 1" in problem.reason


def test_slice_defined_twice_is_a_problem():
    sl = endpoint_slice("web-a", "web", [ep("10.244.1.1")])
    result = build(service("web"), sl, copy.deepcopy(sl))
    (problem,) = result.problems
    assert "document 3" in problem.where and "defined twice" in problem.reason


def test_same_name_in_two_namespaces_is_not_a_duplicate():
    result = build(service("web"), service("web", "10.96.0.11", namespace="shop"))
    assert result.problems == []
    assert result.state.services() == {"default/web", "shop/web"}


def test_two_services_on_one_frontend_is_a_problem():
    result = build(service("web"), service("api"))
    (problem,) = result.problems
    assert "document 2" in problem.where
    assert "10.96.0.10:80/TCP is already used by Service default/web" in problem.reason
    assert result.state.service_ports[fe("10.96.0.10", 80)].service == "default/web"


def test_same_address_and_port_with_different_protocols_is_not_a_conflict():
    result = build(service("dns", ports=DNS_PORTS))
    assert result.problems == []
    assert len(result.state.service_ports) == 2


def test_document_that_is_not_a_map_is_a_problem():
    (problem,) = build(["not", "an", "object"]).problems
    assert "document 1" in problem.where
    assert "expected a Kubernetes object (a map), got a list" in str(problem)


def test_document_without_kind_is_a_problem():
    obj = service("web")
    del obj["kind"]
    (problem,) = build(obj).problems
    assert problem.path == "kind" and "missing" in problem.reason


def test_empty_document_is_ignored():
    result = build(None, service("web"))
    assert result.problems == [] and len(result.state.service_ports) == 1


def test_other_kinds_are_skipped_with_a_note():
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {}}
    result = build(cm, service("web"))
    assert result.problems == []
    assert any("ConfigMap" in n for n in result.notes)


def test_unknown_field_on_the_list_itself_is_a_problem():
    lst = kube_list(service("web"))
    lst["itmes"] = []
    (problem,) = build(lst).problems
    assert problem.path == "itmes" and "did you mean 'items'?" in problem.reason


def test_ipaddress_objects_in_frontends_are_normalised():
    # "fd00:96:0::10" and "fd00:96::10" are the same address.
    svc = service("web", ["10.96.0.10", "fd00:96:0::10"])
    result = one_service(svc)
    assert fe("fd00:96::10", 80) in result.state.service_ports
    assert ipaddress.ip_address("fd00:96::10") in {f.address for f in result.state.service_ports}


# --- Bugs and contract gaps found while writing these tests ------------------------

def test_placeholder_slice_of_a_scaled_to_zero_service_is_accepted(fixtures_dir):
    result = read_config(fixtures_dir / "scaled-to-zero.yaml")
    assert eps_of(result, fe("10.96.99.9", 80)) == []


def test_bad_cluster_ip_without_cluster_ips_names_the_cluster_ip_field():
    svc = service("web", "10.96.0.10", clusterIPs=None, ipFamilies=None)
    svc["spec"]["clusterIP"] = "10.96.0.300"
    (problem,) = build(svc).problems
    assert problem.path == "spec.clusterIP"


def test_service_with_a_clashing_frontend_contributes_nothing():
    clash = service("api", ports=[{"name": "a", "port": 80}, {"name": "b", "port": 81}])
    result = build(service("web"), clash)
    assert len(result.problems) == 1
    assert "default/api" not in result.state.services()


@pytest.mark.parametrize("where", ["spec.ports", "endpoints", "slice ports"])
def test_empty_list_item_is_a_problem_not_a_crash(tmp_path, where):
    svc = service("web")
    sl = endpoint_slice("web-a", "web", [ep("10.244.1.1")])
    {"spec.ports": svc["spec"]["ports"], "endpoints": sl["endpoints"],
     "slice ports": sl["ports"]}[where].append(None)
    f = tmp_path / "services.yaml"
    f.write_text("---\n" + json.dumps(svc) + "\n---\n" + json.dumps(sl) + "\n")
    with pytest.raises(ConfigError):
        read_config(f)


def test_list_with_scalar_items_is_a_problem_not_a_crash():
    lst = kube_list()
    lst["items"] = 5
    result = build(lst)
    assert [p.path for p in result.problems] == ["items"]


# --- IPv4-mapped IPv6 addresses: the same map key as their IPv4 address ----------

def test_ipv4_mapped_cluster_ip_is_refused_so_two_services_cannot_share_a_map_key():
    # Both would be the 16-byte key ::ffff:10.0.0.1 port 80: one would be dropped.
    result = build(service("v4", "10.0.0.1"), service("mapped", "::ffff:10.0.0.1"))
    (problem,) = result.problems
    assert problem.obj == "Service default/mapped" and problem.path == "spec.clusterIPs[0]"
    assert "::ffff:a00:1 is an IPv4-mapped IPv6 address, the same as 10.0.0.1" in problem.reason
    assert result.state.services() == {"default/v4"}


def test_ipv4_mapped_cluster_ip_alone_is_refused_too():
    (problem,) = build(service("mapped", "::ffff:10.0.0.1")).problems
    assert "write 10.0.0.1 instead" in problem.reason


def test_ipv4_mapped_endpoint_address_is_refused():
    sl = endpoint_slice("web-a", "web", [ep("fd00:244::1"), ep("::ffff:10.244.1.1")],
                        address_type="IPv6")
    result = build(service("web", "fd00:96::10"), sl)
    (problem,) = result.problems
    assert problem.path == "endpoints[1].addresses[0]" and "IPv4-mapped" in problem.reason


def test_repeated_strings_are_shared_and_compare_as_before():
    # Decoded JSON gives each value its own string: the state shares them
    # (namespace, port name, protocol, node name, zone) instead.
    objs = json.loads(json.dumps([
        service("a", "10.96.0.1", namespace="shop"), service("b", "10.96.0.2", namespace="shop"),
        endpoint_slice("a-x", "a", [ep("10.244.1.1", zone="z1")], namespace="shop"),
        endpoint_slice("b-x", "b", [ep("10.244.1.2", zone="z1")], namespace="shop")]))
    result = build(*objs)
    assert result.problems == []
    a, b = (result.state.service_ports[fe(ip, 80)] for ip in ("10.96.0.1", "10.96.0.2"))
    assert a.namespace == "shop" and a.namespace is b.namespace
    assert a.port_name == "http" and a.port_name is b.port_name
    assert a.frontend.protocol == "TCP" and a.frontend.protocol is b.frontend.protocol
    (ea,), (eb,) = a.endpoints, b.endpoints
    assert (ea.node_name, ea.zone) == ("node-a", "z1")
    assert ea.node_name is eb.node_name and ea.zone is eb.zone


def test_a_port_name_that_is_not_a_string_is_a_problem_not_an_internal_error():
    # Names are shared (interned) as they are read: only strings are.
    result = build(service("web", ports=[{"name": 80, "port": 80, "protocol": "TCP"}]))
    assert [(p.path, p.reason) for p in result.problems] == [
        ("spec.ports[0].name", "expected a string, got an integer 80")]
