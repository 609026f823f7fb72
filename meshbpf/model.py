"""Desired state: what the node should be doing, as plain, validated data.

Sources (the YAML file, the Kubernetes API) produce a DesiredState; the
reconciler turns it into map writes. Nothing here knows about BPF.
"""

from __future__ import annotations

import ipaddress
import weakref
from dataclasses import dataclass, field
from typing import Union

from .policy.model import NamespaceInfo, NetworkPolicy, PodInfo

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

PROTOCOLS = ("TCP", "UDP")

# Kubernetes' default for sessionAffinityConfig.clientIP.timeoutSeconds.
DEFAULT_AFFINITY_TIMEOUT = 10800


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One endpoint address and port of a service port, with its conditions.

    Defaults follow kube-proxy's EndpointSlice reading: ready and serving are
    true when unset, terminating only counts when set.
    """

    address: IPAddress
    port: int
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    node_name: str | None = None
    zone: str | None = None


@dataclass(frozen=True, slots=True)
class Frontend:
    """What a client connects to: a service address, port and protocol."""

    address: IPAddress
    port: int
    protocol: str  # "TCP" or "UDP"

    def __str__(self) -> str:
        host = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        return f"{host}:{self.port}/{self.protocol}"


SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer")

IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


@dataclass(frozen=True, slots=True)
class Exposure:
    """How a Service is reached from outside the node (issue 12): one object
    per Service, shared by its ServicePorts; None on a ServicePort of a
    plain ClusterIP Service without external IPs (the common case costs one
    pointer). Addresses of both families: each ServicePort uses those of
    its own family."""

    type: str = "ClusterIP"                      # one of SERVICE_TYPES
    external_ips: tuple[IPAddress, ...] = ()     # spec.externalIPs
    lb_ips: tuple[IPAddress, ...] = ()           # status.loadBalancer.ingress[].ip (LoadBalancer only)
    local: bool = False                          # externalTrafficPolicy: Local
    health_check_node_port: int = 0              # 0: none
    source_ranges: tuple[IPNetwork, ...] = ()    # loadBalancerSourceRanges; (): any client


@dataclass(frozen=True, slots=True)
class ServicePort:
    """One port of one Service on one of its cluster IPs."""

    namespace: str
    name: str
    port_name: str
    frontend: Frontend
    endpoints: tuple[Endpoint, ...]
    affinity_timeout: int = 0  # seconds; 0 means no session affinity
    # Set when a route (TCPRoute/UDPRoute with this Service as parent)
    # splits this frontend: new connections go to these backend Services by
    # weight, not to `endpoints` (kept for display). Empty: no split.
    split: tuple["SplitShare", ...] = ()
    route: str = ""  # "TCPRoute namespace/name" that set `split`
    # North-south (issue 12): spec.ports[].nodePort (0: none), the Service's
    # exposure, and, only when internalTrafficPolicy or topology hints
    # narrowed `endpoints` for traffic from inside, every endpoint (traffic
    # from outside follows externalTrafficPolicy; None: `endpoints`).
    node_port: int = 0
    exposure: Exposure | None = None
    external_endpoints: tuple[Endpoint, ...] | None = None

    @property
    def service(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def all_endpoints(self) -> tuple[Endpoint, ...]:
        """Every endpoint of the port, unfiltered by internalTrafficPolicy
        or topology: what traffic from outside the node may reach."""
        return self.endpoints if self.external_endpoints is None else self.external_endpoints


@dataclass(frozen=True, slots=True)
class SplitShare:
    """One backendRef of a route, resolved: a backend Service port, its
    weight and its endpoints (empty when the Service has none)."""

    service: str        # "namespace/name:port"
    weight: int
    endpoints: tuple[Endpoint, ...]


@dataclass(frozen=True, slots=True)
class ParentRef:
    """A route's parent: a Service (GAMMA), optionally one of its ports."""

    namespace: str
    name: str
    port: int | None = None


@dataclass(frozen=True, slots=True)
class BackendRef:
    namespace: str
    name: str
    port: int
    weight: int = 1
    # Why this reference cannot be used (a Gateway API ResolvedRefs reason:
    # "InvalidKind", "RefNotPermitted"); its share is refused. "": usable.
    invalid: str = ""


