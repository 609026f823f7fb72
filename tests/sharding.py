"""Dealing one kernel's test files out to the VMs that share its run
(``--shard I/N``, tests/vm/matrix).

Whole files, not single tests: most of a kernel test file's time under TCG is
its module fixtures (an agent compiling its programs, a lab), which every VM
holding one of the file's tests would pay again. Files are dealt longest
first, each to the least loaded share (LPT), by the seconds the last saved
run of that kernel spent in them (``file_seconds`` of
tests/vm/results/<series>.json, written by tests/vm/collect); a file the
record lacks is reckoned at DEFAULT_TEST_SECONDS per test that runs.
"""

from __future__ import annotations

import json
from pathlib import Path

DEFAULT_TEST_SECONDS = 10.0  # a kernel test under TCG, setup included, roughly


def file_weights(path: str | None) -> dict[str, float]:
    """file -> seconds from a result.json (empty if none or unreadable)."""
    if not path:
        return {}
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    found = data.get("file_seconds") if isinstance(data, dict) else None
    return {f: float(t) for f, t in found.items()} if isinstance(found, dict) else {}


def deal(running: dict[str, int], weights: dict[str, float], shares: int) -> list[set[str]]:
    """Each share's files. running: file -> how many of its tests run here
    (0: all skipped, which costs nothing)."""
    def cost(f: str) -> float:
        if not running[f]:
            return 0.0
        return weights.get(f, DEFAULT_TEST_SECONDS * running[f])
    load = [0.0] * shares
    out: list[set[str]] = [set() for _ in range(shares)]
    for f in sorted(running, key=lambda f: (-cost(f), f)):
        k = min(range(shares), key=lambda k: (load[k], k))
        load[k] += cost(f)
        out[k].add(f)
    return out
