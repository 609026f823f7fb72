"""Where the agent's memory goes (issue 14): a breakdown, not a benchmark.

    .venv/bin/python bench/footprint.py [--source kubernetes|file] [--size 10000]
        [--restart] [--stages] [--trace] [--out bench/results/footprint-kube-10k.json]

Runs the cold start bench/incremental.py runs (the same agent, source and
in-memory maps; with --restart, maps that already hold the state, as a
restarted agent finds them pinned: a first cold start in a child process
fills them, and the agent reads them back through LBMaps.read() from
packed entries, as bcc hands out pinned maps' entries), then reports:

- rss and glibc's own view (mallinfo2): bytes in use by malloc, free bytes
  held in its arenas (fragmentation: RSS that no live object uses), and
  bytes in mmapped blocks; the same after malloc_trim(0), right after;
- live bytes per root: each part of the agent walked with gc.get_referents
  (sys.getsizeof of every object reached, each object counted once, in the
  order listed: a later root is charged only for what it does not share
  with an earlier one);
- object counts by type (the biggest);
- with --stages, the allocators' accounts around the source's full build
  and the LB sync (the arenas' high-water mark after the build is its peak);
- with --trace, tracemalloc's top lines at the end of the start (tracing
  slows the start several times and costs its own memory: compare its
  lines with each other, not its total with RSS).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import pickle
import sys
import time
import tracemalloc
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "bench")]

import incremental as inc  # noqa: E402  (sets sys.path for meshbpf and the fakes)
from meshbpf.datapath import maps as lbmaps  # noqa: E402
from meshbpf.datapath.layout import BY_ROLE, CODECS  # noqa: E402
from meshbpf.reconcile import LBState  # noqa: E402


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost")]


def malloc_view() -> dict:
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "mallinfo2"):
        return {}
    libc.mallinfo2.restype = _Mallinfo2
    m = libc.mallinfo2()
    mb = 2 ** 20
    return {"rss_mb": round(inc.rss_mb(), 1), **pymalloc_view(), "malloc_in_use_mb": round(m.uordblks / mb, 1),
            "malloc_free_in_arenas_mb": round(m.fordblks / mb, 1),
            "malloc_mmapped_mb": round(m.hblkhd / mb, 1)}


def pymalloc_view() -> dict:
    """CPython's small-object allocator (objects up to 512 bytes: nearly
    all of the state) as sys._debugmallocstats() prints it: bytes in live
    blocks, and bytes its arenas hold but no object uses (free blocks and
    empty pools: fragmentation, since an arena goes back to the system
    only when wholly empty)."""
    import os
    import re
    import tempfile
    with tempfile.TemporaryFile("w+") as f:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(f.fileno(), 2)
        try:
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        f.seek(0)
        text = f.read()

    def field(name: str) -> int:
        m = re.search(r"# " + name + r"\s*=\s*([\d,]+)", text)
        return int(m.group(1).replace(",", "")) if m else 0
    m = re.search(r"(\d+) unused pools \* (\d+) bytes", text)
    unused = int(m.group(1)) * int(m.group(2)) if m else 0
    mb = 2 ** 20
    return {"pymalloc_in_use_mb": round(field("bytes in allocated blocks") / mb, 1),
            "pymalloc_free_blocks_mb": round(field("bytes in available blocks") / mb, 1),
            "pymalloc_unused_pools_mb": round(unused / mb, 1),
            "pymalloc_arenas": field("arenas allocated current"),
            "pymalloc_arenas_highwater": field("arenas highwater mark")}


def deep_sizes(roots: list[tuple[str, object]]) -> dict:
    """Bytes reachable from each root, each object charged to the first root
    that reaches it. Modules, classes and functions are not walked."""
    seen: set[int] = set()
    stop = (type, type(sys), type(deep_sizes), type(len))
    out = {}
    for name, root in roots:
        total, count = 0, 0
        stack = [root]
        while stack:
            obj = stack.pop()
            if id(obj) in seen or isinstance(obj, stop):
                continue
            seen.add(id(obj))
            total += sys.getsizeof(obj)
            count += 1
            stack.extend(gc.get_referents(obj))
        out[name] = {"mb": round(total / 2 ** 20, 1), "objects": count}
    return out


def type_counts(limit: int = 20) -> list:
    """The most numerous objects the collector tracks (str, int, bytes and
    atom-only tuples are untracked: see deep_sizes for those)."""
    gc.unfreeze()  # frozen objects are not listed (the agent freezes its state)
    counts = Counter(type(o).__name__ for o in gc.get_objects())
    return counts.most_common(limit)


def roots(agent, maps) -> list[tuple[str, object]]:
    lb, source = agent.lbsync, agent.source
    parts = [("desired state (ServicePorts, Endpoints, Frontends, addresses)", agent.desired),
             ("maps' mirror (lbsync.current)", lb.current),
             ("bench's stand-in for the maps (MemoryMaps.state)", maps.state),
             # As held: derived on demand where only its desired state is kept.
             ("lbsync.programmed (WantedService per frontend)",
              vars(lb).get("_programmed", vars(lb).get("programmed"))),
             ("mirror's index (LBIndex)", lb.index),
             ("north-south sets (exposed, external, claimed)", (lb.exposed, lb.external, lb.claimed))]
    index = getattr(source, "_index", None)
    services = getattr(index, "services", None)  # the file source's FileIndex holds its ServiceIndex
    services = services if services is not None and not isinstance(services, dict) else index
    if services is not None:  # the ServiceIndex over the objects' held text
        parts.append(("source: ServiceIndex (ports_of, owner, slices_of, ...)",
                      {k: v for k, v in vars(services).items() if k not in ("state", "services", "slices")}))
        parts.append(("source: objects held (compact JSON text)", (services.services, services.slices)))
    if hasattr(source, "reflectors"):
        parts.append(("source: reflectors", source.reflectors))
    else:
        if services is not None and services is not index:
            parts.append(("source: the files' records (digests and keys per piece)", index.records))
        parts.append(("source (file): the rest", vars(source)))
    from meshbpf.sources import kube_objects
    parts.append(("address cache (kube_objects._parse_packed)", _lru_contents(kube_objects._parse_packed)))
    return parts


def _lru_contents(cached) -> list:
    """What an lru_cache holds is not reachable by gc.get_referents; its
    entries are its keys' results, re-read from the cache itself."""
    info = cached.cache_info()
    if not info.currsize:
        return []
    # The cache's linked list is internal: count a fresh entry's cost per entry instead.
    return [info.currsize]


