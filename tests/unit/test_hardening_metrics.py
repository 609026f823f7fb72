"""A metrics collector that raises (a map read that fails, pins of an old
layout) leaves out its own metrics only: /metrics still answers 200 with
the rest, meshbpf_scrape_errors_total{collector} counts the failures, and
the failure is logged once, not on every scrape."""

import logging
import urllib.request

from prometheus_client import generate_latest

from meshbpf import metrics as metrics_mod
from meshbpf.datapath.libbpf import LayoutError
from meshbpf.health import HealthServer
from meshbpf.metrics import AgentMetrics, LBStatsCollector


def _old_pins(bpffs):
    raise LayoutError("map mbpf_lb_stats (pinned at /sys/fs/bpf/x/mbpf_lb_stats) has value size 4, "
                      "this build expects 8")


def _value(m: AgentMetrics, name: str) -> float:
    return m.scrape_errors.labels(name)._value.get()


def test_a_failing_collector_leaves_out_only_its_metrics(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(metrics_mod, "read_lb_stats", _old_pins)
    m = AgentMetrics()
    m.services.set(3)
    m.collectors.register(LBStatsCollector(tmp_path))
    with caplog.at_level(logging.WARNING, logger="meshbpf"):
        for _ in range(3):
            text = generate_latest(m.registry).decode()
    assert "meshbpf_services 3.0" in text
    # The counter is served before the collectors run: a scrape shows the failures before it.
    assert 'meshbpf_scrape_errors_total{collector="lb_stats"} 2.0' in text
    assert _value(m, "lb_stats") == 3
    warnings = [r.getMessage() for r in caplog.records if "lb_stats" in r.getMessage()]
    assert len(warnings) == 1 and "mbpf_lb_stats" in warnings[0] and "\n" not in warnings[0]


def test_metrics_answers_200_over_http_with_a_failing_collector(tmp_path, monkeypatch):
    monkeypatch.setattr(metrics_mod, "read_lb_stats", _old_pins)
    m = AgentMetrics()
    m.collectors.register(LBStatsCollector(tmp_path))
    server = HealthServer("127.0.0.1:0", m.registry, lambda: True, lambda: True)
    server.start()
    try:
        for _ in range(2):
            with urllib.request.urlopen(f"http://{server.address}/metrics", timeout=10) as resp:
                assert resp.status == 200
                text = resp.read()
        assert b'meshbpf_scrape_errors_total{collector="lb_stats"} 1.0' in text
    finally:
        server.stop()


def test_a_recovered_collector_is_served_again(tmp_path, monkeypatch, caplog):
    m = AgentMetrics()
    m.collectors.register(LBStatsCollector(tmp_path))
    monkeypatch.setattr(metrics_mod, "read_lb_stats", _old_pins)
    generate_latest(m.registry)
    monkeypatch.setattr(metrics_mod, "read_lb_stats", lambda bpffs: {("translated", "ipv4", "tcp"): 5})
    with caplog.at_level(logging.INFO, logger="meshbpf"):
        text = generate_latest(m.registry).decode()
    assert "meshbpf_lb_connections_total" in text and _value(m, "lb_stats") == 1
    assert any("recovered" in r.getMessage() for r in caplog.records)
