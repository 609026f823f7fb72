"""README's redirection claims that had no test of their own, with real
sockets in lab pods: a run of small writes answered in between stays
spliced, podCIDRs keeps other peers unspliced, socketRedirect.cgroups limits
where sockops attaches, IPv6 pairs are spliced intact, and `meshbpf
uninstall` drains a live spliced connection without losing a byte."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from meshbpf.datapath import loader

from . import k8s
from .conftest import PROBE, attached_programs
from .helpers import README_SMALL_RUN_MAX, assert_intact, counters, transfer, tx_bytes

pytestmark = pytest.mark.needs_feature("sockmap", "sockops_probe_read", "kernel_btf")

MiB = 1 << 20


def _popen(lab, pod: str, argv: list[str], cgroup=None) -> subprocess.Popen:
    """A probe.py command in a pod: in the lab cgroup, or moved on into
    `cgroup` (a child of it) before it starts."""
    cmd = [sys.executable, "-u", str(PROBE), *map(str, argv)]
    if cgroup is not None:
        cmd = ["sh", "-c", f'echo 0 > {cgroup}/cgroup.procs && exec "$@"', "sh", *cmd]
    return lab.popen(pod, cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen, timeout: float = 120) -> dict:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"{proc.args} exited with {proc.returncode}"
    return json.loads(out.strip().splitlines()[-1])


def _bursts(lab, burst: int, port: int, size: int = 1024, rounds: int = 64) -> tuple[dict, dict]:
    server = _popen(lab, "web-1", ["burst-server", port, size, burst, rounds])
    try:
        assert json.loads(server.stdout.readline())["listening"]
        client = _popen(lab, "client", ["burst-client", lab.pods["web-1"].ipv4, port, size, burst, rounds])
        return _result(client), _result(server)
    finally:
        for p in (server,):
            if p.poll() is None:
                p.kill()


def test_small_writes_answered_in_between_stay_spliced(lab, bpffs, start_agent):
    """README: more than 16 small sends in a row *with no reply in between*
    hand a pair to TCP. 1 KB TCP_NODELAY writes (small) in runs of 16, each
    answered, stay spliced to the end; runs of 17 switch at the first."""
    start_agent([k8s.agent_config()])
    size, rounds = 1024, 64
    before = counters(bpffs)
    client, server = _bursts(lab, README_SMALL_RUN_MAX, 7200, size, rounds)
    assert server["recv_sha"] == client["sent_sha"]
    mid = counters(bpffs)
    # Every request byte, and every one-byte reply, went socket to socket.
    assert mid["redirected_bytes"] - before["redirected_bytes"] == (README_SMALL_RUN_MAX * size + 1) * rounds
    assert mid["passed_bytes"] == before["passed_bytes"]

    client, server = _bursts(lab, README_SMALL_RUN_MAX + 1, 7201, size, rounds)
    assert server["recv_sha"] == client["sent_sha"]
    after = counters(bpffs)
    assert after["switched_pairs"] - mid["switched_pairs"] == 1
    assert after["redirected_bytes"] - mid["redirected_bytes"] == README_SMALL_RUN_MAX * size


def test_pod_cidrs_keep_other_peers_unspliced(lab, probe, bpffs, start_agent):
    """With podCIDRs, both ends must be inside: client and web-1 are, web-2
    (in the same cgroup, on the same node) is not."""
    inside = [f"{lab.pods[p].ipv4}/32" for p in ("client", "web-1")]
    start_agent([k8s.agent_config(cidrs=inside)])
    total = 8 * MiB
    before = counters(bpffs)
    client, server = transfer(lab, probe, 16 * 1024, total, server_pod="web-1")
    assert_intact(client, server, total)
    spliced = counters(bpffs)
    assert spliced["redirected_bytes"] - before["redirected_bytes"] >= total

    wire_before = tx_bytes(lab, "client")
    client, server = transfer(lab, probe, 16 * 1024, total, server_pod="web-2", port=7004)
    assert_intact(client, server, total)
    after = counters(bpffs)
    assert after["redirected_bytes"] == spliced["redirected_bytes"]
    assert after["inserted_sockets"] == spliced["inserted_sockets"]  # neither end joined
    assert tx_bytes(lab, "client") - wire_before > total


@pytest.fixture
def mesh_cgroup(lab):
    """A child of the lab's cgroup, emptied and removed after the test."""
    path = lab.cgroup / "mesh"
    path.mkdir()
    yield path
    for _ in range(100):
        pids = (path / "cgroup.procs").read_text().split()
        if not pids:
            break
        (path / "cgroup.kill").write_text("1")
        time.sleep(0.05)
    path.rmdir()


