"""Weighted splitting from the Kubernetes source: TCPRoute/UDPRoute watched
where the Gateway API CRDs exist (the fake API server), said once where not."""

from __future__ import annotations

import logging

import pytest

import fake_apiserver
from k8s_builders import fe
from test_kubernetes_source import api, make_source, no_leaked_threads  # noqa: F401 (fixtures)
from test_split import V4, cluster, route


def split_of(state, address=V4["web"]):
    sp = state.service_ports.get(fe(address, 80))
    return {share.service: share.weight for share in sp.split} if sp else None


def test_routes_from_the_api_split_their_parent_and_follow_edits(api, make_source):
    api.apply(*cluster({"v1": 2, "v2": 1}), route({"v1": 70, "v2": 30}))
    p = make_source()
    p.first()
    p.wait(lambda: p.emitted and split_of(p.emitted[-1]) == {"default/v1:80": 70, "default/v2:80": 30},
           "the route's split")
    api.apply(route({"v1": 10, "v2": 90}))
    p.wait(lambda: split_of(p.emitted[-1]) == {"default/v1:80": 10, "default/v2:80": 90}, "the new weights")
    # A backend Service's endpoints change: the parent's split follows.
    api.apply(*cluster({"v1": 2, "v2": 3})[4:6])
    p.wait(lambda: len(p.emitted[-1].service_ports[fe(V4["web"], 80)].split[1].endpoints) == 3,
           "v2's new endpoints in the split")
    api.delete("TCPRoute", "default", "split")
    p.wait(lambda: split_of(p.emitted[-1]) == {}, "the parent back to its own endpoints")


def test_a_bad_route_is_left_out_alone(api, make_source):
    bad = route({"v1": 1}, name="bad", kind="UDPRoute")
    bad["spec"]["rules"][0]["backendRefs"][0]["weight"] = "lots"
    api.apply(*cluster({"v1": 1, "v2": 1}), bad, route({"v1": 1, "v2": 1}))
    p = make_source()
    p.first()
    p.wait(lambda: p.emitted and split_of(p.emitted[-1]) == {"default/v1:80": 1, "default/v2:80": 1},
           "the good route's split")
    assert any("UDPRoute default/bad" in text and "weight" in text for text in p.source.problems)


def test_a_route_named_as_kubernetes_would_refuse_is_left_out_alone(api, make_source):
    """From a server that skipped validation: one problem naming the route
    and the field; the good route still splits the parent."""
    bad = route({"v1": 1}, name="Bad_1")
    odd = route({"v1": 1}, name="odd")
    odd["spec"]["rules"][0]["backendRefs"][0]["namespace"] = "Other\nns"
    api.apply(*cluster({"v1": 1, "v2": 1}), bad, odd, route({"v1": 1, "v2": 1}))
    p = make_source()
    p.first()
    p.wait(lambda: p.emitted and split_of(p.emitted[-1]) == {"default/v1:80": 1, "default/v2:80": 1},
           "the good route's split")
    p.wait(lambda: len(p.source.problems) == 2, "both bad routes reported")
    assert {t.split("): ")[1].split(":")[0] for t in p.source.problems} == {
        "metadata.name", "spec.rules[0].backendRefs[0].namespace"}, p.source.problems
    assert any("(TCPRoute default/Bad_1): metadata.name: 'Bad_1' is not a DNS-1123 subdomain" in t
               for t in p.source.problems), p.source.problems
    assert [r.name for r in p.source._last.routes] == ["split"]


def test_without_the_crds_routes_are_said_missing_once(api, make_source, monkeypatch, caplog):
    for plural in ("tcproutes", "udproutes"):
        monkeypatch.delitem(fake_apiserver._BY_PLURAL, ("/apis/gateway.networking.k8s.io/v1alpha2", plural))
    api.apply(*cluster({"v1": 1}))
    caplog.set_level(logging.INFO)
    p = make_source()
    state = p.until(lambda v: True, "a state without routes")
    assert split_of(state) == {}
    said = [r.getMessage() for r in caplog.records if "TCPRoute: not served" in r.getMessage()]
    assert len(said) == 1 and "no Gateway API CRDs?" in said[0], said


def test_a_bad_route_edit_keeps_the_previous_version(api, make_source):
    api.apply(*cluster({"v1": 1, "v2": 1}), route({"v1": 70, "v2": 30}))
    p = make_source()
    p.first()
    p.wait(lambda: p.emitted and split_of(p.emitted[-1]) == {"default/v1:80": 70, "default/v2:80": 30},
           "the route's split")
    bad = route({"v1": 70, "v2": 30})
    bad["spec"]["rules"][0]["backendRefs"][1]["weight"] = "lots"
    api.apply(bad)
    p.wait(lambda: any("TCPRoute default/split" in t and "weight" in t for t in p.source.problems),
           "the bad edit reported")
    assert split_of(p.source._last) == {"default/v1:80": 70, "default/v2:80": 30}
    api.apply(route({"v1": 20, "v2": 80}))
    p.wait(lambda: split_of(p.emitted[-1]) == {"default/v1:80": 20, "default/v2:80": 80}, "the fixed route")
    p.wait(lambda: not p.source.problems, "the problem resolved")



def test_with_a_route_service_events_stay_incremental_and_equal_a_full_build(api, make_source):
    """A route no longer forces a full build on every change: a backend
    Service's new endpoints and its deletion come from the index (our own
    status write, which comes back as a route event, changes nothing the
    build reads); each state equals a full build of the same objects with
    the route applied, its Delta over the state before naming the split
    parent; the status still follows (BackendNotFound once v2 is gone)."""
    from test_routes_status import reasons

    from meshbpf.sources.held_text import loaded
    from meshbpf.sources.kube_objects import SourceObject, build_state
    from meshbpf.sources.routes import apply_routes, read_routes
    api.apply(*cluster({"v1": 1, "v2": 1}), route({"v1": 70, "v2": 30}))
    p = make_source()
    p.first()
    p.wait(lambda: p.emitted and split_of(p.emitted[-1]) and api.status_patches, "the split and its status")
    builds = []
    real_build = p.source.build
    p.source.build = lambda: builds.append(1) or real_build()

    def full():
        items = [SourceObject(loaded(o), "API server")
                 for r in ("services", "endpointslices") for o in p.source.reflectors[r].items()]
        routes, _, _ = read_routes([SourceObject(o, "API server") for o in p.source.reflectors["tcproutes"].items()])
        return apply_routes(build_state(items, node_name="node-a").state, routes)[0]
    parent = fe(V4["web"], 80)
    for change, done in [
            (lambda: api.apply(*cluster({"v1": 1, "v2": 3})[4:6]),
             lambda s: len(s.service_ports[parent].split[1].endpoints) == 3),
            (lambda: api.delete("Service", "default", "v2"),
             lambda s: not s.service_ports[parent].split[1].endpoints)]:
        before = p.emitted[-1]
        change()
        p.wait(lambda: done(p.emitted[-1]), "the change in the split")
        new = p.emitted[-1]
        assert new.service_ports == full().service_ports
        assert new.delta is not None and new.delta.base() is before and parent in new.delta.frontends
    p.wait(lambda: ("ResolvedRefs", "False", "BackendNotFound") in reasons(api.get("TCPRoute", "default", "split")),
           "BackendNotFound written")
    assert not builds and p.source._index is not None   # never a full build
