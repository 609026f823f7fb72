"""North-south datapath (issue 12): the tc programs on the node's external
devices and their pinned maps.

`NorthSouthDatapath.load` compiles bpf/nodeport.c (its own bcc module; the
maps are pinned in the agent's bpffs folder, reused when already there)
and attaches mbpf_ns_ingress / mbpf_ns_egress to each device's clsact
hooks with a fixed priority and handle: `tc filter replace` on that slot
swaps the program atomically, so a new agent never opens a window, and the
filters stay attached when the agent dies.

`NorthSouthMaps` reads and writes the planner's NorthSouthState through
libbpf.py and the ctypes mirrors of layout.py. The Maglev tables are one
array of MBPF_NS_TABLE_MAX rows of M entries; M is the array's size with
its factors of two taken out (M is an odd prime, the row count a power of
two), so a reader needs no agent flag to know it.
"""

from __future__ import annotations

import ctypes as ct
import errno
import logging
import os
import socket
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path

from ..reconcile.northsouth_keys import (DEFAULT_TABLE_SIZE, NorthSouthState, NsBackend, NsCfg,
                                         NsKey, NsSrcKey, NsSvc)
from . import libbpf
from .bpffs import check_bpffs
from .layout import (EpAddrC, NO_PREALLOC, NS_COUNTERS, NS_MAPS, MapSpec, NsBackendC, NsCfgC,
                     NsCtC, NsCtKeyC, NsKeyC, NsSrcKeyC, NsSvcC)
from .pinned import PinnedMaps
from .tcfilters import TC_EGRESS, TC_INGRESS, our_filters, pinned_map_id
from .source import program_text

log = logging.getLogger(__name__)

PROGRAMS = ("mbpf_ns_ingress", "mbpf_ns_egress")
CT_FWD, CT_REV = 1, 2    # MBPF_NS_CT_FWD / _REV
CT_F_SNAT = 1            # MBPF_NS_CT_F_SNAT
CT_F_FIN, CT_F_RST = 4, 8   # MBPF_NS_CT_F_FIN / _RST: a FIN / RST went by (TCP)
CT_F_FIN_FIRST = 16         # MBPF_NS_CT_F_FIN_FIRST: an SNATed flow's first FIN went this way
# Idle limits shorter than the caller's: a TCP flow that saw a RST, one
# the client closed first (no TIME_WAIT at the backend: bpf/lib/nodeport.h,
# NS_CT_CLOSED_IDLE), one that saw a FIN, UDP (so that its SNAT port serves
# again: the range is small). Linux's conntrack keeps a closed TCP flow
# 10 s (tcp_timeout_close).
CT_RST_IDLE_NS = 10 * 10**9
CT_CLOSED_IDLE_NS = 1 * 10**9
CT_FIN_IDLE_NS = 60 * 10**9
CT_UDP_IDLE_NS = 120 * 10**9
XDP_PROGRAM = "mbpf_ns_xdp"
XDP_FLAGS_DRV_MODE = 4   # native XDP in the driver (veth has it); never the generic one
HOOKS = {"mbpf_ns_ingress": TC_INGRESS, "mbpf_ns_egress": TC_EGRESS}
# Our slot on each hook of an external device: priority 1 (before a CNI's
# later filters; ours pass with TC_ACT_UNSPEC, so those still run), handle "NS".
TC_PRIO = 1
TC_HANDLE = 0x4E53
ETH_P_ALL = 0x0003
MODES = ("tc", "xdp", "auto")


class NorthSouthError(Exception):
    pass


def _ipr(netns: str | None):
    """flags=0: open a named netns, never create it."""
    from pyroute2 import IPRoute
    return IPRoute(netns=netns, flags=0) if netns else IPRoute()


def table_size_of(max_entries: int) -> int:
    """M from mbpf_maglev's size (rows, a power of two, times M, odd)."""
    size = max_entries
    while size and size % 2 == 0:
        size //= 2
    return size


# --- maps --------------------------------------------------------------------

def _u32(c) -> int:
    return c.value if hasattr(c, "value") else int(c)


def _ns_key(k: NsKey) -> NsKeyC:
    c = NsKeyC(port=socket.htons(k.port), proto=k.proto)
    c.addr[:] = k.addr
    return c


def _backend(v: NsBackend) -> NsBackendC:
    c = NsBackendC(port=socket.htons(v.port), flags=v.flags)
    c.addr[:] = v.addr
    return c


