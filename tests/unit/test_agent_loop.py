"""The agent's loop with fakes for the source and the maps (no root, no BPF):
nothing a source or a sync raises ends the loop; failed syncs are retried
with backoff while /readyz says not ready; drift is repaired by the periodic
resync; redirection settings fail and retry apart from load balancing
(issue 9, items 1, 4, 5a, 9)."""

from __future__ import annotations

import ipaddress
import logging
import os
import time
from pathlib import Path

import pytest

import meshbpf.agent as agent_mod
from meshbpf.agent import Agent, AgentOptions
from meshbpf.datapath.lock import holder_pid
from meshbpf.datapath.maps import MapWriteError
from meshbpf.model import AgentSettings, DesiredState, Endpoint, RedirectSettings
from meshbpf.reconcile import LBState, Plan, plan, wanted_services
from meshbpf.retry import Backoff
from meshbpf.sources.errors import ConfigError, Problem
from reconcile_checks import service_port

ROOMY = {"services": 100, "slots": 100, "backends": 100}


def desired(*ips: str, redirect: RedirectSettings | None = None, endpoints=("10.244.0.1",)) -> DesiredState:
    sps = [service_port(ip, 80, [Endpoint(ipaddress.ip_address(a), 8080) for a in endpoints],
                        name=f"svc{i}") for i, ip in enumerate(ips)]
    settings = AgentSettings(redirect=redirect) if redirect else AgentSettings()
    return DesiredState({sp.frontend: sp for sp in sps}, settings)


class FakeSource:
    """Hands out queued results: a DesiredState, None, or an exception to raise."""

    def __init__(self, *results):
        self.results = list(results)

    def poll(self):
        item = self.results.pop(0) if self.results else None
        if isinstance(item, BaseException):
            raise item
        return item


class FakeMaps:
    """The three maps as an LBState; `fail` queues exceptions for apply()."""

    def __init__(self, capacity=ROOMY):
        self.state = LBState()
        self.capacity = dict(capacity)
        self.fail: list[Exception] = []
        self.applied = 0

    def read(self) -> LBState:
        return self.state.copy()

    def apply(self, p: Plan) -> None:
        if self.fail:
            raise self.fail.pop(0)
        self.state = p.apply_to(self.state)
        self.applied += 1


class FakeLB:
    redirect = False


@pytest.fixture
def make_agent():
    def make(source, maps=None, redirect=False, **opts):
        agent = Agent(AgentOptions(config=Path("unused"), **opts), source=source, lb=FakeLB())
        agent.lb.redirect = redirect
        agent.lbsync.maps = maps or FakeMaps()
        agent.target = Path("/sys/fs/cgroup/fake")
        # Fast retries, so a test waits milliseconds, not seconds.
        agent.lbsync.retry, agent.redirect_retry = Backoff(0.01, 0.04), Backoff(0.01, 0.04)
        return agent
    return make


def errors(agent: Agent, reason: str) -> float:
    return agent.metrics.sync_errors.labels(reason)._value.get()


def gauge(g) -> float:
    return g._value.get()


def matches(agent: Agent, state: DesiredState) -> bool:
    return plan(agent.lbsync.maps.state, wanted_services(state)).writes == 0


def step_until(agent: Agent, check, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        agent.step()
        time.sleep(0.005)


# --- item 1: nothing a source or a sync raises ends the loop ----------------------

def test_an_unexpected_source_exception_is_one_line_counted_and_the_state_stays(make_agent, caplog):
    good, newer = desired("10.96.0.10"), desired("10.96.0.10", "10.96.0.11")
    agent = make_agent(FakeSource(good, AttributeError("'str' object has no attribute 'get'"), newer))
    agent.step()
    assert matches(agent, good) and agent.ready()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="meshbpf.agent"):
        agent.step()                               # the source blows up: nothing changes
    assert matches(agent, good) and agent.ready()
    assert errors(agent, "source") == 1
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "FakeSource failed" in lines[0] and "AttributeError" in lines[0]
    agent.step()                                   # the next good change still lands
    assert matches(agent, newer)


