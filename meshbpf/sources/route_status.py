"""Gateway API status of routes: Accepted and ResolvedRefs per Service parent.

Computed from a DesiredState alone (its routes, and its Service ports after
apply_routes), so every node's agent computes the same status from the same
objects; the Kubernetes source writes it (kube_route_status), the file
source reports the False conditions among its problems, and the agent
serves all of it at /v1/routes for `meshbpf route list`.

Reasons are the Gateway API's (v1 RouteConditionReason): Accepted,
NoMatchingParent, Conflicted (GEP-1426: another route already splits that
parent port), ResolvedRefs, BackendNotFound, InvalidKind, RefNotPermitted
(a backendRef to another namespace that no ReferenceGrant there allows:
refused). NotAllowedByListeners has no meaning for a Service
parent (no listeners) and is never set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

from ..model import BackendRef, DesiredState, ParentRef, ReferenceGrant, Route, ServicePort
from .errors import MAX_PART, one_line

CONTROLLER_NAME = "meshbpf.io/mesh"

_INVALID_MESSAGE = {
    "InvalidKind": "is not a Service (group \"\", kind Service)",
    "RefNotPermitted": "is in another namespace, and no ReferenceGrant there allows it",
}


@dataclass(frozen=True)
class Condition:
    type: str
    status: bool
    reason: str
    message: str


@dataclass(frozen=True)
class ParentStatus:
    """One route's status for one of its Service parents."""

    route: Route
    parent: ParentRef
    accepted: Condition
    resolved_refs: Condition

    @property
    def conditions(self) -> tuple[Condition, Condition]:
        return self.accepted, self.resolved_refs

    def parent_ref(self) -> dict[str, Any]:
        """The parentRef as status.parents[].parentRef carries it."""
        ref: dict[str, Any] = {"group": "", "kind": "Service", "name": self.parent.name,
                               "namespace": self.parent.namespace}
        if self.parent.port is not None:
            ref["port"] = self.parent.port
        return ref

    def problems(self) -> list[str]:
        """One line per False condition, naming where the route came from
        (names are shown escaped and cut as Problems show them)."""
        return [one_line(f"{self.route.where} ({self.route}): parent Service {self.parent.namespace}/"
                         f"{self.parent.name}: {c.type} False ({c.reason}): {c.message}", 2 * MAX_PART)
                for c in self.conditions if not c.status]

    def view(self) -> dict[str, Any]:
        return {"route": str(self.route), "parent": self.parent_ref(),
                "conditions": [{"type": c.type, "status": str(c.status), "reason": c.reason,
                                "message": c.message} for c in self.conditions]}


GATEWAY_GROUP = "gateway.networking.k8s.io"


def ref_permitted(route: Route, ref: BackendRef, grants: Iterable[ReferenceGrant]) -> bool:
    """Whether the route may use a backendRef: one in its own namespace, or
    one a ReferenceGrant in the Service's namespace allows for this route
    kind and namespace (to: group "", kind Service, that name or any)."""
    if ref.namespace == route.namespace:
        return True
    return any(g.namespace == ref.namespace and (GATEWAY_GROUP, route.kind, route.namespace) in g.from_
               and any(group == "" and kind == "Service" and name in (None, ref.name)
                       for group, kind, name in g.to)
               for g in grants)


def route_statuses(state: DesiredState,
                   ports_of: Callable[[str], Iterable[ServicePort]] | None = None) -> list[ParentStatus]:
    """The status of every route of the state, per Service parent.
    ports_of: as for services_named."""
    by_service = services_named(state, state.routes, ports_of)
    out = []
    for route in sorted(state.routes, key=lambda r: (r.namespace, r.name, r.kind)):
        for parent in route.parents:
            service = f"{parent.namespace}/{parent.name}"
            matched = [sp for sp in by_service.get(service, [])
                       if sp.frontend.protocol == route.protocol
                       and (parent.port is None or sp.frontend.port == parent.port)]
            ours = [sp for sp in matched if sp.route == str(route)]
            out.append(ParentStatus(route, parent, _accepted(route, parent, by_service, matched, ours),
                                    _resolved_refs(route, by_service, ours, state.reference_grants)))
    return out


