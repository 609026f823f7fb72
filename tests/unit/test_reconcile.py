"""plan(): desired state -> the smallest ordered set of socket-LB map writes."""

from __future__ import annotations

import ipaddress

import pytest

from meshbpf.model import Endpoint
from meshbpf.reconcile import (SLOT_READY, SLOT_TERMINATING, CapacityError,
                               LBState, Plan, SlotKey, SlotVal, SvcKey, SvcVal, addr16,
                               check_capacity, plan, wanted_services)
from reconcile_checks import (backend, check_consistent, check_minimal, check_realises,
                              check_transition, desired, members, service_port, step_states,
                              svc_key, wanted)

WEB = svc_key("10.96.0.10", 80)
API = svc_key("10.96.0.11", 80)
DNS = svc_key("10.96.0.53", 53, 17)

A, B, C, D, E = "10.244.0.1", "10.244.0.2", "10.244.0.3", "10.244.0.4", "10.244.0.5"


def converge(want, state: LBState | None = None) -> tuple[LBState, Plan]:
    """Plans from state (empty by default), checks every invariant, applies."""
    state = state or LBState()
    p = plan(state, want)
    check_transition(state, want, p)
    check_minimal(state, want, p)
    after = p.apply_to(state)
    check_realises(after, want)
    return after, p


def addresses(state: LBState, key: SvcKey) -> list[str]:
    return [str(ipaddress.ip_address(b.addr[12:] if b.addr[:12] == b"\0" * 10 + b"\xff\xff"
                                      else b.addr)) for b, _ in members(state, key)]


# --- Map value forms ------------------------------------------------------------

def test_ipv4_addresses_are_stored_ipv4_mapped():
    assert addr16(ipaddress.ip_address("10.1.2.3")) == bytes(10) + b"\xff\xff" + bytes([10, 1, 2, 3])
    assert addr16(ipaddress.ip_address("fd00::1")) == ipaddress.ip_address("fd00::1").packed


def test_wanted_services_keys_frontends_by_address_port_and_protocol():
    ep = Endpoint(ipaddress.ip_address(A), 8080)
    want = wanted_services(desired(
        service_port("10.96.0.53", 53, [ep], protocol="UDP", name="dns", port_name="dns"),
        service_port("10.96.0.53", 53, [ep], protocol="TCP", name="dns", port_name="dns-tcp"),
    ))
    assert set(want) == {svc_key("10.96.0.53", 53, 17), svc_key("10.96.0.53", 53, 6)}
    assert want[svc_key("10.96.0.53", 53, 17)].backends == ((backend(A, 8080, 17), SLOT_READY),)
    assert want[svc_key("10.96.0.53", 53, 17)].name == "default/dns:dns"


def test_wanted_services_uses_only_usable_endpoints_and_marks_the_fallback():
    ip = ipaddress.ip_address
    ready = Endpoint(ip(A), 8080)
    term = Endpoint(ip(B), 8080, ready=False, serving=True, terminating=True)
    gone = Endpoint(ip(C), 8080, ready=False, serving=False, terminating=True)
    both = wanted_services(desired(service_port("10.96.0.10", 80, [term, ready, gone])))
    assert both[WEB].backends == ((backend(A), SLOT_READY),)
    fallback = wanted_services(desired(service_port("10.96.0.10", 80, [term, gone])))
    assert fallback[WEB].backends == ((backend(B), SLOT_TERMINATING),)
    none = wanted_services(desired(service_port("10.96.0.10", 80, [gone])))
    assert none[WEB].backends == ()


def test_wanted_services_drops_duplicate_endpoints_and_keeps_order_and_affinity():
    ip = ipaddress.ip_address
    eps = [Endpoint(ip(C), 8080), Endpoint(ip(A), 8080), Endpoint(ip(C), 8080)]
    want = wanted_services(desired(service_port("10.96.0.10", 80, eps, affinity=600,
                                                port_name="")))
    assert [b for b, _ in want[WEB].backends] == [backend(C), backend(A)]
    assert want[WEB].affinity_timeout == 600
    assert want[WEB].name == "default/web"


