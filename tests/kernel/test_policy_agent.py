"""NetworkPolicy through the agent: lab pods and policies in the config,
enforced on the pods' interfaces with real traffic."""

from __future__ import annotations

import pytest

from meshbpf.lab.objects import lab_objects
from meshbpf.lab.workloads import start_whoami, wait_for

from . import k8s
from .conftest import web_service

pytestmark = pytest.mark.bounds  # the matrix runs it on 5.10 and 6.12 (tests/vm/matrix)

NODE = "lab-node"


def netpol(name: str, namespace: str, selector: dict, ingress=None, egress=None, types=None) -> dict:
    spec: dict = {"podSelector": {"matchLabels": selector} if selector else {}}
    if ingress is not None:
        spec["ingress"] = ingress
    if egress is not None:
        spec["egress"] = egress
    if types is not None:
        spec["policyTypes"] = types
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def curl(lab, pod: str, url: str) -> bool:
    return lab.run(pod, ["curl", "-sS", "--max-time", "1", url]).returncode == 0


def test_default_deny_then_allow_through_the_agent(lab, start_agent, config):
    for p in ("x/a", "x/b", "y/a"):
        lab.add_pod(p)
    start_whoami(lab, "x/b", 8080)
    pods = [lab.pods[p] for p in ("x/a", "x/b", "y/a")]
    world = [lab_objects(pods, NODE)]
    b = f"http://{lab.pods['x/b'].ipv4}:8080/"
    agent = start_agent(world + web_service(lab), "--node-name", NODE, "--node-netns", lab.node_ns)
    assert curl(lab, "x/a", b) and curl(lab, "y/a", b)

    deny = netpol("deny-b", "x", {"pod": "b"}, ingress=[])
    k8s.write(config, world + web_service(lab) + [deny])
    wait_for(lambda: not curl(lab, "x/a", b), 20, "the default deny to take effect")
    assert not curl(lab, "y/a", b)

    allow = netpol("allow-a", "x", {"pod": "b"}, ingress=[{"from": [{"podSelector": {"matchLabels": {"pod": "a"}}}]}])
    k8s.write(config, world + web_service(lab) + [deny, allow])
    wait_for(lambda: curl(lab, "x/a", b), 20, "the allow to take effect")
    assert not curl(lab, "y/a", b), "y/a is not in x's podSelector peers"
    assert agent.proc.poll() is None
