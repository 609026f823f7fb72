"""Redirection under a real application: redis-server and redis-benchmark
in two lab pods, pipelined and not (issue 15).

Both are event loops on non-blocking sockets, so their pairs are spliced.
Pipelined GET/SET (-P 16) gained from splicing on this machine (1.3-1.4x,
bench/run-redirect), so it stays spliced like one-at-a-time request and
response; a pipelined client's bytes arrive intact, values up to 16 KB.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshbpf.datapath import redirect

from . import k8s

pytestmark = [pytest.mark.needs_feature("sockmap", "sockops_probe_read", "kernel_btf"),
              pytest.mark.skipif(not shutil.which("redis-server") or not shutil.which("redis-benchmark"),
                                 reason="needs redis-server and redis-benchmark (scripts/setup.sh installs them)")]

RESP = Path(__file__).with_name("resp_probe.py")
PORT = 6390


@pytest.fixture
def redis(lab, tmp_path):
    """redis-server in web-1, in the lab cgroup; its address."""
    ip = str(lab.pods["web-1"].ipv4)
    proc = lab.popen("web-1", ["redis-server", "--port", str(PORT), "--bind", ip, "--save", "",
                               "--appendonly", "no", "--protected-mode", "no", "--dir", str(tmp_path)],
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while lab.run("client", ["redis-cli", "-h", ip, "-p", str(PORT), "ping"], check=False,
                      in_cgroup=False).stdout.strip() != "PONG":
            assert proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.1)
        yield ip
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def redirect_agent(lab, start_agent):
    return start_agent([k8s.agent_config()])


def benchmark(lab, ip: str, pipeline: int, conns: int, size: int, requests: int) -> dict:
    r = lab.run("client", ["redis-benchmark", "-h", ip, "-p", str(PORT), "-P", str(pipeline),
                           "-c", str(conns), "-d", str(size), "-n", str(requests), "-t", "get,set",
                           "--csv"], timeout=300)
    assert r.returncode == 0, r.stderr
    return {m[0]: float(m[1]) for m in re.findall(r'^"(SET|GET)","([\d.]+)"', r.stdout, re.M)}


@pytest.mark.parametrize("pipeline,conns", [(1, 1), (16, 4)], ids=["P1-c1", "P16-c4"])
def test_redis_benchmark_pairs_are_spliced(lab, bpffs, redis, redirect_agent, pipeline, conns):
    requests = 20000 * pipeline
    before = redirect.read_counters(bpffs)
    rates = benchmark(lab, redis, pipeline, conns, 64, requests)
    after = redirect.read_counters(bpffs)
    assert set(rates) == {"SET", "GET"} and all(v > 0 for v in rates.values()), rates
    # Every pipeline of requests and every batch of replies went socket to
    # socket: 2 x requests / pipeline round trips, two sends each.
    assert after["redirected_msgs"] - before["redirected_msgs"] >= 2 * 2 * requests // pipeline
    assert after["inserted_sockets"] - before["inserted_sockets"] >= 2 * conns


@pytest.mark.parametrize("depth,size", [(16, 64), (16, 16384), (1, 65536)])
def test_pipelined_values_arrive_intact(lab, bpffs, redis, redirect_agent, depth, size):
    before = redirect.read_counters(bpffs)
    r = lab.run("client", [sys.executable, str(RESP), redis, str(PORT), "200", str(depth), str(size)],
                timeout=300)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result == {"rounds": 200, "mismatches": 0, "bytes": 2 * 200 * depth * size}
    spliced = redirect.read_counters(bpffs)["redirected_bytes"] - before["redirected_bytes"]
    assert spliced >= result["bytes"]
