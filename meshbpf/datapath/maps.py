"""Reading the socket-LB maps into an LBState, and applying a Plan to them."""

from __future__ import annotations

import ctypes as ct
import logging
import os
import socket
import struct
from pathlib import Path
from typing import Callable, Iterator

from ..reconcile import LBState, Plan, state_from_entries
from . import libbpf
from .layout import BY_ROLE, CODECS, COUNTABLE, LB_COLUMNS, LB_MAPS, LB_RESULTS, MapSpec

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
        return state_from_entries({role: self._entries(role) for role in ROLES})

    def _entries(self, role: str) -> Iterator[tuple]:
        key_from, _, val_from, _ = CODECS[role]
        for k, v in _all_items(self.tables[role]):
            yield key_from(k), val_from(v)

    def apply(self, plan: Plan) -> None:
        """Writes the plan's steps in order; each step is one batch syscall."""
        for step in plan.steps():
            table = self.tables[step.map]
            _, key_into, _, val_into = CODECS[step.map]
            keys = _array(table.Key, key_into, (step.map, "key"), list(step.entries))
            try:
                if step.op == "update":
                    values = _array(table.Leaf, val_into, (step.map, "value"), list(step.entries.values()))
                    _update(table, keys, values)
                else:
                    _delete(table, keys)
            except OSError as exc:
                raise MapWriteError(f"{step.op} of {len(step.entries)} {step.map} entries "
                                    f"failed: {exc}") from exc


# Packing a step's entries with struct is about twice as fast as filling a
# ctypes array field by field (90 000 entries at 10 000 Services). Each row
# gives an entry's fields in its map struct's order, as layout.CODECS
# writes them; the format comes from the compiled ctypes type, and the first
# entry of every step is checked against the codec: on any difference the
# codec fills the arrays, as it always did.
_ROWS: dict[tuple[str, str], tuple[tuple[str, ...], Callable]] = {
    ("services", "key"): (("addr", "port", "proto", "pad"),
                          lambda k: (k.addr, socket.htons(k.port), k.proto, 0)),
    ("services", "value"): (("svc_id", "count", "affinity_timeout", "flags"),
                            lambda v: (v.svc_id, v.count, v.affinity_timeout, v.flags)),
    ("slots", "key"): (("svc_id", "slot"), lambda k: (k.svc_id, k.slot)),
    ("slots", "value"): (("backend_id", "state", "pad"), lambda v: (v.backend_id, v.state, b"\0\0\0")),
    ("backends", "value"): (("addr", "port", "proto", "pad"),
                            lambda v: (v.addr, socket.htons(v.port), v.proto, 0)),
}
_INT_CODES = {1: "B", 2: "H", 4: "I", 8: "Q"}
_packers: dict[tuple[type, tuple[str, str]], tuple[struct.Struct, Callable] | None] = {}


def _struct_format(ctype: type, names: tuple[str, ...]) -> str | None:
    """A struct format for a ctypes Structure of unsigned integers and byte
    arrays with exactly these field names; None for anything else."""
    if not issubclass(ctype, ct.Structure) or tuple(f[0] for f in ctype._fields_) != names:
        return None
    fmt, at = "=", 0
    for name, ftype, *_ in ctype._fields_:
        field = getattr(ctype, name)
        code = getattr(ftype, "_type_", None)
        if isinstance(code, str) and code.isupper() and ct.sizeof(ftype) in _INT_CODES:
            part = _INT_CODES[ct.sizeof(ftype)]
        elif issubclass(ftype, ct.Array) and ct.sizeof(ftype._type_) == 1:
            part = f"{ftype._length_}s"
        else:
            return None
        fmt += "x" * (field.offset - at) + part
        at = field.offset + field.size
    fmt += "x" * (ct.sizeof(ctype) - at)
    return fmt if struct.calcsize(fmt) == ct.sizeof(ctype) else None


def _packer(ctype: type, which: tuple[str, str]) -> tuple[struct.Struct, Callable] | None:
    key = (ctype, which)
    if key not in _packers:
        names, row = _ROWS.get(which, ((), None))
        fmt = _struct_format(ctype, names) if row else None
        _packers[key] = (struct.Struct(fmt), row) if fmt else None
    return _packers[key]


def _array(ctype: type, into: Callable, which: tuple[str, str], entries: list):
    """A ctypes array of the entries, packed when the packer agrees with the codec."""
    packer = _packer(ctype, which)
    if packer is not None:
        st, row = packer
        packed = b"".join([st.pack(*row(e)) for e in entries])
        if packed[: st.size] == bytes(into(ctype(), entries[0])):
            return (ctype * len(entries)).from_buffer_copy(packed)
        log.warning("packing %s %ss disagrees with the codec; filling them field by field", *which)
        _packers[(ctype, which)] = None
    array = (ctype * len(entries))()
    if issubclass(ctype, ct.Structure):
        for i, e in enumerate(entries):
            into(array[i], e)
    else:
        array[:] = [into(None, e) for e in entries]
    return array


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


def count_entries(fd: int, spec: MapSpec) -> int:
    """Entries in use: for the connection slots (an array, where every
    index exists) the ones a socket holds; for other maps, their keys."""
    if spec.name == "mbpf_conn_slot":
        return sum(1 for slot in libbpf.array_values(fd, spec.value) if slot.cookie)
    return libbpf.map_count(fd, libbpf.map_info(fd).key_size)


def read_pinned(bpffs: Path) -> tuple[LBState, dict[str, int]]:
    """LBState and entry counts straight from the pinned maps, for the CLI.

    Uses the ctypes mirror in layout.py; no compiler, no agent needed."""
    state = LBState()
    counts: dict[str, int] = {}
    for spec in LB_MAPS:
        path = bpffs / spec.name
        if not path.exists() or spec.name not in COUNTABLE:
            continue
        fd = libbpf.open_pinned(str(path), spec.key, spec.value)
        try:
            if spec.role:
                key_from, _, val_from, _ = CODECS[spec.role]
                target = getattr(state, spec.role)
                for k, v in libbpf.map_items(fd, spec.key, spec.value):
                    target[key_from(k)] = val_from(v)
                counts[spec.name] = len(target)
            else:
                counts[spec.name] = count_entries(fd, spec)
        finally:
            os.close(fd)
    return state, counts


def read_lb_stats(bpffs: Path) -> dict[tuple[str, str, str], int] | None:
    """(result, family, protocol) -> count from mbpf_lb_stats, summed over
    CPUs; None when the map is not pinned (no agent of this build ran)."""
    try:
        fd = libbpf.open_pinned(str(bpffs / "mbpf_lb_stats"), ct.c_uint32, ct.c_uint64)
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
