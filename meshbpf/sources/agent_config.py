"""meshbpf's own settings object: `kind: AgentConfig`.

    apiVersion: meshbpf.io/v1alpha1
    kind: AgentConfig
    metadata:
      name: meshbpf
    spec:
      socketRedirect:
        enabled: true
        cgroups: [kubepods.slice]          # sockets created in these cgroups take part
        podCIDRs: [10.244.0.0/16]          # ...and/or whose both ends are in these CIDRs

The YAML file source reads it beside Services and EndpointSlices; the
Kubernetes source reads the same document from a ConfigMap. At most one may
exist; without one, every setting has its default.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from ..model import AgentSettings, RedirectSettings
from . import schema
from .errors import Problem

API_VERSION = "meshbpf.io/v1alpha1"
KIND = "AgentConfig"

AGENT_CONFIG = {
    "apiVersion": schema.STR, "kind": schema.STR, "metadata": schema.OBJECT_META,
    "spec": {
        "socketRedirect": {
            "enabled": schema.BOOL,
            "cgroups": [schema.STR],
            "podCIDRs": [schema.STR],
        },
    },
}


def read_agent_config(obj: Any, where: str) -> tuple[AgentSettings | None, list[Problem]]:
    """Settings from one AgentConfig object, or the problems with it."""
    # The label is taken before the checks, so it must survive any input:
    # `metadata: foo` is reported as a problem, not an AttributeError.
    meta = obj.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    label = f"AgentConfig {name if isinstance(name, str) and name else '?'}"
    problems = [Problem(where, label, path, reason) for path, reason in schema.check(obj, AGENT_CONFIG)]
    if not any(p.path == "apiVersion" for p in problems) and obj.get("apiVersion") != API_VERSION:
        problems.append(Problem(where, label, "apiVersion",
                                f"{obj.get('apiVersion')!r} is not supported; use {API_VERSION}"))
    if problems:
        return None, problems

    spec = obj.get("spec") or {}
    redirect = spec.get("socketRedirect") or {}
    cidrs = []
    for i, text in enumerate(redirect.get("podCIDRs") or []):
        try:
            cidrs.append(ipaddress.ip_network(text, strict=True))
        except ValueError as exc:
            problems.append(Problem(where, label, f"spec.socketRedirect.podCIDRs[{i}]",
                                    f"{text!r} is not a CIDR: {exc}"))
    cgroups = []
    for i, path in enumerate(redirect.get("cgroups") or []):
        if not path or ".." in path.split("/"):
            problems.append(Problem(where, label, f"spec.socketRedirect.cgroups[{i}]",
                                    f"{path!r} is not a cgroup path below the cgroup2 mount"))
        cgroups.append(path.strip("/"))
    if problems:
        return None, problems
    return AgentSettings(redirect=RedirectSettings(
        enabled=bool(redirect.get("enabled", False)),
        cgroups=tuple(cgroups),
        pod_cidrs=tuple(cidrs),
    )), []
