"""Churned dicts keep the size their live entries need (reconcile/compact.py).

Each control runs the same churn without compaction and sees the dict grow:
the figures these tests hold to are CPython's, and the controls fail first
if they change.
"""

from __future__ import annotations

import ipaddress
import sys

from meshbpf.model import Endpoint
from meshbpf.reconcile import LBState, plan, wanted_services
from meshbpf.reconcile import compact as compact_mod
from meshbpf.reconcile.compact import DeleteCount, compact
from meshbpf.reconcile.incremental import LBIndex, plan_services
from reconcile_checks import check_realises, desired, service_port

LIVE = 20_000


def churn(table: dict, steps: int, count: DeleteCount | None) -> None:
    """Each step deletes the oldest key and adds a never-seen one."""
    oldest, new = min(table), max(table) + 1
    for _ in range(steps):
        del table[oldest]
        table[new] = new
        oldest, new = oldest + 1, new + 1
        if count is not None:
            count.add(1, table)


def test_compact_keeps_identity_entries_and_order_and_drops_the_deleted_slots():
    table = {i: str(i) for i in range(LIVE)}
    churn(table, LIVE // 2, None)
    same, items, size = table, list(table.items()), sys.getsizeof(table)

    compact(table)

    assert table is same and list(table.items()) == items
    assert sys.getsizeof(table) < size


def test_a_churned_dict_grows_once_uncounted_and_keeps_its_built_size_counted():
    built = sys.getsizeof({i: i for i in range(LIVE)})

    uncounted = {i: i for i in range(LIVE)}
    churn(uncounted, 3 * LIVE, None)
    assert sys.getsizeof(uncounted) > built  # the control: CPython's dict does grow

    counted, count = {i: i for i in range(LIVE)}, DeleteCount()
    churn(counted, 3 * LIVE, count)
    assert sys.getsizeof(counted) <= built
    assert count.compactions == 3 * LIVE // (LIVE // 2)
    assert list(counted) == list(range(3 * LIVE, 4 * LIVE))


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
