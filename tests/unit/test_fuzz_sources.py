"""Fuzzing the readers of both sources with generated bad objects.

Every kind meshbpf reads (Service, EndpointSlice, Pod, Namespace,
NetworkPolicy, TCPRoute, UDPRoute, ReferenceGrant, AgentConfig) is mutated
at random (seeded; MESHBPF_FUZZ_SEED picks another run): wrong types at any
field, removed fields, huge and negative numbers, NaN, very long strings,
line breaks, deep nesting. Properties:

- the readers never raise: each bad object is a Problem;
- each problem is one line, names its place (file and document) and is of
  bounded length, whatever the value quoted in it;
- the Kubernetes source's reading (each bad object left out alone) still
  applies the good objects beside the bad one; the file source's reading
  (fuzz_files below) either applies them or rejects the whole change with
  ConfigError, never anything else.
"""

from __future__ import annotations

import copy
import os
import random
from dataclasses import dataclass

import pytest

from fuzz_objects import good_objects, mutate
from wrong_types import paths, replaced
from meshbpf.sources.errors import ConfigError, Problem
from meshbpf.sources.kube_objects import SourceObject, build_state
from meshbpf.sources.kube_policy import read_policy_objects
from meshbpf.sources.route_status import route_statuses
from meshbpf.sources.routes import apply_routes, read_grants, read_routes
from meshbpf.sources.yaml_file import read_config
from meshbpf.sources.yaml_load import dump_all

SEED = int(os.environ.get("MESHBPF_FUZZ_SEED", "20261201"))
KINDS = list(good_objects())
LB_KINDS = ("Service", "EndpointSlice", "AgentConfig")
POLICY_KINDS = ("Pod", "Namespace", "NetworkPolicy")
ROUTE_KINDS = ("TCPRoute", "UDPRoute")
MAX_LINE = 3000  # four parts of at most ~420 characters each, with room to spare


@dataclass
class Read:
    state: object
    pods: set[str]
    namespaces: set[str]
    policies: set[str]
    routes: set[str]
    grants: set[str]
    problems: list[Problem]
    status_lines: list[str]  # the routes' False conditions and notes, as the sources log them


def read_as_the_api_source(objects: list[dict], where: str = "fuzz.yaml") -> Read:
    """The readers the Kubernetes source runs over its objects, each kind by
    its own reader (a bad object is left out alone), up to route status."""
    srcs = [SourceObject(o, f"{where}: document {i + 1} (line 1)") for i, o in enumerate(objects)]
    of = lambda kinds: [s for s in srcs if s.obj.get("kind") in kinds]  # noqa: E731
    result = build_state(of(LB_KINDS))
    policy = read_policy_objects(of(POLICY_KINDS))
    routes, route_problems, route_notes = read_routes(of(ROUTE_KINDS))
    grants, grant_problems = read_grants(of(("ReferenceGrant",)))
    state, split_notes = apply_routes(result.state, routes, grants)
    status_lines = [line for ps in route_statuses(state) for line in ps.problems()]
    status_lines += route_notes + split_notes  # logged as they are
    return Read(state, {p.name for p in policy.pods}, {n.name for n in policy.namespaces},
                {p.name for p in policy.policies}, {r.name for r in routes}, {g.name for g in grants},
                result.problems + policy.problems + route_problems + grant_problems, status_lines)


def assert_one_line_and_placed(problems: list[Problem], where: str, what: list[str]) -> None:
    for problem in problems:
        text = str(problem)
        assert "\n" not in text and "\r" not in text and len(text.splitlines()) == 1, (what, text)
        assert len(text) < MAX_LINE, (what, text[:200], len(text))
        assert text.startswith(where), (what, text)


def assert_set_2_applied(read: Read, what: list[str]) -> None:
    """The second, untouched set of objects (suffix "2") is all there."""
    ports = [sp for sp in read.state.service_ports.values() if sp.service == "default/web2"]
    assert len(ports) == 2 and all(sp.endpoints for sp in ports), what
    assert {"pod2"} <= read.pods and {"ns2"} <= read.namespaces and {"np2"} <= read.policies, what
    assert {"tr2", "ur2"} <= read.routes and {"g2"} <= read.grants, what


def test_the_base_objects_are_good():
    read = read_as_the_api_source(list(good_objects().values()) + list(good_objects("2").values())[:-1])
    assert not read.problems, [str(p) for p in read.problems]
    assert_set_2_applied(read, [])
    assert read.pods == {"pod", "pod2"} and read.routes == {"tr", "ur", "tr2", "ur2"}


