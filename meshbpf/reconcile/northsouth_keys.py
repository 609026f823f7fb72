"""The north-south maps' entries as plain values (mirrors of bpf/lib/common.h).

The north-south planner (meshbpf/reconcile/northsouth.py) produces these;
the datapath (meshbpf/datapath/northsouth.py) converts them to and from the
C structs. Addresses are 16 bytes (IPv4 mapped, as reconcile.addr16 makes
them); ports are host order here, the datapath converts. The connection
tracking map is the kernel's own and not part of the state.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from typing import NamedTuple

# mbpf_ns_key.addr of a NodePort: the family's unspecified address, which
# stands for every node address of that family in mbpf_ns_addr (one key per
# family, so a packet never meets a backend of the other family).
WILDCARD4 = bytes(10) + b"\xff\xff" + bytes(4)   # ::ffff:0.0.0.0
WILDCARD6 = bytes(16)                             # ::
WILDCARDS = (WILDCARD4, WILDCARD6)


def wildcard(version: int) -> bytes:
    """The NodePort key address of IP version 4 or 6."""
    return WILDCARD4 if version == 4 else WILDCARD6

F_LOCAL = 1            # MBPF_NS_F_LOCAL: externalTrafficPolicy Local
F_NODEPORT = 2         # MBPF_NS_F_NODEPORT: keyed by wildcard(version)

BE_LOCAL = 1           # MBPF_NS_BE_LOCAL: a backend on this node (no SNAT)

DEFAULT_TABLE_SIZE = 16381   # MBPF_MAGLEV_M's default; a prime from maglev.TABLE_SIZES


class NsKey(NamedTuple):
    """mbpf_ns_svc key: where a packet from outside is sent."""

    addr: bytes       # 16 bytes, IPv4 mapped; wildcard(version) for a NodePort
    port: int
    proto: int        # socket.IPPROTO_TCP / IPPROTO_UDP


class NsSvc(NamedTuple):
    """mbpf_ns_svc value."""

    table_id: int     # row of mbpf_maglev
    count: int        # distinct backends in the table; 0: reject (Cluster) / drop (Local)
    src_id: int       # 0: any client; else the id of its rows in mbpf_ns_src
    flags: int        # F_*


class NsBackend(NamedTuple):
    """mbpf_ns_be value; the key is the backend id (1..)."""

    addr: bytes       # 16 bytes, IPv4 mapped
    port: int
    flags: int        # BE_*


class NsSrcKey(NamedTuple):
    """mbpf_ns_src key; addr_bits counts over the 16-byte address (an IPv4
    /24 is 96 + 24); the datapath adds src_id's 32 bits to the prefix."""

    src_id: int
    addr: bytes       # 16 bytes, network order
    addr_bits: int    # 0..128


class NsCfg(NamedTuple):
    """mbpf_ns_cfg, entry 0."""

    snat4: bytes      # 16 bytes, IPv4 mapped; zero: no IPv4 SNAT address
    snat6: bytes      # 16 bytes; zero: none
    enabled: int      # 0: the programs pass everything
    snat_port_min: int = 0   # SNAT ports snat_port_min..snat_port_max (inclusive);
    snat_port_max: int = 0   # 0, 0: the datapath's default, DEFAULT_SNAT_PORTS


DISABLED = NsCfg(bytes(16), bytes(16), 0)

# SNAT ports (the agent's --snat-ports): above Linux's default ephemeral
# range (32768..60999), reserved on the node (ip_local_reserved_ports) so
# that the node's own connections take none of them.
DEFAULT_SNAT_PORTS = (61000, 65535)
SNAT_PORT_TRIES = 8      # NS_SNAT_PORT_TRIES in bpf/lib/nodeport.h
SNAT_PORT_STRIDE = 7919  # NS_SNAT_PORT_STRIDE


def parse_port_range(text: str) -> tuple[int, int]:
    """"LO-HI" (or one port) -> (lo, hi), 1 <= lo <= hi <= 65535."""
    lo, sep, hi = text.strip().partition("-")
    try:
        first, last = int(lo), int(hi if sep else lo)
    except ValueError:
        raise ValueError(f"{text!r}: expected a port range LO-HI, e.g. 61000-65535") from None
    if not 1 <= first <= last <= 65535:
        raise ValueError(f"{text!r}: expected 1 <= LO <= HI <= 65535")
    return first, last


def _mix(h: int, k: int) -> int:
    k = (k * 0xcc9e2d51) & 0xFFFFFFFF
    k = ((k << 15) | (k >> 17)) & 0xFFFFFFFF
    k = (k * 0x1b873593) & 0xFFFFFFFF
    h ^= k
    h = ((h << 13) | (h >> 19)) & 0xFFFFFFFF
    return (h * 5 + 0xe6546b64) & 0xFFFFFFFF


def flow_hash(saddr: bytes, daddr: bytes, sport: int, dport: int, proto: int) -> int:
    """ns_flow_hash (bpf/lib/ns_pkt.h) of a client -> frontend tuple
    (16-byte addresses, IPv4 mapped; ports in host order), as a
    little-endian machine computes it (the ports' network-order bytes
    read as numbers)."""
    h = 0x6d627066
    for addr in (saddr, daddr):
        for i in range(0, 16, 4):
            h = _mix(h, int.from_bytes(addr[i:i + 4], "little"))
    swap = lambda port: int.from_bytes(port.to_bytes(2, "big"), "little")  # noqa: E731
    h = _mix(h, (swap(sport) << 16) | swap(dport))
    h = _mix(h, proto)
    h ^= h >> 16
    h = (h * 0x85ebca6b) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xc2b2ae35) & 0xFFFFFFFF
    h ^= h >> 16
    return h


def snat_port_tries(hash_: int, ports: tuple[int, int] = DEFAULT_SNAT_PORTS) -> list[int]:
    """The SNAT ports a new flow of that hash tries, in order (ns_claim_rev)."""
    lo, hi = ports
    span = hi - lo + 1
    return [lo + (hash_ + i * SNAT_PORT_STRIDE) % span for i in range(SNAT_PORT_TRIES)]


@dataclass
class NorthSouthState:
    """The content of the north-south maps (or what it will be)."""

    frontends: dict[NsKey, NsSvc] = field(default_factory=dict)      # mbpf_ns_svc
    backends: dict[int, NsBackend] = field(default_factory=dict)     # mbpf_ns_be
    # mbpf_maglev: table id -> its row, exactly table_size backend ids
    tables: dict[int, array] = field(default_factory=dict)
    sources: dict[NsSrcKey, int] = field(default_factory=dict)       # mbpf_ns_src -> 1
    node_addrs: set[bytes] = field(default_factory=set)              # mbpf_ns_addr
    cfg: NsCfg = DISABLED                                             # mbpf_ns_cfg[0]

    def copy(self) -> "NorthSouthState":
        return NorthSouthState(dict(self.frontends), dict(self.backends), dict(self.tables),
                               dict(self.sources), set(self.node_addrs), self.cfg)


class NsStep(NamedTuple):
    """One ordered batch of map writes. Order is make-before-break: backends
    before the tables that name them, tables before the frontends that use
    them; deletes in the reverse order."""

    map: str       # "frontends", "backends", "tables", "sources", "node_addrs" or "cfg"
    op: str        # "update" or "delete"
    entries: dict  # key -> value for updates (node_addrs: addr -> 1; cfg: 0 -> NsCfg;
                   # tables: table id -> row); key -> None for deletes
