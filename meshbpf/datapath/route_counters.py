"""Connections per route backend: the entries of mbpf_route_cnt, and their sums.

The socket-LB programs count a pick into mbpf_route_cnt[(svc_id,
backend_id)] only when that entry exists (bpf/lib/lb.h): the agent creates
one per backend endpoint of each weighted split right after programming it,
and deletes those of splits that are gone. Backend ids are shared between
Services, so keying by the split frontend's svc_id too keeps a connection
made straight to a backend Service out of the route's count.

Counting starts when the entry is made, a moment after the split's slots
are written; the few connections in between are not counted.
"""

from __future__ import annotations

import ctypes as ct
import errno
import logging
import os
import weakref
from pathlib import Path
from typing import Iterable, Mapping

from ..model import DesiredState, Frontend
from ..reconcile import IPPROTO, BackendVal, LBState, SvcKey, addr16
from . import libbpf
from .layout import PickKeyC

log = logging.getLogger(__name__)

MAP_NAME = "mbpf_route_cnt"
BPF_NOEXIST = 1

Labels = tuple[str, str]  # (route, backend Service "namespace/name:port")


def wanted_pairs(desired: DesiredState, lb: LBState, split: Iterable[Frontend] | None = None,
                 backend_id: Mapping[BackendVal, int] | None = None) -> dict[tuple[int, int], Labels]:
    """(svc_id, backend_id) -> (route, backend) for every programmed split.
    split: the frontends that may be split (default: all); backend_id: each
    backend's ID, as the planners index them (default: from lb's backends).
    With both, the cost is the splits', not the state's."""
    out: dict[tuple[int, int], Labels] = {}
    if not desired.routes:
        return out  # before the index below: it costs every backend, on every change
    backend_ids = backend_id if backend_id is not None else {val: bid for bid, val in lb.backends.items()}
    ports = desired.service_ports
    for fe in (ports if split is None else split):
        sp = ports.get(fe)
        if sp is None or not sp.split:
            continue
        proto = IPPROTO[sp.frontend.protocol]
        svc = lb.services.get(SvcKey(addr16(sp.frontend.address), sp.frontend.port, proto))
        if svc is None:
            continue  # not programmed (refused for room): nothing to count
        for share in sp.split:
            for ep in share.endpoints:
                bid = backend_ids.get(BackendVal(addr16(ep.address), ep.port, proto))
                if bid is not None:
                    out[(svc.svc_id, bid)] = (sp.route, share.service)
    return out


class RouteCounters:
    """Keeps mbpf_route_cnt's entries in step with the splits, and reads them."""

    def __init__(self, bpffs: Path):
        self.path = bpffs / MAP_NAME
        self.labels: dict[tuple[int, int], Labels] = {}
        self._full_said = False
        # The state of the last sync, weakly, and its split frontends.
        self._split_of: tuple[weakref.ref, tuple[Frontend, ...]] | None = None

    def sync(self, desired: DesiredState, lb: LBState,
             backend_id: Mapping[BackendVal, int] | None = None) -> None:
        """backend_id: as for wanted_pairs."""
        split = self._split(desired)
        wanted = wanted_pairs(desired, lb, split, backend_id)
        if not wanted and not self.labels:
            return
        try:
            fd = self._open()
        except OSError:
            return  # programs of an older build: no counter map
        try:
            zeros = (ct.c_uint64 * libbpf.possible_cpus())()
            have = {(k.svc_id, k.backend_id) for k in libbpf.map_keys(fd, PickKeyC)}
            for pair in have - wanted.keys():
                libbpf.map_delete(fd, PickKeyC(*pair))
            for pair in wanted.keys() - have:
                try:
                    libbpf.map_update(fd, PickKeyC(*pair), zeros, BPF_NOEXIST)
                except OSError as exc:
                    if exc.errno not in (errno.E2BIG, errno.ENOSPC, errno.ENOMEM):
                        raise
                    if not self._full_said:
                        log.warning("%s is full: some route backends are not counted", MAP_NAME)
                        self._full_said = True
            self.labels = wanted
        finally:
            os.close(fd)

    def _split(self, desired: DesiredState) -> tuple[Frontend, ...]:
        """The split frontends: a walk of those the Delta names and those
        split last time, when the Delta is over the state synced last; else
        of every frontend."""
        delta, last = desired.delta, self._split_of
        ports = desired.service_ports
        if last is not None and delta is not None and delta.base() is last[0]():
            candidates: Iterable[Frontend] = dict.fromkeys([*last[1], *delta.frontends])
        else:
            candidates = ports.keys() if desired.routes else ()
        split = tuple(fe for fe in candidates if (sp := ports.get(fe)) is not None and sp.split)
        self._split_of = (weakref.ref(desired), split)
        return split

    def _open(self) -> int:
        """The counter map, checked: its values are per CPU, so one of
        another size would have the kernel read or write past our buffers
        (a LayoutError instead: one line, which the callers log)."""
        return libbpf.open_pinned(str(self.path), PickKeyC, ct.c_uint64)

    def read(self) -> dict[Labels, int]:
        """(route, backend) -> connections, summed over CPUs and frontends."""
        if not self.labels:
            return {}
        try:
            fd = self._open()
        except OSError:
            return {}
        out: dict[Labels, int] = {}
        try:
            values = (ct.c_uint64 * libbpf.possible_cpus())()
            for pair, labels in list(self.labels.items()):
                try:
                    libbpf.map_lookup(fd, PickKeyC(*pair), values)
                except OSError:
                    continue
                out[labels] = out.get(labels, 0) + sum(values)
        finally:
            os.close(fd)
        return out
