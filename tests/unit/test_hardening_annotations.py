"""Annotations follow Kubernetes (apimachinery's ValidateAnnotations): each
key a qualified name, case aside, and keys plus values at most 256 KiB in
all. Anything else is one problem naming the file, the document and the
field, and the object is left out as other bad objects of its kind are.
Before, annotations were only type-checked: a file could hold what no
cluster can. And the sources hold none of them but the one they read (the
last-change-trigger-time): kubectl apply's copy of the whole object was
kept for every Service."""

import copy

import pytest

from k8s_builders import build, endpoint_slice, ep, service
from meshbpf.sources.held_text import loaded
from meshbpf.sources.kube_incremental import TRIGGER_TIME, hold_annotations
from meshbpf.sources.names import ANNOTATIONS_MAX_BYTES, annotation_key_problem
from policy_world import ns_obj, pod_obj
from test_hardening_labels import NAME_RULE, _api_source_leaves_out, _read, file_source_refuses
from test_kubernetes_source import FAST, Poller, api, no_leaked_threads  # noqa: F401

LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
SUBDOMAIN = ("(labels of lowercase letters, digits and '-' joined by '.', each starting and ending "
             "with a letter or digit), which Kubernetes requires of")
# (annotations, field under metadata.annotations, reason)
BAD = [
    ({"bad key": "x"}, "bad key", f"'bad key' is not a label name {NAME_RULE} annotation keys"),
    ({"-x": "x"}, "-x", f"'-x' is not a label name {NAME_RULE} annotation keys"),
    ({"a/b/c": "x"}, "a/b/c", "'a/b/c' has more than one '/'; annotation keys are [prefix/]name"),
    ({"ex_ample.com/x": "x"}, "ex_ample.com/x",
     f"'ex_ample.com' is not a DNS-1123 subdomain {SUBDOMAIN} annotation key prefixes"),
    ({"example.com/-x": "x"}, "example.com/-x",
     f"'-x' is not a label name {NAME_RULE} annotation keys (after the prefix)"),
    ({"k" * 64: "x"}, "k" * 64, "64 characters; Kubernetes requires of annotation keys a label name of at most 63"),
]
TOO_BIG = {"a": "x" * 200_000, "b": "é" * 31_100}  # 262 202 bytes (231 102 characters: é is two bytes)
TOO_BIG_REASON = "262202 bytes of keys and values; Kubernetes allows at most 262144 (256 KiB) in all"
# Keys real clusters use, and what only the API server's lowercasing lets through.
GOOD = {LAST_APPLIED: '{"apiVersion":"v1","kind":"Service"}', "meta.helm.sh/release-name": "web",
        "Example.COM/Owner": "x", "k" * 63: "", f"{'p' * 253}/n": "v" * 100_000}


def test_the_key_rule_is_kubernetes_own():
    for key in GOOD:
        assert annotation_key_problem(key) is None, key
    for bad, key, reason in BAD:
        assert annotation_key_problem(key) == reason
    assert ANNOTATIONS_MAX_BYTES == 256 * 1024


@pytest.mark.parametrize("bad, key, reason", BAD + [(TOO_BIG, None, TOO_BIG_REASON)])
@pytest.mark.parametrize("kind", ["Service", "EndpointSlice"])
def test_bad_annotations_leave_out_that_object_alone(kind, bad, key, reason):
    svc, sl = service("web", "10.96.0.10"), endpoint_slice("web-x", "web", [ep("10.244.1.1")])
    (svc if kind == "Service" else sl)["metadata"]["annotations"] = dict(bad)
    result = build(svc, sl, service("api", "10.96.0.11"))
    field = "metadata.annotations" + (f".{key}" if key else "")
    assert [(p.obj, p.path, p.reason) for p in result.problems] == [
        (f"{kind} default/{'web' if kind == 'Service' else 'web-x'}", field, reason)]
    ports = {sp.service: sp for sp in result.state.service_ports.values()}
    assert "default/api" in ports
    if kind == "Service":
        assert "default/web" not in ports
    else:  # the Service stays, without the slice's endpoints
        assert ports["default/web"].endpoints == ()


