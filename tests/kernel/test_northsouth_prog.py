"""The north-south tc programs (bpf/nodeport.c), run by the kernel on
scapy-built packets (BPF_PROG_TEST_RUN) against maps written with
NorthSouthMaps.apply: translation of each frontend kind, conntrack reuse,
SNAT ports, reverse NAT in both directions, REJECT for no endpoints,
source ranges, misses, IPv4 and IPv6, checksums."""

from __future__ import annotations

import ipaddress
import socket
import struct
import time
from array import array

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, UDPerror
from scapy.layers.inet6 import ICMPv6DestUnreach, ICMPv6PacketTooBig, IPerror6, IPv6
from scapy.layers.l2 import Ether

from meshbpf.datapath import libbpf
from meshbpf.datapath.northsouth import CT_F_FIN, NorthSouthDatapath
from meshbpf.reconcile.northsouth_keys import (BE_LOCAL, DEFAULT_SNAT_PORTS, F_LOCAL, F_NODEPORT, wildcard,
                                               NorthSouthState, NsBackend, NsCfg, NsKey, NsSrcKey, NsStep,
                                               NsSvc, flow_hash, snat_port_tries)

from .conftest import BPFFS_ROOT, PIN_PREFIX, _names

PASS, DROP, REDIRECT = -1, 2, 7   # TC_ACT_UNSPEC, TC_ACT_SHOT, TC_ACT_REDIRECT
M = 13                           # a small Maglev table: rows are written whole
TCP_, UDP_ = 6, 17
CLIENT_MAC, NODE_MAC = "02:00:00:00:00:01", "02:00:00:00:00:02"

FAMILIES = {
    4: dict(node="10.243.0.11", client="10.243.0.1", far="10.99.0.1", ext="10.240.0.7",
            cip="10.96.0.10", local="10.244.0.5", remote="10.244.1.5", remote2="10.244.1.6"),
    6: dict(node="fd00:243::11", client="fd00:243::1", far="fd00:99::1", ext="fd00:240::7",
            cip="fd00:96::10", local="fd00:244::5", remote="fd00:244:0:1::5",
            remote2="fd00:244:0:1::6"),
}
NODE_PORT, SVC_PORT, BE_PORT = 30080, 80, 8080
LOCAL_BE, REMOTE_BE, REMOTE_BE2 = 1, 2, 3


def a16(ip: str) -> bytes:
    addr = ipaddress.ip_address(ip)
    return (b"\0" * 10 + b"\xff\xff" + addr.packed) if addr.version == 4 else addr.packed


@pytest.fixture(scope="module")
def dp():
    """One compile for the module, attached nowhere; pins under this run's prefix."""
    bpffs = BPFFS_ROOT / f"{PIN_PREFIX}{next(_names)}"
    datapath = None
    try:
        datapath = NorthSouthDatapath.load(bpffs, [], table_size=M, mode="tc",
                                           map_sizes={"mbpf_maglev": 8, "mbpf_ns_ct": 1024})
        yield datapath
    finally:
        from meshbpf.datapath.loader import uninstall
        if datapath:
            datapath.detach()
            datapath.bpf = None
        if bpffs.exists():
            uninstall(bpffs)


@pytest.fixture
def maps(dp):
    """Empty maps (conntrack too), translation enabled, before each test."""
    m = dp.maps
    old = m.read()
    m.apply([NsStep("frontends", "delete", {k: None for k in old.frontends}),
             NsStep("tables", "delete", {t: None for t in range(8)}),
             NsStep("backends", "delete", {k: None for k in old.backends}),
             NsStep("sources", "delete", {k: None for k in old.sources}),
             NsStep("node_addrs", "delete", {k: None for k in old.node_addrs})])
    m.clear_conntrack()
    f4, f6 = FAMILIES[4], FAMILIES[6]
    m.apply([NsStep("node_addrs", "update", {a16(f4["node"]): 1, a16(f6["node"]): 1}),
             NsStep("cfg", "update", {0: NsCfg(a16(f4["node"]), a16(f6["node"]), 1)}),
             NsStep("backends", "update", {
                 n: NsBackend(a16(FAMILIES[fam][name]), BE_PORT, BE_LOCAL if name == "local" else 0)
                 for fam in (4, 6)
                 for n, name in ((LOCAL_BE + 10 * (fam == 6), "local"),
                                 (REMOTE_BE + 10 * (fam == 6), "remote"),
                                 (REMOTE_BE2 + 10 * (fam == 6), "remote2"))})])
    return m


def be_id(fam: int, n: int) -> int:
    return n + (10 if fam == 6 else 0)


def frontend(maps, key: NsKey, backends: list[int], table: int = 0, flags: int = 0, src_id: int = 0):
    """A frontend whose table cycles over backends (count 0: an empty table)."""
    row = array("I", [backends[i % len(backends)] for i in range(M)] if backends else [0] * M)
    maps.apply([NsStep("tables", "update", {table: row}),
                NsStep("frontends", "update", {key: NsSvc(table, len(set(backends)), src_id, flags)})])


def snat_tries(client: str, dst: str, sport: int, dport: int, proto: int = TCP_,
               ports: tuple[int, int] = DEFAULT_SNAT_PORTS) -> list[int]:
    """The SNAT ports a new flow tries, in order (the datapath's choice, mirrored)."""
    return snat_port_tries(flow_hash(a16(client), a16(dst), sport, dport, proto), ports)


def nodeport(fam: int, proto: int = TCP_) -> NsKey:
    return NsKey(wildcard(fam), NODE_PORT, proto)


def pkt(fam: int, src: str, dst: str, sport: int, dport: int, proto: int = TCP_, flags: str = "S",
        payload: bytes = b""):
    ip = IPv6(src=src, dst=dst) if fam == 6 else IP(src=src, dst=dst)
    l4 = TCP(sport=sport, dport=dport, flags=flags, seq=1000) if proto == TCP_ else UDP(sport=sport, dport=dport)
    return Ether(src=CLIENT_MAC, dst=NODE_MAC) / ip / l4 / payload


