"""Fixtures for real-kernel, real-traffic tests.

Every test gets its own lab (namespaces + child cgroup), its own bpffs folder
and its own agent, all removed even when the test fails; `no_leaks` then
checks that nothing is left behind.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshbpf.datapath import libbpf
from meshbpf.datapath.cgroup import cgroup2_mount
from meshbpf.datapath.loader import ATTACH
from meshbpf.lab.netlab import CGROUP_PREFIX, NETNS_PREFIX, Lab
from meshbpf.lab.workloads import AgentProcess, start_dnsmasq, start_whoami, wait_for

from . import k8s

PROBE = Path(__file__).with_name("probe.py")
_names = itertools.count()
BPFFS_ROOT = Path("/sys/fs/bpf")


LAB_PREFIX = f"t{os.getpid() % 10000}-"     # this test run's labs
# Compiling takes ~1 s on the host, ~10 s under the VMs' emulation, and a
# lot more when the machine is busy: a slow start is not what tests test.
AGENT_READY_TIMEOUT = 180
PIN_PREFIX = f"meshbpf-test-{os.getpid()}-"  # this test run's bpffs folders


def _snapshot() -> dict[str, set[str]]:
    """What this test run has created (other runs may share the machine)."""
    cg2 = cgroup2_mount()
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    return {
        "netns": {n for n in netns if n.startswith(NETNS_PREFIX + LAB_PREFIX)},
        "cgroups": {p.name for p in cg2.iterdir() if p.name.startswith(CGROUP_PREFIX + LAB_PREFIX)},
        "pins": {p.name for p in BPFFS_ROOT.iterdir() if p.name.startswith(PIN_PREFIX)},
    }


def attached_programs(cgroup: Path, attach_types=tuple(ATTACH.values())) -> list[int]:
    """IDs of every program attached to a cgroup on these hooks (default:
    the socket-address ones)."""
    fd = os.open(cgroup, os.O_RDONLY)
    try:
        return [pid for t in attach_types for pid in libbpf.prog_query(fd, t)]
    finally:
        os.close(fd)


@pytest.fixture(autouse=True)
def no_leaks():
    """Fails a test that leaves namespaces, lab cgroups or pins behind."""
    before = _snapshot()
    yield
    after = _snapshot()
    leaked = {k: sorted(after[k] - before[k]) for k in after if after[k] - before[k]}
    assert not leaked, f"test left these behind: {leaked}"


class Probe:
    """Runs tests/kernel/probe.py commands inside a lab pod."""

    def __init__(self, lab: Lab):
        self.lab = lab

    def __call__(self, pod: str, command: str, *args, timeout: float = 60) -> dict:
        r = self.lab.run(pod, [sys.executable, str(PROBE), command, *map(str, args)], timeout=timeout)
        assert r.returncode == 0, f"probe {command} failed in {pod}: {r.stderr}"
        return json.loads(r.stdout.strip().splitlines()[-1])

    def popen(self, pod: str, command: str, *args) -> subprocess.Popen:
        return self.lab.popen(pod, [sys.executable, "-u", str(PROBE), command, *map(str, args)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


class Load:
    """Connections back to back to host:port from a pod, while a test does
    something (probe.py load). Started means answers are already flowing;
    stop() returns the result with the time of every answer."""

    def __init__(self, probe: Probe, pod: str, host: str, port: int, gap: float = 0.0):
        self.proc = probe.popen(pod, "load", host, port, "20", str(gap))
        line = self.proc.stdout.readline()
        assert line, f"load loop in {pod} ended before it started"
        self.started = json.loads(line)["started"]
        self.result: dict = {}
        if self.started is None:
            self.stop()
            raise AssertionError(f"no answers from {host}:{port} in {pod} in 30 s: {self.result}")

    def stop(self) -> dict:
        out, _ = self.proc.communicate("\n", timeout=90)
        self.result = json.loads(out.strip().splitlines()[-1])
        return self.result

    def answers_between(self, start: float, end: float) -> int:
        return sum(start < t < end for t in self.result["times"])

    def assert_spans(self, *events: float) -> None:
        """Connections were answered before the first event, between each
        pair of events and after the last: the events happened under load."""
        edges = [float("-inf"), *events, float("inf")]
        counts = [self.answers_between(a, b) for a, b in zip(edges, edges[1:])]
        assert all(counts), f"answers before, between and after the events: {counts}"


@pytest.fixture
def lab():
    """A lab with a client pod and four web pods running whoami on :8080."""
    name = f"{LAB_PREFIX}{next(_names)}"
    with Lab(name) as the_lab:
        the_lab.up(["client", "client2", "web-1", "web-2", "web-3", "web-4"])
        for pod in ("web-1", "web-2", "web-3", "web-4"):
            start_whoami(the_lab, pod, 8080)
        yield the_lab


@pytest.fixture
def probe(lab):
    return Probe(lab)


@pytest.fixture
def bpffs():
    path = BPFFS_ROOT / f"{PIN_PREFIX}{next(_names)}"
    yield path
    if path.exists():
        from meshbpf.datapath.loader import uninstall
        uninstall(path)


@pytest.fixture
def config(tmp_path):
    return tmp_path / "services.yaml"


@pytest.fixture
def start_agent(lab, bpffs, config):
    """start_agent(objects, *extra_args) -> a ready AgentProcess on the lab."""
    agents: list[AgentProcess] = []

    def start(objects: list[dict] | None = None, *extra: str, wait_ready: bool = True) -> AgentProcess:
        if objects is not None:
            k8s.write(config, objects)
        agent = AgentProcess(config, lab.cgroup, bpffs, list(extra))
        agents.append(agent)
        try:
            return agent.start(wait_ready=wait_ready, timeout=AGENT_READY_TIMEOUT)
        except Exception:
            print(agent.log())
            raise

    yield start
    for agent in agents:
        if agent.proc and agent.proc.poll() is None:
            agent.stop()
        print(f"--- agent log ---\n{agent.log()}")
        agent.cleanup()


def web_service(lab: Lab, pods=("web-1", "web-2", "web-3", "web-4"), name="web",
                ip="10.96.0.10", **kwargs) -> list[dict]:
    """A Service on ip:80 with an EndpointSlice of the given web pods on 8080."""
    return [
        k8s.service(name, [ip], [k8s.port("http", 80, 8080)], **kwargs),
        k8s.endpoint_slice(f"{name}-1", name, [k8s.endpoint(str(lab.pods[p].ipv4)) for p in pods],
                           [k8s.slice_port("http", 8080)]),
    ]


class SharedLB:
    """One lab and one agent for a whole test module (CI time: an agent start
    is ~10 s of compiling under the VMs' emulation). Tests that only need
    some Services programmed call serve(objects): it writes the config and
    waits until the agent has synced it. Tests that need their own agent
    flags, or break things, use `lab` and `start_agent` instead."""

    def __init__(self, lab: Lab, bpffs: Path, config: Path, agent: AgentProcess):
        self.lab, self.bpffs, self.config, self.agent = lab, bpffs, config, agent
        self.probe = Probe(lab)
        self.dns_pods = ["dns-1", "dns-2"]

    def serve(self, objects: list[dict]) -> AgentProcess:
        from .helpers import metric
        before = metric(self.agent.get("/metrics")[1], "meshbpf_last_sync_timestamp_seconds")
        k8s.write(self.config, objects)
        wait_for(lambda: metric(self.agent.get("/metrics")[1], "meshbpf_last_sync_timestamp_seconds") > before,
                 30, "the agent to sync the test's config")
        # The Services are written first in a loop step; policy, capture and
        # redirection settings (an AgentConfig) later in the same step. A
        # step begun after now means that one has ended.
        synced = time.monotonic()
        wait_for(lambda: self._step_began_after(synced), 30, "the agent's loop to finish the step")
        return self.agent

    def _step_began_after(self, t: float) -> bool:
        asked = time.monotonic()  # the agent answers after this: its beat is at least this - age
        return asked - json.loads(self.agent.get("/healthz")[1])["loop_heartbeat_age_s"] > t


@pytest.fixture(scope="module")
def shared_lb(tmp_path_factory):
    """A module's SharedLB: the `lab` pods plus two dnsmasq pods, and an agent
    on them. Made before the first test's no_leaks snapshot and removed after
    the last one's, so it checks its own removal."""
    name = f"{LAB_PREFIX}{next(_names)}"
    tmp = tmp_path_factory.mktemp("shared-lb")
    bpffs = BPFFS_ROOT / f"{PIN_PREFIX}{next(_names)}"
    config = k8s.write(tmp / "services.yaml", [])
    with Lab(name) as the_lab:
        the_lab.up(["client", "client2", "web-1", "web-2", "web-3", "web-4", "dns-1", "dns-2"])
        for pod in ("web-1", "web-2", "web-3", "web-4"):
            start_whoami(the_lab, pod, 8080)
        for pod in ("dns-1", "dns-2"):
            start_dnsmasq(the_lab, pod, tmp)
        agent = AgentProcess(config, the_lab.cgroup, bpffs)
        try:
            agent.start(timeout=AGENT_READY_TIMEOUT)
            yield SharedLB(the_lab, bpffs, config, agent)
        finally:
            print(f"--- shared agent log ---\n{agent.log()}")
            agent.cleanup()
            if bpffs.exists():
                from meshbpf.datapath.loader import uninstall
                uninstall(bpffs)
    ours = {CGROUP_PREFIX + name, bpffs.name}
    left = {k: sorted(n for n in v if n in ours or n.startswith(f"{NETNS_PREFIX}{name}-"))
            for k, v in _snapshot().items()}
    assert not any(left.values()), f"the shared lab left these behind: {left}"


@pytest.fixture
def dns_pods(lab, tmp_path):
    """Two more pods running dnsmasq; TXT whoami.lab answers with the pod name."""
    for pod in ("dns-1", "dns-2"):
        lab.add_pod(pod)
        start_dnsmasq(lab, pod, tmp_path)
    return ["dns-1", "dns-2"]
