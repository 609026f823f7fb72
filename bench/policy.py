"""NetworkPolicy enforcement: meshbpf against iptables + ipset and nftables,
in one run. Run it through bench/run-policy (see bench/README.md).

One lab (`pb<pid>`) holds four pods in namespace "bench": srv and cli, on
the agent's node, and their twins srv-twin and cli-twin, which the cluster
objects place on another node (bench/policy_cluster.py). The agent
(`--node-name bench-node --node-netns <lab node netns>`) enforces srv and
cli with its tc programs; the iptables/nftables baselines are generated
from the same objects for the twins' node (bench/policy_rules.py) and
loaded into the lab's node netns only for their own runs, so each path is
measured alone:

    case          client -> server          enforcement
    none          cli-twin -> srv-twin      nothing
    iptables      cli-twin -> srv-twin      kube-router layout, iptables-legacy-restore + ipset
    iptables-nft  cli-twin -> srv-twin      the same, iptables-nft-restore + ipset
    nftables      cli-twin -> srv-twin      the same rules as one nft table (sets, verdict maps)
    meshbpf       cli -> srv                the agent's tc programs on the pods' veths

Load processes run in the pods' netns but outside the lab cgroup, so
meshbpf's socket-LB hooks (attached to the lab cgroup) are on no path.
The pods sit on the lab bridge: netfilter sees bridged IPv4 through
br_netfilter (net.bridge.bridge-nf-call-iptables is per netns and 1 in
new namespaces on this kernel; the bench checks it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import policy_profile
import policy_rules as rules
import policy_cluster as world
from meshbpf.lab.netlab import Lab
from meshbpf.lab.workloads import AgentProcess

HERE = Path(__file__).resolve().parent
LOADGEN = HERE / "bin" / "loadgen"
SOCKBENCH = HERE / "bin" / "sockbench"
PROBE = HERE / "policy_probe.py"
CASES = ("none", "iptables", "iptables-nft", "nftables", "meshbpf")
NETFILTER = ("iptables", "iptables-nft", "nftables")
RESTORE = {"iptables": "iptables-legacy-restore", "iptables-nft": "iptables-nft-restore"}
PODS = [f"{world.NAMESPACE}/{n}" for n in ("srv", "cli", "srv-twin", "cli-twin")]
RATE_PORT, STREAM_PORT = world.SERVER_PORTS
DENIED_PORT = 8082          # listened on by nobody: refused if allowed, dropped if denied
STREAM_SIZE = 65536
# A new connection every 5 ms; one still waiting after 0.9 s was dropped. The
# long timeout keeps a slow handshake on a busy machine from passing for a
# denial; it delays the report, not the measured time (the attempt's start).
PROBE_INTERVAL, PROBE_TIMEOUT = 0.005, 0.9
PROBE_FIRST_PORT = 10000    # probe source ports 10000-29999, each used once per 100 s
# the agent's log line once it wrote policy maps (meshbpf/sync/policy.py)
POLICY_LINE = re.compile(r"policy: \d+ local pod\(s\), \d+ enforced, \d+ map writes")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pair(case: str) -> tuple[str, str]:
    """(client pod, server pod) of a case."""
    twin = "" if case == "meshbpf" else "-twin"
    return f"{world.NAMESPACE}/cli{twin}", f"{world.NAMESPACE}/srv{twin}"


def in_node(lab: Lab, argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
    """Runs argv in the lab's node netns (where the baselines' rules live) and checks it."""
    res = lab.run(None, argv, in_cgroup=False, input=stdin, timeout=600)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed in the lab's node netns:\n{res.stderr[-2000:]}")
    return res


def load_rules(lab: Lab, case: str, texts: dict[str, str]) -> dict:
    """Programs a baseline into the lab's node netns (a full sync: sets
    refilled, the filter table or the nft table replaced); returns the
    times (s) of its tools."""
    out = {}
    if case == "nftables":
        t0 = time.perf_counter()
        in_node(lab, ["nft", "-f", "-"], texts["nft"])
        out["nft_s"] = time.perf_counter() - t0
    else:
        t0 = time.perf_counter()
        in_node(lab, ["ipset", "restore", "-exist"], texts["ipset"])
        t1 = time.perf_counter()
        in_node(lab, [RESTORE[case], "-w", "30"], texts["iptables"])
        out.update(ipset_s=t1 - t0, restore_s=time.perf_counter() - t1)
    out["total_s"] = sum(out.values())
    return out


def unload_rules(lab: Lab, case: str) -> None:
    if case in RESTORE:
        in_node(lab, [RESTORE[case], "-w", "30"], rules.iptables_flush())
        in_node(lab, ["ipset", "destroy"])
    in_node(lab, ["nft", "flush", "ruleset"])   # iptables-nft's tables, or ours


def rule_texts(objects: list[dict]) -> dict[str, str]:
    """The baselines' rules for the twins' node."""
    lay = rules.layout(objects, world.TWIN_NODE)
    return {"ipset": rules.ipset_restore(lay), "iptables": rules.iptables_restore(lay), "nft": rules.nft_script(lay)}


class PolicyBench:
    """The lab, the servers, the agent and the netfilter baselines."""

    def __init__(self, args):
        self.args = args
        self.lab = Lab(f"pb{os.getpid()}")
        self.work = Path(tempfile.mkdtemp(prefix="polbench-"))
        self.config = self.work / "config"
        self.bpffs = Path(f"/sys/fs/bpf/meshbpf-bench-pb{os.getpid()}")
        cpu = os.cpu_count() - 1
        self.pin = [] if args.cpu == "none" else ["taskset", "-c", str(cpu if args.cpu == "last" else args.cpu)]
        self.procs: list[subprocess.Popen] = []
        self.stream_out: dict[str, queue.Queue] = {}
        self.agent: AgentProcess | None = None
        self.cluster: list[dict] = []
        self.loaded: str | None = None       # netfilter case loaded in the node netns now

    # --- set-up and tear-down ------------------------------------------------------
    def __enter__(self) -> "PolicyBench":
        self.lab.up(PODS)
        self.config.mkdir()
        self._check_br_netfilter()
        pods = world.lab_pods(self.lab.pods) + world.remote_pods(self.args.pods - len(PODS))
        self.cluster = world.namespaces() + pods
        self.write("cluster.json", self.cluster)
        for srv in (pair("meshbpf")[1], pair("none")[1]):
            self._start_servers(srv)
        return self

    def __exit__(self, *exc) -> None:
        try:
            for p in self.procs:   # outside the lab cgroup: Lab.down would not kill them
                if p.poll() is None:
                    p.kill()
                p.wait()
            if self.agent is not None:
                self.agent.cleanup()
        finally:
            try:
                if self.bpffs.exists():
                    from meshbpf.datapath.loader import uninstall
                    uninstall(self.bpffs)
            finally:
                self.lab.down()          # the node netns goes, and every rule and set in it
                shutil.rmtree(self.work, ignore_errors=True)

    def _check_br_netfilter(self) -> None:
        value = self.node(["cat", "/proc/sys/net/bridge/bridge-nf-call-iptables"]).stdout.strip()
        if value != "1":
            self.node(["sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1"])

    def _start_servers(self, pod: str) -> None:
        ip = self.lab.pods[pod].ipv4
        rate = self.lab.popen(pod, [*self.pin, str(LOADGEN), "server", f"{ip}:{RATE_PORT}"],
                              in_cgroup=False, stdout=subprocess.PIPE, text=True)
        stream = self.lab.popen(pod, [*self.pin, str(SOCKBENCH), "server", "-w", str(self.args.warmup),
                                      str(ip), f"{STREAM_PORT}:stream:{STREAM_SIZE}:nagle"],
                                in_cgroup=False, stdout=subprocess.PIPE, text=True)
        self.procs += [rate, stream]
        for p in (rate, stream):
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError(f"server in {pod} did not start")
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(l) for l in stream.stdout], daemon=True).start()
        self.stream_out[pod] = lines

    def node(self, argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
        return in_node(self.lab, argv, stdin)

    def write(self, name: str, items: list[dict], folder: Path | None = None) -> None:
        """Write then rename, as the README asks: the agent sees the whole file at once."""
        folder = folder or self.config
        tmp = folder / f".{name}.tmp"
        tmp.write_text(json.dumps(world.as_list(items)))
        os.rename(tmp, folder / name)

    # --- meshbpf ---------------------------------------------------------------------
    def start_agent(self) -> dict:
        """Starts the agent; returns seconds from its start to policy maps
        written, and that time split by the agent's own log timestamps."""
        self.agent = AgentProcess(self.config, self.lab.cgroup, self.bpffs,
                                  ["--node-name", world.NODE, "--node-netns", self.lab.node_ns])
        t0 = time.monotonic()
        self.agent.start(wait_ready=False)
        self.wait_policy_line(0, 600)
        return {"total_s": time.monotonic() - t0, **log_split(self.agent.log())}

    def wait_policy_line(self, offset: int, timeout: float = 120.0) -> float:
        """Waits for the agent's next "policy: ... map writes" line after byte
        offset of its log; returns when it was seen (CLOCK_MONOTONIC)."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.agent.log_path.read_bytes()[offset:].decode(errors="replace")
            if POLICY_LINE.search(text):
                return time.monotonic()
            if self.agent.proc.poll() is not None:
                raise RuntimeError(f"the agent exited:\n{self.agent.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the agent wrote no policy maps in {timeout} s:\n{self.agent.log()[-3000:]}")
            time.sleep(0.002)

    def set_policies(self, policies: list[dict], name: str = "policies.json", timeout: float = 120.0) -> float:
        """Writes policies into the agent's folder; returns seconds from the
        rename to the agent's log line saying the maps are written."""
        offset = self.agent.log_path.stat().st_size
        self.write(name, policies)
        t0 = time.monotonic()
        return self.wait_policy_line(offset, timeout) - t0

    def reset_policies(self, policies: list[dict]) -> None:
        """Like set_policies, for a change that may write nothing (the same
        rules again): then no log line comes, and 3 s of quiet will do."""
        try:
            self.set_policies(policies, timeout=3.0)
        except RuntimeError:
            if self.agent.proc.poll() is not None:
                raise

    # --- netfilter baselines --------------------------------------------------------
    def texts(self, policies: list[dict]) -> dict[str, str]:
        return rule_texts(self.cluster + policies)

    def load(self, case: str, texts: dict[str, str]) -> dict:
        self.loaded = case
        return load_rules(self.lab, case, texts)

    def unload(self) -> None:
        if self.loaded is not None:
            unload_rules(self.lab, self.loaded)
        self.loaded = None

    # --- traffic ---------------------------------------------------------------------
    def connections(self, case: str, seconds: float, warmup: float) -> dict:
        cli, srv = pair(case)
        argv = [*self.pin, str(LOADGEN), "client", "-d", str(seconds), "-w", str(warmup),
                f"{self.lab.pods[srv].ipv4}:{RATE_PORT}"]
        res = self.lab.run(cli, argv, in_cgroup=False, timeout=seconds + warmup + 60)
        if res.returncode != 0:
            raise RuntimeError(f"{case}: loadgen client failed: {res.stderr}")
        return json.loads(res.stdout)

    def stream(self, case: str, seconds: float, warmup: float) -> dict:
        cli, srv = pair(case)
        argv = [*self.pin, str(SOCKBENCH), "stream", "-d", str(seconds), "-w", str(warmup),
                "-s", str(STREAM_SIZE), f"{self.lab.pods[srv].ipv4}:{STREAM_PORT}"]
        res = self.lab.run(cli, argv, in_cgroup=False, timeout=seconds + warmup + 60)
        if res.returncode != 0:
            raise RuntimeError(f"{case}: sockbench stream failed: {res.stderr}")
        return json.loads(self.stream_out[srv].get(timeout=30))

    def reaches(self, case: str, port: int) -> bool:
        cli, srv = pair(case)
        return reaches(self.lab, cli, srv, port)

    def preflight(self, case: str, enforced: bool) -> None:
        """The path serves, and denies what the policies deny: a baseline that
        lets everything through would flatter itself."""
        check = self.connections(case, 0.2, 0.05)
        if check["errors"] or check["count"] < 50:
            raise RuntimeError(f"{case}: the allowed port does not serve: {check}")
        if self.reaches(case, DENIED_PORT) == enforced:
            raise RuntimeError(f"{case}: port {DENIED_PORT} is {'open' if enforced else 'closed'}, "
                               f"expected {'denied' if enforced else 'reachable'}")


