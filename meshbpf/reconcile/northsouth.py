"""The north-south planner (issue 12): desired Services -> the north-south maps.

A pure function of the desired state, this node (its name, addresses and
SNAT sources) and what the maps hold: no root, no kernel. It decides

- the frontends of every exposed ServicePort (model.Exposure): the NodePort
  (keyed by its family's wildcard), each external IP and LoadBalancer ingress IP of the
  port's family (at the Service port), and the ClusterIP itself;
- one Maglev table per ServicePort and traffic policy: Cluster over every
  usable endpoint, Local over this node's (a Local Service's ClusterIP
  frontend still uses the Cluster table, as kube-proxy does);
- loadBalancerSourceRanges of the LoadBalancer IPs as mbpf_ns_src rows;

and the writes that take the maps there, make-before-break: backends
before the tables that name them, tables before the frontends that use
them, deletes in the reverse order. Ids are stable: a ServicePort keeps
its table id (found again through its frontends in the maps, so also
across an agent restart), an endpoint its backend id, and a table whose
backend set is unchanged is not rebuilt, so replanning the same input
writes nothing. New ids never reuse one the maps still hold: a flow
mid-change never meets another service's backend under an old id.

A frontend two Services claim (the same external IP and port, the same
node port) goes to the first in namespace/name order; the other is told
in `problems`. A NodePort is keyed per family (::ffff:0.0.0.0, ::), so a
dual-stack Service's NodePort serves each family from its own endpoints.
"""

from __future__ import annotations

import ipaddress
import socket
from array import array
from dataclasses import dataclass
from typing import Iterable, NamedTuple

from ..model import DesiredState, Frontend, IPAddress, ServicePort, usable_endpoints
from . import addr16, maglev
from .northsouth_keys import (BE_LOCAL, DEFAULT_SNAT_PORTS, DEFAULT_TABLE_SIZE, F_LOCAL, F_NODEPORT,
                              WILDCARDS, wildcard, NorthSouthState, NsBackend, NsCfg, NsKey, NsSrcKey, NsStep, NsSvc)

PROTO = {"TCP": socket.IPPROTO_TCP, "UDP": socket.IPPROTO_UDP}
ZERO = bytes(16)


@dataclass(frozen=True)
class NodeContext:
    """This node as the planner needs it."""

    name: str
    addresses: tuple[IPAddress, ...] = ()   # where NodePorts answer (mbpf_ns_addr)
    snat4: IPAddress | None = None          # source for SNAT to remote backends
    snat6: IPAddress | None = None
    snat_ports: tuple[int, int] = DEFAULT_SNAT_PORTS  # the range SNAT takes ports from


class NsPlan(NamedTuple):
    state: NorthSouthState
    steps: list[NsStep]
    problems: list[str]


class _Owner(NamedTuple):
    """One table: a ServicePort (by its ClusterIP frontend) and a policy."""

    frontend: Frontend
    local: bool


# Table id -> (the row object, the backend ids in it): a sync keeps one so
# an unchanged table is recognised without walking its row again.
RowCache = dict[int, tuple[array, frozenset]]


def plan(desired: DesiredState, node: NodeContext, current: NorthSouthState,
         table_size: int = DEFAULT_TABLE_SIZE, *, max_tables: int | None = None,
         row_cache: RowCache | None = None, all_cluster_ips: bool = False) -> NsPlan:
    """The state the maps should hold and the ordered writes from `current`.

    all_cluster_ips: also the ClusterIP of every Service that is not exposed
    (kube-proxy translates those from outside too), each with a table of its
    own: mind mbpf_maglev's room (MBPF_NS_TABLE_MAX tables of table_size)."""
    problems: list[str] = []
    owners = _frontends_by_owner(desired, all_cluster_ips, problems)
    new = NorthSouthState(cfg=NsCfg(_snat(node.snat4), _snat(node.snat6), 1, *node.snat_ports),
                          node_addrs={addr16(a) for a in node.addresses})
    backend_ids = _BackendIds(current)
    table_ids = _Ids(current.tables, start=0)
    src_ids = _Ids({k.src_id for k in current.sources}, start=1)
    cache = row_cache if row_cache is not None else {}
    for owner, (sp, keys) in owners.items():
        eps = _usable(sp, owner.local, node.name)
        ids = [backend_ids.id_for(e, node.name, new.backends) for e in eps]
        table_id = 0
        if ids:
            table_id = table_ids.reuse_or_new(current.frontends.get(k) for k, _ in keys)
            if max_tables is not None and table_id >= max_tables:
                problems.append(f"Service {sp.service} port {sp.frontend}: no room for "
                                f"another Maglev table ({max_tables}); its external frontends are left out")
                continue
            new.tables[table_id] = _row(table_id, eps, ids, current, table_size, cache)
        src_id = _sources(sp, keys, current, src_ids, new.sources)
        flags = F_LOCAL if owner.local else 0
        if owner.local and not ids and not _usable(sp, False, node.name):
            # no usable endpoint on any node: reject (count 0 without F_LOCAL),
            # as kube-proxy does; Local drops only while other nodes have one
            flags = 0
        for key, is_lb in keys:
            new.frontends[key] = NsSvc(table_id, len(set(ids)), src_id if is_lb else 0,
                                       flags | (F_NODEPORT if key.addr in WILDCARDS else 0))
    return NsPlan(new, diff(current, new), problems)


