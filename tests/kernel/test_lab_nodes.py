"""The several-node lab (issue 12): two nodes, each a netns with its own
bridge, pod CIDR and cgroup; pods reach each other across nodes by plain
routes; a router namespace reaches every pod and spreads flows to a
service range over both nodes (ECMP); `lab down` leaves nothing.

Plain routing and namespaces: nothing here can differ by kernel version,
so the VMs skip it (userspace)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from meshbpf.cli import cli
from meshbpf.lab.netlab import CGROUP_PREFIX, NETNS_PREFIX, ROUTER, Lab, kubelet_cgroup
from meshbpf.lab.workloads import start_whoami, wait_for

from .conftest import LAB_PREFIX, _names

pytestmark = pytest.mark.userspace

VIP4, VIP6 = "10.240.0.7", "fd00:240::7"  # in the router's ECMP ranges
NODE_PORT = 8081


def curl(lab: Lab, pod: str | None, host: str, port: int = 8080, node: int | str = 1,
         local_port: int | None = None) -> str:
    url = f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"
    argv = ["curl", "-sS", "-g", "--max-time", "5", url]
    if local_port:
        argv[1:1] = ["--local-port", str(local_port)]
    out = lab.run(pod, argv, node=node)
    assert out.returncode == 0, f"{pod or node} -> {url}: {out.stderr}"
    return out.stdout.strip()


def cgroup_of(lab: Lab, pod: str | None, node: int | str = 1) -> str:
    out = lab.run(pod, ["cat", "/proc/self/cgroup"], node=node, check=True).stdout
    return next(line.split(":", 2)[2] for line in out.splitlines() if line.startswith("0::"))


@pytest.fixture(scope="module")
def lab2():
    with Lab(f"{LAB_PREFIX}{next(_names)}") as lab:
        lab.up(["client", "web-1"], ["x/b", "web-2"])
        for pod in ("web-1", "web-2", "x/b"):
            start_whoami(lab, pod, 8080)
        yield lab


def test_each_node_has_its_pod_cidr_and_cgroup(lab2):
    assert [p.node for p in lab2.pods.values()] == [1, 1, 2, 2]
    assert str(lab2.pods["client"].ipv4) == "10.244.0.2" and str(lab2.pods["web-2"].ipv6) == "fd00:244:0:1::3"
    lab_cg = "/" + lab2.cgroup.name
    assert cgroup_of(lab2, "client") == f"{lab_cg}/node1"
    assert cgroup_of(lab2, "web-2") == f"{lab_cg}/node2"
    xb = lab2.pods["x/b"]
    assert xb.cgroup == kubelet_cgroup(lab2.cgroup / "node2", xb.uid)
    assert cgroup_of(lab2, "x/b") == f"{lab_cg}/node2/kubepods/besteffort/pod{xb.uid}"
    assert cgroup_of(lab2, None, node=2) == f"{lab_cg}/node2"
    again = Lab.attach(lab2.name)
    assert again.node_count == 2 and again.pods == lab2.pods


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_pods_on_different_nodes_talk_tcp_by_pod_ip(lab2, family):
    for src, dst in (("client", "web-2"), ("client", "x/b"), ("x/b", "web-1")):
        assert lab2.pods[src].node != lab2.pods[dst].node
        assert curl(lab2, src, str(getattr(lab2.pods[dst], family))) == dst


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_the_router_reaches_pods_on_both_nodes(lab2, family):
    for dst in ("web-1", "web-2", "x/b"):
        assert curl(lab2, None, str(getattr(lab2.pods[dst], family)), node=ROUTER) == dst


def test_ecmp_spreads_flows_to_a_service_address_over_both_nodes(lab2):
    """Each node holds the address and a listener that names the node; the
    router's flows, from different source ports, must land on both."""
    for node in lab2.nodes:
        for vip, plen in ((VIP4, 32), (VIP6, 128)):
            lab2.run(None, ["ip", "addr", "add", f"{vip}/{plen}", "dev", "lo"], node=node.index, check=True)
        lab2.popen(None, [sys.executable, "-m", "meshbpf.lab.whoami", "--name", node.name,
                          "--port", str(NODE_PORT)], node=node.index,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: f":{NODE_PORT} " in lab2.run(None, ["ss", "-ltnH"], node=node.index).stdout,
                 30, f"port {NODE_PORT} on {node.name}")
    for vip, base in ((VIP4, 41000), (VIP6, 42000)):
        landed = [curl(lab2, None, vip, NODE_PORT, node=ROUTER, local_port=base + i) for i in range(24)]
        # 24 flows on one node by chance: 2 in 2^24.
        assert set(landed) == {"node1", "node2"}, (vip, landed)


def test_lab_up_and_down_from_the_cli_leave_nothing():
    name = f"{LAB_PREFIX}{next(_names)}"
    runner = CliRunner()
    try:
        made = runner.invoke(cli, ["lab", "up", name, "--nodes", "2", "--pods", "a,x/c", "--pods", "b"])
        assert made.exit_code == 0, made.output
        lines = made.output.splitlines()
        assert lines[0].split() == ["a", "10.244.0.2", "fd00:244::2", "node1"]
        assert lines[2].split() == ["b", "10.244.1.2", "fd00:244:0:1::2", "node2"]
        assert any(line.startswith(f"router: {NETNS_PREFIX}{name}-router") for line in lines)
        lab = Lab.attach(name)
        assert lab.node_count == 2 and {p: lab.pods[p].node for p in lab.pods} == {"a": 1, "x/c": 1, "b": 2}
        for where in ("router", "node2"):
            ran = runner.invoke(cli, ["lab", "exec", name, where, "--", "ping", "-c1", "-W5", "10.244.1.2"])
            assert ran.exit_code == 0, (where, ran.output)
        lab.popen(None, ["sleep", "600"], node=2)   # down must kill these
        lab.popen(None, ["sleep", "600"], node=ROUTER)
    finally:
        gone = runner.invoke(cli, ["lab", "down", name])
    assert gone.exit_code == 0, gone.output
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert not [ns for ns in listed.split() if ns.startswith(f"{NETNS_PREFIX}{name}-")]
    assert not (lab.cgroup.parent / f"{CGROUP_PREFIX}{name}").exists()
    assert name not in runner.invoke(cli, ["lab", "list"]).output.split()


@pytest.mark.parametrize("args, message", [
    (["--nodes", "2", "--pods", "a", "--pods", "b", "--pods", "c"], "3 pod lists for 2 node(s)"),
    (["--nodes", "2", "--pods", "a,router"], "pod name 'router': taken by the lab's own"),
    (["--nodes", "2", "--pods", "a", "--pods", "node2"], "pod name 'node2': taken by the lab's own"),
    (["--nodes", "9"], "--nodes"),
])
def test_bad_lab_up_is_refused_and_leaves_nothing(args, message):
    name = f"{LAB_PREFIX}{next(_names)}"
    result = CliRunner().invoke(cli, ["lab", "up", name, *args])
    assert result.exit_code != 0
    assert message in result.output, result.output
    assert not Lab(name).exists() and not Lab(name).cgroup.exists()
