"""Churned dicts keep the size their live entries need (reconcile/compact.py).

Each control runs the same churn without compaction and sees the dict grow:
the figures these tests hold to are CPython's, and the controls fail first
if they change.
"""

from __future__ import annotations

import ipaddress
import sys

import pytest

from meshbpf.model import Endpoint
from meshbpf.reconcile import LBState, plan, wanted_services
from meshbpf.reconcile import compact as compact_mod
from meshbpf.reconcile.compact import DeleteCount, compact
from meshbpf.reconcile.incremental import LBIndex, plan_services
from reconcile_checks import check_realises, desired, service_port

ROOMY = 12_000   # a table of 32 768: 9 845 free after the build, more than half its entries
TIGHT = 20_000   # the same table: 1 845 free, full long before half its entries went


def churn(table: dict, steps: int, count: DeleteCount | None) -> list[int]:
    """Each step deletes the oldest key and adds a never-seen one; the
    dict's bytes after each step."""
    oldest, new = min(table), max(table) + 1
    sizes = []
    for _ in range(steps):
        del table[oldest]
        table[new] = new
        oldest, new = oldest + 1, new + 1
        if count is not None:
            count.add(1, table)
        sizes.append(sys.getsizeof(table))
    return sizes


def test_compact_keeps_identity_entries_and_order_and_drops_the_deleted_slots():
    table = {i: str(i) for i in range(TIGHT)}
    churn(table, TIGHT // 2, None)
    same, items, size = table, list(table.items()), sys.getsizeof(table)

    compact(table)

    assert table is same and list(table.items()) == items
    assert sys.getsizeof(table) < size


@pytest.mark.parametrize("live", [ROOMY, TIGHT])
def test_uncounted_a_churned_dict_grows(live):
    """The control: CPython's dict does grow under this churn."""
    built = sys.getsizeof({i: i for i in range(live)})
    assert max(churn({i: i for i in range(live)}, 3 * live, None)) > built


def test_a_roomy_dict_never_grows_compacted_each_half_turnover():
    built = sys.getsizeof({i: i for i in range(ROOMY)})
    table, count = {i: i for i in range(ROOMY)}, DeleteCount()
    assert max(churn(table, 3 * ROOMY, count)) == built
    assert count.compactions == 3 * ROOMY // (ROOMY // 2)
    assert list(table) == list(range(3 * ROOMY, 4 * ROOMY))


def test_a_tight_dict_is_compacted_soon_after_it_resized():
    """It resizes after 1 845 events; compacted at the floor (4 096
    deletions), well before half its entries went, and back to its built
    size each time."""
    built = sys.getsizeof({i: i for i in range(TIGHT)})
    table, count = {i: i for i in range(TIGHT)}, DeleteCount()
    sizes = churn(table, 3 * TIGHT, count)
    assert count.compactions == 3 * TIGHT // compact_mod.MIN_DELETED
    floor = compact_mod.MIN_DELETED
    assert all(size == built for size in sizes[floor - 1::floor])  # right after each compaction
    assert max(sizes) > built  # it did grow in between


def test_a_group_compacts_together_sized_by_its_first_dict():
    first, second, count = {i: i for i in range(10_000)}, {i: i for i in range(10)}, DeleteCount()
    count.add(4_999, first, second)
    assert count.compactions == 0 and count.deleted == 4_999
    count.add(1, first, second)
    assert count.compactions == 1 and count.deleted == 0


def test_small_dicts_are_not_compacted_before_the_floor():
    count = DeleteCount()
    count.add(compact_mod.MIN_DELETED - 1, {1: 1})
    assert count.compactions == 0


def wanted(last: list[int]) -> dict:
    """Frontends of two endpoints each; Service i's second endpoint is at
    address number last[i] (a moved endpoint: a number never used before)."""
    sps = []
    for i, n in enumerate(last):
        eps = [Endpoint(ipaddress.ip_address(f"10.1.{i // 250}.{i % 250 + 1}"), 8080),
               Endpoint(ipaddress.ip_address("10.128.0.1") + n, 8080)]
        sps.append(service_port(f"10.96.{i // 250}.{i % 250 + 1}", 80, eps, name=f"svc-{i}"))
    return wanted_services(desired(*sps))


def test_the_lb_index_keeps_its_backend_dicts_at_their_built_size_under_churn(monkeypatch):
    """A moved endpoint gets a new backend ID and address: the state's
    backends, the index's backend IDs by value and its reference counts
    each lose a key and gain one per event, as in the agent at 100 000
    Services (the floor is lowered to reach the compaction here)."""
    monkeypatch.setattr(compact_mod, "MIN_DELETED", 1)
    services = 200
    last = list(range(services))
    want = wanted(last)
    state = plan(LBState(), want).apply_to(LBState())
    index = LBIndex(state)
    sizes = [sys.getsizeof(t) for t in (state.backends, index.backend_id, index.refs)]
    for k in range(3 * services):
        last[k % services] = services + k
        want = wanted(last)
        key = list(want)[k % services]
        p = plan_services(state, index, {key: want[key]})
        assert len(p.backend_deletes) == 1
        index.apply(p, state)
    check_realises(state, want)
    assert index.backend_churn.compactions == 3 * services // (2 * services // 2)
    assert [sys.getsizeof(t) for t in (state.backends, index.backend_id, index.refs)] == sizes
    fresh = LBIndex(state)
    assert (index.backend_id, index.refs) == (fresh.backend_id, fresh.refs)
