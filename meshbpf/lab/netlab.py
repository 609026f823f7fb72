"""A node in a box: pods as network namespaces on a bridge, in a child cgroup.

    node netns  mbl-<lab>-node   bridge mbr0: 10.244.0.1/24, fd00:244::1/64
    pod netns   mbl-<lab>-<pod>  eth0: 10.244.0.<n>/24, fd00:244::<n>/64
    cgroup      <cgroup2>/meshbpf-lab-<lab>   every lab process runs here

A pod named NAMESPACE/NAME ("x/a") is a Kubernetes-style pod: netns
mbl-<lab>-<namespace>.<name>, a uid derived from the lab and its name, and
its own cgroup laid out as a cgroupfs-driver kubelet lays it out:
    <lab cgroup>/kubepods/besteffort/pod<uid>
and one long-lived process in it, in its netns (as kubelet's pause
container), so that pod uid -> cgroup -> pid -> netns finds it as on a real
node (meshbpf.datapath.endpoints.find_endpoint).
It stays inside the lab cgroup's subtree, so programs attached to the lab
cgroup (BPF links are inherited by descendants) still apply to it. A bare
name ("web-1") is a pod of namespace "default" that runs in the lab cgroup
itself, as it always has.

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
import uuid
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
    name: str   # the lab's key: "web-1", or "x/a" for namespace x, pod a
    netns: str
    index: int  # host part of its addresses
    uid: str = ""
    cgroup: Path | None = None  # its own cgroup; None: the lab cgroup

    @property
    def namespace(self) -> str:
        return self.name.split("/")[0] if "/" in self.name else "default"

    @property
    def pod_name(self) -> str:
        return self.name.split("/")[-1]

    @property
    def ipv4(self) -> ipaddress.IPv4Address:
        return SUBNET4.network_address + self.index

    @property
    def ipv6(self) -> ipaddress.IPv6Address:
        return SUBNET6.network_address + self.index


def _dns_label(text: str, what: str, longest: int) -> None:
    ok = text and len(text) <= longest and text[0].isalnum() and text[-1].isalnum()
    if not ok or any(not (ch.isdigit() or "a" <= ch <= "z" or ch == "-") for ch in text):
        raise LabError(f"{what} {text!r}: use up to {longest} lowercase letters, digits and dashes")


def parse_pod(spec: str) -> tuple[str | None, str]:
    """"x/a" -> ("x", "a"); a bare "web-1" -> (None, "web-1"), as it always was."""
    if "/" not in spec:
        if not spec.replace("-", "").isalnum() or len(spec) > 24:
            raise LabError(f"pod name {spec!r}: use up to 24 letters, digits and dashes")
        return None, spec
    namespace, _, name = spec.partition("/")
    _dns_label(namespace, f"namespace of pod {spec!r}", 20)
    _dns_label(name, f"pod name in {spec!r}", 24)
    return namespace, name


def pod_uid(lab: str, namespace: str, name: str) -> str:
    """Stable across `lab up` and `Lab.attach`, unique per lab and pod."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"meshbpf-lab/{lab}/{namespace}/{name}"))


def kubelet_cgroup(parent: Path, uid: str) -> Path:
    """Where a cgroupfs-driver kubelet puts a BestEffort pod, below parent
    (kubepods/besteffort/pod<uid>); see README, "Lab namespaces"."""
    return parent / "kubepods" / "besteffort" / f"pod{uid}"


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
        self._pauses: list[subprocess.Popen] = []

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

    def _pod(self, name: str, index: int) -> Pod:
        namespace, pod_name = parse_pod(name)
        uid = pod_uid(self.name, namespace or "default", pod_name)
        if namespace is None:
            return Pod(name, f"{NETNS_PREFIX}{self.name}-{name}", index, uid)
        return Pod(name, f"{NETNS_PREFIX}{self.name}-{namespace}.{pod_name}", index, uid,
                   kubelet_cgroup(self.cgroup, uid))

    def add_pod(self, name: str) -> Pod:
        if name in self.pods:
            raise LabError(f"pod {name!r} exists")
        index = len(self.pods) + 2  # .1 is the bridge
        if index > 250:
            raise LabError("a lab holds at most 249 pods")
        pod = self._pod(name, index)
        if pod.cgroup is not None:
            pod.cgroup.mkdir(parents=True, exist_ok=True)
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
        if pod.cgroup is not None:
            self._start_pause(name)
        return pod

    def _start_pause(self, name: str) -> None:
        """The pod's pause process: holds its netns inside its cgroup."""
        self._pauses.append(self.popen(name, ["sleep", "infinity"], stdin=subprocess.DEVNULL,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                       start_new_session=True))

    def down(self) -> None:
        """Kill the lab's processes, delete its namespaces and its cgroup."""
        _kill_cgroup(self.cgroup)
        for proc in self._pauses:
            proc.kill()  # killed with the cgroup already, unless cgroup.kill is missing
            proc.wait(timeout=10)
        self._pauses.clear()
        for ns in netns.listnetns():
            if ns.startswith(f"{NETNS_PREFIX}{self.name}-"):
                netns.remove(ns)
        if self.cgroup.exists():
            # Pods' own cgroups first: a cgroup with children cannot go.
            for cg in sorted(self.cgroup.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                if cg.is_dir():
                    _rmdir_cgroup(cg)
            _rmdir_cgroup(self.cgroup)
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
                    name = ns[len(prefix):].replace(".", "/", 1)  # bare names hold no dot
                    lab.pods[name] = lab._pod(name, index)
        return lab

    # --- processes -----------------------------------------------------------
    def _preexec(self, pod: str | None, in_cgroup: bool):
        ns = self.pods[pod].netns if pod else self.node_ns
        procs = ((pod and self.pods[pod].cgroup) or self.cgroup) / "cgroup.procs"

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
    """Kills every process in cg and its descendants (the pods' cgroups)."""
    if not cg.exists():
        return
    kill = cg / "cgroup.kill"
    if kill.exists():
        kill.write_text("1")  # the whole subtree
    else:
        for pid in _subtree_pids(cg):
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
    for _ in range(100):
        if not _subtree_pids(cg):
            return
        time.sleep(0.02)


def _subtree_pids(cg: Path) -> list[str]:
    pids = []
    for procs in cg.rglob("cgroup.procs"):  # cg itself included
        try:
            pids += procs.read_text().split()
        except FileNotFoundError:
            pass  # removed meanwhile
    return pids


def _rmdir_cgroup(cg: Path) -> None:
    for _ in range(100):
        try:
            cg.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.05)
    raise LabError(f"cannot remove {cg}: processes are still in it")


def list_labs() -> list[str]:
    return sorted(ns[len(NETNS_PREFIX):-len("-node")] for ns in netns.listnetns()
                  if ns.startswith(NETNS_PREFIX) and ns.endswith("-node"))
