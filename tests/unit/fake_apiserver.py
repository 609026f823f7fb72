"""A fake Kubernetes API server: the list and watch protocol over real HTTP.

Enough of the API server for a client to list and watch Services,
EndpointSlices, Pods, ConfigMaps, Nodes, Namespaces and NetworkPolicies the
way it would against a real cluster, on 127.0.0.1 only:

- one global resourceVersion, bumped by every write, stamped on the object;
- lists as the API server sends them: `<Kind>List`, items WITHOUT kind and
  apiVersion, label and field selectors, `limit` with `continue` tokens that
  serve the snapshot of the first page (and can be made to expire: 410);
- watches as chunked HTTP streams of one JSON event per line, resumable from
  any resourceVersion newer than the compaction point (older: an ERROR event
  with a 410 Status, or a plain HTTP 410 if asked), BOOKMARK events on demand,
  `timeoutSeconds`, and the ADDED / DELETED a selector change turns a
  MODIFIED into;
- faults on demand: 403 for a kind (RBAC), dropped watch connections (cut
  mid-event), 410 on open watches, events split across chunks, a raw line
  that is not an event, open watches gone silent (a half-open connection:
  nothing more arrives, nothing closes), and a whole-server outage (the
  port closed, every connection cut) followed by a restart on the same port.

Tests change the cluster with apply() and delete(), as kubectl would.
"""

from __future__ import annotations

import base64
import bisect
import copy
import json
import re
import socket
import ssl
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import parse_qs, urlparse

import yaml

# kind -> (path prefix, plural, namespaced)
RESOURCES = {
    "Service": ("/api/v1", "services", True),
    "EndpointSlice": ("/apis/discovery.k8s.io/v1", "endpointslices", True),
    "Pod": ("/api/v1", "pods", True),
    "ConfigMap": ("/api/v1", "configmaps", True),
    "Node": ("/api/v1", "nodes", False),
    "Namespace": ("/api/v1", "namespaces", False),
    "NetworkPolicy": ("/apis/networking.k8s.io/v1", "networkpolicies", True),
    "TCPRoute": ("/apis/gateway.networking.k8s.io/v1alpha2", "tcproutes", True),
    "UDPRoute": ("/apis/gateway.networking.k8s.io/v1alpha2", "udproutes", True),
    "ReferenceGrant": ("/apis/gateway.networking.k8s.io/v1beta1", "referencegrants", True),
}
_BY_PLURAL = {(prefix, plural): kind for kind, (prefix, plural, _) in RESOURCES.items()}
_STATUS_PATH = re.compile(r"^(/apis/[^/]+/[^/]+)/namespaces/([^/]+)/([a-z]+)/([^/]+)/status$")
_PATH = re.compile(r"^(/api/v1|/apis/[^/]+/[^/]+)(?:/namespaces/([^/]+))?/([a-z]+)$")


@dataclass
class _Event:
    rv: int
    kind: str
    type: str          # ADDED, MODIFIED, DELETED
    obj: dict
    old: dict | None   # the object before, to turn selector changes into ADDED/DELETED


@dataclass
class _Watcher:
    kind: str
    actions: list[Any] = field(default_factory=list)  # "bookmark", "drop", "gone", "silence", bytes


@dataclass(frozen=True)
class Request:
    kind: str
    watch: bool
    query: dict[str, str]
    headers: dict[str, str]


def _selector_matches(selector: str, values: dict[str, str]) -> bool:
    """Label and field selectors: `k=v`, `k==v`, `k!=v`, `k`, `!k`, ANDed by commas."""
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if values.get(key) == value:
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if values.get(key) != value:
                return False
        elif term.startswith("!"):
            if term[1:] in values:
                return False
        elif term not in values:
            return False
    return True


def _bool(value: str | None) -> bool:
    """A query flag, parsed like Go's strconv.ParseBool (clients send "true" or "True")."""
    return value in ("1", "t", "T", "true", "TRUE", "True")