def log_split(text: str) -> dict:
    """From the agent's log: its first line -> "policy datapath ready" (the
    socket-LB and policy programs compiled and loaded) -> the first policy
    maps written (read, compile, plan, attach, write)."""
    def stamp(line: str) -> float:
        return time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")) + int(line[20:23]) / 1e3
    lines = text.splitlines()
    try:
        first = stamp(lines[0])
        ready = stamp(next(l for l in lines if "policy datapath ready" in l))
        written = stamp(next(l for l in lines if POLICY_LINE.search(l)))
    except (StopIteration, ValueError, IndexError):
        return {}
    return {"log_to_datapath_s": ready - first, "log_datapath_to_written_s": written - ready}


def reaches(lab: Lab, cli: str, srv: str, port: int) -> bool:
    """One connection attempt from pod cli to pod srv: True if it got
    through (connected, or refused by the pod), False if dropped."""
    code = ("import socket,sys; s=socket.socket(); s.settimeout(0.5)\n"
            "try: s.connect((sys.argv[1], int(sys.argv[2]))); print('y')\n"
            "except ConnectionRefusedError: print('y')\n"
            "except OSError: print('n')\n")
    res = lab.run(cli, [sys.executable, "-c", code, str(lab.pods[srv].ipv4), str(port)],
                  in_cgroup=False, timeout=30)
    return res.stdout.strip() == "y"


