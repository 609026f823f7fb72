"""The policy tc programs, run by the kernel on hand-built packets
(BPF_PROG_TEST_RUN) against maps filled with PolicyMaps.apply: verdicts and
counters for v4 and v6, TCP, UDP and ICMP, spoofed sources, cut headers and
fragments."""

from __future__ import annotations

import ipaddress
import socket

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, ICMPv6ND_NS, ICMPv6PacketTooBig, IPv6
from scapy.layers.l2 import ARP, Ether

from meshbpf.datapath import libbpf
from meshbpf.datapath.policy import PolicyDatapath, PolicyMaps, addr_bytes
from meshbpf.datapath.layout import CtC, CtKeyC
from meshbpf.datapath.policy_events import PolicyEvents
from meshbpf.reconcile.policy_keys import (DIR_IN, DIR_OUT, EP_ISOLATE_IN, EP_ISOLATE_OUT,
                                           PEER_ANY_PORT, EpVal, PeerKey, PeerVal, PolicyStep,
                                           PortKey, PortVal)

from .conftest import BPFFS_ROOT, PIN_PREFIX, _names

PASS, DROP = -1, 2  # TC_ACT_UNSPEC (the next filter decides, else the packet goes on), TC_ACT_SHOT
LO = 1              # BPF_PROG_TEST_RUN runs the skb "on" this device: the endpoint's ifindex
EP = 7
POD4, POD6 = "10.244.0.2", "fd00:244::2"
PEER4, PEER6, OTHER4 = "10.244.0.3", "fd00:244::3", "10.244.0.9"


@pytest.fixture(scope="module")
def dp():
    """One compile for the module; pins under this run's test prefix."""
    bpffs = BPFFS_ROOT / f"{PIN_PREFIX}{next(_names)}"
    datapath = PolicyDatapath(bpffs)
    try:
        datapath.compile()
        yield datapath
    finally:
        from meshbpf.datapath.loader import uninstall
        datapath.bpf = None
        if bpffs.exists():
            uninstall(bpffs)


@pytest.fixture
def maps(dp):
    """Empty policy maps (conntrack too) before each test."""
    with PolicyMaps(dp.bpffs) as m:
        old = m.read()
        m.apply([PolicyStep(role, "delete", {k: None for k in getattr(old, role)})
                 for role in ("ports", "peers", "addresses", "endpoints")])
        for key in m.conntrack():
            libbpf.map_delete(m.fds["mbpf_ct"], key)
        yield m


def endpoint(maps, flags=0, gen=0, addrs=(POD4, POD6)):
    maps.apply([PolicyStep("addresses", "update", {addr_bytes(a): EP for a in addrs}),
                PolicyStep("endpoints", "update", {LO: EpVal(EP, gen, flags)})])


def allow_peer(maps, cidr, direction, peer_set=1, gen=0, any_port=False, rule=11):
    net = ipaddress.ip_network(cidr)
    bits = net.prefixlen + (96 if net.version == 4 else 0)
    key = PeerKey(EP, gen, direction, addr_bytes(net.network_address), bits)
    maps.apply([PolicyStep("peers", "update",
                           {key: PeerVal(peer_set, rule, PEER_ANY_PORT if any_port else 0)})])


def allow_port(maps, proto, port, direction, peer_set=1, gen=0, bits=16, rule=12):
    key = PortKey(EP, gen, direction, proto, peer_set, port, bits)
    maps.apply([PolicyStep("ports", "update", {key: PortVal(rule)})])


def run(dp, prog, pkt, ifindex=LO) -> int:
    return libbpf.prog_test_run_skb(dp.prog_fd(prog), bytes(pkt), ifindex=ifindex)


def from_pod(dp, pkt):
    return run(dp, "mbpf_tc_from_pod", pkt)


def to_pod(dp, pkt):
    return run(dp, "mbpf_tc_to_pod", pkt)


def eth(pkt):
    return Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / pkt


def tcp4(src, dst, sport, dport, flags="S"):
    """A TCP segment; by default a SYN, a connection's first packet."""
    return eth(IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags=flags))


def counted(maps, before) -> dict[str, int]:
    now = maps.counters()
    return {k: now[k] - before[k] for k in now if now[k] != before[k]}


