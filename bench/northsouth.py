"""North-south benchmark (issue 12): an external client -> node1's address:NodePort
-> a backend pod, through meshbpf's tc and XDP programs and through kube-proxy's
iptables and nftables layouts, against plain routing. Run it through
bench/run-northsouth (see bench/README.md, "North-south benchmark").

One 2-node lab per size N (N NodePort Services, the measured ones last). The
client runs in the router netns; node1 translates. Every mode is switched on
in node1's netns only for its own turn (the others off: no rules, no filter),
and the modes take turns within every round, starting from a rotating one:

    direct    the backend pod's own address, routed through node1 (a /32 via
              node1 in the router): the same hops, nothing translated. The ceiling.
    tc        meshbpf's tc programs on node1's ext0 (NorthSouthDatapath, mode tc)
    xdp       the same with mbpf_ns_xdp in front (mode xdp), if the kernel takes it
    iptables  kube-proxy's iptables-mode NodePort layout, iptables-legacy-restore
    nftables  kube-proxy's nftables-mode layout (service-nodeports map), nft -f

Variants, each measured in every mode's turn:

    remote    TCP to a backend on node2 (node1 SNATs; kube-proxy masquerades)
    local     TCP to a backend on node1 itself
    udp       UDP ping-pong (sockperf) to a backend on node2
    flood     UDP packets forwarded per second to a backend on node2: a flood
              made in the kernel from the router's port, counted as node1
              sends it on (bench/flood.py)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import kube_rules as kr
import maglev as maglev_bench
from flood import Flood, frame
from meshbpf.datapath.loader import uninstall
from meshbpf.datapath.northsouth import (XDP_FLAGS_DRV_MODE, NorthSouthDatapath, attached, detach_filters,
                                         detach_xdp)
from meshbpf.datapath.policy import _ipr
from meshbpf.lab.netlab import NODE_NET4, NODE_UPLINK, ROUTER, Lab
from meshbpf.reconcile import northsouth as planner
from meshbpf.reconcile.maglev import LARGE_TABLE
from meshbpf.reconcile.northsouth_keys import DEFAULT_TABLE_SIZE
from meshbpf.sources.yaml_file import read_config

HERE = Path(__file__).resolve().parent
LOADGEN = HERE / "bin" / "loadgen"
MODES = ("direct", "tc", "xdp", "iptables", "nftables")
VARIANTS = ("remote", "local", "udp", "flood")
TCP_PORT, UDP_PORT = 8080, 9090
# A table per Service: 10 000 Services at the default 16381 slots would need
# 655 MB of mbpf_maglev; a lookup is one array index whatever the size.
BENCH_TABLE_SIZE = 251
NODE_NAMES = ("node1", "node2")

# Sets one of a device's ethtool flags (argv: device, ETHTOOL_S* command,
# value): TX checksum offload off (ETHTOOL_STXCSUM), as
# tests/kernel/test_northsouth_datapath.py does, since a frame XDP sends on
# must carry a finished checksum; GRO on for the flood (ETHTOOL_SGRO).
ETHTOOL_STXCSUM, ETHTOOL_SGRO = 0x17, 0x2C
ETHTOOL_SET = r"""
import ctypes, fcntl, socket, struct, sys
value = ctypes.create_string_buffer(struct.pack("II", int(sys.argv[2]), int(sys.argv[3])))
ifreq = struct.pack("16sP", sys.argv[1].encode(), ctypes.addressof(value)) + bytes(16)
fcntl.ioctl(socket.socket(socket.AF_INET, socket.SOCK_DGRAM), 0x8946, ifreq)
"""
XDP_PASS = b"int mbpf_bench_pass(struct xdp_md *ctx) { return XDP_PASS; }"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class NsRun:
    """One size N: the lab, the servers, meshbpf's datapath and the rulesets."""

    def __init__(self, n: int, work: Path, cpu: int | None):
        self.n, self.work = n, work
        self.cpu = cpu
        self.pin = [] if cpu is None else ["taskset", "-c", str(cpu)]
        self.lab = Lab(f"nsb{os.getpid()}n{n}")
        self.bpffs = Path(f"/sys/fs/bpf/meshbpf-bench-ns{os.getpid()}")
        self.dp: NorthSouthDatapath | None = None
        self.peer = None           # the XDP_PASS program on the router's ports
        self.flood: Flood | None = None  # the flood's generator, and its sink on nd1
        self.active: str | None = None
        self.files: dict[str, Path] = {}

    def __enter__(self) -> "NsRun":
        self.lab.up(["loc"], ["web"])
        return self

    def __exit__(self, *exc) -> None:
        try:
            try:
                if self.flood is not None:
                    self.flood.close()
            finally:
                if self.dp is not None:
                    self.dp.detach()
        finally:
            try:
                if self.bpffs.exists():
                    uninstall(self.bpffs)
            finally:
                self.lab.down()   # the netns go, and every rule, filter and server in them

    # --- the lab --------------------------------------------------------------------
    @property
    def node1(self):
        return self.lab.nodes[0]

    def addr(self, pod: str) -> str:
        return str(self.lab.pods[pod].ipv4)

    def prepare(self) -> None:
        """Servers, the direct route, and the same veth set-up for every mode:
        XDP_PASS on the router's ports (a veth hands XDP_TX frames only to a
        peer running XDP) and full checksums on what reaches node1."""
        for pod in ("web", "loc"):
            self._server(pod, [str(LOADGEN), "server", f"{self.addr(pod)}:{TCP_PORT}"], "ready")
        self._server("web", ["sockperf", "sr", "-i", self.addr("web"), "-p", str(UDP_PORT)], None)
        self.lab.run(None, ["ip", "route", "add", f"{self.addr('web')}/32", "via", str(self.node1.ext_ipv4)],
                     node=ROUTER, check=True)
        from bcc import BPF
        self.peer = BPF(text=XDP_PASS)
        fd = self.peer.load_func(b"mbpf_bench_pass", BPF.XDP).fd
        self.flood = Flood(self.lab.router_ns, "nd1")
        for node in self.lab.nodes:   # node1's port: the flood's sink, passing all else
            with _ipr(self.lab.router_ns) as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname=f"nd{node.index}")[0],
                         xdp={"attrs": [["IFLA_XDP_FD", self.flood.sink_fd if node.index == 1 else fd],
                                        ["IFLA_XDP_FLAGS", XDP_FLAGS_DRV_MODE]]})
        for node, dev in [(ROUTER, f"nd{n.index}") for n in self.lab.nodes] + \
                         [(n.index, NODE_UPLINK) for n in self.lab.nodes]:
            self.ethtool(node, dev, ETHTOOL_STXCSUM, 0)

    def ethtool(self, node: int | str, dev: str, command: int, value: int) -> None:
        self.lab.run(None, [sys.executable, "-c", ETHTOOL_SET, dev, str(command), str(value)],
                     node=node, check=True)

    def _server(self, pod: str, argv: list[str], ready: str | None) -> None:
        p = self.lab.popen(pod, [*self.pin, *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
        if ready is not None and p.stdout.readline().strip() != ready:
            raise RuntimeError(f"{argv[0]} server in {pod} did not start")

    def node_run(self, argv: list[str], timeout: float = 600) -> float:
        """argv in node1's netns, checked; returns its wall time."""
        t0 = time.perf_counter()
        res = self.lab.run(None, argv, node=1, timeout=timeout)
        if res.returncode != 0:
            raise RuntimeError(f"node1: {' '.join(argv)} failed:\n{res.stderr[-2000:]}")
        return time.perf_counter() - t0

    # --- the Services ------------------------------------------------------------------
    def services(self) -> list[kr.NpSvc]:
        targets = [("web-tcp", "tcp", (self.addr("web"),), TCP_PORT),
                   ("loc-tcp", "tcp", (self.addr("loc"),), TCP_PORT),
                   ("web-udp", "udp", (self.addr("web"),), UDP_PORT)]
        return kr.nodeport_services(max(self.n, len(targets)), targets)

    def target(self, variant: str, mode: str) -> tuple[str, int]:
        svcs = {s.name: s for s in self.services()[-3:]}
        s = svcs[{"remote": "web-tcp", "local": "loc-tcp", "udp": "web-udp", "flood": "web-udp"}[variant]]
        if mode == "direct":
            return s.endpoints[0], s.target_port
        return str(self.node1.ext_ipv4), s.node_port

    def write(self, name: str, text: str) -> Path:
        self.work.mkdir(parents=True, exist_ok=True)
        (self.work / name).write_text(text)
        return self.work / name

    def program(self, modes: list[str]) -> dict:
        """Loads meshbpf (filters off again) and writes the ruleset files;
        times meshbpf's file -> maps and each ruleset's first load."""
        svcs = self.services()
        out: dict = {}
        if {"tc", "xdp"} & set(modes):
            out["meshbpf"] = self._program_meshbpf(svcs)
        self.files = {"iptables": self.write(f"ipt-{self.n}.rules", kr.iptables_nodeport_restore(svcs)),
                      "iptables-off": self.write("ipt-off.rules", kr.iptables_flush()),
                      "nftables": self.write(f"nft-{self.n}.nft", kr.nft_nodeport_ruleset(svcs))}
        for mode in ("iptables", "nftables"):
            if mode in modes:
                out[mode] = {"total_s": self.switch(mode)}
                self.switch(None)
        return out

    def _program_meshbpf(self, svcs: list[kr.NpSvc]) -> dict:
        tables = 1 << max(0, (len(svcs) - 1).bit_length())   # a table per Service, a power of two
        self.dp = NorthSouthDatapath.load(self.bpffs, [NODE_UPLINK], netns=self.node1.netns,
                                          table_size=BENCH_TABLE_SIZE, mode="tc",
                                          map_sizes={"mbpf_maglev": tables})
        self._meshbpf_off()
        node_of = {self.addr("loc"): NODE_NAMES[0], self.addr("web"): NODE_NAMES[1]}
        path = self.write(f"services-{self.n}.yaml", kr.nodeport_yaml(svcs, node_of))
        node = planner.NodeContext(NODE_NAMES[0], (self.node1.ext_ipv4, self.node1.ext_ipv6),
                                   self.node1.ext_ipv4, self.node1.ext_ipv6)
        # What the agent does on a config change: parse, plan against the maps, write.
        t0 = time.perf_counter()
        desired = read_config(path, node_name=NODE_NAMES[0]).state
        t1 = time.perf_counter()
        p = planner.plan(desired, node, self.dp.maps.read(), BENCH_TABLE_SIZE, max_tables=tables)
        if p.problems:
            raise RuntimeError(f"north-south plan: {p.problems[:3]}")
        t2 = time.perf_counter()
        self.dp.maps.apply(p.steps)
        t3 = time.perf_counter()
        return {"total_s": t3 - t0, "parse_s": t1 - t0, "plan_s": t2 - t1, "apply_s": t3 - t2,
                "frontends": len(p.state.frontends), "tables": len(p.state.tables)}

    # --- switching modes ------------------------------------------------------------------
    def _meshbpf_off(self) -> None:
        detach_xdp(self.node1.netns, NODE_UPLINK)
        detach_filters(self.node1.netns, NODE_UPLINK)

    def switch(self, mode: str | None) -> float:
        """Turns the active mode off and `mode` on; returns the time `mode` took."""
        if self.active == mode:
            return 0.0
        if self.active in ("tc", "xdp"):
            self._meshbpf_off()
        elif self.active == "iptables":
            self.node_run(["iptables-legacy-restore", "-w", "30", str(self.files["iptables-off"])])
        elif self.active == "nftables":
            self.node_run(["nft", "delete", "table", "ip", "kube-proxy"])
        self.active = None
        took = 0.0
        t0 = time.perf_counter()
        if mode in ("tc", "xdp"):
            self.dp.attach(NODE_UPLINK)
            if mode == "xdp":
                self.dp.attach_xdp(required=True)
            took = time.perf_counter() - t0
        elif mode == "iptables":
            took = self.node_run(["iptables-legacy-restore", "-w", "30", str(self.files["iptables"])])
        elif mode == "nftables":
            took = self.node_run(["nft", "-f", str(self.files["nftables"])])
        if mode in ("iptables", "nftables"):
            # RST-closed connections sit in CLOSE for 10 s by default: at these
            # rates that would approach nf_conntrack_max.
            self.node_run(["sysctl", "-qw", "net.netfilter.nf_conntrack_tcp_timeout_close=1"])
        self.active = mode
        return took

    def xdp_available(self) -> str | None:
        """None if mode xdp attaches here, else why not."""
        try:
            self.switch("xdp")
            return None
        except Exception as exc:   # noqa: BLE001 - the reason goes into the results
            self.active = "xdp"
            return str(exc).splitlines()[0]
        finally:
            self.switch(None)

    # --- load --------------------------------------------------------------------------
    def measure(self, mode: str, variant: str, seconds: float, warmup: float) -> dict:
        host, port = self.target(variant, mode)
        if variant == "udp":
            return self._udp(host, port, seconds, warmup)
        if variant == "flood":
            return self._flood(host, port, seconds, warmup)
        argv = [*self.pin, str(LOADGEN), "client", "-d", str(seconds), "-w", str(warmup), f"{host}:{port}"]
        res = self.lab.run(None, argv, node=ROUTER, timeout=seconds + warmup + 60)
        if res.returncode != 0:
            raise RuntimeError(f"loadgen client ({mode}, {variant}) failed: {res.stderr}")
        return json.loads(res.stdout)

    def _udp(self, host: str, port: int, seconds: float, warmup: float) -> dict:
        argv = [*self.pin, "sockperf", "pp", "-i", host, "-p", str(port), "-m", "64", "--mps=max",
                "-t", str(max(1, round(seconds))) if seconds >= 1 else "1"]
        res = self.lab.run(None, argv, node=ROUTER, timeout=seconds + 60)
        out = res.stdout + res.stderr
        m = re.search(r"\[Valid Duration\] RunTime=([\d.]+) sec; SentMessages=(\d+); "
                      r"ReceivedMessages=(\d+)", out)
        if res.returncode != 0 or not m:
            return {"rate": 0.0, "errors": 1, "count": 0, "output": out[-500:]}
        p99 = re.search(r"percentile 99\.000 =\s*([\d.]+)", out)
        sent, got = int(m.group(2)), int(m.group(3))
        return {"rate": got / float(m.group(1)), "count": got, "errors": sent - got,
                # sockperf's percentiles are half round trips
                "p99_us": 2 * float(p99.group(1)) if p99 else None}

    def _flood(self, host: str, port: int, seconds: float, warmup: float) -> dict:
        """The flood from the router's port through node1 (bench/flood.py),
        with GRO on node1's ext0 for its length: a veth hands XDP_TX frames
        only to a peer with NAPI, which GRO gives one without XDP."""
        def mac(ns: str, dev: str) -> str:
            with _ipr(ns) as ipr:
                return ipr.get_links(ipr.link_lookup(ifname=dev)[0])[0].get_attr("IFLA_ADDRESS")
        pkt = frame(mac(self.lab.router_ns, "nd1"), mac(self.node1.netns, NODE_UPLINK),
                    str(NODE_NET4.network_address + 1), host, port)
        self.ethtool(1, NODE_UPLINK, ETHTOOL_SGRO, 1)
        try:
            self.flood.run(pkt, warmup, self.cpu)
            return self.flood.run(pkt, seconds, self.cpu)
        finally:
            self.ethtool(1, NODE_UPLINK, ETHTOOL_SGRO, 0)

    def counters(self) -> dict:
        return self.dp.maps.counters() if self.dp is not None else {}


def run_size(n: int, modes: list[str], args, work: Path) -> dict:
    out: dict = {"rounds": []}
    with NsRun(n, work, args.cpu) as run:
        run.prepare()
        log(f"N={n}: programming")
        out["programming"] = run.program(modes)
        for mode, t in out["programming"].items():
            log(f"N={n}: {mode} programmed in {t['total_s']:.3f} s")
        if "xdp" in modes:
            why = run.xdp_available()
            if why is not None:
                log(f"N={n}: no XDP mode: {why}")
                out["xdp_unavailable"] = why
                modes = [m for m in modes if m != "xdp"]
        out["modes"] = modes
        variants = list(VARIANTS)
        why = run.flood.available()
        if why is not None:
            log(f"N={n}: no flood variant: {why}")
            out["flood_unavailable"] = why
            variants.remove("flood")
        out["variants"] = variants
        preflight(run, modes, variants)
        switches: dict[str, list[float]] = {m: [] for m in modes}
        for r in range(args.rounds):
            order = modes[r % len(modes):] + modes[:r % len(modes)]
            results: dict = {}
            for mode in order:
                switches[mode].append(run.switch(mode))
                results[mode] = {v: run.measure(mode, v, args.duration, args.warmup) for v in variants}
            run.switch(None)
            out["rounds"].append(results)
            log(f"N={n}: round {r + 1}/{args.rounds}: " + "; ".join(
                f"{m} " + "/".join(f"{results[m][v]['rate']:.0f}" for v in variants) for m in modes))
        out["switch_s"] = {m: statistics.median(t) for m, t in switches.items() if t}
        out["meshbpf_counters"] = run.counters()
    out["summary"] = summarize(out["rounds"], out["modes"], out["variants"])
    return out


def preflight(run: NsRun, modes: list[str], variants: list[str]) -> None:
    """Every mode serves every variant, and meshbpf's modes are meshbpf's
    doing (its counters move; nothing else in node1's netns could translate)."""
    for mode in modes:
        run.switch(mode)
        before = run.counters()
        for v in variants:
            res = run.measure(mode, v, 0.3 if v != "udp" else 1, 0.05)
            if res["errors"] > max(2, res["count"] // 100) or res["count"] < 20:
                raise RuntimeError(f"N={run.n}: {mode} does not serve {v}: {res}")
        moved = {k: v - before.get(k, 0) for k, v in run.counters().items()}
        if mode in ("tc", "xdp") and moved["new"] <= 0:
            raise RuntimeError(f"N={run.n}: {mode}: traffic flowed but meshbpf counted no new flow")
        if (mode == "xdp") != (moved.get("xdp_forwarded", 0) > 0):
            raise RuntimeError(f"N={run.n}: {mode}: XDP forwarded {moved.get('xdp_forwarded', 0)} packets")
        if mode not in ("tc", "xdp") and attached(run.node1.netns, NODE_UPLINK):
            raise RuntimeError(f"N={run.n}: {mode}: meshbpf's filters are still attached")
    run.switch(None)


def summarize(rounds: list[dict], modes: list[str], variants: list[str]) -> dict:
    """Per variant and mode: median rate and p99, and the median over rounds
    of the within-round ratio to each baseline (with quartiles)."""
    med = statistics.median
    out: dict = {}
    for v in variants:
        out[v] = {}
        for m in modes:
            rates = [r[m][v]["rate"] for r in rounds]
            p99 = [r[m][v].get("p99_us") for r in rounds if r[m][v].get("p99_us") is not None]
            row = {"rate": med(rates), "p99_us": med(p99) if p99 else None,
                   "errors": sum(r[m][v].get("errors", 0) for r in rounds)}
            for base in ("direct", "iptables", "nftables"):
                if base in modes:
                    ratios = [r[m][v]["rate"] / r[base][v]["rate"] for r in rounds if r[base][v]["rate"] > 0]
                    if ratios:
                        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
                        row[f"vs_{base}"] = {"median": med(ratios), "q1": q[0], "q3": q[2]}
            out[v][m] = row
    return out


def maglev_build(runs: int) -> dict:
    """bench/maglev.py's build timing: 1 000 backends, default and large table."""
    out = {}
    for size in (DEFAULT_TABLE_SIZE, LARGE_TABLE):
        wall, cpu = maglev_bench.build_ms(1000, size, runs)
        out[str(size)] = {"wall_ms_median": statistics.median(wall), "cpu_ms_median": statistics.median(cpu),
                          "runs": runs}
    return out


def markdown(results: dict) -> str:
    lines = [f"North-south, {results['machine']['kernel']}, {results['machine']['cpus']} CPUs, "
             f"load average {results['load_before']} before; `{results['command']}`", ""]
    what = {"remote": "TCP conn/s, backend on node2", "local": "TCP conn/s, backend on node1",
            "udp": "UDP round trips/s, backend on node2",
            "flood": "UDP packets/s forwarded, backend on node2"}
    for n, size in results["sizes"].items():
        modes = size["modes"]
        if "xdp_unavailable" in size:
            lines.append(f"N = {n}: no XDP mode ({size['xdp_unavailable']})")
        if "flood_unavailable" in size:
            lines.append(f"N = {n}: no packet-rate variant ({size['flood_unavailable']})")
        for v in size.get("variants", VARIANTS):
            lines += [f"**N = {n}, {what[v]}** ({len(size['rounds'])} rounds)", "",
                      "| mode | rate | p99 µs | ÷ direct | ÷ iptables | ÷ nftables |",
                      "| --- | ---: | ---: | ---: | ---: | ---: |"]
            for m in modes:
                row = size["summary"][v][m]

                def ratio(base: str) -> str:
                    r = row.get(f"vs_{base}")
                    return f"{r['median']:.2f} ({r['q1']:.2f}–{r['q3']:.2f})" if r else "–"
                p99 = f"{row['p99_us']:.0f}" if row["p99_us"] is not None else "–"
                lines.append(f"| {m} | {row['rate']:.0f} | {p99} | {ratio('direct')} | {ratio('iptables')} "
                             f"| {ratio('nftables')} |")
            lines.append("")
        prog = ", ".join(f"{m} {t['total_s']:.2f} s" for m, t in size["programming"].items())
        lines += [f"N = {n} programming (from empty): {prog}", ""]
    mg = results.get("maglev_build_ms", {})
    if mg:
        lines.append("Maglev build, 1 000 backends: " + ", ".join(
            f"M={m}: {v['wall_ms_median']:.1f} ms wall, {v['cpu_ms_median']:.1f} ms CPU" for m, v in mg.items()))
    return "\n".join(lines) + "\n"


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), "?")
    return {"kernel": platform.release(), "cpu": cpu, "cpus": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10,1000,10000", help="numbers of NodePort Services")
    ap.add_argument("--modes", default=",".join(MODES), help=f"of {', '.join(MODES)} (direct is required)")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--duration", type=float, default=1.0, help="seconds per measurement")
    ap.add_argument("--warmup", type=float, default=0.1)
    ap.add_argument("--cpu", default=str((os.cpu_count() or 1) - 1),
                    help="CPU for client and servers ('none': no pinning)")
    ap.add_argument("--maglev-runs", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="N = 10, 2 rounds of 0.3 s: a smoke test")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()
    if args.quick:
        args.sizes, args.rounds, args.duration, args.maglev_runs = "10", 2, 0.3, 3
    args.cpu = None if args.cpu == "none" else int(args.cpu)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if "direct" not in modes or not set(modes) <= set(MODES):
        ap.error(f"--modes: choose from {', '.join(MODES)}; direct is the baseline and required")
    modes = [m for m in MODES if m in modes]
    sizes = [int(s) for s in args.sizes.split(",")]
    if not LOADGEN.exists():
        ap.error(f"{LOADGEN} is missing: run bench/run-northsouth, which builds it")
    # SIGTERM unwinds like Ctrl-C (only in this process: pyroute2's forked
    # helpers get SIGTERM too, and must not tear the lab down under us).
    main_pid = os.getpid()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143) if os.getpid() == main_pid else os._exit(143))
    results = {"command": f"bench/run-northsouth {' '.join(sys.argv[1:])}".strip(), "machine": machine(),
               "load_before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
               "config": {"sizes": sizes, "modes": modes, "rounds": args.rounds, "duration_s": args.duration,
                          "warmup_s": args.warmup, "cpu": args.cpu, "quick": args.quick,
                          "maglev_table_size": BENCH_TABLE_SIZE},
               "sizes": {}}
    started = time.monotonic()
    work = HERE / "out" / f"ns-{os.getpid()}"
    try:
        for n in sizes:
            results["sizes"][str(n)] = run_size(n, modes, args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log("Maglev build time")
    results["maglev_build_ms"] = maglev_build(args.maglev_runs)
    results["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "northsouth-quick" if args.quick else "northsouth"
    (args.out / f"{name}.json").write_text(json.dumps(results, indent=1) + "\n")
    text = markdown(results)
    (args.out / f"README-{name}-snippet.md").write_text(text)
    print(text)
    log(f"done in {results['elapsed_s']:.0f} s; results in {args.out}/{name}.json")


if __name__ == "__main__":
    main()
