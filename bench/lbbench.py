"""Socket-LB benchmarks: connections through a service address, and the time
to program N services. Run it through bench/run (see bench/README.md).

For each size N, one lab holds one pod (network namespace) per case, and
every pod runs the same server on 127.0.0.11-14:8080 (the four backends):

    direct        client -> backend, no BPF and no netfilter in that netns
    meshbpf       client (in the lab cgroup) -> last service's VIP, translated by
                  meshbpf's connect4 hook; no netfilter in that netns
    split         client (in the lab cgroup) -> a Service split 50/50 by a TCPRoute
                  over two backend Services (two backends each), on meshbpf's
                  datapath, counted per route backend as the agent sets it up:
                  the weighted-splitting case (issue 13)
    meshbpf-skstorage
                  as meshbpf, built as on a kernel without the conn_rnat feature:
                  a connected socket's reverse NAT in socket storage, not in
                  the connection table; a second lab and cgroup of its own, so
                  that the two designs meet the same rounds (the rate is
                  divided by the same direct runs)
    meshbpf-hash  the same, built as on a kernel without conn_slots (before
                  5.12): the connection table is the hash mbpf_conn_rnat, not
                  the direct-mapped mbpf_conn_slot
    iptables      kube-proxy iptables-mode layout, iptables-legacy-restore
    iptables-nft  the same layout through iptables-nft-restore
    nftables      kube-proxy nftables-mode layout (service-ips verdict map), nft -f

Only the meshbpf client runs in the lab cgroup: the programs are attached
there, and the other cases use the same VIPs. The netns of the meshbpf case
has no rules, so a successful connection to a VIP proves that BPF translated it.
Client and server share one CPU (--cpu). On these VMs a wake-up across
CPUs costs tens of µs whenever the other CPU is idle, so unpinned rates
swing 3x with whatever else the machine runs; on one CPU the rate is the
whole CPU cost of a connection, client and server side, and stable.
Each case is programmed from empty in its fresh netns, timed: that is the
programming benchmark. Connection rounds then run the cases back to back, in
a rotating order, and each rate is divided by the direct rate of its round.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import kube_rules as kr
import report
from meshbpf.agent import Agent, AgentOptions
from meshbpf.datapath import features as kernel_features, libbpf
from meshbpf.datapath.cgroup import cgroup2_mount
from meshbpf.datapath.layout import LB_MAPS
from meshbpf.datapath.loader import SockLB, uninstall
from meshbpf.datapath.maps import LBMaps
from meshbpf.datapath.route_counters import RouteCounters
from meshbpf.lab.netlab import Lab
from meshbpf.reconcile import check_capacity, plan, wanted_services
from meshbpf.sources.yaml_file import FileSource, read_config

HERE = Path(__file__).resolve().parent
LOADGEN = HERE / "bin" / "loadgen"
SK_STORAGE = "meshbpf-skstorage"
# Datapaths built as on an older kernel, each in a lab and cgroup of its own:
# case -> (lab and pin suffix, the features turned off)
VARIANTS = {SK_STORAGE: ("s", {"conn_rnat": False}), "meshbpf-hash": ("h", {"conn_slots": False})}
CASES = ("direct", "meshbpf", "split", *VARIANTS, "iptables", "iptables-nft", "nftables")
POD = {"direct": "direct", "meshbpf": "bpf", "split": "split", SK_STORAGE: "bpfsk", "meshbpf-hash": "bpfh",
       "iptables": "ipt",
       "iptables-nft": "iptnft", "nftables": "nft"}
IN_CGROUP = ("meshbpf", "split", *VARIANTS)  # the cases meshbpf's programs translate
RESTORE = {"iptables": "iptables-legacy-restore", "iptables-nft": "iptables-nft-restore"}
BACKEND_TARGETS = [f"{ip}:{kr.EP_PORT}" for ip in kr.BACKENDS]


def split_objects(n: int) -> tuple[list[kr.Svc], str]:
    """The split case's Services (a parent and two backend Services holding
    two real backends each, VIPs above any of the N services and the one
    add_one adds) and the TCPRoute splitting the parent 50/50 over them."""
    parent = kr.Svc("split-web", str(kr.VIP_BASE + n + 10), ())
    backends = [kr.Svc("split-a", str(kr.VIP_BASE + n + 11), kr.BACKENDS[:2]),
                kr.Svc("split-b", str(kr.VIP_BASE + n + 12), kr.BACKENDS[2:])]
    refs = "".join(f"    - name: {b.name}\n      port: {kr.SVC_PORT}\n      weight: 50\n" for b in backends)
    route = (f"apiVersion: gateway.networking.k8s.io/v1alpha2\nkind: TCPRoute\nmetadata:\n"
             f"  name: split-web\n  namespace: {kr.NAMESPACE}\nspec:\n  parentRefs:\n"
             f"  - group: \"\"\n    kind: Service\n    name: split-web\n  rules:\n  - backendRefs:\n{refs}")
    return [parent, *backends], route


def split_target(n: int) -> str:
    return f"{split_objects(n)[0][0].vip}:{kr.SVC_PORT}"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class SizeRun:
    """One size N: the lab, the servers, the meshbpf datapath, the rulesets."""

    def __init__(self, n: int, cases: list[str], work: Path, cpu: int | None = None,
                 map_sizes: dict[str, int] | None = None):
        self.n, self.cases, self.work = n, cases, work
        self.map_sizes = map_sizes or {}  # the agent's --map-size: 100 000 Services need larger maps
        self.pin = [] if cpu is None else ["taskset", "-c", str(cpu)]
        self.lab = Lab(f"bench{os.getpid()}n{n}")
        self.bpffs = Path(f"/sys/fs/bpf/meshbpf-bench-{os.getpid()}")
        # Each variant case's own lab, cgroup, pins and datapath.
        self.var_labs = {c: Lab(f"bench{os.getpid()}n{n}{VARIANTS[c][0]}") for c in cases if c in VARIANTS}
        self.var_bpffs = {c: Path(f"/sys/fs/bpf/meshbpf-bench-{os.getpid()}-{VARIANTS[c][0]}")
                          for c in self.var_labs}
        self.var_lbs: dict[str, SockLB] = {}
        self.servers: list[subprocess.Popen] = []
        self.lb: SockLB | None = None
        self.maps: LBMaps | None = None
        self.state = None          # what meshbpf's maps hold, as the agent tracks it
        self.svcs = kr.services(n)
        self.split: tuple[list, str] | None = None  # the split case's Services and route, once programmed
        self.counters: RouteCounters | None = None   # the split case's per-backend counters

    # --- set-up and tear-down --------------------------------------------------
    def __enter__(self) -> "SizeRun":
        self.lab.up([POD[c] for c in self.cases if c not in VARIANTS])
        for case, lab in self.var_labs.items():
            lab.up([POD[case]])
        return self

    def lab_of(self, case: str) -> Lab:
        return self.var_labs.get(case, self.lab)

    def __exit__(self, *exc) -> None:
        try:
            for p in self.servers:  # outside the cgroup: Lab.down would not kill them
                p.kill()
                p.wait()
        finally:
            try:
                for bpffs, lb in ((self.bpffs, self.lb),
                                  *((b, self.var_lbs.get(c)) for c, b in self.var_bpffs.items())):
                    if bpffs.exists():
                        uninstall(bpffs)
                    if lb is not None and lb.bpf is not None:
                        lb.bpf.cleanup()
            finally:
                errors = []
                for lab in (self.lab, *self.var_labs.values()):
                    try:
                        lab.down()
                    except Exception as exc:  # the others still come down
                        errors.append(exc)
                if errors:
                    raise errors[0]

    def start_servers(self) -> None:
        for case in self.cases:
            p = self.lab_of(case).popen(POD[case], [*self.pin, str(LOADGEN), "server", *BACKEND_TARGETS],
                               in_cgroup=False, stdout=subprocess.PIPE, text=True)
            self.servers.append(p)
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError(f"loadgen server in {case} did not start")

    def run_in(self, case: str, argv: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
        """Runs argv in the case's netns, outside the lab cgroup, and checks it."""
        res = self.lab_of(case).run(POD[case], argv, in_cgroup=False, timeout=timeout)
        if res.returncode != 0:
            raise RuntimeError(f"{case}: {' '.join(argv)} failed:\n{res.stderr[-2000:]}")
        return res

    # --- programming -------------------------------------------------------------
    def write(self, name: str, text: str) -> Path:
        self.work.mkdir(parents=True, exist_ok=True)
        path = self.work / name
        path.write_text(text)
        return path

    def program(self, case: str) -> dict:
        """Programs N services from empty; returns timings in seconds."""
        if case == "direct":
            return {}
        if case == "meshbpf":
            return self._program_meshbpf()
        if case == "split":
            self._program_split()
            return {}
        if case in VARIANTS:
            self._program_variant(case)
            return {}
        if case == "nftables":
            path = self.write(f"nft-{self.n}.nft", kr.nft_ruleset(self.svcs))
            argv = ["nft", "-f", str(path)]
        else:
            path = self.write(f"ipt-{self.n}.rules", kr.iptables_restore(self.svcs))
            argv = [RESTORE[case], "-w", "30", str(path)]
        t0 = time.perf_counter()
        self.run_in(case, argv)
        total = time.perf_counter() - t0
        # Conntrack is on in this netns now. RST-closed connections sit in
        # CLOSE for 10 s by default; at tens of thousands of connections a
        # second that would approach nf_conntrack_max and start dropping.
        self.run_in(case, ["sysctl", "-qw", "net.netfilter.nf_conntrack_tcp_timeout_close=1"])
        return {"total_s": total}

    def _datapath(self, lab: Lab, bpffs: Path, features: dict | None = None) -> SockLB:
        cg = lab.cgroup
        if cg == cgroup2_mount() or cg.parent != cgroup2_mount():
            raise RuntimeError(f"refusing to attach to {cg}: not a child of the cgroup2 root")
        lb = SockLB(bpffs=bpffs, sizes=self.map_sizes, features=features)
        lb.compile()
        lb.attach(cg)
        return lb

    def _program_variant(self, case: str) -> None:
        """The N services on a datapath of the case's own, built without its
        features (untimed: the programming benchmark is meshbpf's)."""
        features = {**kernel_features.as_dict(kernel_features.probe()), **VARIANTS[case][1]}
        lb = self.var_lbs[case] = self._datapath(self.var_labs[case], self.var_bpffs[case], features)
        maps = LBMaps.from_socklb(lb)
        desired = read_config(self.write(f"services-{self.n}.yaml", kr.kube_yaml(self.svcs))).state
        maps.apply(plan(maps.read(), wanted_services(desired)))

    def _program_meshbpf(self) -> dict:
        self.lb = self._datapath(self.lab, self.bpffs)
        self.maps = LBMaps.from_socklb(self.lb)
        path = self.write(f"services-{self.n}.yaml", kr.kube_yaml(self.svcs))
        # What the agent does on a config change: parse, plan against the maps, write.
        t0 = time.perf_counter()
        desired = read_config(path).state
        t1 = time.perf_counter()
        current = self.maps.read()
        p = plan(current, wanted_services(desired))
        check_capacity(current, p, self.maps.capacity)
        t2 = time.perf_counter()
        self.maps.apply(p)
        t3 = time.perf_counter()
        self.state = p.apply_to(current)
        return {"total_s": t3 - t0, "parse_s": t1 - t0, "plan_s": t2 - t1, "apply_s": t3 - t2,
                "maps_s": t3 - t1, "writes": p.writes}

    def _program_split(self) -> None:
        """Adds the split case's Services and route to meshbpf's maps (after
        the N services, untimed: the programming benchmark stays the same)."""
        self.split = split_objects(self.n)
        path = self.write(f"split-{self.n}.yaml", self._meshbpf_yaml(self.svcs))
        desired = read_config(path).state
        assert desired.routes, "the split case's route was not read"
        p = plan(self.state, wanted_services(desired))
        check_capacity(self.state, p, self.maps.capacity)
        self.maps.apply(p)
        self.state = p.apply_to(self.state)
        # As the agent does: count the split's connections per backend, so
        # the case pays for the counter it has in production.
        self.counters = RouteCounters(self.bpffs)
        self.counters.sync(desired, self.state)
        assert len(self.counters.labels) == len(kr.BACKENDS), self.counters.labels

    def _meshbpf_yaml(self, svcs: list) -> str:
        """meshbpf's config: the services, and the split case's objects once programmed."""
        if self.split is None:
            return kr.kube_yaml(svcs)
        extra, route = self.split
        return kr.kube_yaml(svcs + extra) + "---\n" + route

    def add_one(self, case: str) -> dict:
        """Adds service N (one more) the way each system does an update."""
        new = kr.service(self.n)
        if case == "meshbpf":
            return self._add_one_meshbpf(new)
        if case == "nftables":
            argv = ["nft", "-f", str(self.write("nft-add.nft", kr.nft_add_one(new)))]
        else:
            path = self.write("ipt-add.rules", kr.iptables_add_one(self.svcs, new))
            argv = [RESTORE[case], "-w", "30", "--noflush", str(path)]
        t0 = time.perf_counter()
        self.run_in(case, argv)
        return {"total_s": time.perf_counter() - t0}

    def _add_one_meshbpf(self, new) -> dict:
        """The agent's own path: its file source over a folder holding the N
        Services (read and synced untimed first: the maps hold them already,
        so that sync writes nothing), then the new Service in a file of its
        own, which the next step reads alone and plans incrementally."""
        folder = self.work / "meshbpf-folder"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        (folder / "services.yaml").write_text(self._meshbpf_yaml(self.svcs))
        agent = Agent(AgentOptions(config=folder, bpffs=self.bpffs, resync_interval=0),
                      source=FileSource(folder, settle_s=0), lb=_NoExtras())
        agent.lbsync.start(self.maps)
        agent.step()
        first = _writes(agent)
        if not agent.ready() or first:
            raise RuntimeError(f"N={self.n}: the agent's first read did not match the maps ({first} writes)")
        synced: list[float] = []
        real_sync = agent.lbsync.sync

        def timed_sync(*args, **kwargs):
            t = time.perf_counter()
            try:
                return real_sync(*args, **kwargs)
            finally:
                synced.append(time.perf_counter() - t)
        agent.lbsync.sync = timed_sync
        t0 = time.perf_counter()
        (folder / "services-new.yaml").write_text(kr.kube_yaml([new]))
        agent.step()
        total = time.perf_counter() - t0
        writes = _writes(agent) - first
        if not writes or not agent.ready():
            raise RuntimeError(f"N={self.n}: the agent did not program the new Service")
        self.state = agent.lbsync.current
        # rest_s: the step outside the LB sync (the source's read, mostly)
        return {"total_s": total, "maps_s": sum(synced), "rest_s": total - sum(synced), "writes": writes}

    def rnat_entries(self) -> int:
        """Entries in meshbpf's reverse-NAT LRU map: one per connection made,
        never deleted, so at these rates it is full (evicting) within seconds."""
        fd = libbpf.obj_get(str(self.bpffs / "mbpf_rnat"))
        try:
            return libbpf.map_count(fd, libbpf.map_info(fd).key_size)
        finally:
            os.close(fd)

    # --- connections -------------------------------------------------------------
    def client(self, case: str, seconds: float, warmup: float) -> dict:
        targets = (BACKEND_TARGETS if case == "direct" else [split_target(self.n)] if case == "split"
                   else [kr.target_vip(self.n)])
        argv = [*self.pin, str(LOADGEN), "client", "-d", str(seconds), "-w", str(warmup), *targets]
        res = self.lab_of(case).run(POD[case], argv, in_cgroup=(case in IN_CGROUP),
                           timeout=seconds + warmup + 60)
        if res.returncode != 0:
            raise RuntimeError(f"loadgen client in {case} failed: {res.stderr}")
        return json.loads(res.stdout)


