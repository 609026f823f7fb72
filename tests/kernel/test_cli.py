"""The node CLI reads the pinned maps, with or without the agent."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from . import k8s
from .conftest import web_service


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meshbpf", *args], capture_output=True, text=True)


@pytest.mark.bounds  # map reading is the same on every kernel the LB tests cover
def test_service_list_and_bpf_lb_list_with_and_without_the_agent(lab, bpffs, start_agent):
    objects = web_service(lab, pods=("web-1", "web-2"), affinity_timeout=300)
    objects += [k8s.service("empty", ["10.96.0.20"], [k8s.port("dns", 53, 53, "UDP")])]
    agent = start_agent(objects)
    for running in (True, False):
        table = _cli("service", "list", "--bpffs", str(bpffs))
        assert table.returncode == 0, table.stderr
        assert "10.96.0.10:80/TCP" in table.stdout and "ClientIP 300s" in table.stdout
        assert f"{lab.pods['web-1'].ipv4}:8080 (ready)" in table.stdout
        assert "10.96.0.20:53/UDP" in table.stdout and "none: connections are refused" in table.stdout

        view = json.loads(_cli("service", "list", "--bpffs", str(bpffs), "-o", "json").stdout)
        web = next(s for s in view if s["frontend"] == "10.96.0.10:80/TCP")
        assert web["affinity_timeout"] == 300
        assert sorted(b["address"] for b in web["backends"]) == [
            f"{lab.pods['web-1'].ipv4}:8080", f"{lab.pods['web-2'].ipv4}:8080"]
        assert {b["state"] for b in web["backends"]} == {"ready"}

        raw = json.loads(_cli("bpf", "lb", "list", "--bpffs", str(bpffs), "-o", "json").stdout)
        assert len(raw["services"]) == 2 and len(raw["slots"]) == 2 and len(raw["backends"]) == 2
        slot_backends = {s["backend_id"] for s in raw["slots"]}
        assert slot_backends == {b["backend_id"] for b in raw["backends"]}
        text = _cli("bpf", "lb", "list", "--bpffs", str(bpffs))
        assert "mbpf_svc (2 entries)" in text.stdout and "mbpf_slots (2 entries)" in text.stdout
        if running:
            agent.stop()


@pytest.mark.userspace
def test_cli_says_clearly_when_nothing_is_installed(tmp_path):
    missing = "/sys/fs/bpf/meshbpf-test-not-there"
    for args in (["service", "list"], ["bpf", "lb", "list"], ["service", "list", "-o", "json"]):
        out = _cli(*args, "--bpffs", missing)
        assert out.returncode == 1
        assert "meshbpf is not installed" in out.stderr
        assert "Traceback" not in out.stderr
    out = _cli("uninstall", "--bpffs", missing)
    assert out.returncode == 0 and "nothing to remove" in out.stdout
