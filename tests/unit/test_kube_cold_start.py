"""The Kubernetes source's cold start: a list holds each object as its
packed compact text only, the build reads them back one at a time and keeps none,
and the cyclic collector stays paused while any thread lists."""

from __future__ import annotations

import gc
import json
import sys
import threading

from k8s_builders import endpoint_slice, ep, service
from meshbpf.gcpause import gc_paused
from meshbpf.sources.kube_objects import SourceObject, build_state
from meshbpf.sources.kube_watch import Reflector
from meshbpf.sources.held_text import loaded
from meshbpf.sources.kubernetes import ENDPOINT_SLICE_KEPT, _pruned, as_held


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
                     transform=_pruned(ENDPOINT_SLICE_KEPT), hold=as_held)


def test_a_list_holds_each_object_as_packed_compact_text_only():
    r = reflector(_slices(5))
    r._relist()
    held = r.held_items()
    assert [k for k, _ in held] == [("default", f"s-{i}-x") for i in range(5)]
    assert all(isinstance(h, bytes) for _, h in held)
    objs = [loaded(h) for _, h in held]
    assert all("targetRef" not in e for o in objs for e in o["endpoints"])  # pruned before held
    assert objs[0]["kind"] == "EndpointSlice"  # list items get their kind back


def test_an_object_changed_after_the_list_is_held_as_its_new_text():
    r = reflector(_slices(3))
    r._relist()
    moved = _slices(3, moved=1)[1]
    r._apply({"type": "MODIFIED", "object": moved})
    objs = [loaded(h) for _, h in r.held_items()]
    assert objs[1]["endpoints"][1]["addresses"] == ["10.3.0.1"]


def test_the_build_keeps_no_object_it_has_read():
    # The cold start reads every object back from its text: each must be
    # freed once read, not all of them held until the state is built.
    objs = [dict(o, kind="EndpointSlice", apiVersion="discovery.k8s.io/v1") for o in _slices(4)]
    objs.append(service("s-0", "10.96.0.1"))
    def refs(upto: int) -> list[int]:
        return [sys.getrefcount(objs[j]) for j in range(upto)]
    held_before = refs(len(objs))

    def one_at_a_time():
        for i, obj in enumerate(objs):
            # Every object but the last one or two (the readers' loop
            # variables) is referenced only as before the build.
            assert refs(max(i - 2, 0)) == held_before[:max(i - 2, 0)]
            yield SourceObject(obj, "API server")
    result = build_state(one_at_a_time())
    assert result.problems == [] and len(result.state.service_ports) == 1


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


def test_freezing_the_heap_after_a_full_sync_hands_free_c_memory_back(monkeypatch):
    import meshbpf.gcpause as gcpause
    calls = []
    monkeypatch.setattr(gcpause, "_malloc_trim", lambda pad: calls.append(pad))
    try:
        gcpause.freeze_heap(collect=False)
    finally:
        gc.unfreeze()
    assert calls == [0]  # malloc_trim(0): every free page
    monkeypatch.setattr(gcpause, "_malloc_trim", None)  # not glibc: nothing to call
    assert gcpause.trim_malloc() is False
