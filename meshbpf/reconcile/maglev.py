"""Maglev consistent hashing: one lookup table per service (issue 12).

Eisenbud et al., "Maglev: A Fast and Reliable Software Network Load
Balancer", NSDI 2016, section 3.4. Each backend walks its own permutation
of the M table slots (M prime; slot_j = (offset + j * skip) mod M) and the
backends take turns claiming the next free slot of their permutation until
every slot is taken. A flow goes to table[flow_hash % M]. Removing a
backend hands its slots to others and moves few of the rest; adding one
likewise (the disruption figures are in tests/unit/test_maglev.py).

Every node must build the same table for the same backend set, or a flow
that an ECMP change sends to another node would land on another backend.
So the table depends only on the backends' identities ("addr:port", the
address in its canonical form) and weights, never on their order of
arrival, the node, or Python's per-process hash randomisation:
  - offset and skip come from keyed BLAKE2b of the identity (hashlib, the
    same bytes in every interpreter), as Cilium and Katran derive them
    from a seeded MurmurHash3 of the backend;
  - the backends take their turns in the order of their identities.

M = 65537 by default (Katran's size): the disruption falls as M / N grows,
and at 100 backends 65537 keeps it under the issue's 1 % target (0.56 %
median, 0.67 % worst, beyond the removed backend's own slots: bench/maglev.py)
where Cilium's default, 16381, does not (1.2-1.4 %); 16381 remains for services known to be small, at
a quarter of the build time and map memory. The size is part of the
table's definition: every node must use the same one for a service.

Weights (Envoy's weighted Maglev): a backend of weight w takes a turn in
round t when t * w reaches its next target, so over the rounds it claims
slots in proportion to w. Weight 0 leaves the backend out.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
from array import array
from typing import Iterable, NamedTuple

SMALL_TABLE = 16381
LARGE_TABLE = 65537
TABLE_SIZES = (251, 509, 1021, 2039, 4093, 8191, SMALL_TABLE, 32749, LARGE_TABLE, 131071)
# Part of the table's definition: change it and every node must change with it.
_HASH_KEY = b"meshbpf-maglev-v1"


class Backend(NamedTuple):
    addr: str
    port: int
    weight: int = 1


class MaglevTable(NamedTuple):
    backends: tuple[str, ...]  # identities, sorted
    slots: array               # slots[j]: index into backends; empty with no backends

    @property
    def size(self) -> int:
        return len(self.slots)

    def lookup(self, flow_hash: int) -> str | None:
        """The backend identity for a flow's hash; None with no backends."""
        if not self.backends:
            return None
        return self.backends[self.slots[flow_hash % len(self.slots)]]

    def shares(self) -> dict[str, int]:
        """Slots per backend identity."""
        counts = [0] * len(self.backends)
        for index in self.slots:
            counts[index] += 1
        return dict(zip(self.backends, counts))


def identity(addr: str, port: int) -> str:
    """"10.0.0.1:80", "[fd00::1]:80": one spelling per address ("fd00::0001" too)."""
    ip = ipaddress.ip_address(addr)
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def offset_skip(ident: str, size: int) -> tuple[int, int]:
    """The backend's permutation: start slot and stride (1..size-1, so with
    size prime it visits every slot once)."""
    digest = hashlib.blake2b(ident.encode(), digest_size=16, key=_HASH_KEY).digest()
    return (int.from_bytes(digest[:8], "little") % size,
            int.from_bytes(digest[8:], "little") % (size - 1) + 1)


def build(backends: Iterable[Backend | tuple], size: int = LARGE_TABLE) -> MaglevTable:
    """The lookup table for these backends (any order; (addr, port[, weight]))."""
    if size not in TABLE_SIZES:
        raise ValueError(f"maglev table size {size}: use one of {', '.join(map(str, TABLE_SIZES))}")
    weights = _weights(backends)
    idents = tuple(sorted(weights))
    if not idents:
        return MaglevTable((), array("I"))
    perms = [offset_skip(ident, size) for ident in idents]
    ws = [weights[ident] for ident in idents]
    if len(idents) == 1:
        # every turn is its turn: the loops would claim each slot for it
        # (65537 probes, ~12 ms; a Service with one endpoint is common)
        slots = [0] * size
    elif len(set(ws)) == 1:
        slots = _populate(perms, size)
    else:
        slots = _populate_weighted(perms, ws, size)
    return MaglevTable(idents, array("I", slots))


