"""Socket-LB tests that need a lab and agent of their own: "no iptables rules,
no conntrack entries" (it turns conntrack on in the client pod) and reverse
NAT under connection churn (its own map size). README's other socket-LB
claims are in test_socket_lb.py."""

from __future__ import annotations

import ctypes as ct
import json
import os

import pytest

from meshbpf.datapath import libbpf

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


def _conn_rnat_entries(bpffs) -> int:
    fd = libbpf.obj_get(str(bpffs / "mbpf_conn_rnat"))
    try:
        return libbpf.map_count(fd, ct.sizeof(ct.c_uint64))
    finally:
        os.close(fd)


@pytest.mark.needs_feature("conn_rnat")
def test_connection_table_entries_go_with_their_sockets(lab, probe, bpffs, start_agent):
    """A connected socket's reverse NAT sits in mbpf_conn_rnat, keyed by its
    cookie; the sock_release hook deletes it when the socket goes, so the
    table holds the open connections only (else it would fill, and every
    connect() after would pay for socket storage)."""
    start_agent(web_service(lab))
    assert _conn_rnat_entries(bpffs) == 0
    held = [probe.popen("client", "hold", "10.96.0.10", 80, "stdin") for _ in range(3)]
    try:
        for h in held:
            assert json.loads(h.stdout.readline())["first"].startswith("web-")
        assert probe("client", "peername", "10.96.0.10", 80)["peer"] == ["10.96.0.10", 80]
        assert _conn_rnat_entries(bpffs) == 3  # the held ones; the peername probe's is gone
    finally:
        for h in held:
            h.communicate("\n", timeout=10)
    assert _conn_rnat_entries(bpffs) == 0


@pytest.mark.needs_feature("conn_rnat")
@pytest.mark.needs_feature("sk_storage")
def test_getpeername_when_the_connection_table_is_full(lab, probe, bpffs, start_agent):
    """With room for 4 connections in mbpf_conn_rnat, ten held ones and 200
    newer ones still all show the service: socket storage takes the rest."""
    start_agent(web_service(lab), "--map-size", "mbpf_conn_rnat=4")
    result = probe("client", "peername-after-churn", "10.96.0.10", 80, 10, 200)
    assert result["peers"] == ["10.96.0.10:80"]
    assert _conn_rnat_entries(bpffs) == 0
