"""The upstream NetworkPolicy e2e world as a real lab: namespaces x, y, z,
pods a, b, c in each, every pod serving TCP and UDP on 80 and 81, one agent
enforcing what the config says, and a prober that runs the whole 9x9x2x2
matrix from inside the pods in about one probe timeout.

The policies and truth tables are the unit tests' (tests/unit/policy_world.py,
tests/unit/test_policy_e2e.py), imported, not copied: the same cases run
against the compiler there and against the kernel here.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from meshbpf.datapath import libbpf
from meshbpf.datapath.policy import PolicyMaps
from meshbpf.lab.netlab import Lab
from meshbpf.lab.objects import pod_object
from meshbpf.lab.workloads import AgentProcess, wait_for, wait_listening
from meshbpf.policy.compile import verdict

UNIT_TESTS = str(Path(__file__).parents[1] / "unit")
if UNIT_TESTS not in sys.path:  # last: its modules must shadow nothing
    sys.path.append(UNIT_TESTS)
import policy_world as pw  # noqa: E402  (tests/unit is not a package)
import test_policy_e2e as upstream  # noqa: E402

MATRIX_PROBE = Path(__file__).with_name("matrix_probe.py")
NODE = pw.NODE
PODS = pw.ALL
COMBOS = [(proto, port) for proto in ("TCP", "UDP") for port in (80, 81)]
# A denied probe waits this long; an allowed one answers in milliseconds on
# the host (a slow answer is only retried: assert_reaches probes again), more
# under the VMs' emulation, whose guest-run sets 1.5 s.
PROBE_TIMEOUT = float(os.environ.get("MESHBPF_POLICY_PROBE_TIMEOUT", "0.5"))
SPORT_BASE, SPORT_SPAN = 10000, 22000  # below the ephemeral range: ours alone

Key = tuple  # (src pod, dst pod, protocol, port)


class PolicyLab:
    """The 9-pod lab, its config file and its agent (restartable)."""

    def __init__(self, lab: Lab, bpffs: Path, config: Path):
        self.lab, self.bpffs, self.config = lab, bpffs, config
        self.agent: AgentProcess | None = None
        self.agents: list[AgentProcess] = []
        self._round = itertools.count()

    # --- the agent -----------------------------------------------------------
    def start_agent(self, timeout: float) -> AgentProcess:
        agent = AgentProcess(self.config, self.lab.cgroup, self.bpffs,
                             ["--node-name", NODE, "--node-netns", self.lab.node_ns])
        self.agents.append(agent)
        self.agent = agent.start(timeout=timeout)
        return agent

    def stop_agent(self, sig: int = signal.SIGTERM) -> None:
        assert self.agent is not None
        self.agent.stop(sig)

    def forget_flows(self) -> None:
        """Empties the policy datapath's conntrack: flows of earlier tests
        (it has no timeouts) must not carry this test's connections."""
        with PolicyMaps(self.bpffs) as maps:
            fd = maps.fds["mbpf_ct"]
            for key in maps.conntrack():
                libbpf.map_delete(fd, key)

    def log(self) -> str:
        return "".join(a.log() for a in self.agents)

    # --- the config ----------------------------------------------------------
    def ip(self, pod: str) -> ipaddress.IPv4Address:
        return self.lab.pods[pod].ipv4

    def objects(self, policies: list[dict], pod_labels: dict | None = None,
                ns_labels: dict | None = None) -> list[dict]:
        """The unit tests' world with this lab's pods: their uids (how the
        agent finds their cgroups), addresses, and ipBlocks moved from the
        unit world's addresses to the lab's."""
        return [self._pod(o) if o["kind"] == "Pod" else self._relocate(o)
                for o in pw.world(policies, pod_labels, ns_labels)]

    def _pod(self, obj: dict) -> dict:
        lab_pod = pod_object(self.lab.pods[f"{obj['metadata']['namespace']}/{obj['metadata']['name']}"], NODE)
        obj["metadata"]["uid"] = lab_pod["metadata"]["uid"]
        obj["status"] = lab_pod["status"]
        return obj

    def _relocate(self, obj):
        if isinstance(obj, dict):
            return {k: self._relocate(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [self._relocate(v) for v in obj]
        if isinstance(obj, str):
            for pod in PODS:
                if obj == f"{pw.ip_of(pod)}/32":
                    return f"{self.ip(pod)}/32"
        return obj

    def write(self, objects: list[dict], synced: bool = True) -> None:
        """Writes the config and waits until the agent has read it (a
        policy-only change runs through the same step, load balancing first).
        synced=False: a change that leaves the desired state as it was."""
        from .helpers import metric

        def last_sync():
            return metric(self.agent.get("/metrics")[1], "meshbpf_last_sync_timestamp_seconds")
        before = last_sync()
        write_json(self.config, objects)
        if not synced:
            return
        # 5 s: a change that removes every policy is held that long.
        wait_for(lambda: last_sync() > before, 30, "the agent to read the new config")

    # --- probing -------------------------------------------------------------
    def probe(self, pairs: list[tuple[str, str]] | None = None, combos=COMBOS) -> dict[Key, str | None]:
        """Every (src, dst) pair (default: all 81) on every protocol/port,
        each source pod's probes from one process inside it, all in parallel."""
        pairs = pairs if pairs is not None else [(s, d) for s in PODS for d in PODS]
        by_src: dict[str, list[Key]] = {}
        for src, dst in pairs:
            by_src.setdefault(src, []).extend((src, dst, proto, port) for proto, port in combos)
        dsts = {src: [(str(self.ip(d)), proto, port) for _, d, proto, port in keys] for src, keys in by_src.items()}
        answers = self.probe_addresses(dsts)
        return {key: answer for src, keys in by_src.items() for key, answer in zip(keys, answers[src])}

    def probe_addresses(self, dsts: dict[str, list[tuple[str, str, int]]]) -> dict[str, list[str | None]]:
        """{src pod: [(address, protocol, port), ...]} -> the answers, in order."""
        span = max(len(v) for v in dsts.values())
        base = SPORT_BASE + (next(self._round) * span) % (SPORT_SPAN - span)
        procs = {}
        for src, targets in dsts.items():
            spec = [[addr, proto, port, base + i] for i, (addr, proto, port) in enumerate(targets)]
            procs[src] = self.lab.popen(src, [sys.executable, str(MATRIX_PROBE), "probe", json.dumps(spec),
                                              str(PROBE_TIMEOUT)], stdout=subprocess.PIPE, text=True)
        out = {}
        for src, proc in procs.items():
            stdout, _ = proc.communicate(timeout=60 + PROBE_TIMEOUT)
            assert proc.returncode == 0, f"the prober in {src} failed"
            out[src] = json.loads(stdout.strip().splitlines()[-1])
        return out


def write_json(path: Path, objects: list[dict]) -> None:
    """As `kubectl get -o json` prints a list, put in place by a rename.
    Not YAML: PyYAML writes namespace y bare, which YAML 1.1 (kubectl's,
    and the agent's) reads as the boolean true."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}))
    tmp.rename(path)


def start_servers(lab: Lab) -> None:
    for pod in PODS:
        lab.popen(pod, [sys.executable, str(MATRIX_PROBE), "serve", pod],
                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for pod in PODS:
        for port in (80, 81):
            wait_listening(lab, pod, port, "tcp")
            wait_listening(lab, pod, port, "udp")


# --- expectations ------------------------------------------------------------
def expected(world: PolicyLab, objects: list[dict], checks: list) -> dict[Key, tuple[bool, str]]:
    """What each probe should do, and who says so: the upstream case's truth
    table for the protocol/ports it lists, the compiler (itself checked
    against every upstream table in tests/unit) for the others. A pod to its
    own address always passes (upstream ignores it)."""
    compiled = pw.compiled(objects)
    listed = {(proto, port): table for proto, port, table in checks}
    out = {}
    for src in PODS:
        for dst in PODS:
            for proto, port in COMBOS:
                if src == dst:
                    out[src, dst, proto, port] = (True, "self")
                elif (proto, port) in listed:
                    out[src, dst, proto, port] = (listed[proto, port].m[src, dst], "upstream")
                else:
                    out[src, dst, proto, port] = (verdict(compiled, world.ip(src), world.ip(dst), proto, port),
                                                  "compiler")
    return out


def _answered(key: Key, answer: str | None) -> bool:
    return answer == key[1]  # the destination pod's own name: nothing else answered


def mismatches(want: dict[Key, tuple[bool, str]], got: dict[Key, str | None]) -> list[Key]:
    return [k for k in want if want[k][0] != _answered(k, got.get(k))]


def table(want: dict[Key, tuple[bool, str]], got: dict[Key, str | None]) -> str:
    """Upstream's Reachability printout: one table per protocol/port with a
    mismatch, rows are sources, columns destinations; '.' allowed, 'X'
    denied, as observed; a mismatch is '!' plus what was expected."""
    wrong = set(mismatches(want, got))
    lines = []
    for proto, port in COMBOS:
        if not any(k[2:] == (proto, port) for k in wrong):
            continue
        lines.append(f"{proto}/{port} observed ('!x' = mismatch, x expected):")
        lines.append("      " + " ".join(f"{d:>4}" for d in PODS))
        for src in PODS:
            cells = []
            for dst in PODS:
                k = (src, dst, proto, port)
                mark = "." if _answered(k, got.get(k)) else "X"
                if k in wrong:
                    mark = "!" + ("." if want[k][0] else "X")
                cells.append(f"{mark:>4}")
            lines.append(f"{src:>5} " + " ".join(cells))
    for k in sorted(wrong):
        lines.append(f"  {k[0]} -> {k[1]} {k[2]}/{k[3]}: expected {'allow' if want[k][0] else 'deny'} "
                     f"({want[k][1]}), answer {got.get(k)!r}")
    return "\n".join(lines)


def assert_reaches(world: PolicyLab, want: dict[Key, tuple[bool, str]], timeout: float = 30) -> None:
    """Probes until the whole matrix is as expected (the agent applies a
    change within moments of reading it), then once more: a matrix that
    holds only once is not the state in force."""
    deadline = time.monotonic() + timeout
    streak, got = 0, {}
    while streak < 2:
        got = world.probe()
        streak = streak + 1 if not mismatches(want, got) else 0
        if streak < 2 and time.monotonic() > deadline:
            raise AssertionError(f"reachability differs after {timeout}s:\n{table(want, got)}")


def assert_holds(world: PolicyLab, want: dict[Key, tuple[bool, str]]) -> None:
    """The matrix is as expected now, at the first look."""
    got = world.probe()
    assert not mismatches(want, got), table(want, got)
