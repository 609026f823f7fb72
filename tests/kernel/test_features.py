"""Fallbacks for kernels without a feature, forced on this kernel with
MESHBPF_DISABLE_FEATURES (the kernel matrix, tests/vm, runs them for real)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from meshbpf.datapath import loader

from . import k8s
from .conftest import attached_programs, web_service
from .helpers import counters, transfer

MiB = 1 << 20


# Run in the kernel matrix on its oldest kernel only (tests/vm/matrix).
pytestmark = pytest.mark.fallback


def test_without_set_retval_a_service_without_endpoints_refuses_with_eperm(lab, probe, start_agent, monkeypatch):
    monkeypatch.setenv("MESHBPF_DISABLE_FEATURES", "set_retval")
    agent = start_agent([k8s.service("empty", ["10.96.0.20"], [k8s.port("http", 80, 8080)])])
    assert "set_retval is unavailable" in agent.log()
    result = probe("client", "connect-error", "10.96.0.20", 80)
    assert result["errno"] == "EPERM", result  # still at once (not a timeout), just another errno


def test_without_socket_storage_getpeername_uses_the_lru_map(lab, probe, start_agent, monkeypatch):
    monkeypatch.setenv("MESHBPF_DISABLE_FEATURES", "sk_storage,conn_rnat")
    start_agent(web_service(lab))
    assert probe("client", "peername", "10.96.0.10", 80)["peer"] == ["10.96.0.10", 80]


def test_without_conn_rnat_getpeername_uses_socket_storage(lab, probe, bpffs, start_agent, monkeypatch):
    monkeypatch.setenv("MESHBPF_DISABLE_FEATURES", "conn_rnat")
    start_agent(web_service(lab))
    assert probe("client", "peername", "10.96.0.10", 80)["peer"] == ["10.96.0.10", 80]
    assert not (bpffs / "mbpf_conn_rnat").exists() and not (bpffs / "mbpf_conn_slot").exists()
    assert not (bpffs / "links" / loader.RELEASE_HOOK).exists()


def test_without_conn_slots_the_connection_table_is_a_hash(lab, probe, bpffs, start_agent, monkeypatch):
    monkeypatch.setenv("MESHBPF_DISABLE_FEATURES", "conn_slots")
    start_agent(web_service(lab))
    assert probe("client", "peername", "10.96.0.10", 80)["peer"] == ["10.96.0.10", 80]
    assert (bpffs / "mbpf_conn_rnat").exists() and not (bpffs / "mbpf_conn_slot").exists()
    assert (bpffs / "links" / loader.RELEASE_HOOK).exists()


def test_without_netns_cookie_affinity_is_not_applied(lab, probe, start_agent, monkeypatch):
    monkeypatch.setenv("MESHBPF_DISABLE_FEATURES", "netns_cookie")
    agent = start_agent(web_service(lab, affinity_timeout=600))
    assert "session affinity is not applied" in agent.log()
    result = probe("client", "whoami", "10.96.0.10", 80, 60)
    assert result["errors"] == {} and len(result["answers"]) >= 2, result


# README "Kernels": without any of these, socket redirection is off.
@pytest.mark.parametrize("missing", ["sockmap", "sockops_probe_read", "kernel_btf"])
def test_without_a_redirect_feature_redirection_stays_off_and_the_agent_runs(
        lab, probe, bpffs, start_agent, monkeypatch, missing):
    monkeypatch.setenv("MESHBPF_DISABLE_FEATURES", missing)
    agent = start_agent(web_service(lab) + [k8s.agent_config()])
    assert "it stays off" in agent.log()
    assert f"kernel feature {missing} is unavailable" in agent.log()
    result = probe("client", "whoami", "10.96.0.10", 80, 10)
    assert result["errors"] == {}, result
    assert not (bpffs / "mbpf_sockhash").exists()
    assert not list((bpffs / "links").glob("mbpf_sockops-*"))
    assert attached_programs(lab.cgroup, [loader.ATTACH_SOCK_OPS]) == []


@pytest.mark.needs_feature("sockmap", "sockops_probe_read", "kernel_btf")
def test_without_cgroup_sockopt_redirection_runs_blind_to_a_late_tcp_nodelay(
        lab, probe, bpffs, start_agent, monkeypatch):
    """README: without the setsockopt hook, TCP_NODELAY set after connect()
    is not seen. 1 KB writes with TCP_NODELAY set after connect (as the probe
    does) count as small only when it is seen; unseen, the veth path's
    Nagle rule keeps them spliced. Either way every byte arrives."""
    monkeypatch.setenv("MESHBPF_DISABLE_FEATURES", "cgroup_sockopt")
    agent = start_agent([k8s.agent_config()])
    assert "kernel feature cgroup_sockopt is unavailable" in agent.log()
    assert list((bpffs / "links").glob("mbpf_sockops-*"))
    assert not list((bpffs / "links").glob("mbpf_setsockopt-*"))
    assert attached_programs(lab.cgroup, [loader.ATTACH_SETSOCKOPT]) == []
    total = 4 * MiB
    before = counters(bpffs)
    client, server = transfer(lab, probe, 1024, total, "nodelay", server_mode="sink")
    assert server["recv_bytes"] == total and server["recv_sha"] == client["sent_sha"]
    after = counters(bpffs)
    assert after["redirected_bytes"] - before["redirected_bytes"] >= total  # not seen as small


def test_status_prints_the_feature_table(bpffs, monkeypatch):
    monkeypatch.setenv("MESHBPF_DISABLE_FEATURES", "set_retval")
    out = subprocess.run([sys.executable, "-m", "meshbpf", "status", "--bpffs", str(bpffs), "-o", "json"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    table = {f["name"]: f["available"] for f in json.loads(out.stdout)["features"]}
    assert table["set_retval"] is False and table["cgroup_sock_addr"] is True
