"""Sidecar capture benchmark (issue 11): app -> HAProxy sidecar -> backend.

    bench/run-capture [--quick] [--rounds N] [--seconds S] [--threads T] [--conns C]

One lab: mesh/app holds the app (the load generators) and its sidecar,
Debian's HAProxy as uid 1337 on 15001/15006 (tests/kernel/sidecar.py); srv
holds the backends, `loadgen server` (connect, 64 B request, 64 B
response, close) and `sockbench server` (64 B request/response on long
connections). The app talks to a Service address; HAProxy forwards to its
original destination, and meshbpf's socket-LB translates HAProxy's own
connect to the backend in every path, so the paths differ only in capture:

    iptables          Istio's iptables REDIRECT rules in mesh/app's namespace
                      (istio-iptables' output); the app outside socket-LB, as
                      Cilium's socketLB.hostNamespaceOnly leaves pods, so that
                      HAProxy's SO_ORIGINAL_DST names the Service
    meshbpf           meshbpf capture at connect(), the pod meshed through
                      the agent (Istio's annotation, AgentConfig capture on)
    meshbpf+redirect  the same, plus same-node socket redirection (sockmap)
                      of the proxy hops
    uncaptured        the ceiling: nothing captured, the app (outside
                      socket-LB, as under iptables) connects to HAProxy itself
                      (listeners on 127.0.0.1 with the Service as their one
                      server): HAProxy's work without any capture's, the
                      most any capture method can reach here

Each round runs every path in turn (a fresh agent each; the order rotates
from round to round), and every path's
result is checked: HAProxy logged the connections, naming the Service as
their original destination. Ratios are to iptables, median over rounds.
Targets: connection rate >= 1.2x iptables', p99 <= 0.8x.
Writes bench/results/capture.json and README-capture-snippet.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "kernel"))  # sidecar.py: HAProxy and Istio's rules

import sidecar  # noqa: E402
from meshbpf.datapath import redirect  # noqa: E402
from meshbpf.datapath.loader import uninstall  # noqa: E402
from meshbpf.lab.netlab import Lab  # noqa: E402
from meshbpf.lab.objects import lab_objects  # noqa: E402
from meshbpf.lab.workloads import AgentProcess, wait_for  # noqa: E402
from meshbpf.sources.yaml_load import dump_all  # noqa: E402

LOADGEN, SOCKBENCH = HERE / "bin" / "loadgen", HERE / "bin" / "sockbench"
RESULTS = HERE / "results"
APP, SRV, NODE = "mesh/app", "srv", "lab-node"
SVC = "10.96.0.10"
CRR_PORT, RR_PORT = 8080, 9000          # backends; the Service maps 80 -> 8080, 90 -> 9000
PATHS = ("iptables", "meshbpf", "meshbpf+redirect", "uncaptured")
NAMES = {"iptables": "Istio iptables REDIRECT capture",
         "meshbpf": "meshbpf capture",
         "meshbpf+redirect": "meshbpf capture + redirection",
         "uncaptured": "no capture: the app connects to HAProxy (the ceiling)"}
# The ceiling's listeners: the app's own connects to 127.0.0.1 (never
# captured), HAProxy on to the Service (socket-LB translates it, as on every path).
DIRECT = {80: 15011, 90: 15012}
CEILING_LISTENERS = "".join(f"""
listen direct{port}
    bind 127.0.0.1:{local}
    server svc {SVC}:{port}
