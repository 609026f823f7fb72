"""The agent's HTTP server: /healthz, /readyz and /metrics under abuse, on
IPv6, with the process and build metrics."""

from __future__ import annotations

import json
import socket
import threading
import urllib.request

import pytest
from prometheus_client import CollectorRegistry

from meshbpf import __version__
from meshbpf.health import WORKERS, HealthServer
from meshbpf.lab.workloads import free_port, wait_for

from .conftest import web_service
from .helpers import metric

pytestmark = pytest.mark.userspace


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture
def server():
    http = HealthServer("127.0.0.1:0", CollectorRegistry(), alive=lambda: True, ready=lambda: True,
                        details=lambda: {"services": 2})
    http.start()
    yield http
    http.stop()


def test_idle_half_requests_hold_no_thread_and_health_still_answers(server):
    host, port = server.address.rsplit(":", 1)
    threads_before = threading.active_count()
    idle = []
    try:
        for _ in range(300):  # each sends half a request, then nothing
            conn = socket.create_connection((host, int(port)), timeout=5)
            conn.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            idle.append(conn)
        assert get(f"http://{server.address}/readyz") == (200, "ok\n")
        assert threading.active_count() <= threads_before + WORKERS
        code, body = get(f"http://{server.address}/healthz")
        assert code == 200
        assert json.loads(body) == {"status": "ok", "services": 2}
    finally:
        for conn in idle:
            conn.close()


def test_metrics_carry_process_and_build_info(server):
    code, body = get(f"http://{server.address}/metrics")
    assert code == 200
    assert metric(body, "process_resident_memory_bytes") > 0
    assert metric(body, "process_open_fds") > 0
    assert metric(body, "meshbpf_build_info", f'version="{__version__}"') == 1
    assert get(f"http://{server.address}/nothing")[0] == 404


def test_agent_on_ipv6_loopback(lab, bpffs, start_agent):
    port = free_port()
    agent = start_agent(web_service(lab), "--listen", f"[::1]:{port}", wait_ready=False)
    url = f"http://[::1]:{port}"

    def ready() -> bool:
        assert agent.proc.poll() is None, agent.log()
        try:
            return get(url + "/readyz")[0] == 200
        except OSError:
            return False
    wait_for(ready, 60, "the agent on [::1]")
    assert get(url + "/healthz")[0] == 200
    code, body = get(url + "/metrics")
    assert code == 200 and metric(body, "meshbpf_services") == 1
    assert metric(body, "process_cpu_seconds_total") > 0
    assert metric(body, "meshbpf_build_info", f'version="{__version__}"') == 1
    first = agent.log().splitlines()[0]
    assert f"meshbpf {__version__} from " in first  # -v: the debug line comes first
    assert f"meshbpf {__version__} starting: " in agent.log()
    assert f"on http://[::1]:{port}" in agent.log()


def test_a_half_request_is_closed_after_the_request_timeout(monkeypatch):
    from meshbpf import health
    monkeypatch.setattr(health, "REQUEST_TIMEOUT", 0.2)
    http = HealthServer("127.0.0.1:0", CollectorRegistry(), alive=lambda: True, ready=lambda: True)
    http.start()
    try:
        host, port = http.address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as conn:
            conn.sendall(b"GET /healthz HTTP/1.1\r\n")
            assert conn.recv(100) == b""  # closed by the server, with no answer
    finally:
        http.stop()


def test_probes_answer_while_every_worker_is_busy_scraping():
    release, entered = threading.Event(), threading.Semaphore(0)

    class Stuck:
        def describe(self):
            return []

        def collect(self):
            entered.release()
            release.wait(30)
            return []

    registry = CollectorRegistry()
    registry.register(Stuck())
    http = HealthServer("127.0.0.1:0", registry, alive=lambda: True, ready=lambda: True)
    http.start()
    scrapes = [threading.Thread(target=get, args=(f"http://{http.address}/metrics",))
               for _ in range(WORKERS + 1)]
    try:
        for scrape in scrapes:
            scrape.start()
        for _ in range(WORKERS):  # every worker is inside a scrape now
            assert entered.acquire(timeout=10)
        assert get(f"http://{http.address}/healthz") == (200, "ok\n")
        assert get(f"http://{http.address}/readyz") == (200, "ok\n")
    finally:
        release.set()
        for scrape in scrapes:
            scrape.join(10)
        http.stop()
