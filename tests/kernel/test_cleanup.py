"""A test that fails half-way still removes everything it made."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from meshbpf.datapath.cgroup import cgroup2_mount

REPO = Path(__file__).resolve().parents[2]

FAILING_TEST = '''
from tests.kernel.conftest import *  # noqa: F401,F403 (the real fixtures)
from tests.kernel.conftest import web_service


def test_fails_with_everything_running(lab, probe, start_agent, dns_pods):
    start_agent(web_service(lab))
    assert probe("client", "whoami", "10.96.0.10", 80, 3)["errors"] == {}
    raise RuntimeError("deliberate failure with a lab, an agent, pins and servers up")
'''


def _state() -> tuple[set, set, set, str]:
    netns = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())
    cgroups = {p.name for p in cgroup2_mount().iterdir() if p.is_dir()}
    pins = {p.name for p in Path("/sys/fs/bpf").iterdir()}
    procs = subprocess.run(["pgrep", "-f", "meshbpf.lab.whoami|dnsmasq --keep-in-foreground|meshbpf -v agent"],
                           capture_output=True, text=True).stdout
    return netns, cgroups, pins, procs


def test_failing_test_leaves_nothing_behind(tmp_path):
    test_file = tmp_path / "test_inner.py"
    test_file.write_text(FAILING_TEST)
    before = _state()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "--rootdir", str(REPO), str(test_file)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert "1 failed" in run.stdout, run.stdout + run.stderr
    assert "deliberate failure" in run.stdout
    after = _state()
    # Other test runs may share the machine: only look at what appeared.
    assert after[0] - before[0] == set(), "network namespaces left"
    assert after[1] - before[1] == set(), "cgroups left"
    assert after[2] - before[2] == set(), "bpffs pins left"
    assert set(after[3].split()) - set(before[3].split()) == set(), "processes left"
