"""Sidecar capture through the agent: lab pods marked meshed in the config
(Istio's injection annotation), AgentConfig's capture settings, real
traffic to a small proxy of our own (tests/kernel/capture_proxy.py, uid
1337 on 15001/15006, as Istio's), `meshbpf capture list` as a user types it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from meshbpf.lab.objects import lab_objects
from meshbpf.lab.workloads import wait_for, wait_listening

from . import k8s
from .conftest import web_service
from .helpers import metric

pytestmark = pytest.mark.needs_feature("capture")

NODE = "lab-node"
PROXY = Path(__file__).with_name("capture_proxy.py")
WEBS = {"web-1", "web-2", "web-3", "web-4"}
BAD = {"traffic.sidecar.istio.io/excludeInboundPorts": "eighty"}


def agent_config(enabled: bool) -> dict:
    return {"apiVersion": "meshbpf.io/v1alpha1", "kind": "AgentConfig",
            "metadata": {"name": "meshbpf"}, "spec": {"capture": {"enabled": enabled, "mesh": "istio"}}}


def start_proxy(lab, pod: str) -> subprocess.Popen:
    proc = lab.popen(pod, [sys.executable, "-u", str(PROXY), "proxy", "15001", "15006", "1337",
                           "forward"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert json.loads(proc.stdout.readline())["ready"]
    wait_listening(lab, pod, 15006)
    return proc


def get(lab, pod: str, host: str, port: int) -> dict:
    """What an app in pod sees: the proxy's JSON answer, or {"body": a plain server's answer}."""
    r = lab.run(pod, [sys.executable, str(PROXY), "get", host, str(port)], timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def capture_states(agent) -> dict[str, str]:
    view = json.loads(agent.get("/v1/capture")[1])
    return {f"{p['namespace']}/{p['name']}": p["state"] for p in view["pods"]}


def test_a_meshed_pod_is_captured_through_the_agent_and_turning_capture_off_restores_it(
        lab, start_agent, config, bpffs):
    for name in ("mesh/a", "mesh/bad"):
        lab.add_pod(name)
    proxies = [start_proxy(lab, "mesh/a"), start_proxy(lab, "mesh/bad")]
    try:
        pods = [lab.pods[p] for p in ("mesh/a", "mesh/bad", "client")]
        world = [lab_objects(pods, NODE, meshed={"mesh/a": {}, "mesh/bad": BAD})] + web_service(lab)
        agent = start_agent(world + [agent_config(True)], "--node-name", NODE,
                            "--node-netns", lab.node_ns)
        wait_for(lambda: capture_states(agent).get("mesh/a") == "captured", 30,
                 "mesh/a to be captured")

        # The app's connect to the Service reaches its proxy, which learns
        # the Service address and whose own connect is load-balanced.
        answer = get(lab, "mesh/a", "10.96.0.10", 80)
        assert answer.get("port") == 15001 and answer["orig"] == ["10.96.0.10", 80], answer
        assert answer["upstream"] in WEBS, answer
        # A same-node client's connect to the pod lands on the inbound port.
        inbound = get(lab, "client", str(lab.pods["mesh/a"].ipv4), 8080)
        assert inbound.get("port") == 15006, inbound
        assert inbound["orig"] == [str(lab.pods["mesh/a"].ipv4), 8080]

        # The pod with a malformed annotation: one problem naming it, not captured.
        states = capture_states(agent)
        assert states["mesh/bad"].startswith("not captured: metadata.annotations["
                                             "traffic.sidecar.istio.io/excludeInboundPorts]"), states
        assert "(Pod mesh/bad): metadata.annotations[traffic.sidecar.istio.io/excludeInboundPorts]: " \
               "'eighty' is not a port number or range; the pod is left unmeshed" in agent.log()
        plain = get(lab, "mesh/bad", "10.96.0.10", 80)
        assert plain.get("body") in WEBS, plain

        # `meshbpf capture list` as a user types it.
        cli = subprocess.run([sys.executable, "-m", "meshbpf", "capture", "list",
                              "--agent", f"127.0.0.1:{agent.port}"],
                             capture_output=True, text=True, timeout=60)
        assert cli.returncode == 0, cli.stderr
        lines = cli.stdout.splitlines()
        assert lines[0] == "capture: on, mesh istio, DNS off"
        row = next(line for line in lines if line.startswith("mesh/a "))
        assert row.split()[1:7] == ["captured", "istio", "1337", "15001", "15006", "-"], row
        assert any(line.startswith("mesh/bad ") and "not captured" in line for line in lines)

        # The agent not answering: what the pinned maps alone say.
        pinned = subprocess.run([sys.executable, "-m", "meshbpf", "capture", "list", "-o", "json",
                                 "--agent", "127.0.0.1:1", "--bpffs", str(bpffs)],
                                capture_output=True, text=True, timeout=60)
        assert pinned.returncode == 0 and "agent not reachable" in pinned.stderr, pinned.stderr
        (held,) = json.loads(pinned.stdout)["pods"]
        assert held["addresses"] == [str(lab.pods["mesh/a"].ipv4), str(lab.pods["mesh/a"].ipv6)]
        assert held["cgroup_id"] == lab.pods["mesh/a"].cgroup.stat().st_ino

        metrics = agent.get("/metrics")[1]
        assert metric(metrics, "meshbpf_capture_connections_total", 'direction="outbound"') >= 1
        assert metric(metrics, "meshbpf_capture_connections_total", 'direction="inbound"') >= 1
        assert metric(metrics, "meshbpf_capture_pods") == 1

        # Capture off in AgentConfig: plain traffic again, nothing meshed.
        k8s.write(config, world + [agent_config(False)])
        wait_for(lambda: capture_states(agent) == {}, 30, "capture to be turned off")
        plain = get(lab, "mesh/a", "10.96.0.10", 80)
        assert plain.get("body") in WEBS, plain
        assert agent.proc.poll() is None
    finally:
        for proc in proxies:
            proc.kill()
            proc.wait(timeout=30)
