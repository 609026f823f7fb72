"""The north-south benchmark (bench/run-northsouth) as a user runs it: the
quick mode finishes, every mode served every variant, and nothing it made
(lab namespaces and cgroup, the bpffs folder) is left, also when it is
stopped half-way."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from meshbpf.datapath.cgroup import cgroup2_mount
from meshbpf.lab.netlab import CGROUP_PREFIX, NETNS_PREFIX

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "bench" / "results" / "northsouth-quick.json"


def left_by(pid: int) -> list[str]:
    """What a bench process `pid` made that is still there."""
    lab = f"nsb{pid}n"
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    return ([n for n in netns if n.startswith(NETNS_PREFIX + lab)]
            + [p.name for p in cgroup2_mount().iterdir() if p.name.startswith(CGROUP_PREFIX + lab)]
            + [p.name for p in Path("/sys/fs/bpf").iterdir() if p.name == f"meshbpf-bench-ns{pid}"])


@pytest.mark.heavy   # a benchmark run: minutes, and not the product; the VMs skip it
def test_quick_run_measures_every_mode_and_leaves_nothing():
    start = time.time()
    proc = subprocess.run(["bench/run-northsouth", "--quick"], cwd=REPO, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert RESULTS.stat().st_mtime >= start
    results = json.loads(RESULTS.read_text())
    size = results["sizes"]["10"]
    assert {"direct", "tc", "iptables", "nftables"} <= set(size["modes"])
    assert "xdp" in size["modes"] or size["xdp_unavailable"]
    for variant in ("remote", "local", "udp", "flood"):
        for mode in size["modes"]:
            assert size["summary"][variant][mode]["rate"] > 0, (variant, mode)
    assert size["meshbpf_counters"]["new"] > 0
    assert set(results["maglev_build_ms"]) == {"16381", "65537"}
    assert "÷ nftables" in (REPO / "bench" / "results" / "README-northsouth-quick-snippet.md").read_text()
    for path in (RESULTS, REPO / "bench" / "results" / "README-northsouth-quick-snippet.md"):
        path.unlink()


@pytest.mark.heavy
def test_a_run_stopped_half_way_removes_what_it_made():
    proc = subprocess.Popen(["bench/run-northsouth", "--quick"], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        # bench/run-northsouth execs the bench: same pid. Stop it once its
        # rulesets and programs are in place, in the middle of the rounds.
        deadline = time.monotonic() + 900
        for line in proc.stderr:
            if "programmed" in line or time.monotonic() > deadline:
                break
        assert left_by(proc.pid), "the bench made no lab: nothing to check"
        time.sleep(2)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert left_by(proc.pid) == []


@pytest.mark.heavy
def test_the_snat_capacity_run_serves_client_closed_connections_and_leaves_nothing(tmp_path):
    """bench/snat_capacity.py as bench/README.md shows it (short runs): every
    mode served FIN-closed connections, meshbpf's tc SNATed them with no
    flow dropped for want of a port, and the lab and pins are gone."""
    subprocess.run(["bench/run-northsouth", "--help"], cwd=REPO, check=True, capture_output=True,
                   timeout=600)   # its setup builds loadgen (with -F)
    out = tmp_path / "snat.json"
    proc = subprocess.Popen([str(REPO / ".venv" / "bin" / "python"), "bench/snat_capacity.py",
                             "--seconds", "1", "--pause", "0", "--out", str(out)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    results = json.loads(out.read_text())
    modes = results["client_first"]
    assert set(modes) == set(results["server_first"]) == {"direct", "tc", "nftables"}
    for mode, result in modes.items():
        assert result["count"] > 0 and result["errors"] == 0, (mode, result)
    assert modes["tc"]["meshbpf_counters"]["snat"] > 0
    assert "drop_no_snat" not in modes["tc"]["meshbpf_counters"]
    assert all(r["count"] > 0 for r in results["server_first"].values())
    assert left_by(proc.pid) == []
