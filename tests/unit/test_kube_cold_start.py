"""The Kubernetes source's cold start: the first list's dicts feed the first
build (once; later builds read the held text back), and the cyclic
collector stays paused while any thread lists."""

from __future__ import annotations

import gc
import json
import threading

from k8s_builders import endpoint_slice, ep
from meshbpf.gcpause import gc_paused
from meshbpf.sources.kube_watch import Reflector
from meshbpf.sources.kubernetes import ENDPOINT_SLICE_KEPT, _pruned, as_text


class _Page:
    """What the generated client returns with _preload_content=False."""

    def __init__(self, body: dict):
        self.data = json.dumps(body).encode()

    def release_conn(self) -> None:
        pass


def _slices(n: int, moved: int = -1) -> list[dict]:
    out = []
    for i in range(n):
        obj = endpoint_slice(f"s-{i}-x", f"s-{i}", [ep(f"10.1.0.{i + 1}"), ep(f"10.2.0.{i + 1}")])
        obj["endpoints"][0]["targetRef"] = {"kind": "Pod", "name": f"p-{i}"}  # dropped by the prune
        if i == moved:
            obj["endpoints"][1]["addresses"] = ["10.3.0.1"]
        del obj["kind"], obj["apiVersion"]  # list items come without them
        out.append(obj)
    return out


def reflector(items: list[dict]) -> Reflector:
    def list_func(**kwargs):
        return _Page({"kind": "EndpointSliceList", "metadata": {"resourceVersion": "7"}, "items": items})
    return Reflector("endpointslices", list_func, kind="EndpointSlice", api_version="discovery.k8s.io/v1",
                     transform=_pruned(ENDPOINT_SLICE_KEPT), hold=as_text)


class CountingRead:
    def __init__(self):
        self.calls = 0

    def __call__(self, text: str) -> dict:
        self.calls += 1
        return json.loads(text)


def test_the_first_build_reads_the_listed_dicts_and_later_ones_the_held_text():
    r = reflector(_slices(5))
    r._relist()
    read = CountingRead()
    held, objs = r.read_items(read)
    assert read.calls == 0 and len(objs) == 5
    assert all(isinstance(h, str) for h in held)
    assert objs == [json.loads(h) for h in held]  # the same objects as the text holds
    assert all("targetRef" not in e for o in objs for e in o["endpoints"])
    # Dropped once read: the next build decodes the held text.
    again, objs2 = r.read_items(read)
    assert read.calls == 5 and again == held and objs2 == objs


def test_an_object_changed_after_the_list_is_read_from_its_new_text():
    r = reflector(_slices(3))
    r._relist()
    moved = _slices(3, moved=1)[1]
    r._apply({"type": "MODIFIED", "object": moved})
    read = CountingRead()
    held, objs = r.read_items(read)
    assert read.calls == 1
    assert objs == [json.loads(h) for h in held]
    assert objs[1]["endpoints"][1]["addresses"] == ["10.3.0.1"]


def test_a_relist_keeps_no_dicts():
    r = reflector(_slices(3))
    r._relist()
    r._relist()  # dicts only from the first list: a relist's build is not the cold start
    read = CountingRead()
    held, objs = r.read_items(read)
    assert read.calls == 3 and objs == [json.loads(h) for h in held]


def test_the_collector_stays_paused_until_the_last_thread_ends_its_pause():
    assert gc.isenabled()
    inside, release = threading.Event(), threading.Event()

    def other():
        with gc_paused():
            inside.set()
            release.wait(10)

    t = threading.Thread(target=other)
    with gc_paused():
        t.start()
        assert inside.wait(10)
    assert not gc.isenabled()  # the other thread still lists
    release.set()
    t.join(10)
    assert gc.isenabled()


def test_a_pause_leaves_a_collector_that_was_off_off():
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
