"""Sidecar capture datapath (issue 11) with real traffic and a proxy of our own.

Pods mesh/a and mesh/b are meshed (kubelet-style cgroups, maps written
directly through CaptureMaps: the agent's part is tested elsewhere); each
runs tests/kernel/capture_proxy.py as uid 1337 on 15001/15006, which answers
with what getsockopt(SO_ORIGINAL_DST) and getsockname() said and, forwarding,
where its own connect to that destination went. plain/c and client are not meshed.
mesh/a's DNS port 15053 listens on 127.0.0.1 and ::1 only, as Istio's agent
does; a decoy on the pod's own addresses answers on that port too, so DNS
sent anywhere but loopback shows up as the decoy's answer.
"""

from __future__ import annotations

import ctypes as ct
import ipaddress
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from meshbpf.datapath import libbpf, loader
from meshbpf.datapath.capture import CaptureError, CaptureMaps, cgroup_id
from meshbpf.datapath.layout import CapCfgC
from meshbpf.datapath.loader import SockLB
from meshbpf.lab.netlab import Lab
from meshbpf.lab.objects import lab_objects
from meshbpf.lab.workloads import start_dnsmasq, start_whoami, wait_listening
from meshbpf.reconcile import addr16
from meshbpf.reconcile.capture_keys import (DIR_IN, DIR_OUT, EXCLUDE, F_IN_ALL, F_INBOUND,
                                            F_OUT_ALL, F_OUTBOUND, INCLUDE, CapPod, CaptureState,
                                            CaptureStep, CidrKey, PortKey)

from . import k8s
from .conftest import attached_programs, web_service
from .test_monitor_lb import monitors  # noqa: F401 (a fixture)
from .test_policy_cli import _stop, _wait_output

pytestmark = pytest.mark.needs_feature("capture")

PROXY = Path(__file__).with_name("capture_proxy.py")
UID, OUT, IN, DNS = 1337, 15001, 15006, 15053
DNSMASQ_PROXY, FORWARDER = 15054, 5300  # dnsmasq as the DNS proxy; an app's dnsmasq forwarder
WEBS = {"web-1", "web-2", "web-3", "web-4"}
SVC = {4: "10.96.0.10", 6: "fd00:96::10"}
ALL = F_OUTBOUND | F_INBOUND | F_IN_ALL | F_OUT_ALL
POD_IDS = {"mesh/a": 1, "mesh/b": 2}
LOOPBACK = {4: "127.0.0.1", 6: "::1"}


def ip(lab: Lab, pod: str, family: int) -> str:
    return str(lab.pods[pod].ipv4 if family == 4 else lab.pods[pod].ipv6)


class Proxy:
    def __init__(self, lab: Lab, pod: str):
        self.lab, self.pod, self.proc = lab, pod, None

    def start(self, mode: str = "forward") -> "Proxy":
        self.proc = self.lab.popen(self.pod, [sys.executable, "-u", str(PROXY), "proxy", str(OUT),
                                              str(IN), str(UID), mode],
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert json.loads(self.proc.stdout.readline())["ready"], f"proxy in {self.pod} did not start"
        wait_listening(self.lab, self.pod, IN)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


@dataclass
class Mesh:
    lab: Lab
    maps: CaptureMaps
    proxies: dict[str, Proxy] = field(default_factory=dict)

    def pod(self, name: str, flags: int = ALL, dns_port: int = 0) -> tuple[int, CapPod]:
        p = self.lab.pods[name]
        return cgroup_id(p.cgroup), CapPod(addr16(p.ipv4), addr16(p.ipv6), UID, POD_IDS[name],
                                          OUT, IN, dns_port, flags)

    def set(self, flags: dict[str, int] | None = None, cidrs=None, ports=None, dns_port: int = 0) -> None:
        """Capture exactly this: mesh/a and mesh/b with these flags (default
        ALL); mesh/a's DNS to dns_port if set."""
        flags = {"mesh/a": ALL, "mesh/b": ALL, **(flags or {})}
        want = CaptureState()
        for name, f in flags.items():
            cg, value = self.pod(name, f, dns_port if name == "mesh/a" else 0)
            want.pods[cg] = value
            want.addresses[value.ip4] = want.addresses[value.ip6] = cg
        want.cidrs = dict(cidrs or {})
        want.ports = dict(ports or {})
        self.clear()
        self.maps.apply([CaptureStep(m, "update", getattr(want, m))
                         for m in ("cidrs", "ports", "addresses", "pods")])
        assert self.maps.read() == want

    def clear(self) -> None:
        have = self.maps.read()
        self.maps.apply([CaptureStep(m, "delete", dict.fromkeys(getattr(have, m)))
                         for m in ("pods", "addresses", "ports", "cidrs")])

    def get(self, pod: str, host: str, port: int, command: str = "get", *extra: str) -> dict:
        """What an app in pod sees for an HTTP GET to host:port (as root), or
        another capture_proxy.py client command."""
        r = self.lab.run(pod, [sys.executable, str(PROXY), command, host, str(port), *extra],
                         timeout=60)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)


