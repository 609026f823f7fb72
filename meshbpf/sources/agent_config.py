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
      capture:                             # sidecar capture without iptables (issue 11)
        enabled: true                      # default false
        mesh: istio                        # istio (default) or linkerd: the proxy's uid and ports
        optInLabel: meshbpf.io/capture=true  # also mesh pods with this label (key or key=value)
        dns: true                          # port 53 to the proxy's DNS port (Istio's 15053)

The YAML file source reads it beside Services and EndpointSlices; the
Kubernetes source reads the same document from a ConfigMap. At most one may
exist; without one, every setting has its default.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from ..model import MESHES, AgentSettings, CaptureSettings, RedirectSettings
from . import schema
from .errors import Problem
from .names import name_problem, namespace_problem

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
        "capture": {
            "enabled": schema.BOOL,
            "mesh": schema.STR,
            "optInLabel": schema.STR,
            "dns": schema.BOOL,
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
    # The name is optional here, but one given must be a name Kubernetes takes
    # (it is quoted in every problem about the settings); named beside the
    # others, so that one edit fixes them all.
    bad_name = name_problem(KIND, name) if isinstance(name, str) and name else None
    problems = [Problem(where, label, "metadata.name", bad_name)] if bad_name else []
    # A namespace is as optional (a file's object has none), and held to the
    # API server's rule when given: it too is quoted where the settings are.
    namespace = meta.get("namespace") if isinstance(meta, dict) else None
    bad_namespace = namespace_problem(namespace) if isinstance(namespace, str) and namespace else None
    if bad_namespace:
        problems.append(Problem(where, label, "metadata.namespace", bad_namespace))
    malformed = [Problem(where, label, path, reason) for path, reason in schema.check(obj, AGENT_CONFIG)]
    if not any(p.path == "apiVersion" for p in malformed) and obj.get("apiVersion") != API_VERSION:
        malformed.append(Problem(where, label, "apiVersion",
                                 f"{obj.get('apiVersion')!r} is not supported; use {API_VERSION}"))
    if malformed:
        return None, problems + malformed

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
    capture = _capture(spec.get("capture") or {}, lambda path, reason: problems.append(
        Problem(where, label, f"spec.capture.{path}", reason)))
    if problems:
        return None, problems
    return AgentSettings(redirect=RedirectSettings(
        enabled=bool(redirect.get("enabled", False)),
        cgroups=tuple(cgroups),
        pod_cidrs=tuple(cidrs),
    ), capture=capture), []


# A label key as Kubernetes takes it: optional DNS-subdomain prefix, then a
# name of up to 63 characters; a value of up to 63 (may be empty).
_LABEL_NAME = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
_LABEL_PREFIX = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


def _capture(spec: dict, problem) -> CaptureSettings:
    mesh = spec.get("mesh") or "istio"
    if mesh not in MESHES:
        problem("mesh", f"{mesh!r} is not one of {', '.join(MESHES)}")
        mesh = "istio"
    dns = bool(spec.get("dns", False))
    if dns and mesh == "linkerd":
        problem("dns", "linkerd has no DNS proxy; set dns: false")
    label = None
    text = spec.get("optInLabel")
    if text is not None:
        label = _label_selector(text)
        if label is None:
            problem("optInLabel", f"{text!r} is not a label key or key=value")
    return CaptureSettings(bool(spec.get("enabled", False)), mesh, label, dns)


def _label_selector(text: str) -> tuple[str, str | None] | None:
    key, eq, value = text.partition("=")
    prefix, slash, name = key.rpartition("/")
    if not name or (slash and not _LABEL_PREFIX.match(prefix)) or not _LABEL_NAME.match(name):
        return None
    if eq and not _LABEL_NAME.match(value):
        return None
    return (key, value if eq else None)
