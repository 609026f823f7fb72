"""Agent core hardening (issue 9): a source error never ends the agent, a
Service that does not fit is left out alone, failed syncs are retried and
drift repaired, redirection settings fail apart from load balancing, one
agent per bpffs folder, and readiness on a kernel without sockmap.

Real agent processes on a lab, real traffic through the probe."""

from __future__ import annotations

import ctypes as ct
import os
import signal
import threading

import pytest

from meshbpf.datapath import libbpf, loader
from meshbpf.datapath.cgroup import cgroup2_mount
from meshbpf.datapath.layout import BackendC, SvcKeyC
from meshbpf.lab.workloads import wait_for

from . import k8s
from .conftest import attached_programs, web_service
from .helpers import metric, services, wait_backends, wait_log

WEB = "10.96.0.10:80/TCP"


def _web_backends(lab, *pods) -> list[str]:
    return [f"{lab.pods[p].ipv4}:8080" for p in pods]


def _metric(agent, name: str, labels: str = "") -> float | None:
    return metric(agent.get("/metrics")[1], name, labels)


# --- item 1 --------------------------------------------------------------------------

@pytest.mark.userspace
def test_a_source_that_raises_never_ends_the_agent(lab, probe, config, start_agent):
    agent = start_agent(web_service(lab))
    # An AgentConfig whose metadata is a string made the file source raise
    # AttributeError, which ended the agent's loop (and the process).
    broken = web_service(lab) + [k8s.agent_config() | {"metadata": "foo"}]
    k8s.write(config, broken)
    wait_log(agent, "still running the previous state")
    assert agent.proc.poll() is None
    assert agent.get("/healthz")[0] == 200 and agent.get("/readyz")[0] == 200
    failed = (_metric(agent, "meshbpf_sync_errors_total", 'reason="source"')
              + _metric(agent, "meshbpf_sync_errors_total", 'reason="config"'))
    assert failed == 1
    assert probe("client", "whoami", "10.96.0.10", 80, 10)["errors"] == {}
    # The agent still takes the next good change.
    k8s.write(config, web_service(lab) + web_service(lab, pods=("web-2",), name="api", ip="10.96.0.11"))
    wait_backends(agent.bpffs, "10.96.0.11:80/TCP", _web_backends(lab, "web-2"))
    assert set(probe("client", "whoami", "10.96.0.11", 80, 5)["answers"]) == {"web-2"}


# --- item 3 --------------------------------------------------------------------------

@pytest.mark.userspace
def test_a_service_too_big_for_the_map_is_left_out_and_the_others_keep_updating(
        lab, probe, config, start_agent):
    agent = start_agent(web_service(lab), "--map-size", "mbpf_svc=4")
    big = [k8s.service("big", ["10.96.0.20"], [k8s.port(f"p{i}", 1000 + i, 8080) for i in range(10)]),
           k8s.endpoint_slice("big-1", "big", [k8s.endpoint(str(lab.pods["web-1"].ipv4))],
                              [k8s.slice_port(f"p{i}", 8080) for i in range(10)])]
    api = web_service(lab, pods=("web-3",), name="api", ip="10.96.0.11")
    k8s.write(config, web_service(lab) + big + api)
    log = wait_log(agent, "left out")
    assert ("map full: Service default/big (10 frontend(s)) left out: mbpf_svc is full "
            "(it needs 10 more entries, 2 of 4 are free)") in log
    wait_backends(agent.bpffs, "10.96.0.11:80/TCP", _web_backends(lab, "web-3"))
    assert sorted(services(agent.bpffs)) == [WEB, "10.96.0.11:80/TCP"]   # none of big's ports
    assert agent.get("/readyz")[0] == 200
    assert _metric(agent, "meshbpf_services_refused") == 1
    assert _metric(agent, "meshbpf_sync_errors_total", 'reason="capacity"') == 1
    # Another Service's endpoints still move while big stays left out.
    k8s.write(config, web_service(lab, pods=("web-2",)) + big + api)
    wait_backends(agent.bpffs, WEB, _web_backends(lab, "web-2"))
    assert set(probe("client", "whoami", "10.96.0.10", 80, 10)["answers"]) == {"web-2"}


# --- item 4 --------------------------------------------------------------------------

def _keep_filling(path, stop: threading.Event) -> None:
    """Someone else keeps taking the last free entry of a map (a stray key
    the agent removes on restore and this puts back)."""
    fd = libbpf.obj_get(str(path))
    try:
        while not stop.is_set():
            try:
                libbpf.map_update(fd, ct.c_uint32(4242), BackendC())
            except OSError:
                pass  # full right now
            stop.wait(0.01)
    finally:
        os.close(fd)


