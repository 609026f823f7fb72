"""`meshbpf lab objects`: the lab's pods as the Kubernetes objects kubectl prints.

Saved beside NetworkPolicies in the agent's config folder, they let the
policy readers see the lab as they would see a cluster: Namespaces labelled
ns=<name> and kubernetes.io/metadata.name=<name> (as the API server labels
every namespace, and as the upstream e2e suite labels its own), Pods labelled
pod=<name> with their uid, IPs and a spec.nodeName that an agent started
with default flags (--node-name = this host's name) takes as its own.
"""

from __future__ import annotations

from typing import Iterable

from .netlab import Pod

NS_NAME_LABEL = "kubernetes.io/metadata.name"


def namespace_object(name: str) -> dict:
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": {"ns": name, NS_NAME_LABEL: name}},
            "status": {"phase": "Active"}}


def pod_object(pod: Pod, node_name: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod.pod_name, "namespace": pod.namespace, "uid": pod.uid,
                         "labels": {"pod": pod.pod_name}},
            "spec": {"nodeName": node_name,
                     "containers": [{"name": "main", "image": "meshbpf-lab"}]},
            "status": {"phase": "Running", "podIP": str(pod.ipv4),
                       "podIPs": [{"ip": str(pod.ipv4)}, {"ip": str(pod.ipv6)}]}}


def lab_objects(pods: Iterable[Pod], node_name: str) -> dict:
    """One `kind: List`, namespaces first, as `kubectl get ns,pods -o yaml` prints."""
    pods = sorted(pods, key=lambda p: (p.namespace, p.pod_name))
    namespaces = sorted({p.namespace for p in pods})
    return {"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": ""},
            "items": [namespace_object(ns) for ns in namespaces]
            + [pod_object(p, node_name) for p in pods]}