def services_named(state: DesiredState, routes: Iterable[Route],
                   ports_of: Callable[[str], Iterable[ServicePort]] | None = None
                   ) -> dict[str, list[ServicePort]]:
    """The ports in `state` of each Service ("namespace/name") the routes
    name as a parent or a backend, for those that have any: the others
    cannot be either. ports_of: a Service's frontends as a source indexes
    them (a port's value is then read from the state, which may hold it
    split); without it every frontend is walked."""
    named = {f"{p.namespace}/{p.name}" for r in routes for p in r.parents}
    named |= {f"{b.namespace}/{b.name}" for r in routes for b in r.backend_refs}
    by_service: dict[str, list[ServicePort]] = {}
    if ports_of is None:
        for sp in state.service_ports.values():
            if sp.service in named:
                by_service.setdefault(sp.service, []).append(sp)
        return by_service
    ports = state.service_ports
    for name in sorted(named):
        held = [ports[sp.frontend] for sp in ports_of(name) if sp.frontend in ports]
        if held:
            by_service[name] = held
    return by_service


def _accepted(route: Route, parent: ParentRef, by_service: dict[str, list[ServicePort]],
              matched: list[ServicePort], ours: list[ServicePort]) -> Condition:
    service = f"{parent.namespace}/{parent.name}"
    if service not in by_service:
        return Condition("Accepted", False, "NoMatchingParent",
                         f"no Service {service} with a cluster IP handled by meshbpf")
    if not matched:
        port = f" {parent.port}" if parent.port is not None else ""
        return Condition("Accepted", False, "NoMatchingParent",
                         f"Service {service} has no {route.protocol} port{port}")
    if not ours:
        return Condition("Accepted", False, "Conflicted",
                         f"{matched[0].route} already splits Service {service} "
                         f"(the first route by namespace/name wins)")
    return Condition("Accepted", True, "Accepted",
                     f"splits {len(ours)} frontend(s) of Service {service}")


def _resolved_refs(route: Route, by_service: dict[str, list[ServicePort]],
                   ours: list[ServicePort], grants: tuple[ReferenceGrant, ...]) -> Condition:
    """ResolvedRefs: the first failing backendRef's reason, every failure in
    the message. A Service must have the port, in the protocol, and (for
    each parent frontend split) in that frontend's address family."""
    failures: list[tuple[str, str]] = []
    families = {sp.frontend.address.version for sp in ours} or {None}
    for i, ref in enumerate(route.backend_refs):
        name = f"backendRefs[{i}] {ref.namespace}/{ref.name}"
        invalid = ref.invalid or ("" if ref_permitted(route, ref, grants) else "RefNotPermitted")
        if invalid:
            failures.append((invalid, f"{name} {_INVALID_MESSAGE.get(invalid, invalid)}"))
            continue
        ports = [sp for sp in by_service.get(f"{ref.namespace}/{ref.name}", [])
                 if sp.frontend.port == ref.port and sp.frontend.protocol == route.protocol]
        missing = [f for f in families if not any(f in (None, sp.frontend.address.version) for sp in ports)]
        if missing:
            family = f" (IPv{missing[0]})" if missing[0] else ""
            failures.append(("BackendNotFound", f"{name}: no Service with {route.protocol} port "
                                                f"{ref.port}{family}; its share is refused"))
    if failures:
        return Condition("ResolvedRefs", False, failures[0][0], "; ".join(m for _, m in failures))
    return Condition("ResolvedRefs", True, "ResolvedRefs",
                     f"all {len(route.backend_refs)} backendRefs resolved")


def routes_view(state: DesiredState | None) -> dict[str, Any]:
    """The agent's /v1/routes: every route's status per Service parent."""
    return {"controller": CONTROLLER_NAME,
            "routes": [] if state is None else [ps.view() for ps in route_statuses(state)]}
