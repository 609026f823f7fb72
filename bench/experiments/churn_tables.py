"""Which of the agent's big tables grow under endpoint churn (README, issue
14's hour of churn): the Kubernetes source and the agent as
bench/incremental.py runs them, events sent as fast as the agent programs
them (not 100 per second), each moving one endpoint of a Service to a
never-seen address. Prints every container of 40 000 entries or more (--big)
reachable from the agent, its source and the bench's stand-in for the maps,
then, every --every events, those whose size changed and the RSS.

    .venv/bin/python bench/experiments/churn_tables.py [--services 100000] [--events 340000] [--every 20000]
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import incremental as inc  # noqa: E402

ATOMS = (str, bytes, int, float, bool, type(None), type)
CONTAINERS = (dict, set, frozenset, list, tuple, collections.deque)


def big_tables(roots: dict[str, object], big: int) -> dict[int, tuple[str, str, int, int]]:
    """id -> (path, type, entries, bytes) of each big container reachable
    from `roots` through attributes, slots and small containers."""
    found: dict[int, tuple[str, str, int, int]] = {}
    seen: set[int] = set()
    stack = list(roots.items())
    while stack:
        path, obj = stack.pop()
        if isinstance(obj, ATOMS) or id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, CONTAINERS):
            if len(obj) >= big:
                found[id(obj)] = (path, type(obj).__name__, len(obj), sys.getsizeof(obj))
            elif len(obj) <= 200:
                pairs = obj.items() if isinstance(obj, dict) else enumerate(obj)
                stack.extend((f"{path}[{str(k)[:20]}]", v) for k, v in pairs)
            continue
        stack.extend((f"{path}.{k}", v) for k, v in (getattr(obj, "__dict__", None) or {}).items())
        for cls in type(obj).__mro__:
            slots = cls.__dict__.get("__slots__", ())
            for name in (slots,) if isinstance(slots, str) else slots:
                if hasattr(obj, name):
                    stack.append((f"{path}.{name}", getattr(obj, name)))
    return found


def show(tag: str, table: tuple[str, str, int, int], before: int | None = None) -> None:
    path, kind, entries, size = table
    was = "" if before is None else f"{before / 2**20:6.1f} -> "
    print(f"  {tag:4} {kind:5} {entries:7} entries {was}{size / 2**20:6.1f} MB  {path}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--services", type=int, default=100_000)
    ap.add_argument("--events", type=int, default=340_000)
    ap.add_argument("--every", type=int, default=20_000)
    ap.add_argument("--big", type=int, default=40_000, help="the fewest entries shown")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        api = inc.APIServerProcess(args.services)
        source = inc.KubernetesSource(kubeconfig=str(api.kubeconfig(Path(tmp) / "kubeconfig")),
                                      node_name="node-a")
        agent, maps, programmed = inc.make_agent(source, args.services)
        loop = inc.LoopThread(agent)
        while not agent.ready():
            time.sleep(0.01)
        roots = {"agent": agent, "source": source, "maps": maps}
        tables = big_tables(roots, args.big)
        print(f"ready: RSS {inc.rss_mb():.1f} MB")
        for table in tables.values():
            show("", table)
        programmed.clear()
        sent = done = 0
        started = time.monotonic()
        while sent < args.events:
            for _ in range(args.every):
                api.move((sent * 104729) % args.services, sent)
                sent += 1
                while done + len(programmed) < sent - 200:  # a bounded backlog
                    time.sleep(0.001)
            while done + len(programmed) < sent:
                time.sleep(0.01)
            done += len(programmed)
            programmed.clear()
            now = big_tables(roots, args.big)
            print(f"{sent} events, {time.monotonic() - started:.0f} s: RSS {inc.rss_mb():.1f} MB")
            for key, table in now.items():
                old = tables.get(key)
                if old is None:
                    show("new", table)  # a table replaced by another (the overlay's base)
                elif old[3] != table[3]:
                    show("grew" if table[3] > old[3] else "fell", table, old[3])
            tables = now
        loop.stop()
        source.stop()
        api.stop()


if __name__ == "__main__":
    main()
