"""healthCheckNodePort servers (meshbpf/northsouth_health.py), in userspace."""

from __future__ import annotations

import json
import logging
import socket
import urllib.error
import urllib.request

import pytest

from meshbpf.northsouth_health import HealthCheck, HealthCheckServers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port: int):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


@pytest.fixture
def servers():
    s = HealthCheckServers(host="127.0.0.1")
    yield s
    s.stop()


def test_200_with_local_endpoints_503_without_and_kube_proxys_body(servers):
    port = free_port()
    servers.update({port: HealthCheck("default", "web", 2)})
    status, headers, body = get(port)
    assert status == 200
    assert json.loads(body) == {"service": {"namespace": "default", "name": "web"},
                                "localEndpoints": 2, "serviceProxyHealthy": True}
    assert body.startswith(b'{\n\t"service": {\n\t\t"namespace": "default",')
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Load-Balancing-Endpoint-Weight"] == "2"
    servers.update({port: HealthCheck("default", "web", 0)})
    status, _, body = get(port)
    assert status == 503 and json.loads(body)["localEndpoints"] == 0


def test_a_port_in_use_is_logged_and_the_others_are_served(servers, caplog):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    good = free_port()
    try:
        with caplog.at_level(logging.ERROR, "meshbpf.agent"):
            servers.update({busy.getsockname()[1]: HealthCheck("default", "taken", 1),
                            good: HealthCheck("default", "web", 1)})
            servers.update({busy.getsockname()[1]: HealthCheck("default", "taken", 1),
                            good: HealthCheck("default", "web", 1)})
        assert get(good)[0] == 200
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1 and "default/taken" in errors[0] and "\n" not in errors[0]
    finally:
        busy.close()
    assert servers.ports() == [good]


def test_a_port_no_longer_wanted_is_closed(servers):
    port = free_port()
    servers.update({port: HealthCheck("default", "web", 1)})
    assert get(port)[0] == 200
    servers.update({})
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10)
