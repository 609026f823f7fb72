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


# The flow-event records are no map's key or value: bcc describes them here
# through an array of each, compiled from the same header.
EVENT_RECORDS = {"mbpf_pol_event": "PolEventC", "mbpf_lb_event": "LbEventC", "mbpf_cap_event": "CapEventC"}


def test_event_record_mirrors_match_the_compiled_structs():
    from bcc import BPF

    from meshbpf.datapath import layout
    from meshbpf.datapath.source import bpf_dir
    arrays = "".join(f"BPF_ARRAY(ev_{i}, struct {name}, 1);\n" for i, name in enumerate(EVENT_RECORDS))
    text = f'#include <uapi/linux/bpf.h>\n#include "lib/common.h"\n{arrays}'
    bpf = BPF(text=text.encode(), cflags=[f"-I{bpf_dir()}"])
    try:
        for i, (name, mirror) in enumerate(EVENT_RECORDS.items()):
            compiled = bpf[f"ev_{i}".encode()].Leaf
            assert _layout(getattr(layout, mirror)) == _layout(compiled), name
            assert getattr(layout, mirror).kind.offset == layout.EV_KIND_OFF, name
    finally:
        bpf.cleanup()
