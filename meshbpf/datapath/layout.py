"""The socket-LB maps: names, layouts, and conversion to reconciler values.

bpf/lib/common.h is the definition. The agent writes maps through bcc's
Key/Leaf types compiled from it; the ctypes mirror below exists only so the
CLI can read pinned maps without compiling, and tests/kernel/test_layout.py
fails if it drifts from the compiled layout.

The conversion functions work on either (they go by field name).
"""

from __future__ import annotations

import ctypes as ct
import socket
from dataclasses import dataclass

from ..reconcile import BackendVal, SlotKey, SlotVal, SvcKey, SvcVal

U8x16 = ct.c_uint8 * 16


class SvcKeyC(ct.Structure):
    _fields_ = [("addr", U8x16), ("port", ct.c_uint16), ("proto", ct.c_uint8), ("pad", ct.c_uint8)]


class SvcC(ct.Structure):
    _fields_ = [("svc_id", ct.c_uint32), ("count", ct.c_uint32),
                ("affinity_timeout", ct.c_uint32), ("flags", ct.c_uint32)]


class SlotKeyC(ct.Structure):
    _fields_ = [("svc_id", ct.c_uint32), ("slot", ct.c_uint32)]


class SlotC(ct.Structure):
    _fields_ = [("backend_id", ct.c_uint32), ("state", ct.c_uint8), ("pad", ct.c_uint8 * 3)]


class PickKeyC(ct.Structure):
    _fields_ = [("svc_id", ct.c_uint32), ("backend_id", ct.c_uint32)]


class BackendC(ct.Structure):
    _fields_ = [("addr", U8x16), ("port", ct.c_uint16), ("proto", ct.c_uint8), ("pad", ct.c_uint8)]


class AffKeyC(ct.Structure):
    _fields_ = [("netns_cookie", ct.c_uint64), ("svc_id", ct.c_uint32), ("pad", ct.c_uint32)]


class AffC(ct.Structure):
    _fields_ = [("last_used_ns", ct.c_uint64), ("backend_id", ct.c_uint32), ("slot", ct.c_uint32)]


class RnatKeyC(ct.Structure):
    _fields_ = [("cookie", ct.c_uint64), ("addr", U8x16), ("port", ct.c_uint16), ("pad", ct.c_uint8 * 6)]


class RnatC(ct.Structure):
    _fields_ = [("addr", U8x16), ("port", ct.c_uint16), ("pad", ct.c_uint16), ("svc_id", ct.c_uint32)]


class SkRnatC(ct.Structure):
    _fields_ = [("backend_addr", U8x16), ("svc_addr", U8x16), ("backend_port", ct.c_uint16),
                ("svc_port", ct.c_uint16), ("svc_id", ct.c_uint32)]


class ConnSlotC(ct.Structure):
    _fields_ = [("cookie", ct.c_uint64), ("rnat", SkRnatC)]


class SockKeyC(ct.Structure):
    _fields_ = [("local_ip", U8x16), ("remote_ip", U8x16), ("local_port", ct.c_uint16),
                ("remote_port", ct.c_uint16), ("family", ct.c_uint8), ("scope", ct.c_uint8),
                ("pad", ct.c_uint8 * 2)]


class SockStateC(ct.Structure):
    _fields_ = [("sk_addr", ct.c_uint64), ("last_redirect_ns", ct.c_uint64),
                ("small_run", ct.c_uint32), ("mode", ct.c_uint8),
                ("nodelay", ct.c_uint8), ("evicted", ct.c_uint8), ("wide_mss", ct.c_uint8)]


class SpinC(ct.Structure):
    _fields_ = [("empty_reads", ct.c_uint32), ("spin_run", ct.c_uint16), ("reads_block", ct.c_uint8),
                ("pad", ct.c_uint8)]


class ListenKeyC(ct.Structure):
    _fields_ = [("netns", ct.c_uint64), ("port", ct.c_uint16), ("pad", ct.c_uint8 * 6)]