# --- the measurements -------------------------------------------------------------------

def rate_policies(n: int) -> list[dict]:
    """n policies selecting the server, and one that selects a remote pod, so
    that enforcement is on at n = 0 too (the agent loads its datapath and
    the baselines their chains, with nothing selecting the server)."""
    return world.selecting_policies(n) + world.background_policies(1)


def run_size(b: PolicyBench, n: int, cases: list[str], args) -> dict:
    policies = rate_policies(n)
    texts = b.texts(policies)
    if "meshbpf" in cases:
        b.reset_policies(policies)
    out: dict = {"rounds": [], "program": {c: [] for c in cases if c in NETFILTER}}
    for r in range(args.rounds):
        order = cases[r % len(cases):] + cases[:r % len(cases)]
        results = {}
        for case in order:
            if case in NETFILTER:
                out["program"][case].append(b.load(case, texts))
            try:
                if r == 0:
                    b.preflight(case, enforced=n > 0 and case != "none")
                results[case] = {"conn": b.connections(case, args.duration, args.warmup),
                                 "stream": b.stream(case, args.duration, args.warmup)}
            finally:
                b.unload()
        out["rounds"].append(results)
        log(f"N={n}: round {r + 1}/{args.rounds}: " + ", ".join(
            f"{c} {results[c]['conn']['rate']:.0f}/s {results[c]['stream']['MBps']:.0f} MB/s" for c in cases))
    return out


