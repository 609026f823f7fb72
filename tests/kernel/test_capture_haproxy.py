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

import json
import shutil
import signal
import time

import pytest

from meshbpf.lab.objects import lab_objects
from meshbpf.lab.workloads import start_whoami, wait_for

from . import k8s
from .conftest import Load
from .sidecar import HAProxySidecar, IstioIptables, endpoint

pytestmark = [pytest.mark.realtool,
              pytest.mark.skipif(not shutil.which("haproxy"),
                                 reason="needs haproxy (scripts/setup.sh installs it)")]

APP = "mesh/app"          # its own pod cgroup, as kubelet lays it out
NODE = "lab-node"
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


def meshed_world(lab) -> list[dict]:
    """web_objects, the app pod marked meshed (Istio's injection annotation)
    and AgentConfig's capture on with the Istio preset."""
    return web_objects(lab) + [
        lab_objects([lab.pods[APP]], NODE, meshed=[APP]),
        {"apiVersion": "meshbpf.io/v1alpha1", "kind": "AgentConfig", "metadata": {"name": "meshbpf"},
         "spec": {"capture": {"enabled": True, "mesh": "istio"}}}]


def start_meshed(lab, start_agent, objects=None):
    """An agent with the app pod meshed; returns once it says captured."""
    # The Pod objects make the agent track the lab's endpoints too: it must
    # find their veths in the lab's node namespace.
    agent = start_agent(objects, "--node-name", NODE, "--node-netns", lab.node_ns)

    def captured():
        pods = json.loads(agent.get("/v1/capture")[1])["pods"]
        return [p for p in pods if f"{p['namespace']}/{p['name']}" == APP and p["state"] == "captured"]
    wait_for(captured, 60, f"{APP} to be captured")
    return agent


