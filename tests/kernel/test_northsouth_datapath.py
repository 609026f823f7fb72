"""The north-south datapath with real traffic in the 2-node lab: the tc
programs on each node's ext0 (NorthSouthDatapath.load in the node's
netns), a NorthSouthState written by hand, clients in the router
namespace. A NodePort answered by a pod on the other node (SNAT: the
backend sees the node), by a pod on the receiving node (the backend sees
the client), both nodes agreeing on the backend of a flow, and REJECT
(RST / ICMP unreachable) for a frontend without endpoints."""

from __future__ import annotations

import ipaddress
import subprocess
import sys
from array import array

import pytest

from meshbpf.datapath.loader import uninstall
from meshbpf.datapath.northsouth import (XDP_FLAGS_DRV_MODE, NorthSouthDatapath, attached, detach_xdp,
                                         xdp_program)
from meshbpf.lab.netlab import NODE_UPLINK, ROUTER, Lab
from meshbpf.datapath.policy import _ipr
from meshbpf.lab.workloads import wait_listening
from meshbpf.reconcile.northsouth_keys import (BE_LOCAL, F_NODEPORT, NsBackend, NsCfg, NsKey,
                                               NsStep, NsSvc, wildcard)

from .conftest import BPFFS_ROOT, LAB_PREFIX, PIN_PREFIX, _names

M = 251                     # a small prime table: quick to write
NODE_PORT, EMPTY_PORT, EXT_PORT, BE_PORT = 30080, 30081, 80, 8080
EXT4, EXT6 = "10.240.0.7", "fd00:240::7"
WEB1, WEB2 = 1, 2           # backend ids (web-1 on node1, web-2 on node2)

# Answers each TCP connection and UDP datagram with "<name> <peer address>".
ECHO = r"""
import socket, sys, threading
name = sys.argv[1]
def peer(a):
    return a[0][7:] if a[0].startswith("::ffff:") else a[0]
def sock(kind):
    s = socket.socket(socket.AF_INET6, kind)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::", int(sys.argv[2])))
    return s
def udp():
    s = sock(socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IP, 12, 1)     # IP_RECVTTL
    s.setsockopt(socket.IPPROTO_IPV6, 51, 1)   # IPV6_RECVHOPLIMIT
    while True:
        data, anc, _, a = s.recvmsg(100, 256)
        hops = [int.from_bytes(d[:4], sys.byteorder) for _, kind, d in anc if kind in (2, 52)]
        extra = f" {hops[0]}" if data == b"ttl" and hops else ""   # IP_TTL, IPV6_HOPLIMIT
        s.sendto(f"{name} {peer(a)}{extra}".encode(), a)
threading.Thread(target=udp, daemon=True).start()
t = sock(socket.SOCK_STREAM)
t.listen(64)
while True:
    c, a = t.accept()
    c.sendall(f"{name} {peer(a)}".encode())
    c.close()
"""

# One exchange with host:port from a fixed (or any) source port: the answer,
# REFUSED (RST / ICMP unreachable) or TIMEOUT.
CLIENT = r"""
import socket, sys
host, port, proto, sport = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
payload = sys.argv[5].encode() if len(sys.argv) > 5 else b"hi"
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
for attempt in range(3 if proto == "udp" else 1):
    s = socket.socket(fam, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.settimeout(10 if proto == "tcp" else 4)
    if sport:
        s.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", sport))
    try:
        s.connect((host, port))
        if proto == "udp":
            s.send(payload)
        print(s.recv(200).decode())
        break
    except ConnectionRefusedError:
        print("REFUSED")
        break
    except (socket.timeout, TimeoutError):
        if attempt == (2 if proto == "udp" else 0):
            print("TIMEOUT")
    finally:
        s.close()
"""

# A NodePort in these tests' frontends: program() keys it by the family's wildcard.
NODEPORT = b"nodeport"


def _of_family(key: NsKey, fam: int) -> NsKey:
    return key._replace(addr=wildcard(fam)) if key.addr == NODEPORT else key


def a16(ip) -> bytes:
    addr = ipaddress.ip_address(str(ip))
    return (b"\0" * 10 + b"\xff\xff" + addr.packed) if addr.version == 4 else addr.packed