def _weights(backends: Iterable[Backend | tuple]) -> dict[str, int]:
    weights: dict[str, int] = {}
    for backend in backends:
        b = Backend(*backend)
        if isinstance(b.port, bool) or not isinstance(b.port, int) or not 0 < b.port < 65536:
            raise ValueError(f"maglev backend {b.addr}: port {b.port!r} is not 1..65535")
        if isinstance(b.weight, bool) or not isinstance(b.weight, int) or b.weight < 0:
            raise ValueError(f"maglev backend {b.addr}:{b.port}: weight {b.weight!r} "
                             "is not an integer >= 0")
        ident = identity(b.addr, b.port)
        if ident in weights:
            raise ValueError(f"maglev backend {ident} is listed twice")
        weights[ident] = b.weight
    return {ident: w for ident, w in weights.items() if w > 0}


def _populate(perms: list[tuple[int, int]], size: int) -> list[int]:
    """The paper's Populate loop, equal weights. The hot path: slots are
    claimed in a flat list, each backend's next position kept (not its whole
    permutation), the wrap done by a subtraction instead of a modulo. The
    last _tail(size) slots are found another way (_populate_tail): by then
    most probes would hit taken slots."""
    entry = [-1] * size
    taken = bytearray(size)
    pos = [offset for offset, _ in perms]
    skips = [skip for _, skip in perms]
    head = size - _tail(size)
    filled = 0
    turn = 0  # whose turn comes when the head is done
    n = len(perms)
    while filled < head:
        for i in range(n):
            c = pos[i]
            s = skips[i]
            while taken[c]:
                c += s
                if c >= size:
                    c -= size
            taken[c] = 1
            entry[c] = i
            c += s
            pos[i] = c - size if c >= size else c
            filled += 1
            if filled == head:
                turn = i + 1
                break
    _populate_tail(entry, taken, pos, perms, turn % n, size)
    return entry


def _tail(size: int) -> int:
    """How many slots the scan claims. Probing costs size / free per claim,
    a scan of the free slots costs free: they meet near sqrt(size). Measured
    (3 to 1 000 backends): sqrt(size) is within ~10 % of the best tail at
    every size from 251 to 65537; a fixed 256 made small tables 1.3-20x
    slower (251 slots, 3 backends: 1.6 ms against 0.08), since every slot of
    a table under 256 went to the scan, whose cost grows as size squared."""
    return math.isqrt(size)


def _populate_tail(entry: list[int], taken: bytearray, pos: list[int],
                   perms: list[tuple[int, int]], turn: int, size: int) -> None:
    """Claims the last free slots, the same ones the probing would (see
    _claim_free), backends taking turns from `turn` on."""
    free = _free_slots(taken)
    inverses = [pow(skip, -1, size) for _, skip in perms]
    n = len(perms)
    i = turn
    while free:
        _claim_free(entry, free, pos, perms[i][1], inverses[i], i, size)
        i = i + 1 if i + 1 < n else 0


def _free_slots(taken: bytearray) -> list[int]:
    free = []
    slot = taken.find(0)
    while slot >= 0:
        free.append(slot)
        slot = taken.find(0, slot + 1)
    return free


def _claim_free(entry: list[int], free: list[int], pos: list[int], skip: int, inverse: int,
                i: int, size: int) -> None:
    """Backend i's next free slot is the free slot the fewest strides ahead
    of its position: (slot - position) * skip^-1 mod size strides (size is
    prime, so skip has an inverse)."""
    c = pos[i]
    slot = min(free, key=lambda f: (f - c) * inverse % size)
    free.remove(slot)
    entry[slot] = i
    c = slot + skip
    pos[i] = c - size if c >= size else c


def _populate_weighted(perms: list[tuple[int, int]], weights: list[int], size: int) -> list[int]:
    """Round t: backend i takes a turn when t * w_i reaches its target, which
    then grows by the largest weight; the heaviest backend takes every round.
    Probing, then the last _tail(size) slots by _claim_free, as _populate."""
    entry = [-1] * size
    taken = bytearray(size)
    pos = [offset for offset, _ in perms]
    skips = [skip for _, skip in perms]
    top = max(weights)
    targets = [top] * len(perms)
    n = len(perms)
    head = size - _tail(size)
    filled = 0
    rnd = 0
    resume = n  # where the tail takes up round rnd; n: at the next round
    while filled < head:
        rnd += 1
        for i, w in enumerate(weights):
            if rnd * w < targets[i]:
                continue
            targets[i] += top
            c = pos[i]
            s = skips[i]
            while taken[c]:
                c += s
                if c >= size:
                    c -= size
            taken[c] = 1
            entry[c] = i
            c += s
            pos[i] = c - size if c >= size else c
            filled += 1
            if filled == head:
                resume = i + 1
                break
    free = _free_slots(taken)
    inverses = [pow(skip, -1, size) for skip in skips]
    i = resume
    while free:
        if i == n:
            rnd += 1
            i = 0
        if rnd * weights[i] >= targets[i]:
            targets[i] += top
            _claim_free(entry, free, pos, skips[i], inverses[i], i, size)
        i += 1
    return entry
