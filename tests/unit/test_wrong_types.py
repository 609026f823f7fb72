"""Wrong types at every field of every object meshbpf reads: a problem, never a crash.

The table is generated: each field of a full AgentConfig, Service and
EndpointSlice (nested maps and list items too) is replaced in turn by a
string, a list, a map, null, a number and a boolean. build_state must return
(with or without problems); an exception would kill the agent's loop, and
through a ConfigMap every node at once.
"""

from __future__ import annotations

from typing import Any, Iterator

import pytest

from wrong_types import WRONG, paths, replaced
from k8s_builders import build, endpoint_slice, ep, service
from meshbpf.sources import yaml_file
from meshbpf.sources.errors import ConfigError
from meshbpf.sources.yaml_file import FileSource

AGENT_CONFIG = {
    "apiVersion": "meshbpf.io/v1alpha1", "kind": "AgentConfig",
    "metadata": {"name": "meshbpf", "labels": {"a": "b"}},
    "spec": {"socketRedirect": {"enabled": True, "cgroups": ["kubepods.slice"],
                                "podCIDRs": ["10.244.0.0/16"]}},
}
SERVICE = service("web", ["10.96.0.10", "fd00:96::10"], ipFamilyPolicy="RequireDualStack",
                  sessionAffinity="ClientIP",
                  sessionAffinityConfig={"clientIP": {"timeoutSeconds": 30}},
                  ports=[{"name": "http", "port": 80, "protocol": "TCP", "targetPort": "web"},
                         {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53}])
SLICE = endpoint_slice("web-x", "web", [ep("10.244.1.1", zone="a"), ep("10.244.1.2")],
                       ports=[{"name": "http", "port": 8080, "protocol": "TCP"},
                              {"name": "dns", "port": 53, "protocol": "UDP"}])
SLICE["endpoints"][0]["hints"] = {"forZones": [{"name": "a"}]}



def cases() -> Iterator[Any]:
    for name, obj in (("AgentConfig", AGENT_CONFIG), ("Service", SERVICE), ("EndpointSlice", SLICE)):
        for path in paths(obj):
            for wrong, value in WRONG.items():
                label = f"{name}:{'.'.join(map(str, path))}={wrong}"
                yield pytest.param(obj, path, value, id=label)


def test_the_base_objects_are_good():
    result = build(AGENT_CONFIG, SERVICE, SLICE)
    assert not result.problems, result.problems
    assert len(result.state.service_ports) == 4


# Fields meshbpf does not read (any value passes), and targetPort (a number or a name).
UNREAD = ("status", "creationTimestamp", "ownerReferences", "targetRef", "targetPort")


def field_path(path: tuple) -> str:
    """('spec', 'ports', 0, 'port') -> 'spec.ports[0].port', as problems name fields."""
    out = ""
    for key in path:
        out += f"[{key}]" if isinstance(key, int) else (f".{key}" if out else key)
    return out


@pytest.mark.parametrize("obj, path, value", list(cases()))
def test_a_wrong_type_anywhere_is_a_problem_not_an_exception(obj, path, value):
    others = [o for o in (AGENT_CONFIG, SERVICE, SLICE) if o is not obj]
    result = build(replaced(obj, path, value), *others)  # must not raise
    for problem in result.problems:
        text = str(problem)
        assert text.startswith("test.yaml: document") and "\n" not in text, text
    original = obj
    for key in path:
        original = original[key]
    if value is None or type(value) is type(original) or set(path) & set(UNREAD):
        return  # unset, or the same type, or a field nobody reads: may be fine
    where = field_path(path)
    assert any(p.path and (where.startswith(p.path) or p.path.startswith(where))
               for p in result.problems), (where, [str(p) for p in result.problems])


@pytest.mark.parametrize("field, value", [
    ("metadata", "foo"), ("metadata", ["foo"]), ("spec", "foo"), ("spec", 3),
    ("apiVersion", ["x"]),
])
def test_agent_config_with_a_wrong_type_names_the_field(field, value):
    result = build(replaced(AGENT_CONFIG, (field,), value), SERVICE, SLICE)
    (problem,) = result.problems
    assert problem.path == field and problem.obj.startswith("AgentConfig"), problem
    assert len(result.state.service_ports) == 4  # the Services are still read


def test_a_whole_document_of_the_wrong_type_is_one_problem():
    for value in ("foo", 7, ["x"], True):
        (problem,) = build(value, SERVICE, SLICE).problems
        assert "expected a Kubernetes object (a map)" in str(problem)


# --- The file source keeps running whatever it reads ----------------------------

GOOD_FILE = """\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, protocol: TCP}]
"""


def test_agent_config_metadata_string_in_the_watched_folder_is_a_one_line_problem(tmp_path):
    """The issue's reproduction: `metadata: foo` killed the agent."""
    (tmp_path / "svc.yaml").write_text(GOOD_FILE)
    src = FileSource(tmp_path, settle_s=0)
    assert src.poll() is not None
    (tmp_path / "agent.yaml").write_text(
        "apiVersion: meshbpf.io/v1alpha1\nkind: AgentConfig\nmetadata: foo\n")
    with pytest.raises(ConfigError) as exc:
        src.poll()
    (problem,) = exc.value.problems
    assert str(problem) == (f"{tmp_path / 'agent.yaml'}: document 1 (line 1) (AgentConfig ?): "
                            "metadata: expected a map, got a string")
    assert src.poll() is None  # reported once; the agent keeps its state


def test_a_bug_while_reading_is_a_rejected_change_not_a_crash(tmp_path, monkeypatch):
    (tmp_path / "svc.yaml").write_text(GOOD_FILE)
    src = FileSource(tmp_path, settle_s=0)

    def broken(*args, **kwargs):
        raise TypeError("a bug")
    monkeypatch.setattr(yaml_file, "build_files", broken)
    with pytest.raises(ConfigError) as exc:
        src.poll()
    assert "internal error while reading it (TypeError: a bug)" in str(exc.value)