# --- Make-before-break ordering -----------------------------------------------------

def test_new_service_writes_backends_then_slots_then_the_frontend():
    p = plan(LBState(), {WEB: wanted("web", A, B)})
    steps = list(p.steps())
    assert [(s.map, s.op) for s in steps] == [
        ("backends", "update"), ("slots", "update"), ("services", "update")]
    bids = list(steps[0].entries)
    assert sorted(steps[0].entries.values()) == sorted([backend(A), backend(B)])
    (svc_id,) = {k.svc_id for k in steps[1].entries}
    assert steps[1].entries == {SlotKey(svc_id, 0): SlotVal(bids[0], SLOT_READY),
                                SlotKey(svc_id, 1): SlotVal(bids[1], SLOT_READY)}
    assert steps[2].entries == {WEB: SvcVal(svc_id, 2, 0)}
    assert p.writes == 5 and bool(p)


def test_removed_service_is_deleted_frontend_first_then_slots_then_backends():
    state, _ = converge({WEB: wanted("web", A, B)})
    p = plan(state, {})
    assert [(s.map, s.op) for s in p.steps()] == [
        ("services", "delete"), ("slots", "delete"), ("backends", "delete")]
    after = p.apply_to(state)
    assert after.services == {} and after.slots == {} and after.backends == {}
    check_transition(state, {}, p)


def test_update_runs_all_updates_before_any_delete():
    state, _ = converge({WEB: wanted("web", A, B, C, D), API: wanted("api", E)})
    p = plan(state, {WEB: wanted("web", A, B, E)})
    kinds = [(s.map, s.op) for s in p.steps()]
    assert kinds == [("slots", "update"), ("services", "update"), ("services", "delete"),
                     ("slots", "delete"), ("backends", "delete")]
    check_transition(state, {WEB: wanted("web", A, B, E)}, p, granularity="step")


def test_empty_steps_are_skipped():
    state, _ = converge({WEB: wanted("web", A)})
    p = plan(state, {WEB: wanted("web", A, affinity=30)})
    assert [(s.map, s.op) for s in p.steps()] == [("services", "update")]


def test_a_shrinking_service_lowers_its_count_before_its_slots_go():
    state, _ = converge({WEB: wanted("web", A, B, C)})
    p = plan(state, {WEB: wanted("web", A)})
    states = list(step_states(state, p))
    # After each step the count still only covers slots that exist.
    for s in states:
        check_consistent(s)
    assert [s.services[WEB].count for s in states] == [1, 1, 1]


def test_a_growing_service_raises_its_count_after_its_slots_exist():
    state, _ = converge({WEB: wanted("web", A)})
    p = plan(state, {WEB: wanted("web", A, B, C)})
    counts = [s.services[WEB].count for s in step_states(state, p)]
    assert counts == [1, 1, 3]  # backends, slots, then the count


def test_service_losing_every_endpoint_keeps_its_frontend_with_count_zero():
    state, _ = converge({WEB: wanted("web", A, B)})
    after, p = converge({WEB: wanted("web")}, state)
    assert after.services[WEB].count == 0
    assert after.services[WEB].svc_id == state.services[WEB].svc_id
    assert after.slots == {} and after.backends == {}


def test_service_replacing_all_endpoints_never_has_zero_backends():
    state, _ = converge({WEB: wanted("web", A, B)})
    after, p = converge({WEB: wanted("web", C, D)}, state)  # converge checks count > 0
    assert addresses(after, WEB) == [C, D]
    assert len(p.slot_updates) == 2 and not p.slot_deletes
    assert WEB not in p.service_updates  # same count, same affinity: untouched


# --- Minimal writes -------------------------------------------------------------

def test_unchanged_desired_state_writes_nothing():
    want = {WEB: wanted("web", A, B), API: wanted("api", B, C)}
    state, _ = converge(want)
    p = plan(state, want)
    assert p.writes == 0 and not p and list(p.steps()) == []


