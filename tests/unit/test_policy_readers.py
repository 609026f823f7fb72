"""Reading Pods, Namespaces and NetworkPolicies: the shapes kubectl prints,
upstream defaults, and bad input as one-line Problems, never an exception."""

from __future__ import annotations

import ipaddress
from typing import Any, Iterator

import pytest

from wrong_types import WRONG, paths, replaced
from meshbpf.policy.model import LabelSelector, Peer, PolicyPort, Requirement, Rule
from meshbpf.sources.kube_objects import SourceObject
from meshbpf.sources.kube_policy import read_policy_objects
from policy_world import ns_obj, pod_obj

POLICY = {
    "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
    "metadata": {"name": "web", "namespace": "x", "labels": {"app": "web"}},
    "spec": {
        "podSelector": {"matchLabels": {"pod": "a"},
                        "matchExpressions": [{"key": "tier", "operator": "In", "values": ["web"]}]},
        "policyTypes": ["Ingress", "Egress"],
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}},
                               "namespaceSelector": {"matchLabels": {"ns": "y"}}},
                              {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}],
                     "ports": [{"protocol": "TCP", "port": 80, "endPort": 90},
                               {"protocol": "UDP", "port": "dns"}]}],
        "egress": [{"to": [{"namespaceSelector": {}}], "ports": [{"port": 443}]}],
    },
}
POD = pod_obj("x/a", hostNetwork=False)
NAMESPACE = ns_obj("x")


def read(*objs: Any):
    return read_policy_objects(SourceObject(o, f"test.yaml: document {i + 1}") for i, o in enumerate(objs))


def test_a_full_policy_is_read():
    result = read(POLICY, POD, NAMESPACE)
    assert not result.problems
    (p,) = result.policies
    assert p.pod_selector == LabelSelector.of({"pod": "a"}, Requirement("tier", "In", ("web",)))
    assert p.policy_types == {"Ingress", "Egress"}
    (rule,) = p.ingress
    assert rule.peers[0] == Peer(LabelSelector.of({"pod": "b"}), LabelSelector.of({"ns": "y"}))
    assert rule.peers[1].ip_block.except_ == (ipaddress.ip_network("10.1.0.0/16"),)
    assert rule.ports == (PolicyPort("TCP", 80, 90), PolicyPort("UDP", "dns"))
    assert p.egress == (Rule((Peer(namespace_selector=LabelSelector()),), (PolicyPort("TCP", 443),)),)
    (pod,) = result.pods
    assert (pod.namespace, pod.name, pod.uid, pod.node_name) == ("x", "a", "uid-x-a", "node-1")
    assert pod.named_ports["serve-81-udp"] == ("UDP", 81)
    assert pod.ips == (ipaddress.ip_address("10.0.1.1"),)
    (ns,) = result.namespaces
    assert ns.labels["kubernetes.io/metadata.name"] == "x"


@pytest.mark.parametrize("spec, types", [
    ({"podSelector": {}}, {"Ingress"}),
    ({"podSelector": {}, "egress": [{}]}, {"Ingress", "Egress"}),
    ({"podSelector": {}, "egress": []}, {"Ingress"}),
    ({"podSelector": {}, "policyTypes": ["Egress"]}, {"Egress"}),
    ({"podSelector": {}, "policyTypes": [], "egress": [{}]}, {"Ingress", "Egress"}),
])
def test_policy_types_default_as_upstream(spec, types):
    obj = {**POLICY, "spec": spec}
    (p,) = read(obj).policies
    assert p.policy_types == types


def test_a_kind_list_is_read_and_other_kinds_are_ignored():
    result = read({"apiVersion": "v1", "kind": "List", "items": [POLICY, POD, NAMESPACE,
                                                               {"apiVersion": "v1", "kind": "Service"}]})
    assert not result.problems
    assert (len(result.policies), len(result.pods), len(result.namespaces)) == (1, 1, 1)


@pytest.mark.parametrize("path, value, field, reason", [
    (("spec", "podSelector", "matchExpressions", 0, "operator"), "Equals",
     "spec.podSelector.matchExpressions[0].operator", "'Equals' is not one of"),
    (("spec", "podSelector", "matchExpressions", 0, "values"), [],
     "spec.podSelector.matchExpressions[0].values", "must not be empty"),
    (("spec", "ingress", 0, "from", 1, "ipBlock", "cidr"), "10.0.0.1",
     "spec.ingress[0].from[1].ipBlock.cidr", "is not a CIDR"),
    (("spec", "ingress", 0, "from", 1, "ipBlock", "cidr"), "10.0.0.1/8",
     "spec.ingress[0].from[1].ipBlock.cidr", "host bits set"),
    (("spec", "ingress", 0, "from", 1, "ipBlock", "except"), ["192.168.0.0/16"],
     "spec.ingress[0].from[1].ipBlock.except[0]", "not inside cidr"),
    (("spec", "ingress", 0, "from", 0), {}, "spec.ingress[0].from[0]", "needs podSelector"),
    (("spec", "ingress", 0, "ports", 0, "port"), 70000, "spec.ingress[0].ports[0].port", "not a port number"),
    (("spec", "ingress", 0, "ports", 0, "endPort"), 79, "spec.ingress[0].ports[0].endPort", "below port 80"),
    (("spec", "ingress", 0, "ports", 1, "endPort"), 90, "spec.ingress[0].ports[1].endPort", "numeric port"),
    (("spec", "ingress", 0, "ports", 1, "protocol"), "ICMP", "spec.ingress[0].ports[1].protocol", "not TCP"),
    (("spec", "ingress", 0, "ports", 1, "port"), "80", "spec.ingress[0].ports[1].port", "not a port name"),
    (("spec", "policyTypes"), ["Ingres"], "spec.policyTypes", "'Ingres' is not Ingress or Egress"),
    (("spec", "ingress", 0, "form"), [], "spec.ingress[0].form", "unknown field 'form' (did you mean 'from'?)"),
    (("apiVersion",), "networking.k8s.io/v1beta1", "apiVersion", "is not supported"),
])
def test_a_bad_policy_is_one_problem_naming_the_field(path, value, field, reason):
    result = read(replaced(POLICY, path, value), POD)
    (problem,) = result.problems
    assert problem.where == "test.yaml: document 1" and problem.obj == "NetworkPolicy x/web"
    assert problem.path == field and reason in problem.reason, str(problem)
    assert "\n" not in str(problem)
    assert not result.policies and len(result.pods) == 1  # one bad object blocks no other


