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
