"""The metrics README lists, each moved by what it counts: real redirected
traffic, config edits, syncs, and readiness before the first sync."""

from __future__ import annotations

import ctypes as ct
import json
import os
import subprocess
import sys
import time

import pytest

from meshbpf.lab.workloads import wait_for

from . import k8s
from .conftest import PROBE, web_service
from .helpers import README_SMALL_RUN_MAX, assert_intact, metric, transfer, wait_backends, wait_log

MiB = 1 << 20
REDIRECT = ["messages", "bytes", "fallback_messages", "fallback_bytes", "switched_pairs",
            "inserted_sockets", "evicted_sockets"]


def _redirect_metrics(agent) -> dict[str, float]:
    body = agent.get("/metrics")[1]
    values = {name: metric(body, f"meshbpf_redirect_{name}_total") for name in REDIRECT}
    values["sockhash_entries"] = metric(body, "meshbpf_sockhash_entries")
    assert None not in values.values(), values
    return values


def _delta(after: dict, before: dict) -> dict:
    return {k: after[k] - before[k] for k in after}


@pytest.mark.bounds  # counters over the redirect path the redirect tests cover on every kernel
@pytest.mark.needs_feature("sockmap", "sockops_probe_read", "kernel_btf")
def test_redirect_metrics_count_real_spliced_and_fallback_traffic(lab, probe, start_agent):
    agent = start_agent([k8s.agent_config()])
    total = 8 * MiB

    # A held connection shows in the sockhash: both of its ends.
    start = _redirect_metrics(agent)
    echo = lab.popen("web-1", [sys.executable, "-u", str(PROBE), "echo-server", "7500"],
                     stdout=subprocess.PIPE, text=True)
    client = None
    try:
        assert json.loads(echo.stdout.readline())["listening"]
        client = lab.popen("client", [sys.executable, "-u", str(PROBE), "stream-client",
                                      str(lab.pods["web-1"].ipv4), "7500", "64"],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert json.loads(client.stdout.readline())["connected"]
        wait_for(lambda: _redirect_metrics(agent)["sockhash_entries"] == start["sockhash_entries"] + 2,
                 10, "two sockets in the sockhash")
        client.communicate("stop\n", timeout=60)
    finally:
        for p in (echo, client):
            if p is not None and p.poll() is None:
                p.kill()
    wait_for(lambda: _redirect_metrics(agent)["sockhash_entries"] == 0, 10, "an empty sockhash")

    # 1 MB writes both ways: spliced until the first FIN, so at least the
    # direction that finished first was spliced whole; the other finishes
    # over TCP, counted as fallback until its socket leaves the sockhash.
    before = _redirect_metrics(agent)
    client, server = transfer(lab, probe, MiB, total, "nagle", port=7501)
    assert_intact(client, server, total)
    spliced = _delta(_redirect_metrics(agent), before)
    assert total <= spliced["bytes"] <= 2 * total and spliced["messages"] >= total / MiB, spliced
    assert spliced["bytes"] + spliced["fallback_bytes"] <= 2 * total, spliced  # none counted twice
    assert spliced["inserted_sockets"] == 2 and spliced["switched_pairs"] == 1, spliced  # at the FIN

    # Unanswered 1 KB TCP_NODELAY writes: 16 spliced, the 17th switches the
    # pair to TCP; its sends count as fallback until it leaves the sockhash.
    before = _redirect_metrics(agent)
    client, server = transfer(lab, probe, 1024, total, "nodelay", port=7502, server_mode="sink")
    assert server["recv_sha"] == client["sent_sha"]
    switched = _delta(_redirect_metrics(agent), before)
    assert switched["bytes"] == README_SMALL_RUN_MAX * 1024, switched
    assert switched["fallback_messages"] >= 1 and switched["fallback_bytes"] >= 1024, switched
    assert switched["switched_pairs"] == 1 and switched["evicted_sockets"] == 2, switched


@pytest.mark.userspace
def test_config_and_sync_metrics_follow_edits(lab, bpffs, config, start_agent):
    agent = start_agent(web_service(lab))
    body = agent.get("/metrics")[1]
    assert metric(body, "meshbpf_config_last_load_success") == 1
    assert metric(body, "meshbpf_source_problems") == 0  # a clean file source
    synced_at = metric(body, "meshbpf_last_sync_timestamp_seconds")
    assert 0 < synced_at <= time.time()

    # A bad edit: the load fails, nothing syncs.
    config.write_text(config.read_text().replace("clusterIP:", "clusterIp:", 1))
    wait_log(agent, "unknown field 'clusterIp'")
    body = agent.get("/metrics")[1]
    assert metric(body, "meshbpf_config_last_load_success") == 0
    assert metric(body, "meshbpf_last_sync_timestamp_seconds") == synced_at

    # A good edit: loaded, synced, the timestamp moves on.
    edited = time.time()
    k8s.write(config, web_service(lab, pods=("web-1",)))
    wait_backends(bpffs, "10.96.0.10:80/TCP", [f"{lab.pods['web-1'].ipv4}:8080"])
    body = agent.get("/metrics")[1]
    assert metric(body, "meshbpf_config_last_load_success") == 1
    assert metric(body, "meshbpf_last_sync_timestamp_seconds") >= edited > synced_at


@pytest.mark.needs_feature("sockmap", "sockops_probe_read", "kernel_btf")
@pytest.mark.userspace
def test_more_pod_cidrs_than_fit_are_refused_whole_as_a_redirect_error(lab, bpffs, config, start_agent):
    """More podCIDRs than mbpf_redir_cidr holds (1024): valid YAML, but it
    cannot fit. It is refused before anything is written (the CIDR map keeps
    the old list), counted as a redirection error, and load balancing goes on.
    (A failed load-balancing map write, reason="datapath", is provoked in
    test_agent_hardening.py.)"""
    agent = start_agent(web_service(lab) + [k8s.agent_config()])
    text = agent.get("/metrics")[1]
    assert metric(text, "meshbpf_sync_errors_total", 'reason="redirect"') == 0
    before = _cidr_entries(bpffs)
    assert before  # the lab AgentConfig's podCIDRs
    cidrs = [f"10.{i // 256}.{i % 256}.0/24" for i in range(1025)]
    k8s.write(config, web_service(lab, pods=("web-1",)) + [k8s.agent_config(cidrs=cidrs)])
    needle = "podCIDRs lists 1025 networks; at most 1024 fit"
    line = [x for x in wait_log(agent, needle).splitlines() if needle in x][0]
    assert "AgentConfig spec.socketRedirect" in line, line
    wait_for(lambda: metric(agent.get("/metrics")[1], "meshbpf_sync_errors_total",
                            'reason="redirect"') >= 1, 10, "a redirect sync error")
    assert _cidr_entries(bpffs) == before  # nothing half-applied
    wait_backends(bpffs, "10.96.0.10:80/TCP", [f"{lab.pods['web-1'].ipv4}:8080"])  # LB went on
    assert agent.proc.poll() is None


def _cidr_entries(bpffs) -> set[bytes]:
    from meshbpf.datapath import libbpf
    from meshbpf.datapath.layout import CidrKeyC

    fd = libbpf.obj_get(str(bpffs / "mbpf_redir_cidr"))
    try:
        return {bytes(k) for k, _ in libbpf.map_items(fd, CidrKeyC, ct.c_uint8)}
    finally:
        os.close(fd)


@pytest.mark.userspace
def test_readyz_is_503_until_the_first_sync(lab, config, start_agent):
    config.write_text("kind: Service\napiVersion: v1\nmetadata: {name: x\n")  # not YAML
    agent = start_agent(None, wait_ready=False)
    wait_for(lambda: _get(agent, "/healthz") == 200, 60, "the agent to serve /healthz")
    wait_log(agent, "config rejected")
    assert _get(agent, "/readyz") == 503
    k8s.write(config, web_service(lab))
    wait_for(lambda: _get(agent, "/readyz") == 200, 10, "/readyz to turn 200 after the first sync")


def _get(agent, path: str) -> int | None:
    try:
        return agent.get(path)[0]
    except OSError:
        return None
