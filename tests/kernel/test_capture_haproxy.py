"""Sidecar capture with a real proxy (issue 11, "Proof"): Debian's HAProxy
as the sidecar of a lab pod, uid 1337, `option transparent` on 15001/15006
(tests/kernel/sidecar.py). An app's curl to a Service address reaches a
backend through HAProxy, and HAProxy's log names the Service address as the
original destination.

The baseline is Istio's own iptables REDIRECT capture in the pod's network
namespace; it validates the harness, and shows the composition problem
meshbpf solves: with socket-LB in the app's pod, iptables captures the
backend, not the Service (cilium#16583).
"""

from __future__ import annotations

import shutil

import pytest

from . import k8s
from .sidecar import HAProxySidecar, IstioIptables, endpoint

pytestmark = [pytest.mark.bounds,
              pytest.mark.skipif(not shutil.which("haproxy"),
                                 reason="needs haproxy (scripts/setup.sh installs it)")]

APP = "mesh/app"          # its own pod cgroup, as kubelet lays it out
SVC4, SVC6 = "10.96.0.10", "fd00:96::10"
WEB = ("web-1", "web-2")


def web_objects(lab) -> list[dict]:
    """A dual-stack Service on :80 over web-1 and web-2's whoami on :8080."""
    return [
        k8s.service("web", [SVC4, SVC6], [k8s.port("http", 80, 8080)]),
        k8s.endpoint_slice("web-4", "web", [k8s.endpoint(str(lab.pods[p].ipv4)) for p in WEB],
                           [k8s.slice_port("http", 8080)]),
        k8s.endpoint_slice("web-6", "web", [k8s.endpoint(str(lab.pods[p].ipv6)) for p in WEB],
                           [k8s.slice_port("http", 8080)], address_type="IPv6"),
    ]


def curl(lab, pod: str, address: str, *, in_cgroup: bool = True) -> str:
    host = f"[{address}]" if ":" in address else address
    r = lab.run(pod, ["curl", "-sS", "-g", "--max-time", "10", f"http://{host}/"],
                in_cgroup=in_cgroup, timeout=30)
    assert r.returncode == 0, f"curl {address} from {pod}: {r.stderr}"
    return r.stdout.strip()


@pytest.fixture
def app(lab):
    lab.add_pod(APP)
    return APP


@pytest.fixture
def haproxy(lab, app, tmp_path):
    with HAProxySidecar(lab, app, tmp_path) as proxy:
        yield proxy
    print(f"--- HAProxy log ---\n{proxy.log()}")


def test_iptables_baseline_haproxy_names_the_service(lab, app, haproxy, start_agent):
    """Istio's iptables capture, the app outside socket-LB (as Cilium's
    socketLB.hostNamespaceOnly leaves it): HAProxy reads the Service address
    with SO_ORIGINAL_DST, and its own connect is load-balanced by socket-LB."""
    start_agent(web_objects(lab))
    with IstioIptables(lab, app) as rules:
        assert "-j ISTIO_REDIRECT" in rules.nat_rules(4)
        answers = {curl(lab, app, SVC4, in_cgroup=False) for _ in range(6)}
        assert answers <= set(WEB) and answers, answers
        seen = haproxy.wait_connections(6)
    assert {c.listener for c in seen} == {"outbound"}
    assert {c.orig for c in seen} == {endpoint(SVC4, 80)}, seen
    assert all(c.status == "--" for c in seen), seen


def test_iptables_capture_behind_socket_lb_sees_a_backend(lab, app, haproxy, start_agent):
    """The composition problem: socket-LB translates the app's connect
    before iptables sees a packet, so the proxy's original destination is a
    backend, not the Service (cilium#16583). meshbpf's capture runs first."""
    start_agent(web_objects(lab))
    with IstioIptables(lab, app):
        answer = curl(lab, app, SVC4)
        seen = haproxy.wait_connections(1)
    assert answer in WEB
    assert seen[0].orig == endpoint(lab.pods[answer].ipv4, 8080), seen
