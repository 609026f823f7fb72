"""Istio's capture facts, checked on our maps.

Istio's own table test, tools/istio-iptables/pkg/capture/run_test.go, runs
istio-iptables with a flag set per case and compares the iptables rules to
testdata/<case>.golden (and the Istio CNI plugin's DNS case: its
plugin_dryrun_test.go and cni/pkg/plugin/testdata/dns.txt.golden, where
all DNS is captured). The rules are not ours to copy; the facts they
encode are: which connect (by whom, to which address, port and protocol)
is steered to the outbound port 15001, the inbound port 15006 or the DNS
port 15053, and which is left alone. Here each case's flags become a meshed
pod's annotations (plus AgentConfig's dns), the planner writes the maps,
and the decision reference (meshbpf/reconcile/capture_decide.py) answers each fact
over them. Facts read from the golden rules, in the order iptables applies
them; a fact that needs a rule from another case says so.

Who connects: "app" (uid 1000 in the meshed pod), "proxy" (uid 1337 in
it), "client" (a process in an unmeshed pod on the same node, connecting
to the meshed pod's address: Istio's PREROUTING ISTIO_INBOUND chain sees
that connection as it arrives at the pod; we steer it at the client's
connect()).
"""

from __future__ import annotations

import ipaddress
from typing import NamedTuple

import pytest

from meshbpf.reconcile.capture_decide import decide
from meshbpf.capture.settings import pod_capture
from meshbpf.model import CaptureSettings
from meshbpf.policy.model import PodInfo
from meshbpf.reconcile.capture import MeshedPod, plan_capture
from meshbpf.reconcile.capture_keys import CaptureState

POD_CG, CLIENT_CG = 4242, 777
POD_IPS = ("10.0.1.1", "fd00::1:1")
WHO = {"app": (POD_CG, 1000), "proxy": (POD_CG, 1337), "client": (CLIENT_CG, 1000)}
OUT, IN, DNS, NO = 15001, 15006, 15053, None


class Case(NamedTuple):
    annotations: dict           # traffic.sidecar.istio.io/<key>: value
    facts: list                 # (who, destination, port, protocol, expected port or None)
    dns: bool = False


# istio-iptables' own defaults (constructTestConfig) capture nothing: no
# -i and no -b. The injector passes "*" for both unless annotated; our
# defaults are the injector's. A case that leaves a flag at istio-iptables'
# default therefore sets the annotation to "".
NONE_IN = {"includeInboundPorts": ""}
NONE_OUT = {"includeOutboundIPRanges": ""}