class RedirCfgC(ct.Structure):
    _fields_ = [("enabled", ct.c_uint32), ("require_cidr", ct.c_uint32), ("small_write", ct.c_uint32),
                ("small_run_max", ct.c_uint32), ("nodelay_small_min", ct.c_uint32),
                ("nagle_mss_min", ct.c_uint32), ("evict_grace_ns", ct.c_uint64)]


class CidrKeyC(ct.Structure):
    _fields_ = [("prefixlen", ct.c_uint32), ("addr", U8x16)]


class EpC(ct.Structure):
    _fields_ = [("ep_id", ct.c_uint32), ("gen", ct.c_uint8), ("flags", ct.c_uint8),
                ("pad", ct.c_uint16)]


class EpAddrC(ct.Structure):
    _fields_ = [("addr", U8x16)]


class PolPeerKeyC(ct.Structure):
    _fields_ = [("prefixlen", ct.c_uint32), ("ep_id", ct.c_uint32), ("gen", ct.c_uint8),
                ("dir", ct.c_uint8), ("pad", ct.c_uint8 * 2), ("addr", U8x16)]


class PolPeerC(ct.Structure):
    _fields_ = [("peer_set", ct.c_uint32), ("rule", ct.c_uint32), ("flags", ct.c_uint32),
                ("pad", ct.c_uint32)]


class PolPortKeyC(ct.Structure):
    _fields_ = [("prefixlen", ct.c_uint32), ("ep_id", ct.c_uint32), ("gen", ct.c_uint8),
                ("dir", ct.c_uint8), ("proto", ct.c_uint8), ("pad", ct.c_uint8),
                ("peer_set", ct.c_uint32), ("port", ct.c_uint16), ("pad2", ct.c_uint16)]


class PolPortC(ct.Structure):
    _fields_ = [("rule", ct.c_uint32), ("pad", ct.c_uint32)]


class CtKeyC(ct.Structure):
    _fields_ = [("saddr", U8x16), ("daddr", U8x16), ("sport", ct.c_uint16), ("dport", ct.c_uint16),
                ("ep_id", ct.c_uint32), ("proto", ct.c_uint8), ("dir", ct.c_uint8),
                ("pad", ct.c_uint8 * 2)]


class CtC(ct.Structure):
    _fields_ = [("seen_s", ct.c_uint32), ("pad", ct.c_uint32), ("ifindex", ct.c_uint32 * 2)]


class PolCfgC(ct.Structure):
    _fields_ = [("events", ct.c_uint32), ("pad", ct.c_uint32)]


class PolEventC(ct.Structure):
    _fields_ = [("ts_ns", ct.c_uint64), ("saddr", U8x16), ("daddr", U8x16),
                ("sport", ct.c_uint16), ("dport", ct.c_uint16), ("ep_id", ct.c_uint32),
                ("rule", ct.c_uint32), ("ifindex", ct.c_uint32), ("proto", ct.c_uint8),
                ("dir", ct.c_uint8), ("verdict", ct.c_uint8), ("kind", ct.c_uint8),
                ("pad2", ct.c_uint32)]


class LbEventC(ct.Structure):
    """struct mbpf_lb_event: a socket-LB translation in mbpf_events."""
    _fields_ = [("ts_ns", ct.c_uint64), ("svc_addr", U8x16), ("backend_addr", U8x16),
                ("svc_port", ct.c_uint16), ("backend_port", ct.c_uint16), ("svc_id", ct.c_uint32),
                ("pad", ct.c_uint32 * 2), ("proto", ct.c_uint8), ("hook", ct.c_uint8),
                ("verdict", ct.c_uint8), ("kind", ct.c_uint8), ("pad2", ct.c_uint32),
                ("cgroup_id", ct.c_uint64), ("netns_cookie", ct.c_uint64)]


