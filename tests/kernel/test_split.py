"""Weighted splitting (issue 13) with real traffic: a TCPRoute/UDPRoute on a
Service splits new connections over backend Services by weight.

The proof is the Gateway API weight conformance method (MeshHTTPRouteWeight)
at L4: 500 connections, 10 at a time, the observed split within +-0.05 of
the weights, up to 10 attempts. One lab and one agent for the module."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from . import k8s
from .conftest import Load
from .test_datapath_hardening import lb_counter
from .shared import dns_pods, lab, probe, start_agent  # noqa: F401 (one lab and agent for the module)

# Every VM compiles and verifies the programs with the refusing slot state
# (the LB tests); the split tests themselves run on the oldest and the host.
pytestmark = pytest.mark.bounds

SPLIT_PROBE = Path(__file__).parent / "split_probe.py"
PARENT = {4: "10.96.0.10", 6: "fd00:96::10"}
ATTEMPTS, TOTAL, PARALLEL, TOLERANCE = 10, 500, 10, 0.05


def route(weights: dict[str, int], *, kind: str = "TCPRoute", parent: str = "web", port: int = 80) -> dict:
    return {"apiVersion": "gateway.networking.k8s.io/v1alpha2", "kind": kind,
            "metadata": {"name": f"{parent}-split", "namespace": "default"},
            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": parent}],
                     "rules": [{"backendRefs": [{"name": n, "port": port, "weight": w}
                                                for n, w in weights.items()]}]}}


def services(lab, groups: dict[str, tuple[str, ...]], *, family: int = 4, protocol: str = "TCP",
             port: int = 80, target: int = 8080, affinity: int | None = None) -> list[dict]:
    """One Service per group of pods, the first group's name being the
    parent; cluster IPs 10.96.0.10, .11, ... (fd00:96::10, ::11, ...)."""
    objects = []
    for i, (name, pods) in enumerate(groups.items()):
        ip = f"10.96.0.{10 + i}" if family == 4 else f"fd00:96::{10 + i}"
        objects.append(k8s.service(name, [ip], [k8s.port("p", port, target, protocol)],
                                   affinity_timeout=affinity if i == 0 else None))
        addrs = [str(lab.pods[p].ipv4 if family == 4 else lab.pods[p].ipv6) for p in pods]
        objects.append(k8s.endpoint_slice(f"{name}-1", name, [k8s.endpoint(a) for a in addrs],
                                          [k8s.slice_port("p", target, protocol)],
                                          address_type=f"IPv{family}"))
    return objects


def observe(lab, *args: str) -> dict:
    r = lab.run("client", [sys.executable, str(SPLIT_PROBE), *map(str, args)], timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def assert_split(lab, groups: dict[str, tuple[str, ...]], weights: dict[str, int], *probe_args,
                 refused_errno: str = "ECONNREFUSED") -> None:
    """The conformance check: some attempt's split is within TOLERANCE of
    every weight (answers counted per backend Service by pod name; refused
    connections count as "refused" when that is one of the weights)."""
    owner = {pod: name for name, pods in groups.items() for pod in pods if name in weights}
    total_weight = sum(weights.values())
    seen = []
    for _ in range(ATTEMPTS):
        result = observe(lab, *probe_args)
        refused = result["errors"].pop(refused_errno, 0) if "refused" in weights else 0
        assert result["errors"] == {}, result
        counts = {name: 0 for name in weights}
        if refused:
            counts["refused"] += refused
        for pod, n in result["answers"].items():
            where = owner.get(pod, f"{pod} (outside the route)")
            counts[where] = counts.get(where, 0) + n
        got = sum(counts.values())
        seen.append(counts)
        print(f"split attempt {len(seen)}: {counts} (weights {weights})")
        if set(counts) == set(weights) and all(
                abs(counts[n] / got - w / total_weight) <= TOLERANCE for n, w in weights.items()):
            return
    raise AssertionError(f"no attempt within {TOLERANCE} of {weights}: {seen}")


SEVENTY_THIRTY = {"web": ("web-4",), "v1": ("web-1", "web-2"), "v2": ("web-3",)}


def test_tcp_70_30(lab, start_agent):
    start_agent(services(lab, SEVENTY_THIRTY) + [route({"v1": 70, "v2": 30})])
    assert_split(lab, SEVENTY_THIRTY, {"v1": 70, "v2": 30}, "tcp", PARENT[4], 80, TOTAL, PARALLEL)


def test_tcp_50_30_20_uneven_endpoints(lab, start_agent):
    groups = {"web": ("web-4",), "v1": ("web-1",), "v2": ("web-2", "web-3"), "v3": ("web-4",)}
    start_agent(services(lab, groups) + [route({"v1": 50, "v2": 30, "v3": 20})])
    assert_split(lab, groups, {"v1": 50, "v2": 30, "v3": 20}, "tcp", PARENT[4], 80, TOTAL, PARALLEL)


@pytest.fixture
def refused_errno(kernel_features) -> str:
    # Before 5.18 (no bpf_set_retval) a refusal comes as EPERM.
    return "ECONNREFUSED" if kernel_features["set_retval"] else "EPERM"


def test_live_weight_change_then_route_deleted(lab, probe, start_agent, refused_errno):
    objects = services(lab, SEVENTY_THIRTY)
    start_agent(objects + [route({"v1": 70, "v2": 30})])
    load = Load(probe, "client", PARENT[4], 80)
    start_agent(objects + [route({"v1": 10, "v2": 90})])
    changed = time.monotonic()
    result = load.stop()
    assert result["errors"] == {}, result
    load.assert_spans(changed)
    assert_split(lab, SEVENTY_THIRTY, {"v1": 10, "v2": 90}, "tcp", PARENT[4], 80, TOTAL, PARALLEL)
    # A backend Service removed: its share is refused, the rest still served.
    start_agent([o for o in objects if o["metadata"]["name"] not in ("v2", "v2-1")]
                + [route({"v1": 10, "v2": 90})])
    after = observe(lab, "tcp", PARENT[4], 80, 50, PARALLEL)
    assert set(after["answers"]) <= {"web-1", "web-2"} and set(after["errors"]) == {refused_errno}, after
    # Route deleted: the parent's own endpoints again.
    start_agent(objects)
    assert observe(lab, "tcp", PARENT[4], 80, 50, PARALLEL)["answers"] == {"web-4": 50}


@pytest.mark.parametrize("family", [4, 6])
def test_broken_backend_ref_share_is_refused_by_the_kernel(lab, start_agent, family, refused_errno):
    """A backendRef to a missing Service: its 30% is refused at once
    (ECONNREFUSED from the connect hook, counted as refused), 70% served."""
    groups = {"web": ("web-4",), "v1": ("web-1", "web-2")}
    agent = start_agent(services(lab, groups, family=family) + [route({"v1": 70, "missing": 30})])
    ipv = f"ipv{family}"
    before = lb_counter(agent, "refused", ipv)
    assert_split(lab, groups, {"v1": 70, "refused": 30}, "tcp", PARENT[family], 80, TOTAL, PARALLEL,
                 refused_errno=refused_errno)
    assert lb_counter(agent, "refused", ipv) - before >= 0.25 * TOTAL


@pytest.mark.needs_feature("netns_cookie")  # affinity's client key
def test_client_ip_affinity_sticks_to_one_split_backend(lab, start_agent):
    start_agent(services(lab, SEVENTY_THIRTY, affinity=60) + [route({"v1": 50, "v2": 50})])
    # The backend is chosen (split, then endpoint) once, then kept: the
    # affinity entry stores the final backend, not the backend Service.
    answers = observe(lab, "tcp", PARENT[4], 80, 30, 1)["answers"]
    assert len(answers) == 1 and sum(answers.values()) == 30, answers
    assert set(answers) <= {"web-1", "web-2", "web-3"}, answers


def test_udp_70_30(lab, dns_pods, start_agent):
    groups = {"dns": ("dns-1",), "d1": ("dns-1",), "d2": ("dns-2",)}
    start_agent(services(lab, groups, protocol="UDP", port=53, target=53)
                + [route({"d1": 70, "d2": 30}, kind="UDPRoute", parent="dns", port=53)])
    assert_split(lab, groups, {"d1": 70, "d2": 30}, "udp", PARENT[4], 53, TOTAL)


def test_ipv6_70_30(lab, start_agent):
    start_agent(services(lab, SEVENTY_THIRTY, family=6) + [route({"v1": 70, "v2": 30})])
    assert_split(lab, SEVENTY_THIRTY, {"v1": 70, "v2": 30}, "tcp", PARENT[6], 80, TOTAL, PARALLEL)


def route_backend_counts(agent, route_name: str = "TCPRoute default/web-split") -> dict[str, float]:
    """meshbpf_route_backend_connections_total per backend Service of a route."""
    from .helpers import metric
    _, text = agent.get("/metrics")
    return {b: metric(text, "meshbpf_route_backend_connections_total",
                      f'backend="default/{b}:80",route="{route_name}"') for b in ("v1", "v2")}


def test_route_backend_counters_move_by_the_connections_made(lab, start_agent):
    """meshbpf_route_backend_connections_total counts each connection the
    split sent to a backend Service, and only those: a connection made
    straight to a backend Service's own cluster IP is not the route's."""
    from meshbpf.lab.workloads import wait_for
    agent = start_agent(services(lab, SEVENTY_THIRTY) + [route({"v1": 70, "v2": 30})])
    wait_for(lambda: None not in route_backend_counts(agent).values(), 30, "the route backend series")
    before = route_backend_counts(agent)
    result = observe(lab, "tcp", PARENT[4], 80, 200, PARALLEL)
    assert result["errors"] == {}, result
    made = {"v1": sum(n for pod, n in result["answers"].items() if pod in SEVENTY_THIRTY["v1"]),
            "v2": result["answers"].get("web-3", 0)}
    assert sum(made.values()) == 200 and min(made.values()) > 0, result
    straight = observe(lab, "tcp", "10.96.0.11", 80, 20, PARALLEL)  # v1's own cluster IP
    assert straight["errors"] == {} and sum(straight["answers"].values()) == 20, straight
    after = route_backend_counts(agent)
    assert {b: after[b] - before[b] for b in made} == made


@pytest.mark.userspace
def test_route_list_shows_the_agents_route_status(lab, start_agent):
    """`meshbpf route list` asks the running agent (the maps hold no route
    names): each parent's Accepted and ResolvedRefs, and why one is False."""
    import subprocess
    groups = {"web": ("web-4",), "v1": ("web-1", "web-2")}
    agent = start_agent(services(lab, groups) + [route({"v1": 70, "missing": 30})])
    cli = Path(sys.executable).parent / "meshbpf"
    out = subprocess.run([str(cli), "route", "list", "--agent", f"127.0.0.1:{agent.port}", "-o", "json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    (status,) = json.loads(out.stdout)["routes"]
    assert status["route"] == "TCPRoute default/web-split"
    assert [(c["type"], c["status"], c["reason"]) for c in status["conditions"]] == [
        ("Accepted", "True", "Accepted"), ("ResolvedRefs", "False", "BackendNotFound")]
    table = subprocess.run([str(cli), "route", "list", "--agent", f"127.0.0.1:{agent.port}"],
                           capture_output=True, text=True, timeout=60)
    assert "default/web-split" in table.stdout and "BackendNotFound" in table.stdout, table