@pytest.mark.parametrize("kind", KINDS)
def test_a_bad_object_is_a_one_line_problem_and_the_others_still_apply(kind):
    rng = random.Random(f"{SEED}-{kind}")
    first, second = good_objects(), good_objects("2")
    del second["AgentConfig"]  # at most one may exist
    for _ in range(250):
        bad, what = mutate(first[kind], rng, rng.choice((1, 1, 2, 3)))
        objects = [bad if k == kind else obj for k, obj in first.items()] + list(second.values())
        try:
            read = read_as_the_api_source(objects)
        except Exception as exc:
            pytest.fail(f"{kind} {what}: {type(exc).__name__}: {exc}")
        assert_one_line_and_placed(read.problems, "fuzz.yaml: document", what)
        assert all(len(line.splitlines()) == 1 and line.startswith("fuzz.yaml: document")
                   for line in read.status_lines), (what, read.status_lines)
        assert not any("internal error" in str(p) for p in read.problems), (what, read.problems)
        assert_set_2_applied(read, what)


@pytest.mark.parametrize("kind", KINDS)
def test_the_file_source_rejects_or_applies_a_bad_object_never_raises(kind, tmp_path):
    """As written to a file and read back (YAML 1.1 through our loader): a
    ConfigError or a state with the good file's objects in it."""
    rng = random.Random(f"{SEED}-file-{kind}")
    first, second = good_objects(), good_objects("2")
    del second["AgentConfig"]
    (tmp_path / "good.yaml").write_text(dump_all(list(second.values())))
    for _ in range(15):
        bad, what = mutate(first[kind], rng, rng.choice((1, 2)))
        (tmp_path / "bad.yaml").write_text(dump_all([bad if k == kind else obj for k, obj in first.items()]))
        try:
            result = read_config(tmp_path, cache={})
        except ConfigError as exc:
            assert exc.problems, what
            assert_one_line_and_placed(exc.problems, str(tmp_path / "bad.yaml"), what)
            continue
        except Exception as exc:
            pytest.fail(f"{kind} {what}: {type(exc).__name__}: {exc}")
        assert_one_line_and_placed(result.skipped, str(tmp_path / "bad.yaml"), what)
        state = result.state
        ports = [sp for sp in state.service_ports.values() if sp.service == "default/web2"]
        assert len(ports) == 2, what
        assert {p.name for p in state.pods} >= {"pod2"} and {r.name for r in state.routes} >= {"tr2", "ur2"}, what


def test_a_name_that_is_a_list_keeps_a_routes_previous_version():
    """read_routes looked the previous version of a bad route up by its
    name, and a name that is not a string (a list) raised TypeError, which
    in the Kubernetes source rejected every object at once."""
    good = good_objects()["TCPRoute"]
    routes, problems, _ = read_routes([SourceObject(good, "f.yaml: document 1 (line 1)")])
    bad = dict(good, metadata={"name": ["tr"], "namespace": "default"})
    routes_after, problems, _ = read_routes([SourceObject(bad, "f.yaml: document 1 (line 1)")], routes)
    assert [str(p) for p in problems] == [
        "f.yaml: document 1 (line 1) (TCPRoute default/['tr']): metadata.name: "
        "must be a non-empty string, not ['tr']"]
    assert routes_after == []  # the bad one names no route, so no previous version stays


def test_a_line_break_or_a_huge_value_in_a_name_stays_one_short_line():
    svc = good_objects()["Service"]
    svc["metadata"]["namespace"] = "a\nb\u2028c"
    svc["spec"]["sessionAffinity"] = "x" * 1_000_000
    problems = read_as_the_api_source([svc]).problems
    # The namespace is a problem of its own (not a DNS label); the other
    # fields are still read and their problems carry the name too.
    assert [p.path for p in problems] == ["metadata.namespace", "spec.sessionAffinity"]
    assert all(len(str(p).splitlines()) == 1 for p in problems)
    text = str(problems[1])
    assert "a\\nb\\u2028c" in text and len(text.splitlines()) == 1 and len(text) < MAX_LINE
    assert text.endswith(" characters)")  # how much was cut


@pytest.mark.parametrize("field, value", [("name", "web\nother"), ("namespace", "a" * 100_000),
                                          ("name", "Web_1")])
def test_a_name_kubernetes_would_refuse_is_a_problem(field, value):
    svc = good_objects()["Service"]
    svc["metadata"][field] = value
    problems = read_as_the_api_source([svc]).problems
    assert any(p.path == f"metadata.{field}" for p in problems), [str(p) for p in problems]




# Names Kubernetes refuses under every rule (DNS-1035, DNS-1123 label and
# subdomain, the Gateway API's ObjectName for a non-Service reference).
REFUSED_NAMES = ["Web_1", "line\nbreak", "a" * 100_000, "\u00e9\u4e2d", "*"]


def name_paths(obj: dict) -> list[tuple]:
    """The paths of the object's own name and namespace and of the names and
    namespaces it refers to (not port or container names)."""
    refs = ("parentRefs", "backendRefs", "from", "to")
    return [p for p in paths(obj) if p[-1] in ("name", "namespace")
            and (p[:-1] == ("metadata",) or any(r in p for r in refs))]


