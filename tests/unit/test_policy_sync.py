"""PolicySync (meshbpf/sync/policy.py) with fakes for the maps, the tc
attach and the pod lookup: no root, no BPF."""

from __future__ import annotations

from pathlib import Path

import pytest

import meshbpf.sync.policy as sync_mod
from meshbpf.datapath.policy import PolicyDatapath
from meshbpf.metrics import AgentMetrics
from meshbpf.model import DesiredState
from meshbpf.reconcile.policy import plan_policy
from meshbpf.sources.kube_objects import SourceObject
from meshbpf.sources.kube_policy import read_policy_objects
from meshbpf.sync.policy import PolicySync

from policy_world import ALL, NODE, labels, netpol, world


class FakeMaps:
    """The policy maps as a PolicyState; apply() fails after `fail_after` entries."""

    def __init__(self):
        from meshbpf.reconcile.policy_keys import PolicyState
        self.state = PolicyState()
        self.fail_after: int | None = None

    def read(self):
        return self.state.copy()

    def apply(self, steps):
        for step in steps:
            target = getattr(self.state, step.map)
            for key, value in step.entries.items():
                if self.fail_after is not None:
                    if self.fail_after == 0:
                        raise OSError("map write failed (test)")
                    self.fail_after -= 1
                if step.op == "update":
                    target[key] = value
                else:
                    target.pop(key, None)


class FakeDatapath(PolicyDatapath):
    def attach(self, ifindex):
        pass

    def detach(self, ifindex):
        pass


def desired(policies) -> DesiredState:
    inputs = read_policy_objects(SourceObject(o, "t") for o in world(policies))
    return DesiredState(pods=tuple(inputs.pods), namespaces=tuple(inputs.namespaces),
                        network_policies=tuple(inputs.policies))


def allow_from(pod: str) -> dict:
    return netpol("allow", "x", labels(pod="a"), ingress=[{"from": [{"podSelector": labels(pod=pod)}]}])


@pytest.fixture
def sync(monkeypatch):
    ifindex = {tuple(p.split("/")): 100 + i for i, p in enumerate(ALL)}
    monkeypatch.setattr(sync_mod, "find_endpoint", lambda uid, ips, root: next(
        (ifindex[k] for k in ifindex if uid.endswith(f"{k[0]}-{k[1]}")), None))
    s = PolicySync(AgentMetrics(), lambda *a: None, FakeDatapath(Path("/nonexistent")), NODE, Path("/"))
    monkeypatch.setattr(s, "_node_ips", lambda: [])
    s.maps = FakeMaps()
    return s


def test_a_write_that_fails_half_way_leaves_nothing_behind_after_the_next_change(sync):
    """The retry plans from what the maps hold, not from what the agent
    meant to write: an entry the failed write left is removed by the next
    plan, never left to allow a flow nobody asked for."""
    assert sync.sync(desired([allow_from("b")]))
    assert len(sync.current.endpoints) == len(ALL)
    sync.maps.fail_after = 1                       # the edit writes one entry, then fails
    assert not sync.sync(desired([allow_from("c")])) and sync.stale
    sync.maps.fail_after = None
    final = desired([netpol("deny", "x", labels(pod="a"), ingress=[])])
    assert sync.sync(final) and not sync.stale
    compiled = sync.compiler.compile(final.pods, final.namespaces, final.network_policies, NODE, {NODE: []})
    found = {k: ep.ifindex for k, ep in sync.endpoints.items() if ep.ifindex is not None}
    assert plan_policy(sync.maps.state, compiled, found, []).writes == 0, "the maps differ from the last plan"
    assert sync.current == sync.maps.state
