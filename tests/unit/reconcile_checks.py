"""Invariant checks and helpers shared by the reconciler tests."""

from __future__ import annotations

import ipaddress
from collections import Counter
from typing import Iterator

from meshbpf.model import DesiredState, Endpoint, Frontend, ServicePort
from meshbpf.reconcile import (SLOT_READY, BackendVal, LBState, Plan, SlotKey, SvcKey,
                               WantedService, addr16)


def svc_key(address: str, port: int, proto: int = 6) -> SvcKey:
    return SvcKey(addr16(ipaddress.ip_address(address)), port, proto)


def backend(address: str, port: int = 8080, proto: int = 6) -> BackendVal:
    return BackendVal(addr16(ipaddress.ip_address(address)), port, proto)


def wanted(name: str, *addresses: str, affinity: int = 0, port: int = 8080,
           state: int = SLOT_READY) -> WantedService:
    return WantedService(name, tuple((backend(a, port), state) for a in addresses), affinity)


def desired(*service_ports: ServicePort) -> DesiredState:
    return DesiredState({sp.frontend: sp for sp in service_ports})


def service_port(address: str, port: int, endpoints: list[Endpoint], *, protocol: str = "TCP",
                 name: str = "web", port_name: str = "http", affinity: int = 0) -> ServicePort:
    frontend = Frontend(ipaddress.ip_address(address), port, protocol)
    return ServicePort("default", name, port_name, frontend, tuple(endpoints), affinity)


# --- Stepping through a plan ------------------------------------------------------

def step_states(state: LBState, p: Plan) -> Iterator[LBState]:
    """The state after each prefix of Plan.steps(), applied in order."""
    current = state.copy()
    for step in p.steps():
        target = getattr(current, step.map)
        if step.op == "update":
            target.update(step.entries)
        else:
            for key in step.entries:
                del target[key]  # a delete of a missing key would be a plan bug
        yield current.copy()


def entry_states(state: LBState, p: Plan) -> Iterator[LBState]:
    """The state after every single map write, in plan order (finer than steps:
    a kernel reader can run between two writes of one step)."""
    current = state.copy()
    for step in p.steps():
        target = getattr(current, step.map)
        for key, value in step.entries.items():
            if step.op == "update":
                target[key] = value
            else:
                del target[key]
            yield current.copy()


def apply_entries(state: LBState, p: Plan, count: int) -> LBState:
    """The state after the first `count` writes: a crash in the middle."""
    out = state.copy()
    for i, s in enumerate(entry_states(state, p)):
        if i >= count:
            break
        out = s
    return out


# --- What the kernel may see -----------------------------------------------------

def members(state: LBState, key: SvcKey) -> list[tuple[BackendVal, int]]:
    """(backend, slot state) in the slots a service's count covers."""
    sv = state.services[key]
    return [(state.backends[state.slots[SlotKey(sv.svc_id, i)].backend_id],
             state.slots[SlotKey(sv.svc_id, i)].state) for i in range(sv.count)]


def check_consistent(state: LBState) -> None:
    """No count covering a missing slot, no slot naming a missing backend."""
    for key, sv in state.services.items():
        for i in range(sv.count):
            assert SlotKey(sv.svc_id, i) in state.slots, (
                f"service {key} (id {sv.svc_id}) count {sv.count} covers missing slot {i}")
    for sk, slot in state.slots.items():
        assert slot.backend_id in state.backends, (
            f"slot {sk} points to missing backend {slot.backend_id}")


def check_transition(before: LBState, want: dict[SvcKey, WantedService], p: Plan,
                     granularity: str = "entry") -> None:
    """Every intermediate state is consistent; services that have backends
    before and after never drop to zero, and never use a backend that is
    neither an old nor a new member."""
    stepper = entry_states if granularity == "entry" else step_states
    allowed: dict[SvcKey, set[BackendVal]] = {}
    keep_nonzero = set()
    for key in before.services.keys() & want.keys():
        old = {b for b, _ in members(before, key)}
        allowed[key] = old | {b for b, _ in want[key].backends}
        if old and want[key].backends:
            keep_nonzero.add(key)
    ids = {key: sv.svc_id for key, sv in before.services.items()}
    check_consistent(before)
    for state in stepper(before, p):
        check_consistent(state)
        for key, sv in state.services.items():
            if key in ids:
                assert sv.svc_id == ids[key], f"service {key} changed id mid-update"
            if key in keep_nonzero:
                assert sv.count > 0, f"service {key} dropped to zero backends mid-update"
            if key in allowed:
                stray = {b for b, _ in members(state, key)} - allowed[key]
                assert not stray, f"service {key} reaches a foreign backend {stray}"