def test_removing_one_endpoint_of_four_rewrites_at_most_two_slots():
    for gone in (A, B, C, D):
        state, _ = converge({WEB: wanted("web", A, B, C, D)})
        left = [x for x in (A, B, C, D) if x != gone]
        after, p = converge({WEB: wanted("web", *left)}, state)
        assert len(p.slot_updates) + len(p.slot_deletes) <= 2, gone
        assert len(p.slot_deletes) == 1
        assert p.service_updates[WEB].count == 3
        assert [state.backends[b] for b in p.backend_deletes] == [backend(gone)]
        assert p.backend_updates == {}
        # The survivors that were in slots 0..2 did not move.
        before = addresses(state, WEB)
        now = addresses(after, WEB)
        for i in range(3):
            if before[i] != gone:
                assert now[i] == before[i]


def test_removing_the_last_slots_endpoint_only_deletes_that_slot():
    state, _ = converge({WEB: wanted("web", A, B, C, D)})
    _, p = converge({WEB: wanted("web", A, B, C)}, state)
    assert p.slot_updates == {}
    assert p.slot_deletes == [SlotKey(state.services[WEB].svc_id, 3)]


def test_adding_one_endpoint_writes_one_backend_one_slot_and_the_count():
    state, _ = converge({WEB: wanted("web", A, B, C, D)})
    after, p = converge({WEB: wanted("web", A, B, C, D, E)}, state)
    assert list(p.backend_updates.values()) == [backend(E)]
    assert list(p.slot_updates) == [SlotKey(state.services[WEB].svc_id, 4)]
    assert p.service_updates == {WEB: SvcVal(state.services[WEB].svc_id, 5, 0)}
    assert p.writes == 3


def test_endpoint_order_change_alone_writes_nothing():
    state, _ = converge({WEB: wanted("web", A, B, C)})
    p = plan(state, {WEB: wanted("web", C, A, B)})
    assert p.writes == 0


def test_swapping_one_endpoint_rewrites_its_slot_in_place():
    state, _ = converge({WEB: wanted("web", A, B, C)})
    after, p = converge({WEB: wanted("web", A, E, C)}, state)
    sid = state.services[WEB].svc_id
    assert list(p.slot_updates) == [SlotKey(sid, 1)]
    assert addresses(after, WEB) == [A, E, C]
    assert p.service_updates == {}


def test_affinity_change_rewrites_only_the_frontend():
    state, _ = converge({WEB: wanted("web", A, B)})
    _, p = converge({WEB: wanted("web", A, B, affinity=10800)}, state)
    assert p.writes == 1
    assert p.service_updates[WEB].affinity_timeout == 10800


def test_endpoint_falling_back_to_terminating_rewrites_its_slot_state():
    state, _ = converge({WEB: wanted("web", A, B)})
    after, p = converge({WEB: wanted("web", A, B, state=SLOT_TERMINATING)}, state)
    assert len(p.slot_updates) == 2 and p.writes == 2
    assert {s.state for s in after.slots.values()} == {SLOT_TERMINATING}


def test_backend_shared_by_two_services_is_stored_once():
    state, p = converge({WEB: wanted("web", A, B), API: wanted("api", B, C)})
    assert len(state.backends) == 3
    assert len(p.backend_updates) == 3


def test_backend_still_used_by_another_service_is_not_deleted():
    state, _ = converge({WEB: wanted("web", A, B), API: wanted("api", B)})
    after, p = converge({WEB: wanted("web", A), API: wanted("api", B)}, state)
    assert p.backend_deletes == []
    assert backend(B) in after.backends.values()


def test_same_address_and_port_with_another_protocol_is_another_backend():
    want = {DNS: wanted("dns", A), svc_key("10.96.0.53", 53): wanted("dns-tcp", A)}
    want[DNS] = want[DNS]._replace(backends=((backend(A, 8080, 17), SLOT_READY),))
    state, _ = converge(want)
    assert sorted(b.proto for b in state.backends.values()) == [6, 17]


