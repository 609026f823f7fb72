"""Weighted splitting in the socket-LB maps, with no BPF change.

The kernel picks a slot uniformly at random, so a split frontend gets a
fixed budget of SPLIT_SLOTS slots, shared among its backend Services by
weight with largest-remainder rounding (each Service's share is exact to
1/SPLIT_SLOTS), then spread over that Service's usable endpoints (which
differ by at most one slot). A backend endpoint fills several slots; the
planner keeps their positions across updates. A share whose backend
Service is missing or has no usable endpoint keeps its slots, as refusing
slots (SLOT_REFUSE): its connections fail at once with ECONNREFUSED.
"""

from __future__ import annotations

from ..model import Endpoint, SplitShare, usable_endpoints

SPLIT_SLOTS = 1000


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


def split_members(split: tuple[SplitShare, ...]) -> list[tuple[Endpoint | None, bool]]:
    """(endpoint, terminating_fallback) per slot, in a stable order. A share
    with no usable endpoint (its Service is missing or empty) keeps its slots
    with no endpoint (None): the kernel refuses them, as Gateway API asks."""
    shares = [(share, usable_endpoints(share.endpoints)) for share in split if share.weight > 0]
    counts = slot_shares([share.weight for share, _ in shares])
    members: list[tuple[Endpoint | None, bool]] = []
    for (share, eps), count in zip(shares, counts):
        if not eps:
            members.extend([(None, False)] * count)
            continue
        per, extra = divmod(count, len(eps))
        for i, u in enumerate(eps):
            members.extend([(u.endpoint, u.terminating_fallback)] * (per + (i < extra)))
    return members