def run(dp, prog: str, packet) -> tuple[int, Ether]:
    rc, out = libbpf.prog_test_run_skb_out(dp.prog_fd(prog), bytes(packet), ifindex=1)
    return rc, Ether(out)


XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = 1, 2, 3, 4
PATH = "tc"


@pytest.fixture(autouse=True, params=["tc", "xdp"])
def path(request):
    """Every test on both ingress paths: tc alone, and XDP in front of tc
    (what XDP passes, tc gets as XDP left it, as in the kernel)."""
    global PATH
    PATH = request.param
    yield PATH
    PATH = "tc"


def ingress(dp, packet):
    if PATH == "tc":
        return run(dp, "mbpf_ns_ingress", packet)
    rc, out = libbpf.prog_test_run_xdp_out(dp.prog_fd("mbpf_ns_xdp"), bytes(packet))
    if rc == XDP_PASS:
        return run(dp, "mbpf_ns_ingress", out)
    assert rc in (XDP_DROP, XDP_TX, XDP_REDIRECT), f"XDP verdict {rc}"
    return (DROP if rc == XDP_DROP else REDIRECT), Ether(out)


def egress(dp, packet):
    return run(dp, "mbpf_ns_egress", packet)


def l3(p: Ether):
    return p[IPv6] if IPv6 in p else p[IP]


def hops(p: Ether) -> int:
    return p[IPv6].hlim if IPv6 in p else p[IP].ttl


def assert_one_hop_less_if_sent_on(rc: int, p: Ether) -> None:
    """Forwarded by the program itself (the stack skipped): it takes the hop."""
    assert hops(p) == (63 if rc == REDIRECT else 64), (rc, hops(p))


def l4(p: Ether):
    return p[TCP] if TCP in p else p[UDP]


def assert_checksums_valid(p: Ether) -> None:
    """scapy recomputes every checksum it is told to forget: they must agree."""
    again = p.copy()
    for layer, field in ((IP, "chksum"), (TCP, "chksum"), (UDP, "chksum"), (ICMP, "chksum"),
                         (ICMPv6DestUnreach, "cksum")):
        if layer in again and not isinstance(again[layer].underlayer, (IPerror, UDPerror)):
            setattr(again[layer], field, None)
    rebuilt = Ether(bytes(again))
    for layer, field in ((IP, "chksum"), (TCP, "chksum"), (UDP, "chksum"), (ICMP, "chksum"),
                         (ICMPv6DestUnreach, "cksum")):
        if layer in p:
            assert getattr(p[layer], field) == getattr(rebuilt[layer], field), (layer.__name__, p.show2(dump=True))


def counted(maps, before) -> dict[str, int]:
    now = maps.counters()
    return {k: now[k] - before[k] for k in now if now[k] != before[k]}


FAMS = pytest.mark.parametrize("fam", [4, 6])


@FAMS
@pytest.mark.parametrize("kind", ["nodeport", "external", "clusterip"])
@pytest.mark.parametrize("proto", [TCP_, UDP_])
def test_each_frontend_kind_is_translated_to_a_local_backend(dp, maps, fam, kind, proto):
    f = FAMILIES[fam]
    dst, port, key = {
        "nodeport": (f["node"], NODE_PORT, NsKey(wildcard(fam), NODE_PORT, proto)),
        "external": (f["ext"], SVC_PORT, NsKey(a16(f["ext"]), SVC_PORT, proto)),
        "clusterip": (f["cip"], SVC_PORT, NsKey(a16(f["cip"]), SVC_PORT, proto)),
    }[kind]
    frontend(maps, key, [be_id(fam, LOCAL_BE)], flags=F_NODEPORT if kind == "nodeport" else 0)
    before = maps.counters()
    rc, out = ingress(dp, pkt(fam, f["client"], dst, 40000, port, proto, payload=b"hello"))
    assert rc == PASS
    assert (l3(out).src, l3(out).dst) == (f["client"], f["local"])   # the client's address is kept
    assert (l4(out).sport, l4(out).dport) == (40000, BE_PORT)
    assert bytes(l4(out).payload) == b"hello"
    assert_checksums_valid(out)
    assert counted(maps, before) == {"new": 1}
    assert len(maps.conntrack()) == 2   # the flow and its reply


@FAMS
def test_a_remote_backend_is_snated_to_the_node_on_a_port_of_the_snat_range(dp, maps, fam):
    f = FAMILIES[fam]
    frontend(maps, nodeport(fam, UDP_), [be_id(fam, REMOTE_BE)], flags=F_NODEPORT)
    before = maps.counters()
    rc, out = ingress(dp, pkt(fam, f["client"], f["node"], 40001, NODE_PORT, UDP_, payload=b"x" * 3))
    assert rc in (PASS, REDIRECT)   # forwarded by the node's routes (the host's, here)
    assert (l3(out).src, l3(out).dst) == (f["node"], f["remote"])
    # never the client's port: the first of its tries in 61000..65535 (cfg 0..0: the default)
    port = snat_tries(f["client"], f["node"], 40001, NODE_PORT, UDP_)[0]
    assert 61000 <= port <= 65535
    assert (l4(out).sport, l4(out).dport) == (port, BE_PORT)
    assert_one_hop_less_if_sent_on(rc, out)
    assert_checksums_valid(out)
    # (XDP without the route or neighbour at hand passes the flow to tc:
    # tracked as new there, translated as established here)
    assert counted(maps, before) in ({"new": 1, "snat": 1},
                                     {"new": 1, "snat": 1, "established": int(PATH == "xdp")})


@FAMS
def test_snat_ports_come_from_the_configured_range(dp, maps, fam):
    f = FAMILIES[fam]
    maps.apply([NsStep("cfg", "update", {0: NsCfg(a16(FAMILIES[4]["node"]), a16(FAMILIES[6]["node"]), 1,
                                                  40100, 40107)})])
    frontend(maps, nodeport(fam), [be_id(fam, REMOTE_BE)], flags=F_NODEPORT)
    for sport in range(50000, 50006):
        _, out = ingress(dp, pkt(fam, f["client"], f["node"], sport, NODE_PORT))
        tries = snat_tries(f["client"], f["node"], sport, NODE_PORT, ports=(40100, 40107))
        assert 40100 <= l4(out).sport <= 40107 and l4(out).sport in tries