def _src_key(k: NsSrcKey) -> NsSrcKeyC:
    c = NsSrcKeyC(prefixlen=32 + k.addr_bits, src_id=socket.htonl(k.src_id))
    c.addr[:] = k.addr
    return c


def _addr_key(addr: bytes) -> EpAddrC:
    c = EpAddrC()
    c.addr[:] = addr
    return c


def _cfg(v: NsCfg) -> NsCfgC:
    c = NsCfgC(enabled=v.enabled, snat_port_min=v.snat_port_min, snat_port_max=v.snat_port_max)
    c.snat4[:] = v.snat4
    c.snat6[:] = v.snat6
    return c


# NorthSouthState field -> (key into C, value into C, key from C, value from C)
CODECS = {
    "frontends": (_ns_key, lambda v: NsSvcC(*v),
                  lambda c: NsKey(bytes(c.addr), socket.ntohs(c.port), c.proto),
                  lambda c: NsSvc(c.table_id, c.count, c.src_id, c.flags)),
    "backends": (ct.c_uint32, _backend, _u32,
                 lambda c: NsBackend(bytes(c.addr), socket.ntohs(c.port), c.flags)),
    "sources": (_src_key, ct.c_uint32,
                lambda c: NsSrcKey(socket.ntohl(c.src_id), bytes(c.addr), c.prefixlen - 32), _u32),
    "node_addrs": (_addr_key, ct.c_uint32, lambda c: bytes(c.addr), _u32),
    "cfg": (ct.c_uint32, _cfg, _u32,
            lambda c: NsCfg(bytes(c.snat4), bytes(c.snat6), c.enabled, c.snat_port_min,
                            c.snat_port_max)),
}
ROLE_MAP = {spec.role: spec for spec in NS_MAPS if spec.role}
SPEC = {spec.name: spec for spec in NS_MAPS}


