"""NetworkPolicy edits that keep a pod's isolation are written in place, in
the generation in force (reconcile/policy.py, _write_in_place): with real
traffic, a flow allowed before and after is never refused while the edits
land, and a flow denied before and after never passes."""

from __future__ import annotations

import json

import pytest

from meshbpf.datapath.policy import PolicyMaps
from meshbpf.lab.objects import lab_objects
from meshbpf.lab.workloads import start_whoami, wait_for

from . import k8s
from .conftest import Load, web_service
from .netpol_lab import pw
from .test_policy_agent import NODE, curl

pytestmark = pytest.mark.bounds  # the host only in CI (tests/conftest.py)


def from_pod(name: str, selected: str) -> dict:
    return pw.netpol(name, "x", {"matchLabels": {"pod": "b"}},
                  ingress=[{"from": [{"podSelector": {"matchLabels": {"pod": selected}}}],
                            "ports": [{"protocol": "TCP", "port": 8080}]}])


def test_edits_in_place_never_cut_an_allowed_flow_nor_pass_a_denied_one(lab, start_agent, config, probe,
                                                                         bpffs):
    for p in ("x/a", "x/b", "x/c", "y/a"):
        lab.add_pod(p)
    start_whoami(lab, "x/b", 8080)
    world = [lab_objects([lab.pods[p] for p in ("x/a", "x/b", "x/c", "y/a")], NODE)] + web_service(lab)
    host = str(lab.pods["x/b"].ipv4)
    url = f"http://{host}:8080/"
    keep = from_pod("allow-c", "c")   # x/c -> x/b: allowed throughout
    start_agent(world + [keep, from_pod("toggle", "a")], "--node-name", NODE, "--node-netns", lab.node_ns)
    wait_for(lambda: curl(lab, "x/a", url), 20, "x/a to be allowed")
    with PolicyMaps(bpffs) as maps:
        before = maps.read().endpoints

    allowed = Load(probe, "x/c", host, 8080)
    denied = probe.popen("y/a", "loop", host, 8080, 12)   # y/a -> x/b: denied throughout
    generations = []
    try:
        for i in range(4):
            who = "nobody" if i % 2 == 0 else "a"
            k8s.write(config, world + [keep, from_pod("toggle", who)])
            wait_for(lambda: curl(lab, "x/a", url) == (who == "a"), 20, f"x/a allowed: {who == 'a'}")
            with PolicyMaps(bpffs) as maps:
                generations.append(maps.read().endpoints)
    finally:
        result = allowed.stop()
        out, _ = denied.communicate(timeout=60)
    assert not result["errors"], f"x/c refused while the edits landed: {result['errors']}"
    assert sum(result["answers"].values()) > 0
    assert not json.loads(out.strip().splitlines()[-1])["answers"], "y/a got through mid-edit"
    assert all(g == before for g in generations), "an edit flipped a generation instead of writing in place"
