"""Fallbacks for kernels without a feature, forced on this kernel with
MESHBPF_DISABLE_FEATURES (the kernel matrix, tests/vm, runs them for real)."""

from __future__ import annotations

import json
import subprocess
import sys

from .conftest import web_service
from . import k8s


def test_without_set_retval_a_service_without_endpoints_refuses_with_eperm(lab, probe, start_agent, monkeypatch):
    monkeypatch.setenv("MESHBPF_DISABLE_FEATURES", "set_retval")
    agent = start_agent([k8s.service("empty", ["10.96.0.20"], [k8s.port("http", 80, 8080)])])
    assert "set_retval is unavailable" in agent.log()
    result = probe("client", "connect-error", "10.96.0.20", 80)
    assert result["errno"] == "EPERM", result  # still at once (not a timeout), just another errno


def test_without_socket_storage_getpeername_uses_the_lru_map(lab, probe, start_agent, monkeypatch):
    monkeypatch.setenv("MESHBPF_DISABLE_FEATURES", "sk_storage")
    start_agent(web_service(lab))
    assert probe("client", "peername", "10.96.0.10", 80)["peer"] == ["10.96.0.10", 80]


def test_without_netns_cookie_affinity_is_not_applied(lab, probe, start_agent, monkeypatch):
    monkeypatch.setenv("MESHBPF_DISABLE_FEATURES", "netns_cookie")
    agent = start_agent(web_service(lab, affinity_timeout=600))
    assert "session affinity is not applied" in agent.log()
    result = probe("client", "whoami", "10.96.0.10", 80, 60)
    assert result["errors"] == {} and len(result["answers"]) >= 2, result


def test_without_sockmap_redirection_stays_off_and_the_agent_runs(lab, probe, bpffs, start_agent, monkeypatch):
    monkeypatch.setenv("MESHBPF_DISABLE_FEATURES", "sockmap")
    config = {"apiVersion": "meshbpf.io/v1alpha1", "kind": "AgentConfig", "metadata": {"name": "m"},
              "spec": {"socketRedirect": {"enabled": True}}}
    agent = start_agent(web_service(lab) + [config])
    assert "it stays off" in agent.log()
    assert probe("client", "whoami", "10.96.0.10", 80, 10)["errors"] == {}
    assert not (bpffs / "mbpf_sockhash").exists()


def test_status_prints_the_feature_table(bpffs, monkeypatch):
    monkeypatch.setenv("MESHBPF_DISABLE_FEATURES", "set_retval")
    out = subprocess.run([sys.executable, "-m", "meshbpf", "status", "--bpffs", str(bpffs), "-o", "json"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    table = {f["name"]: f["available"] for f in json.loads(out.stdout)["features"]}
    assert table["set_retval"] is False and table["cgroup_sock_addr"] is True
