"""What the tc datapaths (policy, capture, north-south) share: clsact's
parents, and finding our filters on an interface by program name."""

from __future__ import annotations

import os
from typing import Collection

from . import libbpf

TC_INGRESS = 0xFFFFFFF2   # clsact's ingress parent
TC_EGRESS = 0xFFFFFFF3    # clsact's egress parent


def our_filters(ipr, ifindex: int, names: Collection[str], prio: int) -> list[tuple[int, str]]:
    """(parent, program name) of every bpf filter on ifindex at our priority
    whose program is one of names; ingress first."""
    found = []
    for parent in (TC_INGRESS, TC_EGRESS):
        try:
            msgs = ipr.get_filters(index=ifindex, parent=parent)
        except Exception:
            continue  # no clsact here
        for msg in msgs:
            opts = msg.get_attr("TCA_OPTIONS")
            if msg.get_attr("TCA_KIND") != "bpf" or opts is None:
                continue
            name = opts.get_attr("TCA_BPF_NAME") or ""
            if name in names and (msg["info"] >> 16) == prio:
                found.append((parent, name))
    return found


def pinned_map_id(pin: str) -> int | None:
    """The id of the map pinned at pin, or None when nothing is pinned there."""
    try:
        fd = libbpf.obj_get(pin)
    except OSError:
        return None
    try:
        return libbpf.map_info(fd).id
    finally:
        os.close(fd)