def _client_port_colliding(f: dict, first: int, fam: int) -> int:
    """A port of the far client whose first SNAT try is `first`."""
    for sport in range(20000, 60000):
        if snat_tries(f["far"], f["node"], sport, NODE_PORT)[0] == first:
            return sport
    raise AssertionError("no colliding client port")


@FAMS
def test_a_taken_snat_port_is_not_reused(dp, maps, fam):
    """Two flows whose first try is the same port, same backend: the
    second takes its second try, or the replies could not be told apart."""
    f = FAMILIES[fam]
    frontend(maps, nodeport(fam), [be_id(fam, REMOTE_BE)], flags=F_NODEPORT)
    _, first = ingress(dp, pkt(fam, f["client"], f["node"], 40002, NODE_PORT))
    tries = snat_tries(f["client"], f["node"], 40002, NODE_PORT)
    assert l4(first).sport == tries[0]
    other = _client_port_colliding(f, tries[0], fam)
    before = maps.counters()
    _, second = ingress(dp, pkt(fam, f["far"], f["node"], other, NODE_PORT))
    assert l4(second).sport == snat_tries(f["far"], f["node"], other, NODE_PORT)[1]
    assert l3(second).src == f["node"]
    assert counted(maps, before).get("snat_port_retry") == 1
    # each reply goes back to its own client
    for out, client, port in ((first, f["client"], 40002), (second, f["far"], other)):
        _, back = ingress(dp, pkt(fam, f["remote"], f["node"], BE_PORT, l4(out).sport, flags="SA"))
        assert (l3(back).src, l3(back).dst, l4(back).sport, l4(back).dport) == \
            (f["node"], client, NODE_PORT, port)


LOOPBACK = {4: "127.0.0.1", 6: "::1"}


@FAMS
@pytest.mark.parametrize("proto", [TCP_, UDP_])
def test_a_snat_port_a_node_socket_owns_is_skipped(dp, maps, fam, proto):
    """The reply tuple of the first try is a node socket's (a connected TCP
    socket, a bound UDP one: here on loopback, the SNAT address and the
    backend both loopback): the flow takes its second try, the socket keeps
    its packets (bpf_skc_lookup_tcp / bpf_sk_lookup_udp)."""
    f, lo = FAMILIES[fam], LOOPBACK[fam]
    family = socket.AF_INET6 if fam == 6 else socket.AF_INET
    kind = socket.SOCK_STREAM if proto == TCP_ else socket.SOCK_DGRAM
    server = socket.socket(family, kind)
    held = socket.socket(family, kind)
    try:
        server.bind((lo, 0))
        be_port = server.getsockname()[1]
        if proto == TCP_:
            server.listen()
        snat = {4: a16(lo) if fam == 4 else a16(f["node"]), 6: a16(lo) if fam == 6 else a16(FAMILIES[6]["node"])}
        maps.apply([NsStep("cfg", "update", {0: NsCfg(snat[4], snat[6], 1)}),
                    NsStep("backends", "update", {99: NsBackend(a16(lo), be_port, 0)})])
        frontend(maps, nodeport(fam, proto), [99], flags=F_NODEPORT)
        for sport in range(41000, 41100):   # a client port whose first try is free here
            tries = snat_tries(f["client"], f["node"], sport, NODE_PORT, proto)
            try:
                held.bind((lo, tries[0]))
                break
            except OSError:
                continue
        else:
            pytest.skip("no free loopback port among the first tries")
        if proto == TCP_:
            held.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST, no TIME_WAIT
            held.connect((lo, be_port))
        before = maps.counters()
        rc, out = ingress(dp, pkt(fam, f["client"], f["node"], sport, NODE_PORT, proto))
        assert (l3(out).src, l3(out).dst) == (lo, lo)
        assert l4(out).sport == tries[1]
        counts = counted(maps, before)
        assert counts["snat_port_retry"] == 1 and counts["new"] == 1, counts
    finally:
        held.close()
        server.close()


@FAMS
def test_an_established_flow_keeps_its_backend_when_the_table_changes(dp, maps, fam):
    f = FAMILIES[fam]
    key = NsKey(a16(f["ext"]), SVC_PORT, TCP_)
    frontend(maps, key, [be_id(fam, REMOTE_BE)])
    _, out = ingress(dp, pkt(fam, f["client"], f["ext"], 40003, SVC_PORT))
    assert l3(out).dst == f["remote"]
    frontend(maps, key, [be_id(fam, REMOTE_BE2)])
    before = maps.counters()
    _, out = ingress(dp, pkt(fam, f["client"], f["ext"], 40003, SVC_PORT, flags="A"))
    assert l3(out).dst == f["remote"]
    assert counted(maps, before) == {"established": 1}
    _, out = ingress(dp, pkt(fam, f["client"], f["ext"], 40004, SVC_PORT))   # a new flow
    assert l3(out).dst == f["remote2"]


def test_a_flow_whose_backend_is_gone_is_balanced_again(dp, maps):
    f = FAMILIES[4]
    key = NsKey(a16(f["ext"]), SVC_PORT, TCP_)
    frontend(maps, key, [REMOTE_BE])
    ingress(dp, pkt(4, f["client"], f["ext"], 40005, SVC_PORT))
    frontend(maps, key, [REMOTE_BE2])
    maps.apply([NsStep("backends", "delete", {REMOTE_BE: None})])
    _, out = ingress(dp, pkt(4, f["client"], f["ext"], 40005, SVC_PORT, flags="A"))
    assert l3(out).dst == f["remote2"]


