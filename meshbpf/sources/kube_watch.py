"""List-then-watch of one Kubernetes collection, in a background thread.

A Reflector keeps a complete copy of one collection (say, every Service),
the way client-go's reflector does:

- list (in pages, from the API server's watch cache: resourceVersion "0",
  as client-go does), replace the copy, note the list's resourceVersion;
- watch from that resourceVersion, applying ADDED / MODIFIED / DELETED and
  moving the resourceVersion on with every event and BOOKMARK;
- when the watch ends, watch again from where it stopped; when the connection
  drops, do the same after a backoff with jitter;
- when the server answers 410 Gone (the resourceVersion was compacted away),
  list again, this time a consistent read from etcd (no resourceVersion: the
  watch cache may be what lagged), and swap the copy in one step, logging
  the difference;
- a watch that stays silent for two bookmark intervals (the API server
  sends a BOOKMARK about every minute) is taken for a dead connection and
  reopened; TCP keepalive notices a vanished peer sooner;
- anything unexpected (a line that is not an event, a bug) is logged and
  followed by a relist after a backoff: the thread never ends on its own,
  and health() shows each thread's liveness and the age of its last event;
- an optional collection whose first list the server refuses (403, 404:
  RBAC, or an API the cluster lacks) counts as listed and empty, with
  `refused` saying why; it keeps trying quietly and fills in once allowed.

The copy is only ever replaced whole, so a reader sees either the state
before a relist or the state after it, never a half-listed collection.

Objects are kept as the raw JSON dicts the API server sent (camelCase, as
kubectl prints them), not the client's generated model objects: those would
only be converted back for kube_objects, at a cost that counts with 10 000
Services, and would tie us to the client's model checks.
"""

from __future__ import annotations

import gc
import logging
import random
import threading
import time
from dataclasses import dataclass
from sys import intern
from typing import Any, Callable, Iterator

import urllib3
from kubernetes.client.exceptions import ApiException

