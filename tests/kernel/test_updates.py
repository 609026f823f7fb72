"""Endpoint changes, live config edits and make-before-break, with traffic."""

from __future__ import annotations

import json
import time

from . import k8s
from .conftest import Load, web_service
from .shared import bpffs, config, lab, probe, start_agent  # noqa: F401 (one lab and agent for the module)
from .helpers import metric, services, wait_backends, wait_log

FRONTEND = "10.96.0.10:80/TCP"


def _addrs(lab, pods):
    return [f"{lab.pods[p].ipv4}:8080" for p in pods]


def test_removed_endpoint_gets_no_new_connections_and_old_ones_live(lab, probe, bpffs, config, start_agent):
    start_agent(web_service(lab, pods=("web-4",)))
    held = probe.popen("client", "hold", "10.96.0.10", 80, "stdin")
    assert json.loads(held.stdout.readline())["first"] == "web-4"

    k8s.write(config, web_service(lab, pods=("web-1", "web-2", "web-3")))
    waited = wait_backends(bpffs, FRONTEND, _addrs(lab, ("web-1", "web-2", "web-3")))
    print(f"config change applied in {waited:.3f}s")

    result = probe("client", "whoami", "10.96.0.10", 80, 150)
    assert result["errors"] == {}
    assert "web-4" not in result["answers"]
    assert set(result["answers"]) == {"web-1", "web-2", "web-3"}
    # The connection made before the change is not dropped.
    out, _ = held.communicate("\n", timeout=10)
    assert json.loads(out.strip().splitlines()[-1])["second"] == "web-4"


def test_terminating_endpoints_serve_only_when_none_is_ready(lab, probe, bpffs, config, start_agent):
    ip = {p: str(lab.pods[p].ipv4) for p in ("web-1", "web-2", "web-3", "web-4")}
    slice_port = [k8s.slice_port("http", 8080)]
    svc = k8s.service("web", ["10.96.0.10"], [k8s.port("http", 80, 8080)])
    start_agent([svc, k8s.endpoint_slice("web-1", "web", [
        k8s.endpoint(ip["web-1"], ready=False, serving=True, terminating=True),
        k8s.endpoint(ip["web-2"], ready=False, serving=True, terminating=True),
        k8s.endpoint(ip["web-3"], ready=False, serving=False, terminating=True),
        k8s.endpoint(ip["web-4"], ready=False),  # not ready, not terminating
    ], slice_port)])
    result = probe("client", "whoami", "10.96.0.10", 80, 60)
    assert result["errors"] == {} and set(result["answers"]) == {"web-1", "web-2"}
    assert all(b["state"] == "terminating" for b in
               _service_json(bpffs)[FRONTEND]["backends"])

    # Once one endpoint is ready again, terminating ones get no new connections.
    k8s.write(config, [svc, k8s.endpoint_slice("web-1", "web", [
        k8s.endpoint(ip["web-1"], ready=False, serving=True, terminating=True),
        k8s.endpoint(ip["web-3"], ready=True),
    ], slice_port)])
    wait_backends(bpffs, FRONTEND, [f"{ip['web-3']}:8080"])
    result = probe("client", "whoami", "10.96.0.10", 80, 30)
    assert result["errors"] == {} and result["answers"] == {"web-3": 30}, result


def _replace_last(text: str, old: str, new: str) -> str:
    head, _, tail = text.rpartition(old)
    return head + new + tail


def _service_json(bpffs):
    from meshbpf.cli.inspect_cmd import services_view
    from meshbpf.datapath.maps import read_pinned
    return {s["frontend"]: s for s in services_view(read_pinned(bpffs)[0])}


def test_endpoints_from_several_slices_merge(lab, probe, start_agent):
    objects = web_service(lab, pods=("web-1", "web-2"))
    objects.append(k8s.endpoint_slice("web-2", "web", [k8s.endpoint(str(lab.pods["web-3"].ipv4))],
                                      [k8s.slice_port("http", 8080)]))
    start_agent(objects)
    result = probe("client", "whoami", "10.96.0.10", 80, 90)
    assert result["errors"] == {}, result
    assert set(result["answers"]) == {"web-1", "web-2", "web-3"}