class NorthSouthMaps(PinnedMaps):
    """The pinned north-south maps of one bpffs folder, opened without bcc."""

    what = "north-south"
    roles = ROLE_MAP
    codecs = CODECS
    state_type = NorthSouthState
    error = NorthSouthError
    stats_map = "mbpf_ns_stats"
    counter_index = NS_COUNTERS

    def __init__(self, bpffs: Path):
        super().__init__(bpffs, NS_MAPS)
        self.table_size = table_size_of(libbpf.map_info(self.fds["mbpf_maglev"]).max_entries)

    def read(self) -> NorthSouthState:
        state = NorthSouthState()
        for role in ("frontends", "backends", "sources"):
            _, _, key_from, val_from = self.codecs[role]
            spec = self.roles[role]
            target = getattr(state, role)
            for k, v in libbpf.map_items(self.fds[spec.name], spec.key, spec.value):
                target[key_from(k)] = val_from(v)
        state.node_addrs = {bytes(k.addr) for k, _ in
                            libbpf.map_items(self.fds["mbpf_ns_addr"], EpAddrC, ct.c_uint32)}
        cfg = NsCfgC()
        libbpf.map_lookup(self.fds["mbpf_ns_cfg"], ct.c_uint32(0), cfg)
        state.cfg = CODECS["cfg"][3](cfg)
        for table_id in sorted({svc.table_id for svc in state.frontends.values()}):
            state.tables[table_id] = self.read_table(table_id)
        return state

    def read_table(self, table_id: int) -> array:
        fd, base, row = self.fds["mbpf_maglev"], table_id * self.table_size, array("I")
        value = ct.c_uint32()
        for slot in range(self.table_size):
            libbpf.map_lookup(fd, ct.c_uint32(base + slot), value)
            row.append(value.value)
        return row

    def _apply_step(self, step) -> None:
        if step.map == "tables":
            for table_id, row in step.entries.items():
                self.write_table(table_id, row if step.op == "update" else None)
        elif step.map == "cfg" and step.op == "delete":
            libbpf.map_update(self.fds["mbpf_ns_cfg"], ct.c_uint32(0), NsCfgC())  # an array entry stays: zero it
        else:
            super()._apply_step(step)

    def write_table(self, table_id: int, row) -> None:
        """One table's row in one batch (5.6+), else entry by entry. None:
        zeroes (an array entry cannot be deleted; 0 names no backend)."""
        m = self.table_size
        spec = SPEC["mbpf_maglev"]
        rows = libbpf.map_info(self.fds[spec.name]).max_entries // m
        if not 0 <= table_id < rows:
            raise NorthSouthError(f"table {table_id} is outside mbpf_maglev (tables 0..{rows - 1})")
        if row is not None and len(row) != m:
            raise NorthSouthError(f"table {table_id}: {len(row)} entries, the table size is {m}")
        values = (ct.c_uint32 * m)(*(row if row is not None else [0] * m))
        keys = (ct.c_uint32 * m)(*range(table_id * m, table_id * m + m))
        try:
            libbpf.map_update_batch(self.fds[spec.name], keys, values, m)
            return
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise NorthSouthError(f"update of mbpf_maglev table {table_id} failed: "
                                      f"{exc.strerror}") from exc
        for i in range(m):
            libbpf.map_update(self.fds[spec.name], ct.c_uint32(keys[i]), ct.c_uint32(values[i]))

    def conntrack(self) -> list[tuple[NsCtKeyC, NsCtC]]:
        return list(libbpf.map_items(self.fds["mbpf_ns_ct"], NsCtKeyC, NsCtC))

    def collect_garbage(self, idle_ns: int, now_ns: int | None = None, *,
                        rst_idle_ns: int = CT_RST_IDLE_NS, fin_idle_ns: int = CT_FIN_IDLE_NS,
                        udp_idle_ns: int = CT_UDP_IDLE_NS,
                        closed_idle_ns: int = CT_CLOSED_IDLE_NS) -> int:
        """Removes the flows whose two directions have both seen no packet
        for idle_ns (the programs stamp each direction's entry), and entries
        whose other half is gone and that are idle too. Shorter for some
        (each at most idle_ns): a TCP flow that saw a RST either way after
        rst_idle_ns, an SNATed one whose client closed first and whose
        backend closed too after closed_idle_ns, one that saw another FIN
        after fin_idle_ns (a SYN on the tuple since clears them), UDP after
        udp_idle_ns.
        LRU eviction only acts once the table is full; this keeps it from
        filling with the dead (and frees SNAT ports). Returns the entries
        removed."""
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC) if now_ns is None else now_ns
        entries = {bytes(k): (k, v) for k, v in self.conntrack()}
        removed = 0
        for raw, (key, val) in entries.items():
            partner = entries.get(bytes(_ct_partner(key, val)))
            flags = val.flags | (partner[1].flags if partner else 0)
            limit = idle_ns
            if key.proto == socket.IPPROTO_UDP:
                limit = min(limit, udp_idle_ns)
            elif flags & CT_F_RST:
                limit = min(limit, rst_idle_ns)
            elif partner and _closed_by_client(key, val, partner[1]):
                limit = min(limit, closed_idle_ns)
            elif flags & CT_F_FIN:
                limit = min(limit, fin_idle_ns)
            if now - val.last_ns < limit:
                continue
            if partner and now - partner[1].last_ns < limit:
                continue
            try:
                libbpf.map_delete(self.fds["mbpf_ns_ct"], key)
                removed += 1
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    raise
        return removed

    def clear_conntrack(self) -> None:
        for key, _ in self.conntrack():
            try:
                libbpf.map_delete(self.fds["mbpf_ns_ct"], key)
            except OSError:
                pass


def _ct_partner(key: NsCtKeyC, val: NsCtC) -> NsCtKeyC:
    """The other direction's key of a conntrack entry."""
    snat = bool(val.flags & CT_F_SNAT)
    other = NsCtKeyC(proto=key.proto)
    if key.dir == CT_FWD:   # reply: backend -> client (or the SNAT address)
        other.saddr[:] = bytes(val.dst)
        other.daddr[:] = bytes(val.src) if snat else bytes(key.saddr)
        other.sport, other.dport, other.dir = val.dport, val.sport if snat else key.sport, CT_REV
    else:                   # request: client -> frontend
        other.saddr[:] = bytes(val.dst)
        other.daddr[:] = bytes(val.src)
        other.sport, other.dport, other.dir = val.dport, val.sport, CT_FWD
    return other


def _closed_by_client(key: NsCtKeyC, val: NsCtC, partner: NsCtC) -> bool:
    """An SNATed TCP flow whose client's FIN came first and whose backend
    closed too (as bpf/lib/nodeport.h's ns_take_over judges it)."""
    fwd, rev = (val, partner) if key.dir == CT_FWD else (partner, val)
    return bool(fwd.flags & CT_F_FIN_FIRST and rev.flags & CT_F_FIN
                and not rev.flags & CT_F_FIN_FIRST)


