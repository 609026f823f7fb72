"""Socket-LB events in `meshbpf monitor`, without a kernel: the record
layout told apart from policy events by its kind byte, names (Service,
backend pod, client pod from its kubelet cgroup), the table line, the
--type/--verdict/--pod filters, and the agent's names view."""

from __future__ import annotations

import ctypes as ct
import ipaddress
import socket

from meshbpf.cli import monitor_cmd
from meshbpf.cli.monitor_cmd import (MAX_CGROUP_NAMES, POD_CGROUP, CgroupNames, Names, matches,
                                      table_line)
from meshbpf.datapath.layout import EV_KIND_LB, LbEventC, PolEventC
from meshbpf.datapath.policy_events import LbEvent, PolicyEvent, parse_event
from meshbpf.model import DesiredState
from meshbpf.reconcile import addr16
from meshbpf.sync.flow_names import flow_names

UID = "0b7f3c1e-5a2d-4c3b-9e8f-112233445566"


def _lb_record(backend: str | None = "10.244.1.7", cgroup_id: int = 4242, hook: int = 0) -> bytes:
    c = LbEventC(ts_ns=5, svc_port=socket.htons(80), svc_id=3, proto=6, hook=hook,
                 verdict=0 if backend else 1, kind=EV_KIND_LB, cgroup_id=cgroup_id)
    c.svc_addr[:] = addr16(ipaddress.ip_address("10.96.0.10"))
    if backend:
        c.backend_addr[:] = addr16(ipaddress.ip_address(backend))
        c.backend_port = socket.htons(8080)
    return bytes(c)


def test_records_are_told_apart_by_their_kind_byte():
    ev = parse_event(_lb_record())
    assert isinstance(ev, LbEvent)
    assert (ev.service, ev.backend, ev.hook, ev.verdict, ev.cgroup_id) == (
        "10.96.0.10:80", "10.244.1.7:8080", "connect", "translated", 4242)
    refused = parse_event(_lb_record(backend=None, hook=1))
    assert refused.backend is None and refused.verdict == "refused" and refused.hook == "sendmsg"
    pol = PolEventC(verdict=1, proto=17)  # kind 0, as 0.1.0's programs write it
    assert isinstance(parse_event(bytes(pol)), PolicyEvent)


def test_kubelet_pod_cgroups_of_both_drivers_name_the_uid():
    systemd = f"kubepods-besteffort-pod{UID.replace('-', '_')}.slice"
    assert POD_CGROUP.search(f"pod{UID}").group(1) == UID
    assert POD_CGROUP.search(systemd).group(1).replace("_", "-") == UID
    assert POD_CGROUP.search("kubepods-besteffort.slice") is None
    names = CgroupNames()
    names.paths = {1: f"/kubepods.slice/kubepods-besteffort.slice/{systemd}/cri-containerd-ab.scope",
                   2: "/meshbpf-lab-x", 3: f"/lab/kubepods/besteffort/pod{UID}"}
    names.walked = float("inf")  # never walk the real tree here
    assert names.pod_uid(1)[0] == UID and names.pod_uid(3)[0] == UID
    assert names.pod_uid(2) == ("", "/meshbpf-lab-x") and names.pod_uid(99) == (None, None)


