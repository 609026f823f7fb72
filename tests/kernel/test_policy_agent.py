"""NetworkPolicy through the agent: lab pods and policies in the config,
enforced on the pods' interfaces with real traffic."""

from __future__ import annotations

import json

import pytest

from meshbpf.lab.objects import lab_objects
from meshbpf.lab.workloads import start_whoami, wait_for

from . import k8s
from .conftest import web_service
from .netpol_lab import pw  # tests/unit/policy_world.py: the e2e suite's builders

pytestmark = pytest.mark.bounds  # the host only in CI (tests/conftest.py)

NODE = "lab-node"


def netpol(name: str, namespace: str, selector: dict, ingress=None, egress=None, types=None) -> dict:
    """A NetworkPolicy selecting pods by matchLabels; policyTypes left to
    upstream's defaults unless given."""
    policy = pw.netpol(name, namespace, {"matchLabels": selector} if selector else {},
                       ingress=ingress, egress=egress, types=types or [])
    if types is None:
        del policy["spec"]["policyTypes"]
    return policy


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

    deny = pw.netpol("deny-b", "x", {"matchLabels": {"pod": "b"}}, ingress=[])
    k8s.write(config, world + web_service(lab) + [deny])
    wait_for(lambda: not curl(lab, "x/a", b), 20, "the default deny to take effect")
    assert not curl(lab, "y/a", b)

    allow = pw.netpol("allow-a", "x", {"matchLabels": {"pod": "b"}}, ingress=[{"from": [{"podSelector": {"matchLabels": {"pod": "a"}}}]}])
    k8s.write(config, world + web_service(lab) + [deny, allow])
    wait_for(lambda: curl(lab, "x/a", b), 20, "the allow to take effect")
    assert not curl(lab, "y/a", b), "y/a is not in x's podSelector peers"
    status, body = agent.get("/v1/endpoints")
    states = {(e["namespace"], e["name"]): e["state"] for e in json.loads(body)["endpoints"]}
    assert states == dict.fromkeys([("x", "a"), ("x", "b"), ("y", "a")], "enforced"), states
    assert agent.proc.poll() is None
