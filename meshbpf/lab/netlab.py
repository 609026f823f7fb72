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

Several nodes (`Lab(name).up(pods_1, pods_2, ...)`, `lab up --nodes N`):
node k has its own netns, bridge, pod CIDR and cgroup, and a router/client
namespace outside every node reaches them on one shared segment:

    node k netns  mbl-<lab>-node (k = 1), mbl-<lab>-node<k>
                  mbr0: 10.244.<k-1>.1/24, fd00:244:0:<k-1>::1/64
                  ext0: 10.243.0.1<k>/24, fd00:243::1<k>/64, default via the router
    node cgroup   <lab cgroup>/node<k>   its pods (bare or kubelet-style) below it
    router netns  mbl-<lab>-router       bridge mbx0: 10.243.0.1/24, fd00:243::1/64
                  a port nd<k> per node (veth to the node's ext0)

Pod-to-pod across nodes is plain routing, no CNI, no tunnel: node k routes
node j's pod CIDR via node j's ext0 address (as flannel's host-gw does) and
forwards; the router routes each pod CIDR to its node and the service
ranges (SERVICE_RANGES) over ECMP to every node, hashing on L4 ports
(fib_multipath_hash_policy=1), so flows from one client spread over the
nodes. A one-node lab is exactly what it always was: no router, no ext0,
pods in the lab cgroup.

The demo, the tests and the benchmarks all use it. Nothing here touches the
host's interfaces or root cgroup: the bridges live in the lab's own
namespaces, and meshbpf attaches to the lab's cgroups only.
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
# Several nodes: their shared segment, the router's bridge on it, the nodes'
# device on it, and what the router sends to every node over ECMP:
# ClusterIPs and a LoadBalancer/external IP range, both families.
NODE_NET4 = ipaddress.ip_network("10.243.0.0/24")
NODE_NET6 = ipaddress.ip_network("fd00:243::/64")
ROUTER_BRIDGE = "mbx0"
NODE_UPLINK = "ext0"
SERVICE_RANGES = tuple(ipaddress.ip_network(n) for n in (
    "10.96.0.0/12", "fd00:96::/108", "10.240.0.0/24", "fd00:240::/64"))
ROUTER = "router"  # popen/run's `node` for the router namespace
MAX_NODES = 8
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
    cgroup: Path | None = None  # its own cgroup; None: its node's (one node: the lab cgroup)
    node: int = 1

    @property
    def namespace(self) -> str:
        return self.name.split("/")[0] if "/" in self.name else "default"

    @property
    def pod_name(self) -> str:
        return self.name.split("/")[-1]

    @property
    def ipv4(self) -> ipaddress.IPv4Address:
        return pod_subnet4(self.node).network_address + self.index

    @property
    def ipv6(self) -> ipaddress.IPv6Address:
        return pod_subnet6(self.node).network_address + self.index


def pod_subnet4(node: int) -> ipaddress.IPv4Network:
    """Node k's pod CIDR: 10.244.<k-1>.0/24 (node 1: SUBNET4, as always)."""
    return ipaddress.ip_network(f"10.244.{node - 1}.0/24")


def pod_subnet6(node: int) -> ipaddress.IPv6Network:
    return ipaddress.ip_network(f"fd00:244:0:{node - 1:x}::/64")


@dataclass(frozen=True)
class Node:
    index: int    # 1, 2, ...
    netns: str
    cgroup: Path  # its processes and pods' cgroups are here or below

    @property
    def name(self) -> str:
        return f"node{self.index}"

    @property
    def subnet4(self) -> ipaddress.IPv4Network:
        return pod_subnet4(self.index)

    @property
    def subnet6(self) -> ipaddress.IPv6Network:
        return pod_subnet6(self.index)

    @property
    def ext_ipv4(self) -> ipaddress.IPv4Address:
        """Its address on the nodes' segment (several-node labs only)."""
        return NODE_NET4.network_address + 10 + self.index

    @property
    def ext_ipv6(self) -> ipaddress.IPv6Address:
        return NODE_NET6.network_address + int(str(10 + self.index), 16)  # ::11 as .11


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
        self.router_ns = f"{NETNS_PREFIX}{name}-router"
        self.cgroup = cgroup2_mount() / f"{CGROUP_PREFIX}{name}"
        self.pods: dict[str, Pod] = {}
        self.node_count = 1
        self._pauses: list[subprocess.Popen] = []

    # --- lifecycle -----------------------------------------------------------
    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def exists(self) -> bool:
        return self.node_ns in netns.listnetns()

    @property
    def nodes(self) -> list[Node]:
        return [self.node(k) for k in range(1, self.node_count + 1)]

    def node(self, index: int) -> Node:
        """Node 1 is the one-node lab's node; several nodes each get a cgroup."""
        if not 1 <= index <= self.node_count:
            raise LabError(f"lab {self.name!r} has no node {index} (nodes: 1..{self.node_count})")
        ns = self.node_ns if index == 1 else f"{self.node_ns}{index}"
        cgroup = self.cgroup if self.node_count == 1 else self.cgroup / f"node{index}"
        return Node(index, ns, cgroup)

    def up(self, *pods_per_node: list[str], nodes: int | None = None) -> "Lab":
        """up(["a", "b"]): one node, as always; up(["a"], ["b"]): pod a on
        node 1, b on node 2; nodes=N for nodes beyond the lists (empty)."""
        count = nodes if nodes is not None else max(1, len(pods_per_node))
        if not 1 <= count <= MAX_NODES or len(pods_per_node) > count:
            raise LabError(f"lab {self.name!r}: {count} nodes with pods for {len(pods_per_node)}: "
                           f"use 1..{MAX_NODES} nodes and at most one pod list per node")
        if self.exists():
            raise LabError(f"lab {self.name!r} already exists; `meshbpf lab down {self.name}` first")
        self.node_count = count
        try:
            self.cgroup.mkdir(exist_ok=True)
            for node in self.nodes:
                self._make_node(node)
            if count > 1:
                self._make_router()
            for index, pods in enumerate(pods_per_node, 1):
                for name in pods:
                    self.add_pod(name, node=index)
        except Exception:
            self.down()
            raise
        return self

    def _make_node(self, node: Node) -> None:
        node.cgroup.mkdir(exist_ok=True)
        netns.create(node.netns)
        _sysctl_ns(node.netns, {"net.ipv6.conf.all.accept_dad": "0",
                                "net.ipv6.conf.default.accept_dad": "0"})
        with IPRoute(netns=node.netns) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            ipr.link("add", ifname=BRIDGE, kind="bridge")
            br = ipr.link_lookup(ifname=BRIDGE)[0]
            ipr.addr("add", index=br, address=str(node.subnet4.network_address + 1), prefixlen=24)
            ipr.addr("add", index=br, address=str(node.subnet6.network_address + 1), prefixlen=64,
                     flags=IFA_F_NODAD)
            ipr.link("set", index=br, state="up")

    def _make_router(self) -> None:
        """The router/client namespace, the nodes' segment and the routes."""
        netns.create(self.router_ns)
        _sysctl_ns(self.router_ns, {"net.ipv6.conf.all.accept_dad": "0",
                                    "net.ipv6.conf.default.accept_dad": "0",
                                    "net.ipv4.fib_multipath_hash_policy": "1",
                                    "net.ipv6.fib_multipath_hash_policy": "1"})
        gw4, gw6 = NODE_NET4.network_address + 1, NODE_NET6.network_address + 1
        with IPRoute(netns=self.router_ns) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            ipr.link("add", ifname=ROUTER_BRIDGE, kind="bridge")
            br = ipr.link_lookup(ifname=ROUTER_BRIDGE)[0]
            ipr.addr("add", index=br, address=str(gw4), prefixlen=NODE_NET4.prefixlen)
            ipr.addr("add", index=br, address=str(gw6), prefixlen=NODE_NET6.prefixlen, flags=IFA_F_NODAD)
            ipr.link("set", index=br, state="up")
            for node in self.nodes:
                self._link_node(ipr, br, node)
            for node in self.nodes:
                ipr.route("add", dst=str(node.subnet4), gateway=str(node.ext_ipv4))
                ipr.route("add", dst=str(node.subnet6), gateway=str(node.ext_ipv6), family=10)
            for net in SERVICE_RANGES:
                hops = [{"gateway": str(n.ext_ipv4 if net.version == 4 else n.ext_ipv6)}
                        for n in self.nodes]
                ipr.route("add", dst=str(net), multipath=hops, family=2 if net.version == 4 else 10)

    def _link_node(self, router: IPRoute, bridge: int, node: Node) -> None:
        """Node's ext0 on the router's bridge; its routes: the other nodes'
        pod CIDRs via their ext0, the rest via the router."""
        port = f"nd{node.index}"
        router.link("add", ifname=port, kind="veth", peer={"ifname": NODE_UPLINK, "net_ns_fd": node.netns})
        router.link("set", index=router.link_lookup(ifname=port)[0], master=bridge, state="up")
        _sysctl_ns(node.netns, {"net.ipv4.ip_forward": "1", "net.ipv6.conf.all.forwarding": "1"})
        with IPRoute(netns=node.netns) as ipr:
            ext = ipr.link_lookup(ifname=NODE_UPLINK)[0]
            ipr.addr("add", index=ext, address=str(node.ext_ipv4), prefixlen=NODE_NET4.prefixlen)
            ipr.addr("add", index=ext, address=str(node.ext_ipv6), prefixlen=NODE_NET6.prefixlen,
                     flags=IFA_F_NODAD)
            ipr.link("set", index=ext, state="up")
            ipr.route("add", dst="default", gateway=str(NODE_NET4.network_address + 1))
            ipr.route("add", dst="default", gateway=str(NODE_NET6.network_address + 1), family=10)
            for other in self.nodes:
                if other != node:
                    ipr.route("add", dst=str(other.subnet4), gateway=str(other.ext_ipv4))
                    ipr.route("add", dst=str(other.subnet6), gateway=str(other.ext_ipv6), family=10)

    def _pod(self, name: str, index: int, node: int = 1) -> Pod:
        namespace, pod_name = parse_pod(name)
        uid = pod_uid(self.name, namespace or "default", pod_name)
        if namespace is None:
            return Pod(name, f"{NETNS_PREFIX}{self.name}-{name}", index, uid, node=node)
        return Pod(name, f"{NETNS_PREFIX}{self.name}-{namespace}.{pod_name}", index, uid,
                   kubelet_cgroup(self.node(node).cgroup, uid), node)

    def add_pod(self, name: str, node: int = 1) -> Pod:
        if name in self.pods:
            raise LabError(f"pod {name!r} exists")
        host = self.node(node)
        index = sum(1 for p in self.pods.values() if p.node == node) + 2  # .1 is the bridge
        if index > 250:
            raise LabError("a lab node holds at most 249 pods")
        pod = self._pod(name, index, node)
        if self.node_count > 1 and pod.netns in {n.netns for n in self.nodes} | {self.router_ns}:
            raise LabError(f"pod name {name!r}: taken by the lab's own {pod.netns} namespace")
        if pod.cgroup is not None:
            pod.cgroup.mkdir(parents=True, exist_ok=True)
        netns.create(pod.netns)
        _sysctl_ns(pod.netns, {"net.ipv6.conf.all.accept_dad": "0",
                               "net.ipv6.conf.default.accept_dad": "0"})
        host_if = f"mv{index}"
        with IPRoute(netns=host.netns) as ipr:
            ipr.link("add", ifname=host_if, kind="veth", peer={"ifname": "eth0", "net_ns_fd": pod.netns})
            idx = ipr.link_lookup(ifname=host_if)[0]
            ipr.link("set", index=idx, master=ipr.link_lookup(ifname=BRIDGE)[0], state="up")
        with IPRoute(netns=pod.netns) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            eth = ipr.link_lookup(ifname="eth0")[0]
            ipr.addr("add", index=eth, address=str(pod.ipv4), prefixlen=24)
            ipr.addr("add", index=eth, address=str(pod.ipv6), prefixlen=64, flags=IFA_F_NODAD)
            ipr.link("set", index=eth, state="up")
            ipr.route("add", dst="default", gateway=str(host.subnet4.network_address + 1))
            ipr.route("add", dst="default", gateway=str(host.subnet6.network_address + 1), family=10)
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
        """Kill the lab's processes, delete its namespaces and its cgroups."""
        _kill_cgroup(self.cgroup)
        for proc in self._pauses:
            proc.kill()  # killed with the cgroup already, unless cgroup.kill is missing
            proc.wait(timeout=10)
        self._pauses.clear()
        for ns in netns.listnetns():
            if ns.startswith(f"{NETNS_PREFIX}{self.name}-"):
                netns.remove(ns)
        if self.cgroup.exists():
            # Nodes' and pods' own cgroups first: a cgroup with children cannot go.
            for cg in sorted(self.cgroup.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                if cg.is_dir():
                    _rmdir_cgroup(cg)
            _rmdir_cgroup(self.cgroup)
        self.pods.clear()

    @classmethod
    def attach(cls, name: str) -> "Lab":
        """The lab of that name as another process made it."""
        lab = cls(name)
        namespaces = set(netns.listnetns())
        if lab.node_ns not in namespaces:
            raise LabError(f"no lab named {name!r} (`meshbpf lab up {name}` makes one)")
        if lab.router_ns in namespaces:
            lab.node_count = max(k for k in range(1, MAX_NODES + 1)
                                 if k == 1 or f"{lab.node_ns}{k}" in namespaces)
        infra = {n.netns for n in lab.nodes} | ({lab.router_ns} if lab.node_count > 1 else set())
        prefix = f"{NETNS_PREFIX}{name}-"
        for ns in sorted(namespaces):
            if ns.startswith(prefix) and ns not in infra:
                with IPRoute(netns=ns) as ipr:
                    addrs = [a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(family=2, label="eth0")]
                if addrs:
                    offset = int(ipaddress.ip_address(addrs[0])) - int(SUBNET4.network_address)
                    pod = ns[len(prefix):].replace(".", "/", 1)  # bare names hold no dot
                    lab.pods[pod] = lab._pod(pod, offset & 0xFF, (offset >> 8) + 1)
        return lab

    # --- processes -----------------------------------------------------------
    def _preexec(self, pod: str | None, in_cgroup: bool, node: int | str):
        if pod:
            ns = self.pods[pod].netns
            cgroup = self.pods[pod].cgroup or self.node(self.pods[pod].node).cgroup
        elif node == ROUTER:
            if self.node_count == 1:
                raise LabError(f"lab {self.name!r} has one node and no router")
            ns, cgroup = self.router_ns, self.cgroup
        else:
            ns, cgroup = self.node(node).netns, self.node(node).cgroup
        procs = cgroup / "cgroup.procs"

        def enter() -> None:
            # Join the cgroup first, then the namespace: setns(2) keeps this
            # process's view of /sys, unlike `ip netns exec`, which remounts it.
            if in_cgroup:
                with open(procs, "w") as f:
                    f.write("0")
            _setns(ns)
        return enter

    def popen(self, pod: str | None, argv: list[str], *, in_cgroup: bool = True,
              node: int | str = 1, **kwargs) -> subprocess.Popen:
        """Start argv in a pod (None: the namespace of `node`, a number or
        ROUTER), in its cgroup (the router: the lab cgroup)."""
        return subprocess.Popen(argv, preexec_fn=self._preexec(pod, in_cgroup, node), **kwargs)

    def run(self, pod: str | None, argv: list[str], *, in_cgroup: bool = True,
            check: bool = False, timeout: float = 60, node: int | str = 1,
            **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(argv, preexec_fn=self._preexec(pod, in_cgroup, node), check=check,
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
