"""Which pods are meshed and how: mesh presets, pod annotations, effective settings.

A pod is meshed when capture is on in AgentConfig and it carries its mesh's
injection marker (Istio's `sidecar.istio.io/status`, Linkerd's
`linkerd.io/proxy-version`) or AgentConfig's opt-in label. Its capture
settings are the preset's, narrowed by the annotations the mesh's own init
container reads (istio-iptables, linkerd proxy-init), with the same meaning:

    traffic.sidecar.istio.io/includeOutboundIPRanges   "*" (default) or CIDRs; "" = none
    traffic.sidecar.istio.io/excludeOutboundIPRanges   CIDRs; exclude wins over include
    traffic.sidecar.istio.io/includeInboundPorts       "*" (default) or ports; "" = none
    traffic.sidecar.istio.io/excludeInboundPorts       ports
    traffic.sidecar.istio.io/excludeOutboundPorts      ports
    config.linkerd.io/skip-inbound-ports               ports or ranges (4000-4010)
    config.linkerd.io/skip-outbound-ports              ports or ranges
    config.linkerd.io/skip-subnets                     CIDRs, never captured outbound

Lists are comma-separated (blanks and empty items ignored, as both meshes
do). A value that does not parse makes the pod unmeshed (fail closed to
"not captured") and is reported naming the pod and the annotation.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Mapping

from ..model import CaptureSettings

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ISTIO_STATUS = "sidecar.istio.io/status"
LINKERD_VERSION = "linkerd.io/proxy-version"
DEFAULT_CONTAINER = "kubectl.kubernetes.io/default-container"   # informational
INCLUDE_OUT_RANGES = "traffic.sidecar.istio.io/includeOutboundIPRanges"
EXCLUDE_OUT_RANGES = "traffic.sidecar.istio.io/excludeOutboundIPRanges"
INCLUDE_IN_PORTS = "traffic.sidecar.istio.io/includeInboundPorts"
EXCLUDE_IN_PORTS = "traffic.sidecar.istio.io/excludeInboundPorts"
EXCLUDE_OUT_PORTS = "traffic.sidecar.istio.io/excludeOutboundPorts"
LINKERD_SKIP_IN = "config.linkerd.io/skip-inbound-ports"
LINKERD_SKIP_OUT = "config.linkerd.io/skip-outbound-ports"
LINKERD_SKIP_SUBNETS = "config.linkerd.io/skip-subnets"

RANGE_KEYS = (INCLUDE_OUT_RANGES, EXCLUDE_OUT_RANGES, LINKERD_SKIP_SUBNETS)
PORT_KEYS = (INCLUDE_IN_PORTS, EXCLUDE_IN_PORTS, EXCLUDE_OUT_PORTS, LINKERD_SKIP_IN, LINKERD_SKIP_OUT)
WILDCARD_KEYS = (INCLUDE_OUT_RANGES, INCLUDE_IN_PORTS)   # "*" means every destination / port
# The annotations sources keep on a Pod (everything else is dropped there).
KEPT_PREFIXES = ("sidecar.istio.io/", "traffic.sidecar.istio.io/", "linkerd.io/",
                 "config.linkerd.io/", DEFAULT_CONTAINER)
MAX_PORTS = 1024   # ports one annotation may name (ranges expanded): one map entry each
# CIDRs one annotation may name: one mbpf_cap_cidr entry each, and include
# ranges are checked against every exclude one. Kubelet's 110 pods at two
# range annotations of 256 fit the map's 65536 entries; one pod's 100 000
# would fill it (failing every pod's capture) and take minutes to plan.
MAX_RANGES = 256


@dataclass(frozen=True)
class MeshPreset:
    name: str
    marker: str                     # the annotation its injector puts on a meshed pod
    proxy_uid: int
    out_port: int
    in_port: int
    dns_port: int                   # 0: the mesh has no DNS proxy
    skip_in_ports: tuple[int, ...]  # never captured inbound (the proxy's own ports)


PRESETS = {
    # istio-iptables as the injector runs it: -u 1337 -p 15001 -z 15006,
    # -d 15090,15021,15020 (Envoy's stats, health, merged metrics) and the
    # tunnel port 15008 it always leaves alone; DNS to 15053 when asked.
    "istio": MeshPreset("istio", ISTIO_STATUS, 1337, 15001, 15006, 15053,
                        (15008, 15020, 15021, 15090)),
    # linkerd proxy-init: uid 2102, outbound 4140, inbound 4143; its own
    # ports 4190 (tap) and 4191 (admin) are skipped inbound.
    "linkerd": MeshPreset("linkerd", LINKERD_VERSION, 2102, 4140, 4143, 0, (4190, 4191)),
}


@dataclass(frozen=True)
class PodCapture:
    """One meshed pod's effective capture settings."""

    namespace: str
    name: str
    uid: str
    ips: tuple                                  # the pod's addresses
    mesh: str
    proxy_uid: int
    out_port: int
    in_port: int
    dns_port: int                               # 0: DNS not captured
    include_out: tuple[IPNetwork, ...] | None   # None: every destination ("*")
    exclude_out: tuple[IPNetwork, ...] = ()
    include_in_ports: tuple[int, ...] | None = None   # None: every port ("*")
    exclude_in_ports: tuple[int, ...] = ()
    exclude_out_ports: tuple[int, ...] = ()
    default_container: str = ""

    @property
    def outbound(self) -> bool:
        return self.include_out is None or bool(self.include_out)

    @property
    def inbound(self) -> bool:
        return self.include_in_ports is None or bool(self.include_in_ports)

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)


