"""What the Kubernetes source keeps of each Service and EndpointSlice: the
fields kube_objects reads, nothing else (they are held for every object of
the cluster), and the objects as kept build the state the whole ones build."""

from __future__ import annotations

import copy
import json

from k8s_builders import endpoint_slice, ep, service
from meshbpf.sources.kube_objects import SourceObject, build_state
from meshbpf.sources.held_text import as_text
from meshbpf.sources.kubernetes import ENDPOINT_SLICE_KEPT, _pruned, _service_kept

OWNER = [{"apiVersion": "v1", "kind": "Service", "name": "web", "uid": "u-1", "controller": True}]


def full_objects() -> tuple[dict, dict]:
    """A Service and its slice with the fields the API server adds."""
    svc = service("web", "10.96.0.10", ports=[
        {"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}])
    svc["spec"]["selector"] = {"app": "web"}
    sl = endpoint_slice("web-x", "web", [ep("10.244.0.5", zone="z1"), ep("10.244.0.6", ready=False)],
                        ports=[{"name": "http", "port": 8080, "protocol": "TCP"}])
    for obj in (svc, sl):
        obj["metadata"].update(uid="u-2", generation=3, creationTimestamp="2024-01-01T00:00:00Z",
                               ownerReferences=OWNER, managedFields=[{"manager": "kcm"}],
                               newerField={"x": 1})
    sl["endpoints"][0]["targetRef"] = {"kind": "Pod", "name": "web-1", "namespace": "default"}
    sl["endpoints"][0]["hostname"] = "web-1"
    sl["endpoints"][0]["hints"] = {"forZones": [{"name": "z1"}]}
    return svc, sl


def test_kept_objects_drop_what_is_never_read_and_keep_what_is():
    svc, sl = full_objects()
    kept_svc = _service_kept(copy.deepcopy(svc))
    kept_sl = _pruned(ENDPOINT_SLICE_KEPT)(copy.deepcopy(sl))
    for kept in (kept_svc, kept_sl):
        assert set(kept["metadata"]) <= {"name", "namespace", "labels", "annotations", "resourceVersion"}
        assert kept["metadata"]["name"] in ("web", "web-x")
    assert "selector" not in kept_svc["spec"] and kept_svc["spec"]["ports"] == svc["spec"]["ports"]
    assert kept_sl["endpoints"][0] == {k: v for k, v in sl["endpoints"][0].items()
                                       if k not in ("targetRef", "hostname")}
    assert kept_sl["metadata"]["labels"] == sl["metadata"]["labels"]


def test_kept_objects_build_the_state_the_whole_ones_build():
    svc, sl = full_objects()
    for obj in (svc, sl):
        del obj["metadata"]["newerField"]  # the file source reports it; the API source drops it
    whole = build_state([SourceObject(svc, "x"), SourceObject(sl, "x")], node_zone="z1")
    kept = build_state([SourceObject(_service_kept(copy.deepcopy(svc)), "x"),
                        SourceObject(_pruned(ENDPOINT_SLICE_KEPT)(copy.deepcopy(sl)), "x")],
                       node_zone="z1")
    assert kept.state == whole.state and not kept.problems and not whole.problems
    assert len(kept.state.service_ports) == 1


def test_the_source_holds_each_object_as_compact_json_text_of_what_it_keeps():
    _, sl = full_objects()
    text = as_text(_pruned(ENDPOINT_SLICE_KEPT)(copy.deepcopy(sl)))
    assert isinstance(text, str) and ": " not in text and ", " not in text
    assert json.loads(text) == _pruned(ENDPOINT_SLICE_KEPT)(copy.deepcopy(sl))


def test_a_selector_kubernetes_would_refuse_is_kept_to_be_named():
    """Only a bad selector is held (a server that skipped validation): the
    state build then names it; a valid one is never read."""
    svc, _ = full_objects()
    svc["spec"]["selector"] = {"app": "web app"}
    kept = _service_kept(copy.deepcopy(svc))
    assert kept["spec"]["selector"] == {"app": "web app"}
    (problem,) = build_state([SourceObject(kept, "x")]).problems
    assert problem.path == "spec.selector.app"