class NsLab:
    """The lab, both nodes' datapaths, and the state each node holds."""

    def __init__(self, lab: Lab):
        self.lab = lab
        self.dps: list[NorthSouthDatapath] = []
        self.pins = []

    def load(self) -> None:
        for node in self.lab.nodes:
            pin = BPFFS_ROOT / f"{PIN_PREFIX}{next(_names)}"
            self.pins.append(pin)
            self.dps.append(NorthSouthDatapath.load(
                pin, [NODE_UPLINK], netns=node.netns, table_size=M, mode="tc",
                map_sizes={"mbpf_maglev": 4, "mbpf_ns_ct": 4096}))

    def close(self) -> None:
        for dp in self.dps:
            try:
                dp.detach()
            finally:
                dp.bpf = None
        for pin in self.pins:
            if pin.exists():
                uninstall(pin)

    def program(self, frontends: dict[NsKey, tuple[int, list[int]]], fam: int = 4) -> None:
        """The same frontends and tables on both nodes ({key: (table, backend
        ids)}); each node marks its own pod's backend local."""
        for node, dp in zip(self.lab.nodes, self.dps):
            pods = {WEB1: self.lab.pods["web-1"], WEB2: self.lab.pods["web-2"]}
            backends = {bid: NsBackend(a16(getattr(p, "ipv6" if fam == 6 else "ipv4")), BE_PORT,
                                       BE_LOCAL if p.node == node.index else 0)
                        for bid, p in pods.items()}
            tables = {t: array("I", [ids[i % len(ids)] for i in range(M)] if ids else [0] * M)
                      for t, ids in frontends.values()}
            svcs = {_of_family(k, fam): NsSvc(t, len(set(ids)), 0, F_NODEPORT if k.addr == NODEPORT else 0)
                    for k, (t, ids) in frontends.items()}
            dp.maps.apply([
                NsStep("backends", "update", backends),
                NsStep("tables", "update", tables),
                NsStep("frontends", "update", svcs),
                NsStep("node_addrs", "update", {a16(node.ext_ipv4): 1, a16(node.ext_ipv6): 1}),
                NsStep("cfg", "update", {0: NsCfg(a16(node.ext_ipv4), a16(node.ext_ipv6), 1)}),
            ])

    def ask(self, host: str, port: int, proto: str = "tcp", sport: int = 0, payload: str = "hi") -> str:
        out = self.lab.run(None, [sys.executable, "-c", CLIENT, host, str(port), proto, str(sport), payload],
                           node=ROUTER, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()


@pytest.fixture(scope="module")
def ns():
    with Lab(f"{LAB_PREFIX}{next(_names)}") as lab:
        lab.up(["web-1"], ["web-2"])
        for pod in ("web-1", "web-2"):
            lab.popen(pod, [sys.executable, "-c", ECHO, pod, str(BE_PORT)],
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_listening(lab, pod, BE_PORT)
            wait_listening(lab, pod, BE_PORT, "udp")
        the = NsLab(lab)
        try:
            the.load()
            yield the
        finally:
            the.close()
        for node in lab.nodes:
            assert attached(node.netns, NODE_UPLINK) == 0


def node_addr(ns: NsLab, index: int, fam: int) -> str:
    node = ns.lab.nodes[index - 1]
    return str(node.ext_ipv6 if fam == 6 else node.ext_ipv4)


def pod_addr(ns: NsLab, pod: str, fam: int) -> str:
    return str(getattr(ns.lab.pods[pod], "ipv6" if fam == 6 else "ipv4"))


ROUTER4, ROUTER6 = "10.243.0.1", "fd00:243::1"


@pytest.mark.parametrize("fam", [4, 6])
@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_a_nodeport_answered_by_a_pod_on_the_other_node_sees_the_node(ns, fam, proto):
    p = 6 if proto == "tcp" else 17
    ns.program({NsKey(NODEPORT, NODE_PORT, p): (0, [WEB2])}, fam)
    assert ns.ask(node_addr(ns, 1, fam), NODE_PORT, proto) == f"web-2 {node_addr(ns, 1, fam)}"


@pytest.mark.parametrize("fam", [4, 6])
@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_a_nodeport_answered_by_a_local_pod_sees_the_client(ns, fam, proto):
    p = 6 if proto == "tcp" else 17
    ns.program({NsKey(NODEPORT, NODE_PORT, p): (0, [WEB1])}, fam)
    client = ROUTER6 if fam == 6 else ROUTER4
    assert ns.ask(node_addr(ns, 1, fam), NODE_PORT, proto) == f"web-1 {client}"


@pytest.mark.parametrize("fam", [4, 6])
def test_the_path_that_skips_the_stack_takes_its_hop(ns, fam):
    """The router sends with 64 hops: node1 forwards (the program, on the
    path around its stack), node2 forwards: the pod sees 62."""
    ns.program({NsKey(NODEPORT, NODE_PORT, 17): (0, [WEB2])}, fam)
    addr = node_addr(ns, 1, fam)
    assert ns.ask(addr, NODE_PORT, "udp", payload="ttl") == f"web-2 {addr} 62"


@pytest.mark.parametrize("fam", [4, 6])
def test_a_frontend_without_endpoints_refuses_tcp_and_udp(ns, fam):
    """An external IP no node owns: only our RST / ICMP unreachable can
    refuse it (without them the packets would loop to their TTL's end)."""
    ext = EXT6 if fam == 6 else EXT4
    ns.program({NsKey(a16(ext), EMPTY_PORT, 6): (1, []), NsKey(a16(ext), EMPTY_PORT, 17): (2, [])}, fam)
    before = sum(dp.maps.counters()["reject"] for dp in ns.dps)
    assert ns.ask(ext, EMPTY_PORT, "tcp") == "REFUSED"
    assert ns.ask(ext, EMPTY_PORT, "udp") == "REFUSED"
    assert sum(dp.maps.counters()["reject"] for dp in ns.dps) - before == 2


def test_both_nodes_pick_the_same_backend_for_a_flow(ns):
    """An external IP over both pods, the same table on both nodes: the same
    client flow, sent to node1 and then to node2 (the router's route to
    the address pinned to each in turn), lands on the same pod."""
    ns.program({NsKey(a16(EXT4), EXT_PORT, 17): (3, [WEB1, WEB2])})
    seen = {}
    try:
        for index in (1, 2):
            via = node_addr(ns, index, 4)
            ns.lab.run(None, ["ip", "route", "replace", f"{EXT4}/32", "via", via], node=ROUTER, check=True)
            seen[index] = [ns.ask(EXT4, EXT_PORT, "udp", sport).split()[0] for sport in range(42000, 42012)]
    finally:
        ns.lab.run(None, ["ip", "route", "del", f"{EXT4}/32"], node=ROUTER)
    assert seen[1] == seen[2]
    assert set(seen[1]) == {"web-1", "web-2"}   # 12 flows on one pod by chance: 2 in 2^12


@pytest.mark.bounds   # a lifecycle test (one more compile): the host only in CI
def test_a_flow_keeps_its_backend_across_a_reload(ns):
    """A new agent loads the programs again over the same pins: the filters
    are replaced in place and the conntrack kept, so a flow keeps its
    backend although the table now names another."""
    key = NsKey(NODEPORT, NODE_PORT, 17)
    ns.program({key: (0, [WEB2])})
    node1 = node_addr(ns, 1, 4)
    assert ns.ask(node1, NODE_PORT, "udp", 43000).startswith("web-2 ")
    ns.program({key: (0, [WEB1])})
    old = ns.dps[0]
    ns.dps[0] = NorthSouthDatapath.load(old.bpffs, [NODE_UPLINK], netns=old.netns, table_size=M,
                                        mode="tc", map_sizes={"mbpf_maglev": 4, "mbpf_ns_ct": 4096})
    old.maps.close()
    assert attached(old.netns, NODE_UPLINK) == 2
    assert ns.ask(node1, NODE_PORT, "udp", 43000).startswith("web-2 ")   # the same flow
    assert ns.ask(node1, NODE_PORT, "udp", 43001).startswith("web-1 ")   # a new one


def _set_xdp(netns: str, dev: str, fd: int) -> None:
    with _ipr(netns) as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname=dev)[0],
                 xdp={"attrs": [["IFLA_XDP_FD", fd], ["IFLA_XDP_FLAGS", XDP_FLAGS_DRV_MODE]]})


