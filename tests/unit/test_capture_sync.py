"""CaptureSync (meshbpf/sync/capture.py) with a fake datapath and pod
cgroups in a temporary folder: no root, no BPF. Also the CLI's table and
the metrics built from its counters."""

from __future__ import annotations

import ipaddress
import json

import pytest
from click.testing import CliRunner
from prometheus_client.core import CounterMetricFamily

from meshbpf.cli import cli
from meshbpf.cli.capture_cmd import agent_rows, pinned_pods, settings_line
from meshbpf.metrics import AgentMetrics, capture_metrics
from meshbpf.model import AgentSettings, CaptureSettings, DesiredState
from meshbpf.policy.model import PodInfo
from meshbpf.reconcile.capture_keys import CapPod, CaptureState
from meshbpf.sync.capture import CaptureSync

ip = ipaddress.ip_address
STATUS = {"sidecar.istio.io/status": "{}"}
ON = CaptureSettings(enabled=True, mesh="istio")


class FakeDatapath:
    """The capture maps as a CaptureState; apply() fails after `fail_after` entries."""

    def __init__(self):
        self.state = CaptureState()
        self.fail_after: int | None = None
        self.attached = False
        self.events: list[str] = []
        self.writes = 0

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
                self.writes += 1
                if step.op == "update":
                    target[key] = value
                else:
                    target.pop(key, None)
        self.events.append(f"apply pods={len(self.state.pods)}")

    def counters(self):
        return {"captured_outbound": 3, "captured_inbound": 2, "captured_dns": 1,
                "skipped_proxy_uid": 7, "skipped_port": 0, "skipped_cidr": 1,
                "original_dst_answered": 5, "original_dst_missing": 0}

    def attach(self):
        self.attached = True
        self.events.append("attach")

    def detach(self):
        self.attached = False
        self.events.append("detach")

    def inbound(self, places):
        return set()


def pod(name: str, annotations=None, node="node-a", labels=None, ips=("10.0.1.1",)) -> PodInfo:
    return PodInfo("x", name, f"uid-{name}", labels or {}, node, False, {},
                   tuple(ip(a) for a in ips), annotations if annotations is not None else STATUS)


def state(*pods, capture=ON) -> DesiredState:
    return DesiredState(settings=AgentSettings(capture=capture), pods=tuple(pods))


@pytest.fixture
def world(tmp_path):
    """A cgroup root with kubelet pod folders (cgroupfs driver layout)."""
    def make_cgroup(name: str) -> int:
        path = tmp_path / "kubepods" / "besteffort" / f"poduid-{name}"
        path.mkdir(parents=True)
        return path.stat().st_ino
    errors: list[str] = []
    sync = CaptureSync(AgentMetrics(), lambda fmt, *a: errors.append(fmt % a), "node-a")
    dp = FakeDatapath()
    sync.start(dp, tmp_path)
    return sync, dp, make_cgroup, errors


def test_a_local_meshed_pod_is_captured_and_the_hooks_go_on_first(world):
    sync, dp, make_cgroup, _ = world
    cg = make_cgroup("a")
    make_cgroup("plain")
    assert sync.sync(state(pod("a"), pod("plain", annotations={}), pod("remote", node="node-b")))
    assert set(dp.state.pods) == {cg}
    assert dp.events == ["attach", "apply pods=1"]
    view = sync.view()
    (entry,) = view["pods"]
    assert (entry["name"], entry["state"], entry["cgroup_id"]) == ("a", "captured", cg)
    assert entry["outbound"] == "*" and entry["inbound_port"] == 15006
    assert entry["rules"]["ports"]["in/15090"] == "exclude"


def test_a_bad_annotation_leaves_that_pod_uncaptured_and_the_others_go_on(world):
    sync, dp, make_cgroup, _ = world
    make_cgroup("a")
    cg_b = make_cgroup("b")
    bad = pod("a", {**STATUS, "traffic.sidecar.istio.io/excludeInboundPorts": "eighty"})
    assert sync.sync(state(bad, pod("b", ips=("10.0.1.2",))))
    assert set(dp.state.pods) == {cg_b}
    states = {p["name"]: p["state"] for p in sync.view()["pods"]}
    assert states["b"] == "captured"
    assert states["a"].startswith("not captured: metadata.annotations[traffic.sidecar.istio.io/"
                                  "excludeInboundPorts]: 'eighty' is not a port")


def test_a_pod_without_a_cgroup_waits_and_is_found_later(world, monkeypatch):
    sync, dp, make_cgroup, _ = world
    assert sync.sync(state(pod("a")))
    assert dp.state.pods == {} and sync.pending()
    assert sync.view()["pods"][0]["state"].startswith("waiting: no pod cgroup")
    cg = make_cgroup("a")
    sync.next_find = 0  # the look-again interval has passed
    assert sync.due(1e12) and sync.sync(state(pod("a")))
    assert set(dp.state.pods) == {cg} and not sync.pending()


def test_turning_capture_off_clears_the_maps_then_detaches(world):
    sync, dp, make_cgroup, _ = world
    make_cgroup("a")
    sync.sync(state(pod("a")))
    assert sync.sync(state(pod("a"), capture=CaptureSettings(enabled=False)))
    assert dp.state == CaptureState()
    assert dp.events == ["attach", "apply pods=1", "apply pods=0", "detach"]
    assert sync.view()["pods"] == [] and not sync.view()["settings"]["enabled"]


