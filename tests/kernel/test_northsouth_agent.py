"""The agent's north-south wiring, for real (issue 12): an agent on node 1
of the several-node lab, started with --node-netns only (north-south on by
default there: ext0 carries the default route), programs a NodePort from a
YAML config; a client in the router namespace reaches both backends
through node 1's address, then only node 1's under externalTrafficPolicy
Local, where the healthCheckNodePort answers with the local count."""

from __future__ import annotations

import json
import signal
import socket

import pytest

from meshbpf.lab.netlab import ROUTER, Lab
from meshbpf.lab.workloads import AgentProcess, start_whoami, wait_for

from . import k8s
from .conftest import AGENT_READY_TIMEOUT, LAB_PREFIX, _names
from .helpers import metric

pytestmark = pytest.mark.twonode  # host only in CI (tests/conftest.py)

NODE_PORT, HEALTH_PORT = 30080, 31000


@pytest.fixture
def lab2():
    with Lab(f"{LAB_PREFIX}{next(_names)}") as lab:
        lab.up(["web-1"], ["web-2"])
        for pod in ("web-1", "web-2"):
            start_whoami(lab, pod, 8080)
        yield lab


def node_port_service(lab: Lab, pods: tuple[str, ...] = ("web-1", "web-2"), **spec) -> list[dict]:
    svc = k8s.service("web", ["10.96.0.10"], [dict(k8s.port("http", 80, 8080), nodePort=NODE_PORT)])
    svc["spec"].update(type="NodePort", **spec)
    endpoints = [dict(k8s.endpoint(str(lab.pods[p].ipv4)), nodeName=f"node{lab.pods[p].node}")
                 for p in pods]
    return [svc, k8s.endpoint_slice("web-1", "web", endpoints, [k8s.slice_port("http", 8080)])]


def curl(lab: Lab, url: str, local_port: int, node: int | str = ROUTER) -> tuple[int, str]:
    out = lab.run(None, ["curl", "-sS", "--max-time", "5", "--local-port", str(local_port),
                         "-w", "\n%{http_code}", url], node=node)
    if out.returncode != 0:
        return 0, out.stderr.strip()
    body, code = out.stdout.rstrip("\n").rsplit("\n", 1)
    return int(code), body.strip()


def answers(lab: Lab, host: str, first_port: int, node: int | str = ROUTER) -> set[str]:
    """Who answers 16 connections from new source ports (a port used before
    is a flow the datapath's conntrack may still hold to its old backend)."""
    return {curl(lab, f"http://{host}:{NODE_PORT}/", first_port + i, node)[1] for i in range(16)}


def test_an_agent_in_a_node_netns_serves_node_ports_from_outside(lab2, bpffs, tmp_path):
    node = lab2.node(1)
    config = k8s.write(tmp_path / "services.yaml", node_port_service(lab2))
    agent = AgentProcess(config, node.cgroup, bpffs, ["--node-netns", node.netns, "--node-name", "node1",
                                                     "--maglev-table-size", "251"])
    try:
        agent.start(timeout=AGENT_READY_TIMEOUT)
        wait_for(lambda: json.loads(agent.get("/v1/northsouth")[1])["frontends"] == 2, 60,
                 "the NodePort and ClusterIP frontends")
        assert reserved_ports(lab2, 1) == "61000-65535"   # the SNAT range, in node 1's netns
        host = str(node.ext_ipv4)
        ports = iter(range(42000, 60000, 16))
        wait_for(lambda: answers(lab2, host, next(ports)) == {"web-1", "web-2"}, 60,
                 "answers from both nodes' pods through node 1")
        # A host process on node 1 (the kubelet, a hostNetwork pod) to its
        # own node's NodePort: the packet never meets ext0's tc program (it
        # goes over lo), so socket-LB must translate it at connect().
        assert answers(lab2, host, next(ports), node=1) == {"web-1", "web-2"}
        metrics = agent.get("/metrics")[1]
        assert metric(metrics, "meshbpf_northsouth_frontends") == 2
        assert metric(metrics, "meshbpf_northsouth_packets_total", 'result="new"') > 0
        assert metric(metrics, "meshbpf_northsouth_packets_total", 'result="snat"') > 0
        k8s.write(config, node_port_service(lab2, externalTrafficPolicy="Local",
                                            healthCheckNodePort=HEALTH_PORT))
        wait_for(lambda: curl(lab2, f"http://{host}:{HEALTH_PORT}/", 41000)[0] == 200, 60,
                 "the healthCheckNodePort")
        code, body = curl(lab2, f"http://{host}:{HEALTH_PORT}/", 41001)
        assert json.loads(body)["localEndpoints"] == 1
        wait_for(lambda: answers(lab2, host, next(ports)) == {"web-1"}, 60, "only node 1's pod under Local")
        # A new agent over the pinned maps takes them over and writes nothing.
        agent.stop(signal.SIGKILL)
        assert answers(lab2, host, next(ports)) == {"web-1"}     # no agent: still served
        agent.start(timeout=AGENT_READY_TIMEOUT)
        wait_for(lambda: "serving healthCheckNodePort" in agent.log().split("starting:")[-1], 60,
                 "the new agent's first north-south sync")
        restarted = agent.log().split("starting:")[-1]
        assert "the pinned maps hold 2 frontends, 2 tables" in restarted
        assert "map writes)" not in restarted   # "north-south: ... (N map writes)"
        assert "SNAT ports 61000-65535, reserved already" in restarted
        assert reserved_ports(lab2, 1) == "61000-65535"
    finally:
        agent.stop()
        print(agent.log())
        agent.cleanup()


