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
from .kube_incremental import ServiceIndex, hold_annotations, slice_service
from .kube_objects import SourceObject, _Collector, _flatten_lists, _is_list
from .kube_policy import POLICY_KINDS, policy_fields, read_policy_objects
from .names import label_problems
from . import schema

ObjKey = tuple[str, str, str]   # (kind, namespace, name)
INCREMENTAL_KINDS = ("Service", "EndpointSlice")


@dataclass(frozen=True, slots=True)
class Unit:
    """What the index keeps of a piece of a file that is not one Service or
    EndpointSlice alone (such a piece is kept as its kind and key: see
    PieceUnit)."""

    keys: tuple[ObjKey, ...]                    # its Services and EndpointSlices
    policy: tuple[tuple[str, dict], ...]        # its policy objects: (where after the piece's, object)
    ok: bool                                    # nothing but those kinds, and no problem


# A piece that holds one Service or EndpointSlice and nothing else, as nearly
# every piece does, is kept as (kind, (namespace, name)), the key tuple the
# ServiceIndex holds too: a Unit and its tuples of keys were ~110 bytes more
# for each of the 200 000 pieces of 100 000 Services.
PieceUnit = Unit | tuple[str, tuple[str, str]]
DIGEST_BYTES = 16
_NO_DIGEST = bytes(DIGEST_BYTES)  # a file's own problem, which no piece can match


def unit_keys(unit: PieceUnit) -> tuple[ObjKey, ...]:
    return ((unit[0], *unit[1]),) if type(unit) is tuple else unit.keys


def _policy(unit: PieceUnit) -> tuple[tuple[str, dict], ...]:
    return () if type(unit) is tuple else unit.policy


class FileRecord:
    """Per piece of a file, in order: its digest and unit. The digests are
    packed end to end and a one-object piece's kind is a byte; the digest
    -> unit table is made when an edit asks for it (kept, it cost ~70 bytes
    a piece, for every object of the files)."""

    __slots__ = ("units", "kinds", "packed", "wheres", "ok", "unique")

    def __init__(self, digests: list[bytes], units: list[PieceUnit], wheres: dict[int, str]):
        assert len(digests) == len(units) and all(len(d) == DIGEST_BYTES for d in digests)
        self.units: list[Unit | tuple[str, str]] = [u[1] if type(u) is tuple else u for u in units]
        self.kinds = bytes(INCREMENTAL_KINDS.index(u[0]) if type(u) is tuple else 0 for u in units)
        self.packed = b"".join(digests)
        self.wheres = wheres      # the place of each unit that holds policy objects
        self.ok = all(type(u) is tuple or u.ok for u in units)  # every unit is
        keys = list(self.keys())
        self.unique = len(set(keys)) == len(keys)  # no key defined twice in the file

    def _unit(self, i: int) -> PieceUnit:
        u = self.units[i]
        return (INCREMENTAL_KINDS[self.kinds[i]], u) if type(u) is tuple else u

    def digests(self) -> dict[bytes, PieceUnit]:
        packed, size = self.packed, DIGEST_BYTES
        return {packed[i * size:(i + 1) * size]: self._unit(i) for i in range(len(self.units))}

    def keys(self) -> Iterable[ObjKey]:
        for u, kind in zip(self.units, self.kinds):
            if type(u) is tuple:
                yield (INCREMENTAL_KINDS[kind], *u)
            else:
                yield from u.keys

    def policy_order(self) -> list[bytes]:
        size = DIGEST_BYTES
        return [self.packed[i * size:(i + 1) * size] for i, u in enumerate(self.units) if _policy(u)]

    def policy_objects(self) -> list[SourceObject]:
        """Its Pods, Namespaces and NetworkPolicies, in file order."""
        return [SourceObject(obj, self.wheres[i] + suffix)
                for i, u in enumerate(self.units) for suffix, obj in _policy(u)]


Held = tuple[str, tuple[str, str], "tuple[str, str] | None", Any, "int | str"]


