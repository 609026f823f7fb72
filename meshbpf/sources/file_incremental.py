"""The file source's incremental path: a changed file costs its own size.

After a full read, `FileIndex` remembers each file's Services and
EndpointSlices. When some files change, only those are parsed again; their
objects are compared with what the same files held before, and the
differences go to a ServiceIndex (kube_incremental) as events, exactly as
watch events from the API server do. The rest of the folder is not looked
at beyond one stat per file (which the change detection does anyway).
Pods, Namespaces and NetworkPolicies are kept per file too; when a changed
file's differ, all of them are read again (kube_policy, which is cheap next
to Services), so a policy edit never rebuilds the Services.

Anything unusual goes back to the full read, which gives the complete,
well-placed error messages: a changed file holding another kind (an
AgentConfig, a List of them, a kind meshbpf skips), an object defined in
two files, or any problem in the rebuilt Services.
"""

from __future__ import annotations

import dataclasses
import weakref
from pathlib import Path

from ..model import Delta, DesiredState
from .errors import Problem
from .kube_incremental import ServiceIndex
from .kube_objects import SourceObject, _Collector, _flatten_lists
from .kube_policy import POLICY_KINDS, policy_fields, read_policy_objects

ObjKey = tuple[str, str, str]   # (kind, namespace, name)
INCREMENTAL_KINDS = ("Service", "EndpointSlice")


def file_objects(parsed: list[SourceObject]) -> dict[ObjKey, dict] | None:
    """A file's Services and EndpointSlices by key; None when it holds
    anything else but policy objects (or a problem), which only the full
    read handles."""
    collector = _Collector()
    flat = list(_flatten_lists(parsed, collector))
    return None if collector.problems else _by_key(flat)


def _by_key(flat: list[SourceObject]) -> dict[ObjKey, dict] | None:
    out: dict[ObjKey, dict] = {}
    for src in flat:
        obj = src.obj
        if obj.get("kind") in POLICY_KINDS:
            continue  # see policy_objects
        meta = obj.get("metadata")
        name = meta.get("name") if isinstance(meta, dict) else None
        if obj.get("kind") not in INCREMENTAL_KINDS or not isinstance(name, str):
            return None
        key = (obj["kind"], meta.get("namespace") or "default", name)
        if key in out:
            return None
        out[key] = obj
    return out


def policy_objects(parsed: list[SourceObject]) -> list[SourceObject]:
    """A file's Pods, Namespaces and NetworkPolicies, in file order."""
    return _policy_only(_flatten_lists(parsed, _Collector()))


def _policy_only(flat) -> list[SourceObject]:
    return [src for src in flat if src.obj.get("kind") in POLICY_KINDS]


def _split_file(parsed: list[SourceObject]) -> tuple[dict[ObjKey, dict] | None, list[SourceObject]]:
    """file_objects and policy_objects of one file, flattened once."""
    collector = _Collector()
    flat = list(_flatten_lists(parsed, collector))
    return None if collector.problems else _by_key(flat), _policy_only(flat)


class FileIndex:
    def __init__(self, state: DesiredState, parsed: dict[Path, tuple], node_name: str | None):
        """From a full read that had no problems: `parsed` is the parse cache
        (file -> (stamp, documents))."""
        self.files: dict[Path, dict[ObjKey, dict] | None] = {}
        self.policy: dict[Path, list[SourceObject]] = {}
        for f, (_, docs) in parsed.items():
            self.files[f], self.policy[f] = _split_file(docs)
        self.skipped: list[Problem] = []  # policy objects left out; FileSource sets the full read's
        self.where: dict[ObjKey, Path] = {}
        services, slices = [], []
        for f, objects in self.files.items():
            for key, obj in (objects or {}).items():
                self.where[key] = f
                (services if key[0] == "Service" else slices).append(obj)
        self.services = ServiceIndex(state, services, slices, [], node_name=node_name)

    @property
    def state(self) -> DesiredState:
        return self.services.state

    def apply(self, changed: dict[Path, list[SourceObject] | None]) -> DesiredState | None:
        """The next state after these files changed (None: removed); None
        when only a full read can say (the index is then no longer valid)."""
        new_objects: dict[Path, dict[ObjKey, dict]] = {}
        for f, docs in changed.items():
            if self.files.get(f, {}) is None:
                return None  # it held other kinds before
            objects = {} if docs is None else file_objects(docs)
            if objects is None:
                return None
            for key in objects:
                if self.where.get(key, f) != f and self.where[key] not in changed:
                    return None  # defined twice: the full read names both places
            new_objects[f] = objects
        events: dict[str, dict] = {"Service": {}, "EndpointSlice": {}}
        for f, objects in new_objects.items():
            old = self.files.get(f) or {}
            for key in old.keys() - objects.keys():
                events[key[0]].setdefault(key[1:], None)
            for key, obj in objects.items():
                if old.get(key) != obj:
                    events[key[0]][key[1:]] = obj
                else:
                    # Equal: hold the new parse's object, so the old parse
                    # tree is freed, not kept alive beside the new one.
                    self.services.hold_equal(key[0], key[1:], obj)
        base = self.services.state
        update = self.services.apply(events["Service"], events["EndpointSlice"])
        if update.problems:
            return None
        if update.state is None:  # no Service changed
            update.state = dataclasses.replace(
                base, delta=Delta(weakref.ref(base), frozenset()), trigger_times=())
        update.state = self.services.state = self._with_policy(update.state, base, changed)
        for f, objects in new_objects.items():
            for key in self.files.get(f) or {}:
                if self.where.get(key) == f:
                    del self.where[key]
            if changed[f] is None:
                self.files.pop(f, None)
            else:
                self.files[f] = objects
            for key in objects:
                self.where[key] = f
        return update.state

    def _with_policy(self, state: DesiredState, base: DesiredState,
                     changed: dict[Path, list[SourceObject] | None]) -> DesiredState:
        """state with the policy objects read again if a changed file's differ."""
        new = {f: policy_objects(docs) if docs is not None else [] for f, docs in changed.items()}
        same = all([o.obj for o in new[f]] == [o.obj for o in self.policy.get(f, [])] for f in new)
        for f, objects in new.items():
            if changed[f] is None:
                self.policy.pop(f, None)
            else:
                self.policy[f] = objects  # equal objects may have moved: keep their new places
        if same:
            return state
        # In file order, as the full read meets them (which of two copies is first).
        inputs = read_policy_objects(o for f in sorted(self.policy) for o in self.policy[f])
        self.skipped = inputs.problems
        return dataclasses.replace(state, **policy_fields(inputs, base))

