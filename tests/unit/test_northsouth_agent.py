"""The agent's north-south wiring, with a fake datapath (no root, no BPF):
when it starts and on which devices, the maps it syncs, a failure that
leaves load balancing going on."""

from __future__ import annotations

import ipaddress
import logging
import sys
import types

import pytest

import meshbpf.agent as agent_mod
import meshbpf.sync.northsouth as sync_mod
from k8s_builders import build, endpoint_slice, ep, service
from meshbpf.reconcile.northsouth import NodeContext
from test_agent_loop import FakeSource, make_agent  # noqa: F401 (fixture)
from test_northsouth_sync import FakeMaps

NODE = NodeContext("node-a", (ipaddress.ip_address("10.243.0.11"),), ipaddress.ip_address("10.243.0.11"))


def lb_state():
    svc = service("web", "10.96.0.10", type="NodePort",
                  ports=[{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080, "nodePort": 30080}])
    result = build(svc, endpoint_slice("w", "web", [ep("10.244.0.5")]), node_name="node-a")
    assert result.problems == []
    return result.state


@pytest.fixture
def fake_dp(monkeypatch):
    """meshbpf.datapath.northsouth as ns_shared.md specifies it, faked."""
    loads: list[tuple] = []

    class NorthSouthDatapath:
        fail: Exception | None = None

        def __init__(self):
            self.maps = FakeMaps()
            self.mode = "tc"

        @classmethod
        def load(cls, bpffs, devices, *, netns=None, table_size=16381, mode="auto", map_sizes=None,
                 reserve_snat_ports=None):
            if cls.fail is not None:
                raise cls.fail
            dp = cls()
            loads.append((devices, netns, table_size, dp))
            cls.reserved.append(reserve_snat_ports)
            return dp

    module = types.ModuleType("meshbpf.datapath.northsouth")
    module.NorthSouthDatapath = NorthSouthDatapath
    monkeypatch.setitem(sys.modules, "meshbpf.datapath.northsouth", module)
    monkeypatch.setattr(agent_mod, "node_context", lambda name, devices, netns: NODE)
    monkeypatch.setattr(sync_mod, "default_route_devices", lambda netns: ["ext0"] if netns else ["eth0"])
    NorthSouthDatapath.loads = loads
    NorthSouthDatapath.reserved = []
    return NorthSouthDatapath


def test_devices_given_start_it_and_the_loop_programs_the_maps(make_agent, fake_dp):
    agent = make_agent(FakeSource(lb_state()), devices=["ext9"], maglev_table_size=251)
    agent._start_north_south()
    ((devices, netns, size, dp),) = fake_dp.loads
    assert (devices, netns, size) == (["ext9"], None, 251)
    agent.step()
    assert len(dp.maps.state.frontends) == 2 and dp.maps.state.cfg.enabled == 1
    assert agent.metrics.registry.get_sample_value("meshbpf_northsouth_frontends") == 2
    assert agent.health_details()["northsouth_stale"] is False


def test_snat_ports_are_reserved_and_reach_the_maps(make_agent, fake_dp):
    """The SNAT range goes to the datapath to reserve (in the devices'
    netns) and, through the node's context, into mbpf_ns_cfg."""
    agent = make_agent(FakeSource(lb_state()), devices=["ext9"], node_netns="mbl-x-node",
                       snat_ports=(62000, 62999))
    agent._start_north_south()
    agent.step()
    assert fake_dp.reserved == [(62000, 62999)]
    (dp,) = [d for _, _, _, d in fake_dp.loads]
    cfg = dp.maps.state.cfg
    assert (cfg.snat_port_min, cfg.snat_port_max) == (62000, 62999)


def test_no_reserve_snat_ports_leaves_the_sysctl_alone(make_agent, fake_dp):
    agent = make_agent(FakeSource(lb_state()), devices=["ext9"], reserve_snat_ports=False)
    agent._start_north_south()
    agent.step()
    assert fake_dp.reserved == [None]
    (dp,) = [d for _, _, _, d in fake_dp.loads]
    assert (dp.maps.state.cfg.snat_port_min, dp.maps.state.cfg.snat_port_max) == (61000, 65535)


def test_default_is_off_outside_a_node_netns_and_never_touches_the_hosts_devices(make_agent, fake_dp):
    agent = make_agent(FakeSource(lb_state()))
    agent._start_north_south()
    agent.step()
    assert fake_dp.loads == [] and agent.ns_devices == []


