"""Which sockets of a small-write stream (Nagle) stay in the sockhash?
Samples meshbpf's socket-state map every 0.5 s during a 3 s redirect run.

    sudo .venv/bin/python bench/experiments/stream_states.py [SIZE]
"""
import sys, time, json, subprocess, threading
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
import redirbench as rb
from meshbpf.datapath import redirect

class A: warmup=0.2; readbuf=1<<20; duration=3.0; conns=1; spin=False; same_pod=False
args = A()
size = int(sys.argv[1]) if len(sys.argv) > 1 else 64
with rb.Bench() as b:
    cell = rb.Cell("stream", size, "nagle", rb.PORT0)
    b.start_server([cell], "none", args)
    b.set_redirect(True)
    out = {}
    def go():
        out["r"] = b.run(cell, "redirect", "none", args)
    t = threading.Thread(target=go); t.start()
    for i in range(6):
        time.sleep(0.5)
        ents = redirect.read_sockets(b.bpffs)
        print(f"t={0.5*(i+1):.1f}", [(e.local, e.remote, e.mode, e.evicted, e.in_sockhash) for e in ents],
              redirect.read_counters(b.bpffs))
    t.join()
    r = out["r"]
    print(r["value"], r["counters"], r["eagain"])
