"""Planning only what a change touches, in time proportional to the change.

`plan()` rebuilds, on every call, views of the whole maps: backend IDs by
value, slots by service, the highest IDs in use, which backends are still
referenced. At 100 000 Services that is most of the cost of a one-line
change. `LBIndex` keeps those views next to an LBState and is updated with
each applied plan; `plan_services()` reads them and plans the touched
frontends only.

The result is the full plan's, exactly: the same IDs (new ones above the
highest in use, handed out in the order of `changes`), the same slot
positions, the same deletes. That holds when the maps are what a plan made
them (every slot names a live backend, one backend ID per value, no orphan
slot), which is what the agent keeps them; the periodic resync runs the full
plan, which also repairs anything else (tests/unit/test_incremental.py
checks the equality over random change sequences).
"""

from __future__ import annotations

from typing import Mapping

from . import (BackendVal, LBState, Plan, SlotKey, SlotVal, SvcKey, SvcVal, WantedService,
               _IdAllocator, _slot_layout)
from .compact import DeleteCount


class SlotRow(tuple):
    """A service's slots by position (None: no slot there), read as the
    dict of them plan() builds: a tuple of four is 72 bytes, such a dict
    224, and the index keeps one per Service."""

    __slots__ = ()

    def get(self, i: int, default: SlotVal | None = None) -> SlotVal | None:
        val = self[i] if 0 <= i < len(self) else None
        return default if val is None else val

    def items(self) -> list[tuple[int, SlotVal]]:
        return [(i, val) for i, val in enumerate(self) if val is not None]

    def edited(self, changes: dict[int, SlotVal | None]) -> "SlotRow":
        """This row with `changes` (None: the slot goes) applied."""
        slots = list(self)
        slots += [None] * (max(changes) + 1 - len(slots))
        for i, val in changes.items():
            slots[i] = val
        while slots and slots[-1] is None:
            slots.pop()
        return SlotRow(slots)


class LBIndex:
    """What plan() derives from an LBState, kept up to date instead. The
    backend IDs in use are the state's own backends map (a set of them was
    16 MB at 100 000 Services)."""

    def __init__(self, state: LBState):
        self.backend_id: dict[BackendVal, int] = {}
        for bid, val in sorted(state.backends.items()):
            self.backend_id.setdefault(val, bid)
        self.refs: dict[int, int] = {}  # backend ID -> slots naming it
        slots: dict[int, dict[int, SlotVal | None]] = {}
        for key, val in state.slots.items():
            slots.setdefault(key.svc_id, {})[key.slot] = val
            self.refs[val.backend_id] = self.refs.get(val.backend_id, 0) + 1
        self.slots_by_svc: dict[int, SlotRow] = {svc: _EMPTY.edited(row) for svc, row in slots.items()}
        del slots
        self.svc_ids: set[int] = {v.svc_id for v in state.services.values()}
        self._top_backend: int | None = None
        self._top_svc: int | None = None
        self.backend_churn = DeleteCount()  # the three dicts keyed by backend

    def top_backend(self, backends: dict[int, BackendVal]) -> int:
        """The highest backend ID in use; `backends`: the state's."""
        if self._top_backend is None:
            self._top_backend = max(backends, default=0)
        return self._top_backend

    def top_svc(self) -> int:
        if self._top_svc is None:
            self._top_svc = max(self.svc_ids, default=0)
        return self._top_svc

    def apply(self, p: Plan, state: LBState) -> None:
        """Applies `p` to `state` in place and updates the index with it."""
        for key, val in p.backend_updates.items():
            old = state.backends.get(key)
            if old is not None and self.backend_id.get(old) == key:
                del self.backend_id[old]
            if self.backend_id.get(val, key + 1) > key:
                self.backend_id[val] = key
            if self._top_backend is not None and key > self._top_backend:
                self._top_backend = key
        rows: dict[int, dict[int, SlotVal | None]] = {}  # the slot changes, by service
        for key, val in p.slot_updates.items():
            self._unref(state.slots.get(key))
            rows.setdefault(key.svc_id, {})[key.slot] = val
            self.refs[val.backend_id] = self.refs.get(val.backend_id, 0) + 1
        for sval in p.service_updates.values():  # a frontend keeps its ID: only new ones
            self.svc_ids.add(sval.svc_id)
            if self._top_svc is not None and sval.svc_id > self._top_svc:
                self._top_svc = sval.svc_id
        for key in p.service_deletes:
            old_svc = state.services.get(key)
            if old_svc is not None:
                self.svc_ids.discard(old_svc.svc_id)
                if old_svc.svc_id == self._top_svc:
                    self._top_svc = None
        for key in p.slot_deletes:
            self._unref(state.slots.get(key))
            rows.setdefault(key.svc_id, {})[key.slot] = None
        for svc_id, changes in rows.items():
            row = self.slots_by_svc.get(svc_id, _EMPTY).edited(changes)
            if row:
                self.slots_by_svc[svc_id] = row
            else:
                self.slots_by_svc.pop(svc_id, None)
        for key in p.backend_deletes:
            old = state.backends.get(key)
            if old is not None and self.backend_id.get(old) == key:
                del self.backend_id[old]
            if key == self._top_backend:
                self._top_backend = None
        p.apply_in_place(state)
        self.backend_churn.add(len(p.backend_deletes), state.backends, self.backend_id, self.refs)

    def _unref(self, slot: SlotVal | None) -> None:
        if slot is None:
            return
        left = self.refs.get(slot.backend_id, 0) - 1
        if left > 0:
            self.refs[slot.backend_id] = left
        else:
            self.refs.pop(slot.backend_id, None)


