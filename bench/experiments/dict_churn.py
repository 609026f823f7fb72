"""How a CPython dict's size moves under delete-and-insert churn (README,
issue 14's hour of churn): N live keys, each step deletes the oldest key
and inserts a new one, as an endpoint moved to a never-seen address does
to dicts keyed by backend. Prints each step at which the dict's size
changes.

    python3 bench/experiments/dict_churn.py [--live 400000] [--steps 1500000]
"""

from __future__ import annotations

import argparse
import sys


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--live", type=int, default=400_000)
    ap.add_argument("--steps", type=int, default=1_500_000)
    args = ap.parse_args()
    d = {i: i for i in range(args.live)}
    size = sys.getsizeof(d)
    print(f"start: {args.live} keys, {size / 2**20:.1f} MB")
    oldest, new = 0, args.live
    for step in range(1, args.steps + 1):
        del d[oldest]
        d[new] = new
        oldest, new = oldest + 1, new + 1
        if sys.getsizeof(d) != size:
            size = sys.getsizeof(d)
            print(f"step {step}: {size / 2**20:.1f} MB")
    print(f"end: {len(d)} keys, {size / 2**20:.1f} MB")


if __name__ == "__main__":
    main()
