"""What the NetworkPolicy tc programs cost per packet, measured by the
kernel itself (BPF_PROG_TEST_RUN with repeat), so it holds on a busy
machine where wall-clock connection rates are noise.

    .venv/bin/python bench/policy_prog_cost.py [--repeat N] [--trials T] [--json]

Compiles bpf/policy.c (of this checkout, or MESHBPF_BPF_DIR) into a
throw-away bpffs folder, fills the maps as a lab pair would have them (a
client pod, open, and a server pod, ingress-isolated with a peer /32 and
one TCP port), and runs each program on the packets of one connection as
the loadgen benchmark makes it, at each end. Prints ns per run (the
minimum over the trials of the kernel's mean over `repeat` runs), and the
sum over one connection. An empty tc program gives the floor: the cost of
merely running a program in the test harness.
"""

from __future__ import annotations

import argparse
import ctypes as ct
import json
import os
import sys
from pathlib import Path

from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from meshbpf.datapath import libbpf
from meshbpf.datapath.policy import PolicyDatapath, PolicyMaps, addr_bytes
from meshbpf.reconcile.policy_keys import (DIR_IN, EP_ISOLATE_IN, EpVal, PeerKey, PeerVal,
                                           PolicyStep, PortKey, PortVal)

CLI_IF, SRV_IF = 1, 2        # skb->ifindex the test run gives the packet
CLI_EP, SRV_EP = 1, 2
CLI, SRV = "10.244.0.2", "10.244.0.3"
PORT, SPORT = 8080, 40000
EMPTY = b"int mbpf_tc_empty(struct __sk_buff *skb) { return -1; }"


def frame(src, dst, sport, dport, flags, payload=b"") -> bytes:
    return bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
                 / IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags=flags) / payload)


# One loadgen connection (64 B each way, the client closes with a RST), each
# packet as the program at each end sees it: (what, program, ifindex, frame).
C2S = (CLI, SRV, SPORT, PORT)
S2C = (SRV, CLI, PORT, SPORT)
CONNECTION = [
    ("SYN", "c2s", "S", b""), ("SYN-ACK", "s2c", "SA", b""), ("ACK", "c2s", "A", b""),
    ("request", "c2s", "PA", b"q" * 64), ("response", "s2c", "PA", b"r" * 64),
    ("FIN", "s2c", "FA", b""), ("RST", "c2s", "R", b""),
]


def runs_of(kind: str, way: str, flags: str, payload: bytes):
    """The two program runs of one packet: the sender's from_pod, the receiver's to_pod."""
    tup = C2S if way == "c2s" else S2C
    pkt = frame(*tup, flags, payload)
    sender, receiver = (CLI_IF, SRV_IF) if way == "c2s" else (SRV_IF, CLI_IF)
    side = {CLI_IF: "client", SRV_IF: "server"}
    return [(f"{kind} {side[sender]} from_pod", "mbpf_tc_from_pod", sender, pkt),
            (f"{kind} {side[receiver]} to_pod", "mbpf_tc_to_pod", receiver, pkt)]


def test_run_ns(prog_fd: int, packet: bytes, ifindex: int, repeat: int) -> tuple[int, float]:
    """(return value, mean ns per run) of `repeat` runs in the kernel."""
    data_in = ct.create_string_buffer(packet, len(packet))
    data_out = ct.create_string_buffer(len(packet) + 256)
    ctx = ct.create_string_buffer(libbpf.SKB_CTX_SIZE)
    ct.memmove(ct.addressof(ctx) + libbpf.SKB_IFINDEX_OFFSET, ct.byref(ct.c_uint32(ifindex)), 4)
    opts = libbpf._TestRunOpts(sz=ct.sizeof(libbpf._TestRunOpts), data_in=ct.addressof(data_in),
                               data_out=ct.addressof(data_out), data_size_in=len(packet),
                               data_size_out=len(data_out), ctx_in=ct.addressof(ctx),
                               ctx_size_in=libbpf.SKB_CTX_SIZE, repeat=repeat)
    libbpf._check(libbpf._lib.bpf_prog_test_run_opts(prog_fd, ct.byref(opts)), "BPF_PROG_TEST_RUN")
    return ct.c_int32(opts.retval).value, float(opts.duration)


