"""The LB benchmark's split case (bench/lbbench.py): its config splits a
parent Service 50/50 over two Services holding the benchmark's real
backends, at VIPs no other benchmark Service uses."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import kube_rules as kr  # noqa: E402
import lbbench  # noqa: E402

from meshbpf.reconcile import wanted_services  # noqa: E402
from meshbpf.sources.yaml_file import read_config  # noqa: E402


def test_split_case_config_splits_over_the_real_backends(tmp_path):
    n = 10
    extra, route = lbbench.split_objects(n)
    path = tmp_path / "split.yaml"
    path.write_text(kr.kube_yaml(kr.services(n) + extra) + "---\n" + route)
    state = read_config(path).state
    (split,) = [sp for sp in state.service_ports.values() if sp.split]
    assert f"{split.frontend.address}:{split.frontend.port}" == lbbench.split_target(n)
    assert [(s.service, s.weight) for s in split.split] == [("bench/split-a:80", 50), ("bench/split-b:80", 50)]
    assert sorted(str(e.address) for s in split.split for e in s.endpoints) == sorted(kr.BACKENDS)
    vips = [s.vip for s in kr.services(n) + [kr.service(n)] + extra]
    assert len(set(vips)) == len(vips)
    assert len(wanted_services(state)) == n + 3
