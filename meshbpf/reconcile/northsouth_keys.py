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


DISABLED = NsCfg(bytes(16), bytes(16), 0)


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
