"""Labels and label selectors follow Kubernetes (labels are map[string]string,
keys are [DNS-1123 subdomain/]name, values a name or empty): anything else is
one problem naming the file, the document and the field, and the object is
left out as other bad objects of its kind are. Before, `version: 1` (an
integer) was kept and silently never matched a selector, and a key or value
no cluster could hold was taken as it was."""

import pytest
import yaml

from k8s_builders import build, endpoint_slice, ep, service
from meshbpf.sources.errors import ConfigError
from meshbpf.sources.kube_objects import SourceObject
from meshbpf.sources.kube_policy import read_policy_objects
from meshbpf.sources.yaml_file import read_config
from policy_world import expr, labels, netpol, ns_obj, pod_obj
from test_incremental_files import write
from test_kubernetes_source import FAST, Poller, api, no_leaked_threads  # noqa: F401

NAME_RULE = ("(letters, digits, '-', '_' and '.', starting and ending with a letter or digit), "
             "which Kubernetes requires of")
# (labels, field under metadata.labels, reason)
BAD_LABELS = [
    ({"version": 1}, "version", "expected a string, got an integer 1 (quote it)"),
    ({"canary": True}, "canary", "expected a string, got a boolean True (quote it)"),
    ({"app": None}, "app", "expected a string, got nothing (write '' for an empty one)"),
    ({1: "x"}, "1", "expected a string key, got an integer 1 (quote it)"),
    ({"bad key": "x"}, "bad key", f"'bad key' is not a label name {NAME_RULE} label keys"),
    ({"-app": "x"}, "-app", f"'-app' is not a label name {NAME_RULE} label keys"),
    ({"a/b/c": "x"}, "a/b/c", "'a/b/c' has more than one '/'; label keys are [prefix/]name"),
    ({"Example.com/app": "x"}, "Example.com/app",
     "'Example.com' is not a DNS-1123 subdomain (labels of lowercase letters, digits and '-' joined "
     "by '.', each starting and ending with a letter or digit), which Kubernetes requires of label "
     "key prefixes"),
    ({"k" * 64: "x"}, "k" * 64,
     "64 characters; Kubernetes requires of label keys a label name of at most 63"),
    ({"app": "web app"}, "app", f"'web app' is not a label value {NAME_RULE} label values"),
    ({"app": "web-"}, "app", f"'web-' is not a label value {NAME_RULE} label values"),
    ({"app": "v" * 64}, "app",
     "64 characters; Kubernetes requires of label values a label value of at most 63"),
]
WHOLE = [("app=web", "expected a map of strings, got a string 'app=web'"),
         (["app", "web"], "expected a map of strings, got a list")]
# Keys and values the lab and real clusters use: they stay valid.
GOOD = {"kubernetes.io/service-name": "web", "sidecar.istio.io/inject": "true",
        "app.kubernetes.io/name": "web", "topology.kubernetes.io/zone": "eu-west-1a",
        "a_b.c-D": "A_b.c-1", "empty": "", "k" * 63: "v" * 63, f"{'p' * 253}/n": "x"}


def _read(*objs):
    return read_policy_objects(SourceObject(o, f"test.yaml: document {i + 1}") for i, o in enumerate(objs))


# A Service's spec.selector is validated as labels by Kubernetes too: a key
# or value no pod can carry is a selector that silently matches nothing.
@pytest.mark.parametrize("field", ["metadata.labels", "spec.selector"])
@pytest.mark.parametrize("bad, key, reason", BAD_LABELS)
def test_a_bad_service_label_or_selector_is_named_and_only_that_service_is_left_out(
        field, bad, key, reason):
    svc = service("web", "10.96.0.10")
    section, name = field.split(".")
    svc[section][name] = bad
    result = build(svc, service("api", "10.96.0.11"))
    assert [str(p) for p in result.problems] == [
        f"test.yaml: document 1 (line 1) (Service default/web): {field}.{key}: {reason}"]
    assert [sp.service for sp in result.state.service_ports.values()] == ["default/api"]


@pytest.mark.parametrize("bad, reason", WHOLE)
def test_labels_that_are_not_a_map_are_named_with_what_they_are(bad, reason):
    svc = service("web")
    svc["metadata"]["labels"] = bad
    (problem,) = build(svc).problems
    assert (problem.path, problem.reason) == ("metadata.labels", reason)


@pytest.mark.parametrize("bad, key, reason", BAD_LABELS)
def test_a_bad_endpoint_slice_label_leaves_the_slice_out(bad, key, reason):
    sl = endpoint_slice("web-x", "web", [ep("10.244.1.1")])
    sl["metadata"]["labels"].update(bad)
    result = build(service("web"), sl)
    assert [(p.obj, p.path, p.reason) for p in result.problems] == [
        ("EndpointSlice default/web-x", f"metadata.labels.{key}", reason)]


