"""A test that fails half-way still removes everything it made."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from meshbpf.datapath.cgroup import cgroup2_mount
from meshbpf.lab.netlab import CGROUP_PREFIX, NETNS_PREFIX

REPO = Path(__file__).resolve().parents[2]

# The same on every kernel: the host runs it, the kernel matrix skips it.
pytestmark = pytest.mark.userspace

FAILING_TEST = '''
from tests.kernel.conftest import *  # noqa: F401,F403 (the real fixtures)
from tests.kernel.conftest import web_service


def test_fails_with_everything_running(lab, probe, start_agent, dns_pods):
    start_agent(web_service(lab))
    assert probe("client", "whoami", "10.96.0.10", 80, 3)["errors"] == {}
    raise RuntimeError("deliberate failure with a lab, an agent, pins and servers up")
'''


def _state(pid: int) -> tuple[set, set, set, set]:
    """What the pytest run with this pid made and left: other test runs may
    share the machine, so only names carrying its prefixes count
    (tests/kernel/conftest.py: LAB_PREFIX, PIN_PREFIX)."""
    lab, pin = f"t{pid % 10000}-", f"meshbpf-test-{pid}-"
    netns = {n for n in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
             if n.startswith(NETNS_PREFIX + lab)}
    cgroups = {p.name for p in cgroup2_mount().iterdir() if p.is_dir() and p.name.startswith(CGROUP_PREFIX + lab)}
    pins = {p.name for p in Path("/sys/fs/bpf").iterdir() if p.name.startswith(pin)}
    pids = subprocess.run(["pgrep", "-f", "meshbpf.lab.whoami|dnsmasq --keep-in-foreground|meshbpf -v agent"],
                          capture_output=True, text=True).stdout.split()
    procs = set()
    for p in pids:
        try:
            where = Path(f"/proc/{p}/cgroup").read_text() + Path(f"/proc/{p}/cmdline").read_text()
        except OSError:
            continue  # gone already
        if CGROUP_PREFIX + lab in where or pin in where:
            procs.add(p)
    return netns, cgroups, pins, procs


def test_failing_test_leaves_nothing_behind(tmp_path):
    test_file = tmp_path / "test_inner.py"
    test_file.write_text(FAILING_TEST)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             "--rootdir", str(REPO), str(test_file)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "1 failed" in out, out + err
    assert "deliberate failure" in out
    netns, cgroups, pins, procs = _state(proc.pid)
    assert netns == set(), "network namespaces left"
    assert cgroups == set(), "cgroups left"
    assert pins == set(), "bpffs pins left"
    assert procs == set(), "processes left"