def test_the_hand_mirrors_match_the_compiled_policy_maps(dp):
    import json

    from bcc import BPF
    from bcc.libbcc import lib

    from .test_layout import _layout
    for spec in dp.maps():
        name = spec.name.encode()
        key = BPF._decode_table_type(json.loads(lib.bpf_table_key_desc(dp.bpf.module, name)))
        leaf = BPF._decode_table_type(json.loads(lib.bpf_table_leaf_desc(dp.bpf.module, name)))
        assert _layout(spec.key) == _layout(key), spec.name
        assert _layout(spec.value) == _layout(leaf), spec.name


def test_unmanaged_interface_and_non_ip_pass(dp, maps):
    before = maps.counters()
    assert to_pod(dp, eth(IP(src=PEER4, dst=POD4, ihl=2))) == PASS  # no endpoint: not ours
    endpoint(maps, EP_ISOLATE_IN | EP_ISOLATE_OUT)
    assert from_pod(dp, eth(ARP(psrc=OTHER4, pdst=PEER4))) == PASS
    assert counted(maps, before) == {}


def test_open_endpoint_allows_and_remembers_the_flow(dp, maps):
    endpoint(maps)
    before = maps.counters()
    assert from_pod(dp, tcp4(POD4, PEER4, 40000, 80)) == PASS
    assert from_pod(dp, tcp4(POD4, PEER4, 40000, 80, "A")) == PASS  # known flow: not counted again
    assert to_pod(dp, tcp4(PEER4, POD4, 80, 40000, "SA")) == PASS   # its reply: known too
    assert counted(maps, before) == {"egress_allow": 1}
    assert len(maps.conntrack()) == 1


@pytest.mark.parametrize("src", [OTHER4, PEER4, "fd00:244::9", "fe80::1"])
def test_a_source_the_pod_does_not_own_is_dropped(dp, maps, src):
    endpoint(maps)
    before = maps.counters()
    dst = PEER6 if ":" in src else PEER4
    ip = IPv6(src=src, dst=dst) if ":" in src else IP(src=src, dst=dst)
    assert from_pod(dp, eth(ip / UDP(sport=5000, dport=53))) == DROP
    assert counted(maps, before) == {"spoofed": 1}
    # the same packet to the pod (its ingress) is no spoof
    assert to_pod(dp, eth(ip / UDP(sport=5000, dport=53))) == PASS


def test_ipv6_neighbour_discovery_and_link_local_icmpv6_pass(dp, maps):
    endpoint(maps, EP_ISOLATE_IN | EP_ISOLATE_OUT)
    before = maps.counters()
    ns = eth(IPv6(src="::", dst="ff02::1:ff00:3") / ICMPv6ND_NS(tgt=PEER6))
    assert from_pod(dp, ns) == PASS
    assert to_pod(dp, ns) == PASS
    assert counted(maps, before) == {}
    # a link-local echo is no spoof, but policy still decides it (isolated: denied)
    echo = eth(IPv6(src="fe80::2", dst="fe80::3") / ICMPv6EchoRequest())
    assert from_pod(dp, echo) == DROP
    assert counted(maps, before) == {"egress_deny": 1}


# (BPF_PROG_TEST_RUN itself refuses a frame shorter than its IP header.)
@pytest.mark.parametrize("cut", ["options", "tcp", "ihl", "v6-ext", "v6-udp"])
def test_cut_or_nonsense_headers_are_dropped_as_malformed(dp, maps, cut):
    endpoint(maps)
    before = maps.counters()
    pkt = {
        "options": bytes(eth(IP(src=POD4, dst=PEER4, ihl=15, proto=6))),  # 40 option bytes missing
        "tcp": bytes(tcp4(POD4, PEER4, 1, 80))[:14 + 20 + 2],
        "ihl": bytes(eth(IP(src=POD4, dst=PEER4, ihl=2) / TCP())),
        "v6-ext": bytes(eth(IPv6(src=POD6, dst=PEER6, nh=0, plen=0))),   # hop-by-hop missing
        "v6-udp": bytes(eth(IPv6(src=POD6, dst=PEER6) / UDP()))[:14 + 40 + 3],
    }[cut]
    assert from_pod(dp, pkt) == DROP
    assert counted(maps, before) == {"malformed": 1}


