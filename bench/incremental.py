"""Incremental sync at scale (issue 14): cost per change, flat in N.

    .venv/bin/python bench/incremental.py [--sizes 10000,100000] [--events 200]
        [--churn-seconds 20] [--out bench/results/incremental.json]

No root, no BPF: the agent runs its real loop (source -> delta -> planner)
over an in-memory stand-in for the maps (`MemoryMaps`), so what is timed is
the userspace path a change takes; a map write itself is one batch syscall
of a few entries on top (microseconds). Services have 4 endpoints each.

- kubernetes: the fake API server (tests/unit/fake_apiserver.py), in a
  child process, holds N Services and their EndpointSlices; the Kubernetes
  source lists and watches it over HTTP. Each event is an EndpointSlice update stamped with
  endpoints.kubernetes.io/last-change-trigger-time = now (RFC3339Nano); the
  latency is the agent's own meshbpf_network_programming_duration_seconds
  observation: trigger time to maps written, as kube-proxy measures it.
- churn: 100 EndpointSlice updates per second at 10 000 Services (up to
  --churn-max-size); the CPU time of the agent's threads (loop + watch
  threads, from /proc, the fake server's threads excluded) over wall time;
  every update must land; the agent's RSS every --rss-every seconds (an
  hour: --churn-seconds 3600), to show it does not grow.
- file: one folder with one N-Service file (JSON, and YAML at 10 000) plus
  a small file; time from the edit to maps written (poll + sync), for an
  endpoint moved in the big file and a Service added in a small file.
- rss: the agent process's RSS after the file source's cold start, and
  after the edits; with the Kubernetes source, after its cold start and
  after the events and churn (bcc/LLVM excluded: see README, "Footprint";
  the in-memory stand-in for the maps is included: in a real agent that
  copy lives in the kernel; maps_stand_in_mb says what it adds).
- the periodic full resync's cost (read + full plan) is reported apart.

Figures depend on the machine; the JSON records the load average.
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "unit")]

import fake_apiserver  # noqa: E402
from fake_apiserver import FakeAPIServer  # noqa: E402
from k8s_builders import endpoint_slice, ep, service  # noqa: E402
from meshbpf.agent import Agent, AgentOptions  # noqa: E402
from meshbpf.gcpause import gc_paused  # noqa: E402
from meshbpf.reconcile import LBState, Plan, plan, wanted_services  # noqa: E402
from meshbpf.reconcile.compact import DeleteCount  # noqa: E402
from meshbpf.sources.kube_incremental import TRIGGER_TIME  # noqa: E402
from meshbpf.sources.kubernetes import KubernetesSource  # noqa: E402
from meshbpf.sources.yaml_file import FileSource  # noqa: E402

ENDPOINTS = 4


class MemoryMaps:
    """The three maps in memory: what LBMaps does, minus the syscalls."""

    def __init__(self, size: int):
        self.state = LBState()
        self.churn = DeleteCount()
        self.capacity = {"services": size, "slots": size * 8, "backends": size * 8}
        self.writes = 0
        self.last_write = 0.0

    def read(self) -> LBState:
        return self.state.copy()

    def own_mb(self) -> float:
        """What this stand-in adds to RSS (its three dicts: the entries are
        the agent's own, shared), which a real agent's kernel maps do not."""
        return round(sum(sys.getsizeof(getattr(self.state, m)) for m in ("services", "slots", "backends"))
                     / 2**20, 1)

    def apply(self, p: Plan) -> None:
        p.apply_in_place(self.state)
        # As the agent's own copy (LBIndex.apply): a kernel map does not grow so.
        self.churn.add(len(p.backend_deletes), self.state.backends)
        self.writes += p.writes
        self.last_write = time.time()


class _LB:
    redirect = False


def cluster_ip(i: int) -> str:
    return str(ipaddress.ip_address("10.96.0.0") + 1 + i)


def pod_ip(i: int, j: int) -> str:
    return str(ipaddress.ip_address("10.128.0.0") + 1 + i * ENDPOINTS + j)


def objects(n: int):
    for i in range(n):
        yield service(f"svc-{i}", cluster_ip(i), namespace=f"ns-{i % 50}")
        yield endpoint_slice(f"svc-{i}-x", f"svc-{i}", [ep(pod_ip(i, j)) for j in range(ENDPOINTS)],
                             namespace=f"ns-{i % 50}")


def rfc3339nano(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f000Z")


def moved_slice(i: int, k: int) -> dict:
    """svc-i's slice with its last endpoint moved to a new address (k-th time)."""
    eps = [ep(pod_ip(i, j)) for j in range(ENDPOINTS - 1)]
    eps.append(ep(str(ipaddress.ip_address("10.200.0.0") + 1 + k)))
    obj = endpoint_slice(f"svc-{i}-x", f"svc-{i}", eps, namespace=f"ns-{i % 50}")
    obj["metadata"]["annotations"][TRIGGER_TIME] = rfc3339nano(time.time())
    return obj


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def thread_cpu(tids: list[int]) -> float:
    total = 0
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except OSError:
            pass
    return total / os.sysconf("SC_CLK_TCK")


BUCKETS_MS = (1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000)  # the metric's, up to 1 s


def summary(values: list[float]) -> dict:
    return Latencies(list(values)).summary()


class Latencies:
    """Latencies in 1 µs bins, folded in from the agent's raw list as they
    come: an hour of churn is 360 000 events, and a list of them would grow
    the very RSS the run watches. A percentile q is the value at rank
    int(q * n) of the sorted latencies."""

    def __init__(self, raw: list[float]):
        self.raw, self.bins, self.n = raw, Counter(), 0

    def fold(self) -> None:
        batch = self.raw[:]
        del self.raw[:len(batch)]   # appends made meanwhile by the loop thread stay
        self.bins.update(round(v * 1e6) for v in batch)
        self.n += len(batch)

    def pct(self, q: float) -> float:
        target, seen = min(self.n - 1, int(q * self.n)), 0
        for us in sorted(self.bins):
            seen += self.bins[us]
            if seen > target:
                return us / 1000
        return float("nan")

    def summary(self) -> dict:
        self.fold()
        histogram = {f"<={b}": sum(c for us, c in self.bins.items() if us <= b * 1000) for b in BUCKETS_MS}
        return {"n": self.n, "p50_ms": round(self.pct(0.5), 3), "p90_ms": round(self.pct(0.9), 3),
                "p99_ms": round(self.pct(0.99), 3), "max_ms": max(self.bins) / 1000 if self.bins else None,
                "histogram_ms": histogram}


class LoopThread:
    """The agent's loop (Agent.run without its signal handlers) in a thread."""

    def __init__(self, agent: Agent):
        self.agent = agent
        self.thread = threading.Thread(target=self._run, name="agent-loop", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.tid = threading.get_native_id()
        while not self.agent._stop.is_set():
            self.agent.step()
            self.agent._pause()

    def stop(self) -> None:
        self.agent.stop()
        self.thread.join()


def make_agent(source, n: int, **opts) -> tuple[Agent, MemoryMaps, list[float]]:
    agent = Agent(AgentOptions(config=Path("unused"), poll_interval=0.2, resync_interval=0, **opts),
                  source=source, lb=_LB())
    maps = MemoryMaps(max(2 * n, 1000))
    agent.lbsync.maps = maps
    latencies: list[float] = []
    hist = agent.metrics.network_programming
    real = hist.observe
    hist.observe = lambda v: (latencies.append(v), real(v))  # keep each observation
    return agent, maps, latencies


def _nodelay_setup(self) -> None:
    """The real API server (Go) writes with TCP_NODELAY; the fake one's small
    chunked writes would otherwise meet Nagle and delayed ACKs (40 ms)."""
    _setup(self)
    self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


_setup = fake_apiserver._Handler.setup
fake_apiserver._Handler.setup = _nodelay_setup


class APIServerProcess:
    """The fake API server in a child process, holding N Services: the
    agent's figures (RSS, CPU, latency) are then its own, not shared with a
    Python server serving 200 000 objects under the same GIL. The child
    builds the objects itself, so this process never holds them."""

    def __init__(self, n: int):
        import multiprocessing
        self.conn, child = multiprocessing.Pipe()
        self.proc = multiprocessing.get_context("fork").Process(
            target=_serve, args=(child, n), name="fake-apiserver", daemon=True)
        self.proc.start()
        self.port, self.loaded_s = self.conn.recv()

    def kubeconfig(self, path: Path) -> Path:
        view = FakeAPIServer()
        view.port = self.port
        return view.kubeconfig(path)

    def move(self, i: int, k: int) -> None:
        """svc-i's slice with an endpoint moved, stamped with the trigger time now."""
        self.conn.send((i, k))

    def stop(self) -> None:
        self.conn.send(None)
        self.proc.join(30)


# As kube-apiserver sends each watch that allows them a BOOKMARK about once a
# minute: a watch that sees no event (ConfigMaps, Pods here) would otherwise
# hit the agent's read timeout (two bookmark intervals) and log it.
BOOKMARK_EVERY = 50.0


def _serve(conn, n: int) -> None:
    api = FakeAPIServer().start()
    t = time.monotonic()
    api.apply(*objects(n))
    conn.send((api.port, round(time.monotonic() - t, 1)))
    next_bookmark = time.monotonic() + BOOKMARK_EVERY
    while True:
        if conn.poll(max(0.0, next_bookmark - time.monotonic())):
            msg = conn.recv()
            if msg is None:
                break
            api.apply(moved_slice(*msg))
        if time.monotonic() >= next_bookmark:
            api.bookmark()
            next_bookmark = time.monotonic() + BOOKMARK_EVERY
    api.stop()


def bench_kubernetes(n: int, events: int, churn_seconds: float, tmp: Path, rss_every: float = 60.0) -> dict:
    gc.collect()
    rss0 = rss_mb()
    api = APIServerProcess(n)
    source = KubernetesSource(kubeconfig=str(api.kubeconfig(tmp / "kubeconfig")), node_name="node-a")
    started, cpu_started = time.monotonic(), time.process_time()
    agent, maps, latencies = make_agent(source, n)
    loop = LoopThread(agent)
    while not agent.ready():
        time.sleep(0.01)
    cold = time.monotonic() - started
    out: dict = {"services": n, "cold_start_s": round(cold, 2),
                 # CPU of this process only (the server is another): what a loaded machine stretches
                 "cold_start_cpu_s": round(time.process_time() - cpu_started, 2),
                 "server_load_s": api.loaded_s,
                 "rss_before_mb": round(rss0, 1), "rss_after_start_mb": round(rss_mb(), 1),
                 "maps_stand_in_mb": maps.own_mb()}

    # One event at a time, each waited for: latency with nothing queued.
    for k in range(events):
        before = len(latencies)
        api.move((k * 7919) % n, k)
        while len(latencies) == before:
            time.sleep(0.0005)
    out["one_event"] = summary(latencies)

    if churn_seconds:
        out["churn"] = churn(api, source, loop, latencies, n, events, churn_seconds, rss_every)
    out["rss_after_events_mb"] = round(rss_mb(), 1)
    loop.stop()
    source.stop()
    api.stop()
    return out


def churn(api: APIServerProcess, source: KubernetesSource, loop: LoopThread, raw: list[float],
          n: int, k: int, seconds: float, rss_every: float) -> dict:
    """100 EndpointSlice updates per second for `seconds`, each moving one
    endpoint of another Service; the agent's RSS every `rss_every` s."""
    raw.clear()
    latencies = Latencies(raw)
    tids = [r._thread.native_id for r in source.reflectors.values()] + [loop.tid]
    cpu0, wall0 = thread_cpu(tids), time.monotonic()
    rss = [(0.0, round(rss_mb(), 1))]
    sent, period = 0, 0.01
    next_at = next_rss = time.monotonic()
    while (now := time.monotonic()) - wall0 < seconds:
        api.move((k * 104729) % n, k)
        sent, k = sent + 1, k + 1
        if now - next_rss >= rss_every:
            next_rss = now
            latencies.fold()
            rss.append((round(now - wall0), round(rss_mb(), 1)))
        next_at += period
        time.sleep(max(0.0, next_at - time.monotonic()))
    deadline = time.monotonic() + 10
    while latencies.n + len(raw) < sent and time.monotonic() < deadline:
        time.sleep(0.01)
    wall = time.monotonic() - wall0
    cpu = thread_cpu(tids) - cpu0
    latency = latencies.summary()
    rss.append((round(wall), round(rss_mb(), 1)))
    after_first = [mb for t, mb in rss if t >= min(seconds, 300)]  # past the first minutes' warm-up
    return {"updates_per_s": round(sent / seconds, 1), "seconds": seconds,
            "agent_cpu_pct_of_one_core": round(100 * cpu / wall, 1),
            "programmed": latency["n"], "sent": sent, "latency": latency,
            "rss_mb": rss, "rss_growth_mb": round(rss[-1][1] - rss[0][1], 1),
            "rss_growth_after_5_min_mb": round(after_first[-1] - after_first[0], 1) if after_first else None}


def bench_file(n: int, tmp: Path, fmt: str) -> dict:
    folder = tmp / f"file-{fmt}-{n}"
    folder.mkdir()
    big = folder / f"services.{fmt}"
    # The files are written by a child process, so this one's RSS is the agent's.
    write_in_child(big, n, fmt, -1)
    write_config(folder / "small.json", [service("small-0", "10.95.0.1")], "json")
    gc.collect()
    rss0 = rss_mb()
    source = FileSource(folder, "node-a", settle_s=0)
    agent, maps, _ = make_agent(source, n)
    t = time.monotonic()
    agent.step()
    cold = time.monotonic() - t
    out: dict = {"services": n, "format": fmt, "cold_start_s": round(cold, 2),
                 "rss_after_start_mb": round(rss_mb(), 1), "rss_before_mb": round(rss0, 1),
                 "maps_stand_in_mb": maps.own_mb()}
    times = []
    for k in range(3):
        write_in_child(big, n, fmt, k)
        t = time.monotonic()
        agent.step()
        times.append(time.monotonic() - t)
    out["edit_in_big_file_ms"] = round(statistics.median(times) * 1000, 1)
    times = []
    for k in range(5):
        write_config(folder / f"extra-{k}.json", [service(f"extra-{k}", f"10.94.0.{k + 1}")], "json")
        t = time.monotonic()
        agent.step()
        times.append(time.monotonic() - t)
    out["service_in_small_file_ms"] = round(statistics.median(times) * 1000, 2)
    out["rss_after_edits_mb"] = round(rss_mb(), 1)
    # The safety net: a full resync (read back + full plan), timed apart.
    t = time.monotonic()
    with gc_paused():
        assert agent.lbsync.sync(agent.desired, reread=True)
    out["full_resync_s"] = round(time.monotonic() - t, 2)
    assert plan(maps.state, wanted_services(agent.desired)).writes == 0
    return out


def write_in_child(path: Path, n: int, fmt: str, k: int) -> None:
    """The N-Service file; k >= 0 moves an endpoint of svc-0 (the k-th edit)."""
    subprocess.run([sys.executable, __file__, "--write", str(path), str(n), fmt, str(k)], check=True)


def _write(path: str, n: str, fmt: str, k: str) -> None:
    items = list(objects(int(n)))
    if int(k) >= 0:
        items[1] = moved_slice(0, int(k))
    write_config(Path(path), items, fmt)


def write_config(path: Path, items: list[dict], fmt: str) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    doc = {"apiVersion": "v1", "kind": "List", "items": items}
    if fmt == "json":
        tmp.write_text(json.dumps(doc))
    else:
        import yaml
        tmp.write_text(yaml.dump(doc, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper)))
    os.replace(tmp, path)


def main() -> None:
    if sys.argv[1:2] == ["--write"]:
        return _write(*sys.argv[2:6])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--events", type=int, default=200)
    ap.add_argument("--churn-seconds", type=float, default=20.0)
    ap.add_argument("--churn-max-size", type=int, default=10_000, help="churn only at N up to this")
    ap.add_argument("--rss-every", type=float, default=60.0, help="seconds between RSS samples during churn")
    ap.add_argument("--only", choices=("kubernetes", "file"), default=None)
    ap.add_argument("--formats", default="json,yaml",
                    help="file source formats (YAML at 10 000 at most); one per process for clean RSS")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "incremental.json")
    args = ap.parse_args()
    import tempfile
    results: dict = {"load_average": os.getloadavg(), "cpus": os.cpu_count(), "runs": []}
    with tempfile.TemporaryDirectory() as d:
        for n in map(int, args.sizes.split(",")):
            if args.only in (None, "file"):
                for fmt in [f for f in args.formats.split(",") if f == "json" or n <= 10_000]:
                    r = bench_file(n, Path(d), fmt)
                    print(json.dumps({"file": r}), flush=True)
                    results["runs"].append({"file": r})
            if args.only in (None, "kubernetes"):
                r = bench_kubernetes(n, args.events, args.churn_seconds if n <= args.churn_max_size else 0,
                                     Path(d), args.rss_every)
                print(json.dumps({"kubernetes": r}), flush=True)
                results["runs"].append({"kubernetes": r})
    results["load_average_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