@pytest.mark.userspace
def test_a_failed_map_write_is_retried_without_a_new_change(lab, probe, bpffs, config, start_agent):
    agent = start_agent(web_service(lab), "--map-size", "mbpf_backends=5")
    stop = threading.Event()
    filler = threading.Thread(target=_keep_filling, args=(bpffs / "mbpf_backends", stop))
    filler.start()
    try:
        api = web_service(lab, pods=("client2",), name="api", ip="10.96.0.11")  # a fifth backend
        k8s.write(config, web_service(lab) + api)
        wait_log(agent, "map write failed")          # E2BIG from the kernel
        assert agent.get("/readyz")[0] == 503        # stale while it keeps failing
        assert _metric(agent, "meshbpf_datapath_stale") == 1
        assert agent.proc.poll() is None
    finally:
        stop.set()
        filler.join()
    # No further change from the source: a retry alone lands it (the
    # restore after each failure removes the stray entry).
    wait_backends(bpffs, "10.96.0.11:80/TCP", [f"{lab.pods['client2'].ipv4}:8080"], timeout=40)
    log = wait_log(agent, "match the desired state again")
    assert "retrying in 0.5s" in log
    assert agent.get("/readyz")[0] == 200
    assert _metric(agent, "meshbpf_datapath_stale") == 0
    assert _metric(agent, "meshbpf_sync_errors_total", 'reason="datapath"') >= 1
    assert probe("client", "whoami", "10.96.0.10", 80, 10)["errors"] == {}


@pytest.mark.userspace
def test_the_periodic_resync_repairs_an_entry_deleted_by_hand(lab, probe, bpffs, start_agent):
    agent = start_agent(web_service(lab), "--resync-interval", "1")
    fd = libbpf.obj_get(str(bpffs / "mbpf_svc"))
    try:
        (key,) = list(libbpf.map_keys(fd, SvcKeyC))
        libbpf.map_delete(fd, key)
    finally:
        os.close(fd)
    assert services(bpffs) == {}
    wait_backends(bpffs, WEB, _web_backends(lab, "web-1", "web-2", "web-3", "web-4"), timeout=10)
    assert "1 differ from what the agent wrote, repairing" in agent.log()
    assert _metric(agent, "meshbpf_resync_drift_entries_total") >= 1
    assert probe("client", "whoami", "10.96.0.10", 80, 10)["errors"] == {}


# --- item 5a -------------------------------------------------------------------------

@pytest.mark.userspace
@pytest.mark.needs_feature("sockmap", "sockops_probe_read", "kernel_btf")
def test_a_missing_redirect_cgroup_does_not_stop_service_updates(lab, probe, config, start_agent):
    later = lab.cgroup / "later"
    relative = str(later.relative_to(cgroup2_mount()))
    settings = [k8s.agent_config(cgroups=[relative])]
    try:
        agent = start_agent(web_service(lab) + settings)    # ready although the cgroup is missing
        log = wait_log(agent, "socket redirection settings not applied")
        assert "spec.socketRedirect" in log and "later" in log
        assert _metric(agent, "meshbpf_redirect_stale") == 1
        assert _metric(agent, "meshbpf_sync_errors_total", 'reason="redirect"') >= 1
        k8s.write(config, web_service(lab, pods=("web-4",)) + settings)
        wait_backends(agent.bpffs, WEB, _web_backends(lab, "web-4"))
        assert set(probe("client", "whoami", "10.96.0.10", 80, 5)["answers"]) == {"web-4"}
        # The cgroup appears (kubelet made it late): the retry attaches there.
        later.mkdir()
        wait_for(lambda: attached_programs(later, [loader.ATTACH_SOCK_OPS]), 60, "sockops on the new cgroup")
        wait_for(lambda: _metric(agent, "meshbpf_redirect_stale") == 0, 10, "redirect_stale 0")
    finally:
        if later.exists():
            later.rmdir()


# --- item 8 --------------------------------------------------------------------------

@pytest.mark.userspace
def test_a_second_agent_on_the_same_bpffs_exits_and_changes_nothing(lab, probe, bpffs, start_agent):
    first = start_agent(web_service(lab))
    links = {name: info.prog_id for name, info in loader.inspect(bpffs).links.items()}
    second = start_agent(None, "--lock-timeout", "1", wait_ready=False)
    assert second.proc.wait(60) == 1
    log = second.log()
    assert f"another meshbpf agent (pid {first.proc.pid}) is running on {bpffs}" in log
    assert "Traceback" not in log
    assert {n: i.prog_id for n, i in loader.inspect(bpffs).links.items()} == links  # nothing swapped
    assert first.get("/readyz")[0] == 200
    assert probe("client", "whoami", "10.96.0.10", 80, 10)["errors"] == {}


@pytest.mark.userspace
def test_an_agent_started_while_the_old_one_exits_waits_and_takes_over(lab, probe, bpffs, start_agent):
    old = start_agent(web_service(lab))
    new = start_agent(None, "--lock-timeout", "60", wait_ready=False)
    wait_log(new, "waiting up to 60s for the agent")
    old.stop(signal.SIGTERM)
    new.wait_ready()
    assert probe("client", "whoami", "10.96.0.10", 80, 10)["errors"] == {}


# --- item 9 --------------------------------------------------------------------------

@pytest.mark.userspace
def test_ready_without_sockmap_and_without_agent_config(lab, probe, start_agent, monkeypatch):
    monkeypatch.setenv("MESHBPF_DISABLE_FEATURES", "sockmap")
    agent = start_agent(web_service(lab))     # waits for /readyz 200
    assert "socket redirection settings not applied" not in agent.log()
    assert _metric(agent, "meshbpf_sync_errors_total", 'reason="redirect"') == 0
    assert probe("client", "whoami", "10.96.0.10", 80, 10)["errors"] == {}