class AnnotationError(ValueError):
    def __init__(self, key: str, reason: str):
        super().__init__(f"metadata.annotations[{key}]: {reason}")
        self.key = key
        self.reason = reason


def kept_annotations(annotations: Mapping | None) -> dict[str, str]:
    """The annotations a source keeps on a Pod: capture's only."""
    if not isinstance(annotations, Mapping):
        return {}
    return {k: v for k, v in annotations.items()
            if isinstance(k, str) and isinstance(v, str) and k.startswith(KEPT_PREFIXES)}


def annotation_problems(annotations: Mapping[str, str]) -> list[AnnotationError]:
    """Every capture annotation whose value does not parse."""
    problems = []
    for key in (*RANGE_KEYS, *PORT_KEYS):
        if key in annotations:
            try:
                _parse(key, annotations[key])
            except AnnotationError as exc:
                problems.append(exc)
    return problems


def _items(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _parse(key: str, text: str):
    """A list annotation's value: None for "*", else a tuple of networks
    or ports. Raises AnnotationError."""
    items = _items(text)
    if key in WILDCARD_KEYS and items == ["*"]:
        return None
    if key in RANGE_KEYS:
        if len(items) > MAX_RANGES:
            raise AnnotationError(key, f"names {len(items)} ranges, more than {MAX_RANGES}")
        return tuple(_network(key, item) for item in items)
    ports: set[int] = set()
    for item in items:
        ports.update(_ports(key, item))
        if len(ports) > MAX_PORTS:
            raise AnnotationError(key, f"names more than {MAX_PORTS} ports")
    return tuple(sorted(ports))


def _network(key: str, item: str) -> IPNetwork:
    if "/" not in item:
        raise AnnotationError(key, f"{item!r} is not a CIDR (address/prefix)")
    try:
        net = ipaddress.ip_network(item, strict=False)
    except ValueError as exc:
        raise AnnotationError(key, f"{item!r} is not a CIDR ({exc})") from None
    if isinstance(net, ipaddress.IPv6Network) and net.network_address.ipv4_mapped is not None:
        # The maps store IPv4 as ::ffff:a.b.c.d: it would silently mean IPv4.
        raise AnnotationError(key, f"{item!r}: write IPv4-mapped ranges as IPv4")
    return net


def _ports(key: str, item: str) -> range:
    first, dash, last = item.partition("-")
    try:
        low = int(first, 10)
        high = int(last, 10) if dash else low
    except ValueError:
        raise AnnotationError(key, f"{item!r} is not a port number or range") from None
    if not (1 <= low <= high <= 65535):
        raise AnnotationError(key, f"{item!r} is not a port (1-65535) or an ascending range")
    return range(low, high + 1)


def is_meshed(pod, settings: CaptureSettings) -> bool:
    """Capture is on and the pod carries its mesh's marker or the opt-in label."""
    if not settings.enabled or pod.host_network:
        return False
    if PRESETS[settings.mesh].marker in pod.annotations:
        return True
    if settings.opt_in_label is None:
        return False
    key, value = settings.opt_in_label
    return key in pod.labels and (value is None or pod.labels[key] == value)


def pod_capture(pod, settings: CaptureSettings) -> PodCapture:
    """The effective settings of a meshed pod. Raises AnnotationError for
    an annotation that does not parse (the pod then stays unmeshed)."""
    preset = PRESETS[settings.mesh]
    notes = pod.annotations

    def parsed(key: str, default):
        return _parse(key, notes[key]) if key in notes else default

    if preset.name == "istio":
        include_out = parsed(INCLUDE_OUT_RANGES, None)
        exclude_out = parsed(EXCLUDE_OUT_RANGES, ())
        include_in = parsed(INCLUDE_IN_PORTS, None)
        exclude_in = parsed(EXCLUDE_IN_PORTS, ())
        exclude_out_ports = parsed(EXCLUDE_OUT_PORTS, ())
    else:
        include_out, include_in = None, None
        exclude_out = parsed(LINKERD_SKIP_SUBNETS, ())
        exclude_in = parsed(LINKERD_SKIP_IN, ())
        exclude_out_ports = parsed(LINKERD_SKIP_OUT, ())
    exclude_in = tuple(sorted({*exclude_in, *preset.skip_in_ports}))
    if include_in is not None:  # the preset's own ports stay uncaptured even if named
        include_in = tuple(p for p in include_in if p not in exclude_in)
    return PodCapture(
        pod.namespace, pod.name, pod.uid, tuple(pod.ips), preset.name, preset.proxy_uid,
        preset.out_port, preset.in_port, preset.dns_port if settings.dns else 0,
        include_out, exclude_out, include_in, exclude_in, exclude_out_ports,
        notes.get(DEFAULT_CONTAINER, ""))
