"""Applying Service and EndpointSlice events to a DesiredState, per Service.

build_state() reads every object; at 100 000 Services that is seconds for a
one-endpoint change. `ServiceIndex` remembers, per Service, its object, its
slices and the ServicePorts it gave, and rebuilds only the Services an event
touches, with build_state() itself (one Service and its slices at a time),
so both paths read objects the same way. A full build_state() stays the
path after a (re)list and for settings or node changes.

Where the two could differ, the full build decides on the next relist:
two Services claiming one frontend keep the one that had it (the full build
keeps the first listed), and problems are reported per touched Service.
"""

from __future__ import annotations

import dataclasses
import re
import weakref
from datetime import datetime
from dataclasses import dataclass, field
from sys import intern
from typing import Any, Iterable

from ..model import Delta, DesiredState, Frontend, ServicePort
from ..overlay import OverlayEditor, OverlayMap
from .errors import Problem
from .held_text import loaded
from .kube_objects import SERVICE_NAME_LABEL, BuildResult, SourceObject, build_state
from .names import annotation_problems
from . import schema

Key = tuple[str, str]  # (namespace, name)
TRIGGER_TIME = "endpoints.kubernetes.io/last-change-trigger-time"


@dataclass
class Update:
    state: DesiredState | None             # None: nothing meshbpf programs changed
    problems: list[Problem] = field(default_factory=list)   # of the touched Services
    resolved: set[str] = field(default_factory=set)          # their problems now gone
    notes: list[str] = field(default_factory=list)


def _key(obj: dict) -> Key:
    meta = obj.get("metadata") or {}
    return meta.get("namespace") or "default", meta.get("name") or ""


def slice_service(obj: dict) -> Key | None:
    meta = obj.get("metadata") or {}
    labels = meta.get("labels") or {}
    name = labels.get(SERVICE_NAME_LABEL) if isinstance(labels, dict) else None
    # Interned: the index holds this key beside the Service's own, for every slice.
    return (intern(meta.get("namespace") or "default"), intern(name)) if isinstance(name, str) else None


def _owner(ports: OverlayEditor, fe: Frontend, default: Key | None = None) -> Key | None:
    """The Service holding a frontend in the state being built."""
    sp = ports.get(fe)
    return default if sp is None else (sp.namespace, sp.name)


def hold_annotations(meta: Any) -> None:
    """A Service's or EndpointSlice's metadata.annotations as the sources
    hold them (in place): only the last-change-trigger-time, the one
    annotation read, when Kubernetes would take the map. The others are
    never read and can be big (kubectl apply's last-applied-configuration
    is a copy of the whole object, kept for every Service of a cluster). A
    map Kubernetes would refuse stays whole, for the build to name."""
    annotations = meta.get("annotations") if type(meta) is dict else None
    if annotations is None or (schema.check(annotations, schema.STR_MAP)
                               or annotation_problems(annotations, "metadata.annotations")):
        return
    trigger = annotations.get(TRIGGER_TIME)
    if trigger is None:
        del meta["annotations"]
    elif len(annotations) > 1:
        meta["annotations"] = {TRIGGER_TIME: trigger}


def trigger_time(obj: dict | None) -> float | None:
    """An object's last-change-trigger-time annotation as Unix seconds."""
    meta = (obj or {}).get("metadata") or {}
    text = (meta.get("annotations") or {}).get(TRIGGER_TIME)
    if not isinstance(text, str):
        return None
    # RFC 3339, perhaps with nanoseconds (Go's RFC3339Nano): Python reads microseconds.
    m = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)", text.strip())
    if m is None:
        return None
    fraction = (m.group(2) or "")[:7]
    try:
        when = datetime.fromisoformat(m.group(1) + fraction + m.group(3).replace("Z", "+00:00"))
    except ValueError:
        return None
    return when.timestamp()


