"""admit(): Services admitted one by one, whole, in a stable order (issue 9, item 3)."""

from __future__ import annotations

import random

from meshbpf.admission import admit
from meshbpf.reconcile import LBState, WantedService, check_capacity, plan
from reconcile_checks import backend, svc_key

A, B, C, D = "10.244.0.1", "10.244.0.2", "10.244.0.3", "10.244.0.4"
LABELS = {"services": "mbpf_svc", "slots": "mbpf_slots", "backends": "mbpf_backends"}
ROOMY = {"services": 1000, "slots": 1000, "backends": 1000}


def service(name: str, ip: str, ports: int, *addresses: str) -> dict:
    """`ports` frontends of Service default/<name>, each with these backends."""
    return {svc_key(ip, 80 + i): WantedService(f"default/{name}:p{i}",
                                               tuple((backend(a), 1) for a in addresses), 0,
                                               f"default/{name}")
            for i in range(ports)}


def programmed(want: dict) -> LBState:
    return plan(LBState(), want).apply_to(LBState())


def test_everything_is_admitted_when_it_fits():
    want = service("web", "10.96.0.10", 2, A, B) | service("api", "10.96.0.11", 1, C)
    result = admit(LBState(), want, ROOMY, LABELS)
    assert result.wanted == want and result.refused == []


def test_a_service_with_too_many_ports_is_left_out_whole_and_the_others_go_on():
    current = programmed(service("web", "10.96.0.10", 1, A, B))
    # web's endpoints move; "big" (3000 ports) cannot fit; "small" can.
    want = (service("web", "10.96.0.10", 1, A, C) | service("big", "10.96.0.20", 3000, D)
            | service("small", "10.96.0.30", 2, D))
    capacity = {"services": 10, "slots": 100, "backends": 100}
    result = admit(current, want, capacity, LABELS)
    assert [r.service for r in result.refused] == ["default/big"]
    assert not any(w.owner == "default/big" for w in result.wanted.values())  # none of its ports
    assert result.wanted.keys() == (service("web", "10.96.0.10", 1) | service("small", "10.96.0.30", 2)).keys()
    p = plan(current, result.wanted)
    check_capacity(current, p, capacity)
    after = p.apply_to(current)
    assert {b for b in after.backends.values()} == {backend(A), backend(C), backend(D)}  # web moved
    message = str(result.refused[0])
    assert "default/big" in message and "3000 frontend(s)" in message
    assert "mbpf_svc is full (it needs 3000 more entries, 9 of 10 are free)" in message  # before small, by name


def test_services_already_programmed_come_first_then_by_name():
    current = programmed(service("zeta", "10.96.0.10", 1, A))
    want = service("zeta", "10.96.0.10", 1, A) | service("alpha", "10.96.0.11", 1, B) \
        | service("beta", "10.96.0.12", 1, C)
    result = admit(current, want, {"services": 2}, LABELS)
    # zeta runs already and keeps running; alpha wins over beta by name.
    assert {w.owner for w in result.wanted.values()} == {"default/zeta", "default/alpha"}
    assert [r.service for r in result.refused] == ["default/beta"]


def test_a_programmed_service_that_outgrows_the_maps_keeps_its_previous_state():
    old = service("web", "10.96.0.10", 2, A)
    current = programmed(old)
    grown = service("web", "10.96.0.10", 6, A, B)   # 4 more ports, one more backend
    result = admit(current, grown, {"services": 4}, LABELS)
    assert [r.service for r in result.refused] == ["default/web"]
    assert result.refused[0].kept == 2
    assert plan(current, result.wanted).writes == 0  # left exactly as it was


def test_the_order_of_the_input_does_not_change_the_outcome():
    want = {}
    for i in range(30):
        want |= service(f"svc{i:02}", f"10.96.1.{i + 1}", 1 + i % 4, A, B)
    items = list(want.items())
    outcomes = set()
    for seed in range(5):
        random.Random(seed).shuffle(items)
        result = admit(LBState(), dict(items), {"services": 40}, LABELS)
        outcomes.add((frozenset(result.wanted), tuple(r.service for r in result.refused)))
    assert len(outcomes) == 1


def test_shared_backends_count_once_and_the_plan_always_fits():
    rng = random.Random(7)
    pool = [f"10.244.1.{i}" for i in range(1, 20)]
    current = LBState()
    for _ in range(20):
        want = {}
        for i in range(rng.randint(1, 25)):
            want |= service(f"s{rng.randint(0, 30)}", f"10.96.2.{i + 1}", rng.randint(1, 3),
                            *rng.sample(pool, rng.randint(1, 5)))
        capacity = {"services": 20, "slots": 60, "backends": 12}
        result = admit(current, want, capacity, LABELS)
        p = plan(current, result.wanted)
        check_capacity(current, p, capacity)   # raises if admission let too much in
        current = p.apply_to(current)


def test_backends_shared_with_running_services_need_no_room():
    current = programmed(service("web", "10.96.0.10", 1, A, B))
    want = service("web", "10.96.0.10", 1, A, B) | service("api", "10.96.0.11", 1, A, B)
    result = admit(current, want, {"backends": 2}, LABELS)
    assert result.refused == [] and result.wanted == want
