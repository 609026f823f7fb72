"""CaptureSync's part in inbound capture from other nodes (meshbpf/sync/capture.py):
which pods get the tc programs on their interface, when, and what happens
while a pod's interface is not found. A fake datapath; no root, no BPF."""

from __future__ import annotations

import ipaddress

import pytest

from meshbpf.metrics import AgentMetrics
from meshbpf.model import AgentSettings, CaptureSettings, DesiredState
from meshbpf.policy.model import PodInfo
from meshbpf.reconcile.capture_keys import CaptureState
from meshbpf.sync.capture import CaptureSync

STATUS = {"sidecar.istio.io/status": "{}"}
ON = CaptureSettings(enabled=True, mesh="istio")


class FakeDatapath:
    """The capture maps as a CaptureState; inbound() records what it was asked
    for and reports the cgroups in `not_found` as missing."""

    def __init__(self):
        self.state = CaptureState()
        self.events: list[str] = []
        self.not_found: set[int] = set()
        self.places: dict = {}

    def read(self):
        return self.state.copy()

    def apply(self, steps):
        for step in steps:
            target = getattr(self.state, step.map)
            for key, value in step.entries.items():
                if step.op == "update":
                    target[key] = value
                else:
                    target.pop(key, None)
        self.events.append(f"apply pods={len(self.state.pods)}")

    def counters(self):
        return {}

    def attach(self):
        self.events.append("attach")

    def detach(self):
        self.events.append("detach")

    def inbound(self, places):
        self.places = dict(places)
        self.events.append(f"inbound {sorted(places)}")
        return set(places) & self.not_found


def pod(name: str, annotations=None, ips=("10.0.1.1",)) -> PodInfo:
    return PodInfo("x", name, f"uid-{name}", {}, "node-a", False, {},
                   tuple(ipaddress.ip_address(a) for a in ips),
                   annotations if annotations is not None else STATUS)


def state(*pods, capture=ON) -> DesiredState:
    return DesiredState(settings=AgentSettings(capture=capture), pods=tuple(pods))


@pytest.fixture
def world(tmp_path):
    def make_cgroup(name: str) -> int:
        path = tmp_path / "kubepods" / "besteffort" / f"poduid-{name}"
        path.mkdir(parents=True)
        return path.stat().st_ino
    sync = CaptureSync(AgentMetrics(), lambda fmt, *a: None, "node-a")
    dp = FakeDatapath()
    sync.start(dp, tmp_path)
    return sync, dp, make_cgroup, tmp_path


def test_meshed_pods_with_inbound_capture_get_the_tc_programs_after_their_entries(world):
    sync, dp, make_cgroup, root = world
    cg_a, cg_out_only = make_cgroup("a"), make_cgroup("b")
    no_inbound = {**STATUS, "traffic.sidecar.istio.io/includeInboundPorts": ""}
    assert sync.sync(state(pod("a"), pod("b", no_inbound, ips=("10.0.1.2",))))
    assert set(dp.state.pods) == {cg_a, cg_out_only}
    assert dp.events == ["attach", "apply pods=2", f"inbound {[cg_a]}"]
    views = {p["name"]: p for p in sync.view()["pods"]}
    assert views["a"]["inbound_from_other_nodes"] == "on"
    assert "inbound_from_other_nodes" not in views["b"]
    path, ips = dp.places[cg_a]
    assert path == root / "kubepods" / "besteffort" / "poduid-a"
    assert ips == (ipaddress.ip_address("10.0.1.1"),)


def test_a_pod_whose_interface_is_not_found_is_looked_for_again(world):
    sync, dp, make_cgroup, _ = world
    cg = make_cgroup("a")
    dp.not_found = {cg}
    assert sync.sync(state(pod("a")))
    assert set(dp.state.pods) == {cg}  # its connect-time capture goes ahead
    assert sync.pending() and not sync.due(0)
    (entry,) = sync.view()["pods"]
    assert entry["inbound_from_other_nodes"] == "waiting: no interface with its address yet"
    dp.not_found = set()
    sync.next_find = 0  # the look-again interval has passed
    assert sync.due(1e12) and sync.sync(state(pod("a")))
    assert dp.events[-1] == f"inbound {[cg]}" and not sync.pending()
    assert sync.view()["pods"][0]["inbound_from_other_nodes"] == "on"


def test_turning_capture_off_takes_the_tc_programs_off_before_the_hooks(world):
    sync, dp, make_cgroup, _ = world
    cg = make_cgroup("a")
    sync.sync(state(pod("a")))
    assert sync.sync(state(pod("a"), capture=CaptureSettings(enabled=False)))
    assert dp.events == ["attach", "apply pods=1", f"inbound {[cg]}", "apply pods=0", "inbound []",
                         "detach"]
