"""The sidecar capture benchmark runs as a user types it (bench/run-capture
--quick): every path carries its traffic through HAProxy, which names the
Service (the benchmark checks that itself and fails otherwise), the results
are written, and the benchmark leaves nothing behind. Timings are not
asserted: they are the benchmark's to report."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from meshbpf.lab.netlab import NETNS_PREFIX

REPO = Path(__file__).resolve().parents[2]
PATHS = ("iptables", "meshbpf", "meshbpf+redirect", "uncaptured")


@pytest.mark.heavy      # a benchmark: the VMs skip it
@pytest.mark.needs_feature("capture", "sockmap", "sockops_probe_read", "kernel_btf")
@pytest.mark.skipif(not shutil.which("haproxy"), reason="needs haproxy (scripts/setup.sh installs it)")
def test_quick_capture_benchmark_runs_as_typed(tmp_path):
    proc = subprocess.Popen([str(REPO / "bench" / "run-capture"), "--quick", "--out", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=1200)
    assert proc.returncode == 0, f"bench/run-capture --quick failed:\n{err[-4000:]}"

    report = json.loads((tmp_path / "capture.json").read_text())
    (only,) = report["rounds"]
    for path in PATHS:
        assert only[path]["crr"]["count"] > 0 and only[path]["crr"]["errors"] == 0, (path, only[path])
        assert only[path]["rr"]["count"] > 0, (path, only[path])
    assert only["meshbpf+redirect"]["redirect_counters"]["redirected_msgs"] > 0, "no hop was spliced"
    snippet = (tmp_path / "README-capture-snippet.md").read_text()
    assert snippet in out
    assert "load average before" in snippet and "Targets" in snippet
    for name in ("Istio iptables REDIRECT capture", "meshbpf capture", "meshbpf capture + redirection",
                 "no capture: the app connects to HAProxy (the ceiling)"):
        assert f"| {name} |" in snippet
    assert "The ceiling" in snippet

    # run-capture execs the benchmark: its pid names the lab and the pins.
    pid = proc.pid
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"{NETNS_PREFIX}cap{pid % 10000}-" not in netns
    assert not list(Path("/sys/fs/bpf").glob(f"meshbpf-bench-capture-{pid}-*"))
