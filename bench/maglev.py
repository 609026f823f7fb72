"""Maglev table build time and disruption (issue 12).

    .venv/bin/python bench/maglev.py [--backends 1000] [--runs 15] [--size 65537]

Target: the table for 1 000 backends built in <= 50 ms (the median of
--runs builds, each from scratch: hashing, Populate, the array; wall and
CPU time, the CPU time being the fairer figure on a shared machine). Also the
disruption: for each of 100 backends, the slots that move beyond the
removed backend's own when it goes away, and beyond those a 101st backend
takes when it comes (target <= 1 % of the table). Pure Python, no root.
The load average is printed with the figures: the machine may be busy.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshbpf.reconcile.maglev import LARGE_TABLE, TABLE_SIZES, build, identity  # noqa: E402


def backends(n: int) -> list[tuple[str, int]]:
    return [(f"10.{i >> 8 & 255}.{i & 255}.7", 8080) for i in range(n)]


def build_ms(n: int, size: int, runs: int) -> tuple[list[float], list[float]]:
    """Wall and CPU milliseconds per build (CPU time: this thread's, which a
    busy machine inflates less than the wall time)."""
    given = backends(n)
    build(given, size)  # warm-up
    wall, cpu = [], []
    for _ in range(runs):
        start, start_cpu = time.perf_counter(), time.thread_time()
        build(given, size)
        wall.append((time.perf_counter() - start) * 1000)
        cpu.append((time.thread_time() - start_cpu) * 1000)
    return wall, cpu


def moved_beyond(old, new, changed: str) -> int:
    return sum(1 for j in range(old.size)
               if old.lookup(j) != new.lookup(j) and changed not in (old.lookup(j), new.lookup(j)))


def disruption(size: int) -> tuple[list[int], list[int]]:
    given = backends(100)
    before = build(given, size)
    removed = [moved_beyond(before, build(given[:k] + given[k + 1:], size), identity(*given[k]))
               for k in range(len(given))]
    extras = [(f"10.99.{k}.1", 8080) for k in range(20)]
    added = [moved_beyond(before, build(given + [e], size), identity(*e)) for e in extras]
    return removed, added


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--size", type=int, default=LARGE_TABLE, choices=TABLE_SIZES)
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}, "
          f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    wall, cpu = build_ms(args.backends, args.size, args.runs)
    print(f"build, {args.backends} backends, M={args.size} ({args.runs} runs; target <= 50 ms): "
          f"wall median {statistics.median(wall):.1f} ms (min {min(wall):.1f}, max {max(wall):.1f}), "
          f"CPU median {statistics.median(cpu):.1f} ms (min {min(cpu):.1f})")
    removed, added = disruption(args.size)
    for what, moved in (("remove one of 100", removed), ("add a 101st", added)):
        print(f"{what}: slots moved beyond the changed backend's: median "
              f"{100 * statistics.median(moved) / args.size:.2f} %, "
              f"worst {100 * max(moved) / args.size:.2f} % "
              f"of {args.size} ({len(moved)} cases; target <= 1 %)")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