def test_the_cgroup_names_stay_bounded_as_pods_come_and_go(monkeypatch, tmp_path):
    """Pod churn: every walk finds new cgroup ids (ids are never reused) and
    the old ones gone. The names kept never pass MAX_CGROUP_NAMES, the ones
    in use stay, and a cgroup just asked about is named."""
    live = 500  # cgroups of the node at any time
    tree = {"next": 1}

    def walk() -> dict:
        first = tree["next"]
        tree["next"] += live // 5  # a fifth replaced between walks
        return {i: tmp_path / f"pod{i}" for i in range(first, first + live)}
    monkeypatch.setattr(monitor_cmd.cgroup, "cgroup2_mount", lambda: tmp_path)
    monkeypatch.setattr(monitor_cmd.cgroup, "paths_by_id", walk)
    names = CgroupNames()
    for _ in range(4 * MAX_CGROUP_NAMES // (live // 5)):
        names.walked = float("-inf")  # the walk is due
        newest = tree["next"] + live - 1  # in the next walk, not known yet
        assert names.path(newest) == f"/pod{newest}"
        assert names.path(1) == "/pod1"  # first seen long ago, gone, but asked about all along
        assert len(names.paths) <= MAX_CGROUP_NAMES
    assert tree["next"] > 3 * MAX_CGROUP_NAMES and len(names.paths) == MAX_CGROUP_NAMES


def _names() -> Names:
    names = Names(None)
    names.services = {"10.96.0.10:80/TCP": "default/web:http"}
    names.pods = {"10.244.1.7": "x/b"}
    names.pod_uids = {UID: "x/a"}
    names.cgroups.paths = {4242: f"/lab/kubepods/besteffort/pod{UID}", 7: "/user.slice"}
    names.cgroups.walked = float("inf")
    return names


def test_a_translation_names_client_service_and_backend_pods():
    event = _names().describe(parse_event(_lb_record()))
    assert (event["type"], event["client_pod"], event["service_name"], event["backend_pod"]) == (
        "lb", "x/a", "default/web:http", "x/b")
    line = table_line(event)
    assert "TRANSLATED" in line and " x/a " in line and "10.96.0.10:80 (default/web:http)" in line
    assert line.rstrip().endswith("-> 10.244.1.7:8080 (x/b)")
    refused = _names().describe(parse_event(_lb_record(backend=None, cgroup_id=7)))
    assert refused["client_pod"] is None and refused["backend_pod"] is None
    line = table_line(refused)
    assert "REFUSED" in line and "cgroup /user.slice" in line and line.rstrip().endswith("(no usable backend)")


def test_filters_by_type_verdict_and_client_or_backend_pod():
    lb = _names().describe(parse_event(_lb_record()))
    pol = {"type": "policy", "verdict": "allow", "src_pod": "x/a", "dst_pod": "x/b", "pod": "x/b"}
    assert matches(lb, (), (), ("lb",)) and not matches(lb, (), (), ("policy",))
    assert matches(pol, (), (), ("policy",)) and not matches(pol, (), (), ("lb",))
    assert matches(lb, (), ("translated",)) and not matches(lb, (), ("refused",))
    assert matches(lb, ("a",), ()) and matches(lb, ("x/b",), ()) and not matches(lb, ("z/a",), ())


def test_the_agent_view_names_frontends_and_pod_uids():
    from meshbpf.model import Endpoint, Frontend, ServicePort
    from meshbpf.policy.model import PodInfo
    fe = Frontend(ipaddress.ip_address("fd00::10"), 53, "UDP")
    sp = ServicePort("kube-system", "dns", "", fe, (Endpoint(ipaddress.ip_address("fd00::1"), 53),))
    names = flow_names(DesiredState(service_ports={fe: sp}, pods=(PodInfo("x", "a", uid=UID),)))
    assert names == {"services": {"[fd00::10]:53/UDP": "kube-system/dns"}, "pod_uids": {UID: "x/a"}}
    assert flow_names(None) == {"services": {}, "pod_uids": {}}
    assert ct.sizeof(LbEventC) == 80


def test_a_split_frontend_is_named_with_its_route():
    """Issue 13: the flow monitor names the route that split a connection."""
    from meshbpf.model import Endpoint, Frontend, ServicePort, SplitShare
    fe = Frontend(ipaddress.ip_address("10.96.0.20"), 80, "TCP")
    ep = Endpoint(ipaddress.ip_address("10.244.0.9"), 8080)
    sp = ServicePort("shop", "web", "http", fe, (ep,), split=(SplitShare("shop/web-v2:80", 1, (ep,)),),
                     route="TCPRoute shop/canary")
    names = flow_names(DesiredState(service_ports={fe: sp}))
    assert names["services"] == {"10.96.0.20:80/TCP": "shop/web:http via TCPRoute shop/canary"}