def test_isolated_ingress_allows_only_the_listed_peer_and_port(dp, maps):
    endpoint(maps, EP_ISOLATE_IN)
    allow_peer(maps, f"{PEER4}/32", DIR_IN)
    allow_port(maps, 6, 80, DIR_IN)
    before = maps.counters()
    assert to_pod(dp, tcp4(PEER4, POD4, 40001, 80)) == PASS
    assert to_pod(dp, tcp4(PEER4, POD4, 40002, 81)) == DROP
    assert to_pod(dp, tcp4(OTHER4, POD4, 40003, 80)) == DROP
    assert to_pod(dp, eth(IP(src=PEER4, dst=POD4) / UDP(sport=40004, dport=80))) == DROP
    assert to_pod(dp, eth(IP(src=PEER4, dst=POD4) / ICMP())) == DROP  # ports listed: ICMP not
    assert counted(maps, before) == {"ingress_allow": 1, "ingress_deny": 4}
    # egress is not isolated: the pod's own new flows pass
    assert from_pod(dp, tcp4(POD4, OTHER4, 40005, 443)) == PASS


def test_reply_of_an_allowed_flow_passes_egress_default_deny(dp, maps):
    endpoint(maps, EP_ISOLATE_IN | EP_ISOLATE_OUT)
    allow_peer(maps, "10.244.0.0/24", DIR_IN)
    allow_port(maps, 6, 80, DIR_IN)
    before = maps.counters()
    assert to_pod(dp, tcp4(PEER4, POD4, 40010, 80)) == PASS
    assert from_pod(dp, tcp4(POD4, PEER4, 80, 40010, "SA")) == PASS   # the reply
    assert from_pod(dp, tcp4(POD4, PEER4, 40011, 80)) == DROP         # a new flow out
    assert from_pod(dp, tcp4(POD4, PEER4, 80, 40012, "SA")) == DROP   # a "reply" to nothing
    assert counted(maps, before) == {"ingress_allow": 1, "egress_deny": 2}


def test_any_port_peer_ipv6_prefix_and_port_range(dp, maps):
    endpoint(maps, EP_ISOLATE_IN | EP_ISOLATE_OUT)
    allow_peer(maps, "fd00:244::/120", DIR_OUT, any_port=True)
    allow_peer(maps, f"{PEER4}/32", DIR_OUT, peer_set=2)
    allow_port(maps, 17, 80, DIR_OUT, peer_set=2, bits=12)  # 80-95, an endPort range
    v6 = IPv6(src=POD6, dst=PEER6)
    assert from_pod(dp, eth(v6 / TCP(sport=1, dport=9999))) == PASS
    assert from_pod(dp, eth(v6 / ICMPv6EchoRequest())) == PASS
    assert from_pod(dp, eth(IPv6(src=POD6, dst="fd00:245::3") / TCP(sport=1, dport=1))) == DROP
    udp = IP(src=POD4, dst=PEER4)
    assert from_pod(dp, eth(udp / UDP(sport=5, dport=95))) == PASS
    assert from_pod(dp, eth(udp / UDP(sport=5, dport=96))) == DROP
    assert from_pod(dp, eth(udp / UDP(sport=5, dport=79))) == DROP
    assert from_pod(dp, eth(udp / TCP(sport=5, dport=80))) == DROP


def test_rules_of_the_other_generation_apply_only_after_the_flip(dp, maps):
    endpoint(maps, EP_ISOLATE_IN, gen=0)
    allow_peer(maps, f"{PEER4}/32", DIR_IN, gen=1, any_port=True)
    assert to_pod(dp, tcp4(PEER4, POD4, 40020, 80)) == DROP
    endpoint(maps, EP_ISOLATE_IN, gen=1)
    assert to_pod(dp, tcp4(PEER4, POD4, 40021, 80)) == PASS
    endpoint(maps, EP_ISOLATE_IN, gen=0)  # back to generation 0: nothing allowed...
    assert to_pod(dp, tcp4(PEER4, POD4, 40022, 80)) == DROP
    assert to_pod(dp, tcp4(PEER4, POD4, 40021, 80, "A")) == PASS  # ...but the known flow goes on
    # A new connection on that flow's ports is judged by the rules in force:
    # the kernel reuses ports, and an old entry must not admit a denied pair.
    assert to_pod(dp, tcp4(PEER4, POD4, 40021, 80)) == DROP
    endpoint(maps, EP_ISOLATE_IN, gen=1)
    assert to_pod(dp, tcp4(PEER4, POD4, 40021, 80)) == PASS  # allowed again: a SYN passes