def diff(current: NorthSouthState, new: NorthSouthState) -> list[NsStep]:
    """The writes from current to new, make-before-break."""
    steps: list[NsStep] = []
    if new.cfg != current.cfg:
        steps.append(NsStep("cfg", "update", {0: new.cfg}))
    updates = ("node_addrs", "backends", "tables", "sources", "frontends")
    for role in updates:
        changed = _changed(_as_dict(current, role), _as_dict(new, role))
        if changed:
            steps.append(NsStep(role, "update", changed))
    for role in reversed(updates):
        gone = {k: None for k in _as_dict(current, role).keys() - _as_dict(new, role).keys()
                # a row of zeroes is a deleted table (maps read back name
                # tables of count-0 frontends too): nothing to delete again
                if role != "tables" or any(current.tables[k])}
        if gone:
            steps.append(NsStep(role, "delete", gone))
    return steps


def disable(current: NorthSouthState) -> list[NsStep]:
    """Writes that make the programs pass everything (north-south off)."""
    if current.cfg.enabled:
        return [NsStep("cfg", "update", {0: current.cfg._replace(enabled=0)})]
    return []


# --- frontends -------------------------------------------------------------------

def _frontends_by_owner(desired: DesiredState, all_cluster_ips: bool, problems: list[str]
                        ) -> dict[_Owner, tuple[ServicePort, list[tuple[NsKey, bool]]]]:
    """Each table's frontend keys (with: is it a LoadBalancer IP), first
    claim wins in namespace/name/port/family order."""
    claimed: dict[NsKey, ServicePort] = {}
    owners: dict[_Owner, tuple[ServicePort, list[tuple[NsKey, bool]]]] = {}
    exposed = sorted((sp for sp in desired.service_ports.values()
                      if all_cluster_ips or sp.exposure is not None),
                     key=lambda sp: (sp.namespace, sp.name, sp.port_name,
                                     sp.frontend.address.version, sp.frontend.protocol))
    for sp in exposed:
        local = sp.exposure is not None and sp.exposure.local
        for key, is_lb, external in _keys(sp):
            holder = claimed.get(key)
            if holder is not None:
                if holder.service != sp.service:
                    problems.append(f"Service {sp.service} port {sp.port_name or sp.frontend.port}: "
                                    f"{_show(key)} is already Service {holder.service}'s; left out")
                continue
            claimed[key] = sp
            owners.setdefault(_Owner(sp.frontend, local and external), (sp, []))[1].append((key, is_lb))
    return owners


def _keys(sp: ServicePort) -> Iterable[tuple[NsKey, bool, bool]]:
    """(key, is a LoadBalancer IP, is external: follows externalTrafficPolicy)."""
    fe, exp = sp.frontend, sp.exposure
    proto = PROTO[fe.protocol]
    yield NsKey(addr16(fe.address), fe.port, proto), False, False
    if exp is None:
        return
    if sp.node_port and exp.type in ("NodePort", "LoadBalancer"):
        yield NsKey(wildcard(fe.address.version), sp.node_port, proto), False, True
    for ip in exp.external_ips:
        if ip.version == fe.address.version:
            yield NsKey(addr16(ip), fe.port, proto), False, True
    for ip in exp.lb_ips:
        if ip.version == fe.address.version:
            yield NsKey(addr16(ip), fe.port, proto), True, True


