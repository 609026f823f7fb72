"""The schema check's generated predicate against its reporter.

schema.check() asks the predicate (`valid`) first and runs the reporter
only when the predicate says no, so the two must agree exactly: the
predicate is true for a value if and only if the reporter finds nothing.
They are compared here over mutated copies of realistic objects, for every
schema the sources check.
"""

from __future__ import annotations

import copy
import random

import pytest

from k8s_builders import endpoint_slice, ep, kube_list, service
from meshbpf.sources import agent_config, kube_policy, schema

# Values that break (or do not break) a field, whatever its schema says.
ODD_VALUES = [None, 0, 1, 80, True, False, "", "x", "TCP", 1.5, [], [None], [1], ["a"], [{}],
              {}, {"a": "b"}, {"a": 1}, {"a": None}, {1: "a"}, [[]], {"name": "x"}]


def _paths(value, path=()):
    yield path
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, path + (i,))


def _lookup(value, path):
    """The value at path, or None when an earlier mutation replaced a parent."""
    for step in path:
        if isinstance(value, dict) and step in value:
            value = value[step]
        elif isinstance(value, list) and isinstance(step, int) and step < len(value):
            value = value[step]
        else:
            return None
    return value


def _field_names(node) -> list:
    """Every field name a schema knows, to add known fields as well as unknown ones."""
    if isinstance(node, dict):
        return list(node) + [n for sub in node.values() for n in _field_names(sub)]
    if isinstance(node, list):
        return _field_names(node[0])
    return []


def _mutants(obj, names, rng: random.Random, count: int):
    paths = [p for p in _paths(obj) if p]
    for _ in range(count if paths else 0):
        new = copy.deepcopy(obj)
        for _ in range(rng.randint(1, 3)):
            path = rng.choice(paths)
            parent, key = _lookup(new, path[:-1]), path[-1]
            if not (isinstance(parent, dict) and key in parent
                    or isinstance(parent, list) and isinstance(key, int) and key < len(parent)):
                continue  # an earlier mutation replaced a parent
            target = parent[key]
            roll = rng.random()
            if roll < 0.3 and isinstance(target, dict):
                target[rng.choice(names + ["zzz", "Name", 7])] = copy.deepcopy(rng.choice(ODD_VALUES))
            elif roll < 0.4 and isinstance(target, list):
                target.append(copy.deepcopy(rng.choice(ODD_VALUES + target[:1])))
            else:
                parent[key] = copy.deepcopy(rng.choice(ODD_VALUES))
        yield new


def _agent_config() -> dict:
    return {"apiVersion": "meshbpf.io/v1alpha1", "kind": "AgentConfig", "metadata": {"name": "a"},
            "spec": {"socketRedirect": {"enabled": True, "cgroups": ["kubepods.slice"],
                                        "podCIDRs": ["10.244.0.0/16"]}}}


def _service() -> dict:
    return service("web", ["10.96.0.10", "fd00::10"],
                   ports=[{"name": "a", "port": 80, "targetPort": "http"},
                          {"name": "b", "port": 81, "protocol": "UDP"}],
                   sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 5}})


def _slice() -> dict:
    sl = endpoint_slice("web-a", "web", [ep("10.244.1.1", zone="z"), ep("10.244.1.2", ready=False)])
    sl["endpoints"][0]["hints"] = {"forZones": [{"name": "z"}]}
    return sl


CASES = {
    "Service": (schema.SERVICE, _service),
    "EndpointSlice": (schema.ENDPOINT_SLICE, _slice),
    "List": (schema.LIST, lambda: kube_list(service("web"), {})),
    "AgentConfig": (agent_config.AGENT_CONFIG, _agent_config),
    "container ports": ([kube_policy.CONTAINER_PORT],
                        lambda: [{"name": "http", "containerPort": 80, "protocol": "TCP"}]),
    "a string": (schema.STR, lambda: "x"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_valid_is_true_exactly_when_nothing_is_reported(case):
    node, make = CASES[case]
    reporter, valid = schema._compiled(node)
    rng = random.Random(case)
    base = make()
    values = [base, *_mutants(base, _field_names(node), rng, 3000), *ODD_VALUES[1:]]
    disagreements, reported = [], 0
    for value in values:
        out: list = []
        reporter(value, "", out)
        reported += bool(out)
        if valid(value) != (not out):
            disagreements.append((value, out))
    assert not disagreements, disagreements[:3]
    assert reported > len(values) // 10  # the mutants did exercise the reporter


def test_check_reports_every_problem_when_the_predicate_says_no():
    svc = service("web", ports=[{"name": "a", "port": "80", "bogus": 1}])
    assert schema.check(svc, schema.SERVICE) == [
        ("spec.ports[0].bogus", "unknown field 'bogus'"),
        ("spec.ports[0].port", "expected an integer, got a string '80'")]


def test_a_list_schema_written_in_the_call_is_compiled_once():
    """kube_policy checks every Pod's containers with [ANY] and
    [CONTAINER_PORT] written in the call: one compilation each, not one
    per Pod kept forever."""
    ports = [{"name": "http", "containerPort": 80}]
    schema.check(ports, [kube_policy.CONTAINER_PORT])
    schema.check([{}], [schema.ANY])
    size = len(schema._CACHE)
    for _ in range(50):
        assert schema.check(ports, [kube_policy.CONTAINER_PORT]) == []
        assert schema.check([{}], [schema.ANY]) == []
        assert schema.check([None], [schema.ANY]) == [("[0]", "empty list item")]
    assert len(schema._CACHE) == size