class ServiceIndex:
    """Objects are held as given: dicts, compact JSON text or that text
    packed (held_text; `raw`: the same objects in the form to hold, in the
    same order), which a rebuild reads back; at 100 000 Services the text
    is a fifth of the dicts' size, packed about a thirtieth."""

    def __init__(self, state: DesiredState, services: Iterable[dict], slices: Iterable[dict],
                 problems: list[Problem], raw: tuple[Iterable, Iterable] | None = None,
                 **build_args: Any):
        services, slices = list(services), list(slices)
        raw_services, raw_slices = raw if raw is not None else (services, slices)
        self._fill(state, ((_key(o), r) for o, r in zip(services, raw_services)),
                   ((_key(o), slice_service(o), r) for o, r in zip(slices, raw_slices)),
                   problems, build_args)

    @classmethod
    def of_held(cls, state: DesiredState, services: Iterable[tuple[Key, Any]],
                slices: Iterable[tuple[Key, Key | None, Any]], problems: list[Problem],
                **build_args: Any) -> "ServiceIndex":
        """From the objects as held, with what the index reads of them
        already known: (key, held) per Service, (key, its Service's key,
        held) per EndpointSlice. No object is read again."""
        index = cls.__new__(cls)
        index._fill(state, services, slices, problems, build_args)
        return index

    def _fill(self, state: DesiredState, services: Iterable[tuple[Key, Any]],
              slices: Iterable[tuple[Key, Key | None, Any]], problems: list[Problem],
              build_args: dict[str, Any]) -> None:
        # Held for every Service of the cluster, so kept small: one key tuple
        # per Service shared by every table, tuples rather than sets and
        # lists (a set of one slice is 216 bytes, a tuple 48), and which
        # Service holds a frontend read from the state itself, not indexed.
        self.state = state
        self.build_args = build_args      # node_name, service_proxy_name, node_zone
        self.services: dict[Key, Any] = dict(services)
        same = {k: k for k in self.services}  # the one tuple per key, while filling
        self.slices: dict[Key, Any] = {}
        self.slice_owner: dict[Key, Key | None] = {}
        self.slices_of: dict[Key, tuple[Key, ...]] = {}
        for key, owner, r in slices:
            self._hold_slice(key, owner if owner is None else same.get(owner, owner), r)
        ports_of: dict[Key, list[ServicePort]] = {}
        for sp in state.service_ports.values():
            key = (sp.namespace, sp.name)
            ports_of.setdefault(same.get(key, key), []).append(sp)
        self.ports_of: dict[Key, tuple[ServicePort, ...]] = {k: tuple(v) for k, v in ports_of.items()}
        del same, ports_of
        self.blocked: set[Key] = set()   # left out: a frontend of theirs is another's
        self.problems_of: dict[Key, list[Problem]] = {}
        for p in problems:
            kind, _, name = p.obj.partition(" ")
            ns, _, n = name.partition("/")
            if kind == "Service":
                self.problems_of.setdefault((ns, n), []).append(p)
                if p.path == "spec.clusterIP" and "is already used by" in p.reason:
                    self.blocked.add((ns, n))
            elif kind == "EndpointSlice" and self.slice_owner.get((ns, n)):
                self.problems_of.setdefault(self.slice_owner[(ns, n)], []).append(p)

    def _put_slice(self, key: Key, obj: dict | None, raw: Any) -> None:
        # An update overwrites in place: popping and re-adding a key that
        # stays would use up a dict's free slots, and under churn every
        # table here doubles (README, an hour of churn).
        old_owner = self.slice_owner.get(key)
        new_owner = None if obj is None else slice_service(obj)
        if new_owner == old_owner:
            new_owner = old_owner  # the one key tuple per Service (see _fill), not one per event
        if old_owner is not None and old_owner != new_owner:
            left = tuple(k for k in self.slices_of.get(old_owner, ()) if k != key)
            if left:
                self.slices_of[old_owner] = left
            else:
                self.slices_of.pop(old_owner, None)
        if obj is None:
            self.slice_owner.pop(key, None)
            self.slices.pop(key, None)
        else:
            self._hold_slice(key, new_owner, raw)

    def _hold_slice(self, key: Key, owner: Key | None, raw: Any) -> None:
        self.slices[key] = raw
        self.slice_owner[key] = owner
        if owner is not None:
            held = self.slices_of.get(owner, ())
            if key not in held:
                self.slices_of[owner] = held + (key,)

    def hold_equal(self, kind: str, key: Key, obj: dict) -> None:
        """Swaps in an object equal to the one held (nothing to rebuild)."""
        table = self.services if kind == "Service" else self.slices
        if key in table:
            table[key] = obj

    def apply(self, services: dict[Any, dict | None], slices: dict[Any, dict | None]) -> Update:
        """Takes the changed objects (reflector keys -> object, None: deleted)
        and returns the next state, built from the last one."""
        touched: dict[Key, None] = {}
        triggers: list[float] = []
        for obj_key, raw in services.items():
            key = (obj_key[0] or "default", obj_key[1])
            touched[key] = None
            if raw is None:
                self.services.pop(key, None)
            else:
                self.services[key] = raw
        for obj_key, raw in slices.items():
            key = (obj_key[0] or "default", obj_key[1])
            before = self.slice_owner.get(key)
            if before is not None:
                touched[before] = None
            obj = loaded(raw)
            self._put_slice(key, obj, raw)
            after = self.slice_owner.get(key)
            if after is not None:
                touched[after] = None
            t = trigger_time(obj)
            if t is not None:
                triggers.append(t)

        # The next version of the frontend map: costs the change, not a copy of all.
        ports = OverlayMap.of(self.state.service_ports).editor()
        # Ordered as the new state iterates them (see Delta): a dict as an ordered set.
        changed: dict[Frontend, None] = {}
        update = Update(None)
        for key in touched:
            self._release(key, ports, changed)
        # Services left out for a clash get another chance once frontends free up.
        retry = [k for k in self.blocked if k not in touched] if changed else []
        for key in list(touched) + retry:
            self._rebuild(key, ports, changed, update)
        if not changed:
            return update
        # replace(): what this index does not build (settings, policy inputs) carries over.
        update.state = dataclasses.replace(
            self.state, service_ports=ports.done(), delta=Delta(weakref.ref(self.state), tuple(changed)),
            trigger_times=tuple(triggers))
        self.state = update.state
        return update

    def service_ports(self, service: str) -> tuple[ServicePort, ...]:
        """The frontends of Service "namespace/name" in this index's state
        (routes.reapply_routes and route_statuses look Services up so)."""
        return self.ports_of.get(tuple(service.split("/", 1)), ())

    def _release(self, key: Key, ports: OverlayEditor, changed: dict[Frontend, None]) -> None:
        # ports_of[key] stays until _rebuild overwrites it (in place: see _put_slice).
        for sp in self.ports_of.get(key, ()):
            if _owner(ports, sp.frontend) == key:
                del ports[sp.frontend]
                changed[sp.frontend] = None

    def _rebuild(self, key: Key, ports: OverlayEditor, changed: dict[Frontend, None],
                 update: Update) -> None:
        self.blocked.discard(key)
        for p in self.problems_of.pop(key, []):
            update.resolved.add(str(p))
        svc = self.services.get(key)
        if svc is None:
            self.ports_of.pop(key, None)
            return
        objects = [SourceObject(loaded(svc), "API server")] + [
            SourceObject(loaded(self.slices[k]), "API server")
            for k in sorted(self.slices_of.get(key, ()))]  # build_state's order
        result: BuildResult = build_state(objects, **self.build_args)
        problems = list(result.problems)
        mine = list(result.state.service_ports.values())
        clashes = [sp for sp in mine if _owner(ports, sp.frontend, key) != key]
        for sp in clashes:
            first = "/".join(_owner(ports, sp.frontend))
            problems.append(Problem("API server", f"Service {key[0]}/{key[1]}", "spec.clusterIP",
                                    f"{sp.frontend} is already used by Service {first}"))
        if clashes:
            self.blocked.add(key)
            mine = []
        for i, sp in enumerate(mine):
            base = self.state.service_ports.get(sp.frontend)
            changed.pop(sp.frontend, None)  # set again below: to the end, as in `ports`
            if base == sp:  # released and rebuilt the same: keep the old object
                mine[i] = sp = base
            else:
                changed[sp.frontend] = None
            ports[sp.frontend] = sp
        if mine:
            self.ports_of[key] = tuple(mine)
        else:
            self.ports_of.pop(key, None)
        if problems:
            self.problems_of[key] = problems
        for p in problems:
            update.resolved.discard(str(p))
        update.problems.extend(problems)
        update.notes.extend(result.notes)
