"""The upstream Kubernetes NetworkPolicy e2e cases with real traffic through
the agent (issue 10): the 9-pod world x, y, z by a, b, c, each pod serving
TCP and UDP on 80 and 81, the full 9x9x2x2 matrix probed from inside the
pods after every change (tests/kernel/netpol_lab.py).

One lab and one agent serve the module (an agent start is ~10 s of
compiling under the VMs' emulation). Every upstream case runs on the host,
marked `heavy`; the VMs run the four of test_representative_cases, the
Service address and the established flow (README, NetworkPolicy).

Seen failing against deliberately broken builds (each edit made by hand,
run, reverted):
- planner ignores egress isolation (reconcile/policy.py endpoint_rules):
  test_representative_cases, default-deny-all;
- PolicySync compares only namespaces and policies, not pods: test_a_relabelled_pod;
- PolicySync.start() detaches, sleeps 1 s, re-attaches: test_agent_restart_opens_no_window
  (both), ~100 denied connections passed;
- PolicySync empties mbpf_ct after each change: test_an_established_flow_survives_a_deny;
- the source drops the previous version of a bad policy (kube_policy.policy_fields):
  test_bad_policy_objects_are_left_out_and_the_rest_applies;
- endpoints flipped before their rules, 10 ms before the peer writes: 4 allowed
  connections failed in test_policy_edits_while_traffic_flows (a flip-first order
  with no delay, a window of microseconds, is too short for the flood to see);
- PolicySync skips a change that removes the last policy: test_a_deleted_policy;
- the anti-spoofing check off in bpf/policy.c: test_a_spoofed_source_is_dropped;
- PolicySync never applies: every test here.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from meshbpf.lab.netlab import CGROUP_PREFIX, NETNS_PREFIX, Lab

from . import k8s
from .conftest import AGENT_READY_TIMEOUT, BPFFS_ROOT, LAB_PREFIX, PIN_PREFIX, _names, _snapshot
from .helpers import wait_log
from .netpol_lab import (PODS, PolicyLab, assert_holds, assert_reaches, expected, start_servers, write_json,
                         upstream)

pytestmark = pytest.mark.bounds  # the host only in CI (tests/conftest.py)

MATRIX_PROBE = Path(__file__).with_name("matrix_probe.py")
POLICY_PROBE = Path(__file__).with_name("policy_probe.py")

CASES = {c[0]: c for c in upstream.CASES}
# What the VMs run: isolation both ways, a namespaceSelector with a named
# port, an ipBlock with except, and UDP ports.
REPRESENTATIVE = ["default-deny-all", "ingress from namespace on one named port",
                  "except clause in an egress CIDR block", "UDP ports"]
SERVICE_IP = "10.96.0.10"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The 9 pods serving, and an agent on them. Made before the first
    test's no_leaks snapshot and removed after the last one's, so it checks
    its own removal."""
    name = f"{LAB_PREFIX}{next(_names)}"
    config = tmp_path_factory.mktemp("policy-e2e") / "world.yaml"
    bpffs = BPFFS_ROOT / f"{PIN_PREFIX}{next(_names)}"
    with Lab(name) as lab:
        lab.up(PODS)
        start_servers(lab)
        w = PolicyLab(lab, bpffs, config)
        try:
            write_json(config, objects(w, []))
            w.start_agent(AGENT_READY_TIMEOUT)
            yield w
        finally:
            print(f"--- agent logs ---\n{w.log()}")
            for agent in reversed(w.agents):  # the running one first
                agent.cleanup()
    ours = {CGROUP_PREFIX + name, bpffs.name}
    left = {k: sorted(n for n in v if n in ours or n.startswith(f"{NETNS_PREFIX}{name}-"))
            for k, v in _snapshot().items()}
    assert not any(left.values()), f"the policy lab left these behind: {left}"


def objects(w: PolicyLab, policies: list[dict], pod_labels=None, ns_labels=None) -> list[dict]:
    """The case's world plus a Service on SERVICE_IP:80 (TCP and UDP) backed
    by x/a, always there: a config without Services would be held 5 s."""
    xa = str(w.ip("x/a"))
    service = [k8s.service("to-xa", [SERVICE_IP], [k8s.port("tcp", 80, 80), k8s.port("udp", 80, 80, "UDP")],
                           namespace="x"),
               k8s.endpoint_slice("to-xa-1", "to-xa", [k8s.endpoint(xa)],
                                  [k8s.slice_port("tcp", 80), k8s.slice_port("udp", 80, "UDP")], namespace="x")]
    return w.objects(policies, pod_labels, ns_labels) + service


