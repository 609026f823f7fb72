"""The incremental planner leaves the maps exactly as the full plan would.

Random sequences of changes (seeded, like test_reconcile_property.py): at
each step a random subset of frontends changes (added, removed, other
endpoints, other conditions, other affinity). From the same starting maps,
plan_services() over the touched frontends and plan() over the whole wanted
state must give the same writes: same IDs, same slots, same deletes.
"""

from __future__ import annotations

import random

import pytest

from meshbpf.reconcile import LBState, Plan, SlotVal, check_capacity, plan, wanted_services
from meshbpf.reconcile.incremental import LBIndex, SlotRow, plan_services
from reconcile_checks import check_realises, check_transition
from test_reconcile_property import random_desired


def random_changes(rng: random.Random, wanted: dict) -> dict:
    """A random subset of frontends, each with its next wanted value (None: removed)."""
    target = wanted_services(random_desired(rng))
    keys = list(wanted.keys() | target.keys())
    rng.shuffle(keys)
    return {k: target.get(k) for k in keys[: rng.randint(1, max(1, len(keys) // 2))]}


def with_changes(wanted: dict, changes: dict) -> dict:
    """The whole wanted state after `changes`, with the changed frontends last
    and in the order of `changes` (the order new IDs are handed out in)."""
    out = {k: v for k, v in wanted.items() if k not in changes}
    out.update((k, v) for k, v in changes.items() if v is not None)
    return out


def as_sets(p: Plan):
    return (p.backend_updates, p.slot_updates, p.service_updates,
            set(p.service_deletes), set(p.slot_deletes), set(p.backend_deletes))


def same_index(a: LBIndex, b: LBIndex, state: LBState) -> None:
    assert a.backend_id == b.backend_id
    assert a.refs == b.refs
    assert a.slots_by_svc == b.slots_by_svc
    assert a.svc_ids == b.svc_ids
    assert (a.top_backend(state.backends), a.top_svc()) == (b.top_backend(state.backends), b.top_svc())


@pytest.mark.parametrize("seed", range(200))
def test_incremental_plans_equal_full_plans_over_random_change_sequences(seed):
    rng = random.Random(seed)
    wanted = wanted_services(random_desired(rng))
    state = plan(LBState(), wanted).apply_to(LBState())
    index = LBIndex(state)
    for _ in range(12):
        changes = random_changes(rng, wanted)
        full_wanted = with_changes(wanted, changes)

        incremental = plan_services(state, index, changes)
        full = plan(state, full_wanted)
        assert as_sets(incremental) == as_sets(full)
        # The same make-before-break order, write by write.
        check_transition(state, full_wanted, incremental, granularity="entry")

        index.apply(incremental, state)
        check_realises(state, full_wanted)
        same_index(index, LBIndex(state), state)  # the kept index is the one a fresh read gives
        assert plan(state, full_wanted).writes == 0
        wanted = full_wanted


@pytest.mark.parametrize("seed", range(50))
def test_two_chains_from_the_same_start_end_in_the_same_maps(seed):
    """One chain only ever plans incrementally, the other only fully: after
    every change both hold the same maps, IDs included."""
    rng = random.Random(1000 + seed)
    wanted = wanted_services(random_desired(rng))
    start = plan(LBState(), wanted).apply_to(LBState())
    inc_state, full_state = start.copy(), start.copy()
    index = LBIndex(inc_state)
    for _ in range(20):
        changes = random_changes(rng, wanted)
        wanted = with_changes(wanted, changes)
        index.apply(plan_services(inc_state, index, changes), inc_state)
        full_state = plan(full_state, wanted).apply_to(full_state)
        assert inc_state == full_state


def test_an_unchanged_frontend_writes_nothing_and_a_moved_endpoint_one_slot():
    rng = random.Random(7)
    wanted = wanted_services(random_desired(rng))
    state = plan(LBState(), wanted).apply_to(LBState())
    index = LBIndex(state)
    key, want = next((k, w) for k, w in wanted.items() if len(w.backends) >= 2)
    assert plan_services(state, index, {key: want}).writes == 0
    moved = want._replace(backends=want.backends[:-1] + (
        (want.backends[-1][0]._replace(port=12345), want.backends[-1][1]),))
    p = plan_services(state, index, {key: moved})
    assert len(p.slot_updates) == 1 and len(p.backend_updates) == 1
    assert not p.service_updates


def test_capacity_is_checked_on_the_incremental_plan():
    from meshbpf.reconcile import CapacityError
    rng = random.Random(3)
    wanted = wanted_services(random_desired(rng))
    state = plan(LBState(), wanted).apply_to(LBState())
    index = LBIndex(state)
    target = wanted_services(random_desired(random.Random(99)))
    changes = {k: v for k, v in target.items() if k not in wanted}
    assert changes
    p = plan_services(state, index, changes)
    full = len(state.services)
    with pytest.raises(CapacityError, match="services map needs"):
        check_capacity(state, p, {"services": full})


def test_a_slot_row_reads_as_the_dict_of_slots_it_stands_for():
    a, b, c = SlotVal(7, 1), SlotVal(8, 1), SlotVal(9, 2)
    slots = {0: a, 1: b, 3: c}  # a gap, as a broken map might have
    row = SlotRow().edited(slots)
    assert row.items() == sorted(slots.items())
    assert [row.get(i) for i in range(6)] == [slots.get(i) for i in range(6)]
    assert row.get(-1) is None and row.get(2, "none") == "none"
    assert row.edited({1: None, 3: None}) == SlotRow((a,))  # trailing gaps trimmed
    assert not row.edited({0: None, 1: None, 3: None})      # no slot left: empty
