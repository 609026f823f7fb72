"""Building Service and EndpointSlice objects for test configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from meshbpf.sources.yaml_load import dump_all


def service(name: str, ips: list[str], ports: list[dict], *, namespace: str = "default",
            affinity_timeout: int | None = None) -> dict:
    spec: dict[str, Any] = {"clusterIP": ips[0], "clusterIPs": ips, "ports": ports}
    if affinity_timeout is not None:
        spec["sessionAffinity"] = "ClientIP"
        spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": affinity_timeout}}
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def port(name: str, number: int, target: int | str, protocol: str = "TCP") -> dict:
    return {"name": name, "protocol": protocol, "port": number, "targetPort": target}


def endpoint(address: str, ready: bool = True, serving: bool | None = None,
             terminating: bool | None = None) -> dict:
    cond: dict[str, bool] = {"ready": ready}
    if serving is not None:
        cond["serving"] = serving
    if terminating is not None:
        cond["terminating"] = terminating
    return {"addresses": [address], "conditions": cond}


def endpoint_slice(name: str, service_name: str, endpoints: list[dict], ports: list[dict], *,
                   namespace: str = "default", address_type: str = "IPv4") -> dict:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": namespace,
                         "labels": {"kubernetes.io/service-name": service_name}},
            "addressType": address_type, "endpoints": endpoints, "ports": ports}


def slice_port(name: str, number: int, protocol: str = "TCP") -> dict:
    return {"name": name, "protocol": protocol, "port": number}


def write(path: Path, objects: list[dict]) -> Path:
    """Writes atomically, so the agent never reads half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(dump_all(objects))  # quotes `y` and `n`, which the agent reads as booleans
    tmp.rename(path)
    return path


def agent_config(enabled: bool = True, cgroups: list[str] | None = None,
                 cidrs=("10.244.0.0/24", "fd00:244::/64")) -> dict:
    spec: dict = {"enabled": enabled, "podCIDRs": list(cidrs)}
    if cgroups is not None:
        spec["cgroups"] = cgroups
    return {"apiVersion": "meshbpf.io/v1alpha1", "kind": "AgentConfig",
            "metadata": {"name": "meshbpf"}, "spec": {"socketRedirect": spec}}
