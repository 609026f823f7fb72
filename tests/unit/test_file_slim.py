"""The file source holds its Services and EndpointSlices without the fields
nothing reads (file_incremental.slim). A field the build checks is dropped
only when its value passes the check: a bad one still rejects the file,
named as before, on a full read and on an incremental one alike."""

from __future__ import annotations

import copy
import json
import os

import pytest
import yaml

from k8s_builders import endpoint_slice, ep, service
from meshbpf.sources.errors import ConfigError
from meshbpf.sources.file_incremental import slim
from meshbpf.sources.held_text import as_text
from meshbpf.sources.kube_objects import SourceObject, build_state
from meshbpf.sources.yaml_file import FileSource, read_config

LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
# (kind, where in the object, a value the check passes, a value it refuses)
CHECKED = [
    ("Service", ("metadata", "uid"), "0b3c-41", 7),
    ("Service", ("metadata", "generateName"), "web-", ["web-"]),
    ("Service", ("metadata", "generation"), 3, True),
    ("Service", ("metadata", "deletionGracePeriodSeconds"), 30, "30"),
    ("Service", ("metadata", "finalizers"), ["a/b"], "a/b"),
    ("Service", ("metadata", "selfLink"), "/api/v1/x", 1),
    ("Service", ("spec", "selector"), {"app": "web"}, {"app": "not a label value"}),
    ("Service", ("spec", "selector"), {"app": "web"}, {"app": 1}),
    ("EndpointSlice", ("metadata", "uid"), "0b3c-42", {"u": 1}),
    ("EndpointSlice", ("endpoints", 0, "hostname"), "pod-0", 0),
    ("EndpointSlice", ("endpoints", 0, "deprecatedTopology"), {"zone": "a"}, ["zone"]),
    # Annotations: never read (but the trigger time, test_hardening_annotations.py).
    ("Service", ("metadata", "annotations"), {LAST_APPLIED: '{"kind":"Service"}'}, {"bad key": "x"}),
    ("Service", ("metadata", "annotations"), {"a": "b"}, {"a": 1}),
    ("Service", ("metadata", "annotations"), {"a": "x" * (256 * 1024 - 1)}, {"a": "x" * 256 * 1024}),
    ("EndpointSlice", ("metadata", "annotations"), {"Example.com/note": "x"}, {"a/b/c": "x"}),
]


def objects(kind: str, where: tuple, value) -> list[dict]:
    svc = service("web", "10.96.0.1")
    sl = endpoint_slice("web-1", "web", [ep("10.244.0.1"), ep("10.244.0.2")])
    target = svc if kind == "Service" else sl
    for step in where[:-1]:
        target = target[step]
    target[where[-1]] = value
    return [svc, sl]


def write(path, objs) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(yaml.safe_dump_all(objs))
    os.replace(tmp, path)


@pytest.mark.parametrize("kind,where,good,bad", CHECKED)
def test_a_field_that_passes_its_check_is_dropped_and_changes_nothing(kind, where, good, bad):
    objs = objects(kind, where, good)
    full = build_state([SourceObject(copy.deepcopy(o), "t") for o in objs], node_name="node-a")
    slimmed = [slim(copy.deepcopy(o)) for o in objs]
    assert where[-1] not in as_text(slimmed[0 if kind == "Service" else 1])
    assert not full.problems
    assert build_state([SourceObject(o, "t") for o in slimmed], node_name="node-a").state == full.state


@pytest.mark.parametrize("kind,where,good,bad", CHECKED)
def test_a_field_that_fails_its_check_is_kept_and_rejects_the_file(tmp_path, kind, where, good, bad):
    objs = objects(kind, where, bad)
    expected = build_state([SourceObject(copy.deepcopy(o), "t") for o in objs], node_name="node-a").problems
    assert expected  # the build refuses it
    held = slim(copy.deepcopy(objs[0 if kind == "Service" else 1]))
    assert json.dumps(bad, separators=(",", ":")) in as_text(held)  # kept for the build to name
    path = tmp_path / "a.yaml"
    write(path, objs)
    with pytest.raises(ConfigError) as full:
        read_config(tmp_path, "node-a")
    assert [(p.path, p.reason) for p in full.value.problems] == [(p.path, p.reason) for p in expected]
    # The same value arriving by an edit is refused too.
    write(path, objects(kind, where, good))
    src = FileSource(tmp_path, "node-a", settle_s=0, hold_s=0)
    assert src.poll() is not None and src._index is not None
    write(path, objs)
    with pytest.raises(ConfigError) as edit:
        src.poll()
    assert [(p.path, p.reason) for p in edit.value.problems] == [(p.path, p.reason) for p in expected]
