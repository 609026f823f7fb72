"""Weighted splitting in the socket-LB maps, with no BPF change.

The kernel picks a slot uniformly at random, so a split frontend gets a
fixed budget of SPLIT_SLOTS slots, shared among its backend Services by
weight with largest-remainder rounding (each Service's share is exact to
1/SPLIT_SLOTS), then spread over that Service's usable endpoints (which
differ by at most one slot). A backend endpoint fills several slots; the
planner keeps their positions across updates.
"""

from __future__ import annotations

from ..model import SplitShare, usable_endpoints

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


def split_members(split: tuple[SplitShare, ...]) -> list[tuple[object, int]]:
    """(endpoint, terminating_fallback) per slot, in a stable order. Shares
    with no usable endpoint are left out and the rest take the budget."""
    usable = [(share, usable_endpoints(share.endpoints)) for share in split]
    usable = [(share, eps) for share, eps in usable if eps and share.weight > 0]
    counts = slot_shares([share.weight for share, _ in usable])
    members = []
    for (share, eps), count in zip(usable, counts):
        per, extra = divmod(count, len(eps))
        for i, u in enumerate(eps):
            members.extend([(u.endpoint, u.terminating_fallback)] * (per + (i < extra)))
    return members
