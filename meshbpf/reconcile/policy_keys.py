"""The policy maps' entries as plain values (mirrors of bpf/lib/common.h).

The policy planner (meshbpf/reconcile/policy.py) produces these; the
datapath (meshbpf/datapath/policy.py) converts them to and from the C
structs. Addresses are 16 bytes (IPv4 mapped, as reconcile.addr16 makes
them); ports are host order here, the datapath converts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

DIR_IN = 0    # MBPF_DIR_IN: to the pod, its ingress rules
DIR_OUT = 1   # MBPF_DIR_OUT: from the pod, its egress rules

EP_ISOLATE_IN = 1   # MBPF_EP_F_ISOLATE_IN
EP_ISOLATE_OUT = 2  # MBPF_EP_F_ISOLATE_OUT
PEER_ANY_PORT = 1   # MBPF_PEER_F_ANY_PORT

# Indexes of mbpf_pol_stats (MBPF_POL_* / MBPF_DROP_* in bpf/lib/common.h).
POLICY_COUNTERS = {
    ("ingress", "allow"): 0, ("ingress", "deny"): 1,
    ("egress", "allow"): 2, ("egress", "deny"): 3,
}
DROP_COUNTERS = {"policy_denied": (1, 3), "spoofed_source": (4,), "malformed": (5,)}


class EpVal(NamedTuple):
    """mbpf_pol_ep value; the key is the host-side interface's ifindex."""

    ep_id: int
    gen: int     # 0 or 1
    flags: int   # EP_ISOLATE_*


class PeerKey(NamedTuple):
    """mbpf_pol_peer key: the address prefix of a peer, per endpoint,
    generation and direction. addr_bits counts over the 16-byte address
    (an IPv4 /24 is 96 + 24 = 120)."""

    ep_id: int
    gen: int
    dir: int
    addr: bytes      # 16 bytes, network order
    addr_bits: int   # 0..128


class PeerVal(NamedTuple):
    peer_set: int    # 1..; keys PortKey
    rule: int        # with PEER_ANY_PORT: the rule that allows (for the monitor)
    flags: int       # PEER_ANY_PORT or 0


class PortKey(NamedTuple):
    """mbpf_pol_port key: a port prefix (port_bits 16 = one port, 0 = any
    port of the protocol) per endpoint, generation, direction, peer set."""

    ep_id: int
    gen: int
    dir: int
    proto: int       # 6, 17 or 132
    peer_set: int
    port: int        # host order; the prefix's first port
    port_bits: int   # 0..16


class PortVal(NamedTuple):
    rule: int


@dataclass
class PolicyState:
    """The content of the policy maps (or what it will be)."""

    endpoints: dict[int, EpVal] = field(default_factory=dict)        # ifindex -> endpoint
    addresses: dict[bytes, int] = field(default_factory=dict)        # pod address -> ep_id
    peers: dict[PeerKey, PeerVal] = field(default_factory=dict)
    ports: dict[PortKey, PortVal] = field(default_factory=dict)

    def copy(self) -> "PolicyState":
        return PolicyState(dict(self.endpoints), dict(self.addresses),
                           dict(self.peers), dict(self.ports))


class PolicyStep(NamedTuple):
    map: str       # "endpoints", "addresses", "peers" or "ports" (PolicyState fields)
    op: str        # "update" or "delete"
    entries: dict  # key -> value for updates; key -> None for deletes
