"""Pinned maps of one bpffs folder, opened without bcc and read and written
as a planner's plain state: one field of the state per map (its role), a
codec per role between plain values and the C layouts (layout.py), writes
in the planner's order through libbpf.py. The policy maps (policy.py) and
the capture maps (capture.py) are two of these."""

from __future__ import annotations

import ctypes as ct
import errno
import os
from pathlib import Path
from typing import Callable, Iterable

from . import libbpf
from .layout import MapSpec


class PinnedMaps:
    """Subclasses say which maps (roles), how to convert them (codecs), the
    state type the planner uses, the error they raise and the per-CPU
    counter array their counters() sums."""

    what = "map"                            # for errors: "policy", "capture"
    roles: dict[str, MapSpec] = {}          # state field -> map
    codecs: dict[str, tuple] = {}           # state field -> (key_into, val_into, key_from, val_from)
    state_type: type = dict
    error: type[Exception] = Exception
    stats_map = ""
    counter_index: dict[str, int] = {}      # counter name -> index in stats_map

    def __init__(self, bpffs: Path, specs: Iterable[MapSpec],
                 skip: Callable[[MapSpec], bool] = lambda spec: False):
        self.bpffs = Path(bpffs)
        self.fds: dict[str, int] = {}
        try:
            for spec in specs:
                if not skip(spec):
                    self.fds[spec.name] = libbpf.open_pinned(str(self.bpffs / spec.name),
                                                             spec.key, spec.value)
        except (OSError, libbpf.LayoutError):
            self.close()
            raise

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def read(self):
        state = self.state_type()
        for role, spec in self.roles.items():
            _, _, key_from, val_from = self.codecs[role]
            target = getattr(state, role)
            for k, v in libbpf.map_items(self.fds[spec.name], spec.key, spec.value):
                target[key_from(k)] = val_from(v)
        return state

    def apply(self, steps: Iterable) -> None:
        """Each step's entries, steps in the order given: the planner's order
        is what keeps every intermediate state safe."""
        for step in steps:
            self._apply_step(step)

    def _apply_step(self, step) -> None:
        if step.map not in self.roles:
            raise self.error(f"{self.what} step: unknown map {step.map!r} "
                             f"(known: {', '.join(self.roles)})")
        spec = self.roles[step.map]
        if step.op not in ("update", "delete"):
            raise self.error(f"{self.what} step on {spec.name}: unknown op {step.op!r}")
        key_into, val_into, _, _ = self.codecs[step.map]
        fd = self.fds[spec.name]
        for key, value in step.entries.items():
            try:
                if step.op == "update":
                    libbpf.map_update(fd, key_into(key), val_into(value))
                else:
                    libbpf.map_delete(fd, key_into(key))
            except OSError as exc:
                if step.op == "delete" and exc.errno == errno.ENOENT:
                    continue  # already gone: the goal is reached
                raise self.error(f"{step.op} of {spec.name} entry {key} failed: "
                                 f"{exc.strerror}") from exc

    def counters(self) -> dict[str, int]:
        """The per-CPU counter array summed over CPUs, by name."""
        ncpu = libbpf.possible_cpus()
        out = {}
        for name, idx in self.counter_index.items():
            values = (ct.c_uint64 * ncpu)()
            libbpf.map_lookup(self.fds[self.stats_map], ct.c_uint32(idx), values)
            out[name] = sum(values)
        return out
