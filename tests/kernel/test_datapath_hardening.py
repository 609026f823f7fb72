"""Datapath hardening (issue 9, part C), with real traffic in lab pods:
socket-LB counters, stale reverse NAT, torn reads, sock keys per network
namespace."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from . import k8s
from .conftest import web_service
from .helpers import metric, services

# A UDP server for a backend pod: answers each datagram with b"1" and, on a
# line on stdin, sends b"2" to everyone it heard from, unasked: a late reply.
UDP_SERVER = r"""
import json, select, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
print(json.dumps({"listening": True}), flush=True)
peers = set()
while True:
    ready, _, _ = select.select([s, sys.stdin], [], [])
    if s in ready:
        _, addr = s.recvfrom(100)
        peers.add(addr)
        s.sendto(b"1", addr)
    if sys.stdin in ready:
        if not sys.stdin.readline():
            break
        for addr in peers:
            s.sendto(b"2", addr)
        print(json.dumps({"sent": len(peers)}), flush=True)
"""

# A UDP client: one unconnected and one connected socket ask the service;
# after a line on stdin, it reads the late reply and asks getpeername again.
UDP_CLIENT = r"""
import json, socket, sys
svc = (sys.argv[1], int(sys.argv[2]))
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for s in (u, c):
    s.settimeout(5)
u.sendto(b"x", svc)
_, first = u.recvfrom(100)
c.connect(svc)
c.send(b"x")
c.recv(100)
print(json.dumps({"from": list(first), "peer": list(c.getpeername())}), flush=True)
sys.stdin.readline()
_, late = u.recvfrom(100)
print(json.dumps({"from": list(late), "peer": list(c.getpeername())}), flush=True)
"""


def lb_counter(agent, result: str, family: str = "ipv4", protocol: str = "tcp") -> float:
    _, text = agent.get("/metrics")
    value = metric(text, "meshbpf_lb_connections_total",
                   f'family="{family}",protocol="{protocol}",result="{result}"')
    assert value is not None, f"no meshbpf_lb_connections_total{{result={result}}} in:\n{text}"
    return value


def _udp_service(lab, ip: str, port: int, pod: str) -> list[dict]:
    return [
        k8s.service("late", [ip], [k8s.port("udp", port, port, "UDP")]),
        k8s.endpoint_slice("late-1", "late", [k8s.endpoint(str(lab.pods[pod].ipv4))],
                           [k8s.slice_port("udp", port, "UDP")]),
    ]


def test_lb_counters_count_translations_and_refusals(lab, probe, start_agent, kernel_features):
    empty = k8s.service("empty", ["10.96.0.20"], [k8s.port("http", 80, 8080), k8s.port("dns", 53, 53, "UDP")])
    agent = start_agent(web_service(lab) + [empty])
    translated, refused = lb_counter(agent, "translated"), lb_counter(agent, "refused")
    refused_udp = lb_counter(agent, "refused", protocol="udp")

    result = probe("client", "whoami", "10.96.0.10", 80, 25)
    assert result["errors"] == {}
    assert lb_counter(agent, "translated") - translated == 25
    assert lb_counter(agent, "refused") == refused

    probe("client", "connect-error", "10.96.0.20", 80)
    probe("client", "udp-send-error", "10.96.0.20", 53)
    assert lb_counter(agent, "refused") - refused == 1
    assert lb_counter(agent, "refused", protocol="udp") - refused_udp == 1
    assert lb_counter(agent, "translated") - translated == 25

    # Every map metric labels the map the same way.
    _, text = agent.get("/metrics")
    map_lines = [line for line in text.splitlines() if line.startswith("meshbpf_map_") and "{" in line
                 and not line.startswith("meshbpf_map_writes")]  # AgentMetrics: not this module's
    assert map_lines and all(line.split("{")[1].startswith('map_name="') for line in map_lines), map_lines


def test_stale_reverse_nat_is_not_applied(lab, bpffs, config, start_agent):
    """A reply that arrives after its service is gone must show the
    backend's own address: the service it was translated for no longer
    exists, and another service may take its address."""
    port, ip = 5300, "10.96.0.30"
    keep = web_service(lab)  # the config stays non-empty and valid
    agent = start_agent(keep + _udp_service(lab, ip, port, "web-1"))
    server = lab.popen("web-1", [sys.executable, "-u", "-c", UDP_SERVER, str(port)],
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    client = lab.popen("client", [sys.executable, "-u", "-c", UDP_CLIENT, ip, str(port)],
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert json.loads(server.stdout.readline())["listening"]
        first = json.loads(client.stdout.readline())
        assert first == {"from": [ip, port], "peer": [ip, port]}
        stale_before = lb_counter(agent, "rnat_stale", protocol="udp")

        k8s.write(config, keep)
        deadline_waits = 0
        while f"{ip}:{port}/UDP" in services(bpffs):
            deadline_waits += 1
            assert deadline_waits < 500, "the agent did not remove the service"
            subprocess.run(["sleep", "0.02"])
        server.stdin.write("again\n")
        server.stdin.flush()
        assert json.loads(server.stdout.readline())["sent"] == 2
        client.stdin.write("go\n")
        client.stdin.flush()
        late = json.loads(client.stdout.readline())
        backend = str(lab.pods["web-1"].ipv4)
        assert late == {"from": [backend, port], "peer": [backend, port]}, late
        # recvfrom and getpeername each met a stale entry.
        assert lb_counter(agent, "rnat_stale", protocol="udp") - stale_before == 2
    finally:
        for proc in (client, server):
            proc.kill()
            proc.wait()


# One pod's loopback pair on fixed ports (127.0.0.1:47100 -> 127.0.0.1:7100),
# the same tuple in every pod. After a line on stdin, the client sends argv[1]
# random bytes and the server reads them to EOF.
LOOPBACK_PAIR = r"""
import hashlib, json, os, socket, sys, threading
total = int(sys.argv[1])
ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("127.0.0.1", 7100))
ls.listen(1)
c = socket.socket()
c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
c.bind(("127.0.0.1", 47100))
c.connect(("127.0.0.1", 7100))
s, _ = ls.accept()
print(json.dumps({"connected": True}), flush=True)
sys.stdin.readline()
got = {}
def serve():
    h, n = hashlib.sha256(), 0
    while True:
        try:
            data = s.recv(1 << 16)
        except BlockingIOError:  # tcp_bpf_recvmsg's spurious EAGAIN (README)
            continue
        if not data:
            break
        h.update(data)
        n += len(data)
    got.update(recv_sha=h.hexdigest(), recv_bytes=n)
