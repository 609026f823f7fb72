"""Field checking: unknown fields (with a suggestion) and wrong types."""

from __future__ import annotations

import copy

import pytest

from k8s_builders import endpoint_slice, ep, service
from meshbpf.sources import schema
from meshbpf.sources.yaml_file import parse_documents


def test_realistic_service_and_slice_have_no_schema_problems():
    assert schema.check(service("web", ["10.96.0.10", "fd00::10"]), schema.SERVICE) == []
    assert schema.check(endpoint_slice("web-a", "web", [ep("10.244.1.1", zone="z")]),
                        schema.ENDPOINT_SLICE) == []


def test_every_object_of_the_kubectl_dump_passes_the_schema(cluster_list):
    (doc,) = parse_documents(cluster_list, cluster_list.read_text())
    assert schema.check(doc.obj, schema.LIST) == []
    kinds = {"Service": schema.SERVICE, "EndpointSlice": schema.ENDPOINT_SLICE}
    for item in doc.obj["items"]:
        assert schema.check(item, kinds[item["kind"]]) == [], item["metadata"]["name"]


def test_unknown_top_level_field_is_reported_with_the_nearest_name():
    svc = service("web")
    svc["spce"] = {}
    assert schema.check(svc, schema.SERVICE) == [
        ("spce", "unknown field 'spce' (did you mean 'spec'?)")]


def test_unknown_nested_field_has_the_full_path():
    svc = service("web", ports=[{"name": "a", "port": 80},
                                {"name": "b", "port": 81, "tagretPort": 8081}])
    assert schema.check(svc, schema.SERVICE) == [
        ("spec.ports[1].tagretPort", "unknown field 'tagretPort' (did you mean 'targetPort'?)")]


def test_unknown_field_deep_in_a_slice_endpoint():
    sl = endpoint_slice("web-a", "web", [ep("10.244.1.1"), ep("10.244.1.2")])
    sl["endpoints"][1]["conditions"]["terminatng"] = True
    assert schema.check(sl, schema.ENDPOINT_SLICE) == [
        ("endpoints[1].conditions.terminatng",
         "unknown field 'terminatng' (did you mean 'terminating'?)")]


def test_unknown_field_with_no_close_name_has_no_suggestion():
    svc = service("web")
    svc["spec"]["zzzzqqq"] = 1
    ((path, reason),) = schema.check(svc, schema.SERVICE)
    assert path == "spec.zzzzqqq"
    assert reason == "unknown field 'zzzzqqq'"
    assert "did you mean" not in reason


def test_several_unknown_fields_are_all_reported_in_a_stable_order():
    svc = service("web")
    svc["spec"]["typ"] = "ClusterIP"
    svc["spec"]["clusterIp"] = "10.96.0.10"
    svc["metadata"]["lables"] = {}
    assert schema.check(svc, schema.SERVICE) == [
        ("metadata.lables", "unknown field 'lables' (did you mean 'labels'?)"),
        ("spec.clusterIp", "unknown field 'clusterIp' (did you mean 'clusterIP'?)"),
        ("spec.typ", "unknown field 'typ' (did you mean 'type'?)"),
    ]


def test_non_string_key_is_reported_not_crashed_on():
    svc = service("web")
    svc["spec"][80] = "http"
    ((path, reason),) = schema.check(svc, schema.SERVICE)
    assert path == "spec.80" and "unknown field 80" in reason


def test_fields_meshbpf_does_not_read_but_kubernetes_defines_are_accepted():
    svc = service("lb", type="LoadBalancer", externalTrafficPolicy="Local",
                  healthCheckNodePort=31000, loadBalancerSourceRanges=["0.0.0.0/0"],
                  allocateLoadBalancerNodePorts=True, loadBalancerClass="x",
                  externalIPs=["1.2.3.4"], publishNotReadyAddresses=True,
                  trafficDistribution="PreferClose")
    svc["metadata"]["finalizers"] = ["service.kubernetes.io/load-balancer-cleanup"]
    svc["metadata"]["managedFields"] = [{"manager": "kubectl", "fieldsV1": {"f:spec": {}}}]
    svc["status"] = {"loadBalancer": {"ingress": [{"ip": "1.2.3.4", "ipMode": "VIP"}]},
                     "conditions": [{"type": "x"}]}
    assert schema.check(svc, schema.SERVICE) == []


def test_any_accepts_anything_below_it():
    sl = endpoint_slice("web-a", "web", [ep("10.244.1.1")])
    sl["endpoints"][0]["targetRef"] = {"whatever": [1, {"deep": True}]}
    sl["metadata"]["ownerReferences"] = "not even a list"
    assert schema.check(sl, schema.ENDPOINT_SLICE) == []


def test_null_means_unset_and_is_accepted():
    sl = endpoint_slice("web-a", "web", None, ports=None)
    sl["metadata"]["labels"]["x"] = "y"
    svc = service("web", selector=None)
    svc["spec"]["selector"] = None
    svc["spec"]["sessionAffinityConfig"] = {"clientIP": None}
    assert schema.check(sl, schema.ENDPOINT_SLICE) == []
    assert schema.check(svc, schema.SERVICE) == []


@pytest.mark.parametrize("mutate, path, reason", [
    (lambda s: s["spec"]["ports"][0].update(port="80"),
     "spec.ports[0].port", "expected an integer, got a string '80'"),
    (lambda s: s["spec"]["ports"][0].update(port=True),
     "spec.ports[0].port", "expected an integer, got a boolean True"),
    (lambda s: s["spec"]["ports"][0].update(port=80.0),
     "spec.ports[0].port", "expected an integer, got float 80.0"),
    (lambda s: s["spec"].update(ports={"name": "http", "port": 80}),
     "spec.ports", "expected a list, got a map"),
    (lambda s: s["spec"].update(clusterIPs="10.96.0.10"),
     "spec.clusterIPs", "expected a list, got a string"),
    (lambda s: s["spec"].update(clusterIP=["10.96.0.10"]),
     "spec.clusterIP", "expected a string, got a list"),
    (lambda s: s.update(spec=["ports"]),
     "spec", "expected a map, got a list"),
    (lambda s: s["metadata"].update(labels=["app"]),
     "metadata.labels", "expected a map of strings, got a list"),
    (lambda s: s["metadata"]["labels"].update(version=2),
     "metadata.labels.version", "expected a string, got an integer"),
    (lambda s: s["spec"].update(publishNotReadyAddresses="true"),
     "spec.publishNotReadyAddresses", "expected a boolean, got a string 'true'"),
    (lambda s: s["spec"].update(sessionAffinityConfig={"clientIP": {"timeoutSeconds": "3h"}}),
     "spec.sessionAffinityConfig.clientIP.timeoutSeconds", "expected an integer"),
])
def test_wrong_types_are_reported_with_path_and_reason(mutate, path, reason):
    svc = service("web")
    mutate(svc)
    problems = schema.check(svc, schema.SERVICE)
    assert [p for p, _ in problems] == [path]
    assert reason in problems[0][1]


def test_check_does_not_change_its_input():
    svc = service("web")
    svc["spec"]["typo"] = 1
    before = copy.deepcopy(svc)
    schema.check(svc, schema.SERVICE)
    assert svc == before
