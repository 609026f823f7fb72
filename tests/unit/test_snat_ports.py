"""North-south SNAT ports (issue 12): the --snat-ports range, its
reservation in net.ipv4.ip_local_reserved_ports (the value's arithmetic;
writing it is tests/kernel's, in a lab node's netns), the planner carrying
it into mbpf_ns_cfg, and the mirror of the datapath's port choice. No root."""

from __future__ import annotations

import dataclasses
import ipaddress

import pytest
from click.testing import CliRunner

import meshbpf.cli.agent_cmd as agent_cmd
from meshbpf.datapath import reserved_ports as rp
from meshbpf.model import DesiredState
from meshbpf.reconcile.northsouth import NodeContext, plan
from meshbpf.reconcile.northsouth_keys import (DEFAULT_SNAT_PORTS, SNAT_PORT_TRIES, NorthSouthState,
                                               flow_hash, parse_port_range, snat_port_tries)


@pytest.mark.parametrize("text, want", [("61000-65535", (61000, 65535)), ("40000", (40000, 40000)),
                                        (" 1-65535 ", (1, 65535))])
def test_port_ranges_parse(text, want):
    assert parse_port_range(text) == want


@pytest.mark.parametrize("text", ["", "a-b", "0-10", "10-5", "60000-70000", "1-2-3"])
def test_bad_port_ranges_are_refused(text):
    with pytest.raises(ValueError):
        parse_port_range(text)


@pytest.mark.parametrize("before, after", [
    ("", "61000-65535"),
    ("8080", "8080,61000-65535"),
    ("60000-61500", "60000-65535"),          # merged with what overlaps
    ("64000,65000-65535", "61000-65535"),
])
def test_reserving_adds_the_range_to_what_is_there(before, after):
    assert rp.with_range(before, (61000, 65535)) == after


@pytest.mark.parametrize("before", ["61000-65535", "1024-65535", "60000-62000,62001-65535"])
def test_reserving_a_reserved_range_changes_nothing(before):
    assert rp.with_range(before, (61000, 65535)) is None


def test_the_planner_writes_the_nodes_snat_ports_into_the_cfg():
    node = NodeContext("n", (ipaddress.ip_address("10.0.0.1"),), ipaddress.ip_address("10.0.0.1"),
                       snat_ports=(62000, 62999))
    result = plan(DesiredState(), node, NorthSouthState())
    assert (result.state.cfg.snat_port_min, result.state.cfg.snat_port_max) == (62000, 62999)
    default = plan(DesiredState(), NodeContext("n"), NorthSouthState())
    assert (default.state.cfg.snat_port_min, default.state.cfg.snat_port_max) == DEFAULT_SNAT_PORTS
    # a changed range is one cfg write
    again = plan(DesiredState(), dataclasses.replace(node, snat_ports=DEFAULT_SNAT_PORTS), result.state)
    assert [s.map for s in again.steps] == ["cfg"]


def test_the_tries_stay_in_the_range_and_differ():
    for h in (0, 1, 4535, 4536, 2**32 - 1, flow_hash(bytes(16), bytes(16), 40000, 30080, 6)):
        tries = snat_port_tries(h)
        assert len(tries) == SNAT_PORT_TRIES == len(set(tries))
        assert all(61000 <= p <= 65535 for p in tries)
    assert all(40000 <= p <= 40007 for p in snat_port_tries(12345, (40000, 40007)))


def _agent_args(monkeypatch, *args):
    seen = {}
    monkeypatch.setattr(agent_cmd, "run_agent", lambda opts: seen.setdefault("opts", opts))
    result = CliRunner().invoke(agent_cmd.agent, ["--config", "/nonexistent.yaml", *args])
    return result, seen.get("opts")


def test_the_agent_flags(monkeypatch):
    result, opts = _agent_args(monkeypatch)
    assert result.exit_code == 0, result.output
    assert (opts.snat_ports, opts.reserve_snat_ports) == ((61000, 65535), True)
    result, opts = _agent_args(monkeypatch, "--snat-ports", "50000-50999", "--no-reserve-snat-ports")
    assert result.exit_code == 0, result.output
    assert (opts.snat_ports, opts.reserve_snat_ports) == ((50000, 50999), False)


@pytest.mark.parametrize("value", ["65535-61000", "x", "61000-61003"])
def test_bad_snat_ports_flags_are_refused(monkeypatch, value):
    result, opts = _agent_args(monkeypatch, "--snat-ports", value)
    assert result.exit_code == 2 and opts is None
    assert "--snat-ports" in result.output