def _fields(obj: dict) -> dict[str, str]:
    meta = obj.get("metadata") or {}
    out = {"metadata.name": meta.get("name", ""), "metadata.namespace": meta.get("namespace", "")}
    node = (obj.get("spec") or {}).get("nodeName")
    if node is not None:
        out["spec.nodeName"] = node
    return out


def _key(obj: dict) -> tuple[str, str]:
    meta = obj["metadata"]
    return meta.get("namespace", ""), meta["name"]


class FakeAPIServer:
    def __init__(self, tls: tuple[Path, Path] | None = None, token: str | None = None):
        self.tls = tls                  # (certificate, key): serve HTTPS
        self.token = token              # require "Authorization: Bearer <token>"
        self.gone_as_http_status = False  # answer a too-old watch with HTTP 410, not an event
        self.chunk_size: int | None = None  # split watch output into chunks of this many bytes
        self.expire_next_continue = False   # the next `continue` token is too old: 410
        self.failing: set[str] = set()      # kinds whose requests answer 500
        self.forbidden: set[str] = set()    # kinds whose requests answer 403 (RBAC)
        self.requests: list[Request] = []
        self.status_patches: list[StatusPatch] = []  # status subresource PATCHes that were applied
        self.status_forbidden = False       # status PATCHes answer 403 (RBAC)

        self._cond = threading.Condition()
        self._rv = 1000
        self._compacted = 0             # watches from an older resourceVersion get 410
        self._objects: dict[str, dict[tuple[str, str], dict]] = {k: {} for k in RESOURCES}
        # Each object as a list item (no kind, no apiVersion), serialised once
        # when written: a page is then a join of bytes, so listing 200 000
        # objects costs the client, not this server.
        self._items: dict[str, dict[tuple[str, str], bytes]] = {k: {} for k in RESOURCES}
        self._events: list[_Event] = []
        self._watchers: list[_Watcher] = []
        self._continues: dict[str, list[dict]] = {}
        self._conns: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._httpd: ThreadingHTTPServer | None = None
        self._epoch = 0                 # bumped by stop(): streams of an older epoch end
        self._serve_thread: threading.Thread | None = None
        self.port = 0

    # --- lifecycle -------------------------------------------------------------
    def start(self) -> FakeAPIServer:
        handler = type("Handler", (_Handler,), {"api": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        self._httpd.daemon_threads = True
        if self.tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*map(str, self.tls))
            self._httpd.socket = ctx.wrap_socket(self._httpd.socket, server_side=True)
        self.port = self._httpd.server_address[1]
        self._serve_thread = threading.Thread(target=self._httpd.serve_forever,
                                              kwargs={"poll_interval": 0.05}, daemon=True)
        self._serve_thread.start()
        return self

    def stop(self) -> None:
        """Closes the port and cuts every connection; waits for the threads."""
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        self._serve_thread.join(5)
        self._httpd = None
        with self._cond:
            self._epoch += 1
            for conn in list(self._conns):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._cond.notify_all()
        for t in list(self._threads):
            t.join(5)

    @contextmanager
    def outage(self) -> Iterator[None]:
        """The API server is down: connections refused until the block ends."""
        self.stop()
        try:
            yield
        finally:
            self.start()

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def kubeconfig(self, path: Path) -> Path:
        """A kubeconfig file for this server, as `kubectl config view --raw` prints one."""
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
            "users": [{"name": "fake", "user": {"token": self.token or "unused"}}],
        }))
        return path

    # --- the cluster -----------------------------------------------------------
    def apply(self, *objects: dict) -> int:
        """Creates or replaces objects (a `kind: List` is unpacked); returns
        the resourceVersion of the last write."""
        with self._cond:
            for obj in objects:
                if obj.get("kind") == "List":
                    self.apply(*obj["items"])
                    continue
                obj = json.loads(json.dumps(obj))  # a deep copy, in C
                self._rv += 1
                obj["metadata"]["resourceVersion"] = str(self._rv)
                old = self._objects[obj["kind"]].get(_key(obj))
                self._store(obj["kind"], _key(obj), obj)
                self._events.append(_Event(self._rv, obj["kind"], "MODIFIED" if old else "ADDED",
                                           obj, old))
            self._cond.notify_all()
            return self._rv

    def load(self, path: Path) -> None:
        """Applies every object of a `kubectl get -o yaml` file."""
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                self.apply(doc)

    def delete(self, kind: str, namespace: str, name: str) -> None:
        with self._cond:
            key = (namespace if RESOURCES[kind][2] else "", name)
            old = self._objects[kind].pop(key)
            del self._items[kind][key]
            self._rv += 1
            gone = copy.deepcopy(old)
            gone["metadata"]["resourceVersion"] = str(self._rv)
            self._events.append(_Event(self._rv, kind, "DELETED", gone, old))
            self._cond.notify_all()

    def _store(self, kind: str, key: tuple[str, str], obj: dict) -> None:
        self._objects[kind][key] = obj
        self._items[kind][key] = json.dumps(
            {k: v for k, v in obj.items() if k not in ("kind", "apiVersion")}).encode()

    def get(self, kind: str, namespace: str, name: str) -> dict:
        return copy.deepcopy(self._objects[kind][(namespace if RESOURCES[kind][2] else "", name)])

    # --- faults ----------------------------------------------------------------
    def compact(self) -> None:
        """Forgets history: watches from before now get 410 Gone."""
        with self._cond:
            self._compacted = self._rv

    def bookmark(self) -> None:
        self._act("bookmark")

    def drop_watches(self) -> None:
        """Cuts every open watch in the middle of an event."""
        self._act("drop")

    def expire_watches(self) -> None:
        """Ends every open watch with a 410 ERROR event, as a lagging watch cache does."""
        self._act("gone")

    def send_raw_line(self, line: bytes) -> None:
        """Sends line, as it is, on every open watch."""
        self._act(line)

    def silence_watches(self) -> None:
        """Open watches go quiet for good, as over a half-open connection:
        no event, no bookmark, no end. New watches are served as usual."""
        self._act("silence")

    def _act(self, action: Any) -> None:
        with self._cond:
            for w in self._watchers:
                w.actions.append(action)
            self._cond.notify_all()

    def watching(self, kind: str) -> int:
        with self._cond:
            return sum(1 for w in self._watchers if w.kind == kind)

    def lists(self, kind: str) -> list[Request]:
        return [r for r in self.requests if r.kind == kind and not r.watch]

    def watches(self, kind: str) -> list[Request]:
        return [r for r in self.requests if r.kind == kind and r.watch]

    # --- serving (called from the handler threads) -----------------------------
    def _visible(self, obj: dict | None, namespace: str | None, query: dict[str, str]) -> bool:
        if obj is None:
            return False
        meta = obj["metadata"]
        return ((namespace is None or meta.get("namespace") == namespace)
                and _selector_matches(query.get("labelSelector", ""), meta.get("labels") or {})
                and _selector_matches(query.get("fieldSelector", ""), _fields(obj)))

    def _list(self, kind: str, namespace: str | None, query: dict[str, str]) -> tuple[int, dict]:
        code, body = self._list_json(kind, namespace, query)
        return code, json.loads(body) if code == 200 else body

    def _list_json(self, kind: str, namespace: str | None,
                   query: dict[str, str]) -> tuple[int, dict | bytes]:
        """One page of a list: 200 and the serialised <Kind>List, or an error Status."""
        prefix = RESOURCES[kind][0]
        with self._cond:
            token = query.get("continue")
            if token:
                if self.expire_next_continue or token not in self._continues:
                    self.expire_next_continue = False
                    return 410, _status(410, "Expired", "The provided continue parameter is too old")
                rv, rest = json.loads(base64.b64decode(token))["rv"], self._continues.pop(token)
            else:
                # The snapshot: every later page serves these bytes, whatever is written since.
                rv, items = self._rv, self._items[kind]
                everything = namespace is None and not query.get("labelSelector") \
                    and not query.get("fieldSelector")
                rest = [(key, items[key]) for key, o in sorted(self._objects[kind].items())
                        if everything or self._visible(o, namespace, query)]
        limit = int(query.get("limit") or 0) or len(rest)
        page, rest = rest[:limit], rest[limit:]
        meta: dict[str, Any] = {"resourceVersion": str(rv)}
        if rest:
            token = base64.b64encode(json.dumps({"rv": rv, "start": rest[0][0]}).encode()).decode()
            with self._cond:
                self._continues[token] = rest
            meta["continue"] = token
            meta["remainingItemCount"] = len(rest)
        head = json.dumps({"apiVersion": prefix.removeprefix("/apis/").removeprefix("/api/"),
                           "kind": f"{kind}List", "metadata": meta})
        return 200, b"%s, \"items\": [%s]}" % (head[:-1].encode(), b",".join(item for _, item in page))

    def _watch_events(self, kind: str, namespace: str | None, query: dict[str, str],
                      since: int, watcher: _Watcher, deadline: float) -> Iterator[list[dict] | str | bytes]:
        """What one watch stream sends: batches of events (the writes one
        wake-up found, sent as one chunk), and at the end "drop" or nothing."""
        with self._cond:
            pos = bisect.bisect_right([e.rv for e in self._events], since)
            epoch = self._epoch
        while True:
            with self._cond:
                while (pos == len(self._events) and not watcher.actions and self._epoch == epoch
                       and time.monotonic() < deadline):
                    self._cond.wait(min(0.2, max(0.0, deadline - time.monotonic())))
                if self._epoch != epoch or time.monotonic() >= deadline:
                    return
                events, pos = self._events[pos:], len(self._events)
                actions, watcher.actions = watcher.actions, []
                rv_now = self._rv
            if "drop" in actions:
                yield "drop"  # the connection dies: nothing more gets through
                return
            if "silence" in actions:
                with self._cond:
                    while self._epoch == epoch and time.monotonic() < deadline:
                        self._cond.wait(0.2)
                return
            batch = []
            for e in events:
                if e.kind != kind:
                    continue
                now = self._visible(e.obj, namespace, query)
                before = self._visible(e.old, namespace, query)
                if e.type == "DELETED":
                    kind_ = "DELETED" if before else None
                elif now:
                    kind_ = "MODIFIED" if before else "ADDED"
                else:
                    kind_ = "DELETED" if before else None  # left the selection
                if kind_:
                    batch.append({"type": kind_, "object": e.obj})
            for action in actions:
                if isinstance(action, bytes):
                    yield batch
                    batch = []
                    yield action
                elif action == "bookmark" and _bool(query.get("allowWatchBookmarks")):
                    batch.append({"type": "BOOKMARK", "object": {
                        "kind": kind, "apiVersion": RESOURCES[kind][0].split("/", 2)[-1],
                        "metadata": {"resourceVersion": str(rv_now)}}})
                elif action == "gone":
                    batch.append({"type": "ERROR", "object": _status(
                        410, "Expired", "too old resource version")})
                    yield batch
                    return
            yield batch