def programming(b: PolicyBench, cases: list[str], args) -> dict:
    """Time to program `args.policies` policies over the cluster from empty, two ways:
    all selecting a local pod (the most a node programs), and spread over the
    cluster (a few select local pods). meshbpf: file rename -> maps written,
    on the running agent, and a profile of its stages in-process."""
    scenarios = {"local": world.selecting_policies(args.policies),
                 "spread": world.selecting_policies(10) + world.background_policies(args.policies - 10)}
    out = {}
    for name, policies in scenarios.items():
        texts = b.texts(policies)
        res: dict = {}
        for case in cases:
            if case in NETFILTER:
                try:
                    res[case] = b.load(case, texts)
                finally:
                    b.unload()
            elif case == "meshbpf":
                b.reset_policies(rate_policies(0))
                res[case] = {"total_s": b.set_policies(policies), **profile(b, policies)}
        out[name] = res
        log(f"programming {args.policies} policies ({name}): " + ", ".join(
            f"{c} {v['total_s']:.3f} s" for c, v in res.items()))
    return out


def profile(b: PolicyBench, policies: list[dict]) -> dict:
    """Where the agent's time goes, stage by stage, with its own functions
    (bench/policy_profile.py; no maps: the writes are the difference to the
    measured total)."""
    from meshbpf.policy.compile import PolicyCompiler
    from meshbpf.reconcile.policy_keys import PolicyState
    folder = b.work / "profile"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    b.write("cluster.json", b.cluster, folder)
    b.write("policies.json", policies, folder)
    _, _, t = policy_profile.stages(folder, {}, None, PolicyState(), PolicyCompiler())
    return {"profile_read_s": t["read_s"], "profile_compile_s": t["compile_s"], "profile_plan_s": t["plan_s"],
            "profile_writes": t["writes"]}


