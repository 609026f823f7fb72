"""Same-node socket redirection against plain TCP, between two lab pods.
Run it through bench/run-redirect (see bench/README.md).

One lab holds two pods, "srv" and "cli", both in the lab's child cgroup.
One `sockbench server` in srv listens on one port per cell of the matrix

    {rr, stream} x {64 B, 1 KB, 64 KB, 1 MB} x {nagle, nodelay}

and a `sockbench` client in cli makes one connection per run to the pod
address of srv (10.244.0.2), so plain TCP crosses the pods' veths and the
lab bridge, as between two pods of a node. meshbpf is compiled into its own
bpffs folder, and redirection is switched on and off between runs with
meshbpf.datapath.redirect.apply_settings, the agent's own code path: on, the
sockops and setsockopt programs are attached to the lab cgroup (sk_msg sits
on the pinned sockhash); off, they are detached, so a "tcp" run has no BPF
program on its path at all.

A round runs every cell once in each case ("tcp" then "redirect", or the
other way, alternating), the cells in a rotating order. A cell's ratio is
redirect / tcp within the same round; the tables give the median ratio over
the rounds and its quartiles. Each redirect run also records the change in
the redirection counters, so a cell shows which path its bytes took.

The matrix is run under each --pinning:
    same   client and server share the last CPU (as bench/lbbench.py does)
    none   no pinning: both free to use both CPUs
    split  client on CPU 0, server on the last CPU
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import platform
import queue
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import redirreport
import redirtools
from meshbpf.datapath import redirect
from meshbpf.datapath.cgroup import cgroup2_mount
from meshbpf.datapath.loader import SockLB, uninstall
from meshbpf.lab.netlab import Lab
from meshbpf.model import RedirectSettings

HERE = Path(__file__).resolve().parent
SOCKBENCH = HERE / "bin" / "sockbench"
MODES = ("rr", "stream")
SIZES = (64, 1024, 65536, 1048576)
NAGLES = ("nagle", "nodelay")
CASES = ("tcp", "redirect")
PINNINGS = ("same", "none", "split")
PORT0 = 7100
POD_CIDR = ipaddress.ip_network("10.244.0.0/24")
TARGET = {"rr": 1.2, "stream": 1.0}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Cell:
    mode: str
    size: int
    nagle: str
    port: int

    @property
    def key(self) -> str:
        return f"{self.mode}/{self.size}/{self.nagle}"

    def spec(self) -> str:
        return f"{self.port}:{self.mode}:{self.size}:{self.nagle}"


def cells_for(modes, sizes, nagles) -> list[Cell]:
    out, port = [], PORT0
    for mode in modes:
        for size in sizes:
            for nagle in nagles:
                out.append(Cell(mode, size, nagle, port))
                port += 1
    return out


def pin_argv(pinning: str, who: str) -> list[str]:
    last = os.cpu_count() - 1
    if pinning == "none":
        return []
    if pinning == "same":
        return ["taskset", "-c", str(last)]
    return ["taskset", "-c", "0" if who == "client" else str(last)]


class Server:
    """sockbench server in srv; a thread turns its JSON lines into a queue."""

    def __init__(self, lab: Lab, cells: list[Cell], pinning: str, args):
        self.lines: queue.Queue = queue.Queue()
        self.pending: dict[int, dict] = {}
        self.proc = lab.popen("srv", [*pin_argv(pinning, "server"), str(SOCKBENCH), "server",
                                      "-w", str(args.warmup), "-b", str(args.readbuf),
                                      *(["-P"] if args.spin else []),
                                      str(lab.pods["srv"].ipv4), *(c.spec() for c in cells)],
                              in_cgroup=True, stdout=subprocess.PIPE, text=True)
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("sockbench server did not start")
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))

    def results(self, peer_ports: list[int], timeout: float = 15) -> list[dict]:
        """The server's lines for these client connections."""
        deadline = time.monotonic() + timeout
        while any(p not in self.pending for p in peer_ports):
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"no server report for client ports {peer_ports}") from None
            self.pending[line["peer_port"]] = line
        return [self.pending.pop(p) for p in peer_ports]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class Bench:
    """The lab, meshbpf's programs and pins; removed on exit, even on failure."""

    def __init__(self):
        self.lab = Lab(f"rbench{os.getpid()}")
        self.bpffs = Path(f"/sys/fs/bpf/meshbpf-bench-rbench{os.getpid()}")
        self.lb: SockLB | None = None
        self.applied: RedirectSettings | None = None
        self.server: Server | None = None

    def __enter__(self) -> "Bench":
        try:
            self.lab.up(["srv", "cli"])
            cg = self.lab.cgroup
            if cg == cgroup2_mount() or cg.parent != cgroup2_mount():
                raise RuntimeError(f"refusing to attach to {cg}: not a child of the cgroup2 root")
            self.lb = SockLB(bpffs=self.bpffs)
            self.lb.compile()
            if not self.lb.redirect:
                raise RuntimeError("this kernel cannot do socket redirection (see `meshbpf status`)")
            self.set_redirect(False)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self.server is not None:
                self.server.stop()
        finally:
            try:
                uninstall(self.bpffs)
                if self.lb is not None and self.lb.bpf is not None:
                    self.lb.bpf.cleanup()
            finally:
                self.lab.down()

    def set_redirect(self, on: bool) -> None:
        """What the agent does on an AgentConfig change (spec.socketRedirect)."""
        settings = RedirectSettings(enabled=on, pod_cidrs=(POD_CIDR,))
        redirect.apply_settings(self.lb, settings, self.lab.cgroup, self.applied)
        self.applied = settings

    def start_server(self, cells: list[Cell], pinning: str, args) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
        self.server = Server(self.lab, cells, pinning, args)

    def counters(self) -> dict[str, int]:
        return redirect.read_counters(self.bpffs) or {}

    def run(self, cell: Cell, case: str, pinning: str, args) -> dict:
        """One client run of a cell; returns client, server and counter data."""
        self.set_redirect(case == "redirect")
        argv = [*pin_argv(pinning, "client"), str(SOCKBENCH), cell.mode, "-d", str(args.duration),
                "-w", str(args.warmup), "-s", str(cell.size), "-c", str(args.conns)]
        if cell.nagle == "nodelay":
            argv.append("-N")
        if args.spin:
            argv.append("-P")
        argv.append(f"{self.lab.pods['srv'].ipv4}:{cell.port}")
        before = self.counters()
        res = self.lab.run("srv" if args.same_pod else "cli", argv, in_cgroup=True,
                           timeout=args.duration + args.warmup + 60)
        try:
            client = json.loads(res.stdout)
        except json.JSONDecodeError:
            raise RuntimeError(f"{cell.key} {case}: sockbench client failed "
                               f"(rc {res.returncode}): {res.stderr[-2000:]}") from None
        if res.returncode != 0 or client["error"]:
            raise RuntimeError(f"{cell.key} {case}: client error {client['error']}: {res.stderr[-2000:]}")
        servers = self.server.results(client["local_ports"])
        after = self.counters()
        delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        if case == "tcp" and delta.get("inserted_sockets"):
            raise RuntimeError(f"{cell.key}: redirection was off, yet {delta} changed")
        if cell.mode == "rr":
            value = client["rate"]
            moved = client["sent_bytes"] + client["recv_bytes"]
        else:
            value = sum(s["MBps"] for s in servers)
            moved = client["sent_bytes"]
        return {"value": value, "client": client, "server": servers, "counters": delta,
                "moved_bytes": moved,
                "eagain": client["eagain"] + sum(s["eagain"] for s in servers),
                "eagain_eof": client["eagain_eof"] + sum(s["eagain_eof"] for s in servers)}

    def pipe_floor(self, pinning: str, args) -> float:
        """Request/response over pipes between two threads, under this pinning:
        what wake-ups alone allow, with no network."""
        last = os.cpu_count() - 1
        cpus = {"same": f"{last},{last}", "split": f"0,{last}"}.get(pinning)
        argv = [str(SOCKBENCH), "pipe-rr", "-d", str(args.duration), "-w", str(args.warmup), "-s", "64",
                *(["-C", cpus] if cpus else [])]
        res = self.lab.run("cli", argv, in_cgroup=True, timeout=args.duration + args.warmup + 60)
        return json.loads(res.stdout)["rate"]


