"""The file source reads Pods, Namespaces and NetworkPolicies into the
DesiredState beside Services; a bad policy object is left out with one
problem (its previous version stays) and never blocks the rest."""

from __future__ import annotations

import logging
import os

import pytest
import yaml

from k8s_builders import endpoint_slice, ep, service
import meshbpf.sources.yaml_file as yaml_file
from meshbpf.model import DesiredState
from meshbpf.sources.errors import ConfigError
from meshbpf.sources.yaml_file import FileSource, read_config
from policy_world import labels, netpol, ns_obj, pod_obj


def write(path, objects) -> None:
    """Write-then-rename: a new inode every time, read at the next poll."""
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(yaml.safe_dump_all(objects) if objects else "")
    os.replace(tmp, path)


def source(path, **kw) -> FileSource:
    return FileSource(path, "node-a", settle_s=0, **{"hold_s": 0, **kw})


DENY = netpol("deny", "x", ingress=[])
ALLOW_B = netpol("allow-b", "x", labels(pod="a"), ingress=[{"from": [{"podSelector": labels(pod="b")}]}])
SERVICES = [service("web", "10.96.0.10"), endpoint_slice("web-1", "web", [ep("10.244.0.5")])]


def names(values) -> list[str]:
    return [f"{getattr(v, 'namespace', '')}/{v.name}".lstrip("/") for v in values]


def test_policy_objects_are_read_beside_services(tmp_path):
    write(tmp_path / "svc.yaml", SERVICES)
    write(tmp_path / "policy.yaml", [ALLOW_B, DENY, pod_obj("x/b"), pod_obj("x/a"), ns_obj("x")])
    result = read_config(tmp_path)
    state = result.state
    assert len(state.service_ports) == 1
    assert names(state.network_policies) == ["x/allow-b", "x/deny"]   # sorted
    assert names(state.pods) == ["x/a", "x/b"]
    assert names(state.namespaces) == ["x"]
    assert not result.skipped and not any("Pod" in n for n in result.notes)


def test_a_list_of_pods_is_read(tmp_path):
    write(tmp_path / "pods.yaml", [{"apiVersion": "v1", "kind": "List",
                                    "items": [pod_obj("x/a"), pod_obj("z/a")]}])
    assert names(read_config(tmp_path).state.pods) == ["x/a", "z/a"]  # (a bare y is YAML 1.1 true)


def test_a_state_without_policy_objects_has_empty_fields():
    assert DesiredState() == DesiredState(pods=(), namespaces=(), network_policies=())


def bad_policy() -> dict:
    bad = netpol("allow-b", "x", labels(pod="a"), ingress=[{"ports": [{"port": 70000}]}])
    return bad


def test_a_bad_policy_is_left_out_with_one_problem_and_the_rest_applies(tmp_path, caplog):
    write(tmp_path / "svc.yaml", SERVICES)
    write(tmp_path / "policy.yaml", [DENY, bad_policy(), pod_obj("x/a")])
    src = source(tmp_path)
    with caplog.at_level(logging.WARNING, logger="meshbpf.sources.yaml_file"):
        state = src.poll()
    assert state is not None and len(state.service_ports) == 1
    assert names(state.network_policies) == ["x/deny"] and names(state.pods) == ["x/a"]
    (problem,) = src.problems
    assert problem.startswith(f"{tmp_path / 'policy.yaml'}: document 2 (line ")
    assert "(NetworkPolicy x/allow-b): spec.ingress[0].ports[0].port: 70000 is not a port number" in problem
    assert "\n" not in problem
    assert caplog.text.count("spec.ingress[0].ports[0].port") == 1
    assert src.poll() is None and caplog.text.count("spec.ingress[0].ports[0].port") == 1