def test_a_flow_whose_backend_id_now_names_another_backend_is_balanced_again(dp, maps):
    """The agent gives a freed backend id to the next new backend: a flow to
    the old one must not go on to an address no Service names any more."""
    f = FAMILIES[4]
    key = NsKey(a16(f["ext"]), SVC_PORT, TCP_)
    frontend(maps, key, [REMOTE_BE])
    ingress(dp, pkt(4, f["client"], f["ext"], 40006, SVC_PORT))
    maps.apply([NsStep("backends", "update", {REMOTE_BE: NsBackend(a16(f["remote2"]), BE_PORT, 0)})])
    before = maps.counters()
    _, out = ingress(dp, pkt(4, f["client"], f["ext"], 40006, SVC_PORT, flags="A"))
    assert l3(out).dst == f["remote2"]
    assert "established" not in counted(maps, before)


@FAMS
def test_replies_are_translated_back_on_ingress_and_egress(dp, maps, fam):
    f = FAMILIES[fam]
    frontend(maps, nodeport(fam), [be_id(fam, REMOTE_BE)], flags=F_NODEPORT)
    frontend(maps, NsKey(a16(f["ext"]), SVC_PORT, TCP_), [be_id(fam, LOCAL_BE)], table=1)
    _, sent = ingress(dp, pkt(fam, f["client"], f["node"], 40006, NODE_PORT))
    ingress(dp, pkt(fam, f["client"], f["ext"], 40007, SVC_PORT))
    before = maps.counters()
    # the remote backend's reply comes back to the node (SNAT address and port) on ingress
    rc, out = ingress(dp, pkt(fam, f["remote"], f["node"], BE_PORT, l4(sent).sport, flags="SA"))
    assert rc in (PASS, REDIRECT)
    assert (l3(out).src, l3(out).dst, l4(out).sport, l4(out).dport) == \
        (f["node"], f["client"], NODE_PORT, 40006)
    assert_one_hop_less_if_sent_on(rc, out)
    assert_checksums_valid(out)
    # the local backend's reply leaves through the device (egress)
    rc, out = egress(dp, pkt(fam, f["local"], f["client"], BE_PORT, 40007, flags="SA"))
    assert rc == PASS
    assert (l3(out).src, l3(out).dst, l4(out).sport, l4(out).dport) == \
        (f["ext"], f["client"], SVC_PORT, 40007)
    assert_checksums_valid(out)
    assert counted(maps, before) == {"reply": 2}
    # a local backend's reply is not translated on ingress, nor a remote's on egress
    packet = pkt(fam, f["local"], f["client"], BE_PORT, 40007, flags="A")
    assert ingress(dp, packet) == (PASS, Ether(bytes(packet)))


@FAMS
def test_tcp_to_a_service_without_endpoints_gets_a_reset(dp, maps, fam):
    f = FAMILIES[fam]
    frontend(maps, nodeport(fam), [], flags=F_NODEPORT)
    syn = pkt(fam, f["client"], f["node"], 40008, NODE_PORT)
    syn[TCP].options = [("MSS", 1460), ("NOP", None), ("WScale", 7)]
    before = maps.counters()
    rc, out = ingress(dp, syn)
    assert rc == REDIRECT   # back out of the device it came in on
    assert (out.src, out.dst) == (NODE_MAC, CLIENT_MAC)
    assert (l3(out).src, l3(out).dst) == (f["node"], f["client"])
    assert (out[TCP].sport, out[TCP].dport, str(out[TCP].flags)) == (NODE_PORT, 40008, "RA")
    assert out[TCP].ack == 1001 and len(out[TCP].payload) == 0
    assert_checksums_valid(out)
    assert counted(maps, before) == {"reject": 1}
    assert maps.conntrack() == []


@FAMS
def test_udp_to_a_service_without_endpoints_gets_port_unreachable(dp, maps, fam):
    f = FAMILIES[fam]
    frontend(maps, NsKey(a16(f["ext"]), SVC_PORT, UDP_), [])
    rc, out = ingress(dp, pkt(fam, f["client"], f["ext"], 40009, SVC_PORT, UDP_, payload=b"q" * 40))
    assert rc == REDIRECT
    assert (l3(out).src, l3(out).dst) == (f["ext"], f["client"])
    if fam == 4:
        assert (out[ICMP].type, out[ICMP].code) == (3, 3)
        quoted = out[IPerror]
    else:
        assert (out[ICMPv6DestUnreach].type, out[ICMPv6DestUnreach].code) == (1, 4)
        quoted = out[ICMPv6DestUnreach].payload
    assert (quoted.src, quoted.dst) == (f["client"], f["ext"])
    assert_checksums_valid(out)


def test_a_local_service_without_local_endpoints_drops(dp, maps):
    f = FAMILIES[4]
    frontend(maps, nodeport(4), [], flags=F_NODEPORT | F_LOCAL)
    before = maps.counters()
    assert ingress(dp, pkt(4, f["client"], f["node"], 40010, NODE_PORT))[0] == DROP
    assert counted(maps, before) == {"drop_no_local": 1}


@FAMS
def test_source_ranges_admit_only_their_clients(dp, maps, fam):
    f = FAMILIES[fam]
    net = ipaddress.ip_network(f["client"] + ("/24" if fam == 4 else "/64"), strict=False)
    bits = net.prefixlen + (96 if fam == 4 else 0)
    maps.apply([NsStep("sources", "update", {NsSrcKey(5, a16(str(net.network_address)), bits): 1})])
    frontend(maps, NsKey(a16(f["ext"]), SVC_PORT, TCP_), [be_id(fam, LOCAL_BE)], src_id=5)
    before = maps.counters()
    assert ingress(dp, pkt(fam, f["client"], f["ext"], 40011, SVC_PORT))[0] == PASS
    assert ingress(dp, pkt(fam, f["far"], f["ext"], 40011, SVC_PORT))[0] == DROP
    assert counted(maps, before) == {"new": 1, "drop_source_range": 1}