# --- real tools: sockperf (ping-pong) and iperf3 (stream) ---------------------

@dataclass(frozen=True)
class ToolCell:
    tool: str
    size: int
    nagle: str
    port: int

    @property
    def key(self) -> str:
        return f"{self.tool}/{self.size}/{self.nagle}"


def tool_cells(sizes_pp, sizes_stream) -> list[ToolCell]:
    out, port = [], PORT0 + 100
    for size in sizes_pp:
        for nagle in NAGLES:
            out.append(ToolCell("sockperf", size, nagle, port if nagle == "nodelay" else port + 1))
    port += 2
    for size in sizes_stream:
        for nagle in NAGLES:
            out.append(ToolCell("iperf3", size, nagle, port))
    return out


class Tools:
    """sockperf servers (one with Nagle, one without) and an iperf3 server in srv."""

    def __init__(self, bench: Bench, cells: list[ToolCell], pinning: str):
        self.bench, self.pinning, self.procs = bench, pinning, []
        ip = str(bench.lab.pods["srv"].ipv4)
        pin = pin_argv(pinning, "server")
        ports = {(c.tool, c.nagle): c.port for c in cells}
        for (tool, nagle), port in sorted(ports.items()):
            if tool == "sockperf":
                argv = [*pin, "sockperf", "sr", "--tcp", "-i", ip, "-p", str(port)]
                if nagle == "nagle":
                    argv.append("--tcp-avoid-nodelay")
            elif nagle == "nagle":  # one iperf3 server serves both: -N is the sender's
                argv = [*pin, "iperf3", "-s", "-B", ip, "-p", str(port)]
            else:
                continue
            self.procs.append(bench.lab.popen("srv", argv, in_cgroup=True, stdout=subprocess.DEVNULL,
                                              stderr=subprocess.DEVNULL))
        time.sleep(0.5)

    def stop(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()

    def run(self, cell: ToolCell, case: str, args) -> dict:
        b = self.bench
        b.set_redirect(case == "redirect")
        ip = str(b.lab.pods["srv"].ipv4)
        pin = pin_argv(self.pinning, "client")
        if cell.tool == "sockperf":
            # sockperf counts from 0.4 s after its start and stops 0.05 s early
            argv = [*pin, "sockperf", "pp", "--tcp", "-i", ip, "-p", str(cell.port),
                    "-m", str(cell.size), "-t", f"{args.duration + 0.45:.2f}", "--mps=max"]
            if cell.nagle == "nagle":
                argv.append("--tcp-avoid-nodelay")
        else:
            # iperf3 3.12 takes whole seconds for -t and -O
            argv = [*pin, "iperf3", "-c", ip, "-p", str(cell.port), "-t", str(max(1, round(args.duration))),
                    "-O", "1", "-l", str(cell.size), "-J"]
            if cell.nagle == "nodelay":
                argv.append("-N")
        before = b.counters()
        res = b.lab.run("cli", argv, in_cgroup=True, timeout=args.duration + 60)
        delta = {k: v - before.get(k, 0) for k, v in b.counters().items()}
        if cell.tool == "sockperf":
            m = re.search(r"\[Valid Duration\] RunTime=([\d.]+) sec; SentMessages=(\d+); "
                          r"ReceivedMessages=(\d+)", res.stdout + res.stderr)
            p50 = re.search(r"percentile 50\.000 =\s*([\d.]+)", res.stdout + res.stderr)
            p99 = re.search(r"percentile 99\.000 =\s*([\d.]+)", res.stdout + res.stderr)
            if res.returncode != 0 or not m or "ERROR" in res.stdout + res.stderr:
                raise RuntimeError(f"sockperf {cell.key} {case} failed: {(res.stdout + res.stderr)[-1500:]}")
            secs, recvd = float(m.group(1)), int(m.group(3))
            total = re.search(r"\[Total Run\].*SentMessages=(\d+); ReceivedMessages=(\d+)",
                              res.stdout + res.stderr)
            moved = cell.size * (int(total.group(1)) + int(total.group(2))) if total else 0
            # sockperf prints half the round trip; a transaction is a round trip
            return {"value": recvd / secs, "p50_us": 2 * float(p50.group(1)),
                    "p99_us": 2 * float(p99.group(1)), "counters": delta, "moved_bytes": moved}
        try:
            out = json.loads(res.stdout)
        except json.JSONDecodeError:
            out = {"error": res.stderr[-1500:]}
        if res.returncode != 0 or out.get("error"):
            raise RuntimeError(f"iperf3 {cell.key} {case} failed: {out.get('error')}")
        # every interval, the omitted ones too: what the splice counters saw
        moved = sum(i["sum"]["bytes"] for i in out.get("intervals", []))
        return {"value": out["end"]["sum_received"]["bits_per_second"] / 8e6, "counters": delta,
                "moved_bytes": moved}


# --- rounds and summaries -------------------------------------------------------

def run_matrix(bench: Bench, cells: list[Cell], pinning: str, args) -> dict:
    bench.start_server(cells, pinning, args)
    rounds: list[dict] = []
    for r in range(args.rounds):
        order = cells[r % len(cells):] + cells[:r % len(cells)]
        rnd: dict = {}
        for i, cell in enumerate(order):
            cases = CASES if (r + i) % 2 == 0 else CASES[::-1]
            rnd[cell.key] = {case: bench.run(cell, case, pinning, args) for case in cases}
        rnd["pipe_floor"] = bench.pipe_floor(pinning, args)
        rnd["loadavg"] = os.getloadavg()[0]  # other work on the machine shows here
        rounds.append(rnd)
        log(f"{pinning}: round {r + 1}/{args.rounds}: " + ", ".join(
            f"{k} {rnd[k]['redirect']['value'] / rnd[k]['tcp']['value']:.2f}" for k in
            (c.key for c in cells)) + f"; pipe floor {rnd['pipe_floor']:.0f}/s")
    summary = summarize(rounds, cells)
    summary["pipe_floor"] = statistics.median(r["pipe_floor"] for r in rounds)
    summary["pipe_floor_range"] = [min(r["pipe_floor"] for r in rounds), max(r["pipe_floor"] for r in rounds)]
    summary["loadavg_max"] = max(r["loadavg"] for r in rounds)
    return {"rounds": rounds, "summary": summary}


def run_tools(bench: Bench, cells: list[ToolCell], pinning: str, args) -> dict:
    tools = Tools(bench, cells, pinning)
    try:
        rounds = []
        for r in range(args.tool_rounds):
            rnd = {}
            for i, cell in enumerate(cells):
                cases = CASES if (r + i) % 2 == 0 else CASES[::-1]
                rnd[cell.key] = {case: tools.run(cell, case, args) for case in cases}
            rounds.append(rnd)
            log(f"tools ({pinning}): round {r + 1}/{args.tool_rounds}: " + ", ".join(
                f"{k} {v['redirect']['value'] / v['tcp']['value']:.2f}" for k, v in rnd.items()))
    finally:
        tools.stop()
    return {"rounds": rounds, "summary": summarize(rounds, cells)}


def run_apps(bench: Bench, pinning: str, args) -> dict:
    """Issue 15's matrix with real applications (bench/redirtools.py)."""
    cells = [c for c in redirtools.app_cells() if not args.apps_only or c.tool in args.apps_only]
    rounds = []
    with redirtools.Apps(bench, pin_argv(pinning, "server")) as apps:
        apps.pin = pin_argv(pinning, "client")  # servers started; clients run under the client's pinning
        for r in range(args.app_rounds):
            rnd: dict = {}
            for i, cell in enumerate(cells):
                cases = CASES if (r + i) % 2 == 0 else CASES[::-1]
                rnd[cell.key] = {case: apps.run(cell, case, args.app_duration) for case in cases}
            rnd["pipe_floor"] = bench.pipe_floor(pinning, args)
            rnd["loadavg"] = os.getloadavg()[0]
            rounds.append(rnd)
            log(f"apps ({pinning}): round {r + 1}/{args.app_rounds}: " + ", ".join(
                f"{c.key} {rnd[c.key]['redirect']['value'] / rnd[c.key]['tcp']['value']:.2f}" for c in cells)
                + f"; pipe ceiling {rnd['pipe_floor']:.0f}/s")
    summary = summarize(rounds, cells)
    for cell in cells:
        s = summary[cell.key]
        # one-connection request/response must gain 1.2x; everything else must not lose
        s["target"] = 1.2 if cell.rr and cell.conns == 1 and cell.pipeline == 1 else 1.0
        s["meets_target"] = s["ratio"] >= s["target"]
        c = s["counters_per_run"]
        moved = c.get("redirected_bytes", 0) + c.get("passed_bytes", 0)
        s["spliced_fraction"] = c.get("redirected_bytes", 0) / moved if moved else 0.0
        s["path"] = ("spliced" if s["spliced_fraction"] > 0.99 else
                     "TCP" if s["spliced_fraction"] < 0.01 else "mixed")
        s["unit"] = cell.unit
    summary["pipe_floor"] = statistics.median(r["pipe_floor"] for r in rounds)
    summary["loadavg_max"] = max(r["loadavg"] for r in rounds)
    return {"rounds": rounds, "summary": summary, "cells": [c.key for c in cells]}


def _quartiles(xs: list[float]) -> tuple[float, float, float]:
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4)
    return q[0], statistics.median(xs), q[2]