class CapEventC(ct.Structure):
    """struct mbpf_cap_event: a sidecar capture decision in mbpf_events."""
    _fields_ = [("ts_ns", ct.c_uint64), ("orig_addr", U8x16), ("to_addr", U8x16),
                ("orig_port", ct.c_uint16), ("to_port", ct.c_uint16), ("pad", ct.c_uint32),
                ("pod_cg", ct.c_uint64), ("proto", ct.c_uint8), ("hook", ct.c_uint8),
                ("decision", ct.c_uint8), ("kind", ct.c_uint8), ("pad2", ct.c_uint32),
                ("cgroup_id", ct.c_uint64), ("netns_cookie", ct.c_uint64),
                ("peer_addr", U8x16), ("peer_port", ct.c_uint16), ("pad3", ct.c_uint16),
                ("pad4", ct.c_uint32)]


EV_KIND_OFF = 59  # MBPF_EV_KIND_OFF: every event's kind byte
EV_KIND_POLICY, EV_KIND_LB, EV_KIND_CAP = 0, 1, 2


class CapPodC(ct.Structure):
    _fields_ = [("ip4", U8x16), ("ip6", U8x16), ("proxy_uid", ct.c_uint32), ("pod_id", ct.c_uint32),
                ("out_port", ct.c_uint16), ("in_port", ct.c_uint16), ("dns_port", ct.c_uint16),
                ("flags", ct.c_uint8), ("pad", ct.c_uint8)]


class CapCidrKeyC(ct.Structure):
    _fields_ = [("prefixlen", ct.c_uint32), ("pod_id", ct.c_uint32), ("addr", U8x16)]


class CapVerdictC(ct.Structure):
    _fields_ = [("verdict", ct.c_uint8), ("pad", ct.c_uint8 * 3)]


class CapPortKeyC(ct.Structure):
    _fields_ = [("pod_id", ct.c_uint32), ("port", ct.c_uint16), ("dir", ct.c_uint8),
                ("pad", ct.c_uint8)]


class CapOrigC(ct.Structure):
    _fields_ = [("addr", U8x16), ("port", ct.c_uint16), ("dir", ct.c_uint8), ("pad", ct.c_uint8),
                ("pad2", ct.c_uint32)]


class CapPairKeyC(ct.Structure):
    _fields_ = [("peer", U8x16), ("local", U8x16), ("peer_port", ct.c_uint16),
                ("local_port", ct.c_uint16), ("pad", ct.c_uint32)]


class CapCfgC(ct.Structure):
    _fields_ = [("pods", ct.c_uint32), ("pad", ct.c_uint32)]


@dataclass(frozen=True)
class MapSpec:
    name: str           # map name in C, pin name, and kernel name (<= 15 chars)
    role: str           # reconciler name ("services", ...) or "" for kernel-owned maps
    key: type
    value: type
    size_macro: str     # -D name that sets max_entries
    default_size: int
    no_prealloc: bool = False  # created with BPF_F_NO_PREALLOC


NO_PREALLOC = 1  # BPF_F_NO_PREALLOC


LB_MAPS = (
    MapSpec("mbpf_svc", "services", SvcKeyC, SvcC, "MBPF_SVC_MAX", 65536),
    MapSpec("mbpf_slots", "slots", SlotKeyC, SlotC, "MBPF_SLOT_MAX", 262144),
    MapSpec("mbpf_backends", "backends", ct.c_uint32, BackendC, "MBPF_BACKEND_MAX", 131072),
    MapSpec("mbpf_affinity", "", AffKeyC, AffC, "MBPF_AFFINITY_MAX", 65536),
    MapSpec("mbpf_rnat", "", RnatKeyC, RnatC, "MBPF_RNAT_MAX", 131072),
    # Socket storage: one value per socket, freed with it; max_entries is 0.
    MapSpec("mbpf_sk_rnat", "", ct.c_int, SkRnatC, "", 0, no_prealloc=True),
    # Connected socket's cookie -> the same record, while there is room;
    # emptied by the sock_release hook.
    MapSpec("mbpf_conn_rnat", "", ct.c_uint64, SkRnatC, "MBPF_CONN_RNAT_MAX", 65536),
    # Socket cookie modulo the size (a power of two) -> the holder's cookie
    # and that record; the hash above's successor where cmpxchg exists.
    MapSpec("mbpf_conn_slot", "", ct.c_uint32, ConnSlotC, "MBPF_CONN_SLOT_MAX", 131072),
    MapSpec("mbpf_lb_stats", "", ct.c_uint32, ct.c_uint64, "", 24),
    # Connections per route backend (per CPU); the agent makes the entries.
    MapSpec("mbpf_route_cnt", "", PickKeyC, ct.c_uint64, "MBPF_ROUTE_CNT_MAX", 16384),
)
COUNTABLE = {"mbpf_svc", "mbpf_slots", "mbpf_backends", "mbpf_affinity", "mbpf_rnat", "mbpf_conn_rnat",
             "mbpf_conn_slot", "mbpf_sockhash", "mbpf_sockstate"}  # maps whose entries can be counted
