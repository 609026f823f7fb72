"""Desired state -> the smallest ordered set of socket-LB map writes.

Plain Python over plain values: no BPF, no root. The datapath reads the
pinned maps into an LBState, asks `plan()` what to change, and applies the
Plan's steps in order.

Make-before-break: backends are written first, then slots, then the
frontend's count; removals go the other way (frontend, then slots, then
backends). A reader in the kernel therefore never sees a count that covers a
missing slot, nor a slot naming a missing backend, and a service that keeps
at least one endpoint never drops to zero backends during an update.

Slots keep their positions across updates where they can, so adding or
removing one endpoint rewrites one or two slots, not the whole service.
IDs are taken from the maps on restart, so an unchanged config writes nothing.

`plan()` looks at everything; `incremental.plan_services()` plans only the
Services a change touches, with the same IDs and slots (see that module).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Collection, Iterable, Iterator, Mapping, NamedTuple

from ..model import DesiredState, Frontend, IPAddress, ServicePort, usable_endpoints
from .split import split_members

IPPROTO = {"TCP": 6, "UDP": 17}
PROTO_NAME = {v: k for k, v in IPPROTO.items()}

SLOT_READY = 1        # MBPF_SLOT_READY in bpf/lib/common.h
SLOT_TERMINATING = 2  # MBPF_SLOT_TERMINATING
SLOT_REFUSE = 3       # MBPF_SLOT_REFUSE: a split's share with no backend
SVC_F_NODE_NETNS = 1  # MBPF_SVC_F_NODE_NETNS: translated for the node's own sockets only
# What a refusing slot names (a slot must name a stored backend): never
# connected to, the kernel refuses on the slot state first.
REFUSE_ADDR = b"\0" * 16


_V4_MAPPED = 0xFFFF << 32


def addr16(ip: IPAddress) -> bytes:
    """The maps' address form: 16 bytes, IPv4 mapped as ::ffff:a.b.c.d."""
    # From the integer: what ip.packed does, without its two Python calls.
    if ip.version == 4:
        return (_V4_MAPPED | int(ip)).to_bytes(16, "big")
    return int(ip).to_bytes(16, "big")


class SvcKey(NamedTuple):
    addr: bytes  # 16 bytes
    port: int    # host order here; the datapath converts
    proto: int


class SvcVal(NamedTuple):
    svc_id: int
    count: int
    affinity_timeout: int
    flags: int = 0    # SVC_F_*


class SlotKey(NamedTuple):
    svc_id: int
    slot: int


class SlotVal(NamedTuple):
    backend_id: int
    state: int


class BackendVal(NamedTuple):
    addr: bytes
    port: int
    proto: int


class WantedService(NamedTuple):
    """A frontend as the maps should hold it, before IDs are assigned."""

    name: str                              # "namespace/name:port", for errors
    backends: tuple[tuple[BackendVal, int], ...]  # (backend, slot state), in order
    affinity_timeout: int
    service: str = ""                      # "namespace/name"; admission keeps a Service whole
    flags: int = 0                         # SVC_F_*

    @property
    def owner(self) -> str:
        return self.service or self.name.partition(":")[0]


@dataclass
class LBState:
    """The content of the socket-LB maps (or what it will be)."""

    services: dict[SvcKey, SvcVal] = field(default_factory=dict)
    slots: dict[SlotKey, SlotVal] = field(default_factory=dict)
    backends: dict[int, BackendVal] = field(default_factory=dict)

    def copy(self) -> "LBState":
        return LBState(dict(self.services), dict(self.slots), dict(self.backends))


