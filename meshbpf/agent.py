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

import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .admission import Admission, Refusal, admit
from .datapath import cgroup, features
from .datapath.layout import BY_ROLE
from .datapath.lock import BpffsLock
from .datapath.loader import DEFAULT_BPFFS, SockLB
from .datapath.redirect import apply_settings
from .datapath.maps import LBMaps, MapWriteError
from .gcpause import freeze_heap, gc_paused
from .health import HealthServer
from .metrics import AgentMetrics, LBStatsCollector, MapPressureCollector, RedirectCollector
from .model import DesiredState, RedirectSettings
from .reconcile import (CapacityError, LBState, Plan, SvcKey, WantedService, check_capacity, plan,
                        wanted_service, wanted_services)
from .reconcile.incremental import LBIndex, plan_services
from .retry import Backoff
from .sources import Source
from .sources.errors import ConfigError, Problem
from .sources.yaml_file import FileSource

log = logging.getLogger(__name__)

MAP_NAMES = {role: spec.name for role, spec in BY_ROLE.items()}
ADMISSION_ROUNDS = 3   # a round that deletes frees room the next round can hand out
HEARTBEAT_MAX_AGE = 10.0


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


class Agent:
    def __init__(self, opts: AgentOptions, source: Source | None = None, lb: SockLB | None = None):
        self.opts = opts
        self.metrics = AgentMetrics()
        self.source = source if source is not None else make_source(opts)
        self.lb = lb if lb is not None else SockLB(bpffs=opts.bpffs, sizes=opts.map_sizes)
        self.lock = BpffsLock(opts.bpffs)
        self.maps: LBMaps | None = None
        self.current = LBState()
        self.desired: DesiredState | None = None        # the latest state the source accepted
        self.programmed: dict[SvcKey, WantedService] | None = None  # what the maps were last brought to
        # For the incremental path: the desired state the maps were last
        # wholly brought to (None: the next sync is a full one), and the index of
        # self.current that plan_services() reads.
        self.synced: DesiredState | None = None
        self.pending_triggers: list[float] = []  # change times of states not yet in the maps
        self.index: LBIndex | None = None
        self.refused: dict[str, Refusal] = {}
        self.lb_retry = Backoff()
        self.redirect_retry = Backoff()
        self.lb_stale = False          # the load-balancing maps differ from self.desired
        self.redirect_stale = False    # the redirection settings differ from self.desired
        self.redirect_tried = False    # the settings of the first desired state were tried
        self.applied_redirect: RedirectSettings | None = None
        self.target: Path | None = None
        self.next_resync = time.monotonic() + opts.resync_interval
        self.last_error = ""
        self._beat = time.monotonic()
        self._stop = threading.Event()
        self.http: HealthServer | None = None

    # --- start-up ------------------------------------------------------------
    def start(self) -> None:
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
        self.maps = LBMaps.from_socklb(self.lb)
        self.current = self.maps.read()
        log.info("attached to cgroup %s; pinned maps at %s hold %d services, %d backends",
                 target, self.opts.bpffs, len(self.current.services), len(self.current.backends))
        self._update_gauges()
        self.metrics.registry.register(MapPressureCollector(self.opts.bpffs, self._known_counts))
        self.metrics.registry.register(RedirectCollector(self.opts.bpffs))
        self.metrics.registry.register(LBStatsCollector(self.opts.bpffs))
        self.http = HealthServer(self.opts.listen, self.metrics.registry,
                                 alive=self.alive, ready=self.ready, details=self.health_details)
        self.http.start()
        log.info("serving /healthz, /readyz and /metrics on http://%s", self.http.address)

    # --- the loop ------------------------------------------------------------
    def run(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stop.set())
        while not self._stop.is_set():
            self._beat = time.monotonic()
            try:
                self.step()
            except Exception as exc:  # a bug must not end the loop: the maps keep serving
                self.metrics.sync_errors.labels("internal").inc()
                self._error("agent loop failed, still running the previous state: %s", _one_line(exc))
            self._pause()
        log.info("stopping; the datapath stays attached and keeps serving")
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
        if wait is None or self.lb_stale or self.redirect_stale:
            self._stop.wait(self.opts.poll_interval)
        else:
            wait(self.opts.poll_interval)

    def step(self) -> None:
        with gc_paused():
            self._step()

    def _step(self) -> None:
        started = now = time.monotonic()
        changed = self._poll_source()
        if self.desired is None:
            return
        resync = self.opts.resync_interval > 0 and now >= self.next_resync
        if changed or resync or self.lb_retry.due(now):
            if self.sync_lb(self.desired, reread=resync) and changed:
                self.metrics.sync_duration.observe(time.monotonic() - started)
        if changed or self.redirect_retry.due(now):
            self.sync_redirect(self.desired.settings.redirect)
            self.redirect_tried = True

    def _poll_source(self) -> bool:
        """Takes a new desired state from the source; True when there is one.
        Nothing the source raises ends the loop."""
        try:
            desired = self.source.poll()
        except ConfigError as exc:
            self.metrics.sync_errors.labels("config").inc()
            self.metrics.config_ok.set(0)
            log.error("config rejected, still running the previous state:\n%s", exc)
            return False
        except Exception as exc:
            self.metrics.sync_errors.labels("source").inc()
            self.metrics.config_ok.set(0)
            self._error("%s failed, still running the previous state: %s",
                        type(self.source).__name__, _one_line(exc))
            return False
        self.metrics.source_problems.set(len(getattr(self.source, "problems", [])))
        if desired is None:
            return False
        self.metrics.config_ok.set(1)
        self.desired = desired
        self.pending_triggers.extend(desired.trigger_times)
        self.lb_retry.reset()        # a new change is tried at once
        self.redirect_retry.reset()
        return True

    # --- load balancing ----------------------------------------------------------
    def sync_lb(self, desired: DesiredState, reread: bool = False) -> bool:
        """Brings the load-balancing maps to `desired`, Service by Service as
        they fit. On a failure the maps get back to what they held and a
        retry is scheduled. Returns True on success.

        A change is planned over the frontends it touches only, when the last
        sync brought the maps to the whole previous desired state; anything
        else (the first sync, a resync, a retry, Services left out, a plan
        that does not fit) plans everything, as the safety net."""
        assert self.maps is not None
        try:
            started = time.monotonic()
            if reread:
                self._resync_read()
            writes = None if reread else self._sync_incremental(desired)
            how = "changed frontends only"
            if writes is None:
                how = "full plan"
                writes = self._admit_and_apply(wanted_services(desired))
                self.synced = None if self.refused else desired
                if self.synced is not None:  # built now, so the next change does not wait for it
                    self.index = LBIndex(self.current)
                freeze_heap()
        except CapacityError as exc:  # admission should have prevented it
            return self._lb_failed("capacity", f"update rejected, still running the previous state: {exc}")
        except MapWriteError as exc:
            self._restore()
            return self._lb_failed("datapath", f"map write failed: {exc}; restored the previous state")
        except Exception as exc:
            self._restore()
            return self._lb_failed("internal", f"sync failed: {_one_line(exc)}; restored the previous state")
        if self.lb_stale:
            log.info("load-balancing maps match the desired state again")
        self.lb_retry.reset()
        self.lb_stale = False
        self.metrics.datapath_stale.set(0)
        self.metrics.last_sync.set_to_current_time()
        self._observe_programming()
        if reread:  # the safety net's whole cost: read back, full plan, repair
            log.info("resync: maps read, planned in full and repaired in %.1f ms",
                     (time.monotonic() - started) * 1000)
        if writes:
            log.info("synced %d services: %d map writes (%s)", len(desired.service_ports), writes, how)
        return True

    def _observe_programming(self) -> None:
        """kube-proxy's network_programming_duration_seconds: from each
        change's trigger time (set by the EndpointSlice controller) to now,
        when the maps hold it."""
        now = time.time()
        for t in self.pending_triggers:
            self.metrics.network_programming.observe(max(now - t, 0.0))
        self.pending_triggers.clear()

    def _sync_incremental(self, desired: DesiredState) -> int | None:
        """Plans and writes only the frontends that differ from the last
        synced state; None when a full sync is needed instead."""
        assert self.maps is not None
        before = self.synced
        if before is None or self.programmed is None or self.lb_stale or self.refused:
            return None
        delta = desired.delta
        if delta is not None and delta.base() is before:
            # The source names what changed since the state synced last: the
            # work is the change's, not the whole state's.
            changes = frontend_changes(before.service_ports, desired.service_ports, delta.frontends)
        else:
            changes = frontend_changes(before.service_ports, desired.service_ports)
        if not changes:
            return 0
        if self.index is None:
            self.index = LBIndex(self.current)
        p = plan_services(self.current, self.index, changes)
        try:
            check_capacity(self.current, p, self.maps.capacity, MAP_NAMES)
        except CapacityError:
            return None  # admission decides, over everything
        self.synced = None  # until the write is known to have landed
        self.maps.apply(p)
        self._count_writes(p)
        self.index.apply(p, self.current)
        self._update_gauges()
        for key, want in changes.items():
            if want is None:
                self.programmed.pop(key, None)
            else:
                self.programmed[key] = want
        self.synced = desired
        return p.writes

    def _admit_and_apply(self, wanted: dict[SvcKey, WantedService]) -> int:
        assert self.maps is not None
        writes = 0
        for _ in range(ADMISSION_ROUNDS):
            admission, p = self._plan_what_fits(wanted)
            self._apply(p)
            self.programmed = admission.wanted
            writes += p.writes
            freed = p.service_deletes or p.slot_deletes or p.backend_deletes
            if not (admission.refused and freed):
                break
        self._note_refusals(admission.refused)
        return writes

    def _plan_what_fits(self, wanted: dict[SvcKey, WantedService]) -> tuple[Admission, Plan]:
        """The whole plan when it fits (the usual case, and the cheap one);
        otherwise the plan of what admission lets in, Service by Service."""
        assert self.maps is not None
        p = plan(self.current, wanted)
        try:
            check_capacity(self.current, p, self.maps.capacity, MAP_NAMES)
            return Admission(wanted), p
        except CapacityError:
            pass
        admission = admit(self.current, wanted, self.maps.capacity, MAP_NAMES)
        p = plan(self.current, admission.wanted)
        check_capacity(self.current, p, self.maps.capacity, MAP_NAMES)  # admission's guarantee
        return admission, p

    def _note_refusals(self, refusals: list[Refusal]) -> None:
        """Logs each Service once when it is left out and once when it fits again."""
        now = {r.service: r for r in refusals}
        for name, refusal in now.items():
            if name not in self.refused:
                self.metrics.sync_errors.labels("capacity").inc()
                self._error("map full: %s", refusal)
        for name in self.refused.keys() - now.keys():
            log.info("Service %s is no longer left out", name)
        self.refused = now
        self.metrics.services_refused.set(len(now))

    def _lb_failed(self, reason: str, message: str) -> bool:
        self.metrics.sync_errors.labels(reason).inc()
        self.lb_stale = True
        self.metrics.datapath_stale.set(1)
        delay = self.lb_retry.failed(time.monotonic())
        self._error("%s; retrying in %gs", message, delay)
        return False

    def _apply(self, p: Plan) -> None:
        assert self.maps is not None
        self.index = None  # a full plan may repair what the index assumes; rebuilt when needed
        self.maps.apply(p)
        self._count_writes(p)
        p.apply_in_place(self.current)
        self._update_gauges()

    def _count_writes(self, p: Plan) -> None:
        for step in p.steps():
            self.metrics.map_writes.labels(BY_ROLE[step.map].name, step.op).inc(len(step.entries))

    def _restore(self) -> None:
        """After a partial write: read what the maps hold and plan back to
        what they were last brought to, so nothing stays half-applied."""
        assert self.maps is not None
        self.index, self.synced = None, None
        try:
            self.current = self.maps.read()
            if self.programmed is not None:
                self._apply(plan(self.current, self.programmed))
        except Exception as exc:
            log.error("could not restore the previous state: %s", _one_line(exc))
            try:
                self.current = self.maps.read()
            except Exception:
                pass

    def _resync_read(self) -> None:
        """Periodic resync: the maps as they are, not as the agent wrote
        them, so the plan that follows repairs any drift."""
        assert self.maps is not None
        self.next_resync = time.monotonic() + self.opts.resync_interval
        started = time.monotonic()
        actual = self.maps.read()
        took = time.monotonic() - started
        drift = _differing_entries(self.current, actual)
        self.current, self.index = actual, None
        self.metrics.resync_duration.set(took)
        self.metrics.resync_drift.inc(drift)
        entries = sum(len(getattr(actual, role)) for role in BY_ROLE)
        log.log(logging.WARNING if drift else logging.INFO,
                "resync: read %d map entries in %.1f ms; %d differ from what the agent wrote%s",
                entries, took * 1000, drift, ", repairing" if drift else "")

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
                        "AgentConfig %s: %s; retrying in %gs", field, _one_line(exc), delay)
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
        return self.programmed is not None and not self.lb_stale and self.redirect_tried

    def alive(self) -> bool:
        return time.monotonic() - self._beat < HEARTBEAT_MAX_AGE and self._source_health().get("ok", True)

    def health_details(self) -> dict[str, Any]:
        """What /healthz and /readyz rest on, for the HTTP layer to show."""
        return {
            "loop_heartbeat_age_s": round(time.monotonic() - self._beat, 3),
            "ready": self.ready(),
            "datapath_stale": self.lb_stale,
            "redirect_stale": self.redirect_stale,
            "services_refused": sorted(self.refused),
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
            return {"ok": False, "error": _one_line(exc)}

    def _error(self, fmt: str, *args: Any) -> None:
        """One log line per failure; the traceback only at debug level."""
        self.last_error = fmt % args
        log.error("%s", self.last_error)
        if sys.exc_info()[0] is not None:
            log.debug("traceback of the failure above", exc_info=True)

    def _known_counts(self) -> dict[str, int]:
        return {BY_ROLE[role].name: len(getattr(self.current, role)) for role in BY_ROLE}

    def _update_gauges(self) -> None:
        self.metrics.services.set(len(self.current.services))
        self.metrics.backends.set(len(self.current.backends))

    def stop(self) -> None:
        self._stop.set()


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def frontend_changes(before: dict, after: dict, where: Iterable | None = None
                     ) -> dict[SvcKey, WantedService | None]:
    """The frontends whose ServicePort differs between two desired states,
    in map terms (None: gone), looking only at `where` when given. Unchanged
    objects are usually the same object: most comparisons stop at identity."""
    changes: dict[SvcKey, WantedService | None] = {}
    for fe in (after.keys() | before.keys()) if where is None else where:
        old, new = before.get(fe), after.get(fe)
        if old is new or old == new:
            continue
        if new is None:
            changes[wanted_service(old)[0]] = None
        else:
            key, want = wanted_service(new)
            changes[key] = want
    return changes


def _differing_entries(expected: LBState, actual: LBState) -> int:
    """Keys missing, added or holding another value, over the three maps."""
    total = 0
    for role in BY_ROLE:
        a, b = getattr(expected, role), getattr(actual, role)
        total += sum(1 for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    return total


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