@dataclass(frozen=True, slots=True)
class ReferenceGrant:
    """A gateway.networking.k8s.io/v1beta1 ReferenceGrant: objects of the
    `from` (group, kind, namespace) triples may refer to the `to` (group,
    kind, name or None for any) objects of this grant's namespace."""

    namespace: str
    name: str
    from_: tuple[tuple[str, str, str], ...]
    to: tuple[tuple[str, str, str | None], ...]


@dataclass(frozen=True, slots=True)
class Route:
    """A gateway.networking.k8s.io/v1alpha2 TCPRoute or UDPRoute whose
    parents are Services: traffic to the parent is split over backend_refs."""

    kind: str           # "TCPRoute" or "UDPRoute"
    namespace: str
    name: str
    parents: tuple[ParentRef, ...]
    backend_refs: tuple[BackendRef, ...]
    where: str = field(default="", compare=False)

    @property
    def protocol(self) -> str:
        return "TCP" if self.kind == "TCPRoute" else "UDP"

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class UsableEndpoint:
    endpoint: Endpoint
    terminating_fallback: bool  # chosen only because no endpoint is ready


def usable_endpoints(endpoints: tuple[Endpoint, ...]) -> list[UsableEndpoint]:
    """Which endpoints new connections may go to, as kube-proxy decides.

    Ready endpoints when there are any; otherwise the ones that are still
    serving while terminating, so a rolling update never leaves a gap;
    otherwise none, and the service refuses connections.
    """
    ready = [UsableEndpoint(e, False) for e in endpoints if e.ready]
    if ready:
        return ready
    return [UsableEndpoint(e, True) for e in endpoints if e.serving and e.terminating]


@dataclass(frozen=True, slots=True)
class RedirectSettings:
    """Same-node socket redirection: which workloads take part."""

    enabled: bool = False
    cgroups: tuple[str, ...] = ()                       # below the cgroup2 mount
    pod_cidrs: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()


MESHES = ("istio", "linkerd")


@dataclass(frozen=True, slots=True)
class CaptureSettings:
    """Sidecar capture (AgentConfig spec.capture): which local pods have
    their traffic steered to their proxy, and with which mesh's ports."""

    enabled: bool = False
    mesh: str = "istio"                 # one of MESHES: the proxy's uid and ports
    opt_in_label: tuple[str, str | None] | None = None  # (key, value or None: any value)
    dns: bool = False                   # port 53 to the proxy's DNS port (Istio only)


@dataclass(frozen=True, slots=True)
class AgentSettings:
    """What an AgentConfig object sets; the defaults stand without one."""

    redirect: RedirectSettings = RedirectSettings()
    capture: CaptureSettings = CaptureSettings()


@dataclass(frozen=True)
class Delta:
    """How a DesiredState differs from the one a source handed out before it
    (`base`, held weakly so states never chain up in memory): at most these
    frontends. A consumer that synced exactly `base` needs to look at
    nothing else; any other consumer compares the states itself. It speaks
    of Services only: the policy inputs (pods, namespaces,
    network_policies) are compared by whoever plans policy."""

    base: "weakref.ref[DesiredState]"
    frontends: frozenset[Frontend]


@dataclass
class DesiredState:
    """Everything the node should program: services keyed by frontend, the
    agent's own settings, and NetworkPolicy's inputs. Sources never change a
    state once handed out; a new one shares the unchanged ServicePort objects."""

    service_ports: dict[Frontend, ServicePort] = field(default_factory=dict)
    settings: AgentSettings = AgentSettings()
    # Every Pod, Namespace and NetworkPolicy of the cluster (not only this
    # node's: peers live anywhere), sorted by namespace and name; empty when
    # the source reads none.
    pods: tuple[PodInfo, ...] = ()
    namespaces: tuple[NamespaceInfo, ...] = ()
    network_policies: tuple[NetworkPolicy, ...] = ()
    # TCPRoutes and UDPRoutes with Service parents, already resolved into
    # their parents' ServicePort.split; kept for views.
    routes: tuple[Route, ...] = ()
    reference_grants: tuple[ReferenceGrant, ...] = ()  # read while routes exist
    # Not part of what the state is, only of how it came about:
    delta: Delta | None = field(default=None, compare=False, repr=False)
    # When the changes in it were made (EndpointSlices'
    # endpoints.kubernetes.io/last-change-trigger-time, Unix seconds), for
    # meshbpf_network_programming_duration_seconds.
    trigger_times: tuple[float, ...] = field(default=(), compare=False, repr=False)

    def services(self) -> set[str]:
        return {sp.service for sp in self.service_ports.values()}