def state_from_entries(entries: Mapping[str, Iterable[tuple]]) -> LBState:
    """An LBState from each map's (key, value) pairs, as a read of the maps
    yields them, with one int object per value: a read makes a new one per
    field (IDs and ports, 28 bytes each, 1.2 million at 100 000 Services,
    where the plans that wrote the maps share one per ID)."""
    pool: dict[int, int] = {}
    one = pool.setdefault

    def shared(value):
        if type(value) is int:
            return one(value, value)
        return value._make([one(x, x) if type(x) is int else x for x in value])

    state = LBState()
    for role, pairs in entries.items():
        target = getattr(state, role)
        for key, value in pairs:
            target[shared(key)] = shared(value)
    return state


class Step(NamedTuple):
    map: str     # "backends", "slots" or "services"
    op: str      # "update" or "delete"
    entries: dict  # key -> value for updates; key -> None for deletes


class StepPlan:
    """What every plan of map writes offers over its steps() (the LB Plan
    here, the policy plan in policy.py): `state` has one dict per map name."""

    step_type = Step

    def order(self) -> list[tuple[str, str, dict]]:
        """(map, "update" or "delete", entries), in the order they must land."""
        raise NotImplementedError

    def steps(self) -> Iterator:
        """The writes in make-before-break order. Empty steps are skipped."""
        for name, op, entries in self.order():
            if entries:
                yield self.step_type(name, op, entries)

    @property
    def writes(self) -> int:
        return sum(len(s.entries) for s in self.steps())

    def __bool__(self) -> bool:
        return self.writes > 0

    def apply_to(self, state):
        """The state the maps hold once every step is applied."""
        new = state.copy()
        self.apply_in_place(new)
        return new

    def apply_in_place(self, state) -> None:
        """apply_to() without the copy: costs the plan's size, not the maps'."""
        for step in self.steps():
            target = getattr(state, step.map)
            if step.op == "update":
                target.update(step.entries)
            else:
                for key in step.entries:
                    target.pop(key, None)


@dataclass
class Plan(StepPlan):
    backend_updates: dict[int, BackendVal] = field(default_factory=dict)
    slot_updates: dict[SlotKey, SlotVal] = field(default_factory=dict)
    service_updates: dict[SvcKey, SvcVal] = field(default_factory=dict)
    service_deletes: list[SvcKey] = field(default_factory=list)
    slot_deletes: list[SlotKey] = field(default_factory=list)
    backend_deletes: list[int] = field(default_factory=list)

    def order(self) -> list[tuple[str, str, dict]]:
        return [
            ("backends", "update", self.backend_updates),
            ("slots", "update", self.slot_updates),
            ("services", "update", self.service_updates),
            ("services", "delete", dict.fromkeys(self.service_deletes)),
            ("slots", "delete", dict.fromkeys(self.slot_deletes)),
            ("backends", "delete", dict.fromkeys(self.backend_deletes)),
        ]


class CapacityError(Exception):
    """A map would overflow; nothing was written."""


def wanted_services(desired: DesiredState,
                    node_addresses: tuple[IPAddress, ...] | None = None) -> dict[SvcKey, WantedService]:
    """Desired state in map terms: usable endpoints only, in a stable order.

    node_addresses: this node's addresses when north-south is on (they are
    an input: the sync layer reads them), for the external frontends of
    external_services(); None (north-south off): ClusterIPs only."""
    wanted = dict(wanted_service(sp) for sp in desired.service_ports.values())
    if node_addresses is not None:
        wanted.update(external_services(desired.service_ports, node_addresses))
    return wanted


