"""North-south's node side in the several-node lab (issue 12): the node
context read with pyroute2 in a node's netns, and the healthCheckNodePort
servers listening there, asked from the router as a load balancer would.

Netlink reads and sockets: nothing here can differ by kernel version, so
the VMs skip it (userspace)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from meshbpf.lab.netlab import ROUTER, Lab
from meshbpf.northsouth_health import HealthCheck, HealthCheckServers
from meshbpf.sync.northsouth import default_route_devices, node_context

from .conftest import LAB_PREFIX, _names

pytestmark = pytest.mark.userspace

PORT, BUSY = 31000, 31001


@pytest.fixture(scope="module")
def lab2():
    with Lab(f"{LAB_PREFIX}{next(_names)}") as lab:
        lab.up(["client"], ["web-2"])
        yield lab


def ask(lab: Lab, host: str, port: int) -> tuple[int, dict]:
    url = f"http://[{host}]:{port}/healthz" if ":" in host else f"http://{host}:{port}/healthz"
    out = lab.run(None, ["curl", "-sS", "-g", "--max-time", "10", "-w", "\n%{http_code}", url], node=ROUTER)
    assert out.returncode == 0, out.stderr
    body, code = out.stdout.rsplit("\n", 1)
    return int(code), json.loads(body)


def test_node_context_is_read_in_the_nodes_netns(lab2):
    node = lab2.node(1)
    assert default_route_devices(node.netns) == ["ext0"]
    ctx = node_context("node1", ["ext0"], node.netns)
    assert ctx.addresses == (node.ext_ipv4, node.ext_ipv6)
    assert (ctx.snat4, ctx.snat6) == (node.ext_ipv4, node.ext_ipv6)
    with pytest.raises(ValueError, match="no device 'eth9' in netns"):
        node_context("node1", ["eth9"], node.netns)


def test_health_check_ports_answer_on_the_nodes_addresses(lab2, caplog):
    node = lab2.node(1)
    # Something else holds BUSY in the node's netns: logged, the others go on.
    holder = lab2.popen(None, [sys.executable, "-c",
                               "import socket,sys,time; s=socket.socket(socket.AF_INET6); "
                               "s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0); "
                               f"s.bind(('::', {BUSY})); s.listen(); print('up', flush=True); "
                               "sys.stdin.read()"],
                        node=1, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    servers = HealthCheckServers(node.netns)
    try:
        assert holder.stdout.readline().strip() == "up"
        with caplog.at_level(logging.ERROR, "meshbpf.agent"):
            servers.update({PORT: HealthCheck("default", "web", 2), BUSY: HealthCheck("default", "busy", 1)})
        assert servers.ports() == [PORT]
        assert any(f"healthCheckNodePort {BUSY}" in r.getMessage() for r in caplog.records)
        for host in (str(node.ext_ipv4), str(node.ext_ipv6)):
            code, body = ask(lab2, host, PORT)
            assert code == 200 and body == {"service": {"namespace": "default", "name": "web"},
                                            "localEndpoints": 2, "serviceProxyHealthy": True}
        servers.update({PORT: HealthCheck("default", "web", 0)})
        code, body = ask(lab2, str(node.ext_ipv4), PORT)
        assert code == 503 and body["localEndpoints"] == 0
        # Not in the agent's own netns: nothing listens on PORT here.
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", PORT))
    finally:
        servers.stop()
        holder.communicate("", timeout=30)
