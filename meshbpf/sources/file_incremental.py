"""The file source's incremental path: an edit costs what it changed.

A file is kept as a `FileRecord`: per piece (a document, or an item of the
file's one List; file_pieces), the digest of its text and the keys of the
Services and EndpointSlices it defines -- not the objects, which the
ServiceIndex (kube_incremental) holds once. When a file changes, its text
is cut again and only the pieces with a new digest are parsed; keys that
no longer appear are deletions, objects of new pieces are changes, and both
go to the ServiceIndex as events, exactly as watch events from the API
server do. A file that does not cut cleanly is parsed whole, and then each
object's digest (of its marshalled value) stands for a piece, so the
Services rebuilt are still only the changed ones.

Pods, Namespaces and NetworkPolicies are kept per piece (they are few);
when a changed file's differ, all of them are read again (kube_policy,
which is cheap next to Services), so a policy edit never rebuilds the
Services.

Anything unusual goes back to the full read, which gives the complete,
well-placed error messages: a changed file holding another kind (an
AgentConfig, a List of them, a kind meshbpf skips), an object defined in
two places, or any problem in the rebuilt Services.
"""

from __future__ import annotations

import dataclasses
import hashlib
import marshal
import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from ..model import Delta, DesiredState
from .errors import Problem
from .file_pieces import Split
from .held_text import as_held_exactly
from .kube_incremental import ServiceIndex, slice_service
from .kube_objects import SourceObject, _Collector, _flatten_lists, _is_list
from .kube_policy import POLICY_KINDS, policy_fields, read_policy_objects

ObjKey = tuple[str, str, str]   # (kind, namespace, name)
INCREMENTAL_KINDS = ("Service", "EndpointSlice")


@dataclass(frozen=True, slots=True)
class Unit:
    """What the index keeps of one piece of a file."""

    digest: bytes
    keys: tuple[ObjKey, ...]                    # its Services and EndpointSlices
    policy: tuple[tuple[str, dict], ...]        # its policy objects: (where after the piece's, object)
    ok: bool                                    # nothing but those kinds, and no problem


@dataclass(slots=True)
class FileRecord:
    units: list[Unit]
    wheres: dict[int, str]      # the place of each unit that holds policy objects
    by_digest: dict[bytes, Unit] = dataclasses.field(init=False)
    ok: bool = dataclasses.field(init=False)      # every unit is
    unique: bool = dataclasses.field(init=False)  # no key defined twice in the file

    def __post_init__(self) -> None:
        self.by_digest = {u.digest: u for u in self.units}
        self.ok = all(u.ok for u in self.units)
        keys = [key for u in self.units for key in u.keys]
        self.unique = len(set(keys)) == len(keys)

    def digests(self) -> dict[bytes, Unit]:
        return self.by_digest

    def keys(self) -> Iterable[ObjKey]:
        return (key for u in self.units for key in u.keys)

    def policy_order(self) -> list[bytes]:
        return [u.digest for u in self.units if u.policy]

    def policy_objects(self) -> list[SourceObject]:
        """Its Pods, Namespaces and NetworkPolicies, in file order."""
        return [SourceObject(obj, self.wheres[i] + suffix)
                for i, u in enumerate(self.units) if u.policy for suffix, obj in u.policy]


def _unit(digest: bytes, value: Any) -> tuple[Unit, list[dict]]:
    """A piece's unit and its objects (a List's items flattened)."""
    kind = value.get("kind") if type(value) is dict else None
    if type(kind) is str and kind and not _is_list(kind, value):
        flat = [SourceObject(value, "")]  # a plain object: what _flatten_lists gives
        ok = True
    else:
        collector = _Collector()
        flat = list(_flatten_lists([SourceObject(value, "")], collector))
        ok = not collector.problems
    keys, policy = [], []
    for src in flat:  # src.where: the place within the piece (": items[2]"), or ""
        obj = src.obj
        kind = obj.get("kind")
        if kind in POLICY_KINDS:
            policy.append((src.where, obj))
            continue
        meta = obj.get("metadata")
        name = meta.get("name") if isinstance(meta, dict) else None
        if kind not in INCREMENTAL_KINDS or not isinstance(name, str):
            ok = False
            continue
        keys.append((kind, meta.get("namespace") or "default", name))
        slim(obj)
    return Unit(digest, tuple(keys), tuple(policy), ok), [src.obj for src in flat]


