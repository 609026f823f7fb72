"""README's socket-LB claims that had no test of their own: reverse NAT for
UDP over IPv6, IPv4 Services reached from IPv6 sockets, and "no iptables
rules, no conntrack entries", each with real traffic in lab pods."""

from __future__ import annotations

import pytest

from . import k8s
from .conftest import Load, web_service

DNS_V4, DNS_V6 = "10.96.0.53", "fd00:96::53"


def _dual_stack_dns(lab, pods) -> list[dict]:
    ports = [k8s.port("dns", 53, 53, "UDP")]
    slice_ports = [k8s.slice_port("dns", 53, "UDP")]
    return [
        k8s.service("dns", [DNS_V4, DNS_V6], ports, namespace="kube-system"),
        k8s.endpoint_slice("dns-v4", "dns", [k8s.endpoint(str(lab.pods[p].ipv4)) for p in pods],
                           slice_ports, namespace="kube-system"),
        k8s.endpoint_slice("dns-v6", "dns", [k8s.endpoint(str(lab.pods[p].ipv6)) for p in pods],
                           slice_ports, namespace="kube-system", address_type="IPv6"),
    ]


def test_udp_replies_over_ipv6_and_to_ipv4_mapped_sockets_come_from_the_service(
        lab, probe, dns_pods, start_agent):
    """recvmsg6 turns the backend's address back into the Service's: for an
    IPv6 Service, and for an IPv4 Service asked from an AF_INET6 socket as
    ::ffff:a.b.c.d (one lookup path serves both, README "Maps")."""
    start_agent(_dual_stack_dns(lab, dns_pods))
    for service in (DNS_V6, f"::ffff:{DNS_V4}"):
        for connected in ("no", "yes"):
            reply = probe("client", "udp-peer", service, 53, connected)
            assert reply["from"] == [service, 53], (service, connected, reply)
            assert reply["txt"] in dns_pods, reply


def test_ipv4_service_from_an_ipv6_socket(lab, probe, start_agent):
    start_agent(web_service(lab))
    mapped = "::ffff:10.96.0.10"
    result = probe("client", "whoami", mapped, 80, 40)
    assert result["errors"] == {} and len(result["answers"]) >= 2, result
    assert probe("client", "peername", mapped, 80)["peer"] == [mapped, 80]


@pytest.mark.needs_feature("sk_storage")
def test_getpeername_survives_connection_churn(lab, probe, start_agent):
    """TCP keeps its translation in socket storage, freed with the socket,
    so many newer connections cannot push out a live one's entry (the LRU
    reverse-NAT map is for unconnected UDP only, and is tiny here)."""
    start_agent(web_service(lab), "--map-size", "mbpf_rnat=16")
    result = probe("client", "peername-after-churn", "10.96.0.10", 80, 10, 200)
    assert result["peers"] == ["10.96.0.10:80"]


def _netfilter_rules(lab, pod) -> dict[str, str]:
    """What iptables (both back ends) and nft hold in a namespace (None: the
    lab's node); only read."""
    out = {}
    for tool in (["iptables-save"], ["ip6tables-save"], ["iptables-legacy-save"], ["nft", "list", "ruleset"]):
        r = lab.run(pod, tool, in_cgroup=False)
        assert r.returncode == 0, r.stderr
        out[" ".join(tool)] = r.stdout.strip()
    return out


def test_no_iptables_rules_and_no_conntrack_entries(lab, probe, start_agent):
    start_agent(web_service(lab))
    load = Load(probe, "client", "10.96.0.10", 80)
    try:
        # While Service traffic flows, neither the client pod nor the node has
        # a single netfilter rule: meshbpf installs none.
        for where in ("client", None):
            rules = _netfilter_rules(lab, where)
            assert all(text == "" for text in rules.values()), (where, rules)
    finally:
        assert load.stop()["errors"] == {}

    # Conntrack tracks a namespace only once a rule there needs it. Turn it on
    # in the client pod (our own table, in our own namespace), then connect to
    # the Service: the kernel tracks the connections, and every one is to a
    # backend, untranslated, since the Service address never reached the stack.
    nft = ["nft", "add table inet mbpftest ; "
           "add chain inet mbpftest out { type filter hook output priority 0 ; } ; "
           "add rule inet mbpftest out ct state new counter"]
    r = lab.run("client", nft, in_cgroup=False)
    assert r.returncode == 0, r.stderr
    result = probe("client", "whoami", "10.96.0.10", 80, 20)
    assert result["errors"] == {}, result
    tracked = lab.run("client", ["conntrack", "-L", "-p", "tcp"], in_cgroup=False)
    assert tracked.returncode == 0, tracked.stderr
    entries = [line for line in tracked.stdout.splitlines() if "dport=" in line]
    assert len(entries) >= 20, tracked.stdout  # conntrack saw the connections
    assert all("dport=8080" in e and "10.96.0.10" not in e for e in entries), tracked.stdout
    nat = lab.run("client", ["conntrack", "-L", "--dst-nat"], in_cgroup=False)
    assert "dport=" not in nat.stdout, nat.stdout
