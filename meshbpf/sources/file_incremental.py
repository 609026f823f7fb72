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
from typing import Any, Iterable

from ..model import Delta, DesiredState
from .errors import Problem
from .file_pieces import Split
from .kube_incremental import ServiceIndex
from .kube_objects import SourceObject, _Collector, _flatten_lists
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

    @property
    def ok(self) -> bool:
        return all(u.ok for u in self.units)

    def digests(self) -> frozenset[bytes]:
        return frozenset(u.digest for u in self.units)

    def keys(self) -> Iterable[ObjKey]:
        return (key for u in self.units for key in u.keys)

    def policy_objects(self) -> list[SourceObject]:
        """Its Pods, Namespaces and NetworkPolicies, in file order."""
        return [SourceObject(obj, self.wheres[i] + suffix)
                for i, u in enumerate(self.units) if u.policy for suffix, obj in u.policy]


def _unit(digest: bytes, where: str, value: Any, known: dict[bytes, Unit]) -> tuple[Unit, list[SourceObject]]:
    """A piece's unit (the known one if its digest is), and the objects
    parsed now (none for a known piece)."""
    if digest in known:
        return known[digest], []
    collector = _Collector()
    flat = list(_flatten_lists([SourceObject(value, where)], collector))
    keys, policy, ok = [], [], not collector.problems
    for src in flat:
        obj = src.obj
        kind = obj.get("kind")
        if kind in POLICY_KINDS:
            policy.append((src.where[len(where):], obj))
            continue
        meta = obj.get("metadata")
        name = meta.get("name") if isinstance(meta, dict) else None
        if kind not in INCREMENTAL_KINDS or not isinstance(name, str):
            ok = False
            continue
        keys.append((kind, meta.get("namespace") or "default", name))
    return Unit(digest, tuple(keys), tuple(policy), ok), flat


def record_pieces(split: Split, previous: FileRecord | None) -> tuple[FileRecord, list[SourceObject]]:
    """A cut file's record, and the objects of the pieces parsed now."""
    known = {u.digest: u for u in previous.units} if previous else {}
    units, wheres, fresh = [], {}, []
    for i, (digest, where) in enumerate(zip(split.digests, split.wheres)):
        unit, objects = _unit(digest, where, split.values.get(i), known)
        units.append(unit)
        fresh.extend(objects)
        if unit.policy:
            wheres[i] = where
    return FileRecord(units, wheres), fresh


def record_documents(docs: list[SourceObject], previous: FileRecord | None
                     ) -> tuple[FileRecord, list[SourceObject]]:
    """The record of a file parsed whole: one unit per object, by the digest
    of its value; and the objects whose digest is new."""
    known = {u.digest: u for u in previous.units} if previous else {}
    collector = _Collector()
    units, wheres, fresh = [], {}, []
    for src in _flatten_lists(docs, collector):
        unit, objects = _unit(_value_digest(src.obj), src.where, src.obj, known)
        if unit.policy:  # its own place, not the known one's (one object, so no suffix)
            unit = dataclasses.replace(unit, policy=(("", src.obj),))
            wheres[len(units)] = src.where
        units.append(unit)
        fresh.extend(objects)
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


class FileIndex:
    def __init__(self, state: DesiredState, parsed: dict[Path, tuple], node_name: str | None):
        """From a full read that had no problems: `parsed` is the read's
        cache, file -> (stamp, FileRecord, documents)."""
        self.records: dict[Path, FileRecord] = {}
        self.where: dict[ObjKey, Path] = {}
        self.skipped: list[Problem] = []  # policy objects left out; FileSource sets the full read's
        services, slices = [], []
        for f, (_, record, docs) in parsed.items():
            self.records[f] = record
            for key in record.keys():
                self.where[key] = f
            for src in objects_of(docs):
                kind = src.obj.get("kind")
                if kind == "Service":
                    services.append(src.obj)
                elif kind == "EndpointSlice":
                    slices.append(src.obj)
        self.services = ServiceIndex(state, services, slices, [], node_name=node_name)

    @property
    def state(self) -> DesiredState:
        return self.services.state

    def apply(self, changed: dict[Path, tuple[FileRecord, list[SourceObject]] | None]) -> DesiredState | None:
        """The next state after these files changed (None: removed): each
        as its new record and the objects of its new pieces. None when only
        a full read can say (the index is then no longer valid)."""
        new_keys: dict[Path, set[ObjKey]] = {}
        claimed: set[ObjKey] = set()  # by the changed files
        for f, new in changed.items():
            old = self.records.get(f)
            if (old is not None and not old.ok) or (new is not None and not new[0].ok):
                return None  # it holds (or held) other kinds
            keys: set[ObjKey] = set()
            for key in (new[0].keys() if new else ()):
                if key in claimed or self.where.get(key, f) not in changed:
                    return None  # defined twice: the full read names both places
                keys.add(key)
                claimed.add(key)
            new_keys[f] = keys
        events: dict[str, dict] = {"Service": {}, "EndpointSlice": {}}
        for f, keys in new_keys.items():
            old = self.records.get(f)
            for key in set(old.keys() if old else ()) - keys:
                events[key[0]].setdefault(key[1:], None)
        for f, new in changed.items():
            for src in (new[1] if new else ()):
                kind = src.obj.get("kind")
                if kind in INCREMENTAL_KINDS:
                    meta = src.obj["metadata"]
                    events[kind][(meta.get("namespace") or "default", meta["name"])] = src.obj
        base = self.services.state
        update = self.services.apply(events["Service"], events["EndpointSlice"])
        if update.problems:
            return None
        if update.state is None:  # no Service changed
            update.state = dataclasses.replace(
                base, delta=Delta(weakref.ref(base), frozenset()), trigger_times=())
        update.state = self.services.state = self._with_policy(update.state, base, changed)
        for f, keys in new_keys.items():
            old = self.records.pop(f, None)
            for key in (old.keys() if old else ()):
                if self.where.get(key) == f:
                    del self.where[key]
            if changed[f] is not None:
                self.records[f] = changed[f][0]
            for key in keys:
                self.where[key] = f
        return update.state

    def _with_policy(self, state: DesiredState, base: DesiredState, changed: dict) -> DesiredState:
        """state with the policy objects read again if a changed file's differ."""
        def objects(record: FileRecord | None) -> list[dict]:
            return [obj for u in (record.units if record else ()) for _, obj in u.policy]

        if all(objects(new[0] if new else None) == objects(self.records.get(f))
               for f, new in changed.items()):
            return state
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
