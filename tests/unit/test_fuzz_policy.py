"""NetworkPolicy inputs from generated bad and oversized objects: from the
readers through the compiler and the planner to the maps' codecs, nothing
raises, and one policy cannot stall the agent's loop.
"""

from __future__ import annotations

import copy
import ipaddress
import random

import pytest

from fuzz_objects import good_objects, mutate
from meshbpf.datapath.policy import CODECS
from meshbpf.policy import compile as policy_compile
from meshbpf.policy.compile import compile_policies
from meshbpf.policy.model import IPBlock, Peer
from meshbpf.reconcile.policy import plan_policy
from meshbpf.reconcile.policy_keys import PolicyState
from meshbpf.sources.kube_objects import SourceObject
from meshbpf.sources.kube_policy import read_policy_objects

KINDS = ("Pod", "Namespace", "NetworkPolicy")
NODE_IP = ipaddress.ip_address("192.168.0.1")
CAPACITY = {"endpoints": 4096, "addresses": 8192, "peers": 262144, "ports": 262144}


def to_the_maps(objects: list[dict]) -> int:
    """Reads, compiles and plans objects as PolicySync does (every local pod
    found), then encodes each entry as the maps' codecs do; the writes."""
    inputs = read_policy_objects([SourceObject(o, f"f.yaml: document {i + 1}") for i, o in enumerate(objects)])
    compiled = compile_policies(inputs.pods, inputs.namespaces, inputs.policies, "node-a",
                                {"node-a": [NODE_IP]})
    found = {key: 10 + n for n, key in enumerate(sorted(compiled.pods))}
    p = plan_policy(PolicyState(), compiled, found, [NODE_IP], CAPACITY)
    for step in p.steps():
        key_into, value_into, _, _ = CODECS[step.map]
        for key, value in step.entries.items():
            key_into(key)
            if value is not None:
                value_into(value)
    return p.writes


@pytest.mark.parametrize("kind", KINDS)
def test_bad_policy_inputs_never_raise_from_reading_to_the_maps(kind):
    rng = random.Random(f"20261201-policy-{kind}")
    first, second = good_objects(), good_objects("2")
    for _ in range(150):
        bad, what = mutate(first[kind], rng, rng.choice((1, 2, 3)))
        objects = [bad if k == kind else first[k] for k in KINDS] + [second[k] for k in KINDS]
        try:
            to_the_maps(objects)
        except Exception as exc:
            pytest.fail(f"{kind} {what}: {type(exc).__name__}: {exc}")


def carved_one_by_one(block: IPBlock) -> set:
    """The except ranges carved out one at a time (what compile did before):
    the reference the one-sweep carving must equal."""
    remaining = [block.cidr]
    for hole in block.except_:
        nxt = []
        for net in remaining:
            if hole.subnet_of(net):
                nxt.extend(net.address_exclude(hole))
            elif not net.subnet_of(hole):
                nxt.append(net)
        remaining = nxt
    return set(remaining)


def random_block(rng: random.Random) -> IPBlock:
    network = rng.choice((ipaddress.IPv4Network, ipaddress.IPv6Network))
    bits = 32 if network is ipaddress.IPv4Network else 128
    prefix = rng.choice((0, 1, bits - 8, bits - 4, bits - 1, bits))
    top = (1 << bits) - 1
    base = rng.randrange(1 << bits) & ~((1 << (bits - prefix)) - 1) & top
    cidr = network((base, prefix))
    holes = []
    for _ in range(rng.randrange(0, 8)):
        hole_prefix = rng.randint(prefix, min(bits, prefix + 6))
        size = 1 << (bits - hole_prefix)
        inside = rng.choice((0, (1 << (bits - prefix)) - size, rng.randrange(1 << (bits - prefix))))
        holes.append(network((base + inside // size * size, hole_prefix)))
    return IPBlock(cidr, tuple(holes))


def test_carving_in_one_sweep_equals_carving_one_by_one():
    rng = random.Random(20261201)
    edges = [IPBlock(ipaddress.ip_network("0.0.0.0/0"), (ipaddress.ip_network("255.255.255.255/32"),)),
             IPBlock(ipaddress.ip_network("10.0.0.0/8"), (ipaddress.ip_network("10.0.0.0/8"),)),
             IPBlock(ipaddress.ip_network("::/0"), (ipaddress.ip_network("ffff::/16"), ipaddress.ip_network("::/1"))),
             IPBlock(ipaddress.ip_network("10.0.0.0/8"), (ipaddress.ip_network("10.1.0.0/16"),
                                                          ipaddress.ip_network("10.1.2.0/24")))]
    for block in edges + [random_block(rng) for _ in range(3000)]:
        got = policy_compile._block_networks(Peer(ip_block=block))
        assert set(got) == carved_one_by_one(block), block
        assert len(got) == len(set(got))


def test_many_except_ranges_cost_a_sweep_not_holes_times_pieces(monkeypatch):
    """2000 /32 holes in a /8 took 40 s to carve one at a time (1.3 million
    subnet checks for 400 holes), all of it in the agent's loop: one policy
    froze every update, and /healthz's heartbeat went stale meanwhile. The
    work is counted here, not timed."""
    calls = 0
    real = ipaddress._BaseNetwork.subnet_of

    def counted(self, other):
        nonlocal calls
        calls += 1
        return real(self, other)

    monkeypatch.setattr(ipaddress._BaseNetwork, "subnet_of", counted)
    policy = copy.deepcopy(good_objects()["NetworkPolicy"])
    policy["spec"]["podSelector"] = {}
    holes = [f"10.{i // 256}.{i % 256}.7/32" for i in range(2000)]
    policy["spec"]["ingress"][0]["from"] = [{"ipBlock": {"cidr": "10.0.0.0/8", "except": holes}}]
    writes = to_the_maps([good_objects()["Pod"], good_objects()["Namespace"], policy])
    assert writes > 2000 * 4           # every piece between the holes is in the maps
    assert calls < 10 * len(holes), calls