def check_realises(state: LBState, want: dict[SvcKey, WantedService]) -> None:
    """The final maps hold exactly the wanted services, nothing else."""
    check_consistent(state)
    assert set(state.services) == set(want)
    for key, w in want.items():
        sv = state.services[key]
        assert sv.count == len(w.backends)
        assert sv.affinity_timeout == w.affinity_timeout
        assert Counter(members(state, key)) == Counter(w.backends)
    svc_ids = [sv.svc_id for sv in state.services.values()]
    assert len(svc_ids) == len(set(svc_ids)), "two services share an id"
    assert 0 not in svc_ids
    covered = {SlotKey(sv.svc_id, i) for sv in state.services.values() for i in range(sv.count)}
    assert set(state.slots) == covered, "slots left over beyond the counts"
    used = {slot.backend_id for slot in state.slots.values()}
    assert set(state.backends) == used, "unreferenced backends left over"
    assert len(set(state.backends.values())) == len(state.backends), "a backend stored twice"
    assert 0 not in state.backends


def slot_writes_by_service(state: LBState, p: Plan) -> Counter:
    writes: Counter = Counter()
    for sk in p.slot_updates:
        writes[sk.svc_id] += 1
    for sk in p.slot_deletes:
        writes[sk.svc_id] += 1
    return writes


def check_minimal(before: LBState, want: dict[SvcKey, WantedService], p: Plan) -> None:
    """From a clean state, the plan writes exactly what must change."""
    # Nothing is written that already holds the value; nothing missing is deleted.
    for bid in p.backend_updates:
        assert bid not in before.backends, "a backend id overwritten"
    for sk, val in p.slot_updates.items():
        assert before.slots.get(sk) != val, f"no-op slot write {sk}"
    for key, val in p.service_updates.items():
        assert before.services.get(key) != val, f"no-op service write {key}"
    assert set(p.service_deletes) <= set(before.services)
    assert set(p.slot_deletes) <= set(before.slots)
    assert set(p.backend_deletes) <= set(before.backends)

    # Backends: exactly the new values are added, exactly the unused removed.
    have = set(before.backends.values())
    need = {b for w in want.values() for b, _ in w.backends}
    assert sorted(p.backend_updates.values()) == sorted(need - have)
    assert {before.backends[b] for b in p.backend_deletes} == have - need
    assert len(p.backend_deletes) == len(set(p.backend_deletes))

    # Services: written when new or when count/affinity change.
    assert set(p.service_deletes) == set(before.services) - set(want)
    for key, w in want.items():
        old = before.services.get(key)
        changes = old is None or (old.count, old.affinity_timeout) != (len(w.backends),
                                                                       w.affinity_timeout)
        assert (key in p.service_updates) == changes, key
        if old is not None and key in p.service_updates:
            assert p.service_updates[key].svc_id == old.svc_id, "service id not reused"

    # Slots: a surviving backend keeps its slot, so a service's slot writes are
    # the new positions not already holding the right (backend, state), plus
    # the positions beyond the new count.
    writes = slot_writes_by_service(before, p)
    for key, w in want.items():
        old = before.services.get(key)
        if old is None:
            continue
        old_members = members(before, key)
        new_set = set(w.backends)
        n, m = len(w.backends), old.count
        kept = sum(1 for i in range(min(m, n)) if old_members[i] in new_set)
        expected = (n - kept) + max(0, m - n)
        assert writes[old.svc_id] == expected, (
            f"{w.name}: {writes[old.svc_id]} slot writes, {expected} needed")