def edits(b: PolicyBench, cases: list[str], args) -> dict:
    """Edit -> enforced: zz-allow-client flips between allowing the client and
    not, `args.edits` times; a probe in the client pod makes a new connection
    every 5 ms. meshbpf: from the file's rename to the start of the first
    denied (then allowed) attempt. Baselines: from the start of their
    apply (ipset restore + full iptables-restore, or nft -f) of the new
    rules, as a kube-router-style full sync does; the controller's own work
    before it (watch, computing the rules) is not counted."""
    base = world.selecting_policies(args.edit_policies)[:-1] + world.background_policies(1)
    allow, deny = [world.allow_client()], [world.deny_client()]
    out = {}
    for case in [c for c in cases if c != "none"]:
        cli, srv = pair(case)
        texts = {False: b.texts(base + allow), True: b.texts(base + deny)}
        if case == "meshbpf":
            b.reset_policies(base)
            b.set_policies(allow, "zz-edit.json")
        else:
            b.load(case, texts[False])
        probe = b.lab.popen(cli, [sys.executable, str(PROBE), str(b.lab.pods[srv].ipv4), str(RATE_PORT),
                                  str(PROBE_INTERVAL), str(PROBE_TIMEOUT),
                                  str(PROBE_FIRST_PORT if args.probe_ports == "unique" else 0)],
                            in_cgroup=False, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        b.procs.append(probe)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(l.split()) for l in probe.stdout], daemon=True).start()
        try:
            if lines.get(timeout=30) != ["ready"] or lines.get(timeout=10)[1] != "allowed":
                raise RuntimeError(f"{case}: the probe is not allowed before the first edit")
            res = {"deny_s": [], "allow_s": [], "stale_lines": 0, "contrary": 0}
            for i in range(args.edits):
                for to_deny in (True, False):
                    want = "denied" if to_deny else "allowed"
                    if case == "meshbpf":
                        b.write("zz-edit.json", deny if to_deny else allow)
                        t0 = time.monotonic()
                    else:
                        t0 = time.monotonic()
                        b.load(case, texts[to_deny])
                    start = next_change(lines, t0, want, res)
                    res["deny_s" if to_deny else "allow_s"].append(start - t0)
                    # not in step with the agent's 0.2 s poll of the folder
                    time.sleep(random.uniform(0.05, 0.45))
            out[case] = res
            if case == "meshbpf":
                (b.config / "zz-edit.json").unlink()
                res["profile"] = policy_profile.edit_profile(b.cluster, base, 4)
            log(f"edit -> enforced, {case}: deny p50 {pct(res['deny_s'], 50) * 1e3:.1f} ms, "
                f"p99 {pct(res['deny_s'], 99) * 1e3:.1f} ms; extra outcome changes "
                f"{res['contrary'] + res['stale_lines']}")
        finally:
            probe.stdin.close()
            probe.wait(10)
            b.unload()
    return out