class _NoExtras:
    """The socket-LB's features the agent asks about: none beyond load
    balancing (the datapath here is the bench's SockLB, its maps given)."""
    redirect = False
    capture = False


def _writes(agent: Agent) -> int:
    """Map entries the agent has written or deleted so far."""
    return int(sum(s.value for m in agent.metrics.map_writes.collect() for s in m.samples
                   if s.name.endswith("_total")))


def run_size(n: int, cases: list[str], args, work: Path) -> dict:
    out: dict = {"programming": {}, "add_one": {}, "rounds": []}
    with SizeRun(n, cases, work, args.cpu, args.map_size) as run:
        run.start_servers()
        for case in cases:
            log(f"N={n}: programming {case}")
            out["programming"][case] = run.program(case)
            if out["programming"][case]:
                log(f"N={n}: {case} programmed in {out['programming'][case]['total_s']:.3f} s")
        for case in cases:  # a broken path must fail here, not skew a ratio
            check = run.client(case, 0.3, 0.05)
            if check["errors"] or check["count"] < 100:
                raise RuntimeError(f"N={n}: {case} does not serve: {check}")
        for r in range(args.rounds):
            order = cases[r % len(cases):] + cases[:r % len(cases)]
            results = {case: run.client(case, args.duration, args.warmup) for case in order}
            out["rounds"].append(results)
            log(f"N={n}: round {r + 1}/{args.rounds}: " + ", ".join(
                f"{c} {results[c]['rate']:.0f}/s" + (f" ({results[c]['errors']} errors)"
                                                     if results[c]["errors"] else "")
                for c in cases))
        if run.counters is not None:  # what the split sent where: about half each
            out["split_route_backend_connections"] = {b: n for (_, b), n in run.counters.read().items()}
            log(f"N={n}: split connections per backend Service: {out['split_route_backend_connections']}")
        # Where each meshbpf datapath keeps a connected socket's reverse NAT.
        datapaths = (("meshbpf", run.lb), *run.var_lbs.items())
        out["conn_rnat"] = {case: bool(lb.features.get("conn_rnat")) for case, lb in datapaths if lb}
        out["conn_slots"] = {case: bool(lb.features.get("conn_slots")) for case, lb in datapaths if lb}
        if "meshbpf" in cases:
            rnat = next(m for m in LB_MAPS if m.name == "mbpf_rnat")
            out["meshbpf_rnat_entries"] = run.rnat_entries()
            out["meshbpf_rnat_capacity"] = run.lb.capacity(rnat)
        for case in cases:
            if case not in ("direct", "split", *VARIANTS):  # meshbpf's datapath, added to above
                out["add_one"][case] = run.add_one(case)
                log(f"N={n}: {case} added one service in {out['add_one'][case]['total_s']:.4f} s")
    out["summary"] = summarize(out["rounds"], cases)
    return out


