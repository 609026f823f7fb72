"""Where the ~11 ms of server-first connections through SNAT come from
(bench/snat_capacity.py's "the server closes first" row): the kernel's drop
reasons counted (kfree_skb raw tracepoint) while that load runs, per mode.

    sudo .venv/bin/python bench/experiments/snat_timewait.py [--seconds 5] [--out F] [modes...]

(after bench/run-northsouth --quick once, which builds loadgen). Writes
bench/results/snat-timewait.json. The reasons that matter, by name from the
running kernel's BTF (enum skb_drop_reason): TCP_RFC7323_TW_PAWS (a backend's
TIME_WAIT refused a SYN), TCP_INVALID_ACK_SEQUENCE (the client, in SYN_SENT,
got that TIME_WAIT's ACK instead of a SYN-ACK). It also records the TCP
timestamps of the SYNs of 8 connections, one after the other, from one
address to another (two namespaces of the lab: the router and node1), as
seen on the wire: whether a client's timestamps rise from one connection to
the next decides whether PAWS lets a reused tuple through.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import snat_capacity as sc  # noqa: E402

PROBE = r"""
BPF_HASH(drops, u32, u64);
RAW_TRACEPOINT_PROBE(kfree_skb) {   /* (skb, location, reason, ...) */
    u32 reason = (u32)ctx->args[2];
    drops.increment(reason);
    return 0;
}
"""


def reason_names() -> dict[int, str]:
    text = subprocess.run(["bpftool", "btf", "dump", "file", "/sys/kernel/btf/vmlinux", "format", "raw"],
                          capture_output=True, text=True, check=True).stdout
    block = text[text.index("ENUM 'skb_drop_reason'"):]
    return {int(v): n.removeprefix("SKB_DROP_REASON_")
            for n, v in re.findall(r"'(SKB_[A-Z0-9_]+)' val=(\d+)", block.split("\n[", 1)[0])}


SYN_SNIFFER = r"""
import socket, struct, sys, time
sniff = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
sniff.bind((sys.argv[1], 0))
sniff.settimeout(0.2)
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[2], int(sys.argv[3])))
srv.listen(16)
print("ready", flush=True)
seen, end = [], time.time() + 5
while len(seen) < 8 and time.time() < end:
    try:
        f = sniff.recv(2000)
    except socket.timeout:
        continue
    ip = f[14:]
    tcp = ip[(ip[0] & 15) * 4:]
    if ip[9] != 6 or tcp[13] & 0x12 != 0x02 or struct.unpack("!H", tcp[2:4])[0] != int(sys.argv[3]):
        continue
    opts, i = tcp[20:(tcp[12] >> 4) * 4], 0
    while i < len(opts) and opts[i] != 0:
        if opts[i] == 1:
            i += 1
            continue
        if opts[i] == 8:
            seen.append(struct.unpack("!I", opts[i + 2:i + 6])[0])
        i += opts[i + 1]
print(seen)
"""

SYN_CLIENT = r"""
import socket, sys, time
for _ in range(8):
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
    s.close()
    time.sleep(0.02)
"""


def syn_timestamps(run) -> list[int]:
    """The TSval of 8 SYNs, router -> node1's address, one connection after the other."""
    node1 = str(run.node1.ext_ipv4)
    srv = run.lab.popen(None, [sys.executable, "-c", SYN_SNIFFER, "ext0", node1, "7999"], node=1,
                        stdout=subprocess.PIPE, text=True)
    try:
        assert srv.stdout.readline().strip() == "ready"
        run.lab.run(None, [sys.executable, "-c", SYN_CLIENT, node1, "7999"], node="router", check=True)
        return json.loads(srv.communicate(timeout=10)[0])
    finally:
        if srv.poll() is None:
            srv.kill()


def hz() -> int | None:
    """CONFIG_HZ: TCP_TIMEOUT_MIN, the SYN retransmit after an invalid ACK, is 2 jiffies."""
    for path in (Path("/proc/config.gz"), Path(f"/boot/config-{os.uname().release}")):
        if path.exists():
            text = subprocess.run(["zcat", "-f", str(path)], capture_output=True, text=True).stdout
            m = re.search(r"^CONFIG_HZ=(\d+)", text, re.M)
            if m:
                return int(m.group(1))
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--out", type=Path, default=sc.ns.HERE / "results" / "snat-timewait.json")
    ap.add_argument("modes", nargs="*", default=["tc", "nftables", "direct"])
    args = ap.parse_args()
    from bcc import BPF
    names = reason_names()
    probe = BPF(text=PROBE)
    out = {"command": f"bench/experiments/snat_timewait.py {' '.join(sys.argv[1:])}".strip(),
           "machine": sc.ns.machine(), "config_hz": hz(), "seconds": args.seconds, "modes": {}}
    cpu = (os.cpu_count() or 1) - 1   # client and servers on one CPU, as snat_capacity.py
    work = sc.ns.HERE / "out" / "snat-timewait"
    try:
        measure(work, cpu, probe, names, args, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    probe.cleanup()
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    sc.ns.log(f"results in {args.out}")


def measure(work: Path, cpu: int, probe, names: dict[int, str], args, out: dict) -> None:
    """Each mode's server-first load, with the drop reasons counted."""
    with sc.FinRun(10, work, cpu) as run:
        run.prepare()
        run.program(["tc", "nftables"])
        out["syn_tsvals"] = syn_timestamps(run)
        sc.ns.log(f"TSval of 8 SYNs in a row, router -> node1: {out['syn_tsvals']}")
        for mode in args.modes:
            run.switch(None if mode == "direct" else mode)
            probe["drops"].clear()
            load = run.fin_load(mode, "server", args.seconds)
            drops = {names.get(k.value, str(k.value)): v.value for k, v in probe["drops"].items()}
            out["modes"][mode] = {"load": load, "drop_reasons": drops}
            sc.ns.log(f"{mode}: {load['count']} connections, p99 {load.get('p99_us')} us, "
                      f"TW_PAWS {drops.get('TCP_RFC7323_TW_PAWS', 0)}, "
                      f"invalid ACK in SYN_SENT {drops.get('TCP_INVALID_ACK_SEQUENCE', 0)}")
        run.switch(None)


if __name__ == "__main__":
    main()
