"""Formatting and plumbing of the NetworkPolicy views, without a kernel:
monitor lines and filters, the one-reader lease, the maps-only fallback
tables, the policy metrics and the agent's JSON views over HTTP."""

from __future__ import annotations

import ipaddress
import json
import urllib.error
import urllib.request

import click
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily

from meshbpf.cli import monitor_cmd
from meshbpf.cli.endpoint_cmd import pinned_endpoints
from meshbpf.cli.monitor_cmd import EventLease, matches, table_line
from meshbpf.cli.policy_cmd import _port_text, pinned_rules
from meshbpf.health import HealthServer
from meshbpf.metrics import policy_metrics
from meshbpf.reconcile import addr16
from meshbpf.reconcile.policy_keys import (DIR_IN, EP_ISOLATE_IN, PEER_ANY_PORT, EpVal, PeerKey,
                                           PeerVal, PolicyState, PortKey, PortVal)


def _event(**kw) -> dict:
    base = {"src": "10.244.0.2:40000", "dst": "10.244.0.3:8080", "src_pod": "x/a", "dst_pod": "x/b",
            "pod": "x/b", "verdict": "allow", "direction": "ingress", "protocol": "TCP",
            "rule": 7, "rule_name": "x/allow-a/ingress/0"}
    return {**base, **kw}


def test_table_line_names_pods_and_the_rule_that_decided():
    line = table_line(_event())
    assert "ALLOW" in line and "10.244.0.2:40000 (x/a)" in line and "10.244.0.3:8080 (x/b)" in line
    assert line.rstrip().endswith("x/allow-a/ingress/0")
    assert table_line(_event(rule_name=None)).rstrip().endswith("rule 7")  # no agent: the id
    assert table_line(_event(rule=0, rule_name="")).rstrip().endswith("(not isolated)")
    assert table_line(_event(verdict="deny", rule=0)).rstrip().endswith("(no rule allows)")
    assert table_line(_event(verdict="spoofed", rule=0, src_pod=None)).rstrip().endswith("drop: spoofed")


def test_filters_by_pod_with_or_without_namespace_and_by_verdict():
    ev = _event()
    assert matches(ev, (), ())
    assert matches(ev, ("x/a",), ()) and matches(ev, ("b",), ()) and not matches(ev, ("y/a",), ())
    assert matches(ev, (), ("allow",)) and not matches(ev, (), ("deny",))
    assert not matches(_event(src_pod=None, dst_pod=None, pod=None), ("a",), ())


def test_one_monitor_per_bpffs_and_the_lock_file_goes_with_it(tmp_path, monkeypatch):
    monkeypatch.setattr(monitor_cmd, "LOCK_DIR", tmp_path)
    first = EventLease(tmp_path / "bpf")
    with pytest.raises(click.ClickException, match=r"another `meshbpf monitor` \(pid \d+\) is reading"):
        EventLease(tmp_path / "bpf")
    other = EventLease(tmp_path / "other-bpf")  # another folder: its own reader
    first.release()
    other.release()
    assert list(tmp_path.iterdir()) == []
    EventLease(tmp_path / "bpf").release()  # free again


def _state() -> PolicyState:
    a = addr16(ipaddress.ip_address("10.244.0.3"))
    peer = addr16(ipaddress.ip_address("10.244.0.2"))
    return PolicyState(
        endpoints={12: EpVal(1, 0, EP_ISOLATE_IN)}, addresses={a: 1},
        peers={PeerKey(1, 0, DIR_IN, peer, 128): PeerVal(1, 0, 0),
               PeerKey(1, 1, DIR_IN, peer, 128): PeerVal(2, 99, PEER_ANY_PORT),  # old generation
               PeerKey(1, 0, DIR_IN, bytes(16), 0): PeerVal(2, 5, PEER_ANY_PORT)},
        ports={PortKey(1, 0, DIR_IN, 6, 1, 8080, 16): PortVal(3),
               PortKey(1, 0, DIR_IN, 6, 1, 9000, 12): PortVal(4)})


def test_maps_only_views_show_the_current_generation():
    [ep] = pinned_endpoints(_state())
    assert ep == {"ifindex": 12, "ep_id": 1, "generation": 0, "isolated_ingress": True,
                  "isolated_egress": False, "ips": ["10.244.0.3"], "peer_entries": 2, "port_entries": 2}
    rules = pinned_rules(_state())
    assert [(r["peer"], r["allowed"]) for r in rules] == [
        ("::/0", [{"ports": "any", "rule": 5}]),
        ("10.244.0.2/32", [{"ports": "TCP/8080", "rule": 3}, {"ports": "TCP/9000-9015", "rule": 4}])]
    assert _port_text(17, 0, 0) == "UDP/any"


