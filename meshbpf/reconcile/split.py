"""Weighted splitting in the socket-LB maps, with no BPF change.

The kernel picks a slot uniformly at random, so a split frontend gets a
budget of slots shared among its backend Services by weight, then spread
over each Service's usable endpoints. The budget is the fewest slots that
make every share exact and give a share's endpoints equal slots (50/50 over
2 + 2 endpoints: 4); when that would take more than SPLIT_SLOTS, it is
SPLIT_SLOTS with largest-remainder rounding (each Service's share exact to
1/SPLIT_SLOTS, its endpoints differing by at most one slot). Few slots
matter: connect() reads one at random, and a thousand of them fall out of
the CPU's caches between connections (0.25 µs a connection in
bench/README.md's split case). A backend endpoint fills several slots; the
planner keeps their positions across updates. A share whose backend
Service is missing or has no usable endpoint keeps its slots, as refusing
slots (SLOT_REFUSE): its connections fail at once with ECONNREFUSED.
"""

from __future__ import annotations

from math import gcd, lcm

from ..model import Endpoint, SplitShare, usable_endpoints

SPLIT_SLOTS = 1000


def split_budget(weights: list[int], members: list[int], cap: int = SPLIT_SLOTS) -> int:
    """The fewest slots that give each weight (all > 0) its exact share and
    each share's `members` (endpoints, 1 for a refused share) equal slots;
    cap when that takes more."""
    g = gcd(*weights)
    reduced = [w // g for w in weights]
    total = sum(reduced)
    per_unit = 1  # slots per unit of reduced weight
    for w, m in zip(reduced, members):
        per_unit = lcm(per_unit, m // gcd(m, w))
        if per_unit * total > cap:
            return cap
    return per_unit * total


def slot_shares(weights: list[int], budget: int = SPLIT_SLOTS) -> list[int]:
    """Slots per weight, summing to `budget` (0 when every weight is 0),
    by largest remainder; ties go to the earlier weight."""
    total = sum(weights)
    if total == 0:
        return [0] * len(weights)
    exact = [budget * w / total for w in weights]
    shares = [budget * w // total for w in weights]
    left = budget - sum(shares)
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(exact[i] - shares[i]), i))
    for i in by_remainder[:left]:
        shares[i] += 1
    return shares


def split_members(split: tuple[SplitShare, ...], sticky: bool = False) -> list[tuple[Endpoint | None, bool]]:
    """(endpoint, terminating_fallback) per slot, in a stable order. A share
    with no usable endpoint (its Service is missing or empty) keeps its slots
    with no endpoint (None): the kernel refuses them, as Gateway API asks.
    sticky (a ClientIP parent): always SPLIT_SLOTS slots, so that a weight
    change moves only the clients whose slot is rewritten; a budget that
    shrank would also move every client of a slot past the new count."""
    shares = [(share, usable_endpoints(share.endpoints)) for share in split if share.weight > 0]
    if not shares:
        return []
    weights = [share.weight for share, _ in shares]
    budget = SPLIT_SLOTS if sticky else split_budget(weights, [len(eps) or 1 for _, eps in shares])
    counts = slot_shares(weights, budget)
    members: list[tuple[Endpoint | None, bool]] = []
    for (share, eps), count in zip(shares, counts):
        if not eps:
            members.extend([(None, False)] * count)
            continue
        per, extra = divmod(count, len(eps))
        for i, u in enumerate(eps):
            members.extend([(u.endpoint, u.terminating_fallback)] * (per + (i < extra)))
    return members
