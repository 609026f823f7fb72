"""bench/report.py's README snippet names the files of the run it is made
from: a run with --out DIR (or --report-only FILE) is not sent to
bench/results/."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import report  # noqa: E402

CASE = {"rate": 1000.0, "rate_ratio": 0.95, "p50_us": 50, "p99_us": 90}
RESULTS = {
    "command": "bench/run --quick", "elapsed_s": 60,
    "machine": {"cpus": 2, "cpu": "test CPU", "kernel": "6.1", "date": "2026-01-01"},
    "config": {"cases": ["direct", "meshbpf"], "quick": True, "rounds": 8, "duration_s": 0.2,
               "backends": 4, "cpu": None},
    "sizes": {"10": {"summary": {"direct": CASE, "meshbpf": CASE}, "programming": {}, "add_one": {}}},
}


def test_the_default_folder_is_named_from_the_repository_root():
    text = report.markdown(RESULTS, report.REPO / "bench" / "results")
    assert "Raw numbers: bench/results/results.json;" in text
    assert "(bench/results/bench.png)" in text and "writes bench/results/)" in text


def test_a_run_with_out_names_its_own_results_file(tmp_path):
    text = report.markdown(RESULTS, tmp_path / "run1")
    assert f"Raw numbers: {tmp_path}/run1/results.json;" in text
    assert f"({tmp_path}/run1/bench.png)" in text and "bench/results" not in text


def test_report_only_names_the_file_it_read(tmp_path):
    text = report.markdown(RESULTS, tmp_path / "out", tmp_path / "old" / "lb.json")
    assert f"Raw numbers: {tmp_path}/old/lb.json;" in text


def test_the_redirect_snippet_links_the_plot_where_the_run_wrote_it(tmp_path, monkeypatch):
    """bench/redirreport.py: --out DIR and --name go into the snippet's plot link."""
    import json

    import redirreport

    monkeypatch.setattr(redirreport, "plot", lambda res, path: None)  # matplotlib: the bench extra
    res = json.loads((report.REPO / "bench" / "results" / "redirect.json").read_text())
    redirreport.write_all(res, tmp_path, "r2")
    text = (tmp_path / "README-r2-snippet.md").read_text()
    assert f"]({tmp_path / 'r2.png'})" in text
    assert "bench/results/redirect.png" not in text