def run_case(w: PolicyLab, name: str) -> None:
    _, policies, checks, pod_labels, ns_labels = CASES[name]
    objs = objects(w, policies, pod_labels, ns_labels)
    w.write(objs)
    assert_reaches(w, expected(w, objs, checks))


def open_world(w: PolicyLab) -> dict:
    objs = objects(w, [])
    w.write(objs)
    want = expected(w, objs, [])
    assert_reaches(w, want)
    return want


@pytest.mark.heavy
@pytest.mark.parametrize("name", [c[0] for c in upstream.CASES if c[0] not in REPRESENTATIVE])
def test_upstream_case(world, name):
    run_case(world, name)


def test_representative_cases(world):
    for name in REPRESENTATIVE:
        run_case(world, name)


# --- beyond the truth tables ---------------------------------------------------
ONLY_XB_TO_XA = "allow from pods within server namespace by podSelector"


def test_policy_through_a_service_address(world):
    """Socket-LB turns the Service address into x/a's at connect() (or per
    datagram), so x/a's ingress rules decide, as for a direct connection."""
    run_case(world, ONLY_XB_TO_XA)
    answers = world.probe_addresses({src: [(SERVICE_IP, "TCP", 80), (SERVICE_IP, "UDP", 80)]
                                     for src in ("x/b", "x/c", "y/b")})
    assert answers == {"x/b": ["x/a", "x/a"], "x/c": [None, None], "y/b": [None, None]}


