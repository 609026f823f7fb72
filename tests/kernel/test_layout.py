"""The CLI's ctypes mirror matches the layout compiled from bpf/lib/common.h."""

from __future__ import annotations

import ctypes as ct

import pytest

from meshbpf.datapath import libbpf
from meshbpf.datapath.layout import ALL_MAPS, CAPTURE_MAPS, NO_PREALLOC
from meshbpf.datapath.loader import SockLB


def _layout(t) -> list[tuple[str, int, int]]:
    if not issubclass(t, ct.Structure):
        return [("", 0, ct.sizeof(t))]
    return [(name, getattr(t, name).offset, getattr(t, name).size) for name, *_ in t._fields_]


# Every map is compiled only where the kernel has what each needs.
@pytest.mark.needs_feature("sk_storage", "sockmap", "sockops_probe_read", "kernel_btf", "capture")
def test_hand_mirror_matches_the_compiled_structs(bpffs):
    lb = SockLB(bpffs=bpffs)
    lb.compile()
    assert set(CAPTURE_MAPS) <= set(ALL_MAPS)
    for spec in ALL_MAPS:
        key, leaf = lb.compiled_types(spec.name)
        assert ct.sizeof(spec.key) == ct.sizeof(key), spec.name
        assert ct.sizeof(spec.value) == ct.sizeof(leaf), spec.name
        assert _layout(spec.key) == _layout(key), spec.name
        assert _layout(spec.value) == _layout(leaf), spec.name
        # The loader's take-over of older pins goes by this flag.
        flags = libbpf.map_info(lb.map_fd(spec.name)).map_flags
        assert bool(flags & NO_PREALLOC) == spec.no_prealloc, spec.name
