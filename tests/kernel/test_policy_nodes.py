"""NetworkPolicy across nodes (issue 10), on the two-node lab: one agent
per node (its own cgroup, bpffs folder, --node-name and --node-netns), the
same config for both, pods talking across nodes over the plain routes.
The server's node enforces its ingress rules, the client's node its egress
rules; a denied flow is really dropped there (that node's agent counts the
deny, and the connection fails)."""

from __future__ import annotations

import contextlib

import pytest

from meshbpf.lab.netlab import Lab
from meshbpf.lab.objects import namespace_object, pod_object
from meshbpf.lab.workloads import AgentProcess, start_whoami, wait_for

from . import k8s
from .conftest import AGENT_READY_TIMEOUT, BPFFS_ROOT, LAB_PREFIX, PIN_PREFIX, _names
from .helpers import metric
from .test_policy_agent import netpol
from .test_policy_udp import PORT, UdpFlow, new_flow_answered, start_echo

pytestmark = pytest.mark.twonode  # host only in CI (tests/conftest.py)

NODES = {1: ["x/a", "x/c"], 2: ["x/b"]}


def node_name(k: int) -> str:
    return f"lab-node{k}"


def world(lab: Lab) -> list[dict]:
    """The cluster's Namespace and Pods, each Pod on its node."""
    pods = [pod_object(lab.pods[p], node_name(k)) for k, names in NODES.items() for p in names]
    return [{"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": ""},
             "items": [namespace_object("x")] + pods}]


@pytest.fixture
def two_nodes(tmp_path):
    """(lab, config, {node: agent}): x/a and x/c on node 1, x/b (whoami
    :8080, UDP echo) on node 2; an agent per node on one config."""
    config = tmp_path / "cluster.yaml"
    with Lab(f"{LAB_PREFIX}{next(_names)}") as lab, contextlib.ExitStack() as stack:
        lab.up(*NODES.values())
        start_whoami(lab, "x/b", 8080)
        start_echo(lab, "x/b")
        k8s.write(config, world(lab))
        agents = {}
        for k in NODES:
            node = lab.node(k)
            agent = AgentProcess(config, node.cgroup, BPFFS_ROOT / f"{PIN_PREFIX}{next(_names)}",
                                 ["--node-name", node_name(k), "--node-netns", node.netns])
            stack.callback(agent.cleanup)
            agents[k] = agent.start(timeout=AGENT_READY_TIMEOUT)
        yield lab, config, agents
        for k, agent in agents.items():
            print(f"--- node {k} agent log ---\n{agent.log()}")


def connects(lab: Lab, pod: str, host: str, port: int = 8080) -> bool:
    url = f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"
    return lab.run(pod, ["curl", "-sS", "-g", "--max-time", "1", url]).returncode == 0


def denies(agent: AgentProcess, direction: str) -> float:
    return metric(agent.get("/metrics")[1], "meshbpf_policy_verdicts_total",
                  f'direction="{direction}",verdict="deny"') or 0.0


def test_ingress_on_the_server_node_and_egress_on_the_client_node(two_nodes):
    lab, config, agents = two_nodes
    b = str(lab.pods["x/b"].ipv4)
    assert connects(lab, "x/a", b) and connects(lab, "x/c", b)

    only_a = netpol("b-from-a", "x", {"pod": "b"},
                    ingress=[{"from": [{"podSelector": {"matchLabels": {"pod": "a"}}}]}])
    k8s.write(config, world(lab) + [only_a])
    wait_for(lambda: not connects(lab, "x/c", b), 20, "node 2 to deny x/c -> x/b")
    assert connects(lab, "x/a", b), "allowed across nodes by x/b's ingress rule"
    assert denies(agents[2], "ingress") > 0 and denies(agents[1], "egress") == 0

    a_silent = netpol("a-no-egress", "x", {"pod": "a"}, egress=[], types=["Egress"])
    k8s.write(config, world(lab) + [only_a, a_silent])
    wait_for(lambda: not connects(lab, "x/a", b), 20, "node 1 to deny x/a's egress")
    before = denies(agents[2], "ingress")
    assert not connects(lab, "x/a", b) and not connects(lab, "x/c", b)
    assert denies(agents[1], "egress") > 0, "x/a's SYN dropped on its own node"
    assert denies(agents[2], "ingress") > before, "x/c's still dropped on x/b's node"


@pytest.mark.bounds
def test_ipv6_and_udp_flows_across_nodes(two_nodes):
    """IPv6 by the same rules; UDP: replies cross back, a flow allowed before
    a deny goes on while new ones are dropped (each node keeps its own
    conntrack entry of the flow)."""
    lab, config, agents = two_nodes
    b4, b6 = str(lab.pods["x/b"].ipv4), str(lab.pods["x/b"].ipv6)
    udp_from_a = netpol("b-udp-from-a", "x", {"pod": "b"}, ingress=[{
        "from": [{"podSelector": {"matchLabels": {"pod": "a"}}}],
        "ports": [{"protocol": "UDP", "port": PORT}, {"protocol": "TCP", "port": 8080}]}])
    b_silent = netpol("b-no-egress", "x", {"pod": "b"}, egress=[], types=["Egress"])
    k8s.write(config, world(lab) + [udp_from_a, b_silent])
    wait_for(lambda: not connects(lab, "x/c", b6), 20, "node 2 to deny x/c -> x/b over IPv6")
    assert connects(lab, "x/a", b6) and connects(lab, "x/a", b4) and not connects(lab, "x/c", b4)

    flows = [UdpFlow(lab, "x/a", b) for b in (b4, b6)]
    try:
        assert all(f.answered() for f in flows), "replies pass x/b's egress (allows nothing): replies"
        assert not new_flow_answered(lab, "x/c", b4)
        k8s.write(config, world(lab) + [netpol("b-udp-from-a", "x", {"pod": "b"}, ingress=[]), b_silent])
        wait_for(lambda: not connects(lab, "x/a", b4), 20, "node 2 to deny x/a -> x/b")
        assert not new_flow_answered(lab, "x/a", b6), "a new UDP flow is denied"
        assert all(f.answered() for f in flows for _ in range(2)), "flows allowed before go on"
    finally:
        for f in flows:
            f.close()
