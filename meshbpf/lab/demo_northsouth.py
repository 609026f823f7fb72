"""The demo's north-south step (issue 12): curl from outside the nodes to a
NodePort, answered by a pod on the other node.

A 2-node lab of its own (the main demo's lab is one node), an agent per node
as a user runs one (`--node-name`, `--node-netns`), a NodePort Service whose
only endpoint is on node2; the router curls node1's NodePort (node1 forwards
to node2 and masquerades: the pod sees node1's address) and node2's (a local
endpoint: the pod sees the router's own address). Shown only when this build
has north-south load balancing (meshbpf.datapath.northsouth).
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

import click

from ..sources.yaml_load import dump_all
from .netlab import ROUTER, Lab, LabError
from .workloads import AgentProcess, start_whoami, wait_for

NODE_PORT, CLUSTER_IP = 30080, "10.96.0.80"


def available() -> bool:
    return importlib.util.find_spec("meshbpf.datapath.northsouth") is not None


def _objects(backend_ip: str) -> list[dict]:
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web-np", "namespace": "default"},
               "spec": {"type": "NodePort", "clusterIP": CLUSTER_IP, "clusterIPs": [CLUSTER_IP],
                        "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080,
                                   "nodePort": NODE_PORT}]}}
    endpoints = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                 "metadata": {"name": "web-np-1", "namespace": "default",
                              "labels": {"kubernetes.io/service-name": "web-np"}},
                 "addressType": "IPv4",
                 "endpoints": [{"addresses": [backend_ip], "conditions": {"ready": True}, "nodeName": "node2"}],
                 "ports": [{"name": "http", "protocol": "TCP", "port": 8080}]}
    return [service, endpoints]


def _curl(lab: Lab, url: str) -> str:
    r = lab.run(None, ["curl", "-sS", "--max-time", "2", url], node=ROUTER)
    if r.returncode:
        return f"error: {r.stderr.strip()}"
    name, seen, _ = r.stdout.split()
    return f"{name}, saw {seen}"


def run_step(name: str, requests: int, tally) -> None:
    """The step; `tally(title, answers)` prints as the rest of the demo does."""
    if not available():
        click.echo("\nnorth-south (issue 12): not in this build; no NodePort step")
        return
    lab_name = f"{name}-ns"
    if Lab(lab_name).exists():
        raise LabError(f"lab {lab_name!r} already exists; `meshbpf lab down {lab_name}` first")
    with tempfile.TemporaryDirectory(prefix="meshbpf-demo-ns-") as tmp, Lab(lab_name) as lab:
        lab.up(["web-1"], ["web-2"])
        for pod in ("web-1", "web-2"):
            start_whoami(lab, pod, 8080)
        config = Path(tmp) / "nodeport.yaml"
        config.write_text(dump_all(_objects(str(lab.pods["web-2"].ipv4))))
        click.echo(f"\nnorth-south (issue 12): lab {lab_name}, 2 nodes and a router, an agent per node; "
                   f"Service web-np: NodePort {NODE_PORT}, its one endpoint web-2 on node2")
        agents = [AgentProcess(config, node.cgroup, Path(f"/sys/fs/bpf/meshbpf-lab-{lab_name}-{node.name}"),
                               ["--node-name", node.name, "--node-netns", node.netns]) for node in lab.nodes]
        try:
            for agent in agents:
                agent.start(timeout=180)
            for node in lab.nodes:
                url = f"http://{node.ext_ipv4}:{NODE_PORT}/client"
                wait_for(lambda: not _curl(lab, url).startswith("error"), 30, f"the NodePort on {node.name}")
                where = "forwarded to node2, masqueraded" if node.index == 1 else "a local endpoint"
                tally(f"curl {url} from the router ({node.name}'s NodePort: {where})",
                      [_curl(lab, url) for _ in range(requests)])
        except Exception:
            for agent in agents:
                click.echo(f"agent log:\n{agent.log()}", err=True)
            raise
        finally:
            for agent in agents:
                agent.cleanup()
