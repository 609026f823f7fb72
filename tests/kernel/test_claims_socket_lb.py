"""Socket-LB tests that need a lab and agent of their own: "no iptables rules,
no conntrack entries" (it turns conntrack on in the client pod) and reverse
NAT under connection churn (its own map size). README's other socket-LB
claims are in test_socket_lb.py."""

from __future__ import annotations

import pytest

from .conftest import Load, web_service

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
