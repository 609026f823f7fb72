"""NetworkPolicy visibility as a user types it: `meshbpf endpoint list`,
`meshbpf policy list`, `meshbpf monitor` and the policy metrics, against a
real agent enforcing policies on lab pods, through the installed script."""

from __future__ import annotations

import ctypes as ct
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshbpf.cli.monitor_cmd import LOCK_DIR
from meshbpf.datapath import libbpf
from meshbpf.datapath.layout import PolCfgC
from meshbpf.lab.objects import lab_objects
from meshbpf.lab.workloads import start_whoami, wait_for

from .conftest import web_service
from .test_policy_agent import NODE, curl, netpol

ALLOW_RULE = "x/allow-a/ingress/0"
SCRIPT = Path(sys.executable).parent / "meshbpf"  # as typed: the installed script


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


@pytest.fixture
def policy_lab(lab, start_agent):
    """x/a, x/b (whoami :8080), z/a (not "y": YAML 1.1 reads it as true); x/b: default deny, then x/a allowed in."""
    for p in ("x/a", "x/b", "z/a"):
        lab.add_pod(p)
    start_whoami(lab, "x/b", 8080)
    objects = [lab_objects([lab.pods[p] for p in ("x/a", "x/b", "z/a")], NODE)] + web_service(lab)
    objects += [netpol("deny-b", "x", {"pod": "b"}, ingress=[]),
                netpol("allow-a", "x", {"pod": "b"},
                       ingress=[{"from": [{"podSelector": {"matchLabels": {"pod": "a"}}}]}])]
    agent = start_agent(objects, "--node-name", NODE, "--node-netns", lab.node_ns)
    url = f"http://{lab.pods['x/b'].ipv4}:8080/"
    wait_for(lambda: not curl(lab, "z/a", url), 20, "the policies to take effect")
    return lab, agent, url


def _events_on(bpffs) -> int:
    fd = libbpf.obj_get(str(bpffs / "mbpf_pol_cfg"))
    try:
        cfg = PolCfgC()
        libbpf.map_lookup(fd, ct.c_uint32(0), cfg)
        return cfg.events
    finally:
        os.close(fd)


@pytest.mark.userspace
def test_endpoint_and_policy_list_with_and_without_the_agent(policy_lab, bpffs):
    lab, agent, _ = policy_lab
    at = ("--bpffs", str(bpffs), "--agent", f"127.0.0.1:{agent.port}")
    b_ip, a_ip = str(lab.pods["x/b"].ipv4), str(lab.pods["x/a"].ipv4)

    table = _cli("endpoint", "list", *at)
    assert table.returncode == 0, table.stderr
    row = next(line for line in table.stdout.splitlines() if line.startswith("x/b "))
    assert b_ip in row and "enforced" in row and "isolated" in row
    assert "x/allow-a, x/deny-b" in row
    eps = {f"{e['namespace']}/{e['name']}": e for e in json.loads(_cli("endpoint", "list", *at, "-o", "json").stdout)["endpoints"]}
    assert set(eps) == {"x/a", "x/b", "z/a"}
    assert eps["x/b"]["isolated_ingress"] and not eps["x/b"]["isolated_egress"]
    assert eps["x/a"]["policies"] == [] and not eps["x/a"]["isolated_ingress"]
    assert all(e["state"] == "enforced" and e["ifindex"] for e in eps.values())

    table = _cli("policy", "list", *at)
    assert table.returncode == 0, table.stderr
    rule = next(line for line in table.stdout.splitlines() if ALLOW_RULE in line)
    assert rule.startswith("x/b ") and "ingress" in rule and f"{a_ip}/32" in rule and rule.rstrip().endswith("any")
    assert "x/a  " in table.stdout and "(not isolated: everything allowed)" in table.stdout
    pods = {f"{p['namespace']}/{p['name']}": p for p in json.loads(_cli("policy", "list", *at, "-o", "json").stdout)["pods"]}
    assert [r["rule"] for r in pods["x/b"]["ingress"]["rules"]] == [ALLOW_RULE]

    metrics = agent.get("/metrics")[1]
    for series in ('meshbpf_policy_verdicts_total{direction="ingress",verdict="deny"}',
                   'meshbpf_drops_total{reason="policy_denied"}',
                   'meshbpf_map_pressure{map_name="mbpf_pol_ep"}', 'meshbpf_map_entries{map_name="mbpf_ct"}'):
        assert series in metrics
    denied = next(line for line in metrics.splitlines() if line.startswith('meshbpf_drops_total{reason="policy_denied"}'))
    assert float(denied.split()[-1]) > 0, "the denied curls of the fixture"
    assert 'meshbpf_map_entries{map_name="mbpf_pol_ep"} 3.0' in metrics

    agent.stop()
    table = _cli("endpoint", "list", *at)
    assert table.returncode == 0, table.stderr
    assert "agent not reachable" in table.stderr and "pinned maps" in table.stderr
    assert len(table.stderr.strip().splitlines()) == 1
    raw = json.loads(_cli("endpoint", "list", *at, "-o", "json").stdout)["endpoints"]
    by_ip = {ip: e for e in raw for ip in e["ips"]}
    assert by_ip[b_ip]["isolated_ingress"] and by_ip[b_ip]["ifindex"] == eps["x/b"]["ifindex"]
    assert by_ip[b_ip]["peer_entries"] > 0
    rules = json.loads(_cli("policy", "list", *at, "-o", "json").stdout)["rules"]
    assert {"ports": "any", "rule": pods["x/b"]["ingress"]["rules"][0]["id"]} in next(
        r for r in rules if r["peer"] == f"{a_ip}/32")["allowed"]
    table = _cli("policy", "list", *at)
    assert table.returncode == 0 and f"{a_ip}/32" in table.stdout, table.stderr


