"""The file source re-reads only the files that changed, and gives the state a
full read of the folder gives. Seeded random edits over a folder of files."""

from __future__ import annotations

import gc
import json
import os
import random

import pytest
import yaml

import meshbpf.sources.yaml_file as yaml_file
from k8s_builders import endpoint_slice, ep, service
from meshbpf.sources.errors import ConfigError
from meshbpf.sources.file_held import HeldFile
from meshbpf.sources.file_incremental import PieceReader
from meshbpf.sources.file_pieces import Split
from meshbpf.sources.route_status import route_statuses
from meshbpf.sources.yaml_file import FileSource, read_config
from policy_world import netpol, ns_obj, pod_obj


def write(path, objects) -> None:
    """Write-then-rename, as the README advises: a new inode every time."""
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(yaml.safe_dump_all(objects) if objects else "")
    os.replace(tmp, path)


@pytest.fixture
def parses(monkeypatch):
    seen = []
    real = yaml_file.parse_file

    def spy(path, text, previous=None):
        seen.append(path.name)
        return real(path, text, previous)
    monkeypatch.setattr(yaml_file, "parse_file", spy)
    return seen


def source(path) -> FileSource:
    return FileSource(path, "node-a", settle_s=0, hold_s=0)


def random_policy_objects(rng: random.Random, f: int) -> list[dict]:
    """Pods, a Namespace and NetworkPolicies, now and then."""
    if rng.random() < 0.5:
        return []
    pods = []
    for i in range(rng.randint(0, 2)):
        pod = pod_obj("x/a", {"v": str(rng.randint(0, 2))})
        pod["metadata"].update(namespace=f"n{f}", name=f"p{i}")
        pod["status"].update(podIP=f"10.250.{f}.{i + 1}", podIPs=[{"ip": f"10.250.{f}.{i + 1}"}])
        pods.append(pod)
    policies = [netpol(f"f{f}-pol{i}", f"n{f}", {"matchLabels": {"v": str(rng.randint(0, 2))}},
                       ingress=[{"ports": [{"port": rng.randint(1, 9)}]}]) for i in range(rng.randint(0, 2))]
    return [ns_obj(f"n{f}")] + pods + policies


def random_file(rng: random.Random, f: int) -> list[dict]:
    objects = random_policy_objects(rng, f)
    for i in range(rng.randint(0, 3)):
        name = f"f{f}s{i}"
        objects.append(service(name, f"10.96.{f}.{i + 1}"))
        for j in range(rng.randint(0, 2)):
            objects.append(endpoint_slice(f"{name}-{j}", name, [
                ep(f"10.244.{f}.{rng.randint(1, 9)}", ready=rng.random() < 0.8)
                for _ in range(rng.randint(0, 3))]))
    return objects


def poll_as_a_full_read(src: FileSource, path, state):
    """Polls; returns what the poll handed out (None: nothing new), the
    source's state now, and a full read's, which it must equal."""
    new = src.poll()
    expected = read_config(path, "node-a").state
    if new is not None:
        state = new
    assert state == expected
    return new, state, expected


@pytest.mark.parametrize("seed", range(25))
def test_random_edits_give_the_state_of_a_full_read_and_parse_only_the_edited_files(
        tmp_path, parses, seed):
    rng = random.Random(seed)
    for f in range(5):
        write(tmp_path / f"f{f}.yaml", random_file(rng, f))
    src = source(tmp_path)
    state = src.poll()
    assert state == read_config(tmp_path, "node-a").state
    for _ in range(8):
        edited = rng.sample(range(6), rng.randint(1, 2))
        for f in edited:
            path = tmp_path / f"f{f}.yaml"
            if rng.random() < 0.15 and path.exists():
                path.unlink()
            else:
                write(path, random_file(rng, f))
        parses.clear()
        previous = state
        new, state, expected = poll_as_a_full_read(src, tmp_path, state)
        existing = {f"f{f}.yaml" for f in edited if (tmp_path / f"f{f}.yaml").exists()}
        assert sorted(parses[: len(existing)]) == sorted(existing)  # then read_config's own
        assert src._index is not None  # stayed incremental
        if new is not None:
            assert new.delta is not None and new.delta.base() is previous
            changed = {fe for fe in state.service_ports.keys() | previous.service_ports.keys()
                       if state.service_ports.get(fe) != previous.service_ports.get(fe)}
            assert set(new.delta.frontends) == changed


