"""Gateway API routes on Services (GAMMA): TCPRoute and UDPRoute, v1alpha2.

`read_routes` turns route objects into model.Route values; a bad route is
left out with one problem naming file, document and field, and never blocks
the others. `apply_routes` resolves them against the Services of a
DesiredState: each parent frontend gets a `split` naming its backend
Services' endpoints and weights. The planner turns that into slots
(reconcile/split.py); nothing here knows about maps.

A parent must be in the route's namespace. A backendRef in another one
needs a ReferenceGrant there (`read_grants`); one without, or one not to
a Service, is kept with its share refused, and the route's ResolvedRefs
says why (route_status). Parents that are not Services (a Gateway) are
skipped.
"""

from __future__ import annotations

import weakref
from dataclasses import replace
from typing import Any, Callable, Iterable

from ..model import (BackendRef, Delta, DesiredState, Frontend, ParentRef, ReferenceGrant, Route, ServicePort,
                     SplitShare)
from ..overlay import OverlayMap
from .errors import MAX_PART, Problem, one_line
from .kube_objects import SourceObject
from .names import name_problem, namespace_problem
from .route_status import _INVALID_MESSAGE, ref_permitted, services_named

API_VERSION = "gateway.networking.k8s.io/v1alpha2"
ROUTE_KINDS = ("TCPRoute", "UDPRoute")
GRANT_KIND = "ReferenceGrant"
GRANT_API_VERSIONS = ("gateway.networking.k8s.io/v1beta1", "gateway.networking.k8s.io/v1alpha2")
MAX_WEIGHT = 1_000_000  # the Gateway API's bound
MAX_OBJECT_NAME = 253  # the Gateway API's ObjectName: any name of 1 to 253 characters


class _Bad(Exception):
    def __init__(self, path: str, reason: str):
        super().__init__(reason)
        self.path, self.reason = path, reason


def read_routes(objects: Iterable[SourceObject], previous: Iterable[Route] = ()
                ) -> tuple[list[Route], list[Problem], list[str]]:
    """(routes, problems, notes): one problem per bad route, which is left
    out; a bad edit of a route in `previous` keeps that version instead, as
    a bad Service edit does: a typo must not send the parent's traffic back
    to its own endpoints."""
    kept = {(r.kind, r.namespace, r.name): r for r in previous}
    routes: list[Route] = []
    problems: list[Problem] = []
    notes: list[str] = []
    seen: dict[tuple[str, str, str], str] = {}
    for src in objects:
        obj = src.obj
        meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
        label = f"{obj.get('kind')} {meta.get('namespace') or 'default'}/{meta.get('name')}"
        try:
            route = _read_route(src)
        except Exception as exc:  # _Bad; or a bug, which must not take the other routes down
            bad = exc if isinstance(exc, _Bad) else _internal(exc)
            problems.append(Problem(src.where, label, bad.path, bad.reason))
            old = kept.get(_route_key(obj, meta))
            if old is not None and (old.kind, old.namespace, old.name) not in seen:
                seen[(old.kind, old.namespace, old.name)] = src.where
                routes.append(old)
            continue
        if route is None:
            notes.append(f"{src.where} ({label}): no Service parent; skipped")
            continue
        key = (route.kind, route.namespace, route.name)
        if key in seen:
            problems.append(Problem(src.where, label, "metadata.name", f"defined twice (first at {seen[key]})"))
            continue
        seen[key] = src.where
        routes.append(route)
    return routes, problems, _one_line_each(notes)


def _one_line_each(notes: list[str]) -> list[str]:
    """Notes are logged as they are: names with line breaks shown escaped."""
    return [one_line(note, 2 * MAX_PART) for note in notes]


def _route_key(obj: dict, meta: dict) -> tuple[str, str, str] | None:
    """(kind, namespace, name) of a route that failed to read, to find its
    previous version; None when a part is not even a string (any value may
    sit there: a list as the name must not raise while reporting it)."""
    key = (obj.get("kind"), meta.get("namespace") or "default", meta.get("name"))
    return key if all(isinstance(part, str) for part in key) else None


def _internal(exc: Exception) -> _Bad:
    return _Bad("", f"internal error while reading it ({type(exc).__name__}: {exc}); please report this")


