"""Sidecar capture, inbound from clients on other nodes (issue 11), through
the agent, with real traffic on the several-node lab.

mesh/a on node 1 is meshed (Istio's annotation; port 8081 excluded) and
runs an app on 80 and 8081 (whoami) and tests/kernel/capture_proxy.py as
uid 1337 on 15001/15006, which answers with the port it accepted on, what
getsockopt(SO_ORIGINAL_DST) and getsockname() said. The agent runs for node
1 (its cgroup, --node-name). A client in a pod on node 2 and one in the
router namespace are outside every connect hook: only mbpf_cap_tc_in, on
mesh/a's own interface inside its netns, can bring their connections to the
proxy.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from meshbpf.datapath import libbpf
from meshbpf.datapath.capture import TC_HOOKS
from meshbpf.lab.netlab import ROUTER, Lab
from meshbpf.lab.objects import lab_objects
from meshbpf.lab.workloads import AgentProcess, start_whoami, wait_for, wait_listening

from . import k8s
from .conftest import AGENT_READY_TIMEOUT, BPFFS_ROOT, LAB_PREFIX, PIN_PREFIX, Load, Probe, _names
from .test_monitor_lb import monitors  # noqa: F401 (a fixture)
from .test_policy_cli import _stop, _wait_output

pytestmark = [pytest.mark.twonode, pytest.mark.needs_feature("capture")]

NODE = "lab-node1"
PROXY = Path(__file__).with_name("capture_proxy.py")
MESHED = {"mesh/a": {"traffic.sidecar.istio.io/excludeInboundPorts": "8081"}}


def agent_config(enabled: bool) -> dict:
    return {"apiVersion": "meshbpf.io/v1alpha1", "kind": "AgentConfig",
            "metadata": {"name": "meshbpf"}, "spec": {"capture": {"enabled": enabled, "mesh": "istio"}}}


@pytest.fixture(scope="module")
def lab2():
    """Node 1: mesh/a (app on 80 and 8081, proxy on 15001/15006) and near;
    node 2: remote."""
    with Lab(f"{LAB_PREFIX}{next(_names)}") as lab:
        lab.up(["mesh/a", "near"], ["remote"])
        for port in (80, 8081):
            start_whoami(lab, "mesh/a", port)
        lab.proxy = start_proxy(lab)
        try:
            yield lab
        finally:
            stop_proxy(lab)


def start_proxy(lab: Lab) -> subprocess.Popen:
    proxy = lab.popen("mesh/a", [sys.executable, "-u", str(PROXY), "proxy", "15001", "15006", "1337"],
                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert json.loads(proxy.stdout.readline())["ready"]
    wait_listening(lab, "mesh/a", 15006)
    return proxy


def stop_proxy(lab: Lab) -> None:
    lab.proxy.kill()
    lab.proxy.wait(timeout=30)


@pytest.fixture
def agent(lab2, tmp_path):
    """start(enabled) -> an agent for node 1; uninstalled after the test."""
    bpffs = BPFFS_ROOT / f"{PIN_PREFIX}{next(_names)}"
    config = tmp_path / "world.yaml"
    agents: list[AgentProcess] = []

    def start(enabled: bool = True) -> AgentProcess:
        k8s.write(config, world(lab2, enabled))
        a = AgentProcess(config, lab2.node(1).cgroup, bpffs,
                         ["--node-name", NODE, "--node-netns", lab2.node(1).netns])
        agents.append(a)
        a.start(timeout=AGENT_READY_TIMEOUT)
        return a

    start.config = config
    start.bpffs = bpffs
    yield start
    for a in agents:
        print(f"--- agent log ---\n{a.log()}")
        a.cleanup()


def world(lab: Lab, enabled: bool) -> list[dict]:
    return [lab_objects([lab.pods["mesh/a"]], NODE, meshed=MESHED), agent_config(enabled)]


def get(lab: Lab, pod: str | None, host: str, port: int) -> dict:
    """What a client sees: the proxy's JSON answer, or {"body": the app's}."""
    r = lab.run(pod, [sys.executable, str(PROXY), "get", host, str(port)], timeout=60,
                node=ROUTER if pod is None else 1)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def filters(lab: Lab) -> set[str]:
    """Our programs on mesh/a's eth0, as tc lists them."""
    names = set()
    for hook in ("ingress", "egress"):
        out = subprocess.run(["ip", "netns", "exec", lab.pods["mesh/a"].netns, "tc", "-j", "filter",
                              "show", "dev", "eth0", hook], capture_output=True, text=True).stdout
        names |= {f.get("options", {}).get("bpf_name") for f in json.loads(out or "[]")}
    return names & set(TC_HOOKS)