def next_change(lines: queue.Queue, t0: float, want: str, res: dict) -> float:
    """Start of the probe's first attempt after t0 whose outcome is `want`.
    Changes before t0 (a handshake slower than the probe's timeout on a busy
    machine reads as a denial) are skipped and counted as stale; the other
    outcome after t0 is counted as contrary (after a deny: a new connection
    that still got through)."""
    while True:
        start, outcome = lines.get(timeout=60)
        start = float(start)
        if start < t0:
            res["stale_lines"] += 1
        elif outcome != want:
            res["contrary"] += 1
        else:
            return start


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round((len(xs) - 1) * p / 100))] if xs else float("nan")


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) < 2:
        return (xs[0],) * 3 if xs else (float("nan"),) * 3
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], statistics.median(xs), q[2]


def summarize(size: dict, cases: list[str]) -> dict:
    """Median per case; ratios to `none` taken within a round, then the median."""
    out = {}
    for case in cases:
        conn = [r[case]["conn"] for r in size["rounds"]]
        stream = [r[case]["stream"]["MBps"] for r in size["rounds"]]
        out[case] = {
            "rate": statistics.median(c["rate"] for c in conn),
            "p50_us": statistics.median(c["p50_us"] for c in conn),
            "p99_us": statistics.median(c["p99_us"] for c in conn),
            "errors": sum(c["errors"] for c in conn),
            "stream_MBps": statistics.median(stream),
            "rate_ratio": quartiles([r[case]["conn"]["rate"] / r["none"]["conn"]["rate"] for r in size["rounds"]]),
            "stream_ratio": quartiles([r[case]["stream"]["MBps"] / r["none"]["stream"]["MBps"]
                                       for r in size["rounds"]]),
        }
    return out


NAMES = {"none": "no enforcement (baseline)", "iptables": "iptables + ipset (legacy), kube-router layout",
         "iptables-nft": "iptables + ipset (iptables-nft), kube-router layout",
         "nftables": "nftables (sets, verdict maps)", "meshbpf": "meshbpf (tc programs, BPF maps)"}


def report(res: dict) -> str:
    sizes, cases = res["sizes"], res["cases"]
    head = "| path | " + " | ".join(f"N = {n}" for n in sizes) + " |\n|---|" + "---|" * len(sizes) + "\n"
    lines = rate_tables(res, head) + programming_tables(res) + edit_tables(res)
    return "\n".join(lines) + "\n"