def test_fragments_after_the_first_carry_no_ports(dp, maps):
    endpoint(maps, EP_ISOLATE_IN)
    allow_peer(maps, f"{PEER4}/32", DIR_IN)
    allow_port(maps, 17, 53, DIR_IN)
    first = IP(src=PEER4, dst=POD4, id=7, flags="MF", frag=0) / UDP(sport=5000, dport=53)
    later = IP(src=PEER4, dst=POD4, id=7, proto=17, frag=3) / (b"x" * 16)
    assert to_pod(dp, eth(first)) == PASS
    assert to_pod(dp, eth(later)) == DROP  # ports 0: no rule matches (see README)
    later6 = IPv6(src=PEER6, dst=POD6, nh=44) / bytes([17, 0, 0, 24, 0, 0, 0, 7]) / (b"x" * 16)
    allow_peer(maps, f"{PEER6}/128", DIR_IN, any_port=True, peer_set=3)
    assert to_pod(dp, eth(later6)) == PASS  # any port: no ports needed


@pytest.mark.skipif(not libbpf.ringbuf_supported(), reason="no BPF ring buffer before 5.8")
def test_flow_events_only_while_someone_listens(dp, maps):
    endpoint(maps, EP_ISOLATE_IN)
    allow_peer(maps, f"{PEER4}/32", DIR_IN)
    allow_port(maps, 6, 80, DIR_IN, rule=42)
    assert to_pod(dp, tcp4(PEER4, POD4, 40030, 81)) == DROP  # nobody listens: no event
    with PolicyEvents(dp.bpffs) as events:
        assert events.poll(0) == []
        assert to_pod(dp, tcp4(PEER4, POD4, 40031, 80)) == PASS
        assert to_pod(dp, tcp4(PEER4, POD4, 40031, 80, "A")) == PASS  # known flow: no event
        assert to_pod(dp, tcp4(PEER4, POD4, 40032, 81)) == DROP
        assert from_pod(dp, eth(IPv6(src=PEER6, dst=POD6) / UDP(sport=7, dport=53))) == DROP
        got = [(e.verdict, e.direction, e.src, e.dst, e.proto, e.rule, e.ep_id, e.ifindex)
               for e in events.poll(1000)]
    assert got == [
        ("allow", "ingress", f"{PEER4}:40031", f"{POD4}:80", 6, 42, EP, LO),
        ("deny", "ingress", f"{PEER4}:40032", f"{POD4}:81", 6, 0, EP, LO),
        ("spoofed", "egress", f"[{PEER6}]:7", f"[{POD6}]:53", 17, 0, EP, LO),
    ]
    with PolicyEvents(dp.bpffs) as events:
        pass  # the reader closed: the switch is off again
    assert to_pod(dp, tcp4(PEER4, POD4, 40033, 81)) == DROP
    with PolicyEvents(dp.bpffs) as events:
        assert [e.src for e in events.poll(0)] == []


@pytest.fixture
def second_dev():
    """A second device for a second endpoint: a veth in a netns of this
    test's own (BPF_PROG_TEST_RUN needs the ifindex to exist in the caller's
    netns; the VMs have only lo). Returns run(prog, pkt) for it."""
    import threading

    from pyroute2 import IPRoute, netns

    from meshbpf.lab.netlab import NETNS_PREFIX, _setns

    from .conftest import LAB_PREFIX
    name = f"{NETNS_PREFIX}{LAB_PREFIX}{next(_names)}"
    netns.create(name)
    try:
        with IPRoute(netns=name, flags=0) as ipr:
            ipr.link("add", ifname="d0", kind="veth", peer={"ifname": "d1"})
            ifindex = ipr.link_lookup(ifname="d0")[0]

        def run_there(dp, prog, pkt) -> int:
            out = {}

            def body():  # setns changes this thread only
                try:
                    _setns(name)
                    out["rc"] = run(dp, prog, pkt, ifindex)
                except Exception as exc:  # re-raised below, in the test's thread
                    out["exc"] = exc
            t = threading.Thread(target=body)
            t.start()
            t.join()
            if "exc" in out:
                raise out["exc"]
            return out["rc"]
        run_there.ifindex = ifindex
        yield run_there
    finally:
        netns.remove(name)


