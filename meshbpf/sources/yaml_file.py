"""The YAML file source: one file or a folder of them, watched for changes.

Files hold multi-document YAML of Kubernetes objects (a `kind: List` too),
exactly as kubectl prints them. Any problem in a Service, EndpointSlice or
AgentConfig rejects the whole read: the caller keeps running what it had. A
bad Pod, Namespace or NetworkPolicy is left out instead (its previous
version stays), reported in `FileSource.problems`; the others apply.

Parsing is yaml_load's: libyaml, read as Kubernetes reads YAML (1.1), with a
JSON fast path for `kubectl get -o json` files. A file is cut into its
documents or List items first (file_pieces), so that an edit re-parses only
the pieces it changed (file_incremental); a file that does not cut cleanly
is parsed whole.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from ..gcpause import gc_paused, trim_malloc
from ..model import DesiredState
from .errors import ConfigError, Problem, internal_error
from . import file_pieces
from .file_held import HeldFile, build_files, hold_file, service_index
from .file_incremental import FileIndex, FileRecord, record_documents, record_pieces
from .kube_objects import BuildResult, SourceObject
from .kube_policy import POLICY_KINDS, policy_fields, read_policy_objects
from .route_status import route_statuses
from .routes import GRANT_KIND, ROUTE_KINDS, read_grants, read_routes, reapply_routes, split_by_routes
from .yaml_load import LoadError, load_all

log = logging.getLogger(__name__)

_SUFFIXES = (".yaml", ".yml", ".json")
# Kinds read beside the Services, each by its own reader.
PASSED_KINDS = POLICY_KINDS + ROUTE_KINDS + (GRANT_KIND,)
_DOC_START = re.compile(r"^---(?:[ \t].*)?$", re.MULTILINE)


@dataclass
class ConfigResult(BuildResult):
    """build_state's result with the policy inputs in its state, and the
    policy objects left out for a problem (which never reject the read)."""

    skipped: list[Problem] = field(default_factory=list)
    # With routes: the state before they split their parents (a source that
    # derives the next state from this one splits it again), the frontends
    # they split, and their notes.
    unrouted: DesiredState | None = None
    split: tuple = ()
    split_notes: list[str] = field(default_factory=list)


# The largest config file read: a bigger one is refused from its size alone,
# before a byte of it is read (its text and documents would take several
# times that in memory, on every node at once).
MAX_FILE_BYTES = 1 << 30
READ_TRIES = 3  # a file that changes under three reads in a row waits for the next poll
# After reading this much text for an edit, the C allocator's free pages go
# back (gcpause.trim_malloc, a few ms): glibc serves a big file's text from
# its heap once the first big read raised its mmap threshold, and kept it
# after, ~30 MB of RSS per 10 000 Services of the file edited.
TRIM_AFTER_BYTES = 1 << 20


def read_text(file: Path) -> tuple[str, tuple[int, int, int]]:
    """A file's text and the (inode, size, mtime) it was read at. A file that
    changed while it was read (size or mtime moved, or fewer bytes than its
    size) is read again: half a rewrite is never parsed. OSError when it is
    too big, or kept changing."""
    for _ in range(READ_TRIES):
        with open(file, "rb") as f:
            st = os.fstat(f.fileno())
            _check_size(st.st_size)
            data = f.read(MAX_FILE_BYTES + 1)  # bounded: it may grow after the stat
            after = os.fstat(f.fileno())
        _check_size(len(data))
        if len(data) == st.st_size and (after.st_size, after.st_mtime_ns) == (st.st_size, st.st_mtime_ns):
            return data.decode("utf-8-sig"), (st.st_ino, st.st_size, st.st_mtime_ns)  # -sig: a BOM
    raise OSError(f"changed while being read, {READ_TRIES} times in a row; read again at its next change")


def _check_size(size: int) -> None:
    if size > MAX_FILE_BYTES:
        raise OSError(f"{size} bytes, over the {MAX_FILE_BYTES >> 30} GiB a config file may have")


def config_files(path: Path) -> list[Path]:
    """The files a config path stands for, in a stable order."""
    if path.is_dir():
        # A dangling symlink is listed too: reading it is a problem that names
        # it, where skipping it would drop its Services without a word.
        return sorted(p for p in path.iterdir()
                      if (p.is_file() or _dangling(p)) and p.suffix in _SUFFIXES
                      and not p.name.startswith("."))
    if path.is_file():
        return [path]
    if path.exists():  # a FIFO would block the loop on its read; a device, worse
        raise ConfigError([Problem(str(path), "", "", "not a regular file or a folder")])
    raise ConfigError([Problem(str(path), "", "", "no such file or folder")])


def _dangling(path: Path) -> bool:
    return path.is_symlink() and not path.exists()


def _unreadable(file: Path, exc: Exception) -> Problem:
    if _dangling(file):
        return Problem(str(file), "", "", f"a symlink to {os.readlink(file)}, which does not exist")
    return Problem(str(file), "", "", f"cannot read: {exc}")


def document_starts(text: str) -> list[int]:
    """First line of each YAML document in text (1-based).

    A document starts at each `---` marker, and at line 1 when content comes
    before the first marker (directives such as %YAML and comments are not
    content)."""
    if not text.startswith("---") and "\n---" not in text:
        return [1]  # no marker (kubectl's one List): skip the line walk, 20% of a fast parse
    starts, line, pos = [], 1, 0
    for m in _DOC_START.finditer(text):
        line += text.count("\n", pos, m.start())
        pos = m.start()
        starts.append(line)
    head = text[: _DOC_START.search(text).start()] if starts else text
    has_leading_doc = any(ln.strip() and not ln.lstrip().startswith(("#", "%"))
                          for ln in head.splitlines())
    return ([1] if has_leading_doc or not starts else []) + starts


def _document_at(starts: list[int], line: int) -> int:
    """Index of the document holding `line`."""
    index = 0
    for i, start in enumerate(starts):
        if start <= line:
            index = i
    return index


def parse_documents(path: Path, text: str) -> list[SourceObject]:
    try:
        docs = load_all(text)
    except LoadError as exc:
        starts = document_starts(text)
        where = str(path)
        if exc.line is not None:
            doc = _document_at(starts, exc.line)
            where += f": document {doc + 1} (line {starts[doc]})"
            reason = f"not valid YAML: line {exc.line}: {exc.message}"
        else:
            reason = f"not valid YAML: {exc.message}"
        raise ConfigError([Problem(where, "", "", reason)]) from None
    # One JSON object from line 1 (kubectl get -o json): no need to scan the
    # text for document markers, which costs as much as parsing it.
    starts = [1] if len(docs) == 1 and text.startswith("{") else document_starts(text)
    starts = (starts + [starts[-1]] * len(docs))[: len(docs)]
    return [SourceObject(doc, f"{path}: document {i + 1} (line {starts[i]})")
            for i, doc in enumerate(docs)]


def parse_file(path: Path, text: str, previous: FileRecord | None = None
               ) -> tuple[FileRecord, list[dict], HeldFile | None]:
    """A file's record, the objects of its pieces parsed now (those not in
    `previous`, the record of its last read), and, without `previous`, the
    file as a full read holds it (file_held; the objects are in it then,
    not in the list). Raises ConfigError, located as parse_documents
    locates it."""
    if previous is None:
        held = hold_file(path, text, parse_documents)
        return held.record, [], held
    known = previous.digests()
    split = file_pieces.split(path, text, known)
    if split is None:
        return (*record_documents(parse_documents(path, text), known), None)
    return (*record_pieces(split, known), None)


def read_config(path: Path, node_name: str | None = None, cache: dict | None = None,
                previous: DesiredState | None = None) -> ConfigResult:
    """Reads and validates everything under path; raises ConfigError.

    With a cache (kept by the caller between reads: file -> (stamp, record,
    HeldFile)), files whose inode, size and mtime are unchanged are not
    parsed again, unless the caller dropped their HeldFile. A policy object
    left out for a problem keeps its version in `previous`."""
    with gc_paused():
        return _read_config(path, node_name, cache if cache is not None else {}, previous)


def _read_config(path: Path, node_name: str | None, cache: dict,
                 previous: DesiredState | None) -> ConfigResult:
    held: list[HeldFile] = []
    problems: list[Problem] = []
    files = config_files(path)
    for stale in set(cache) - set(files):
        del cache[stale]
    for file in files:
        try:
            st = os.stat(file)
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
            if file in cache and cache[file][0] == stamp and cache[file][2] is not None:
                held.append(cache[file][2])
                continue
            text, stamp = read_text(file)
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(_unreadable(file, exc))
            continue
        try:
            record, _, parsed = parse_file(file, text)
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        del text  # what is held is all that is needed now: free the text at once
        cache[file] = (stamp, record, parsed)
        held.append(parsed)
    if problems:
        raise ConfigError(problems)
    result, passed = build_files(held, node_name, PASSED_KINDS)
    if result.problems:
        raise ConfigError(result.problems)
    policy = read_policy_objects(o for o in passed if o.obj.get("kind") in POLICY_KINDS)
    state = replace(result.state, **policy_fields(policy, previous))
    # A bad route is left out alone, as a bad policy is: the rest applies.
    routes, route_problems, route_notes = read_routes([o for o in passed if o.obj.get("kind") in ROUTE_KINDS],
                                                      getattr(previous, "routes", ()))
    grants, grant_problems = read_grants(o for o in passed if o.obj.get("kind") == GRANT_KIND)
    unrouted = state
    state, split, split_notes = split_by_routes(state, routes, grants) if routes else (state, (), [])
    return ConfigResult(state, [], result.notes + policy.notes + route_notes + split_notes,
                        skipped=policy.problems + route_problems + grant_problems,
                        unrouted=unrouted, split=split, split_notes=split_notes)


@dataclass(frozen=True)
class _Stamp:
    entries: tuple[tuple[str, int, int, int], ...]  # (file, inode, size, mtime in ns)


def _stamp(path: Path) -> _Stamp:
    """What changes when any config file changes (name, inode, size, mtime):
    one stat per file (scandir knows the file type without one)."""
    entries = []
    try:
        if path.is_dir():
            with os.scandir(path) as it:
                found = sorted((e.path, e) for e in it
                               if e.name.endswith(_SUFFIXES) and not e.name.startswith(".")
                               and (e.is_file() or _dangling(Path(e.path))))
            for name, entry in found:
                st = entry.stat(follow_symlinks=entry.is_file())  # a dangling link: its own
                entries.append((name, st.st_ino, st.st_size, st.st_mtime_ns))
        else:
            st = os.stat(path)
            entries.append((str(path), st.st_ino, st.st_size, st.st_mtime_ns))
    except OSError:
        pass  # gone between listing and stat: the next poll sees the rest
    return _Stamp(tuple(entries))


class FileSource:
    """Polls a config path; `poll()` returns new desired state when it changed.

    Two guards against applying a file while it is being written
    (`kubectl get ... > file` truncates it first, then writes for a while):

    - a change is read only once it has settled: the same stamps on two polls
      in a row, or every file last modified more than `settle_s` ago;
    - a change that would remove every Service, or every NetworkPolicy, is
      held for `hold_s`, with a warning, and applied only if it is still so
      then: an empty or cut file must not take every Service down, nor open
      every pod, at once.

    Write-then-rename (`kubectl get ... > f.tmp && mv f.tmp f`) avoids both
    waits: the rename is atomic and the file is never seen half-written.
    """

    def __init__(self, path: Path, node_name: str | None = None, *, settle_s: float = 1.0,
                 hold_s: float = 5.0, clock: Callable[[], float] = time.monotonic):
        self.path = path
        self.node_name = node_name
        self.settle_s = settle_s
        self.hold_s = hold_s
        self._clock = clock
        self._last: _Stamp | None = None     # the stamp last read
        self._seen: _Stamp | None = None     # the stamp of the previous poll
        self._notes: list[str] = []
        self._parsed: dict = {}  # file -> (stamp, FileRecord, HeldFile until the index holds them)
        self._index: FileIndex | None = None  # for incremental reads; None: read everything
        self._routes: tuple | None = None     # (routes, grants) of the last full read, if any route
        self._split: tuple = ()               # the frontends they split in the last state read
        self._unsplit_notes: list[str] = []   # the last full read's notes but the routes' splits
        self._pending: DesiredState | None = None  # read, not yet handed out (held)
        self._held_since: float | None = None
        self._serving_services = False       # the last state handed out had Services
        self._serving_policies = False       # ... and NetworkPolicies
        self._read_state: DesiredState | None = None  # the last state read
        self._skipped: list[str] = []        # policy objects left out of it, and why
        self._status_of: DesiredState | None = None  # the state _status_problems describe
        self._status_problems: list[str] = []  # its routes' False status conditions

    def health(self) -> dict:
        return {"ok": True}  # no thread to die: polling runs in the agent's loop

    @property
    def problems(self) -> list[str]:
        """The policy objects and routes left out of the last state read, and
        why; and each route's False status conditions (route_status)."""
        state = self._read_state
        if state is not None and state.routes and self._status_of is not state:
            self._status_of = state
            self._status_problems = [line for ps in route_statuses(state, self._ports_of()) for line in ps.problems()]
        return list(self._skipped) + (self._status_problems if state is not None and state.routes else [])

    def changed(self) -> bool:
        return _stamp(self.path) != self._last

    def forget(self) -> None:
        """The next poll reads and parses every file again, changed or not,
        and hands out the state even if it is the same (SIGHUP)."""
        self._last, self._parsed = None, {}
        self._index = None

    def poll(self) -> DesiredState | None:
        """None when nothing changed (or a change is settling or held);
        raises ConfigError on a bad change (reported once per change, not on
        every poll)."""
        stamp = _stamp(self.path)
        seen, self._seen = self._seen, stamp
        if stamp != self._last:
            if not self._settled(stamp, seen):
                return None  # still being written, perhaps: look again next poll
            self._last = stamp
            self._pending, self._held_since = None, None
            self._pending = self._read()
        return self._release()

    def _settled(self, stamp: _Stamp, seen: _Stamp | None) -> bool:
        """Whether every file is safe to read: unchanged since the previous
        poll, or last modified settle_s ago, or put in place by a rename (a
        new inode under a name read before: the writer had finished)."""
        before = set(seen.entries) if seen else set()
        inodes = {name: ino for name, ino, _, _ in (self._last.entries if self._last else ())}
        old = time.time_ns() - int(self.settle_s * 1e9)
        return all(entry in before or entry[3] <= old
                   or inodes.get(entry[0], entry[1]) != entry[1]
                   for entry in stamp.entries)

    def _read(self) -> DesiredState:
        try:
            state = self._read_changed_files()
            if state is not None:
                return state
            self._index = None
            result = read_config(self.path, self.node_name, self._parsed, self._read_state)
        except ConfigError:
            self._index = None
            raise
        except Exception as exc:
            self._index = None
            log.exception("reading %s failed", self.path)
            raise internal_error(str(self.path), exc) from None
        if result.notes != self._notes:
            for note in result.notes:
                log.info("%s", note)
            self._notes = result.notes
        self._report_skipped([str(p) for p in result.skipped])
        # The index holds the Services unsplit; routes split each state it
        # derives again (_route). A change to a route or a grant is another
        # kind in its file, which takes the full read.
        self._build_index(result.unrouted or result.state, result.skipped)
        self._routes = (result.state.routes, result.state.reference_grants) if result.state.routes else None
        self._split = result.split
        self._unsplit_notes = result.notes[:len(result.notes) - len(result.split_notes)]
        self._read_state = result.state
        return result.state

    def _ports_of(self):
        """A Service's frontends in the last state read, from the index
        (None without one: then they are searched for)."""
        return None if self._index is None else self._index.services.service_ports

    def _route(self, state: DesiredState, before: DesiredState) -> DesiredState:
        """The index's next state split by the routes of the last full read.
        Its Delta stays usable (over the state handed out last) when the
        index's was over `before`, the unsplit state that one came from."""
        routes, grants = self._routes
        if state.delta is not None and state.delta.base() is not before:
            state = replace(state, delta=None)
        routed, self._split, split_notes = reapply_routes(
            state, self._read_state, self._split, routes, grants, self._ports_of())
        notes = self._unsplit_notes + split_notes
        if notes != self._notes:
            for note in notes:
                log.info("%s", note)
            self._notes = notes
        return routed

    def _build_index(self, state: DesiredState, skipped: list[Problem]) -> None:
        """The incremental index of a full read, built at once from what the
        read holds (cheap: nothing is read again), so that what only the
        index needs is freed before the state's sync allocates its own."""
        if any(held is None for _, _, held in self._parsed.values()):
            return  # not all read by that full read (cannot happen): stay on full reads
        files = {f: held for f, (_, _, held) in self._parsed.items()}
        with gc_paused():
            self._index = FileIndex({f: held.record for f, held in files.items()},
                                    service_index(state, files.values(), self.node_name))
        self._index.skipped = skipped
        # The index holds the Services and EndpointSlices; the records are
        # all the next change needs. (A full read parses the files again.)
        self._parsed = {f: (stamp, self._index.records[f], None) for f, (stamp, _, _) in self._parsed.items()}

    def _report_skipped(self, skipped: list[str]) -> None:
        """Logs each left-out object once, when it appears, and when it is fixed."""
        for text in skipped:
            if text not in self._skipped:
                log.warning("left out (its previous version, if any, stays): %s", text)
        for text in self._skipped:
            if text not in skipped:
                log.info("resolved: %s", text)
        self._skipped = skipped

    def _read_changed_files(self) -> DesiredState | None:
        """Parses only the files that changed and applies their differences
        (file_incremental); None when a full read is needed."""
        if self._index is None:
            return None
        text, text_bytes = "", 0
        with gc_paused():
            files = config_files(self.path)
            changed: dict[Path, tuple | None] = dict.fromkeys(self._parsed.keys() - set(files))
            stamps = {}
            for file in files:
                try:
                    st = os.stat(file)
                    stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
                    if file in self._parsed and self._parsed[file][0] == stamp:
                        continue
                    text, stamp = read_text(file)
                except (OSError, UnicodeDecodeError):
                    return None  # the full read says what is wrong, with every other problem
                previous = self._parsed[file][1] if file in self._parsed else None
                # ConfigError: reported as the full read would
                record, fresh, _ = parse_file(file, text, previous or FileRecord([], [], {}))
                changed[file], stamps[file] = (record, fresh), stamp
                text_bytes += len(text)
            del text
            before = self._index.state
            state = self._index.apply(changed)
            if state is not None and self._routes is not None:
                state = self._route(state, before)
            for file, new in changed.items():  # the records of this read, kept or not
                if new is None:
                    self._parsed.pop(file, None)
                else:
                    self._parsed[file] = (stamps[file], new[0], None)
        if text_bytes >= TRIM_AFTER_BYTES:
            trim_malloc()
        if state is None:
            self._index = None
        else:
            self._read_state = state
            self._report_skipped([str(p) for p in self._index.skipped])
        return state

    def _release(self) -> DesiredState | None:
        """The pending state, unless it is being held back."""
        state = self._pending
        if state is None:
            return None
        emptied = [kind for kind, serving, now_has in (
            ("Service", self._serving_services, state.service_ports),
            ("NetworkPolicy", self._serving_policies, state.network_policies)) if serving and not now_has]
        if emptied:
            now = self._clock()
            what = " and every ".join(emptied)
            if self._held_since is None:
                self._held_since = now
                log.warning("%s: this change removes every %s; holding it for %.0f s in "
                            "case the file is still being written", self.path, what, self.hold_s)
            if now - self._held_since < self.hold_s:
                return None
            log.warning("%s: still no %s after %.0f s: applying the change", self.path,
                        " and no ".join(emptied), self.hold_s)
        self._pending, self._held_since = None, None
        self._serving_services = bool(state.service_ports)
        self._serving_policies = bool(state.network_policies)
        return state
