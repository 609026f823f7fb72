"""The agent: source -> reconciler -> datapath, plus health and metrics.

It compiles and attaches the programs (or swaps them in place behind the
pinned links), reads the pinned maps back, and from then on keeps them in
step with the desired state. It never detaches anything on exit: SIGTERM,
a crash or kill -9 all leave the datapath serving what it last programmed.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .datapath import cgroup, features
from .datapath.layout import BY_ROLE
from .datapath.loader import DEFAULT_BPFFS, DatapathError, SockLB
from .datapath.redirect import apply_settings
from .datapath.maps import LBMaps, MapWriteError
from .gcpause import gc_paused
from .metrics import (AgentMetrics, HealthServer, LBStatsCollector, MapPressureCollector, RedirectCollector,
                      heartbeat_check)
from .model import DesiredState, RedirectSettings
from .reconcile import CapacityError, LBState, Plan, check_capacity, plan, wanted_services
from .sources import Source
from .sources.errors import ConfigError, Problem
from .sources.yaml_file import FileSource

log = logging.getLogger(__name__)


@dataclass
class AgentOptions:
    config: Path | None = None          # the YAML file source (the default source)
    source: str = "file"                # "file" or "kubernetes"
    kubeconfig: str | None = None       # kubernetes source: None = in-cluster, then ~/.kube/config
    service_proxy_name: str | None = None
    config_map: str = "kube-system/meshbpf-config"  # kubernetes source: namespace/name of the AgentConfig
    cgroup: str | None = None           # None: the cgroup2 root
    bpffs: Path = DEFAULT_BPFFS
    listen: str = "127.0.0.1:9890"
    node_name: str | None = None
    poll_interval: float = 0.2          # config changes apply within a second
    map_sizes: dict[str, int] = field(default_factory=dict)


class Agent:
    def __init__(self, opts: AgentOptions):
        self.opts = opts
        self.metrics = AgentMetrics()
        self.source = make_source(opts)
        self.lb = SockLB(bpffs=opts.bpffs, sizes=opts.map_sizes)
        self.maps: LBMaps | None = None
        self.current = LBState()
        self.last_good: DesiredState | None = None
        self.applied_redirect: RedirectSettings | None = None
        self.target: Path | None = None
        self.ready = False
        self._beat = time.monotonic()
        self._stop = threading.Event()
        self.http: HealthServer | None = None

    # --- start-up ------------------------------------------------------------
    def start(self) -> None:
        target = self.target = cgroup.resolve(self.opts.cgroup)
        probed = features.probe()
        self.lb.features = features.as_dict(probed)
        for f in probed:
            if not self.lb.features[f.name]:
                log.warning("kernel feature %s is unavailable (%s): %s", f.name, f.needed_for, f.without)
        self.lb.compile()
        self.lb.attach(target)
        self.maps = LBMaps.from_socklb(self.lb)
        self.current = self.maps.read()
        log.info("attached to cgroup %s; pinned maps at %s hold %d services, %d backends",
                 target, self.opts.bpffs, len(self.current.services), len(self.current.backends))
        self._update_gauges()
        self.metrics.registry.register(MapPressureCollector(self.opts.bpffs, self._known_counts))
        self.metrics.registry.register(RedirectCollector(self.opts.bpffs))
        self.metrics.registry.register(LBStatsCollector(self.opts.bpffs))
        self.http = HealthServer(self.opts.listen, self.metrics.registry,
                                 alive=heartbeat_check(lambda: self._beat, 10.0),
                                 ready=lambda: self.ready)
        self.http.start()
        log.info("serving /healthz, /readyz and /metrics on http://%s", self.http.address)

    # --- the loop ------------------------------------------------------------
    def run(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stop.set())
        while not self._stop.is_set():
            self._beat = time.monotonic()
            self.step()
            self._stop.wait(self.opts.poll_interval)
        log.info("stopping; the datapath stays attached and keeps serving")
        if hasattr(self.source, "stop"):
            self.source.stop()
        if self.http:
            self.http.stop()

    def step(self) -> None:
        with gc_paused():
            self._step()

    def _step(self) -> None:
        started = time.monotonic()
        try:
            desired = self.source.poll()
        except ConfigError as exc:
            self.metrics.sync_errors.labels("config").inc()
            self.metrics.config_ok.set(0)
            log.error("config rejected, still running the previous state:\n%s", exc)
            return
        self.metrics.source_problems.set(len(getattr(self.source, "problems", [])))
        if desired is None:
            return
        self.metrics.config_ok.set(1)
        if self.sync(desired):
            self.metrics.sync_duration.observe(time.monotonic() - started)

    def sync(self, desired: DesiredState) -> bool:
        """Brings the maps to `desired`. On any failure the maps keep (or get
        back to) the last good state. Returns True on success."""
        assert self.maps is not None
        try:
            # Checked before anything is written, so a bad path changes nothing.
            for path in desired.settings.redirect.cgroups:
                cgroup.resolve(path)
        except cgroup.CgroupError as exc:
            self.metrics.sync_errors.labels("config").inc()
            log.error("config rejected, still running the previous state: "
                      "AgentConfig spec.socketRedirect.cgroups: %s", exc)
            return False
        p = plan(self.current, wanted_services(desired))
        try:
            check_capacity(self.current, p, self.maps.capacity,
                           {role: spec.name for role, spec in BY_ROLE.items()})
        except CapacityError as exc:
            self.metrics.sync_errors.labels("capacity").inc()
            log.error("update rejected, still running the previous state: %s", exc)
            return False
        try:
            self._apply(p)
        except MapWriteError as exc:
            self.metrics.sync_errors.labels("datapath").inc()
            log.error("map write failed: %s; restoring the previous state", exc)
            self._restore()
            return False
        if desired.settings.redirect != self.applied_redirect:
            if desired.settings.redirect.enabled and not self.lb.redirect:
                log.warning("AgentConfig asks for socket redirection, but this kernel cannot do "
                            "it safely (see `meshbpf status`); it stays off")
                self.applied_redirect = desired.settings.redirect
        if desired.settings.redirect != self.applied_redirect:
            try:
                apply_settings(self.lb, desired.settings.redirect, self.target, self.applied_redirect)
            except (OSError, DatapathError) as exc:
                self.metrics.sync_errors.labels("datapath").inc()
                log.error("socket redirection settings not applied: %s", exc)
                return False
            log.info("socket redirection: %s", _describe(desired.settings.redirect))
            self.applied_redirect = desired.settings.redirect
        self.last_good = desired
        self.ready = True
        self.metrics.last_sync.set_to_current_time()
        if p:
            log.info("synced %d services: %d map writes", len(desired.service_ports), p.writes)
        return True

    def _apply(self, p: Plan) -> None:
        assert self.maps is not None
        self.maps.apply(p)
        for step in p.steps():
            self.metrics.map_writes.labels(BY_ROLE[step.map].name, step.op).inc(len(step.entries))
        self.current = p.apply_to(self.current)
        self._update_gauges()

    def _restore(self) -> None:
        """After a partial write: read what the maps hold and plan back to the
        last good state, so nothing stays half-applied."""
        assert self.maps is not None
        self.current = self.maps.read()
        if self.last_good is None:
            return
        try:
            self._apply(plan(self.current, wanted_services(self.last_good)))
        except MapWriteError as exc:
            log.error("could not restore the previous state: %s", exc)
            self.current = self.maps.read()

    # --- views -----------------------------------------------------------------
    def _known_counts(self) -> dict[str, int]:
        return {BY_ROLE[role].name: len(getattr(self.current, role)) for role in BY_ROLE}

    def _update_gauges(self) -> None:
        self.metrics.services.set(len(self.current.services))
        self.metrics.backends.set(len(self.current.backends))

    def stop(self) -> None:
        self._stop.set()


def _describe(r: RedirectSettings) -> str:
    if not r.enabled:
        return "off"
    where = ", ".join(r.cgroups) or "the agent's cgroup"
    cidrs = ", ".join(map(str, r.pod_cidrs)) or "any address"
    return f"on for sockets in {where}, between {cidrs}"


def make_source(opts: AgentOptions) -> Source:
    if opts.source == "file":
        if opts.config is None:
            raise ConfigError([Problem("--config", "", "", "the file source needs --config PATH")])
        return FileSource(opts.config, opts.node_name)
    if opts.source == "kubernetes":
        from .sources.kubernetes import KubernetesSource
        return KubernetesSource(kubeconfig=opts.kubeconfig, node_name=opts.node_name,
                                service_proxy_name=opts.service_proxy_name,
                                config_map=opts.config_map)
    raise ConfigError([Problem("--source", "", "", f"{opts.source!r} is not file or kubernetes")])


def run_agent(opts: AgentOptions) -> None:
    agent = Agent(opts)
    agent.start()
    agent.run()
