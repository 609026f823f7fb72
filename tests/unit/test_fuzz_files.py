"""The file source against files that are not YAML of Kubernetes objects:
binary, not UTF-8, tabs, alias bombs, deep nesting, 100 MB, folders and
FIFOs named *.yaml, symlink loops, a file removed while being read.

Properties: read_config raises nothing but ConfigError; each problem is one
line naming the file; a FIFO or a folder never blocks or breaks the read;
and FileSource recovers (hands out the good state) once the bad file is
fixed, keeping the previous state meanwhile.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fuzz_objects import good_objects
from meshbpf.sources import yaml_file
from meshbpf.sources.errors import ConfigError
from meshbpf.sources.yaml_file import FileSource, read_config
from meshbpf.sources.yaml_load import dump_all

LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(9))

# name -> (file name, bytes, what the problem says)
BAD_FILES = {
    "binary": ("bad.yaml", bytes(range(256)) * 16, "cannot read"),
    "latin-1": ("bad.yaml", "kind: Servic\xe9\n".encode("latin-1"), "cannot read"),
    "NUL byte": ("bad.yaml", b"apiVersion: v1\nkind: Service\x00\n", "not valid YAML"),
    "tab indent": ("bad.yaml", b"kind: Service\n\tmetadata: {}\n", "line 2"),
    "billion laughs": ("bad.yaml", LAUGHS.encode(), "excessive aliasing"),
    "deep flow": ("bad.yaml", b"[" * 5000 + b"]" * 5000, "nesting"),
    "deep JSON": ("bad.json", b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "nesting"),
    "deep block": ("bad.yaml", "".join(" " * i + "a:\n" for i in range(1500)).encode(), "nest"),
    "python tag": ("bad.yaml", b"!!python/object/apply:os.system [id]\n", "unsupported tag"),
    "scalars": ("bad.yaml", b"42\n---\n- a\n", "expected a Kubernetes object"),
    "kind a list": ("bad.yaml", b"apiVersion: v1\nkind: [Service]\nmetadata: {name: x}\n", "kind"),
    "List of junk": ("bad.yaml", b"kind: List\napiVersion: v1\nitems: [1, null, [2]]\n", "items["),
    "100 MB": ("bad.yaml", b"a" * (100 << 20), "expected a Kubernetes object"),
}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "good.yaml").write_text(dump_all([good_objects()["Service"], good_objects()["EndpointSlice"]]))
    return tmp_path


def good_applied(state) -> bool:
    return any(sp.service == "default/web" and sp.endpoints for sp in state.service_ports.values())


@pytest.mark.parametrize("name", BAD_FILES)
def test_a_bad_file_is_one_line_naming_it_and_fixing_it_recovers(folder, name):
    file_name, data, says = BAD_FILES[name]
    source = FileSource(folder, settle_s=0)
    assert good_applied(source.poll())
    (folder / file_name).write_bytes(data)
    with pytest.raises(ConfigError) as rejected:
        source.poll()
    texts = [str(p) for p in rejected.value.problems]
    assert texts and all(t.startswith(str(folder / file_name)) and len(t.splitlines()) == 1
                         and len(t) < 3000 for t in texts), texts
    assert any(says in t for t in texts), texts
    assert source.poll() is None                 # reported once; the running state stays
    (folder / file_name).unlink()
    assert good_applied(source.poll())           # fixed: applied again


@pytest.mark.parametrize("make", [
    pytest.param(lambda p: p.mkdir(), id="folder"),
    pytest.param(lambda p: os.mkfifo(p), id="fifo"),       # reading it would block forever
    pytest.param(lambda p: os.symlink(p, p), id="symlink loop"),
    pytest.param(lambda p: os.symlink(p.parent, p), id="symlink to its folder"),
])
def test_what_is_not_a_file_never_blocks_or_breaks_the_read(folder, make):
    make(folder / "odd.yaml")
    try:
        state = read_config(folder).state
    except ConfigError as exc:  # saying so is fine too, on one line naming it
        assert all(str(p).startswith(str(folder / "odd.yaml")) for p in exc.problems), exc
        return
    assert good_applied(state)


def removed_when_read(monkeypatch, name: str) -> None:
    """yaml_file.read_text removes the file `name` first: gone between the listing and the read."""
    real_read_text = yaml_file.read_text

    def read_text_after_removal(path):
        if path.name == name:
            path.unlink()
        return real_read_text(path)

    monkeypatch.setattr(yaml_file, "read_text", read_text_after_removal)


def test_a_file_removed_during_the_first_read_is_a_problem_then_recovers(folder, monkeypatch):
    (folder / "other.yaml").write_text(dump_all([good_objects("2")["Service"]]))
    source = FileSource(folder, settle_s=0)
    removed_when_read(monkeypatch, "other.yaml")
    with pytest.raises(ConfigError) as rejected:
        source.poll()
    assert [str(p).startswith(f"{folder / 'other.yaml'}: cannot read") for p in rejected.value.problems] == [True]
    monkeypatch.undo()
    state = source.poll()                        # the folder as it is now: good.yaml alone
    assert good_applied(state) and not any(sp.service == "default/web2" for sp in state.service_ports.values())


def test_a_file_removed_during_an_incremental_read_gives_the_folder_as_it_is(folder, monkeypatch):
    (folder / "other.yaml").write_text(dump_all([good_objects("2")["Service"]]))
    source = FileSource(folder, settle_s=0)
    assert good_applied(source.poll())
    source.poll()                                # a quiet poll: the incremental index is built
    (folder / "other.yaml").write_text(dump_all([good_objects("22")["Service"]]))
    removed_when_read(monkeypatch, "other.yaml")
    state = source.poll()
    assert good_applied(state) and not any(sp.service.startswith("default/web2")
                                           for sp in state.service_ports.values())


def test_a_config_path_that_is_a_fifo_is_refused_not_read(tmp_path, monkeypatch):
    fifo = tmp_path / "services.yaml"
    os.mkfifo(fifo)

    class Blocked(Exception):
        """Stands for the read that would block forever."""

    def read_text(path):
        if path == fifo:
            raise Blocked()
        return real_read_text(path)

    real_read_text = yaml_file.read_text
    monkeypatch.setattr(yaml_file, "read_text", read_text)
    with pytest.raises(ConfigError) as rejected:
        read_config(fifo)
    assert str(rejected.value.problems[0]).startswith(f"{fifo}: ")


def test_a_lone_surrogate_in_a_json_file_is_refused_or_replaced(tmp_path):
    route = good_objects()["TCPRoute"]
    route["metadata"]["name"] = "tr\ud800"
    (tmp_path / "route.json").write_text(json.dumps(route))  # ASCII: the surrogate as \ud800
    try:
        result = read_config(tmp_path)
    except ConfigError as exc:
        assert all(str(p).startswith(str(tmp_path / "route.json")) for p in exc.problems)
        return
    for route in result.state.routes:
        str(route).encode("utf-8")


@pytest.mark.parametrize("name", BAD_FILES)
def test_with_a_route_a_bad_file_is_one_line_and_a_fix_is_read_incrementally(folder, name):
    """The same with a TCPRoute in the folder (its Services' edits now stay
    incremental): the bad file is refused, the running state stays, and a
    later edit of a backend Service is read alone and split again."""
    objs = good_objects()
    (folder / "route.yaml").write_text(dump_all([objs["TCPRoute"]]))
    source = FileSource(folder, settle_s=0)
    first = source.poll()
    assert good_applied(first) and any(sp.route for sp in first.service_ports.values())
    file_name, data, says = BAD_FILES[name]
    (folder / file_name).write_bytes(data)
    with pytest.raises(ConfigError) as rejected:
        source.poll()
    assert any(says in str(p) for p in rejected.value.problems)
    assert source.poll() is None
    (folder / file_name).unlink()
    again = source.poll()
    assert again == read_config(folder).state and good_applied(again)
    slice_ = dict(objs["EndpointSlice"])
    slice_["endpoints"] = slice_["endpoints"][:1]
    (folder / "good.yaml").write_text(dump_all([objs["Service"], slice_]))
    edited = source.poll()
    assert source._index is not None and edited.delta is not None   # incremental
    assert edited == read_config(folder).state
