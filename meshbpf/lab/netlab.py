"""A node in a box: pods as network namespaces on a bridge, in a child cgroup.

    node netns  mbl-<lab>-node   bridge mbr0: 10.244.0.1/24, fd00:244::1/64
    pod netns   mbl-<lab>-<pod>  eth0: 10.244.0.<n>/24, fd00:244::<n>/64
    cgroup      <cgroup2>/meshbpf-lab-<lab>   every lab process runs here

The demo, the tests and the benchmarks all use it. Nothing here touches the
host's interfaces or root cgroup: the bridge lives in the lab's own node
namespace, and meshbpf attaches to the lab cgroup only.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import IPRoute, netns

from ..datapath.cgroup import cgroup2_mount

NETNS_PREFIX = "mbl-"
CGROUP_PREFIX = "meshbpf-lab-"
SUBNET4 = ipaddress.ip_network("10.244.0.0/24")
SUBNET6 = ipaddress.ip_network("fd00:244::/64")
BRIDGE = "mbr0"
IFA_F_NODAD = 0x02

_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


class LabError(Exception):
    pass


@dataclass(frozen=True)
class Pod:
    name: str
    netns: str
    index: int  # host part of its addresses

    @property
    def ipv4(self) -> ipaddress.IPv4Address:
        return SUBNET4.network_address + self.index

    @property
    def ipv6(self) -> ipaddress.IPv6Address:
        return SUBNET6.network_address + self.index


def _setns(name: str) -> None:
    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {name}")
    finally:
        os.close(fd)


class Lab:
    """One lab; `with Lab("t1") as lab:` tears it down even on failure."""

    def __init__(self, name: str):
        if not name.replace("-", "").isalnum() or len(name) > 20:
            raise LabError(f"lab name {name!r}: use up to 20 letters, digits and dashes")
        self.name = name
        self.node_ns = f"{NETNS_PREFIX}{name}-node"
        self.cgroup = cgroup2_mount() / f"{CGROUP_PREFIX}{name}"
        self.pods: dict[str, Pod] = {}

    # --- lifecycle -----------------------------------------------------------
    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def exists(self) -> bool:
        return self.node_ns in netns.listnetns()

    def up(self, pods: list[str]) -> "Lab":
        if self.exists():
            raise LabError(f"lab {self.name!r} already exists; `meshbpf lab down {self.name}` first")
        try:
            self.cgroup.mkdir(exist_ok=True)
            netns.create(self.node_ns)
            with IPRoute(netns=self.node_ns) as ipr:
                _sysctl_ns(self.node_ns, {"net.ipv6.conf.all.accept_dad": "0",
                                          "net.ipv6.conf.default.accept_dad": "0"})
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
                ipr.link("add", ifname=BRIDGE, kind="bridge")
                br = ipr.link_lookup(ifname=BRIDGE)[0]
                ipr.addr("add", index=br, address=str(SUBNET4.network_address + 1), prefixlen=24)
                ipr.addr("add", index=br, address=str(SUBNET6.network_address + 1), prefixlen=64,
                         flags=IFA_F_NODAD)
                ipr.link("set", index=br, state="up")
            for name in pods:
                self.add_pod(name)
        except Exception:
            self.down()
            raise
        return self

    def add_pod(self, name: str) -> Pod:
        if name in self.pods:
            raise LabError(f"pod {name!r} exists")
        if not name.replace("-", "").isalnum() or len(name) > 24:
            raise LabError(f"pod name {name!r}: use up to 24 letters, digits and dashes")
        index = len(self.pods) + 2  # .1 is the bridge
        if index > 250:
            raise LabError("a lab holds at most 249 pods")
        pod = Pod(name, f"{NETNS_PREFIX}{self.name}-{name}", index)
        netns.create(pod.netns)
        _sysctl_ns(pod.netns, {"net.ipv6.conf.all.accept_dad": "0",
                               "net.ipv6.conf.default.accept_dad": "0"})
        host_if = f"mv{index}"
        with IPRoute(netns=self.node_ns) as node:
            node.link("add", ifname=host_if, kind="veth", peer={"ifname": "eth0", "net_ns_fd": pod.netns})
            idx = node.link_lookup(ifname=host_if)[0]
            node.link("set", index=idx, master=node.link_lookup(ifname=BRIDGE)[0], state="up")
        with IPRoute(netns=pod.netns) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            eth = ipr.link_lookup(ifname="eth0")[0]
            ipr.addr("add", index=eth, address=str(pod.ipv4), prefixlen=24)
            ipr.addr("add", index=eth, address=str(pod.ipv6), prefixlen=64, flags=IFA_F_NODAD)
            ipr.link("set", index=eth, state="up")
            ipr.route("add", dst="default", gateway=str(SUBNET4.network_address + 1))
            ipr.route("add", dst="default", gateway=str(SUBNET6.network_address + 1), family=10)
        self.pods[name] = pod
        return pod

    def down(self) -> None:
        """Kill the lab's processes, delete its namespaces and its cgroup."""
        _kill_cgroup(self.cgroup)
        for ns in netns.listnetns():
            if ns.startswith(f"{NETNS_PREFIX}{self.name}-"):
                netns.remove(ns)
        if self.cgroup.exists():
            for _ in range(100):
                try:
                    self.cgroup.rmdir()
                    break
                except OSError:
                    time.sleep(0.05)
            else:
                raise LabError(f"cannot remove {self.cgroup}: processes are still in it")
        self.pods.clear()

    @classmethod
    def attach(cls, name: str) -> "Lab":
        """The lab of that name as another process made it."""
        lab = cls(name)
        if not lab.exists():
            raise LabError(f"no lab named {name!r} (`meshbpf lab up {name}` makes one)")
        prefix = f"{NETNS_PREFIX}{name}-"
        for ns in sorted(netns.listnetns()):
            if ns.startswith(prefix) and ns != lab.node_ns:
                with IPRoute(netns=ns) as ipr:
                    addrs = [a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(family=2, label="eth0")]
                if addrs:
                    index = int(ipaddress.ip_address(addrs[0])) - int(SUBNET4.network_address)
                    lab.pods[ns[len(prefix):]] = Pod(ns[len(prefix):], ns, index)
        return lab

    # --- processes -----------------------------------------------------------
    def _preexec(self, pod: str | None, in_cgroup: bool):
        ns = self.pods[pod].netns if pod else self.node_ns
        procs = self.cgroup / "cgroup.procs"

        def enter() -> None:
            # Join the cgroup first, then the namespace: setns(2) keeps this
            # process's view of /sys, unlike `ip netns exec`, which remounts it.
            if in_cgroup:
                with open(procs, "w") as f:
                    f.write("0")
            _setns(ns)
        return enter

    def popen(self, pod: str | None, argv: list[str], *, in_cgroup: bool = True,
              **kwargs) -> subprocess.Popen:
        """Start argv in a pod (None: the node namespace), in the lab cgroup."""
        return subprocess.Popen(argv, preexec_fn=self._preexec(pod, in_cgroup), **kwargs)

    def run(self, pod: str | None, argv: list[str], *, in_cgroup: bool = True,
            check: bool = False, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(argv, preexec_fn=self._preexec(pod, in_cgroup), check=check,
                              timeout=timeout, **kwargs)


def _sysctl_ns(ns: str, values: dict[str, str]) -> None:
    args = [f"{k}={v}" for k, v in values.items()]
    subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", *args], check=True)


def _kill_cgroup(cg: Path) -> None:
    if not cg.exists():
        return
    kill = cg / "cgroup.kill"
    if kill.exists():
        kill.write_text("1")
    else:
        for pid in (cg / "cgroup.procs").read_text().split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
    for _ in range(100):
        if not (cg / "cgroup.procs").read_text().strip():
            return
        time.sleep(0.02)


def list_labs() -> list[str]:
    return sorted(ns[len(NETNS_PREFIX):-len("-node")] for ns in netns.listnetns()
                  if ns.startswith(NETNS_PREFIX) and ns.endswith("-node"))
