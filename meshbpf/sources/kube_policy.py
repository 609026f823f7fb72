"""Pods, Namespaces and NetworkPolicies -> the policy model (meshbpf/policy).

Objects come as `kubectl get netpol,pods,ns -A -o yaml` prints them (or from
the API). Each bad object is left out with Problems naming its place and
field, exactly like kube_objects.py; no input raises.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from ..capture.settings import annotation_problems, kept_annotations
from ..model import DesiredState
from ..policy.model import (LabelSelector, ModelError, NamespaceInfo, NetworkPolicy, Peer,
                            PodInfo, PolicyPort, Requirement, Rule, IPBlock)
from . import schema
from .errors import Problem
from .names import label_key_problem, label_problems, label_value_problem
from .kube_objects import SourceObject, _check_schema, _Collector, _flatten_lists, _parse_ip
from .schema import ANY, BOOL, INT, OBJECT_META, STR, STR_MAP

LABEL_SELECTOR = {"matchLabels": STR_MAP,
                  "matchExpressions": [{"key": STR, "operator": STR, "values": [STR]}]}
POLICY_PEER = {"podSelector": LABEL_SELECTOR, "namespaceSelector": LABEL_SELECTOR,
               "ipBlock": {"cidr": STR, "except": [STR]}}
POLICY_PORT = {"protocol": STR, "port": ANY, "endPort": INT}  # port: number or name
NETWORK_POLICY = {
    "apiVersion": STR, "kind": STR, "metadata": OBJECT_META, "status": ANY,
    "spec": {"podSelector": LABEL_SELECTOR, "policyTypes": [STR],
             "ingress": [{"from": [POLICY_PEER], "ports": [POLICY_PORT]}],
             "egress": [{"to": [POLICY_PEER], "ports": [POLICY_PORT]}]},
}
NAMESPACE = {"apiVersion": STR, "kind": STR, "metadata": OBJECT_META, "spec": ANY, "status": ANY}
# A PodSpec has dozens of fields meshbpf does not read; only those it reads are checked.
POD = {"apiVersion": STR, "kind": STR, "metadata": OBJECT_META, "spec": ANY, "status": ANY}
CONTAINER_PORT = {"name": STR, "containerPort": INT, "protocol": STR, "hostPort": INT, "hostIP": STR}
POD_FIELDS = {"nodeName": STR, "hostNetwork": BOOL}
POD_STATUS = {"podIP": STR, "podIPs": [{"ip": STR}], "phase": STR}
FINISHED_PHASES = ("Succeeded", "Failed")  # their IPs may already belong to another pod
POLICY_KINDS = ("Pod", "Namespace", "NetworkPolicy")  # what read_policy_objects reads


@dataclass
class PolicyInputs:
    pods: list[PodInfo] = field(default_factory=list)
    namespaces: list[NamespaceInfo] = field(default_factory=list)
    policies: list[NetworkPolicy] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # (kind, namespace, name) of objects left out for a problem ("" for a
    # Namespace's namespace): their previous version may stay (keep_previous).
    rejected: set[tuple[str, str, str]] = field(default_factory=set)


def read_policy_objects(objects: Iterable[SourceObject]) -> PolicyInputs:
    """Reads every Pod, Namespace and NetworkPolicy; other kinds are skipped
    silently (they sit beside Services in the same files)."""
    out = _Collector()
    found: dict[tuple[str, str, str], tuple[Any, str]] = {}
    rejected: set[tuple[str, str, str]] = set()
    readers: dict[str, Callable[[SourceObject, _Collector], Any]] = {
        "Pod": _read_pod, "Namespace": _read_namespace, "NetworkPolicy": _read_policy}
    for src in _flatten_lists(objects, out):
        kind = src.obj.get("kind")
        reader = readers.get(kind)
        if reader is None:
            continue
        seen = len(out.problems)
        try:
            value = reader(src, out)
        except Exception as exc:  # a bug must not take the agent down with it
            out.add(src, kind, "", f"internal error while reading it ({type(exc).__name__}: {exc})")
            value = None
        if value is None:
            if len(out.problems) > seen and _object_key(src.obj) is not None:
                rejected.add(_object_key(src.obj))
            continue
        key = (kind, getattr(value, "namespace", ""), value.name)
        if key in found:
            out.add(src, f"{kind} {_label(value)}", "metadata.name",
                    f"defined twice (first at {found[key][1]})")
            continue
        found[key] = (value, src.where)
    result = PolicyInputs(problems=out.problems, notes=out.notes, rejected=rejected - found.keys())
    lists = {"Pod": result.pods, "Namespace": result.namespaces, "NetworkPolicy": result.policies}
    for (kind, _, _), (value, _) in found.items():
        lists[kind].append(value)
    return result


class CachedReader:
    """read_policy_objects for the API source, where every object has a
    unique key and a resourceVersion: each object is read once per version,
    so an event costs one object, not the cluster."""

    def __init__(self) -> None:
        self._read: dict[tuple, PolicyInputs] = {}

    def read(self, objects: Iterable[SourceObject]) -> PolicyInputs:
        out, kept = PolicyInputs(), {}
        for src in objects:
            meta = src.obj.get("metadata") or {}
            version = (src.obj.get("kind"), meta.get("namespace"), meta.get("name"),
                       meta.get("resourceVersion"))
            one = self._read.get(version) if version[3] else None
            if one is None:
                one = read_policy_objects([src])
            kept[version] = one
            for name in ("pods", "namespaces", "policies", "problems", "notes"):
                getattr(out, name).extend(getattr(one, name))
            out.rejected |= one.rejected
        self._read = kept
        return out


def _object_key(obj: dict) -> tuple[str, str, str] | None:
    """(kind, namespace, name) as found keys its objects; None without a name."""
    meta = obj.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    if not isinstance(name, str) or not name:
        return None
    if obj.get("kind") == "Namespace":
        return ("Namespace", "", name)
    namespace = meta.get("namespace")
    return (obj["kind"], namespace if isinstance(namespace, str) and namespace else "default", name)


def _value_key(kind: str, value: Any) -> tuple[str, str, str]:
    return (kind, getattr(value, "namespace", ""), value.name)


def policy_fields(inputs: PolicyInputs, previous: DesiredState | None = None) -> dict[str, tuple]:
    """DesiredState's pods, namespaces and network_policies from inputs,
    sorted. An object left out for a problem keeps its version in
    `previous`: a bad edit of a policy changes nothing, it neither opens nor
    closes traffic."""
    fields = {"pods": ("Pod", inputs.pods), "namespaces": ("Namespace", inputs.namespaces),
              "network_policies": ("NetworkPolicy", inputs.policies)}
    out = {}
    for name, (kind, values) in fields.items():
        by_key = {_value_key(kind, v): v for v in values}
        for old in getattr(previous, name, ()):
            key = _value_key(kind, old)
            if key in inputs.rejected:
                by_key.setdefault(key, old)
        out[name] = tuple(v for _, v in sorted(by_key.items()))
    return out


def _label(value: Any) -> str:
    ns = getattr(value, "namespace", None)
    return f"{ns}/{value.name}" if ns else value.name


def _read_namespace(src: SourceObject, out: _Collector) -> NamespaceInfo | None:
    before = len(out.problems)
    ident = _check_schema(src, "Namespace", ("v1",), NAMESPACE, out)
    if ident is None or len(out.problems) != before:  # a name Kubernetes would refuse
        return None
    meta = src.obj["metadata"]
    return NamespaceInfo(meta["name"], dict(meta.get("labels") or {}))


def _read_pod(src: SourceObject, out: _Collector) -> PodInfo | None:
    before = len(out.problems)
    ident = _check_schema(src, "Pod", ("v1",), POD, out)
    if ident is None or len(out.problems) != before:  # a name Kubernetes would refuse
        return None
    namespace, name, label = ident
    spec, status = src.obj.get("spec") or {}, src.obj.get("status") or {}
    problems = _field_problems(spec, POD_FIELDS, "spec") + _field_problems(status, POD_STATUS, "status")
    containers = spec.get("containers") if isinstance(spec, dict) else None
    problems += schema.check(containers, [ANY], "spec.containers")
    if not problems and containers:
        for i, c in enumerate(containers):
            if not isinstance(c, dict):
                problems.append((f"spec.containers[{i}]", f"expected a map, got {schema._kind_name(c)}"))
                continue
            problems += schema.check(c.get("ports"), [CONTAINER_PORT], f"spec.containers[{i}].ports")
    for path, reason in problems:
        out.add(src, label, path, reason)
    if problems:
        return None
    if status.get("phase") in FINISHED_PHASES:
        out.notes.append(f"{src.where}: skipping {label}: {status['phase']}")
        return None
    named = _named_ports(src, label, containers or [], out)
    ips = _pod_ips(src, label, status, out)
    if named is None or ips is None:
        return None
    meta = src.obj["metadata"]
    return PodInfo(namespace, name, meta.get("uid") or "", dict(meta.get("labels") or {}),
                   spec.get("nodeName") or "", bool(spec.get("hostNetwork")), named, ips,
                   _capture_annotations(src, label, meta, out))


def _capture_annotations(src: SourceObject, label: str, meta: dict, out: _Collector) -> dict:
    """The sidecar-capture annotations, checked. One that does not parse is
    a problem of this pod alone: the pod stays (NetworkPolicy still needs
    it); capture leaves it unmeshed (capture/settings.pod_capture refuses
    the same value), and the other pods go on."""
    kept = kept_annotations(meta.get("annotations"))
    for exc in annotation_problems(kept):
        out.add(src, label, f"metadata.annotations[{exc.key}]",
                f"{exc.reason}; the pod is left unmeshed")
    return kept


def _field_problems(obj: Any, fields: dict, path: str) -> list[tuple[str, str]]:
    if not isinstance(obj, dict):
        return [(path, f"expected a map, got {schema._kind_name(obj)}")]
    return [p for name, node in fields.items()
            for p in schema.check(obj.get(name), node, f"{path}.{name}")]


def _named_ports(src: SourceObject, label: str, containers: list,
                 out: _Collector) -> dict[str, tuple[str, int]] | None:
    named: dict[str, tuple[str, int]] = {}
    for i, c in enumerate(containers):
        for j, p in enumerate(c.get("ports") or []):
            path = f"spec.containers[{i}].ports[{j}]"
            protocol = p.get("protocol") or "TCP"
            number = p.get("containerPort")
            try:
                PolicyPort(protocol, number)
            except ModelError as e:
                field_name = "containerPort" if e.path == "port" else e.path
                out.add(src, label, f"{path}.{field_name}", e.reason)
                return None
            if p.get("name"):
                named[p["name"]] = (protocol, number)
    return named


def _pod_ips(src: SourceObject, label: str, status: dict, out: _Collector) -> tuple | None:
    texts = [(f"status.podIPs[{i}].ip", e.get("ip")) for i, e in enumerate(status.get("podIPs") or [])]
    if status.get("podIP"):
        texts.append(("status.podIP", status["podIP"]))
    ips = []
    for path, text in texts:
        ip = _parse_ip(text)
        if ip is None:
            out.add(src, label, path, f"{text!r} is not an IP address")
            return None
        if ip not in ips:
            ips.append(ip)
    return tuple(ips)


def _read_policy(src: SourceObject, out: _Collector) -> NetworkPolicy | None:
    before = len(out.problems)
    ident = _check_schema(src, "NetworkPolicy", ("networking.k8s.io/v1",), NETWORK_POLICY, out)
    if ident is None or len(out.problems) != before:  # a name Kubernetes would refuse
        return None
    namespace, name, label = ident
    spec = src.obj.get("spec") or {}
    try:
        selector = _selector(spec.get("podSelector") or {}, "spec.podSelector")
        ingress = tuple(_rule(r, "from", f"spec.ingress[{i}]") for i, r in enumerate(spec.get("ingress") or []))
        egress = tuple(_rule(r, "to", f"spec.egress[{i}]") for i, r in enumerate(spec.get("egress") or []))
        types = spec.get("policyTypes")
        if not types:  # the API server defaults an empty list too
            types = NetworkPolicy.default_types(bool(spec.get("egress")))
        return NetworkPolicy(namespace, name, selector, frozenset(types), ingress, egress)
    except ModelError as e:
        out.add(src, label, e.path, e.reason)
        return None


def _nested(path: str, fn: Callable, *args):
    """Calls fn; a ModelError from it gets path in front of its own."""
    try:
        return fn(*args)
    except ModelError as e:
        raise ModelError(f"{path}.{e.path}" if e.path else path, e.reason) from None


def _selector(obj: dict, path: str) -> LabelSelector:
    exprs = tuple(_nested(f"{path}.matchExpressions[{i}]", Requirement, e.get("key"), e.get("operator"),
                          tuple(e.get("values") or ()))
                  for i, e in enumerate(obj.get("matchExpressions") or []))
    for i, e in enumerate(exprs):
        if not e.key:
            raise ModelError(f"{path}.matchExpressions[{i}].key", "missing")
        _check_requirement(e, f"{path}.matchExpressions[{i}]")
    labels = obj.get("matchLabels") or {}
    problems = label_problems(labels, f"{path}.matchLabels")
    if problems:
        raise ModelError(*problems[0])
    return LabelSelector.of(labels, *exprs)


def _check_requirement(req: Requirement, path: str) -> None:
    """A key or value no label can have (the API server refuses it too):
    the selector would silently never match, or match everything (NotIn)."""
    why = label_key_problem(req.key)
    if why:
        raise ModelError(f"{path}.key", why)
    for i, value in enumerate(req.values):
        why = label_value_problem(value)
        if why:
            raise ModelError(f"{path}.values[{i}]", why)


def _rule(obj: dict, peers_field: str, path: str) -> Rule:
    peers = tuple(_peer(p, f"{path}.{peers_field}[{i}]") for i, p in enumerate(obj.get(peers_field) or []))
    ports = tuple(_port(p, f"{path}.ports[{i}]") for i, p in enumerate(obj.get("ports") or []))
    return Rule(peers, ports)


def _peer(obj: dict, path: str) -> Peer:
    pod = obj.get("podSelector")
    ns = obj.get("namespaceSelector")
    block = obj.get("ipBlock")
    return _nested(path, Peer,
                   None if pod is None else _selector(pod, f"{path}.podSelector"),
                   None if ns is None else _selector(ns, f"{path}.namespaceSelector"),
                   None if block is None else _ip_block(block, f"{path}.ipBlock"))


def _ip_block(obj: dict, path: str) -> IPBlock:
    cidr = _network(obj.get("cidr"), f"{path}.cidr")
    holes = tuple(_network(t, f"{path}.except[{i}]") for i, t in enumerate(obj.get("except") or []))
    return _nested(path, IPBlock, cidr, holes)


def _network(text: Any, path: str):
    if not isinstance(text, str) or "/" not in text:
        raise ModelError(path, f"{text!r} is not a CIDR (address/prefix)")
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as e:
        raise ModelError(path, f"{text!r} is not a CIDR ({e})") from None


def _port(obj: dict, path: str) -> PolicyPort:
    port = obj.get("port")
    if port is not None and type(port) not in (int, str):
        raise ModelError(f"{path}.port", f"expected a port number or name, got {schema._kind_name(port)}")
    if isinstance(port, str) and not any(ch.isalpha() for ch in port):
        # As the API server: a name has a letter; "80" in quotes is neither.
        raise ModelError(f"{path}.port", f"{port!r} is not a port name (write a number unquoted)")
    error = {"port": "port", "endPort": "endPort", "protocol": "protocol"}
    try:
        return PolicyPort(obj.get("protocol") or "TCP", port, obj.get("endPort"))
    except ModelError as e:
        raise ModelError(f"{path}.{error.get(e.path, e.path)}", e.reason) from None