CASES: dict[str, Case] = {
    "empty": Case({**NONE_IN, **NONE_OUT}, [
        ("app", "10.96.0.10", 80, "TCP", NO), ("client", "10.0.1.1", 8080, "TCP", NO)]),
    "ipnets": Case({**NONE_IN, "includeOutboundIPRanges": "10.0.0.0/8"}, [
        ("app", "10.96.0.10", 80, "TCP", OUT),         # -d 10.0.0.0/8 -j ISTIO_REDIRECT
        ("app", "10.0.1.1", 8080, "TCP", NO),          # its own pod address: -o lo ! --uid-owner 1337 -j RETURN
        ("app", "fd00::1:1", 8080, "TCP", NO),
        ("app", "192.168.1.1", 80, "TCP", NO),          # no rule: the chain ends, RETURN
        ("app", "127.0.0.1", 80, "TCP", NO),            # -d 127.0.0.1/32 -j RETURN
        ("proxy", "10.96.0.10", 80, "TCP", NO),         # -m owner --uid-owner 1337 -j RETURN
        ("app", "10.96.0.10", 80, "UDP", NO),           # ISTIO_REDIRECT is -p tcp
        ("client", "10.0.1.1", 8080, "TCP", NO)]),      # no ISTIO_INBOUND port rule
    # With REDIRECT_DNS to nameserver 127.0.0.53.
    "ip-range": Case({**NONE_IN, "excludeOutboundIPRanges": "1.1.0.0/16",
                      "includeOutboundIPRanges": "9.9.0.0/16"}, [
        ("app", "9.9.1.1", 443, "TCP", OUT),
        ("app", "1.1.1.1", 443, "TCP", NO),             # RETURN before the REDIRECT
        ("app", "8.8.8.8", 443, "TCP", NO),
        ("proxy", "9.9.1.1", 443, "TCP", NO),
        ("proxy", "9.9.1.1", 53, "UDP", NO),            # --uid-owner 3 -j RETURN
        ("app", "127.0.0.53", 53, "UDP", DNS)], dns=True),
    "ipv6-ipnets": Case({"includeInboundPorts": "4000,5000", "excludeInboundPorts": "6000,7000,",
                         "excludeOutboundIPRanges": "2001:db8::/32",
                         "includeOutboundIPRanges": "2001:db8::/32"}, [
        ("app", "2001:db8::1", 80, "TCP", NO),          # the same range excluded and included: RETURN first
        ("app", "2001:db9::1", 80, "TCP", NO),
        ("app", "::1", 80, "TCP", NO),                  # -d ::1/128 -j RETURN
        ("client", "fd00::1:1", 4000, "TCP", IN),
        ("client", "fd00::1:1", 5000, "TCP", IN),
        ("client", "fd00::1:1", 6000, "TCP", NO),
        ("client", "fd00::1:1", 80, "TCP", NO)]),
    "ipv6-uid-gid": Case({"includeInboundPorts": "4000,5000", "excludeInboundPorts": "6000,7000",
                          "excludeOutboundIPRanges": "2001:db8::/32",
                          "includeOutboundIPRanges": "2001:db8::/32"}, [
        ("app", "2001:db8::1", 80, "TCP", NO), ("client", "fd00::1:1", 5000, "TCP", IN),
        ("client", "fd00::1:1", 7000, "TCP", NO)]),
    "ipv6-inbound-ports": Case({**NONE_OUT, "includeInboundPorts": "4000,5000"}, [
        ("client", "fd00::1:1", 4000, "TCP", IN), ("client", "10.0.1.1", 5000, "TCP", IN),
        ("client", "fd00::1:1", 8080, "TCP", NO), ("app", "2001:db8::1", 80, "TCP", NO)]),
    "ipv6-empty-inbound-ports": Case({**NONE_OUT, **NONE_IN}, [
        ("client", "fd00::1:1", 8080, "TCP", NO), ("app", "2001:db8::1", 80, "TCP", NO)]),
    "inbound-ports-include": Case({**NONE_OUT, "includeInboundPorts": "32000,31000"}, [
        ("client", "10.0.1.1", 32000, "TCP", IN), ("client", "10.0.1.1", 31000, "TCP", IN),
        ("client", "10.0.1.1", 8080, "TCP", NO), ("client", "10.0.1.1", 32000, "UDP", NO)]),
    "inbound-ports-wildcard": Case({**NONE_OUT, "includeInboundPorts": "*"}, [
        ("client", "10.0.1.1", 8080, "TCP", IN), ("client", "fd00::1:1", 22, "TCP", IN),
        ("client", "10.0.1.1", 15008, "TCP", NO)]),    # ISTIO_INBOUND --dport 15008 -j RETURN
    "inbound-wildcard-exclude": Case({**NONE_OUT, "includeInboundPorts": "*",
                                      "excludeInboundPorts": "22,80,443"}, [
        ("client", "10.0.1.1", 22, "TCP", NO), ("client", "10.0.1.1", 80, "TCP", NO),
        ("client", "10.0.1.1", 443, "TCP", NO), ("client", "10.0.1.1", 8080, "TCP", IN)]),
    # The golden has no outbound REDIRECT at all (-b unset); the RETURN of
    # the excluded ports sits first in ISTIO_OUTPUT, before the catch-all
    # REDIRECT that "*" adds (kube-virt-interfaces' golden): checked with "*".
    "outbound-ports-exclude": Case({**NONE_IN, "excludeOutboundPorts": "22,80,443",
                                    "includeOutboundIPRanges": "*"}, [
        ("app", "10.96.0.10", 80, "TCP", NO), ("app", "10.96.0.10", 22, "TCP", NO),
        ("app", "2001:db8::1", 443, "TCP", NO), ("app", "10.96.0.10", 8080, "TCP", OUT)]),
    "outbound-ports-exclude-single": Case({**NONE_IN, "excludeOutboundPorts": "22",
                                           "includeOutboundIPRanges": "*"}, [
        ("app", "10.96.0.10", 22, "TCP", NO), ("app", "10.96.0.10", 80, "TCP", OUT)]),
    # The wildcard include of kube-virt-interfaces, without the interfaces.
    "kube-virt-interfaces": Case({"includeOutboundIPRanges": "*"}, [
        ("app", "10.96.0.10", 8080, "TCP", OUT), ("app", "2001:db8::1", 80, "TCP", OUT),
        ("app", "127.0.0.1", 8080, "TCP", NO), ("proxy", "10.96.0.10", 8080, "TCP", NO),
        ("app", "10.96.0.10", 8080, "UDP", NO)]),
    # -o lo ... ! --uid-owner 1337 -j RETURN comes before the include rule:
    # an app's loopback traffic is never captured, even when included.
    "loopback-outbound-iprange": Case({**NONE_IN, "includeOutboundIPRanges": "127.1.2.3/32"}, [
        ("app", "127.1.2.3", 80, "TCP", NO),
        # and REDIRECT_DNS to 127.0.0.53: ISTIO_OUTPUT's "-o lo -p tcp ! --dport 53
        # ... -j RETURN" spares port 53, ISTIO_OUTPUT_DNS comes before
        # "-d 127.0.0.1/32 -j RETURN"
        ("app", "127.0.0.53", 53, "TCP", DNS), ("app", "127.0.0.53", 53, "UDP", DNS),
        ("proxy", "127.0.0.53", 53, "TCP", NO)], dns=True),
    "host-ipv4-loopback-cidr": Case({"includeOutboundIPRanges": "*"}, [
        ("app", "127.0.0.5", 80, "TCP", NO), ("app", "127.255.0.1", 80, "TCP", NO)]),
    # DNS (REDIRECT_DNS, our AgentConfig dns). istio-iptables redirects port
    # 53 to 15053 only towards the pod's nameservers (read from
    # /etc/resolv.conf; this golden sets 127.0.0.53 and ::127.0.0.53),
    # in ISTIO_OUTPUT_DNS, after the proxy's uid/gid RETURN and before the
    # loopback RETURN. We send every port 53 from the app (as
    # CAPTURE_ALL_DNS does, "cni/dns" below), so the nameservers' facts
    # hold; another server's are in DIFFERENCES.
    "dns-uid-gid": Case({**NONE_IN, **NONE_OUT}, [
        ("app", "127.0.0.53", 53, "UDP", DNS),       # -p udp --dport 53 -d 127.0.0.53/32 -j REDIRECT
        ("app", "127.0.0.53", 53, "TCP", DNS),       # -p tcp --dport 53 -d 127.0.0.53/32 -j REDIRECT
        ("proxy", "127.0.0.53", 53, "UDP", NO),      # -m owner --uid-owner 3 -j RETURN comes first
        ("app", "127.0.0.53", 5353, "UDP", NO),
        ("app", "::127.0.0.53", 53, "UDP", DNS),     # -p udp --dport 53 -d ::127.0.0.53/128 -j REDIRECT
        ("app", "::127.0.0.53", 53, "TCP", DNS),     # -p tcp --dport 53 -d ::127.0.0.53/128 -j REDIRECT
        ("proxy", "::127.0.0.53", 53, "UDP", NO),    # -m owner --uid-owner 3 -j RETURN comes first
        ("proxy", "::127.0.0.53", 53, "TCP", NO),
        ("app", "::127.0.0.53", 5353, "UDP", NO),
        ("app", "10.96.0.10", 80, "TCP", NO)], dns=True),  # no -i: no ISTIO_REDIRECT
    # REDIRECT_DNS with no nameserver and no CAPTURE_ALL_DNS: istio-iptables
    # turns DNS capture off (run.go warns so); the golden has no port 53
    # REDIRECT. Our counterpart is dns off.
    "ipv6-dns-uid-gid": Case({**NONE_IN, **NONE_OUT}, [
        ("app", "fd00:96::a", 53, "UDP", NO), ("app", "fd00:96::a", 53, "TCP", NO),
        ("app", "10.96.0.10", 53, "UDP", NO), ("proxy", "fd00:96::a", 53, "UDP", NO)]),
    # Istio CNI's DNS golden (cni/pkg/plugin/testdata/dns.txt.golden: a pod
    # with ISTIO_META_DNS_CAPTURE=true; the plugin sets CAPTURE_ALL_DNS):
    # -p udp/tcp --dport 53 -j REDIRECT with no -d, after the uid/gid 1337
    # RETURN; then -j ISTIO_REDIRECT for all the rest.
    "cni/dns": Case({}, [
        ("app", "10.96.0.10", 53, "UDP", DNS), ("app", "10.96.0.10", 53, "TCP", DNS),
        ("app", "8.8.8.8", 53, "UDP", DNS),
        ("proxy", "10.96.0.10", 53, "UDP", NO), ("proxy", "10.96.0.10", 53, "TCP", NO),
        ("app", "10.96.0.10", 5353, "UDP", NO), ("app", "10.96.0.10", 80, "TCP", OUT)], dns=True),
}

