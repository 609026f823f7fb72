"""LBMaps.read turns the maps' entries into an LBState with one int object
per value (state_from_entries): a read of pinned maps after a restart was
32 MB of duplicate ints at 100 000 Services. The state must equal what was
written, and every equal ID must be the same object."""

from __future__ import annotations

import ctypes as ct
import random

from meshbpf.datapath import maps
from meshbpf.datapath.layout import BY_ROLE, CODECS
from meshbpf.reconcile import LBState, plan, state_from_entries, wanted_services

from test_lb_chunks import random_state


class FakeTable:
    """What LBMaps.read asks of a bcc table: its entries as ctypes values."""

    def __init__(self, role: str, entries: dict):
        spec = BY_ROLE[role]
        _, key_into, _, val_into = CODECS[role]
        scalar_key = not issubclass(spec.key, ct.Structure)   # the backends' ID
        self.rows = [(spec.key(key_into(None, k)) if scalar_key else key_into(spec.key(), k),
                      val_into(spec.value(), v)) for k, v in entries.items()]

    def items_lookup_batch(self):
        return iter(self.rows)


def fresh(n: int) -> int:
    return int(str(n))  # a new object for any n above CPython's small-int cache


def written_state(seed: int) -> LBState:
    """What a plan writes, with IDs above CPython's small-int cache (whose
    ints are shared anyway), each field its own int object."""
    _, _, _, start = random_state(seed)
    s = plan(LBState(), wanted_services(start.state)).apply_to(LBState())
    big = 100_000
    return LBState({k: v._replace(svc_id=fresh(v.svc_id + big)) for k, v in s.services.items()},
                   {k._replace(svc_id=fresh(k.svc_id + big)): v._replace(backend_id=fresh(v.backend_id + big))
                    for k, v in s.slots.items()},
                   {fresh(b + big): v for b, v in s.backends.items()})


def ids_in(state: LBState) -> list[int]:
    return ([v.svc_id for v in state.services.values()] + [k.svc_id for k in state.slots]
            + [v.backend_id for v in state.slots.values()] + list(state.backends))


def test_a_read_equals_what_was_written_with_one_object_per_id():
    written = written_state(2)
    lb = maps.LBMaps({role: FakeTable(role, getattr(written, role)) for role in BY_ROLE}, {})
    read = lb.read()
    assert read == written
    by_value: dict[int, int] = {}
    for i in ids_in(read):
        assert by_value.setdefault(i, id(i)) == id(i), f"ID {i} read as two objects"


def test_state_from_entries_shares_ints_and_keeps_everything_else():
    rng = random.Random(5)
    big = written_state(3)
    pairs = {role: list(getattr(big, role).items()) for role in BY_ROLE}
    for p in pairs.values():
        rng.shuffle(p)
    state = state_from_entries(pairs)
    assert state == big
    assert len({id(i) for i in ids_in(state)}) == len(set(ids_in(state)))
    assert len({id(i) for i in ids_in(big)}) > len(set(ids_in(big))), "the test needs duplicate ints"
