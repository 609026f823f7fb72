"""No spurious EAGAIN from blocking reads on spliced sockets (issue 15).

tcp_bpf_recvmsg, the recvmsg of every socket in a sockhash, returns EAGAIN
when a blocking read is woken with no data (on every kernel from 5.10 to
7.0). The bare ACK of a FIN is such a wake-up: a client that writes,
shuts down its sending side and reads the answer to EOF saw EAGAIN when
the server took more than the 40 ms delayed-ACK time to answer, and now
and then even when it answered at once. So sockets in blocking mode are
never spliced (bpf/lib/redir.h, sock_reads_block); these tests run that
pattern between two lab pods, pinned to one CPU and free, count EAGAINs on
both ends, and check that non-blocking applications stay spliced.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from meshbpf.datapath import redirect

from . import k8s
from .test_datapath_hardening import release_0_1_0  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.needs_feature("sockmap", "sockops_probe_read", "kernel_btf"), pytest.mark.bounds]

SCRIPT = Path(__file__).with_name("eagain_probe.py")
PINNED = ["taskset", "-c", "0"]
PINNING = pytest.mark.parametrize("pinned", [False, True], ids=["unpinned", "pinned"])


@pytest.fixture
def redirect_agent(lab, start_agent):
    return start_agent([k8s.agent_config()])


def shutdown_then_read(lab, runs: int, rounds: int, pinned: bool, port: int, think_ms: int = 0,
                       client_mode: str = "blocking", server_mode: str = "blocking",
                       listen_mode: str = "") -> tuple[dict, dict]:
    """Client in `client`, server in `web-1` (its listener in `listen_mode`,
    default `server_mode`); returns both sides' counts."""
    prefix = PINNED if pinned else []
    server = lab.popen("web-1", prefix + [sys.executable, "-u", str(SCRIPT), "server", str(port),
                                          str(think_ms), server_mode, listen_mode],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert json.loads(server.stdout.readline())["listening"]
        r = lab.run("client", prefix + [sys.executable, str(SCRIPT), "client", str(lab.pods["web-1"].ipv4),
                                        str(port), str(runs), str(rounds), client_mode], timeout=1800)
        assert r.returncode == 0, r.stderr
        out, err = server.communicate(timeout=60)
        assert server.returncode == 0, err
        return json.loads(r.stdout.strip().splitlines()[-1]), json.loads(out.strip().splitlines()[-1])
    finally:
        if server.poll() is None:
            server.kill()


def run_and_count(lab, bpffs, runs: int, pinned: bool, port: int, **kwargs) -> dict:
    """Runs the pattern; asserts every byte and no EAGAIN; returns counter deltas."""
    before = redirect.read_counters(bpffs)
    client, server = shutdown_then_read(lab, runs, 3, pinned, port, **kwargs)
    after = redirect.read_counters(bpffs)
    where = "pinned to one CPU" if pinned else "unpinned"
    assert client["runs"] == runs and server["connections"] == runs
    assert client["errors"] == 0 and server["errors"] == 0, (client, server)
    assert (client["eagain"], server["eagain"]) == (0, 0), \
        f"spurious EAGAIN {where}: client {client['eagain']}, server {server['eagain']} in {runs} runs"
    return {k: after[k] - before[k] for k in after}


@PINNING
def test_write_shutdown_read_to_eof_never_sees_eagain(lab, bpffs, redirect_agent, pinned):
    """Before the fix: 1-2 EAGAINs per 1 000 runs unpinned, now and then
    pinned (the slow-answer test below fails every time)."""
    delta = run_and_count(lab, bpffs, 1000, pinned, 7100)
    assert delta["inserted_sockets"] == 0 and delta["redirected_msgs"] == 0  # blocking: left to TCP


@PINNING
def test_slow_answer_after_eof_never_sees_eagain(lab, bpffs, redirect_agent, pinned):
    """The server answers 50 ms after the client's EOF, so the client's FIN
    is ACKed alone while the client is blocked in recv(). Before the fix:
    6-95 EAGAINs in 100 runs, pinned and unpinned (fewer on a busy machine)."""
    run_and_count(lab, bpffs, 100, pinned, 7102, think_ms=50)


def test_blocking_server_behind_non_blocking_client_moves_to_tcp(lab, bpffs, redirect_agent):
    """The client's socket is non-blocking, so it joins; the accepted socket
    is blocking. Behind a blocking listener it never joins, and the client's
    first send finds no peer; behind a non-blocking one (which the listener
    check cannot see through) it joins, and its own first send moves the
    pair to TCP. Either way every byte arrives in order."""
    for port, listen_mode, joined in ((7103, "blocking", 1), (7108, "timeout", 2)):
        delta = run_and_count(lab, bpffs, 200, False, port, think_ms=0, client_mode="timeout",
                              listen_mode=listen_mode)
        assert delta["inserted_sockets"] == joined * 200, listen_mode
        assert delta["switched_pairs"] >= 200, listen_mode
        assert redirect.sockhash_count(bpffs) == 0


@PINNING
def test_non_blocking_applications_stay_spliced(lab, bpffs, redirect_agent, pinned):
    """Sockets in non-blocking mode (event loops; Python with a timeout)
    are spliced as before: each exchange before the FIN."""
    runs, rounds = 200, 3
    delta = run_and_count(lab, bpffs, runs, pinned, 7104, client_mode="timeout", server_mode="timeout")
    assert delta["redirected_msgs"] >= runs * (2 + 2 * rounds + 1)
    assert redirect.sockhash_count(bpffs) == 0


def signalled_reader(lab, port: int, mode: str, listen_mode: str = "",
                     prefix: list[str] | None = None) -> tuple[dict, dict]:
    """A reader in `web-1` (socket in `mode`, listener in `listen_mode`,
    default `mode`), SIGALRM every 15 ms, fed by a non-blocking client in
    `client` for 1 s (both run under `prefix`, e.g. pinned); returns both
    sides' reports, checked byte for byte."""
    prefix = prefix or []
    server = lab.popen("web-1", prefix + [sys.executable, "-u", str(SCRIPT), "reader", str(port), "15", mode,
                                          listen_mode],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert json.loads(server.stdout.readline())["listening"]
        r = lab.run("client", prefix + [sys.executable, str(SCRIPT), "trickle", str(lab.pods["web-1"].ipv4),
                                        str(port), "1", "4"], timeout=60)
        assert r.returncode == 0, r.stderr
        out, err = server.communicate(timeout=60)
        assert server.returncode == 0, err
        client, reader = json.loads(r.stdout.strip().splitlines()[-1]), json.loads(out.strip().splitlines()[-1])
    finally:
        if server.poll() is None:
            server.kill()
    assert (reader["bytes"], reader["sha"]) == (client["bytes"], client["sha"])  # every byte, in order
    assert reader["signals"] >= 20, reader  # the blocked reads were interrupted: this can fail
    return client, reader


def test_blocking_reader_behind_non_blocking_client_never_sees_eagain(lab, bpffs, redirect_agent):
    """The uncovered case of issue 15 until the listener check: a blocking
    server that only reads, accepted from a blocking listener, behind a
    non-blocking client. Its socket has no file at PASSIVE_ESTABLISHED and
    it never sends, so only its listener tells that it blocks. Before the
    check the pair was spliced and 62-66 of 66 signals gave EAGAIN, pinned
    to one CPU or not (unpinned only here: CI's time is short). Beside it,
    the same reader listening non-blocking joins and stays spliced."""
    before, listeners = redirect.read_counters(bpffs), redirect.listener_count(bpffs)
    _, reader = signalled_reader(lab, 7106, "blocking")
    after = redirect.read_counters(bpffs)
    assert reader["eagain"] == 0, f"{reader['eagain']} spurious EAGAIN in {reader['signals']} signals"
    assert after["inserted_sockets"] - before["inserted_sockets"] == 1  # the client only
    assert after["redirected_msgs"] == before["redirected_msgs"]
    assert redirect.listener_count(bpffs) == listeners  # the reader's listener closed: forgotten

    # The same reader with a non-blocking listener and socket (an event
    # loop) joins and is spliced; signals are no error to it.
    before = redirect.read_counters(bpffs)
    client, reader = signalled_reader(lab, 7107, "timeout")
    after = redirect.read_counters(bpffs)
    assert reader["eagain"] == 0
    assert after["inserted_sockets"] - before["inserted_sockets"] == 2
    assert after["redirected_msgs"] - before["redirected_msgs"] >= client["chunks"]  # every send


@pytest.mark.needs_feature("recv_tracepoint")
@PINNING
def test_blocking_reader_from_non_blocking_listener_goes_to_tcp(lab, bpffs, redirect_agent, pinned):
    """The case the listener check misses: a blocking socket accepted from
    a non-blocking listener (Python with a timeout on the listener, gunicorn
    sync workers, Java NIO before configureBlocking(false)) that only
    reads, under SIGALRM every 15 ms. It joins, and its blocked reads were
    spliced: 63-66 of 66 signals gave EAGAIN. Now its first blocking read
    that returns marks it (bpf/recv_trace.c, reads_block), the client's next
    send takes TCP and the reader's socket leaves the sockhash, even while
    it sleeps in recvmsg (psock_idle); what it reads from then on is TCP's.
    bench/run-blockread: 0 of ~1 320 signals in 20 connections, pinned
    and unpinned. Between the switch and the eviction the reader still
    sleeps in the sockhash (while the peer is inside a sendmsg; with the
    10 ms grace alone, 7 EAGAIN in ~5 300 signals), so three connections
    may see at most 3 EAGAIN in ~200 signals (~195 before), to stay clear
    of flakes on a loaded VM."""
    prefix = PINNED if pinned else []
    eagain = []
    for i in range(3):
        before = redirect.read_counters(bpffs)
        client, reader = signalled_reader(lab, 7110 + i, "blocking", listen_mode="timeout", prefix=prefix)
        after = redirect.read_counters(bpffs)
        eagain.append((reader["eagain"], reader["signals"], reader.get("eagain_at")))
        assert reader["eagain"] <= 2, f"spurious EAGAIN (count, signals, after byte): {eagain}"
        assert after["inserted_sockets"] - before["inserted_sockets"] == 2  # both joined
        assert after["switched_pairs"] > before["switched_pairs"]  # ... and went to TCP
        # at most a few sends spliced before the reader's first read returned
        assert after["redirected_msgs"] - before["redirected_msgs"] < client["chunks"] // 4
        assert redirect.sockhash_count(bpffs) == 0
    assert sum(n for n, *_ in eagain) <= 3, f"spurious EAGAIN (count, signals, after byte): {eagain}"


@pytest.mark.heavy
@PINNING
def test_ten_thousand_runs_never_see_eagain(lab, bpffs, redirect_agent, pinned):
    run_and_count(lab, bpffs, 10000, pinned, 7101)
    run_and_count(lab, bpffs, 10000, pinned, 7105, client_mode="timeout")


def test_pair_spliced_by_0_1_0_lives_on_after_the_upgrade(lab, bpffs, start_agent, release_0_1_0,
                                                          monkeypatch):
    """mbpf_sockstate keeps its size: 0.1.0's unread pass_since_ns became
    sk_addr. A pair 0.1.0 spliced holds a timestamp there (or 0), which
    reads as "not blocking", so it stays spliced under this build, and its
    bytes keep arriving."""
    script = Path(__file__).with_name("edge_cases.py")
    with monkeypatch.context() as old_build:  # `python -m meshbpf` from the 0.1.0 sources
        old_build.chdir(release_0_1_0)
        old_build.setenv("PYTHONPATH", str(release_0_1_0))
        old = start_agent([k8s.agent_config()])
    server = lab.popen("web-1", [sys.executable, "-u", str(script), "server", "echo", "-"],
                       stdout=subprocess.PIPE, text=True)
    held = None
    try:
        assert json.loads(server.stdout.readline())["listening"]
        before = redirect.read_counters(bpffs)
        held = lab.popen("client", [sys.executable, "-u", str(script), "client", "held-echo",
                                    str(lab.pods["web-1"].ipv4)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert json.loads(held.stdout.readline())["ok"]
        assert redirect.read_counters(bpffs)["redirected_msgs"] - before["redirected_msgs"] >= 2
        old.stop()
        start_agent()
        mid = redirect.read_counters(bpffs)
        held.stdin.write("\n")
        held.stdin.flush()
        assert json.loads(held.stdout.readline())["ok"]  # echoed after the swap
        assert redirect.read_counters(bpffs)["redirected_msgs"] - mid["redirected_msgs"] >= 2  # spliced
        out, _ = held.communicate("\n", timeout=30)
        assert json.loads(out.strip().splitlines()[-1]) == {"done": True}
    finally:
        for proc in (held, server):
            if proc and proc.poll() is None:
                proc.kill()
                proc.wait()

