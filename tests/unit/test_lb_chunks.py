"""A first sync of a big desired state, into empty maps (a cold start) or
into maps a plan made (a restart finds them pinned), is planned and written
FIRST_SYNC_CHUNK frontends at a time (sync/lb.py), to keep a whole plan's
transient objects off the heap's peak. The maps must end exactly as the one
full plan leaves them: the same IDs, slots and entries, external frontends
included; and everything else (admission, a failed write, maps no plan made,
later syncs) must behave as without chunks."""

from __future__ import annotations

import random

import pytest

from k8s_builders import endpoint_slice, ep, service
from meshbpf.datapath.maps import MapWriteError
from meshbpf.metrics import AgentMetrics
from meshbpf.reconcile import LBState, SlotKey, plan, wanted_services
from meshbpf.sources.kube_incremental import ServiceIndex
import meshbpf.sync.lb as lbsync_mod
from meshbpf.sync.lb import LBSync
from test_agent_loop import FakeMaps
from test_lb_external import ADDRESS_CHOICES, NAMES, full, random_service, random_slice

CHUNK = 2


@pytest.fixture
def full_plans(monkeypatch):
    """Small chunks, so a handful of Services takes several; and a count of
    the full plans made, so a test sees which path ran."""
    monkeypatch.setattr(lbsync_mod, "FIRST_SYNC_CHUNK", CHUNK)
    calls: list[int] = []
    monkeypatch.setattr(lbsync_mod, "plan", lambda *a: calls.append(1) or plan(*a))
    return calls


def new_sync(maps=None) -> LBSync:
    sync = LBSync(AgentMetrics(), lambda *a: pytest.fail(a[0] % a[1:]))
    sync.start(maps or FakeMaps())
    return sync


def random_state(seed: int):
    rng = random.Random(seed)
    services = {n: random_service(rng, n) for n in NAMES}
    slices = {n: random_slice(rng, n) for n in NAMES}
    start = full(services, slices)
    return rng, services, slices, start


def in_one_plan(state, addresses) -> LBState:
    return plan(LBState(), wanted_services(state, addresses)).apply_to(LBState())


@pytest.mark.parametrize("seed", range(40))
def test_chunks_into_empty_maps_leave_what_one_full_plan_does(seed, full_plans):
    rng, services, slices, start = random_state(seed)
    addresses = rng.choice(ADDRESS_CHOICES)
    assert len(start.state.service_ports) > CHUNK, "the test needs more than one chunk"
    sync = new_sync()
    assert sync.sync(start.state, node_addresses=addresses)
    assert not full_plans, "planned in full, not in chunks"
    assert sync.maps.state == in_one_plan(start.state, addresses)   # IDs and slots too
    assert sync.current == sync.maps.state
    assert sync.programmed == wanted_services(start.state, addresses)
    # The index the chunks kept serves the changes that follow.
    index = ServiceIndex(start.state, services.values(), slices.values(), start.problems,
                         node_name="node-a")
    sync.synced = index.state
    for _ in range(6):
        name = rng.choice(NAMES)
        obj = random_slice(rng, name)
        slices[name] = obj
        index.apply({}, {("default", f"{name}-1"): obj})
        assert sync.sync(index.state, node_addresses=addresses)
        assert plan(sync.maps.state, wanted_services(index.state, addresses)).writes == 0
    assert not full_plans


@pytest.mark.parametrize("seed", range(40))
def test_chunks_after_a_restart_leave_what_one_full_plan_does(seed, full_plans):
    """The maps hold what a plan made of another state (a restart after
    changes the agent missed): Services come, go and change, backends move
    between them, external frontends come and go."""
    _, _, _, before = random_state(seed + 1000)
    rng, _, _, after = random_state(seed)
    old_addresses, addresses = rng.choice(ADDRESS_CHOICES), rng.choice(ADDRESS_CHOICES)
    maps = FakeMaps()
    maps.state = in_one_plan(before.state, old_addresses)
    held = maps.state.copy()
    restarted = new_sync(maps)
    assert restarted.sync(after.state, node_addresses=addresses)
    assert not full_plans, "planned in full, not in chunks"
    wanted = wanted_services(after.state, addresses)
    assert maps.state == plan(held, wanted).apply_to(held)   # IDs and slots too
    assert restarted.current == maps.state and restarted.programmed == wanted
    assert restarted.sync(after.state, node_addresses=addresses) and maps.state == plan(held, wanted).apply_to(held)


