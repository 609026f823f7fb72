"""Good objects of every kind meshbpf reads, and seeded random mutations of
them (wrong types, bad numbers, long strings, deep nesting, removed fields):
the inputs of the fuzz tests (test_fuzz_sources.py)."""

from __future__ import annotations

import copy
import random
from typing import Any, Callable

from k8s_builders import endpoint_slice, ep, service
from wrong_types import paths

GATEWAY = "gateway.networking.k8s.io"


def good_objects(suffix: str = "") -> dict[str, dict]:
    """One valid object of each kind, named with suffix (so several sets can
    sit side by side): the Service has a slice, a route and a grant."""
    name = f"web{suffix}"
    net = len(suffix) + 1  # another subnet per set: no address shared between sets
    return {
        "Service": service(name, f"10.96.{net}.10",
                           ports=[{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080},
                                  {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53}]),
        "EndpointSlice": endpoint_slice(f"{name}-x", name, [ep(f"10.244.{net}.1"), ep(f"10.244.{net}.2")],
                                        ports=[{"name": "http", "port": 8080, "protocol": "TCP"},
                                               {"name": "dns", "port": 53, "protocol": "UDP"}]),
        "Pod": {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": f"pod{suffix}", "namespace": "default", "uid": f"u{suffix}",
                             "labels": {"app": name},
                             "annotations": {"sidecar.istio.io/status": "{}",
                                             "traffic.sidecar.istio.io/excludeInboundPorts": "15020"}},
                "spec": {"nodeName": "node-a", "containers": [
                    {"name": "c", "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]}]},
                "status": {"phase": "Running", "podIP": f"10.244.{net}.1",
                           "podIPs": [{"ip": f"10.244.{net}.1"}]}},
        "Namespace": {"apiVersion": "v1", "kind": "Namespace",
                      "metadata": {"name": f"ns{suffix}", "labels": {"team": "a"}}},
        "NetworkPolicy": {
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": f"np{suffix}", "namespace": "default"},
            "spec": {"podSelector": {"matchLabels": {"app": name},
                                     "matchExpressions": [{"key": "tier", "operator": "In",
                                                           "values": ["a", "b"]}]},
                     "policyTypes": ["Ingress", "Egress"],
                     "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "x"}},
                                            "namespaceSelector": {}},
                                           {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}],
                                  "ports": [{"protocol": "TCP", "port": 80, "endPort": 90},
                                            {"port": "http"}]}],
                     "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"team": "a"}}}],
                                 "ports": [{"protocol": "UDP", "port": 53}]}]}},
        "TCPRoute": {"apiVersion": f"{GATEWAY}/v1alpha2", "kind": "TCPRoute",
                     "metadata": {"name": f"tr{suffix}", "namespace": "default"},
                     "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": name, "port": 80}],
                              "rules": [{"backendRefs": [{"name": name, "port": 80, "weight": 3},
                                                         {"name": "other", "namespace": "b", "port": 80,
                                                          "weight": 1}]}]}},
        "UDPRoute": {"apiVersion": f"{GATEWAY}/v1alpha2", "kind": "UDPRoute",
                     "metadata": {"name": f"ur{suffix}", "namespace": "default"},
                     "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": name, "port": 53}],
                              "rules": [{"backendRefs": [{"name": name, "port": 53}]}]}},
        "ReferenceGrant": {"apiVersion": f"{GATEWAY}/v1beta1", "kind": "ReferenceGrant",
                           "metadata": {"name": f"g{suffix}", "namespace": "b"},
                           "spec": {"from": [{"group": GATEWAY, "kind": "TCPRoute", "namespace": "default"}],
                                    "to": [{"group": "", "kind": "Service"},
                                           {"group": "", "kind": "Service", "name": "other"}]}},
        "AgentConfig": {"apiVersion": "meshbpf.io/v1alpha1", "kind": "AgentConfig",
                        "metadata": {"name": "meshbpf"},
                        "spec": {"socketRedirect": {"enabled": True, "cgroups": ["kubepods.slice"],
                                                    "podCIDRs": ["10.244.0.0/16"]},
                                 "capture": {"enabled": True, "mesh": "istio",
                                             "optInLabel": "meshbpf.io/capture=true", "dns": True}}},
    }


def _deep(depth: int) -> Any:
    value: Any = "x"
    for i in range(depth):
        value = {"a": value} if i % 2 else [value]
    return value


BAD_VALUES: list[Any] = [
    "x", "", ["x"], [], {"x": 1}, {}, None, True, False, 0, -1, 65535, 65536, 2 ** 70, -(2 ** 70),
    1.5, float("nan"), float("inf"), "80", "-1", "0x50", "a" * 100_000, "\u00e9\u4e2d\U0001f600",
    "line\nbreak", "\ttab", "10.0.0.1/33", "::ffff:10.0.0.1", "10.0.0.256", [None], [[["x"]]],
    _deep(50), {"": None}, {1: 2}, "*", "None",
]


def mutate(obj: dict, rng: random.Random, times: int = 1,
           allowed: Callable[[tuple], bool] = lambda path: True) -> tuple[dict, list[str]]:
    """obj with `times` random mutations at paths `allowed` says yes to, and
    a description of each."""
    out = copy.deepcopy(obj)
    what = []
    for _ in range(times):
        all_paths = [p for p in paths(out) if allowed(p)]
        if not all_paths:
            break
        path = rng.choice(all_paths)
        parent = out
        for key in path[:-1]:
            parent = parent[key]
        if rng.random() < 0.15:
            del parent[path[-1]]
            what.append(f"del {path}")
        else:
            value = copy.deepcopy(rng.choice(BAD_VALUES))
            parent[path[-1]] = value
            what.append(f"{path}={str(value)[:30]!r}")
    return out, what
