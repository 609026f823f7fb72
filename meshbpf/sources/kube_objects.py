"""Kubernetes Services and EndpointSlices -> DesiredState.

Both sources feed this module: the YAML file source with objects as
`kubectl get svc,endpointslices -A -o yaml` prints them, and the Kubernetes
API source with the same objects from a watch. One reading of the objects
means one set of semantics, which follow kube-proxy's endpointslicecache.go:
endpoints merge across the slices of a service, `ready` and `serving` are
true when unset, `terminating` only counts when set, and slice ports match
service ports by name and protocol; internalTrafficPolicy: Local keeps
this node's endpoints; topology hints follow pkg/proxy/topology.go; and
services labelled for another proxy (service.kubernetes.io/service-proxy-name)
are left to it.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import socket
from dataclasses import dataclass, field
from sys import intern
from typing import Any, Iterable, NamedTuple

from ..model import (DEFAULT_AFFINITY_TIMEOUT, AgentSettings, DesiredState, Endpoint,
                     Exposure, Frontend, IPAddress, PROTOCOLS, ServicePort)
from . import agent_config, schema
from .errors import Problem, one_line
from .names import annotation_problems, label_problems, name_problem, namespace_problem

log = logging.getLogger(__name__)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
# kube-proxy skips every Service carrying this label; a proxy started with
# --service-proxy-name NAME handles exactly those labelled NAME.
PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"


@dataclass(frozen=True, slots=True)
class SourceObject:
    """One object and where it came from, for error messages."""

    obj: Any
    where: str


@dataclass
class BuildResult:
    state: DesiredState
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # things skipped on purpose


@dataclass(slots=True)
class _Port:
    index: int
    name: str
    protocol: str
    port: int
    target: int | str
    node_port: int = 0


@dataclass(slots=True)
class _Service:
    src: SourceObject
    namespace: str
    name: str
    cluster_ips: list[IPAddress]
    ports: list[_Port]
    affinity_timeout: int
    local_only: bool
    exposure: Exposure | None = None


@dataclass(slots=True)
class _SlicePort:
    index: int
    name: str
    protocol: str
    port: int | None


class _SliceEndpoint(NamedTuple):
    """An endpoint as a slice lists it; the port comes per service port."""

    address: IPAddress
    key: bytes             # the address packed: merges endpoints, cheaper to hash than address
    ready: bool
    serving: bool
    terminating: bool
    node_name: str | None
    zone: str | None
    zone_hints: frozenset[str]


@dataclass(slots=True)
class _Slice:
    src: SourceObject
    namespace: str
    name: str
    service: str
    family: int
    endpoints: list[_SliceEndpoint]
    ports: list[_SlicePort] | None  # None: the slice lists no ports


class _Collector:
    def __init__(self) -> None:
        self.problems: list[Problem] = []
        self.notes: list[str] = []

    def add(self, src: SourceObject, obj: str, path: str, reason: str) -> None:
        self.problems.append(Problem(src.where, obj, path, reason))


def build_state(objects: Iterable[SourceObject], *, node_name: str | None = None,
                service_proxy_name: str | None = None,
                node_zone: str | None = None) -> BuildResult:
    """Reads Services and EndpointSlices. Objects with problems are left out
    and their problems returned; the file source rejects the whole input when
    there are any, the API source skips just those objects.

    node_name: this node, for internalTrafficPolicy: Local (None: no filter).
    service_proxy_name: None handles the Services without the
    service-proxy-name label (replacing kube-proxy); a name handles only the
    Services labelled with it (beside kube-proxy).
    node_zone: this node's topology.kubernetes.io/zone, for topology hints
    (None: hints are not used)."""
    out = _Collector()
    services: dict[tuple[str, str], _Service] = {}
    slices: dict[tuple[str, str], _Slice] = {}
    state_settings, settings_from = AgentSettings(), None

    for src in _flatten_lists(objects, out):
        kind = src.obj.get("kind")
        if kind == "Service":
            if not _ours(src, service_proxy_name, out):
                continue
            _add_once(services, _read_service(src, out), "Service", out)
        elif kind == "EndpointSlice":
            _add_once(slices, _read_slice(src, out), "EndpointSlice", out)
        elif kind == agent_config.KIND:
            settings, problems = agent_config.read_agent_config(src.obj, src.where)
            out.problems.extend(problems)
            if settings is None:
                continue
            if settings_from is not None:
                out.add(src, "AgentConfig", "", f"a second AgentConfig (the first is at {settings_from})")
                continue
            state_settings, settings_from = settings, src.where
        else:
            out.notes.append(f"{src.where}: skipping kind {kind!r}: meshbpf reads Service, "
                             f"EndpointSlice and AgentConfig")

    # Slices merge in name order, whatever order they were listed or
    # watched in: the same objects always give the same state (the
    # incremental path in kube_incremental.py relies on it).
    by_service: dict[tuple[str, str], list[_Slice]] = {}
    for _, sl in sorted(slices.items()):
        by_service.setdefault((sl.namespace, sl.service), []).append(sl)

    state = DesiredState(settings=state_settings)
    for key, svc in services.items():
        _add_service(state, svc, by_service.get(key, []), node_name, node_zone, out)
    return BuildResult(state, out.problems, out.notes)


def build_by_service(groups: Iterable[tuple[SourceObject | None, Iterable[SourceObject]]], *,
                     node_name: str | None = None, service_proxy_name: str | None = None,
                     node_zone: str | None = None) -> BuildResult:
    """build_state() for Services and EndpointSlices given grouped: each
    Service with the slices labelled for it, or None with slices whose
    Service is not given (read for their problems only); every
    namespace/name once (the API source's objects are keyed by it). A
    Service is built as soon as its group is read, and its records dropped:
    build_state() holds every object's records until all are read, and at
    100 000 Services that peak (~200 MB) stayed in the heap as RSS. The
    same state as build_state() over the same objects, the Services in the
    groups' order."""
    out = _Collector()
    state = DesiredState()
    for service_src, slice_srcs in groups:
        svc = None
        if service_src is not None and _ours(service_src, service_proxy_name, out):
            svc = _read_service(service_src, out)
        slices = [sl for sl in (_read_slice(src, out) for src in slice_srcs) if sl is not None]
        if svc is not None:
            if len(slices) > 1:
                slices.sort(key=lambda sl: (sl.namespace, sl.name))  # build_state's merge order
            _add_service(state, svc, slices, node_name, node_zone, out)
    return BuildResult(state, out.problems, out.notes)


def _add_service(state: DesiredState, svc: _Service, slices: list[_Slice], node_name: str | None,
                 node_zone: str | None, out: _Collector) -> None:
    """A Service's ServicePorts into the state, unless a frontend of theirs
    is taken: a frontend's first Service keeps it, all of a Service or none."""
    taken = state.service_ports
    ports = _service_ports(svc, slices, node_name, node_zone, out)
    clashes = [(sp, taken[sp.frontend]) for sp in ports if sp.frontend in taken]
    for sp, first in clashes:
        out.add(svc.src, f"Service {svc.namespace}/{svc.name}", "spec.clusterIP",
                f"{sp.frontend} is already used by Service {first.service}")
    if clashes:
        return
    for sp in ports:
        taken[sp.frontend] = sp


# Strings every object repeats (namespaces, port names, protocols, node
# names and zones of endpoints) are shared, not one copy per object: a
# decoder makes a new string for every value it reads, and the desired state
# keeps them (400 000 endpoints at 100 000 Services name a few hundred nodes).
PROTOCOL_NAMES = {p: p for p in PROTOCOLS}


def _interned(text: Any) -> Any:
    return intern(text) if type(text) is str else text


def _located(src: SourceObject) -> SourceObject:
    """Where an object came from, for the problems found after it is read,
    without the object: the intermediate reading does not keep every parsed
    object alive until the whole state is built."""
    return SourceObject(None, src.where)


def _add_once(table: dict, obj: "_Service | _Slice | None", kind: str, out: "_Collector") -> None:
    """Keeps the first object of a namespace/name; a second one is a problem."""
    if obj is None:
        return
    key = (obj.namespace, obj.name)
    if key in table:
        out.add(obj.src, f"{kind} {obj.namespace}/{obj.name}", "metadata.name",
                f"defined twice (first at {table[key].src.where})")
        return
    table[key] = obj


def _flatten_lists(objects: Iterable[SourceObject], out: _Collector) -> Iterable[SourceObject]:
    for src in objects:
        obj = src.obj
        if obj is None:
            continue  # an empty YAML document
        if not isinstance(obj, dict):
            out.add(src, "", "", f"expected a Kubernetes object (a map), got {schema._kind_name(obj)}")
            continue
        kind = obj.get("kind")
        if not isinstance(kind, str) or not kind:
            out.add(src, "", "kind", _missing_or_wrong(kind, "kind", "every object needs apiVersion and kind"))
            continue
        if _is_list(kind, obj):
            problems = schema.check(obj, schema.LIST)
            for path, reason in problems:
                out.add(src, kind, path, reason)
            if problems:
                continue
            for i, item in enumerate(obj.get("items") or []):
                item_src = SourceObject(item, f"{src.where}: items[{i}]")
                # A plain object (nearly every item) is yielded here; anything
                # else goes through the checks above, as a document would.
                item_kind = item.get("kind") if isinstance(item, dict) else None
                if isinstance(item_kind, str) and item_kind and not _is_list(item_kind, item):
                    yield item_src
                else:
                    yield from _flatten_lists([item_src], out)
            continue
        yield src


def _is_list(kind: str, obj: dict) -> bool:
    return kind == "List" or kind.endswith("List") and "items" in obj


def _ours(src: SourceObject, service_proxy_name: str | None, out: _Collector) -> bool:
    """Whether this Service is for meshbpf, by kube-proxy's label rule. Checked
    before anything else: another proxy's Service is not ours to judge."""
    meta = src.obj.get("metadata")
    labels = meta.get("labels") if isinstance(meta, dict) else None
    labels = labels if isinstance(labels, dict) else {}
    if service_proxy_name is None and PROXY_NAME_LABEL not in labels:
        return True
    if service_proxy_name is not None and labels.get(PROXY_NAME_LABEL) == service_proxy_name:
        return True
    name = f"{meta.get('namespace') or 'default'}/{meta.get('name')}" if isinstance(meta, dict) else "?"
    name = one_line(name)  # not checked yet (another proxy's): a note is one log line
    if PROXY_NAME_LABEL in labels:
        why = f"labelled {PROXY_NAME_LABEL}={labels[PROXY_NAME_LABEL]!r}, for another proxy"
    else:
        why = f"not labelled {PROXY_NAME_LABEL}={service_proxy_name!r}, kube-proxy handles it"
    out.notes.append(f"{src.where}: skipping Service {name}: {why}")
    return False


def _meta(src: SourceObject, kind: str, out: _Collector) -> tuple[str, str, str] | None:
    """(namespace, name, label); None without a name. A name or namespace
    Kubernetes would refuse is a problem added to `out`, and the ident is
    still returned so the reader can name the object's other problems too:
    the readers leave out an object with any problem."""
    meta = src.obj.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    if not isinstance(name, str) or not name:
        out.add(src, kind, "metadata.name", _missing_or_wrong(name, "metadata.name"))
        return None
    namespace = meta.get("namespace") or "default"
    # A Namespace is in none: "Namespace default/prod" would send the reader to another object.
    label = f"{kind} {name}" if kind == "Namespace" else f"{kind} {namespace}/{name}"
    reason = name_problem(kind, name)
    if reason:
        out.add(src, label, "metadata.name", reason)
    if kind != "Namespace" and isinstance(namespace, str):  # not a string: the schema says so
        reason = namespace_problem(namespace)
        if reason:
            out.add(src, label, "metadata.namespace", reason)
    return namespace, name, label


def _missing_or_wrong(value: Any, path: str, hint: str = "") -> str:
    """"missing" only when it is: a list, number or map where a string
    belongs is named as such, or the reader is sent looking for a field
    that is there."""
    if value is None or value == "":
        return f"missing: {hint}" if hint else "missing"
    return schema._scalar_problem(value, schema.STR, path)[0][1]


def _check_schema(src: SourceObject, kind: str, api_versions: tuple[str, ...],
                  spec: dict, out: _Collector) -> tuple[str, str, str] | None:
    ident = _meta(src, kind, out)
    if ident is None:
        return None
    bad = False
    if src.obj.get("apiVersion") not in api_versions:
        out.add(src, ident[2], "apiVersion",
                f"{src.obj.get('apiVersion')!r} is not supported; use {' or '.join(api_versions)}")
        bad = True
    for path, reason in schema.check(src.obj, spec) + _meta_problems(src.obj, kind):
        out.add(src, ident[2], path, reason)
        bad = True
    return None if bad else ident


def _meta_problems(obj: dict, kind: str) -> list[tuple[str, str]]:
    """metadata.labels Kubernetes would refuse, for every kind read: a
    selector would silently never match them (or match the wrong thing).
    And a Service's spec.selector, which Kubernetes validates as labels: a
    key or value no pod can carry means a selector that matches nothing.
    And metadata.annotations it would refuse (a key that is no qualified
    name, more than 256 KiB): an object no cluster could hold."""
    meta = obj["metadata"]  # a map: _meta found a name in it
    labels, annotations = meta.get("labels"), meta.get("annotations")
    found = label_problems(labels, "metadata.labels") if type(labels) is dict else []
    if type(annotations) is dict and annotations:
        found += annotation_problems(annotations, "metadata.annotations")
    spec = obj.get("spec") if kind == "Service" else None
    selector = spec.get("selector") if type(spec) is dict else None
    if type(selector) is dict:  # not a map: the schema check says so
        found += label_problems(selector, "spec.selector")
    return found


def _parse_address(text: str) -> IPAddress | None:
    parsed = _parse_packed(text)
    return parsed[0] if parsed is not None else None


# Small: a cold start parses each address once (a miss either way), and an
# entry costs ~250 bytes beyond the address itself (its text, bytes, tuple
# and link): 2**18 of them were ~65 MB at 100 000 Services. What stays
# cached is what repeats, the addresses of the Services events touch.
@functools.lru_cache(maxsize=1 << 12)
def _parse_packed(text: str) -> tuple[IPAddress, bytes] | None:
    """The address and its packed bytes (equal bytes: equal addresses)."""
    # inet_pton validates in C and is strict (no leading zeros, no zones);
    # building ipaddress objects from packed bytes skips their slow parser.
    try:
        if ":" in text:
            packed = socket.inet_pton(socket.AF_INET6, text)
            return ipaddress.IPv6Address(packed), packed
        packed = socket.inet_pton(socket.AF_INET, text)
        return ipaddress.IPv4Address(packed), packed
    except OSError:
        return None


# The maps key every address as 16 bytes, IPv4 as ::ffff:a.b.c.d, so an
# IPv4-mapped IPv6 address is the same key as its IPv4 address: accepting both
# would silently merge two Services (or endpoints) into one. Kubernetes refuses
# such addresses in clusterIPs too.
_MAPPED_REASON = ("{ip} is an IPv4-mapped IPv6 address, the same as {v4} to meshbpf's maps; "
                  "write {v4} instead")


def _ipv4_mapped(ip: IPAddress) -> bool:
    return ip.version == 6 and ip.ipv4_mapped is not None


def _parse_ip(text: Any) -> IPAddress | None:
    return _parse_address(text) if isinstance(text, str) else None


def _read_service(src: SourceObject, out: _Collector) -> _Service | None:
    before = len(out.problems)  # from here: a bad name leaves the Service out too
    ident = _check_schema(src, "Service", ("v1",), schema.SERVICE, out)
    if ident is None:
        return None
    namespace, name, label = ident
    spec = src.obj.get("spec") or {}

    svc_type = spec.get("type") or "ClusterIP"
    if svc_type not in ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName"):
        out.add(src, label, "spec.type", f"{svc_type!r} is not a Service type")
        return None
    if svc_type == "ExternalName":
        out.notes.append(f"{src.where}: skipping {label}: ExternalName services are DNS only")
        return None
    cluster_ip = spec.get("clusterIP")
    if cluster_ip == "None":
        out.notes.append(f"{src.where}: skipping {label}: headless (clusterIP: None)")
        return None

    ips_field = "spec.clusterIPs" if spec.get("clusterIPs") else "spec.clusterIP"
    raw_ips = list(spec.get("clusterIPs") or ([cluster_ip] if cluster_ip else []))
    if not raw_ips:
        out.add(src, label, "spec.clusterIP",
                "missing: meshbpf does not allocate cluster IPs, give the address")
        return None
    if cluster_ip and raw_ips[0] != cluster_ip:
        out.add(src, label, "spec.clusterIPs[0]",
                f"{raw_ips[0]!r} differs from spec.clusterIP {cluster_ip!r}")
    ips: list[IPAddress] = []
    for i, text in enumerate(raw_ips):
        ip = _parse_ip(text)
        field_path = f"{ips_field}[{i}]" if ips_field == "spec.clusterIPs" else ips_field
        if ip is None:
            out.add(src, label, field_path, f"{text!r} is not an IP address")
        elif _ipv4_mapped(ip):
            out.add(src, label, field_path, _MAPPED_REASON.format(ip=ip, v4=ip.ipv4_mapped))
        else:
            ips.append(ip)
    if len({ip.version for ip in ips}) != len(ips):
        out.add(src, label, "spec.clusterIPs", "at most one address per IP family")
    families = spec.get("ipFamilies")
    if families:
        for i, fam in enumerate(families):
            if fam not in ("IPv4", "IPv6"):
                out.add(src, label, f"spec.ipFamilies[{i}]", f"{fam!r} is not IPv4 or IPv6")
        if len(families) == len(ips) and all(f in ("IPv4", "IPv6") for f in families):
            for i, (fam, ip) in enumerate(zip(families, ips)):
                if fam != f"IPv{ip.version}":
                    out.add(src, label, f"spec.ipFamilies[{i}]",
                            f"{fam} does not match cluster IP {ip}")

    ports: list[_Port] = []
    seen_names: set[str] = set()
    raw_ports = spec.get("ports") or []
    if not raw_ports:
        out.add(src, label, "spec.ports", "a Service with a cluster IP needs at least one port")
    for i, p in enumerate(raw_ports):
        port = _read_service_port(src, label, i, p, len(raw_ports), out)
        if port is None:
            continue
        if port.name in seen_names:
            out.add(src, label, f"spec.ports[{i}].name", f"{port.name!r} is used twice")
            continue
        seen_names.add(port.name)
        ports.append(port)

    affinity = spec.get("sessionAffinity") or "None"
    timeout = 0
    if affinity == "ClientIP":
        cfg = ((spec.get("sessionAffinityConfig") or {}).get("clientIP") or {})
        timeout = cfg.get("timeoutSeconds")
        if timeout is None:
            timeout = DEFAULT_AFFINITY_TIMEOUT
        elif not 0 < timeout <= 86400:
            out.add(src, label, "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                    f"{timeout} is out of range (1-86400)")
    elif affinity != "None":
        out.add(src, label, "spec.sessionAffinity", f"{affinity!r} is not None or ClientIP")

    itp = spec.get("internalTrafficPolicy") or "Cluster"
    if itp not in ("Cluster", "Local"):
        out.add(src, label, "spec.internalTrafficPolicy", f"{itp!r} is not Cluster or Local")
    exposure = _read_exposure(src, label, spec, svc_type, ports, out)

    if len(out.problems) != before:
        return None
    return _Service(_located(src), intern(namespace), intern(name), ips, ports, timeout,
                    itp == "Local", exposure)


def _read_exposure(src: SourceObject, label: str, spec: dict, svc_type: str,
                   ports: list[_Port], out: _Collector) -> Exposure | None:
    """The north-south fields (issue 12); None for a Service reached from
    inside the cluster only. Problems go to `out` (the Service is skipped)."""
    if svc_type == "ClusterIP":
        for p in ports:
            p.node_port = 0   # kubectl never prints one; Kubernetes allocates none
    elif svc_type == "NodePort":
        for p in ports:
            if not p.node_port:
                out.add(src, label, f"spec.ports[{p.index}].nodePort",
                        "missing: meshbpf does not allocate node ports, give the port")
    external_ips = _read_ips(src, label, spec.get("externalIPs") or (), "spec.externalIPs", out)
    lb_ips = _lb_ingress_ips(src, label, svc_type, out)
    if svc_type == "ClusterIP" and not external_ips:
        return None
    etp = spec.get("externalTrafficPolicy") or "Cluster"
    if etp not in ("Cluster", "Local"):
        out.add(src, label, "spec.externalTrafficPolicy", f"{etp!r} is not Cluster or Local")
    health_port = spec.get("healthCheckNodePort") or 0
    if health_port and not 1 <= health_port <= 65535:
        out.add(src, label, "spec.healthCheckNodePort", f"{health_port} is not a port number (1-65535)")
    ranges = []
    for i, text in enumerate(spec.get("loadBalancerSourceRanges") or ()):
        try:  # kube-proxy trims spaces and accepts host bits (ParseCIDRSloppy)
            ranges.append(ipaddress.ip_network(text.strip(), strict=False))
        except ValueError:
            out.add(src, label, f"spec.loadBalancerSourceRanges[{i}]", f"{text!r} is not a CIDR")
    return Exposure(svc_type, external_ips, lb_ips, etp == "Local",
                    health_port if etp == "Local" else 0, tuple(ranges))


def _read_ips(src: SourceObject, label: str, texts, where: str, out: _Collector) -> tuple[IPAddress, ...]:
    ips = []
    for i, text in enumerate(texts):
        ip = _parse_ip(text)
        if ip is None:
            out.add(src, label, f"{where}[{i}]", f"{text!r} is not an IP address")
        elif _ipv4_mapped(ip):
            out.add(src, label, f"{where}[{i}]", _MAPPED_REASON.format(ip=ip, v4=ip.ipv4_mapped))
        else:
            ips.append(ip)
    return tuple(ips)


def _lb_ingress_ips(src: SourceObject, label: str, svc_type: str,
                    out: _Collector) -> tuple[IPAddress, ...]:
    """status.loadBalancer.ingress[].ip of a LoadBalancer (status is not
    schema-checked: its shape is checked here); hostname-only entries have
    no address to answer on and are left out."""
    if svc_type != "LoadBalancer":
        return ()
    status = src.obj.get("status") or {}
    lb = status.get("loadBalancer") if isinstance(status, dict) else None
    ingress = lb.get("ingress") if isinstance(lb, dict) else None
    if not ingress:
        return ()
    if not isinstance(ingress, list):
        out.add(src, label, "status.loadBalancer.ingress", "expected a list")
        return ()
    ips = []
    for i, entry in enumerate(ingress):
        text = entry.get("ip") if isinstance(entry, dict) else entry
        if text is None:
            continue
        ip = _parse_ip(text)
        if ip is None or _ipv4_mapped(ip):
            out.add(src, label, f"status.loadBalancer.ingress[{i}].ip", f"{text!r} is not an IP address")
        else:
            ips.append(ip)
    return tuple(ips)


def _read_service_port(src: SourceObject, label: str, i: int, p: Any, count: int,
                       out: _Collector) -> _Port | None:
    where = f"spec.ports[{i}]"
    name = p.get("name") or ""
    if count > 1 and not name:
        out.add(src, label, f"{where}.name", "required when a Service has more than one port")
        return None
    protocol = p.get("protocol") or "TCP"
    if protocol == "SCTP":
        out.notes.append(f"{src.where}: {label} {where}: SCTP is not load-balanced by meshbpf")
        return None
    if protocol not in ("TCP", "UDP"):
        out.add(src, label, f"{where}.protocol", f"{protocol!r} is not TCP, UDP or SCTP")
        return None
    number = p.get("port")
    if number is None:
        out.add(src, label, f"{where}.port", "missing")
        return None
    if not 1 <= number <= 65535:
        out.add(src, label, f"{where}.port", f"{number} is not a port number (1-65535)")
        return None
    target = p.get("targetPort", number)
    if target is None:
        target = number
    if isinstance(target, bool) or not isinstance(target, (int, str)):
        out.add(src, label, f"{where}.targetPort", f"expected a port number or name, got {target!r}")
        return None
    if isinstance(target, str) and target.isdigit():
        target = int(target)
    if isinstance(target, int) and not 1 <= target <= 65535:
        out.add(src, label, f"{where}.targetPort", f"{target} is not a port number (1-65535)")
        return None
    if isinstance(target, str) and not target:
        target = number
    node_port = p.get("nodePort") or 0
    if node_port and not 1 <= node_port <= 65535:
        out.add(src, label, f"{where}.nodePort", f"{node_port} is not a port number (1-65535)")
        return None
    return _Port(i, _interned(name), PROTOCOL_NAMES[protocol], number, target, node_port)


def _read_slice(src: SourceObject, out: _Collector) -> _Slice | None:
    before = len(out.problems)  # from here: a bad name leaves the slice out too
    ident = _check_schema(src, "EndpointSlice", ("discovery.k8s.io/v1",), schema.ENDPOINT_SLICE, out)
    if ident is None:
        return None
    namespace, name, label = ident
    obj = src.obj

    service = ((obj.get("metadata") or {}).get("labels") or {}).get(SERVICE_NAME_LABEL)
    if not service:
        out.notes.append(f"{src.where}: skipping {label}: no {SERVICE_NAME_LABEL} label")
        return None
    address_type = obj.get("addressType")
    if address_type == "FQDN":
        out.notes.append(f"{src.where}: skipping {label}: FQDN endpoints are not load-balanced")
        return None
    if address_type not in ("IPv4", "IPv6"):
        out.add(src, label, "addressType", f"{address_type!r} is not IPv4, IPv6 or FQDN")
        return None
    family = 4 if address_type == "IPv4" else 6

    endpoints: list[_SliceEndpoint] = []
    for i, ep in enumerate(obj.get("endpoints") or []):
        addrs = ep.get("addresses") or []
        if not addrs:
            out.add(src, label, f"endpoints[{i}].addresses", "missing: an endpoint needs an address")
            continue
        cond = ep.get("conditions") or {}
        ready = cond.get("ready")
        serving = cond.get("serving")
        terminating = cond.get("terminating")
        # Like kube-proxy, only the first address of an endpoint is used.
        parsed = _parse_packed(addrs[0]) if isinstance(addrs[0], str) else None
        if parsed is None:
            out.add(src, label, f"endpoints[{i}].addresses[0]", f"{addrs[0]!r} is not an IP address")
            continue
        ip, packed = parsed
        if _ipv4_mapped(ip):
            out.add(src, label, f"endpoints[{i}].addresses[0]",
                    _MAPPED_REASON.format(ip=ip, v4=ip.ipv4_mapped))
            continue
        if ip.version != family:
            out.add(src, label, f"endpoints[{i}].addresses[0]",
                    f"{ip} is not an {address_type} address (addressType: {address_type})")
            continue
        hints = ep.get("hints")
        zones = hints.get("forZones") if hints else None
        endpoints.append(_SliceEndpoint(
            ip, packed,
            True if ready is None else ready,
            True if serving is None else serving,
            bool(terminating),
            _interned(ep.get("nodeName")),
            _interned(ep.get("zone")),
            frozenset(h["name"] for h in zones if h and h.get("name")) if zones else _NO_ZONES,
        ))

    ports: list[_SlicePort] | None = None
    if obj.get("ports") is not None:
        ports = []
        for i, p in enumerate(obj["ports"]):
            protocol = p.get("protocol") or "TCP"
            if protocol == "SCTP":
                continue  # the Service's SCTP port is skipped (a note), so is its slice port
            number = p.get("port")
            if number is not None and not 1 <= number <= 65535:
                out.add(src, label, f"ports[{i}].port", f"{number} is not a port number (1-65535)")
                continue
            ports.append(_SlicePort(i, p.get("name") or "", protocol, number))

    if len(out.problems) != before:
        return None
    return _Slice(_located(src), namespace, name, service, family, endpoints, ports)


_NO_ZONES: frozenset[str] = frozenset()


def _service_ports(svc: _Service, slices: list[_Slice], node_name: str | None,
                   node_zone: str | None, out: _Collector) -> list[ServicePort]:
    label = f"Service {svc.namespace}/{svc.name}"
    names = {p.name: p for p in svc.ports}
    for sl in slices:
        for sp in sl.ports or []:
            if sp.name not in names:
                known = ", ".join(repr(n) for n in names) or "none"
                out.add(sl.src, f"EndpointSlice {sl.namespace}/{sl.name}", f"ports[{sp.index}].name",
                        f"{sp.name!r} matches no port of {label} (its ports: {known})")
    result: list[ServicePort] = []
    for ip in svc.cluster_ips:
        family_slices = [sl for sl in slices if sl.family == ip.version]
        for port in svc.ports:
            eps, hints = _endpoints_for(svc, port, family_slices, label, out)
            every = eps
            if svc.local_only:
                # kube-proxy: Local traffic uses this node's endpoints only, and
                # topology plays no part. usable_endpoints() then picks the
                # ready ones, or the serving-terminating ones, among them.
                if node_name is not None:
                    eps = tuple(e for e in eps if e.node_name == node_name)
            elif node_zone:
                eps = _topology_filter(eps, hints, node_zone)
            result.append(ServicePort(
                namespace=svc.namespace, name=svc.name, port_name=port.name,
                frontend=Frontend(ip, port.port, port.protocol),
                endpoints=eps, affinity_timeout=svc.affinity_timeout,
                node_port=port.node_port, exposure=svc.exposure,
                # kept only where it differs and traffic from outside comes in
                external_endpoints=every if svc.exposure is not None and every is not eps else None,
            ))
    return result


def _topology_filter(eps: tuple[Endpoint, ...], hints: list[frozenset[str]],
                     zone: str) -> tuple[Endpoint, ...]:
    """kube-proxy's pkg/proxy/topology.go (canUseTopology, availableForTopology):
    hints are used only when every ready endpoint has zone hints and at least
    one is hinted for this node's zone; then only the endpoints hinted for the
    zone are kept. Otherwise all endpoints are, so a half-rolled-out hint or a
    zone with nothing hinted to it never leaves a service without backends."""
    ready = [h for e, h in zip(eps, hints) if e.ready]
    if not ready or not all(ready) or not any(zone in h for h in ready):
        return eps
    return tuple(e for e, h in zip(eps, hints) if zone in h)


def _endpoints_for(svc: _Service, port: _Port, slices: list[_Slice], label: str, out: _Collector
                   ) -> tuple[tuple[Endpoint, ...], list[frozenset[str]]]:
    """The merged endpoints of one service port, and their zone hints (in step)."""
    # (address, port) -> (endpoint, its zone hints)
    merged: dict[tuple[bytes, int], tuple[Endpoint, frozenset[str]]] = {}
    for sl in slices:
        if sl.ports is None:
            # A slice with no ports: the standalone shorthand, where the
            # Service's numeric targetPort is the endpoint port.
            if not sl.endpoints:
                continue  # kubectl prints a scaled-to-zero slice as ports: null, endpoints: null
            if isinstance(port.target, str):
                out.add(svc.src, label, f"spec.ports[{port.index}].targetPort",
                        f"named port {port.target!r} cannot be resolved: EndpointSlice "
                        f"{sl.namespace}/{sl.name} lists no ports")
                continue
            number = port.target
        else:
            match = [p for p in sl.ports if p.name == port.name and p.protocol == port.protocol]
            if not match or match[0].port is None:
                continue
            number = match[0].port
        for ep in sl.endpoints:
            key = (ep.key, number)
            prev = merged.get(key)
            if prev is None or (ep.ready and not prev[0].ready):
                merged[key] = (Endpoint(ep.address, number, ep.ready, ep.serving,
                                        ep.terminating, ep.node_name, ep.zone), ep.zone_hints)
    return tuple(e for e, _ in merged.values()), [h for _, h in merged.values()]
