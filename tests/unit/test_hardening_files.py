"""Config files too big, or rewritten while read: refused in one line, or
read again; never read whole into memory, never applied half-done; the
running state stays.

Fake maps (no root, no BPF), the real FileSource on a temporary folder."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from fuzz_objects import good_objects
from meshbpf.sources import yaml_file
from meshbpf.sources.errors import ConfigError
from meshbpf.sources.yaml_file import read_config
from meshbpf.sources.yaml_load import dump_all
from test_agent_faults_file import folder, make_agent, maps_match, services  # noqa: F401 (fixture)

SMALL = 4096  # MAX_FILE_BYTES in these tests: the logic, without a GiB on disk


def test_a_file_over_the_limit_is_refused_in_one_line_before_it_is_read(tmp_path, monkeypatch):
    monkeypatch.setattr(yaml_file, "MAX_FILE_BYTES", SMALL, raising=False)
    path = tmp_path / "big.yaml"
    path.write_text("# padding\n" * (SMALL // 10 + 1))
    with pytest.raises(ConfigError) as exc:
        read_config(path)
    (problem,) = exc.value.problems
    assert str(problem) == (f"{path}: cannot read: {path.stat().st_size} bytes, over the 0 GiB "
                            "a config file may have")


def test_a_sparse_file_over_1_gib_is_refused_without_reading_it(tmp_path, monkeypatch):
    path = tmp_path / "huge.yaml"
    with open(path, "wb") as f:
        f.truncate((1 << 30) + 1)   # sparse: no GiB on disk
    reads = []
    real_open = open

    def spy_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if str(file) == str(path):
            real_read = handle.read
            handle = _Spy(handle, lambda n=-1: reads.append(n) or real_read(0))
        return handle
    monkeypatch.setattr("builtins.open", spy_open)
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: reads.append("all") or "")
    with pytest.raises(ConfigError) as exc:
        read_config(path)
    assert reads == []
    assert [str(p) for p in exc.value.problems] == [
        f"{path}: cannot read: {(1 << 30) + 1} bytes, over the 1 GiB a config file may have"]


class _Spy:
    def __init__(self, handle, read):
        self._handle, self.read = handle, read

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()


def test_the_agent_keeps_its_state_when_a_file_grows_too_big(folder, monkeypatch, caplog):
    agent = make_agent(folder)
    agent.step()
    assert services(agent) == {"default/web"}
    monkeypatch.setattr(yaml_file, "MAX_FILE_BYTES", SMALL, raising=False)
    extra = good_objects("2")
    (folder / "more.yaml").write_text(dump_all([extra["Service"]]) + "# padding\n" * (SMALL // 10 + 1))
    with caplog.at_level(logging.ERROR):
        agent.step()
    assert agent.alive() and agent.ready() and maps_match(agent)
    assert services(agent) == {"default/web"}
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("more.yaml: cannot read" in line and "a config file may have" in line for line in lines), lines


def _finish_on_second_fstat(monkeypatch, path: Path, rest: str) -> list[int]:
    """A writer at work: `path` holds the first part of its new text when it
    is opened, and gets `rest` right after it is read (at the reader's
    second fstat of it: the one after the read)."""
    calls = []
    real_fstat = os.fstat

    def fstat(fd):
        if os.readlink(f"/proc/self/fd/{fd}") == str(path):
            calls.append(1)
            if len(calls) == 2:
                with open(path, "a") as f:
                    f.write(rest)
        return real_fstat(fd)
    monkeypatch.setattr(os, "fstat", fstat)
    return calls


def test_a_file_rewritten_while_read_is_read_again_not_applied_half_done(tmp_path, monkeypatch):
    objects = good_objects()
    objects.pop("AgentConfig")
    two = good_objects("2")
    text = dump_all(list(objects.values()) + [two["Service"], two["EndpointSlice"]])
    cut = text.index("\n---", text.index(two["Service"]["metadata"]["name"]) - 200) + 1
    path = tmp_path / "config.yaml"
    path.write_text(text[:cut])                  # whole documents: it parses, with one Service less
    calls = _finish_on_second_fstat(monkeypatch, path, text[cut:])
    result = read_config(path)
    assert len(calls) == 4                       # read twice: before and after the rest came
    assert {sp.service for sp in result.state.service_ports.values()} == {"default/web", "default/web2"}


def test_a_file_that_never_stops_changing_is_refused_and_read_at_its_next_change(tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    path.write_text(dump_all([good_objects()["Service"]]))
    real_fstat = os.fstat
    count = [0]

    def fstat(fd):
        st = real_fstat(fd)
        if os.readlink(f"/proc/self/fd/{fd}") == str(path):
            count[0] += 1
            os.utime(path, ns=(count[0], count[0]))  # touched at every look
        return st
    monkeypatch.setattr(os, "fstat", fstat)
    with pytest.raises(ConfigError) as exc:
        read_config(path)
    assert [str(p) for p in exc.value.problems] == [
        f"{path}: cannot read: changed while being read, 3 times in a row; read again at its next change"]


def test_a_dangling_symlink_in_the_folder_is_a_problem_naming_it(folder):
    agent = make_agent(folder)
    agent.step()
    assert services(agent) == {"default/web"}
    link = folder / "more.yaml"
    link.symlink_to(folder / "gone.txt")
    with pytest.raises(ConfigError) as exc:
        read_config(folder)
    assert [str(p) for p in exc.value.problems] == [f"{link}: a symlink to {folder / 'gone.txt'}, which does not exist"]
    agent.step()                                  # the poll sees it: refused, the state stays
    assert services(agent) == {"default/web"} and agent.ready()
    link.unlink()                                 # and sees it go
    (folder / "gone.txt").write_text(dump_all([good_objects("2")["Service"]]))
    link.symlink_to(folder / "gone.txt")
    agent.step()
    assert services(agent) == {"default/web", "default/web2"}
