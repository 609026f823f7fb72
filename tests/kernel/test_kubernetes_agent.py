"""`meshbpf agent --source kubernetes` as a process, against the fake API server.

The unit tests drive KubernetesSource in-process; here the real command runs
with a kubeconfig pointing at tests/unit/fake_apiserver.py on 127.0.0.1, and
real connections from a lab pod go through the Service it programs. The
kernel side is the same as in the file-source tests, so the VMs skip this
(userspace).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from . import k8s
from .conftest import web_service
from .helpers import wait_backends, wait_log

sys.path.insert(0, str(Path(__file__).parents[1] / "unit"))
from fake_apiserver import FakeAPIServer  # noqa: E402  (tests/unit is not a package)

FRONTEND = "10.96.0.10:80/TCP"
NODE = "node-a"


@pytest.fixture
def api():
    server = FakeAPIServer().start()
    yield server
    server.stop()


def _config_map(agent_config_yaml: str) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "meshbpf-config", "namespace": "kube-system"},
            "data": {"agent-config.yaml": agent_config_yaml}}


@pytest.mark.userspace
def test_the_agent_follows_the_api_server_and_survives_a_bad_config_map(
        lab, probe, bpffs, api, tmp_path, start_agent):
    api.apply(*web_service(lab))
    kubeconfig = api.kubeconfig(tmp_path / "kubeconfig")
    agent = start_agent(None, "--source", "kubernetes", "--kubeconfig", str(kubeconfig),
                        "--node-name", NODE)
    pods = {p: f"{lab.pods[p].ipv4}:8080" for p in ("web-1", "web-2", "web-3", "web-4")}
    wait_backends(bpffs, FRONTEND, list(pods.values()))
    result = probe("client", "whoami", "10.96.0.10", 80, 40)
    assert result["errors"] == {} and set(result["answers"]) == set(pods)

    # A change through the API reaches the kernel: scale down to one pod.
    api.apply(web_service(lab, pods=("web-2",))[1])
    wait_backends(bpffs, FRONTEND, [pods["web-2"]], timeout=20)
    result = probe("client", "whoami", "10.96.0.10", 80, 20)
    assert result["errors"] == {} and set(result["answers"]) == {"web-2"}

    # A ConfigMap whose AgentConfig has `metadata: foo` used to crash every
    # node's agent at once; now it is a logged problem and nothing changes.
    api.apply(_config_map("apiVersion: meshbpf.io/v1alpha1\nkind: AgentConfig\nmetadata: foo\n"))
    wait_log(agent, "metadata: expected a map, got a string", timeout=20)
    assert agent.proc.poll() is None, agent.log()
    api.apply(web_service(lab, pods=("web-2", "web-3"))[1])
    wait_backends(bpffs, FRONTEND, [pods["web-2"], pods["web-3"]], timeout=20)
    result = probe("client", "whoami", "10.96.0.10", 80, 20)
    assert result["errors"] == {} and set(result["answers"]) == {"web-2", "web-3"}
    assert agent.get("/readyz")[0] == 200
