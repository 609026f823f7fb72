"""metadata.name and kind of the wrong type (a list, a number, a map) are
one problem naming the file, the document and the field, and say what the
value is: not "missing", which sends the reader looking for a field that
is there. The object is left out; the others apply where the source leaves
out one object (the Kubernetes source, and policy objects in files)."""

import pytest
import yaml

from k8s_builders import build, endpoint_slice, ep, service
from meshbpf.sources.errors import ConfigError
from meshbpf.sources.yaml_file import read_config

WRONG = [([1, 2], "a list [1, 2]"), (5, "an integer 5"), ({"a": 1}, "a map {'a': 1}"),
         (True, "a boolean True")]


@pytest.mark.parametrize("value, said", WRONG)
def test_a_service_name_of_the_wrong_type_is_named_and_only_it_is_left_out(value, said):
    bad = service("web", "10.96.0.10")
    bad["metadata"]["name"] = value
    good = service("api", "10.96.0.11")
    result = build(bad, good, endpoint_slice("api-x", "api", [ep("10.244.1.1")]))
    (problem,) = result.problems
    assert str(problem) == f"test.yaml: document 1 (line 1) (Service): metadata.name: expected a string, got {said}"
    assert [sp.service for sp in result.state.service_ports.values()] == ["default/api"]


@pytest.mark.parametrize("value, said", WRONG)
def test_a_kind_of_the_wrong_type_is_named(value, said):
    bad = service("web", "10.96.0.10")
    bad["kind"] = value
    result = build(bad, service("api", "10.96.0.11"))
    (problem,) = result.problems
    assert str(problem) == f"test.yaml: document 1 (line 1): kind: expected a string, got {said}"
    assert [sp.service for sp in result.state.service_ports.values()] == ["default/api"]


@pytest.mark.parametrize("value, said", WRONG)
def test_a_policy_name_of_the_wrong_type_in_a_file_is_left_out_alone(tmp_path, value, said):
    policy = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
              "metadata": {"name": value, "namespace": "default"}, "spec": {"podSelector": {}}}
    path = tmp_path / "config.yaml"
    text = yaml.safe_dump_all([service("api", "10.96.0.11"), policy])
    path.write_text(text)
    line = text.splitlines().index("---") + 1  # the separator line, as the source counts
    result = read_config(path)
    assert [str(p) for p in result.skipped] == [
        f"{path}: document 2 (line {line}) (NetworkPolicy): metadata.name: expected a string, got {said}"]
    assert len(result.state.service_ports) == 1


def test_a_missing_name_is_still_called_missing():
    bad = service("web")
    del bad["metadata"]["name"]
    (problem,) = build(bad).problems
    assert problem.path == "metadata.name" and problem.reason == "missing"


def test_a_file_with_a_service_name_of_the_wrong_type_is_refused_in_one_line(tmp_path):
    bad = service("web")
    bad["metadata"]["name"] = ["web"]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError) as exc:
        read_config(path)
    assert [str(p) for p in exc.value.problems] == [
        f"{path}: document 1 (line 1) (Service): metadata.name: expected a string, got a list ['web']"]
