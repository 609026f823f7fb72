"""Same-node socket redirection: settings into maps, and views of its state.

The agent turns `AgentConfig.spec.socketRedirect` into the settings map, the
pod-CIDR map and the set of cgroups carrying the sockops program. The CLI and
metrics read the sockhash, the socket-state map and the counters straight
from bpffs, like the socket-LB views.
"""

from __future__ import annotations

import ctypes as ct
import ipaddress
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from ..model import RedirectSettings
from ..reconcile import addr16
from . import cgroup, libbpf
from .layout import (REDIR_MAPS, MODE_NAMES, REDIR_COUNTERS, SCOPE_NETNS, CidrKeyC, ListenKeyC, RedirCfgC,
                     SockKeyC, SockStateC)

# Tuning, measured with bench/run-redirect (see README): a send below
# SMALL_WRITE bytes counts as small, except with TCP_NODELAY below
# NODELAY_SMALL_MIN (TCP sends those one by one; splicing wins) and with
# Nagle on a path whose MSS is under NAGLE_MSS_MIN (veth: Nagle's segments
# are too small to beat a splice). More than SMALL_RUN_MAX small sends in a
# row with no reply switch the pair to TCP.
SMALL_WRITE = 4096
SMALL_RUN_MAX = 16
NODELAY_SMALL_MIN = 128
NAGLE_MSS_MIN = 16384
EVICT_GRACE_NS = 10_000_000
# A reader spinning on non-blocking recv() (bench/run-redirect --spin,
# sockperf --nonblocked) holds its socket's lock, and a splice into it must
# take that lock: spliced, such a pair runs at 0.04-0.54x of TCP. A splice
# that finds SPIN_EMPTY_MIN or more empty reads (EAGAIN) by the receiver
# since the previous one counts as "met a spinner"; SPIN_RUN_MAX of those in
# a row hand the pair to TCP. An epoll or poll reader makes at most one
# empty read per wake-up, a blocking reader none. Compiled in (they cost no
# map read), where the kernel has the recv tracepoint.
SPIN_EMPTY_MIN = 2
SPIN_RUN_MAX = 8


def spin_cflags() -> list[str]:
    return ["-DMBPF_SPIN", f"-DMBPF_SPIN_EMPTY_MIN={SPIN_EMPTY_MIN}", f"-DMBPF_SPIN_RUN_MAX={SPIN_RUN_MAX}"]