def test_the_loop_survives_whatever_a_step_raises(make_agent, monkeypatch):
    polls = []

    class Exploding:
        def poll(self):
            polls.append(1)
            if len(polls) >= 4:
                agent.stop()
            raise [ValueError("bad"), KeyError("k"), TypeError("t"), RuntimeError("r")][len(polls) - 1]

    agent = make_agent(Exploding(), poll_interval=0.001)
    monkeypatch.setattr(agent_mod.signal, "signal", lambda *a: None)
    agent.run()                                    # returns only because stop() was called
    assert len(polls) == 4 and errors(agent, "source") == 4


def test_an_exception_inside_a_sync_restores_and_retries(make_agent):
    first, second = desired("10.96.0.10"), desired("10.96.0.11")
    maps = FakeMaps()
    agent = make_agent(FakeSource(first, second), maps)
    agent.step()
    maps.fail.append(ZeroDivisionError("bug in a codec"))
    agent.step()
    assert errors(agent, "internal") == 1
    assert matches(agent, first) and not agent.ready()
    step_until(agent, lambda: matches(agent, second))
    assert agent.ready()


def test_config_errors_are_counted_as_config(make_agent):
    agent = make_agent(FakeSource(ConfigError([Problem("f.yaml", "", "spec", "bad")])))
    agent.step()
    assert errors(agent, "config") == 1 and errors(agent, "source") == 0 and not agent.ready()


# --- item 4: retries with backoff, readiness, periodic resync ---------------------

def test_a_failed_write_is_retried_without_a_new_change(make_agent):
    state = desired("10.96.0.10")
    maps = FakeMaps()
    maps.fail = [MapWriteError("update of 1 backends entries failed: map full")] * 3
    agent = make_agent(FakeSource(state), maps)
    agent.step()
    assert not agent.ready() and gauge(agent.metrics.datapath_stale) == 1
    assert agent.health_details()["datapath_stale"] is True
    step_until(agent, lambda: matches(agent, state))   # the source says nothing new
    assert agent.ready() and gauge(agent.metrics.datapath_stale) == 0
    assert errors(agent, "datapath") == 3


def test_backoff_doubles_up_to_its_cap_and_resets():
    b = Backoff(0.5, 30)
    assert [b.failed(0) for _ in range(9)] == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    assert b.due(30) and not b.due(29)
    b.reset()
    assert b.failed(0) == 0.5 and not Backoff().due(1e9)


def test_a_refused_service_is_a_problem_not_staleness(make_agent):
    state = desired("10.96.0.10", "10.96.0.11", "10.96.0.12")
    agent = make_agent(FakeSource(state), FakeMaps({"services": 2, "slots": 100, "backends": 100}))
    agent.step()
    assert agent.ready() and gauge(agent.metrics.datapath_stale) == 0
    assert gauge(agent.metrics.services_refused) == 1 and errors(agent, "capacity") == 1
    assert agent.health_details()["services_refused"] == ["default/svc2"]
    agent.step()
    assert errors(agent, "capacity") == 1           # counted once, not on every sync


def test_room_freed_by_deletes_is_handed_out_in_the_same_sync(make_agent):
    before, after = desired("10.96.0.10", "10.96.0.11"), desired("10.96.0.12", "10.96.0.13")
    agent = make_agent(FakeSource(before, after), FakeMaps({"services": 2, "slots": 100, "backends": 100}))
    agent.step()
    agent.step()    # round 1 deletes the old two; round 2 admits the new two
    assert matches(agent, after) and agent.lbsync.refused == {}


def test_the_periodic_resync_repairs_drift(make_agent):
    state = desired("10.96.0.10", "10.96.0.11")
    maps = FakeMaps()
    agent = make_agent(FakeSource(state), maps, resync_interval=0.01)
    agent.step()
    victim = next(iter(maps.state.services))
    del maps.state.services[victim]                # someone deletes an entry by hand
    step_until(agent, lambda: matches(agent, state))
    assert agent.metrics.resync_drift._value.get() >= 1
    assert gauge(agent.metrics.resync_duration) >= 0


def test_no_resync_when_the_interval_is_zero(make_agent):
    state = desired("10.96.0.10")
    maps = FakeMaps()
    agent = make_agent(FakeSource(state), maps, resync_interval=0)
    agent.step()
    maps.state.services.clear()
    for _ in range(5):
        agent.step()
    assert not maps.state.services


