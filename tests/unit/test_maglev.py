"""Maglev lookup tables (issue 12): the same table on every node, balanced
shares, little disruption when a backend comes or goes."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from meshbpf.reconcile import maglev
from meshbpf.reconcile.maglev import LARGE_TABLE, SMALL_TABLE, Backend, build, identity

ROOT = Path(__file__).resolve().parents[2]


def backends(n: int, port: int = 8080) -> list[tuple[str, int]]:
    return [(f"10.{i >> 8 & 255}.{i & 255}.7", port) for i in range(n)]


def digest(table: maglev.MaglevTable) -> str:
    return hashlib.sha256(repr(table.backends).encode() + table.slots.tobytes()).hexdigest()


def moved_beyond(old: maglev.MaglevTable, new: maglev.MaglevTable, changed: str) -> int:
    """Slots whose backend changed, not counting those of the backend that
    left (removal) or the one that took them (addition)."""
    return sum(1 for j in range(old.size)
               if old.lookup(j) != new.lookup(j) and changed not in (old.lookup(j), new.lookup(j)))


def test_same_table_whatever_the_order_of_arrival():
    given = backends(50) + [("fd00:244::5", 80), ("fd00:244::6", 80)]
    want = build(given, SMALL_TABLE)
    rng = random.Random(7)
    for _ in range(3):
        shuffled = given[:]
        rng.shuffle(shuffled)
        assert digest(build(shuffled, SMALL_TABLE)) == digest(want)


def test_same_table_in_another_interpreter_with_another_hash_seed():
    """What another node's agent computes: a fresh process, other str hashes."""
    given = backends(20) + [("fd00:244::5", 80)]
    script = ("import hashlib,sys; from meshbpf.reconcile.maglev import build; "
              f"t = build({given!r}, {SMALL_TABLE}); "
              "sys.stdout.write(hashlib.sha256(repr(t.backends).encode() + t.slots.tobytes()).hexdigest())")
    here = digest(build(list(reversed(given)), SMALL_TABLE))
    for seed in ("1", "4242"):
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=str(ROOT))
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                             text=True, check=True, cwd=ROOT).stdout
        assert out == here, f"PYTHONHASHSEED={seed}"


def test_the_table_definition_does_not_drift():
    """A mixed-version cluster needs every agent build to compute the same
    table: these slots were computed once; a change to the hash, its key, the
    identity spelling or the Populate order shows up here."""
    table = build([("10.0.0.1", 80), ("10.0.0.2", 80), ("fd00::1", 443)], 251)
    assert table.backends == ("10.0.0.1:80", "10.0.0.2:80", "[fd00::1]:443")
    assert list(table.slots[:12]) == GOLDEN_FIRST_SLOTS


GOLDEN_FIRST_SLOTS = [0, 1, 1, 1, 1, 0, 2, 0, 2, 1, 2, 2]


def test_identity_is_canonical():
    assert identity("fd00:0::0001", 80) == "[fd00::1]:80"
    assert identity("10.0.0.1", 80) == "10.0.0.1:80"
    a = build([("fd00::1", 80), ("10.0.0.1", 80)], 251)
    b = build([("fd00:0000::1", 80), ("10.0.0.1", 80)], 251)
    assert digest(a) == digest(b)