def test_an_object_moving_between_files_and_a_duplicate_across_files(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    web = [service("web", "10.96.0.1"), endpoint_slice("web-1", "web", [ep("10.244.0.1")])]
    write(a, web)
    write(b, [service("db", "10.96.0.2")])
    src = source(tmp_path)
    first = src.poll()
    # Moved from a to b in one change: still one web, same state.
    write(a, [])
    write(b, [service("db", "10.96.0.2")] + web)
    assert src.poll() == first
    # Now defined in both files: rejected, naming both places, state unchanged.
    write(a, web[:1])
    with pytest.raises(ConfigError, match="defined twice"):
        src.poll()
    write(a, [])
    assert src.poll() == first


def test_a_bad_edit_is_rejected_with_its_file_and_a_fix_is_read(tmp_path):
    a = tmp_path / "a.yaml"
    write(a, [service("web", "10.96.0.1")])
    write(tmp_path / "b.yaml", [service("db", "10.96.0.2")])
    src = source(tmp_path)
    src.poll()
    bad = service("web", "10.96.0.1")
    bad["spec"]["ports"][0]["port"] = 70000
    write(a, [bad])
    with pytest.raises(ConfigError, match=r"a\.yaml.*spec\.ports\[0\]\.port"):
        src.poll()
    write(a, [service("web", "10.96.0.9")])
    assert {str(fe) for fe in src.poll().service_ports} == {"10.96.0.9:80/TCP", "10.96.0.2:80/TCP"}


@pytest.mark.parametrize("kind, field, value", [
    ("Service", "name", "Web_1"), ("Service", "namespace", "a" * 100_000),
    ("EndpointSlice", "name", "web\n1"), ("EndpointSlice", "namespace", "Default")])
def test_a_name_kubernetes_would_refuse_is_rejected_by_an_edit_as_by_a_full_read(
        tmp_path, kind, field, value):
    a = tmp_path / "a.yaml"
    web = [service("web", "10.96.0.1"), endpoint_slice("web-1", "web", [ep("10.244.0.1")])]
    write(a, web)
    write(tmp_path / "b.yaml", [service("db", "10.96.0.2")])
    src = source(tmp_path)
    first = src.poll()
    bad = [dict(o, metadata=dict(o["metadata"])) for o in web]
    bad[0 if kind == "Service" else 1]["metadata"][field] = value
    write(a, bad)
    with pytest.raises(ConfigError) as incremental:
        src.poll()
    with pytest.raises(ConfigError) as full:
        read_config(tmp_path, "node-a")
    assert [str(p) for p in incremental.value.problems] == [str(p) for p in full.value.problems]
    assert any(p.path == f"metadata.{field}" and p.obj.startswith(kind) for p in full.value.problems)
    write(a, web)
    assert src.poll() == first


def test_a_pod_named_as_kubernetes_would_refuse_is_left_out_by_an_edit_as_by_a_full_read(tmp_path):
    def pod(name: str, ip: str) -> dict:
        obj = pod_obj("x/a")
        obj["metadata"].update(namespace="n1", name=name)
        obj["status"].update(podIP=ip, podIPs=[{"ip": ip}])
        return obj

    a = tmp_path / "a.yaml"
    write(a, [service("web", "10.96.0.1"), ns_obj("n1"), pod("p1", "10.250.0.1")])
    src = source(tmp_path)
    src.poll()
    write(a, [service("web", "10.96.0.1"), ns_obj("n1"), pod("p1", "10.250.0.1"), pod("P_2", "10.250.0.2"),
              netpol("Deny all", "n1")])
    state = src.poll()
    assert src._index is not None  # the edit took the incremental path
    assert state == read_config(tmp_path, "node-a").state
    assert {p.name for p in state.pods} == {"p1"} and not state.network_policies
    problems = src.problems
    assert len(problems) == 2 and all("): metadata.name: " in p for p in problems), problems
    assert "(Pod n1/P_2)" in problems[0] and "(NetworkPolicy n1/Deny all)" in problems[1], problems


def test_an_agent_config_in_the_changed_file_takes_the_full_read(tmp_path):
    a = tmp_path / "a.yaml"
    write(a, [service("web", "10.96.0.1")])
    src = source(tmp_path)
    src.poll()
    config = {"apiVersion": "meshbpf.io/v1alpha1", "kind": "AgentConfig",
              "metadata": {"name": "agent"}, "spec": {}}
    write(tmp_path / "b.yaml", [config])
    state = src.poll()
    assert state == read_config(tmp_path, "node-a").state


def test_a_full_read_builds_its_index_and_drops_what_it_held_before_handing_the_state_out(tmp_path, monkeypatch):
    """The index is made from the held forms the read made (nothing is read
    again), once per full read; the read's own holdings (file_held) are
    freed before the state goes to the maps, whose sync then reuses their
    memory instead of adding to the peak."""
    built = []
    real = yaml_file.FileIndex

    def spy(*args, **kwargs):
        built.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(yaml_file, "FileIndex", spy)
    write(tmp_path / "a.yaml", [service("web", "10.96.0.1"), endpoint_slice("web-1", "web", [ep("10.244.0.1")])])
    src = source(tmp_path)
    first = src.poll()
    assert first is not None and built == [1]
    assert all(held is None for _, _, held in src._parsed.values())  # only the records stay
    assert src.poll() is None and built == [1]  # once
    write(tmp_path / "a.yaml", [service("web", "10.96.0.1"), endpoint_slice("web-1", "web", [ep("10.244.0.2")])])
    second = src.poll()
    assert second.delta is not None and second.delta.base() is first  # the incremental path took it
    assert second == read_config(tmp_path, "node-a").state


def test_a_change_before_any_quiet_poll_still_takes_the_incremental_path(tmp_path):
    write(tmp_path / "a.yaml", [service("web", "10.96.0.1")])
    src = source(tmp_path)
    first = src.poll()
    write(tmp_path / "a.yaml", [service("web", "10.96.0.2")])
    second = src.poll()
    assert second.delta is not None and second.delta.base() is first
    assert second == read_config(tmp_path, "node-a").state


def test_an_edit_that_read_a_big_file_hands_the_c_allocators_free_pages_back(tmp_path, monkeypatch):
    """glibc keeps a big file's freed text in its heap once its mmap
    threshold has risen (~30 MB of RSS per 10 000 Services edited): an
    edit that read over TRIM_AFTER_BYTES trims it; a small one does not."""
    trims = []
    monkeypatch.setattr(yaml_file, "trim_malloc", lambda: trims.append(1))
    monkeypatch.setattr(yaml_file, "TRIM_AFTER_BYTES", 2000)
    big, small = tmp_path / "big.yaml", tmp_path / "small.yaml"
    services = [service(f"s{i}", f"10.96.0.{i + 1}") for i in range(12)]
    write(big, services)
    write(small, [service("one", "10.96.1.1")])
    assert big.stat().st_size > 2000 > small.stat().st_size
    src = source(tmp_path)
    src.poll()
    assert src._index is not None
    write(small, [service("one", "10.96.1.2")])
    assert src.poll() is not None and trims == []
    write(big, services[:-1])
    assert src.poll() is not None and trims == [1]
    assert src._index is not None  # both edits took the incremental path
    big.unlink()  # a removal reads no text
    assert src.poll() is not None and trims == [1]


@pytest.mark.parametrize("layout", ["yaml", "json"])
def test_a_full_read_leaves_no_cycle_holding_what_it_read(tmp_path, layout):
    """What a full read held of each piece is freed by reference counting
    alone once the index holds the Services: a cycle (a reader, the cut's
    place, the cut's take) kept all of it in a heap the agent freezes and
    never collects (500 000 tuples at 100 000 Services)."""
    objs = [service("web", "10.96.0.1"), endpoint_slice("web-1", "web", [ep("10.244.0.1")])]
    path = tmp_path / f"a.{layout}"
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": objs}) if layout == "json"
                    else yaml.safe_dump_all(objs))
    gc.collect()
    gc.disable()
    try:
        src = source(tmp_path)
        assert src.poll() is not None and src._index is not None
        left = [o for o in gc.get_objects() if isinstance(o, (PieceReader, HeldFile, Split))]
    finally:
        gc.enable()
    assert left == []


