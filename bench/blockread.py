"""Spurious EAGAIN of blocking reads under redirection, before and after (issue 15).

bench/run-blockread [--before REF] [--runs N] [--readers N] [--pinning both|pinned|unpinned]

One lab (pods `client` and `web-1`), one bpffs folder. For each build
("before": the sources of REF, exported with git archive; "after": this
tree) an agent with redirection on runs from that build's sources, and
each workload runs pinned to one CPU and unpinned, counting the EAGAINs
that blocking reads get (tests/kernel/eagain_probe.py retries and counts
them; every byte is checked):

  reader    a blocking socket accepted from a non-blocking listener that
            only reads, SIGALRM every 15 ms, fed 1 s by a non-blocking
            client (the case the listener check misses); per signal
  eof       write, shutdown(SHUT_WR), blocking read to EOF: plain blocking
            client and server; per run
  eof-slow  the same with an event-loop server (non-blocking) answering
            50 ms after EOF, the client connecting with a timeout and then
            blocking (Java's connect(address, timeout)); per run
  eof-late  the same server; the client non-blocking (a timeout) until its
            shutdown(SHUT_WR), then reads to EOF blocking: its first
            blocking read is the one the FIN's ACK can wake; per run

Prints one table (and --json writes the numbers). Everything it creates
(lab namespaces and cgroup, pins, the exported tree) is removed on exit.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from meshbpf.datapath import redirect
from meshbpf.datapath.cgroup import cgroup2_mount
from meshbpf.datapath.loader import uninstall
from meshbpf.lab.netlab import Lab
from meshbpf.lab.workloads import free_port, wait_for

REPO = Path(__file__).resolve().parents[1]
PROBE = REPO / "tests" / "kernel" / "eagain_probe.py"
# the commit issue 15's blocking-reader change starts from
DEFAULT_BEFORE = "fdea5de"
CONFIG = """apiVersion: meshbpf.io/v1alpha1
kind: AgentConfig
metadata: {name: meshbpf}
spec:
  socketRedirect: {enabled: true, podCIDRs: ["10.244.0.0/24", "fd00:244::/64"]}
