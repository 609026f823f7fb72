"""Route status (issue 13): Accepted and ResolvedRefs per Service parent,
computed from the state, reported by the file source, written by the
Kubernetes source on status.parents (status subresource) only when it
differs, and shown by `meshbpf route list`."""

from __future__ import annotations

import copy
from fractions import Fraction
import logging

import pytest

from meshbpf.sources.route_status import CONTROLLER_NAME, route_statuses, routes_view

from k8s_builders import fe
from test_kubernetes_source import api, make_source, no_leaked_threads  # noqa: F401 (fixtures)
from test_split import V4, cluster, fractions, read, route, service_share


def conditions(result) -> dict[str, list[tuple[str, str, str]]]:
    """parent -> [(type, status, reason)]"""
    out: dict = {}
    for ps in route_statuses(result.state):
        out[f"{ps.route} -> {ps.parent.name}"] = [(c.type, str(c.status), c.reason) for c in ps.conditions]
    return out


OK = [("Accepted", "True", "Accepted"), ("ResolvedRefs", "True", "ResolvedRefs")]


def test_a_good_route_is_accepted_with_its_refs_resolved(tmp_path):
    result = read(tmp_path, cluster({"v1": 1, "v2": 1}) + [route({"v1": 70, "v2": 30})])
    assert conditions(result) == {"TCPRoute default/split -> web": OK}


def test_a_missing_backend_is_backend_not_found(tmp_path):
    result = read(tmp_path, cluster({"v1": 1}) + [route({"v1": 70, "gone": 30})])
    assert conditions(result)["TCPRoute default/split -> web"] == [
        ("Accepted", "True", "Accepted"), ("ResolvedRefs", "False", "BackendNotFound")]


@pytest.mark.parametrize("edit,reason", [
    ({"namespace": "other"}, "RefNotPermitted"),
    ({"kind": "ConfigMap"}, "InvalidKind"),
    ({"group": "example.com", "kind": "Backend"}, "InvalidKind"),
])
def test_a_ref_we_cannot_use_is_refused_and_said_why(tmp_path, edit, reason):
    r = route({"v1": 70, "v2": 30})
    r["spec"]["rules"][0]["backendRefs"][1].update(edit)
    result = read(tmp_path, cluster({"v1": 1, "v2": 1}) + [r])
    assert not result.skipped  # the route applies; only that reference is refused
    assert conditions(result)["TCPRoute default/split -> web"] == [
        ("Accepted", "True", "Accepted"), ("ResolvedRefs", "False", reason)]
    assert fractions(service_share(result)) == {"v1": Fraction(7, 10), "refused": Fraction(3, 10)}


def test_parent_without_the_port_or_service_is_no_matching_parent(tmp_path):
    result = read(tmp_path, cluster({"v1": 1}) + [route({"v1": 1}, parent_port=81)])
    assert conditions(result)["TCPRoute default/split -> web"][0] == ("Accepted", "False", "NoMatchingParent")
    r = route({"v1": 1})
    r["spec"]["parentRefs"][0]["name"] = "nope"
    assert conditions(read(tmp_path, cluster({"v1": 1}) + [r]))["TCPRoute default/split -> nope"][0] == (
        "Accepted", "False", "NoMatchingParent")


def test_a_second_route_on_a_split_parent_is_conflicted(tmp_path):
    result = read(tmp_path, cluster({"v1": 1, "v2": 1}) + [route({"v1": 1}, name="a"), route({"v2": 1}, name="b")])
    got = conditions(result)
    assert got["TCPRoute default/a -> web"] == OK
    assert got["TCPRoute default/b -> web"][0] == ("Accepted", "False", "Conflicted")


def test_the_file_source_reports_false_conditions_as_problems(tmp_path):
    from meshbpf.sources.yaml_file import FileSource
    import yaml
    (tmp_path / "c.yaml").write_text(yaml.safe_dump_all(cluster({"v1": 1}) + [route({"v1": 70, "gone": 30})]))
    src = FileSource(tmp_path / "c.yaml", settle_s=0, hold_s=0)
    src.poll()
    (line,) = src.problems
    assert line.startswith(f"{tmp_path / 'c.yaml'}: document 5 (line ")
    assert line.endswith("(TCPRoute default/split): parent Service default/web: ResolvedRefs False "
                         "(BackendNotFound): backendRefs[1] default/gone: no Service with TCP port 80 (IPv4); "
                         "its share is refused")
    view = routes_view(src._read_state)
    assert view["controller"] == CONTROLLER_NAME and view["routes"][0]["conditions"][1]["status"] == "False"