""" for port, local in DIRECT.items())
# Paths with capture off, whose app stays outside socket-LB (the pod's cgroup).
UNCAPTURED = ("iptables", "uncaptured")
TARGET_RATE, TARGET_P99 = 1.2, 0.8
SIZE = 64


def world(lab: Lab, path: str) -> list[dict]:
    """Services, the app pod (meshed), AgentConfig for this path."""
    srv = str(lab.pods[SRV].ipv4)
    spec: dict = {"capture": {"enabled": path not in UNCAPTURED, "mesh": "istio"}}
    if path == "meshbpf+redirect":
        spec["socketRedirect"] = {"enabled": True, "podCIDRs": ["10.244.0.0/24", "fd00:244::/64"]}
    ports = [("crr", 80, CRR_PORT), ("rr", 90, RR_PORT)]
    return [
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "backend", "namespace": "default"},
         "spec": {"clusterIP": SVC, "clusterIPs": [SVC],
                  "ports": [{"name": n, "protocol": "TCP", "port": p, "targetPort": t} for n, p, t in ports]}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": "backend-1", "namespace": "default",
                      "labels": {"kubernetes.io/service-name": "backend"}},
         "addressType": "IPv4", "endpoints": [{"addresses": [srv], "conditions": {"ready": True}}],
         "ports": [{"name": n, "protocol": "TCP", "port": t} for n, _, t in ports]},
        lab_objects([lab.pods[APP]], NODE, meshed=[APP]),
        {"apiVersion": "meshbpf.io/v1alpha1", "kind": "AgentConfig", "metadata": {"name": "meshbpf"},
         "spec": spec},
    ]


class Setup:
    """One path set up: an agent with its config (and Istio's rules for
    iptables); `with` removes both."""

    def __init__(self, lab: Lab, path: str, workdir: Path, n: int):
        self.lab, self.path = lab, path
        self.config = workdir / f"world-{n}.yaml"
        self.config.write_text(dump_all(world(lab, path)))
        self.bpffs = Path(f"/sys/fs/bpf/meshbpf-bench-capture-{os.getpid()}-{n}")
        self.agent = AgentProcess(self.config, lab.cgroup, self.bpffs,
                                  ["--node-name", NODE, "--node-netns", lab.node_ns])
        self.rules = sidecar.IstioIptables(lab, APP) if path == "iptables" else None

    def __enter__(self) -> "Setup":
        try:
            self.agent.start(timeout=300)
            if self.rules:
                self.rules.__enter__()
            elif self.path != "uncaptured":
                wait_for(self._captured, 60, f"{APP} to be captured")
        except Exception:
            self.__exit__()
            raise
        return self

    def _captured(self) -> bool:
        pods = json.loads(self.agent.get("/v1/capture")[1])["pods"]
        return any(p["state"] == "captured" for p in pods)

    def __exit__(self, *exc) -> None:
        if self.rules:
            self.rules.remove()
        self.agent.cleanup()
        if self.bpffs.exists():
            uninstall(self.bpffs)

    def run(self, argv: list[str], timeout: float) -> dict:
        """A load generator as the app: in the pod's cgroup, except under
        iptables and on the ceiling path, where the app stays outside
        socket-LB (see above)."""
        r = self.lab.run(APP, argv, in_cgroup=self.path not in UNCAPTURED, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"{self.path}: {argv[0]} failed ({r.returncode}): {r.stderr}")
        return json.loads(r.stdout.strip().splitlines()[-1])


def start_backends(lab: Lab, workdir: Path) -> list[subprocess.Popen]:
    srv = str(lab.pods[SRV].ipv4)
    out = open(workdir / "sockbench-server.log", "w")
    procs = [lab.popen(SRV, [str(LOADGEN), "server", "-q", str(SIZE), "-r", str(SIZE), f"{srv}:{CRR_PORT}"],
                       stdout=subprocess.PIPE, text=True),
             lab.popen(SRV, [str(SOCKBENCH), "server", srv, f"{RR_PORT}:rr:{SIZE}:nodelay"],
                       stdout=out, text=True)]
    out.close()
    if procs[0].stdout.readline().strip() != "ready":
        raise RuntimeError("loadgen server did not start")
    wait_for(lambda: "ready" in (workdir / "sockbench-server.log").read_text(), 30, "sockbench server")
    return procs


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def target(path: str, port: int) -> str:
    """Where the app connects: the Service, or HAProxy itself on the ceiling path."""
    return f"127.0.0.1:{DIRECT[port]}" if path == "uncaptured" else f"{SVC}:{port}"


def measure(p: Setup, proxy: sidecar.HAProxySidecar, args) -> dict:
    logged = len(proxy.connections())
    cpu = {"agent": cpu_seconds(p.agent.proc.pid), "haproxy": cpu_seconds(proxy.proc.pid)}
    crr = p.run([str(LOADGEN), "client", "-d", str(args.seconds), "-w", "0.2", "-T", str(args.threads),
                 "-q", str(SIZE), "-r", str(SIZE), target(p.path, 80)], timeout=args.seconds + 120)
    rr = p.run([str(SOCKBENCH), "rr", "-d", str(args.seconds), "-w", "0.2", "-s", str(SIZE), "-N",
                "-c", str(args.conns), target(p.path, 90)], timeout=args.seconds + 120)
    # CPU seconds the agent and HAProxy used while the load ran: the
    # agent should be idle, whatever the path.
    cpu = {k: round(cpu_seconds(pid) - cpu[k], 2)
           for k, pid in (("agent", p.agent.proc.pid), ("haproxy", proxy.proc.pid))}
    check_proxied(p.path, proxy, logged, crr)
    result = {"crr": {k: crr[k] for k in ("rate", "p50_us", "p99_us", "count", "errors")},
              "rr": {k: rr[k] for k in ("rate", "p50_us", "p99_us", "count")}, "cpu_seconds": cpu}
    if p.path == "meshbpf+redirect":
        result["redirect_counters"] = redirect.read_counters(p.bpffs)
    return result


def check_proxied(path: str, proxy: sidecar.HAProxySidecar, before: int, crr: dict) -> None:
    """Every measured connection went through HAProxy, which read the
    Service address (on the ceiling path: its own listener, whose server is
    the Service): a path that bypassed the proxy measures nothing."""
    if crr["errors"]:
        raise RuntimeError(f"{path}: {crr['errors']} connection(s) failed")
    want = before + crr["count"]
    seen = wait_for(lambda: len(proxy.connections()) >= want and proxy.connections(), 60,
                    f"{path}: HAProxy to log {crr['count']} connections")
    listener = "direct" if path == "uncaptured" else "outbound"
    origs = {c.orig for c in seen[before:] if c.listener.startswith(listener)}
    if origs != {target(path, 80)} and origs != {target(path, 80), target(path, 90)}:
        raise RuntimeError(f"{path}: HAProxy's original destinations were {sorted(origs)}, "
                           f"not the Service {SVC}")


def ratios(rounds: list[dict]) -> dict:
    """Per metric and path, the median over rounds of path / iptables."""
    metrics = {"crr_rate": ("crr", "rate"), "crr_p50": ("crr", "p50_us"), "crr_p99": ("crr", "p99_us"),
               "rr_rate": ("rr", "rate"), "rr_p99": ("rr", "p99_us")}
    out: dict = {}
    for path in PATHS:
        out[path] = {}
        for name, (kind, key) in metrics.items():
            values = [r[path][kind][key] / r["iptables"][kind][key] for r in rounds
                      if r["iptables"][kind][key]]
            out[path][name] = round(statistics.median(values), 3) if values else None
    return out


def medians(rounds: list[dict]) -> dict:
    return {path: {f"{kind}_{key}": statistics.median(r[path][kind][key] for r in rounds)
                   for kind in ("crr", "rr") for key in ("rate", "p50_us", "p99_us")}
            for path in PATHS}


def snippet(report: dict) -> str:
    env, rel, med = report["environment"], report["ratios"], report["medians"]
    lines = [f"Sidecar capture benchmark ({env['kernel']}, {env['cpus']} CPUs, {env['rounds']} round(s) "
             f"of {env['seconds']} s, load average before {env['load_before']}, after {env['load_after']}). "
             f"App -> HAProxy sidecar -> backend through a Service address; ratios to iptables "
             f"(median of per-round ratios).", "",
             "| path | connections/s | conn p50 | conn p99 | 64 B req/resp/s | req/resp p99 |",
             "|---|---|---|---|---|---|"]
    for path in PATHS:
        m, r = med[path], rel[path]
        lines.append(f"| {NAMES[path]} | {m['crr_rate']:,.0f} ({r['crr_rate']}×) | "
                     f"{m['crr_p50_us']:.0f} µs ({r['crr_p50']}×) | {m['crr_p99_us']:.0f} µs ({r['crr_p99']}×) | "
                     f"{m['rr_rate']:,.0f} ({r['rr_rate']}×) | {m['rr_p99_us']:.0f} µs ({r['rr_p99']}×) |")
    ceiling = rel["uncaptured"]
    lines += ["", f"The ceiling (no capture at all, HAProxy's own work): {ceiling['crr_rate']}× iptables' "
              f"connection rate, p99 {ceiling['crr_p99']}×: the most any capture method could give here.",
              "", f"Targets (meshbpf capture vs iptables): connection rate ≥ {TARGET_RATE}× "
              f"({'met' if report['targets']['rate'] else 'not met'}), p99 ≤ {TARGET_P99}× "
              f"({'met' if report['targets']['p99'] else 'not met'})."]
    return "\n".join(lines) + "\n"


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one round of 1 s per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=2, help="loadgen client threads (connection rate)")
    parser.add_argument("--conns", type=int, default=2, help="sockbench connections (request/response)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.seconds = 1, 1.0
    if os.geteuid() != 0:
        sys.exit("bench/capture.py: needs root (labs, cgroups, iptables in the lab's namespace)")
    report = {"environment": {"kernel": platform.release(), "cpus": os.cpu_count(), "rounds": args.rounds,
                              "seconds": args.seconds, "threads": args.threads, "conns": args.conns,
                              "load_before": load_average()}, "rounds": []}
    with tempfile.TemporaryDirectory(prefix="meshbpf-capture-bench-") as tmp, \
            Lab(f"cap{os.getpid() % 10000}") as lab:
        workdir = Path(tmp)
        lab.up([APP, SRV])
        backends = start_backends(lab, workdir)
        try:
            with sidecar.HAProxySidecar(lab, APP, workdir, extra=CEILING_LISTENERS) as proxy:
                for n in range(args.rounds):
                    one = {}
                    # Each round starts with another path: no path always
                    # runs first (right after the backends' warm-up) or last.
                    order = PATHS[n % len(PATHS):] + PATHS[:n % len(PATHS)]
                    for i, path in enumerate(order):
                        with Setup(lab, path, workdir, n * len(PATHS) + i) as p:
                            one[path] = measure(p, proxy, args)
                        print(f"round {n + 1} {path}: {json.dumps(one[path])}", file=sys.stderr, flush=True)
                    report["rounds"].append(one)
        finally:
            for proc in backends:
                proc.kill()
                proc.wait()
    report["environment"]["load_after"] = load_average()
    report["medians"], report["ratios"] = medians(report["rounds"]), ratios(report["rounds"])
    best = report["ratios"]["meshbpf"]
    report["targets"] = {"rate": best["crr_rate"] >= TARGET_RATE, "p99": best["crr_p99"] <= TARGET_P99}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "capture.json").write_text(json.dumps(report, indent=1) + "\n")
    text = snippet(report)
    (args.out / "README-capture-snippet.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
