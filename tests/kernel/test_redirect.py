"""Same-node socket redirection (sockops + sk_msg), with real sockets."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshbpf.datapath import redirect

from . import k8s
from .conftest import PROBE, web_service
from .helpers import README_NODELAY_SMALL_MIN, README_SMALL_RUN_MAX, README_SMALL_WRITE
from .helpers import assert_intact, counters, popen_probe, probe_result, transfer, tx_bytes

# Redirection is off on a kernel without these (meshbpf status).
pytestmark = pytest.mark.needs_feature("sockmap", "sockops_probe_read", "kernel_btf")

MiB, GiB = 1 << 20, 1 << 30


@pytest.fixture
def redirect_agent(lab, start_agent):
    return start_agent([k8s.agent_config()])


# Writes of 1 B and 64 B move less than 1 GiB: a Python sender makes about
# a million sends a second, and 1 GiB in 1-byte writes would take 20 minutes;
# 1 MiB at 1 B is a million sends each way (4 MiB took 54 s of CI).
SIZES = [(1, MiB), (64, 64 * MiB), (1024, GiB), (64 * 1024, GiB), (MiB, GiB)]


@pytest.mark.heavy
@pytest.mark.parametrize("size,total", SIZES, ids=[f"{s}B" for s, _ in SIZES])
def test_bytes_arrive_intact_when_spliced(lab, probe, bpffs, redirect_agent, size, total):
    """TCP_NODELAY senders stay spliced until the first FIN: then the pair
    moves to TCP (see on_fin in bpf/sockops.c), so the direction still
    sending finishes over TCP. Writes of 128 B - 4 KB may switch to TCP
    mid-stream instead, when one side sends a run of them unanswered."""
    before = counters(bpffs)
    client, server = transfer(lab, probe, size, total, "nodelay")
    assert_intact(client, server, total)
    after = counters(bpffs)
    switched = after["switched_pairs"] - before["switched_pairs"]
    if README_NODELAY_SMALL_MIN <= size < README_SMALL_WRITE:
        assert switched >= 1
    else:
        assert after["redirected_bytes"] - before["redirected_bytes"] >= total
        assert switched == 1  # at the FIN


@pytest.mark.heavy
@pytest.mark.parametrize("size,total", SIZES, ids=[f"{s}B" for s, _ in SIZES])
def test_bytes_arrive_intact_with_nagle(lab, probe, bpffs, redirect_agent, size, total):
    """With Nagle between two pods (a veth path, 1448-byte MSS), every
    write size stays spliced: Nagle's segments are too small to beat a
    splice per write. Both ends leave the sockhash after the FIN."""
    before = counters(bpffs)
    client, server = transfer(lab, probe, size, total, "nagle")
    assert_intact(client, server, total)
    after = counters(bpffs)
    assert after["redirected_bytes"] - before["redirected_bytes"] >= total
    assert after["switched_pairs"] - before["switched_pairs"] == 1  # at the FIN
    assert redirect.sockhash_count(bpffs) == 0  # both ends closed


def test_unanswered_small_writes_switch_to_tcp_where_tcp_batches_them(lab, probe, bpffs, redirect_agent):
    """A one-way run of small writes moves to TCP where TCP batches them
    better than a splice per write: with Nagle on a loopback-sized MSS
    (a pod talking to its own address), and with TCP_NODELAY at 128 B - 4 KB.
    Tinier TCP_NODELAY writes, and Nagle on a veth path, stay spliced.
    Either way every byte arrives in order."""
    total = 4 * MiB
    cases = [  # (pod the client runs in, write size, Nagle, switches to TCP)
        ("web-1", 64, "nagle", True),      # loopback MSS: Nagle batches 64 KB segments
        ("client", 64, "nagle", False),    # veth MSS
        ("client", 1024, "nodelay", True),
        ("client", 64, "nodelay", False),  # TCP would send each one alone
    ]
    for port, (client_pod, size, nagle, switches) in enumerate(cases, start=7010):
        before = counters(bpffs)
        client, server = transfer(lab, probe, size, total, nagle, port=port,
                                  client_pod=client_pod, server_mode="sink")
        assert server["recv_bytes"] == total and server["recv_sha"] == client["sent_sha"]
        after = counters(bpffs)
        spliced = after["redirected_bytes"] - before["redirected_bytes"]
        what = f"{size} B writes, {nagle}, from {client_pod}"
        if switches:
            assert spliced <= (README_SMALL_RUN_MAX + 1) * size, what
            assert after["evicted_sockets"] - before["evicted_sockets"] == 2, what
        else:
            assert spliced >= total, what
    assert redirect.sockhash_count(bpffs) == 0


@pytest.mark.heavy
def test_no_data_segments_on_the_wire_when_spliced(lab, probe, bpffs, redirect_agent, config):
    total = 256 * MiB
    wire_before = tx_bytes(lab, "client")
    client, server = transfer(lab, probe, 64 * 1024, total, "nagle", server_mode="sink")
    assert server["recv_bytes"] == total and server["recv_sha"] == client["sent_sha"]
    spliced_wire = tx_bytes(lab, "client") - wire_before
    assert spliced_wire < 64 * 1024, f"{spliced_wire} bytes went over eth0"  # handshake, ACKs, FIN

    # The same transfer with redirection off crosses the wire.
    k8s.write(config, [k8s.agent_config(enabled=False)])
    deadline = time.monotonic() + 5
    while list((bpffs / "links").glob("mbpf_sockops-*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not list((bpffs / "links").glob("mbpf_sockops-*")), "redirection did not turn off"
    wire_before = tx_bytes(lab, "client")
    client, server = transfer(lab, probe, 64 * 1024, total, "nagle", port=7001, server_mode="sink")
    assert server["recv_bytes"] == total and server["recv_sha"] == client["sent_sha"]
    assert tx_bytes(lab, "client") - wire_before > total


def test_half_close_msg_more_sendfile_and_peek(lab, probe, bpffs, redirect_agent, tmp_path):
    # Half-close: the duplex transfer shuts down writing and keeps reading.
    client, server = transfer(lab, probe, 4096, 8 * MiB, "nodelay")
    assert_intact(client, server, 8 * MiB)
    # MSG_MORE on every send (sk_msg cannot honour it; data must still arrive).
    client, server = transfer(lab, probe, 1000, 4 * MiB, "nodelay", port=7002,
                              flags=0x8000)  # MSG_MORE
    assert_intact(client, server, 4 * MiB)
    before = counters(bpffs)["redirected_msgs"]
    result = _edge(lab, "sendfile-peek", tmp_path)
    assert result["sendfile_ok"] and result["peek_ok"], result
    assert counters(bpffs)["redirected_msgs"] > before


def test_peer_that_closes_mid_stream(lab, bpffs, redirect_agent, tmp_path):
    result = _edge(lab, "close-mid-stream", tmp_path)
    assert result["reader_got_prefix"], result
    assert result["writer_error"] in ("EPIPE", "ECONNRESET"), result
    assert redirect.sockhash_count(bpffs) == 0


def _edge(lab, case: str, tmp_path) -> dict:
    """Runs tests/kernel/edge_cases.py: server in web-1, client in client."""
    script = PROBE.with_name("edge_cases.py")
    server = lab.popen("web-1", [sys.executable, "-u", str(script), "server", case, str(tmp_path)],
                       stdout=subprocess.PIPE, text=True)
    try:
        assert json.loads(server.stdout.readline())["listening"]
        r = lab.run("client", [sys.executable, str(script), "client", case, str(lab.pods["web-1"].ipv4),
                               str(tmp_path)], timeout=120)
        assert r.returncode == 0, r.stderr
        out, _ = server.communicate(timeout=60)
        result = json.loads(r.stdout.strip().splitlines()[-1])
        result.update(json.loads(out.strip().splitlines()[-1]))
        return result
    finally:
        if server.poll() is None:
            server.kill()


@pytest.mark.heavy
@pytest.mark.timeout(1200)  # the suite's 300 s is too short for 100 000 Python connections
def test_thousand_concurrent_then_hundred_thousand_short_connections(lab, bpffs, redirect_agent):
    script = PROBE.with_name("edge_cases.py")
    server = lab.popen("web-1", [sys.executable, "-u", str(script), "server", "echo", "-"],
                       stdout=subprocess.PIPE, text=True)
    try:
        assert json.loads(server.stdout.readline())["listening"]
        before = counters(bpffs)
        host = str(lab.pods["web-1"].ipv4)
        r = lab.run("client", [sys.executable, str(script), "client", "concurrent", host, "1000"], timeout=300)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["ok"] == 1000
        mid = counters(bpffs)
        assert mid["inserted_sockets"] - before["inserted_sockets"] == 2000
        r = lab.run("client", [sys.executable, str(script), "client", "short", host, "100000"], timeout=900)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["ok"] == 100000
        after = counters(bpffs)
        assert after["redirected_msgs"] - mid["redirected_msgs"] >= 200000  # a request and a reply each
    finally:
        server.kill()
        server.wait()
    # Every socket left the sockhash and the state map on close.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if redirect.sockhash_count(bpffs) == 0 and not redirect.read_sockets(bpffs):
            break
        time.sleep(0.1)
    assert redirect.sockhash_count(bpffs) == 0
    assert redirect.read_sockets(bpffs) == []


def test_pods_in_two_namespaces_are_spliced_and_remote_peers_are_not(lab, probe, bpffs, redirect_agent):
    before = counters(bpffs)
    client, server = transfer(lab, probe, 16 * 1024, 32 * MiB, "nagle", server_pod="web-2")
    assert_intact(client, server, 32 * MiB)
    spliced = counters(bpffs)
    # Both directions spliced until the first FIN moves the pair to TCP.
    assert spliced["redirected_bytes"] - before["redirected_bytes"] >= 32 * MiB

    # A peer that is not part of the mesh (its process is outside the cgroup,
    # as a pod on another node would be): nothing is spliced.
    wire_before = tx_bytes(lab, "client")
    client, server = transfer(lab, probe, 16 * 1024, 32 * MiB, "nagle", server_pod="web-3",
                              server_in_cgroup=False, port=7003)
    assert_intact(client, server, 32 * MiB)
    after = counters(bpffs)
    assert after["redirected_bytes"] == spliced["redirected_bytes"]
    assert after["inserted_sockets"] == spliced["inserted_sockets"] + 1  # the client side only
    assert tx_bytes(lab, "client") - wire_before > 32 * MiB


def test_service_connection_is_load_balanced_and_spliced(lab, probe, bpffs, start_agent):
    start_agent(web_service(lab) + [k8s.agent_config()])
    before = counters(bpffs)
    wire_before = tx_bytes(lab, "client")
    result = probe("client", "whoami", "10.96.0.10", 80, 40)
    assert result["errors"] == {} and len(result["answers"]) >= 2
    after = counters(bpffs)
    assert after["redirected_msgs"] - before["redirected_msgs"] >= 80  # request and response each
    # Handshakes and FINs only: no HTTP payload crossed eth0.
    assert tx_bytes(lab, "client") - wire_before < 40 * 400


@pytest.mark.bounds  # agent lifecycle under traffic: oldest kernel and the host
def test_redirection_survives_agent_death_and_restart_has_no_gap(lab, probe, bpffs, start_agent):
    agent = start_agent([k8s.agent_config()])
    server = lab.popen("web-1", [sys.executable, "-u", str(PROBE.with_name("edge_cases.py")), "server",
                                 "echo", "-"], stdout=subprocess.PIPE, text=True)
    try:
        assert json.loads(server.stdout.readline())["listening"]
        held = lab.popen("client", [sys.executable, "-u", str(PROBE.with_name("edge_cases.py")), "client",
                                    "held-echo", str(lab.pods["web-1"].ipv4)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert json.loads(held.stdout.readline())["ok"]
        agent.stop(signal.SIGKILL)
        before = counters(bpffs)
        assert probe("client", "whoami", str(lab.pods["web-2"].ipv4), 8080, 10)["errors"] == {}
        assert counters(bpffs)["redirected_msgs"] - before["redirected_msgs"] >= 20  # agent down
        start_agent()  # swaps the programs behind the pinned links
        assert probe("client", "whoami", str(lab.pods["web-2"].ipv4), 8080, 10)["errors"] == {}
        held.stdin.write("\n")
        held.stdin.flush()
        assert json.loads(held.stdout.readline())["ok"]  # the spliced connection lives on
        held.stdin.close()
        held.wait(10)
    finally:
        server.kill()
        server.wait()


def test_uninstall_drains_a_live_spliced_connection_without_losing_bytes(lab, bpffs, start_agent):
    agent = start_agent([k8s.agent_config()])
    server = popen_probe(lab, "web-1", ["echo-server", 7400])
    client = None
    try:
        assert json.loads(server.stdout.readline())["listening"]
        client = popen_probe(lab, "client", ["stream-client", lab.pods["web-1"].ipv4, 7400, 1024])
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

        out = subprocess.run([sys.executable, "-m", "meshbpf", "uninstall", "--bpffs", str(bpffs)],
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert "still spliced" not in out.stdout, out.stdout
        assert not bpffs.exists()
        at_uninstall = sent()
        assert client.poll() is None  # the connection lived through it
        while sent() < at_uninstall + 256 * 1024:  # and keeps going over plain TCP
            time.sleep(0.05)
        client.stdin.write("stop\n")
        client.stdin.flush()
        result = probe_result(client)
        assert result["recv_bytes"] == result["sent_bytes"] > at_uninstall
        assert result["recv_sha"] == result["sent_sha"], "bytes lost or reordered"
        assert probe_result(server)["echoed"] == result["sent_bytes"]
    finally:
        for p in (server, client):
            if p is not None and p.poll() is None:
                p.kill()


WAKEUP_PROBE = Path(__file__).with_name("sockmap_wakeup_probe.py")


def wakeup_probe(*args: str) -> dict:
    out = subprocess.run([sys.executable, str(WAKEUP_PROBE), *args], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_the_kernel_still_wakes_a_blocked_sockhash_reader_with_eagain():
    """The kernel fact the rule above rests on, checked on every kernel
    that runs this file: a blocking recv() on a socket in a sockhash, woken by a
    signal with no data, returns EAGAIN (plain TCP: EINTR, retried). If a
    kernel fixes tcp_bpf_recvmsg, this fails there: blocking sockets could
    then be spliced on it, behind a probe like this one."""
    plain = wakeup_probe()
    assert plain["eagain"] == 0 and plain["got"] == "x", plain
    spliced = wakeup_probe("insert")
    assert spliced["inserted"] and spliced["got"] == "x", spliced
    assert spliced["eagain"] >= 1, f"{spliced['kernel']} no longer returns EAGAIN: {spliced}"