# --- programs ------------------------------------------------------------------

@dataclass
class NorthSouthDatapath:
    """The north-south programs for one bpffs folder, attached to devices in
    netns (None: this process's; the lab: a node's)."""

    bpffs: Path
    devices: list[str]
    netns: str | None = None
    table_size: int = DEFAULT_TABLE_SIZE
    sizes: dict[str, int] = field(default_factory=dict)
    mode: str = "tc"
    bpf: object = None
    maps: NorthSouthMaps | None = None
    _fns: dict = field(default_factory=dict)

    reserved: str | None = None   # ip_local_reserved_ports before reserve_snat_ports changed it

    @classmethod
    def load(cls, bpffs: str | Path, devices: list[str], *, netns: str | None = None,
             table_size: int = DEFAULT_TABLE_SIZE, mode: str = "auto",
             map_sizes: dict[str, int] | None = None,
             reserve_snat_ports: tuple[int, int] | None = None) -> "NorthSouthDatapath":
        """Compile (-DMBPF_MAGLEV_M=table_size), pin or reuse the maps, attach
        to each device in netns. map_sizes: map name -> max_entries, except
        "mbpf_maglev": its number of tables (a power of two). mode "tc": tc
        alone; "xdp": also mbpf_ns_xdp in native mode in front (an error
        where the driver has none); "auto": XDP where it can, else tc alone
        (tc alone on veth: frames from a local sender there may carry
        unfinished checksums, which XDP cannot finish).
        self.mode says which it got. reserve_snat_ports (lo, hi): first
        added to net.ipv4.ip_local_reserved_ports in netns (the devices'
        netns: the node's), so that the node's own connections take none
        of the SNAT ports (datapath/reserved_ports.py); None: left as is."""
        if mode not in MODES:
            raise NorthSouthError(f"north-south mode {mode!r}: expected one of {', '.join(MODES)}")
        dp = cls(Path(bpffs), list(devices), netns, table_size, dict(map_sizes or {}))
        if reserve_snat_ports is not None:
            from . import reserved_ports
            try:
                dp.reserved = reserved_ports.reserve(tuple(reserve_snat_ports), netns)
            except OSError as exc:
                raise NorthSouthError(f"reserving SNAT ports {reserve_snat_ports[0]}-"
                                      f"{reserve_snat_ports[1]} in net.ipv4.ip_local_reserved_ports"
                                      f"{' of netns ' + netns if netns else ''} failed: {exc} "
                                      f"(--no-reserve-snat-ports skips it)") from exc
        dp.compile()
        dp.maps = NorthSouthMaps(dp.bpffs)
        try:
            for dev in dp.devices:
                dp.attach(dev)
            if mode != "tc":
                dp.mode = dp.attach_xdp(required=mode == "xdp")
        except Exception:
            dp.maps.close()
            raise
        return dp

    def capacity(self, spec: MapSpec) -> int:
        return self.sizes.get(spec.name, spec.default_size)

    def max_entries(self, spec: MapSpec) -> int:
        if spec.name == "mbpf_maglev":
            return self.capacity(spec) * self.table_size
        return self.capacity(spec)

    def _check_sizes(self) -> None:
        m, tables = self.table_size, self.capacity(SPEC["mbpf_maglev"])
        if m < 3 or m % 2 == 0:
            raise NorthSouthError(f"Maglev table size {m}: must be an odd prime")
        if tables < 1 or tables & (tables - 1):
            raise NorthSouthError(f"mbpf_maglev tables {tables}: must be a power of two")

    def compile(self) -> None:
        """Compile and verify both programs, creating or reopening the pins."""
        from bcc import BPF  # the CLI must work without bcc

        self._check_sizes()
        check_bpffs(self.bpffs)
        self.bpffs.mkdir(parents=True, exist_ok=True)
        cflags = [f'-DMBPF_PIN_DIR="{self.bpffs}"', f"-DMBPF_MAGLEV_M={self.table_size}"]
        cflags += [f"-D{s.size_macro}={self.capacity(s)}" for s in NS_MAPS if s.size_macro]
        try:
            self.bpf = BPF(text=program_text(["nodeport.c"]).encode(), cflags=cflags)
        except Exception as exc:
            raise NorthSouthError(f"compiling nodeport.c failed: {exc}") from exc
        self._check_pinned_layouts()
        for name, kind in ((n, BPF.SCHED_CLS) for n in PROGRAMS):
            try:
                self._fns[name] = self.bpf.load_func(name.encode(), kind)
            except Exception as exc:
                lines = str(exc).strip().splitlines() or [repr(exc)]
                raise NorthSouthError(f"the kernel refused {name}: {lines[-1]}") from exc

    def prog_fd(self, name: str) -> int:
        if name not in self._fns:  # the XDP program: loaded when asked for
            from bcc import BPF
            try:
                self._fns[name] = self.bpf.load_func(name.encode(), BPF.XDP)
            except Exception as exc:
                lines = str(exc).strip().splitlines() or [repr(exc)]
                raise NorthSouthError(f"the kernel refused {name}: {lines[-1]}") from exc
        return self._fns[name].fd

    def _any_veth(self) -> bool:
        with _ipr(self.netns) as ipr:
            for dev in self.devices:
                info = ipr.get_links(self._ifindex(ipr, dev))[0].get_attr("IFLA_LINKINFO")
                if info is not None and info.get_attr("IFLA_INFO_KIND") == "veth":
                    return True
        return False

    def attach_xdp(self, required: bool) -> str:
        """mbpf_ns_xdp (native mode) in front of tc on every device, or
        swapped in place: "xdp". A device or kernel without native XDP:
        "tc" (tc alone does everything), or an error if required."""
        if not required and self._any_veth():
            # A veth carries checksums a local sender left unfinished
            # (CHECKSUM_PARTIAL); a frame XDP sends on is never finished.
            log.info("north-south: tc alone on veth devices (mode auto); mode xdp forces XDP")
            return "tc"
        try:
            fd = self.prog_fd(XDP_PROGRAM)
            with _ipr(self.netns) as ipr:
                for dev in self.devices:
                    ipr.link("set", index=self._ifindex(ipr, dev),
                             xdp={"attrs": [["IFLA_XDP_FD", fd], ["IFLA_XDP_FLAGS", XDP_FLAGS_DRV_MODE]]})
        except Exception as exc:
            for dev in self.devices:
                detach_xdp(self.netns, dev)
            if required:
                raise NorthSouthError(f"north-south mode 'xdp': attaching {XDP_PROGRAM} failed: "
                                      f"{exc}") from exc
            log.info("north-south: no native XDP (%s); tc alone", exc)
            return "tc"
        return "xdp"

    def _check_pinned_layouts(self) -> None:
        """bcc reopens a pinned map without comparing layouts: refuse here,
        before a program is attached, if the pins are another layout (a
        different table size among them)."""
        from bcc.libbcc import lib
        problems = []
        for spec in NS_MAPS:
            info = libbpf.map_info(lib.bpf_table_fd(self.bpf.module, spec.name.encode()))
            want = (ct.sizeof(spec.key), ct.sizeof(spec.value), self.max_entries(spec),
                    spec.no_prealloc)
            have = (info.key_size, info.value_size, info.max_entries,
                    bool(info.map_flags & NO_PREALLOC))
            if want != have:
                problems.append(f"{self.bpffs / spec.name}: pinned map has key/value/entries/"
                                f"no-prealloc {have}, this build needs {want}")
        if problems:
            raise NorthSouthError("pinned north-south maps do not match this build (another "
                                  "table size or map size?):\n  " + "\n  ".join(problems))

    def _ifindex(self, ipr, dev: str) -> int:
        found = ipr.link_lookup(ifname=dev)
        if not found:
            raise NorthSouthError(f"north-south device {dev!r}: no such device"
                                  + (f" in netns {self.netns}" if self.netns else ""))
        return found[0]

    def attach(self, dev: str) -> None:
        """Both programs on the device, or swapped in place on our slot."""
        with _ipr(self.netns) as ipr:
            ifindex = self._ifindex(ipr, dev)
            try:
                ipr.tc("add", "clsact", ifindex)
            except Exception as exc:
                if getattr(exc, "code", None) != errno.EEXIST:
                    raise NorthSouthError(f"adding clsact to {dev}: {exc}") from exc
            for name, parent in HOOKS.items():
                ipr.tc("replace-filter", "bpf", ifindex, TC_HANDLE, fd=self.prog_fd(name),
                       name=name, parent=parent, prio=TC_PRIO, protocol=ETH_P_ALL,
                       classid=1, direct_action=True)

    def detach(self) -> None:
        """Our filters off every device (the clsact qdisc stays: a CNI may
        use it). A device that is gone is not an error."""
        for dev in self.devices:
            detach_filters(self.netns, dev)
            detach_xdp(self.netns, dev)
        if self.maps:
            self.maps.close()


