"""The commands the README shows, run as typed: through the installed
`meshbpf` script (the venv's bin/meshbpf), with their output read as a user
reads it. Also: the agent started from a plain, non-editable `pip install`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from meshbpf import __version__
from meshbpf.lab.netlab import Lab, list_labs

from . import k8s
from .conftest import LAB_PREFIX, web_service

pytestmark = pytest.mark.userspace

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(sys.executable).parent / "meshbpf"


def meshbpf(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)


def test_lab_up_exec_list_down(tmp_path):
    name = f"{LAB_PREFIX}typed"
    try:
        up = meshbpf("lab", "up", name, "--pods", "a")
        assert up.returncode == 0, up.stderr
        assert up.stdout.splitlines()[0].split() == ["a", "10.244.0.2", "fd00:244::2"]
        assert name in meshbpf("lab", "list").stdout.split()

        ip = meshbpf("lab", "exec", name, "a", "--", "ip", "-o", "-4", "addr", "show", "dev", "eth0")
        assert ip.returncode == 0 and "10.244.0.2/24" in ip.stdout, ip.stderr
        cgroup = meshbpf("lab", "exec", name, "a", "--", "cat", "/proc/self/cgroup")
        assert f"/meshbpf-lab-{name}" in cgroup.stdout
        assert meshbpf("lab", "exec", name, "a", "--", "sh", "-c", "exit 3").returncode == 3
        missing = meshbpf("lab", "exec", name, "nope", "--", "true")
        assert missing.returncode == 1 and len(missing.stderr.splitlines()) == 1

        down = meshbpf("lab", "down", name)
        assert down.returncode == 0 and down.stdout == f"lab {name} removed\n"
        assert name not in meshbpf("lab", "list").stdout.split()
    finally:
        if name in list_labs():
            Lab(name).down()


def test_status_service_list_sockmap_list_and_uninstall(lab, probe, bpffs, start_agent, kernel_features):
    before = meshbpf("status", "--bpffs", str(bpffs))
    assert before.returncode == 0, before.stderr
    assert before.stdout.splitlines()[0].split()[:2] == ["FEATURE", "KERNEL"]
    assert f"meshbpf is not installed in {bpffs}" in before.stdout

    start_agent(web_service(lab, pods=("web-1", "web-2")) + [k8s.agent_config()])
    status = meshbpf("status", "--bpffs", str(bpffs))
    assert status.returncode == 0, status.stderr
    assert f"installed in {bpffs}:" in status.stdout and "mbpf_svc 1" in status.stdout
    assert "  mbpf_connect4: cgroup id" in status.stdout

    services = meshbpf("service", "list", "--bpffs", str(bpffs))
    assert services.stdout.splitlines()[0].split() == ["ID", "FRONTEND", "AFFINITY", "BACKENDS"]
    assert "10.96.0.10:80/TCP" in services.stdout and f"{lab.pods['web-1'].ipv4}:8080 (ready)" in services.stdout
    raw = meshbpf("bpf", "lb", "list", "--bpffs", str(bpffs))
    assert "mbpf_svc (1 entries)" in raw.stdout and "mbpf_backends (2 entries)" in raw.stdout

    if kernel_features["sockmap"]:
        # A live connection between two pods: the sockmap view shows the pair.
        web = lab.pods["web-3"].ipv4
        held = probe.popen("client", "hold", web, 8080, "stdin")
        try:
            assert json.loads(held.stdout.readline())["first"] == "web-3"
            pairs = meshbpf("sockmap", "list", "--bpffs", str(bpffs))
            assert pairs.returncode == 0, pairs.stderr
            assert pairs.stdout.splitlines()[0].split()[:3] == ["LOCAL", "REMOTE", "MODE"]
            assert f"{web}:8080" in pairs.stdout
            assert "socket(s) in the sockhash" in pairs.stdout
        finally:
            held.communicate("\n", timeout=30)

    removed = meshbpf("uninstall", "--bpffs", str(bpffs))
    assert removed.returncode == 0, removed.stderr
    assert "removed map mbpf_svc" in removed.stdout and "removed link mbpf_connect4\n" in removed.stdout
    assert not bpffs.exists()


def test_uninstall_leaves_pins_that_are_not_meshbpf_maps(bpffs):
    # On bpffs, pinned under our names: a map of someone else's, and a folder.
    bpffs.mkdir()
    try:
        foreign = bpffs / "mbpf_svc"
        subprocess.run(["bpftool", "map", "create", str(foreign), "type", "hash", "key", "4",
                        "value", "4", "entries", "4", "name", "foreign"], check=True)
        (bpffs / "mbpf_slots").mkdir()
        out = meshbpf("uninstall", "--bpffs", str(bpffs))
        assert out.returncode == 0, out.stderr
        assert f"warning: left {foreign}: it is not a BPF map named mbpf_svc" in out.stdout
        assert f"warning: left {bpffs / 'mbpf_slots'}: it is not a BPF map named mbpf_slots" in out.stdout
        assert sorted(p.name for p in bpffs.iterdir()) == ["mbpf_slots", "mbpf_svc"]
    finally:
        for p in (bpffs / "mbpf_svc", bpffs / "mbpf_slots"):
            if p.is_dir():
                p.rmdir()
            elif p.exists():
                p.unlink()


def test_agent_from_a_plain_pip_install(lab, probe, bpffs, config, start_agent, tmp_path, monkeypatch):
    from tests.unit.test_packaging import install_copy
    site = install_copy(tmp_path / "site")
    # Only the installed copy is importable: not the checkout (cwd), and no MESHBPF_BPF_DIR.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(site))
    monkeypatch.delenv("MESHBPF_BPF_DIR", raising=False)
    agent = start_agent(web_service(lab))
    log = agent.log()
    assert f"meshbpf {__version__} from {site / 'meshbpf'} (C sources in {site / 'meshbpf' / '_bpf'})" in log
    assert probe("client", "whoami", "10.96.0.10", 80, 20)["errors"] == {}


@pytest.mark.heavy
def test_demo_script(tmp_path):
    name = f"{LAB_PREFIX}demo"  # not "demo": another run may be showing it on this machine
    out = subprocess.run([str(REPO / "scripts" / "demo"), "--name", name, "--requests", "8"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    for check in ("curl http://10.96.0.10/ (TCP, IPv4): 8 requests",
                  "curl http://[fd00:96::10]/ (TCP, IPv6): 4 requests",
                  "dig @10.96.0.53 whoami.lab TXT"):
        assert check in out.stdout
    assert "error:" not in out.stdout
    for web in ("web-1", "web-2", "web-3"):
        assert web in out.stdout
    assert "10.96.0.10:80/TCP" in out.stdout  # the service table
    # The policy step: a default deny, then an allow for shop/client only.
    denied, allowed = out.stdout.split("policy shop/allow-client:")
    assert "shop/web     10.244.0.8" in denied and "isolated  open    shop/deny-web" in denied
    for pod in ("shop/client", "client"):
        assert f"default deny: curl http://10.244.0.8:8080/ from {pod}: 3 requests\n  no answer" in denied
    assert "shop/allow-client/ingress/0" in allowed and "TCP/8080" in allowed  # policy list
    assert "from shop/client: 3 requests\n  shop/web       3" in allowed
    assert "from client: 3 requests\n  no answer (timed out)   3" in allowed
    from meshbpf.lab import demo_northsouth
    if demo_northsouth.available():  # issue 12: curl from outside to a NodePort, answered on the other node
        assert "(node1's NodePort: forwarded to node2, masqueraded): 3 requests\n  web-2, saw 10.243.0.11 " in out.stdout
        assert "(node2's NodePort: a local endpoint): 3 requests\n  web-2, saw 10.243.0.1 " in out.stdout
    else:
        assert "north-south (issue 12): not in this build; no NodePort step" in out.stdout
    assert out.stdout.rstrip().endswith("lab torn down: namespaces, cgroup, programs and pins removed")
    assert name not in list_labs() and f"{name}-ns" not in list_labs()