class PieceReader:
    """Reads pieces into units, and keeps their objects as `entries`, in
    order: each Service and EndpointSlice as a Held tuple (kind, (namespace,
    name), its Service's key for a slice, held form, where), anything else
    as a SourceObject. `where` is the piece's index while the object is the
    whole piece (nearly always; the place itself is made only for a
    message), else the place."""

    def __init__(self, hold: Callable[[dict], Any] = lambda obj: obj):
        self.hold = hold
        self.entries: list[SourceObject | Held] = []
        self.lists = _Collector()  # the problems of Lists in the pieces
        self.place: Callable[[int], str] | None = None

    def piece(self, split: Split, index: int, value: Any) -> PieceUnit:
        """A piece file_pieces cut (its objects, a List's items flattened)."""
        self.place = split.place
        kind = value.get("kind") if type(value) is dict else None
        if type(kind) is str and kind and not _is_list(kind, value):
            return self.unit([(value, index)], True, index)  # a plain object: what _flatten_lists gives
        place = split.place(index)
        before = len(self.lists.problems)
        flat = [(s.obj, s.where) for s in _flatten_lists([SourceObject(value, place)], self.lists)]
        return self.unit(flat, len(self.lists.problems) == before, place)

    def unit(self, flat: list[tuple[Any, int | str]], ok: bool, piece: int | str) -> PieceUnit:
        prefix = len(piece) if type(piece) is str else 0
        found, policy = [], []  # (kind, key) of its Services and EndpointSlices; its policy objects
        for obj, at in flat:
            kind = obj.get("kind")
            meta = obj.get("metadata")
            name, ns = (meta.get("name"), meta.get("namespace")) if type(meta) is dict else (None, None)
            if kind in INCREMENTAL_KINDS and type(name) is str and (not ns or type(ns) is str):
                key = (ns or "default", name)
                found.append((kind, key))
                owner = slice_service(obj) if kind == "EndpointSlice" else None
                self.entries.append((kind, key, owner, self.hold(slim(obj)), at))
                continue
            where = self.place(at) if type(at) is int else at
            self.entries.append(SourceObject(obj, where))
            if kind in POLICY_KINDS:
                policy.append(("" if type(at) is int else at[prefix:], obj))
            else:
                ok = False  # another kind, or a bad name: full reads only
        if ok and not policy and len(found) == 1:
            return found[0]
        return Unit(tuple((kind, *key) for kind, key in found), tuple(policy), ok)

    def fresh(self) -> list[dict]:
        """The Services and EndpointSlices read (when held as they are)."""
        return [e[3] for e in self.entries if type(e) is tuple]


def record_pieces(split: Split, known: dict[bytes, PieceUnit]) -> tuple[FileRecord, list[dict]]:
    """A cut file's record, and the Services and EndpointSlices of the
    pieces parsed now (the pieces whose digest is not `known`)."""
    reader = PieceReader()
    units = [known.get(d) for d in split.digests]
    for i, value in split.values.items():
        units[i] = reader.piece(split, i, value)
    return cut_record(split, split.digests, units), reader.fresh()


def cut_record(split: Split, digests: list[bytes], units: list[PieceUnit]) -> FileRecord:
    return FileRecord(digests, units, {i: split.place(i) for i, unit in enumerate(units) if _policy(unit)})


def record_documents(docs: list[SourceObject], known: dict[bytes, PieceUnit], reader: PieceReader | None = None
                     ) -> tuple[FileRecord, list[dict]]:
    """The record of a file parsed whole: one unit per object, by the digest
    of its value; and the Services and EndpointSlices whose digest is not
    `known` (with a reader of its own, every object is in it, in order)."""
    reader = reader or PieceReader()
    digests, units, wheres = [], [], {}
    for src in _flatten_lists(docs, reader.lists):
        digest = value_digest(src.obj)  # before the read slims it, as a cut file's is of its text
        unit = known.get(digest) if digest in known else reader.unit([(src.obj, src.where)], True, src.where)
        if _policy(unit):
            wheres[len(units)] = src.where
        digests.append(digest)
        units.append(unit)
    if reader.lists.problems:
        digests.append(_NO_DIGEST)
        units.append(Unit((), (), False))
    return FileRecord(digests, units, wheres), reader.fresh()


def value_digest(value: Any) -> bytes:
    """Equal digests mean equal values (marshal writes the value whole);
    equal values may differ in digest (key order), which only costs a rebuild."""
    try:
        data = marshal.dumps(value)
    except ValueError:  # not marshallable (cannot happen for parsed YAML or JSON): always new
        return os.urandom(16)
    return hashlib.blake2b(data, digest_size=16, person=b"value").digest()