def _echo_pair(lab, port: int, cgroup=None) -> dict:
    """A short echo exchange between client and web-1, both in `cgroup`."""
    server = _popen(lab, "web-1", ["echo-server", port], cgroup)
    try:
        assert json.loads(server.stdout.readline())["listening"]
        client = _popen(lab, "client", ["stream-client", lab.pods["web-1"].ipv4, port, 4096], cgroup)
        assert json.loads(client.stdout.readline())["connected"]
        client.stdin.write("mark\n")
        client.stdin.flush()
        json.loads(client.stdout.readline())
        result = _result(client)
        _result(server)
        assert result["recv_sha"] == result["sent_sha"] and result["recv_bytes"] == result["sent_bytes"]
        return result
    finally:
        if server.poll() is None:
            server.kill()


def test_redirect_cgroups_limit_where_sockops_attaches(lab, bpffs, start_agent, mesh_cgroup):
    cgroup2 = lab.cgroup.parent
    start_agent([k8s.agent_config(cgroups=[str(mesh_cgroup.relative_to(cgroup2))])])
    assert attached_programs(mesh_cgroup, [loader.ATTACH_SOCK_OPS])
    assert attached_programs(lab.cgroup, [loader.ATTACH_SOCK_OPS]) == []

    before = counters(bpffs)
    _echo_pair(lab, 7300, cgroup=mesh_cgroup)  # both ends in the listed cgroup
    inside = counters(bpffs)
    assert inside["inserted_sockets"] - before["inserted_sockets"] == 2
    assert inside["redirected_msgs"] > before["redirected_msgs"]

    _echo_pair(lab, 7301)  # both ends in the agent's cgroup, not in the list
    outside = counters(bpffs)
    assert outside["inserted_sockets"] == inside["inserted_sockets"]
    assert outside["redirected_msgs"] == inside["redirected_msgs"]


def test_ipv6_pairs_are_spliced_and_arrive_intact(lab, probe, bpffs, start_agent):
    start_agent([k8s.agent_config()])
    total = 32 * MiB
    before = counters(bpffs)
    client, server = transfer(lab, probe, 64 * 1024, total, "nagle", family=6)
    assert_intact(client, server, total)
    after = counters(bpffs)
    assert after["redirected_bytes"] - before["redirected_bytes"] >= total
    assert after["inserted_sockets"] - before["inserted_sockets"] == 2


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meshbpf", *args], capture_output=True, text=True)


def test_uninstall_drains_a_live_spliced_connection_without_losing_bytes(lab, bpffs, start_agent):
    agent = start_agent([k8s.agent_config()])
    server = _popen(lab, "web-1", ["echo-server", 7400])
    client = None
    try:
        assert json.loads(server.stdout.readline())["listening"]
        client = _popen(lab, "client", ["stream-client", lab.pods["web-1"].ipv4, 7400, 1024])
        assert json.loads(client.stdout.readline())["connected"]

        def sent() -> int:
            client.stdin.write("mark\n")
            client.stdin.flush()
            return json.loads(client.stdout.readline())["sent"]
        deadline = time.monotonic() + 30
        while counters(bpffs)["redirected_bytes"] < 256 * 1024 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert counters(bpffs)["redirected_bytes"] >= 256 * 1024, "the stream is not spliced"
        agent.stop()

        out = _cli("uninstall", "--bpffs", str(bpffs))
        assert out.returncode == 0, out.stderr
        assert "still spliced" not in out.stdout, out.stdout
        assert not bpffs.exists()
        at_uninstall = sent()
        assert client.poll() is None  # the connection lived through it
        while sent() < at_uninstall + 256 * 1024:  # and keeps going over plain TCP
            time.sleep(0.05)
        client.stdin.write("stop\n")
        client.stdin.flush()
        result = _result(client)
        assert result["recv_bytes"] == result["sent_bytes"] > at_uninstall
        assert result["recv_sha"] == result["sent_sha"], "bytes lost or reordered"
        assert _result(server)["echoed"] == result["sent_bytes"]
    finally:
        for p in (server, client):
            if p is not None and p.poll() is None:
                p.kill()
