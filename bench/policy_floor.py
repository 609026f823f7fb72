"""Where a connection's extra time under NetworkPolicy goes, on one lab pair.

    .venv/bin/python bench/policy_floor.py [--rounds R] [--duration S] [--stats]

One lab, two pods (bench/cli, bench/srv) on the bridge, the loadgen
server in srv and the client in cli, both pinned to one CPU as in
bench/policy.py. The SAME pair is measured three ways, one after the
other, the starting case rotating per round, so that the pair and the
moment are not what differs:

    none     no clsact qdisc on either host-side veth (bench/policy.py's baseline)
    empty    clsact + an empty tc program on both hooks of both veths: the floor
    meshbpf  clsact + the policy programs, srv ingress-isolated (cli's /32, the
             loadgen port), cli open: the bench's case at N >= 1

The maps are filled by hand (no agent). Prints each case's median ratio
to `none` of the same round, with quartiles. --stats then runs each case
with programs alone for a few rounds with the kernel's BPF run-time statistics on
(BPF_ENABLE_STATS, off again when this exits) and prints ns per program
run under the real flood and per connection.
"""

from __future__ import annotations

import argparse
import ctypes as ct
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from meshbpf.datapath import libbpf
from meshbpf.datapath.endpoints import find_endpoint
from meshbpf.datapath.policy import HOOKS, TC_HANDLE, TC_PRIO, ETH_P_ALL, PolicyDatapath, PolicyMaps, \
    addr_bytes, _ipr
from meshbpf.lab.netlab import Lab
from meshbpf.reconcile.policy_keys import (DIR_IN, EP_ISOLATE_IN, EpVal, PeerKey, PeerVal, PolicyStep,
                                           PortKey, PortVal)

HERE = Path(__file__).resolve().parent
LOADGEN = HERE / "bin" / "loadgen"
PORT = 8080
CLI, SRV = "bench/cli", "bench/srv"
EMPTY = b"int mbpf_tc_empty(struct __sk_buff *skb) { return -1; }"


class Floor:
    def __init__(self, args):
        self.args = args
        self.lab = Lab(f"pf{os.getpid()}")
        self.bpffs = Path(f"/sys/fs/bpf/meshbpf-bench-pf{os.getpid()}")
        self.pin = ["taskset", "-c", str(os.cpu_count() - 1)]
        self.procs: list[subprocess.Popen] = []
        self.ifindex: dict[str, int] = {}

    def __enter__(self):
        from bcc import BPF
        self.lab.up([CLI, SRV])
        srv_ip = self.lab.pods[SRV].ipv4
        server = self.lab.popen(SRV, [*self.pin, str(LOADGEN), "server", f"{srv_ip}:{PORT}"],
                                in_cgroup=False, stdout=subprocess.PIPE, text=True)
        self.procs.append(server)
        if server.stdout.readline().strip() != "ready":
            raise RuntimeError("loadgen server did not start")
        self.dp = PolicyDatapath(self.bpffs, netns=self.lab.node_ns,
                                 sizes={"mbpf_ct": self.args.ct_max} if self.args.ct_max else {})
        self.dp.compile()
        self.empty = BPF(text=EMPTY).load_func(b"mbpf_tc_empty", BPF.SCHED_CLS)
        for pod in (CLI, SRV):
            p = self.lab.pods[pod]
            self.ifindex[pod] = find_endpoint(p.uid, [p.ipv4, p.ipv6], self.lab.cgroup)
        self.fill()
        return self

    def __exit__(self, *exc):
        try:
            for p in self.procs:
                p.kill()
                p.wait()
        finally:
            try:
                if self.bpffs.exists():
                    from meshbpf.datapath.loader import uninstall
                    self.dp.bpf = None
                    uninstall(self.bpffs)
            finally:
                self.lab.down()

    def fill(self) -> None:
        cli, srv = self.lab.pods[CLI], self.lab.pods[SRV]
        with PolicyMaps(self.bpffs) as maps:
            maps.apply([
                PolicyStep("addresses", "update", {addr_bytes(a): ep for ep, p in ((1, cli), (2, srv))
                                                   for a in (p.ipv4, p.ipv6)}),
                PolicyStep("peers", "update", {PeerKey(2, 0, DIR_IN, addr_bytes(cli.ipv4), 128): PeerVal(1, 0, 0)}),
                PolicyStep("ports", "update", {PortKey(2, 0, DIR_IN, 6, 1, PORT, 16): PortVal(21)}),
                PolicyStep("endpoints", "update", {self.ifindex[CLI]: EpVal(1, 0, 0),
                                                   self.ifindex[SRV]: EpVal(2, 0, EP_ISOLATE_IN)}),
            ])

    def set_case(self, case: str) -> None:
        with _ipr(self.lab.node_ns) as ipr:
            for idx in self.ifindex.values():
                if case == "none":
                    try:
                        ipr.tc("del", "clsact", idx)
                    except Exception:
                        pass  # none there
                    continue
                try:
                    ipr.tc("add", "clsact", idx)
                except Exception:
                    pass  # there already
                for name, parent in HOOKS.items():
                    fd = self.empty.fd if case == "empty" else self.dp.prog_fd(name)
                    ipr.tc("replace-filter", "bpf", idx, TC_HANDLE, fd=fd, name=name, parent=parent,
                           prio=TC_PRIO, protocol=ETH_P_ALL, classid=1, direct_action=True)

    def connections(self, seconds: float) -> dict:
        argv = [*self.pin, str(LOADGEN), "client", "-d", str(seconds), "-w", "0.1",
                f"{self.lab.pods[SRV].ipv4}:{PORT}"]
        res = self.lab.run(CLI, argv, in_cgroup=False, timeout=seconds + 60)
        if res.returncode != 0:
            raise RuntimeError(f"loadgen client failed: {res.stderr}")
        return json.loads(res.stdout)

    def prog_ids(self, case: str) -> dict[str, int]:
        if case == "empty":
            return {"mbpf_tc_empty": libbpf.prog_info(self.empty.fd).id}
        return {name: libbpf.prog_info(self.dp.prog_fd(name)).id for name in HOOKS}


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return q[0], statistics.median(xs), q[2]


