"""Stream, small writes, Nagle: what does the receiver staying in the sockhash cost?
Compares tcp, redirect as is, and redirect with the receiver's key deleted from
userspace once the sender was evicted (a stand-in for evicting it in BPF).

    sudo .venv/bin/python bench/experiments/receiver_eviction.py SIZE same|none ROUNDS
"""
import sys, time, json, threading, statistics, os
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
import redirbench as rb
from meshbpf.datapath import redirect, libbpf

class A: warmup=0.5; readbuf=1<<20; duration=1.0; conns=1; spin=False; same_pod=False
args = A()
size = int(sys.argv[1]); pinning = sys.argv[2]; rounds = int(sys.argv[3])
def evict_receiver(b, stop):
    fd = libbpf.obj_get(str(b.bpffs / "mbpf_sockhash"))
    try:
        while not stop.is_set():
            ents = redirect.read_sockets(b.bpffs)
            snd = [e for e in ents if e.key.local_port != 7100 and e.evicted]
            rcv = [e for e in ents if e.key.local_port == 7100 and e.in_sockhash and e.mode == "pass"]
            if snd and rcv:
                libbpf.map_delete(fd, rcv[0].key)
                return
            time.sleep(0.02)
    finally:
        os.close(fd)
res = {"tcp": [], "redirect": [], "redirect+rx-evict": []}
with rb.Bench() as b:
    cell = rb.Cell("stream", size, "nagle", rb.PORT0)
    b.start_server([cell], pinning, args)
    for r in range(rounds):
        for case in ("tcp", "redirect", "redirect+rx-evict"):
            stop = threading.Event()
            t = None
            if case.endswith("evict"):
                b.set_redirect(True)
                t = threading.Thread(target=evict_receiver, args=(b, stop)); t.start()
            out = b.run(cell, "tcp" if case == "tcp" else "redirect", pinning, args)
            stop.set()
            if t: t.join()
            res[case].append(out["value"])
            print(case, round(out["value"], 1), out["counters"]["evicted_sockets"], out["eagain"], out["eagain_eof"], flush=True)
for k, v in res.items():
    print(k, "median", round(statistics.median(v), 1), "ratio-to-tcp", round(statistics.median(x / y for x, y in zip(v, res["tcp"])), 3))
