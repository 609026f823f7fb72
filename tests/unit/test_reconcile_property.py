"""Random sequences of desired states: every plan keeps the invariants.

hypothesis is not in the venv (and no dependency is added for it), so this is
a seeded random loop: each seed is a reproducible case, named in the test id.
"""

from __future__ import annotations

import ipaddress
import random

import pytest

from meshbpf.model import Endpoint
from meshbpf.reconcile import LBState, plan, wanted_services
from reconcile_checks import (check_minimal, check_realises, check_transition, desired,
                              entry_states, service_port)

V4_FRONTENDS = [(f"10.96.0.{i}", port, proto) for i in (1, 2, 3, 4)
                for port, proto in ((80, "TCP"), (53, "UDP"))]
V6_FRONTENDS = [("fd00:96::1", 80, "TCP"), ("fd00:96::2", 443, "TCP")]
V4_ENDPOINTS = [f"10.244.0.{i}" for i in range(1, 11)]
V6_ENDPOINTS = [f"fd00:244::{i}" for i in range(1, 6)]
CONDITIONS = [
    dict(ready=True, serving=True, terminating=False),
    dict(ready=True, serving=True, terminating=False),
    dict(ready=True, serving=True, terminating=False),
    dict(ready=False, serving=True, terminating=True),    # draining, still serving
    dict(ready=False, serving=False, terminating=True),   # draining, done
    dict(ready=False, serving=False, terminating=False),  # starting
]


def random_desired(rng: random.Random):
    sps = []
    for address, port, proto in V4_FRONTENDS + V6_FRONTENDS:
        if rng.random() < 0.3:
            continue
        pool = V6_ENDPOINTS if ":" in address else V4_ENDPOINTS
        chosen = rng.sample(pool, rng.randint(0, min(6, len(pool))))
        if rng.random() < 0.1 and chosen:
            chosen.append(chosen[0])  # the same endpoint from two slices
        eps = [Endpoint(ipaddress.ip_address(a), rng.choice((8080, 9090)),
                        **rng.choice(CONDITIONS)) for a in chosen]
        sps.append(service_port(address, port, eps, protocol=proto,
                                name=f"svc-{address}-{port}",
                                affinity=rng.choice((0, 0, 0, 30, 10800))))
    return desired(*sps)


def ids(state: LBState):
    return ({k: v.svc_id for k, v in state.services.items()},
            {v: k for k, v in state.backends.items()})


@pytest.mark.parametrize("seed", range(150))
def test_random_update_sequences_keep_every_invariant(seed):
    rng = random.Random(seed)
    state = LBState()
    for _ in range(8):
        want = wanted_services(random_desired(rng))
        p = plan(state, want)

        check_minimal(state, want, p)
        check_transition(state, want, p, granularity="step")   # after each step
        check_transition(state, want, p, granularity="entry")  # after each single write

        after = p.apply_to(state)
        check_realises(after, want)

        # IDs of what survives are kept.
        old_svc, old_be = ids(state)
        new_svc, new_be = ids(after)
        for key in old_svc.keys() & new_svc.keys():
            assert new_svc[key] == old_svc[key]
        for value in old_be.keys() & new_be.keys():
            assert new_be[value] == old_be[value]

        # Restart: reading the maps back and planning again writes nothing.
        assert plan(after.copy(), want).writes == 0

        # A crash somewhere in the middle, then a fresh plan from what was written.
        if p.writes and rng.random() < 0.5:
            cut = rng.randrange(p.writes)
            partial = state.copy()
            for i, s in enumerate(entry_states(state, p)):
                if i == cut:
                    partial = s
                    break
            retry = plan(partial, want)
            check_transition(partial, want, retry)
            recovered = retry.apply_to(partial)
            check_realises(recovered, want)
            assert plan(recovered, want).writes == 0
            for key in old_svc.keys() & want.keys():
                assert recovered.services[key].svc_id == old_svc[key]
            after = recovered

        state = after


def test_the_random_sequences_exercise_the_interesting_transitions():
    # Guards the property test against a generator that never reaches the
    # cases it is meant to check.
    from meshbpf.reconcile import SLOT_TERMINATING
    seen = set()
    for seed in range(150):
        rng = random.Random(seed)
        state = LBState()
        for _ in range(8):
            want = wanted_services(random_desired(rng))
            p = plan(state, want)
            for key, w in want.items():
                old = state.services.get(key)
                n = len(w.backends)
                if old is None:
                    seen.add("created")
                elif n > old.count:
                    seen.add("grew")
                elif 0 < n < old.count:
                    seen.add("shrank")
                elif n == 0 < old.count:
                    seen.add("emptied")
                if any(s == SLOT_TERMINATING for _, s in w.backends):
                    seen.add("terminating fallback")
            if p.service_deletes:
                seen.add("deleted")
            if p.slot_updates and any(k.svc_id in {v.svc_id for v in state.services.values()}
                                      for k in p.slot_updates):
                seen.add("slots rewritten in place")
            if p.backend_deletes:
                seen.add("backends freed")
            state = p.apply_to(state)
    assert seen == {"created", "grew", "shrank", "emptied", "terminating fallback", "deleted",
                    "slots rewritten in place", "backends freed"}
