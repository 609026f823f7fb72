"""A tiny HTTP server for lab pods: answers every GET with its name.

    python -m meshbpf.lab.whoami --name web-1 --port 8080

The body is "<name>\\n", so a client can count which backend answered.
It listens on both IPv4 and IPv6 (a dual-stack socket on ::).
"""

from __future__ import annotations

import argparse
import socket
import socketserver
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


def make_server(name: str, port: int) -> DualStackServer:
    body = f"{name}\n".encode()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # A timeout runs the connection non-blocking with poll(), as real
        # servers do; same-node redirection splices only such sockets.
        timeout = 60

        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    return DualStackServer(("::", port), Handler)


def serve(name: str, port: int) -> None:
    make_server(name, port).serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    serve(args.name, args.port)


if __name__ == "__main__":
    main()