# --- items 5a and 9: redirection apart from load balancing ------------------------

def test_a_redirect_failure_does_not_hold_up_load_balancing(make_agent, monkeypatch):
    calls = []

    def apply_settings(lb, settings, target, applied):
        calls.append(settings)
        if len(calls) < 3:
            raise OSError("kubepods.slice is not a cgroup v2 folder")
    monkeypatch.setattr(agent_mod, "apply_settings", apply_settings)
    first = desired("10.96.0.10", redirect=RedirectSettings(enabled=True))
    moved = desired("10.96.0.10", redirect=RedirectSettings(enabled=True), endpoints=("10.244.0.9",))
    agent = make_agent(FakeSource(first, moved), redirect=True)
    agent.step()
    assert matches(agent, first) and agent.ready()
    assert errors(agent, "redirect") == 1 and gauge(agent.metrics.redirect_stale) == 1
    agent.step()                                    # an endpoint move still lands
    assert matches(agent, moved)
    step_until(agent, lambda: gauge(agent.metrics.redirect_stale) == 0)
    assert len(calls) == 3 and agent.applied_redirect == RedirectSettings(enabled=True)


def test_a_missing_redirect_cgroup_writes_nothing_and_is_retried(make_agent, monkeypatch):
    calls = []
    monkeypatch.setattr(agent_mod, "apply_settings", lambda *a: calls.append(a))
    settings = RedirectSettings(enabled=True, cgroups=("no-such-cgroup-for-meshbpf",))
    agent = make_agent(FakeSource(desired("10.96.0.10", redirect=settings)), redirect=True)
    agent.step()
    assert agent.ready() and calls == [] and errors(agent, "redirect") == 1
    assert "spec.socketRedirect" in agent.health_details()["last_error"]


def test_without_redirection_compiled_the_settings_are_never_applied(make_agent, monkeypatch):
    def apply_settings(*a):
        raise AssertionError("redirection maps were never compiled")
    monkeypatch.setattr(agent_mod, "apply_settings", apply_settings)
    agent = make_agent(FakeSource(desired("10.96.0.10")), redirect=False)
    agent.step()
    assert agent.ready() and errors(agent, "redirect") == 0


# --- health --------------------------------------------------------------------------

def test_healthz_follows_the_source_health(make_agent):
    source = FakeSource(desired("10.96.0.10"))
    source.health = lambda: {"ok": False, "watches": {"services": {"alive": False, "last_event_age_s": 90.0}}}
    agent = make_agent(source)
    agent.step()
    assert agent.ready() and not agent.alive()
    assert agent.health_details()["source"]["watches"]["services"]["alive"] is False
    source.health = lambda: {"ok": True, "watches": {}}
    assert agent.alive()


# --- the bpffs lock's message ----------------------------------------------------------

def test_the_lock_holder_is_found_in_proc_locks(tmp_path):
    st = os.stat(tmp_path)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
    locks = tmp_path / "locks"
    locks.write_text(f"1: POSIX  ADVISORY  WRITE 111 {dev}:{st.st_ino} 0 EOF\n"
                     f"2: FLOCK  ADVISORY  WRITE 4321 {dev}:{st.st_ino} 0 EOF\n"
                     f"3: FLOCK  ADVISORY  WRITE 999 {dev}:{st.st_ino + 1} 0 EOF\n")
    assert holder_pid(tmp_path, str(locks)) == 4321
    locks.write_text("")
    assert holder_pid(tmp_path, str(locks)) is None


def test_not_ready_before_the_first_redirection_settings_are_tried(make_agent, monkeypatch):
    """/readyz is read from another thread: between the load-balancing sync and
    the redirection settings of the same step it must not say ready, or a pod
    started at "ready" may find its sockets not yet taking part."""
    seen = []
    monkeypatch.setattr(agent_mod, "apply_settings", lambda *a: seen.append(agent.ready()))
    agent = make_agent(FakeSource(desired("10.96.0.10", redirect=RedirectSettings(enabled=True))),
                       redirect=True)
    agent.step()
    assert seen == [False] and agent.ready()
