"""SNAT port capacity for connections ended by FINs (issue 12).

    bench/run-northsouth --quick   # once: setup, the load generator
    .venv/bin/python bench/snat_capacity.py [--seconds 10]

A flow to a backend on another node leaves node1 from a port of the SNAT
range, which serves again only once that flow is over. A client that
closes first (HTTP/1.1 clients do) leaves the backend no TIME_WAIT, and
meshbpf frees the port 1 s after the flow's last packet; a flow the backend
closed first holds it 60 s. This runs one client in the lab's router netns
for --seconds against node1's NodePort, backend on node2, in turn through
meshbpf's tc programs and kube-proxy's nftables layout (masquerade: Linux's
conntrack picks the port), with plain routing to the pod as the ceiling;
first with connections the client closes first (loadgen -F on both ends),
then with connections the server closes first (loadgen client -S to a
plain loadgen server). The client's own TIME_WAIT sockets are reused
(net.ipv4.tcp_tw_reuse = 1 in the router netns only), so its ports are not
the limit; --pause between runs lets the backend's go.

Reported per mode: connections/s over the run, failed connections (a SYN
dropped for want of a port is retried after 1 s; loadgen gives up a
connection after 1 s), and meshbpf's drop_no_snat and snat_port_retry
counters. Writes bench/results/snat-capacity.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import northsouth as ns
from meshbpf.lab.netlab import ROUTER

FIN_PORT = 8081
MODES = ("direct", "tc", "nftables")
FIRST = ("client", "server")   # which end closes first


class FinRun(ns.NsRun):
    """NsRun with one more Service: to node2's pod, where a loadgen -F server
    listens on FIN_PORT."""

    def services(self):
        targets = [("web-tcp", "tcp", (self.addr("web"),), ns.TCP_PORT),
                   ("loc-tcp", "tcp", (self.addr("loc"),), ns.TCP_PORT),
                   ("web-udp", "udp", (self.addr("web"),), ns.UDP_PORT),
                   ("web-fin", "tcp", (self.addr("web"),), FIN_PORT)]
        return ns.kr.nodeport_services(max(self.n, len(targets)), targets)

    def prepare(self) -> None:
        super().prepare()
        self._server("web", [str(ns.LOADGEN), "server", "-F", f"{self.addr('web')}:{FIN_PORT}"], "ready")
        self.lab.run(None, ["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"], node=ROUTER, check=True)

    def fin_target(self, mode: str, first: str) -> str:
        """client first: the -F server's Service; server first: the plain
        server's (it closes once it has answered)."""
        s = self.services()[-1 if first == "client" else -4]
        port = FIN_PORT if first == "client" else ns.TCP_PORT
        return f"{s.endpoints[0]}:{port}" if mode == "direct" else f"{self.node1.ext_ipv4}:{s.node_port}"

    def fin_load(self, mode: str, first: str, seconds: float) -> dict:
        flag = "-F" if first == "client" else "-S"
        argv = [*self.pin, str(ns.LOADGEN), "client", flag, "-d", str(seconds), "-w", "0",
                self.fin_target(mode, first)]
        res = self.lab.run(None, argv, node=ROUTER, timeout=seconds + 60)
        if res.returncode != 0:
            raise RuntimeError(f"loadgen client {flag} ({mode}) failed: {res.stderr}")
        return json.loads(res.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="length of each mode's run")
    ap.add_argument("--pause", type=float, default=65.0,
                    help="seconds between runs: the backend's TIME_WAITs of the last one gone")
    ap.add_argument("--cpu", default=str((os.cpu_count() or 1) - 1), help="CPU for client and servers, or none")
    ap.add_argument("--out", type=Path, default=ns.HERE / "results" / "snat-capacity.json")
    args = ap.parse_args()
    if not ns.LOADGEN.exists():
        ap.error(f"{ns.LOADGEN} is missing: run bench/run-northsouth --quick once, which builds it")
    cpu = None if args.cpu == "none" else int(args.cpu)
    work = ns.HERE / "out" / f"snat-{os.getpid()}"
    results = {"command": f"bench/snat_capacity.py {' '.join(sys.argv[1:])}".strip(), "machine": ns.machine(),
               "load_before": " ".join(f"{x:.2f}" for x in os.getloadavg()), "seconds": args.seconds,
               "client_first": {}, "server_first": {}}
    try:
        with FinRun(10, work, cpu) as run:
            run.prepare()
            run.program(["tc", "nftables"])
            for first in FIRST:
                for i, mode in enumerate(MODES):
                    if i or first != FIRST[0]:
                        time.sleep(args.pause)
                    run.switch(None if mode == "direct" else mode)
                    before = run.counters()
                    out = run.fin_load(mode, first, args.seconds)
                    after = run.counters()
                    out["meshbpf_counters"] = {k: after.get(k, 0) - before.get(k, 0) for k in after
                                               if after.get(k, 0) != before.get(k, 0)}
                    results[f"{first}_first"][mode] = out
                    ns.log(f"{first} closes first, {mode}: {out['rate']:.0f} conn/s, {out['errors']} failed, "
                           f"counters {out['meshbpf_counters']}")
            run.switch(None)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    ns.log(f"results in {args.out}")


if __name__ == "__main__":
    main()
