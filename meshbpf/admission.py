"""Which Services fit in the maps: admitted one by one, the rest left out.

Plain Python, no BPF, no root (like reconcile.py, whose plan() runs on what
admit() lets in). Capacity used to be checked for the whole plan at once, so
one tenant's Service with thousands of ports froze every update on the node.
Now each Service is admitted whole (all its ports, or none) in a stable
order: Services the maps already hold first, then the others by
namespace/name. What runs keeps running, and a Service that does not fit is
left out with a Refusal, while every other Service keeps updating.

The peak counted is plan()'s: updates land before deletes, so a map holds
every key it holds now plus every key the plan adds (check_capacity's rule).
Space that deletes free is only seen by the next admission; the agent runs
one more round when a sync both refused and deleted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .reconcile import BackendVal, LBState, SlotVal, SvcKey, WantedService

ROLES = ("services", "slots", "backends")


@dataclass(frozen=True)
class Refusal:
    """A Service left out because a map had no room for it."""

    service: str                 # namespace/name
    frontends: int               # its (address, port, protocol) entries
    full: tuple[str, ...]        # one phrase per map it did not fit in
    kept: int                    # frontends still running their previous version

    def __str__(self) -> str:
        kept = (f"; its {self.kept} frontend(s) already programmed keep their previous state"
                if self.kept else "")
        return (f"Service {self.service} ({self.frontends} frontend(s)) left out: "
                + "; ".join(self.full) + kept
                + " (raise the size with --map-size or lower the number of services)")


@dataclass
class Admission:
    wanted: dict[SvcKey, WantedService] = field(default_factory=dict)  # what plan() should realise
    refused: list[Refusal] = field(default_factory=list)

    @property
    def refused_names(self) -> set[str]:
        return {r.service for r in self.refused}


def admit(current: LBState, wanted: dict[SvcKey, WantedService], capacity: dict[str, int],
          labels: dict[str, str] | None = None) -> Admission:
    """The part of `wanted` that fits in maps of `capacity` (role -> entries),
    whole Services at a time; `labels` (role -> map name) names the maps."""
    labels = labels or {}
    groups: dict[str, dict[SvcKey, WantedService]] = {}
    for key, want in wanted.items():
        groups.setdefault(want.owner, {})[key] = want
    slots_by_svc: dict[int, set[int]] = {}
    for slot in current.slots:
        slots_by_svc.setdefault(slot.svc_id, set()).add(slot.slot)
    known = set(current.backends.values())
    usage = {role: len(getattr(current, role)) for role in ROLES}

    out = Admission()
    for name in _admission_order(groups, current):
        group = groups[name]
        need, fresh = _footprint(current, slots_by_svc, known, group)
        over = [role for role in ROLES
                if role in capacity and usage[role] + need[role] > capacity[role]]
        if not over:
            out.wanted.update(group)
            _add(usage, need)
            known |= fresh
            continue
        kept = {key: as_programmed(current, key) for key in group if key in current.services}
        out.wanted.update(kept)
        _add(usage, _footprint(current, slots_by_svc, known, kept)[0])
        full = tuple(f"{labels.get(role, role + ' map')} is full (it needs {need[role]} more "
                     f"entries, {max(capacity[role] - usage[role], 0)} of {capacity[role]} are free)"
                     for role in over)
        out.refused.append(Refusal(name, len(group), full, len(kept)))
    return out


def _admission_order(groups: dict[str, dict[SvcKey, WantedService]], current: LBState) -> list[str]:
    """Services the maps hold already first, then the rest, each by namespace/name."""
    def programmed(name: str) -> bool:
        return any(key in current.services for key in groups[name])
    return sorted(groups, key=lambda name: (not programmed(name), name))


def _footprint(current: LBState, slots_by_svc: dict[int, set[int]], known: set[BackendVal],
               group: dict[SvcKey, WantedService]) -> tuple[dict[str, int], set[BackendVal]]:
    """Entries the group adds to each map (keys the maps do not hold yet),
    and the backends it is the first to bring."""
    need = dict.fromkeys(ROLES, 0)
    fresh: set[BackendVal] = set()
    for key, want in group.items():
        # One slot per entry: a weighted split repeats a backend over many.
        slots = len(want.backends)
        backends = dict.fromkeys(be for be, _ in want.backends)
        old = current.services.get(key)
        if old is None:
            need["services"] += 1
            need["slots"] += slots
        else:
            have = slots_by_svc.get(old.svc_id, set())
            need["slots"] += sum(1 for i in range(slots) if i not in have)
        fresh.update(be for be in backends if be not in known)
    need["backends"] = len(fresh)
    return need, fresh


def as_programmed(current: LBState, key: SvcKey) -> WantedService:
    """The frontend as the maps hold it now, so plan() leaves it alone."""
    val = current.services[key]
    backends = []
    for i in range(val.count):
        slot: SlotVal | None = current.slots.get((val.svc_id, i))
        if slot is not None and slot.backend_id in current.backends:
            backends.append((current.backends[slot.backend_id], slot.state))
    return WantedService("(as programmed)", tuple(backends), val.affinity_timeout, flags=val.flags)


def _add(usage: dict[str, int], need: dict[str, int]) -> None:
    for role in ROLES:
        usage[role] += need[role]
