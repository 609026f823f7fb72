"""`meshbpf lab objects`: the lab's pods as the Kubernetes objects kubectl prints.

Saved beside NetworkPolicies in the agent's config folder, they let the
policy readers see the lab as they would see a cluster: Namespaces labelled
ns=<name> and kubernetes.io/metadata.name=<name> (as the API server labels
every namespace, and as the upstream e2e suite labels its own), Pods labelled
pod=<name> with their uid, IPs and a spec.nodeName that an agent started
with default flags (--node-name = this host's name) takes as its own.
A pod named in `meshed` carries Istio's injection marker
(`sidecar.istio.io/status`), so an agent with AgentConfig's capture on
(mesh: istio) captures its traffic; extra `annotations` (Istio's traffic.*
ones) narrow that, as on a cluster.
"""

from __future__ import annotations

from typing import Iterable, Mapping

from .netlab import Pod

NS_NAME_LABEL = "kubernetes.io/metadata.name"


def namespace_object(name: str) -> dict:
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": {"ns": name, NS_NAME_LABEL: name}},
            "status": {"phase": "Active"}}


ISTIO_STATUS = "sidecar.istio.io/status"
# What Istio's injector writes there, trimmed: the marker's presence is what counts.
ISTIO_STATUS_VALUE = '{"containers":["istio-proxy"],"initContainers":null}'


def meshed_annotations(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A lab pod's annotations that mark it meshed (Istio), plus extra."""
    return {ISTIO_STATUS: ISTIO_STATUS_VALUE, **(extra or {})}


def pod_object(pod: Pod, node_name: str, annotations: Mapping[str, str] | None = None) -> dict:
    meta = {"name": pod.pod_name, "namespace": pod.namespace, "uid": pod.uid,
            "labels": {"pod": pod.pod_name}}
    if annotations:
        meta["annotations"] = dict(annotations)
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": meta,
            "spec": {"nodeName": node_name,
                     "containers": [{"name": "main", "image": "meshbpf-lab"}]},
            "status": {"phase": "Running", "podIP": str(pod.ipv4),
                       "podIPs": [{"ip": str(pod.ipv4)}, {"ip": str(pod.ipv6)}]}}


def lab_objects(pods: Iterable[Pod], node_name: str,
                meshed: Mapping[str, Mapping[str, str]] | Iterable[str] = ()) -> dict:
    """One `kind: List`, namespaces first, as `kubectl get ns,pods -o yaml` prints.
    meshed: "namespace/name" of the pods to mark meshed, or a map of them to
    their extra annotations."""
    pods = sorted(pods, key=lambda p: (p.namespace, p.pod_name))
    namespaces = sorted({p.namespace for p in pods})
    extra = meshed if isinstance(meshed, Mapping) else {name: {} for name in meshed}

    def notes(p: Pod):
        key = f"{p.namespace}/{p.pod_name}"
        return meshed_annotations(extra[key]) if key in extra else None
    return {"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": ""},
            "items": [namespace_object(ns) for ns in namespaces]
            + [pod_object(p, node_name, notes(p)) for p in pods]}