@dataclass
class StatusPatch:
    kind: str
    namespace: str
    name: str
    content_type: str
    body: dict


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: mappings merge, null deletes, the rest replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = _merge_patch(out.get(k), v)
    return out


def _status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


class _Handler(BaseHTTPRequestHandler):
    api: FakeAPIServer
    protocol_version = "HTTP/1.1"  # keep-alive and chunked streams, as the API server

    def setup(self) -> None:
        super().setup()
        with self.api._cond:
            self.api._conns.add(self.connection)
            self.api._threads.add(threading.current_thread())

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        with self.api._cond:
            self.api._conns.discard(self.connection)
            self.api._threads.discard(threading.current_thread())

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        url = urlparse(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        m = _PATH.match(url.path)
        kind = _BY_PLURAL.get((m.group(1), m.group(3))) if m else None
        if kind is None:
            return self._json(404, _status(404, "NotFound", f"no route for {url.path}"))
        watch = _bool(query.get("watch"))
        self.api.requests.append(Request(kind, watch, query, {k.lower(): v for k, v in self.headers.items()}))
        if self.api.token and self.headers.get("Authorization", "").lower() != f"bearer {self.api.token}":
            return self._json(401, _status(401, "Unauthorized", "Unauthorized"))
        if kind in self.api.failing:
            return self._json(500, _status(500, "InternalError", "etcdserver: request timed out"))
        if kind in self.api.forbidden:
            return self._json(403, _status(403, "Forbidden", f"cannot list resource {m.group(3)!r}"))
        namespace = m.group(2)
        if not watch:
            return self._json(*self.api._list_json(kind, namespace, query))
        self._watch(kind, namespace, query)

    def do_PATCH(self) -> None:
        """A merge patch of a namespaced object's status subresource, with the
        resourceVersion precondition the body's metadata may carry (409)."""
        m = _STATUS_PATH.match(urlparse(self.path).path)
        kind = _BY_PLURAL.get((m.group(1), m.group(3))) if m else None
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        if kind is None:
            return self._json(404, _status(404, "NotFound", f"no route for {self.path}"))
        if self.api.status_forbidden:
            return self._json(403, _status(403, "Forbidden", f"cannot patch resource {m.group(3)}/status"))
        namespace, name = m.group(2), m.group(4)
        api = self.api
        with api._cond:
            old = api._objects[kind].get((namespace, name))
            if old is None:
                return self._json(404, _status(404, "NotFound", f"{kind} {namespace}/{name} not found"))
            want = (body.get("metadata") or {}).get("resourceVersion")
            if want and want != old["metadata"]["resourceVersion"]:
                return self._json(409, _status(409, "Conflict", "the object has been modified"))
            obj = copy.deepcopy(old)
            obj["status"] = _merge_patch(old.get("status"), body.get("status"))
            api._rv += 1
            obj["metadata"]["resourceVersion"] = str(api._rv)
            api._store(kind, (namespace, name), obj)
            api._events.append(_Event(api._rv, kind, "MODIFIED", obj, old))
            api.status_patches.append(StatusPatch(kind, namespace, name,
                                                  self.headers.get("Content-Type", ""), body))
            api._cond.notify_all()
        self._json(200, obj)

    def _json(self, code: int, body: dict | bytes) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _watch(self, kind: str, namespace: str | None, query: dict[str, str]) -> None:
        api = self.api
        since = query.get("resourceVersion")
        deadline = time.monotonic() + int(query.get("timeoutSeconds") or 1800)
        with api._cond:
            too_old = since not in (None, "", "0") and int(since) < api._compacted
        if too_old and api.gone_as_http_status:
            return self._json(410, _status(410, "Expired", f"too old resource version: {since}"))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if too_old:
            self._send([{"type": "ERROR", "object": _status(
                410, "Expired", f"too old resource version: {since} ({api._compacted})")}])
            return self._end()
        if since in (None, "", "0"):  # "any": the current state as ADDED events first
            status, body = api._list(kind, namespace, {**query, "limit": ""})
            for item in body["items"]:
                item.update(kind=kind, apiVersion=body["apiVersion"])
            self._send([{"type": "ADDED", "object": o} for o in body["items"]])
            since = body["metadata"]["resourceVersion"]
        watcher = _Watcher(kind)
        with api._cond:
            api._watchers.append(watcher)
        try:
            for batch in api._watch_events(kind, namespace, query, int(since), watcher, deadline):
                if batch == "drop":
                    return self._cut()
                if isinstance(batch, bytes):
                    self._send_raw(batch + b"\n")
                    continue
                self._send(batch)
            self._end()
        except OSError:
            self.close_connection = True
        finally:
            with api._cond:
                api._watchers.remove(watcher)

    def _send(self, events: list[dict]) -> None:
        """Writes events, one JSON line each, as chunks (split if asked)."""
        if not events:
            return
        # Raw UTF-8, as Go's encoding/json writes it, so a chunk boundary can
        # fall inside a character.
        data = b"".join(json.dumps(e, ensure_ascii=False).encode() + b"\n" for e in events)
        size = self.api.chunk_size or len(data)
        for i in range(0, len(data), size):
            piece = data[i:i + size]
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        self.wfile.flush()

    def _send_raw(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _end(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _cut(self) -> None:
        """Half an event, then the connection dies: no terminating chunk."""
        piece = b'{"type":"MODIFIED","object":{"kind":"Serv'
        self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        self.wfile.flush()
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
