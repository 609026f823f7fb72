"""The capture maps' entries as plain values (mirrors of bpf/lib/common.h).

The capture planner (meshbpf/reconcile/capture.py) produces these; the
datapath (meshbpf/datapath/capture.py) converts them to and from the C
structs. Addresses are 16 bytes (IPv4 mapped, as reconcile.addr16 makes
them); ports are host order here, the datapath converts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

MAX_LEVEL = 8          # MBPF_CAP_MAX_LEVEL: cgroup ancestor levels the hooks walk

F_OUTBOUND = 1         # MBPF_CAP_F_OUTBOUND
F_INBOUND = 2          # MBPF_CAP_F_INBOUND
F_IN_ALL = 4           # MBPF_CAP_F_IN_ALL: inbound ports not EXCLUDEd are captured
F_OUT_ALL = 8          # MBPF_CAP_F_OUT_ALL: destinations matching no prefix are captured

EXCLUDE = 0            # MBPF_CAP_EXCLUDE
INCLUDE = 1            # MBPF_CAP_INCLUDE

DIR_IN = 0             # MBPF_DIR_IN
DIR_OUT = 1            # MBPF_DIR_OUT
DIR_IN_NAT = 2         # MBPF_CAP_DIR_IN_NAT: inbound from another node, port translated in tc

# Indexes of mbpf_cap_stats (MBPF_CAP_* in bpf/lib/common.h).
COUNTERS = {
    "captured_outbound": 0, "captured_inbound": 1, "captured_dns": 2,
    "skipped_proxy_uid": 3, "skipped_port": 4, "skipped_cidr": 5,
    "original_dst_answered": 6, "original_dst_missing": 7,
}


class CapPod(NamedTuple):
    """mbpf_cap_pod value; the key is the pod cgroup's id."""

    ip4: bytes        # 16 bytes, IPv4 mapped; zero if none
    ip6: bytes        # 16 bytes; zero if none
    proxy_uid: int
    pod_id: int       # 1..
    out_port: int
    in_port: int
    dns_port: int     # 0: DNS not captured
    flags: int        # F_*


class CidrKey(NamedTuple):
    """mbpf_cap_cidr key; addr_bits counts over the 16-byte address (an
    IPv4 /8 is 96 + 8 = 104); the datapath adds pod_id's 32 bits."""

    pod_id: int
    addr: bytes       # 16 bytes, network order
    addr_bits: int    # 0..128


class PortKey(NamedTuple):
    """mbpf_cap_port key; the value is a verdict (INCLUDE / EXCLUDE)."""

    pod_id: int
    port: int
    dir: int          # DIR_IN / DIR_OUT


class Orig(NamedTuple):
    """mbpf_cap_orig / mbpf_cap_pair value: the original destination."""

    addr: bytes       # 16 bytes, IPv4 mapped
    port: int
    dir: int          # DIR_OUT, DIR_IN, or DIR_IN_NAT (port translated in tc)


@dataclass
class CaptureState:
    """The content of the capture settings maps (or what it will be). The
    connection records (mbpf_cap_orig, mbpf_cap_pair) are the kernel's own
    and not part of it."""

    pods: dict[int, CapPod] = field(default_factory=dict)        # cgroup id -> settings
    addresses: dict[bytes, int] = field(default_factory=dict)    # pod address -> cgroup id
    cidrs: dict[CidrKey, int] = field(default_factory=dict)      # -> INCLUDE / EXCLUDE
    ports: dict[PortKey, int] = field(default_factory=dict)      # -> INCLUDE / EXCLUDE

    def copy(self) -> "CaptureState":
        return CaptureState(dict(self.pods), dict(self.addresses), dict(self.cidrs), dict(self.ports))


class CaptureStep(NamedTuple):
    map: str       # "pods", "addresses", "cidrs" or "ports" (CaptureState fields)
    op: str        # "update" or "delete"
    entries: dict  # key -> value for updates; key -> None for deletes