@FAMS
def test_misses_pass_untouched(dp, maps, fam):
    f = FAMILIES[fam]
    frontend(maps, nodeport(fam), [be_id(fam, LOCAL_BE)], flags=F_NODEPORT)
    before = maps.counters()
    for packet in (
        pkt(fam, f["client"], f["node"], 40012, NODE_PORT + 1),          # no such port
        pkt(fam, f["client"], f["node"], 40012, NODE_PORT, UDP_),        # other protocol
        pkt(fam, f["client"], f["ext"], 40012, NODE_PORT),               # NodePort off a node address
        pkt(fam, f["client"], f["local"], 40012, BE_PORT),               # straight to a pod
    ):
        assert ingress(dp, packet) == (PASS, Ether(bytes(packet)))
    assert counted(maps, before) == {}


def test_disabled_passes_everything(dp, maps):
    f = FAMILIES[4]
    frontend(maps, nodeport(4), [LOCAL_BE], flags=F_NODEPORT)
    maps.apply([NsStep("cfg", "update", {0: NsCfg(a16(f["node"]), bytes(16), 0)})])
    packet = pkt(4, f["client"], f["node"], 40013, NODE_PORT)
    assert ingress(dp, packet) == (PASS, Ether(bytes(packet)))


def test_maps_read_back_what_apply_wrote(dp, maps):
    f = FAMILIES[4]
    frontend(maps, nodeport(4), [LOCAL_BE, REMOTE_BE], table=3, flags=F_NODEPORT)
    state = maps.read()
    assert isinstance(state, NorthSouthState)
    assert state.frontends == {nodeport(4): NsSvc(3, 2, 0, F_NODEPORT)}
    assert list(state.tables) == [3] and list(state.tables[3]) == [LOCAL_BE, REMOTE_BE] * 6 + [LOCAL_BE]
    assert state.backends[LOCAL_BE] == NsBackend(a16(f["local"]), BE_PORT, BE_LOCAL)
    assert state.cfg == NsCfg(a16(f["node"]), a16(FAMILIES[6]["node"]), 1)
    assert a16(f["node"]) in state.node_addrs
    assert maps.table_size == M


def icmp_error(fam: int, src: str, dst: str, quoted, too_big: bool = False):
    """An ICMP error from src to dst quoting the packet `quoted` (IP up)."""
    if fam == 4:
        head = IP(src=src, dst=dst) / ICMP(type=3, code=4 if too_big else 3, nexthopmtu=1400 if too_big else 0)
        inner = IPerror(bytes(quoted))
    else:
        head = IPv6(src=src, dst=dst) / (ICMPv6PacketTooBig(mtu=1280) if too_big else ICMPv6DestUnreach(code=4))
        inner = IPerror6(bytes(quoted))
    return Ether(src=CLIENT_MAC, dst=NODE_MAC) / head / inner


def quoted_of(out: Ether):
    q = out[IPerror] if IPerror in out else out[IPerror6]
    return q.src, q.dst, q.payload.sport, q.payload.dport


def assert_icmp_checksums_valid(out: Ether) -> None:
    again = out.copy()
    icmp = ICMP if ICMP in out else (ICMPv6PacketTooBig if ICMPv6PacketTooBig in out else ICMPv6DestUnreach)
    field = "chksum" if icmp is ICMP else "cksum"
    setattr(again[icmp], field, None)
    if IP in again:
        again[IP].chksum = None
    if IPerror in again:
        again[IPerror].chksum = None
    rebuilt = Ether(bytes(again))
    assert getattr(rebuilt[icmp], field) == getattr(out[icmp], field)
    if IP in out:
        assert rebuilt[IP].chksum == out[IP].chksum
    if IPerror in out:
        assert rebuilt[IPerror].chksum == out[IPerror].chksum


@FAMS
@pytest.mark.parametrize("too_big", [False, True])
def test_icmp_errors_about_a_snated_flow_are_translated_back(dp, maps, fam, too_big):
    """The backend's port unreachable, or a router's fragmentation needed /
    packet too big, about what we sent: the client gets it about what it sent."""
    f = FAMILIES[fam]
    frontend(maps, NsKey(a16(f["ext"]), SVC_PORT, UDP_), [be_id(fam, REMOTE_BE)])
    _, sent = ingress(dp, pkt(fam, f["client"], f["ext"], 40020, SVC_PORT, UDP_, payload=b"z" * 8))
    sender = f["far"] if too_big else f["remote"]   # a router on the way, or the backend itself
    before = maps.counters()
    rc, out = ingress(dp, icmp_error(fam, sender, f["node"], l3(sent), too_big))
    assert rc in (PASS, REDIRECT)
    assert l3(out).dst == f["client"]
    assert l3(out).src == (f["far"] if too_big else f["ext"])
    assert quoted_of(out) == (f["client"], f["ext"], 40020, SVC_PORT)
    assert_icmp_checksums_valid(out)
    assert counted(maps, before) == {"icmp_error": 1}


@FAMS
def test_a_local_backends_icmp_error_leaves_from_the_frontend(dp, maps, fam):
    f = FAMILIES[fam]
    frontend(maps, NsKey(a16(f["ext"]), SVC_PORT, UDP_), [be_id(fam, LOCAL_BE)])
    _, sent = ingress(dp, pkt(fam, f["client"], f["ext"], 40021, SVC_PORT, UDP_, payload=b"z" * 8))
    rc, out = egress(dp, icmp_error(fam, f["local"], f["client"], l3(sent)))
    assert rc == PASS
    assert (l3(out).src, l3(out).dst) == (f["ext"], f["client"])
    assert quoted_of(out) == (f["client"], f["ext"], 40021, SVC_PORT)
    assert_icmp_checksums_valid(out)


def test_icmp_errors_about_unknown_flows_pass_untouched(dp, maps):
    f = FAMILIES[4]
    packet = icmp_error(4, f["remote"], f["node"], IP(src=f["node"], dst=f["remote"]) / UDP(sport=1, dport=2))
    assert ingress(dp, packet) == (PASS, Ether(bytes(packet)))


