"""The Kubernetes NetworkPolicy e2e world, as objects kubectl would print.

Namespaces x, y, z; pods a, b, c in each, labelled pod=<name>; namespaces
labelled ns=<name> and kubernetes.io/metadata.name=<name>; every pod serves
80 and 81 over TCP and UDP under the e2e suite's port names (serve-80-tcp ...).
All pods run on node-1, the node the compiler is asked about.
"""

from __future__ import annotations

import ipaddress

from meshbpf.policy.compile import compile_policies
from meshbpf.sources.kube_objects import SourceObject
from meshbpf.sources.kube_policy import read_policy_objects

NAMESPACES = "xyz"
POD_NAMES = "abc"
ALL = [f"{ns}/{p}" for ns in NAMESPACES for p in POD_NAMES]
NODE = "node-1"
NS_LABEL = "kubernetes.io/metadata.name"


def ip_of(pod: str) -> ipaddress.IPv4Address:
    ns, name = pod.split("/")
    return ipaddress.ip_address(f"10.0.{NAMESPACES.index(ns) + 1}.{POD_NAMES.index(name) + 1}")


def pod_obj(pod: str, extra_labels: dict | None = None, **spec) -> dict:
    ns, name = pod.split("/")
    ports = [{"name": f"serve-{port}-{proto.lower()}", "containerPort": port, "protocol": proto}
             for port in (80, 81) for proto in ("TCP", "UDP")]
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "uid": f"uid-{ns}-{name}",
                         "labels": {"pod": name, **(extra_labels or {})}},
            "spec": {"nodeName": NODE, "containers": [{"name": "c", "image": "agnhost",
                                                       "ports": ports}], **spec},
            "status": {"phase": "Running", "podIP": str(ip_of(pod)), "podIPs": [{"ip": str(ip_of(pod))}]}}


def ns_obj(ns: str, extra_labels: dict | None = None) -> dict:
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": ns, "labels": {"ns": ns, NS_LABEL: ns, **(extra_labels or {})}}}


def netpol(name: str, ns: str, selector: dict | None = None, *, ingress: list | None = None,
           egress: list | None = None, types: list | None = None) -> dict:
    """As the e2e helpers build them: policyTypes lists Ingress when ingress
    rules are given (even none), Egress likewise."""
    spec: dict = {"podSelector": selector or {}}
    if types is None:
        types = (["Ingress"] if ingress is not None else []) + (["Egress"] if egress is not None else [])
    spec["policyTypes"] = types
    if ingress is not None:
        spec["ingress"] = ingress
    if egress is not None:
        spec["egress"] = egress
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def labels(**kv) -> dict:
    return {"matchLabels": dict(kv)}


def expr(key: str, op: str, *values: str) -> dict:
    req = {"key": key, "operator": op}
    if values:
        req["values"] = list(values)
    return {"matchExpressions": [req]}


def world(policies: list[dict], pod_labels: dict | None = None, ns_labels: dict | None = None) -> list[dict]:
    pod_labels, ns_labels = pod_labels or {}, ns_labels or {}
    return ([ns_obj(ns, ns_labels.get(ns)) for ns in NAMESPACES]
            + [pod_obj(p, pod_labels.get(p)) for p in ALL] + policies)


def compiled(objects: list[dict], node_ips: dict | None = None):
    inputs = read_policy_objects(SourceObject(o, f"test.yaml: document {i + 1}")
                                 for i, o in enumerate(objects))
    assert not inputs.problems, "\n".join(map(str, inputs.problems))
    return compile_policies(inputs.pods, inputs.namespaces, inputs.policies, NODE, node_ips)


class Reach:
    """The e2e suite's Reachability: every pair allowed until told otherwise."""

    def __init__(self) -> None:
        self.m = {(s, d): True for s in ALL for d in ALL}

    @staticmethod
    def _match(pod: str, sel: str) -> bool:
        # sel: "" (any pod), "x" (namespace x) or "x/a" (one pod)
        return not sel or pod == sel or pod.split("/")[0] == sel

    def peer(self, src: str, dst: str, value: bool) -> "Reach":
        for s, d in self.m:
            if self._match(s, src) and self._match(d, dst):
                self.m[s, d] = value
        return self

    def expect(self, src: str, dst: str, value: bool) -> "Reach":
        self.m[src, dst] = value
        return self

    def all_ingress(self, dst: str, value: bool) -> "Reach":
        return self.peer("", dst, value)

    def all_egress(self, src: str, value: bool) -> "Reach":
        return self.peer(src, "", value)