def test_a_bad_edit_of_a_policy_keeps_its_previous_version(tmp_path):
    write(tmp_path / "policy.yaml", [DENY, ALLOW_B])
    src = source(tmp_path)
    before = src.poll()
    good = next(p for p in before.network_policies if p.name == "allow-b")
    write(tmp_path / "policy.yaml", [DENY, bad_policy(), pod_obj("x/c")])
    state = src.poll()
    assert state.network_policies == before.network_policies   # neither opened nor closed
    assert good in state.network_policies and names(state.pods) == ["x/c"]
    assert len(src.problems) == 1
    # Fixed: the new version applies and the problem is gone.
    fixed = netpol("allow-b", "x", labels(pod="a"), ingress=[{"ports": [{"port": 7000}]}])
    write(tmp_path / "policy.yaml", [DENY, fixed])
    state = src.poll()
    assert state.network_policies != before.network_policies and not src.problems
    # Removed while bad: gone for good at the next read that no longer has it.
    write(tmp_path / "policy.yaml", [DENY])
    assert names(src.poll().network_policies) == ["x/deny"]


def test_a_bad_pod_keeps_its_previous_version_and_others_update(tmp_path):
    write(tmp_path / "pods.yaml", [pod_obj("x/a"), pod_obj("x/b")])
    src = source(tmp_path)
    src.poll()
    bad = pod_obj("x/a")
    bad["status"]["podIP"] = "10.0.1.999"
    write(tmp_path / "pods.yaml", [bad, pod_obj("x/b", {"role": "new"})])
    state = src.poll()
    by_name = {p.name: p for p in state.pods}
    assert str(by_name["a"].ips[0]) == "10.0.1.1" and by_name["b"].labels["role"] == "new"
    (problem,) = src.problems
    assert "(Pod x/a): status.podIP: '10.0.1.999' is not an IP address" in problem


def test_service_problems_still_reject_the_whole_change(tmp_path):
    write(tmp_path / "all.yaml", [DENY, service("web", "10.96.0.10", port=70000)])
    with pytest.raises(ConfigError):
        source(tmp_path).poll()


def test_a_change_that_removes_every_policy_is_held(tmp_path, caplog):
    now = [100.0]
    write(tmp_path / "policy.yaml", [DENY])
    src = source(tmp_path, hold_s=5, clock=lambda: now[0])
    assert src.poll() is not None
    write(tmp_path / "policy.yaml", [])
    with caplog.at_level(logging.WARNING, logger="meshbpf.sources.yaml_file"):
        assert src.poll() is None
    assert "removes every NetworkPolicy; holding it" in caplog.text
    now[0] += 6
    state = src.poll()
    assert state is not None and not state.network_policies


@pytest.fixture
def incremental(tmp_path, monkeypatch):
    """A source that has read Services and policy objects in two files, and
    from then on fails the test if an edit takes the full read."""
    write(tmp_path / "svc.yaml", SERVICES)
    write(tmp_path / "policy.yaml", [DENY, pod_obj("x/a"), ns_obj("x")])
    src = source(tmp_path)
    first = src.poll()
    monkeypatch.setattr(yaml_file, "read_config", lambda *a, **k: pytest.fail("took the full read"))
    return src, first


def test_a_services_only_edit_on_the_incremental_path_keeps_the_policy_inputs(tmp_path, incremental):
    src, first = incremental
    write(tmp_path / "svc.yaml", SERVICES + [service("api", "10.96.0.11")])
    state = src.poll()
    assert state.delta is not None and len(state.service_ports) == 2
    assert (state.pods, state.namespaces, state.network_policies) == (
        first.pods, first.namespaces, first.network_policies)


def test_a_policy_edit_takes_the_incremental_path_and_names_no_frontend(tmp_path, incremental):
    src, first = incremental
    write(tmp_path / "policy.yaml", [DENY, ALLOW_B, pod_obj("x/a"), ns_obj("x")])
    state = src.poll()
    assert names(state.network_policies) == ["x/allow-b", "x/deny"]
    assert state.delta.base() is first and state.delta.frontends == frozenset()
    assert state.service_ports == first.service_ports
    # A bad edit there: left out, its previous version stays, reported once.
    write(tmp_path / "policy.yaml", [DENY, bad_policy(), pod_obj("x/a"), ns_obj("x")])
    assert src.poll().network_policies == state.network_policies
    (problem,) = src.problems
    assert "policy.yaml: document 2" in problem and "spec.ingress[0].ports[0].port" in problem
    write(tmp_path / "policy.yaml", [DENY])
    assert names(src.poll().network_policies) == ["x/deny"] and not src.problems
