"""Waiting on, and reading, what the agent programmed."""

from __future__ import annotations

import re
import time
from pathlib import Path

from meshbpf.cli.inspect_cmd import services_view
from meshbpf.datapath.maps import read_pinned


def services(bpffs: Path) -> dict[str, list[str]]:
    """frontend -> backend addresses, straight from the pinned maps.

    The maps are read one after another, so a read racing an update can see
    a slot whose backend is already gone; it shows as "missing"."""
    state, _ = read_pinned(bpffs)
    return {s["frontend"]: sorted(b["address"] or "missing" for b in s["backends"])
            for s in services_view(state)}


def wait_backends(bpffs: Path, frontend: str, expected: list[str], timeout: float = 5.0) -> float:
    """Waits until `frontend` has exactly these backends; returns seconds waited."""
    start = time.monotonic()
    while True:
        current = services(bpffs).get(frontend)
        if current == sorted(expected):
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{frontend}: backends {current}, expected {sorted(expected)}")
        time.sleep(0.02)


def metric(text: str, name: str, labels: str = "") -> float | None:
    """One sample from Prometheus text output."""
    pattern = re.escape(name) + (re.escape("{" + labels + "}") if labels else r"(?:\{\})?") + r" (\S+)"
    m = re.search(r"^" + pattern + r"$", text, re.MULTILINE)
    return float(m.group(1)) if m else None


def wait_log(agent, needle: str, timeout: float = 5.0) -> str:
    start = time.monotonic()
    while needle not in agent.log():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"agent log lacks {needle!r}:\n{agent.log()}")
        time.sleep(0.05)
    return agent.log()