def reserved_ports(lab: Lab, node: int | str) -> str:
    return lab.run(None, ["sysctl", "-n", "net.ipv4.ip_local_reserved_ports"], node=node,
                   check=True).stdout.strip()


def test_snat_ports_come_from_the_flag_and_need_no_reservation(lab2, bpffs, tmp_path):
    """--snat-ports 50000-50999 --no-reserve-snat-ports: the flows to node
    2's pod leave node 1 from ports of that range, and node 1's
    ip_local_reserved_ports is left as it was."""
    from meshbpf.datapath.northsouth import CT_F_SNAT, NorthSouthMaps

    node = lab2.node(1)
    config = k8s.write(tmp_path / "services.yaml", node_port_service(lab2))
    before = reserved_ports(lab2, 1)
    agent = AgentProcess(config, node.cgroup, bpffs, ["--node-netns", node.netns, "--node-name", "node1",
                                                     "--maglev-table-size", "251",
                                                     "--snat-ports", "50000-50999", "--no-reserve-snat-ports"])
    try:
        agent.start(timeout=AGENT_READY_TIMEOUT)
        wait_for(lambda: json.loads(agent.get("/v1/northsouth")[1])["frontends"] == 2, 60,
                 "the NodePort and ClusterIP frontends")
        ports = iter(range(42000, 60000, 16))
        wait_for(lambda: answers(lab2, str(node.ext_ipv4), next(ports)) == {"web-1", "web-2"}, 60,
                 "answers from both nodes' pods through node 1")
        maps = NorthSouthMaps(bpffs)
        try:
            snat = [socket.ntohs(v.sport) for k, v in maps.conntrack()
                    if k.dir == 1 and v.flags & CT_F_SNAT]
        finally:
            maps.close()
        assert snat and all(50000 <= p <= 50999 for p in snat), snat
        assert reserved_ports(lab2, 1) == before
        assert "SNAT ports 50000-50999, not reserved (--no-reserve-snat-ports)" in agent.log()
    finally:
        agent.stop()
        agent.cleanup()


def test_eight_snat_ports_serve_connections_back_to_back_when_clients_close_first(lab2, bpffs, tmp_path):
    """--snat-ports 50000-50007 (the fewest the agent takes): eight ports
    for every flow to node 2's pod. curl closes first (HTTP/1.1, the body's
    length known), so the backend keeps no TIME_WAIT and a closed flow's
    port serves a new flow once curl's ACK of the backend's FIN went by.
    24 connections back to back from new client ports: all answered, none
    dropped for want of a port (drop_no_snat: 3 with a 1 s hold after the
    close; with the old 60 s hold after any FIN, all past the eighth)."""
    node = lab2.node(1)
    config = k8s.write(tmp_path / "services.yaml", node_port_service(lab2, pods=("web-2",)))
    agent = AgentProcess(config, node.cgroup, bpffs, ["--node-netns", node.netns, "--node-name", "node1",
                                                     "--maglev-table-size", "251",
                                                     "--snat-ports", "50000-50007", "--no-reserve-snat-ports"])
    url = f"http://{node.ext_ipv4}:{NODE_PORT}/"
    try:
        agent.start(timeout=AGENT_READY_TIMEOUT)
        wait_for(lambda: json.loads(agent.get("/v1/northsouth")[1])["frontends"] == 2, 60,
                 "the NodePort and ClusterIP frontends")
        ports = iter(range(43000, 43200))
        wait_for(lambda: curl(lab2, url, next(ports))[1] == "web-2", 60, "node 2's pod through node 1")
        got = [curl(lab2, url, next(ports)) for _ in range(24)]
        assert got == [(200, "web-2")] * 24
        metrics = agent.get("/metrics")[1]
        assert metric(metrics, "meshbpf_northsouth_packets_total", 'result="snat"') >= 24
        assert metric(metrics, "meshbpf_northsouth_packets_total", 'result="drop_no_snat"') in (None, 0)
    finally:
        agent.stop()
        agent.cleanup()
