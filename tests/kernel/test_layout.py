"""The CLI's ctypes mirror matches the layout compiled from bpf/lib/common.h."""

from __future__ import annotations

import ctypes as ct

from meshbpf.datapath.layout import LB_MAPS
from meshbpf.datapath.loader import SockLB


def _layout(t) -> list[tuple[str, int, int]]:
    if not issubclass(t, ct.Structure):
        return [("", 0, ct.sizeof(t))]
    return [(name, getattr(t, name).offset, getattr(t, name).size) for name, *_ in t._fields_]


def test_hand_mirror_matches_the_compiled_structs(bpffs):
    lb = SockLB(bpffs=bpffs)
    lb.compile()
    for spec in LB_MAPS:
        table = lb.table(spec.name)
        assert ct.sizeof(spec.key) == ct.sizeof(table.Key), spec.name
        assert ct.sizeof(spec.value) == ct.sizeof(table.Leaf), spec.name
        assert _layout(spec.key) == _layout(table.Key), spec.name
        assert _layout(spec.value) == _layout(table.Leaf), spec.name
