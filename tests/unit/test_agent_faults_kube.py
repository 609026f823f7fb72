"""The agent on the Kubernetes source while the API server misbehaves: 500
answers, garbage on a watch, 410 Gone, a watch gone silent, garbage in a
list. The agent (fake maps, real HTTP endpoints, the real source against
the fake API server) must keep answering /healthz, stay ready on the last
good state, keep it in the maps, and take the next change once the server
behaves again.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from k8s_builders import endpoint_slice, ep, service
from meshbpf.agent import Agent, AgentOptions
from meshbpf.health import HealthServer
from meshbpf.reconcile import plan, wanted_services
from meshbpf.retry import Backoff
from meshbpf.sources.errors import ConfigError
from meshbpf.sources.kube_watch import Reflector
from test_agent_loop import FakeLB, FakeMaps
from test_kubernetes_source import DEADLINE, FAST, api, make_source, no_leaked_threads, wait_for  # noqa: F401

WEB = "10.96.12.34:80/TCP"       # default/web in cluster-list.yaml


def get(server: HealthServer, path: str) -> tuple[int, dict | str]:
    try:
        with urllib.request.urlopen(f"http://{server.address}{path}", timeout=10) as resp:
            code, body = resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        code, body = exc.code, exc.read().decode()
    return code, json.loads(body) if body.startswith("{") else body


@pytest.fixture
def agent_on_api(api, make_source, cluster_list):
    """An agent on the API source with fake maps, stepped by the test, and
    its /healthz and /readyz served over HTTP."""
    api.load(cluster_list)
    source = make_source().source
    agent = Agent(AgentOptions(source="kubernetes", listen="127.0.0.1:0"), source=source, lb=FakeLB())
    agent.lbsync.maps = FakeMaps()
    agent.target = Path("/sys/fs/cgroup/fake")
    agent.lbsync.retry, agent.redirect_retry = Backoff(0.01, 0.04), Backoff(0.01, 0.04)
    server = HealthServer(agent.opts.listen, agent.metrics.registry, alive=agent.alive,
                          ready=agent.ready, details=agent.health_details)
    server.start()
    yield agent, server
    server.stop()


def step_until(agent: Agent, check, what: str) -> None:
    def stepped() -> bool:
        agent.step()
        return check()
    wait_for(stepped, what)


def maps_match(agent: Agent) -> bool:
    return plan(agent.lbsync.maps.state, wanted_services(agent.desired)).writes == 0


def test_api_faults_keep_the_agent_alive_ready_and_on_its_last_state(agent_on_api, api):
    agent, server = agent_on_api
    step_until(agent, agent.ready, "the first state in the maps")
    first = agent.desired
    assert get(server, "/healthz")[0] == 200 and get(server, "/readyz")[0] == 200

    # 500 on every Service request, the open watches cut: retried with backoff.
    api.failing.add("Service")
    api.drop_watches()
    services = agent.source.reflectors["services"]
    wait_for(lambda: services._failures >= 1, "a Service request to fail")
    # Garbage on the other watches, then 410 Gone, then silence.
    api.send_raw_line(b'{"type": "ADDED", "object": {"metadata": "not a map"}}')
    api.send_raw_line(b"\xff\xfe not json at all")
    api.expire_watches()
    api.silence_watches()
    for _ in range(20):
        agent.step()
        code, health = get(server, "/healthz")
        assert code == 200 and health["source"]["ok"], health
        assert get(server, "/readyz")[0] == 200      # the maps still match the last good state
    assert agent.desired is first and maps_match(agent)

    # The server behaves again: the next change lands.
    api.failing.clear()
    api.apply(service("after", "10.96.201.7"), endpoint_slice("after-x", "after", [ep("10.244.7.7")]))
    step_until(agent, lambda: any(str(f) == "10.96.201.7:80/TCP" for f in agent.desired.service_ports)
               and maps_match(agent), "the change after the faults")
    assert any(str(f) == WEB for f in agent.desired.service_ports)
    assert get(server, "/readyz")[0] == 200


def test_500s_before_the_first_list_are_alive_not_ready_then_ready(api, make_source, cluster_list):  # noqa: F811
    api.load(cluster_list)
    api.failing.add("Service")                   # from the first request on
    source = make_source().source
    agent = Agent(AgentOptions(source="kubernetes", listen="127.0.0.1:0"), source=source, lb=FakeLB())
    agent.lbsync.maps = FakeMaps()
    agent.target = Path("/sys/fs/cgroup/fake")
    server = HealthServer(agent.opts.listen, agent.metrics.registry, alive=agent.alive,
                          ready=agent.ready, details=agent.health_details)
    server.start()
    try:
        services = source.reflectors["services"]
        wait_for(lambda: services._failures >= 2, "two failed Service lists")
        agent.step()
        assert get(server, "/healthz")[0] == 200  # the loop runs: nothing to restart
        assert get(server, "/readyz")[0] == 503   # nothing programmed from the cluster yet
        api.failing.clear()
        step_until(agent, agent.ready, "the first state once the lists succeed")
        assert get(server, "/readyz")[0] == 200 and maps_match(agent)
    finally:
        server.stop()


class _Response:
    """Just enough of a urllib3 response for a Reflector."""

    def __init__(self, data: bytes = b"", block: threading.Event | None = None):
        self.data, self._block = data, block

    def stream(self, amt=None, decode_content=False):
        self._block.wait(DEADLINE)  # a watch that stays open and quiet
        return iter(())

    def release_conn(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_one_garbage_item_in_a_list_does_not_block_its_collection():
    web = service("web", "10.96.12.34")
    body = {"kind": "ServiceList", "metadata": {"resourceVersion": "10"},
            "items": [web, {"metadata": "not a map"}, 7, {"metadata": {"name": ["x"]}}]}
    stop = threading.Event()
    lists = []

    def list_services(**kwargs):
        if kwargs.get("watch"):
            return _Response(block=stop)
        lists.append(1)
        return _Response(json.dumps(body).encode())

    reflector = Reflector("services", list_services, kind="Service", api_version="v1",
                          backoff=FAST)
    reflector.start()
    try:
        wait_for(lambda: reflector.synced.is_set() or len(lists) >= 2, "the list taken, or tried again")
        synced = reflector.synced.is_set()
    finally:
        stop.set()
        reflector.stop()
    assert synced, "one bad item kept every Service out"
    assert [o["metadata"]["name"] for o in reflector.items()] == ["web"]


def node(labels) -> dict:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a", "labels": labels}}


def test_a_node_with_labels_that_are_not_a_map_blocks_nothing(api, make_source, cluster_list):  # noqa: F811
    api.load(cluster_list)
    api.apply(node({"topology.kubernetes.io/zone": "a"}))
    p = make_source()
    p.first()
    version = api.apply(node(["topology.kubernetes.io/zone=a"]))
    wait_for(lambda: int(p.source.reflectors["node"].resource_version) >= version, "the Node's event")
    version = api.apply(service("after", "10.96.201.7"), endpoint_slice("after-x", "after", [ep("10.244.7.7")]))
    wait_for(lambda: all(int(p.source.reflectors[r].resource_version) >= version - 1
                         for r in ("services", "endpointslices")), "the Service's events")
    try:                                         # as the agent polls: a rejected build is logged
        p.poll()
    except ConfigError:
        pass
    assert p.emitted and any(str(f) == "10.96.201.7:80/TCP" for f in p.emitted[-1].service_ports)
