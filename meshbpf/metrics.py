"""Prometheus metrics and the agent's /healthz, /readyz and /metrics server.

Map fill ratios are read at scrape time: the reconciled maps from the
agent's own record of what it wrote, the kernel-owned maps (affinity,
reverse NAT, sockhash, socket state) by walking their keys, which costs a
syscall per entry; so a walked count is reused for COUNT_MAX_AGE seconds
and a scrape storm costs one walk.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from .datapath import libbpf, redirect
from .datapath.layout import ALL_MAPS, COUNTABLE
from .datapath.maps import read_lb_stats

log = logging.getLogger(__name__)


class AgentMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.services = Gauge("meshbpf_services", "Service frontends programmed", registry=r)
        self.backends = Gauge("meshbpf_backends", "Backends programmed", registry=r)
        self.sync_duration = Histogram(
            "meshbpf_sync_duration_seconds", "Time from reading desired state to maps written",
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5), registry=r)
        self.sync_errors = Counter(
            "meshbpf_sync_errors", "Syncs rejected or failed, by reason (config, capacity, datapath)",
            ["reason"], registry=r)
        self.map_writes = Counter("meshbpf_map_writes", "Map entries written or deleted",
                                  ["map", "op"], registry=r)
        self.last_sync = Gauge("meshbpf_last_sync_timestamp_seconds",
                               "When the maps last matched the desired state", registry=r)
        self.config_ok = Gauge("meshbpf_config_last_load_success",
                               "1 if the last config change was accepted", registry=r)
        self.source_problems = Gauge(
            "meshbpf_source_problems",
            "Objects the Kubernetes source leaves out for their problems (logged once each)",
            registry=r)
        for reason in ("config", "capacity", "datapath"):
            self.sync_errors.labels(reason)


# Seconds a walked entry count is reused; fill ratios move slowly, and a
# walk of a full 128 K-entry LRU map is 128 K syscalls.
COUNT_MAX_AGE = 10.0


class CachedCounts:
    """Entry counts of maps that must be walked, each reused for max_age."""

    def __init__(self, max_age: float = COUNT_MAX_AGE, clock: Callable[[], float] = time.monotonic):
        self.max_age = max_age
        self.clock = clock
        self._counts: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()  # scrapes run on the HTTP server's threads

    def get(self, name: str, walk: Callable[[], int]) -> int:
        with self._lock:
            now = self.clock()
            hit = self._counts.get(name)
            if hit is not None and now - hit[0] < self.max_age:
                return hit[1]
            n = walk()
            self._counts[name] = (now, n)
            return n


class MapPressureCollector:
    """meshbpf_map_entries, _capacity and _pressure per map, read at scrape."""

    def __init__(self, bpffs: Path, known_counts: Callable[[], dict[str, int]],
                 cache: CachedCounts | None = None):
        self.bpffs = bpffs
        self.known_counts = known_counts  # map name -> entries, for maps we write
        self.cache = cache or CachedCounts()

    def collect(self):
        entries = GaugeMetricFamily("meshbpf_map_entries", "Entries in each BPF map", labels=["map_name"])
        capacity = GaugeMetricFamily("meshbpf_map_capacity", "max_entries of each BPF map", labels=["map_name"])
        pressure = GaugeMetricFamily("meshbpf_map_pressure", "Fill ratio of each BPF map (entries / capacity)",
                                     labels=["map_name"])
        known = self.known_counts()
        for spec in (m for m in ALL_MAPS if m.name in COUNTABLE):
            path = self.bpffs / spec.name
            try:
                fd = libbpf.obj_get(str(path))
            except OSError:
                continue
            try:
                info = libbpf.map_info(fd)
                if spec.name in known:
                    n = known[spec.name]
                else:
                    n = self.cache.get(spec.name, lambda: libbpf.map_count(fd, info.key_size))
            finally:
                os.close(fd)
            entries.add_metric([spec.name], n)
            capacity.add_metric([spec.name], info.max_entries)
            pressure.add_metric([spec.name], n / info.max_entries if info.max_entries else 0)
        yield entries
        yield capacity
        yield pressure


class RedirectCollector:
    """Same-node redirection counters and sockhash size, read at scrape."""

    HELP = {
        "redirected_msgs": ("meshbpf_redirect_messages_total", "sendmsg calls spliced to the peer socket"),
        "redirected_bytes": ("meshbpf_redirect_bytes_total", "Bytes spliced to the peer socket"),
        "passed_msgs": ("meshbpf_redirect_fallback_messages_total",
                        "sendmsg calls of tracked sockets left to the TCP stack"),
        "passed_bytes": ("meshbpf_redirect_fallback_bytes_total", "Bytes of tracked sockets left to TCP"),
        "switched_pairs": ("meshbpf_redirect_switched_pairs_total",
                           "Socket pairs switched to TCP (small-write streams, peer not local)"),
        "evicted_sockets": ("meshbpf_redirect_evicted_sockets_total",
                            "Sockets taken out of the sockhash after switching"),
        "inserted_sockets": ("meshbpf_redirect_inserted_sockets_total", "Sockets put into the sockhash"),
    }

    def __init__(self, bpffs: Path, cache: CachedCounts | None = None):
        self.bpffs = bpffs
        self.cache = cache or CachedCounts()

    def collect(self):
        from prometheus_client.core import CounterMetricFamily
        counters = redirect.read_counters(self.bpffs)
        if counters is None:
            return
        for key, value in counters.items():
            name, doc = self.HELP[key]
            metric = CounterMetricFamily(name[: -len("_total")], doc)
            metric.add_metric([], value)
            yield metric
        entries = GaugeMetricFamily("meshbpf_sockhash_entries", "Sockets in the sockhash now")
        entries.add_metric([], self.cache.get("mbpf_sockhash", lambda: redirect.sockhash_count(self.bpffs) or 0))
        yield entries


class LBStatsCollector:
    """meshbpf_lb_connections_total{result,family,protocol}: what the
    socket-LB programs did, from the per-CPU mbpf_lb_stats, read at scrape."""

    HELP = ("Socket-LB decisions: connect() calls and unconnected UDP datagrams to a service "
            "(translated, refused for lack of a backend; affinity_hit, slot0_retry and "
            "terminating_fallback are translations counted again by how the backend was found), "
            "and replies whose reverse NAT was skipped because the service is gone or replaced "
            "(rnat_stale)")

    def __init__(self, bpffs: Path):
        self.bpffs = bpffs

    def collect(self):
        from prometheus_client.core import CounterMetricFamily
        stats = read_lb_stats(self.bpffs)
        if stats is None:
            return
        metric = CounterMetricFamily("meshbpf_lb_connections", self.HELP,
                                     labels=["result", "family", "protocol"])
        for labels, value in stats.items():
            metric.add_metric(list(labels), value)
        yield metric


class HealthServer:
    """Serves /healthz (the loop is alive), /readyz (maps match a config) and /metrics."""

    def __init__(self, listen: str, registry: CollectorRegistry,
                 alive: Callable[[], bool], ready: Callable[[], bool]):
        host, _, port = listen.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        checks = {"/healthz": alive, "/readyz": ready}

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                path = self.path.split("?")[0]
                if path == "/metrics":
                    body, code, ctype = generate_latest(registry), 200, "text/plain; version=0.0.4"
                elif path in checks:
                    ok = checks[path]()
                    body, code, ctype = (b"ok\n" if ok else b"not ok\n"), (200 if ok else 503), "text/plain"
                else:
                    body, code, ctype = b"not found\n", 404, "text/plain"
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self.server = ThreadingHTTPServer((host, int(port)), Handler)
        self.server.daemon_threads = True
        self.address = f"{host}:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="http", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()


def heartbeat_check(last_beat: Callable[[], float], max_age: float) -> Callable[[], bool]:
    return lambda: time.monotonic() - last_beat() < max_age
