"""UDP under NetworkPolicy, with real datagrams through a real agent
(issue 10): what happens to replies and to an established UDP "flow" (one
client socket, one 5-tuple) when a policy starts denying.

- Replies of an allowed flow pass, even from a pod whose egress allows
  nothing (the flow's conntrack entry, made by its first datagram).
- A flow that was allowed before the deny keeps passing in both directions
  (as with iptables' or Cilium's conntrack: only new flows are checked);
  a new flow (another source port) is dropped.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from meshbpf.lab.objects import lab_objects
from meshbpf.lab.workloads import wait_for

from . import k8s
from .test_policy_agent import NODE, netpol

PROBE = Path(__file__).with_name("udp_flow_probe.py")
PORT = 5353


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


def test_udp_replies_pass_and_an_established_flow_outlives_a_new_deny(lab, start_agent, config):
    for p in ("x/a", "x/b"):
        lab.add_pod(p)
    start_echo(lab, "x/b")
    b = str(lab.pods["x/b"].ipv4)
    world = [lab_objects([lab.pods["x/a"], lab.pods["x/b"]], NODE)]
    allow_a = netpol("b-in", "x", {"pod": "b"}, ingress=[{
        "from": [{"podSelector": {"matchLabels": {"pod": "a"}}}],
        "ports": [{"protocol": "UDP", "port": PORT}]}])
    no_egress = netpol("b-out", "x", {"pod": "b"}, egress=[], types=["Egress"])
    start_agent(world + [allow_a, no_egress], "--node-name", NODE, "--node-netns", lab.node_ns)

    flow = UdpFlow(lab, "x/a", b)
    wait_for(flow.answered, 20, "x/a's datagrams to be answered (policy in force)")
    assert flow.answered(), "a reply passes x/b's egress, which allows nothing: it is a reply"

    k8s.write(config, world + [netpol("b-in", "x", {"pod": "b"}, ingress=[]), no_egress])
    wait_for(lambda: not new_flow_answered(lab, "x/a", b), 20, "a new UDP flow to be denied")
    assert not new_flow_answered(lab, "x/a", b)
    assert all(flow.answered() for _ in range(3)), "the flow allowed before the deny goes on"
    flow.close()
