"""The policy tc programs on real lab pods (x/a, x/b, y/a) with real traffic,
maps filled by hand through PolicyMaps.apply: isolation, replies,
anti-spoofing, established flows across a policy change, make-before-break
generation flips, detach, and filters that outlive the process that
attached them.

One lab and one compile for the module (the VMs pay ~10 s per compile);
each test starts from empty maps and the filters attached."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshbpf.datapath import libbpf
from meshbpf.datapath.endpoints import find_endpoint
from meshbpf.datapath.policy import PolicyDatapath, PolicyMaps, addr_bytes, attached_filters
from meshbpf.datapath.policy_events import PolicyEvents
from meshbpf.lab.netlab import Lab
from meshbpf.lab.workloads import start_whoami, wait_for
from meshbpf.reconcile.policy_keys import (DIR_IN, EP_ISOLATE_IN, EP_ISOLATE_OUT, EpVal, PeerKey,
                                           PeerVal, PolicyStep, PortKey, PortVal)

from .conftest import BPFFS_ROOT, LAB_PREFIX, PIN_PREFIX, Probe, _names

# Real traffic through the policy programs: the oldest VM kernel and the
# host (tests/vm/matrix: CI's time budget).

POLICY_PROBE = Path(__file__).with_name("policy_probe.py")
REPO = Path(__file__).resolve().parents[2]
PODS = ("x/a", "x/b", "y/a")
EP_IDS = {"x/a": 1, "x/b": 2, "y/a": 3}


class PolicyLab:
    def __init__(self, lab: Lab, dp: PolicyDatapath):
        self.lab, self.dp = lab, dp
        self.ifindex: dict[str, int] = {}
        self.probe = Probe(lab)

    def ip(self, pod: str) -> str:
        return str(self.lab.pods[pod].ipv4)

    def run(self, pod: str, *args, timeout: float = 60) -> dict:
        r = self.lab.run(pod, [sys.executable, str(POLICY_PROBE), *map(str, args)], timeout=timeout)
        assert r.returncode == 0, f"policy_probe {args} in {pod}: {r.stderr}"
        return json.loads(r.stdout.strip().splitlines()[-1])

    def popen(self, pod: str, *args) -> subprocess.Popen:
        return self.lab.popen(pod, [sys.executable, "-u", str(POLICY_PROBE), *map(str, args)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def connects(self, client: str, server: str, port: int, count: int = 3) -> int:
        return self.run(client, "connects", self.ip(server), port, count)["ok"]

    def maps(self) -> PolicyMaps:
        return PolicyMaps(self.dp.bpffs)

    def endpoints(self, flags: dict[str, int], gen: int = 0) -> list[PolicyStep]:
        """Every pod managed; flags: pod -> isolation (others open)."""
        return [
            PolicyStep("addresses", "update", {
                addr_bytes(a): EP_IDS[p] for p in PODS
                for a in (self.lab.pods[p].ipv4, self.lab.pods[p].ipv6)}),
            PolicyStep("endpoints", "update", {
                self.ifindex[p]: EpVal(EP_IDS[p], gen, flags.get(p, 0)) for p in PODS}),
        ]

    def allow_in(self, pod: str, peer: str, port: int, gen: int = 0, peer_set: int = 1) -> list:
        ep = EP_IDS[pod]
        return [
            PolicyStep("peers", "update", {
                PeerKey(ep, gen, DIR_IN, addr_bytes(self.lab.pods[peer].ipv4), 128):
                PeerVal(peer_set, 0, 0)}),
            PolicyStep("ports", "update", {
                PortKey(ep, gen, DIR_IN, 6, peer_set, port, 16): PortVal(21)}),
        ]


def _clear(maps: PolicyMaps) -> None:
    old = maps.read()
    maps.apply([PolicyStep(role, "delete", {k: None for k in getattr(old, role)})
                for role in ("ports", "peers", "endpoints", "addresses")])
    for key in maps.conntrack():
        libbpf.map_delete(maps.fds["mbpf_ct"], key)


@pytest.fixture(scope="module")
def plab():
    bpffs = BPFFS_ROOT / f"{PIN_PREFIX}{next(_names)}"
    with Lab(f"{LAB_PREFIX}{next(_names)}") as lab:
        lab.up(list(PODS))
        for pod in PODS:
            start_whoami(lab, pod, 8080)
            start_whoami(lab, pod, 8081)
        dp = PolicyDatapath(bpffs, netns=lab.node_ns)
        try:
            dp.compile()
            pl = PolicyLab(lab, dp)
            for pod in PODS:
                p = lab.pods[pod]
                pl.ifindex[pod] = find_endpoint(p.uid, [p.ipv4, p.ipv6], lab.cgroup)
            yield pl
        finally:
            from meshbpf.datapath.loader import uninstall
            dp.bpf = None
            if bpffs.exists():
                uninstall(bpffs)


@pytest.fixture
def pl(plab):
    """Empty maps, our filters on every pod."""
    with plab.maps() as maps:
        _clear(maps)
    for pod in PODS:
        plab.dp.attach(plab.ifindex[pod])
    return plab


def test_find_endpoint_finds_the_host_veth_for_both_kubelet_drivers(plab):
    from pyroute2 import IPRoute
    lab = plab.lab
    with IPRoute(netns=lab.node_ns) as ipr:
        for pod in PODS:
            host_if = f"mv{lab.pods[pod].index}"
            assert plab.ifindex[pod] == ipr.link_lookup(ifname=host_if)[0], pod
    # the systemd driver's layout: kubepods.slice/kubepods-besteffort.slice/...-pod<uid_>.slice
    uid = "0e3c8f55-aaaa-4bbb-8ccc-123456789abc"
    cg = (lab.cgroup / "kubepods.slice" / "kubepods-besteffort.slice"
          / f"kubepods-besteffort-pod{uid.replace('-', '_')}.slice")
    cg.mkdir(parents=True)
    yb = lab.pods["y/a"]
    proc = lab.popen("y/a", ["sleep", "30"], in_cgroup=False)
    try:
        (cg / "cgroup.procs").write_text(str(proc.pid))
        assert find_endpoint(uid, [yb.ipv6], lab.cgroup) == plab.ifindex["y/a"]
        assert find_endpoint(uid, ["10.1.2.3"], lab.cgroup) is None  # not its address
        assert find_endpoint("no-such-uid", [yb.ipv4], lab.cgroup) is None
    finally:
        proc.kill()
        proc.wait()  # lab down removes the extra cgroups


def test_isolated_ingress_admits_one_peer_on_one_port_and_replies_pass(pl):
    # x/a: ingress from x/b on 8080 only, egress default deny (its replies
    # must still go out); x/b: ingress default deny (the replies it gets
    # must still come in).
    with pl.maps() as maps:
        before = maps.counters()
        maps.apply(pl.allow_in("x/a", "x/b", 8080)
                   + pl.endpoints({"x/a": EP_ISOLATE_IN | EP_ISOLATE_OUT, "x/b": EP_ISOLATE_IN}))
        assert pl.connects("x/b", "x/a", 8080) == 3
        out = pl.probe("x/b", "whoami", pl.ip("x/a"), 8080, 2)
        assert out == {"answers": {"x/a": 2}, "errors": {}}
        assert pl.connects("x/b", "x/a", 8081) == 0
        assert pl.connects("y/a", "x/a", 8080) == 0
        assert pl.connects("x/a", "y/a", 8080) == 0   # x/a's egress: default deny
        assert pl.connects("y/a", "x/b", 8080) == 0   # x/b's ingress: default deny
        assert pl.connects("x/b", "y/a", 8080) == 3   # x/b's egress is open
        got = maps.counters()
    assert got["ingress_allow"] - before["ingress_allow"] >= 5
    assert got["ingress_deny"] - before["ingress_deny"] >= 9


def test_a_spoofed_source_sent_with_scapy_is_dropped(pl):
    with pl.maps() as maps:
        maps.apply(pl.endpoints({}))
        before = maps.counters()
        recv = pl.popen("y/a", "udp-recv", 9999, "genuine")
        assert json.loads(recv.stdout.readline()) == {"listening": True}
        # from x/a: once as x/b (spoofed), once as itself (the control)
        pl.run("x/a", "spoof", pl.ip("x/b"), pl.ip("y/a"), 9999, "spoofed")
        pl.run("x/a", "spoof", pl.ip("x/a"), pl.ip("y/a"), 9999, "genuine")
        out, _ = recv.communicate(timeout=30)
        assert json.loads(out.strip().splitlines()[-1]) == {"got": ["genuine"]}
        assert maps.counters()["spoofed"] - before["spoofed"] == 1


def test_an_established_connection_outlives_a_switch_to_deny_all(pl):
    """Established flows continue (conntrack), new ones are denied: the
    semantics of iptables-based enforcement."""
    with pl.maps() as maps:
        maps.apply(pl.allow_in("x/a", "x/b", 8080)
                   + pl.endpoints({"x/a": EP_ISOLATE_IN}))
        hold = pl.lab.popen("x/b", [sys.executable, "-u", str(Path(__file__).with_name("probe.py")),
                                    "hold", pl.ip("x/a"), "8080", "stdin"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert json.loads(hold.stdout.readline()) == {"first": "x/a"}
        # generation 1 holds no rules: deny all, flipped in one update
        maps.apply([PolicyStep("endpoints", "update",
                               {pl.ifindex["x/a"]: EpVal(EP_IDS["x/a"], 1, EP_ISOLATE_IN)})])
        assert pl.connects("x/b", "x/a", 8080) == 0
        out, _ = hold.communicate("\n", timeout=30)
        assert json.loads(out.strip().splitlines()[-1]) == {"first": "x/a", "second": "x/a"}


def test_generation_flips_under_load_never_admit_denied_nor_cut_allowed(pl):
    """x/b is allowed to x/a:8080, y/a is not; the rules are rewritten
    make-before-break (other generation, flip, delete the old) over and over
    while both hammer x/a with new connections."""
    server = pl.popen("x/a", "listen", FLOOD_PORT)
    try:
        assert json.loads(server.stdout.readline()) == {"listening": True}
        _flips_under_load(pl)
    finally:
        server.kill()
        server.wait()


FLOOD_PORT = 9090


def _flips_under_load(pl):
    events = PolicyEvents(pl.dp.bpffs) if libbpf.ringbuf_supported() else None
    seen = []
    try:
        with pl.maps() as maps:
            maps.apply(pl.allow_in("x/a", "x/b", FLOOD_PORT, gen=0)
                       + pl.endpoints({"x/a": EP_ISOLATE_IN}, gen=0))
            # The allowed side waits long for an answer (emulated kernels are
            # slow); a dropped SYN still shows as a deny event.
            allowed = pl.popen("x/b", "flood", pl.ip("x/a"), FLOOD_PORT, 5)
            denied = pl.popen("y/a", "flood", pl.ip("x/a"), FLOOD_PORT, 0.3)
            for proc in (allowed, denied):
                assert json.loads(proc.stdout.readline()) == {"started": True}
            ep = EP_IDS["x/a"]
            gen, flips, end = 0, 0, time.monotonic() + 2
            while time.monotonic() < end or flips < 20:
                new = 1 - gen
                maps.apply(pl.allow_in("x/a", "x/b", FLOOD_PORT, gen=new, peer_set=new + 1))
                maps.apply([PolicyStep("endpoints", "update",
                                       {pl.ifindex["x/a"]: EpVal(ep, new, EP_ISOLATE_IN)})])
                old = pl.allow_in("x/a", "x/b", FLOOD_PORT, gen=gen, peer_set=gen + 1)
                maps.apply([PolicyStep(s.map, "delete", {k: None for k in s.entries})
                            for s in reversed(old)])
                gen, flips = new, flips + 1
                seen += events.poll(0) if events else []
                time.sleep(0.01)
            results = [json.loads(p.communicate("\n", timeout=60)[0].strip().splitlines()[-1])
                       for p in (allowed, denied)]
            seen += events.poll(100) if events else []
    finally:
        if events:
            events.close()
    assert results[0]["ok"] > 0 and results[0]["failed"] == 0, results[0]
    assert results[1]["ok"] == 0 and results[1]["failed"] > 0, results[1]
    by = {(e.src.rsplit(":", 1)[0], e.verdict) for e in seen if e.direction == "ingress"}
    assert (pl.ip("x/b"), "deny") not in by and (pl.ip("y/a"), "allow") not in by, by
    if events:
        assert (pl.ip("x/b"), "allow") in by and (pl.ip("y/a"), "deny") in by, by


def test_detach_removes_the_filters(pl):
    with pl.maps() as maps:
        maps.apply(pl.endpoints({"x/a": EP_ISOLATE_IN}))
        assert pl.connects("x/b", "x/a", 8080, 1) == 0
        attached = pl.dp.attached()
        assert {pl.ifindex[p] for p in PODS} <= set(attached)
        assert set(attached[pl.ifindex["x/a"]]) == {"mbpf_tc_from_pod", "mbpf_tc_to_pod"}
        pl.dp.detach(pl.ifindex["x/a"])
        assert pl.ifindex["x/a"] not in pl.dp.attached()
        assert pl.connects("x/b", "x/a", 8080, 1) == 1  # nothing enforces x/a now


LOADER = """
import sys
from pathlib import Path
from meshbpf.datapath.policy import PolicyDatapath