from ..gcpause import gc_paused
from . import json_codec

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (namespace, name); namespace "" for cluster-scoped objects


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter, like client-go's wait.Backoff:
    initial * 2**n capped at `cap`, each stretched by up to `jitter` of itself
    so a fleet of agents does not reconnect in step after an API outage."""

    initial: float = 0.8
    cap: float = 30.0
    jitter: float = 1.0

    def delay(self, failures: int, rand: Callable[[], float] = random.random) -> float:
        base = min(self.cap, self.initial * 2 ** max(0, failures - 1))
        return base * (1 + self.jitter * rand())


class Gone(Exception):
    """The resourceVersion we hold is too old: list again."""


class BadEvent(Exception):
    """A watch line that is not a watch event."""


def _lines(resp: Any) -> Iterator[bytes]:
    """The complete lines of a chunked watch stream, one event each. Split as
    bytes, not text: a chunk can end inside a multi-byte character (older
    client versions decoded each chunk on its own and failed there)."""
    rest = b""
    for chunk in resp.stream(amt=None, decode_content=False):
        *lines, rest = (rest + chunk).split(b"\n")
        yield from lines


def object_key(obj: dict) -> Key:
    # Interned: the source's index and desired state name the same objects
    # by the same strings (one copy each, not one per table).
    meta = obj.get("metadata") or {}
    return intern(meta.get("namespace") or ""), intern(meta.get("name") or "")


def well_formed(obj: Any) -> bool:
    """An object the reflector can hold: a map whose metadata is a map with a
    string name (and a string namespace, if any). Anything else is skipped
    with a warning, never allowed to stop its whole collection."""
    if not isinstance(obj, dict):
        return False
    meta = obj.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str):
        return False
    return meta.get("namespace") is None or isinstance(meta.get("namespace"), str)


def _resource_version(obj: dict) -> str | None:
    return (obj.get("metadata") or {}).get("resourceVersion")


class Reflector:
    """Keeps a complete copy of one collection, listed then watched.

    list_func is a generated client method such as
    CoreV1Api.list_service_for_all_namespaces; `selectors` are passed to it
    on every call (label_selector, field_selector). `transform` may trim each
    object before it is stored (client-go's TransformFunc); `hold`, if given,
    turns it into the form stored (say packed compact text). A page's decoded
    objects are dropped once held: keeping the first list's dicts for the
    cold start's build (it then decoded nothing again) held ~6 KB per
    Service at once, and the heap kept that peak as RSS for good.
    """

    def __init__(self, name: str, list_func: Callable[..., Any], *, kind: str, api_version: str,
                 selectors: dict[str, str] | None = None,
                 transform: Callable[[dict], dict] = lambda obj: obj,
                 hold: Callable[[dict], Any] | None = None,
                 backoff: Backoff = Backoff(), page_size: int = 500,
                 watch_timeout: tuple[int, int] = (300, 600), connect_timeout: float = 10.0,
                 bookmark_interval: float = 60.0, on_change: Callable[[], None] = lambda: None,
                 optional: bool = False):
        self.name = name
        self.optional = optional
        self._on_change = on_change  # called after each change (must not take our lock)
        self._list_func = list_func
        self._kind, self._api_version = kind, api_version
        self._selectors = dict(selectors or {})
        self._transform = transform
        self._hold = hold
        self._backoff = backoff
        self._page_size = page_size
        self._watch_timeout = watch_timeout
        self._connect_timeout = connect_timeout
        # No line for two bookmark intervals: the connection is dead.
        self._watch_read_timeout = 2 * bookmark_interval

        self._lock = threading.Lock()
        self._items: dict[Key, dict] = {}
        self.generation = 0             # bumped whenever _items changes
        self._touched: set[Key] | None = set()  # keys changed since take_changes(); None: a relist
        self.synced = threading.Event()  # set once the first list is in
        self.resource_version: str | None = None
        self.refused: str | None = None  # optional, and the server refuses to list it: why
        self.lists = 0                   # how many complete lists were taken
        self._failures = 0               # consecutive failed attempts, for the backoff
        self._consistent_list = False    # the next list reads etcd (after a 410), not the cache
        self.last_event = time.monotonic()  # of the last list or watch line, for health()
        self._stop = threading.Event()
        self._resp: Any = None           # the response being read, to cut it on stop()
        self._thread = threading.Thread(target=self._run, name=f"watch-{name}", daemon=True)

    # --- reading ---------------------------------------------------------------
    def items(self) -> list[dict]:
        with self._lock:
            return list(self._items.values())

    def held_items(self) -> list[tuple[Key, Any]]:
        """(key, the object as held), one consistent snapshot."""
        with self._lock:
            return list(self._items.items())

    def take_changes(self) -> dict[Key, dict | None] | None:
        """The objects changed since the last call, by key (None: deleted),
        as one consistent snapshot; None when a relist replaced the
        collection (the caller then reads items() whole)."""
        with self._lock:
            touched, self._touched = self._touched, set()
            if touched is None:
                return None
            return {key: self._items.get(key) for key in touched}

    def health(self) -> dict[str, Any]:
        return {"alive": self._thread.is_alive(),
                "last_event_age_s": round(time.monotonic() - self.last_event, 3)}

    # --- lifecycle -------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def signal_stop(self) -> None:
        self._stop.set()
        self._cut()

    def stop(self, timeout: float = 5.0) -> None:
        self.signal_stop()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _cut(self) -> None:
        """Unblocks a read in progress: shut the socket so the read returns."""
        resp = self._resp
        sock = getattr(getattr(resp, "connection", None), "sock", None)
        if sock is not None:
            try:
                sock.shutdown(2)  # SHUT_RDWR
            except OSError:
                pass

    # --- the loop --------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self.resource_version is None:
                    self._relist()
                self._watch()
            except Gone as exc:
                # Expected now and then (compaction outran us): relist at once,
                # but back off if it keeps happening right after a list.
                self._failures += 1
                log.info("%s: %s; listing again", self.name, exc)
                self.resource_version = None
                self._consistent_list = True
                if self._failures > 1:
                    self._stop.wait(self._backoff.delay(self._failures - 1))
            except (ApiException, urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
                if self._stop.is_set():
                    break
                if self._refusal(exc):
                    continue
                # Keep the resourceVersion: once the server is back, the watch
                # resumes where it stopped and replays what was missed; only
                # if that is too old by then does the 410 path relist.
                self._retry_later(exc, "keeping the last state")
            except Exception as exc:  # BadEvent, or a bug: never end the thread
                if self._stop.is_set():
                    break
                log.debug("%s: unexpected error", self.name, exc_info=True)
                self.resource_version = None  # the copy may have missed an event: relist
                self._retry_later(exc, "then listing again")

    def _refusal(self, exc: BaseException) -> bool:
        """An optional collection the server will not list (before it ever
        did): listed as empty and `refused`, retried quietly at the backoff's
        cap. True when exc was that."""
        if not (self.optional and not self.lists and isinstance(exc, ApiException)
                and exc.status in (403, 404)):
            return False
        if self.refused is None:
            with self._lock:
                self.refused = _describe(exc)
                self.generation += 1
            self.synced.set()
            self._on_change()
        self._failures += 1
        self._stop.wait(self._backoff.delay(self._failures))
        return True

    def _retry_later(self, exc: BaseException, then: str) -> None:
        self._failures += 1
        delay = self._backoff.delay(self._failures)
        quiet = self._failures not in (1, 5) and self._failures % 20
        log.log(logging.DEBUG if quiet else logging.WARNING,
                "%s: %s (attempt %d); retrying in %.1fs, %s",
                self.name, _describe(exc), self._failures, delay, then)
        self._stop.wait(delay)

    def _call(self, read_timeout: float, **kwargs: Any) -> Any:
        """One request through the generated client, raw: the urllib3
        response, not a deserialized model. Raises ApiException on non-2xx."""
        resp = self._list_func(_preload_content=False,
                               _request_timeout=(self._connect_timeout, read_timeout),
                               **self._selectors, **kwargs)
        self._resp = resp
        if self._stop.is_set():
            self._cut()
        return resp

    def _relist(self) -> None:
        """A full, paged list, with Python's cyclic collector paused: a list
        of 100 000 objects allocates millions of dicts and lists, and the
        collector, triggered by allocation counts, would walk the growing
        heap again and again (about half the time of a big list). The
        objects listed form no cycles: once in, they are frozen out of the
        collector's sight (gc.freeze) instead of being walked by every
        full collection from then on; reference counting still frees them.
        Frozen before the collector is back: else the first allocation after
        the pause collects the young generation, every object just listed
        (most of a second at 100 000 EndpointSlices)."""
        with gc_paused():
            self._list_all()
            gc.freeze()

    def _list_all(self) -> None:
        """A full, paged list; the copy is swapped only once every page is in.

        Normally from the watch cache (resourceVersion "0", as client-go
        lists), which spares etcd when every node lists at once. After a 410
        the cache itself may be what lagged, so that relist reads etcd (no
        resourceVersion) and cannot go back in time."""
        items: dict[Key, dict] = {}
        cont: str | None = None
        first_page = {} if self._consistent_list else {"resource_version": "0"}
        while True:
            try:
                body = json_codec.loads(self._read_all(self._call(
                    60.0, limit=self._page_size,
                    **({"_continue": cont} if cont else first_page))))
            except ApiException as exc:
                if exc.status == 410 and cont:
                    # The continue token expired: pages would mix snapshots.
                    log.info("%s: list continuation expired; listing from the start", self.name)
                    items, cont = {}, None
                    continue
                raise
            if not isinstance(body, dict):
                raise BadEvent(f"a list answer that is not an object: {str(body)[:80]!r}")
            for obj in body.get("items") or []:
                if not well_formed(obj):
                    log.warning("%s: skipped a list item that is not a named object: %.80r",
                                self.name, obj)
                    continue
                # List items come without kind and apiVersion; watch events
                # and kubectl's output have them, and kube_objects needs them.
                obj.setdefault("kind", self._kind)
                obj.setdefault("apiVersion", self._api_version)
                key, obj = object_key(obj), self._transform(obj)
                items[key] = obj if self._hold is None else self._hold(obj)
            meta = body.get("metadata") or {}
            body = obj = None  # the page's objects, freed before the next page is decoded
            cont = meta.get("continue")
            if not cont:
                break
        self._replace(items, meta.get("resourceVersion"))

    def _replace(self, items: dict[Key, dict], resource_version: str | None) -> None:
        with self._lock:
            old = self._items
            added = items.keys() - old.keys()
            deleted = old.keys() - items.keys()
            changed = [k for k in items.keys() & old.keys() if items[k] != old[k]]
            self._items = items
            if added or deleted or changed or self.refused:
                self.refused = None
                self.generation += 1
                self._touched = None
                self._on_change()
        self.lists += 1
        self.resource_version = resource_version
        self._consistent_list = False
        self.last_event = time.monotonic()
        if self.lists > 1:
            log.info("%s: relisted at resourceVersion %s: %d added, %d changed, %d deleted",
                     self.name, resource_version, len(added), len(changed), len(deleted))
        self.synced.set()

    def _read_all(self, resp: Any) -> bytes:
        try:
            data = resp.data
        except BaseException:
            resp.close()  # a half-read connection must not go back to the pool
            raise
        finally:
            self._resp = None
        resp.release_conn()
        return data

    def _watch(self) -> None:
        """One watch request, from self.resource_version until the stream
        ends; raises Gone, or a connection or API error."""
        timeout = random.randint(*self._watch_timeout)  # spread reconnects, as client-go does
        started, events, complete = time.monotonic(), 0, False
        try:
            resp = self._call(self._watch_read_timeout, watch=True,
                              resource_version=self.resource_version,
                              allow_watch_bookmarks=True, timeout_seconds=timeout)
        except ApiException as exc:
            if exc.status == 410:
                raise Gone(f"watch from resourceVersion {self.resource_version}: 410 Gone") from None
            raise
        try:
            for line in _lines(resp):
                self.last_event = time.monotonic()
                if line.strip():
                    self._apply(_event(line))
                    events += 1
                    self._failures = 0  # the server is back and talking
                if self._stop.is_set():
                    return
            complete = True
        finally:
            self._resp = None
            if complete:
                resp.release_conn()  # keep-alive: the next watch reuses it
            else:
                resp.close()
            if time.monotonic() - started >= 1.0:
                self._failures = 0
        if events == 0 and time.monotonic() - started < 1.0:
            # client-go's "very short watch": a server closing watches at
            # once must not make us reconnect in a tight loop.
            raise urllib3.exceptions.ProtocolError("very short watch: closed at once with no event")

    def _apply(self, event: dict) -> None:
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise Gone(f"watch: {obj.get('reason')}: {obj.get('message')}")
            raise ApiException(status=obj.get("code") or 0,
                               reason=f"watch error: {obj.get('reason')}: {obj.get('message')}")
        if kind == "BOOKMARK":
            self.resource_version = _resource_version(obj) or self.resource_version
            return
        if kind not in ("ADDED", "MODIFIED", "DELETED"):
            log.debug("%s: ignoring watch event of type %r", self.name, kind)
            return
        if not well_formed(obj):
            log.warning("%s: skipped a %s event for something that is not a named object: %.80r",
                        self.name, kind, obj)
            return
        key, version = object_key(obj), _resource_version(obj)  # before transform trims obj
        with self._lock:
            if kind == "DELETED":
                self._items.pop(key, None)
            else:
                obj.setdefault("kind", self._kind)
                obj.setdefault("apiVersion", self._api_version)
                held = self._transform(obj)
                self._items[key] = held if self._hold is None else self._hold(held)
            self.generation += 1
            if self._touched is not None:
                self._touched.add(key)
        self._on_change()
        self.resource_version = version or self.resource_version


def _event(line: bytes) -> dict:
    """One watch line as an event; BadEvent for anything else."""
    try:
        event = json_codec.loads(line)
    except ValueError:
        raise BadEvent(f"a watch line that is not JSON: {line[:80]!r}") from None
    if not isinstance(event, dict) or not isinstance(event.get("object", {}), dict):
        raise BadEvent(f"a watch line that is not an event: {line[:80]!r}")
    return event


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ApiException):
        return f"API server answered {exc.status} {exc.reason}".strip()
    if isinstance(exc, BadEvent):
        return str(exc)
    if isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason is not None:
        return _describe(exc.reason)  # the cause, without the whole URL
    return f"{type(exc).__name__}: {exc}"
