"""The north-south sync (meshbpf/sync/northsouth.py) over fake maps that
check, after every step, that nothing live names a missing entry."""

from __future__ import annotations

import ipaddress
import logging

from k8s_builders import build, endpoint_slice, ep, service
from meshbpf.metrics import AgentMetrics
from meshbpf.reconcile.northsouth import NodeContext
from meshbpf.reconcile.northsouth_keys import NorthSouthState
from meshbpf.sync.northsouth import NorthSouthSync, health_checks

NODE = NodeContext("node-a", (ipaddress.ip_address("10.243.0.11"),), ipaddress.ip_address("10.243.0.11"))
PORT = {"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080, "nodePort": 30080}


class FakeMaps:
    def __init__(self, state: NorthSouthState | None = None):
        self.state = state or NorthSouthState()
        self.writes = 0
        self.fail = False

    def read(self) -> NorthSouthState:
        return self.state.copy()

    def apply(self, steps) -> None:
        for step in steps:
            if self.fail:
                raise OSError(28, "No space left on device")
            if step.map == "cfg":
                self.state.cfg = step.entries[0]
                continue
            target = getattr(self.state, step.map)
            for k, v in step.entries.items():
                self.writes += 1
                if step.map == "node_addrs":
                    (target.add if step.op == "update" else target.discard)(k)
                elif step.op == "update":
                    target[k] = v
                else:
                    del target[k]
            self.check()

    def check(self) -> None:
        s = self.state
        for key, svc in s.frontends.items():
            if svc.count:
                row = s.tables[svc.table_id]
                assert set(row) <= set(s.backends), (key, "names a missing backend")
            if svc.src_id:
                assert any(k.src_id == svc.src_id for k in s.sources)


def make_sync(node=NODE, health=None):
    errors: list[str] = []
    sync = NorthSouthSync(AgentMetrics(), lambda fmt, *a: errors.append(fmt % a), lambda: node,
                          table_size=251, health=health)
    return sync, errors


def desired(*objects):
    result = build(*objects, node_name=NODE.name)
    assert result.problems == []
    return result.state


def lb(name, ip, node_port, *, ingress="10.240.0.7", **spec):
    svc = service(name, ip, type="LoadBalancer", ports=[dict(PORT, nodePort=node_port)], **spec)
    svc["status"] = {"loadBalancer": {"ingress": [{"ip": ingress}]}}
    return svc


def test_every_step_leaves_the_maps_consistent_through_changes():
    maps = FakeMaps()
    sync, errors = make_sync()
    sync.start(maps)
    states = [
        desired(lb("web", "10.96.0.10", 30080), endpoint_slice("w", "web", [ep("10.244.0.5")])),
        desired(lb("web", "10.96.0.10", 30080), endpoint_slice("w", "web", [ep("10.244.0.6"), ep("10.244.1.6")]),
                lb("api", "10.96.0.11", 30081, ingress="10.240.0.8", loadBalancerSourceRanges=["192.0.2.0/24"]),
                endpoint_slice("a", "api", [ep("10.244.0.9")])),
        desired(lb("api", "10.96.0.11", 30082, ingress="10.240.0.8"), endpoint_slice("a", "api", [ep("10.244.0.9")])),
        desired(),
    ]
    for state in states:
        assert sync.sync(state)
    assert errors == [] and maps.state.frontends == {} and maps.state.backends == {}
    assert maps.state.tables == {} and maps.state.sources == {}


def test_a_restarted_agent_writes_nothing_and_keeps_the_ids():
    state = desired(lb("web", "10.96.0.10", 30080, externalTrafficPolicy="Local"),
                    endpoint_slice("w", "web", [ep("10.244.0.5", node="node-a"), ep("10.244.1.5", node="node-b")]))
    maps = FakeMaps()
    first, _ = make_sync()
    first.start(maps)
    first.sync(state)
    writes = maps.writes
    second, errors = make_sync()
    second.start(maps)                 # a new agent over the pinned maps
    assert second.sync(state) and errors == []
    assert maps.writes == writes
    assert second.frontends._value.get() == 3


def test_a_failed_write_is_retried_from_what_the_maps_hold(caplog):
    maps = FakeMaps()
    sync, errors = make_sync()
    sync.start(maps)
    state = desired(lb("web", "10.96.0.10", 30080), endpoint_slice("w", "web", [ep("10.244.0.5")]))
    maps.fail = True
    assert not sync.sync(state) and sync.stale
    assert len(errors) == 1 and "\n" not in errors[0] and "No space left" in errors[0]
    maps.fail = False
    assert sync.sync(state) and not sync.stale
    assert len(maps.state.frontends) == 3


def test_unchanged_input_is_not_replanned():
    maps = FakeMaps()
    sync, _ = make_sync()
    sync.start(maps)
    state = desired(lb("web", "10.96.0.10", 30080), endpoint_slice("w", "web", [ep("10.244.0.5")]))
    sync.sync(state)
    maps.state.frontends.clear()        # drift: only a resync repairs it
    sync.sync(state)
    assert maps.state.frontends == {}
    sync.sync(state, reread=True)
    assert len(maps.state.frontends) == 3


class FakeHealth:
    def __init__(self):
        self.wanted = None
        self.failed: dict[int, str] = {}   # as HealthCheckServers: every port binds here

    def update(self, wanted):
        self.wanted = wanted

    def ports(self):
        return sorted(self.wanted or {})

    def stop(self):
        pass


def test_health_checks_count_this_nodes_ready_endpoints():
    state = desired(
        lb("web", "10.96.0.10", 30080, externalTrafficPolicy="Local", healthCheckNodePort=31000),
        endpoint_slice("w", "web", [ep("10.244.0.5"), ep("10.244.0.6", ready=False),
                                    ep("10.244.1.5", node="node-b")]),
        lb("cold", "10.96.0.11", 30081, ingress="10.240.0.8", externalTrafficPolicy="Local",
           healthCheckNodePort=31001),
        lb("cluster", "10.96.0.12", 30082, ingress="10.240.0.9", healthCheckNodePort=31002))
    checks = health_checks(state, "node-a")
    assert {p: (c.name, c.local_endpoints) for p, c in checks.items()} == {31000: ("web", 1), 31001: ("cold", 0)}
    health = FakeHealth()
    sync, _ = make_sync(health=health)
    sync.start(FakeMaps())
    sync.sync(state)
    assert health.ports() == [31000, 31001]


def test_a_health_port_another_socket_held_is_served_once_it_is_free(monkeypatch):
    """Not only when the Services change: the loop's next step after the
    retry interval binds it (load balancers probe it every few seconds)."""
    import socket

    import meshbpf.sync.northsouth as sync_mod
    from meshbpf.northsouth_health import HealthCheckServers
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    state = desired(lb("web", "10.96.0.10", 30080, externalTrafficPolicy="Local", healthCheckNodePort=port),
                    endpoint_slice("w", "web", [ep("10.244.0.5")]))
    health = HealthCheckServers(host="127.0.0.1")
    clock = [1000.0]
    monkeypatch.setattr(sync_mod.time, "monotonic", lambda: clock[0])
    try:
        sync, _ = make_sync(health=health)
        sync.start(FakeMaps())
        assert sync.sync(state) and health.ports() == [] and port in health.failed
        busy.close()
        assert not sync.due(clock[0] + 1)            # tried again only after the interval
        sync.sync(state)
        assert health.ports() == []
        clock[0] += sync_mod.HEALTH_RETRY_INTERVAL
        assert sync.due(clock[0])
        assert sync.sync(state) and health.ports() == [port] and not health.failed
        assert not sync.due(clock[0] + 3600)         # nothing left to retry
    finally:
        busy.close()
        health.stop()


def test_a_delta_of_cluster_ip_only_services_is_not_replanned(monkeypatch):
    import dataclasses
    import weakref

    import meshbpf.sync.northsouth as sync_mod
    from meshbpf.model import Delta
    calls = []
    real_plan = sync_mod.plan
    monkeypatch.setattr(sync_mod, "plan", lambda *a, **k: calls.append(1) or real_plan(*a, **k))
    maps = FakeMaps()
    sync, _ = make_sync()
    sync.start(maps)
    base = desired(lb("web", "10.96.0.10", 30080), endpoint_slice("w", "web", [ep("10.244.0.5")]),
                   service("plain", "10.96.0.20"), endpoint_slice("p", "plain", [ep("10.244.0.7")]))
    sync.sync(base)
    changed = desired(lb("web", "10.96.0.10", 30080), endpoint_slice("w", "web", [ep("10.244.0.5")]),
                      service("plain", "10.96.0.20"), endpoint_slice("p", "plain", [ep("10.244.0.8")]))
    plain = next(f for f, sp in changed.service_ports.items() if sp.name == "plain")
    web = next(f for f, sp in changed.service_ports.items() if sp.name == "web")
    step = dataclasses.replace(changed, delta=Delta(weakref.ref(base), frozenset({plain})))
    assert sync.sync(step) and len(calls) == 1          # only the first sync planned
    changed_web = desired(lb("web", "10.96.0.10", 30080), endpoint_slice("w", "web", [ep("10.244.0.6")]),
                          service("plain", "10.96.0.20"), endpoint_slice("p", "plain", [ep("10.244.0.8")]))
    step2 = dataclasses.replace(changed_web, delta=Delta(weakref.ref(step), frozenset({web})))
    assert sync.sync(step2) and len(calls) == 2
    assert {be.addr[-1] for be in maps.state.backends.values()} == {6}


def test_conntrack_garbage_is_collected_every_interval_and_a_failure_is_one_line(caplog):
    import meshbpf.sync.northsouth as sync_mod
    calls = []
    maps = FakeMaps()
    maps.collect_garbage = lambda idle_ns: calls.append(idle_ns) or 3
    sync, _ = make_sync()
    sync.start(maps)
    now = sync.next_gc
    sync.collect_garbage(now - 1)
    assert calls == []
    sync.collect_garbage(now)
    sync.collect_garbage(now + 1)                      # not due again yet
    assert calls == [sync_mod.CT_IDLE_NS]

    def broken(idle_ns):
        raise OSError(9, "Bad file descriptor")
    maps.collect_garbage = broken
    with caplog.at_level(logging.ERROR, "meshbpf.agent"):
        sync.collect_garbage(now + sync_mod.CT_GC_INTERVAL)
    (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert "conntrack garbage collection failed" in line and "\n" not in line