def _ctrl_c_as_in_a_terminal() -> None:
    # A suite started as a background job (`... &` in a script) inherits
    # SIGINT ignored, and Python then keeps it ignored: the monitor would
    # never see the Ctrl-C these tests send. A terminal's user has it.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _monitor(bpffs, agent, *args) -> subprocess.Popen:
    proc = subprocess.Popen([str(SCRIPT), "monitor", "--bpffs", str(bpffs),
                             "--agent", f"127.0.0.1:{agent.port}", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_ctrl_c_as_in_a_terminal)
    proc.notes = []  # stderr lines before it listens
    while "listening for flow events" not in (line := proc.stderr.readline()):
        assert line, f"monitor exited: {proc.notes}"
        proc.notes.append(line)
    return proc


def _wait_output(proc: subprocess.Popen, done, timeout: float = 30) -> str:
    """The monitor's stdout so far, once done(text) holds (no sleep: emulated
    kernels are slow). Read raw, so nothing stays in a Python buffer."""
    text, fd, end = "", proc.stdout.fileno(), time.monotonic() + timeout
    while not done(text):
        assert time.monotonic() < end, f"monitor printed only:\n{text}"
        if select.select([fd], [], [], 0.2)[0]:
            chunk = os.read(fd, 65536).decode()
            assert chunk, f"monitor exited:\n{text}"
            text += chunk
    return text


def _stop(proc: subprocess.Popen, seen: str = "", sig=signal.SIGINT) -> tuple[str, str]:
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    return seen + out, err


@pytest.mark.bounds
@pytest.mark.skipif(not libbpf.ringbuf_supported(), reason="flow events need a ring buffer (5.8+)")
def test_monitor_shows_verdicts_with_names_and_turns_events_off(policy_lab, bpffs):
    lab, agent, url = policy_lab
    assert _events_on(bpffs) == 0, "nobody listens: no events"
    denies = _monitor(bpffs, agent, "--verdict", "deny", "--pod", "z/a")
    assert _events_on(bpffs)
    second = _cli("monitor", "--bpffs", str(bpffs))
    assert second.returncode == 1 and f"(pid {denies.pid}) is reading the events" in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1 and _events_on(bpffs)
    assert curl(lab, "x/a", url) and not curl(lab, "z/a", url)
    out, _ = _stop(denies, _wait_output(denies, lambda text: "DENY" in text))
    assert _events_on(bpffs) == 0, "events are off once the monitor is gone"
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["TIME", "VERDICT", "DIR"]
    assert lines[1:] and all("DENY" in line and "(z/a)" in line for line in lines[1:]), out
    assert f"{lab.pods['x/b'].ipv4}:8080 (x/b)" in lines[1] and "(no rule allows)" in lines[1]

    every = _monitor(bpffs, agent, "-o", "json")
    assert curl(lab, "x/a", url) and not curl(lab, "z/a", url)
    seen = _wait_output(every, lambda text: ALLOW_RULE in text and '"deny"' in text)
    out, _ = _stop(every, seen, signal.SIGTERM)
    assert _events_on(bpffs) == 0
    assert not (LOCK_DIR / f"monitor-{str(bpffs).strip('/').replace('/', '-')}.lock").exists()
    events = [json.loads(line) for line in out.splitlines()]
    allowed = [e for e in events if e["verdict"] == "allow" and e["src_pod"] == "x/a"
               and e["dst_pod"] == "x/b" and e["direction"] == "ingress"]
    assert allowed and allowed[0]["rule_name"] == ALLOW_RULE and allowed[0]["pod"] == "x/b", events
    assert any(e["verdict"] == "deny" and e["src_pod"] == "z/a" and e["rule"] == 0 for e in events)

    agent.stop()  # raw: addresses and rule ids, no names, one note
    raw = _monitor(bpffs, agent, "-o", "json", "--count", "2", "--verdict", "allow")
    assert curl(lab, "x/a", url)
    out, err = raw.communicate(timeout=20)
    assert raw.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines()]  # x/a's egress, x/b's ingress
    assert len(events) == 2 and {e["src_pod"] for e in events} == {None}, events
    assert any(e["rule"] == allowed[0]["rule"] and e["rule_name"] is None for e in events), events
    assert len(raw.notes) == 1 and "agent not reachable" in raw.notes[0]
    assert _events_on(bpffs) == 0