# Golden cases with no counterpart, and why.
NO_COUNTERPART = {
    "tproxy": "TPROXY interception (mangle table, policy routing, mark 1337): we rewrite at connect()",
    "inbound-ports-tproxy": "TPROXY interception",
    "inbound-ports-wildcard-tproxy": "TPROXY interception",
    "ipv6-virt-interfaces": "KubeVirt interfaces: capture of traffic arriving on named interfaces "
                            "(PREROUTING -i); we see sockets, not interfaces",
    "ipnets-with-kube-virt-interfaces": "KubeVirt interfaces",
    "basic-exclude-nic": "interface exclusion (-i not-istio-nic RETURN): no interfaces at connect()",
    "outbound-owner-groups": "capture by the caller's group (--gid-owner); we match the proxy uid only",
    "outbound-owner-groups-exclude": "group-based capture",
    "ipv6-dns-outbound-owner-groups": "group-based capture",
    "ipv6-dns-outbound-owner-groups-exclude": "group-based capture",
    "ipv6-dns-outbound-owner-users-exclude-outbound-owner-groups-exclude": "user/group include lists",
    "ipv6-dns-outbound-owner-users-outbound-owner-groups": "user/group include lists",
    "outbound-owner-users": "capture of listed uids only; we capture every uid but the proxy's",
    "outbound-owner-users-exclude": "uid exclude lists beyond the proxy's",
    "outbound-ports-include": "includeOutboundPorts (capture a port whatever the range): the map "
                              "ABI's outbound port rule is exclude-only",
    "ipv6-outbound-ports": "includeOutboundPorts",
    "logging": "iptables LOG rules (our counters: meshbpf_capture_connections_total)",
    "drop-invalid": "conntrack INVALID drops: no conntrack on our path",
}