def rate_tables(res: dict, head: str) -> list[str]:
    sizes, cases = res["sizes"], res["cases"]
    if not res["by_size"]:
        return []
    lines = [f"NetworkPolicy benchmark ({res['machine']['kernel']}, {res['machine']['cpus']} CPUs, "
             f"{res['args']['rounds']} rounds of {res['args']['duration']} s, load average at the end "
             f"{res['machine']['loadavg_end']}). N = policies selecting the server pod, "
             f"{res['args']['pods']} pods in the cluster.", "",
             "**Connection rate** (connect, 64 B request, 64 B response, close), ratio to no enforcement "
             "(median of per-round ratios, quartiles):", "", head.rstrip("\n")]
    for key, unit in (("rate", "/s"), ("stream", " MB/s")):
        if key == "stream":
            lines += ["", f"**Stream throughput** (one connection, {STREAM_SIZE} B writes), ratio to no enforcement:",
                      "", head.rstrip("\n")]
        for case in cases:
            cells = []
            for n in sizes:
                s = res["by_size"][str(n)]["summary"][case]
                q1, med, q3 = s[f"{key}_ratio"]
                absolute = s["rate"] if key == "rate" else s["stream_MBps"]
                cells.append(f"{absolute:,.0f}{unit}" if case == "none" else f"{med:.2f}× ({q1:.2f}–{q3:.2f})")
            lines.append(f"| {NAMES[case]} | " + " | ".join(cells) + " |")
    lines += ["", "**Connection latency** p50 / p99 µs:", "", head.rstrip("\n")]
    for case in cases:
        lines.append(f"| {NAMES[case]} | " + " | ".join(
            "{p50_us:.0f} / {p99_us:.0f}".format(**res["by_size"][str(n)]["summary"][case]) for n in sizes) + " |")
    return lines


def programming_tables(res: dict) -> list[str]:
    cases, prog, lines = res["cases"], res.get("programming") or {}, []
    if prog:
        lines += ["", f"**Programming {res['args']['policies']} policies over {res['args']['pods']} pods** "
                  "(meshbpf: policies file renamed into the running agent's folder → its log line saying the "
                  "maps are written; the others: their tools on the same rules):", "",
                  "| method | all select a local pod | spread (10 select a local pod) |", "|---|---|---|"]
        for case in [c for c in cases if c != "none"]:
            lines.append(f"| {NAMES[case]} | " + " | ".join(
                f"{prog[s][case]['total_s']:.3f} s" for s in ("local", "spread")) + " |")
        m = [prog[s].get("meshbpf") for s in ("local", "spread")]
        if all(m):
            lines.append("| meshbpf profile: read files / compile / plan (in-process, same objects) | " + " | ".join(
                f"{x['profile_read_s']:.2f} / {x['profile_compile_s']:.2f} / {x['profile_plan_s']:.2f} s"
                f" ({x['profile_writes']} writes)" for x in m) + " |")
        start = res.get("agent_start")
        if start:
            lines.append(f"\nmeshbpf agent start → policy maps written, all-local scenario, nothing pinned: "
                         f"{start['total_s']:.2f} s; by the agent's log: "
                         f"{start.get('log_to_datapath_s', float('nan')):.2f} s to compile and load its programs, "
                         f"then {start.get('log_datapath_to_written_s', float('nan')):.2f} s to read, compile, "
                         f"plan, attach and write the policies.")
    return lines


def edit_tables(res: dict) -> list[str]:
    ed, lines = res.get("edits") or {}, []
    if ed:
        lines += ["", f"**Edit → enforced** ({res['args']['edits']} edits of one of {res['args']['edit_policies']} "
                  "policies selecting the server; a probe connects every 5 ms):", "",
                  "| path | allow → deny p50 / p99 | deny → allow p50 / p99 | extra outcome changes |",
                  "|---|---|---|---|"]
        for case, v in ed.items():
            lines.append(f"| {NAMES[case]} | " + " | ".join(
                f"{pct(v[k], 50) * 1e3:.0f} / {pct(v[k], 99) * 1e3:.0f} ms" for k in ("deny_s", "allow_s"))
                + f" | {v['contrary'] + v['stale_lines']} |")
        prof = [row for row in (ed.get("meshbpf") or {}).get("profile", []) if row["what"] != "first sync"]
        if prof:
            read, comp, plan = (statistics.median(r[k] for r in prof) * 1e3 for k in ("read_s", "compile_s", "plan_s"))
            lines.append("\nmeshbpf, one edit, the agent's stages in-process (median of "
                         f"{len(prof)}; folder poll, map writes and flips not included): read {read:.0f} ms, "
                         f"compile {comp:.0f} ms, plan {plan:.0f} ms"
                         + f", {prof[0]['writes']} map writes.")
    return lines


