"""OverlayMap: each version reads, iterates and compares exactly as a dict
edited the same way would, and no version changes once made."""

from __future__ import annotations

import random

import pytest

from meshbpf import overlay
from meshbpf.overlay import OverlayMap


@pytest.mark.parametrize("seed", range(25))
@pytest.mark.parametrize("fold", [(1, 1), (4, 8), (10**9, 1)])  # folds: always, now and then, never
def test_versions_behave_as_dicts_edited_the_same_way(seed, fold, monkeypatch):
    monkeypatch.setattr(overlay, "MIN_FOLD", fold[0])
    monkeypatch.setattr(overlay, "FOLD_SHARE", fold[1])
    rng = random.Random(seed)
    model = {k: rng.random() for k in range(rng.randint(0, 30))}
    current = OverlayMap.of(dict(model))
    versions = [(current, dict(model))]
    for _ in range(40):
        editor = current.editor()
        for _ in range(rng.randint(0, 6)):
            key = rng.randint(0, 40)
            if key in model and rng.random() < 0.4:
                del model[key]
                del editor[key]
            else:
                if rng.random() < 0.5:
                    model.pop(key, None)  # delete and set again: to the end
                    if editor.get(key, None) is not None:
                        del editor[key]
                model[key] = editor_value = rng.random()
                editor[key] = editor_value
        current = editor.done()
        versions.append((current, dict(model)))
        for version, expected in versions:  # the old versions are untouched
            assert list(version) == list(expected)
            assert list(version.items()) == list(expected.items())
            assert list(version.values()) == list(expected.values())
            assert len(version) == len(expected)
            for key in range(42):
                assert (key in version) == (key in expected)
                assert version.get(key, "none") == expected.get(key, "none")
            assert version == expected and expected == version
            assert version == OverlayMap(expected)
    first, _ = versions[0]
    same_base = [v for v, m in versions if v._base is first._base]
    for (a, ma) in versions:
        for b in same_base:
            assert (a == b) == (ma == dict(b.items()))


def test_a_missing_key_raises_and_a_deleted_one_is_gone():
    m = OverlayMap({1: "a", 2: "b"})
    editor = m.editor()
    del editor[1]
    with pytest.raises(KeyError):
        del editor[1]
    later = editor.done()
    with pytest.raises(KeyError):
        later[1]
    assert m[1] == "a" and later.get(1) is None and dict(later) == {2: "b"}


def test_a_version_shares_the_base_and_copies_only_the_overlay(monkeypatch):
    monkeypatch.setattr(overlay, "MIN_FOLD", 8)
    monkeypatch.setattr(overlay, "FOLD_SHARE", 10**9)
    m = OverlayMap.of({i: i for i in range(1000)})
    editor = m.editor()
    editor[5] = "five"
    one = editor.done()
    assert one._base is m._base and one._upd == {5: "five"} and not one._over
    for i in range(20):  # past MIN_FOLD: folded into a new base
        editor = one.editor()
        editor[i] = str(i)
        one = editor.done()
    assert one._base is not m._base and len(one._upd) + len(one._over) <= 8  # folded
    assert one[5] == "5" and m[5] == 5 and list(one) == list(range(1000))  # set in place: kept in place