def test_both_local_ends_share_one_conntrack_entry_and_keep_their_own_verdicts(dp, maps, second_dev):
    """A flow between two pods of this node is one conntrack entry (the
    second end finds the first end's), yet each end knows only what it let
    through itself."""
    peer_if, peer_ep = second_dev.ifindex, EP + 1
    endpoint(maps)  # the client (POD4): open
    maps.apply([PolicyStep("addresses", "update", {addr_bytes(PEER4): peer_ep}),
                PolicyStep("endpoints", "update", {peer_if: EpVal(peer_ep, 0, EP_ISOLATE_IN)})])
    key = PeerKey(peer_ep, 0, DIR_IN, addr_bytes(POD4), 128)
    maps.apply([PolicyStep("peers", "update", {key: PeerVal(1, 0, 0)}),
                PolicyStep("ports", "update", {PortKey(peer_ep, 0, DIR_IN, 6, 1, 80, 16): PortVal(5)})])
    c2s, s2c = (POD4, PEER4, 40040, 80), (PEER4, POD4, 80, 40040)
    assert from_pod(dp, tcp4(*c2s)) == PASS                          # client end: SYN out
    assert second_dev(dp, "mbpf_tc_to_pod", tcp4(*c2s)) == PASS      # server end: SYN in, allowed
    assert second_dev(dp, "mbpf_tc_from_pod", tcp4(*s2c, "SA")) == PASS
    assert to_pod(dp, tcp4(*s2c, "SA")) == PASS
    assert second_dev(dp, "mbpf_tc_to_pod", tcp4(*c2s, "A")) == PASS
    assert len(maps.conntrack()) == 1
    # port 81: the client lets it out (an entry with the client's mark), the server
    # denies it; the entry must not make the server's end take it for known
    denied = (POD4, PEER4, 40041, 81)
    assert from_pod(dp, tcp4(*denied)) == PASS
    assert second_dev(dp, "mbpf_tc_to_pod", tcp4(*denied)) == DROP
    assert second_dev(dp, "mbpf_tc_to_pod", tcp4(*denied, "A")) == DROP
    assert to_pod(dp, tcp4(PEER4, POD4, 81, 40041, "SA")) == PASS    # the client end's reply: known there


def test_conntrack_entries_of_the_previous_build_still_carry_their_flows(dp, maps):
    """An agent upgrade keeps established flows: 0.1.0 kept one entry per
    endpoint and direction (the flow as first seen); the new programs honour
    those until they are evicted."""
    endpoint(maps, EP_ISOLATE_IN | EP_ISOLATE_OUT)  # nothing allowed either way
    old = CtKeyC(sport=socket.htons(40050), dport=socket.htons(80), ep_id=EP, proto=6, dir=DIR_IN)
    old.saddr[:] = addr_bytes(PEER4)
    old.daddr[:] = addr_bytes(POD4)
    libbpf.map_update(maps.fds["mbpf_ct"], old, CtC())
    assert to_pod(dp, tcp4(PEER4, POD4, 40050, 80, "A")) == PASS        # the flow, as first seen
    assert from_pod(dp, tcp4(POD4, PEER4, 80, 40050, "A")) == PASS      # its reply
    assert to_pod(dp, tcp4(PEER4, POD4, 40051, 80, "A")) == DROP        # another flow: judged
    assert from_pod(dp, tcp4(POD4, PEER4, 40050, 80, "A")) == DROP      # the same tuple the other way


def test_entries_of_the_build_before_idle_timeouts_keep_tcp_and_rejudge_udp(dp, maps):
    """The build before UDP idle timeouts kept endpoint ids where seen_s is
    now (same value size: the pinned map is kept). After an upgrade its TCP
    flows go on (TCP never times out here); its UDP flows read as long idle,
    so their next datagram is judged afresh: denied if policy now denies."""
    endpoint(maps)  # open: both flows recorded
    udp = lambda: eth(IP(src=POD4, dst=PEER4) / UDP(sport=40071, dport=53))  # noqa: E731
    assert from_pod(dp, tcp4(POD4, PEER4, 40070, 80)) == PASS
    assert from_pod(dp, udp()) == PASS
    fd = maps.fds["mbpf_ct"]
    for key in maps.conntrack():
        val = CtC()
        libbpf.map_lookup(fd, key, val)
        val.seen_s, val.pad = EP, 0  # ep_id[low], ep_id[high], as the build before wrote them
        libbpf.map_update(fd, key, val)
    endpoint(maps, EP_ISOLATE_OUT)  # nothing may leave now
    assert from_pod(dp, tcp4(POD4, PEER4, 40070, 80, "A")) == PASS
    assert from_pod(dp, udp()) == DROP
    endpoint(maps)  # open again: judged afresh and allowed, then known
    assert from_pod(dp, udp()) == PASS
    endpoint(maps, EP_ISOLATE_OUT)
    assert from_pod(dp, udp()) == PASS, "active again: the flow is known, not judged"