def curl(lab, pod: str, address: str, port: int = 80, *, in_cgroup: bool = True) -> str:
    host = f"[{address}]" if ":" in address else address
    r = lab.run(pod, ["curl", "-sS", "-g", "--max-time", "10", f"http://{host}:{port}/"],
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
    print("--- HAProxy log (last lines) ---\n" + "\n".join(proxy.log().splitlines()[-20:]))


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


# --- meshbpf capture --------------------------------------------------------

CAPTURE = pytest.mark.needs_feature("capture")

# HAProxy 2.6 reads an IPv4 connection's original destination with
# SO_ORIGINAL_DST and an IPv6 one's with getsockname() (sock_get_dst): the
# IPv6 case needs the getsockname hooks (5.8+).
FAMILIES = pytest.mark.parametrize("family", [
    4, pytest.param(6, marks=pytest.mark.needs_feature("capture_getsockname")),
], ids=["ipv4", "ipv6"])


@CAPTURE
@FAMILIES
def test_meshbpf_capture_haproxy_names_the_service(lab, app, haproxy, start_agent, family):
    """No iptables in the pod: the app's connect is captured at connect()
    before socket-LB, HAProxy reads the Service address, and its own
    connect to it is load-balanced to a backend."""
    start_meshed(lab, start_agent, meshed_world(lab))
    rules = IstioIptables(lab, app).nat_rules(family)
    assert "ISTIO" not in rules and "REDIRECT" not in rules, rules
    svc = SVC4 if family == 4 else SVC6
    answers = {curl(lab, app, svc) for _ in range(6)}
    assert answers <= set(WEB) and answers, answers
    seen = haproxy.wait_connections(6)
    assert {c.listener for c in seen} == {"outbound"}, seen
    assert {c.orig for c in seen} == {endpoint(svc, 80)}, seen
    assert all(c.status == "--" for c in seen), seen


@CAPTURE
def test_meshbpf_inbound_from_a_same_node_client_goes_through_haproxy(lab, app, haproxy, start_agent):
    """A same-node client's connect to the meshed pod's port lands on
    HAProxy's inbound port, which forwards to the app's original port."""
    start_whoami(lab, app, 8080, "app")
    start_meshed(lab, start_agent, meshed_world(lab))
    pod_ip = lab.pods[APP].ipv4
    assert curl(lab, "client", str(pod_ip), 8080) == "app"
    seen = haproxy.wait_connections(1)
    assert [(c.listener, c.orig) for c in seen] == [("inbound4", endpoint(pod_ip, 8080))], seen


@CAPTURE
def test_proxy_down_refuses_at_once_and_a_restarted_proxy_is_used_again(lab, app, haproxy, start_agent):
    agent = start_meshed(lab, start_agent, meshed_world(lab))
    haproxy.stop()
    r = lab.run(app, ["curl", "-sS", "--max-time", "10", f"http://{SVC4}/"], timeout=30)
    assert r.returncode == 7, f"curl should fail to connect (refused): {r.returncode} {r.stderr}"
    haproxy.start()   # no agent action
    assert curl(lab, app, SVC4) in WEB
    assert haproxy.wait_connections(1)[-1].orig == endpoint(SVC4, 80)
    assert agent.proc.poll() is None


# Heavy: the longest test in the VMs (3.5 min on 5.10 under TCG). The host runs
# it; the pinned capture links it relies on are tested on every VM kernel
# (test_capture_datapath), and agent kill -9 under load on 5.10 (test_agent).
@pytest.mark.heavy
@CAPTURE
def test_agent_kill9_with_a_meshed_pod_under_load_drops_no_connection(lab, app, haproxy, probe,
                                                                      start_agent):
    """Pinned maps and links keep capturing with no agent, and a new agent
    takes them over without a gap."""
    agent = start_meshed(lab, start_agent, meshed_world(lab))
    load = Load(probe, app, SVC4, 80)
    agent.stop(signal.SIGKILL)
    killed = time.monotonic()
    start_meshed(lab, start_agent)
    ready = time.monotonic()
    result = load.stop()
    assert result["errors"] == {}, result
    assert set(result["answers"]) <= set(WEB), result
    load.assert_spans(killed, ready)
    answered = sum(result["answers"].values())
    seen = haproxy.wait_connections(answered)
    assert {c.orig for c in seen} == {endpoint(SVC4, 80)}, "every connection went through HAProxy"


@CAPTURE
@FAMILIES
def test_meshbpf_inbound_from_another_node_goes_through_haproxy(tmp_path, family):
    """A client on node 2 (no connect hook sees it) connects to the meshed
    pod on node 1: the tc programs on the pod's interface bring it to
    HAProxy's inbound port (its listeners use SO_REUSEPORT, HAProxy's
    default), which reads the original destination and forwards to the app."""
    from meshbpf.lab.netlab import Lab
    from meshbpf.lab.workloads import AgentProcess

    from .conftest import AGENT_READY_TIMEOUT, BPFFS_ROOT, LAB_PREFIX, PIN_PREFIX, _names
    with Lab(f"{LAB_PREFIX}{next(_names)}") as lab2:
        lab2.up([APP], ["remote"])
        start_whoami(lab2, APP, 8080, "app")
        world = [lab_objects([lab2.pods[APP]], NODE, meshed=[APP]),
                 {"apiVersion": "meshbpf.io/v1alpha1", "kind": "AgentConfig", "metadata": {"name": "meshbpf"},
                  "spec": {"capture": {"enabled": True, "mesh": "istio"}}}]
        agent = AgentProcess(k8s.write(tmp_path / "world.yaml", world), lab2.node(1).cgroup,
                             BPFFS_ROOT / f"{PIN_PREFIX}{next(_names)}",
                             ["--node-name", NODE, "--node-netns", lab2.node(1).netns])
        try:
            with HAProxySidecar(lab2, APP, tmp_path) as haproxy:
                agent.start(timeout=AGENT_READY_TIMEOUT)
                pod_ip = getattr(lab2.pods[APP], f"ipv{family}")
                remote = getattr(lab2.pods["remote"], f"ipv{family}")
                # Captured in the view: the tc programs went on in that same sync.
                wait_for(lambda: json.loads(agent.get("/v1/capture")[1])["pods"][0]["state"]
                         == "captured", 60, f"{APP} to be captured")
                answers = [curl(lab2, "remote", str(pod_ip), 8080) for _ in range(2)]
                seen = haproxy.wait_connections(2)
        finally:
            print(f"--- agent log ---\n{agent.log()}")
            agent.cleanup()
    assert answers == ["app", "app"]
    assert {(c.listener, c.orig, c.client.rsplit(":", 1)[0]) for c in seen} == {
        (f"inbound{family}", endpoint(pod_ip, 8080), str(remote))}, seen
    assert all(c.status == "--" for c in seen), seen
