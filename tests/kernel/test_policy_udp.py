"""UDP under NetworkPolicy, with real datagrams through a real agent
(issue 10): what happens to replies and to an established UDP "flow" (one
client socket, one 5-tuple) when a policy starts denying.

- Replies of an allowed flow pass, even from a pod whose egress allows
  nothing (the flow's conntrack entry, made by its first datagram).
- An ICMP error about an allowed flow (port unreachable) passes like a
  reply, out of the server and into the client, both isolated: the client
  gets ECONNREFUSED at once instead of a timeout.
- A flow that was allowed before the deny keeps passing in both directions
  (as with iptables' or Cilium's conntrack: only new flows are checked);
  a new flow (another source port) is dropped.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshbpf.lab.objects import lab_objects
from meshbpf.lab.workloads import wait_for

from . import k8s
from .test_policy_agent import NODE, netpol

PROBE = Path(__file__).with_name("udp_flow_probe.py")
PORT = 5353
CLOSED = 5354  # nobody listens: x/b's stack answers with an ICMP port unreachable


class UdpFlow:
    """One client socket in a pod: every datagram of it is one flow."""

    def __init__(self, lab, pod: str, host: str, port: int = PORT):
        self.proc = lab.popen(pod, [sys.executable, str(PROBE), "client", host, str(port)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.port = json.loads(self.proc.stdout.readline())["port"]
        self.sent = 0

    def answered(self) -> bool:
        """Sends one datagram: did its answer come back?"""
        self.sent += 1
        self.proc.stdin.write(f"d{self.sent}\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["reply"] is not None

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(10)


def start_echo(lab, pod: str) -> subprocess.Popen:
    proc = lab.popen(pod, [sys.executable, str(PROBE), "echo", str(PORT)], stdout=subprocess.PIPE, text=True)
    assert json.loads(proc.stdout.readline()) == {"listening": True}
    return proc


def new_flow_answered(lab, pod: str, host: str) -> bool:
    flow = UdpFlow(lab, pod, host)
    try:
        return flow.answered()
    finally:
        flow.close()


@pytest.mark.bounds  # the same programs as TCP's established-flow test, which every VM runs
def test_udp_replies_pass_and_an_established_flow_outlives_a_new_deny(lab, start_agent, config):
    for p in ("x/a", "x/b"):
        lab.add_pod(p)
    start_echo(lab, "x/b")
    b = str(lab.pods["x/b"].ipv4)
    world = [lab_objects([lab.pods["x/a"], lab.pods["x/b"]], NODE)]
    allow_a = netpol("b-in", "x", {"pod": "b"}, ingress=[{
        "from": [{"podSelector": {"matchLabels": {"pod": "a"}}}],
        "ports": [{"protocol": "UDP", "port": PORT}, {"protocol": "UDP", "port": CLOSED}]}])
    no_egress = netpol("b-out", "x", {"pod": "b"}, egress=[], types=["Egress"])
    a_closed = netpol("a-in", "x", {"pod": "a"}, ingress=[])
    start_agent(world + [allow_a, no_egress, a_closed], "--node-name", NODE, "--node-netns", lab.node_ns)

    flow = UdpFlow(lab, "x/a", b)
    wait_for(flow.answered, 20, "x/a's datagrams to be answered (policy in force)")
    assert flow.answered(), "a reply passes x/b's egress, which allows nothing: it is a reply"
    refused = lab.run("x/a", [sys.executable, str(PROBE), "ask", b, str(CLOSED)], check=True)
    assert json.loads(refused.stdout) == {"error": "ConnectionRefusedError"}, "the port unreachable came through"

    k8s.write(config, world + [netpol("b-in", "x", {"pod": "b"}, ingress=[]), no_egress, a_closed])
    wait_for(lambda: not new_flow_answered(lab, "x/a", b), 20, "a new UDP flow to be denied")
    assert not new_flow_answered(lab, "x/a", b)
    assert all(flow.answered() for _ in range(3)), "the flow allowed before the deny goes on"
    flow.close()


@pytest.mark.bounds
def test_an_idle_udp_flow_is_judged_afresh(lab, bpffs):
    """A UDP 5-tuple allowed once passes a later deny only while it stays
    active: idle past the conntrack timeout, its next datagram is a new
    flow. With x/a's egress open (it re-records the flow at its end), x/b's
    ingress must still judge it: the old mark at x/b's end no longer counts.
    An allowed flow idle as long goes on (judged afresh, allowed)."""
    from meshbpf.datapath.endpoints import find_endpoint
    from meshbpf.datapath.loader import uninstall
    from meshbpf.datapath.policy import PolicyDatapath, PolicyMaps, addr_bytes
    from meshbpf.reconcile.policy_keys import (DIR_IN, EP_ISOLATE_IN, EpVal, PeerKey, PeerVal,
                                               PolicyStep, PortKey, PortVal)
    idle = 4  # seconds; each step below takes far less, even emulated
    for p in ("x/a", "x/b"):
        lab.add_pod(p)
    start_echo(lab, "x/b")
    a, b = lab.pods["x/a"], lab.pods["x/b"]
    dp = PolicyDatapath(bpffs, netns=lab.node_ns, ct_idle_s=idle)
    try:
        dp.compile()
        ifindex = {p: find_endpoint(lab.pods[p].uid, [lab.pods[p].ipv4], lab.cgroup) for p in ("x/a", "x/b")}
        for i in ifindex.values():
            dp.attach(i)
        with PolicyMaps(bpffs) as maps:
            maps.apply([
                PolicyStep("peers", "update", {PeerKey(2, 0, DIR_IN, addr_bytes(a.ipv4), 128): PeerVal(1, 0, 0)}),
                PolicyStep("ports", "update", {PortKey(2, 0, DIR_IN, 17, 1, PORT, 16): PortVal(9)}),
                PolicyStep("addresses", "update", {addr_bytes(a.ipv4): 1, addr_bytes(b.ipv4): 2}),
                PolicyStep("endpoints", "update", {ifindex["x/a"]: EpVal(1, 0, 0),
                                                   ifindex["x/b"]: EpVal(2, 0, EP_ISOLATE_IN)})])
            flow = UdpFlow(lab, "x/a", str(b.ipv4))
            try:
                assert flow.answered()
                time.sleep(idle + 1.5)  # the timeout itself is what is tested
                assert flow.answered(), "idle past the timeout, still allowed: judged afresh, passes"
                # generation 1 holds no rules: deny all, flipped in one update
                maps.apply([PolicyStep("endpoints", "update", {ifindex["x/b"]: EpVal(2, 1, EP_ISOLATE_IN)})])
                assert flow.answered(), "active: the established flow goes on"
                assert not new_flow_answered(lab, "x/a", str(b.ipv4))
                time.sleep(idle + 1.5)
                assert not flow.answered(), "idle past the timeout: a new flow, denied"
            finally:
                flow.close()
    finally:
        dp.bpf = None
        if bpffs.exists():
            uninstall(bpffs)