def fill(maps: PolicyMaps) -> None:
    """Client open, server isolated for ingress: the client's /32 on PORT."""
    maps.apply([
        PolicyStep("addresses", "update", {addr_bytes(CLI): CLI_EP, addr_bytes(SRV): SRV_EP}),
        PolicyStep("peers", "update", {PeerKey(SRV_EP, 0, DIR_IN, addr_bytes(CLI), 128): PeerVal(1, 0, 0)}),
        PolicyStep("ports", "update", {PortKey(SRV_EP, 0, DIR_IN, 6, 1, PORT, 16): PortVal(21)}),
        PolicyStep("endpoints", "update", {CLI_IF: EpVal(CLI_EP, 0, 0), SRV_IF: EpVal(SRV_EP, 0, EP_ISOLATE_IN)}),
    ])


def warm(dp: PolicyDatapath) -> None:
    """One pass in order, so that the conntrack entries later packets find exist."""
    for kind, way, flags, payload in CONNECTION:
        for _, prog, ifindex, pkt in runs_of(kind, way, flags, payload):
            rc, _ = test_run_ns(dp.prog_fd(prog), pkt, ifindex, 1)
            if rc != -1:
                sys.exit(f"{kind}: {prog} on ifindex {ifindex} returned {rc}, expected a pass")


def xlated_insns(fd: int) -> int:
    """The program's length after the verifier's rewrites, in instructions."""
    info = libbpf._ProgInfo()
    size = ct.c_uint32(ct.sizeof(info))
    libbpf._check(libbpf._lib.bpf_obj_get_info_by_fd(fd, ct.byref(info), ct.byref(size)), "program info")
    return info.xlated_prog_len // 8


def measure(repeat: int, trials: int) -> dict:
    from bcc import BPF
    bpffs = Path(f"/sys/fs/bpf/meshbpf-bench-cost{os.getpid()}")
    dp = PolicyDatapath(bpffs)
    try:
        dp.compile()
        empty = BPF(text=EMPTY).load_func(b"mbpf_tc_empty", BPF.SCHED_CLS)
        with PolicyMaps(bpffs) as maps:
            fill(maps)
        warm(dp)
        runs = [r for c in CONNECTION for r in runs_of(*c)]
        best = {name: float("inf") for name, *_ in runs}
        best["empty program"] = float("inf")
        for _ in range(trials):  # interleaved: a burst of load spoils one trial of each, not all of one
            for name, prog, ifindex, pkt in runs:
                best[name] = min(best[name], test_run_ns(dp.prog_fd(prog), pkt, ifindex, repeat)[1])
            best["empty program"] = min(best["empty program"],
                                        test_run_ns(empty.fd, runs[0][3], CLI_IF, repeat)[1])
        return {"ns": best, "per_connection_ns": sum(best[n] for n, *_ in runs),
                "runs_per_connection": len(runs),
                "insns": {p: xlated_insns(dp.prog_fd(p)) for p in ("mbpf_tc_from_pod", "mbpf_tc_to_pod")}}
    finally:
        from meshbpf.datapath.loader import uninstall
        dp.bpf = None
        if bpffs.exists():
            uninstall(bpffs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=200000)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    res = measure(args.repeat, args.trials)
    if args.json:
        print(json.dumps(res))
        return
    for name, ns in res["ns"].items():
        print(f"{ns:7.1f} ns  {name}")
    print(f"{res['per_connection_ns']:7.1f} ns  one connection ({res['runs_per_connection']} runs)")
    print(f"xlated instructions: {res['insns']}  (load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