def test_icmp_errors_about_a_flow_the_pod_sent_pass_its_isolated_ingress(dp, maps):
    """conntrack's RELATED: a UDP port unreachable (or a TCP flow's packet
    too big) about a flow the pod let out reaches it, from the peer or a
    router on the way, though nothing may come in; an error about another
    flow, or an ICMP message that is no error, is judged as any packet."""
    endpoint(maps, EP_ISOLATE_IN | EP_ISOLATE_OUT)
    allow_peer(maps, PEER4 + "/32", DIR_OUT, any_port=True)
    allow_peer(maps, PEER6 + "/128", DIR_OUT, any_port=True)
    sent = IP(src=POD4, dst=PEER4) / UDP(sport=40080, dport=53)
    assert from_pod(dp, eth(sent)) == PASS

    def unreachable(quoted, src=PEER4):
        return eth(IP(src=src, dst=POD4) / ICMP(type=3, code=3) / quoted)
    assert to_pod(dp, unreachable(sent)) == PASS
    assert to_pod(dp, unreachable(sent, src="10.9.9.9")) == PASS  # a router's
    assert to_pod(dp, unreachable(IP(src=POD4, dst=PEER4) / UDP(sport=40081, dport=53))) == DROP
    assert to_pod(dp, eth(IP(src=PEER4, dst=POD4) / ICMP(type=8))) == DROP  # an echo request: judged
    syn6 = IPv6(src=POD6, dst=PEER6) / TCP(sport=40082, dport=443, flags="S")
    assert from_pod(dp, eth(syn6)) == PASS
    assert to_pod(dp, eth(IPv6(src=PEER6, dst=POD6) / ICMPv6PacketTooBig(mtu=1280) / syn6)) == PASS


def test_icmp_errors_the_pod_sends_about_a_flow_it_got_pass_from_its_own_address(dp, maps):
    endpoint(maps, EP_ISOLATE_IN | EP_ISOLATE_OUT)
    allow_peer(maps, PEER4 + "/32", DIR_IN, any_port=True)
    got = IP(src=PEER4, dst=POD4) / UDP(sport=5000, dport=9999)
    assert to_pod(dp, eth(got)) == PASS

    def unreachable(src):
        return eth(IP(src=src, dst=PEER4) / ICMP(type=3, code=3) / got)
    before = maps.counters()
    assert from_pod(dp, unreachable(POD4)) == PASS  # egress allows nothing: it is about a known flow
    assert from_pod(dp, unreachable(OTHER4)) == DROP
    assert counted(maps, before) == {"spoofed": 1}


def test_a_flow_entry_never_vouches_for_a_source_the_pod_does_not_own(dp, maps, second_dev):
    """A known flow passes on its conntrack hit alone, which must never let
    a pod send from an address that is not its own: a reply to traffic that
    reached the pod for another address, or a flow of a departed pod whose
    endpoint id a new pod got, is still a spoof."""
    endpoint(maps)  # open both ways: everything it receives passes
    before = maps.counters()
    assert to_pod(dp, tcp4(PEER4, OTHER4, 80, 40060, "SA")) == PASS    # to an address not its own
    assert from_pod(dp, tcp4(OTHER4, PEER4, 40060, 80, "A")) == DROP   # "replying" from it
    assert from_pod(dp, tcp4(POD4, PEER4, 40061, 80)) == PASS          # its own flow, recorded
    assert counted(maps, before) == {"ingress_allow": 1, "spoofed": 1, "egress_allow": 1}
    # the pod goes; a new pod on another interface gets its endpoint id, not its address
    new_if = second_dev.ifindex
    maps.apply([PolicyStep("endpoints", "delete", {LO: None}),
                PolicyStep("addresses", "update", {addr_bytes(POD4): EP + 1}),
                PolicyStep("endpoints", "update", {new_if: EpVal(EP, 0, 0)})])
    assert second_dev(dp, "mbpf_tc_from_pod", tcp4(POD4, PEER4, 40061, 80, "A")) == DROP
    assert counted(maps, before)["spoofed"] == 2
