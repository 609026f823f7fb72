"""Where meshbpf's time goes for one NetworkPolicy edit, and for programming
the whole cluster: the agent's own stages, in-process, on the benchmark's
cluster (bench/policy_cluster.py), no root and no maps.

    .venv/bin/python bench/policy_profile.py [--pods 5000] [--policies 100] [--edits 3]

Stages, as meshbpf/sync/policy.py runs them after the file source hands
over a new state: read (the file source re-reads the changed file, with
its cache, and rebuilds the desired state), compile (PolicyCompiler: the
local pods whose inputs changed), plan (plan_policy against the state the
agent holds), as the agent runs them (one PolicyCompiler kept across
edits, the garbage collector paused). The map writes and the tc attach are not here; the
benchmark's edit time also holds the folder poll (up to 0.2 s).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import policy_cluster as world
from meshbpf.gcpause import gc_paused
from meshbpf.policy.compile import PolicyCompiler
from meshbpf.reconcile.policy import plan_policy
from meshbpf.reconcile.policy_keys import PolicyState
from meshbpf.sources.yaml_file import read_config


def fake_lab_pods() -> dict:
    return {f"{world.NAMESPACE}/{n}": SimpleNamespace(ipv4=ipaddress.ip_address(f"10.244.0.{i}"),
                                                       ipv6=ipaddress.ip_address(f"fd00:244::{i}"), uid=f"uid-{n}")
            for i, n in enumerate(("srv", "cli", "srv-twin", "cli-twin"), start=2)}


def write(folder: Path, name: str, items: list[dict]) -> None:
    tmp = folder / f".{name}.tmp"
    tmp.write_text(json.dumps(world.as_list(items)))
    os.rename(tmp, folder / name)


def stages(folder: Path, cache: dict, previous, current: PolicyState, compiler: PolicyCompiler):
    with gc_paused():   # as the agent runs its step
        return _stages(folder, cache, previous, current, compiler)


def _stages(folder: Path, cache: dict, previous, current: PolicyState, compiler: PolicyCompiler):
    t0 = time.perf_counter()
    desired = read_config(folder, node_name=world.NODE, cache=cache, previous=previous).state
    t1 = time.perf_counter()
    compiled = compiler.compile(desired.pods, desired.namespaces, desired.network_policies,
                                world.NODE, {world.NODE: []})
    t2 = time.perf_counter()
    found = {key: i + 1 for i, key in enumerate(sorted(compiled.pods))}
    p = plan_policy(current, compiled, found, [])
    t3 = time.perf_counter()
    return desired, p.apply_to(current), {"read_s": t1 - t0, "compile_s": t2 - t1, "plan_s": t3 - t2,
                                          "writes": p.writes}


def edit_profile(cluster: list[dict], base: list[dict], edits: int) -> list[dict]:
    """The agent's stages for a first sync, then for `edits` flips of zz-allow-client."""
    folder = Path(tempfile.mkdtemp(prefix="polprofile-"))
    try:
        write(folder, "cluster.json", cluster)
        write(folder, "policies.json", base)
        write(folder, "zz-edit.json", [world.allow_client()])
        cache: dict = {}
        compiler = PolicyCompiler()   # one per agent, as meshbpf/sync/policy.py keeps it
        desired, current, first = stages(folder, cache, None, PolicyState(), compiler)
        out = [{"what": "first sync", **first}]
        for i in range(edits):
            write(folder, "zz-edit.json", [world.deny_client() if i % 2 == 0 else world.allow_client()])
            desired, current, one = stages(folder, cache, desired, current, compiler)
            out.append({"what": f"edit {i + 1}", **one})
        return out
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pods", type=int, default=5000)
    ap.add_argument("--policies", type=int, default=100, help="policies selecting the server")
    ap.add_argument("--edits", type=int, default=3)
    args = ap.parse_args()
    cluster = world.namespaces() + world.lab_pods(fake_lab_pods()) + world.remote_pods(args.pods - 4)
    base = world.selecting_policies(args.policies)[:-1] + world.background_policies(1)
    for row in edit_profile(cluster, base, args.edits):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