def test_no_connection_fails_while_backends_change(lab, probe, bpffs, config, start_agent):
    """Make-before-break under load: every connection succeeds through
    growing, shrinking and replacing the backend set."""
    start_agent(web_service(lab))
    load = Load(probe, "client", "10.96.0.10", 80)
    sequence = [("web-1",), ("web-2", "web-3"), ("web-4",), ("web-1", "web-2", "web-3", "web-4"),
                ("web-3",), ("web-1", "web-4"), ("web-2",), ("web-1", "web-2", "web-3")]
    first_edit = time.monotonic()
    for pods in sequence * 2:
        k8s.write(config, web_service(lab, pods=pods))
        wait_backends(bpffs, FRONTEND, _addrs(lab, pods), timeout=30)
        time.sleep(0.15)  # let some connections use this backend set
    last_applied = time.monotonic()
    result = load.stop()
    assert result["errors"] == {}, result
    load.assert_spans(first_edit, last_applied)  # the edits happened under load
    assert set(result["answers"]) == {"web-1", "web-2", "web-3", "web-4"}


def test_config_edit_applies_live(lab, probe, bpffs, config, start_agent):
    start_agent(web_service(lab))
    assert probe("client", "connect-error", "10.96.0.11", 80)["errno"] != "0"  # not a service yet
    objects = web_service(lab) + web_service(lab, pods=("web-2",), name="api", ip="10.96.0.11")
    k8s.write(config, objects)
    waited = wait_backends(bpffs, "10.96.0.11:80/TCP", _addrs(lab, ("web-2",)))
    print(f"new service applied in {waited:.3f}s")
    result = probe("client", "whoami", "10.96.0.11", 80, 10)
    assert result["errors"] == {} and result["answers"] == {"web-2": 10}, result

    # Removing a service removes its frontend, slots and backends no one else uses.
    k8s.write(config, web_service(lab, pods=("web-1",)))
    wait_backends(bpffs, FRONTEND, _addrs(lab, ("web-1",)))
    assert "10.96.0.11:80/TCP" not in services(bpffs)


def test_invalid_edit_keeps_the_running_state_and_says_why(lab, probe, bpffs, config, start_agent):
    agent = start_agent(web_service(lab))
    before = services(bpffs)
    errors_before = metric(agent.get("/metrics")[1], "meshbpf_sync_errors_total", 'reason="config"')
    bad_edits = [
        ("apiVersion: v1\nkind: Service\nmetadata: {name: x\n", "not valid YAML"),
        (config.read_text().replace("clusterIP:", "clusterIp:", 1), "unknown field 'clusterIp'"),
        (config.read_text().replace("10.96.0.10", "10.96.0.300"), "'10.96.0.300' is not an IP address"),
        (config.read_text().replace("port: 80", "port: 80000"), "80000 is not a port number"),
        (_replace_last(config.read_text(), "name: http", "name: htp"), "'htp' matches no port of Service default/web"),
    ]
    for n, (text, reason) in enumerate(bad_edits, start=1):
        # Each edit breaks the original valid file in one place.
        config.write_text(text)
        log = wait_log(agent, reason)
        assert str(config) in log
        time.sleep(0.3)  # give a wrong apply time to happen
        assert services(bpffs) == before
        assert probe("client", "whoami", "10.96.0.10", 80, 8)["errors"] == {}
        code, body = agent.get("/metrics")
        assert metric(body, "meshbpf_sync_errors_total", 'reason="config"') == errors_before + n
        k8s.write(config, web_service(lab))  # back to valid for the next edit
        time.sleep(0.3)
    # The error names the document and field, not only the file.
    config.write_text(config.read_text().replace("port: 80\n", "port: eighty\n"))
    log = wait_log(agent, "expected an integer")
    line = [ln for ln in log.splitlines() if "eighty" in ln][-1]
    assert "document 1" in line and "spec.ports[0].port" in line and "Service default/web" in line