def test_a_failed_write_is_retried_from_what_the_maps_hold(world):
    sync, dp, make_cgroup, errors = world
    make_cgroup("a")
    make_cgroup("b")
    dp.fail_after = 2
    desired = state(pod("a"), pod("b", ips=("10.0.1.2",)))
    assert not sync.sync(desired)
    assert sync.stale and sync.pending() and "map write failed (test)" in errors[0]
    assert sync.metrics.sync_errors.labels("capture")._value.get() == 1
    dp.fail_after = None
    assert sync.sync(desired) and not sync.stale
    assert len(dp.state.pods) == 2 and dp.state == sync.current


def test_the_resync_repairs_drift(world):
    sync, dp, make_cgroup, _ = world
    make_cgroup("a")
    desired = state(pod("a"))
    sync.sync(desired)
    dp.state.pods.clear()           # behind the agent's back
    assert sync.sync(desired)       # same inputs: nothing to do without a reread
    assert dp.state.pods == {}
    assert sync.sync(desired, reread=True)
    assert len(dp.state.pods) == 1


def test_a_new_agent_takes_over_the_pinned_pods(world, tmp_path):
    sync, dp, make_cgroup, _ = world
    make_cgroup("a")
    sync.sync(state(pod("a")))
    again = CaptureSync(AgentMetrics(), lambda *a: None, "node-a")
    dp.events.clear()
    writes = dp.writes
    again.start(dp, tmp_path)
    assert again.current == dp.state and dp.events == ["attach"]   # this build's hooks
    assert again.sync(state(pod("a"))) and dp.writes == writes       # nothing to write


def test_without_a_capture_datapath_the_settings_are_only_reported(caplog):
    sync = CaptureSync(AgentMetrics(), lambda *a: None, "node-a")
    assert sync.sync(state(pod("a")))
    assert "cannot do it" in caplog.text and sync.view()["available"] is False
    assert settings_line(sync.view()) == "capture: not available on this kernel or build"


def test_the_opt_in_label_meshes_a_pod_without_the_marker(world):
    sync, dp, make_cgroup, _ = world
    cg = make_cgroup("a")
    settings = CaptureSettings(True, "istio", ("meshbpf.io/capture", "true"), dns=True)
    sync.sync(state(pod("a", annotations={}, labels={"meshbpf.io/capture": "true"}), capture=settings))
    assert dp.state.pods[cg].dns_port == 15053


# --- CLI and metrics ---------------------------------------------------------------

def test_capture_list_table_and_json_from_the_agent_view(world, monkeypatch):
    sync, dp, make_cgroup, _ = world
    make_cgroup("a")
    sync.sync(state(pod("a", {**STATUS, "traffic.sidecar.istio.io/excludeOutboundPorts": "5432"})))
    view = json.loads(json.dumps(sync.view()))   # as it crosses HTTP
    monkeypatch.setattr("meshbpf.cli.capture_cmd.fetch", lambda addr, path: view)
    out = CliRunner().invoke(cli, ["capture", "list"]).output
    lines = out.splitlines()
    assert lines[0] == "capture: on, mesh istio, DNS off"
    assert lines[1].split()[:4] == ["POD", "STATE", "MESH", "PROXY"]
    assert lines[2].split()[:7] == ["x/a", "captured", "istio", "1337", "15001", "15006", "-"]
    assert "out ports 5432" in lines[2] and "in ports 15008,15020,15021,15090" in lines[2]
    data = json.loads(CliRunner().invoke(cli, ["capture", "list", "-o", "json"]).output)
    assert data["source"] == "agent" and data["pods"][0]["exclude_outbound_ports"] == [5432]
    assert agent_rows(view)[0][0] == "x/a"


def test_capture_list_falls_back_to_the_pinned_maps(world, monkeypatch):
    sync, dp, make_cgroup, _ = world
    cg = make_cgroup("a")
    sync.sync(state(pod("a", {**STATUS, "traffic.sidecar.istio.io/includeOutboundIPRanges": "10.0.0.0/8"})))
    from meshbpf.cli import agent_views

    def unreachable(addr, path):
        raise agent_views.AgentUnreachable("http://127.0.0.1:9890/v1/capture: refused")
    monkeypatch.setattr("meshbpf.cli.capture_cmd.fetch", unreachable)
    monkeypatch.setattr("meshbpf.cli.capture_cmd.read_pinned", lambda bpffs: dp.state)
    result = CliRunner().invoke(cli, ["capture", "list", "-o", "json"])
    data = json.loads(result.stdout)
    assert data["source"] == "pinned maps"
    (p,) = data["pods"]
    assert p["cgroup_id"] == cg and p["addresses"] == ["10.0.1.1"] and p["flags"] == "out,in,in-all"
    assert p["rules"]["cidrs"] == {"10.0.0.0/8": "include"}
    assert pinned_pods(dp.state) == data["pods"]


def test_capture_metrics_from_the_counters():
    families = {f.name: f for f in capture_metrics(FakeDatapath().counters(), 2, CounterMetricFamily)}
    by_label = lambda name: {tuple(s.labels.values()): s.value for s in families[name].samples
                             if s.name.endswith("_total") or s.name == name}
    assert by_label("meshbpf_capture_connections") == {("outbound",): 3, ("inbound",): 2, ("dns",): 1}
    assert by_label("meshbpf_capture_skipped")[("proxy_uid",)] == 7
    assert by_label("meshbpf_capture_original_dst")[("answered",)] == 5
    assert families["meshbpf_capture_pods"].samples[0].value == 2


def test_with_capture_off_and_nothing_held_the_resync_leaves_the_maps_alone(world):
    sync, dp, make_cgroup, _ = world
    off = state(pod("a"), capture=CaptureSettings(enabled=False))
    sync.sync(off)
    dp.state.pods[5] = CapPod(bytes(16), bytes(16), 1337, 9, 15001, 15006, 0, 1)  # written by hand
    assert sync.sync(off, reread=True) and 5 in dp.state.pods