def test_route_list_shows_each_parent_and_its_conditions(tmp_path, monkeypatch):
    from click.testing import CliRunner
    from meshbpf.cli import inspect_cmd
    from meshbpf.cli import cli
    result = read(tmp_path, cluster({"v1": 1}) + [route({"v1": 70, "gone": 30})])
    monkeypatch.setattr(inspect_cmd, "fetch", lambda agent, path, timeout=2.0: routes_view(result.state))
    out = CliRunner().invoke(cli, ["route", "list"])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert lines[0].split() == ["ROUTE", "PARENT", "ACCEPTED", "RESOLVEDREFS", "MESSAGE"]  # kind, name: ROUTE
    assert lines[1].split()[:6] == ["TCPRoute", "default/split", "default/web", "True",
                                    "False", "(BackendNotFound)"]


# --- The Kubernetes source writes it ------------------------------------------

def ours(obj: dict) -> list[dict]:
    return [p for p in (obj.get("status") or {}).get("parents") or [] if p["controllerName"] == CONTROLLER_NAME]


def reasons(obj: dict) -> list[tuple[str, str, str]]:
    return [(c["type"], c["status"], c["reason"]) for p in ours(obj) for c in p["conditions"]]


def test_the_api_source_writes_status_once_and_again_only_on_change(api, make_source):
    other = {"parentRef": {"name": "gw"}, "controllerName": "example.com/gateway",
             "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted", "message": "",
                             "lastTransitionTime": "2020-01-01T00:00:00Z"}]}
    r = route({"v1": 70, "v2": 30})
    r["status"] = {"parents": [other]}
    api.apply(*cluster({"v1": 1, "v2": 1}), r)
    p = make_source()
    p.first()
    p.wait(lambda: api.status_patches, "a status PATCH")
    obj = api.get("TCPRoute", "default", "split")
    assert reasons(obj) == [("Accepted", "True", "Accepted"), ("ResolvedRefs", "True", "ResolvedRefs")]
    assert ours(obj)[0]["parentRef"] == {"group": "", "kind": "Service", "name": "web", "namespace": "default"}
    assert obj["status"]["parents"][0] == other  # another controller's entry is kept
    assert api.status_patches[0].content_type == "application/merge-patch+json"
    # Unrelated changes rebuild the state; the status is the same: no write.
    api.apply(*cluster({"v1": 2, "v2": 1})[2:4])
    p.wait(lambda: len(p.emitted[-1].service_ports[fe(V4["web"], 80)].split[0].endpoints) == 2, "v1's 2 endpoints")
    api.apply(*cluster({"v1": 3, "v2": 1})[2:4])
    p.wait(lambda: len(p.emitted[-1].service_ports[fe(V4["web"], 80)].split[0].endpoints) == 3, "v1's 3 endpoints")
    assert len(api.status_patches) == 1
    # v2 deleted: ResolvedRefs turns False, written once.
    api.delete("Service", "default", "v2")
    p.wait(lambda: ("ResolvedRefs", "False", "BackendNotFound") in reasons(api.get("TCPRoute", "default", "split")),
           "BackendNotFound written")
    obj = api.get("TCPRoute", "default", "split")
    cond = ours(obj)[0]["conditions"]
    assert cond[0]["lastTransitionTime"] == ours(api.status_patches[0].body)[0]["conditions"][0][
        "lastTransitionTime"]  # Accepted did not change: its transition time stays
    assert len(api.status_patches) == 2


def test_a_refused_status_write_is_said_and_changes_nothing_else(api, make_source, caplog):
    api.status_forbidden = True
    api.apply(*cluster({"v1": 1, "v2": 1}), route({"v1": 70, "v2": 30}))
    caplog.set_level(logging.WARNING)
    p = make_source()
    p.first()
    p.wait(lambda: any("route status not written" in r.getMessage() for r in caplog.records), "the warning")
    assert not api.status_patches
    assert {s.service for s in p.emitted[-1].service_ports[fe(V4["web"], 80)].split} == {
        "default/v1:80", "default/v2:80"}


# --- ReferenceGrant --------------------------------------------------------------

def other_namespace_backend() -> list[dict]:
    """Service v9 in namespace "other", one endpoint 10.9.0.1."""
    from k8s_builders import endpoint_slice, ep, service
    return [service("v9", "10.96.9.99", namespace="other",
                    ports=[{"name": "p", "port": 80, "protocol": "TCP", "targetPort": 8080}]),
            endpoint_slice("v9-abc", "v9", [ep("10.9.0.1")], namespace="other",
                           ports=[{"name": "p", "port": 8080, "protocol": "TCP"}])]


def grant(*, from_kind: str = "TCPRoute", from_ns: str = "default", to_name: str | None = None,
          namespace: str = "other") -> dict:
    to = {"group": "", "kind": "Service", **({"name": to_name} if to_name else {})}
    return {"apiVersion": "gateway.networking.k8s.io/v1beta1", "kind": "ReferenceGrant",
            "metadata": {"name": "allow-routes", "namespace": namespace},
            "spec": {"from": [{"group": "gateway.networking.k8s.io", "kind": from_kind, "namespace": from_ns}],
                     "to": [to]}}


