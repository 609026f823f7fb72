"""Lab namespaces without root: pod names, uids, kubelet-style cgroups, and
`lab objects` read back by the policy readers."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from meshbpf.cli import cli
from meshbpf.lab import netlab
from meshbpf.lab.objects import lab_objects
from meshbpf.policy.compile import compile_policies, verdict
from meshbpf.sources.kube_objects import SourceObject
from meshbpf.sources.kube_policy import read_policy_objects

CG = Path("/sys/fs/cgroup/unified/meshbpf-lab-t1")


def make_pod(name: str, index: int) -> netlab.Pod:
    ns, pod = netlab.parse_pod(name)
    uid = netlab.pod_uid("t1", ns or "default", pod)
    cgroup = netlab.kubelet_cgroup(CG, uid) if ns else None
    return netlab.Pod(name, f"mbl-t1-{name.replace('/', '.')}", index, uid, cgroup)


@pytest.mark.parametrize("spec, parsed", [
    ("web-1", (None, "web-1")), ("x/a", ("x", "a")), ("kube-system/dns-0", ("kube-system", "dns-0")),
])
def test_pod_names(spec, parsed):
    assert netlab.parse_pod(spec) == parsed


@pytest.mark.parametrize("spec", ["x/", "/a", "X/a", "x/A", "x/a/b", "x/-a", "x_y/a", "web_1",
                                  "a" * 21 + "/b", "x/" + "a" * 25])
def test_bad_pod_names_are_refused_with_the_name(spec):
    with pytest.raises(netlab.LabError) as exc:
        netlab.parse_pod(spec)
    assert repr(spec) in str(exc.value) or repr(spec.partition("/")[2]) in str(exc.value)


def test_namespaced_pods_get_a_kubelet_cgroup_inside_the_lab_cgroup():
    pod = make_pod("x/a", 2)
    assert pod.cgroup == CG / "kubepods" / "besteffort" / f"pod{pod.uid}"
    assert pod.cgroup.is_relative_to(CG)  # the lab cgroup's programs apply to it
    assert (pod.namespace, pod.pod_name) == ("x", "a")
    bare = make_pod("web-1", 3)
    assert bare.cgroup is None and bare.namespace == "default" and bare.pod_name == "web-1"


def test_uids_are_stable_and_distinct():
    assert netlab.pod_uid("t1", "x", "a") == netlab.pod_uid("t1", "x", "a")
    assert len({netlab.pod_uid(lab, ns, "a") for lab in ("t1", "t2") for ns in ("x", "y")}) == 4


def test_objects_are_what_the_policy_readers_read():
    pods = [make_pod(n, i + 2) for i, n in enumerate(["x/a", "x/b", "y/a", "client"])]
    doc = yaml.safe_load(yaml.safe_dump(lab_objects(pods, "node-7")))
    result = read_policy_objects([SourceObject(doc, "lab.yaml: document 1")])
    assert not result.problems, result.problems
    assert sorted(ns.name for ns in result.namespaces) == ["default", "x", "y"]
    x = next(ns for ns in result.namespaces if ns.name == "x")
    assert x.labels == {"ns": "x", "kubernetes.io/metadata.name": "x"}
    by_key = {p.key: p for p in result.pods}
    xa = by_key["x", "a"]
    assert xa.labels == {"pod": "a"} and xa.node_name == "node-7" and xa.uid == pods[0].uid
    assert xa.ips == (ipaddress.ip_address("10.244.0.2"), ipaddress.ip_address("fd00:244::2"))
    assert ("default", "client") in by_key


def test_objects_with_a_policy_compile_for_this_node():
    pods = [make_pod(n, i + 2) for i, n in enumerate(["x/a", "x/b", "y/a"])]
    policy = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
              "metadata": {"name": "deny", "namespace": "x"},
              "spec": {"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"]}}
    srcs = [SourceObject(lab_objects(pods, "node-7"), "lab.yaml"), SourceObject(policy, "np.yaml")]
    result = read_policy_objects(srcs)
    c = compile_policies(result.pods, result.namespaces, result.policies, "node-7")
    assert not verdict(c, pods[2].ipv4, pods[0].ipv4, "TCP", 80)
    assert verdict(c, pods[0].ipv4, pods[2].ipv4, "TCP", 80)


class FakeLab:
    def __init__(self, name):
        self.name = name

    @classmethod
    def attach(cls, name):
        lab = cls(name)
        lab.pods = {p.name: p for p in (make_pod("x/a", 2), make_pod("web", 3))}
        return lab


def test_lab_objects_command_prints_a_kubectl_list(monkeypatch):
    monkeypatch.setattr(netlab, "Lab", FakeLab)
    monkeypatch.setattr("socket.gethostname", lambda: "this-node")
    result = CliRunner().invoke(cli, ["lab", "objects", "t1"])
    assert result.exit_code == 0, result.output
    doc = yaml.safe_load(result.output)
    assert doc["kind"] == "List"
    kinds = [(o["kind"], o["metadata"]["name"]) for o in doc["items"]]
    assert kinds == [("Namespace", "default"), ("Namespace", "x"), ("Pod", "web"), ("Pod", "a")]
    assert {o["spec"]["nodeName"] for o in doc["items"] if o["kind"] == "Pod"} == {"this-node"}