def wanted_service(sp: ServicePort, external: bool = False) -> tuple[SvcKey, WantedService]:
    """One frontend in map terms (the key and what the maps should hold).
    external: the backends of the Service's external frontends, every
    usable endpoint of the cluster (not narrowed by internalTrafficPolicy)."""
    fe = sp.frontend
    proto = IPPROTO[fe.protocol]
    backends = []
    if sp.split:
        # Weighted: a backend fills as many slots as its share (split.py).
        for ep, fallback in split_members(sp.split, sticky=bool(sp.affinity_timeout)):
            if ep is None:  # a broken backendRef's share
                backends.append((BackendVal(REFUSE_ADDR, 0, proto), SLOT_REFUSE))
            else:
                backends.append((BackendVal(addr16(ep.address), ep.port, proto),
                                 SLOT_TERMINATING if fallback else SLOT_READY))
    seen = set()
    endpoints = sp.all_endpoints if external else sp.endpoints
    for ep, state in () if sp.split else _usable(endpoints):
        be = BackendVal(addr16(ep.address), ep.port, proto)
        if be in seen:
            continue
        seen.add(be)
        backends.append((be, state))
    port_label = f":{sp.port_name}" if sp.port_name else ""
    return SvcKey(addr16(fe.address), fe.port, proto), WantedService(
        f"{sp.service}{port_label}", tuple(backends), sp.affinity_timeout, sp.service)


def external_services(service_ports: Mapping[Frontend, ServicePort], node_addresses: tuple[IPAddress, ...],
                      exposed: Iterable[Frontend] | None = None) -> dict[SvcKey, WantedService]:
    """The socket-LB's frontends for a pod (or the node's cgroup) that
    connects to a Service from the outside's side (issue 12): each node
    address at each NodePort, each external IP and LoadBalancer IP at the
    Service port, with the Service's cluster-wide endpoints. kube-proxy
    short-circuits the same inside the node (KUBE-EXT -> KUBE-SVC for local
    sources); without it the connection leaves the node and comes back
    through tc, where a backend on the client's own node answers past the
    translation.

    A route's split (issue 13) applies as at the ClusterIP. A ClusterIP
    frontend keeps its key; otherwise the first claim wins in
    namespace/name/port/family order, as in the north-south planner.
    exposed: the ServicePorts (by frontend) with an exposure, when the
    caller keeps them (None: all of service_ports are looked at)."""
    return external_claims(service_ports, node_addresses, exposed)[0]


def external_claims(service_ports: Mapping[Frontend, ServicePort], node_addresses: tuple[IPAddress, ...],
                    exposed: Iterable[Frontend] | None = None
                    ) -> tuple[dict[SvcKey, WantedService], set[SvcKey]]:
    """external_services(), and every key an exposed ServicePort asks for,
    won or not: a change at one of them may hand it to another claimant."""
    if exposed is None:
        ports = [sp for sp in service_ports.values() if sp.exposure is not None]
    else:
        ports = [sp for sp in (service_ports.get(f) for f in exposed)
                 if sp is not None and sp.exposure is not None]
    ports.sort(key=lambda sp: (sp.namespace, sp.name, sp.port_name,
                               sp.frontend.address.version, sp.frontend.protocol))
    out: dict[SvcKey, WantedService] = {}
    claimed: set[SvcKey] = set()
    for sp in ports:
        want = None
        for front, flags in external_frontends(sp, node_addresses):
            key = SvcKey(addr16(front.address), front.port, IPPROTO[front.protocol])
            claimed.add(key)
            if front in service_ports or key in out:
                continue
            if want is None:
                want = wanted_service(sp, external=True)[1]
            out[key] = want._replace(flags=flags) if flags else want
    return out, claimed


def external_frontends(sp: ServicePort, node_addresses: tuple[IPAddress, ...]) -> list[tuple[Frontend, int]]:
    """Where a ServicePort answers from the outside's side, in its own
    family, each with its SvcVal flags (lb_ip_flags())."""
    exp, fe = sp.exposure, sp.frontend
    if exp is None:
        return []
    family = fe.address.version
    out = []
    if sp.node_port and exp.type in ("NodePort", "LoadBalancer"):
        out += [Frontend(a, sp.node_port, fe.protocol) for a in node_addresses if a.version == family]
    out += [Frontend(ip, fe.port, fe.protocol) for ip in exp.external_ips if ip.version == family]
    fronts = [(f, 0) for f in out]
    # A VIP the node holds itself (kube-vip style) is not where its packets
    # come from: the node's own addresses are the others.
    own = tuple(a for a in node_addresses if a not in exp.lb_ips)
    flags = lb_ip_flags(exp.source_ranges, own, family)
    if flags is not None:
        fronts += [(Frontend(ip, fe.port, fe.protocol), flags) for ip in exp.lb_ips if ip.version == family]
    return fronts


