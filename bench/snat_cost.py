"""What the SNAT port's socket check costs a new north-south flow, measured
by the kernel itself (BPF_PROG_TEST_RUN), so it holds on a busy machine.

    .venv/bin/python bench/snat_cost.py [--flows N] [--trials T] [--json]

Compiles bpf/nodeport.c twice into throw-away bpffs folders: as the agent
runs it, and with -DMBPF_NS_BENCH_NO_SOCKET_CHECK (the same port walk and
conntrack claim, without the bpf_skc_lookup_tcp / bpf_sk_lookup_udp of the
reply tuple). Each gets a NodePort whose Maglev table holds 64 backends on
another node, so every flow is SNATed. Each run of mbpf_ns_ingress is one
new flow (a client port not seen before: the first packet of a flow, the
one that claims a port); the kernel times it (repeat 1). The conntrack map
is emptied every 512 flows, so the SNAT range never fills (a few flows
still meet a port another took first and retry, alike in both builds: the
retries are printed).
Prints, per protocol, the median ns per new flow of each build over all
trials (interleaved by trial), the difference and the ratio. Nothing is
attached; the maps are removed at the end.
"""

from __future__ import annotations

import argparse
import ctypes as ct
import json
import os
import socket
import statistics
from array import array
from pathlib import Path

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from meshbpf.datapath import libbpf
from meshbpf.datapath.layout import NS_MAPS
from meshbpf.datapath.northsouth import NorthSouthMaps
from meshbpf.datapath.source import program_text
from meshbpf.reconcile.northsouth_keys import F_NODEPORT, NsBackend, NsCfg, NsKey, NsStep, NsSvc, wildcard

M = 13
NODE, CLIENT = "10.243.0.11", "10.243.0.1"
NODE_PORT, BE_PORT = 30080, 8080
BACKENDS = 64
CLEAR_EVERY = 512
RETRIES: dict[int, int] = {}   # per protocol, both builds: the same flows collide alike (a few)
VARIANTS = {"with socket check": [], "without": ["-DMBPF_NS_BENCH_NO_SOCKET_CHECK"]}


def a16(ip: str) -> bytes:
    return b"\0" * 10 + b"\xff\xff" + socket.inet_aton(ip)


def compile_variant(bpffs: Path, extra: list[str]):
    from bcc import BPF
    bpffs.mkdir(parents=True, exist_ok=True)
    sizes = {s.size_macro: s.default_size for s in NS_MAPS if s.size_macro}
    sizes["MBPF_NS_TABLE_MAX"] = 8
    cflags = [f'-DMBPF_PIN_DIR="{bpffs}"', f"-DMBPF_MAGLEV_M={M}",
              *(f"-D{k}={v}" for k, v in sizes.items()), *extra]
    bpf = BPF(text=program_text(["nodeport.c"]).encode(), cflags=cflags)
    return bpf, bpf.load_func(b"mbpf_ns_ingress", BPF.SCHED_CLS).fd


def fill(maps: NorthSouthMaps) -> None:
    ids = list(range(1, BACKENDS + 1))
    maps.apply([NsStep("node_addrs", "update", {a16(NODE): 1}),
                NsStep("cfg", "update", {0: NsCfg(a16(NODE), bytes(16), 1)}),
                NsStep("backends", "update", {i: NsBackend(a16(f"10.244.1.{i}"), BE_PORT, 0) for i in ids})])
    for table, proto in ((0, 6), (1, 17)):
        maps.apply([NsStep("tables", "update", {table: array("I", [ids[i % BACKENDS] for i in range(M)])}),
                    NsStep("frontends", "update", {NsKey(wildcard(4), NODE_PORT, proto):
                                                   NsSvc(table, M, 0, F_NODEPORT)})])


def frame(proto: int) -> bytes:
    l4 = TCP(sport=1, dport=NODE_PORT, flags="S") if proto == 6 else UDP(sport=1, dport=NODE_PORT) / (b"x" * 16)
    return bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(src=CLIENT, dst=NODE) / l4)


