"""kube_objects.build_by_service(), the Kubernetes source's full build: each
Service is built with its slices as soon as they are read, so the records of
every object are never alive at once (issue 14, the cold start's peak). It
must read the objects exactly as build_state() does: the same state, in the
same order, the same problems and notes, whatever the objects hold."""

from __future__ import annotations

import random

import pytest

from k8s_builders import endpoint_slice, ep, service
from meshbpf.sources.kube_incremental import slice_service
from meshbpf.sources.kube_objects import PROXY_NAME_LABEL, SourceObject, build_by_service, build_state
from test_lb_external import random_service, random_slice

NAMES = [f"svc{i}" for i in range(6)]


def odd_service(rng: random.Random, name: str) -> dict:
    """A Service as random_service() makes it, or one of the ways a Service
    goes wrong or is left out."""
    svc = random_service(rng, name)
    roll = rng.random()
    if roll < 0.1:
        svc["spec"]["clusterIP"] = svc["spec"]["clusterIPs"][0] = "10.96.0.999"   # not an address
    elif roll < 0.2:
        svc["spec"]["clusterIP"] = svc["spec"]["clusterIPs"][0] = "10.96.0.1"    # svc0's: a clash
    elif roll < 0.25:
        svc["metadata"]["labels"] = {PROXY_NAME_LABEL: "other"}                    # not ours
    elif roll < 0.3:
        svc["spec"]["ports"][0]["targetPort"] = "web"                              # a named port
    return svc


def odd_slices(rng: random.Random, name: str) -> list[dict]:
    """Zero to three slices of a Service, some broken, some with another
    Service's label, one without any."""
    out = []
    for k in range(rng.randint(0, 3)):
        sl = random_slice(rng, name)
        sl["metadata"]["name"] = f"{name}-{rng.randint(0, 99)}-{k}"
        roll = rng.random()
        if roll < 0.1:
            sl["endpoints"] = [ep("10.244.0.300")]                                 # not an address
        elif roll < 0.2:
            sl["metadata"]["labels"]["kubernetes.io/service-name"] = "gone"        # no such Service
        elif roll < 0.25:
            del sl["metadata"]["labels"]["kubernetes.io/service-name"]             # no Service label
        elif roll < 0.3:
            sl["ports"][0]["name"] = "nope"                                        # matches no port
        out.append(sl)
    rng.shuffle(out)
    return out


def grouped(services: list[dict], slices: list[dict]):
    """As the Kubernetes source groups them: by each slice's label."""
    by_owner: dict = {}
    for sl in slices:
        by_owner.setdefault(slice_service(sl), []).append(SourceObject(sl, "API server"))
    groups = []
    for svc in services:
        key = (svc["metadata"].get("namespace") or "default", svc["metadata"]["name"])
        groups.append((SourceObject(svc, "API server"), by_owner.pop(key, [])))
    groups += [(None, srcs) for srcs in by_owner.values()]
    return groups


@pytest.mark.parametrize("seed", range(60))
@pytest.mark.parametrize("proxy_name", [None, "other"])
def test_by_service_reads_the_objects_as_build_state_does(seed, proxy_name):
    rng = random.Random(seed)
    services = [odd_service(rng, n) for n in NAMES if rng.random() < 0.8]
    rng.shuffle(services)
    slices = [sl for n in NAMES for sl in odd_slices(rng, n)]
    rng.shuffle(slices)
    args = dict(node_name="node-a", service_proxy_name=proxy_name,
                node_zone=rng.choice((None, "zone-a")))
    whole = build_state([SourceObject(o, "API server") for o in services + slices], **args)
    by_service = build_by_service(grouped(services, slices), **args)
    assert list(by_service.state.service_ports.items()) == list(whole.state.service_ports.items())
    assert sorted(map(str, by_service.problems)) == sorted(map(str, whole.problems))
    assert sorted(by_service.notes) == sorted(whole.notes)


def test_slices_merge_in_name_order_whatever_order_they_come_in():
    svc = service("web", "10.96.0.10")
    # One address in both slices, ready in one only: the merge keeps the
    # first in name order, unless a later one is ready and it is not.
    a = endpoint_slice("web-a", "web", [ep("10.244.0.1", ready=False), ep("10.244.0.2")])
    b = endpoint_slice("web-b", "web", [ep("10.244.0.3"), ep("10.244.0.1", ready=False)])
    for order in ([a, b], [b, a]):
        got = build_by_service([(SourceObject(svc, "API server"),
                                 [SourceObject(o, "API server") for o in order])]).state
        (sp,) = got.service_ports.values()
        assert [str(e.address) for e in sp.endpoints] == ["10.244.0.1", "10.244.0.2", "10.244.0.3"]


def test_the_first_service_in_group_order_keeps_a_shared_frontend():
    first, second = service("one", "10.96.0.10"), service("two", "10.96.0.10")
    result = build_by_service([(SourceObject(first, "API server"), []),
                               (SourceObject(second, "API server"), [])])
    assert [sp.name for sp in result.state.service_ports.values()] == ["one"]
    assert [p.obj for p in result.problems] == ["Service default/two"]
