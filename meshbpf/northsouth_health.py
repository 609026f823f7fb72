"""healthCheckNodePort servers (issue 12), as kube-proxy serves them.

A Service with externalTrafficPolicy: Local and a healthCheckNodePort tells
an external load balancer which nodes have endpoints of it: every node
answers HTTP on that port, 200 with the count of its local ready endpoints
when there is one, 503 otherwise (pkg/proxy/healthcheck/service_health.go:
the same JSON body, Content-Type and X-Load-Balancing-Endpoint-Weight).

One server per port, each a thread, listening in the node's network
namespace (the socket is made there; the thread serving it needs not be).
A port that cannot be bound (in use) is logged once and tried again at the
next update; it never stops the others.
"""

from __future__ import annotations

import errno
import json
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import NamedTuple

from .datapath.netns import run_in_netns

log = logging.getLogger("meshbpf.agent")


class HealthCheck(NamedTuple):
    """What one healthCheckNodePort answers for."""

    namespace: str
    name: str
    local_endpoints: int


def body(check: HealthCheck) -> bytes:
    """kube-proxy's body, byte for byte (Go's dedented, tab-indented JSON)."""
    return json.dumps({"service": {"namespace": check.namespace, "name": check.name},
                       "localEndpoints": check.local_endpoints,
                       "serviceProxyHealthy": True}, indent="\t").encode()


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        check = self.server.check
        data = body(check)
        self.send_response(200 if check.local_endpoints > 0 else 503)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("X-Load-Balancing-Endpoint-Weight", str(check.local_endpoints))
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, fmt: str, *args) -> None:  # load balancers probe every few seconds
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, sock: socket.socket, check: HealthCheck):
        super().__init__(sock.getsockname()[:2], _Handler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.check = check


class HealthCheckServers:
    """The healthCheckNodePort servers of this node; update() with the
    wanted ports, stop() at exit. host "" listens on every address of the
    namespace (both families where IPv6 is up)."""

    def __init__(self, netns: str | None = None, host: str = ""):
        self.netns = netns
        self.host = host
        self.servers: dict[int, _Server] = {}
        self.failed: dict[int, str] = {}    # port -> why it is not served (logged once)

    def update(self, wanted: dict[int, HealthCheck]) -> None:
        for port in list(self.servers):
            if port not in wanted:
                self._close(port)
        for port, check in wanted.items():
            server = self.servers.get(port)
            if server is not None:
                server.check = check          # read by the handler threads: one assignment
            else:
                self._open(port, check)
        for port in list(self.failed):
            if port not in wanted:
                del self.failed[port]

    def ports(self) -> list[int]:
        return sorted(self.servers)

    def stop(self) -> None:
        for port in list(self.servers):
            self._close(port)

    def _open(self, port: int, check: HealthCheck) -> None:
        try:
            sock = self._listen(port)
        except OSError as exc:
            why = exc.strerror or str(exc)
            if self.failed.get(port) != why:
                log.error("healthCheckNodePort %d of Service %s/%s not served: %s",
                          port, check.namespace, check.name, why)
            self.failed[port] = why
            return
        self.failed.pop(port, None)
        server = self.servers[port] = _Server(sock, check)
        threading.Thread(target=server.serve_forever, name=f"healthcheck-{port}", daemon=True).start()
        log.info("serving healthCheckNodePort %d for Service %s/%s", port, check.namespace, check.name)

    def _close(self, port: int) -> None:
        server = self.servers.pop(port)
        server.shutdown()
        server.server_close()

    def _listen(self, port: int) -> socket.socket:
        return run_in_netns(self.netns, lambda: self._bound_here(port))  # the socket stays there

    def _bound_here(self, port: int) -> socket.socket:
        if self.host and ":" not in self.host:
            return _bound(socket.AF_INET, self.host, port)
        try:
            return _bound(socket.AF_INET6, self.host or "::", port, dual=not self.host)
        except OSError as exc:
            if self.host or exc.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):  # no IPv6
                raise
            return _bound(socket.AF_INET, "0.0.0.0", port)


def _bound(family: int, host: str, port: int, dual: bool = False) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if dual:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
        sock.listen(64)
    except OSError:
        sock.close()
        raise
    return sock