def split_route(parent: str, backends: dict[str, int], name: str = "split") -> dict:
    """A TCPRoute on Service `parent` (port 80) over `backends` by weight."""
    return {"apiVersion": "gateway.networking.k8s.io/v1alpha2", "kind": "TCPRoute",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": parent}],
                     "rules": [{"backendRefs": [{"name": n, "port": 80, "weight": w}
                                                for n, w in backends.items()]}]}}


@pytest.mark.parametrize("seed", range(25))
def test_with_routes_random_edits_stay_incremental_and_give_the_state_of_a_full_read(
        tmp_path, parses, seed):
    """Routes in a file of their own, split parents whose backend Services
    are the ones edited (they come, go and change endpoints). Edits to the
    Services' files are read alone as before; each state is split again and
    equals a full read's, its Delta over the last state naming every
    frontend that changed (split parents included)."""
    rng = random.Random(1000 + seed)
    for f in range(5):
        write(tmp_path / f"f{f}.yaml", random_file(rng, f))
    write(tmp_path / "routes.yaml", [split_route("f0s0", {"f1s0": 1, "f2s1": 3}),
                                     split_route("f3s0", {"f4s0": 1, "f0s1": 1, "f9s9": 1}, "other")])
    src = source(tmp_path)
    state = src.poll()
    assert state == read_config(tmp_path, "node-a").state and state.routes
    assert src._index is not None
    for _ in range(8):
        edited = rng.sample(range(5), rng.randint(1, 2))
        for f in edited:
            write(tmp_path / f"f{f}.yaml", random_file(rng, f))
        parses.clear()
        previous = state
        new, state, expected = poll_as_a_full_read(src, tmp_path, state)
        assert src._index is not None  # stayed incremental
        # the routes' status from the index's view of the Services, as from a walk of all
        assert [ps.view() for ps in route_statuses(state, src._ports_of())] == \
            [ps.view() for ps in route_statuses(expected)]
        assert sorted(parses[:len(edited)]) == sorted(f"f{f}.yaml" for f in edited)  # then read_config's
        if new is not None:
            assert new.delta is not None and new.delta.base() is previous
            changed = {fe for fe in state.service_ports.keys() | previous.service_ports.keys()
                       if state.service_ports.get(fe) != previous.service_ports.get(fe)}
            split = {fe for s in (state, previous) for fe, sp in s.service_ports.items() if sp.route}
            assert changed <= set(new.delta.frontends) <= changed | split


