"""Sidecar capture decisions in `meshbpf monitor`, without a kernel: the
record told apart from the other kinds by its kind byte, the meshed pod and
the client named from their kubelet cgroups, the table line and the
--type/--verdict/--pod filters. The kernel side: test_capture_datapath.py."""

from __future__ import annotations

import ctypes as ct
import ipaddress
import socket

from meshbpf.cli.monitor_cmd import Names, matches, table_line
from meshbpf.datapath.layout import EV_KIND_CAP, EV_KIND_OFF, CapEventC, LbEventC
from meshbpf.datapath.policy_events import CapEvent, parse_event
from meshbpf.reconcile import addr16

A, CLIENT = "0b7f3c1e-5a2d-4c3b-9e8f-112233445566", "5c1d2e3f-0000-4c3b-9e8f-665544332211"
OUTBOUND, INBOUND, DNS = 1, 2, 3  # MBPF_CAP_EV_*


def _record(decision: int, orig: str, orig_port: int, to: str, to_port: int,
            pod_cg: int = 10, cgroup_id: int = 11, proto: int = 6, hook: int = 0,
            peer: tuple[str, int] | None = None) -> bytes:
    c = CapEventC(ts_ns=5, orig_port=socket.htons(orig_port), to_port=socket.htons(to_port),
                  pod_cg=pod_cg, proto=proto, hook=hook, decision=decision, kind=EV_KIND_CAP,
                  cgroup_id=cgroup_id)
    c.orig_addr[:] = addr16(ipaddress.ip_address(orig))
    c.to_addr[:] = addr16(ipaddress.ip_address(to))
    if peer:
        c.peer_addr[:] = addr16(ipaddress.ip_address(peer[0]))
        c.peer_port = socket.htons(peer[1])
    return bytes(c)


def _names() -> Names:
    names = Names(None)
    names.pod_uids = {A: "mesh/a", CLIENT: "plain/c"}
    names.cgroups.paths = {10: f"/lab/kubepods/besteffort/pod{A}",
                           11: f"/lab/kubepods/besteffort/pod{A}/app",
                           12: f"/lab/kubepods/besteffort/pod{CLIENT}", 7: "/user.slice"}
    names.cgroups.walked = float("inf")  # never walk the real tree here
    return names


def test_the_record_has_the_kind_at_the_shared_offset():
    assert (ct.sizeof(CapEventC), ct.sizeof(LbEventC)) == (104, 80)
    assert CapEventC.kind.offset == LbEventC.kind.offset == EV_KIND_OFF
    ev = parse_event(_record(OUTBOUND, "10.96.0.10", 80, "10.244.0.5", 15001))
    assert ev == CapEvent(5, "10.96.0.10:80", "10.244.0.5:15001", 6, "connect", "outbound", 10, 11, 0)


def test_outbound_names_the_pod_and_its_original_destination():
    event = _names().describe(parse_event(_record(OUTBOUND, "10.96.0.10", 80, "10.244.0.5", 15001)))
    assert (event["type"], event["verdict"], event["pod"], event["client_pod"]) == (
        "capture", "outbound", "mesh/a", "mesh/a")
    line = table_line(event)
    assert line.split()[1:6] == ["OUTBOUND", "connect", "TCP", "mesh/a", "10.96.0.10:80"], line
    assert line.rstrip().endswith("-> 10.244.0.5:15001 (proxy of mesh/a)")


def test_inbound_names_the_destination_pod_and_the_client():
    event = _names().describe(parse_event(_record(INBOUND, "10.244.0.5", 8080, "10.244.0.5", 15006,
                                                  cgroup_id=12)))
    assert (event["pod"], event["client_pod"]) == ("mesh/a", "plain/c")
    line = table_line(event)
    assert line.split()[1:6] == ["INBOUND", "connect", "TCP", "plain/c", "10.244.0.5:8080"], line
    assert line.rstrip().endswith("-> 10.244.0.5:15006 (proxy of mesh/a)")


def test_dns_from_an_unknown_cgroup_shows_the_path():
    event = _names().describe(parse_event(_record(DNS, "fd00::53", 53, "::1", 15053, cgroup_id=7,
                                                  proto=17, hook=1)))
    assert (event["verdict"], event["hook"], event["protocol"]) == ("dns", "sendmsg", "UDP")
    line = table_line(event)
    assert "cgroup /user.slice" in line and "[fd00::53]:53" in line
    assert line.rstrip().endswith("-> [::1]:15053 (proxy of mesh/a)")


def test_filters_by_type_decision_and_pod():
    inbound = _names().describe(parse_event(_record(INBOUND, "10.244.0.5", 8080, "10.244.0.5", 15006,
                                                    cgroup_id=12)))
    assert matches(inbound, (), (), ("capture",)) and not matches(inbound, (), (), ("lb",))
    assert matches(inbound, (), ("inbound",)) and not matches(inbound, (), ("dns",))
    assert matches(inbound, ("mesh/a",), ()) and matches(inbound, ("c",), ())
    assert not matches(inbound, ("x/b",), ())


def test_inbound_from_tc_names_the_client_by_its_address():
    """A connection from another node, turned to the proxy in tc: no task,
    so no cgroup; the client is the packet's source, named if it is a pod
    the agent knows."""
    TC = 2  # MBPF_CAP_EV_TC
    record = _record(INBOUND, "10.244.0.5", 80, "10.244.0.5", 15006, cgroup_id=0, hook=TC,
                     peer=("10.244.1.7", 40000))
    ev = parse_event(record)
    assert (ev.hook, ev.peer, ev.verdict) == ("tc", "10.244.1.7:40000", "inbound")
    names = _names()
    event = names.describe(ev)
    assert (event["pod"], event["client_pod"], event["client_cgroup"]) == ("mesh/a", None, None)
    line = table_line(event)
    assert line.split()[1:6] == ["INBOUND", "tc", "TCP", "10.244.1.7:40000", "10.244.0.5:80"], line
    assert line.rstrip().endswith("-> 10.244.0.5:15006 (proxy of mesh/a)")
    names.pods = {"10.244.1.7": "other/client"}
    event = names.describe(ev)
    assert event["client_pod"] == "other/client" and matches(event, ("client",), ())
    assert "10.244.1.7:40000 (other/client)" in table_line(event)


def test_a_connect_event_has_no_peer():
    assert parse_event(_record(INBOUND, "10.244.0.5", 8080, "10.244.0.5", 15006)).peer is None
