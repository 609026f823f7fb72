"""bench/incremental.py's churn, run as README shows it (small and short):
every update lands, the latencies add up, and RSS is sampled as it goes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_churn_counts_every_update_and_samples_rss(tmp_path):
    done = subprocess.run(
        [sys.executable, "bench/incremental.py", "--only", "kubernetes", "--sizes", "300", "--events", "3",
         "--churn-seconds", "3", "--rss-every", "1", "--out", str(tmp_path / "out.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    run = json.loads((tmp_path / "out.json").read_text())["runs"][0]["kubernetes"]
    churn = run["churn"]
    assert churn["sent"] >= 200 and churn["programmed"] == churn["sent"] == churn["latency"]["n"]
    lat = churn["latency"]
    assert 0 < lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"] <= lat["max_ms"]
    cumulative = list(lat["histogram_ms"].values())
    assert cumulative == sorted(cumulative) and cumulative[-1] <= lat["n"]
    times = [t for t, _ in churn["rss_mb"]]
    assert len(times) >= 4 and times == sorted(times) and all(mb > 0 for _, mb in churn["rss_mb"])
    assert churn["rss_growth_mb"] == round(churn["rss_mb"][-1][1] - churn["rss_mb"][0][1], 1)


def test_the_bench_api_server_sends_idle_watches_bookmarks(monkeypatch):
    """As kube-apiserver does about once a minute: without them an hour's
    idle watches (ConfigMaps, Pods) hit the agent's read timeout."""
    import http.client
    import multiprocessing
    import threading

    sys.path.insert(0, str(ROOT / "bench"))
    import incremental

    monkeypatch.setattr(incremental, "BOOKMARK_EVERY", 0.3)
    ours, theirs = multiprocessing.Pipe()
    server = threading.Thread(target=incremental._serve, args=(theirs, 2), daemon=True)
    server.start()
    port, _ = ours.recv()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/api/v1/configmaps?watch=1&allowWatchBookmarks=true&resourceVersion=0&timeoutSeconds=5")
    line = conn.getresponse().readline()  # chunked: http.client undoes the framing
    assert json.loads(line)["type"] == "BOOKMARK"
    conn.close()
    ours.send(None)
    server.join(10)
    assert not server.is_alive()


def test_churn_tables_lists_the_agents_big_tables_as_readme_cites_them():
    done = subprocess.run(
        [sys.executable, "bench/experiments/churn_tables.py", "--services", "300", "--events", "1200",
         "--every", "600", "--big", "300"],
        cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("ready: RSS ")
    listed = {line.split()[-1] for line in lines[1:] if line.startswith("       ")}
    assert {"agent.lbsync.current.backends", "agent.lbsync.index.backend_id", "source._index.slices",
            "maps.state.backends"} <= listed
    assert [line.split(",")[0] for line in lines if line[0].isdigit()] == ["600 events", "1200 events"]


def test_churn_malloc_reports_rss_and_pymalloc_as_readme_cites_them():
    done = subprocess.run(
        [sys.executable, "bench/experiments/churn_malloc.py", "--services", "300", "--events", "600"],
        cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    for tag in ("cold start: RSS ", "after 600 events: RSS ", "malloc_trim: ", "after malloc_trim: RSS "):
        assert tag in out
    assert out.count("arenas allocated current") == 3 and out.count("unused pools") == 3