def _name_and_namespace(obj: dict, kind: str) -> tuple[str, str]:
    """As the API server checks them: the name of a custom resource, the
    namespace a DNS-1123 label."""
    meta = _mapping(obj.get("metadata"), "metadata")
    name = _string(meta.get("name"), "metadata.name")
    namespace = _string(meta.get("namespace", "default"), "metadata.namespace")
    _check(name_problem(kind, name), "metadata.name")
    return name, _namespace(namespace, "metadata.namespace")


def _check(reason: str | None, path: str) -> None:
    if reason:
        raise _Bad(path, reason)


def _namespace(v: Any, path: str) -> str:
    namespace = _string(v, path)
    _check(namespace_problem(namespace), path)
    return namespace


def _ref_name(v: Any, path: str) -> str:
    """A reference's name: the CRD takes any of 1 to 253 characters (its
    ObjectName has no pattern). A Service name that no Service can have is
    not a bad route: it names no Service, so it resolves to BackendNotFound
    and its share is refused, as the Gateway API asks of a missing backend."""
    name = _string(v, path)
    if len(name) > MAX_OBJECT_NAME:
        raise _Bad(path, f"{len(name)} characters; the Gateway API takes names of at most {MAX_OBJECT_NAME}")
    return name


def _read_route(src: SourceObject) -> Route | None:
    obj = src.obj
    if obj.get("apiVersion") != API_VERSION:
        raise _Bad("apiVersion", f"must be {API_VERSION!r}, not {obj.get('apiVersion')!r}")
    name, namespace = _name_and_namespace(obj, obj["kind"])
    spec = _mapping(obj.get("spec"), "spec")
    _known(spec, "spec", {"parentRefs", "rules"})
    parents = [_parent(p, f"spec.parentRefs[{i}]", namespace)
               for i, p in enumerate(_list(spec.get("parentRefs"), "spec.parentRefs"))]
    parents = [p for p in parents if p is not None]
    if not parents:
        return None
    rules = _list(spec.get("rules"), "spec.rules")
    if len(rules) != 1:
        raise _Bad("spec.rules", f"exactly one rule is supported, found {len(rules)}")
    rule = _mapping(rules[0], "spec.rules[0]")
    _known(rule, "spec.rules[0]", {"backendRefs", "name"})
    refs = tuple(_backend(b, f"spec.rules[0].backendRefs[{i}]", namespace)
                 for i, b in enumerate(_list(rule.get("backendRefs"), "spec.rules[0].backendRefs")))
    if not refs:
        raise _Bad("spec.rules[0].backendRefs", "needs at least one backendRef")
    return Route(obj["kind"], namespace, name, tuple(parents), refs, src.where)


def _parent(p: Any, path: str, namespace: str) -> ParentRef | None:
    p = _mapping(p, path)
    _known(p, path, {"group", "kind", "name", "namespace", "port", "sectionName"})
    # The API's default parent is a Gateway (group gateway.networking.k8s.io).
    if p.get("group", "gateway.networking.k8s.io") != "" or p.get("kind", "Gateway") != "Service":
        return None
    _same_namespace(p, path, namespace)
    port = p.get("port")
    return ParentRef(namespace, _ref_name(p.get("name"), f"{path}.name"),
                     None if port is None else _port(port, f"{path}.port"))


def _backend(b: Any, path: str, namespace: str) -> BackendRef:
    """A backendRef; one that is not a Service, or is in another namespace
    (no ReferenceGrant is read), is kept as invalid: its share is refused
    and the route's ResolvedRefs says why, as the Gateway API asks."""
    b = _mapping(b, path)
    _known(b, path, {"group", "kind", "name", "namespace", "port", "weight"})
    service = b.get("group", "") == "" and b.get("kind", "Service") == "Service"
    name = _ref_name(b.get("name"), f"{path}.name")
    weight = b.get("weight", 1)
    if type(weight) is not int or not 0 <= weight <= MAX_WEIGHT:
        raise _Bad(f"{path}.weight", f"must be an integer from 0 to {MAX_WEIGHT}, not {weight!r}")
    ref_namespace = _namespace(b.get("namespace", namespace), f"{path}.namespace")
    if not service:
        port = b.get("port")
        return BackendRef(ref_namespace, name, port if type(port) is int else 0, weight, invalid="InvalidKind")
    if "port" not in b:
        raise _Bad(f"{path}.port", "missing (a Service backendRef needs a port)")
    # Another namespace: allowed or not by the ReferenceGrants (apply_routes).
    return BackendRef(ref_namespace, name, _port(b["port"], f"{path}.port"), weight)