def watch_stages(stages: list) -> None:
    """Records malloc_view() before and after the cold start's two big steps."""
    from meshbpf.sources.kubernetes import KubernetesSource
    from meshbpf.sources.yaml_file import FileSource
    from meshbpf.sync.lb import LBSync

    def around(cls: type, name: str, label: str) -> None:
        real = getattr(cls, name)

        def wrapped(*args, **kwargs):
            stages.append((f"{label} <", malloc_view()))
            try:
                return real(*args, **kwargs)
            finally:
                stages.append((f"{label} >", malloc_view()))
        setattr(cls, name, wrapped)
    around(KubernetesSource, "build", "source build")
    around(FileSource, "poll", "source poll")
    around(LBSync, "sync", "LB sync")


class PackedTable:
    """A map's entries as the kernel holds them, handed out the way bcc's
    batch lookup does (one ctypes array of keys and one of values, an
    object per element), so LBMaps.read() makes the objects, and leaves the
    holes, that a read of pinned maps makes."""

    def __init__(self, role: str, entries: dict):
        spec, (_, key_into, _, val_into) = BY_ROLE[role], CODECS[role]
        self.keys = lbmaps._array(spec.key, key_into, (role, "key"), list(entries))
        self.values = lbmaps._array(spec.value, val_into, (role, "value"), list(entries.values()))

    def items_lookup_batch(self):
        keys, values = self.keys, self.values
        for i in range(len(keys)):
            yield keys[i], values[i]


