"""README's redirection claims that had no test of their own, with real
sockets in lab pods: a run of small writes answered in between stays
spliced, podCIDRs keeps other peers unspliced, socketRedirect.cgroups limits
where sockops attaches, IPv6 pairs are spliced intact, and `meshbpf
uninstall` drains a live spliced connection without losing a byte (that
one, which removes the agent's pins, is in test_redirect.py). The others
share one lab and agent (tests/kernel/shared.py): each sets its AgentConfig."""

from __future__ import annotations

import json
import time

import pytest

from meshbpf.datapath import loader

from . import k8s
from .conftest import attached_programs
from .helpers import README_SMALL_RUN_MAX, assert_intact, counters, popen_probe, probe_result, transfer, tx_bytes
from .shared import bpffs, lab, probe, start_agent  # noqa: F401 (one lab and agent for the module)

pytestmark = pytest.mark.needs_feature("sockmap", "sockops_probe_read", "kernel_btf")

MiB = 1 << 20


def _bursts(lab, burst: int, port: int, size: int = 1024, rounds: int = 64) -> tuple[dict, dict]:
    server = popen_probe(lab, "web-1", ["burst-server", port, size, burst, rounds])
    try:
        assert json.loads(server.stdout.readline())["listening"]
        client = popen_probe(lab, "client", ["burst-client", lab.pods["web-1"].ipv4, port, size, burst, rounds])
        return probe_result(client), probe_result(server)
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


def test_ipv6_pairs_are_spliced_and_arrive_intact(lab, probe, bpffs, start_agent):
    start_agent([k8s.agent_config()])
    total = 32 * MiB
    before = counters(bpffs)
    client, server = transfer(lab, probe, 64 * 1024, total, "nagle", family=6)
    assert_intact(client, server, total)
    after = counters(bpffs)
    assert after["redirected_bytes"] - before["redirected_bytes"] >= total
    assert after["inserted_sockets"] - before["inserted_sockets"] == 2


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
    server = popen_probe(lab, "web-1", ["echo-server", port], cgroup)
    try:
        assert json.loads(server.stdout.readline())["listening"]
        client = popen_probe(lab, "client", ["stream-client", lab.pods["web-1"].ipv4, port, 4096], cgroup)
        assert json.loads(client.stdout.readline())["connected"]
        client.stdin.write("mark\n")
        client.stdin.flush()
        json.loads(client.stdout.readline())
        result = probe_result(client)
        probe_result(server)
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
    # Back to the default, so no link stays on the cgroup this test removes.
    start_agent([k8s.agent_config()])
    assert attached_programs(mesh_cgroup, [loader.ATTACH_SOCK_OPS]) == []