@pytest.mark.parametrize("bad, key, reason", BAD[:2] + [(TOO_BIG, None, TOO_BIG_REASON)])
def test_bad_annotations_leave_out_that_pod_or_namespace_alone(bad, key, reason):
    pod, ns = pod_obj("x/a"), ns_obj("y")
    pod["metadata"]["annotations"] = dict(bad)
    ns["metadata"]["annotations"] = dict(bad)
    result = _read(pod, pod_obj("x/b"), ns, ns_obj("x"))
    field = "metadata.annotations" + (f".{key}" if key else "")
    assert [str(p) for p in result.problems] == [
        f"test.yaml: document 1 (Pod x/a): {field}: {reason}",
        f"test.yaml: document 3 (Namespace y): {field}: {reason}"]
    assert [p.name for p in result.pods] == ["b"] and [n.name for n in result.namespaces] == ["x"]


def test_annotations_kubernetes_accepts_are_read_and_change_nothing():
    plain = build(service("web", "10.96.0.10"), endpoint_slice("web-x", "web", [ep("10.244.1.1")]))
    svc, sl = service("web", "10.96.0.10"), endpoint_slice("web-x", "web", [ep("10.244.1.1")])
    svc["metadata"]["annotations"] = dict(GOOD)
    sl["metadata"]["annotations"] = {TRIGGER_TIME: "2026-12-03T10:00:00Z", **GOOD}
    result = build(svc, sl)
    assert result.problems == [] and result.state == plain.state


def test_a_source_holds_only_the_trigger_time_of_annotations_kubernetes_accepts():
    meta = {"name": "web-x", "annotations": {TRIGGER_TIME: "2026-12-03T10:00:00Z", **GOOD}}
    hold_annotations(meta)
    assert meta["annotations"] == {TRIGGER_TIME: "2026-12-03T10:00:00Z"}
    meta = {"name": "web", "annotations": dict(GOOD)}
    hold_annotations(meta)
    assert meta == {"name": "web"}
    for bad in [b for b, _, _ in BAD] + [TOO_BIG, {"a": 1}, {1: "a"}, ["a"]]:
        meta = {"name": "web", "annotations": copy.deepcopy(bad)}
        hold_annotations(meta)  # refused: kept whole for the build to name
        assert meta["annotations"] == bad


def test_a_file_with_a_bad_annotation_is_refused_in_one_line_full_read_and_edit(tmp_path):
    good = [service("web", "10.96.0.10"), service("api", "10.96.0.11")]
    good[0]["metadata"]["annotations"] = {LAST_APPLIED: "{}"}
    bad = copy.deepcopy(good)
    bad[0]["metadata"]["annotations"]["bad key"] = "x"
    file_source_refuses(tmp_path, good, bad, "metadata.annotations.bad key: "
                        f"'bad key' is not a label name {NAME_RULE} annotation keys")


def test_the_api_source_leaves_out_a_service_with_a_bad_annotation_alone(api, tmp_path):
    """A server that skipped validation (the real one refuses such keys)."""
    bad = service("web", "10.96.1.1")
    bad["metadata"]["annotations"] = {"bad key": "x"}
    _api_source_leaves_out(api, tmp_path, bad, "(Service default/web): metadata.annotations.bad key: "
                           f"'bad key' is not a label name {NAME_RULE} annotation keys")


def test_the_api_source_holds_no_annotation_but_the_trigger_time(api, tmp_path):
    from meshbpf.sources.kubernetes import KubernetesSource
    svc = service("web", "10.96.1.1")
    svc["metadata"]["annotations"] = dict(GOOD)
    sl = endpoint_slice("web-x", "web", [ep("10.244.1.1")])
    sl["metadata"]["annotations"] = {TRIGGER_TIME: "2026-12-03T10:00:00Z", LAST_APPLIED: "{}"}
    api.apply(svc, sl)
    source = KubernetesSource(kubeconfig=str(api.kubeconfig(tmp_path / "kubeconfig")),
                              node_name="node-a", backoff=FAST)
    try:
        Poller(source).until(lambda v: len(v) == 1, "the first state")
        (held_svc,) = [loaded(h) for _, h in source.reflectors["services"].held_items()]
        (held_slice,) = [loaded(h) for _, h in source.reflectors["endpointslices"].held_items()]
        assert "annotations" not in held_svc["metadata"]
        assert held_slice["metadata"]["annotations"] == {TRIGGER_TIME: "2026-12-03T10:00:00Z"}
    finally:
        source.stop()