def ratios(f: Floor, cases: list[str], rounds: int, seconds: float) -> dict:
    got = {c: [] for c in cases}
    for r in range(rounds):
        order = cases[r % len(cases):] + cases[:r % len(cases)]
        for case in order:
            f.set_case(case)
            got[case].append(f.connections(seconds)["rate"])
    return {c: {"rate": statistics.median(got[c]),
                "ratio": quartiles([x / n for x, n in zip(got[c], got["none"])])} for c in cases}


def prog_stats(prog_id: int) -> tuple[int, int]:
    out = subprocess.run(["bpftool", "-j", "prog", "show", "id", str(prog_id)], capture_output=True,
                         text=True, check=True).stdout
    d = json.loads(out)
    return d.get("run_time_ns", 0), d.get("run_cnt", 0)


def flood_stats(f: Floor, case: str, rounds: int, seconds: float) -> dict:
    """ns per run of each program of a case under the flood, per round (the
    minimum and the median over the rounds: load from elsewhere only adds);
    the kernel's run-time statistics are on only meanwhile."""
    libbpf._lib.bpf_enable_stats.argtypes = [ct.c_int]
    fd = libbpf._check(libbpf._lib.bpf_enable_stats(0), "BPF_ENABLE_STATS")  # BPF_STATS_RUN_TIME
    per_round = []
    try:
        f.set_case(case)
        ids = f.prog_ids(case)
        for _ in range(rounds):
            before = {n: prog_stats(i) for n, i in ids.items()}
            conns = f.connections(seconds)["count"]
            after = {n: prog_stats(i) for n, i in ids.items()}
            delta = {n: [a - b for a, b in zip(after[n], before[n])] for n in ids}
            per_round.append((conns, delta))
    finally:
        os.close(fd)
    out = {}
    for n in ids:
        ns = [d[n][0] / max(d[n][1], 1) for _, d in per_round]
        runs = [d[n][1] / max(c, 1) for c, d in per_round]
        out[n] = {"ns_per_run": min(ns), "ns_per_run_median": statistics.median(ns),
                  "runs_per_connection": statistics.median(runs)}
    per_conn = [sum(d[n][0] for n in ids) / max(c, 1) for c, d in per_round]
    out["ns_per_connection"] = min(per_conn)
    out["ns_per_connection_median"] = statistics.median(per_conn)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--duration", type=float, default=0.3)
    ap.add_argument("--cases", default="none,empty,meshbpf")
    ap.add_argument("--stats", action="store_true")
    ap.add_argument("--stats-rounds", type=int, default=10)
    ap.add_argument("--ct-max", type=int, default=0, help="mbpf_ct entries (default: the build's)")
    args = ap.parse_args()
    if not LOADGEN.exists():
        LOADGEN.parent.mkdir(exist_ok=True)
        subprocess.run(["gcc", "-O2", "-Wall", "-pthread", "-o", str(LOADGEN), str(HERE / "loadgen.c")], check=True)
    cases = args.cases.split(",")
    with Floor(args) as f:
        res = {"ratios": ratios(f, cases, args.rounds, args.duration)} if args.rounds else {}
        if args.stats:
            res["flood"] = {c: flood_stats(f, c, args.stats_rounds, args.duration) for c in cases if c != "none"}
    res["loadavg"] = os.getloadavg()
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