# Turns a device's TX checksum offload on or off (ETHTOOL_STXCSUM; no
# ethtool binary needed).
TX_CSUM = r"""
import ctypes, fcntl, socket, struct, sys
value = ctypes.create_string_buffer(struct.pack("II", 0x17, int(sys.argv[2])))
ifreq = struct.pack("16sP", sys.argv[1].encode(), ctypes.addressof(value)) + bytes(16)
fcntl.ioctl(socket.socket(socket.AF_INET, socket.SOCK_DGRAM), 0x8946, ifreq)
"""


def _checksum_offload(ns, on: bool) -> None:
    """Checksums left to the "hardware" (CHECKSUM_PARTIAL), as veth does by
    default, are never finished for a frame XDP sends on: so what reaches
    an XDP device must carry full checksums (real NICs receive nothing
    else). Senders in the lab: the router (through its ports) and the
    nodes' uplinks."""
    for node, dev in ([(ROUTER, d) for d in ("nd1", "nd2")]
                      + [(n.index, NODE_UPLINK) for n in ns.lab.nodes]):
        ns.lab.run(None, [sys.executable, "-c", TX_CSUM, dev, str(int(on))], node=node, check=True)


@pytest.fixture
def xdp_mode(ns):
    """Both nodes loaded again with mode "xdp" (replacing in place); the
    router's ends of their links get an XDP_PASS program: a veth hands
    XDP_TX frames only to a peer that runs XDP (before 5.13: nothing else)."""
    from bcc import BPF
    peer = BPF(text=b"int mbpf_peer_pass(struct xdp_md *ctx) { return XDP_PASS; }")
    fd = peer.load_func(b"mbpf_peer_pass", BPF.XDP).fd
    ports = [f"nd{node.index}" for node in ns.lab.nodes]
    try:
        for port in ports:
            _set_xdp(ns.lab.router_ns, port, fd)
        _checksum_offload(ns, False)
        for i, old in enumerate(list(ns.dps)):
            ns.dps[i] = NorthSouthDatapath.load(old.bpffs, [NODE_UPLINK], netns=old.netns, table_size=M,
                                                mode="xdp", map_sizes={"mbpf_maglev": 4, "mbpf_ns_ct": 4096})
            old.maps.close()
        yield
    finally:
        for node in ns.lab.nodes:
            detach_xdp(node.netns, NODE_UPLINK)
        for port in ports:
            _set_xdp(ns.lab.router_ns, port, -1)
        _checksum_offload(ns, True)


