"""Sidecar-capture annotations with bad or oversized values: the pod is
left unmeshed with one line naming the annotation, never an exception, and
the other pods are still captured."""

from __future__ import annotations

import errno
import random

from meshbpf.capture.settings import MAX_RANGES, PORT_KEYS, RANGE_KEYS, annotation_problems
from test_capture_sync import STATUS, FakeDatapath, pod, state, world  # noqa: F401

EXCLUDE_OUT = "traffic.sidecar.istio.io/excludeOutboundIPRanges"


class SmallDatapath(FakeDatapath):
    """mbpf_cap_cidr with room for `room` entries: a write past it fails as
    a full hash map does."""

    room = 2 * MAX_RANGES

    def apply(self, steps):
        super().apply(steps)
        if len(self.state.cidrs) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")


def ranges(count: int) -> str:
    return ",".join(f"10.{i // 256}.{i % 256}.0/24" for i in range(count))


def test_one_pods_thousands_of_ranges_leave_it_alone_unmeshed(world):  # noqa: F811
    """Ranges were not limited: one pod's annotation could fill mbpf_cap_cidr,
    and every pod's capture failed with it on every retry (the include x
    exclude check of that many also takes minutes)."""
    sync, _, make_cgroup, errors = world
    sync.dp = dp = SmallDatapath()
    make_cgroup("a")
    cg_b = make_cgroup("b")
    huge = pod("a", {**STATUS, EXCLUDE_OUT: ranges(3 * MAX_RANGES)})
    assert sync.sync(state(huge, pod("b", {**STATUS, EXCLUDE_OUT: "10.9.0.0/16"}, ips=("10.0.1.2",))))
    assert set(dp.state.pods) == {cg_b}
    states = {p["name"]: p["state"] for p in sync.view()["pods"]}
    assert states["b"] == "captured"
    assert states["a"] == (f"not captured: metadata.annotations[{EXCLUDE_OUT}]: names "
                           f"{3 * MAX_RANGES} ranges, more than {MAX_RANGES}")
    assert not errors


def test_random_annotation_values_are_problems_never_exceptions():
    rng = random.Random(20261201)
    pieces = ["*", "", ",", " ", "-", "/", "80", "0", "65535", "65536", "1-65535", "99999999999",
              "9" * 5000, "10.0.0.0/8", "::/0", "::ffff:10.0.0.0/104", "10.0.0.1", "fe80::1%eth0/64",
              "a", "\n", "\u00e9", "1-", "-1", "2-1", "10.0.0.0/33", "0x50", " 80 ", "80,80"]
    for _ in range(3000):
        key = rng.choice((*RANGE_KEYS, *PORT_KEYS))
        value = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 6)))
        for problem in annotation_problems({key: value}):  # raises nothing else
            assert problem.key == key and "\n" not in str(problem), value
