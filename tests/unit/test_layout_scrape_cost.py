"""A /metrics scrape must not walk every key of the large maps each time."""

from __future__ import annotations

import os

from meshbpf import metrics
from meshbpf.datapath import libbpf
from meshbpf.datapath.layout import COUNTABLE


def _fake_maps(monkeypatch) -> list[int]:
    """Every map "exists" with 1000 entries; returns the list of walks made."""
    walks: list[int] = []

    def walk(fd, key_size):
        walks.append(fd)
        return 1000

    monkeypatch.setattr(libbpf, "obj_get", lambda path: os.open(os.devnull, os.O_RDONLY))
    monkeypatch.setattr(libbpf, "map_info", lambda fd: libbpf.MapInfo(1, 9, 8, 8, 4096, "m"))
    def held_slots(fd, value_type):  # the connection slots: an array, every slot held
        walks.append(fd)
        return [value_type(cookie=1)] * 1000

    monkeypatch.setattr(libbpf, "map_count", walk)
    monkeypatch.setattr(libbpf, "array_values", held_slots)
    return walks


def _scrape(collector) -> dict[str, float]:
    return {(fam.name, s.labels.get("map_name")): s.value
            for fam in collector.collect() for s in fam.samples}


KNOWN = {"mbpf_svc": 3, "mbpf_slots": 5, "mbpf_backends": 4}  # the agent's own record
WALKED = len((COUNTABLE | metrics.POLICY_COUNTABLE) - set(KNOWN))  # the policy maps too


def test_a_scrape_storm_walks_each_map_once(monkeypatch, tmp_path):
    walks = _fake_maps(monkeypatch)
    collector = metrics.MapPressureCollector(tmp_path, lambda: KNOWN)
    first = _scrape(collector)
    for _ in range(5):
        assert _scrape(collector) == first
    assert len(walks) == WALKED


def test_walked_counts_are_reused_until_they_age(monkeypatch, tmp_path):
    walks = _fake_maps(monkeypatch)
    now = [100.0]
    known, walked = KNOWN, WALKED
    collector = metrics.MapPressureCollector(tmp_path, lambda: known,
                                             metrics.CachedCounts(max_age=10, clock=lambda: now[0]))

    first = _scrape(collector)
    assert len(walks) == walked
    assert first[("meshbpf_map_entries", "mbpf_affinity")] == 1000
    assert first[("meshbpf_map_entries", "mbpf_svc")] == 3

    for _ in range(5):  # a scrape storm: no more walks
        assert _scrape(collector) == first
    assert len(walks) == walked

    now[0] += 10.5  # stale: walked again, once
    _scrape(collector)
    assert len(walks) == 2 * walked