_EMPTY = SlotRow()


def made_by_a_plan(state: LBState) -> bool:
    """Whether `state` is as plans leave the maps (what plan_services()
    needs to equal the full plan): each frontend its own service ID, every
    slot of a frontend and naming a stored backend, one backend ID per
    value. A crash inside a plan's deletes can leave a slot of no frontend
    (the frontend goes first), as can maps edited by hand: the full plan
    repairs those."""
    svc_ids = {v.svc_id for v in state.services.values()}
    if len(svc_ids) != len(state.services):
        return False
    backends = state.backends
    if any(k.svc_id not in svc_ids or v.backend_id not in backends for k, v in state.slots.items()):
        return False
    return len(set(backends.values())) == len(backends)


def plan_services(current: LBState, index: LBIndex,
                  changes: Mapping[SvcKey, WantedService | None]) -> Plan:
    """What to write so that each frontend in `changes` holds what it maps to
    (None: the frontend goes away); every other frontend is left alone.

    Pure: reads `current` and `index` (which must describe `current`), writes
    nothing. The same as plan(current, wanted) for the wanted state that
    differs from what the maps hold at exactly these frontends, with new IDs
    handed out in the order of `changes`."""
    p = Plan()
    backend_ids = _IdAllocator(current.backends.keys(), top=index.top_backend(current.backends))
    svc_ids = _IdAllocator(index.svc_ids, top=index.top_svc())
    new_backend: dict[BackendVal, int] = {}
    ref_delta: dict[int, int] = {}

    def count(bid: int, by: int) -> None:
        ref_delta[bid] = ref_delta.get(bid, 0) + by

    for key, want in changes.items():
        old = current.services.get(key)
        old_slots = index.slots_by_svc.get(old.svc_id, {}) if old else {}
        if want is None:
            if old is not None:
                p.service_deletes.append(key)
                for i, slot in old_slots.items():
                    p.slot_deletes.append(SlotKey(old.svc_id, i))
                    count(slot.backend_id, -1)
            continue

        members: list[tuple[int, int]] = []  # one per slot, as in plan()
        for be, state in want.backends:
            bid = index.backend_id.get(be)
            if bid is None:
                bid = new_backend.get(be)
                if bid is None:
                    bid = new_backend[be] = backend_ids.take()
                    p.backend_updates[bid] = be
            members.append((bid, state))

        svc_id = old.svc_id if old else svc_ids.take()
        layout = _slot_layout(old_slots, old.count if old else 0, members)
        for i, (bid, state) in enumerate(layout):
            val = SlotVal(bid, state)
            if old_slots.get(i) != val:
                p.slot_updates[SlotKey(svc_id, i)] = val
        for i, slot in old_slots.items():
            count(slot.backend_id, -1)
            if i >= len(layout):
                p.slot_deletes.append(SlotKey(svc_id, i))
        for bid, _ in layout:
            count(bid, +1)
        new_val = SvcVal(svc_id, len(layout), want.affinity_timeout, want.flags)
        if old != new_val:
            p.service_updates[key] = new_val

    # A backend goes when no slot names it any more, as in plan().
    for bid, delta in ref_delta.items():
        if delta < 0 and bid in current.backends and index.refs.get(bid, 0) + delta <= 0:
            p.backend_deletes.append(bid)
    return p