def test_ipv4_and_ipv6_frontends_coexist():
    v6 = svc_key("fd00:96::10", 80)
    state, _ = converge({WEB: wanted("web", A), v6: wanted("web", "fd00:244::1")})
    assert len(state.services) == 2
    assert backend("fd00:244::1") in state.backends.values()


# --- IDs ----------------------------------------------------------------------------

def test_restart_with_the_same_desired_state_writes_nothing():
    want = {WEB: wanted("web", A, B, C), API: wanted("api", C, D), DNS: wanted("dns")}
    state, _ = converge(want)
    # The agent restarts: it reads the maps back into a fresh LBState.
    reread = LBState(dict(state.services), dict(state.slots), dict(state.backends))
    assert plan(reread, want).writes == 0


def test_restart_reuses_ids_it_did_not_choose():
    # Maps written by an earlier run with arbitrary ids and slot order.
    state = LBState(
        services={WEB: SvcVal(41, 2, 0), API: SvcVal(7, 1, 600)},
        slots={SlotKey(41, 0): SlotVal(900, SLOT_READY), SlotKey(41, 1): SlotVal(13, SLOT_READY),
               SlotKey(7, 0): SlotVal(13, SLOT_READY)},
        backends={900: backend(B), 13: backend(A)},
    )
    want = {WEB: wanted("web", A, B), API: wanted("api", A, affinity=600)}
    assert plan(state, want).writes == 0
    # A change keeps every id that survives.
    after, p = converge({WEB: wanted("web", A, B, C), API: wanted("api", A, affinity=600)}, state)
    assert after.services[WEB].svc_id == 41 and after.services[API].svc_id == 7
    assert {after.backends[900], after.backends[13]} == {backend(A), backend(B)}
    (new_bid,) = p.backend_updates
    assert new_bid > 900


def test_new_ids_are_above_every_id_in_use_so_freed_ids_are_not_reused_at_once():
    state, _ = converge({WEB: wanted("web", A), API: wanted("api", B)})
    top_svc = max(sv.svc_id for sv in state.services.values())
    top_backend = max(state.backends)
    # Drop API (the highest ids) and add a new service with a new backend.
    new = svc_key("10.96.0.12", 80)
    after, p = converge({WEB: wanted("web", A), new: wanted("new", C)}, state)
    assert after.services[new].svc_id > top_svc
    (bid,) = p.backend_updates
    assert bid > top_backend
    assert after.services[WEB] == state.services[WEB]


def test_ids_are_never_zero():
    state, _ = converge({WEB: wanted("web", A, B)})
    assert 0 not in state.backends
    assert all(sv.svc_id != 0 for sv in state.services.values())


def test_ids_wrap_around_to_the_lowest_free_id_after_the_u32_maximum():
    top = 0xFFFFFFFF
    state = LBState(services={WEB: SvcVal(top, 1, 0)},
                    slots={SlotKey(top, 0): SlotVal(top, SLOT_READY)},
                    backends={top: backend(A)})
    after, p = converge({WEB: wanted("web", A), API: wanted("api", B)}, state)
    assert after.services[API].svc_id == 1
    assert list(p.backend_updates) == [1]


def test_orphans_left_by_a_crash_are_cleaned_up():
    state, _ = converge({WEB: wanted("web", A)})
    bid_a = next(iter(state.backends))
    crashed = state.copy()
    crashed.slots[SlotKey(99, 0)] = SlotVal(bid_a, SLOT_READY)  # slots of a deleted service
    crashed.slots[SlotKey(99, 1)] = SlotVal(bid_a, SLOT_READY)
    crashed.backends[500] = backend(E)                          # an unreferenced backend
    p = plan(crashed, {WEB: wanted("web", A)})
    assert sorted(p.slot_deletes) == [SlotKey(99, 0), SlotKey(99, 1)]
    assert p.backend_deletes == [500]
    check_realises(p.apply_to(crashed), {WEB: wanted("web", A)})