class Recording(FakeMaps):
    def __init__(self):
        super().__init__()
        self.writes: list[int] = []

    def apply(self, p) -> None:
        self.writes.append(p.writes)
        super().apply(p)


def test_a_restart_over_maps_that_hold_the_state_writes_nothing(full_plans):
    _, _, _, start = random_state(7)
    maps = Recording()
    assert new_sync(maps).sync(start.state)
    held, first = maps.state.copy(), len(maps.writes)
    assert new_sync(maps).sync(start.state)
    assert maps.state == held and not full_plans
    assert not any(maps.writes[first:]), "a write for nothing"


def hand_edited(state: LBState, how: str) -> LBState:
    """Maps no plan made: what the full plan repairs and the chunks do not."""
    state = state.copy()
    svc_key, svc = next(iter(state.services.items()))
    slot_key, slot = next(iter(state.slots.items()))
    if how == "orphan slot":
        state.slots[SlotKey(max(v.svc_id for v in state.services.values()) + 7, 0)] = slot
    elif how == "slot naming no backend":
        state.slots[slot_key] = slot._replace(backend_id=max(state.backends) + 9)
    elif how == "one value under two IDs":
        state.backends[max(state.backends) + 3] = state.backends[slot.backend_id]
    elif how == "two frontends on one ID":
        other = next(k for k in state.services if k != svc_key)
        state.services[other] = state.services[other]._replace(svc_id=svc.svc_id)
    return state


@pytest.mark.parametrize("how", ["orphan slot", "slot naming no backend", "one value under two IDs",
                                 "two frontends on one ID"])
def test_maps_no_plan_made_take_the_full_plan_that_repairs_them(how, full_plans):
    _, _, _, before = random_state(11)
    _, _, _, after = random_state(12)
    maps = FakeMaps()
    maps.state = hand_edited(in_one_plan(before.state, None), how)
    held = maps.state.copy()
    assert new_sync(maps).sync(after.state) and len(full_plans) == 1
    assert maps.state == plan(held, wanted_services(after.state)).apply_to(held)


def test_a_state_of_one_chunk_or_a_later_full_sync_take_the_full_plan(full_plans):
    one = full({"svc0": service("svc0", "10.96.0.1")},
               {"svc0": endpoint_slice("svc0-1", "svc0", [ep("10.244.0.1")])}).state
    sync = new_sync()
    assert sync.sync(one) and len(full_plans) == 1
    _, _, _, start = random_state(1)
    held = sync.maps.state.copy()
    sync.synced = None   # as after Services were left out: the next sync plans in full
    assert sync.sync(start.state) and len(full_plans) == 2
    assert sync.maps.state == plan(held, wanted_services(start.state)).apply_to(held)


def test_a_chunk_that_does_not_fit_hands_the_rest_to_admission(full_plans):
    services = {n: service(n, f"10.96.0.{i + 1}") for i, n in enumerate(NAMES)}
    slices = {n: endpoint_slice(f"{n}-1", n, [ep(f"10.244.0.{i + 1}")]) for i, n in enumerate(NAMES)}
    state = full(services, slices).state
    sync = LBSync(AgentMetrics(), lambda *a: None)
    sync.start(FakeMaps(capacity={"services": 5, "slots": 100, "backends": 100}))
    assert sync.sync(state)
    assert full_plans, "admission plans in full"
    assert len(sync.maps.state.services) == 5 and list(sync.refused) == ["default/svc5"]
    assert sync.current == sync.maps.state


class SecondWriteFails(FakeMaps):
    def apply(self, p) -> None:
        if self.applied == 1 and not self.fail:
            self.fail.append(MapWriteError("boom"))
            self.applied += 1
        super().apply(p)


def test_a_failed_chunk_write_is_retried_in_full(full_plans):
    _, _, _, start = random_state(3)
    sync = LBSync(AgentMetrics(), lambda *a: None)
    sync.start(SecondWriteFails())
    assert not sync.sync(start.state)
    assert sync.stale and sync.current == sync.maps.state   # what the maps hold, read back
    assert 0 < len(sync.maps.state.services) < len(start.state.service_ports)  # the first chunk
    assert sync.sync(start.state) and not sync.stale
    assert plan(sync.maps.state, wanted_services(start.state)).writes == 0


def test_the_log_says_the_cold_start_was_chunked(full_plans, caplog):
    _, _, _, start = random_state(5)
    with caplog.at_level("INFO", logger="meshbpf.agent"):
        assert new_sync().sync(start.state)
    assert "(full plan, in chunks)" in caplog.text
