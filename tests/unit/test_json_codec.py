"""The sources' JSON codec: orjson where it can, the standard library's
answer where orjson refuses, and the same behaviour without orjson."""

from __future__ import annotations

import json
import math

import pytest

from k8s_builders import endpoint_slice, ep, service
from meshbpf.sources import json_codec
from meshbpf.sources.held_text import as_held, as_held_exactly, loaded

OBJECTS = [service("web", "10.96.0.10"), endpoint_slice("web-x", "web", [ep("10.244.1.1")]),
           {"kind": "Unusual", "data": "ä € \u2028 \"q\" \\ \n", "n": [0, -1, 2**63 - 1, 1.5, None, True]}]


@pytest.fixture(params=["orjson", "stdlib"])
def codec(request, monkeypatch):
    """The module as it runs with orjson installed, and as it runs without."""
    if request.param == "orjson":
        if json_codec.orjson is None:
            pytest.skip("orjson is not installed")
    else:
        monkeypatch.setattr(json_codec, "orjson", None)
    return json_codec


def test_orjson_is_what_pip_install_brings():
    # A dependency in pyproject.toml: CI installs it, so the fast path is the tested one.
    assert json_codec.orjson is not None


def test_encoded_objects_decode_back_equal(codec):
    for obj in OBJECTS:
        text = codec.dumps_compact(obj)
        assert isinstance(text, bytes)
        assert json.loads(text) == obj and codec.loads(text) == obj and codec.loads(text.decode()) == obj
        assert b" " not in codec.dumps_compact({"a": [1, 2], "b": {"c": "d"}})   # compact


def test_both_paths_decode_the_same_values(codec):
    for obj in OBJECTS:
        assert codec.loads(json.dumps(obj)) == obj == codec.loads(json.dumps(obj, ensure_ascii=False).encode())


def test_values_orjson_refuses_to_decode_get_the_standard_librarys_answer(codec):
    assert math.isnan(codec.loads(b'{"x": NaN}')["x"])
    assert codec.loads('[Infinity, -Infinity]') == [math.inf, -math.inf]
    assert codec.loads('"\\ud800"') == "\ud800"             # a lone surrogate escape
    with pytest.raises(UnicodeDecodeError):                  # bad UTF-8: the standard library's error
        codec.loads(b'{"a": "\xff"}')
    with pytest.raises(ValueError):
        codec.loads(b'{"a": ')
    with pytest.raises(ValueError):
        codec.loads(b'')


def test_values_orjson_refuses_to_encode_get_the_standard_librarys_text(codec):
    assert codec.dumps_compact({"big": 2**70}) == b'{"big":1180591620717411303424}'
    assert codec.dumps_compact({1: "a"}) == b'{"1":"a"}'
    assert json.loads(codec.dumps_compact({"s": "\ud800"})) == {"s": "\ud800"}


def test_equal_objects_give_equal_held_bytes_on_either_path(codec):
    for obj in OBJECTS:
        assert as_held(obj) == as_held(json.loads(json.dumps(obj)))
        assert loaded(as_held(obj)) == obj


def test_what_json_would_change_is_still_held_as_the_object(codec):
    for odd in ({"kind": "Service", "metadata": {"labels": {1: "a"}}}, {"kind": "Service", "spec": {"x": float("nan")}}):
        assert as_held_exactly(odd) is odd
    # orjson reads an integer beyond 64 bits back as a float: the file
    # source's reader must still see the integer the file wrote.
    big = {"kind": "Service", "spec": {"n": 2**70 + 1}}
    back = loaded(as_held_exactly(big))
    assert back == big and type(back["spec"]["n"]) is int
    assert isinstance(as_held_exactly(OBJECTS[0]), bytes)