@pytest.mark.parametrize("path", ["tc"], indirect=True)   # one path: it is about the maps / XDP itself
@pytest.mark.parametrize("snat", [False, True])
def test_garbage_collection_removes_flows_idle_both_ways(dp, maps, snat, path):
    import time
    f = FAMILIES[4]
    frontend(maps, nodeport(4), [REMOTE_BE if snat else LOCAL_BE], flags=F_NODEPORT)
    _, sent = ingress(dp, pkt(4, f["client"], f["node"], 40040, NODE_PORT))
    ingress(dp, pkt(4, f["client"], f["node"], 40041, NODE_PORT))
    assert len(maps.conntrack()) == 4
    time.sleep(0.05)
    mark = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    # flow 40040 answers (its reply direction is fresh), flow 40041 is silent
    if snat:
        ingress(dp, pkt(4, f["remote"], f["node"], BE_PORT, l4(sent).sport, flags="SA"))
    else:
        egress(dp, pkt(4, f["local"], f["client"], BE_PORT, 40040, flags="SA"))
    idle = time.clock_gettime_ns(time.CLOCK_MONOTONIC) - mark + 1
    assert maps.collect_garbage(10**12) == 0
    assert maps.collect_garbage(idle) == 2   # the silent flow, both entries
    left = maps.conntrack()
    ports = {40040, l4(sent).sport}
    assert len(left) == 2 and all(ports & {socket.ntohs(k.sport), socket.ntohs(k.dport)} for k, _ in left)
    assert maps.collect_garbage(0, now_ns=mark + 10**12) == 2


def xdp(dp, packet) -> tuple[int, Ether]:
    rc, out = libbpf.prog_test_run_xdp_out(dp.prog_fd("mbpf_ns_xdp"), bytes(packet))
    return rc, Ether(out)


@pytest.mark.parametrize("path", ["tc"], indirect=True)   # one path: it is about the maps / XDP itself
@FAMS
@pytest.mark.parametrize("proto", [TCP_, UDP_])
def test_xdp_itself_translates_flows_to_a_local_backend(dp, maps, fam, proto, path):
    f = FAMILIES[fam]
    frontend(maps, NsKey(a16(f["ext"]), SVC_PORT, proto), [be_id(fam, LOCAL_BE)])
    before = maps.counters()
    for flags, counter in (("S", "new"), ("A", "established")):
        rc, out = xdp(dp, pkt(fam, f["client"], f["ext"], 40030, SVC_PORT, proto, flags, b"abc"))
        assert rc == XDP_PASS   # to the stack, translated
        assert (l3(out).src, l3(out).dst, l4(out).sport, l4(out).dport) == \
            (f["client"], f["local"], 40030, BE_PORT)
        assert_checksums_valid(out)
    assert counted(maps, before) == {"new": 1, "established": 1}


@pytest.mark.parametrize("path", ["tc"], indirect=True)   # one path: it is about the maps / XDP itself
def test_xdp_drops_what_tc_would_drop_and_leaves_rejects_to_tc(dp, maps, path):
    f = FAMILIES[4]
    frontend(maps, NsKey(a16(f["ext"]), SVC_PORT, TCP_), [LOCAL_BE], src_id=9)
    frontend(maps, nodeport(4), [], table=1, flags=F_NODEPORT)
    assert xdp(dp, pkt(4, f["client"], f["ext"], 40031, SVC_PORT))[0] == XDP_DROP
    syn = pkt(4, f["client"], f["node"], 40031, NODE_PORT)
    assert xdp(dp, syn) == (XDP_PASS, Ether(bytes(syn)))
    udp_zero = pkt(4, f["client"], f["node"], 40032, NODE_PORT, UDP_)
    udp_zero[UDP].chksum = 0  # none over IPv4: stays none
    frontend(maps, nodeport(4, UDP_), [LOCAL_BE], table=2, flags=F_NODEPORT)
    rc, out = xdp(dp, udp_zero)
    assert rc == XDP_PASS and out[UDP].chksum == 0 and out[IP].dst == f["local"]


def test_the_hand_mirrors_match_the_compiled_north_south_maps(dp):
    import json

    from bcc import BPF
    from bcc.libbcc import lib

    from meshbpf.datapath.layout import NS_MAPS

    from .test_layout import _layout
    for spec in NS_MAPS:
        name = spec.name.encode()
        key = BPF._decode_table_type(json.loads(lib.bpf_table_key_desc(dp.bpf.module, name)))
        leaf = BPF._decode_table_type(json.loads(lib.bpf_table_leaf_desc(dp.bpf.module, name)))
        assert _layout(spec.key) == _layout(key), spec.name
        assert _layout(spec.value) == _layout(leaf), spec.name


def test_pins_of_another_table_size_are_refused(dp):
    with pytest.raises(Exception, match="do not match this build"):
        NorthSouthDatapath.load(dp.bpffs, [], table_size=17, mode="tc",
                                map_sizes={"mbpf_maglev": 8, "mbpf_ns_ct": 1024})


def test_bad_table_writes_are_refused_with_one_clear_line(dp, maps):
    from meshbpf.datapath.northsouth import NorthSouthError
    with pytest.raises(NorthSouthError, match=r"^table 8 is outside mbpf_maglev \(tables 0..7\)$"):
        maps.apply([NsStep("tables", "update", {8: array("I", [1] * M)})])
    with pytest.raises(NorthSouthError, match=r"^table 2: 5 entries, the table size is 13$"):
        maps.apply([NsStep("tables", "update", {2: array("I", [1] * 5)})])
    with pytest.raises(NorthSouthError, match=r"^table 2: 20 entries, the table size is 13$"):
        maps.apply([NsStep("tables", "update", {2: array("I", [1] * 20)})])
    with pytest.raises(NorthSouthError, match=r"^north-south step: unknown map 'slots'"):
        maps.apply([NsStep("slots", "update", {})])


@pytest.mark.userspace
@pytest.mark.parametrize("kwargs, message", [
    (dict(mode="fast"), "north-south mode 'fast': expected one of tc, xdp, auto"),
    (dict(table_size=16), "Maglev table size 16: must be an odd prime"),
    (dict(map_sizes={"mbpf_maglev": 6}), "mbpf_maglev tables 6: must be a power of two"),
])
def test_bad_load_arguments_are_refused_before_anything_is_made(kwargs, message):
    bpffs = BPFFS_ROOT / f"{PIN_PREFIX}{next(_names)}"
    with pytest.raises(Exception, match=message.replace("(", r"\(")):
        NorthSouthDatapath.load(bpffs, ["ext0"], **kwargs)
    assert not bpffs.exists()


