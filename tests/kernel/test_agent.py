"""The agent's lifecycle: restarts, crashes, uninstall, metrics, bad input."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from meshbpf.datapath import features, loader
from meshbpf.lab.workloads import wait_for
from meshbpf.sync.lb import FIRST_SYNC_CHUNK

from . import k8s
from .conftest import Load, attached_programs, web_service
from .helpers import README_MAP_SIZES, metric, services, wait_backends, wait_log

FRONTEND = "10.96.0.10:80/TCP"


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meshbpf", *args], capture_output=True, text=True)


def _lb_json(bpffs) -> dict:
    out = _cli("bpf", "lb", "list", "--bpffs", str(bpffs), "-o", "json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _total_writes(metrics_text: str) -> float:
    return sum(float(line.split()[-1]) for line in metrics_text.splitlines()
               if line.startswith("meshbpf_map_writes_total{"))


@pytest.mark.bounds
def test_kill9_keeps_traffic_flowing_and_restart_writes_nothing(lab, probe, bpffs, start_agent):
    agent = start_agent(web_service(lab) + web_service(lab, pods=("web-1",), name="api", ip="10.96.0.11",
                                                       affinity_timeout=60))
    before = _lb_json(bpffs)
    agent.stop(signal.SIGKILL)
    assert agent.proc.returncode == -signal.SIGKILL

    # No agent: the pinned links and maps keep serving.
    result = probe("client", "whoami", "10.96.0.10", 80, 100)
    assert result["errors"] == {} and len(result["answers"]) == 4

    restarted = start_agent()
    code, body = restarted.get("/metrics")
    assert _total_writes(body) == 0, body
    assert metric(body, "meshbpf_services") == 2
    assert _lb_json(bpffs) == before  # same IDs, same slots
    assert "0 services, 0 backends" not in restarted.log()


@pytest.mark.bounds
def test_restart_under_load_drops_no_connection(lab, probe, bpffs, start_agent):
    agent = start_agent(web_service(lab))
    load = Load(probe, "client", "10.96.0.10", 80)
    agent.stop(signal.SIGTERM)          # SIGTERM leaves the datapath attached too
    assert agent.proc.returncode == 0
    stopped = time.monotonic()
    start_agent()                        # recompiles and swaps programs behind the links
    ready = time.monotonic()
    result = load.stop()
    assert result["errors"] == {}, result
    # Connections were made before the stop, with no agent (the new one
    # compiling), and after the swap. (Not between SIGTERM and exit: that
    # window is a few ms, shorter than one connection under emulation.)
    load.assert_spans(stopped, ready)


@pytest.mark.bounds
def test_uninstall_removes_everything_meshbpf_made_and_nothing_else(lab, probe, bpffs, start_agent,
                                                                    kernel_features):
    agent = start_agent(web_service(lab) + [k8s.agent_config()])
    assert len(attached_programs(lab.cgroup)) == len(loader.SOCK_LB_HOOKS)
    redirecting = features.redirect_possible(kernel_features)
    if redirecting:  # applied after load balancing, apart from it: wait for it
        wait_for(lambda: attached_programs(lab.cgroup, [loader.ATTACH_SOCK_OPS]), 60,
                 "sockops to be attached")
    # Something that is not meshbpf's, in the same folder: uninstall must leave it.
    foreign = bpffs / "someone-elses-map"
    subprocess.run(["bpftool", "map", "create", str(foreign), "type", "hash", "key", "4",
                    "value", "4", "entries", "4", "name", "foreign"], check=True)
    agent.stop()

    out = _cli("uninstall", "--bpffs", str(bpffs))
    assert out.returncode == 0, out.stderr
    assert attached_programs(lab.cgroup) == []
    redirect_hooks = [loader.ATTACH_SOCK_OPS] + ([loader.ATTACH_SETSOCKOPT] if kernel_features["cgroup_sockopt"] else [])
    assert attached_programs(lab.cgroup, redirect_hooks) == []
    if redirecting:
        assert "link mbpf_sockops-" in out.stdout
    if redirecting and kernel_features["cgroup_sockopt"]:
        assert "link mbpf_setsockopt-" in out.stdout
    if redirecting and kernel_features["recv_tracepoint"]:
        assert f"link {loader.RECV_LINK}" in out.stdout  # the empty-read counter's tracepoint
    assert sorted(p.name for p in bpffs.iterdir()) == ["someone-elses-map"]
    # New connections are no longer translated (the VIP has no route).
    assert probe("client", "connect-error", "10.96.0.10", 80)["errno"] != "0"
    foreign.unlink()
    bpffs.rmdir()


@pytest.mark.userspace
def test_metrics_and_health(lab, probe, bpffs, start_agent):
    agent = start_agent(web_service(lab))
    assert agent.get("/healthz")[0] == 200
    assert agent.get("/readyz")[0] == 200
    assert probe("client", "whoami", "10.96.0.10", 80, 5)["errors"] == {}
    code, body = agent.get("/metrics")
    assert code == 200
    assert metric(body, "meshbpf_services") == 1
    assert metric(body, "meshbpf_backends") == 4
    assert metric(body, "meshbpf_sync_duration_seconds_count") >= 1
    assert metric(body, "meshbpf_sync_errors_total", 'reason="config"') == 0
    assert metric(body, "meshbpf_map_entries", 'map_name="mbpf_slots"') == 4
    assert metric(body, "meshbpf_map_pressure", 'map_name="mbpf_svc"') == 1 / README_MAP_SIZES["mbpf_svc"]
    # Kernel-owned maps are counted by walking them: TCP keeps its reverse
    # NAT in socket storage, so the LRU map (unconnected UDP only) is empty.
    assert metric(body, "meshbpf_map_entries", 'map_name="mbpf_rnat"') == 0
    for name, size in README_MAP_SIZES.items():  # the defaults README states
        capacity = metric(body, "meshbpf_map_capacity", f'map_name="{name}"')
        if capacity is not None or name != "mbpf_sockhash":  # no sockhash on a kernel without sockmap
            assert capacity == size, name


@pytest.mark.userspace
def test_full_map_leaves_out_the_services_that_do_not_fit_and_keeps_the_rest(lab, probe, bpffs, config,
                                                                             start_agent):
    """Services are admitted one by one (issue 9): web goes, svc0..svc2 fill
    the three entries, svc3 is left out alone instead of the whole update."""
    agent = start_agent(web_service(lab), "--map-size", "mbpf_svc=3")
    too_many = []
    for i in range(4):
        too_many += web_service(lab, name=f"svc{i}", ip=f"10.96.1.{i + 1}")
    k8s.write(config, too_many)
    log = wait_log(agent, "left out")
    assert ("map full: Service default/svc3 (1 frontend(s)) left out: mbpf_svc is full "
            "(it needs 1 more entries, 0 of 3 are free)") in log
    wait_for(lambda: sorted(services(bpffs)) == [f"10.96.1.{i}:80/TCP" for i in (1, 2, 3)], 5,
             "svc0..svc2 programmed")
    assert probe("client", "whoami", "10.96.1.3", 80, 10)["errors"] == {}
    code, body = agent.get("/metrics")
    assert metric(body, "meshbpf_sync_errors_total", 'reason="capacity"') == 1
    assert metric(body, "meshbpf_services_refused") == 1
    assert agent.get("/readyz")[0] == 200   # a Service left out is a problem, not staleness


@pytest.mark.userspace
def test_pinned_maps_of_another_layout_are_refused_clearly(lab, probe, bpffs, start_agent):
    first = start_agent(web_service(lab))
    first.stop()
    second = start_agent(None, "--map-size", "mbpf_svc=1024", wait_ready=False)
    assert second.proc.wait(60) == 1
    log = second.log()
    assert "pinned maps do not match this build" in log and "mbpf_svc" in log
    assert "Traceback" not in log
    # The old datapath is untouched and still serving.
    assert probe("client", "whoami", "10.96.0.10", 80, 10)["errors"] == {}


@pytest.mark.heavy
def test_ten_thousand_services(lab, probe, bpffs, config, start_agent):
    pods = ("web-1", "web-2", "web-3", "web-4")
    objects = []
    for i in range(10_000):
        objects += web_service(lab, pods=pods, name=f"svc{i}", ip=f"10.97.{i // 250}.{i % 250 + 1}")
    agent = start_agent(objects)
    assert metric(agent.get("/metrics")[1], "meshbpf_services") == 10_000
    last = probe("client", "whoami", "10.97.39.250", 80, 40)
    assert last["errors"] == {} and set(last["answers"]) == set(pods)
    # One more service at N = 10 000 is one small diff: its slot and its
    # frontend (the backend address already exists and is shared).
    k8s.write(config, objects + web_service(lab, pods=("web-2",), name="extra", ip="10.96.9.9"))
    wait_backends(bpffs, "10.96.9.9:80/TCP", [f"{lab.pods['web-2'].ipv4}:8080"], timeout=30)
    log = agent.log()
    assert "synced 10001 services: 2 map writes" in log


@pytest.mark.bounds
def test_upgrade_to_another_build_under_load(lab, probe, bpffs, start_agent, monkeypatch):
    """Two agent builds in a row, like a DaemonSet rolling update: the new
    one takes over the pinned maps and swaps its programs in behind the
    pinned links while connections keep being made."""
    # The "old version": a build without the affinity code (other programs,
    # same map layouts), as a kernel or a release without a feature makes.
    monkeypatch.setenv("MESHBPF_DISABLE_FEATURES", "netns_cookie")
    old = start_agent(web_service(lab))
    before = {name: info.prog_id for name, info in loader.inspect(bpffs).links.items()}
    ids_before = _lb_json(bpffs)
    load = Load(probe, "client", "10.96.0.10", 80)
    old.stop(signal.SIGTERM)
    stopped = time.monotonic()
    monkeypatch.delenv("MESHBPF_DISABLE_FEATURES")
    new = start_agent()
    ready = time.monotonic()
    result = load.stop()
    assert result["errors"] == {}, result
    load.assert_spans(stopped, ready)  # the upgrade happened under load, with no agent between
    after = {name: info.prog_id for name, info in loader.inspect(bpffs).links.items()}
    assert after.keys() == before.keys()
    assert all(after[name] != before[name] for name in after)  # every program swapped
    assert _lb_json(bpffs) == ids_before  # maps taken over as they were
    assert _total_writes(new.get("/metrics")[1]) == 0


def _many_services(lab, n: int, moved: set[int] = frozenset(), gone: int = 0) -> list[dict]:
    """n Services of one endpoint each (web-1..web-4 in turn; web-2 for
    those in `moved`), the last `gone` of them left out."""
    objects = []
    for i in range(n - gone):
        pod = "web-2" if i in moved else f"web-{i % 4 + 1}"
        objects += web_service(lab, pods=(pod,), name=f"s{i}", ip=f"10.97.{i // 250}.{i % 250 + 1}")
    return objects


@pytest.mark.heavy
def test_a_restart_over_more_services_than_a_chunk_reads_the_maps_and_plans_in_chunks(
        lab, probe, bpffs, config, start_agent):
    """The first sync after a restart is planned and written in chunks over
    what the pinned maps hold (sync/lb.py): with nothing changed it writes
    nothing and keeps every ID; with changes made while no agent ran, the
    maps get them."""
    n = FIRST_SYNC_CHUNK + 40
    agent = start_agent(_many_services(lab, n))
    assert "(full plan, in chunks)" in agent.log()
    before = _lb_json(bpffs)
    agent.stop(signal.SIGKILL)

    restarted = start_agent()
    _, body = restarted.get("/metrics")
    assert _total_writes(body) == 0, body
    assert metric(body, "meshbpf_services") == n
    assert _lb_json(bpffs) == before  # same IDs, same slots
    restarted.stop(signal.SIGKILL)

    k8s.write(config, _many_services(lab, n, moved={0, n - 20}, gone=10))
    changed = start_agent()
    assert "(full plan, in chunks)" in changed.log()
    _, body = changed.get("/metrics")
    assert metric(body, "meshbpf_services") == n - 10
    for i in (0, n - 20):
        assert set(probe("client", "whoami", f"10.97.{i // 250}.{i % 250 + 1}", 80, 4)["answers"]) == {"web-2"}
    assert set(probe("client", "whoami", "10.97.0.4", 80, 4)["answers"]) == {"web-4"}  # s3, unchanged
