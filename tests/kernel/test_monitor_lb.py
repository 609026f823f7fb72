"""Socket-LB translations in `meshbpf monitor` (issue 10), with real
connects and UDP sends through a real agent: the client pod (named from its kubelet
cgroup), the Service and the backend pod; refusals; the --type, --verdict
and --pod filters; and no event at all while nobody listens."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from meshbpf.datapath import libbpf
from meshbpf.lab.objects import lab_objects
from meshbpf.lab.workloads import start_whoami

from . import k8s
from .conftest import web_service
from .test_policy_agent import NODE, curl
from .test_policy_cli import _events_on, _monitor, _stop, _wait_output

pytestmark = pytest.mark.skipif(not libbpf.ringbuf_supported(),
                                reason="flow events need a ring buffer (5.8+)")


def _unread_records(bpffs) -> int:
    """Records waiting in the ring buffer, read without turning events on."""
    import os
    fd = libbpf.obj_get(str(bpffs / "mbpf_events"))
    seen = []
    try:
        rb = libbpf.RingBuffer(fd, seen.append)
        try:
            rb.poll(0)
        finally:
            rb.close()
    finally:
        os.close(fd)
    return len(seen)


@pytest.fixture
def monitors():
    """Starts monitors like _monitor; one a failed test left running is
    stopped as a user would (Ctrl-C), so it turns events off and removes
    its lock file."""
    procs = []

    def start(*args):
        procs.append(_monitor(*args))
        return procs[-1]
    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def send_udp(lab, pod: str, host: str, port: int) -> None:
    """One datagram from an unconnected socket: the sendmsg hook translates it."""
    code = f"import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'q', ({host!r}, {port}))"
    lab.run(pod, [sys.executable, "-c", code], check=True)


def test_monitor_shows_translations_with_client_service_and_backend(lab, start_agent, bpffs, monitors):
    for p in ("x/a", "x/b"):
        lab.add_pod(p)
    start_whoami(lab, "x/b", 8080)
    objects = [lab_objects([lab.pods["x/a"], lab.pods["x/b"]], NODE)]
    objects += web_service(lab, pods=("x/b",))
    objects += [k8s.service("empty", ["10.96.0.11"], [k8s.port("http", 80, 8080)]),
                k8s.service("dns", ["10.96.0.12"], [k8s.port("dns", 53, 5353, "UDP")]),
                k8s.endpoint_slice("dns-1", "dns", [k8s.endpoint(str(lab.pods["x/b"].ipv4))],
                                   [k8s.slice_port("dns", 5353, "UDP")])]
    agent = start_agent(objects, "--node-name", NODE, "--node-netns", lab.node_ns)
    svc = "http://10.96.0.10/"
    assert curl(lab, "x/a", svc)

    _unread_records(bpffs)  # whatever the agent's start left (nothing expected)
    assert curl(lab, "x/a", svc) and not curl(lab, "x/a", "http://10.96.0.11/")
    assert _events_on(bpffs) == 0 and _unread_records(bpffs) == 0, "nobody listens: no event"

    mon = monitors(bpffs, agent, "-o", "json", "--type", "lb")
    assert curl(lab, "x/a", svc) and not curl(lab, "x/a", "http://10.96.0.11/")
    send_udp(lab, "x/a", "10.96.0.12", 53)
    seen = _wait_output(mon, lambda text: all(w in text for w in ('"refused"', '"connect"', '"sendmsg"')))
    out, _ = _stop(mon, seen)
    assert _events_on(bpffs) == 0, "events are off once the monitor is gone"
    events = [json.loads(line) for line in out.splitlines()]
    assert events and all(e["type"] == "lb" for e in events), "--type lb: no policy verdicts"
    ok = next(e for e in events if e["verdict"] == "translated")
    assert (ok["client_pod"], ok["service_name"], ok["backend_pod"], ok["hook"], ok["protocol"]) == (
        "x/a", "default/web:http", "x/b", "connect", "TCP"), ok
    assert ok["service"] == "10.96.0.10:80" and ok["backend"] == f"{lab.pods['x/b'].ipv4}:8080"
    udp = next(e for e in events if e["hook"] == "sendmsg")
    assert (udp["client_pod"], udp["service_name"], udp["backend_pod"], udp["protocol"]) == (
        "x/a", "default/dns:dns", "x/b", "UDP"), udp
    assert udp["backend"] == f"{lab.pods['x/b'].ipv4}:5353"
    refused = next(e for e in events if e["verdict"] == "refused")
    assert refused["service_name"] == "default/empty:http" and refused["backend"] is None
    assert refused["client_pod"] == "x/a"

    table = monitors(bpffs, agent, "--verdict", "translated", "--pod", "x/b")
    assert curl(lab, "x/a", svc) and not curl(lab, "x/a", "http://10.96.0.11/")
    out, _ = _stop(table, _wait_output(table, lambda text: "TRANSLATED" in text), signal.SIGTERM)
    rows = out.splitlines()[1:]
    assert rows and all("TRANSLATED" in r for r in rows), out
    assert "x/a" in rows[0] and "10.96.0.10:80 (default/web:http)" in rows[0]
    assert rows[0].rstrip().endswith(f"-> {lab.pods['x/b'].ipv4}:8080 (x/b)")