@pytest.mark.parametrize("n", [1, 3, 100, 1000])
def test_equal_weights_share_the_table_within_one_slot(n):
    """The paper's Populate gives each backend one slot per round: every
    backend holds floor(M/N) or ceil(M/N) slots."""
    size = SMALL_TABLE if n < 1000 else LARGE_TABLE
    shares = build(backends(n), size).shares()
    assert len(shares) == n
    assert set(shares.values()) <= {size // n, -(-size // n)}
    assert sum(shares.values()) == size


def test_weights_share_the_table_in_proportion():
    given = [Backend("10.0.0.1", 80, 1), Backend("10.0.0.2", 80, 2), Backend("10.0.0.3", 80, 5),
             Backend("10.0.0.4", 80, 0)]
    shares = build(given, SMALL_TABLE).shares()
    assert "10.0.0.4:80" not in shares  # weight 0: out
    for b in given[:3]:
        ideal = SMALL_TABLE * b.weight / 8
        assert abs(shares[identity(b.addr, b.port)] - ideal) <= 2, shares


def test_removing_one_of_100_backends_moves_under_one_percent_more():
    given = backends(100)
    before = build(given)
    rng = random.Random(1)
    worst = 0
    for gone in rng.sample(given, 8):
        after = build([b for b in given if b != gone])
        ident = identity(*gone)
        assert ident not in after.shares()
        worst = max(worst, moved_beyond(before, after, ident))
    print(f"removal: at most {worst} of {before.size} slots ({100 * worst / before.size:.2f} %) moved "
          "beyond the removed backend's")
    assert worst <= 0.01 * before.size


def test_adding_a_backend_to_100_moves_under_one_percent_more():
    given = backends(100)
    before = build(given)
    worst = 0
    for extra in [("10.9.0.1", 8080), ("10.9.0.2", 8080), ("fd00::99", 8080), ("10.0.0.7", 9090)]:
        after = build(given + [extra])
        ident = identity(*extra)
        assert after.shares()[ident] in (before.size // 101, -(-before.size // 101))
        worst = max(worst, moved_beyond(before, after, ident))
    print(f"addition: at most {worst} of {before.size} slots ({100 * worst / before.size:.2f} %) moved "
          "beyond those the new backend took")
    assert worst <= 0.01 * before.size


def test_lookup():
    table = build(backends(3), 251)
    assert {table.lookup(h) for h in range(1000)} == {identity(*b) for b in backends(3)}
    assert table.lookup(5) == table.lookup(5 + 251)
    assert build([], 251).lookup(5) is None
    assert build([Backend("10.0.0.1", 80, 0)], 251).lookup(5) is None


@pytest.mark.parametrize("given, size, message", [
    ([("10.0.0.1", 80), ("10.0.0.1", 80)], 251, "10.0.0.1:80 is listed twice"),
    ([("fd00::1", 80), ("fd00:0::1", 80)], 251, "[fd00::1]:80 is listed twice"),
    ([("10.0.0.1", 80, -1)], 251, "weight -1 is not an integer >= 0"),
    ([("10.0.0.1", 80, 1.5)], 251, "weight 1.5 is not an integer >= 0"),
    ([("10.0.0.1", 80)], 1000, "maglev table size 1000: use one of"),
    ([("10.0.0.300", 80)], 251, "10.0.0.300"),
    ([("10.0.0.1", 0)], 251, "maglev backend 10.0.0.1: port 0 is not 1..65535"),
    ([("10.0.0.1", "80")], 251, "maglev backend 10.0.0.1: port '80' is not 1..65535"),
])
def test_bad_input_is_refused_with_the_reason(given, size, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(".", r"\.")):
        build(given, size)


@pytest.mark.parametrize("size", maglev.TABLE_SIZES)
def test_every_size_is_prime(size):
    assert size > 2 and all(size % d for d in range(2, int(size ** 0.5) + 1))


def paper_populate(idents: tuple[str, ...], size: int) -> list[int]:
    """Section 3.4's Populate, as the paper writes it (full permutations)."""
    perms = []
    for ident in idents:
        offset, skip = maglev.offset_skip(ident, size)
        perms.append([(offset + j * skip) % size for j in range(size)])
    nexts = [0] * len(idents)
    entry = [-1] * size
    filled = 0
    while True:
        for i, perm in enumerate(perms):
            c = perm[nexts[i]]
            while entry[c] >= 0:
                nexts[i] += 1
                c = perm[nexts[i]]
            entry[c] = i
            nexts[i] += 1
            filled += 1
            if filled == size:
                return entry


@pytest.mark.parametrize("n, size", [(1, 251), (1, LARGE_TABLE), (3, 251), (7, 1021), (40, 4093), (300, 4093), (5, 16381)])
def test_the_fast_populate_claims_what_the_papers_does(n, size):
    table = build(backends(n), size)
    assert list(table.slots) == paper_populate(table.backends, size)


def test_equal_weights_take_the_unweighted_path():
    given = backends(30)
    assert digest(build([Backend(a, p, 3) for a, p in given], 4093)) == digest(build(given, 4093))


def test_the_weighted_populate_with_equal_weights_is_the_papers():
    idents = tuple(sorted(identity(*b) for b in backends(40)))
    perms = [maglev.offset_skip(ident, 4093) for ident in idents]
    assert maglev._populate_weighted(perms, [2] * 40, 4093) == paper_populate(idents, 4093)


def weighted_by_probing(idents: tuple[str, ...], weights: list[int], size: int) -> list[int]:
    """The weighted rounds with plain probing to the last slot: what the
    fast path (probing, then a scan of the last free slots) must match."""
    perms = [maglev.offset_skip(ident, size) for ident in idents]
    nexts = [offset for offset, _ in perms]
    top = max(weights)
    targets = [top] * len(idents)
    entry = [-1] * size
    filled = 0
    rnd = 0
    while True:
        rnd += 1
        for i, (w, (_, skip)) in enumerate(zip(weights, perms)):
            if rnd * w < targets[i]:
                continue
            targets[i] += top
            while entry[nexts[i]] >= 0:
                nexts[i] = (nexts[i] + skip) % size
            entry[nexts[i]] = i
            nexts[i] = (nexts[i] + skip) % size
            filled += 1
            if filled == size:
                return entry


@pytest.mark.parametrize("n, size", [(2, 251), (5, 1021), (60, 4093), (300, 4093), (4, 16381)])
def test_the_fast_weighted_populate_claims_what_probing_does(n, size):
    given = [Backend(a, p, 1 + i % 4) for i, (a, p) in enumerate(backends(n))]
    table = build(given, size)
    weights = {identity(b.addr, b.port): b.weight for b in given}
    assert list(table.slots) == weighted_by_probing(table.backends, [weights[i] for i in table.backends], size)


@pytest.mark.parametrize("size", maglev.TABLE_SIZES)
@pytest.mark.parametrize("weighted", [False, True])
def test_the_scan_claims_only_the_last_slots_at_every_size(size, weighted, monkeypatch):
    """Probing claims all but about sqrt(size) slots; the scan of the free
    slots, whose cost grows with their number, claims the rest. With a fixed
    tail longer than a small table, every slot of it went to the scan."""
    claimed = []
    real = maglev._claim_free
    monkeypatch.setattr(maglev, "_claim_free", lambda entry, free, *rest: (claimed.append(len(free)), real(entry, free, *rest)))
    given = [Backend(a, p, 1 + i % 2 if weighted else 1) for i, (a, p) in enumerate(backends(3))]
    build(given, size)
    assert 0 < len(claimed) <= int(size ** 0.5)
