"""The agent: source -> reconciler -> datapath, plus health and metrics.

It compiles and attaches the programs (or swaps them in place behind the
pinned links), reads the pinned maps back, and from then on keeps them in
step with the desired state. It never detaches anything on exit: SIGTERM,
a crash or kill -9 all leave the datapath serving what it last programmed.

Nothing a source or a sync raises ends the loop. The agent keeps the last
desired state it was given, so a failed sync is retried (with backoff) with
no new change needed, and a periodic resync re-reads the maps to repair
drift. Redirection settings are applied apart from load balancing, so a
problem with them never holds up Service updates.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .datapath import cgroup, features
from .datapath.lock import BpffsLock
from .datapath.loader import DEFAULT_BPFFS, SockLB
from .datapath.redirect import apply_settings
from .datapath.maps import LBMaps
from .datapath.route_counters import RouteCounters
from .datapath.policy import PolicyDatapath
from .gcpause import gc_paused, trim_malloc
from .health import HealthServer, ListenError
from .metrics import (AgentMetrics, CaptureCollector, LBStatsCollector, MapPressureCollector,
                      PolicyStatsCollector, RedirectCollector, RouteBackendCollector)
from .model import DesiredState, RedirectSettings
from .northsouth_health import HealthCheckServers
from .reconcile.northsouth import NodeContext
from .reconcile.northsouth_keys import DEFAULT_SNAT_PORTS, DEFAULT_TABLE_SIZE
from .retry import Backoff
from .sources import Source
from .sources.errors import ConfigError, Problem
from .sources.route_status import routes_view
from .sources.yaml_file import FileSource
from .sync import one_line
from .sync.capture import CaptureSync, LoaderCapture
from .sync.flow_names import flow_names
from .sync.lb import LBSync
from .sync.northsouth import NorthSouthSync, node_context, north_south_devices, register_ns_counters
from .sync.policy import PolicySync

log = logging.getLogger(__name__)

HEARTBEAT_MAX_AGE = 10.0
MALLOC_TRIM_INTERVAL = 60.0  # seconds between two trims after changes

# Problems of a rejected change logged one per line; a file of 100 000 bad
# Services must not flood the log (the count says how many were left unsaid).
MAX_LOGGED_PROBLEMS = 20


def _log_rejected(exc: ConfigError) -> None:
    """A summary line, then one line per problem naming file, object, field
    and reason: each line greps and reads on its own."""
    problems = exc.problems
    log.error("config rejected, still running the previous state: %d problem(s)", len(problems))
    for problem in problems[:MAX_LOGGED_PROBLEMS]:
        log.error("config problem: %s", problem)
    if len(problems) > MAX_LOGGED_PROBLEMS:
        log.error("config problem: ... and %d more not logged", len(problems) - MAX_LOGGED_PROBLEMS)


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
    resync_interval: float = 300.0      # re-read the pinned maps and repair drift; 0: never
    lock_timeout: float = 10.0          # wait this long for a previous agent on the bpffs to exit
    node_netns: str | None = None       # netns of the pods' host-side interfaces; None: the agent's
    # North-south (issue 12): None: on when `devices` are given, or found
    # (default routes) in node_netns; never the agent's own netns's devices
    # unless asked with True.
    north_south: bool | None = None
    devices: list[str] = field(default_factory=list)   # external devices; []: the default-route ones
    maglev_table_size: int = DEFAULT_TABLE_SIZE
    north_south_cluster_ips: str = "exposed"   # or "all": every Service's ClusterIP from outside
    snat_ports: tuple[int, int] = DEFAULT_SNAT_PORTS   # north-south SNAT takes its ports here
    reserve_snat_ports: bool = True     # ... reserved in the devices' netns (ip_local_reserved_ports)


class Agent:
    def __init__(self, opts: AgentOptions, source: Source | None = None, lb: SockLB | None = None):
        self.opts = opts
        self.metrics = AgentMetrics()
        self.source = source if source is not None else make_source(opts)
        self.lb = lb if lb is not None else SockLB(bpffs=opts.bpffs, sizes=opts.map_sizes,
                                                   node_netns=opts.node_netns)
        self.lock = BpffsLock(opts.bpffs)
        self.lbsync = LBSync(self.metrics, self._error)
        self.policy = PolicySync(self.metrics, self._error,
                                 PolicyDatapath(opts.bpffs, dict(opts.map_sizes), opts.node_netns),
                                 opts.node_name or socket.gethostname())
        self.capture = CaptureSync(self.metrics, self._error, opts.node_name or socket.gethostname())
        self.northsouth = NorthSouthSync(self.metrics, self._error, self._node_context,
                                         table_size=opts.maglev_table_size,
                                         health=HealthCheckServers(opts.node_netns),
                                         all_cluster_ips=opts.north_south_cluster_ips == "all")
        self.ns_devices: list[str] = []
        self.desired: DesiredState | None = None        # the latest state the source accepted
        self.route_counters = RouteCounters(opts.bpffs)  # connections per route backend
        self.redirect_retry = Backoff()
        self.redirect_stale = False    # the redirection settings differ from self.desired
        self.redirect_tried = False    # the settings of the first desired state were tried
        self.applied_redirect: RedirectSettings | None = None
        self.target: Path | None = None
        self.next_resync = time.monotonic() + opts.resync_interval
        self.next_trim = 0.0  # when a changed state next hands freed memory back (see _step)
        self.last_error = ""
        self._beat = time.monotonic()
        self._stop = threading.Event()
        self._resync_asked = False  # set by SIGHUP: a plain flag, safe in a signal handler
        self.http: HealthServer | None = None

    # --- start-up ------------------------------------------------------------
    def start(self) -> None:
        # Bound first: an address in use fails the agent at once, in one
        # line, not after the compile (seconds) with the datapath attached.
        try:
            self.http = self._health_server()
        except ListenError:
            if not self.lock.held_elsewhere():
                raise
            # The previous agent is still exiting (an upgrade): its port
            # goes with it, so wait for it as for its lock.
            self.lock.acquire(self.opts.lock_timeout)
            self.http = self._health_server()
        try:
            self._start_datapath()
        except BaseException:
            self.http.stop()
            self.http = None
            raise
        self.http.start()
        log.info("serving /healthz, /readyz, /metrics, /v1/endpoints, /v1/policy, /v1/capture, "
                 "/v1/northsouth and /v1/routes on http://%s", self.http.address)

    def _health_server(self) -> HealthServer:
        return HealthServer(self.opts.listen, self.metrics.registry,
                            alive=self.alive, ready=self.ready, details=self.health_details,
                            views={"/v1/endpoints": lambda: {**self.policy.endpoints_view(),
                                                             **flow_names(self.desired)},
                                   "/v1/policy": self.policy.policy_view,
                                   "/v1/capture": self.capture.view,
                                   "/v1/northsouth": self.northsouth.view,
                                   "/v1/routes": lambda: routes_view(self.desired)})

    def _start_datapath(self) -> None:
        # Before anything is compiled or attached: a second agent on this
        # folder would hand out the same service IDs.
        self.lock.acquire(self.opts.lock_timeout)
        target = self.target = cgroup.resolve(self.opts.cgroup)
        probed = features.probe()
        self.lb.features = features.as_dict(probed)
        for f in probed:
            if not self.lb.features[f.name]:
                log.warning("kernel feature %s is unavailable (%s): %s", f.name, f.needed_for, f.without)
        self.lb.compile()
        self.lb.attach(target)
        self.lbsync.start(LBMaps.from_socklb(self.lb))
        held = self.lbsync.current
        log.info("attached to cgroup %s; pinned maps at %s hold %d services, %d backends",
                 target, self.opts.bpffs, len(held.services), len(held.backends))
        self.metrics.collectors.register(MapPressureCollector(
            self.opts.bpffs, lambda: {**self.lbsync.known_counts(), **self.policy.known_counts()}))
        self.metrics.collectors.register(RedirectCollector(self.opts.bpffs))
        self.metrics.collectors.register(LBStatsCollector(self.opts.bpffs))
        self.metrics.collectors.register(RouteBackendCollector(self.route_counters.read))
        self.metrics.collectors.register(PolicyStatsCollector(self.opts.bpffs))
        self.policy.cgroup_root = target  # where kubelet's pod cgroups are
        if self.policy.pinned():  # a previous agent enforced policy: take over now
            self._start_policy()
        self._start_capture(target)
        self.metrics.collectors.register(CaptureCollector(
            self.capture.counters, lambda: len(self.capture.current.pods)))
        self._start_north_south()

    def _start_capture(self, target: Path) -> None:
        """Sidecar capture's maps are pinned whenever the kernel can capture
        (the hooks cost one lookup while no pod is meshed); without them the
        sync only reports that AgentConfig's capture cannot apply."""
        self.capture.cgroup_root = target
        if not getattr(self.lb, "capture", False):
            return
        try:
            self.capture.start(LoaderCapture(self.lb, self.opts.bpffs, target), target)
        except Exception as exc:  # load balancing goes on; pods stay uncaptured
            self._error("sidecar capture not started (load balancing goes on): %s", one_line(exc))

    def _start_north_south(self) -> None:
        """tc (and XDP) on the external devices, over the pinned north-south
        maps; any failure leaves it off and load balancing going on."""
        opts = self.opts
        try:
            self.ns_devices = north_south_devices(opts.north_south, opts.devices, opts.node_netns)
            if not self.ns_devices:
                log.info("north-south load balancing is off (%s)", "--no-north-south"
                         if opts.north_south is False else "no --devices given or found")
                if opts.north_south is False:
                    self.northsouth.turn_off_pinned(opts.bpffs)
                return
            dp = self.northsouth.load(opts.bpffs, self.ns_devices, opts.node_netns, opts.map_sizes,
                                      opts.snat_ports if opts.reserve_snat_ports else None)
            register_ns_counters(self.metrics.collectors, dp.maps)
            lo, hi = opts.snat_ports
            log.info("north-south load balancing on %s (%s); SNAT ports %d-%d, %s", ", ".join(self.ns_devices),
                     getattr(dp, "mode", "tc"), lo, hi,
                     "not reserved (--no-reserve-snat-ports)" if not opts.reserve_snat_ports else
                     "added to net.ipv4.ip_local_reserved_ports" if getattr(dp, "reserved", None) is not None
                     else "reserved already (net.ipv4.ip_local_reserved_ports)")
        except Exception as exc:
            self._error("north-south load balancing not started (load balancing goes on): %s",
                        one_line(exc))

    def _lb_node_addresses(self):
        """The node's addresses for the socket-LB's external frontends
        (NodePorts at them, LB and external IPs: reconcile.external_services)
        while north-south runs; None otherwise. Read by the north-south
        sync (at start and on each resync), not here."""
        ns = self.northsouth
        if ns.maps is None or ns.node is None:
            return None
        return ns.node.addresses

    def _node_context(self) -> NodeContext:
        node = node_context(self.opts.node_name or socket.gethostname(), self.ns_devices,
                            self.opts.node_netns)
        return dataclasses.replace(node, snat_ports=tuple(self.opts.snat_ports))

    def _start_policy(self) -> None:
        try:
            self.policy.start()
        except Exception as exc:  # retried by the next sync; load balancing goes on
            self.policy.stale = True
            self._error("policy datapath not started (load balancing goes on): %s", one_line(exc))

    # --- the loop ------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT stop the loop; SIGHUP asks for a full resync
        at its next step, as other daemons re-read their configuration."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stop.set())
        signal.signal(signal.SIGHUP, lambda *_: self.request_resync())

    def request_resync(self) -> None:
        self._resync_asked = True

    def run(self) -> None:
        self.install_signal_handlers()
        while not self._stop.is_set():
            try:
                self.step()
            except Exception as exc:  # a bug must not end the loop: the maps keep serving
                self.metrics.sync_errors.labels("internal").inc()
                self._error("agent loop failed, still running the previous state: %s", one_line(exc))
            self._pause()
        log.info("stopping; the datapath stays attached and keeps serving")
        self.northsouth.stop()
        if hasattr(self.source, "stop"):
            self.source.stop()
        if self.http:
            self.http.stop()
        self.lock.release()

    def _pause(self) -> None:
        """Until the next step: a source that can tell when something
        changed (the Kubernetes source) wakes the loop at once; others are
        polled every poll_interval. A pending retry keeps to the interval."""
        wait = getattr(self.source, "wait", None)
        if (wait is None or self.lbsync.stale or self.redirect_stale or self.policy.pending()
                or self.capture.pending() or self.northsouth.stale):
            self._stop.wait(self.opts.poll_interval)
        else:
            wait(self.opts.poll_interval)

    def step(self) -> None:
        self._beat = time.monotonic()  # the loop's heartbeat: one per step, whoever drives it
        with gc_paused():
            self._step()

    def _step(self) -> None:
        started = now = time.monotonic()
        asked = self._take_resync_request()
        changed = self._poll_source()
        if self.desired is None:
            return
        resync = asked or self.opts.resync_interval > 0 and now >= self.next_resync
        if resync:
            self.next_resync = now + self.opts.resync_interval
        if changed or resync or self.lbsync.retry.due(now):
            if self.lbsync.sync(self.desired, reread=resync, node_addresses=self._lb_node_addresses()) \
                    and changed:
                self.metrics.sync_duration.observe(time.monotonic() - started)
            self._sync_route_counters()
        if changed or resync or self.policy.due(now):
            self.policy.sync(self.desired)
        if changed or resync or self.capture.due(now):
            self.capture.sync(self.desired, reread=resync)
        if changed or resync or self.northsouth.due(now):
            self.northsouth.sync(self.desired, reread=resync)
        addresses = self._lb_node_addresses()
        if addresses != self.lbsync.node_addresses:  # the north-south sync read new ones
            self.lbsync.sync(self.desired, node_addresses=addresses)
        self.northsouth.collect_garbage(now)
        if changed or asked or self.redirect_retry.due(now):
            self.sync_redirect(self.desired.settings.redirect)
            self.redirect_tried = True
        if changed and now >= self.next_trim:
            # Each change frees the objects it replaced; glibc keeps the freed
            # pages as RSS (14 MB after 30 000 events at 100 000 Services, 1 ms
            # to hand back; README, an hour of churn). Once a minute at most.
            trim_malloc()
            self.next_trim = now + MALLOC_TRIM_INTERVAL

    def _take_resync_request(self) -> bool:
        """SIGHUP's full resync: the source forgets what it read, so this
        step's poll reads everything again, and the step re-reads the pinned
        maps and rewrites what differs, as the periodic resync does."""
        if not self._resync_asked:
            return False
        self._resync_asked = False
        log.info("SIGHUP: full resync: reading the sources again, re-planning, rewriting the maps")
        forget = getattr(self.source, "forget", None)
        if forget is not None:
            forget()
        return True

    def _sync_route_counters(self) -> None:
        """Counter entries for the splits just programmed (metrics only: a
        failure is logged and never holds up anything else)."""
        try:
            index = self.lbsync.index  # the planners' backend IDs, when kept
            self.route_counters.sync(self.desired, self.lbsync.current,
                                     index.backend_id if index is not None else None)
        except Exception as exc:
            log.warning("route backend counters not updated: %s", one_line(exc))

    def _poll_source(self) -> bool:
        """Takes a new desired state from the source; True when there is one.
        Nothing the source raises ends the loop."""
        try:
            desired = self.source.poll()
        except ConfigError as exc:
            self.metrics.sync_errors.labels("config").inc()
            self.metrics.config_ok.set(0)
            _log_rejected(exc)
            return False
        except Exception as exc:
            self.metrics.sync_errors.labels("source").inc()
            self.metrics.config_ok.set(0)
            self._error("%s failed, still running the previous state: %s",
                        type(self.source).__name__, one_line(exc))
            return False
        self.metrics.source_problems.set(len(getattr(self.source, "problems", [])))
        if desired is None:
            return False
        self.metrics.config_ok.set(1)
        self.desired = desired
        self.lbsync.pending_triggers.extend(desired.trigger_times)
        self.lbsync.retry.reset()        # a new change is tried at once
        self.redirect_retry.reset()
        self.northsouth.retry.reset()
        return True

    # --- redirection -----------------------------------------------------------
    def sync_redirect(self, settings: RedirectSettings) -> bool:
        """Applies the redirection settings, apart from load balancing: a
        failure here is retried on its own and never holds up Service updates."""
        if settings == self.applied_redirect and not self.redirect_stale:
            return True
        if not self.lb.redirect:
            # Redirection was not compiled (kernel without it): no maps to
            # write, nothing to attach; say so once if it is asked for.
            if settings.enabled:
                log.warning("AgentConfig asks for socket redirection, but this kernel cannot do "
                            "it safely (see `meshbpf status`); it stays off")
            self.applied_redirect = settings
            return True
        field = "spec.socketRedirect"
        try:
            # Every cgroup checked before anything is written, so a missing
            # one changes nothing.
            field = "spec.socketRedirect.cgroups"
            for path in settings.cgroups:
                cgroup.resolve(path)
            field = "spec.socketRedirect"
            apply_settings(self.lb, settings, self.target, self.applied_redirect)
        except Exception as exc:
            self.metrics.sync_errors.labels("redirect").inc()
            self.redirect_stale = True
            self.metrics.redirect_stale.set(1)
            delay = self.redirect_retry.failed(time.monotonic())
            self._error("socket redirection settings not applied (load balancing goes on): "
                        "AgentConfig %s: %s; retrying in %gs", field, one_line(exc), delay)
            return False
        self.redirect_retry.reset()
        self.redirect_stale = False
        self.metrics.redirect_stale.set(0)
        log.info("socket redirection: %s", _describe(settings))
        self.applied_redirect = settings
        return True

    # --- views -----------------------------------------------------------------
    def ready(self) -> bool:
        """The load-balancing maps match the desired state (Services left out
        for lack of room are problems, not staleness: retrying cannot help),
        and the redirection settings have been tried once (their failure is
        retried apart and does not hold readiness; but a pod started at
        "ready" finds them applied wherever they could be)."""
        return (self.lbsync.programmed_once and not self.lbsync.stale and self.redirect_tried
                and not self.policy.stale)

    def alive(self) -> bool:
        return time.monotonic() - self._beat < HEARTBEAT_MAX_AGE and self._source_health().get("ok", True)

    def health_details(self) -> dict[str, Any]:
        """What /healthz and /readyz rest on, for the HTTP layer to show."""
        return {
            "loop_heartbeat_age_s": round(time.monotonic() - self._beat, 3),
            "ready": self.ready(),
            "datapath_stale": self.lbsync.stale,
            "redirect_stale": self.redirect_stale,
            "policy_stale": self.policy.stale,
            "capture_stale": self.capture.stale,
            "northsouth_stale": self.northsouth.stale,
            "services_refused": sorted(self.lbsync.refused),
            "last_error": self.last_error,
            "source": self._source_health(),
        }

    def _source_health(self) -> dict[str, Any]:
        health = getattr(self.source, "health", None)
        if health is None:
            return {"ok": True}
        try:
            return health()
        except Exception as exc:
            return {"ok": False, "error": one_line(exc)}

    def _error(self, fmt: str, *args: Any) -> None:
        """One log line per failure; the traceback only at debug level."""
        self.last_error = fmt % args
        log.error("%s", self.last_error)
        if sys.exc_info()[0] is not None:
            log.debug("traceback of the failure above", exc_info=True)

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