@pytest.mark.parametrize("path, value, field", [
    (("status", "podIP"), "10.0.1.300", "status.podIP"),
    (("status", "podIPs", 0, "ip"), "nope", "status.podIPs[0].ip"),
    (("spec", "containers", 0, "ports", 0, "containerPort"), 0, "spec.containers[0].ports[0].containerPort"),
    (("spec", "containers", 0, "ports", 0, "protocol"), "ICMP", "spec.containers[0].ports[0].protocol"),
    (("spec", "hostNetwork"), "yes", "spec.hostNetwork"),
])
def test_a_bad_pod_is_a_problem_naming_the_field(path, value, field):
    result = read(replaced(POD, path, value), POLICY)
    (problem,) = result.problems
    assert problem.obj == "Pod x/a" and problem.path == field, str(problem)
    assert not result.pods and len(result.policies) == 1


def test_an_object_defined_twice_is_a_problem():
    result = read(POLICY, POLICY)
    (problem,) = result.problems
    assert "defined twice (first at test.yaml: document 1)" in str(problem)
    assert len(result.policies) == 1


# --- Wrong types anywhere: a problem, never an exception ----------------------

UNREAD = ("status", "creationTimestamp", "image", "name")  # pod fields read loosely or not at all


def wrong_type_cases() -> Iterator[Any]:
    for name, obj in (("NetworkPolicy", POLICY), ("Pod", POD), ("Namespace", NAMESPACE)):
        for path in paths(obj):
            for wrong, value in WRONG.items():
                yield pytest.param(obj, path, value, id=f"{name}:{'.'.join(map(str, path))}={wrong}")


@pytest.mark.parametrize("obj, path, value", list(wrong_type_cases()))
def test_a_wrong_type_anywhere_is_a_problem_not_an_exception(obj, path, value):
    result = read(replaced(obj, path, value))  # must not raise
    for problem in result.problems:
        assert "\n" not in str(problem) and "internal error" not in str(problem), str(problem)
    original = obj
    for key in path:
        original = original[key]
    if value is None or type(value) is type(original) or set(path) & set(UNREAD):
        return
    if path[-1] == "port" and type(value) in (str, int):
        return  # a port may be a number or a name
    assert result.problems, f"{path} = {value!r} was accepted"


def test_objects_left_out_for_a_problem_are_named_so_their_previous_version_can_stay():
    bad_pod = pod_obj("x/a")
    bad_pod["status"]["podIP"] = "nope"
    nameless = ns_obj("y")
    del nameless["metadata"]["name"]
    done = pod_obj("x/b")
    done["status"]["phase"] = "Succeeded"   # left out on purpose: not a problem
    inputs = read(bad_pod, nameless, done, ns_obj("z"))
    assert inputs.rejected == {("Pod", "x", "a")}
    assert [n.name for n in inputs.namespaces] == ["z"] and not inputs.pods


def test_the_cached_reader_reads_each_object_once_per_version(monkeypatch):
    import meshbpf.sources.kube_policy as kube_policy
    objs = [dict(o, metadata={**o["metadata"], "resourceVersion": str(i)})
            for i, o in enumerate([pod_obj("x/a"), pod_obj("x/b"), ns_obj("x"), POLICY])]
    bad = dict(pod_obj("x/c"), status={"podIP": "nope"})
    bad["metadata"] = {**bad["metadata"], "resourceVersion": "9"}
    sources = lambda objects: [SourceObject(o, "API server") for o in objects]  # noqa: E731
    reader = kube_policy.CachedReader()
    first = reader.read(sources(objs + [bad]))
    whole = read_policy_objects(sources(objs + [bad]))
    assert (first.pods, first.namespaces, first.policies, first.rejected) == (
        whole.pods, whole.namespaces, whole.policies, whole.rejected)
    assert list(map(str, first.problems)) == list(map(str, whole.problems))
    calls = []
    real = kube_policy.read_policy_objects
    monkeypatch.setattr(kube_policy, "read_policy_objects", lambda objects: calls.append(1) or real(objects))
    changed = dict(objs[1], metadata={**objs[1]["metadata"], "resourceVersion": "10", "labels": {"pod": "z"}})
    again = reader.read(sources([objs[0], changed, objs[2], objs[3]]))
    assert len(calls) == 1 and [p.labels for p in again.pods] == [{"pod": "a"}, {"pod": "z"}]
    assert not again.problems