def dotted(path: tuple) -> str:
    return "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in path).lstrip(".")


@pytest.mark.parametrize("kind", KINDS)
def test_every_name_kubernetes_would_refuse_is_a_problem_at_its_field(kind):
    """Each name or namespace of each kind, set to what the API server would
    refuse: a one-line problem at that very field, and the other set of
    objects still applies (the Kubernetes source's reading)."""
    second = good_objects("2")
    del second["AgentConfig"]
    where = name_paths(good_objects()[kind])
    assert where, kind
    for path in where:
        # A reference's name is the Gateway API's ObjectName: any string of
        # 1-253 characters (one no Service can have resolves to nothing).
        ref_name = path[-1] == "name" and path[:-1] != ("metadata",)
        for value in [v for v in REFUSED_NAMES if len(v) > 253] if ref_name else REFUSED_NAMES:
            what = [f"{dotted(path)}={value[:20]!r}"]
            objects = [replaced(obj, path, value) if k == kind else obj
                       for k, obj in good_objects().items()] + list(second.values())
            read = read_as_the_api_source(objects)
            assert dotted(path) in {p.path for p in read.problems}, (what, [str(p) for p in read.problems])
            assert_one_line_and_placed(read.problems, "fuzz.yaml: document", what)
            assert_set_2_applied(read, what)


@pytest.mark.parametrize("kind", ["Service", "EndpointSlice"])
def test_the_file_sources_incremental_reads_of_bad_edits_equal_full_reads(kind, tmp_path):
    """Edits of one file take the incremental path (file_incremental); with
    a bad object in them it must answer as a full read of the folder does:
    the same state, or a rejection."""
    from meshbpf.sources.yaml_file import FileSource

    rng = random.Random(f"{SEED}-incremental-{kind}")
    first, second = good_objects(), good_objects("2")
    (tmp_path / "good.yaml").write_text(dump_all([second["Service"], second["EndpointSlice"]]))
    edit = tmp_path / "edit.yaml"
    edit.write_text(dump_all([first["Service"], first["EndpointSlice"]]))
    source = FileSource(tmp_path, settle_s=0, hold_s=0)
    source.poll()
    for round in range(40):
        bad, what = mutate(first[kind], rng, rng.choice((1, 2)))
        objects = [bad if k == kind else first[k] for k in ("Service", "EndpointSlice")]
        edit.write_text(dump_all(objects) + "#" * round)  # a new size: always a change
        try:
            full = read_config(tmp_path, cache={}).state
        except ConfigError:
            full = None
        try:
            state = source.poll()
        except ConfigError:
            assert full is None, what
            continue
        except Exception as exc:
            pytest.fail(f"{kind} {what}: {type(exc).__name__}: {exc}")
        assert full is not None, what
        if state is not None:  # None: nothing the source hands out changed
            assert state.service_ports == full.service_ports, what
        source.poll()                            # quiet: the incremental index is built again


def test_a_slice_with_labels_that_are_not_a_map_is_rejected_on_the_incremental_path_too(tmp_path):
    from meshbpf.sources.yaml_file import FileSource

    first = good_objects()
    (tmp_path / "edit.yaml").write_text(dump_all([first["Service"], first["EndpointSlice"]]))
    source = FileSource(tmp_path, settle_s=0, hold_s=0)
    assert all(sp.endpoints for sp in source.poll().service_ports.values())
    source.poll()                                # quiet: the incremental index is built
    bad = copy.deepcopy(first["EndpointSlice"])
    bad["metadata"]["labels"] = "kubernetes.io/service-name=web"
    (tmp_path / "edit.yaml").write_text(dump_all([first["Service"], bad]))
    with pytest.raises(ConfigError):             # as a full read: rejected, web keeps its endpoints
        read_config(tmp_path, cache={})
    with pytest.raises(ConfigError):
        source.poll()


@pytest.mark.parametrize("kind", KINDS)
def test_an_object_defined_twice_is_one_line_naming_both_places(kind):
    """The same kind, namespace and name twice in the input: one is used and
    the other is a problem naming the first place (a ReferenceGrant kept
    both, so a grant edited by a later copy still allowed what it removed)."""
    objects = list(good_objects().values())
    twin = copy.deepcopy(good_objects()[kind])
    read = read_as_the_api_source(objects + [twin])
    if kind == "AgentConfig":  # at most one may exist, whatever its name
        assert any("AgentConfig" in str(p) for p in read.problems), [str(p) for p in read.problems]
        return
    twice = [str(p) for p in read.problems if "defined twice" in p.reason]
    assert len(twice) == 1, [str(p) for p in read.problems]
    assert twice[0].startswith(f"fuzz.yaml: document {len(objects) + 1} ") and "(first at fuzz.yaml: document" in twice[0]
