"""A reader spinning on non-blocking recv() gets its pair handed to TCP.

Spliced, a busy-polling reader is 0.04-0.54x as fast as over TCP: it holds
its socket's lock most of the time and each splice into it must take that
lock (bench/README.md, "Busy-polling readers"). bpf/recv_trace.c counts
each spliced socket's empty reads on the sock_recv_length tracepoint and
sk_msg hands the pair to TCP after SPIN_RUN_MAX splices in a row that each
met SPIN_EMPTY_MIN or more (meshbpf/datapath/redirect.py). An epoll reader
makes at most one empty read per wake-up and stays spliced.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from meshbpf.datapath import loader, redirect

from . import k8s

pytestmark = pytest.mark.needs_feature("sockmap", "sockops_probe_read", "kernel_btf", "recv_tracepoint")

SCRIPT = Path(__file__).with_name("spin_probe.py")
ROUNDS = 300


def exchange(lab, bpffs, port: int, mode: str) -> tuple[dict, dict]:
    """ROUNDS request/response exchanges from `client` to a `mode` reader in
    `web-1`, checked byte for byte; returns the server's report and the
    redirection counters' deltas."""
    before = redirect.read_counters(bpffs)
    server = lab.popen("web-1", [sys.executable, "-u", str(SCRIPT), "server", str(port), mode],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert json.loads(server.stdout.readline())["listening"]
        r = lab.run("client", [sys.executable, str(SCRIPT), "client", str(lab.pods["web-1"].ipv4),
                               str(port), str(ROUNDS), mode], timeout=120)
        assert r.returncode == 0, r.stderr
        out, err = server.communicate(timeout=60)
        assert server.returncode == 0, err
    finally:
        if server.poll() is None:
            server.kill()
    client, report = json.loads(r.stdout), json.loads(out)
    assert client["bad_replies"] == 0 and (report["rounds"], report["sha"]) == (ROUNDS, client["sha"])
    after = redirect.read_counters(bpffs)
    return report, {k: after[k] - before[k] for k in after}


def test_spinning_reader_moves_to_tcp_and_epoll_reader_stays_spliced(lab, bpffs, start_agent):
    """Both ends read their answers in a loop of non-blocking recv() (as
    bench/run-redirect --spin; sockperf --nonblocked spins on the client's
    side). Then the same exchange with epoll readers, under the same agent."""
    start_agent([k8s.agent_config()])
    assert (bpffs / "links" / loader.RECV_LINK).exists()
    report, delta = exchange(lab, bpffs, 7200, "spin")
    assert report["empty_reads"] >= 2 * ROUNDS  # it did spin (this can fail)
    assert delta["inserted_sockets"] == 2  # both ends joined...
    assert delta["spinning_readers"] == 1  # ...and were handed to TCP after a few splices:
    # SPIN_RUN_MAX exchanges at best; more when the machine is loaded and an
    # exchange now and then meets fewer than SPIN_EMPTY_MIN empty reads. The
    # sockets mostly leave the sockhash too, but not always: a spinner is
    # nearly always inside recvmsg, holding its psock, so eviction may wait.
    assert delta["redirected_msgs"] <= ROUNDS, delta

    report, delta = exchange(lab, bpffs, 7201, "epoll")
    assert report["empty_reads"] <= ROUNDS + 1  # one per wake-up at most
    assert delta["spinning_readers"] == 0 and delta["passed_msgs"] == 0, delta
    assert delta["redirected_msgs"] == 2 * ROUNDS


@pytest.mark.fallback
def test_without_the_recv_tracepoint_a_spinning_reader_stays_spliced(lab, bpffs, start_agent, monkeypatch):
    """README "Kernels": before 6.3 the tracepoint is missing; redirection
    runs as before, blind to spinning readers, and every byte arrives."""
    monkeypatch.setenv("MESHBPF_DISABLE_FEATURES", "recv_tracepoint")
    agent = start_agent([k8s.agent_config()])
    assert "kernel feature recv_tracepoint is unavailable" in agent.log()
    assert not (bpffs / "links" / loader.RECV_LINK).exists()
    _, delta = exchange(lab, bpffs, 7202, "spin")
    assert delta["spinning_readers"] == 0 and delta["redirected_msgs"] == 2 * ROUNDS, delta
