"""Load balancing: brings the socket-LB maps to the desired state.

Service by Service as they fit (admission), over the changed frontends
only when it can (incremental), and back to the last programmed state
after a failed write, so nothing stays half-applied. The agent owns the
loop and the timing (retries, resyncs); this part owns the LB maps' state.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Iterable, Iterator

from ..admission import Admission, Refusal, admit
from ..datapath.layout import BY_ROLE
from ..datapath.maps import MapWriteError
from ..gcpause import freeze_heap
from ..metrics import AgentMetrics
from ..model import DesiredState, Frontend, IPAddress
from ..reconcile import (IPPROTO, CapacityError, LBState, Plan, SvcKey, WantedService, addr16,
                         check_capacity, external_claims, plan, wanted_service, wanted_services)
from ..reconcile.incremental import LBIndex, made_by_a_plan, plan_services
from ..retry import Backoff
from . import one_line

log = logging.getLogger("meshbpf.agent")  # the agent's log, as users and tests filter it

MAP_NAMES = {role: spec.name for role, spec in BY_ROLE.items()}
ADMISSION_ROUNDS = 3   # a round that deletes frees room the next round can hand out
# Frontends per plan when a big desired state is first synced (a cold
# start into empty maps, a restart over pinned ones): a whole plan's
# transient objects (a WantedService per frontend, ~1 KB, and the plan's
# entries) set the heap's peak at 100 000 Services, and CPython keeps the
# peak's arenas as RSS.
FIRST_SYNC_CHUNK = 8192


class LBSync:
    """The LB maps, what they hold (current), and what they were last
    brought to (programmed)."""

    def __init__(self, metrics: AgentMetrics, error: Callable[..., None]):
        self.metrics = metrics
        self.error = error              # the agent's one-line error reporter
        self.maps = None                # LBMaps (or a fake in unit tests), set at start
        self.current = LBState()
        # What the maps were last brought to (see `programmed`): kept as
        # is only when admission left Services out; otherwise as the desired
        # state and external frontends it was planned from (a copy of every
        # frontend's WantedService was ~0.5 KB a Service, read only to undo
        # a failed write).
        self._programmed: dict[SvcKey, WantedService] | None = None
        self._programmed_from: tuple[DesiredState, dict[SvcKey, WantedService]] | None = None
        # For the incremental path: the desired state the maps were last
        # wholly brought to (None: the next sync is a full one), and the index of
        # self.current that plan_services() reads.
        self.synced: DesiredState | None = None
        self.pending_triggers: list[float] = []  # change times of states not yet in the maps
        self.index: LBIndex | None = None
        # North-south on: this node's addresses (for the external frontends,
        # reconcile.external_services), as the agent last passed them; what
        # those frontends were when the maps last got the whole desired
        # state, and the ServicePorts with an exposure then.
        self.node_addresses: tuple[IPAddress, ...] | None = None
        self.synced_addresses: tuple[IPAddress, ...] | None = None
        self.external: dict[SvcKey, WantedService] = {}
        self.claimed: set[SvcKey] = set()   # every key they ask for, shadowed ones too
        self.exposed: set[Frontend] = set()
        self.refused: dict[str, Refusal] = {}
        self.retry = Backoff()
        self.stale = False              # the maps differ from the desired state

    def start(self, maps) -> None:
        self.maps = maps
        self.current = maps.read()
        self._update_gauges()

    @property
    def programmed_once(self) -> bool:
        return self._programmed is not None or self._programmed_from is not None

    @property
    def programmed(self) -> dict[SvcKey, WantedService] | None:
        """What the maps were last brought to (None: never), in map terms."""
        if self._programmed is not None or self._programmed_from is None:
            return self._programmed
        desired, external = self._programmed_from
        wanted = wanted_services(desired)
        wanted.update(external)
        return wanted

    def known_counts(self) -> dict[str, int]:
        return {BY_ROLE[role].name: len(getattr(self.current, role)) for role in BY_ROLE}

    def _update_gauges(self) -> None:
        self.metrics.services.set(len(self.current.services))
        self.metrics.backends.set(len(self.current.backends))

    def sync(self, desired: DesiredState, reread: bool = False,
             node_addresses: tuple[IPAddress, ...] | None = None) -> bool:
        """Brings the load-balancing maps to `desired`, Service by Service as
        they fit. node_addresses: this node's, when north-south is on (see
        reconcile.wanted_services); a change of them replans the frontends
        they make. On a failure the maps get back to what they held and a
        retry is scheduled. Returns True on success.

        A change is planned over the frontends it touches only, when the last
        sync brought the maps to the whole previous desired state; anything
        else (the first sync, a resync, a retry, Services left out, a plan
        that does not fit) plans everything, as the safety net."""
        assert self.maps is not None
        self.node_addresses = node_addresses
        try:
            started = time.monotonic()
            first = not self.programmed_once
            if reread:
                self._resync_read()
            writes = None if reread else self._sync_incremental(desired)
            how = "changed frontends only"
            if writes is None:
                writes = None if reread else self._sync_in_chunks(desired, node_addresses)
                how = "full plan, in chunks"
                if writes is None:
                    how = "full plan"
                    writes = self._sync_in_full(desired, node_addresses)
                freeze_heap(collect=not first)  # the first: seconds of walking for a few objects
        except CapacityError as exc:  # admission should have prevented it
            return self._failed("capacity", f"update rejected, still running the previous state: {exc}")
        except MapWriteError as exc:
            self._restore()
            return self._failed("datapath", f"map write failed: {exc}; restored the previous state")
        except Exception as exc:
            self._restore()
            return self._failed("internal", f"sync failed: {one_line(exc)}; restored the previous state")
        if self.stale:
            log.info("load-balancing maps match the desired state again")
        self.retry.reset()
        self.stale = False
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

    def _sync_in_full(self, desired: DesiredState, node_addresses) -> int:
        writes = self._admit_and_apply(self._wanted_in_full(desired, node_addresses))
        self.synced = None if self.refused else desired
        if self.synced is not None:  # built now, so the next change does not wait for it
            self._programmed, self._programmed_from = None, (desired, self.external)
            self.index = LBIndex(self.current)
        return writes

    def _sync_in_chunks(self, desired: DesiredState, node_addresses) -> int | None:
        """The first sync of a big desired state, FIRST_SYNC_CHUNK frontends
        per plan, in the full plan's order, into empty maps (a cold start)
        or maps a plan made (a restart finds them pinned). plan_services()
        then hands out the full plan's IDs and slots, and the maps end as
        the one full plan leaves them (tests/unit/test_lb_chunks.py): a
        backend no slot names any more, and a frontend no longer wanted, go
        at the end, as the full plan's deletes do after all its updates.
        None when this is not such a sync. A chunk that does not fit hands
        the rest to the full sync and its admission; a failed write is
        undone by sync() as any other."""
        assert self.maps is not None
        current = self.current
        empty = not (current.services or current.slots or current.backends)
        if len(desired.service_ports) <= FIRST_SYNC_CHUNK or not (
                empty or (not self.programmed_once and made_by_a_plan(current))):
            return None
        self.exposed = {f for f, sp in desired.service_ports.items() if sp.exposure is not None}
        self.external, self.claimed = ({}, set()) if node_addresses is None else \
            external_claims(desired.service_ports, node_addresses, self.exposed)
        self.synced_addresses = node_addresses
        # Before the chunks: the index lives on, their transients do not.
        self.index = index = LBIndex(current)
        self.synced = None  # until the whole state has landed
        wanted: set[SvcKey] = set()
        writes = 0
        for chunk in _chunks(self._wanted_in_order(desired), FIRST_SYNC_CHUNK):
            if not empty:
                wanted.update(chunk)
            p = plan_services(current, index, chunk)
            p.backend_deletes = []  # a later chunk may name it again, by the same ID
            written = self._apply_chunk(p)
            if written is None:
                return writes + self._sync_in_full(desired, node_addresses)
            writes += written
        if not empty:
            p = plan_services(current, index, {key: None for key in current.services if key not in wanted})
            freed, named = set(p.backend_deletes), index.refs
            p.backend_deletes = [bid for bid in current.backends if bid in freed or not named.get(bid)]
            self._write(p)  # deletes only: nothing to overflow
            writes += p.writes
        self._update_gauges()
        self._note_refusals([])
        self.synced = desired
        self._programmed, self._programmed_from = None, (desired, self.external)
        return writes

    def _apply_chunk(self, p: Plan) -> int | None:
        """Writes one chunk's plan; None when it does not fit."""
        assert self.maps is not None
        try:
            check_capacity(self.current, p, self.maps.capacity, MAP_NAMES)
        except CapacityError:
            self.index = None
            return None
        self._write(p)
        return p.writes

    def _write(self, p: Plan) -> None:
        assert self.maps is not None and self.index is not None
        self.maps.apply(p)
        self._count_writes(p)
        self.index.apply(p, self.current)

    def _wanted_in_order(self, desired: DesiredState) -> Iterator[tuple[SvcKey, WantedService]]:
        """What _wanted_in_full() returns, one frontend at a time, in its
        order: the ClusterIP frontends, then the external ones (never a
        ClusterIP's key: external_claims() leaves those to the ClusterIP)."""
        for sp in desired.service_ports.values():
            yield wanted_service(sp)
        yield from self.external.items()

    def _wanted_in_full(self, desired: DesiredState, node_addresses) -> dict[SvcKey, WantedService]:
        """wanted_services(), keeping its external frontends and the exposed
        ServicePorts for the incremental path."""
        wanted = wanted_services(desired)
        self.exposed = {f for f, sp in desired.service_ports.items() if sp.exposure is not None}
        self.external, self.claimed = ({}, set()) if node_addresses is None else \
            external_claims(desired.service_ports, node_addresses, self.exposed)
        self.synced_addresses = node_addresses
        wanted.update(self.external)
        return wanted

    def _sync_incremental(self, desired: DesiredState) -> int | None:
        """Plans and writes only the frontends that differ from the last
        synced state; None when a full sync is needed instead."""
        assert self.maps is not None
        before = self.synced
        if before is None or self._programmed_from is None or self.stale or self.refused:
            return None
        delta = desired.delta
        if delta is not None and delta.base() is before:
            # The source names what changed since the state synced last: the
            # work is the change's, not the whole state's.
            touched = delta.frontends
        else:
            touched = [f for f in before.service_ports.keys() | desired.service_ports.keys()
                       if before.service_ports.get(f) != desired.service_ports.get(f)]
        changes = frontend_changes(before.service_ports, desired.service_ports, touched)
        external, exposed, claimed = self._external_changes(desired, touched)
        for key, want in external.items():
            if want is None and key in changes:
                continue  # the key is (now) a ClusterIP's: its change says what it holds
            changes[key] = want
        if not changes:
            self._external_synced(exposed, claimed, external)
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
        self._external_synced(exposed, claimed, external)
        self.synced = desired
        self._programmed_from = (desired, self.external)
        return p.writes

    def _external_changes(self, desired: DesiredState, touched) -> tuple[dict, set[Frontend], set[SvcKey]]:
        """How the external frontends differ from those last synced (None:
        gone), and the exposed ServicePorts now. They are recomputed, over
        the exposed ServicePorts only, when the node's addresses changed or
        a touched frontend is exposed or is a key one of them asks for."""
        addresses = self.node_addresses
        exposed = self.exposed
        relevant = addresses != self.synced_addresses
        for f in touched:
            sp = desired.service_ports.get(f)
            now = sp is not None and sp.exposure is not None
            if now or f in exposed or _key_of(f) in self.claimed:
                relevant = True
                if now != (f in exposed):
                    exposed = set(exposed) if exposed is self.exposed else exposed
                    (exposed.add if now else exposed.discard)(f)
        if not relevant:
            return {}, exposed, self.claimed
        new, claimed = ({}, set()) if addresses is None else \
            external_claims(desired.service_ports, addresses, exposed)
        changes: dict[SvcKey, WantedService | None] = {
            key: want for key, want in new.items() if self.external.get(key) != want}
        changes.update((key, None) for key in self.external if key not in new)
        return changes, exposed, claimed

    def _external_synced(self, exposed: set[Frontend], claimed: set[SvcKey], changes: dict) -> None:
        """Takes in what _external_changes() found, once the maps hold it."""
        self.exposed, self.claimed, self.synced_addresses = exposed, claimed, self.node_addresses
        if changes:
            self.external = dict(self.external)
            for key, want in changes.items():
                if want is None:
                    self.external.pop(key, None)
                else:
                    self.external[key] = want

    def _admit_and_apply(self, wanted: dict[SvcKey, WantedService]) -> int:
        assert self.maps is not None
        writes = 0
        for _ in range(ADMISSION_ROUNDS):
            admission, p = self._plan_what_fits(wanted)
            self._apply(p)
            self._programmed, self._programmed_from = admission.wanted, None
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
                self.error("map full: %s", refusal)
        for name in self.refused.keys() - now.keys():
            log.info("Service %s is no longer left out", name)
        self.refused = now
        self.metrics.services_refused.set(len(now))

    def _failed(self, reason: str, message: str) -> bool:
        self.metrics.sync_errors.labels(reason).inc()
        self.stale = True
        self.metrics.datapath_stale.set(1)
        delay = self.retry.failed(time.monotonic())
        self.error("%s; retrying in %gs", message, delay)
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
            programmed = self.programmed
            if programmed is not None:
                self._apply(plan(self.current, programmed))
        except Exception as exc:
            log.error("could not restore the previous state: %s", one_line(exc))
            try:
                self.current = self.maps.read()
            except Exception:
                pass

    def _resync_read(self) -> None:
        """Periodic resync: the maps as they are, not as the agent wrote
        them, so the plan that follows repairs any drift."""
        assert self.maps is not None
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


def _chunks(items: Iterable[tuple[SvcKey, WantedService]], size: int
            ) -> Iterator[dict[SvcKey, WantedService]]:
    chunk: dict[SvcKey, WantedService] = {}
    for key, want in items:
        chunk[key] = want
        if len(chunk) == size:
            yield chunk
            chunk = {}
    if chunk:
        yield chunk


def _key_of(fe: Frontend) -> SvcKey:
    return SvcKey(addr16(fe.address), fe.port, IPPROTO[fe.protocol])


def _differing_entries(expected: LBState, actual: LBState) -> int:
    """Keys missing, added or holding another value, over the three maps."""
    total = 0
    for role in BY_ROLE:
        a, b = getattr(expected, role), getattr(actual, role)
        total += sum(1 for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    return total
