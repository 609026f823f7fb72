"""Sidecar capture's pinned maps (issue 11), read and written without bcc.

The planner (meshbpf/reconcile/capture.py) says what to write as ordered
CaptureSteps over plain values (meshbpf/reconcile/capture_keys.py);
`CaptureMaps` converts them to the C layouts of bpf/lib/common.h (ctypes
mirrors in layout.py) and writes them through libbpf.py, the one map-access
layer. The programs are bpf/lib/capture.h's, attached by
SockLB.attach_capture (loader.py).
"""

from __future__ import annotations

import ctypes as ct
import os
import socket
from pathlib import Path
from typing import Iterable

from ..reconcile.capture_keys import COUNTERS, CapPod, CaptureState, CaptureStep, CidrKey, Orig, PortKey
from . import libbpf
from .pinned import PinnedMaps
from .layout import (CAPTURE_MAPS, CapCfgC, CapCidrKeyC, CapOrigC, CapPairKeyC, CapPodC,
                     CapPortKeyC, CapVerdictC, EpAddrC)

SPECS = {spec.name: spec for spec in CAPTURE_MAPS}
ROLE_MAP = {spec.role: spec for spec in CAPTURE_MAPS if spec.role}
CIDR_POD_BITS = 32  # mbpf_cap_cidr's prefixlen counts pod_id's bits first


class CaptureError(Exception):
    pass


def cgroup_id(path: str | Path) -> int:
    """A pod's mbpf_cap_pod key: the id of its cgroup v2 folder (its inode)."""
    path = Path(path)
    if not (path / "cgroup.procs").exists():
        raise CaptureError(f"{path} is not a cgroup v2 folder")
    return os.stat(path).st_ino


# --- plain values <-> C structs -------------------------------------------------

def _u64(c) -> int:
    return c.value if hasattr(c, "value") else int(c)


def _pod_into(v: CapPod) -> CapPodC:
    c = CapPodC(proxy_uid=v.proxy_uid, pod_id=v.pod_id, out_port=v.out_port, in_port=v.in_port,
                dns_port=v.dns_port, flags=v.flags, pad=0)
    c.ip4[:] = v.ip4
    c.ip6[:] = v.ip6
    return c


def _pod_from(c: CapPodC) -> CapPod:
    return CapPod(bytes(c.ip4), bytes(c.ip6), c.proxy_uid, c.pod_id, c.out_port, c.in_port,
                  c.dns_port, c.flags)


def _addr_key(addr: bytes) -> EpAddrC:
    c = EpAddrC()
    c.addr[:] = addr
    return c


def _cidr_into(k: CidrKey) -> CapCidrKeyC:
    # pod_id is big-endian so that the trie compares it, as bytes, first
    c = CapCidrKeyC(prefixlen=CIDR_POD_BITS + k.addr_bits, pod_id=socket.htonl(k.pod_id))
    c.addr[:] = k.addr
    return c


def _cidr_from(c: CapCidrKeyC) -> CidrKey:
    return CidrKey(socket.ntohl(c.pod_id), bytes(c.addr), c.prefixlen - CIDR_POD_BITS)


def _port_into(k: PortKey) -> CapPortKeyC:
    return CapPortKeyC(pod_id=k.pod_id, port=k.port, dir=k.dir, pad=0)


def _port_from(c: CapPortKeyC) -> PortKey:
    return PortKey(c.pod_id, c.port, c.dir)


def _verdict_into(v: int) -> CapVerdictC:
    return CapVerdictC(verdict=v)


def _orig_from(c: CapOrigC) -> Orig:
    return Orig(bytes(c.addr), socket.ntohs(c.port), c.dir)


# CaptureState field -> (key into C, value into C, key from C, value from C)
CODECS = {
    "pods": (ct.c_uint64, _pod_into, _u64, _pod_from),
    "addresses": (_addr_key, ct.c_uint64, lambda c: bytes(c.addr), _u64),
    "cidrs": (_cidr_into, _verdict_into, _cidr_from, lambda c: c.verdict),
    "ports": (_port_into, _verdict_into, _port_from, lambda c: c.verdict),
}


class CaptureMaps(PinnedMaps):
    """The pinned capture maps of one bpffs folder."""

    what = "capture"
    roles = ROLE_MAP
    codecs = CODECS
    state_type = CaptureState
    error = CaptureError
    stats_map = "mbpf_cap_stats"
    counter_index = COUNTERS

    def __init__(self, bpffs: Path):
        try:
            super().__init__(bpffs, CAPTURE_MAPS)
        except OSError as exc:
            raise CaptureError(f"{Path(bpffs)}: cannot open the capture maps "
                               f"({exc.strerror}); is the agent's datapath loaded there, "
                               f"on a kernel with sidecar capture?") from exc

    def apply(self, steps: Iterable[CaptureStep]) -> None:
        """Each step's entries, steps in the order given (the planner's order
        keeps every intermediate state safe), then the meshed-pod count the
        connect hooks check first."""
        super().apply(steps)
        spec = SPECS["mbpf_cap_pod"]
        pods = libbpf.map_count(self.fds[spec.name], ct.sizeof(spec.key))
        libbpf.map_update(self.fds["mbpf_cap_cfg"], ct.c_uint32(0), CapCfgC(pods=pods, pad=0))

    def pairs(self) -> list[tuple[tuple[bytes, int], tuple[bytes, int], Orig]]:
        """Captured connections the proxy may ask about: ((peer address,
        port), (proxy address, port), original destination); host-order ports."""
        return [((bytes(k.peer), socket.ntohs(k.peer_port)),
                 (bytes(k.local), socket.ntohs(k.local_port)), _orig_from(v))
                for k, v in libbpf.map_items(self.fds["mbpf_cap_pair"], CapPairKeyC, CapOrigC)]

    def pods_enabled(self) -> int:
        """mbpf_cap_cfg.pods: the count the hooks see (0: capture off)."""
        cfg = CapCfgC()
        libbpf.map_lookup(self.fds["mbpf_cap_cfg"], ct.c_uint32(0), cfg)
        return cfg.pods