def test_a_file_with_an_unquoted_number_as_a_label_is_refused_in_one_line(tmp_path):
    # As written by hand: the YAML reader makes `version: 1` an integer.
    text = yaml.safe_dump(service("web")).replace("    app: web\n", "    app: web\n    version: 1\n", 1)
    assert "version: 1\n" in text
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as exc:
        read_config(path)
    assert [str(p) for p in exc.value.problems] == [
        f"{path}: document 1 (line 1) (Service default/web): metadata.labels.version: "
        f"expected a string, got an integer 1 (quote it)"]


@pytest.mark.parametrize("bad, key, reason", BAD_LABELS)
def test_a_bad_pod_or_namespace_label_leaves_out_that_object_alone(bad, key, reason):
    pod, ns = pod_obj("x/a"), ns_obj("y")
    pod["metadata"]["labels"] = bad
    ns["metadata"]["labels"] = bad
    result = _read(pod, pod_obj("x/b"), ns, ns_obj("x"))
    assert [str(p) for p in result.problems] == [
        f"test.yaml: document 1 (Pod x/a): metadata.labels.{key}: {reason}",
        f"test.yaml: document 3 (Namespace y): metadata.labels.{key}: {reason}"]
    assert [p.name for p in result.pods] == ["b"] and [n.name for n in result.namespaces] == ["x"]
    assert ("Pod", "x", "a") in result.rejected  # its previous version stays, as for other problems


def test_a_bad_pod_label_in_a_file_leaves_out_the_pod_alone(tmp_path):
    bad = pod_obj("x/a", {"version": 1})
    path = tmp_path / "config.yaml"
    text = yaml.safe_dump_all([service("api", "10.96.0.11"), bad, pod_obj("x/b")])
    path.write_text(text)
    line = text.splitlines().index("---") + 1
    result = read_config(path)
    assert [str(p) for p in result.skipped] == [
        f"{path}: document 2 (line {line}) (Pod x/a): metadata.labels.version: "
        f"expected a string, got an integer 1 (quote it)"]
    assert [p.name for p in result.state.pods] == ["b"] and len(result.state.service_ports) == 1


# (selector, field under the selector, reason)
BAD_SELECTORS = [
    (labels(version=1), "matchLabels.version", "expected a string, got an integer 1 (quote it)"),
    ({"matchLabels": {2: "x"}}, "matchLabels.2", "expected a string key, got an integer 2 (quote it)"),
    ({"matchLabels": "app=web"}, "matchLabels", "expected a map of strings, got a string 'app=web'"),
    ({"matchLabels": {"bad key": "x"}}, "matchLabels.bad key",
     f"'bad key' is not a label name {NAME_RULE} label keys"),
    (labels(app="web app"), "matchLabels.app", f"'web app' is not a label value {NAME_RULE} label values"),
    (expr("bad key", "Exists"), "matchExpressions[0].key",
     f"'bad key' is not a label name {NAME_RULE} label keys"),
    (expr("a/b/c", "DoesNotExist"), "matchExpressions[0].key",
     "'a/b/c' has more than one '/'; label keys are [prefix/]name"),
    (expr("app", "In", "web", "web app"), "matchExpressions[0].values[1]",
     f"'web app' is not a label value {NAME_RULE} label values"),
    (expr("app", "NotIn", "v" * 64), "matchExpressions[0].values[0]",
     "64 characters; Kubernetes requires of label values a label value of at most 63"),
]


@pytest.mark.parametrize("where", ["spec.podSelector", "spec.ingress[0].from[0].namespaceSelector"])
@pytest.mark.parametrize("selector, field, reason", BAD_SELECTORS)
def test_a_bad_selector_leaves_out_that_policy_alone(where, selector, field, reason):
    if where == "spec.podSelector":
        bad = netpol("bad", "x", selector, ingress=[])
    else:
        bad = netpol("bad", "x", ingress=[{"from": [{"namespaceSelector": selector}]}])
    result = _read(bad, netpol("good", "x", labels(app="web"), ingress=[]))
    assert [str(p) for p in result.problems] == [
        f"test.yaml: document 1 (NetworkPolicy x/bad): {where}.{field}: {reason}"]
    assert [p.name for p in result.policies] == ["good"]
    assert ("NetworkPolicy", "x", "bad") in result.rejected


