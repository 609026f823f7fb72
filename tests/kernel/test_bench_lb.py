"""The socket-LB benchmark (bench/run) as README's 100 000-Service line types
it, with --map-size, at a size a test can afford: the sizes reach the maps
(too small a map is refused by the planner's capacity check, as the agent
refuses it), and a run that fits writes its results with the sizes recorded.
Timings are not asserted: they are the benchmark's to report."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.heavy    # a benchmark (its own setup): the VMs skip it

RUN = [str(REPO / "bench" / "run"), "--quick", "--sizes", "100", "--cases", "direct,meshbpf", "--rounds", "2"]


def bench(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*RUN, "--out", str(tmp_path), *args], capture_output=True, text=True, timeout=900)


@pytest.mark.needs_feature("kernel_btf")
def test_map_sizes_reach_the_maps(tmp_path):
    small = bench(tmp_path / "small", "--map-size", "mbpf_svc=64")
    assert small.returncode != 0
    assert "services map needs 100 entries, it holds 64" in small.stderr, small.stderr[-3000:]

    fits = bench(tmp_path / "fits", "--map-size", "mbpf_svc=128", "--map-size", "mbpf_backends=1024")
    assert fits.returncode == 0, fits.stderr[-3000:]
    results = json.loads((tmp_path / "fits" / "results.json").read_text())
    assert results["config"]["map_sizes"] == {"mbpf_svc": 128, "mbpf_backends": 1024}
    assert "--map-size mbpf_svc=128" in results["command"]
    assert results["sizes"]["100"]["rounds"], "no round ran"
    # Adding one Service went through the agent's file source and its
    # incremental sync (the bench raises when the step writes nothing).
    assert results["sizes"]["100"]["add_one"]["meshbpf"]["writes"] > 0, results["sizes"]["100"]["add_one"]


def test_a_malformed_map_size_is_a_usage_error(tmp_path):
    proc = bench(tmp_path, "--map-size", "mbpf_svc")
    assert proc.returncode == 2
    assert "--map-size: give NAME=ENTRIES" in proc.stderr


@pytest.mark.needs_feature("conn_slots")
def test_the_older_designs_run_beside_meshbpf(tmp_path):
    """bench/README's side-by-side of the reverse-NAT designs: the
    meshbpf-skstorage and meshbpf-hash cases are datapaths of their own,
    built without conn_rnat and without conn_slots, serving in the same
    rounds, and their labs and pins go with the run."""
    cases = "direct,meshbpf,meshbpf-skstorage,meshbpf-hash"
    proc = subprocess.run([str(REPO / "bench" / "run"), "--quick", "--sizes", "100", "--rounds", "2",
                           "--cases", cases, "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    size = json.loads((tmp_path / "results.json").read_text())["sizes"]["100"]
    assert size["conn_rnat"] == {"meshbpf": True, "meshbpf-skstorage": False, "meshbpf-hash": True}
    assert size["conn_slots"] == {"meshbpf": True, "meshbpf-skstorage": False, "meshbpf-hash": False}
    for r in size["rounds"]:
        for case in ("meshbpf-skstorage", "meshbpf-hash"):
            assert r[case]["count"] > 0 and not r[case]["errors"], r
    snippet = (tmp_path / "README-snippet.md").read_text()
    assert "reverse NAT in socket storage" in snippet and "connection table in a hash" in snippet
    assert not list(Path("/sys/fs/bpf").glob("meshbpf-bench-*")), "bench pins left behind"