def test_an_edit_to_a_route_takes_the_full_read(tmp_path):
    write(tmp_path / "svc.yaml", [service("web", "10.96.0.10"), service("v1", "10.96.1.1"),
                                  endpoint_slice("v1-a", "v1", [ep("10.1.0.1")])])
    write(tmp_path / "routes.yaml", [split_route("web", {"v1": 1})])
    src = source(tmp_path)
    first = src.poll()
    [sp] = [sp for sp in first.service_ports.values() if sp.route]
    write(tmp_path / "routes.yaml", [split_route("web", {"v1": 1, "v2": 1})])
    new = src.poll()
    assert new == read_config(tmp_path, "node-a").state and new.delta is None
    [sp] = [sp for sp in new.service_ports.values() if sp.route]
    assert len(sp.split) == 2


@pytest.mark.parametrize("seed", range(10))
def test_route_counters_find_the_splits_from_the_delta_as_from_a_walk_of_all(tmp_path, seed):
    """The agent's route counters look at the frontends the Delta names and
    those split last time, and take backend IDs from the planner's index:
    the same (svc_id, backend_id) pairs as a walk of every frontend and
    backend."""
    from meshbpf.datapath.route_counters import RouteCounters, wanted_pairs
    from meshbpf.reconcile import LBState, plan, wanted_services
    from meshbpf.reconcile.incremental import LBIndex
    rng = random.Random(2000 + seed)
    for f in range(5):
        write(tmp_path / f"f{f}.yaml", random_file(rng, f))
    write(tmp_path / "routes.yaml", [split_route("f0s0", {"f1s0": 1, "f2s1": 3}),
                                     split_route("f3s0", {"f4s0": 1, "f0s1": 1}, "other"),
                                     split_route("web", {"b1": 1, "b2": 2}, "always")])

    def split_file() -> list[dict]:   # a parent and backends that are always there
        return [service("web", "10.97.0.1"), service("b1", "10.97.0.2"), service("b2", "10.97.0.3"),
                endpoint_slice("b1-a", "b1", [ep(f"10.245.0.{i + 1}") for i in range(rng.randint(1, 3))]),
                endpoint_slice("b2-a", "b2", [ep(f"10.245.1.{i + 1}") for i in range(rng.randint(0, 3))])]
    write(tmp_path / "split.yaml", split_file())
    src, counters, lb = source(tmp_path), RouteCounters(tmp_path), LBState()
    for _ in range(8):
        state = src.poll()
        if state is not None:
            lb = plan(lb, wanted_services(state)).apply_to(lb)
            fast = wanted_pairs(state, lb, counters._split(state), LBIndex(lb).backend_id)
            assert fast == wanted_pairs(state, lb)
            assert any(labels[0] == "TCPRoute default/always" for labels in fast.values())
        write(tmp_path / "split.yaml", split_file())
        for f in rng.sample(range(5), rng.randint(1, 2)):
            write(tmp_path / f"f{f}.yaml", random_file(rng, f))
