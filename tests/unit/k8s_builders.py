"""Builders for Service and EndpointSlice objects shaped like kubectl prints them.

Each builder returns a fresh plain dict (what a YAML loader hands over), with
the fields kubectl fills in (uid, resourceVersion, creationTimestamp, labels,
ownerReferences, clusterIPs, ipFamilies, ipFamilyPolicy,
internalTrafficPolicy, status.loadBalancer) so the schema check sees
realistic input.
"""

from __future__ import annotations

import ipaddress
import itertools
from typing import Any

from meshbpf.model import Frontend
from meshbpf.sources.kube_objects import BuildResult, SourceObject, build_state

_uids = itertools.count(1)


def _uid() -> str:
    return f"00000000-0000-4000-8000-{next(_uids):012d}"


def _family(ip: str) -> str:
    try:
        return f"IPv{ipaddress.ip_address(ip).version}"
    except ValueError:  # "None" (headless) or a deliberately bad address
        return "IPv4"


def service(name: str, cluster_ips: list[str] | str = "10.96.0.10", *,
            namespace: str = "default", ports: list[dict] | None = None,
            **spec: Any) -> dict:
    """A Service; `spec` keys override or add spec fields (None removes one)."""
    if isinstance(cluster_ips, str):
        cluster_ips = [cluster_ips]
    families = [_family(ip) for ip in cluster_ips]
    body: dict[str, Any] = {
        "clusterIP": cluster_ips[0],
        "clusterIPs": list(cluster_ips),
        "internalTrafficPolicy": "Cluster",
        "ipFamilies": families,
        "ipFamilyPolicy": "SingleStack" if len(cluster_ips) == 1 else "RequireDualStack",
        "ports": ports if ports is not None else [
            {"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
        "selector": {"app": name},
        "sessionAffinity": "None",
        "type": "ClusterIP",
    }
    for key, value in spec.items():
        if value is None:
            body.pop(key, None)
        else:
            body[key] = value
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "creationTimestamp": "2024-04-02T08:11:37Z",
            "labels": {"app": name},
            "name": name,
            "namespace": namespace,
            "resourceVersion": "4821",
            "uid": _uid(),
        },
        "spec": body,
        "status": {"loadBalancer": {}},
    }


def ep(address: str, *, ready: bool | None = True, serving: bool | None = True,
       terminating: bool | None = False, node: str | None = "node-a",
       zone: str | None = None) -> dict:
    """One endpoint; a condition given as None is left out (unset)."""
    conditions = {k: v for k, v in
                  (("ready", ready), ("serving", serving), ("terminating", terminating))
                  if v is not None}
    out: dict[str, Any] = {
        "addresses": [address],
        "conditions": conditions,
        "targetRef": {"kind": "Pod", "name": f"pod-{address}", "namespace": "default",
                      "uid": _uid()},
    }
    if node is not None:
        out["nodeName"] = node
    if zone is not None:
        out["zone"] = zone
    return out


def endpoint_slice(name: str, service_name: str, endpoints: list[dict] | None, *,
                   namespace: str = "default", address_type: str = "IPv4",
                   ports: list[dict] | None | str = "default") -> dict:
    """An EndpointSlice of service_name. ports="default" is one port named
    "http" on 8080/TCP; ports=None prints `ports: null` like kubectl does."""
    if ports == "default":
        ports = [{"name": "http", "port": 8080, "protocol": "TCP"}]
    return {
        "addressType": address_type,
        "apiVersion": "discovery.k8s.io/v1",
        "endpoints": endpoints,
        "kind": "EndpointSlice",
        "metadata": {
            "annotations": {
                "endpoints.kubernetes.io/last-change-trigger-time": "2024-04-05T12:30:11Z"},
            "creationTimestamp": "2024-04-02T08:11:37Z",
            "generateName": f"{service_name}-",
            "generation": 3,
            "labels": {
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                "kubernetes.io/service-name": service_name,
            },
            "name": name,
            "namespace": namespace,
            "ownerReferences": [{
                "apiVersion": "v1", "blockOwnerDeletion": True, "controller": True,
                "kind": "Service", "name": service_name, "uid": _uid(),
            }],
            "resourceVersion": "5040",
            "uid": _uid(),
        },
        "ports": ports,
    }


def kube_list(*items: dict) -> dict:
    return {"apiVersion": "v1", "items": list(items), "kind": "List",
            "metadata": {"resourceVersion": ""}}


def build(*objects: dict, node_name: str | None = None) -> BuildResult:
    """build_state over objects, each as its own document of "test.yaml"."""
    return build_state(
        [SourceObject(obj, f"test.yaml: document {i + 1} (line 1)")
         for i, obj in enumerate(objects)],
        node_name=node_name)


def fe(address: str, port: int, protocol: str = "TCP") -> Frontend:
    return Frontend(ipaddress.ip_address(address), port, protocol)


def eps_of(result: BuildResult, frontend: Frontend) -> list[tuple[str, int, bool, bool, bool]]:
    """(address, port, ready, serving, terminating) of a frontend's endpoints, sorted."""
    sp = result.state.service_ports[frontend]
    return sorted((str(e.address), e.port, e.ready, e.serving, e.terminating)
                  for e in sp.endpoints)