def record_pieces(split: Split, previous: FileRecord | None) -> tuple[FileRecord, list[dict]]:
    """A cut file's record, and the objects of the pieces parsed now (the
    pieces whose digest `previous` does not know)."""
    known = previous.by_digest if previous else {}
    units = [known.get(d) for d in split.digests]
    fresh: list[dict] = []
    for i, value in split.values.items():
        units[i], objects = _unit(split.digests[i], value)
        fresh.extend(objects)
    wheres = {i: split.place(i) for i, unit in enumerate(units) if unit.policy}
    return FileRecord(units, wheres), fresh


def record_documents(docs: list[SourceObject], previous: FileRecord | None
                     ) -> tuple[FileRecord, list[dict]]:
    """The record of a file parsed whole: one unit per object, by the digest
    of its value; and the objects whose digest `previous` does not know."""
    known = previous.by_digest if previous else {}
    collector = _Collector()
    units, wheres, fresh = [], {}, []
    for src in _flatten_lists(docs, collector):
        digest = _value_digest(src.obj)
        if digest in known:
            unit = known[digest]
        else:
            unit, objects = _unit(digest, src.obj)
            fresh.extend(objects)
        if unit.policy:
            wheres[len(units)] = src.where
        units.append(unit)
    if collector.problems:
        units.append(Unit(b"", (), (), False))
    return FileRecord(units, wheres), fresh


def _value_digest(value: Any) -> bytes:
    """Equal digests mean equal values (marshal writes the value whole);
    equal values may differ in digest (key order), which only costs a rebuild."""
    try:
        data = marshal.dumps(value)
    except ValueError:  # not marshallable (cannot happen for parsed YAML or JSON): always new
        return os.urandom(16)
    return hashlib.blake2b(data, digest_size=16, person=b"value").digest()


def objects_of(docs: list[SourceObject]) -> list[SourceObject]:
    return list(_flatten_lists(docs, _Collector()))


# Fields of Services and EndpointSlices that the schema leaves unchecked
# (ANY) and build_state never reads: dropped as soon as a piece is parsed,
# so neither the read's peak nor the objects the ServiceIndex keeps for
# rebuilds hold them (about a third of an EndpointSlice as kubectl prints
# it). tests/unit/test_file_pieces.py compares the states with a build of
# the objects as parsed, fields and all, so a reader of one would be caught.
_UNREAD_META = ("managedFields", "ownerReferences", "creationTimestamp")


def slim(obj: Any) -> Any:
    """A Service or EndpointSlice without the unread fields (in place: the
    caller's parse is its only holder); any other value as it is."""
    if type(obj) is not dict or obj.get("kind") not in INCREMENTAL_KINDS:
        return obj
    meta = obj.get("metadata")
    if type(meta) is dict:
        for name in _UNREAD_META:
            meta.pop(name, None)
    endpoints = obj.get("endpoints") if obj.get("kind") == "EndpointSlice" else None
    if type(endpoints) is list:
        for endpoint in endpoints:
            if type(endpoint) is dict:
                endpoint.pop("targetRef", None)
    return obj


class PendingRecord:
    """A full read's FileRecord, built with the index (after the read's
    state is in the maps), not during the read."""

    def __init__(self, build: Callable[[], FileRecord]):
        self.build = build


