"""bench/footprint.py, run as README shows it (small sizes): a cold start
writes the maps, and --restart starts over maps a first run filled, as a
restarted agent finds them pinned, so it writes nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def footprint(*args: str) -> dict:
    done = subprocess.run([sys.executable, "bench/footprint.py", "--size", "300", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


@pytest.mark.parametrize("restart", [False, True])
def test_a_restart_over_filled_maps_writes_nothing_and_a_cold_start_writes_them(restart):
    out = footprint(*(["--restart"] if restart else []))
    assert out["restart"] is restart and out["services"] == 300
    assert (out["maps_written"] == 0) is restart
    assert out["after_start"]["rss_mb"] > 0


def test_stages_report_the_allocators_around_the_build_and_the_lb_sync():
    stages = [name for name, view in footprint("--stages")["stages"] if view["rss_mb"] > 0]
    assert stages == ["source build <", "source build >", "LB sync <", "LB sync >"]


def test_the_file_source_reports_its_index_its_held_objects_and_its_records():
    out = footprint("--source", "file", "--stages")
    assert out["source"] == "file" and out["maps_written"] > 0
    parts = out["live_by_root"]
    for part in ("source: ServiceIndex (ports_of, owner, slices_of, ...)",
                 "source: objects held (compact JSON text)",
                 "source: the files' records (digests and keys per piece)"):
        assert parts[part]["objects"] > 0, part  # the index was built in the read
    assert [name for name, _ in out["stages"]] == ["source poll <", "source poll >", "LB sync <", "LB sync >"]
