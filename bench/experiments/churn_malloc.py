"""Where the agent's RSS goes under endpoint churn (README, issue 14's hour
of churn): pymalloc's arenas, free pools and live blocks
(sys._debugmallocstats) and the RSS after the cold start, after --events
endpoint moves (sent as fast as the agent programs them), and after
malloc_trim, which is timed.

    .venv/bin/python bench/experiments/churn_malloc.py [--services 100000] [--events 100000]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import incremental as inc  # noqa: E402
from meshbpf.gcpause import trim_malloc  # noqa: E402

KEPT = ("arenas allocated current", "# bytes in allocated blocks", "# bytes in available blocks",
        "unused pools")


def report(tag: str) -> None:
    """The RSS and pymalloc's summary lines (_debugmallocstats writes to fd 2)."""
    r, w = os.pipe()
    saved = os.dup(2)
    os.dup2(w, 2)
    os.close(w)
    try:
        sys._debugmallocstats()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    text = os.read(r, 1 << 20).decode()
    os.close(r)
    print(f"{tag}: RSS {inc.rss_mb():.1f} MB")
    for line in text.splitlines():
        if any(k in line for k in KEPT):
            print("   ", " ".join(line.split()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--services", type=int, default=100_000)
    ap.add_argument("--events", type=int, default=100_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        api = inc.APIServerProcess(args.services)
        source = inc.KubernetesSource(kubeconfig=str(api.kubeconfig(Path(tmp) / "kubeconfig")),
                                      node_name="node-a")
        agent, maps, programmed = inc.make_agent(source, args.services)
        loop = inc.LoopThread(agent)
        while not agent.ready():
            time.sleep(0.01)
        report("cold start")
        programmed.clear()
        for k in range(args.events):
            api.move((k * 104729) % args.services, k)
            while len(programmed) < k - 200:  # a bounded backlog
                time.sleep(0.001)
        while len(programmed) < args.events:
            time.sleep(0.01)
        report(f"after {args.events} events")
        started = time.perf_counter()
        trim_malloc()
        print(f"malloc_trim: {(time.perf_counter() - started) * 1000:.1f} ms")
        report("after malloc_trim")
        loop.stop()
        source.stop()
        api.stop()


if __name__ == "__main__":
    main()