def path_of(counters: dict, moved: int) -> dict:
    """Which path a cell's bytes took, from the redirect runs' counters."""
    spliced = min(1.0, counters.get("redirected_bytes", 0) / moved) if moved else 0.0
    return {"spliced_fraction": spliced,
            "path": "spliced" if spliced > 0.99 else "TCP" if spliced < 0.01 else "mixed"}


def summarize(rounds: list[dict], cells) -> dict:
    med = statistics.median
    out = {}
    for cell in cells:
        runs = [r[cell.key] for r in rounds if cell.key in r]
        if not runs:
            continue
        q1, m, q3 = _quartiles([x["redirect"]["value"] / x["tcp"]["value"] for x in runs])
        s = {"ratio": m, "ratio_q1": q1, "ratio_q3": q3,
             "tcp": med(x["tcp"]["value"] for x in runs),
             "redirect": med(x["redirect"]["value"] for x in runs),
             "wins": sum(x["redirect"]["value"] > x["tcp"]["value"] for x in runs),
             "rounds": len(runs)}
        mode = getattr(cell, "mode", "rr" if getattr(cell, "tool", "") == "sockperf" else "stream")
        s["target"] = TARGET[mode]
        s["meets_target"] = m >= TARGET[mode]
        for case in CASES:
            if "p50_us" in runs[0][case] or "p50_us" in runs[0][case].get("client", {}):
                get = (lambda x, k: x[k]) if "p50_us" in runs[0][case] else (lambda x, k: x["client"][k])
                s[f"{case}_p50_us"] = med(get(x[case], "p50_us") for x in runs)
                s[f"{case}_p99_us"] = med(get(x[case], "p99_us") for x in runs)
        counters: dict[str, int] = {}
        for x in runs:
            for k, v in x["redirect"]["counters"].items():
                counters[k] = counters.get(k, 0) + v
        s["counters_per_run"] = {k: v / len(runs) for k, v in counters.items()}
        moved = sum(x["redirect"].get("moved_bytes", 0) for x in runs)
        if moved:
            s.update(path_of(counters, moved))
        s["eagain"] = {case: sum(x[case].get("eagain", 0) for x in runs) for case in CASES}
        s["eagain_eof"] = {case: sum(x[case].get("eagain_eof", 0) for x in runs) for case in CASES}
        out[cell.key] = s
    return out


