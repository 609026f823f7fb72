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
from meshbpf.datapath.layout import LB_MAPS, ConnSlotC
from meshbpf.datapath.maps import count_entries

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


def _connections(bpffs, name: str) -> int:
    """Connections the table holds: mbpf_conn_slot's held slots, or
    mbpf_conn_rnat's entries."""
    spec = next(m for m in LB_MAPS if m.name == name)
    fd = libbpf.open_pinned(str(bpffs / name), spec.key, spec.value)
    try:
        return count_entries(fd, spec)
    finally:
        os.close(fd)


def _slot_holders(bpffs) -> list[int]:
    fd = libbpf.open_pinned(str(bpffs / "mbpf_conn_slot"), ct.c_uint32, ConnSlotC)
    try:
        return [slot.cookie for slot in libbpf.array_values(fd, ConnSlotC)]
    finally:
        os.close(fd)


# The hash is what kernels before 5.12 use (no compare-and-swap), forced
# here; the slots are this kernel's.
TABLES = [pytest.param("mbpf_conn_rnat", marks=pytest.mark.needs_feature("conn_rnat"), id="hash"),
          pytest.param("mbpf_conn_slot", marks=pytest.mark.needs_feature("conn_slots"), id="slots")]


@pytest.mark.parametrize("table", TABLES)
def test_connection_table_entries_go_with_their_sockets(lab, probe, bpffs, start_agent, monkeypatch, table):
    """A connected socket's reverse NAT sits in the connection table, keyed
    by its cookie; the sock_release hook frees it when the socket goes, so
    the table holds the open connections only (else it would fill, and every
    connect() after would pay for socket storage)."""
    if table == "mbpf_conn_rnat":
        monkeypatch.setenv("MESHBPF_DISABLE_FEATURES", "conn_slots")
    start_agent(web_service(lab))
    assert _connections(bpffs, table) == 0
    held = [probe.popen("client", "hold", "10.96.0.10", 80, "stdin") for _ in range(3)]
    try:
        for h in held:
            assert json.loads(h.stdout.readline())["first"].startswith("web-")
        assert probe("client", "peername", "10.96.0.10", 80)["peer"] == ["10.96.0.10", 80]
        assert _connections(bpffs, table) == 3  # the held ones; the peername probe's is gone
    finally:
        for h in held:
            h.communicate("\n", timeout=10)
    assert _connections(bpffs, table) == 0


@pytest.mark.parametrize("table", TABLES)
@pytest.mark.needs_feature("sk_storage")
def test_getpeername_when_the_connection_table_is_full(lab, probe, bpffs, start_agent, monkeypatch, table):
    """With room for 4 connections in the table, ten held ones and 200
    newer ones still all show the service: socket storage takes the rest."""
    if table == "mbpf_conn_rnat":
        monkeypatch.setenv("MESHBPF_DISABLE_FEATURES", "conn_slots")
    start_agent(web_service(lab), "--map-size", f"{table}=4")
    result = probe("client", "peername-after-churn", "10.96.0.10", 80, 10, 200)
    assert result["peers"] == ["10.96.0.10:80"]
    assert _connections(bpffs, table) == 0


def _hold(probe) -> tuple[object, int]:
    """A held connection to the web Service, and its socket cookie."""
    h = probe.popen("client", "hold-peer", "10.96.0.10", 80)
    first = json.loads(h.stdout.readline())
    assert first["peer"] == ["10.96.0.10", 80], first
    return h, first["cookie"]


def _release(h) -> list:
    """Closes a held connection; what its getpeername() said last."""
    out, _ = h.communicate("\n", timeout=10)
    return json.loads(out.splitlines()[-1])["peer"]


@pytest.mark.needs_feature("conn_slots")
def test_a_held_slot_sends_the_colliding_socket_to_socket_storage(lab, probe, bpffs, start_agent):
    """One slot: the first connection claims it (its cookie is in it), the
    second finds it held and keeps its reverse NAT in socket storage; both
    show the service, and the slot is freed by its holder's close only."""
    start_agent(web_service(lab), "--map-size", "mbpf_conn_slot=1")
    first, first_cookie = _hold(probe)
    second, second_cookie = _hold(probe)
    try:
        assert _slot_holders(bpffs) == [first_cookie] != [second_cookie]
    finally:
        assert _release(first) == ["10.96.0.10", 80]
    assert _slot_holders(bpffs) == [0]
    assert _release(second) == ["10.96.0.10", 80]
    assert _slot_holders(bpffs) == [0]
    third, third_cookie = _hold(probe)  # the slot is free again
    assert _slot_holders(bpffs) == [third_cookie]
    _release(third)


@pytest.mark.needs_feature("conn_slots")
def test_an_upgrade_to_the_slots_keeps_and_then_frees_the_hash_entries(lab, probe, bpffs, start_agent,
                                                                     monkeypatch):
    """A connection made under a build with the hash (before 5.12, or an
    earlier release) keeps its getpeername() through the upgrade to the
    slots, and its hash entry goes when it closes; new connections take
    slots."""
    monkeypatch.setenv("MESHBPF_DISABLE_FEATURES", "conn_slots")
    old = start_agent(web_service(lab))
    before, _ = _hold(probe)
    assert _connections(bpffs, "mbpf_conn_rnat") == 1
    old.stop()
    monkeypatch.delenv("MESHBPF_DISABLE_FEATURES")
    start_agent()
    after, after_cookie = _hold(probe)
    assert after_cookie in _slot_holders(bpffs)
    assert _connections(bpffs, "mbpf_conn_rnat") == 1
    assert _release(before) == ["10.96.0.10", 80]
    assert _connections(bpffs, "mbpf_conn_rnat") == 0
    assert _release(after) == ["10.96.0.10", 80]
    assert _connections(bpffs, "mbpf_conn_slot") == 0