def read_grants(objects: Iterable[SourceObject]) -> tuple[list[ReferenceGrant], list[Problem]]:
    """ReferenceGrants; a bad one is left out with one problem (the
    references it would allow are then refused: nothing opens by mistake)."""
    grants, problems = [], []
    seen: dict[tuple[str, str], str] = {}
    for src in objects:
        meta = src.obj.get("metadata") if isinstance(src.obj.get("metadata"), dict) else {}
        label = f"ReferenceGrant {meta.get('namespace') or 'default'}/{meta.get('name')}"
        try:
            grant = _read_grant(src.obj)
        except Exception as exc:  # _Bad; or a bug, which must not take the other grants down
            bad = exc if isinstance(exc, _Bad) else _internal(exc)
            problems.append(Problem(src.where, label, bad.path, bad.reason))
            continue
        # A second copy is left out, as a second route is: keeping both would
        # let the copy an edit replaced go on allowing what the edit removed.
        key = (grant.namespace, grant.name)
        if key in seen:
            problems.append(Problem(src.where, label, "metadata.name", f"defined twice (first at {seen[key]})"))
            continue
        seen[key] = src.where
        grants.append(grant)
    return grants, problems


def _read_grant(obj: dict) -> ReferenceGrant:
    if obj.get("apiVersion") not in GRANT_API_VERSIONS:
        raise _Bad("apiVersion", f"must be one of {', '.join(GRANT_API_VERSIONS)}, not {obj.get('apiVersion')!r}")
    name, namespace = _name_and_namespace(obj, GRANT_KIND)
    spec = _mapping(obj.get("spec"), "spec")
    _known(spec, "spec", {"from", "to"})
    froms, tos = [], []
    for i, f in enumerate(_list(spec.get("from"), "spec.from")):
        f = _mapping(f, f"spec.from[{i}]")
        _known(f, f"spec.from[{i}]", {"group", "kind", "namespace"})
        froms.append((_group(f.get("group"), f"spec.from[{i}].group"), _string(f.get("kind"), f"spec.from[{i}].kind"),
                      _namespace(f.get("namespace"), f"spec.from[{i}].namespace")))
    for i, t in enumerate(_list(spec.get("to"), "spec.to")):
        t = _mapping(t, f"spec.to[{i}]")
        _known(t, f"spec.to[{i}]", {"group", "kind", "name"})
        group, kind = _group(t.get("group"), f"spec.to[{i}].group"), _string(t.get("kind"), f"spec.to[{i}].kind")
        to_name = t.get("name")
        tos.append((group, kind, None if to_name is None else
                    _ref_name(to_name, f"spec.to[{i}].name")))
    return ReferenceGrant(namespace, name, tuple(froms), tuple(tos))


def _group(v: Any, path: str) -> str:
    if not isinstance(v, str):
        raise _Bad(path, "missing" if v is None else f"must be a string (\"\" for the core group), not {v!r}")
    return v


def _same_namespace(ref: dict, path: str, namespace: str) -> None:
    other = ref.get("namespace", namespace)
    if other != namespace:
        raise _Bad(f"{path}.namespace", f"{other!r}: only references in the route's own "
                                        f"namespace {namespace!r} are supported")


def _mapping(v: Any, path: str) -> dict:
    if not isinstance(v, dict):
        raise _Bad(path, f"must be a mapping, not {type(v).__name__}")
    return v


def _list(v: Any, path: str) -> list:
    if not isinstance(v, list):
        raise _Bad(path, "missing" if v is None else f"must be a list, not {type(v).__name__}")
    return v


def _string(v: Any, path: str) -> str:
    if not isinstance(v, str) or not v:
        raise _Bad(path, "missing" if v is None else f"must be a non-empty string, not {v!r}")
    return v


def _port(v: Any, path: str) -> int:
    if type(v) is not int or not 1 <= v <= 65535:
        raise _Bad(path, f"must be a port number from 1 to 65535, not {v!r}")
    return v


def _known(m: dict, path: str, fields: set[str]) -> None:
    unknown = sorted(set(m) - fields)
    if unknown:
        raise _Bad(f"{path}.{unknown[0]}", "unknown field")


def apply_routes(state: DesiredState, routes: list[Route],
                 grants: Iterable[ReferenceGrant] = ()) -> tuple[DesiredState, list[str]]:
    """The state with each route's parent frontends split; notes name broken
    references and parents a route does not match. The first route (by
    namespace/name) on a frontend wins; later ones are noted. A backendRef
    to another namespace needs a ReferenceGrant there, else it is refused."""
    routed, _, notes = split_by_routes(state, routes, grants)
    return routed, notes