def cross_route() -> dict:
    r = route({"v1": 70, "v9": 30})
    r["spec"]["rules"][0]["backendRefs"][1]["namespace"] = "other"
    return r


@pytest.mark.parametrize("grants,resolved", [
    ([grant()], True),
    ([grant(to_name="v9")], True),
    ([grant(to_name="v8")], False),
    ([grant(from_kind="UDPRoute")], False),
    ([grant(from_ns="elsewhere")], False),
    ([grant(namespace="default")], False),  # a grant counts only in the target's namespace
    ([], False),
])
def test_a_reference_grant_allows_a_cross_namespace_backend(tmp_path, grants, resolved):
    result = read(tmp_path, cluster({"v1": 1}) + other_namespace_backend() + [cross_route(), *grants])
    assert not result.skipped
    got = conditions(result)["TCPRoute default/split -> web"][1]
    sp = result.state.service_ports[fe(V4["web"], 80)]
    if resolved:
        assert got == ("ResolvedRefs", "True", "ResolvedRefs")
        assert [str(e.address) for e in sp.split[1].endpoints] == ["10.9.0.1"]
    else:
        assert got == ("ResolvedRefs", "False", "RefNotPermitted")
        assert fractions(service_share(result)) == {"v1": Fraction(7, 10), "refused": Fraction(3, 10)}


def test_a_bad_reference_grant_is_a_problem_and_allows_nothing(tmp_path):
    bad = grant()
    bad["spec"]["from"][0]["namespace"] = 7
    result = read(tmp_path, cluster({"v1": 1}) + other_namespace_backend() + [cross_route(), bad])
    (problem,) = [str(p) for p in result.skipped]
    assert problem.endswith("(ReferenceGrant other/allow-routes): spec.from[0].namespace: "
                            "must be a non-empty string, not 7")
    assert conditions(result)["TCPRoute default/split -> web"][1] == ("ResolvedRefs", "False", "RefNotPermitted")


@pytest.mark.parametrize("field, value, reason", [
    (("metadata", "name"), "Allow_Routes", "'Allow_Routes' is not a DNS-1123 subdomain"),
    (("metadata", "namespace"), "Other", "'Other' is not a DNS-1123 label"),
    (("spec", "from", 0, "namespace"), "default.svc", "'default.svc' is not a DNS-1123 label"),
    (("spec", "to", 0, "name"), "v" * 254, "254 characters; the Gateway API takes names of at most 253"),
])
def test_a_reference_grant_with_a_name_kubernetes_would_refuse_allows_nothing(tmp_path, field, value, reason):
    from wrong_types import replaced
    bad = replaced(grant(to_name="v9"), field, value)
    result = read(tmp_path, cluster({"v1": 1}) + other_namespace_backend() + [cross_route(), bad])
    path = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in field).lstrip(".")
    (problem,) = [str(p) for p in result.skipped]
    assert f"(ReferenceGrant {bad['metadata']['namespace']}/{bad['metadata']['name']}): {path}: {reason}" \
        in problem, problem
    assert conditions(result)["TCPRoute default/split -> web"][1] == ("ResolvedRefs", "False", "RefNotPermitted")


def test_the_api_source_reads_reference_grants(api, make_source):
    api.apply(*cluster({"v1": 1}), *other_namespace_backend(), cross_route())
    p = make_source()
    p.first()
    p.wait(lambda: ("ResolvedRefs", "False", "RefNotPermitted") in reasons(api.get("TCPRoute", "default", "split")),
           "RefNotPermitted written")
    api.apply(grant())
    p.wait(lambda: ("ResolvedRefs", "True", "ResolvedRefs") in reasons(api.get("TCPRoute", "default", "split")),
           "ResolvedRefs written once the grant exists")
    sp = p.emitted[-1].service_ports[fe(V4["web"], 80)]
    assert [str(e.address) for e in sp.split[1].endpoints] == ["10.9.0.1"]


def test_reference_grants_refused_by_rbac_are_said_and_refuse_the_reference(api, make_source, caplog):
    api.forbidden = {"ReferenceGrant"}
    api.apply(*cluster({"v1": 1}), *other_namespace_backend(), cross_route(), grant())
    caplog.set_level(logging.INFO)
    p = make_source()
    p.until(lambda v: True, "a state")  # not first(): the refused collection opens no watch
    p.wait(lambda: any("ReferenceGrant: not served by the API server" in r.getMessage() for r in caplog.records),
           "the note")
    sp = p.emitted[-1].service_ports[fe(V4["web"], 80)]
    assert not sp.split[1].endpoints  # refused, as without a grant