class FileIndex:
    def __init__(self, state: DesiredState, parsed: dict[Path, tuple], node_name: str | None):
        """From a full read that had no problems: `parsed` is the read's
        cache, file -> (stamp, FileRecord or PendingRecord, documents)."""
        self.records: dict[Path, FileRecord] = {}
        self.where: dict[ObjKey, str] = {}  # the file defining each key
        self.skipped: list[Problem] = []  # policy objects left out; FileSource sets the full read's
        services, slices = [], []
        for f, (_, record, docs) in parsed.items():
            if isinstance(record, PendingRecord):
                record = record.build()
            self.records[f] = record
            for key in record.keys():
                self.where[key] = str(f)
            for src in objects_of(docs):
                kind = src.obj.get("kind")
                if kind == "Service":
                    services.append(src.obj)
                elif kind == "EndpointSlice":
                    slices.append(src.obj)
        # Held packed, as the API source holds them (held_text): as dicts
        # they were the biggest part of the file source's memory.
        self.services = ServiceIndex(state, services, slices, [], node_name=node_name,
                                     raw=([as_held_exactly(o) for o in services],
                                          [as_held_exactly(o) for o in slices]))

    @property
    def state(self) -> DesiredState:
        return self.services.state

    def apply(self, changed: dict[Path, tuple[FileRecord, list[dict]] | None]) -> DesiredState | None:
        """The next state after these files changed (None: removed): each
        as its new record and the objects of its new pieces. None when only
        a full read can say (the index is then no longer valid).

        Pieces are compared by digest: a piece in both records is unchanged
        and costs nothing; the keys of pieces gone are deletions, unless a
        new piece defines them again."""
        removed: dict[str, set[ObjKey]] = {}  # by file: keys of its pieces gone
        added: dict[str, set[ObjKey]] = {}    # by file: keys of its new pieces
        for f, new in changed.items():
            old = self.records.get(f)
            if (old is not None and not old.ok) or (new is not None and not (new[0].ok and new[0].unique)):
                return None  # it holds (or held) other kinds, or defines a key twice
            old_units = old.by_digest if old else {}
            new_units = new[0].by_digest if new else {}
            removed[str(f)] = {k for d, u in old_units.items() if d not in new_units for k in u.keys}
            added[str(f)] = {k for d, u in new_units.items() if d not in old_units for k in u.keys}
        claimed: set[ObjKey] = set()
        for f, keys in added.items():
            for key in keys:
                home = self.where.get(key)
                if key in claimed or (home is not None and key not in removed.get(home, ())):
                    return None  # defined twice: the full read names both places
                claimed.add(key)
        if not self._slices_tied(changed, claimed, removed):
            return None  # the full read rejects such a slice, naming it
        events: dict[str, dict] = {"Service": {}, "EndpointSlice": {}}
        for keys in removed.values():
            for key in keys - claimed:
                events[key[0]][key[1:]] = None
        for new in changed.values():
            for obj in (new[1] if new else ()):
                kind = obj.get("kind")
                if kind in INCREMENTAL_KINDS:
                    meta = obj["metadata"]
                    obj_key = (meta.get("namespace") or "default", meta["name"])
                    events[kind][obj_key] = as_held_exactly(obj)
        base = self.services.state
        update = self.services.apply(events["Service"], events["EndpointSlice"])
        if update.problems:
            return None
        if update.state is None:  # no Service changed
            update.state = dataclasses.replace(
                base, delta=Delta(weakref.ref(base), frozenset()), trigger_times=())
        update.state = self.services.state = self._with_policy(update.state, base, changed)
        for f, new in changed.items():
            for key in removed[str(f)]:
                if self.where.get(key) == str(f):
                    del self.where[key]
            for key in added[str(f)]:
                self.where[key] = str(f)
            if new is None:
                self.records.pop(f, None)
            else:
                self.records[f] = new[0]
        return update.state

    def _slices_tied(self, changed: dict, claimed: set[ObjKey], removed: dict[str, set[ObjKey]]) -> bool:
        """Every changed EndpointSlice names a Service of its namespace that
        the files still define: the events below could not tell a stray
        slice, which a full read refuses, from a good one."""
        gone = set().union(*removed.values()) - claimed
        for new in changed.values():
            for obj in (new[1] if new else ()):
                if obj.get("kind") != "EndpointSlice":
                    continue
                service = slice_service(obj)
                key = ("Service", *service) if service else None
                if key is None or key in gone or (key not in self.where and key not in claimed):
                    return False
        return True

    def _with_policy(self, state: DesiredState, base: DesiredState, changed: dict) -> DesiredState:
        """state with the policy objects read again if a changed file's differ."""
        def order(record: FileRecord | None) -> list[bytes]:
            return record.policy_order() if record else []

        if all(order(new[0] if new else None) == order(self.records.get(f)) for f, new in changed.items()):
            return state  # the same policy pieces in the same order: the same objects
        records = dict(self.records)
        for f, new in changed.items():
            if new is None:
                records.pop(f, None)
            else:
                records[f] = new[0]
        # In file order, as the full read meets them (which of two copies is first).
        inputs = read_policy_objects(o for f in sorted(records) for o in records[f].policy_objects())
        self.skipped = inputs.problems
        return dataclasses.replace(state, **policy_fields(inputs, base))
