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
from .tcfilters import TC_EGRESS, TC_INGRESS, our_filters, pinned_map_id
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


# --- inbound from other nodes: mbpf_cap_tc_in on the pod's own interface --------

# clsact's ingress (TC_INGRESS) is what the pod receives, egress what it sends.
TC_HOOKS = {"mbpf_cap_tc_in": TC_INGRESS, "mbpf_cap_tc_out": TC_EGRESS}
TC_PRIO = 1               # our fixed slot: `tc filter replace` there swaps the program in place
TC_HANDLE = 0x4D43        # "MC" (the policy programs' is "MB", on the host side)
ETH_P_ALL = 0x0003


def pod_interface(pod_cgroup: Path, ips) -> tuple[str, int] | None:
    """(netns path, ifindex) of the interface holding one of the pod's
    addresses, found as the policy datapath finds pods (endpoints.py): a
    process of the pod's kubelet cgroup (the pause container; the lab's
    `sleep`) -> /proc/PID/ns/net. None: not running (yet)."""
    import ipaddress

    from pyroute2 import IPRoute

    from .endpoints import _pids_below
    wanted = {ipaddress.ip_address(str(ip)) for ip in ips}
    own = os.stat("/proc/self/ns/net").st_ino
    for pid in _pids_below(Path(pod_cgroup)):
        path = f"/proc/{pid}/ns/net"
        try:
            if os.stat(path).st_ino == own:
                continue  # a host-network process
            with IPRoute(netns=path, flags=0) as ipr:
                for a in ipr.get_addr():
                    if ipaddress.ip_address(a.get_attr("IFA_ADDRESS")) in wanted:
                        return path, a["index"]
        except OSError:
            continue  # exited meanwhile
    return None


class InboundTC:
    """bpf/capture_in.c's programs, compiled once per agent over the pinned
    capture maps, on the ingress (mbpf_cap_tc_in) and egress
    (mbpf_cap_tc_out) of each meshed pod's interface inside the pod's netns.
    Filters stay when the agent dies (the pod keeps its capture); a new
    agent replaces the programs on the same slots."""

    def __init__(self, bpffs: Path, sizes_cflags: list[str]):
        self.bpffs = Path(bpffs)
        self.cflags = [f'-DMBPF_PIN_DIR="{self.bpffs}"', *sizes_cflags]
        self.fns: dict = {}

    def compile(self) -> None:
        from bcc import BPF

        from .source import program_text
        try:
            bpf = BPF(text=program_text(["capture_in.c"]).encode(), cflags=self.cflags)
            self.fns = {name: bpf.load_func(name.encode(), BPF.SCHED_CLS) for name in TC_HOOKS}
        except Exception as exc:
            lines = str(exc).strip().splitlines() or [repr(exc)]
            raise CaptureError(f"inbound capture (bpf/capture_in.c) not loaded: {lines[-1]}") from exc
        self._bpf = bpf  # keeps the programs loaded while filters are swapped

    def attach(self, netns: str, ifindex: int) -> None:
        import errno

        from pyroute2 import IPRoute
        if not self.fns:
            self.compile()
        with IPRoute(netns=netns, flags=0) as ipr:
            try:
                ipr.tc("add", "clsact", ifindex)
            except Exception as exc:
                if getattr(exc, "code", None) != errno.EEXIST:
                    raise CaptureError(f"adding clsact to ifindex {ifindex} in {netns}: {exc}") from exc
            # egress first: a translated SYN must find its answers translated
            for name in ("mbpf_cap_tc_out", "mbpf_cap_tc_in"):
                ipr.tc("replace-filter", "bpf", ifindex, TC_HANDLE, fd=self.fns[name].fd, name=name,
                       parent=TC_HOOKS[name], prio=TC_PRIO, protocol=ETH_P_ALL, classid=1,
                       direct_action=True)


def _our_filters(ipr, ifindex: int) -> list[tuple[str, int]]:
    """(program name, parent) of our filters on one interface."""
    return [(name, parent) for parent, name in our_filters(ipr, ifindex, TC_HOOKS, TC_PRIO)]


def detach_inbound(netns: str, ifindex: int) -> list[str]:
    """Our filters off the pod's interface (the clsact qdisc stays: a CNI may
    use it), ingress first; the names of those removed. A netns or interface
    that is gone is not an error: the filters went with it."""
    import errno

    from pyroute2 import IPRoute
    try:
        with IPRoute(netns=netns, flags=0) as ipr:
            found = sorted(_our_filters(ipr, ifindex), key=lambda f: f[1] != TC_INGRESS)
            for _, parent in found:
                ipr.tc("del-filter", "bpf", ifindex, TC_HANDLE, parent=parent, prio=TC_PRIO,
                       protocol=ETH_P_ALL)
            return [name for name, _ in found]
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENODEV, errno.EINVAL):
            return []
        raise
    except Exception as exc:
        if getattr(exc, "code", None) in (errno.ENOENT, errno.ENODEV):
            return []
        raise


def _filter_prog_ids(netns: str, ifname: str) -> list[int]:
    """Program ids behind our filters (pyroute2 0.9 does not decode TCA_BPF_ID)."""
    import json
    import subprocess
    ids = []
    for hook in ("ingress", "egress"):
        out = subprocess.run(["nsenter", f"--net={netns}", "tc", "-j", "filter", "show", "dev",
                              ifname, hook], capture_output=True, text=True).stdout
        for f in json.loads(out or "[]"):
            opts = f.get("options", {})
            if f.get("pref") == TC_PRIO and opts.get("bpf_name") in TC_HOOKS:
                ids.append(opts.get("prog", {}).get("id", 0))
    return ids


def _all_netns() -> dict[int, str]:
    """Every network namespace a process is in, and every named one: inode -> a path."""
    found: dict[int, str] = {}
    paths = [f"/proc/{p}/ns/net" for p in os.listdir("/proc") if p.isdigit()]
    paths += [str(p) for p in Path("/run/netns").glob("*")] if Path("/run/netns").is_dir() else []
    for path in paths:
        try:
            found.setdefault(os.stat(path).st_ino, path)
        except OSError:
            continue
    return found


def remove_inbound_filters(bpffs: Path) -> list[str]:
    """`meshbpf uninstall`: our tc filters whose program uses this folder's
    mbpf_cap_pod, in any netns (pods' netns are not named on every node)."""
    from pyroute2 import IPRoute
    map_id = pinned_map_id(str(Path(bpffs) / "mbpf_cap_pod"))
    if map_id is None:
        return []
    removed = []
    for path in _all_netns().values():
        try:
            with IPRoute(netns=path, flags=0) as ipr:
                links = [(link["index"], link.get_attr("IFLA_IFNAME")) for link in ipr.get_links()
                         if _our_filters(ipr, link["index"])]
            for ifindex, ifname in links:
                if any(map_id in libbpf.prog_map_ids(p) for p in _filter_prog_ids(path, ifname) if p):
                    removed += [f"tc filter {name} on {ifname} in netns {path}"
                                for name in detach_inbound(path, ifindex)]
        except Exception as exc:  # a namespace going away meanwhile
            import logging
            logging.getLogger(__name__).debug("inbound filters in %s: %s", path, exc)
    return removed
