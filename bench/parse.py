"""YAML against JSON for one large kubectl dump: how long the file source's
reader takes to parse each form of the same objects, side by side.

    .venv/bin/python bench/parse.py [--rounds 3]

The objects are those of tests/unit/test_scale.py (`kubectl get
svc,endpointslices -A -o yaml` of 10 000 Services, 4 endpoints each);
the JSON form is the same List serialised with json.dumps. Prints the
median seconds of each and the ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "unit"))

from meshbpf.sources import yaml_load  # noqa: E402
from test_scale import SERVICES, kubectl_yaml  # noqa: E402


def median_seconds(text: str, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        yaml_load.load_all(text)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    as_yaml = kubectl_yaml()
    docs = yaml_load.load_all(as_yaml)
    as_json = json.dumps(docs[0] if len(docs) == 1 else docs)
    y, j = median_seconds(as_yaml, args.rounds), median_seconds(as_json, args.rounds)
    print(f"{SERVICES} Services: YAML {len(as_yaml) / 1e6:.1f} MB {y:.2f} s, "
          f"JSON {len(as_json) / 1e6:.1f} MB {j:.2f} s, YAML/JSON {y / j:.0f}x "
          f"(median of {args.rounds}; load average {open('/proc/loadavg').read().split()[0]})")


if __name__ == "__main__":
    main()
