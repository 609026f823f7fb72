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
        def load(cls, bpffs, devices, *, netns=None, table_size=16381, mode="auto", map_sizes=None):
            if cls.fail is not None:
                raise cls.fail
            dp = cls()
            loads.append((devices, netns, table_size, dp))
            return dp

    module = types.ModuleType("meshbpf.datapath.northsouth")
    module.NorthSouthDatapath = NorthSouthDatapath
    monkeypatch.setitem(sys.modules, "meshbpf.datapath.northsouth", module)
    monkeypatch.setattr(agent_mod, "node_context", lambda name, devices, netns: NODE)
    monkeypatch.setattr(agent_mod, "default_route_devices", lambda netns: ["ext0"] if netns else ["eth0"])
    NorthSouthDatapath.loads = loads
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