# Facts where we differ from istio-iptables on purpose, with ours asserted.
DIFFERENCES = [
    # istio: -o lo ! -d 127.0.0.1 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT
    # (Envoy calling its own pod's address is captured inbound); ours: the
    # pod's own proxy is never captured into its own pod (no uid match
    # without a packet path through lo).
    ("proxy", "10.0.1.1", 8080, "TCP", NO, "istio: 15006"),
    # istio-iptables by default: port 53 to a server that is not one of the
    # pod's nameservers is left alone (UDP) or goes the TCP way (15001 when
    # in range); ours: every port 53 from the app, as CAPTURE_ALL_DNS
    # (which takes any loopback port 53 too, as we do).
    ("app", "10.96.0.10", 53, "UDP", DNS, "istio-iptables: left alone unless a nameserver"),
    ("app", "10.96.0.10", 53, "TCP", DNS, "istio-iptables: 15001 unless a nameserver"),
    ("app", "127.0.0.1", 53, "UDP", DNS, "istio-iptables: left alone unless a nameserver"),
    # istio with CAPTURE_ALL_DNS: UDP to the pod's own address:53 goes to
    # 15053 (lo's RETURN is TCP only then); ours: the pod's own address is
    # never captured.
    ("app", "10.0.1.1", 53, "UDP", NO, "istio CNI: 15053"),
]