"""


class Agent:
    """`meshbpf agent` from the sources under `root`, attached to the lab."""

    def __init__(self, root: Path, config: Path, cgroup: Path, bpffs: Path):
        self.port = free_port()
        self.log = tempfile.NamedTemporaryFile(prefix="meshbpf-blockread-agent-", suffix=".log", delete=False)
        env = dict(os.environ, PYTHONPATH=str(root))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "meshbpf", "agent", "--config", str(config), "--cgroup", str(cgroup),
             "--bpffs", str(bpffs), "--listen", f"127.0.0.1:{self.port}"],
            cwd=root, env=env, stdout=self.log, stderr=subprocess.STDOUT)

        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited: {Path(self.log.name).read_text()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False
        wait_for(ready, 120, "the agent to be ready", interval=0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        os.unlink(self.log.name)


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def exchange(lab: Lab, pin: list[str], server_args: list[str], client_args: list[str],
             timeout: int) -> tuple[dict, dict]:
    """Start the probe's server side in web-1, run its client side in the
    client pod (both under pin), and return both sides' last JSON lines."""
    server = lab.popen("web-1", pin + [sys.executable, "-u", str(PROBE), *server_args],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert json.loads(server.stdout.readline())["listening"]
        r = lab.run("client", pin + [sys.executable, str(PROBE), *client_args], timeout=timeout)
        assert r.returncode == 0, r.stderr
        out, err = server.communicate(timeout=60)
        assert server.returncode == 0, err
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    return last_json(r.stdout), last_json(out)


def reader_runs(lab: Lab, runs: int, pin: list[str], port: int) -> dict:
    eagain = signals = 0
    at: list[int] = []
    web = str(lab.pods["web-1"].ipv4)
    for i in range(runs):
        client, got = exchange(lab, pin, ["reader", str(port + i), "15", "blocking", "timeout"],
                               ["trickle", web, str(port + i), "1", "4"], timeout=60)
        assert (got["bytes"], got["sha"]) == (client["bytes"], client["sha"]), "bytes lost or reordered"
        eagain, signals = eagain + got["eagain"], signals + got["signals"]
        at += got.get("eagain_at", [])
    return {"eagain": eagain, "of": signals, "unit": "signals", "eagain_at_bytes": at}


def eof_runs(lab: Lab, runs: int, pin: list[str], port: int, think_ms: int, client_mode: str,
             server_mode: str) -> dict:
    client, srv = exchange(lab, pin, ["server", str(port), str(think_ms), server_mode],
                           ["client", str(lab.pods["web-1"].ipv4), str(port), str(runs), "3", client_mode],
                           timeout=3600)
    assert client["runs"] == runs and srv["connections"] == runs, (client, srv)
    assert client["errors"] == 0 and srv["errors"] == 0, (client, srv)
    return {"eagain": client["eagain"] + srv["eagain"], "of": runs, "unit": "runs",
            "eagain_at_bytes": client.get("eagain_at", [])}


def export(ref: str, into: Path) -> Path:
    into.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "meshbpf", "bpf"], capture_output=True,
                             check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", default=DEFAULT_BEFORE, help="git ref of the 'before' build (%(default)s)")
    ap.add_argument("--runs", type=int, default=1000, help="eof runs per cell (%(default)s)")
    ap.add_argument("--slow-runs", type=int, default=100, help="eof-slow and eof-late runs per cell (%(default)s)")
    ap.add_argument("--readers", type=int, default=3, help="signalled readers per cell, ~66 signals each "
                                                           "(%(default)s)")
    ap.add_argument("--pinning", choices=("both", "pinned", "unpinned"), default="both")
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("run as root: it loads BPF programs and makes network namespaces", file=sys.stderr)
        return 2
    main_pid = os.getpid()

    def on_term(*_):
        if os.getpid() != main_pid:  # a child forked by pyroute2 inherits the handler: die as by default
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        sys.exit(143)  # the finally blocks below clean up
    signal.signal(signal.SIGTERM, on_term)
    pinnings = ["unpinned", "pinned"] if args.pinning == "both" else [args.pinning]
    lab = Lab(f"brd{os.getpid() % 100000}")
    bpffs = Path(f"/sys/fs/bpf/meshbpf-bench-blockread{os.getpid()}")
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="meshbpf-blockread-") as tmp:
        config = Path(tmp) / "config.yaml"
        config.write_text(CONFIG)
        builds = {"before": export(args.before, Path(tmp) / "before"), "after": REPO}
        try:
            lab.up(["client", "web-1"])
            cg = lab.cgroup
            if cg == cgroup2_mount() or cg.parent != cgroup2_mount():
                raise RuntimeError(f"refusing to attach to {cg}: not a child of the cgroup2 root")
            port = 7300
            for build, root in builds.items():
                agent = Agent(root, config, cg, bpffs)
                try:
                    for pinning in pinnings:
                        pin = ["taskset", "-c", "0"] if pinning == "pinned" else []
                        cells = {
                            "reader": lambda: reader_runs(lab, args.readers, pin, port),
                            "eof": lambda: eof_runs(lab, args.runs, pin, port, 0, "blocking", "blocking"),
                            "eof-slow": lambda: eof_runs(lab, args.slow_runs, pin, port, 50,
                                                         "connect-timeout", "timeout"),
                            "eof-late": lambda: eof_runs(lab, args.slow_runs, pin, port, 50,
                                                         "late-blocking", "timeout"),
                        }
                        for name, cell in cells.items():
                            before = redirect.read_counters(bpffs) or {}
                            t0 = time.monotonic()
                            res = cell()
                            after = redirect.read_counters(bpffs) or {}
                            port += 100
                            res["seconds"] = round(time.monotonic() - t0, 1)
                            res["spliced_msgs"] = after.get("redirected_msgs", 0) - before.get("redirected_msgs", 0)
                            res["inserted"] = after.get("inserted_sockets", 0) - before.get("inserted_sockets", 0)
                            res["evicted"] = after.get("evicted_sockets", 0) - before.get("evicted_sockets", 0)
                            results.setdefault(name, {}).setdefault(pinning, {})[build] = res
                            print(f"{build:6} {pinning:8} {name:8} EAGAIN {res['eagain']} of {res['of']} "
                                  f"{res['unit']} (sockets inserted {res['inserted']}, evicted {res['evicted']}, spliced sends "
                                  f"{res['spliced_msgs']}, {res['seconds']} s)"
                                  + (f"; EAGAIN after byte {res['eagain_at_bytes'][:10]}" if res.get("eagain_at_bytes") else ""),
                                  flush=True)
                finally:
                    agent.stop()
                    uninstall(bpffs)
        finally:
            if bpffs.exists():
                uninstall(bpffs)
            lab.down()
    print(f"\nspurious EAGAIN, before ({args.before}) -> after (this tree)")
    print(f"| workload | pinning | before | after |\n|---|---|---|---|")
    for name, by_pin in results.items():
        for pinning, r in by_pin.items():
            b, a = r.get("before", {}), r.get("after", {})
            print(f"| {name} | {pinning} | {b.get('eagain')} of {b.get('of')} {b.get('unit', '')} | "
                  f"{a.get('eagain')} of {a.get('of')} {a.get('unit', '')} |")
    if args.json:
        args.json.write_text(json.dumps({"before_ref": args.before, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
