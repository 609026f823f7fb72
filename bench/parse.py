"""YAML against JSON for one large kubectl dump: how long the file source's
reader takes to parse each form of the same objects, side by side, and
how long the file takes to become a map plan.

    .venv/bin/python bench/parse.py [--rounds 3] [--maps]

The objects are those of tests/unit/test_scale.py (`kubectl get
svc,endpointslices -A -o yaml` of 10 000 Services, 4 endpoints each);
the JSON form is the same List serialised with json.dumps. Columns:

- YAML, fast path: yaml_load.load_all, which reads kubectl's YAML with
  sources/yaml_fast.py (libyaml for anything outside that subset);
- YAML, libyaml: the same text through libyaml only (load_all_libyaml);
- JSON: the json module (load_all's JSON path).

Then "file -> plan": read_config of the file (read, parse, validate, build
the desired state), wanted_services and plan against empty maps, for each
form. With --maps (root, compiles the programs with bcc): file -> maps,
what the agent does on a config change (read_config, plan against the
maps, batch writes) into real maps pinned under
/sys/fs/bpf/meshbpf-bench-parse-<pid>, emptied between rounds and removed
at the end; no program is attached. Parsing runs with the garbage collector
paused, as read_config does. Medians (libyaml alone is timed once: it
takes about 20 s); no timing is asserted anywhere.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "unit"))

from meshbpf.reconcile import LBState, plan, wanted_services  # noqa: E402
from meshbpf.sources import yaml_load  # noqa: E402
from meshbpf.sources.yaml_file import read_config  # noqa: E402
from test_scale import SERVICES, kubectl_yaml  # noqa: E402


def median_seconds(work: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        gc.collect()
        gc.disable()
        try:
            started = time.perf_counter()
            work()
            times.append(time.perf_counter() - started)
        finally:
            gc.enable()
    return statistics.median(times)


def file_to_plan(path: Path) -> None:
    desired = read_config(path).state
    plan(LBState(), wanted_services(desired))


def file_to_maps(paths: dict[str, Path], rounds: int) -> dict[str, list[float]]:
    """Seconds of read_config + plan + apply into real maps, per form."""
    from meshbpf.datapath.loader import SockLB, uninstall
    from meshbpf.datapath.maps import LBMaps
    from meshbpf.reconcile import check_capacity

    bpffs = Path(f"/sys/fs/bpf/meshbpf-bench-parse-{os.getpid()}")
    lb = SockLB(bpffs=bpffs)
    times: dict[str, list[float]] = {form: [] for form in paths}
    try:
        lb.compile()
        maps = LBMaps.from_socklb(lb)
        for _ in range(rounds):
            for form, path in paths.items():
                started = time.perf_counter()
                desired = read_config(path).state
                current = maps.read()
                writes = plan(current, wanted_services(desired))
                check_capacity(current, writes, maps.capacity)
                maps.apply(writes)
                times[form].append(time.perf_counter() - started)
                maps.apply(plan(maps.read(), {}))  # empty again for the next one
    finally:
        uninstall(bpffs)
        if lb.bpf is not None:
            lb.bpf.cleanup()
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--maps", action="store_true", help="also file -> real maps (root, bcc)")
    args = ap.parse_args()
    as_yaml = kubectl_yaml()
    docs = yaml_load.load_all_libyaml(as_yaml)
    assert yaml_load.load_all(as_yaml) == docs  # the fast path's answer is libyaml's
    as_json = json.dumps(docs[0] if len(docs) == 1 else docs)
    fast = median_seconds(lambda: yaml_load.load_all(as_yaml), args.rounds)
    slow = median_seconds(lambda: yaml_load.load_all_libyaml(as_yaml), 1)  # ~20 s: once
    js = median_seconds(lambda: yaml_load.load_all(as_json), args.rounds)
    print(f"{SERVICES} Services, parse (YAML {len(as_yaml) / 1e6:.1f} MB, "
          f"JSON {len(as_json) / 1e6:.1f} MB):")
    print(f"  YAML, fast path {fast:.2f} s | YAML, libyaml {slow:.2f} s | JSON {js:.2f} s | "
          f"fast/JSON {fast / js:.1f}x, libyaml/fast {slow / fast:.0f}x")
    with tempfile.TemporaryDirectory() as tmp:
        yaml_file, json_file = Path(tmp, "cluster.yaml"), Path(tmp, "cluster.json")
        yaml_file.write_text(as_yaml)
        json_file.write_text(as_json)
        y = median_seconds(lambda: file_to_plan(yaml_file), args.rounds)
        j = median_seconds(lambda: file_to_plan(json_file), args.rounds)
        print(f"  file -> plan: YAML {y:.2f} s | JSON {j:.2f} s | YAML/JSON {y / j:.1f}x")
        if args.maps:
            runs = file_to_maps({"YAML": yaml_file, "JSON": json_file}, args.rounds)
            y, j = (statistics.median(runs[form]) for form in ("YAML", "JSON"))
            print(f"  file -> maps: YAML {y:.2f} s | JSON {j:.2f} s | YAML/JSON {y / j:.1f}x "
                  f"(all runs: " + ", ".join(f"{form} " + " ".join(f"{t:.2f}" for t in ts)
                                            for form, ts in runs.items()) + ")")
    print(f"  (median of {args.rounds}; load average {open('/proc/loadavg').read().split()[0]}, "
          f"{len(open('/proc/cpuinfo').read().split('processor')) - 1} CPUs)")


if __name__ == "__main__":
    main()
