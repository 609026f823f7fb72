"""TCP_NODELAY streams: does TCP autocorking explain why TCP beats a splice
per write at 256 B - 1 KB? Runs tcp and redirect with net.ipv4.tcp_autocorking
1 and 0 in the client pod (a per-namespace sysctl).

    sudo .venv/bin/python bench/experiments/autocork.py same|none
"""
import sys, statistics
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
import redirbench as rb
class A: warmup=0.2; readbuf=1<<20; duration=0.8; conns=1; spin=False; same_pod=False
args = A()
pin = sys.argv[1]
sizes = [64, 256, 1024, 4096]
with rb.Bench() as b:
    cells = [rb.Cell("stream", s, "nodelay", rb.PORT0 + i) for i, s in enumerate(sizes)]
    b.start_server(cells, pin, args)
    res = {}
    for r in range(4):
        for cell in cells:
            for ac in (1, 0):
                b.lab.run("cli", ["sysctl", "-qw", f"net.ipv4.tcp_autocorking={ac}"], in_cgroup=False)
                for case in ("tcp", "redirect"):
                    res.setdefault((cell.size, ac, case), []).append(b.run(cell, case, pin, args)["value"])
    for s in sizes:
        print(s, " ".join(f"autocork={ac} {case} {statistics.median(res[(s, ac, case)]):.0f}" for ac in (1, 0) for case in ("tcp", "redirect")))