def lb_ip_flags(source_ranges: tuple, node_addresses: tuple[IPAddress, ...], family: int) -> int | None:
    """Who the socket-LB translates a LoadBalancer IP for: 0 everyone, None
    no one (left to tc), SVC_F_NODE_NETNS the node's own sockets only.

    loadBalancerSourceRanges hold for every client (kube-proxy's firewall
    chain checks a pod's and, in `output`, the node's packet's source), and
    only tc sees a pod's source. Ranges of the LB IP's family only count, as
    in the north-south planner (none: any client). The node's packet to an
    LB IP leaves with the address of a device its route takes, an address
    this node has (node_addresses: the north-south devices'): when all of
    them are inside the ranges the node is let in whichever it is, and is
    translated at connect() as for any LB IP (sent to tc, a backend on this
    node would never answer it: the reply to the node's own address is not
    translated back). When one is outside, tc decides (it drops an outside
    source and counts it, as kube-proxy drops it)."""
    ranges = [n for n in source_ranges if n.version == family]
    if not ranges:
        return 0
    own = [a for a in node_addresses if a.version == family]
    if own and all(any(a in n for n in ranges) for a in own):
        return SVC_F_NODE_NETNS
    return None


def _usable(endpoints: tuple) -> list[tuple]:
    """usable_endpoints() as (endpoint, slot state); the ready endpoints (the
    usual case) without building its objects."""
    ready = [(e, SLOT_READY) for e in endpoints if e.ready]
    if ready:
        return ready  # what usable_endpoints() returns when any is ready
    return [(u.endpoint, SLOT_TERMINATING if u.terminating_fallback else SLOT_READY)
            for u in usable_endpoints(endpoints)]


class _IdAllocator:
    """Hands out IDs above the highest in use, so a freed ID is not reused
    while a kernel reader may still hold it. `used` is only read (the
    incremental planner passes its index's live set, or the backends map's
    keys); `top` is its maximum when the caller knows it already."""

    def __init__(self, used: Collection[int], limit: int = 0xFFFFFFFF, top: int | None = None):
        self.used = used
        self.taken: set[int] = set()
        self.next = (max(used, default=0) if top is None else top) + 1
        self.limit = limit

    def take(self) -> int:
        candidate = self.next  # the usual case, tested first: a full plan takes one per backend
        if candidate <= self.limit and candidate not in self.used and candidate not in self.taken:
            self.next = candidate + 1
            self.taken.add(candidate)
            return candidate
        for _ in range(2):
            while self.next <= self.limit:
                candidate = self.next
                self.next += 1
                if candidate not in self.used and candidate not in self.taken:
                    self.taken.add(candidate)
                    return candidate
            self.next = 1  # wrapped: reuse the lowest free IDs
        raise CapacityError("no free IDs left")