@pytest.mark.parametrize("path", ["tc", "xdp"], indirect=True)
def test_closed_and_udp_flows_are_collected_sooner(dp, maps, path):
    """Their SNAT ports serve again: a TCP flow that saw a RST after 10 s
    idle, one that saw a FIN after 60 s, UDP after 120 s; other TCP flows
    after the caller's idle time (the programs mark FIN and RST in the
    conntrack entry of the direction they saw them in). A new connection on
    a closed flow's tuple (its SYN and SYN-ACK) opens it again."""
    f = FAMILIES[4]
    frontend(maps, nodeport(4), [REMOTE_BE], flags=F_NODEPORT)
    frontend(maps, nodeport(4, UDP_), [REMOTE_BE], table=1, flags=F_NODEPORT)
    sent = {}
    for sport in (40050, 40051, 40052, 40054):
        _, sent[sport] = ingress(dp, pkt(4, f["client"], f["node"], sport, NODE_PORT))
    ingress(dp, pkt(4, f["client"], f["node"], 40053, NODE_PORT, UDP_))
    ingress(dp, pkt(4, f["client"], f["node"], 40050, NODE_PORT, flags="FA"))          # the client's FIN
    for sport in (40051, 40054):                                                        # the backend's RST
        ingress(dp, pkt(4, f["remote"], f["node"], BE_PORT, l4(sent[sport]).sport, flags="R"))
    # 40054: the client's next connection on the same tuple, answered
    ingress(dp, pkt(4, f["client"], f["node"], 40054, NODE_PORT))
    ingress(dp, pkt(4, f["remote"], f["node"], BE_PORT, l4(sent[40054]).sport, flags="SA"))
    assert len(maps.conntrack()) == 10
    mark = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    hour, s = 3600 * 10**9, 10**9

    def client_ports() -> set[int]:
        return {socket.ntohs(k.sport) for k, _ in maps.conntrack() if k.dir == 1}
    assert maps.collect_garbage(hour, now_ns=mark + 9 * s) == 0
    assert maps.collect_garbage(hour, now_ns=mark + 11 * s) == 2       # the RST flow, both halves
    assert client_ports() == {40050, 40052, 40053, 40054}
    assert maps.collect_garbage(hour, now_ns=mark + 59 * s) == 0
    assert maps.collect_garbage(hour, now_ns=mark + 61 * s) == 2       # the FIN flow
    assert maps.collect_garbage(hour, now_ns=mark + 121 * s) == 2      # the UDP flow
    assert client_ports() == {40052, 40054}


@pytest.mark.parametrize("closed", ["rst", "fin", "reopened"])
def test_a_closed_flows_snat_port_is_taken_over_after_a_rst(dp, maps, closed):
    """A new flow whose try is a port held by a flow that is over takes it
    at once after a RST (the old flow's FWD entry goes: its client's next
    packet is a new flow); after FINs the backend sent first not before 60 s
    idle (it takes its next try); nor when the client opened the tuple again
    since (its SYN after the RST). (A flow the client closed first gives its
    port up after 1 s idle: the next test; a slow VM can take that long.)"""
    f = FAMILIES[4]
    frontend(maps, nodeport(4), [REMOTE_BE], flags=F_NODEPORT)
    _, first = ingress(dp, pkt(4, f["client"], f["node"], 40070, NODE_PORT))
    port = l4(first).sport
    other = _client_port_colliding(f, port, 4)
    if closed == "rst":
        ingress(dp, pkt(4, f["client"], f["node"], 40070, NODE_PORT, flags="R"))
    elif closed == "reopened":
        ingress(dp, pkt(4, f["remote"], f["node"], BE_PORT, port, flags="R"))       # the backend's RST
    else:
        ingress(dp, pkt(4, f["remote"], f["node"], BE_PORT, port, flags="FA"))
        ingress(dp, pkt(4, f["client"], f["node"], 40070, NODE_PORT, flags="FA"))
    if closed == "reopened":
        ingress(dp, pkt(4, f["client"], f["node"], 40070, NODE_PORT))    # the same tuple again: its SYN
    before = maps.counters()
    _, second = ingress(dp, pkt(4, f["far"], f["node"], other, NODE_PORT))
    tries = snat_tries(f["far"], f["node"], other, NODE_PORT)
    fwd_ports = {socket.ntohs(k.sport) for k, _ in maps.conntrack() if k.dir == 1}
    if closed == "rst":
        assert l4(second).sport == port and "snat_port_retry" not in counted(maps, before)
        assert fwd_ports == {other}                        # the old flow is gone
        _, again = ingress(dp, pkt(4, f["client"], f["node"], 40070, NODE_PORT))
        assert l4(again).sport != port                     # a new flow for the old client
        _, back = ingress(dp, pkt(4, f["remote"], f["node"], BE_PORT, port, flags="SA"))
        assert (l3(back).dst, l4(back).dport) == (f["far"], other)
    else:
        assert l4(second).sport == tries[1] and counted(maps, before)["snat_port_retry"] == 1
        assert fwd_ports == {40070, other}