def read_as_pinned(saved: Path) -> LBState:
    """What a restarted agent's LBMaps.read() makes of maps holding the
    LBState pickled in `saved` (loaded, packed and dropped first: the
    kernel holds the maps, not the agent)."""
    with saved.open("rb") as f:
        state = pickle.load(f)
    tables = {role: PackedTable(role, getattr(state, role)) for role in BY_ROLE}
    del state
    return lbmaps.LBMaps(tables, {}).read()


def run(source_kind: str, n: int, trace: bool, maps_from: Path | None = None,
        save_maps: Path | None = None, stages: list | None = None) -> dict:
    import tempfile
    if stages is not None:
        watch_stages(stages)
    if trace:
        tracemalloc.start(1)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        api = None
        if source_kind == "kubernetes":
            api = inc.APIServerProcess(n)
            source = inc.KubernetesSource(kubeconfig=str(api.kubeconfig(tmp / "kubeconfig")),
                                          node_name="node-a")
        else:
            folder = tmp / "files"
            folder.mkdir()
            inc.write_in_child(folder / "services.json", n, "json", -1)
            source = inc.FileSource(folder, "node-a", settle_s=0)
        gc.collect()
        rss0 = inc.rss_mb()
        t, cpu = time.monotonic(), time.process_time()
        agent, maps, _ = inc.make_agent(source, n)
        if maps_from is not None:
            maps.state = read_as_pinned(maps_from)
            agent.lbsync.current = maps.read()  # what LBSync.start() reads at an agent's start
        if source_kind == "kubernetes":
            loop = inc.LoopThread(agent)
            while not agent.ready():
                time.sleep(0.01)
            loop.stop()
        else:
            agent.step()
        out: dict = {"source": source_kind, "services": n, "cold_start_s": round(time.monotonic() - t, 1),
                     "cold_start_cpu_s": round(time.process_time() - cpu, 1),
                     "restart": maps_from is not None, "maps_written": maps.writes,
                     **({"stages": stages} if stages is not None else {}),
                     "rss_before_mb": round(rss0, 1), "after_start": malloc_view()}
        if save_maps is not None:
            with save_maps.open("wb") as f:
                pickle.dump(maps.state, f, protocol=pickle.HIGHEST_PROTOCOL)
        libc = ctypes.CDLL(None)
        t = time.monotonic()
        libc.malloc_trim(0)  # glibc's free pages back to the system: does it help?
        out["after_malloc_trim"] = {**malloc_view(), "took_ms": round((time.monotonic() - t) * 1000, 1)}
        if trace:
            snap = tracemalloc.take_snapshot()
            tracemalloc.stop()
            out["tracemalloc_top_lines"] = [
                (str(s.traceback[0]), round(s.size / 2 ** 20, 1), s.count)
                for s in snap.statistics("lineno")[:30]]
            del snap
        out["live_by_root"] = deep_sizes(roots(agent, maps))
        out["lru_address_cache_entries"] = inc_cache_entries()
        out["types"] = type_counts()
        if api is not None:
            source.stop()
            api.stop()
    return out


def inc_cache_entries() -> int:
    from meshbpf.sources import kube_objects
    return kube_objects._parse_packed.cache_info().currsize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", choices=("kubernetes", "file"), default="kubernetes")
    ap.add_argument("--size", type=int, default=10_000)
    ap.add_argument("--trace", action="store_true")
    ap.add_argument("--stages", action="store_true",
                    help="the allocators' accounts around the source's build and the LB sync")
    ap.add_argument("--restart", action="store_true",
                    help="start over maps that already hold the state (filled by a child's cold start)")
    ap.add_argument("--save-maps", type=Path, help=argparse.SUPPRESS)  # the child's side of --restart
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.restart:
        import subprocess
        import tempfile
        with tempfile.TemporaryDirectory() as d:
            saved = Path(d) / "maps.pickle"
            subprocess.run([sys.executable, __file__, "--source", args.source, "--size", str(args.size),
                            "--save-maps", str(saved)], check=True, stdout=subprocess.DEVNULL)
            out = run(args.source, args.size, args.trace, maps_from=saved,
                      stages=[] if args.stages else None)
    else:
        out = run(args.source, args.size, args.trace, save_maps=args.save_maps,
                  stages=[] if args.stages else None)
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
