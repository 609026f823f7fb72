"""The form Services and EndpointSlices are held in: packed compact JSON."""

from __future__ import annotations

import copy
import datetime
import json
import threading

from k8s_builders import endpoint_slice, ep, service
from meshbpf.sources.held_text import as_held_exactly, loaded, pack, unpack
from meshbpf.sources.held_text import as_held, as_text


def test_packed_text_reads_back_as_the_object():
    for obj in (service("web", "10.96.0.10"), endpoint_slice("web-x", "web", [ep("10.244.1.1")]),
                {"kind": "Unusual", "data": "ä €" * 500}):  # nothing like the dictionary, long, not ASCII
        held = as_held(obj)
        assert isinstance(held, bytes)
        assert unpack(held) == as_text(obj) and loaded(held) == obj


def test_equal_objects_pack_to_equal_bytes_and_others_differ():
    # Held forms are compared to tell a change from a resend.
    a = service("web", "10.96.0.10")
    b = copy.deepcopy(a)
    assert as_held(a) == as_held(b)
    b["spec"]["clusterIP"] = "10.96.0.11"
    assert as_held(a) != as_held(b)


def test_loaded_reads_every_held_form():
    obj = service("web", "10.96.0.10")
    text = as_text(obj)
    assert loaded(pack(text)) == loaded(text) == loaded(obj) == json.loads(text)


def test_threads_pack_at_once():
    objs = [service(f"s{i}", f"10.96.0.{i + 1}") for i in range(50)]
    out: dict[int, list[bytes]] = {}

    def run(k: int) -> None:
        out[k] = [as_held(o) for o in objs]
    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(out[k] == out[0] for k in out) and [loaded(h) for h in out[0]] == objs


def test_what_json_would_change_is_held_as_the_object_itself():
    # A YAML file may give dates and keys that are not strings: JSON would
    # turn them into strings, and the reader would no longer see them.
    for odd in ({"kind": "Service", "metadata": {"labels": {1: "a"}}},
                {"kind": "Service", "metadata": {"created": datetime.date(2024, 1, 1)}}):
        assert as_held_exactly(odd) is odd
    plain = service("web", "10.96.0.10")
    assert isinstance(as_held_exactly(plain), bytes) and loaded(as_held_exactly(plain)) == plain