def services(lab: Lab) -> list[dict]:
    return web_service(lab) + [
        k8s.service("web6", [SVC[6]], [k8s.port("http", 80, 8080)]),
        k8s.endpoint_slice("web6-1", "web6", [k8s.endpoint(str(lab.pods[p].ipv6)) for p in sorted(WEBS)],
                           [k8s.slice_port("http", 8080)], address_type="IPv6")]


@pytest.fixture(scope="module")
def mesh(shared_lb):
    lab = shared_lb.lab
    for name in ("mesh/a", "mesh/b", "plain/c"):
        lab.add_pod(name)
    start_whoami(lab, "mesh/b", 8080, "b-app")
    start_whoami(lab, "mesh/b", 15021, "b-health")
    start_whoami(lab, "mesh/a", 9090, "a-local")
    shared_lb.serve(services(lab))
    lb = SockLB(bpffs=shared_lb.bpffs)
    lb.compile()
    lb.attach_capture([lab.cgroup])
    the_mesh = Mesh(lab, CaptureMaps(shared_lb.bpffs))
    dns = [lab.popen("mesh/a", [sys.executable, "-u", str(PROXY), "dns", str(DNS), str(UID), *hosts],
                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
           for hosts in (LOOPBACK.values(), (ip(lab, "mesh/a", 4), ip(lab, "mesh/a", 6)))]
    try:
        for proc in dns:
            assert json.loads(proc.stdout.readline())["ready"]
        for name in ("mesh/a", "mesh/b"):
            the_mesh.proxies[name] = Proxy(lab, name).start()
        yield the_mesh
    finally:
        for proc in dns:
            proc.kill()
            proc.wait(timeout=30)
        for proxy in the_mesh.proxies.values():
            proxy.stop()
        the_mesh.clear()
        the_mesh.maps.apply([])
        the_mesh.maps.close()
        lb.detach_capture()


@pytest.fixture
def meshed(mesh):
    mesh.set()
    yield mesh
    mesh.clear()
    mesh.maps.apply([])


FAMILIES = pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])


def assert_captured(answer: dict, port: int, orig: list) -> None:
    assert answer.get("port") == port, f"not at the proxy's port {port}: {answer}"
    assert answer["uid"] == UID
    assert answer.get("orig") == orig, answer


@FAMILIES
def test_app_to_service_reaches_the_proxy_which_sees_the_service(meshed, family):
    """The original destination is the Service address, not a backend
    (capture comes before socket-LB), and the proxy's own connect to it is
    translated to a backend and not captured again."""
    before = meshed.maps.counters()
    answer = meshed.get("mesh/a", SVC[family], 80)
    assert_captured(answer, OUT, [SVC[family], 80])
    assert answer.get("upstream") in WEBS, answer
    after = meshed.maps.counters()
    assert after["captured_outbound"] > before["captured_outbound"]
    assert after["skipped_proxy_uid"] > before["skipped_proxy_uid"]
    assert after["original_dst_answered"] > before["original_dst_answered"]