def test_default_in_a_node_netns_uses_its_default_route_devices(make_agent, fake_dp):
    agent = make_agent(FakeSource(lb_state()), node_netns="mbl-x-node")
    agent._start_north_south()
    assert [(d, n) for d, n, _, _ in fake_dp.loads] == [(["ext0"], "mbl-x-node")]


def test_no_north_south_wins_over_devices(make_agent, fake_dp):
    agent = make_agent(FakeSource(lb_state()), devices=["ext9"], north_south=False)
    agent._start_north_south()
    assert fake_dp.loads == []


def test_a_datapath_that_fails_to_load_is_one_line_and_load_balancing_goes_on(make_agent, fake_dp, caplog):
    fake_dp.fail = OSError(1, "Operation not permitted")
    agent = make_agent(FakeSource(lb_state()), devices=["ext9"])
    with caplog.at_level(logging.ERROR):
        agent._start_north_south()
    agent.step()
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(lines) == 1 and "north-south load balancing not started" in lines[0]
    assert agent.ready()


def test_rows_follow_the_table_size_of_the_pinned_maps(make_agent, fake_dp, monkeypatch):
    """A previous agent pinned mbpf_maglev with another M: rows of its size."""
    monkeypatch.setattr(FakeMaps, "table_size", 509, raising=False)
    agent = make_agent(FakeSource(lb_state()), devices=["ext9"], maglev_table_size=251)
    agent._start_north_south()
    agent.step()
    (dp,) = [d for _, _, _, d in fake_dp.loads]
    assert {len(row) for row in dp.maps.state.tables.values()} == {509}


def test_no_north_south_turns_a_previous_agents_programs_off(make_agent, fake_dp, tmp_path):
    """The pinned maps a north-south agent left: --no-north-south sets
    enabled 0 (the programs pass everything) and keeps every entry."""
    agent = make_agent(FakeSource(lb_state()), devices=["ext9"], bpffs=tmp_path)
    agent._start_north_south()
    agent.step()
    (_, _, _, dp) = fake_dp.loads[0]
    held = dp.maps.state
    (tmp_path / "mbpf_ns_cfg").touch()
    module = sys.modules["meshbpf.datapath.northsouth"]
    module.NorthSouthMaps = lambda bpffs: types.SimpleNamespace(
        read=dp.maps.read, apply=dp.maps.apply, close=lambda: None)
    later = make_agent(FakeSource(lb_state()), devices=["ext9"], north_south=False, bpffs=tmp_path)
    later._start_north_south()
    assert len(fake_dp.loads) == 1
    assert held.cfg.enabled == 0 and len(held.frontends) == 2


def test_every_cluster_ip_when_asked(make_agent, fake_dp):
    state = lb_state()
    plain = build(service("plain", "10.96.0.12"), endpoint_slice("p", "plain", [ep("10.244.0.7")]),
                  node_name="node-a").state
    state.service_ports.update(plain.service_ports)
    agent = make_agent(FakeSource(state), devices=["ext9"], north_south_cluster_ips="all")
    agent._start_north_south()
    agent.step()
    (_, _, _, dp) = fake_dp.loads[0]
    assert len(dp.maps.state.frontends) == 3


def test_the_socket_lb_holds_the_node_port_at_the_node_addresses_and_follows_them(make_agent, fake_dp,
                                                                                  monkeypatch):
    """Issue 12, hairpin: a pod's connect() to <node address>:<nodePort> is the
    socket-LB's; a new node address (read on the resync) replans it."""
    from meshbpf.reconcile import SvcKey, addr16
    from test_agent_loop import step_until

    def node_port_at(address: str) -> SvcKey:
        return SvcKey(addr16(ipaddress.ip_address(address)), 30080, 6)

    agent = make_agent(FakeSource(lb_state()), devices=["ext9"], resync_interval=0.05)
    agent._start_north_south()
    agent.step()
    assert node_port_at("10.243.0.11") in agent.lbsync.maps.state.services
    moved = NodeContext("node-a", (ipaddress.ip_address("10.243.0.21"),), ipaddress.ip_address("10.243.0.21"))
    monkeypatch.setattr(agent_mod, "node_context", lambda name, devices, netns: moved)
    step_until(agent, lambda: node_port_at("10.243.0.21") in agent.lbsync.maps.state.services)
    assert node_port_at("10.243.0.11") not in agent.lbsync.maps.state.services


def test_without_north_south_the_socket_lb_holds_the_cluster_ip_only(make_agent, fake_dp):
    agent = make_agent(FakeSource(lb_state()))
    agent._start_north_south()
    agent.step()
    assert len(agent.lbsync.maps.state.services) == 1
