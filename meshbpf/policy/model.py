"""Plain, validated values for NetworkPolicy: pods, namespaces, policies.

Each class checks itself on construction and raises ModelError naming the
field (relative to the object), so a reader can turn it into a Problem.
Semantics follow networking.k8s.io/v1 (see compile.py for how they combine).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Mapping

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

PROTOCOLS = ("TCP", "UDP", "SCTP")
POLICY_TYPES = ("Ingress", "Egress")
OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"


class ModelError(ValueError):
    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}" if path else reason)
        self.path = path
        self.reason = reason


def _check_port(value: int, path: str) -> None:
    if type(value) is not int or not 1 <= value <= 65535:
        raise ModelError(path, f"{value!r} is not a port number (1-65535)")


@dataclass(frozen=True)
class Requirement:
    key: str
    operator: str
    values: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.operator not in OPERATORS:
            raise ModelError("operator", f"{self.operator!r} is not one of {', '.join(OPERATORS)}")
        if self.operator in ("In", "NotIn") and not self.values:
            raise ModelError("values", f"must not be empty for operator {self.operator}")
        if self.operator in ("Exists", "DoesNotExist") and self.values:
            raise ModelError("values", f"must be empty for operator {self.operator}")

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "In":
            return labels.get(self.key) in self.values
        if self.operator == "NotIn":
            return labels.get(self.key) not in self.values  # a missing key is "not in"
        if self.operator == "Exists":
            return self.key in labels
        return self.key not in labels


@dataclass(frozen=True)
class LabelSelector:
    """matchLabels AND matchExpressions; the empty selector selects everything."""

    match_labels: tuple[tuple[str, str], ...] = ()
    match_expressions: tuple[Requirement, ...] = ()

    @classmethod
    def of(cls, labels: Mapping[str, str] | None = None, *exprs: Requirement) -> "LabelSelector":
        return cls(tuple(sorted((labels or {}).items())), tuple(exprs))

    def matches(self, labels: Mapping[str, str]) -> bool:
        return (all(labels.get(k) == v for k, v in self.match_labels)
                and all(r.matches(labels) for r in self.match_expressions))


@dataclass(frozen=True)
class IPBlock:
    cidr: IPNetwork
    except_: tuple[IPNetwork, ...] = ()

    def __post_init__(self) -> None:
        for i, sub in enumerate(self.except_):
            if sub.version != self.cidr.version or not sub.subnet_of(self.cidr):
                raise ModelError(f"except[{i}]", f"{sub} is not inside cidr {self.cidr}")


@dataclass(frozen=True)
class Peer:
    """One from/to entry. pod_selector None with namespace_selector None is
    impossible upstream unless ip_block is set; namespace_selector None means
    the policy's own namespace."""

    pod_selector: LabelSelector | None = None
    namespace_selector: LabelSelector | None = None
    ip_block: IPBlock | None = None

    def __post_init__(self) -> None:
        selectors = self.pod_selector is not None or self.namespace_selector is not None
        if self.ip_block is not None and selectors:
            raise ModelError("ipBlock", "may not be combined with podSelector or namespaceSelector")
        if self.ip_block is None and not selectors:
            raise ModelError("", "needs podSelector, namespaceSelector or ipBlock")


@dataclass(frozen=True)
class PolicyPort:
    """protocol defaults to TCP (as the API server defaults it); port None is
    every port of that protocol; a name is a container port name."""

    protocol: str = "TCP"
    port: int | str | None = None
    end_port: int | None = None

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ModelError("protocol", f"{self.protocol!r} is not TCP, UDP or SCTP")
        if isinstance(self.port, int):
            _check_port(self.port, "port")
        elif self.port is not None and (type(self.port) is not str or not self.port):
            raise ModelError("port", f"expected a port number or name, got {self.port!r}")
        if self.end_port is not None:
            if not isinstance(self.port, int):
                raise ModelError("endPort", "needs a numeric port")
            _check_port(self.end_port, "endPort")
            if self.end_port < self.port:
                raise ModelError("endPort", f"{self.end_port} is below port {self.port}")


@dataclass(frozen=True)
class Rule:
    """peers () = every peer; ports () = every port and protocol."""

    peers: tuple[Peer, ...] = ()
    ports: tuple[PolicyPort, ...] = ()


@dataclass(frozen=True)
class NetworkPolicy:
    namespace: str
    name: str
    pod_selector: LabelSelector = LabelSelector()
    policy_types: frozenset[str] = frozenset({"Ingress"})
    ingress: tuple[Rule, ...] = ()
    egress: tuple[Rule, ...] = ()

    def __post_init__(self) -> None:
        unknown = set(self.policy_types) - set(POLICY_TYPES)
        if unknown:
            raise ModelError("spec.policyTypes", f"{sorted(unknown)[0]!r} is not Ingress or Egress")

    @staticmethod
    def default_types(has_egress_rules: bool) -> frozenset[str]:
        """Upstream default when policyTypes is unset: Ingress always, Egress
        when the policy has egress rules."""
        return frozenset({"Ingress", "Egress"} if has_egress_rules else {"Ingress"})


@dataclass(frozen=True)
class PodInfo:
    namespace: str
    name: str
    uid: str = ""
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)
    node_name: str = ""
    host_network: bool = False
    named_ports: Mapping[str, tuple[str, int]] = field(default_factory=dict, hash=False)
    ips: tuple[IPAddress, ...] = ()
    # The sidecar-capture annotations only (Istio's, Linkerd's): see
    # meshbpf/capture/settings.py. Empty for every other pod.
    annotations: Mapping[str, str] = field(default_factory=dict, hash=False)

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)


@dataclass(frozen=True)
class NamespaceInfo:
    name: str
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)