@FAMILIES
def test_app_to_a_pod_address_reaches_the_proxy(meshed, family):
    web1 = ip(meshed.lab, "web-1", family)
    answer = meshed.get("mesh/a", web1, 8080)
    assert_captured(answer, OUT, [web1, 8080])
    assert answer["upstream"] == "web-1"


@FAMILIES
@pytest.mark.needs_feature("capture_getsockname")
def test_proxy_getsockname_names_the_original_destination(meshed, family):
    """Where a proxy reads getsockname() instead of SO_ORIGINAL_DST (HAProxy
    for IPv6), its accepted socket of a captured connection names the
    Service; the app's own socket keeps its real address."""
    a = ip(meshed.lab, "mesh/a", family)
    answer = meshed.get("mesh/a", SVC[family], 80, "get-sockname")
    assert_captured(answer, OUT, [SVC[family], 80])
    assert answer["sockname"] == [SVC[family], 80], answer
    assert answer["app_sockname"][0] == a and answer["app_sockname"][1] not in (80, OUT), answer
    b = ip(meshed.lab, "mesh/b", family)  # inbound: the app's original port
    assert meshed.get("client", b, 8080)["sockname"] == [b, 8080]


@FAMILIES
@pytest.mark.needs_feature("capture_getsockname")
def test_proxy_getsockname_of_a_connection_not_captured_is_its_own(meshed, family):
    """A client's connect straight to the proxy's port is not captured: no
    original destination, and getsockname() names the proxy's port."""
    a = ip(meshed.lab, "mesh/a", family)
    answer = meshed.get("client", a, OUT)
    assert answer.get("port") == OUT and "orig" not in answer, answer
    assert answer["sockname"] == [a, OUT], answer


@pytest.mark.needs_feature("capture_getsockname")
def test_a_proxy_forwarding_to_its_getsockname_reaches_the_service(meshed):
    """capture_proxy.py in "getsockname" mode routes by getsockname() alone,
    as HAProxy does for IPv6: its own connect goes to a backend, not to
    itself."""
    proxy = meshed.proxies["mesh/a"]
    proxy.stop()
    try:
        proxy.start("getsockname")
        answer = meshed.get("mesh/a", SVC[6], 80)
        assert answer.get("port") == OUT and answer.get("upstream") in WEBS, answer
    finally:
        proxy.stop()
        proxy.start()


@FAMILIES
def test_loopback_is_not_captured(meshed, family):
    host = "127.0.0.1" if family == 4 else "::1"
    assert meshed.get("mesh/a", host, 9090) == {"body": "a-local"}


def test_excluded_outbound_port_goes_direct(meshed):
    meshed.set(ports={PortKey(POD_IDS["mesh/a"], 8080, DIR_OUT): EXCLUDE})
    assert meshed.get("mesh/a", ip(meshed.lab, "web-1", 4), 8080) == {"body": "web-1"}
    # other ports still are captured
    assert_captured(meshed.get("mesh/a", SVC[4], 80), OUT, [SVC[4], 80])