def test_a_backend_stored_twice_is_merged_onto_one_id():
    state = LBState(services={WEB: SvcVal(1, 2, 0)},
                    slots={SlotKey(1, 0): SlotVal(5, SLOT_READY), SlotKey(1, 1): SlotVal(3, SLOT_READY)},
                    backends={5: backend(A), 3: backend(A)})
    # (A service listing one backend twice cannot come from wanted_services,
    # but the maps may hold it after a crash.)
    p = plan(state, {WEB: wanted("web", A)})
    after = p.apply_to(state)
    check_realises(after, {WEB: wanted("web", A)})
    assert list(after.backends) == [3]


def test_new_service_taking_an_id_with_orphan_slots_overwrites_them_safely():
    state, _ = converge({WEB: wanted("web", A)})
    bid_a = next(iter(state.backends))
    top = state.services[WEB].svc_id
    crashed = state.copy()
    # Slots of a service whose frontend was deleted, with the next id.
    crashed.slots.update({SlotKey(top + 1, i): SlotVal(bid_a, SLOT_READY) for i in range(3)})
    want = {WEB: wanted("web", A), API: wanted("api", A, B)}
    p = plan(crashed, want)
    check_transition(crashed, want, p)
    check_realises(p.apply_to(crashed), want)


# --- Recovery from a partly applied plan -------------------------------------------

def test_plan_after_a_crash_at_every_point_finishes_the_update():
    before_want = {WEB: wanted("web", A, B, C, D), API: wanted("api", D)}
    after_want = {WEB: wanted("web", B, C, E), DNS: wanted("dns", E, A)}
    state, _ = converge(before_want)
    p = plan(state, after_want)
    for cut in range(p.writes + 1):
        partial = state.copy()
        for i, (step_map, op, key, value) in enumerate(
                (s.map, s.op, k, v) for s in p.steps() for k, v in s.entries.items()):
            if i == cut:
                break
            target = getattr(partial, step_map)
            if op == "update":
                target[key] = value
            else:
                del target[key]
        check_consistent(partial)
        retry = plan(partial, after_want)
        check_transition(partial, after_want, retry)
        check_realises(retry.apply_to(partial), after_want)
        # Surviving services keep their ids across the crash.
        assert retry.apply_to(partial).services[WEB].svc_id == state.services[WEB].svc_id


# --- Capacity ------------------------------------------------------------------------

def test_capacity_check_counts_the_peak_while_the_plan_runs():
    state, _ = converge({WEB: wanted("web", A, B)})
    p = plan(state, {WEB: wanted("web", C, D)})  # final: 2 backends; peak: 4
    check_capacity(state, p, {"services": 1, "slots": 2, "backends": 4})
    with pytest.raises(CapacityError) as exc:
        check_capacity(state, p, {"services": 1, "slots": 2, "backends": 3})
    assert "backends map needs 4 entries, it holds 3" in str(exc.value)


def test_capacity_check_names_every_map_that_overflows():
    p = plan(LBState(), {WEB: wanted("web", A, B, C), API: wanted("api", A)})
    with pytest.raises(CapacityError) as exc:
        check_capacity(LBState(), p, {"services": 1, "slots": 3, "backends": 3})
    text = str(exc.value)
    assert "services map needs 2 entries, it holds 1" in text
    assert "slots map needs 4 entries, it holds 3" in text
    assert "backends" not in text.split("(")[0]


def test_capacity_check_ignores_maps_without_a_limit_and_fits_exactly():
    p = plan(LBState(), {WEB: wanted("web", A, B, C)})
    check_capacity(LBState(), p, {})
    check_capacity(LBState(), p, {"services": 1, "slots": 3, "backends": 3})


def test_capacity_counts_rewritten_keys_once():
    state, _ = converge({WEB: wanted("web", A, B, C)})
    p = plan(state, {WEB: wanted("web", A, D, C)})
    check_capacity(state, p, {"services": 1, "slots": 3, "backends": 4})
    with pytest.raises(CapacityError):
        check_capacity(state, p, {"slots": 3, "backends": 3})