GOLDEN = {
    "basic-exclude-nic", "dns-uid-gid", "drop-invalid", "empty", "host-ipv4-loopback-cidr",
    "inbound-ports-include", "inbound-ports-tproxy", "inbound-ports-wildcard-tproxy",
    "inbound-ports-wildcard", "inbound-wildcard-exclude", "ip-range",
    "ipnets-with-kube-virt-interfaces", "ipnets", "ipv6-dns-outbound-owner-groups-exclude",
    "ipv6-dns-outbound-owner-groups",
    "ipv6-dns-outbound-owner-users-exclude-outbound-owner-groups-exclude",
    "ipv6-dns-outbound-owner-users-outbound-owner-groups", "ipv6-dns-uid-gid",
    "ipv6-empty-inbound-ports", "ipv6-inbound-ports", "ipv6-ipnets", "ipv6-outbound-ports",
    "ipv6-uid-gid", "ipv6-virt-interfaces", "kube-virt-interfaces", "logging",
    "loopback-outbound-iprange", "outbound-owner-groups-exclude", "outbound-owner-groups",
    "outbound-owner-users-exclude", "outbound-owner-users", "outbound-ports-exclude-single",
    "outbound-ports-exclude", "outbound-ports-include", "tproxy",
}


def maps_for(case: Case) -> CaptureState:
    notes = {"sidecar.istio.io/status": "{}",
             **{f"traffic.sidecar.istio.io/{k}": v for k, v in case.annotations.items()}}
    pod = PodInfo("default", "app", "uid-app", {}, "node-a", False, {},
                  tuple(ipaddress.ip_address(a) for a in POD_IPS), notes)
    settings = pod_capture(pod, CaptureSettings(enabled=True, mesh="istio", dns=case.dns))
    return plan_capture(CaptureState(), [MeshedPod(POD_CG, settings)]).state


# Istio CNI plugin goldens checked here (cni/pkg/plugin/testdata), beside
# istio-iptables' own: the one with DNS capture, which differs from them.
CNI_GOLDEN = {"cni/dns"}


def test_every_golden_case_is_accounted_for():
    assert set(CASES) | set(NO_COUNTERPART) == GOLDEN | CNI_GOLDEN
    assert not set(CASES) & set(NO_COUNTERPART)


def loopback_or_own(dst: str, expected: int):
    """Where a captured connect goes: the proxy's DNS listener on loopback
    (REDIRECT's target for a local packet; the Istio agent listens on
    127.0.0.1:15053 only), the outbound port on the pod's own address of
    the destination's family."""
    v4 = ipaddress.ip_address(dst).version == 4
    if expected == DNS:
        return ipaddress.ip_address("127.0.0.1" if v4 else "::1")
    return ipaddress.ip_address(POD_IPS[0 if v4 else 1])