BY_ROLE = {m.role: m for m in LB_MAPS if m.role}
POWER_OF_TWO = {"mbpf_conn_slot"}  # sizes that must be (a slot is a cookie's low bits)

# Same-node socket redirection (bpf/lib/redir_maps.h).
REDIR_MAPS = (
    MapSpec("mbpf_sockhash", "", SockKeyC, ct.c_uint32, "MBPF_SOCKHASH_MAX", 65536),
    MapSpec("mbpf_sockstate", "", SockKeyC, SockStateC, "MBPF_SOCKSTATE_MAX", 131072),
    # listener -> its kernel address: whether its accepted sockets will block
    MapSpec("mbpf_listeners", "", ListenKeyC, ct.c_uint64, "MBPF_LISTENERS_MAX", 16384),
    MapSpec("mbpf_redir_cidr", "", CidrKeyC, ct.c_uint8, "MBPF_CIDR_MAX", 1024, no_prealloc=True),
    # spliced socket's kernel address -> its empty reads (readers spinning on recv()), blocking reads
    MapSpec("mbpf_spin", "", ct.c_uint64, SpinC, "MBPF_SPIN_MAX", 65536),
    MapSpec("mbpf_redir_cfg", "", ct.c_uint32, RedirCfgC, "", 1),
    MapSpec("mbpf_redir_cnt", "", ct.c_uint32, ct.c_uint64, "", 8),
)

# Sidecar capture (bpf/lib/capture_maps.h); role: the CaptureState field it holds.
CAPTURE_MAPS = (
    MapSpec("mbpf_cap_pod", "pods", ct.c_uint64, CapPodC, "MBPF_CAP_POD_MAX", 4096),
    MapSpec("mbpf_cap_addr", "addresses", EpAddrC, ct.c_uint64, "MBPF_CAP_ADDR_MAX", 8192),
    MapSpec("mbpf_cap_cidr", "cidrs", CapCidrKeyC, CapVerdictC, "MBPF_CAP_CIDR_MAX", 65536,
            no_prealloc=True),
    MapSpec("mbpf_cap_port", "ports", CapPortKeyC, CapVerdictC, "MBPF_CAP_PORT_MAX", 65536),
    MapSpec("mbpf_cap_orig", "", ct.c_uint64, CapOrigC, "MBPF_CAP_ORIG_MAX", 65536),
    MapSpec("mbpf_cap_pair", "", CapPairKeyC, CapOrigC, "MBPF_CAP_PAIR_MAX", 65536),
    MapSpec("mbpf_cap_cfg", "", ct.c_uint32, CapCfgC, "", 1),
    MapSpec("mbpf_cap_stats", "", ct.c_uint32, ct.c_uint64, "", 8),  # MBPF_CAP_STAT_MAX
)
ALL_MAPS = LB_MAPS + REDIR_MAPS + CAPTURE_MAPS  # compiled by SockLB (the policy maps by PolicyDatapath)

# Indexes of mbpf_redir_cnt (MBPF_CNT_* in bpf/lib/common.h).
REDIR_COUNTERS = {
    "redirected_msgs": 0, "redirected_bytes": 1, "passed_msgs": 2, "passed_bytes": 3,
    "switched_pairs": 4, "evicted_sockets": 5, "inserted_sockets": 6, "spinning_readers": 7,
}
# Rows of mbpf_lb_stats (MBPF_LB_* in bpf/lib/common.h); each row has four
# columns, MBPF_LB_STAT(result, v6, udp) = row * 4 + 2 * v6 + udp.
LB_RESULTS = {
    "translated": 0, "refused": 1, "affinity_hit": 2, "slot0_retry": 3,
    "terminating_fallback": 4, "rnat_stale": 5,
}
LB_COLUMNS = {(0, 0): ("ipv4", "tcp"), (0, 1): ("ipv4", "udp"),
              (1, 0): ("ipv6", "tcp"), (1, 1): ("ipv6", "udp")}