def our_filter(lab: Lab) -> bool:
    return filters(lab) == set(TC_HOOKS)


def captured(agent: AgentProcess) -> bool:
    view = json.loads(agent.get("/v1/capture")[1])
    return any(p["name"] == "a" and p["state"] == "captured" for p in view["pods"])


def assert_at_proxy(answer: dict, host: str, port: int) -> None:
    assert answer.get("port") == 15006, answer
    assert answer["orig"] == [host, port], answer
    assert answer["sockname"] == [host, port], answer


def test_clients_on_other_nodes_reach_the_proxy_with_the_original_destination(lab2, agent):
    a = agent(True)
    wait_for(lambda: our_filter(lab2), 60, "the capture filters on mesh/a's interface")
    (view,) = json.loads(a.get("/v1/capture")[1])["pods"]
    assert view["inbound_from_other_nodes"] == "on", view
    pod = lab2.pods["mesh/a"]
    remote = lab2.pods["remote"]
    for host in (str(pod.ipv4), str(pod.ipv6)):
        answer = get(lab2, "remote", host, 80)
        assert_at_proxy(answer, host, 80)
        assert answer["peer"][0] == str(remote.ipv4 if ":" not in host else remote.ipv6), answer
    for host in (str(pod.ipv4), str(pod.ipv6)):
        assert_at_proxy(get(lab2, None, host, 80), host, 80)  # the router
        # A same-node client is steered at connect(); the tc programs leave
        # its connection (already on the inbound port) alone.
        assert_at_proxy(get(lab2, "near", host, 80), host, 80)
        # The excluded port reaches the app itself.
        assert get(lab2, "remote", host, 8081) == {"body": "mesh/a"}


@pytest.mark.bounds
@pytest.mark.skipif(not libbpf.ringbuf_supported(), reason="flow events need a ring buffer (5.8+)")
def test_monitor_shows_a_remote_clients_connection_turned_to_the_proxy(lab2, agent, monitors):
    """`meshbpf monitor` as a user types it: a connection from another node,
    turned to the inbound port in tc, is an inbound capture decision with
    the client's address and port (no task runs there: no cgroup), the
    port it asked for and the proxy of mesh/a."""
    a = agent(True)
    wait_for(lambda: our_filter(lab2), 60, "the capture filters on mesh/a's interface")
    pod, remote = lab2.pods["mesh/a"], lab2.pods["remote"]
    mon = monitors(agent.bpffs, a, "-o", "json", "--type", "capture", "--pod", "mesh/a")
    for host in (str(pod.ipv4), str(pod.ipv6)):
        assert_at_proxy(get(lab2, "remote", host, 80), host, 80)
    seen = _wait_output(mon, lambda text: text.count('"tc"') >= 2)
    out, _ = _stop(mon, seen)
    events = [json.loads(line) for line in out.splitlines()]
    tc = [e for e in events if e["hook"] == "tc"]
    assert {(e["verdict"], e["pod"], e["protocol"], e["original"].rsplit(":", 1)[1], e["to"].rsplit(":", 1)[1])
            for e in tc} == {("inbound", "mesh/a", "TCP", "80", "15006")}, events
    clients = {e["peer"].rsplit(":", 1)[0].strip("[]") for e in tc}
    assert clients == {str(remote.ipv4), str(remote.ipv6)}, tc
    assert all(e["cgroup_id"] == 0 and e["client_cgroup"] is None for e in tc), tc

    table = monitors(agent.bpffs, a, "--verdict", "inbound")
    assert_at_proxy(get(lab2, None, str(pod.ipv4), 80), str(pod.ipv4), 80)  # the router
    out, _ = _stop(table, _wait_output(table, lambda text: "INBOUND" in text))
    row = next(r for r in out.splitlines()[1:] if "INBOUND" in r)
    assert row.split()[1:4] == ["INBOUND", "tc", "TCP"], row
    assert f" {pod.ipv4}:80 " in row and row.rstrip().endswith(f"-> {pod.ipv4}:15006 (proxy of mesh/a)"), row