@pytest.mark.parametrize("name, who, dst, port, proto, expected", [
    (name, *fact) for name, case in CASES.items() for fact in case.facts])
def test_istio_fact(name, who, dst, port, proto, expected):
    cgroup, uid = WHO[who]
    got = decide(maps_for(CASES[name]), cgroup, uid, dst, port, proto)
    assert got.port == expected, got
    if expected in (OUT, DNS):
        assert ipaddress.ip_address(got.address) == loopback_or_own(dst, expected), got
    if expected == IN:           # the address stays, only the port changes
        assert got.address == dst


@pytest.mark.parametrize("who, dst, port, proto, ours, istio", DIFFERENCES)
def test_known_differences_from_istio_iptables(who, dst, port, proto, ours, istio):
    cgroup, uid = WHO[who]
    got = decide(maps_for(Case({}, [], dns=True)), cgroup, uid, dst, port, proto)
    assert got.port == ours, f"{got} (istio-iptables: {istio})"


UDP_FACTS = [(name, who, dst, port, expected) for name, case in CASES.items()
             for who, dst, port, proto, expected in case.facts if proto == "UDP"]


@pytest.mark.parametrize("name, who, dst, port, expected", UDP_FACTS)
def test_istio_udp_fact_holds_for_unconnected_sends(name, who, dst, port, expected):
    """-p udp --dport 53 matches every datagram, connected or not: a
    sendto() without connect() (dig's, musl's, Go's) is decided alike."""
    cgroup, uid = WHO[who]
    got = decide(maps_for(CASES[name]), cgroup, uid, dst, port, "UDP", hook="sendmsg")
    assert got.port == expected, got
    if expected == DNS:
        assert ipaddress.ip_address(got.address) == loopback_or_own(dst, expected), got


@pytest.mark.parametrize("hook", ["connect", "sendmsg"])
def test_an_ipv4_mapped_destination_goes_to_ipv4_loopback_or_the_pods_ipv4(hook):
    """An IPv6 socket's ::ffff:a.b.c.d is IPv4 on the wire: DNS goes to
    ::ffff:127.0.0.1 (REDIRECT in iptables, not ip6tables), TCP to the
    pod's IPv4 address in the same form."""
    state = maps_for(Case({"includeOutboundIPRanges": "*"}, [], dns=True))
    got = decide(state, *WHO["app"], "::ffff:10.96.0.10", 53, "UDP", hook=hook)
    assert (got.port, ipaddress.ip_address(got.address)) == (DNS, ipaddress.ip_address("::ffff:127.0.0.1"))
    got = decide(state, *WHO["app"], "::ffff:10.96.0.10", 80)
    assert (got.port, ipaddress.ip_address(got.address)) == (OUT, ipaddress.ip_address("::ffff:10.0.1.1"))
    assert decide(state, *WHO["app"], "::ffff:10.0.1.1", 53, "UDP", hook=hook).port == NO  # its own


@pytest.mark.parametrize("dns, expected", [(False, NO), (True, DNS)], ids=["dns-off", "dns-on"])
def test_unconnected_dns_is_captured_only_when_asked(dns, expected):
    state = maps_for(Case({"includeOutboundIPRanges": "*"}, [], dns=dns))
    cgroup, uid = WHO["app"]
    for dst in ("10.96.0.10", "fd00:96::a"):
        assert decide(state, cgroup, uid, dst, 53, "UDP", hook="sendmsg").port == expected
        assert decide(state, cgroup, uid, dst, 5353, "UDP", hook="sendmsg").port == NO


def test_an_unknown_hook_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"^capture decision: unknown hook 'bind' \(known: "):
        decide(maps_for(Case({}, [])), *WHO["app"], "10.96.0.10", 53, "UDP", hook="bind")
