"""The agent on the file source when a change is bad or a write fails: it
keeps running (and serving) the last good state, says what is wrong, and
takes the next good change.

Fake maps (no root, no BPF), the real FileSource on a temporary folder.
"""

from __future__ import annotations

import errno
import logging
import random
import time
from pathlib import Path

import pytest

from fuzz_objects import good_objects, mutate
from meshbpf.agent import Agent, AgentOptions
from meshbpf.reconcile import Plan, plan, wanted_services
from meshbpf.retry import Backoff
from meshbpf.sources.yaml_file import FileSource
from meshbpf.sources.yaml_load import dump_all
from test_agent_loop import FakeLB, FakeMaps, errors, gauge

SEED = 20261201
ROOMY = {"services": 100, "slots": 10_000, "backends": 100}  # a weighted split takes up to 1000 slots


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    objects = good_objects()
    objects.pop("AgentConfig")  # redirection is not compiled in (FakeLB)
    (tmp_path / "good.yaml").write_text(dump_all(list(objects.values())))
    return tmp_path


def make_agent(folder: Path, maps=None) -> Agent:
    agent = Agent(AgentOptions(config=folder), source=FileSource(folder, settle_s=0, hold_s=0),
                  lb=FakeLB())
    agent.lbsync.maps = maps or FakeMaps(ROOMY)
    agent.target = Path("/sys/fs/cgroup/fake")
    agent.lbsync.retry, agent.redirect_retry = Backoff(0.01, 0.04), Backoff(0.01, 0.04)
    return agent


def maps_match(agent: Agent) -> bool:
    return plan(agent.lbsync.maps.state, wanted_services(agent.desired)).writes == 0


def services(agent: Agent) -> set[str]:
    return {sp.service for sp in agent.desired.service_ports.values()}


def test_random_bad_edits_keep_the_last_state_and_a_fix_recovers(folder):
    agent = make_agent(folder)
    agent.step()
    assert agent.ready() and services(agent) == {"default/web"}
    rng = random.Random(SEED)
    second = good_objects("2")
    second.pop("AgentConfig")
    for round in range(30):
        kind = rng.choice(list(second))
        bad, what = mutate(second[kind], rng, rng.choice((1, 2)))
        (folder / "edit.yaml").write_text(dump_all([o if k != kind else bad for k, o in second.items()]))
        agent.step()                             # raises nothing, whatever the edit
        assert agent.alive() and agent.ready() and maps_match(agent), what
        assert "default/web" in services(agent), what  # the good file's Service stays
        # A good edit always lands after a bad one.
        (folder / "edit.yaml").write_text(dump_all(list(good_objects(f"{round + 3}").values())[:2]))
        agent.step()
        assert services(agent) == {"default/web", f"default/web{round + 3}"}, what
        assert gauge(agent.metrics.config_ok) == 1 and maps_match(agent)


class LandedThenFailedMaps(FakeMaps):
    """Maps whose next writes land, then report ENOSPC (a full hash map
    part-way through a batch): what the maps hold is not what was planned."""

    def __init__(self):
        super().__init__(ROOMY)
        self.fail_after = 0

    def apply(self, p: Plan) -> None:
        if self.fail_after:
            self.fail_after -= 1
            self.state = p.apply_to(self.state)
            raise OSError(errno.ENOSPC, "No space left on device")
        super().apply(p)


def test_a_write_failing_with_enospc_restores_is_not_ready_and_recovers(folder, caplog):
    maps = LandedThenFailedMaps()
    agent = make_agent(folder, maps)
    agent.step()
    first = agent.desired
    (folder / "more.yaml").write_text(dump_all(list(good_objects("2").values())[:2]))
    maps.fail_after = 1                          # this write lands, then fails
    with caplog.at_level(logging.ERROR):
        agent.step()
    assert not agent.ready() and agent.health_details()["datapath_stale"]
    assert plan(maps.state, wanted_services(first)).writes == 0  # restored: nothing half-applied
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(lines) == 1 and "\n" not in lines[0] and "No space left on device" in lines[0], lines
    maps.fail = [OSError(errno.E2BIG, "Argument list too long")]  # the first retry fails outright
    deadline = time.monotonic() + 20
    while not agent.ready() and time.monotonic() < deadline:  # retried with backoff, no new change
        agent.step()
        time.sleep(0.005)
    assert agent.ready() and maps_match(agent) and "default/web2" in services(agent)
    assert errors(agent, "internal") == 2


def test_a_rejected_config_is_logged_one_line_per_problem(folder, caplog):
    agent = make_agent(folder)
    agent.step()
    svc = good_objects("2")["Service"]
    svc["spec"]["ports"][0]["port"] = 65536
    (folder / "bad.yaml").write_text(dump_all([svc]))
    with caplog.at_level(logging.ERROR):
        agent.step()
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert lines and all("\n" not in line for line in lines), lines
    assert any(str(folder / "bad.yaml") in line and "spec.ports[0].port" in line for line in lines)


def test_a_rejected_config_logs_at_most_twenty_problems_and_counts_the_rest(folder, caplog):
    agent = make_agent(folder)
    agent.step()
    bad = []
    for i in range(25):
        svc = good_objects(f"{i + 3}")["Service"]
        svc["spec"]["ports"][0]["port"] = 65536
        bad.append(svc)
    (folder / "bad.yaml").write_text(dump_all(bad))
    with caplog.at_level(logging.ERROR):
        agent.step()
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert lines[0] == "config rejected, still running the previous state: 25 problem(s)"
    assert len(lines) == 22 and lines[-1] == "config problem: ... and 5 more not logged", lines
    assert all(line.startswith(f"config problem: {folder / 'bad.yaml'}: document") for line in lines[1:21])


def test_a_split_too_big_for_the_slots_map_is_left_out_alone(tmp_path, caplog):
    """Admission counted a Service's slots as its distinct backends, but a
    weighted split repeats them over up to 1000 slots: the plan it admitted
    did not fit, check_capacity raised, and the whole sync failed on every
    retry: no Service on the node updated while that route existed."""
    split = good_objects()
    refs = split["TCPRoute"]["spec"]["rules"][0]["backendRefs"]
    refs[0]["weight"], refs[1]["weight"] = 499, 1  # exact only in 1000 slots
    (tmp_path / "split.yaml").write_text(dump_all([split["Service"], split["EndpointSlice"], split["TCPRoute"]]))
    plain = good_objects("2")
    (tmp_path / "plain.yaml").write_text(dump_all([plain["Service"], plain["EndpointSlice"]]))
    agent = make_agent(tmp_path, FakeMaps({"services": 100, "slots": 500, "backends": 100}))
    with caplog.at_level(logging.ERROR):
        agent.step()
    assert agent.ready() and "default/web" in agent.lbsync.refused
    programmed = {want.service for want in agent.lbsync.programmed.values()}
    assert programmed == {"default/web2"}
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(lines) == 1 and lines[0].startswith("map full: Service default/web (2 frontend(s)) left out")