def machine() -> dict:
    def version(argv: list[str]) -> str:
        try:
            res = subprocess.run(argv, capture_output=True, text=True)
            return (res.stdout + res.stderr).strip().splitlines()[0]
        except (OSError, IndexError):
            return "?"
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), "?")
    return {"kernel": platform.release(), "cpu": cpu, "cpus": os.cpu_count(),
            "sockperf": version(["sockperf", "--version"]).replace("sockperf, version ", ""),
            "iperf3": version(["iperf3", "--version"]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4 rounds of 0.4 s, no tools")
    ap.add_argument("--pinning", default="same,none",
                    help=f"comma list of {', '.join(PINNINGS)} (default %(default)s)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)))
    ap.add_argument("--nagle", default=",".join(NAGLES), help="nagle, nodelay or both")
    ap.add_argument("--rounds", type=int, help="rounds per pinning (default 15; 4 with --quick)")
    ap.add_argument("--duration", type=float, help="measured seconds per run (default 0.8)")
    ap.add_argument("--warmup", type=float, default=0.2,
                    help="seconds not counted at the start of each run (default %(default)s)")
    ap.add_argument("--conns", type=int, default=1, help="connections per run (default 1)")
    ap.add_argument("--readbuf", type=int, default=1 << 20,
                    help="stream receiver's read size in bytes (default %(default)s)")
    ap.add_argument("--tools", default=None,
                    help="pinnings to cross-check with sockperf and iperf3 (default: the first "
                         "of --pinning; 'no' to skip)")
    ap.add_argument("--tool-rounds", type=int, default=5)
    ap.add_argument("--apps", default=None,
                    help="pinnings for the real-application matrix: redis-benchmark, wrk + nginx, "
                         "iperf3, sockperf (default: --pinning; 'no' to skip)")
    ap.add_argument("--apps-only", default="", help="comma list of redis, wrk, iperf3, sockperf")
    ap.add_argument("--app-rounds", type=int, help="rounds of the application matrix (default 3; 1 with --quick)")
    ap.add_argument("--app-duration", type=float, default=1.0, help="seconds per application run")
    ap.add_argument("--spin", action="store_true",
                    help="experiment: sockbench -P, reads spin instead of sleeping (no wake-ups)")
    ap.add_argument("--same-pod", action="store_true",
                    help="experiment: the client runs in the server's pod (loopback, not veth)")
    ap.add_argument("--small-write", type=int, help="override redirect.SMALL_WRITE (experiments)")
    ap.add_argument("--small-run-max", type=int, help="override redirect.SMALL_RUN_MAX (experiments)")
    ap.add_argument("--out", type=Path, default=HERE / "results", help="default bench/results")
    ap.add_argument("--name", default="redirect", help="output file stem (default %(default)s)")
    ap.add_argument("--report-only", type=Path, metavar="JSON",
                    help="only redo the tables and plot from a results file")
    args = ap.parse_args()
    if args.report_only:
        redirreport.write_all(json.loads(args.report_only.read_text()), args.out, args.name)
        return
    args.rounds = args.rounds or (4 if args.quick else 15)
    args.duration = args.duration or (0.4 if args.quick else 0.8)
    pinnings = [p for p in args.pinning.split(",") if p]
    if any(p not in PINNINGS for p in pinnings):
        ap.error(f"--pinning: choose from {', '.join(PINNINGS)}")
    if args.tools is None:
        args.tools = "no" if args.quick else pinnings[0]
    tool_pinnings = [] if args.tools == "no" else args.tools.split(",")
    app_pinnings = pinnings if args.apps is None else [] if args.apps == "no" else args.apps.split(",")
    args.app_rounds = args.app_rounds or (1 if args.quick else 3)
    args.apps_only = [t for t in args.apps_only.split(",") if t]
    cells = cells_for(args.modes.split(","), [int(s) for s in args.sizes.split(",")],
                      args.nagle.split(","))
    if not SOCKBENCH.exists():
        ap.error(f"{SOCKBENCH} is missing: run bench/run-redirect, which builds it")
    if args.small_write is not None:
        redirect.SMALL_WRITE = args.small_write
    if args.small_run_max is not None:
        redirect.SMALL_RUN_MAX = args.small_run_max

    # SIGTERM unwinds like Ctrl-C, so every lab, pin and process is removed.
    # Only in this process: pyroute2 forks helpers (IPRoute(netns=...)) and
    # stops them with SIGTERM; unwinding in such a child would run our
    # clean-up there and delete the namespaces the parent is still using.
    main_pid = os.getpid()
    signal.signal(signal.SIGTERM,
                  lambda *_: sys.exit(143) if os.getpid() == main_pid else os._exit(143))
    results = {"command": f"bench/run-redirect {' '.join(sys.argv[1:])}".strip(),
               "machine": machine(),
               "config": {"pinning": pinnings, "cells": [c.key for c in cells], "rounds": args.rounds,
                          "duration_s": args.duration, "warmup_s": args.warmup, "conns": args.conns,
                          "readbuf": args.readbuf, "spin": args.spin, "same_pod": args.same_pod,
                          "bpf_dir": os.environ.get("MESHBPF_BPF_DIR"), "small_write": redirect.SMALL_WRITE,
                          "small_run_max": redirect.SMALL_RUN_MAX, "tool_rounds": args.tool_rounds,
                          "tools": tool_pinnings, "apps": app_pinnings, "app_rounds": args.app_rounds,
                          "app_duration_s": args.app_duration},
               "pinning": {}, "tools": {}, "apps": {}}
    started = time.monotonic()
    with Bench() as bench:
        # A broken path must fail here, not skew a ratio.
        probe = Cell("rr", 64, "nodelay", PORT0 - 1)
        bench.start_server([probe], "none", args)
        on = bench.run(probe, "redirect", "none", args)
        off = bench.run(probe, "tcp", "none", args)
        # (With --spin the pair is spliced, then handed to TCP as a spinner.)
        took_part = on["counters"].get("redirected_msgs", 0) >= 100 or on["counters"].get("spinning_readers")
        if not took_part or off["counters"].get("redirected_msgs"):
            raise RuntimeError(f"pre-flight: redirection does not switch: on {on['counters']}, "
                               f"off {off['counters']}")
        log(f"pre-flight: rr 64 B nodelay, tcp {off['value']:.0f}/s, redirect {on['value']:.0f}/s")
        for pinning in pinnings:
            results["pinning"][pinning] = run_matrix(bench, cells, pinning, args)
        for pinning in app_pinnings:
            results["apps"][pinning] = run_apps(bench, pinning, args)
        for pinning in tool_pinnings:
            tcells = tool_cells([s for s in (64, 1024, 65507)], [1024, 65536, 1048576])
            results["tools"][pinning] = run_tools(bench, tcells, pinning, args)
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(results, indent=1) + "\n")
    redirreport.write_all(results, args.out, args.name)
    print(redirreport.markdown(results))
    log(f"done in {results['elapsed_s']:.0f} s; results in {args.out}")


if __name__ == "__main__":
    main()