def _our_filters(ipr, ifindex: int) -> list[int]:
    """Parents (ingress/egress) carrying one of our filters on ifindex."""
    return list(dict.fromkeys(parent for parent, _ in our_filters(ipr, ifindex, PROGRAMS, TC_PRIO)))


def detach_filters(netns: str | None, dev: str) -> int:
    """Removes our filters from dev in netns; how many were removed."""
    removed = 0
    try:
        ipr = _ipr(netns)
    except OSError:
        return 0  # the namespace is gone
    with ipr:
        found = ipr.link_lookup(ifname=dev)
        if not found:
            return 0
        for parent in _our_filters(ipr, found[0]):
            try:
                ipr.tc("del-filter", "bpf", found[0], TC_HANDLE, parent=parent, prio=TC_PRIO,
                       protocol=ETH_P_ALL)
                removed += 1
            except Exception as exc:
                if getattr(exc, "code", None) not in (errno.ENOENT, errno.ENODEV):
                    raise
    return removed


def xdp_program(netns: str | None, dev: str) -> str:
    """Name of the XDP program on dev ("" if none)."""
    with _ipr(netns) as ipr:
        found = ipr.link_lookup(ifname=dev)
        if not found:
            return ""
        xdp = ipr.get_links(found[0])[0].get_attr("IFLA_XDP")
    prog_id = (xdp.get_attr("IFLA_XDP_PROG_ID") if xdp is not None else 0) or 0
    if not prog_id:
        return ""
    try:
        fd = libbpf.prog_fd_by_id(prog_id)
    except OSError:
        return ""
    try:
        return libbpf.prog_info(fd).name
    finally:
        os.close(fd)


