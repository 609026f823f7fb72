"""The YAML reading itself: Kubernetes' YAML 1.1, hostile input, fuzzing.

Everything goes through parse_documents (text -> documents, or a ConfigError
naming file, document and line) and build_state (documents -> state or
problems), the path every config file takes.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from meshbpf.sources.errors import ConfigError
from meshbpf.sources.kube_objects import build_state
from meshbpf.sources.yaml_file import parse_documents, read_config

F = Path("f.yaml")


def one(text: str):
    (doc,) = parse_documents(F, text)
    return doc.obj


def rejected(text: str) -> str:
    with pytest.raises(ConfigError) as exc:
        parse_documents(F, text)
    (problem,) = exc.value.problems
    return str(problem)


# --- YAML 1.1, as kubectl and the API server read it (go-yaml v2) ---------------

@pytest.mark.parametrize("text, value", [
    ("yes", True), ("No", False), ("on", True), ("OFF", False), ("y", True), ("n", False),
    ("true", True), ("~", None), ("null", None), ("", None),
    ("0777", 0o777), ("0x1F", 31), ("0b101", 5), ("1_000", 1000), ("-17", -17), ("+3", 3),
    ("1.5", 1.5), ("08", 8.0),
    ("1:20", "1:20"),                       # no sexagesimal numbers in go-yaml
    ("2024-04-02T08:11:37Z", "2024-04-02T08:11:37Z"),  # timestamps stay strings
    ("2024-04-02", "2024-04-02"),
    ('"yes"', "yes"), ("'0777'", "0777"), ("!!str 80", "80"),
])
def test_scalars_are_read_as_kubernetes_reads_them(text, value):
    assert one(f"v: {text}\n") == {"v": value}


def test_merge_keys_work_and_explicit_keys_win():
    doc = one("base: &b {port: 80, protocol: UDP}\n"
              "other: &o {name: x, port: 1}\n"
              "p:\n  <<: [*b, *o]\n  protocol: TCP\n")
    assert doc["p"] == {"port": 80, "protocol": "TCP", "name": "x"}


def test_a_config_using_yes_and_a_merge_key_is_understood(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("""\
apiVersion: meshbpf.io/v1alpha1
kind: AgentConfig
metadata: {name: meshbpf}
spec:
  socketRedirect:
    enabled: yes
---
apiVersion: v1
kind: Service
metadata: &m {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  ports:
  - &http {name: http, port: 80, protocol: TCP}
  - <<: *http
    name: alt
    port: 81
""")
    state = read_config(f).state
    assert state.settings.redirect.enabled is True
    assert sorted(fe.port for fe in state.service_ports) == [80, 81]


def test_kubectl_json_output_takes_the_json_path_and_gives_the_same_objects():
    obj = {"apiVersion": "v1", "kind": "List", "items": [{"a": [1, "yes", None, 1.5]}]}
    assert one(json.dumps(obj, indent=2)) == obj


def test_duplicate_keys_are_refused_in_json_too():
    assert "duplicate key 'kind'" in rejected('{"kind": "List", "kind": "Service"}')


def test_bad_json_is_reported_with_its_line():
    problem = rejected('{\n  "kind": "List",\n  "items": [,]\n}\n')
    assert "f.yaml: document 1 (line 1)" in problem and "line 3" in problem


# --- Hostile input: a clean problem, never a crash or a hang --------------------

@pytest.mark.parametrize("text, reason", [
    ("a: &a [*a]\n", "recursive alias"),
    ("[" * 5000 + "]" * 5000, "nesting depth"),
    ("- " * 5000 + "x\n", "nesting depth"),
    ("\n".join(["a: &a [x, x, x, x, x, x, x, x, x, x]"] +
               [f"{chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 10) + "]"
                for i in range(9)]) + "\n", "excessive aliasing"),
    ("v: !!int abc\n", "not a valid int"),
    ("v: !custom x\n", "unsupported tag"),
    ("? [a, b]\n: c\n", "map key must be a plain value"),
    ("p:\n  <<: 5\n", "merge key"),
    ("a: 1\n\x00\n", "not valid YAML"),
])
def test_hostile_yaml_is_a_located_problem(text, reason):
    problem = rejected(text)
    assert reason in problem and problem.startswith("f.yaml"), problem


def _mutations(rng: random.Random, seed_text: str):
    alphabet = "{}[]:-,&*!|>'\"#%@`?\n\t <=\\~0aZ\x00\xff\u2028"
    text = list(seed_text)
    for _ in range(rng.randint(1, 8)):
        op = rng.random()
        pos = rng.randrange(len(text) + 1)
        if op < 0.4:
            text.insert(pos, rng.choice(alphabet))
        elif op < 0.7 and text:
            del text[min(pos, len(text) - 1)]
        elif text:
            text[min(pos, len(text) - 1)] = rng.choice(alphabet)
    return "".join(text)


def test_fuzz_random_and_mutated_input_gives_a_result_or_a_problem(cluster_multidoc):
    """A few thousand inputs, seeded: random bytes decoded as text, and the
    kubectl fixture with random edits. Each must parse and build, or be
    refused with ConfigError; any other exception fails the test."""
    rng = random.Random(20261130)
    seed = cluster_multidoc.read_text()
    inputs = [bytes(rng.randrange(256) for _ in range(rng.randint(0, 200))).decode("latin-1")
              for _ in range(1000)]
    inputs += [_mutations(rng, seed) for _ in range(1500)]
    outcomes = {"parsed": 0, "refused": 0}
    for text in inputs:
        try:
            docs = parse_documents(F, text)
            build_state(docs)
            outcomes["parsed"] += 1
        except ConfigError as exc:
            assert exc.problems and all(str(p).startswith("f.yaml") for p in exc.problems)
            outcomes["refused"] += 1
    assert outcomes["parsed"] > 100 and outcomes["refused"] > 100, outcomes
