"""A tiny HTTP server for lab pods: answers every GET with its name.

    python -m meshbpf.lab.whoami --name web-1 --port 8080 [--port 80 ...]

The body is "<name>\\n", so a client can count which backend answered;
GET /client answers "<name> <client address> <port>\\n": the source address
the server saw (so a client can tell whether it was masqueraded) and the
port it was reached on. It listens on
both IPv4 and IPv6 (a dual-stack socket on ::), on every --port given.
"""

from __future__ import annotations

import argparse
import socket
import socketserver
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class DualStackServer(ThreadingHTTPServer):
    address_family = socket.AF_INET6
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 1024

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        # Not HTTPServer.server_bind: it looks up the host's name
        # (socket.getfqdn), which stalls for seconds in a pod whose resolver
        # answers nothing. Nothing in the lab may depend on name resolution.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = host, port

    def server_activate(self) -> None:
        # A non-blocking listener, as event loops have (serve_forever polls
        # it; an accept() that finds nothing is skipped): same-node
        # redirection judges accepted sockets by their listener's mode.
        super().server_activate()
        self.socket.setblocking(False)


def make_server(name: str, port: int) -> DualStackServer:
    body = f"{name}\n".encode()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # A timeout runs the connection non-blocking with poll(), as real
        # servers do; same-node redirection splices only such sockets.
        timeout = 60

        def do_GET(self):  # noqa: N802
            answer = body
            if self.path == "/client":
                peer = self.client_address[0].removeprefix("::ffff:")  # IPv4 on the dual-stack socket
                answer = f"{name} {peer} {self.server.server_address[1]}\n".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args):
            pass

    return DualStackServer(("::", port), Handler)


def serve(name: str, *ports: int) -> None:
    servers = [make_server(name, port) for port in ports]
    for server in servers[1:]:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    servers[0].serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, action="append",
                        help="a port to listen on (again for more; default 8080)")
    args = parser.parse_args()
    serve(args.name, *(args.port or [8080]))


if __name__ == "__main__":
    main()