def detach_xdp(netns: str | None, dev: str) -> bool:
    """Our XDP program off dev (another one is left alone)."""
    if xdp_program(netns, dev) != XDP_PROGRAM:
        return False
    with _ipr(netns) as ipr:
        found = ipr.link_lookup(ifname=dev)
        if found:
            ipr.link("set", index=found[0],
                     xdp={"attrs": [["IFLA_XDP_FD", -1], ["IFLA_XDP_FLAGS", XDP_FLAGS_DRV_MODE]]})
    return True


def remove_filters(bpffs: Path) -> list[str]:
    """Our filters whose programs use this folder's maps, on every device in
    this netns and in every named one (the lab's nodes): uninstall removes
    them, or they would keep translating with the maps unpinned."""
    from pyroute2 import netns as named_netns

    map_id = pinned_map_id(str(Path(bpffs) / "mbpf_ns_svc"))
    if map_id is None:
        return []
    removed = []
    for ns in [None, *named_netns.listnetns()]:
        try:
            for dev in _devices_using(ns, map_id):
                if detach_filters(ns, dev):
                    removed.append(f"tc filters mbpf_ns_* on {dev}" + (f" in netns {ns}" if ns else ""))
                if detach_xdp(ns, dev):
                    removed.append(f"XDP {XDP_PROGRAM} on {dev}" + (f" in netns {ns}" if ns else ""))
        except Exception as exc:  # a namespace going away meanwhile
            log.debug("north-south filters in netns %s: %s", ns, exc)
    return removed


def _devices_using(netns: str | None, map_id: int) -> list[str]:
    import json
    import subprocess
    found = []
    with _ipr(netns) as ipr:
        names = [link.get_attr("IFLA_IFNAME") for link in ipr.get_links()
                 if _our_filters(ipr, link["index"])]
    for dev in names:
        argv = ["tc", *(["-n", netns] if netns else []), "-j", "filter", "show", "dev", dev, "ingress"]
        out = subprocess.run(argv, capture_output=True, text=True).stdout
        ids = [f.get("options", {}).get("prog", {}).get("id", 0) for f in json.loads(out or "[]")
               if f.get("options", {}).get("bpf_name") in PROGRAMS]
        if any(map_id in libbpf.prog_map_ids(pid) for pid in ids):
            found.append(dev)
    return found


def attached(netns: str | None, dev: str) -> int:
    """How many of our filters (0..2) dev carries."""
    with _ipr(netns) as ipr:
        found = ipr.link_lookup(ifname=dev)
        return len(_our_filters(ipr, found[0])) if found else 0