def summarize(rounds: list[dict], cases: list[str]) -> dict:
    """Medians over rounds; ratios are taken within a round, then the median
    (with the quartiles, to show how much the machine moved under us)."""
    med = statistics.median
    # A round whose direct run got nothing done (the client starved on a
    # loaded machine) has no ratio to give.
    rounds = [r for r in rounds if r["direct"]["rate"] > 0] or rounds[:0]
    if not rounds:
        raise RuntimeError("no round had a direct rate above 0: the machine is too busy to measure")
    summary = {}
    for case in cases:
        rs = [r[case] for r in rounds]
        ratios = sorted(r[case]["rate"] / r["direct"]["rate"] for r in rounds)
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        summary[case] = {
            "rate_ratio_q1": q[0], "rate_ratio_q3": q[2],
            "rate": med(x["rate"] for x in rs),
            "p50_us": med(x["p50_us"] for x in rs),
            "p99_us": med(x["p99_us"] for x in rs),
            "errors": sum(x["errors"] for x in rs),
            "rate_ratio": med(ratios),
            "p50_ratio": med(r[case]["p50_us"] / r["direct"]["p50_us"] for r in rounds),
            "p99_ratio": med(r[case]["p99_us"] / r["direct"]["p99_us"] for r in rounds),
        }
    return summary


