"""mbpf_listeners: its key mirrors struct mbpf_listen_key, and its spec
matches the C declaration, is pinned and is removed by uninstall."""

from __future__ import annotations

import ctypes as ct
import re
from pathlib import Path

from meshbpf.datapath.layout import ALL_MAPS, PINNED_MAPS, REDIR_MAPS, ListenKeyC

REDIR_MAPS_H = Path(__file__).parents[2] / "bpf" / "lib" / "redir_maps.h"


def test_listen_key_is_packed_as_in_common_h():
    """__u64 netns, __u16 port, __u8 pad[6]: 16 bytes, no hidden padding."""
    fields = [(name, getattr(ListenKeyC, name).offset, getattr(ListenKeyC, name).size)
              for name, *_ in ListenKeyC._fields_]
    assert fields == [("netns", 0, 8), ("port", 8, 2), ("pad", 10, 6)]
    assert ct.sizeof(ListenKeyC) == 16


def test_listener_map_spec_is_pinned_like_the_other_redirect_maps():
    spec = next(s for s in REDIR_MAPS if s.name == "mbpf_listeners")
    assert (spec.key, spec.value) == (ListenKeyC, ct.c_uint64)
    assert spec in ALL_MAPS and spec in PINNED_MAPS  # compiled by SockLB, removed by uninstall


def test_redirect_map_names_and_default_sizes_agree_with_the_c_side():
    """Kernel names are cut at 15 characters; the C default of each size
    macro is the one the loader would pass anyway."""
    text = REDIR_MAPS_H.read_text()
    for spec in REDIR_MAPS:
        assert len(spec.name) <= 15, spec.name
        assert re.search(rf"\b{spec.name}\b", text), f"{spec.name} is not declared in {REDIR_MAPS_H.name}"
        if spec.size_macro:
            m = re.search(rf"#define {spec.size_macro} (\d+)", text)
            assert m and int(m.group(1)) == spec.default_size, spec.name
