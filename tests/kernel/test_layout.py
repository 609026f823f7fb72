"""The CLI's ctypes mirror matches the layout compiled from bpf/lib/common.h."""

from __future__ import annotations

import ctypes as ct

import pytest

from meshbpf.datapath import libbpf
from meshbpf.datapath.layout import ALL_MAPS, CAPTURE_MAPS, NO_PREALLOC
from meshbpf.datapath.loader import OPTIONAL_LB_MAPS, SockLB


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
    compiled = lb.maps()
    # A map left out is exactly one its feature gates off on this kernel (on
    # 5.10, no compare-and-swap: no mbpf_conn_slot), never one forgotten.
    left_out = {spec.name for spec in ALL_MAPS} - {spec.name for spec in compiled}
    assert left_out == {m for m, f in OPTIONAL_LB_MAPS.items() if not lb.features.get(f)}, left_out
    for spec in compiled:
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


def test_the_north_south_cfg_keeps_its_size_and_counters_their_indexes():
    """mbpf_ns_cfg took the SNAT port range into its former padding: the
    mirror matches what bcc compiles, and the value is still 40 bytes, so
    an agent upgrade reuses the pinned map (the old padding, zero, reads as
    the datapath's default range). The counters' names index the
    MBPF_NS_* defines."""
    import re

    from bcc import BPF

    from meshbpf.datapath.layout import NS_COUNTERS, NsCfgC
    from meshbpf.datapath.source import bpf_dir
    text = '#include <uapi/linux/bpf.h>\n#include "lib/common.h"\nBPF_ARRAY(cfg, struct mbpf_ns_cfg, 1);\n'
    bpf = BPF(text=text.encode(), cflags=[f"-I{bpf_dir()}"])
    try:
        assert _layout(NsCfgC) == _layout(bpf[b"cfg"].Leaf)
    finally:
        bpf.cleanup()
    assert ct.sizeof(NsCfgC) == 40
    header = (bpf_dir() / "lib" / "common.h").read_text()
    defines = {m[0]: int(m[1]) for m in re.findall(r"#define (MBPF_NS_[A-Z_]+)\s+(\d+)", header)}
    assert defines["MBPF_NS_SNAT_RETRY"] == NS_COUNTERS["snat_port_retry"]
    assert defines["MBPF_NS_DROP_NOSNAT"] == NS_COUNTERS["drop_no_snat"]
    assert max(NS_COUNTERS.values()) < defines["MBPF_NS_STAT_MAX"]