# Fields of Services and EndpointSlices that the schema leaves unchecked
# (ANY) and build_state never reads: dropped as soon as a piece is parsed,
# so neither the read's peak nor the objects the ServiceIndex keeps for
# rebuilds hold them (about a third of an EndpointSlice as kubectl prints
# it). tests/unit/test_file_pieces.py compares the states with a build of
# the objects as parsed, fields and all, so a reader of one would be caught.
_UNREAD_META = ("managedFields", "ownerReferences", "creationTimestamp")
# Fields the build checks but never reads (the Kubernetes source's pruned
# ones): dropped only when the check passes, so a bad value stays for the
# build to name (tests/unit/test_file_slim.py). A uid alone was a fifth of
# a held Service.
_CHECKED_META = {k: schema.OBJECT_META[k] for k in (
    "uid", "generateName", "generation", "deletionTimestamp", "deletionGracePeriodSeconds",
    "finalizers", "selfLink")}
_CHECKED_ENDPOINT = {k: schema.ENDPOINT[k] for k in ("hostname", "deprecatedTopology")}


def slim(obj: Any) -> Any:
    """A Service or EndpointSlice without the unread fields (in place: the
    caller's parse is its only holder); any other value as it is."""
    if type(obj) is not dict or obj.get("kind") not in INCREMENTAL_KINDS:
        return obj
    meta = obj.get("metadata")
    if type(meta) is dict:
        for name in _UNREAD_META:
            meta.pop(name, None)
        _drop_valid(meta, _CHECKED_META)
        hold_annotations(meta)
    if obj.get("kind") == "Service":
        spec = obj.get("spec")
        selector = spec.get("selector") if type(spec) is dict else None
        # Never read, but Kubernetes validates it as labels (kube_objects._meta_problems).
        if selector is not None and not (schema.check(selector, schema.STR_MAP)
                                         or label_problems(selector, "spec.selector")):
            del spec["selector"]
        return obj
    endpoints = obj.get("endpoints")
    if type(endpoints) is list:
        for endpoint in endpoints:
            if type(endpoint) is dict:
                endpoint.pop("targetRef", None)
                _drop_valid(endpoint, _CHECKED_ENDPOINT)
    return obj


def _drop_valid(fields: dict, checked: dict[str, Any]) -> None:
    for name, node in checked.items():
        if name in fields and not schema.check(fields[name], node):
            del fields[name]


class FileIndex:
    def __init__(self, records: dict[Path, FileRecord], services: ServiceIndex):
        """From a full read that had no problems: each file's record, and
        the ServiceIndex of its Services and EndpointSlices (file_held).
        A key is defined once in all the files, so the ServiceIndex also
        says whether a key is defined anywhere (which file does not matter)."""
        self.records = records
        self.skipped: list[Problem] = []  # policy objects left out; FileSource sets the full read's
        self.services = services

    def _defined(self, key: ObjKey) -> bool:
        return key[1:] in (self.services.services if key[0] == "Service" else self.services.slices)

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
            old_units = old.digests() if old else {}
            new_units = new[0].digests() if new else {}
            removed[str(f)] = {k for d, u in old_units.items() if d not in new_units for k in unit_keys(u)}
            added[str(f)] = {k for d, u in new_units.items() if d not in old_units for k in unit_keys(u)}
        claimed: set[ObjKey] = set()
        gone = set().union(*removed.values())
        for f, keys in added.items():
            for key in keys:
                if key in claimed or (self._defined(key) and key not in gone):
                    return None  # defined twice: the full read names both places
                claimed.add(key)
        if not self._slices_tied(changed, claimed, gone):
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
            if new is None:
                self.records.pop(f, None)
            else:
                self.records[f] = new[0]
        return update.state

    def _slices_tied(self, changed: dict, claimed: set[ObjKey], removed: set[ObjKey]) -> bool:
        """Every changed EndpointSlice names a Service of its namespace that
        the files still define: the events below could not tell a stray
        slice, which a full read refuses, from a good one."""
        gone = removed - claimed
        for new in changed.values():
            for obj in (new[1] if new else ()):
                if obj.get("kind") != "EndpointSlice":
                    continue
                service = slice_service(obj)
                key = ("Service", *service) if service else None
                if key is None or key in gone or not (self._defined(key) or key in claimed):
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
