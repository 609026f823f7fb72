"""The NetworkPolicy benchmark's baselines (bench/policy_rules.py, loaded as
bench/policy.py loads them) enforce what the policies say, with real traffic
between lab pods: the comparison with meshbpf is only honest if they do."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from meshbpf.lab.netlab import Lab
from meshbpf.lab.workloads import start_whoami, wait_listening

from .conftest import LAB_PREFIX, _names

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import policy as bench  # noqa: E402
import policy_cluster as world  # noqa: E402

NS = world.NAMESPACE


@pytest.mark.heavy   # a benchmark's baseline: not the product; the VMs skip it
def test_baselines_allow_the_client_and_drop_the_rest():
    with Lab(f"{LAB_PREFIX}{next(_names)}") as lab:
        lab.up([f"{NS}/{p}" for p in ("srv", "cli", "srv-twin", "cli-twin", "other")])
        start_whoami(lab, f"{NS}/srv-twin", 8080)
        wait_listening(lab, f"{NS}/srv-twin", 8080)
        other = lab.pods[f"{NS}/other"]
        cluster = (world.namespaces() + world.lab_pods(lab.pods) + world.remote_pods(20)
                   + [world.pod(NS, "other", {"role": "other"}, world.TWIN_NODE, [str(other.ipv4)])])
        allow = bench.rule_texts(cluster + world.selecting_policies(5))
        deny = bench.rule_texts(cluster + world.selecting_policies(5)[:-1] + [world.deny_client()])
        srv, cli, oth = f"{NS}/srv-twin", f"{NS}/cli-twin", f"{NS}/other"
        for case in ("iptables", "iptables-nft", "nftables"):
            try:
                bench.load_rules(lab, case, allow)
                seen = {"client:8080": bench.reaches(lab, cli, srv, 8080),
                        "client:8082": bench.reaches(lab, cli, srv, 8082),
                        "other:8080": bench.reaches(lab, oth, srv, 8080)}
                assert seen == {"client:8080": True, "client:8082": False, "other:8080": False}, case
                bench.load_rules(lab, case, deny)      # a full resync after an edit
                assert not bench.reaches(lab, cli, srv, 8080), f"{case}: the edit denies the client"
            finally:
                bench.unload_rules(lab, case)
            assert bench.reaches(lab, oth, srv, 8080), f"{case}: unloading leaves nothing behind"
