"""The agent's HTTP endpoints: /metrics, /healthz, /readyz and read-only
JSON views (/v1/endpoints, /v1/policy: names live in the agent, the CLI asks).

Not http.server: it spends a thread on every connection and has no
timeout (300 idle half-sent requests held 300 threads), and its bind looks
up the host's name. Here one asyncio thread holds every connection, so an
idle one costs a socket, not a thread; a request must arrive whole within
REQUEST_TIMEOUT; at most MAX_WAITING connections wait for their request (a
new one closes the oldest). /healthz and /readyz are answered on that
thread; /metrics, prometheus-client's own WSGI app (content negotiation,
gzip, name[]), runs on WORKERS threads, at most MAX_WAITING scrapes queued.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, Gauge, PlatformCollector, ProcessCollector, make_wsgi_app

from . import __version__

REQUEST_TIMEOUT = 5.0   # seconds for a request to arrive whole, and for its response to leave
MAX_WAITING = 128       # connections allowed to wait for their request at once
WORKERS = 2             # threads that build responses (a scrape reads BPF maps)
MAX_HEAD = 16 * 1024    # bytes of request line and headers

Response = tuple[int, list[tuple[str, str]], bytes]
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           500: "Internal Server Error", 503: "Service Unavailable"}


def parse_listen(listen: str) -> tuple[str, int]:
    """HOST:PORT, [V6]:PORT or :PORT (127.0.0.1) -> (host, port)."""
    host, sep, port = listen.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        sep = ""  # a bare IPv6 address: its port is ambiguous
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"--listen {listen!r}: expected HOST:PORT, like 127.0.0.1:9890 or [::1]:9890")
    return host or "127.0.0.1", int(port)


def register_process_metrics(registry: CollectorRegistry) -> None:
    """process_* (CPU, memory, open fds), python_info and
    meshbpf_build_info{version} in the agent's registry."""
    for add in (lambda: ProcessCollector(registry=registry), lambda: PlatformCollector(registry=registry)):
        try:
            add()
        except ValueError:  # already registered (a second server on the same registry)
            pass
    try:
        build = Gauge("meshbpf_build_info", "The running meshbpf build (always 1)", ["version"],
                      registry=registry)
    except ValueError:
        return
    build.labels(__version__).set(1)


class ListenError(Exception):
    """The metrics address cannot be bound (one line: the CLI prints it)."""


class HealthServer:
    """Serves /healthz (the loop is alive; JSON details if `details` is
    given), /readyz (maps match a config) and /metrics."""

    def __init__(self, listen: str, registry: CollectorRegistry, alive: Callable[[], bool],
                 ready: Callable[[], bool], details: Callable[[], dict[str, Any]] | None = None,
                 views: dict[str, Callable[[], Any]] | None = None):
        host, port = parse_listen(listen)
        register_process_metrics(registry)
        self._metrics_app = make_wsgi_app(registry)
        self._checks = {"/healthz": alive, "/readyz": ready}
        self._details = details
        self._views = dict(views or {})  # path -> JSON-able snapshot, built on a worker
        self._waiting: dict[asyncio.StreamWriter, None] = {}  # oldest first
        self._scrapes = 0  # /metrics and view requests queued or running on the workers
        self._pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="http-worker")
        self._loop = asyncio.new_event_loop()
        # Bound here, so a bad address fails the agent's start, not a thread.
        try:
            self._server = self._loop.run_until_complete(asyncio.start_server(
                self._serve, host, port, reuse_address=True, limit=MAX_HEAD))
        except OSError as exc:  # in use, or not an address of this host
            self._loop.close()
            self._pool.shutdown(wait=False)
            why = os.strerror(exc.errno) if exc.errno else str(exc)  # asyncio's text repeats the address
            raise ListenError(f"--listen {listen}: cannot listen there: {why}") from None
        bound_host, bound_port = self._server.sockets[0].getsockname()[:2]
        self.address = f"[{bound_host}]:{bound_port}" if ":" in bound_host else f"{bound_host}:{bound_port}"
        self.thread = threading.Thread(target=self._loop.run_forever, name="http", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        async def close() -> None:
            self._server.close()
            for writer in list(self._waiting):
                writer.close()
        if self.thread.is_alive():
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=5)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self.thread.join(timeout=5)
        else:
            self._loop.run_until_complete(close())
        self._loop.close()
        self._pool.shutdown(wait=False)

    # --- connections -----------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._waiting[writer] = None
        if len(self._waiting) > MAX_WAITING:
            next(iter(self._waiting)).close()  # its read ends, and it leaves _waiting
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                    ConnectionError):
                return
            finally:
                self._waiting.pop(writer, None)
            writer.write(_serialize(await self._respond(head)))
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT)
        except (asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    # --- requests ----------------------------------------------------------------
    async def _respond(self, head: bytes) -> Response:
        try:
            method, target, headers = _parse_head(head)
        except ValueError:
            return _text(400, "bad request\n")
        if method != "GET":
            return _text(405, "only GET\n")
        url = urlsplit(target)
        try:
            if url.path in self._checks:
                # Answered on the loop thread: a probe never waits behind a slow scrape.
                return self._check(url.path)
            if url.path == "/metrics" or url.path in self._views:
                if self._scrapes >= MAX_WAITING:
                    return _text(503, "busy\n")
                self._scrapes += 1
                try:
                    if url.path == "/metrics":
                        return await self._loop.run_in_executor(self._pool, self._metrics, url.query,
                                                                headers)
                    return await self._loop.run_in_executor(self._pool, self._view, url.path)
                finally:
                    self._scrapes -= 1
        except Exception as exc:  # a failing check or collector is a 500, never a dead server
            return _text(500, f"{type(exc).__name__}: {exc}\n")
        return _text(404, "not found\n")

    def _check(self, path: str) -> Response:
        ok = bool(self._checks[path]())
        code = 200 if ok else 503
        if path == "/healthz" and self._details is not None:
            body = {"status": "ok" if ok else "not ok", **self._details()}
            return code, [("Content-Type", "application/json")], (json.dumps(body) + "\n").encode()
        return _text(code, "ok\n" if ok else "not ok\n")

    def _view(self, path: str) -> Response:
        body = json.dumps(self._views[path]()) + "\n"
        return 200, [("Content-Type", "application/json")], body.encode()

    def _metrics(self, query: str, headers: dict[str, str]) -> Response:
        """prometheus-client's WSGI app, on a worker thread (collectors read BPF maps)."""
        environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/metrics", "QUERY_STRING": query,
                   "HTTP_ACCEPT": headers.get("accept", ""),
                   "HTTP_ACCEPT_ENCODING": headers.get("accept-encoding", "")}
        started: list = []
        body = b"".join(self._metrics_app(environ, lambda status, hdrs: started.extend([status, hdrs])))
        return int(started[0].split()[0]), list(started[1]), body


def _parse_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    method, target, _version = lines[0].split(" ")
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return method, target, headers


def _text(code: int, body: str) -> Response:
    return code, [("Content-Type", "text/plain; charset=utf-8")], body.encode()


def _serialize(response: Response) -> bytes:
    code, headers, body = response
    lines = [f"HTTP/1.1 {code} {REASONS.get(code, 'Unknown')}"]
    lines += [f"{k}: {v}" for k, v in headers if k.lower() not in ("content-length", "connection")]
    lines += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1") + body