def _show(key: NsKey) -> str:
    proto = "TCP" if key.proto == socket.IPPROTO_TCP else "UDP"
    if key.addr in WILDCARDS:
        family = "IPv4" if key.addr == WILDCARDS[0] else "IPv6"
        return f"node port {key.port}/{proto} ({family})"
    ip = ipaddress.IPv6Address(key.addr)
    shown = ip.ipv4_mapped or ip
    return f"{shown}:{key.port}/{proto}" if shown.version == 4 else f"[{shown}]:{key.port}/{proto}"


# --- backends and tables -------------------------------------------------------------

def _usable(sp: ServicePort, local: bool, node_name: str):
    every = sp.all_endpoints
    if local:
        every = tuple(e for e in every if e.node_name == node_name)
    return [u.endpoint for u in usable_endpoints(every)]


class _BackendIds:
    """Backend ids: an endpoint keeps the id the maps hold for it; a new one
    takes the lowest id the maps do not hold."""

    def __init__(self, current: NorthSouthState):
        self.held = {be: i for i, be in current.backends.items()}
        self.taken = set(current.backends)
        self.next = 1

    def id_for(self, ep, node_name: str, chosen: dict[int, NsBackend]) -> int:
        be = NsBackend(addr16(ep.address), ep.port, BE_LOCAL if ep.node_name == node_name else 0)
        i = self.held.get(be)
        if i is None:
            while self.next in self.taken:
                self.next += 1
            i = self.held[be] = self.next
            self.taken.add(i)
        chosen[i] = be
        return i


class _Ids:
    """Table or source-range ids: reuse the one a frontend names, else the
    lowest the maps do not hold (never one a live frontend may still use)."""

    def __init__(self, held: Iterable[int], start: int):
        self.held = set(held)
        self.taken: set[int] = set()
        self.next = start

    def reuse_or_new(self, svcs: Iterable[NsSvc | None], field: str = "table_id") -> int:
        for svc in svcs:
            if svc is None or (field == "table_id" and not svc.count):
                continue
            i = getattr(svc, field)
            if i in self.held and i not in self.taken:
                self.taken.add(i)
                return i
        while self.next in self.held or self.next in self.taken:
            self.next += 1
        self.taken.add(self.next)
        return self.next


def _row(table_id: int, eps, ids: list[int], current: NorthSouthState, size: int,
         cache: RowCache) -> array:
    """The table's row: the one the maps hold when it names exactly these
    backends (Maglev depends only on the backend set and the size), else
    built anew."""
    wanted = frozenset(ids)
    held = current.tables.get(table_id)
    if held is not None and len(held) == size:
        cached = cache.get(table_id)
        held_ids = cached[1] if cached is not None and cached[0] is held else frozenset(held)
        cache[table_id] = (held, held_ids)
        if held_ids == wanted:
            return held
    id_of = {maglev.identity(str(e.address), e.port): i for e, i in zip(eps, ids)}
    table = maglev.build([maglev.Backend(str(e.address), e.port) for e in eps], size)
    by_index = [id_of[ident] for ident in table.backends]
    row = array("I", map(by_index.__getitem__, table.slots))
    cache[table_id] = (row, wanted)
    return row


# --- source ranges, cfg ---------------------------------------------------------------

def _sources(sp: ServicePort, keys, current: NorthSouthState, src_ids: _Ids,
             out: dict[NsSrcKey, int]) -> int:
    """The src_id of the owner's LoadBalancer IPs, its rows written to `out`;
    0 when no range of the port's family is given (any client, as kube-proxy
    filters the ranges by family)."""
    if sp.exposure is None:
        return 0
    version = sp.frontend.address.version
    ranges = [n for n in sp.exposure.source_ranges if n.version == version]
    if not ranges or not any(is_lb for _, is_lb in keys):
        return 0
    src_id = src_ids.reuse_or_new((current.frontends.get(k) for k, is_lb in keys if is_lb), "src_id")
    for net in ranges:
        bits = net.prefixlen + (96 if version == 4 else 0)
        out[NsSrcKey(src_id, addr16(net.network_address), bits)] = 1
    return src_id


def _snat(ip: IPAddress | None) -> bytes:
    return addr16(ip) if ip is not None else ZERO


def _as_dict(state: NorthSouthState, role: str) -> dict:
    value = getattr(state, role)
    return dict.fromkeys(value, 1) if role == "node_addrs" else value


def _changed(old: dict, new: dict) -> dict:
    out = {}
    for k, v in new.items():
        o = old.get(k)
        if o is None or (o is not v and o != v):
            out[k] = v
    return out
