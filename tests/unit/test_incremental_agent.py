"""The agent plans a change over the frontends it touches only, and falls back
to the full plan where that is the safe thing (first sync, resync, a failed
write, Services left out). Fakes for source and maps, as test_agent_loop."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

import meshbpf.sync.lb as lbsync_mod
from meshbpf.agent import Agent, AgentOptions
from meshbpf.sync.lb import frontend_changes
from meshbpf.datapath.maps import MapWriteError
from meshbpf.model import DesiredState, Endpoint
from meshbpf.reconcile import plan, wanted_services
from meshbpf.retry import Backoff
from reconcile_checks import service_port
from test_agent_loop import FakeLB, FakeMaps, FakeSource, step_until


def state(n: int, moved: dict[int, str] | None = None) -> DesiredState:
    """n Services with two endpoints each; `moved` gives some a new second endpoint."""
    moved = moved or {}
    sps = []
    for i in range(n):
        second = moved.get(i, f"10.244.{i // 250}.{i % 250 + 1}")
        eps = [Endpoint(ipaddress.ip_address(a), 8080) for a in ("10.244.255.1", second)]
        sps.append(service_port(f"10.96.{i // 250}.{i % 250 + 1}", 80, eps, name=f"svc{i}"))
    return DesiredState({sp.frontend: sp for sp in sps})


class Spy:
    def __init__(self, monkeypatch, name):
        self.calls = []
        real = getattr(lbsync_mod, name)

        def spy(*args):
            self.calls.append(args)
            return real(*args)
        monkeypatch.setattr(lbsync_mod, name, spy)


@pytest.fixture
def agent_for(monkeypatch):
    def make(*results, capacity=None, **opts):
        maps = FakeMaps(capacity or {"services": 1000, "slots": 5000, "backends": 5000})
        agent = Agent(AgentOptions(config=Path("unused"), **opts), source=FakeSource(*results),
                      lb=FakeLB())
        agent.lbsync.maps = maps
        agent.target = Path("/sys/fs/cgroup/fake")
        agent.lbsync.retry, agent.redirect_retry = Backoff(0.01, 0.04), Backoff(0.01, 0.04)
        return agent
    return make


def matches(agent: Agent, desired: DesiredState) -> bool:
    return (plan(agent.lbsync.maps.state, wanted_services(desired)).writes == 0
            and agent.lbsync.current == agent.lbsync.maps.state)


def test_a_change_is_planned_over_the_touched_frontends_only(agent_for, monkeypatch):
    first, second = state(300), state(301, moved={7: "10.244.200.200"})
    agent = agent_for(first, second)
    full, incremental = Spy(monkeypatch, "plan"), Spy(monkeypatch, "plan_services")
    agent.step()
    assert matches(agent, first) and len(full.calls) == 1 and not incremental.calls
    agent.step()
    assert len(full.calls) == 1, "the full plan ran for a two-frontend change"
    assert [len(call[2]) for call in incremental.calls] == [2]  # svc7 and the new svc300
    assert matches(agent, second)
    assert agent.lbsync.programmed == wanted_services(second)
    assert agent.ready()


def test_a_removed_frontend_is_deleted_incrementally(agent_for, monkeypatch):
    before = state(20)
    after = DesiredState({fe: sp for fe, sp in before.service_ports.items() if sp.name != "svc3"})
    agent = agent_for(before, after)
    agent.step()
    full = Spy(monkeypatch, "plan")
    agent.step()
    assert not full.calls
    assert matches(agent, after) and len(agent.lbsync.maps.state.services) == 19


def test_a_failed_incremental_write_restores_and_the_retry_is_a_full_sync(agent_for, monkeypatch):
    first, second = state(10), state(10, moved={2: "10.244.100.100"})
    agent = agent_for(first, second)
    agent.step()
    held = agent.lbsync.maps.state.copy()
    agent.lbsync.maps.fail = [MapWriteError("boom")]
    agent.step()
    assert agent.lbsync.stale and not agent.ready()
    assert agent.lbsync.maps.state == held  # nothing half-applied
    full = Spy(monkeypatch, "plan")
    step_until(agent, agent.ready)
    assert full.calls and matches(agent, second)


class HalfWrite:
    """Maps whose next write lands its first step only, then fails."""

    def __init__(self, maps):
        self.maps, self.armed = maps, True

    def __getattr__(self, name):
        return getattr(self.maps, name)

    def apply(self, p) -> None:
        if not self.armed:
            return self.maps.apply(p)
        self.armed = False
        step = next(p.steps())
        getattr(self.maps.state, step.map).update(step.entries)
        raise MapWriteError("boom after one step")


def test_a_half_applied_incremental_write_is_undone_to_what_was_synced_before(agent_for):
    # What the maps were last brought to is kept as the state it was
    # planned from, not as a copy: the undo must still plan back to it.
    first, second = state(10), state(11, moved={2: "10.244.100.100"})
    agent = agent_for(first, second)
    agent.step()
    held = agent.lbsync.maps.state.copy()
    assert agent.lbsync.programmed == wanted_services(first)
    agent.lbsync.maps = HalfWrite(agent.lbsync.maps)
    agent.step()
    assert agent.lbsync.stale
    assert agent.lbsync.maps.state == held and agent.lbsync.programmed == wanted_services(first)
    step_until(agent, agent.ready)
    assert matches(agent, second) and agent.lbsync.programmed == wanted_services(second)


def test_the_resync_plans_everything_and_repairs_drift(agent_for, monkeypatch, caplog):
    first = state(10)
    agent = agent_for(first, resync_interval=0.01)
    agent.step()
    victim = next(iter(agent.lbsync.maps.state.services))
    del agent.lbsync.maps.state.services[victim]  # drift behind the agent's back
    full = Spy(monkeypatch, "plan")
    with caplog.at_level("INFO", logger="meshbpf.agent"):
        step_until(agent, lambda: victim in agent.lbsync.maps.state.services)
    assert full.calls and matches(agent, first)
    assert "resync: maps read, planned in full and repaired in" in caplog.text  # its cost, reported


def test_a_change_that_does_not_fit_goes_through_admission(agent_for):
    first, second = state(4), state(6)
    agent = agent_for(first, second, capacity={"services": 5, "slots": 100, "backends": 100})
    agent.step()
    agent.step()
    assert len(agent.lbsync.maps.state.services) == 5
    assert list(agent.lbsync.refused) == ["default/svc5"]
    # Services left out: the next change is planned fully, so they get in when room frees.
    agent.source.results.append(state(5))
    agent.step()
    assert not agent.lbsync.refused and matches(agent, state(5))


def test_frontend_changes_compares_by_value_and_sees_removals():
    a, b = state(5), state(5)
    assert frontend_changes(a.service_ports, b.service_ports) == {}
    c = state(4, moved={1: "10.244.9.9"})
    changes = frontend_changes(a.service_ports, c.service_ports)
    assert sorted(v is None for v in changes.values()) == [False, True]


def test_a_delta_from_the_source_is_all_the_agent_looks_at_and_its_trigger_times_are_observed(
        agent_for, monkeypatch):
    import time
    import weakref
    from meshbpf.model import Delta
    first = state(50)
    moved = state(50, moved={4: "10.244.77.77"})
    fe4 = next(fe for fe, sp in moved.service_ports.items() if sp.name == "svc4")
    # Every other frontend is an equal but new object, as a rebuilt state has them:
    # with the delta, none of them is compared.
    second = DesiredState(moved.service_ports, delta=Delta(weakref.ref(first), frozenset({fe4})),
                          trigger_times=(time.time() - 0.2,))
    compared = []
    real = lbsync_mod.frontend_changes
    monkeypatch.setattr(lbsync_mod, "frontend_changes",
                        lambda a, b, where=None: compared.append(where) or real(a, b, where))
    agent = agent_for(first, second)
    agent.step()
    agent.step()
    assert compared == [frozenset({fe4})]
    assert matches(agent, second)
    hist = agent.metrics.network_programming
    assert hist._sum.get() >= 0.2 and sum(b.get() for b in hist._buckets) == 1


def test_a_delta_whose_base_was_not_synced_is_not_trusted(agent_for):
    import weakref
    from meshbpf.model import Delta
    first, other = state(10), state(10, moved={2: "10.244.60.60"})
    moved = state(10, moved={2: "10.244.60.60", 5: "10.244.50.50"})
    fe5 = next(fe for fe, sp in moved.service_ports.items() if sp.name == "svc5")
    # Based on a state the agent never synced: svc2 differs too, and must be seen.
    second = DesiredState(moved.service_ports, delta=Delta(weakref.ref(other), frozenset({fe5})))
    agent = agent_for(first, second)
    agent.step()
    agent.step()
    assert matches(agent, moved)


def test_the_first_full_sync_freezes_the_heap_unwalked_and_later_full_syncs_collect_first(
        agent_for, monkeypatch):
    """The first full sync's state is all young: collecting would walk every
    object of it (seconds at 100 000 Services) for a few cyclic ones. Later
    full syncs (resyncs) collect the young generations, then freeze."""
    import gc
    calls = []
    monkeypatch.setattr(gc, "collect", lambda *args: calls.append(("collect",) + args) or 0)
    monkeypatch.setattr(gc, "freeze", lambda: calls.append(("freeze",)))
    agent = agent_for(state(10), resync_interval=0.01)
    agent.step()
    assert calls == [("freeze",)]
    step_until(agent, lambda: len(calls) > 1)
    assert calls[1:] == [("collect", 1), ("freeze",)]


def test_changes_hand_freed_memory_back_once_a_minute_at_most(agent_for, monkeypatch):
    """glibc keeps what each change freed as RSS until malloc_trim (README,
    an hour of churn); the agent trims after a change, not more than once
    per MALLOC_TRIM_INTERVAL, and not while nothing changes."""
    import meshbpf.agent as agent_mod
    trims, clock = [], [1000.0]
    monkeypatch.setattr(agent_mod, "trim_malloc", lambda: trims.append(clock[0]))
    monkeypatch.setattr(agent_mod.time, "monotonic", lambda: clock[0])
    states = [state(5, moved={1: f"10.244.100.{k}"}) for k in range(1, 5)]
    agent = agent_for(states[0], states[1], None, states[2], None, states[3], resync_interval=0)
    agent.step()                      # the first state: trimmed
    clock[0] += 10
    agent.step()                      # a change 10 s later: not yet
    clock[0] += 60
    agent.step()                      # nothing changed: no trim however long since
    agent.step()                      # a change past the minute: trimmed
    clock[0] += 61
    agent.step()                      # nothing changed
    agent.step()                      # a change: trimmed
    assert trims == [1000.0, 1070.0, 1131.0]
    assert matches(agent, states[3])