reader = threading.Thread(target=serve)
reader.start()
h = hashlib.sha256()
for _ in range(total // 16384):
    block = os.urandom(16384)
    c.sendall(block)
    h.update(block)
c.shutdown(socket.SHUT_WR)
reader.join()
print(json.dumps({"sent_sha": h.hexdigest(), **got}), flush=True)
"""


def _run_loopback_pairs(lab, bpffs, pods, total) -> tuple[list[dict], int, int]:
    """Runs LOOPBACK_PAIR in each pod at once; returns their results, the
    sockets in the sockhash while all pairs were up, and the bytes spliced."""
    from meshbpf.datapath import redirect

    procs = [lab.popen(pod, [sys.executable, "-u", "-c", LOOPBACK_PAIR, str(total)],
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for pod in pods]
    try:
        for proc in procs:  # every pair established (and in the sockhash) at once
            assert json.loads(proc.stdout.readline())["connected"]
        before = redirect.read_counters(bpffs)
        in_sockhash = redirect.sockhash_count(bpffs)
        for proc in procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results = [json.loads(proc.stdout.readline()) for proc in procs]
        spliced = redirect.read_counters(bpffs)["redirected_bytes"] - before["redirected_bytes"]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    for pod, r in zip(pods, results):
        assert r["recv_bytes"] == total and r["recv_sha"] == r["sent_sha"], pod
    return results, in_sockhash, spliced


@pytest.mark.needs_feature("sockmap", "sockops_probe_read", "kernel_btf", "redir_netns_cookie")
def test_identical_loopback_pairs_in_two_pods_are_each_spliced_intact(lab, bpffs, start_agent):
    """Two pods, each with a loopback connection on the same ports: their
    sockhash keys must differ (the network namespace is part of the key),
    or the second pair collides with the first."""
    total = 8 << 20
    start_agent([k8s.agent_config(cidrs=())])
    _, in_sockhash, spliced = _run_loopback_pairs(lab, bpffs, ("client", "client2"), total)
    assert in_sockhash == 4
    assert spliced == 2 * total


@pytest.mark.needs_feature("sockmap", "sockops_probe_read", "kernel_btf")
def test_without_netns_cookie_loopback_pairs_are_left_to_tcp(lab, bpffs, start_agent, monkeypatch):
    monkeypatch.setenv("MESHBPF_DISABLE_FEATURES", "redir_netns_cookie")
    agent = start_agent([k8s.agent_config(cidrs=())])
    assert "loopback connections are not spliced" in agent.log()
    _, in_sockhash, spliced = _run_loopback_pairs(lab, bpffs, ("client", "client2"), 1 << 20)
    assert in_sockhash == 0 and spliced == 0