def test_policy_metrics_from_the_counters():
    counts = {"ingress_allow": 5, "ingress_deny": 2, "egress_allow": 1, "egress_deny": 3,
              "spoofed": 4, "malformed": 0}
    verdicts, drops = policy_metrics(counts, CounterMetricFamily)
    got = {tuple(s.labels.values()): s.value for s in verdicts.samples if s.name.endswith("_total")}
    assert got[("ingress", "deny")] == 2 and got[("egress", "allow")] == 1
    dropped = {s.labels["reason"]: s.value for s in drops.samples if s.name.endswith("_total")}
    assert dropped == {"policy_denied": 5, "spoofed_source": 4, "malformed": 0}


def test_agent_serves_the_views_as_json_and_a_failing_view_is_a_500():
    def broken():
        raise RuntimeError("boom")
    server = HealthServer("127.0.0.1:0", CollectorRegistry(), lambda: True, lambda: True,
                          views={"/v1/endpoints": lambda: {"endpoints": [{"name": "a"}]},
                                 "/v1/policy": broken})
    server.start()
    try:
        with urllib.request.urlopen(f"http://{server.address}/v1/endpoints", timeout=5) as resp:
            assert resp.headers["Content-Type"] == "application/json"
            assert json.loads(resp.read()) == {"endpoints": [{"name": "a"}]}
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://{server.address}/v1/policy", timeout=5)
        assert err.value.code == 500 and b"boom" in err.value.read()
        with urllib.request.urlopen(f"http://{server.address}/healthz", timeout=5) as resp:
            assert resp.status == 200
    finally:
        server.stop()


def test_pod_completion_asks_the_agent():
    server = HealthServer("127.0.0.1:0", CollectorRegistry(), lambda: True, lambda: True,
                          views={"/v1/endpoints": lambda: {"endpoints": [
                              {"namespace": "x", "name": "a"}, {"namespace": "y", "name": "b"}]}})
    server.start()
    try:
        from meshbpf.cli import cli
        env = {"_MESHBPF_COMPLETE": "bash_complete", "COMP_WORDS": f"meshbpf monitor --agent {server.address} --pod x",
               "COMP_CWORD": "5"}
        from click.testing import CliRunner
        out = CliRunner().invoke(cli, [], env=env, prog_name="meshbpf", complete_var="_MESHBPF_COMPLETE")
        assert "x/a" in out.output and "y/b" not in out.output
    finally:
        server.stop()


def test_agent_views_name_pods_policies_and_enforcement_states():
    from pathlib import Path
    from types import SimpleNamespace

    from meshbpf.datapath.policy import PolicyDatapath
    from meshbpf.metrics import AgentMetrics
    from meshbpf.sources.kube_objects import SourceObject
    from meshbpf.sources.kube_policy import read_policy_objects
    from meshbpf.sync.policy import PolicySync

    from policy_world import NODE, compiled, labels, netpol, world
    objects = world([netpol("allow-a", "x", labels(pod="b"),
                            ingress=[{"from": [{"podSelector": labels(pod="a")}],
                                      "ports": [{"protocol": "TCP", "port": 80}]}])])
    sync = PolicySync(AgentMetrics(), print, PolicyDatapath(Path("/nonexistent")), NODE)
    sync.compiled = compiled(objects)
    policies = read_policy_objects(SourceObject(o, "t") for o in objects).policies
    found = {("x", "a"): 11, ("x", "b"): 12}  # x/c: no interface found
    sync.current.endpoints[12] = EpVal(2, 0, EP_ISOLATE_IN)  # x/b in the maps; x/a found, not yet
    sync.endpoints = sync._views(SimpleNamespace(network_policies=policies), sync.compiled, found)

    eps = {f"{e['namespace']}/{e['name']}": e for e in sync.endpoints_view()["endpoints"]}
    assert eps["x/b"] == {"namespace": "x", "name": "b", "ips": ["10.0.1.2"], "ifindex": 12, "ep_id": 2,
                          "state": "enforced", "isolated_ingress": True, "isolated_egress": False,
                          "policies": ["x/allow-a"]}
    assert eps["x/a"]["state"] == "not programmed" and eps["x/c"]["state"] == "no interface"
    pods = {f"{p['namespace']}/{p['name']}": p for p in sync.policy_view()["pods"]}
    [rule] = pods["x/b"]["ingress"]["rules"]
    assert rule["rule"] == "x/allow-a/ingress/0" and rule["peers"] == ["10.0.1.1/32"]
    assert rule["ports"] == ["TCP/80"] and not pods["x/a"]["ingress"]["isolated"]
