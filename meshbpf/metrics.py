"""Prometheus metrics (served by meshbpf/health.py).

Map fill ratios are read at scrape time: the reconciled maps from the
agent's own record of what it wrote, the kernel-owned maps (affinity,
reverse NAT, sockhash, socket state) by walking their keys, which costs a
syscall per entry; so a walked count is reused for COUNT_MAX_AGE seconds
and a scrape storm costs one walk.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from .datapath import libbpf, redirect
from .datapath.layout import ALL_MAPS, COUNTABLE, POLICY_MAPS
from .datapath.maps import count_entries, read_lb_stats

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
        self.network_programming = Histogram(
            "meshbpf_network_programming_duration_seconds",
            "As kube-proxy's: from an EndpointSlice's last-change-trigger-time to the maps written",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r)
        self.sync_errors = Counter(
            "meshbpf_sync_errors", "Syncs rejected or failed, by reason: config, source (a source "
            "failed unexpectedly), capacity (a Service newly left out), datapath (a map write), "
            "redirect (redirection settings), capture (sidecar capture maps or hooks), internal (an unexpected error in a sync)",
            ["reason"], registry=r)
        self.map_writes = Counter("meshbpf_map_writes", "Map entries written or deleted",
                                  ["map_name", "op"], registry=r)
        self.last_sync = Gauge("meshbpf_last_sync_timestamp_seconds",
                               "When the maps last matched the desired state", registry=r)
        self.config_ok = Gauge("meshbpf_config_last_load_success",
                               "1 if the last config change was accepted", registry=r)
        self.source_problems = Gauge(
            "meshbpf_source_problems",
            "Objects the Kubernetes source leaves out for their problems (logged once each)",
            registry=r)
        self.datapath_stale = Gauge(
            "meshbpf_datapath_stale",
            "1 while the load-balancing maps differ from the desired state (a failed sync being "
            "retried); Services left out for lack of room are not stale, see meshbpf_services_refused",
            registry=r)
        self.redirect_stale = Gauge(
            "meshbpf_redirect_stale", "1 while the socket redirection settings wait for a retry",
            registry=r)
        self.services_refused = Gauge(
            "meshbpf_services_refused", "Services left out because a map has no room for them",
            registry=r)
        self.resync_duration = Gauge(
            "meshbpf_resync_duration_seconds", "Time the last periodic resync took to read the pinned maps",
            registry=r)
        self.resync_drift = Counter(
            "meshbpf_resync_drift_entries",
            "Map entries a periodic resync found changed behind the agent's back (then repaired)",
            registry=r)
        for reason in ("config", "source", "capacity", "datapath", "redirect", "capture", "internal"):
            self.sync_errors.labels(reason)
        self.scrape_errors = Counter(
            "meshbpf_scrape_errors", "Scrapes in which a collector failed (a map read, say) and "
            "its metrics were left out; the others were served", ["collector"], registry=r)
        self.collectors = GuardedRegistry(r, self.scrape_errors)


class GuardedRegistry:
    """Registers collectors so that one that raises leaves out its own
    metrics only: /metrics still serves the rest (prometheus-client fails
    the whole scrape otherwise)."""

    def __init__(self, registry: CollectorRegistry, errors: Counter):
        self.registry, self.errors = registry, errors

    def register(self, collector) -> None:
        # LBStatsCollector -> lb_stats, MapPressureCollector -> map_pressure
        name = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_",
                      type(collector).__name__.removesuffix("Collector")).lower()
        self.errors.labels(name)
        self.registry.register(_Guarded(name, collector, self.errors))


class _Guarded:
    def __init__(self, name: str, inner, errors: Counter):
        self.name, self.inner, self.errors = name, inner, errors
        self._failing = False  # logged once per run of failures, not per scrape

    def collect(self):
        try:
            families = list(self.inner.collect())  # whole or nothing: no half family
        except Exception as exc:
            self.errors.labels(self.name).inc()
            if not self._failing:
                log.warning("metrics collector %s failed, its metrics are left out of scrapes "
                            "until it recovers: %s: %s", self.name, type(exc).__name__,
                            " ".join(str(exc).split()))  # one line: sync's one_line sits above us
                self._failing = True
            return []
        if self._failing:
            log.info("metrics collector %s recovered", self.name)
            self._failing = False
        return families


# The policy maps whose fill is exported (the conntrack map is walked).
POLICY_COUNTABLE = {"mbpf_pol_ep", "mbpf_pol_epaddr", "mbpf_pol_peer", "mbpf_pol_port", "mbpf_ct"}

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
        for spec in (m for m in ALL_MAPS + POLICY_MAPS if m.name in COUNTABLE | POLICY_COUNTABLE):
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
                    n = self.cache.get(spec.name, lambda: count_entries(fd, spec))
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
        "spinning_readers": ("meshbpf_redirect_spinning_readers_total",
                             "Socket pairs switched to TCP because a reader spins on recv()"),
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



class RouteBackendCollector:
    """meshbpf_route_backend_connections_total{route,backend}: connections a
    weighted split sent to each backend Service, from mbpf_route_cnt."""

    HELP = ("Connections (and unconnected UDP datagrams) a route (TCPRoute/UDPRoute) sent to each "
            "backend Service, counted from when the agent programmed the split")

    def __init__(self, read: Callable[[], dict[tuple[str, str], int]]):
        self.read = read

    def collect(self):
        from prometheus_client.core import CounterMetricFamily
        metric = CounterMetricFamily("meshbpf_route_backend_connections", self.HELP,
                                     labels=["route", "backend"])
        for (route, backend), value in sorted(self.read().items()):
            metric.add_metric([route, backend], value)
        yield metric


class PolicyStatsCollector:
    """meshbpf_policy_verdicts_total{direction,verdict} and
    meshbpf_drops_total{reason}, from the per-CPU mbpf_pol_stats, read at
    scrape; nothing before a policy datapath is pinned."""

    def __init__(self, bpffs: Path):
        self.bpffs = bpffs

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        from .datapath.policy import PolicyMaps
        if not (self.bpffs / "mbpf_pol_stats").exists():
            return
        with PolicyMaps(self.bpffs) as maps:
            counts = maps.counters()
        yield from policy_metrics(counts, CounterMetricFamily)


def policy_metrics(counts: dict[str, int], family):
    """The two families from PolicyMaps.counters() ("ingress_allow" ...)."""
    verdicts = family("meshbpf_policy_verdicts",
                      "New flows a NetworkPolicy decided, by direction (ingress: to the pod) and verdict",
                      labels=["direction", "verdict"])
    for direction in ("ingress", "egress"):
        for verdict in ("allow", "deny"):
            verdicts.add_metric([direction, verdict], counts.get(f"{direction}_{verdict}", 0))
    drops = family("meshbpf_drops", "Packets the policy programs dropped, by reason: policy_denied, "
                   "spoofed_source (a pod sending from an address not its own), malformed",
                   labels=["reason"])
    drops.add_metric(["policy_denied"], counts.get("ingress_deny", 0) + counts.get("egress_deny", 0))
    drops.add_metric(["spoofed_source"], counts.get("spoofed", 0))
    drops.add_metric(["malformed"], counts.get("malformed", 0))
    yield verdicts
    yield drops


class CaptureCollector:
    """Sidecar capture, from the per-CPU mbpf_cap_stats (read at scrape) and
    the agent's record of its meshed pods; nothing while capture is not
    available."""

    def __init__(self, counters: Callable[[], dict[str, int]], meshed_pods: Callable[[], int]):
        self.counters = counters
        self.meshed_pods = meshed_pods

    def collect(self):
        from prometheus_client.core import CounterMetricFamily
        try:
            counts = self.counters()
        except Exception as exc:  # a scrape never fails for it
            log.debug("capture counters not read: %s", exc)
            return
        if not counts:
            return
        yield from capture_metrics(counts, self.meshed_pods(), CounterMetricFamily)


def capture_metrics(counts: dict[str, int], meshed: int, family):
    """The families from CaptureMaps.counters() (capture_keys.COUNTERS names)."""
    captured = family("meshbpf_capture_connections",
                      "Connects steered to a meshed pod's proxy, by direction (outbound: the app's "
                      "own connects; inbound: same-node connects to the pod; dns: port 53)",
                      labels=["direction"])
    for direction in ("outbound", "inbound", "dns"):
        captured.add_metric([direction], counts.get(f"captured_{direction}", 0))
    skipped = family("meshbpf_capture_skipped",
                     "Connects of or to a meshed pod left alone, by reason: proxy_uid (the proxy's "
                     "own), port (an excluded port), cidr (a destination outside the captured ranges)",
                     labels=["reason"])
    for reason in ("proxy_uid", "port", "cidr"):
        skipped.add_metric([reason], counts.get(f"skipped_{reason}", 0))
    orig = family("meshbpf_capture_original_dst",
                  "SO_ORIGINAL_DST asked of captured connections, by result (answered, missing: "
                  "no record, the kernel's own answer stands)", labels=["result"])
    orig.add_metric(["answered"], counts.get("original_dst_answered", 0))
    orig.add_metric(["missing"], counts.get("original_dst_missing", 0))
    pods = GaugeMetricFamily("meshbpf_capture_pods", "Meshed pods whose traffic this node captures")
    pods.add_metric([], meshed)
    yield captured
    yield skipped
    yield orig
    yield pods
