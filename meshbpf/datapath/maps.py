"""Reading the socket-LB maps into an LBState, and applying a Plan to them."""

from __future__ import annotations

import ctypes as ct
import logging
import os
from pathlib import Path

from ..reconcile import LBState, Plan
from . import libbpf
from .layout import BY_ROLE, CODECS, COUNTABLE, LB_COLUMNS, LB_MAPS, LB_RESULTS

log = logging.getLogger(__name__)

ROLES = ("services", "slots", "backends")


class MapWriteError(Exception):
    pass


class LBMaps:
    """The agent's handle on the three reconciled maps (bcc tables)."""

    def __init__(self, tables: dict, capacity: dict[str, int]):
        self.tables = tables      # role -> bcc Table
        self.capacity = capacity  # role -> max_entries

    @classmethod
    def from_socklb(cls, lb) -> "LBMaps":
        tables = {role: lb.table(spec.name) for role, spec in BY_ROLE.items()}
        capacity = {role: lb.capacity(spec) for role, spec in BY_ROLE.items()}
        return cls(tables, capacity)

    def read(self) -> LBState:
        state = LBState()
        for role in ROLES:
            key_from, _, val_from, _ = CODECS[role]
            target = getattr(state, role)
            for k, v in _all_items(self.tables[role]):
                target[key_from(k)] = val_from(v)
        return state

    def apply(self, plan: Plan) -> None:
        """Writes the plan's steps in order; each step is one batch syscall."""
        for step in plan.steps():
            table = self.tables[step.map]
            _, key_into, _, val_into = CODECS[step.map]
            keys = (table.Key * len(step.entries))()
            if issubclass(table.Key, ct.Structure):
                for i, k in enumerate(step.entries):
                    key_into(keys[i], k)
            else:
                keys[:] = [key_into(None, k) for k in step.entries]
            try:
                if step.op == "update":
                    values = (table.Leaf * len(step.entries))()
                    for i, v in enumerate(step.entries.values()):
                        val_into(values[i], v)
                    _update(table, keys, values)
                else:
                    _delete(table, keys)
            except OSError as exc:
                raise MapWriteError(f"{step.op} of {len(step.entries)} {step.map} entries "
                                    f"failed: {exc}") from exc


def _all_items(table):
    try:
        yield from table.items_lookup_batch()
    except Exception:
        # Older kernels: no batch lookup on this map type.
        yield from table.items()


def _update(table, keys, values) -> None:
    try:
        table.items_update_batch(keys, values)
        return
    except Exception as exc:  # bcc raises a bare Exception with strerror text
        if "No space left" in str(exc) or "Argument list too long" in str(exc):
            raise OSError(f"map full: {exc}") from None
        log.debug("batch update failed (%s); writing one by one", exc)
    for k, v in zip(keys, values):
        try:
            table[k] = v
        except Exception as exc:
            raise OSError(str(exc)) from None


def _delete(table, keys) -> None:
    try:
        table.items_delete_batch(keys)
        return
    except Exception as exc:
        log.debug("batch delete failed (%s); deleting one by one", exc)
    for k in keys:
        try:
            del table[k]
        except KeyError:
            pass


def read_pinned(bpffs: Path) -> tuple[LBState, dict[str, int]]:
    """LBState and entry counts straight from the pinned maps, for the CLI.

    Uses the ctypes mirror in layout.py; no compiler, no agent needed."""
    state = LBState()
    counts: dict[str, int] = {}
    for spec in LB_MAPS:
        path = bpffs / spec.name
        if not path.exists() or spec.name not in COUNTABLE:
            continue
        fd = libbpf.obj_get(str(path))
        try:
            if spec.role:
                key_from, _, val_from, _ = CODECS[spec.role]
                target = getattr(state, spec.role)
                for k, v in libbpf.map_items(fd, spec.key, spec.value):
                    target[key_from(k)] = val_from(v)
                counts[spec.name] = len(target)
            else:
                info = libbpf.map_info(fd)
                counts[spec.name] = libbpf.map_count(fd, info.key_size)
        finally:
            os.close(fd)
    return state, counts


def read_lb_stats(bpffs: Path) -> dict[tuple[str, str, str], int] | None:
    """(result, family, protocol) -> count from mbpf_lb_stats, summed over
    CPUs; None when the map is not pinned (no agent of this build ran)."""
    try:
        fd = libbpf.obj_get(str(bpffs / "mbpf_lb_stats"))
    except OSError:
        return None
    try:
        ncpu = libbpf.possible_cpus()
        out = {}
        for result, row in LB_RESULTS.items():
            for (v6, udp), (family, proto) in LB_COLUMNS.items():
                values = (ct.c_uint64 * ncpu)()
                libbpf.map_lookup(fd, ct.c_uint32(row * 4 + 2 * v6 + udp), values)
                out[(result, family, proto)] = sum(values)
        return out
    finally:
        os.close(fd)
