"""bench/policy_rules.py: the iptables/ipset and nftables baselines of the
NetworkPolicy benchmark enforce what the policies say (checked here line by
line for small cases), so the comparison with meshbpf is honest."""

from __future__ import annotations

import ipaddress
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import policy_rules as rules  # noqa: E402
import policy_world  # noqa: E402  (tests/unit: the e2e suite's builders)
import policy_cluster as world  # noqa: E402

NODE = "n1"


def pod(ns, name, labels, ip, node=NODE):
    return world.pod(ns, name, labels, node, [ip])


def netpol(ns, name, selector, ingress=None, egress=None, types=("Ingress",)):
    return policy_world.netpol(name, ns, {"matchLabels": selector}, ingress=ingress, egress=egress,
                               types=list(types))


def cluster(*policies):
    return [world.namespace("x", "a"), world.namespace("y", "b"),
            pod("x", "srv", {"app": "srv"}, "10.0.0.2"),
            pod("x", "cli", {"app": "cli"}, "10.0.0.3"),
            pod("y", "cli", {"app": "cli"}, "10.0.1.3", node="n2"),   # remote, other namespace
            pod("x", "far", {"app": "cli"}, "10.0.2.3", node="n2"),   # remote, same namespace
            *policies]


ALLOW = netpol("x", "allow", {"app": "srv"}, ingress=[
    {"from": [{"podSelector": {"matchLabels": {"app": "cli"}}},
              {"ipBlock": {"cidr": "192.168.0.0/16", "except": ["192.168.1.0/24"]}}],
     "ports": [{"protocol": "TCP", "port": 80}, {"protocol": "UDP", "port": 5000, "endPort": 5010}]}])


def test_ingress_policy_as_kube_router_lays_it_out():
    lay = rules.layout(cluster(ALLOW), NODE)
    ipt = rules.iptables_restore(lay).splitlines()
    ipset = rules.ipset_restore(lay).splitlines()
    (chain, (direction, _)), = lay.policy_chains.items()
    assert direction == "Ingress"
    (pod_chain, policies), = lay.pod_chains.values()
    assert policies == [chain] and (("Ingress", "10.0.0.2") in lay.pod_chains)
    # conntrack first, then the pod's dispatch on its IP
    start = ipt.index("-A KUBE-ROUTER-FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT")
    assert ipt.index(f"-A KUBE-ROUTER-FORWARD -d 10.0.0.2/32 -j {pod_chain}") > start
    # the selector peer is every pod of x labelled app=cli, on every node; not y's
    src = next(l.split()[1] for l in ipset if l.startswith("create KUBE-SRC-"))
    assert sorted(l.split()[2] for l in ipset if l.startswith(f"add {src} ")) == ["10.0.0.3", "10.0.2.3"]
    net = next(l.split()[1] for l in ipset if l.startswith("create KUBE-SRCN-"))
    assert f"add {net} 192.168.0.0/16" in ipset and f"add {net} 192.168.1.0/24 nomatch" in ipset
    mark = "-j MARK --set-xmark 0x10000/0x10000"
    for s in (src, net):
        assert f"-A {chain} -m set --match-set {s} src -p tcp -m tcp --dport 80 {mark}" in ipt
        assert f"-A {chain} -m set --match-set {s} src -p udp -m udp --dport 5000:5010 {mark}" in ipt
    assert [l for l in ipt if l.startswith(f"-A {pod_chain} ")][-1] == (f"-A {pod_chain} -m comment --comment \"default deny ingress 10.0.0.2\" "
                       "-m mark ! --mark 0x10000/0x10000 -j DROP")


def test_nftables_equivalent():
    lay = rules.layout(cluster(ALLOW), NODE)
    nft = rules.nft_script(lay)
    chain = rules._nft_name(next(iter(lay.policy_chains)))
    src = rules._nft_name(next(iter(lay.ip_sets)))
    net = rules._nft_name(next(iter(lay.net_sets)))
    assert f"set {src} {{ type ipv4_addr; elements = {{ 10.0.0.3, 10.0.2.3 }}; }}" in nft
    # except carved out of the interval set: 192.168.0.0/16 minus 192.168.1.0/24
    carved = "192.168.0.0/24, 192.168.2.0/23, 192.168.4.0/22, 192.168.8.0/21, 192.168.16.0/20, " \
             "192.168.32.0/19, 192.168.64.0/18, 192.168.128.0/17"
    assert f"set {net} {{ type ipv4_addr; flags interval; elements = {{ {carved} }}; }}" in nft
    assert f"ip saddr @{src} udp dport 5000-5010 meta mark set meta mark | 0x10000 return" in nft
    pod_chain = rules._nft_name(next(iter(lay.pod_chains.values()))[0])
    assert f"10.0.0.2 : jump {pod_chain}" in nft
    lines = [l.strip() for l in nft.splitlines()]
    assert lines.index("ct state established,related accept") < lines.index("ip daddr vmap @pods_ingress")
    assert f"jump {chain}" in lines and "meta mark & 0x10000 == 0 drop" in lines


def test_egress_any_peer_and_protocol_only():
    pol = netpol("x", "out", {"app": "cli"}, egress=[{"ports": [{"protocol": "UDP"}]}], types=("Egress",))
    lay = rules.layout(cluster(pol), NODE)
    (chain, policies), = lay.pod_chains.values()
    assert ("Egress", "10.0.0.3") in lay.pod_chains
    ipt = rules.iptables_restore(lay)
    assert f"-A KUBE-ROUTER-FORWARD -s 10.0.0.3/32 -j {chain}" in ipt
    assert f"-A {policies[0]} -p udp -j MARK --set-xmark 0x10000/0x10000" in ipt
    assert "ip saddr vmap @pods_egress" in rules.nft_script(lay)
    assert "meta l4proto udp meta mark set" in rules.nft_script(lay)


def test_only_this_nodes_pods_get_chains_and_no_policy_no_chain():
    pol = netpol("x", "far", {"app": "cli"}, ingress=[])   # selects x/cli (local) and x/far (remote)
    lay = rules.layout(cluster(pol), NODE)
    assert list(lay.pod_chains) == [("Ingress", "10.0.0.3")]
    assert rules.layout(cluster(), NODE).pod_chains == {}


def test_named_port_is_refused_with_one_line():
    pol = netpol("x", "named", {"app": "srv"}, ingress=[{"ports": [{"port": "http"}]}])
    with pytest.raises(rules.TranslateError, match=r"^NetworkPolicy x/named: named port 'http' .*translator$"):
        rules.layout(cluster(pol), NODE)


def test_benchmark_world_allows_only_the_client_on_the_twin():
    labpods = {f"bench/{n}": type("P", (), {"ipv4": ipaddress.ip_address(f"10.244.0.{i}"),
                                             "ipv6": ipaddress.ip_address(f"fd00:244::{i}"), "uid": f"u{i}"})
               for i, n in enumerate(("srv", "cli", "srv-twin", "cli-twin"), start=2)}
    objs = world.namespaces() + world.lab_pods(labpods) + world.remote_pods(100) + world.selecting_policies(5)
    lay = rules.layout(objs, world.TWIN_NODE)
    (chain, policies), = lay.pod_chains.values()
    assert ("Ingress", "10.244.0.4") in lay.pod_chains and len(policies) == 5
    last = lay.policy_chains[policies[-1]][1]
    assert [p for _, p in last] == ["tcp 8080", "tcp 8081"]
    assert lay.ip_sets[last[0][0].ips] == ["10.244.0.3", "10.244.0.5"]   # cli and cli-twin