SCOPE_NETNS = 1  # MBPF_SCOPE_NETNS: address bytes 0-7 hold the netns cookie
MODE_NAMES = {0: "undecided", 1: "redirect", 2: "pass"}


# --- ctypes <-> reconciler values -------------------------------------------

def _u16_net(host: int) -> int:
    return socket.htons(host)


def svc_key_from(c) -> SvcKey:
    return SvcKey(bytes(c.addr), socket.ntohs(c.port), c.proto)


def svc_key_into(c, k: SvcKey):
    c.addr[:] = k.addr
    c.port = _u16_net(k.port)
    c.proto = k.proto
    c.pad = 0
    return c


def svc_from(c) -> SvcVal:
    return SvcVal(c.svc_id, c.count, c.affinity_timeout, c.flags)


def svc_into(c, v: SvcVal):
    c.svc_id, c.count, c.affinity_timeout, c.flags = v.svc_id, v.count, v.affinity_timeout, v.flags
    return c


def slot_key_from(c) -> SlotKey:
    return SlotKey(c.svc_id, c.slot)


def slot_key_into(c, k: SlotKey):
    c.svc_id, c.slot = k.svc_id, k.slot
    return c


def slot_from(c) -> SlotVal:
    return SlotVal(c.backend_id, c.state)


def slot_into(c, v: SlotVal):
    c.backend_id, c.state = v.backend_id, v.state
    c.pad[:] = b"\0\0\0"
    return c


def backend_key_from(c) -> int:
    # ctypes hands out scalar keys as plain ints from arrays, c_uint32 elsewhere
    return c.value if hasattr(c, "value") else int(c)


def backend_key_into(c, k: int) -> int:
    # Scalar array elements cannot be filled in place; the caller stores this.
    return k


def backend_from(c) -> BackendVal:
    return BackendVal(bytes(c.addr), socket.ntohs(c.port), c.proto)


def backend_into(c, v: BackendVal):
    c.addr[:] = v.addr
    c.port = _u16_net(v.port)
    c.proto = v.proto
    c.pad = 0
    return c


CODECS = {
    "services": (svc_key_from, svc_key_into, svc_from, svc_into),
    "slots": (slot_key_from, slot_key_into, slot_from, slot_into),
    "backends": (backend_key_from, backend_key_into, backend_from, backend_into),
}

# NetworkPolicy (bpf/lib/policy_maps.h); role: the PolicyState field it holds.
POLICY_MAPS = (
    MapSpec("mbpf_pol_ep", "endpoints", ct.c_uint32, EpC, "MBPF_POL_EP_MAX", 4096),
    MapSpec("mbpf_pol_epaddr", "addresses", EpAddrC, ct.c_uint32, "MBPF_POL_EPADDR_MAX", 8192),
    MapSpec("mbpf_pol_peer", "peers", PolPeerKeyC, PolPeerC, "MBPF_POL_PEER_MAX", 262144,
            no_prealloc=True),
    MapSpec("mbpf_pol_port", "ports", PolPortKeyC, PolPortC, "MBPF_POL_PORT_MAX", 262144,
            no_prealloc=True),
    MapSpec("mbpf_ct", "", CtKeyC, CtC, "MBPF_CT_MAX", 262144),
    MapSpec("mbpf_pol_stats", "", ct.c_uint32, ct.c_uint64, "", 8),  # MBPF_POL_STAT_MAX
    MapSpec("mbpf_pol_cfg", "", ct.c_uint32, PolCfgC, "", 1),
    # Ring buffer (kernel 5.8+): bytes, not entries; key and value are bcc's
    # annotation (the kernel's sizes are 0). Holds PolEventC records.
    MapSpec("mbpf_events", "", ct.c_int, ct.c_uint32, "MBPF_EVENTS_BYTES", 262144),
)
RINGBUF_MAPS = {"mbpf_events"}
PINNED_MAPS = ALL_MAPS + POLICY_MAPS  # everything uninstall and inspect look for


