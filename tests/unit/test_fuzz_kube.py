"""Fuzzing the Kubernetes source through the fake API server: rounds of
mutated objects of every kind (fuzz_objects), served by list and watch, next
to a good set of the same kinds.

The API server validates objects, so most of these never reach a real
agent; but a newer or buggy server, a CRD without a schema (routes,
grants) or a ConfigMap's free text can send anything, and the agent must
neither stop nor freeze. Properties, per round: poll() raises nothing
(an internal error there would reject every object at once), each problem
is one line naming its object, and the good set stays in the state.
"""

from __future__ import annotations

import os
import random

from fuzz_objects import good_objects, mutate
from meshbpf.sources.yaml_load import dump_all
from test_kubernetes_source import Poller, api, make_source, no_leaked_threads, wait_for  # noqa: F401

SEED = int(os.environ.get("MESHBPF_FUZZ_SEED", "20261201"))
REFLECTOR = {"Service": "services", "EndpointSlice": "endpointslices", "Pod": "pods",
             "Namespace": "namespaces", "NetworkPolicy": "networkpolicies", "TCPRoute": "tcproutes",
             "UDPRoute": "udproutes", "ReferenceGrant": "referencegrants", "ConfigMap": "configmap"}


def servable(path: tuple) -> bool:
    """What the fake server itself needs intact to store and select an
    object: kind, metadata's name, namespace and labels map, spec a map."""
    if path[0] in ("kind", "apiVersion") or path == ("spec",):
        return False
    if path[0] == "metadata":
        return len(path) > 2 and path[1] in ("labels", "annotations")
    return True


def config_map(agent_config: dict) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "meshbpf-config", "namespace": "kube-system"},
            "data": {"agent-config.yaml": dump_all([agent_config])}}


def in_step(p: Poller, versions: dict[str, int]) -> bool:
    """Every reflector has seen the writes made to its kind."""
    return all(int(p.source.reflectors[REFLECTOR[kind]].resource_version or 0) >= rv
               for kind, rv in versions.items())


def set_2_in(state) -> bool:
    ports = [sp for sp in state.service_ports.values() if sp.service == "default/web2"]
    return (len(ports) == 2 and all(sp.endpoints for sp in ports)
            and {"pod2"} <= {p.name for p in state.pods}
            and {"np2"} <= {n.name for n in state.network_policies}
            and {"tr2", "ur2"} <= {r.name for r in state.routes})


def test_bad_objects_from_the_api_are_left_out_alone(api, make_source):
    first, second = good_objects(), good_objects("2")
    second.pop("AgentConfig")
    api.apply(*second.values(), config_map(first.pop("AgentConfig")))
    p = make_source()
    assert set_2_in(p.first())
    rng = random.Random(f"{SEED}-kube")
    agent_config = good_objects()["AgentConfig"]
    for _ in range(12):
        versions = {}
        for kind, obj in first.items():
            bad, _ = mutate(obj, rng, rng.choice((1, 2)), servable)
            versions[kind] = api.apply(bad)
        bad_config, _ = mutate(agent_config, rng, 1)
        versions["ConfigMap"] = api.apply(config_map(bad_config))
        wait_for(lambda: in_step(p, versions), "the round's events")
        p.poll()  # raises nothing: no internal error
        assert set_2_in(p.emitted[-1])
        for text in p.source.problems:
            assert text.startswith("API") and len(text.splitlines()) == 1 and len(text) < 3000, text
            assert "internal error" not in text, text


def test_the_incremental_path_leaves_out_what_a_full_build_leaves_out(api, make_source):
    """Service and EndpointSlice events alone take the incremental path
    (kube_incremental); with bad objects among them it must give the state
    a full build of the same objects gives."""
    from meshbpf.sources.held_text import loaded
    from meshbpf.sources.kube_objects import SourceObject, build_state

    first, second = good_objects(), good_objects("2")
    api.apply(second["Service"], second["EndpointSlice"], first["Service"], first["EndpointSlice"])
    p = make_source()
    p.first()
    incremental = []
    real_apply_events = p.source._apply_events
    p.source._apply_events = lambda *a: incremental.append(1) or real_apply_events(*a)
    rng = random.Random(f"{SEED}-kube-incremental")
    for _ in range(25):
        versions = {}
        for kind in rng.sample(["Service", "EndpointSlice"], rng.randint(1, 2)):
            bad, _ = mutate(first[kind], rng, rng.choice((1, 2)), servable)
            versions[kind] = api.apply(bad)
        wait_for(lambda: in_step(p, versions), "the round's events")
        p.poll()
        items = [SourceObject(loaded(o), "API server")
                 for r in ("services", "endpointslices")      # kept as packed compact JSON text
                 for o in p.source.reflectors[r].items()]
        full = build_state(items, node_name="node-a").state
        assert p.emitted[-1].service_ports == full.service_ports
    assert len(incremental) >= 20  # the rounds took the incremental path