@FAMILIES
def test_excluded_range_goes_direct_and_the_rest_is_captured(meshed, family):
    pod_net = addr16(meshed.lab.pods["web-1"].ipv4) if family == 4 else addr16(meshed.lab.pods["web-1"].ipv6)
    bits = 96 + 24 if family == 4 else 64
    meshed.set(cidrs={CidrKey(POD_IDS["mesh/a"], pod_net[:bits // 8] + bytes(16 - bits // 8), bits): EXCLUDE})
    assert meshed.get("mesh/a", ip(meshed.lab, "web-1", family), 8080) == {"body": "web-1"}
    assert_captured(meshed.get("mesh/a", SVC[family], 80), OUT, [SVC[family], 80])


@pytest.mark.bounds
def test_include_list_captures_only_the_included_range(meshed):
    """includeOutboundIPRanges=10.96.0.0/16: no F_OUT_ALL, one INCLUDE prefix."""
    svc_net = addr16(ipaddress.ip_address("10.96.0.0"))
    meshed.set(flags={"mesh/a": ALL & ~F_OUT_ALL},
               cidrs={CidrKey(POD_IDS["mesh/a"], svc_net, 96 + 16): INCLUDE})
    assert_captured(meshed.get("mesh/a", SVC[4], 80), OUT, [SVC[4], 80])
    assert meshed.get("mesh/a", ip(meshed.lab, "web-1", 4), 8080) == {"body": "web-1"}
    assert meshed.get("mesh/a", SVC[6], 80)["body"] in WEBS  # IPv6 Service: not included


@pytest.mark.bounds
def test_proxy_down_refuses_at_once_and_a_restarted_proxy_is_used_again(meshed):
    proxy = meshed.proxies["mesh/a"]
    proxy.stop()
    try:
        assert meshed.get("mesh/a", SVC[4], 80) == {"error": "ECONNREFUSED"}
    finally:
        proxy.start()
    assert_captured(meshed.get("mesh/a", SVC[4], 80), OUT, [SVC[4], 80])


@FAMILIES
def test_inbound_from_a_same_node_client_lands_on_the_inbound_port(meshed, family):
    """The original port is answered; the proxy's forward to its own app
    port is not captured again (no loop): the app itself answers."""
    b = ip(meshed.lab, "mesh/b", family)
    answer = meshed.get("client", b, 8080)
    assert_captured(answer, IN, [b, 8080])
    assert answer["upstream"] == "b-app"


def test_inbound_through_a_service_lands_on_the_inbound_port(meshed, shared_lb):
    """socket-LB first, then inbound capture of the backend it chose."""
    shared_lb.serve(services(meshed.lab)
                    + web_service(meshed.lab, pods=("mesh/b",), name="b", ip="10.96.0.20"))
    try:
        b = ip(meshed.lab, "mesh/b", 4)
        assert_captured(meshed.get("client", "10.96.0.20", 80), IN, [b, 8080])
    finally:
        shared_lb.serve(services(meshed.lab))


def test_never_captured_inbound_port_reaches_the_app(meshed):
    meshed.set(ports={PortKey(POD_IDS["mesh/b"], 15021, DIR_IN): EXCLUDE})
    assert meshed.get("client", ip(meshed.lab, "mesh/b", 4), 15021) == {"body": "b-health"}
    assert_captured(meshed.get("client", ip(meshed.lab, "mesh/b", 4), 8080), IN,
                    [ip(meshed.lab, "mesh/b", 4), 8080])


def test_inbound_include_list_captures_only_its_ports(meshed):
    """includeInboundPorts=8080: no F_IN_ALL, one INCLUDE port."""
    meshed.set(flags={"mesh/b": ALL & ~F_IN_ALL},
               ports={PortKey(POD_IDS["mesh/b"], 8080, DIR_IN): INCLUDE})
    b = ip(meshed.lab, "mesh/b", 4)
    assert meshed.get("client", b, 15021) == {"body": "b-health"}
    assert_captured(meshed.get("client", b, 8080), IN, [b, 8080])


@FAMILIES
def test_a_pod_that_is_not_meshed_is_unaffected(meshed, family):
    assert meshed.get("plain/c", SVC[family], 80)["body"] in WEBS
    assert meshed.get("plain/c", ip(meshed.lab, "web-1", family), 8080) == {"body": "web-1"}


def test_no_pod_meshed_captures_nothing(mesh):
    """mbpf_cap_cfg.pods == 0: the hooks skip capture even with entries left."""
    mesh.set()
    try:
        mesh.maps.apply([])
        assert mesh.maps.pods_enabled() == 2
        libbpf.map_update(mesh.maps.fds["mbpf_cap_cfg"], ct.c_uint32(0), CapCfgC(pods=0))
        assert mesh.get("mesh/a", SVC[4], 80)["body"] in WEBS
    finally:
        mesh.clear()
        mesh.maps.apply([])


def dns_port_answer(family: int) -> dict:
    """Our DNS port's answer on loopback, where istio-iptables' REDIRECT
    sends a local packet and the Istio agent listens (127.0.0.1:15053)."""
    return {"dns_port": DNS, "uid": UID, "to": LOOPBACK[family]}


@FAMILIES
def test_dns_over_connected_udp_goes_to_the_dns_port_when_asked(meshed, family):
    """The answer's source (recvfrom) and the peer (getpeername) are the
    server's, as behind REDIRECT."""
    dns1 = ip(meshed.lab, "dns-1", family)
    server = {"from": [dns1, 53], "peer": [dns1, 53]}
    assert meshed.get("mesh/a", dns1, 53, "udp-get") == {"txt": "dns-1", **server}
    meshed.set(dns_port=DNS)
    before = meshed.maps.counters()["captured_dns"]
    assert meshed.get("mesh/a", dns1, 53, "udp-get") == {**dns_port_answer(family), **server}
    assert meshed.maps.counters()["captured_dns"] > before
    assert meshed.get("plain/c", dns1, 53, "udp-get") == {"txt": "dns-1", **server}


@FAMILIES
def test_dns_over_unconnected_udp_goes_to_the_dns_port_and_answers_as_the_server(meshed, family):
    """sendto() without connect() (musl, Go, dnsmasq): the sendmsg hooks
    steer it, and recvfrom() names the server asked, which resolvers check.
    The proxy's own sendto() and unmeshed pods go to the server."""
    dns1 = ip(meshed.lab, "dns-1", family)
    server = [dns1, 53]
    assert meshed.get("mesh/a", dns1, 53, "udp-sendto") == {"txt": "dns-1", "from": server}
    meshed.set(dns_port=DNS)
    before = meshed.maps.counters()
    assert meshed.get("mesh/a", dns1, 53, "udp-sendto") == {**dns_port_answer(family), "from": server}
    assert meshed.maps.counters()["captured_dns"] == before["captured_dns"] + 1
    assert meshed.get("mesh/a", dns1, 53, "udp-sendto", str(UID)) == {"txt": "dns-1", "from": server}
    assert meshed.maps.counters()["skipped_proxy_uid"] > before["skipped_proxy_uid"]
    assert meshed.get("plain/c", dns1, 53, "udp-sendto") == {"txt": "dns-1", "from": server}


@pytest.mark.parametrize("command", ["udp-get", "udp-sendto"])
def test_dns_to_an_ipv4_mapped_server_goes_to_ipv4_loopback(meshed, command):
    """An IPv6 socket asking ::ffff:a.b.c.d sends IPv4: to 127.0.0.1 (as
    iptables' REDIRECT would), and the answer names ::ffff:a.b.c.d."""
    server = "::ffff:" + ip(meshed.lab, "dns-1", 4)
    meshed.set(dns_port=DNS)
    answer = meshed.get("mesh/a", server, 53, command)
    assert answer == {**dns_port_answer(4), "from": [server, 53],
                      **({"peer": [server, 53]} if command == "udp-get" else {})}


def test_dns_is_captured_with_outbound_capture_off(meshed):
    """includeOutboundIPRanges="" turns outbound TCP capture off, not DNS:
    istio-iptables' DNS rules do not depend on the outbound ranges."""
    dns1 = ip(meshed.lab, "dns-1", 4)
    meshed.set(flags={"mesh/a": F_INBOUND | F_IN_ALL}, dns_port=DNS)
    assert meshed.get("mesh/a", dns1, 53, "udp-sendto") == {**dns_port_answer(4), "from": [dns1, 53]}
    assert meshed.get("mesh/a", SVC[4], 80)["body"] in WEBS  # TCP is not captured
    meshed.set(flags={"mesh/a": F_INBOUND | F_IN_ALL})
    assert meshed.get("mesh/a", dns1, 53, "udp-sendto") == {"txt": "dns-1", "from": [dns1, 53]}


@FAMILIES
def test_dns_over_tcp_reaches_the_dns_port_and_getpeername_names_the_server(meshed, family):
    """dig +tcp, or a resolver retrying after a truncated answer: the
    connection goes to the DNS port on loopback, and getpeername() names
    the server asked (as behind REDIRECT), not the proxy's loopback port."""
    dns1 = ip(meshed.lab, "dns-1", family)
    assert meshed.get("plain/c", dns1, 53, "tcp-get") == {"txt": "dns-1", "peer": [dns1, 53]}
    meshed.set(dns_port=DNS)
    assert meshed.get("mesh/a", dns1, 53, "tcp-get") == {**dns_port_answer(family), "peer": [dns1, 53]}


SERVER_SEEN = {"udp-get": ("from", "peer"), "udp-sendto": ("from",), "tcp-get": ("peer",)}


@pytest.mark.parametrize("server", ["127.0.0.53", "::1"])
@pytest.mark.parametrize("command", sorted(SERVER_SEEN))
def test_a_loopback_nameserver_is_captured(meshed, server, command):
    """systemd-resolved's stub (127.0.0.53) as the pod's nameserver:
    istio-iptables captures it (its DNS rules come before its loopback
    RETURN, which spares port 53), and so does capture-all. Nothing
    listens there in mesh/a: the answer can only be the DNS port's."""
    assert meshed.get("mesh/a", server, 53, "tcp-get") == {"error": "ECONNREFUSED"}
    meshed.set(dns_port=DNS)
    family = 6 if ":" in server else 4
    answer = meshed.get("mesh/a", server, 53, command)
    assert answer == {**dns_port_answer(family), **dict.fromkeys(SERVER_SEEN[command], [server, 53])}


@pytest.mark.skipif(not libbpf.ringbuf_supported(), reason="flow events need a ring buffer (5.8+)")
def test_monitor_shows_capture_decisions_with_the_pod(meshed, shared_lb, monitors):
    """`meshbpf monitor` as a user types it: an app's connect steered to
    its proxy's outbound port with the Service it asked, a client's steered
    to a pod's inbound port, DNS steered to the DNS port; each with the
    meshed pod (named by the agent, from its kubelet cgroup)."""
    lab = meshed.lab
    pods = [lab.pods[name] for name in ("mesh/a", "mesh/b")]
    agent = shared_lb.serve(services(lab) + [lab_objects(pods, "another-node")])
    meshed.set(dns_port=DNS)
    a4, b4, dns1 = ip(lab, "mesh/a", 4), ip(lab, "mesh/b", 4), ip(lab, "dns-1", 4)
    try:
        mon = monitors(shared_lb.bpffs, agent, "-o", "json", "--type", "capture")
        assert_captured(meshed.get("mesh/a", SVC[4], 80), OUT, [SVC[4], 80])
        assert_captured(meshed.get("client", b4, 8080), IN, [b4, 8080])
        assert meshed.get("mesh/a", dns1, 53, "udp-sendto")["dns_port"] == DNS
        seen = _wait_output(mon, lambda text: all(f'"{d}"' in text for d in ("outbound", "inbound", "dns")))
        out, _ = _stop(mon, seen)
        events = [json.loads(line) for line in out.splitlines()]
        assert events and all(e["type"] == "capture" for e in events), "--type capture only"
        got = {e["verdict"]: e for e in events}
        assert {k: got["outbound"][k] for k in ("pod", "client_pod", "original", "to", "hook", "protocol")} == {
            "pod": "mesh/a", "client_pod": "mesh/a", "original": f"{SVC[4]}:80", "to": f"{a4}:{OUT}",
            "hook": "connect", "protocol": "TCP"}, got["outbound"]
        assert (got["inbound"]["pod"], got["inbound"]["original"], got["inbound"]["to"]) == (
            "mesh/b", f"{b4}:8080", f"{b4}:{IN}"), got["inbound"]
        assert got["inbound"]["client_cgroup"].endswith(lab.cgroup.name), got["inbound"]
        assert {k: got["dns"][k] for k in ("pod", "original", "to", "hook", "protocol")} == {
            "pod": "mesh/a", "original": f"{dns1}:53", "to": f"127.0.0.1:{DNS}", "hook": "sendmsg",
            "protocol": "UDP"}, got["dns"]

        table = monitors(shared_lb.bpffs, agent, "--verdict", "inbound", "--pod", "mesh/b")
        assert_captured(meshed.get("client", b4, 8080), IN, [b4, 8080])
        out, _ = _stop(table, _wait_output(table, lambda text: "INBOUND" in text))
        rows = out.splitlines()[1:]
        assert rows and all("INBOUND" in r for r in rows), out
        assert f" {b4}:8080 " in rows[0] and rows[0].rstrip().endswith(f"-> {b4}:{IN} (proxy of mesh/b)")
    finally:
        shared_lb.serve(services(lab))


@FAMILIES
def test_real_resolvers_reach_dnsmasq_as_the_dns_proxy(meshed, family, tmp_path):
    """dig connects its UDP socket (BIND 9.18: strace shows connect(), then
    sendmmsg() without an address), or uses TCP with +tcp; a dnsmasq
    forwarder sends with sendto() and drops answers whose source is not the
    server it asked. The proxy listens on loopback only (the Istio agent's
    127.0.0.1:15053); a decoy on the pod's addresses would answer wrongly."""
    lab, dns1 = meshed.lab, ip(meshed.lab, "dns-1", family)
    own = (ip(lab, "mesh/a", 4), ip(lab, "mesh/a", 6))
    procs = [start_dnsmasq(lab, "mesh/a", tmp_path, "mesh-a-proxy", port=DNSMASQ_PROXY,
                           listen=tuple(LOOPBACK.values())),
             start_dnsmasq(lab, "mesh/a", tmp_path, "mesh-a-decoy", port=DNSMASQ_PROXY, listen=own),
             start_dnsmasq(lab, "mesh/a", tmp_path, port=FORWARDER, forward_to=dns1)]
    try:
        assert dig(lab, dns1, 53) == dig(lab, "127.0.0.1", FORWARDER) == '"dns-1"'
        # (TCP to port 53 is the outbound port's until DNS is captured)
        meshed.set(dns_port=DNSMASQ_PROXY)
        assert dig(lab, dns1, 53) == '"mesh-a-proxy"'
        assert dig(lab, dns1, 53, "+tcp") == '"mesh-a-proxy"'
        assert dig(lab, "127.0.0.1", FORWARDER) == '"mesh-a-proxy"'
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=30)


def dig(lab: Lab, server: str, port: int, *options: str) -> str:
    """dig's TXT whoami.lab from mesh/a, one try (a lost answer fails fast)."""
    r = lab.run("mesh/a", ["dig", "+short", "+tries=1", "+time=5", *options, "-p", str(port),
                           f"@{server}", "whoami.lab", "TXT"], timeout=30)
    return r.stdout.strip() or r.stderr.strip() or f"dig exited {r.returncode}"


@pytest.mark.userspace
def test_a_bad_capture_step_is_refused_in_one_line(mesh):
    with pytest.raises(CaptureError, match=r"^capture step: unknown map 'pod' \(known: pods, "):
        mesh.maps.apply([CaptureStep("pod", "update", {})])
    with pytest.raises(CaptureError, match=r"^capture step on mbpf_cap_port: unknown op 'put'$"):
        mesh.maps.apply([CaptureStep("ports", "put", {})])


def test_capture_hooks_stay_pinned_and_uninstall_removes_them(lab, bpffs):
    """Like the other hooks: the links outlive the process that made them, a
    new one swaps its programs in behind them, uninstall takes them away."""
    first = SockLB(bpffs=bpffs)
    first.compile()
    sockname = bool(first.features["capture_getsockname"])
    hooks = (loader.ATTACH_GETSOCKOPT, loader.ATTACH_SOCK_OPS) + (
        (loader.ATTACH_GETSOCKNAME4, loader.ATTACH_GETSOCKNAME6) if sockname else ())
    first.attach_capture([lab.cgroup])
    attached = attached_programs(lab.cgroup, hooks)
    assert len(attached) == len(hooks)
    links = {n: i.id for n, i in loader.inspect(bpffs).links.items()}
    cg = cgroup_id(lab.cgroup)
    assert set(links) == {f"mbpf_cap_sockops-{cg}", f"mbpf_getsockopt-{cg}"} | (
        {f"mbpf_getsockname4-{cg}", f"mbpf_getsockname6-{cg}"} if sockname else set())
    del first  # the agent is gone; the pinned links keep the programs attached
    assert attached_programs(lab.cgroup, hooks) == attached
    second = SockLB(bpffs=bpffs)
    second.compile()
    second.attach_capture([lab.cgroup])
    assert {n: i.id for n, i in loader.inspect(bpffs).links.items()} == links  # swapped in place
    assert attached_programs(lab.cgroup, hooks) != attached
    removed = loader.uninstall(bpffs)
    assert {f"link mbpf_getsockopt-{cg}", "map mbpf_cap_pod", "map mbpf_cap_pair"} <= set(removed)
    assert attached_programs(lab.cgroup, hooks) == []


@pytest.mark.fallback
def test_without_the_capture_feature_socket_lb_runs_and_capture_is_refused_clearly(
        lab, probe, bpffs, start_agent, monkeypatch):
    """README "Kernels": before 5.7 (no cgroup and uid helpers in connect)
    capture is not compiled; socket-LB is unchanged."""
    monkeypatch.setenv("MESHBPF_DISABLE_FEATURES", "capture")
    start_agent(web_service(lab))
    assert probe("client", "whoami", "10.96.0.10", 80, 5)["errors"] == {}
    assert not (bpffs / "mbpf_cap_pod").exists()
    lb = SockLB(bpffs=bpffs)
    lb.compile()
    with pytest.raises(loader.DatapathError, match="^sidecar capture is not available on this kernel"):
        lb.attach_capture([lab.cgroup])


@pytest.mark.fallback
@pytest.mark.needs_feature("capture_getsockname")
def test_without_getsockname_hooks_capture_keeps_its_other_hooks(lab, bpffs, monkeypatch):
    """Before 5.8 (no getsockname hooks) capture attaches sockops and
    getsockopt only; an agent that finds getsockname links it no longer
    wants (as after a kernel downgrade) removes them."""
    cg = cgroup_id(lab.cgroup)
    sockname = (loader.ATTACH_GETSOCKNAME4, loader.ATTACH_GETSOCKNAME6)
    full = SockLB(bpffs=bpffs)
    full.compile()
    full.attach_capture([lab.cgroup])
    assert len(attached_programs(lab.cgroup, sockname)) == 2
    monkeypatch.setenv("MESHBPF_DISABLE_FEATURES", "capture_getsockname")
    without = SockLB(bpffs=bpffs)
    without.compile()
    without.attach_capture([lab.cgroup])
    assert set(loader.inspect(bpffs).links) == {f"mbpf_cap_sockops-{cg}", f"mbpf_getsockopt-{cg}"}
    assert attached_programs(lab.cgroup, sockname) == []
    assert len(attached_programs(lab.cgroup, (loader.ATTACH_GETSOCKOPT, loader.ATTACH_SOCK_OPS))) == 2
    loader.uninstall(bpffs)
    assert attached_programs(lab.cgroup, (loader.ATTACH_GETSOCKOPT, loader.ATTACH_SOCK_OPS)) == []