def plan(current: LBState, wanted: dict[SvcKey, WantedService]) -> Plan:
    """What to write to turn `current` into `wanted`."""
    p = Plan()

    # Backends: one ID per (address, port, protocol), shared by services.
    backend_id: dict[BackendVal, int] = {}
    for bid, val in sorted(current.backends.items()):
        backend_id.setdefault(val, bid)
    backend_ids = _IdAllocator(set(current.backends))
    referenced: set[int] = set()

    slots_by_svc: dict[int, dict[int, SlotVal]] = {}
    for key, val in current.slots.items():
        slots_by_svc.setdefault(key.svc_id, {})[key.slot] = val

    svc_ids = _IdAllocator({v.svc_id for v in current.services.values()})
    live_svc_ids: set[int] = set()

    for key, want in wanted.items():
        # One member per slot: wanted_service de-duplicates endpoints, and
        # repeats one only for a weighted split, where it fills several.
        members: list[tuple[int, int]] = []
        for be, state in want.backends:
            bid = backend_id.get(be)
            if bid is None:
                bid = backend_ids.take()
                backend_id[be] = bid
                p.backend_updates[bid] = be
            members.append((bid, state))
            referenced.add(bid)

        old = current.services.get(key)
        svc_id = old.svc_id if old else svc_ids.take()
        live_svc_ids.add(svc_id)
        old_slots = slots_by_svc.get(svc_id, {})
        layout = _slot_layout(old_slots, old.count if old else 0, members)
        for i, (bid, state) in enumerate(layout):
            val = SlotVal(bid, state)
            if old_slots.get(i) != val:
                p.slot_updates[SlotKey(svc_id, i)] = val
        for i in old_slots:
            if i >= len(layout):
                p.slot_deletes.append(SlotKey(svc_id, i))

        new_val = SvcVal(svc_id, len(layout), want.affinity_timeout, want.flags)
        if old != new_val:
            p.service_updates[key] = new_val

    for key, val in current.services.items():
        if key not in wanted:
            p.service_deletes.append(key)
    # Slots of removed services, and any orphan a crash left behind.
    for svc_id, slots in slots_by_svc.items():
        if svc_id not in live_svc_ids:
            p.slot_deletes.extend(SlotKey(svc_id, i) for i in slots)

    for bid in current.backends:
        if bid not in referenced:
            p.backend_deletes.append(bid)
    return p


def _slot_layout(old_slots: dict[int, SlotVal], old_count: int,
                 members: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """New slot contents, keeping each surviving backend where it was. A
    backend may fill several slots (a weighted split): as many of its old
    positions as it still fills are kept."""
    if not old_slots:
        return members  # nothing to keep in place: what the loop below gives then
    n = len(members)
    state_of: dict[int, int] = {}
    left: dict[int, int] = {}  # backend ID -> slots it still has to fill
    for bid, state in members:
        state_of.setdefault(bid, state)
        left[bid] = left.get(bid, 0) + 1
    layout: list[tuple[int, int] | None] = [None] * n
    for i in range(min(old_count, n)):
        old = old_slots.get(i)
        if old is not None and left.get(old.backend_id, 0) > 0:
            layout[i] = (old.backend_id, state_of[old.backend_id])
            left[old.backend_id] -= 1
    rest = iter([m for m in members if _take(left, m[0])])
    return [entry if entry is not None else next(rest) for entry in layout]


def _take(left: dict[int, int], bid: int) -> bool:
    """Whether one more slot of `bid` is still unplaced (and count it)."""
    if left[bid] > 0:
        left[bid] -= 1
        return True
    return False


def check_capacity(current: LBState, p: Plan, capacity: dict[str, int],
                   labels: dict[str, str] | None = None) -> None:
    """Raises CapacityError if any map would overflow while the plan runs.

    Updates land before deletes, so the peak is every key the map holds now
    plus every key the plan adds. `labels` names the maps in the message.
    """
    labels = labels or {}
    # Counted over the plan's keys only, so a small plan is checked in time
    # proportional to it, not to the maps.
    peaks = {
        "services": _peak(current.services, p.service_updates),
        "slots": _peak(current.slots, p.slot_updates),
        "backends": _peak(current.backends, p.backend_updates),
    }
    over = [f"{labels.get(name, name + ' map')} needs {peaks[name]} entries, it holds {capacity[name]}"
            for name in peaks if name in capacity and peaks[name] > capacity[name]]
    if over:
        raise CapacityError("map full: " + "; ".join(over)
                            + " (raise the size with --map-size or lower the number of services)")


def _peak(held: dict, updates: dict) -> int:
    # The keys in both, counted in C over the smaller (a full plan's updates are every key).
    return len(held) + len(updates) - len(updates.keys() & held.keys())
