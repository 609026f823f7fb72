"""NetworkPolicy datapath: the tc programs and their pinned maps.

`PolicyDatapath` compiles bpf/policy.c (its own bcc module; the maps are
pinned in the same bpffs folder as the socket-LB ones) and attaches
mbpf_tc_from_pod / mbpf_tc_to_pod to the host side of a pod's interface
with a fixed tc priority and handle. `tc filter replace` on that slot swaps
the program atomically, so a new agent never opens a window; the filters
stay attached when the agent dies.

`PolicyMaps` reads and writes the maps through libbpf.py and the ctypes
mirrors of layout.py, the one map-access layer (bcc only compiles and loads).

Finding a pod's interface: endpoints.py (find_endpoint, re-exported
here); flow events: policy_events.py.
"""

from __future__ import annotations

import ctypes as ct
import errno
import ipaddress
import logging
import socket
from dataclasses import dataclass, field
from pathlib import Path

from ..reconcile import addr16
from ..reconcile.policy_keys import (DROP_COUNTERS, POLICY_COUNTERS, EpVal, PeerKey, PeerVal,
                                     PolicyState, PortKey, PortVal)
from . import libbpf
from .bpffs import check_bpffs
from .pinned import PinnedMaps
from .tcfilters import TC_EGRESS, TC_INGRESS, our_filters
from .endpoints import find_endpoint  # noqa: F401 (part of this module's API)
from .layout import (POLICY_MAPS, RINGBUF_MAPS, CtC, CtKeyC, EpAddrC, EpC, MapSpec, NO_PREALLOC,
                     PolCfgC, PolPeerC, PolPeerKeyC, PolPortC, PolPortKeyC)
from .source import program_text

log = logging.getLogger(__name__)

PROGRAMS = ("mbpf_tc_from_pod", "mbpf_tc_to_pod")
# clsact's parents: ingress of the host-side interface is what the pod sends.
HOOKS = {"mbpf_tc_from_pod": TC_INGRESS, "mbpf_tc_to_pod": TC_EGRESS}
# Our fixed slot on each hook. Priority 1 runs before filters a CNI adds
# later at a higher number; the programs pass with TC_ACT_UNSPEC, so the
# filters after ours still run. The handle is "MB".
TC_PRIO = 1
TC_HANDLE = 0x4D42
ETH_P_ALL = 0x0003
# Seconds a UDP (any non-TCP) flow may stay idle before its next packet is
# judged afresh: conntrack's nf_conntrack_udp_timeout_stream (bpf/lib/ct.h).
CT_IDLE_S = 120


class PolicyError(Exception):
    pass


def _ipr(netns: str | None):
    """flags=0: open a named netns, never create it (pyroute2's default is
    O_CREAT, which brought back, empty, a netns deleted meanwhile)."""
    from pyroute2 import IPRoute
    return IPRoute(netns=netns, flags=0) if netns else IPRoute()