def run_once(fd: int, packet: bytearray) -> tuple[int, int]:
    data_in = (ct.c_char * len(packet)).from_buffer(packet)
    data_out = ct.create_string_buffer(len(packet) + 256)
    ctx = ct.create_string_buffer(libbpf.SKB_CTX_SIZE)
    ct.memmove(ct.addressof(ctx) + libbpf.SKB_IFINDEX_OFFSET, ct.byref(ct.c_uint32(1)), 4)
    opts = libbpf._TestRunOpts(sz=ct.sizeof(libbpf._TestRunOpts), data_in=ct.addressof(data_in),
                               data_out=ct.addressof(data_out), data_size_in=len(packet),
                               data_size_out=len(data_out), ctx_in=ct.addressof(ctx),
                               ctx_size_in=libbpf.SKB_CTX_SIZE, repeat=1)
    libbpf._check(libbpf._lib.bpf_prog_test_run_opts(fd, ct.byref(opts)), "BPF_PROG_TEST_RUN")
    return ct.c_int32(opts.retval).value, opts.duration


def new_flows(fd: int, maps: NorthSouthMaps, proto: int, flows: int, first_port: int) -> list[int]:
    """ns of `flows` new flows (client ports first_port.., the source
    port patched in place: its checksum is not the program's concern)."""
    packet = bytearray(frame(proto))
    sport_off = 14 + 20
    before = maps.counters()
    out = []
    for i in range(flows):
        if i % CLEAR_EVERY == 0:
            maps.clear_conntrack()
        port = 1024 + (first_port + i) % 64000
        packet[sport_off:sport_off + 2] = port.to_bytes(2, "big")
        _, ns = run_once(fd, packet)
        out.append(ns)
    after = maps.counters()
    if after["new"] - before["new"] != flows:
        raise SystemExit(f"expected {flows} new flows, counted {after['new'] - before['new']}")
    RETRIES[proto] = RETRIES.get(proto, 0) + after["snat_port_retry"] - before["snat_port_retry"]
    return out


def measure(flows: int, trials: int) -> dict:
    from meshbpf.datapath.loader import uninstall
    made = {}
    try:
        for name, extra in VARIANTS.items():
            bpffs = Path(f"/sys/fs/bpf/meshbpf-bench-snat{os.getpid()}-{len(made)}")
            bpf, fd = compile_variant(bpffs, extra)
            maps = NorthSouthMaps(bpffs)
            fill(maps)
            made[name] = (bpffs, bpf, fd, maps)
        samples = {(name, proto): [] for name in VARIANTS for proto in (6, 17)}
        for trial in range(trials):   # interleaved: a burst of load spoils a trial of each
            for proto in (6, 17):
                for name, (_, _, fd, maps) in made.items():
                    samples[(name, proto)] += new_flows(fd, maps, proto, flows, trial * flows)
        out = {}
        for proto, label in ((6, "tcp"), (17, "udp")):
            with_ = statistics.median(samples[("with socket check", proto)])
            without = statistics.median(samples[("without", proto)])
            out[label] = {"with_ns": with_, "without_ns": without, "extra_ns": with_ - without,
                          "ratio": with_ / without if without else None,
                          "flows": flows * trials, "retries_both_builds": RETRIES.get(proto, 0)}
        return out
    finally:
        for bpffs, bpf, _, maps in made.values():
            maps.close()
            bpf.cleanup()
            if bpffs.exists():
                uninstall(bpffs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flows", type=int, default=4000, help="new flows per build, protocol and trial")
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    res = measure(args.flows, args.trials)
    if args.json:
        print(json.dumps(res))
        return
    for proto, r in res.items():
        print(f"{proto}: new SNAT flow {r['with_ns']:.0f} ns with the socket check, {r['without_ns']:.0f} ns "
              f"without: +{r['extra_ns']:.0f} ns, x{r['ratio']:.2f} (median of {r['flows']} each; "
              f"{r['retries_both_builds']} retries in all)")
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