dp = PolicyDatapath(Path(sys.argv[1]), netns=sys.argv[2])
dp.compile()
for ifindex in sys.argv[3:]:
    dp.attach(int(ifindex))
print("attached", flush=True)
sys.stdin.readline()
"""


def test_filters_outlive_the_process_that_attached_them(pl):
    """Another process replaces the filters (same slot: atomic swap), is
    kill -9ed, and enforcement goes on."""
    with pl.maps() as maps:
        maps.apply(pl.allow_in("x/a", "x/b", 8080) + pl.endpoints({"x/a": EP_ISOLATE_IN}))
    before = pl.dp.attached()[pl.ifindex["x/a"]]
    proc = subprocess.Popen([sys.executable, "-c", LOADER, str(pl.dp.bpffs), pl.lab.node_ns,
                             str(pl.ifindex["x/a"])], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "attached"
        after = pl.dp.attached()[pl.ifindex["x/a"]]
        assert set(after) == set(before) and after != before  # new programs, same slot
    finally:
        proc.kill()
        proc.wait()
    assert pl.dp.attached()[pl.ifindex["x/a"]] == after
    assert pl.connects("x/b", "x/a", 8080, 2) == 2
    assert pl.connects("y/a", "x/a", 8080, 2) == 0


def test_uninstall_removes_our_filters_and_pins(plab):
    from meshbpf.datapath.loader import uninstall
    for pod in PODS:
        plab.dp.attach(plab.ifindex[pod])
    removed = uninstall(plab.dp.bpffs)
    assert sum(r.startswith("tc filter") for r in removed) == 2 * len(PODS), removed
    assert attached_filters(plab.lab.node_ns) == {}
    assert not plab.dp.bpffs.exists()
    wait_for(lambda: plab.run("y/a", "connects", plab.ip("x/a"), 8080, 1)["ok"] == 1, 5,
             "x/a reachable once nothing enforces")