@dataclass
class PolicyDatapath:
    """The policy programs for one bpffs folder; netns: where the pods'
    host-side interfaces are (None: this process's; the lab: its node netns)."""

    bpffs: Path
    sizes: dict[str, int] = field(default_factory=dict)
    netns: str | None = None
    ct_idle_s: int = CT_IDLE_S  # a non-TCP flow idle this long is judged afresh
    bpf: object = None
    _fns: dict = field(default_factory=dict)

    def capacity(self, spec: MapSpec) -> int:
        return self.sizes.get(spec.name, spec.default_size)

    def maps(self) -> tuple[MapSpec, ...]:
        """The maps this kernel gets (no event ring buffer before 5.8)."""
        return pinned_policy_maps(libbpf.ringbuf_supported())

    def compile(self) -> None:
        """Compile and verify both programs, creating or reopening the pins."""
        from bcc import BPF  # the CLI must work without bcc

        check_bpffs(self.bpffs)
        self.bpffs.mkdir(parents=True, exist_ok=True)
        cflags = [f'-DMBPF_PIN_DIR="{self.bpffs}"']
        cflags += [f"-D{s.size_macro}={self.capacity(s)}" for s in self.maps() if s.size_macro]
        cflags.append(f"-DMBPF_CT_IDLE_S={int(self.ct_idle_s)}")
        if libbpf.ringbuf_supported():
            cflags.append("-DMBPF_HAVE_RINGBUF")
        try:
            self.bpf = BPF(text=program_text(["policy.c"]).encode(), cflags=cflags)
        except Exception as exc:
            raise PolicyError(f"compiling policy.c failed: {exc}") from exc
        self._check_pinned_layouts()
        for name in PROGRAMS:
            try:
                self._fns[name] = self.bpf.load_func(name.encode(), BPF.SCHED_CLS)
            except Exception as exc:
                lines = str(exc).strip().splitlines() or [repr(exc)]
                raise PolicyError(f"the kernel refused {name}: {lines[-1]}") from exc

    def prog_fd(self, name: str) -> int:
        return self._fns[name].fd

    def _check_pinned_layouts(self) -> None:
        """bcc reopens a pinned map without comparing layouts: refuse here,
        before a program is attached, if the pins are another layout."""
        from bcc.libbcc import lib
        problems = []
        for spec in self.maps():
            info = libbpf.map_info(lib.bpf_table_fd(self.bpf.module, spec.name.encode()))
            sizes = (0, 0) if spec.name in RINGBUF_MAPS else (ct.sizeof(spec.key), ct.sizeof(spec.value))
            want = (*sizes, self.capacity(spec), spec.no_prealloc)
            have = (info.key_size, info.value_size, info.max_entries,
                    bool(info.map_flags & NO_PREALLOC))
            if want != have:
                problems.append(f"{self.bpffs / spec.name}: pinned map has key/value/entries/"
                                f"no-prealloc {have}, this build needs {want}")
        if problems:
            raise PolicyError("pinned policy maps do not match this build:\n  "
                              + "\n  ".join(problems))

    def attach(self, ifindex: int) -> None:
        """Both programs on the interface, or swapped in place on our slot."""
        with _ipr(self.netns) as ipr:
            try:
                ipr.tc("add", "clsact", ifindex)
            except Exception as exc:
                if getattr(exc, "code", None) != errno.EEXIST:
                    raise PolicyError(f"adding clsact to ifindex {ifindex}: {exc}") from exc
            for name, parent in HOOKS.items():
                ipr.tc("replace-filter", "bpf", ifindex, TC_HANDLE, fd=self.prog_fd(name),
                       name=name, parent=parent, prio=TC_PRIO, protocol=ETH_P_ALL,
                       classid=1, direct_action=True)

    def detach(self, ifindex: int) -> None:
        """Our two filters off the interface (the clsact qdisc stays: a CNI
        may use it). An interface that is gone is not an error."""
        detach_filters(self.netns, ifindex)

    def attached(self) -> dict[int, dict[str, int]]:
        """ifindex -> {program name: program id} for every interface carrying ours."""
        return attached_filters(self.netns)


def _our_filters(ipr, ifindex: int) -> list[tuple[int, str]]:
    """(parent, TCA_BPF_NAME) of our filters on one interface."""
    return our_filters(ipr, ifindex, PROGRAMS, TC_PRIO)


def _prog_ids(netns: str | None, ifname: str) -> dict[str, int]:
    """Program id behind each of our filters on ifname. pyroute2 0.9 does
    not decode TCA_BPF_ID, so this one read goes through tc's JSON."""
    import json
    import subprocess
    ids = {}
    for hook in ("ingress", "egress"):
        argv = ["tc", *(["-n", netns] if netns else []), "-j", "filter", "show", "dev", ifname, hook]
        out = subprocess.run(argv, capture_output=True, text=True).stdout
        for f in json.loads(out or "[]"):
            opts = f.get("options", {})
            if f.get("pref") == TC_PRIO and opts.get("bpf_name") in PROGRAMS:
                ids[opts["bpf_name"]] = opts.get("prog", {}).get("id", 0)
    return ids


def attached_filters(netns: str | None) -> dict[int, dict[str, int]]:
    """ifindex -> {program name: program id} of our filters in netns."""
    out: dict[int, dict[str, int]] = {}
    with _ipr(netns) as ipr:
        for link in ipr.get_links():
            if _our_filters(ipr, link["index"]):
                out[link["index"]] = _prog_ids(netns, link.get_attr("IFLA_IFNAME"))
    return out