# --- North-south (bpf/lib/ns_maps.h, common.h "North-south") ------------------

class NsKeyC(ct.Structure):
    _fields_ = [("addr", U8x16), ("port", ct.c_uint16), ("proto", ct.c_uint8), ("pad", ct.c_uint8)]


class NsSvcC(ct.Structure):
    _fields_ = [("table_id", ct.c_uint32), ("count", ct.c_uint32), ("src_id", ct.c_uint32),
                ("flags", ct.c_uint32)]


class NsBackendC(ct.Structure):
    _fields_ = [("addr", U8x16), ("port", ct.c_uint16), ("flags", ct.c_uint8), ("pad", ct.c_uint8)]


class NsSrcKeyC(ct.Structure):
    _fields_ = [("prefixlen", ct.c_uint32), ("src_id", ct.c_uint32), ("addr", U8x16)]


class NsCfgC(ct.Structure):
    _fields_ = [("snat4", U8x16), ("snat6", U8x16), ("enabled", ct.c_uint32),
                ("snat_port_min", ct.c_uint16), ("snat_port_max", ct.c_uint16)]


class NsCtKeyC(ct.Structure):
    _fields_ = [("saddr", U8x16), ("daddr", U8x16), ("sport", ct.c_uint16), ("dport", ct.c_uint16),
                ("proto", ct.c_uint8), ("dir", ct.c_uint8), ("pad", ct.c_uint8 * 2)]


class NsCtC(ct.Structure):
    _fields_ = [("dst", U8x16), ("src", U8x16), ("dport", ct.c_uint16), ("sport", ct.c_uint16),
                ("backend_id", ct.c_uint32), ("last_ns", ct.c_uint64), ("flags", ct.c_uint8),
                ("pad", ct.c_uint8 * 7)]


# role: the NorthSouthState field the map holds. mbpf_maglev's size macro
# counts tables (MBPF_NS_TABLE_MAX, a power of two); its max_entries is that
# times the table size M.
NS_MAPS = (
    MapSpec("mbpf_ns_svc", "frontends", NsKeyC, NsSvcC, "MBPF_NS_SVC_MAX", 65536),
    MapSpec("mbpf_ns_be", "backends", ct.c_uint32, NsBackendC, "MBPF_NS_BE_MAX", 65536),
    MapSpec("mbpf_maglev", "tables", ct.c_uint32, ct.c_uint32, "MBPF_NS_TABLE_MAX", 256),
    MapSpec("mbpf_ns_src", "sources", NsSrcKeyC, ct.c_uint32, "MBPF_NS_SRC_MAX", 16384,
            no_prealloc=True),
    MapSpec("mbpf_ns_addr", "node_addrs", EpAddrC, ct.c_uint32, "MBPF_NS_ADDR_MAX", 256),
    MapSpec("mbpf_ns_cfg", "cfg", ct.c_uint32, NsCfgC, "", 1),
    MapSpec("mbpf_ns_ct", "", NsCtKeyC, NsCtC, "MBPF_NS_CT_MAX", 131072),
    MapSpec("mbpf_ns_stats", "", ct.c_uint32, ct.c_uint64, "", 12),  # MBPF_NS_STAT_MAX
)
# Indexes of mbpf_ns_stats (MBPF_NS_* in bpf/lib/common.h).
NS_COUNTERS = {
    "new": 0, "snat": 1, "established": 2, "reply": 3, "reject": 4, "drop_no_local": 5,
    "drop_source_range": 6, "drop_no_snat": 7, "drop_other": 8, "icmp_error": 9, "xdp_forwarded": 10,
    "snat_port_retry": 11,
}
PINNED_MAPS = PINNED_MAPS + NS_MAPS  # uninstall and inspect find the north-south pins too