class Held:
    """One TCP connection from a pod, kept open; ask() sends a line and
    returns the answer (None: none came)."""

    def __init__(self, lab: Lab, src: str, host: str, port: int):
        self.proc = lab.popen(src, [sys.executable, "-u", str(MATRIX_PROBE), "hold", host, str(port)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.first = json.loads(self.proc.stdout.readline())["answer"]

    def ask(self) -> str | None:
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["answer"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(10)


def test_an_established_flow_survives_a_deny(world):
    """As with iptables' conntrack: a policy that starts denying stops new
    connections; one already open keeps working."""
    open_world(world)
    held = Held(world.lab, "x/b", str(world.ip("x/a")), 80)
    try:
        assert held.first == "x/a" and held.ask() == "x/a"
        run_case(world, "default-deny-ingress")   # x/b -> x/a denied for new connections
        assert held.ask() == "x/a", "the open connection was cut by the new policy"
    finally:
        held.close()


class Flood:
    """matrix_probe.py flood: connections one after another until stopped."""

    def __init__(self, lab: Lab, src: str, host: str, port: int, timeout: float, pause: float):
        self.proc = lab.popen(src, [sys.executable, "-u", str(MATRIX_PROBE), "flood", host, str(port),
                                    str(timeout), str(pause)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
        assert json.loads(self.proc.stdout.readline())["started"]

    def stop(self) -> dict:
        out, _ = self.proc.communicate("\n", timeout=60)
        return json.loads(out.strip().splitlines()[-1])


def floods(w: PolicyLab, pause: float = 0.002):
    """Conntrack forgotten first (every test's flood starts from the same
    source ports), then x/b -> x/a:80 (allowed by ONLY_XB_TO_XA) and y/c -> x/a:81 (denied;
    no earlier test opens y/c -> x/a:81 from an ephemeral port, so no
    conntrack entry of an allowed past lets it through). An allowed attempt
    gives up before TCP's first SYN retransmission (1 s), which would hide
    a SYN dropped in the window of a change."""
    w.forget_flows()
    xa = str(w.ip("x/a"))
    return Flood(w.lab, "x/b", xa, 80, 0.9, pause), Flood(w.lab, "y/c", xa, 81, 0.3, pause)


def assert_floods(allowed: Flood, denied: Flood) -> None:
    a, d = allowed.stop(), denied.stop()
    assert a["ok"] > 0 and a["failed"] == 0, f"allowed connections failed: {a}"
    assert d["ok"] == 0 and d["failed"] > 0, f"denied connections passed: {d}"


@pytest.mark.heavy
def test_policy_edits_while_traffic_flows(world):
    """Edits that rewrite x/a's rules but keep x/b -> x/a allowed and
    y/c -> x/a denied, under a flood of both: every x/b connection passes,
    no y/c one does."""
    run_case(world, ONLY_XB_TO_XA)
    allowed, denied = floods(world)
    try:
        for name in ("any podSelectors", ONLY_XB_TO_XA) * 5:
            _, policies, _, _, _ = CASES[name]
            world.write(objects(world, policies))
        run_case(world, ONLY_XB_TO_XA)
    finally:
        assert_floods(allowed, denied)


@pytest.mark.heavy
def test_a_relabelled_pod(world):
    """x/b gains the label x/a's policy asks for, then loses it."""
    for name in ("ingress from updated pod, before", "ingress from updated pod, after",
                 "ingress from updated pod, before"):
        run_case(world, name)


@pytest.mark.heavy
def test_a_deleted_policy(world):
    for name in ("policies deleted: back to all allowed, before", "policies deleted: back to all allowed, after"):
        run_case(world, name)


@pytest.mark.userspace
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_agent_restart_opens_no_window(world, sig):
    """The agent dies (or stops) under policy and a new one takes over: the
    matrix holds while it is down and after, and under a flood nothing
    denied passes and nothing allowed drops."""
    _, policies, checks, _, _ = CASES[ONLY_XB_TO_XA]
    objs = objects(world, policies)
    world.write(objs)
    want = expected(world, objs, checks)
    assert_reaches(world, want)
    allowed, denied = floods(world)
    try:
        world.stop_agent(sig)
        assert_holds(world, want)
        world.start_agent(AGENT_READY_TIMEOUT)
        assert_holds(world, want)
    finally:
        assert_floods(allowed, denied)


@pytest.mark.userspace
def test_bad_policy_objects_are_left_out_and_the_rest_applies(world):
    """A bad policy is one line naming file, document and field; the good
    ones apply; a bad edit of a good one keeps its previous version."""
    _, policies, checks, _, _ = CASES["default-deny-ingress"]
    bad = upstream.netpol("bad-port", "y", ingress=[{"ports": [{"port": 70000}]}])
    objs = objects(world, policies + [bad])
    world.write(objs)
    want = expected(world, objects(world, policies), checks)
    assert_reaches(world, want)
    line = next(ln for ln in wait_log(world.agent, "(NetworkPolicy y/bad-port)").splitlines()
                if "(NetworkPolicy y/bad-port)" in ln)
    assert f"{world.config}: document " in line
    assert "spec.ingress[0].ports[0].port: 70000 is not a port number" in line

    # The bad edit comes with a good change (a policy that selects no pod),
    # so the agent syncs: the synced state still holds the old deny-ingress.
    broken = upstream.netpol("deny-ingress", "x", ingress=[{"ports": [{"port": 70000}]}])
    harmless = upstream.netpol("selects-no-pod", "z", upstream.labels(pod="none"), ingress=[])
    world.write(objects(world, [broken, bad, harmless]))
    wait_log(world.agent, "(NetworkPolicy x/deny-ingress)")
    for _ in range(2):  # neither opened nor closed
        assert_holds(world, want)
    assert world.agent.proc.poll() is None


def policy_probe(w: PolicyLab, pod: str, *args) -> subprocess.Popen:
    return w.lab.popen(pod, [sys.executable, "-u", str(POLICY_PROBE), *map(str, args)],
                       stdout=subprocess.PIPE, text=True)


@pytest.mark.userspace  # the drop itself runs in every VM (test_policy_datapath.py); here: what the agent writes
def test_a_spoofed_source_is_dropped(world):
    """x/a accepts only x/b. y/c sends a raw frame (scapy) claiming to be
    x/b: the agent's address entries make y/c's interface drop it, so x/a
    never sees it; the same frame sent by x/b itself arrives."""
    run_case(world, ONLY_XB_TO_XA)
    xa, xb = world.ip("x/a"), world.ip("x/b")
    recv = policy_probe(world, "x/a", "udp-recv", 9999, "genuine")
    try:
        assert json.loads(recv.stdout.readline()) == {"listening": True}
        for pod, payload in (("y/c", "spoofed"), ("x/b", "genuine")):
            r = world.lab.run(pod, [sys.executable, str(POLICY_PROBE), "spoof", str(xb), str(xa), "9999", payload])
            assert r.returncode == 0, r.stderr
        out, _ = recv.communicate(timeout=30)
    finally:
        if recv.poll() is None:
            recv.kill()
    assert json.loads(out.strip().splitlines()[-1]) == {"got": ["genuine"]}