def detach_filters(netns: str | None, ifindex: int) -> list[str]:
    removed = []
    with _ipr(netns) as ipr:
        for parent, name in _our_filters(ipr, ifindex):
            try:
                ipr.tc("del-filter", "bpf", ifindex, TC_HANDLE, parent=parent, prio=TC_PRIO,
                       protocol=ETH_P_ALL)
                removed.append(name)
            except Exception as exc:
                if getattr(exc, "code", None) not in (errno.ENOENT, errno.ENODEV):
                    raise
    return removed


# --- maps --------------------------------------------------------------------

def _u32(c) -> int:
    return c.value if hasattr(c, "value") else int(c)


def _ep_into(v: EpVal) -> EpC:
    return EpC(ep_id=v.ep_id, gen=v.gen, flags=v.flags, pad=0)


def _addr_key(addr: bytes) -> EpAddrC:
    key = EpAddrC()
    key.addr[:] = addr
    return key


def _peer_key(k: PeerKey) -> PolPeerKeyC:
    c = PolPeerKeyC(prefixlen=64 + k.addr_bits, ep_id=k.ep_id, gen=k.gen, dir=k.dir)
    c.addr[:] = k.addr
    return c


def _peer_key_from(c: PolPeerKeyC) -> PeerKey:
    return PeerKey(c.ep_id, c.gen, c.dir, bytes(c.addr), c.prefixlen - 64)


def _port_key(k: PortKey) -> PolPortKeyC:
    return PolPortKeyC(prefixlen=96 + k.port_bits, ep_id=k.ep_id, gen=k.gen, dir=k.dir,
                       proto=k.proto, peer_set=k.peer_set, port=socket.htons(k.port))


def _port_key_from(c: PolPortKeyC) -> PortKey:
    return PortKey(c.ep_id, c.gen, c.dir, c.proto, c.peer_set, socket.ntohs(c.port),
                   c.prefixlen - 96)


# PolicyState field -> (key into C, value into C, key from C, value from C)
CODECS = {
    "endpoints": (ct.c_uint32, _ep_into, _u32, lambda c: EpVal(c.ep_id, c.gen, c.flags)),
    "addresses": (_addr_key, ct.c_uint32, lambda c: bytes(c.addr), _u32),
    "peers": (_peer_key, lambda v: PolPeerC(peer_set=v.peer_set, rule=v.rule, flags=v.flags),
              _peer_key_from, lambda c: PeerVal(c.peer_set, c.rule, c.flags)),
    "ports": (_port_key, lambda v: PolPortC(rule=v.rule), _port_key_from,
              lambda c: PortVal(c.rule)),
}
ROLE_MAP = {spec.role: spec for spec in POLICY_MAPS if spec.role}
# mbpf_pol_stats slots by name: "ingress_allow" .. "egress_deny", "spoofed", "malformed"
COUNTERS = {f"{d}_{v}": i for (d, v), i in POLICY_COUNTERS.items()}
COUNTERS.update(spoofed=DROP_COUNTERS["spoofed_source"][0], malformed=DROP_COUNTERS["malformed"][0])


def pinned_policy_maps(ringbuf: bool) -> tuple[MapSpec, ...]:
    return tuple(s for s in POLICY_MAPS if ringbuf or s.name not in RINGBUF_MAPS)


class PolicyMaps(PinnedMaps):
    """The pinned policy maps of one bpffs folder, opened without bcc."""

    what = "policy"
    roles = ROLE_MAP
    codecs = CODECS
    state_type = PolicyState
    error = PolicyError
    stats_map = "mbpf_pol_stats"
    counter_index = COUNTERS

    def __init__(self, bpffs: Path):
        # a kernel without ring buffers has no event map
        super().__init__(bpffs, POLICY_MAPS, skip=lambda spec: (
            spec.name in RINGBUF_MAPS and not (Path(bpffs) / spec.name).exists()))

    def set_events(self, on: bool) -> None:
        libbpf.map_update(self.fds["mbpf_pol_cfg"], ct.c_uint32(0), PolCfgC(events=int(on)))

    def conntrack(self) -> list[CtKeyC]:
        return [k for k, _ in libbpf.map_items(self.fds["mbpf_ct"], CtKeyC, CtC)]


def addr_bytes(ip) -> bytes:
    """A pod address as the maps key it (16 bytes, IPv4 mapped)."""
    return addr16(ipaddress.ip_address(str(ip)))
