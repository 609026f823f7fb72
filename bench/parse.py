"""YAML against JSON for one large kubectl dump: how long the file source's
reader takes to parse each form of the same objects, side by side, and
how long the file takes to become a map plan.

    .venv/bin/python bench/parse.py [--rounds 3] [--maps | --maps-only]

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
one config change as the agent's step takes it (FileSource.poll, then
LBSync.sync: plan, capacity check, batch writes, with the garbage
collector paused around both as agent.Agent.step does) into real maps
pinned under /sys/fs/bpf/meshbpf-bench-parse-<pid>, emptied between rounds
and removed at the end; no program is attached. It prints the time to the
last map write, the whole step (which goes on with the sync's own index
and freeze_heap after the writes), and the seconds of each stage, timed by
wrapping the agent's functions for the run. --maps-only skips the other
columns. Medians (libyaml alone is timed once: it takes about 20 s); no
timing is asserted anywhere.
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


class Stages:
    """Seconds spent in named functions of the agent's modules, timed by
    wrapping them in place for one run (`wrap`), and when the last map
    write ended."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.seconds: dict[str, float] = {}
        self.last_write_end = 0.0
        self._undo: list[tuple[object, str, object]] = []

    def wrap(self, owner: object, name: str, label: str, write: bool = False) -> None:
        inner = getattr(owner, name, None)
        if inner is None:
            return  # not in this version of the code

        def timed(*args, **kwargs):
            started = self.clock()
            try:
                return inner(*args, **kwargs)
            finally:
                ended = self.clock()
                self.seconds[label] = self.seconds.get(label, 0.0) + ended - started
                if write:
                    self.last_write_end = ended
        self._undo.append((owner, name, inner))
        setattr(owner, name, timed)

    def unwrap(self) -> None:
        for owner, name, inner in reversed(self._undo):
            setattr(owner, name, inner)
        self._undo.clear()


STAGES = ("parse", "build", "file index", "wanted", "plan", "capacity", "write",
          "LB index", "freeze")


def agent_file_to_maps(path: Path, maps, clock: Callable[[], float] = time.perf_counter
                       ) -> dict[str, float]:
    """One config change as the agent's step takes it (agent.Agent.step):
    FileSource.poll (read_config and the incremental index) then
    LBSync.sync (plan, capacity, writes, then its own index and
    freeze_heap), with the collector paused around both. Seconds per
    stage, "to maps" (poll start to the last map write's end) and "step"."""
    from meshbpf import gcpause
    from meshbpf.metrics import AgentMetrics
    from meshbpf.sources import yaml_file
    from meshbpf.sources.yaml_file import FileSource
    from meshbpf.sync import lb as lbsync

    stages = Stages(clock)
    stages.wrap(yaml_file, "parse_documents", "parse")
    stages.wrap(yaml_file, "read_config", "read_config")
    stages.wrap(yaml_file, "FileIndex", "file index")
    for name, label in (("wanted_services", "wanted"), ("plan", "plan"),
                        ("check_capacity", "capacity"), ("LBIndex", "LB index"),
                        ("freeze_heap", "freeze")):
        stages.wrap(lbsync, name, label)
    stages.wrap(maps, "apply", "write", write=True)
    source = FileSource(path, settle_s=0)
    sync = lbsync.LBSync(AgentMetrics(), lambda *args: None)
    sync.start(maps)
    gc.collect()
    try:
        with gcpause.gc_paused():
            started = clock()
            desired = source.poll()
            assert desired is not None and sync.sync(desired)
            ended = clock()
    finally:
        stages.unwrap()
        gc.unfreeze()  # freeze_heap's: the next round starts from the same heap
    out = dict(stages.seconds)
    out["build"] = out.pop("read_config") - out["parse"]
    out["to maps"] = stages.last_write_end - started
    out["step"] = ended - started
    return out


def file_to_maps(paths: dict[str, Path], rounds: int, clock: Callable[[], float] = time.perf_counter
                 ) -> dict[str, list[dict[str, float]]]:
    """agent_file_to_maps into real maps, per form, each round from empty maps."""
    from meshbpf.datapath.loader import SockLB, uninstall
    from meshbpf.datapath.maps import LBMaps

    bpffs = Path(f"/sys/fs/bpf/meshbpf-bench-parse-{os.getpid()}")
    lb = SockLB(bpffs=bpffs)
    runs: dict[str, list[dict[str, float]]] = {form: [] for form in paths}
    try:
        lb.compile()
        maps = LBMaps.from_socklb(lb)
        for _ in range(rounds):
            for form, path in paths.items():
                runs[form].append(agent_file_to_maps(path, maps, clock))
                maps.apply(plan(maps.read(), {}))  # empty again for the next one
    finally:
        uninstall(bpffs)
        if lb.bpf is not None:
            lb.bpf.cleanup()
    return runs


def print_maps(runs: dict[str, list[dict[str, float]]], cpu: bool = False) -> None:
    unit = " (CPU)" if cpu else ""
    for form, rows in runs.items():
        med = {k: statistics.median(r.get(k, 0.0) for r in rows) for k in rows[0]}
        parts = " + ".join(f"{k} {med.get(k, 0.0):.3f}" for k in STAGES if k in med)
        print(f"  file -> maps, {form}: {med['to maps']:.2f} s{unit} to the last map write "
              f"(step {med['step']:.2f} s; all runs " +
              " ".join(f"{r['to maps']:.2f}" for r in rows) + ")")
        print(f"    stages: {parts}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--maps", action="store_true", help="also file -> real maps (root, bcc)")
    ap.add_argument("--maps-only", action="store_true",
                    help="file -> real maps only (skips the parse and plan columns)")
    ap.add_argument("--cpu", action="store_true",
                    help="file -> maps in this process's CPU seconds (user + system), not wall "
                         "clock: less swayed by other load, to compare code versions on a busy machine")
    args = ap.parse_args()
    clock = time.process_time if args.cpu else time.perf_counter
    as_yaml = kubectl_yaml()
    if args.maps_only:
        docs = yaml_load.load_all(as_yaml)
        with tempfile.TemporaryDirectory() as tmp:
            paths = {"YAML": Path(tmp, "cluster.yaml"), "JSON": Path(tmp, "cluster.json")}
            paths["YAML"].write_text(as_yaml)
            paths["JSON"].write_text(json.dumps(docs[0]))
            del docs
            print(f"{SERVICES} Services:")
            print_maps(file_to_maps(paths, args.rounds, clock), args.cpu)
        print(f"  (median of {args.rounds}; load average {open('/proc/loadavg').read().split()[0]})")
        return
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
            print_maps(file_to_maps({"YAML": yaml_file, "JSON": json_file}, args.rounds, clock), args.cpu)
    print(f"  (median of {args.rounds}; load average {open('/proc/loadavg').read().split()[0]}, "
          f"{len(open('/proc/cpuinfo').read().split('processor')) - 1} CPUs)")


if __name__ == "__main__":
    main()