def machine() -> dict:
    return {"kernel": platform.release(), "cpus": os.cpu_count(),
            "loadavg_end": " ".join(f"{x:.1f}" for x in os.getloadavg()),
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}


def on_sigterm(main_pid: int):
    """SIGTERM runs the finally blocks (the lab, the agent, the pins go), in
    this process only: pyroute2 forks Python helpers (netns) and ends them
    with SIGTERM, and a fork that unwound our `with` would tear the lab down
    under us."""
    def handler(*_):
        if os.getpid() == main_pid:
            sys.exit(143)
        os._exit(143)
    return handler


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 rounds of 0.3 s, 5 edits")
    ap.add_argument("--sizes", default="0,100,1000", help="policies selecting the server")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--duration", type=float, default=0.5)
    ap.add_argument("--warmup", type=float, default=0.1)
    ap.add_argument("--pods", type=int, default=5000, help="pods in the cluster (4 of them in the lab)")
    ap.add_argument("--policies", type=int, default=1000, help="policies for the programming time")
    ap.add_argument("--edits", type=int, default=20)
    ap.add_argument("--edit-policies", type=int, default=100)
    ap.add_argument("--probe-ports", choices=("unique", "kernel"), default="unique",
                    help="edit probe: a fresh source port per attempt, or the kernel's choice (reuses ports)")
    ap.add_argument("--cpu", default="last", help="pin client and server to this CPU, 'last', or 'none'")
    ap.add_argument("--skip", default="", help="comma-separated: rate, programming, edits")
    ap.add_argument("--out", default=str(HERE / "results" / "policy.json"))
    ap.add_argument("--report-only", metavar="JSON", help="print the tables of a saved run")
    args = ap.parse_args()
    if args.report_only:
        print(report(json.loads(Path(args.report_only).read_text())), end="")
        return
    if args.quick:
        args.rounds, args.duration, args.edits = 3, 0.3, 5
    if os.geteuid() != 0:
        sys.exit("bench/policy.py: needs root (labs, tc, iptables in the lab's namespace)")
    signal.signal(signal.SIGTERM, on_sigterm(os.getpid()))
    sizes = [int(x) for x in args.sizes.split(",")]
    cases = [c for c in args.cases.split(",") if c]
    if "none" not in cases or set(cases) - set(CASES):
        sys.exit(f"bench/policy.py: --cases must include none, from {', '.join(CASES)}")
    skip = set(filter(None, args.skip.split(",")))
    res: dict = {"args": vars(args), "sizes": sizes, "cases": cases, "by_size": {}}
    started = time.monotonic()
    with PolicyBench(args) as b:
        if "meshbpf" in cases:
            b.write("policies.json", rate_policies(0))
            log("starting the agent (bcc compiles its programs)")
            b.start_agent()
        if "rate" not in skip:
            for n in sizes:
                size = run_size(b, n, cases, args)
                size["summary"] = summarize(size, cases)
                res["by_size"][str(n)] = size
        if "programming" not in skip:
            res["programming"] = programming(b, cases, args)
        if "edits" not in skip:
            res["edits"] = edits(b, cases, args)
        if "meshbpf" in cases and "programming" not in skip:
            b.agent.cleanup()
            b.write("policies.json", world.selecting_policies(args.policies))
            log("agent start with the full cluster, from nothing pinned")
            res["agent_start"] = b.start_agent()
    res["machine"] = machine()
    res["seconds"] = time.monotonic() - started
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    if res["by_size"] or res.get("programming") or res.get("edits"):
        text = report(res)
        Path(args.out).with_name("README-policy-snippet.md").write_text(text)
        print(text, end="")
    log(f"done in {res['seconds']:.0f} s; raw: {args.out}")


if __name__ == "__main__":
    main()
