"""Service and EndpointSlice events applied per Service (kube_incremental)
give the state a full build_state() of the same objects gives, and a Delta
naming exactly the frontends that changed. Seeded random event sequences,
then the Kubernetes source against the fake API server."""

from __future__ import annotations

import ipaddress
import json
import random
import sys
import time
from pathlib import Path

import pytest

from k8s_builders import endpoint_slice, ep, service
from meshbpf import overlay
from meshbpf.reconcile import LBState, plan, wanted_services
from meshbpf.reconcile.incremental import LBIndex, plan_services
from meshbpf.sources.held_text import loaded
from meshbpf.sources.kube_incremental import TRIGGER_TIME, ServiceIndex, slice_service, trigger_time
from meshbpf.sources.kube_objects import SourceObject, build_state
from meshbpf.sync.lb import frontend_changes
from test_incremental_plan import as_sets
from test_kubernetes_source import DEADLINE, FAST, Poller, api, no_leaked_threads, wait_for  # noqa: F401

NAMES = [f"svc{i}" for i in range(6)]


def key(obj: dict) -> tuple[str, str]:
    return obj["metadata"]["namespace"], obj["metadata"]["name"]


def random_service(rng: random.Random, name: str) -> dict:
    i = NAMES.index(name)
    ports = [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]
    if rng.random() < 0.4:
        ports.append({"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353})
    extra = {"sessionAffinity": "ClientIP"} if rng.random() < 0.2 else {}
    return service(name, f"10.96.0.{i + 1}", ports=ports, **extra)


def random_slice(rng: random.Random, n: int) -> dict:
    owner = rng.choice(NAMES + ["nobody"])  # a slice may name a Service that is not there
    eps = [ep(f"10.244.0.{rng.randint(1, 12)}", ready=rng.random() < 0.8,
              terminating=rng.random() < 0.2) for _ in range(rng.randint(0, 4))]
    ports = [{"name": "http", "port": rng.choice((8080, 9090)), "protocol": "TCP"}]
    if rng.random() < 0.5:
        ports.append({"name": "dns", "port": 5353, "protocol": "UDP"})
    if rng.random() < 0.1:
        ports.append({"name": "nope", "port": 1, "protocol": "TCP"})  # a problem
    return endpoint_slice(f"slice{n}", owner, eps, ports=ports)


def random_events(rng: random.Random, services: dict, slices: dict) -> tuple[dict, dict]:
    """One to three Service or EndpointSlice events (applied to `services`
    and `slices`), as a reflector's take_changes() gives them."""
    svc_events, slice_events = {}, {}
    for _ in range(rng.randint(1, 3)):
        if rng.random() < 0.4:
            name = rng.choice(NAMES)
            obj = random_service(rng, name) if rng.random() < 0.7 else None
            k = ("default", name)
            svc_events[k] = obj
            services.pop(k, None) if obj is None else services.__setitem__(k, obj)
        else:
            obj = random_slice(rng, rng.randint(0, 9))
            k = key(obj)
            if rng.random() < 0.2:
                obj = None
            slice_events[k] = obj
            slices.pop(k, None) if obj is None else slices.__setitem__(k, obj)
    return svc_events, slice_events


def full_build(services: dict, slices: dict):
    objects = [SourceObject(o, "API server") for o in list(services.values()) + list(slices.values())]
    return build_state(objects, node_name="node-a")


def as_text(events: dict) -> dict:
    """Events as the API source holds objects: compact JSON text."""
    return {k: None if o is None else json.dumps(o, separators=(",", ":")) for k, o in events.items()}


@pytest.mark.parametrize("form", ["dicts", "json-text", "held"])
@pytest.mark.parametrize("seed", range(60))
def test_events_applied_per_service_equal_a_full_build(seed, form):
    rng = random.Random(seed)
    services = {key(o): o for o in (random_service(rng, n) for n in NAMES) if rng.random() < 0.7}
    slices = {key(o): o for o in (random_slice(rng, n) for n in range(8))}
    start = full_build(services, slices)
    text = form != "dicts"
    if form == "held":  # as the API source makes it: text, with keys and owners known
        held_slices = as_text(slices)
        index = ServiceIndex.of_held(start.state, as_text(services).items(),
                                     [(k, slice_service(o), held_slices[k]) for k, o in slices.items()],
                                     start.problems, node_name="node-a")
    else:
        raw = (list(as_text(services).values()), list(as_text(slices).values())) if text else None
        index = ServiceIndex(start.state, services.values(), slices.values(), start.problems, raw=raw,
                             node_name="node-a")
    for _ in range(15):
        svc_events, slice_events = random_events(rng, services, slices)
        if text:
            svc_events, slice_events = as_text(svc_events), as_text(slice_events)
        before = index.state
        update = index.apply(svc_events, slice_events)
        after = index.state
        expected = full_build(services, slices)
        assert after.service_ports == expected.state.service_ports
        changed = {fe for fe in before.service_ports.keys() | after.service_ports.keys()
                   if before.service_ports.get(fe) != after.service_ports.get(fe)}
        if update.state is None:
            assert not changed and after is before
        else:
            assert update.state.delta.base() is before
            assert set(update.state.delta.frontends) == changed
            # Untouched frontends keep their objects: the agent's check stops at identity.
            for fe, sp in after.service_ports.items():
                if fe not in changed:
                    assert sp is before.service_ports[fe]
        # Every problem the full build has about a Service is known to the index.
        known = {str(p) for ps in index.problems_of.values() for p in ps}
        for p in expected.problems:
            if p.obj.startswith("Service "):
                assert str(p) in known


def test_a_clash_keeps_the_incumbent_and_the_other_gets_in_once_it_is_free():
    a, b = service("a", "10.96.0.1"), service("b", "10.96.0.2")
    start = full_build({key(a): a}, {})
    index = ServiceIndex(start.state, [a], [], start.problems)
    b_clash = service("b", "10.96.0.1")
    update = index.apply({key(b_clash): b_clash}, {})
    assert update.state is None
    assert [p.reason for p in update.problems] == [
        "10.96.0.1:80/TCP is already used by Service default/a"]
    update = index.apply({key(a): None}, {})
    assert {sp.name for sp in update.state.service_ports.values()} == {"b"}
    assert "10.96.0.1:80/TCP is already used by Service default/a" in " ".join(update.resolved)
    del b


def test_the_index_tables_keep_their_size_under_endpoint_churn():
    """An update overwrites its keys in place: popping and re-adding them
    filled each table's free slots until CPython doubled it (at 100 000
    Services, 20 MB after ~75 000 events; README, an hour of churn)."""
    n = 2_000
    services = {(f"ns-{i % 7}", f"s{i}"): service(f"s{i}", str(ipaddress.ip_address("10.96.0.1") + i),
                                                   namespace=f"ns-{i % 7}") for i in range(n)}
    slices = {(f"ns-{i % 7}", f"s{i}-x"): endpoint_slice(f"s{i}-x", f"s{i}", [ep(f"10.1.{i // 250}.{i % 250}")],
                                                          namespace=f"ns-{i % 7}") for i in range(n)}
    start = full_build(services, slices)
    index = ServiceIndex(start.state, services.values(), slices.values(), start.problems)
    tables = ("services", "slices", "slice_owner", "slices_of", "ports_of")
    sizes = {t: sys.getsizeof(getattr(index, t)) for t in tables}
    for k in range(3 * n):
        i = k % n
        moved = endpoint_slice(f"s{i}-x", f"s{i}", [ep(str(ipaddress.ip_address("10.200.0.1") + k))],
                               namespace=f"ns-{i % 7}")
        assert index.apply({}, {(f"ns-{i % 7}", f"s{i}-x"): moved}).state is not None
    assert {t: sys.getsizeof(getattr(index, t)) for t in tables} == sizes
    assert len(index.state.service_ports) == n and len(index.ports_of) == n
    # Each slice still names its Service by the one key tuple the index holds for it.
    held = {k: k for k in index.services}
    assert all(owner is held[owner] for owner in index.slice_owner.values())


@pytest.mark.parametrize("field, value", [("name", "Web_1"), ("name", "web\nother"), ("namespace", "N" * 64)])
def test_a_name_kubernetes_would_refuse_is_left_out_as_a_full_build_leaves_it_out(field, value):
    """A Service (or its slice) with such a name, by an event: the index
    leaves it out with the full build's problem, and the others stay."""
    good, good_slice = service("db", "10.96.0.2"), endpoint_slice("db-1", "db", [ep("10.244.0.2")])
    start = full_build({key(good): good}, {key(good_slice): good_slice})
    index = ServiceIndex(start.state, [good], [good_slice], start.problems, node_name="node-a")
    bad = service("web", "10.96.0.1")
    bad["metadata"][field] = value
    bad_slice = endpoint_slice("web-1", "web", [ep("10.244.0.1")])
    bad_slice["metadata"]["namespace"] = bad["metadata"]["namespace"]
    svc_events, slice_events = {key(bad): bad}, {key(bad_slice): bad_slice}
    update = index.apply(svc_events, slice_events)
    expected = full_build({key(good): good, key(bad): bad}, {key(good_slice): good_slice,
                                                              key(bad_slice): bad_slice})
    assert index.state.service_ports == expected.state.service_ports
    assert {sp.name for sp in index.state.service_ports.values()} == {"db"}
    assert f"metadata.{field}" in {p.path for p in update.problems}
    assert {str(p) for p in update.problems} <= {str(p) for p in expected.problems}
    # A slice of a good Service, named as Kubernetes would refuse: left out alone.
    odd_slice = endpoint_slice("DB_2", "db", [ep("10.244.0.3")])
    update = index.apply({}, {key(odd_slice): odd_slice})
    assert [(p.obj, p.path) for p in update.problems] == [("EndpointSlice default/DB_2", "metadata.name")]
    endpoints = [str(e.address) for sp in index.state.service_ports.values() for e in sp.endpoints]
    assert endpoints == ["10.244.0.2"]


def test_trigger_times_are_read_as_kube_proxy_writes_them():
    sl = endpoint_slice("x", "web", [])
    sl["metadata"]["annotations"][TRIGGER_TIME] = "2024-04-05T12:30:11.250000123Z"
    assert trigger_time(sl) == pytest.approx(1712320211.25)
    sl["metadata"]["annotations"][TRIGGER_TIME] = "yesterday"
    assert trigger_time(sl) is None


def test_the_api_source_hands_out_deltas_of_the_touched_frontends(api, tmp_path):
    from meshbpf.sources.kubernetes import KubernetesSource
    objects = [service(f"s{i}", f"10.96.1.{i + 1}") for i in range(20)]
    objects += [endpoint_slice(f"s{i}-x", f"s{i}", [ep(f"10.244.1.{i + 1}")]) for i in range(20)]
    api.load_objects(objects) if hasattr(api, "load_objects") else [api.apply(o) for o in objects]
    source = KubernetesSource(kubeconfig=str(api.kubeconfig(tmp_path / "kubeconfig")),
                              node_name="node-a", backoff=FAST)
    try:
        states = []
        wait_for(lambda: states.append(source.poll()) or states[-1] is not None
                 and len(states[-1].service_ports) == 20, "the first state")
        first = states[-1]
        moved = endpoint_slice("s3-x", "s3", [ep("10.244.9.9")])
        now = time.time()
        moved["metadata"]["annotations"][TRIGGER_TIME] = time.strftime(
            "%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
        api.apply(moved)
        wait_for(lambda: states.append(source.poll()) or states[-1] is not None, "the change")
        second = states[-1]
        assert second.delta is not None and second.delta.base() is first
        assert [str(fe) for fe in second.delta.frontends] == ["10.96.1.4:80/TCP"]
        assert second.trigger_times == (float(int(now)),)
        assert [str(e.address) for sp in second.service_ports.values() if sp.name == "s3"
                for e in sp.endpoints] == ["10.244.9.9"]
    finally:
        source.stop()


def test_the_api_source_leaves_out_a_service_named_as_kubernetes_would_refuse(api, tmp_path):
    """Through list and watch: the bad Service is a problem naming its
    field, the state is the full build's, the good Service stays."""
    from meshbpf.sources.kubernetes import KubernetesSource
    api.apply(service("db", "10.96.1.2"), endpoint_slice("db-x", "db", [ep("10.244.1.2")]))
    source = KubernetesSource(kubeconfig=str(api.kubeconfig(tmp_path / "kubeconfig")),
                              node_name="node-a", backoff=FAST)
    try:
        poller = Poller(source)
        poller.until(lambda v: len(v) == 1, "the first state")
        api.apply(service("Web_1", "10.96.1.1"), endpoint_slice("web-x", "Web_1", [ep("10.244.1.1")]))
        poller.wait(lambda: len(source.reflectors["endpointslices"].items()) == 2
                    and any("Web_1" in p for p in source.problems), "the bad Service's events")
        poller.poll()
        states = poller.emitted
        assert [p for p in source.problems if "): metadata.name: 'Web_1' is not a DNS-1035 label" in p]
        items = [SourceObject(loaded(o), "API server")
                 for r in ("services", "endpointslices") for o in source.reflectors[r].items()]
        full = build_state(items, node_name="node-a").state
        assert states[-1].service_ports == full.service_ports
        assert {sp.name for sp in full.service_ports.values()} == {"db"}
    finally:
        source.stop()


@pytest.mark.parametrize("seed", range(80))
def test_random_events_planned_incrementally_leave_the_maps_a_full_plan_leaves(seed, monkeypatch):
    """The agent's path for an event (the source's Delta, frontend_changes,
    plan_services over the kept index) writes exactly what the full plan of
    the same state writes from the same maps: same IDs, same slots, same
    deletes, after every event. The frontend map's overlay is folded often
    here, so versions on a new base are covered too."""
    monkeypatch.setattr(overlay, "MIN_FOLD", 1)
    monkeypatch.setattr(overlay, "FOLD_SHARE", 1)
    rng = random.Random(5000 + seed)
    services = {key(o): o for o in (random_service(rng, n) for n in NAMES) if rng.random() < 0.5}
    slices = {key(o): o for o in (random_slice(rng, n) for n in range(8))}
    start = full_build(services, slices)
    index = ServiceIndex(start.state, services.values(), slices.values(), start.problems,
                         node_name="node-a")
    maps = plan(LBState(), wanted_services(start.state)).apply_to(LBState())
    lb_index = LBIndex(maps)
    for _ in range(30):
        before = index.state
        update = index.apply(*random_events(rng, services, slices))
        if update.state is None:
            continue
        after = update.state
        changes = frontend_changes(before.service_ports, after.service_ports, after.delta.frontends)
        incremental = plan_services(maps, lb_index, changes)
        full = plan(maps, wanted_services(after))
        assert as_sets(incremental) == as_sets(full)
        lb_index.apply(incremental, maps)
        # The maps hold what a fresh full build of the same objects asks for.
        assert plan(maps, wanted_services(full_build(services, slices).state)).writes == 0