def test_capture_off_restores_direct_delivery(lab2, agent):
    start = agent
    a = start(True)
    wait_for(lambda: our_filter(lab2), 60, "mbpf_cap_tc_in on mesh/a's interface")
    host = str(lab2.pods["mesh/a"].ipv4)
    assert get(lab2, "remote", host, 80)["port"] == 15006
    k8s.write(start.config, world(lab2, False))
    wait_for(lambda: not filters(lab2), 60, "the filters to go with capture off")
    assert get(lab2, "remote", host, 80) == {"body": "mesh/a"}
    assert a.proc.poll() is None


@pytest.mark.bounds
def test_agent_kill_and_restart_drop_no_inbound_connection_and_uninstall_removes_the_filter(
        lab2, agent):
    import time
    start = agent
    first = start(True)
    wait_for(lambda: our_filter(lab2), 60, "mbpf_cap_tc_in on mesh/a's interface")
    host = str(lab2.pods["mesh/a"].ipv4)
    # Paced: back to back, the load and the Python proxy took the whole
    # vCPU of a 5.10 VM and the new agent's compile missed its 180 s.
    load = Load(Probe(lab2), "remote", host, 80, gap=0.05)
    try:
        killed = time.monotonic()
        first.stop(signal.SIGKILL)
        # Down: the filter and the maps keep capturing.
        assert our_filter(lab2)
        assert_at_proxy(get(lab2, "remote", host, 80), host, 80)
        second = start(True)
        wait_for(lambda: captured(second), 60, "the new agent to take the pod over")
        restarted = time.monotonic()
    finally:
        result = load.stop()
    assert result["errors"] == {}, result["errors"]
    assert all(json.loads(body)["port"] == 15006 for body in result["answers"]), result["answers"]
    load.assert_spans(killed, restarted)
    second.stop(signal.SIGKILL)
    from meshbpf.datapath.loader import uninstall
    removed = uninstall(start.bpffs)
    assert {line.split()[2] for line in removed if line.startswith("tc filter mbpf_cap_tc_")} \
        == set(TC_HOOKS), removed
    assert not filters(lab2)
    assert get(lab2, "remote", host, 80) == {"body": "mesh/a"}



@pytest.mark.bounds
def test_proxy_down_refuses_a_remote_client_at_once_and_a_restarted_proxy_is_used_again(lab2, agent):
    agent(True)
    wait_for(lambda: our_filter(lab2), 60, "the capture filters on mesh/a's interface")
    host = str(lab2.pods["mesh/a"].ipv4)
    stop_proxy(lab2)
    try:
        # The reset from the inbound port leaves translated back to port 80.
        assert get(lab2, "remote", host, 80) == {"error": "ECONNREFUSED"}
    finally:
        lab2.proxy = start_proxy(lab2)
    assert_at_proxy(get(lab2, "remote", host, 80), host, 80)


FROM_PORT = """
import socket, sys
host, port, local = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # our TIME_WAIT on the first tuple
s.bind(("0.0.0.0", local))
s.settimeout(5)
s.connect((host, port))
s.sendall(b"GET / HTTP/1.1\\r\\nConnection: close\\r\\n\\r\\n")
data = b""
while chunk := s.recv(4096):
    data += chunk
print(data.partition(b"\\r\\n\\r\\n")[2].decode())
"""


def get_from_port(lab: Lab, host: str, port: int, local_port: int) -> dict:
    """The proxy's answer to a client on node 2 bound to local_port."""
    r = lab.run("remote", [sys.executable, "-c", FROM_PORT, host, str(port), str(local_port)],
                timeout=30)
    assert r.returncode == 0, f"from port {local_port} to {host}:{port}: {r.stderr}"
    return json.loads(r.stdout)


@pytest.mark.bounds
def test_a_client_port_used_again_straight_to_the_inbound_port_is_not_translated(lab2, agent):
    """A translated connection's record outlives it (LRU); a later connection
    on the same tuple straight to the inbound port must not be translated."""
    agent(True)
    wait_for(lambda: our_filter(lab2), 60, "the capture filters on mesh/a's interface")
    host = str(lab2.pods["mesh/a"].ipv4)
    assert_at_proxy(get_from_port(lab2, host, 80, 41234), host, 80)
    answer = get_from_port(lab2, host, 15006, 41234)
    assert answer["port"] == 15006 and answer["sockname"] == [host, 15006], answer