def test_labels_and_selectors_kubernetes_accepts_are_read():
    pod, ns = pod_obj("x/a", GOOD), ns_obj("x", GOOD)
    selector = {"matchLabels": GOOD, "matchExpressions": [
        {"key": k, "operator": "In", "values": [v or "x"]} for k, v in GOOD.items()]}
    policy = netpol("p", "x", selector, ingress=[{"from": [{"namespaceSelector": selector}]}])
    result = _read(pod, ns, policy)
    assert result.problems == []
    assert result.pods[0].labels["kubernetes.io/service-name"] == "web"
    assert len(result.policies) == 1
    svc = service("web")
    svc["metadata"]["labels"] = dict(GOOD)
    svc["spec"]["selector"] = dict(GOOD)
    assert build(svc).problems == []


@pytest.mark.parametrize("value, reason", [
    (1, "expected a string, got an integer 1 (quote it)"),
    ("v 2", f"'v 2' is not a label value {NAME_RULE} label values")])
def test_the_api_source_leaves_out_a_service_with_a_bad_label_alone(api, tmp_path, value, reason):
    """A server that skipped validation (the real one refuses such labels):
    through list and watch, that Service is one problem naming its field,
    the other stays."""
    bad = service("web", "10.96.1.1")
    bad["metadata"]["labels"]["version"] = value
    _api_source_leaves_out(api, tmp_path, bad, f"(Service default/web): metadata.labels.version: {reason}")


def _api_source_leaves_out(api, tmp_path, bad: dict, said: str) -> None:
    """The API source, given Service `bad` (default/web) beside a good one
    (db): the problem ends with `said`, and only db is emitted."""
    from meshbpf.sources.kubernetes import KubernetesSource
    api.apply(service("db", "10.96.1.2"), endpoint_slice("db-x", "db", [ep("10.244.1.2")]))
    source = KubernetesSource(kubeconfig=str(api.kubeconfig(tmp_path / "kubeconfig")),
                              node_name="node-a", backoff=FAST)
    try:
        poller = Poller(source)
        poller.until(lambda v: len(v) == 1, "the first state")
        api.apply(bad, endpoint_slice("web-x", "web", [ep("10.244.1.1")]))
        poller.wait(lambda: any("web" in p for p in source.problems), "the bad Service's events")
        poller.poll()
        assert [p for p in source.problems if p.endswith(said)]
        assert {sp.name for sp in poller.emitted[-1].service_ports.values()} == {"db"}
    finally:
        source.stop()


def test_a_bad_selector_in_an_edited_file_is_refused_in_one_line_and_the_state_stays(tmp_path):
    """The file source, full read and edit alike: as any bad Service, the
    change is refused and what was read before stays."""
    good = [service("web", "10.96.0.10"), service("api", "10.96.0.11")]
    bad = service("web", "10.96.0.10")
    bad["spec"]["selector"] = {"app": "web app"}
    file_source_refuses(tmp_path, good, [bad, good[1]],
                        f"spec.selector.app: 'web app' is not a label value {NAME_RULE} label values")


def file_source_refuses(tmp_path, good: list[dict], bad: list[dict], said: str) -> None:
    """A folder holding `good`, edited to `bad` (whose first object is
    Service default/web): the edit and a full read are each refused with
    one problem, `said` at that Service; `good` again is the first state."""
    from meshbpf.sources.yaml_file import FileSource
    path = tmp_path / "a.yaml"
    write(path, good)
    src = FileSource(tmp_path, "node-a", settle_s=0, hold_s=0)
    first = src.poll()
    assert first is not None
    write(path, bad)
    for read in (src.poll, lambda: read_config(tmp_path, "node-a")):
        with pytest.raises(ConfigError) as exc:
            read()
        assert [str(p) for p in exc.value.problems] == [
            f"{path}: document 1 (line 1) (Service default/web): {said}"]
    write(path, good)
    assert src.poll() == first


@pytest.mark.parametrize("selector, key, reason", [
    ({"bad key": "web"}, "bad key", f"'bad key' is not a label name {NAME_RULE} label keys"),
    ({"app": "web app"}, "app", f"'web app' is not a label value {NAME_RULE} label values")])
def test_the_api_source_leaves_out_a_service_with_a_bad_selector_alone(api, tmp_path, selector, key,
                                                                       reason):
    """A server that skipped validation: the source drops a valid selector
    (never read) but keeps a bad one, so it is named as in a file."""
    bad = service("web", "10.96.1.1")
    bad["spec"]["selector"] = selector
    _api_source_leaves_out(api, tmp_path, bad, f"(Service default/web): spec.selector.{key}: {reason}")
