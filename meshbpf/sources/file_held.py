"""A config file as the file source's full read keeps it: its Services and
EndpointSlices packed as soon as each piece is parsed.

A full read used to parse every file into dicts and keep them all until
the incremental index was built on the next poll: ~6.8 KB a Service with
its slice, the file source's peak (1.37 GB of RSS at 100 000 Services, the
heap never handing back what the dicts had held). Now each piece of a file
(file_pieces) is held as it is parsed: its Services and EndpointSlices in
held_text's packed form, which the ServiceIndex keeps anyway, the dicts
dropped at once; the other kinds (policy objects, routes, AgentConfig,
kinds meshbpf skips) are few and stay as parsed. The file's FileRecord is
made on the way. The state is then built one Service with its slices at a
time (kube_objects.build_by_service, as the Kubernetes source builds it),
each read back from its held form.

build_by_service wants every Service and slice once and says nothing of
order across Services; a read with any problem, or a name defined twice,
is built again with build_state over every object read back in file
order, so its messages are build_state's, as they always were.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from ..model import DesiredState
from .errors import Problem
from .file_incremental import FileRecord, Held, PieceReader, cut_record, record_documents
from . import file_pieces
from .file_pieces import Split
from .held_text import as_held, as_held_exactly, loaded
from .kube_incremental import Key, ServiceIndex
from .kube_objects import BuildResult, SourceObject, _Collector, _flatten_lists, build_by_service, build_state
from .yaml_load import starts_as_json


@dataclass(slots=True)
class HeldFile:
    record: FileRecord
    entries: list[SourceObject | Held]   # every object, in file order (PieceReader)
    problems: list[Problem]              # of its Lists (_flatten_lists)
    place: Callable[[int], str] | None   # a piece's place, by index (Split.place)

    def where(self, at: int | str) -> str:
        return self.place(at) if type(at) is int else at

    def objects(self) -> Iterator[SourceObject]:
        """Every object in file order, the held ones read back."""
        for e in self.entries:
            yield SourceObject(loaded(e[3]), self.where(e[4])) if type(e) is tuple else e

    def held(self, kind: str) -> Iterator[Held]:
        return (e for e in self.entries if type(e) is tuple and e[0] == kind)


def hold_file(path: Path, text: str, parse_documents: Callable[[Path, str], list[SourceObject]]) -> HeldFile:
    """A file's full read (parse_documents raises ConfigError, located)."""
    # file_pieces cuts a JSON file's items with the json module: their
    # values are JSON's own, held without the round-trip check YAML needs.
    reader = PieceReader(as_held if starts_as_json(text) else as_held_exactly)
    digests, units = [], []

    def take(split: Split, index: int, value: Any) -> None:
        units.append(reader.piece(split, index, value))
        digests.append(split.digests[index])

    cut = file_pieces.split(path, text, frozenset(), take=take)
    # The reader keeps the cut (its place), the cut its take, the take the
    # reader: a cycle, which would keep every entry until a collection that
    # the agent's frozen heap may never run. Cut here, whatever the outcome.
    place, reader.place = reader.place, None
    if cut is not None and _plain_list(cut):
        return HeldFile(cut_record(cut, digests, units), reader.entries, reader.lists.problems, place)
    reader = PieceReader(as_held_exactly)  # what the cut took is dropped
    record, _ = record_documents(parse_documents(path, text), {}, reader)
    return HeldFile(record, reader.entries, reader.lists.problems, None)


def _plain_list(cut: Split) -> bool:
    """Whether the pieces taken are the file's objects: always for a stream
    of documents; for a List, when the List itself reads as one (else its
    items are not read at all, or it is no List: the whole file says)."""
    if cut.layout == "stream":
        return True
    check = _Collector()
    return not list(_flatten_lists([SourceObject(dict(cut.envelope or {}), "")], check)) and not check.problems


def build_files(files: Iterable[HeldFile], node_name: str | None, passed: tuple[str, ...]
                ) -> tuple[BuildResult, list[SourceObject]]:
    """build_state over every object of the files but the `passed` kinds,
    and those objects: the same state, problems and notes (notes in another
    order), one Service at a time when the read has no problem."""
    files = list(files)
    others = [e for f in files for e in f.entries if type(e) is not tuple]
    rest = [o for o in others if o.obj.get("kind") not in passed]  # AgentConfig, kinds skipped, the nameless
    side = build_state(rest, node_name=node_name)
    groups = _groups(files)
    lists = [p for f in files for p in f.problems]
    main = build_by_service(groups, node_name=node_name) if groups is not None else None
    if main is None or lists or side.problems or main.problems:
        full = build_state((o for f in files for o in f.objects() if o.obj.get("kind") not in passed),
                           node_name=node_name)
        main = BuildResult(full.state, lists + full.problems, full.notes)
    else:
        main.state.settings = side.state.settings
        main.notes[:0] = side.notes
    return main, [o for o in others if o.obj.get("kind") in passed]


def _groups(files: list[HeldFile]) -> Iterator[tuple[SourceObject | None, Iterator[SourceObject]]] | None:
    """build_by_service's groups, in the order build_state meets the
    Services; None when a Service or slice is defined twice."""
    services: dict[Key, tuple[Held, HeldFile]] = {}
    by_owner: dict[Key | None, list[tuple[Held, HeldFile]]] = {}
    slice_keys: set[Key] = set()
    for f in files:
        for e in f.entries:
            if type(e) is not tuple:
                continue
            if e[0] == "Service":
                if e[1] in services:
                    return None
                services[e[1]] = (e, f)
            else:
                if e[1] in slice_keys:
                    return None
                slice_keys.add(e[1])
                by_owner.setdefault(e[2], []).append((e, f))
    del slice_keys

    def read(e: Held, f: HeldFile) -> SourceObject:
        return SourceObject(loaded(e[3]), f.where(e[4]))

    def groups() -> Iterator[tuple[SourceObject | None, Iterator[SourceObject]]]:
        for key, (e, f) in services.items():
            yield read(e, f), (read(*s) for s in by_owner.pop(key, ()))
        for slices in by_owner.values():  # slices of no Service: read for their problems
            yield None, (read(*s) for s in slices)
        services.clear()
    return groups()


def service_index(state: DesiredState, files: Iterable[HeldFile], node_name: str | None) -> ServiceIndex:
    """The ServiceIndex of a full read without problems, from the held forms (nothing read again)."""
    files = list(files)
    return ServiceIndex.of_held(
        state, [(e[1], e[3]) for f in files for e in f.held("Service")],
        [(e[1], e[2], e[3]) for f in files for e in f.held("EndpointSlice")], [], node_name=node_name)