@pytest.mark.parametrize("first", ["client", "client, its last ACK unseen", "backend"])
def test_a_flow_the_client_closed_first_frees_its_snat_port(dp, maps, first):
    """The side that closes first keeps the tuple in TIME_WAIT. The client
    closed first: the backend keeps nothing, and a new flow takes the
    flow's SNAT port at once once the client's ACK of the backend's FIN went
    by (as Linux's NAT reuses a closed tuple), else after 1 s idle. The
    backend closed first: the port is held 60 s, as before, and a new flow
    takes its next try."""
    f = FAMILIES[4]
    frontend(maps, nodeport(4), [REMOTE_BE], flags=F_NODEPORT)
    _, opened = ingress(dp, pkt(4, f["client"], f["node"], 40080, NODE_PORT))
    port = l4(opened).sport
    client_fin = pkt(4, f["client"], f["node"], 40080, NODE_PORT, flags="FA")
    backend_fin = pkt(4, f["remote"], f["node"], BE_PORT, port, flags="FA")
    for packet in ([backend_fin, client_fin] if first == "backend" else [client_fin, backend_fin]):
        ingress(dp, packet)
    mark = time.clock_gettime_ns(time.CLOCK_MONOTONIC)   # the flow's last packet is later
    if first == "client":
        ingress(dp, pkt(4, f["client"], f["node"], 40080, NODE_PORT, flags="A"))    # the last ACK
    elif first == "backend":   # the backend's last ACK (it closed first)
        ingress(dp, pkt(4, f["remote"], f["node"], BE_PORT, port, flags="A"))
    flags = {k.dir: v.flags for k, v in maps.conntrack() if socket.ntohs(k.sport) in (40080, BE_PORT)}
    assert flags[1] & CT_F_FIN and flags[2] & CT_F_FIN
    colliding = (sport for sport in range(20000, 60000)
                 if snat_tries(f["far"], f["node"], sport, NODE_PORT)[0] == port)
    early_port = next(colliding)
    _, early = ingress(dp, pkt(4, f["far"], f["node"], early_port, NODE_PORT))
    if first == "client":
        assert l4(early).sport == port                      # taken over at once
        return
    if time.clock_gettime_ns(time.CLOCK_MONOTONIC) - mark < 9 * 10**8:   # unless the host stalled
        assert l4(early).sport == snat_tries(f["far"], f["node"], early_port, NODE_PORT)[1]   # held
    assert maps.collect_garbage(3600 * 10**9, now_ns=mark + 5 * 10**8) == 0
    time.sleep(1.1)
    late_port = next(colliding)
    _, late = ingress(dp, pkt(4, f["far"], f["node"], late_port, NODE_PORT))
    if first == "backend":
        assert l4(late).sport != port                       # a later try
        assert 40080 in {socket.ntohs(k.sport) for k, _ in maps.conntrack() if k.dir == 1}
        # the garbage collection keeps it as long (60 s), then frees it
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        assert maps.collect_garbage(3600 * 10**9, now_ns=now) == 0
        assert maps.collect_garbage(3600 * 10**9, now_ns=mark + 120 * 10**9) == 2
    else:
        assert l4(late).sport == port                       # taken over after the second


def test_the_garbage_collection_frees_a_flow_the_client_closed_first_after_a_second(dp, maps):
    """As ns_take_over judges it (the test above): client FIN, backend FIN,
    the last ACK, then 1 s idle both ways."""
    f = FAMILIES[4]
    frontend(maps, nodeport(4), [REMOTE_BE], flags=F_NODEPORT)
    _, opened = ingress(dp, pkt(4, f["client"], f["node"], 40090, NODE_PORT))
    port = l4(opened).sport
    ingress(dp, pkt(4, f["client"], f["node"], 40090, NODE_PORT, flags="FA"))
    ingress(dp, pkt(4, f["remote"], f["node"], BE_PORT, port, flags="FA"))
    mark = time.clock_gettime_ns(time.CLOCK_MONOTONIC)   # the flow's last packet is later
    ingress(dp, pkt(4, f["client"], f["node"], 40090, NODE_PORT, flags="A"))
    hour = 3600 * 10**9
    assert maps.collect_garbage(hour, now_ns=mark + 5 * 10**8) == 0
    assert maps.collect_garbage(hour, now_ns=mark + 5 * 10**9) == 2
    assert maps.conntrack() == []


@pytest.mark.parametrize("held_by", ["flows the backend closed first", "open flows"])
def test_a_flow_whose_every_try_is_held_takes_a_closed_flows_port_rather_than_drop(dp, maps, held_by):
    """All 8 SNAT tries of a new flow held. By flows both ends closed with
    FINs, the backend first (their ports held 60 s for its TIME_WAIT): the
    flow takes its first such try rather than be dropped, as Linux's NAT
    reuses a closed tuple. By open flows: dropped (drop_no_snat), as before."""
    f = FAMILIES[4]
    frontend(maps, nodeport(4), [REMOTE_BE], flags=F_NODEPORT)
    new_sport = 45000
    tries = snat_tries(f["far"], f["node"], new_sport, NODE_PORT)
    holders = {}
    for port in tries:   # a client port whose flow takes this try first
        holders[port] = next(s for s in range(20000, 60000) if s not in holders.values()
                             and snat_tries(f["client"], f["node"], s, NODE_PORT)[0] == port)
    for port, sport in holders.items():
        _, opened = ingress(dp, pkt(4, f["client"], f["node"], sport, NODE_PORT))
        assert l4(opened).sport == port
        if held_by != "open flows":
            ingress(dp, pkt(4, f["remote"], f["node"], BE_PORT, port, flags="FA"))      # the backend's FIN
            ingress(dp, pkt(4, f["client"], f["node"], sport, NODE_PORT, flags="FA"))  # the client's
            ingress(dp, pkt(4, f["remote"], f["node"], BE_PORT, port, flags="A"))       # the last ACK
    before = maps.counters()
    verdict, out = ingress(dp, pkt(4, f["far"], f["node"], new_sport, NODE_PORT))
    seen = counted(maps, before)
    assert seen["snat_port_retry"] == 8
    if held_by == "open flows":
        assert verdict == DROP and seen.get("drop_no_snat") == 1
        return
    assert l4(out).sport == tries[0] and "drop_no_snat" not in seen
    fwd_ports = {socket.ntohs(k.sport) for k, _ in maps.conntrack() if k.dir == 1}
    assert holders[tries[0]] not in fwd_ports and new_sport in fwd_ports   # the old flow went
    _, back = ingress(dp, pkt(4, f["remote"], f["node"], BE_PORT, tries[0], flags="SA"))
    assert (l3(back).dst, l4(back).dport) == (f["far"], new_sport)