def reapply_routes(state: DesiredState, previous: DesiredState, previous_split: Iterable[Frontend],
                   routes: list[Route], grants: Iterable[ReferenceGrant] = (),
                   ports_of: Callable[[str], Iterable[ServicePort]] | None = None
                   ) -> tuple[DesiredState, tuple[Frontend, ...], list[str]]:
    """apply_routes for a source that derives each state from the last:
    `state` is unsplit, with a Delta over the unsplit state before it, and
    `previous` is the split state handed out from that one, whose split
    frontends were `previous_split`. The result's Delta is over `previous`:
    the frontends the change touched, and every split frontend before and
    after (a parent's split follows its backend Services, which the change
    may have touched). Also returns the split frontends. Without a Delta the
    result has none either (its consumer compares the states itself).
    ports_of: a Service's ("namespace/name") ports in `state`, when the
    source indexes them; else they are found by a walk of every frontend.
    With it, and `state.service_ports` an OverlayMap, the work is the
    routes', not the state's."""
    routed, split, notes = split_by_routes(state, routes, grants, ports_of)
    if state.delta is not None:
        frontends = tuple(dict.fromkeys([*state.delta.frontends, *previous_split, *split]))
        routed = replace(routed, delta=Delta(weakref.ref(previous), frontends))
    return routed, split, notes


def split_by_routes(state: DesiredState, routes: list[Route], grants: Iterable[ReferenceGrant] = (),
                    ports_of: Callable[[str], Iterable[ServicePort]] | None = None
                    ) -> tuple[DesiredState, tuple[Frontend, ...], list[str]]:
    """apply_routes, also returning the frontends split (a source that
    derives states later hands them to reapply_routes); ports_of as there."""
    grants = tuple(sorted(grants, key=lambda g: (g.namespace, g.name)))
    by_service = services_named(state, routes, ports_of)
    # The split parents set in place (an OverlayMap: a copy of the change only)
    ports = OverlayMap.of(state.service_ports).editor()
    notes: list[str] = []
    owner: dict = {}
    for route in sorted(routes, key=lambda r: (r.namespace, r.name, r.kind)):
        for parent in route.parents:
            matched = [sp for sp in by_service.get(f"{parent.namespace}/{parent.name}", [])
                       if sp.frontend.protocol == route.protocol
                       and (parent.port is None or sp.frontend.port == parent.port)]
            if not matched:
                notes.append(f"{route.where} ({route}): parent Service {parent.namespace}/{parent.name} "
                             f"has no {route.protocol} port{f' {parent.port}' if parent.port else ''}")
            for sp in matched:
                if sp.frontend in owner:
                    notes.append(f"{route.where} ({route}): {sp.frontend} is already split by {owner[sp.frontend]}")
                    continue
                owner[sp.frontend] = route
                shares = tuple(_share(route, ref, sp, by_service, notes, grants) for ref in route.backend_refs)
                ports[sp.frontend] = replace(sp, split=shares, route=str(route))
    return (replace(state, service_ports=ports.done(), routes=tuple(routes), reference_grants=grants,
                    delta=None),
            tuple(owner), _one_line_each(notes))


def _share(route: Route, ref: BackendRef, parent: ServicePort, by_service: dict[str, list[ServicePort]],
           notes: list[str], grants: tuple[ReferenceGrant, ...]) -> SplitShare:
    """One backendRef against the parent's family and protocol; no endpoints
    (a share that gets no slots) when the Service or port is missing."""
    label = f"{ref.namespace}/{ref.name}:{ref.port}"
    fe = parent.frontend
    invalid = ref.invalid or ("" if ref_permitted(route, ref, grants) else "RefNotPermitted")
    if invalid:
        notes.append(f"{route.where} ({route}): backendRef {label}: {_INVALID_MESSAGE[invalid]}; its share is refused")
        return SplitShare(label, ref.weight, ())
    for sp in by_service.get(f"{ref.namespace}/{ref.name}", []):
        if (sp.frontend.port == ref.port and sp.frontend.protocol == fe.protocol
                and sp.frontend.address.version == fe.address.version):
            return SplitShare(label, ref.weight, sp.endpoints)
    notes.append(f"{route.where} ({route}): backendRef Service {label}/{fe.protocol} "
                 f"(IPv{fe.address.version}) does not exist; its share is refused")
    return SplitShare(label, ref.weight, ())