def machine() -> dict:
    def version(argv: list[str]) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True).stdout.strip().splitlines()[0]
        except (OSError, IndexError):
            return "?"
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), "?")
    return {"kernel": platform.release(), "cpu": cpu, "cpus": os.cpu_count(),
            "iptables": version(["iptables-legacy", "--version"]), "nft": version(["nft", "--version"]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="8 rounds of 0.2 s instead of 30 rounds of 0.3 s")
    ap.add_argument("--sizes", default="10,1000,10000", help="numbers of services (default %(default)s)")
    ap.add_argument("--cases", default=",".join(CASES), help="default %(default)s")
    ap.add_argument("--rounds", type=int, help="connection rounds per size")
    ap.add_argument("--duration", type=float, help="seconds per client run")
    ap.add_argument("--warmup", type=float, default=0.05,
                    help="seconds not counted at the start of each client run (default %(default)s)")
    ap.add_argument("--cpu", default=str(os.cpu_count() - 1),
                    help="CPU that client and server share, or 'none' (default %(default)s)")
    ap.add_argument("--map-size", action="append", default=[], metavar="NAME=ENTRIES",
                    help="as the agent's flag (repeatable); 100 000 Services need README's sizes")
    ap.add_argument("--out", type=Path, default=HERE / "results", help="default bench/results")
    ap.add_argument("--report-only", type=Path, metavar="JSON",
                    help="only redo the tables and plot from a results file")
    args = ap.parse_args()
    if args.report_only:
        report.write_all(json.loads(args.report_only.read_text()), args.out, args.report_only)
        return
    # Many short rounds rather than a few long ones: other work on a shared
    # machine comes and goes in bursts, and a ratio is only fair when both
    # of its runs saw the same conditions.
    args.rounds = args.rounds or (8 if args.quick else 30)
    args.duration = args.duration or (0.2 if args.quick else 0.3)
    args.cpu = None if args.cpu == "none" else int(args.cpu)
    try:
        args.map_size = {name: int(n) for name, n in (m.split("=", 1) for m in args.map_size)}
    except ValueError:
        ap.error("--map-size: give NAME=ENTRIES, e.g. mbpf_svc=131072")
    cases = [c for c in args.cases.split(",") if c]
    if "direct" not in cases or any(c not in CASES for c in cases):
        ap.error(f"--cases: choose from {', '.join(CASES)}; direct is the baseline and required")
    if "split" in cases and "meshbpf" not in cases:
        ap.error("--cases: split runs on meshbpf's datapath; add meshbpf")
    cases = [c for c in CASES if c in cases]  # direct first; split after meshbpf, whose datapath it uses
    sizes = [int(s) for s in args.sizes.split(",")]
    if not LOADGEN.exists():
        ap.error(f"{LOADGEN} is missing: run bench/run, which builds it")

    # SIGTERM unwinds like Ctrl-C, so every lab, pin and process is removed.
    # Only in this process: pyroute2 forks helpers (IPRoute(netns=...)) and
    # stops them with SIGTERM; unwinding in such a child would run our
    # clean-up there and delete the namespaces the parent is still using.
    main_pid = os.getpid()
    signal.signal(signal.SIGTERM,
                  lambda *_: sys.exit(143) if os.getpid() == main_pid else os._exit(143))
    argv = " ".join(sys.argv[1:])
    results = {"command": f"bench/run {argv}".strip(), "machine": machine(),
               "config": {"sizes": sizes, "cases": cases, "rounds": args.rounds,
                          "duration_s": args.duration, "warmup_s": args.warmup,
                          "quick": args.quick, "backends": len(kr.BACKENDS), "cpu": args.cpu,
                          "map_sizes": args.map_size},
               "sizes": {}}
    started = time.monotonic()
    # Generated YAML and rule files go to bench/out (gitignored) and are
    # removed at the end.
    work = HERE / "out" / f"run-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    try:
        for n in sizes:
            results["sizes"][str(n)] = run_size(n, cases, args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / report.RESULTS_NAME).write_text(json.dumps(results, indent=1) + "\n")
    report.write_all(results, args.out)
    print(report.markdown(results, args.out))
    log(f"done in {results['elapsed_s']:.0f} s; results in {args.out}")


if __name__ == "__main__":
    main()