def _cidr_key(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> CidrKeyC:
    key = CidrKeyC()
    key.prefixlen = net.prefixlen + (96 if net.version == 4 else 0)
    key.addr[:] = addr16(net.network_address)
    return key


def apply_settings(lb, settings: RedirectSettings, default_cgroup: Path,
                   applied: RedirectSettings | None) -> None:
    """Brings the redirection maps and attachments to `settings`."""
    cfg = RedirCfgC(enabled=int(settings.enabled), require_cidr=int(bool(settings.pod_cidrs)),
                    small_write=SMALL_WRITE, small_run_max=SMALL_RUN_MAX,
                    nodelay_small_min=NODELAY_SMALL_MIN, nagle_mss_min=NAGLE_MSS_MIN,
                    evict_grace_ns=EVICT_GRACE_NS)
    cidr_fd = lb.map_fd("mbpf_redir_cidr")
    wanted = {bytes(_cidr_key(n)) for n in settings.pod_cidrs}
    room = lb.capacity(next(spec for spec in REDIR_MAPS if spec.name == "mbpf_redir_cidr"))
    if len(wanted) > room:  # refused before anything is written: nothing half-applied
        raise ValueError(f"podCIDRs lists {len(wanted)} networks; at most {room} fit "
                         f"(mbpf_redir_cidr)")
    present = {bytes(k) for k, _ in libbpf.map_items(cidr_fd, CidrKeyC, ct.c_uint8)}
    one = ct.c_uint8(1)
    if len(wanted | present) > room:
        # No room for both lists at once: stale CIDRs out first. In between,
        # fewer peers are spliced, never more (unspliced is plain TCP).
        for raw in present - wanted:
            libbpf.map_delete(cidr_fd, CidrKeyC.from_buffer_copy(raw))
        present &= wanted
    # New CIDRs first, then the switch, then stale CIDRs out: a socket never
    # meets a half-written list that would let in what the old one kept out
    # and the new one too.
    for raw in wanted - present:
        key = CidrKeyC.from_buffer_copy(raw)
        libbpf.map_update(cidr_fd, key, one)
    libbpf.map_update(lb.map_fd("mbpf_redir_cfg"), ct.c_uint32(0), cfg)
    for raw in present - wanted:
        libbpf.map_delete(cidr_fd, CidrKeyC.from_buffer_copy(raw))

    if settings.enabled:
        paths = [cgroup.resolve(p) for p in settings.cgroups] or [default_cgroup]
        lb.attach_redirect(paths)
    elif applied is None or applied.enabled:
        # Pairs already spliced switch to TCP and drain; no new ones start.
        lb.detach_redirect()


@dataclass
class SockEntry:
    key: SockKeyC
    mode: str
    nodelay: bool
    evicted: bool
    in_sockhash: bool

    @property
    def local(self) -> str:
        return _endpoint(self.key.local_ip, self.key.local_port, self.key.scope)

    @property
    def remote(self) -> str:
        return _endpoint(self.key.remote_ip, self.key.remote_port, self.key.scope)

    @property
    def netns_cookie(self) -> int | None:
        """The network namespace of a loopback pair (None: addresses say it all)."""
        if self.key.scope != SCOPE_NETNS:
            return None
        return int.from_bytes(bytes(self.key.local_ip)[:8], sys.byteorder)


def _endpoint(addr, port: int, scope: int = 0) -> str:
    raw = bytes(addr)
    if scope == SCOPE_NETNS:  # the netns cookie stands in the loopback address's zero bytes
        raw = bytes(8) + raw[8:]
    ip = ipaddress.IPv6Address(raw)
    text = str(ip.ipv4_mapped or ip)
    return f"[{text}]:{port}" if ":" in text else f"{text}:{port}"


def _open(bpffs: Path, name: str, key: type, value: type | None = None) -> int | None:
    """The pinned map, None when it is not there; a map of another layout is
    a LayoutError (one line), not a read through structs of the wrong size."""
    try:
        return libbpf.open_pinned(str(bpffs / name), key, value)
    except OSError:
        return None


def read_sockets(bpffs: Path) -> list[SockEntry]:
    """Every socket meshbpf tracks, and whether it is in the sockhash."""
    hash_fd = _open(bpffs, "mbpf_sockhash", SockKeyC)
    try:
        state_fd = _open(bpffs, "mbpf_sockstate", SockKeyC, SockStateC)
    except BaseException:
        if hash_fd is not None:
            os.close(hash_fd)
        raise
    try:
        in_hash = set()
        if hash_fd is not None:
            in_hash = {bytes(k) for k in libbpf.map_keys(hash_fd, SockKeyC)}
        out = []
        if state_fd is not None:
            for key, st in libbpf.map_items(state_fd, SockKeyC, SockStateC):
                out.append(SockEntry(key, MODE_NAMES.get(st.mode, str(st.mode)), bool(st.nodelay),
                                     bool(st.evicted), bytes(key) in in_hash))
        return out
    finally:
        for fd in (hash_fd, state_fd):
            if fd is not None:
                os.close(fd)


def _count(bpffs: Path, name: str, key: type) -> int | None:
    fd = _open(bpffs, name, key)
    if fd is None:
        return None
    try:
        return libbpf.map_count(fd, ct.sizeof(key))
    finally:
        os.close(fd)


def sockhash_count(bpffs: Path) -> int | None:
    return _count(bpffs, "mbpf_sockhash", SockKeyC)


def listener_count(bpffs: Path) -> int | None:
    """Listening sockets sockops knows (mbpf_listeners): each judges the
    sockets it accepts."""
    return _count(bpffs, "mbpf_listeners", ListenKeyC)


def read_counters(bpffs: Path) -> dict[str, int] | None:
    """MBPF_CNT_* summed over CPUs."""
    # Per CPU: a lookup fills ncpu values of the map's value size, so a
    # value size that is not ours would have the kernel write past them.
    fd = _open(bpffs, "mbpf_redir_cnt", ct.c_uint32, ct.c_uint64)
    if fd is None:
        return None
    try:
        ncpu = libbpf.possible_cpus()
        out = {}
        for name, idx in REDIR_COUNTERS.items():
            values = (ct.c_uint64 * ncpu)()
            libbpf.map_lookup(fd, ct.c_uint32(idx), values)
            out[name] = sum(values)
        return out
    finally:
        os.close(fd)


def pairs(entries: list[SockEntry]) -> list[tuple[SockEntry, SockEntry | None]]:
    """Sockets grouped with their peer (None when the peer is not tracked)."""
    by_key = {bytes(e.key): e for e in entries}
    seen: set[bytes] = set()
    out = []
    for e in sorted(entries, key=lambda e: (e.local, e.remote)):
        k = bytes(e.key)
        if k in seen:
            continue
        peer_key = SockKeyC(local_ip=e.key.remote_ip, remote_ip=e.key.local_ip,
                            local_port=e.key.remote_port, remote_port=e.key.local_port,
                            family=e.key.family, scope=e.key.scope)
        peer = by_key.get(bytes(peer_key))
        seen.add(k)
        if peer is not None:
            seen.add(bytes(peer_key))
        out.append((e, peer))
    return out