@pytest.mark.parametrize("fam", [4, 6])
def test_xdp_mode_serves_the_same_traffic_forwarding_on_its_own(ns, xdp_mode, fam):
    node1 = ns.lab.nodes[0]
    assert [dp.mode for dp in ns.dps] == ["xdp", "xdp"]
    assert xdp_program(node1.netns, NODE_UPLINK) == "mbpf_ns_xdp"
    assert attached(node1.netns, NODE_UPLINK) == 2   # tc stays: egress, and what XDP passes
    ns.program({NsKey(NODEPORT, NODE_PORT, 6): (0, [WEB2]), NsKey(NODEPORT, NODE_PORT, 17): (1, [WEB1])}, fam)
    before = ns.dps[0].maps.counters()
    addr = node_addr(ns, 1, fam)
    for _ in range(3):
        assert ns.ask(addr, NODE_PORT, "tcp") == f"web-2 {addr}"
    assert ns.ask(addr, NODE_PORT, "udp") == f"web-1 {ROUTER6 if fam == 6 else ROUTER4}"
    ns.program({NsKey(NODEPORT, NODE_PORT, 17): (1, [WEB2])}, fam)
    assert ns.ask(addr, NODE_PORT, "udp", sport=44000 + fam, payload="ttl") == f"web-2 {addr} 62"
    after = ns.dps[0].maps.counters()
    assert after["xdp_forwarded"] > before["xdp_forwarded"]   # XDP_TX'd by node1 itself


@pytest.mark.bounds   # one more compile for a choice made in Python
def test_auto_mode_keeps_veth_devices_on_tc(ns):
    old = ns.dps[0]
    ns.dps[0] = NorthSouthDatapath.load(old.bpffs, [NODE_UPLINK], netns=old.netns, table_size=M,
                                        mode="auto", map_sizes={"mbpf_maglev": 4, "mbpf_ns_ct": 4096})
    old.maps.close()
    assert ns.dps[0].mode == "tc"
    assert xdp_program(old.netns, NODE_UPLINK) == ""
    assert attached(old.netns, NODE_UPLINK) == 2


def test_uninstall_removes_the_filters_with_the_pins(ns):
    """(Last in the module: node1's datapath is gone afterwards.)"""
    node1 = ns.lab.nodes[0]
    assert attached(node1.netns, NODE_UPLINK) == 2
    removed = uninstall(ns.pins[0])
    assert f"tc filters mbpf_ns_* on {NODE_UPLINK} in netns {node1.netns}" in removed
    assert attached(node1.netns, NODE_UPLINK) == 0
    assert attached(ns.lab.nodes[1].netns, NODE_UPLINK) == 2   # the other node's are not ours to take
    assert not ns.pins[0].exists()
