"""The Kubernetes API source, against a fake API server over real HTTP.

No cluster: fake_apiserver.py speaks the API server's list and watch protocol
on 127.0.0.1, and the source talks to it through the real client library
(load_kube_config, the generated list calls, urllib3). Faults are made on
the server side: chunked streams, bookmarks, 410 Gone, dropped connections,
outages. Each test waits (with a generous deadline, never a timing
assertion) for the source to converge, and checks every state it returned on
the way: none may be empty or half-listed.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Callable

import pytest
import yaml

from fake_apiserver import FakeAPIServer
from k8s_builders import build, endpoint_slice, ep, service
from meshbpf.model import AgentSettings, DesiredState
from meshbpf.sources.errors import ConfigError
from meshbpf.sources.kube_watch import Backoff
from meshbpf.sources.kubernetes import KubernetesSource
from meshbpf.sources.yaml_file import read_config
from policy_world import netpol, ns_obj, pod_obj

FIXTURES = Path(__file__).parent / "fixtures"
FAST = Backoff(initial=0.05, cap=0.5, jitter=1.0)
DEADLINE = 20.0  # seconds; waits end as soon as their condition holds


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def view(state: DesiredState) -> dict[str, list[str]]:
    """frontend -> sorted endpoint addresses: what a test compares."""
    return {str(f): sorted(str(e.address) for e in sp.endpoints)
            for f, sp in state.service_ports.items()}


class Poller:
    """Polls the source like the agent's loop does, keeping every state it returned."""

    def __init__(self, source: KubernetesSource, api: FakeAPIServer | None = None):
        self.source = source
        self.api = api
        self.emitted: list[DesiredState] = []

    def poll(self) -> DesiredState | None:
        state = self.source.poll()
        if state is not None:
            self.emitted.append(state)
        return state

    def until(self, predicate: Callable[[dict[str, list[str]]], bool], what: str) -> DesiredState:
        holder: list[DesiredState] = []

        def done() -> bool:
            self.poll()
            if self.emitted and predicate(view(self.emitted[-1])):
                holder.append(self.emitted[-1])
                return True
            return False
        wait_for(done, what)
        return holder[0]

    def wait(self, condition: Callable[[], bool], what: str) -> None:
        """Keeps polling (problems are logged when a poll builds) until condition holds."""
        def polled() -> bool:
            self.poll()
            return condition()
        wait_for(polled, what)

    def first(self) -> DesiredState:
        """The first state, once every collection's watch is open too, so
        that faults the test makes next hit open watches."""
        state = self.until(lambda v: True, "the first complete state")
        if self.api is not None:
            kinds = {"services": "Service", "endpointslices": "EndpointSlice",
                     "configmap": "ConfigMap", "node": "Node", "pods": "Pod",
                     "namespaces": "Namespace", "networkpolicies": "NetworkPolicy",
                     "tcproutes": "TCPRoute", "udproutes": "UDPRoute", "referencegrants": "ReferenceGrant"}
            wait_for(lambda: all(self.api.watching(kinds[k]) for k in self.source.reflectors),
                     "every watch to be open")
        return state

    def assert_never_lost(self, frontends: set[str]) -> None:
        """No returned state dropped these frontends or their endpoints: no
        flush, no partial view, whatever happened in between."""
        for state in self.emitted:
            v = view(state)
            missing = {f for f in frontends if not v.get(f)}
            assert not missing, f"a state without {missing} was returned"


@pytest.fixture(autouse=True)
def no_leaked_threads():
    before = set(threading.enumerate())
    yield
    wait_for(lambda: not [t for t in threading.enumerate() if t not in before],
             "the test's threads to end")


@pytest.fixture
def api():
    server = FakeAPIServer().start()
    yield server
    server.stop()


@pytest.fixture
def make_source(api, tmp_path):
    made: list[KubernetesSource] = []

    def make(**kwargs) -> Poller:
        if "kubeconfig" not in kwargs:
            kwargs["kubeconfig"] = str(api.kubeconfig(tmp_path / "kubeconfig"))
        kwargs.setdefault("node_name", "node-a")
        kwargs.setdefault("backoff", FAST)
        made.append(KubernetesSource(**kwargs))
        return Poller(made[-1], api)
    yield make
    for source in made:
        source.stop()


def load(name: str) -> dict:
    return yaml.safe_load((FIXTURES / name).read_text())


def api_list(api: FakeAPIServer, path: str) -> dict:
    """A list straight from the fake server, as the wire carries it."""
    with urllib.request.urlopen(api.url + path) as resp:
        return json.load(resp)


WEB = "10.96.12.34:80/TCP"       # default/web in cluster-list.yaml: two endpoints
DNS = "10.96.0.10:53/UDP"        # kube-system/kube-dns


# --- The same model as the YAML source -----------------------------------------

def test_the_api_source_gives_the_same_state_as_the_yaml_source(api, make_source, cluster_list):
    api.load(cluster_list)
    p = make_source()
    state = p.first()
    assert state == read_config(cluster_list, node_name="node-a").state
    # ...which covers dual stack, and headless and ExternalName skipped:
    assert "[fd00:10:96::1234]:80/TCP" in view(state)
    assert "default/db-headless" not in state.services()
    assert "default/external-db" not in state.services()
    # The server sent list items without kind and apiVersion, as a real one does.
    assert all("kind" not in i for i in api_list(api, "/api/v1/services")["items"])


def test_no_state_until_every_collection_is_listed_and_none_when_nothing_changed(
        api, make_source, cluster_list):
    api.load(cluster_list)
    api.failing.add("ConfigMap")  # the ConfigMap list answers 500 for now
    p = make_source()
    p.source.reflectors["services"].synced.wait(DEADLINE)
    wait_for(lambda: len(api.lists("ConfigMap")) >= 3, "the ConfigMap list to be retried")
    assert p.poll() is None  # services are in, but the view is not complete
    api.failing.clear()
    p.first()
    assert p.poll() is None
    assert len(p.emitted) == 1


def test_watch_events_converge_without_a_relist(api, make_source, cluster_list):
    api.load(cluster_list)
    p = make_source()
    p.first()
    api.apply(service("shop", "10.96.9.9"),
              endpoint_slice("shop-abcde", "shop", [ep("10.244.1.9"), ep("10.244.2.9")]))
    p.until(lambda v: v.get("10.96.9.9:80/TCP") == ["10.244.1.9", "10.244.2.9"], "shop added")

    api.apply(endpoint_slice("shop-abcde", "shop", [ep("10.244.2.9")]))
    p.until(lambda v: v.get("10.96.9.9:80/TCP") == ["10.244.2.9"], "shop scaled down")

    # A second slice merges with the first, as kube-proxy merges them.
    api.apply(endpoint_slice("shop-fghij", "shop", [ep("10.244.3.9")]))
    p.until(lambda v: v.get("10.96.9.9:80/TCP") == ["10.244.2.9", "10.244.3.9"], "slices merged")

    api.delete("Service", "default", "shop")
    p.until(lambda v: "10.96.9.9:80/TCP" not in v, "shop deleted")
    assert len(api.lists("Service")) == 1
    p.assert_never_lost({WEB, DNS})


def test_events_split_across_chunks_and_several_in_one_chunk(api, make_source, cluster_list):
    api.load(cluster_list)
    p = make_source()
    p.first()
    api.chunk_size = 7  # every event line spans many chunks, chunks span lines
    services = [service(f"s{i}", f"10.96.7.{i}") for i in range(3)]
    for svc in services:  # multi-byte characters, cut by the chunks too
        svc["metadata"]["annotations"] = {"description": "Zürich café ☕ — 東京"}
    api.apply(*services,
              *[endpoint_slice(f"s{i}-x", f"s{i}", [ep(f"10.244.7.{i}")]) for i in range(3)])
    p.until(lambda v: all(v.get(f"10.96.7.{i}:80/TCP") == [f"10.244.7.{i}"] for i in range(3)),
            "three services sent in 7-byte chunks")


# --- Bookmarks, 410 Gone, dropped connections, outages ---------------------------

def test_bookmarks_let_a_watch_resume_after_compaction_without_a_relist(api, make_source, cluster_list):
    api.load(cluster_list)
    p = make_source()
    p.first()
    # Writes the source does not watch move the cluster's resourceVersion on...
    other = {"apiVersion": "v1", "kind": "ConfigMap", "data": {},
             "metadata": {"name": "unrelated", "namespace": "default"}}
    for i in range(3):
        other["data"]["n"] = str(i)
        now = api.apply(other)
    # ...and only a bookmark tells a watcher it may resume from there.
    api.bookmark()
    services = p.source.reflectors["services"]
    wait_for(lambda: all(r.resource_version == str(now) for r in p.source.reflectors.values()),
             "every watch to take the bookmark")
    api.compact()  # everything before `now` is gone
    api.drop_watches()
    api.apply(service("late", "10.96.8.8"), endpoint_slice("late-x", "late", [ep("10.244.8.8")]))
    p.until(lambda v: v.get("10.96.8.8:80/TCP") == ["10.244.8.8"], "a change after the resume")
    assert len(api.lists("Service")) == 1, "resumed from the bookmark: no 410, no relist"
    assert str(now) in [w.query.get("resourceVersion") for w in api.watches("Service")]
    assert services.lists == 1


def test_410_on_an_open_watch_relists_and_converges(api, make_source, cluster_list, caplog):
    caplog.set_level(logging.INFO, logger="meshbpf")
    api.load(cluster_list)
    p = make_source()
    p.first()
    api.expire_watches()  # ERROR events with a 410 Status on every open watch
    wait_for(lambda: len(api.lists("Service")) == 2 and api.watching("Service") == 1,
             "the relist and the new watch")
    api.apply(service("after", "10.96.8.1"), endpoint_slice("after-x", "after", [ep("10.244.8.1")]))
    p.until(lambda v: "10.96.8.1:80/TCP" in v, "a change after the relist")
    p.assert_never_lost({WEB, DNS})
    assert "listing again" in caplog.text


@pytest.mark.parametrize("as_http_status", [False, True], ids=["error-event", "http-410"])
def test_resuming_from_a_compacted_version_relists_and_converges_by_diff(
        api, make_source, cluster_list, caplog, as_http_status):
    caplog.set_level(logging.INFO, logger="meshbpf")
    api.load(cluster_list)
    api.gone_as_http_status = as_http_status
    p = make_source()
    before = p.first()
    with api.outage():
        api.delete("Service", "default", "batch")
        api.apply(service("new", "10.96.8.2"), endpoint_slice("new-x", "new", [ep("10.244.8.2")]))
        web_slices = [o for o in load("cluster-list.yaml")["items"]
                      if o["kind"] == "EndpointSlice" and o["metadata"]["name"].startswith("web-")]
        for sl in web_slices:
            sl["endpoints"] = [e for e in sl["endpoints"] if e["addresses"][0] != "10.244.2.7"]
            api.apply(sl)
        api.compact()  # the source's resourceVersion is now too old
    state = p.until(lambda v: "10.96.8.2:80/TCP" in v and "10.96.88.5:9000/TCP" not in v
                    and v[WEB] == ["10.244.1.5"], "the relisted view")
    assert len(api.lists("Service")) == 2 and len(api.lists("EndpointSlice")) == 2
    assert "services: relisted at resourceVersion" in caplog.text
    assert "1 added, 0 changed, 1 deleted" in caplog.text  # the services' diff
    # The rest is as it was: converged by difference, not rebuilt from nothing.
    unchanged = {f: sp for f, sp in before.service_ports.items()
                 if str(f) not in ("10.96.88.5:9000/TCP", WEB, "10.96.12.34:443/TCP")}
    assert all(state.service_ports[f] == sp for f, sp in unchanged.items())
    p.assert_never_lost({DNS, "10.96.0.1:443/TCP"})


def test_a_dropped_watch_resumes_from_its_resource_version(api, make_source, cluster_list):
    api.load(cluster_list)
    p = make_source()
    p.first()
    services = p.source.reflectors["services"]
    rv = services.resource_version
    api.drop_watches()  # cut in the middle of an event line
    api.apply(service("during", "10.96.8.3"), endpoint_slice("during-x", "during", [ep("10.244.8.3")]))
    p.until(lambda v: v.get("10.96.8.3:80/TCP") == ["10.244.8.3"], "the change made while cut")
    assert [w.query.get("resourceVersion") for w in api.watches("Service")][:2] == [rv, rv]
    assert len(api.lists("Service")) == 1
    p.assert_never_lost({WEB, DNS})


# --- A watch never dies silently ------------------------------------------------

@pytest.mark.parametrize("line", [b"[]", b"42", b"not json", b'{"type": "ADDED", "object": []}'],
                         ids=["list", "number", "not-json", "object-not-a-map"])
def test_a_line_that_is_not_an_event_is_survived_by_a_relist(api, make_source, cluster_list,
                                                            caplog, line):
    """One unexpected line used to end the watch thread: the collection froze
    while /healthz stayed OK."""
    api.load(cluster_list)
    p = make_source()
    p.first()
    services = p.source.reflectors["services"]
    api.send_raw_line(line)
    wait_for(lambda: services.lists == 2, "the relist after the bad line")
    assert "not an event" in caplog.text or "not JSON" in caplog.text
    api.apply(service("later", "10.96.8.6"), endpoint_slice("later-x", "later", [ep("10.244.8.6")]))
    p.until(lambda v: v.get("10.96.8.6:80/TCP") == ["10.244.8.6"], "a change after the bad line")
    health = p.source.health()
    assert health["ok"] and all(w["alive"] for w in health["watches"].values()), health
    p.assert_never_lost({WEB, DNS})


def test_a_silent_watch_is_reopened_after_two_bookmark_intervals(api, make_source, cluster_list):
    """A half-open connection: no event, no bookmark, no end. Without a read
    timeout near the bookmark interval the source would wait for minutes."""
    api.load(cluster_list)
    p = make_source(bookmark_interval=0.5)  # so a watch quiet for 1 s is dead
    p.first()
    watches = len(api.watches("Service"))
    api.silence_watches()
    api.apply(service("quiet", "10.96.8.7"), endpoint_slice("quiet-x", "quiet", [ep("10.244.8.7")]))
    p.until(lambda v: v.get("10.96.8.7:80/TCP") == ["10.244.8.7"], "the change, through a new watch")
    assert len(api.watches("Service")) > watches
    assert len(api.lists("Service")) == 1  # resumed from its resourceVersion


def test_lists_read_the_watch_cache_and_read_etcd_only_after_a_410(api, make_source, cluster_list):
    """client-go's rule: resourceVersion=0 spares etcd when every node lists
    at once; after 410 Gone the cache may be what lagged, so read etcd."""
    api.load(cluster_list)
    p = make_source()
    p.first()
    assert [r.query.get("resourceVersion") for r in api.lists("Service")] == ["0"]
    api.expire_watches()
    wait_for(lambda: len(api.lists("Service")) == 2, "the relist after 410")
    assert api.lists("Service")[1].query.get("resourceVersion") is None
    wait_for(lambda: len(api.watches("Service")) == 2 and api.watching("Service") == 1,
             "the new watch")
    api.send_raw_line(b"[]")  # a relist for another reason reads the cache again
    wait_for(lambda: len(api.lists("Service")) == 3, "the relist after a bad line")
    assert api.lists("Service")[2].query.get("resourceVersion") == "0"


def test_health_shows_each_watch_and_a_dead_one(api, make_source, cluster_list):
    api.load(cluster_list)
    p = make_source()
    p.first()
    health = p.source.health()
    assert health["ok"] is True
    assert set(health["watches"]) == set(p.source.reflectors) and "services" in health["watches"]
    assert all(w["alive"] and 0 <= w["last_event_age_s"] < DEADLINE for w in health["watches"].values())
    p.source.reflectors["services"].stop()
    health = p.source.health()
    assert health["ok"] is False and health["watches"]["services"]["alive"] is False
    assert health["watches"]["endpointslices"]["alive"] is True


def test_api_connections_use_tcp_keepalive(api, tmp_path):
    import socket
    from meshbpf.sources.kubernetes import load_client_config
    options = load_client_config(str(api.kubeconfig(tmp_path / "kubeconfig"))).socket_options
    assert (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1) in options
    idle = [v for level, name, v in options if name == socket.TCP_KEEPIDLE]
    assert idle and idle[0] <= 30


def test_api_outage_keeps_the_last_state_and_converges_after(api, make_source, cluster_list, caplog):
    caplog.set_level(logging.DEBUG, logger="meshbpf.sources.kube_watch")
    api.load(cluster_list)
    p = make_source()
    first = p.first()
    with api.outage():
        api.apply(service("while-down", "10.96.8.4"),
                  endpoint_slice("while-down-x", "while-down", [ep("10.244.8.4")]))
        api.delete("Service", "monitoring", "grafana")
        wait_for(lambda: "services: NewConnectionError" in caplog.text
                 and "(attempt 4)" in caplog.text, "reconnection attempts")
        for _ in range(10):
            assert p.poll() is None  # still what it had: nothing to change
    # Each retry waited longer than the one before (jitter stays within the doubling).
    delays = [float(d) for d in re.findall(r"services: .*\(attempt \d\); retrying in ([\d.]+)s",
                                           caplog.text)][:3]
    assert len(delays) == 3 and delays == sorted(delays) and delays[0] < delays[2]
    p.until(lambda v: "10.96.8.4:80/TCP" in v and "10.96.140.2:80/TCP" not in v,
            "the changes made during the outage")
    assert len(api.lists("Service")) == 1  # resumed the watch: history was still there
    assert p.emitted[0] is first and len(p.emitted) >= 2
    p.assert_never_lost({WEB, DNS})


def test_starting_during_an_outage_waits_for_the_api(api, make_source, cluster_list):
    api.load(cluster_list)
    with api.outage():
        p = make_source()
        for _ in range(10):
            assert p.poll() is None
            time.sleep(0.01)
    assert p.first() == read_config(cluster_list, node_name="node-a").state


def test_lists_are_paged_and_an_expired_continue_token_restarts_the_list(
        api, make_source, cluster_list):
    api.load(cluster_list)
    api.expire_next_continue = True
    p = make_source(page_size=3)
    assert p.first() == read_config(cluster_list, node_name="node-a").state
    first_pages = [r for r in api.requests if not r.watch and "continue" not in r.query
                   and r.kind in ("Service", "EndpointSlice")]
    assert len(first_pages) == 3  # one per collection, and one restart
    assert all(r.query["limit"] == "3" for r in first_pages)
    assert len([r for r in api.lists("Service") if "continue" in r.query]) >= 3


def test_backoff_grows_is_capped_and_jittered():
    b = Backoff(initial=1.0, cap=8.0, jitter=1.0)
    assert [b.delay(n, rand=lambda: 0.0) for n in range(1, 7)] == [1, 2, 4, 8, 8, 8]
    assert b.delay(3, rand=lambda: 1.0) == 8.0  # up to twice the base
    delays = {b.delay(2) for _ in range(50)}
    assert len(delays) > 1 and all(2.0 <= d <= 4.0 for d in delays)


# --- kube-proxy semantics through the API ----------------------------------------

PROXY_FIXTURE = FIXTURES / "k8s-proxy-name.yaml"
LEDGER, FRAUD, GATEWAY = "10.96.60.10:443/TCP", "10.96.60.20:80/TCP", "10.96.60.30:80/TCP"


@pytest.mark.parametrize("proxy_name, selector, ours", [
    (None, "!service.kubernetes.io/service-proxy-name", {GATEWAY}),
    ("meshbpf", "service.kubernetes.io/service-proxy-name=meshbpf", {LEDGER}),
])
def test_service_proxy_name_selects_the_services_kube_proxy_skips(
        api, make_source, proxy_name, selector, ours):
    api.load(PROXY_FIXTURE)
    p = make_source(service_proxy_name=proxy_name)
    assert set(view(p.first())) == ours
    assert {r.query.get("labelSelector") for r in api.requests if r.kind == "Service"} == {selector}


def test_relabelling_a_service_moves_it_between_proxies(api, make_source):
    api.load(PROXY_FIXTURE)
    p = make_source(service_proxy_name="meshbpf")
    p.first()
    gateway = api.get("Service", "payments", "gateway")
    gateway["metadata"]["labels"]["service.kubernetes.io/service-proxy-name"] = "meshbpf"
    api.apply(gateway)  # enters the selection: the watch sends ADDED
    p.until(lambda v: set(v) == {LEDGER, GATEWAY}, "gateway handed to meshbpf")
    ledger = api.get("Service", "payments", "ledger")
    del ledger["metadata"]["labels"]["service.kubernetes.io/service-proxy-name"]
    api.apply(ledger)  # leaves the selection: the watch sends DELETED
    p.until(lambda v: set(v) == {GATEWAY}, "ledger handed back to kube-proxy")
    assert not any(FRAUD in view(state) for state in p.emitted)  # another proxy's, throughout


TOPOLOGY = FIXTURES / "k8s-topology.yaml"
CATALOG, CHECKOUT, INVENTORY = "10.96.50.20:80/TCP", "10.96.50.10:80/TCP", "10.96.50.30:80/TCP"


def test_topology_hints_follow_the_zone_label_of_this_node(api, make_source):
    api.load(TOPOLOGY)
    api.load(FIXTURES / "k8s-node.yaml")  # node-a, topology.kubernetes.io/zone: zone-a
    p = make_source(node_name="node-a")
    v = view(p.first())
    assert v[CHECKOUT] == ["10.244.1.21"]  # every ready endpoint hinted: zone-a's only
    assert v[CATALOG] == ["10.244.1.31", "10.244.2.31", "10.244.3.31"]  # one lacks a hint
    assert v[INVENTORY] == ["10.244.1.41"]  # Local: this node's, hints play no part

    node = api.get("Node", "", "node-a")
    node["metadata"]["labels"]["topology.kubernetes.io/zone"] = "zone-b"
    api.apply(node)
    p.until(lambda v: v[CHECKOUT] == ["10.244.2.21"], "the node moved to zone-b")
    node["metadata"]["labels"]["topology.kubernetes.io/zone"] = "zone-x"
    api.apply(node)
    p.until(lambda v: len(v[CHECKOUT]) == 4, "no endpoint hinted for zone-x: all of them")


def test_without_the_node_object_hints_are_not_used(api, make_source):
    api.load(TOPOLOGY)
    p = make_source(node_name="node-a")
    assert len(view(p.first())[CHECKOUT]) == 4
    api.load(FIXTURES / "k8s-node.yaml")
    p.until(lambda v: v[CHECKOUT] == ["10.244.1.21"], "the Node appeared")


def test_local_traffic_policy_uses_this_nodes_endpoints(api, make_source, cluster_list):
    api.load(cluster_list)
    on_a = make_source(node_name="node-a")
    on_b = make_source(node_name="node-b")
    assert view(on_a.first())["10.96.81.25:8125/UDP"] == ["10.244.1.50"]
    assert view(on_b.first())["10.96.81.25:8125/UDP"] == ["10.244.2.50"]


# --- Agent settings, problems, pods ---------------------------------------------

CONFIG_MAP = FIXTURES / "k8s-configmap.yaml"


def test_agent_settings_come_from_the_config_map(api, make_source, cluster_list, caplog):
    caplog.set_level(logging.INFO, logger="meshbpf")
    api.load(cluster_list)
    api.load(CONFIG_MAP)
    p = make_source(config_map="kube-system/meshbpf-config")
    redirect = p.first().settings.redirect
    assert redirect.enabled and redirect.cgroups == ("kubepods.slice",)
    assert [str(c) for c in redirect.pod_cidrs] == ["10.244.0.0/16", "fd00:10:244::/56"]
    assert {r.query.get("fieldSelector") for r in api.requests if r.kind == "ConfigMap"} == {
        "metadata.name=meshbpf-config"}

    cm = api.get("ConfigMap", "kube-system", "meshbpf-config")
    cm["data"]["agent-config.yaml"] = cm["data"]["agent-config.yaml"].replace(
        "enabled: true", "enabled: false")
    api.apply(cm)
    p.wait(lambda: not p.emitted[-1].settings.redirect.enabled, "redirect turned off")

    good = p.emitted[-1].settings
    cm["data"]["agent-config.yaml"] = "spec: [unclosed"
    api.apply(cm)
    p.wait(lambda: "not valid YAML" in caplog.text, "the bad ConfigMap to be reported")
    assert p.emitted[-1].settings == good  # the last good settings stay
    assert view(p.emitted[-1]) == view(p.emitted[0])  # services untouched

    api.delete("ConfigMap", "kube-system", "meshbpf-config")
    p.wait(lambda: "resolved" in caplog.text, "the problem to go with the ConfigMap")


@pytest.mark.parametrize("bad", [
    "apiVersion: meshbpf.io/v1alpha1\nkind: AgentConfig\nmetadata: foo\n",
    "apiVersion: meshbpf.io/v1alpha1\nkind: AgentConfig\nspec: {socketRedirect: {enabled: 3}}\n",
    "spec: [unclosed\n",
    "- just\n- a list\n",
    "apiVersion: meshbpf.io/v1alpha1\nkind: AgentConfig\nmetadata: {name: Mesh_BPF}\n",
], ids=["metadata-string", "wrong-type", "bad-yaml", "not-an-object", "name-kubernetes-refuses"])
def test_an_invalid_config_map_keeps_the_last_good_settings(api, make_source, cluster_list, caplog,
                                                           bad):
    """Through the ConfigMap a bad edit reaches every node at once: it must
    neither crash them nor reset them all to the defaults. Deleting the
    ConfigMap does give the defaults."""
    api.load(cluster_list)
    api.load(CONFIG_MAP)
    p = make_source()
    good = p.first().settings
    assert good.redirect.enabled
    cm = api.get("ConfigMap", "kube-system", "meshbpf-config")
    cm["data"]["agent-config.yaml"] = bad
    api.apply(cm)
    p.wait(lambda: p.source.problems, "the bad ConfigMap to be reported")
    (problem,) = p.source.problems
    assert "meshbpf-config" in problem and "keeping the previous settings" in problem, problem
    assert p.source.build().state.settings == good
    assert p.emitted[-1].settings == good and view(p.emitted[-1]) == view(p.emitted[0])
    api.delete("ConfigMap", "kube-system", "meshbpf-config")
    p.wait(lambda: p.emitted[-1].settings == AgentSettings(), "the defaults once it is deleted")
    assert not p.source.problems


def test_an_object_with_a_problem_is_left_out_and_logged(api, make_source, cluster_list, caplog):
    api.load(cluster_list)
    p = make_source()
    p.first()
    api.apply(service("clash", "10.96.12.34"))  # web's cluster IP: a conflict
    p.wait(lambda: "already used by Service default/web" in caplog.text, "the clash reported")
    assert "left out of the state" in caplog.text
    assert len(p.source.problems) == 1 and "default/web" in p.source.problems[0]
    p.poll()
    assert "default/clash" not in p.emitted[-1].services()
    assert view(p.emitted[-1])[WEB] == ["10.244.1.5", "10.244.2.7"]
    api.delete("Service", "default", "web")
    p.until(lambda v: WEB in v and not v[WEB], "clash takes the address once web is gone")


def test_the_full_build_reports_slices_with_and_without_their_service(api, make_source, cluster_list):
    # The full build reads each Service with its slices (build_by_service);
    # a slice of no listed Service, or of none at all, is still read.
    api.load(cluster_list)
    api.apply(endpoint_slice("web-bad", "web", [ep("10.244.1.300")]))
    api.apply(endpoint_slice("gone-1", "gone", [ep("10.244.9.300")]))
    api.apply(endpoint_slice("gone-2", "gone", [ep("10.244.9.9")]))   # fine, and unused
    p = make_source()
    state = p.first()
    problems = "\n".join(p.source.problems)
    assert "EndpointSlice default/web-bad" in problems and "EndpointSlice default/gone-1" in problems
    assert len(p.source.problems) == 2
    assert view(state)[WEB] == ["10.244.1.5", "10.244.2.7"]   # web's good slice still counts


def test_fields_of_a_newer_kubernetes_do_not_make_an_object_unusable(api, make_source):
    svc = service("future", "10.96.8.5", futureSpecField={"x": 1})
    sl = endpoint_slice("future-x", "future", [ep("10.244.8.5")])
    sl["endpoints"][0]["conditions"]["futureCondition"] = True
    assert build(svc, sl).problems  # the file source calls these typos...
    api.apply(svc, sl)
    p = make_source()
    assert view(p.first())["10.96.8.5:80/TCP"] == ["10.244.8.5"]  # ...the API source does not


def test_pods_of_this_node_are_watched_and_do_not_change_the_state(api, make_source, cluster_list):
    """With NetworkPolicy off; with it on, see test_policy_kube_source.py."""
    api.load(cluster_list)
    api.load(FIXTURES / "k8s-pods.yaml")
    p = make_source(node_name="node-a", network_policy=False)
    p.first()
    names = lambda: sorted(pod["metadata"]["name"] for pod in p.source.pods())  # noqa: E731
    assert names() == ["statsd-6c9d8b7f5-h7w2m", "web-5d8f7c9b6d-4kq2x"]
    assert {r.query.get("fieldSelector") for r in api.requests if r.kind == "Pod"} == {
        "spec.nodeName=node-a"}
    pod = api.get("Pod", "default", "web-5d8f7c9b6d-4kq2x")
    pod["metadata"]["name"] = "web-5d8f7c9b6d-zz9x8"
    api.apply(pod)
    wait_for(lambda: "web-5d8f7c9b6d-zz9x8" in names(), "the new pod")
    assert p.poll() is None


# --- Client configuration ----------------------------------------------------------

def test_kubeconfig_from_the_environment_outside_a_cluster(api, make_source, cluster_list,
                                                          tmp_path, monkeypatch):
    api.load(cluster_list)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(api.kubeconfig(tmp_path / "from-env")))
    p = make_source(kubeconfig=None)
    assert p.first().services() == read_config(cluster_list).state.services()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_in_cluster_config_uses_the_service_account_token_and_ca(cluster_list, tmp_path, monkeypatch):
    cert, key = tmp_path / "ca.crt", tmp_path / "tls.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=kubernetes", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    token = tmp_path / "token"
    token.write_text("s3rvice-account-t0ken")
    server = FakeAPIServer(tls=(cert, key), token="s3rvice-account-t0ken").start()
    try:
        server.load(cluster_list)
        from kubernetes.config import incluster_config
        monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(token))
        monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(cert))
        monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(server.port))
        source = KubernetesSource(node_name="node-a", backoff=FAST)
        try:
            Poller(source).first()
        finally:
            source.stop()
        assert server.requests and all(
            r.headers.get("authorization", "").lower() == "bearer s3rvice-account-t0ken"
            for r in server.requests)
    finally:
        server.stop()


def test_unusable_settings_are_config_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ConfigError, match="no-such-kubeconfig"):
        KubernetesSource(kubeconfig=str(tmp_path / "no-such-kubeconfig"))
    with pytest.raises(ConfigError, match="NAMESPACE/NAME"):
        KubernetesSource(kubeconfig=str(tmp_path / "x"), config_map="meshbpf-config")


def test_the_agent_makes_this_source_from_its_options(api, cluster_list, tmp_path):
    from meshbpf.agent import AgentOptions, make_source
    api.load(cluster_list)
    source = make_source(AgentOptions(source="kubernetes", node_name="node-a",
                                      kubeconfig=str(api.kubeconfig(tmp_path / "kc"))))
    try:
        assert isinstance(source, KubernetesSource)
        assert Poller(source).first() == read_config(cluster_list, node_name="node-a").state
    finally:
        source.stop()


# --- build_state: the proxy-name label and topology hints -------------------------

LABEL = "service.kubernetes.io/service-proxy-name"


def labelled(svc: dict, value: str | None) -> dict:
    if value is not None:
        svc["metadata"]["labels"][LABEL] = value
    return svc


def test_without_a_proxy_name_only_unlabelled_services_are_handled():
    result = build(labelled(service("a", "10.96.1.1"), None),
                   labelled(service("b", "10.96.1.2"), "meshbpf"),
                   labelled(service("c", "10.96.1.3"), ""))
    assert result.problems == []
    assert result.state.services() == {"default/a"}
    assert sum("for another proxy" in n for n in result.notes) == 2


def test_with_a_proxy_name_only_services_labelled_with_it_are_handled():
    svcs = [labelled(service("a", "10.96.1.1"), None), labelled(service("b", "10.96.1.2"), "meshbpf"),
            labelled(service("c", "10.96.1.3"), "other")]
    result = build_state_with(svcs, service_proxy_name="meshbpf")
    assert result.state.services() == {"default/b"}


def test_a_service_for_another_proxy_is_not_checked():
    bad = labelled(service("bad", "not-an-ip"), "other")
    assert build(bad).problems == []


def build_state_with(objects: list[dict], **kwargs):
    from meshbpf.sources.kube_objects import SourceObject, build_state
    return build_state([SourceObject(o, f"test: {i}") for i, o in enumerate(objects)], **kwargs)


def hinted(address: str, *zones: str, ready: bool = True) -> dict:
    e = ep(address, ready=ready)
    if zones:
        e["hints"] = {"forZones": [{"name": z} for z in zones]}
    return e


def addresses(objects: list[dict], **kwargs) -> list[str]:
    result = build_state_with(objects, **kwargs)
    assert result.problems == []
    (sp,) = result.state.service_ports.values()
    return sorted(str(e.address) for e in sp.endpoints)


@pytest.mark.parametrize("endpoints, zone, expected", [
    # Every ready endpoint hinted: this zone's only.
    ([hinted("10.0.0.1", "a"), hinted("10.0.0.2", "b"), hinted("10.0.0.3", "a", "b")], "a",
     ["10.0.0.1", "10.0.0.3"]),
    # One ready endpoint without hints: hints are ignored.
    ([hinted("10.0.0.1", "a"), hinted("10.0.0.2")], "a", ["10.0.0.1", "10.0.0.2"]),
    # A not-ready endpoint without hints does not count.
    ([hinted("10.0.0.1", "a"), hinted("10.0.0.2", "b"), hinted("10.0.0.3", ready=False)], "b",
     ["10.0.0.2"]),
    # Nothing hinted for this zone: all of them.
    ([hinted("10.0.0.1", "a"), hinted("10.0.0.2", "b")], "c", ["10.0.0.1", "10.0.0.2"]),
    # No zone known for the node: all of them.
    ([hinted("10.0.0.1", "a"), hinted("10.0.0.2", "b")], None, ["10.0.0.1", "10.0.0.2"]),
])
def test_topology_hints_as_kube_proxy_applies_them(endpoints, zone, expected):
    objects = [service("s"), endpoint_slice("s-1", "s", endpoints)]
    assert addresses(objects, node_zone=zone) == expected


def test_topology_hints_merge_across_slices():
    objects = [service("s"), endpoint_slice("s-1", "s", [hinted("10.0.0.1", "a")]),
               endpoint_slice("s-2", "s", [hinted("10.0.0.2", "b")])]
    assert addresses(objects, node_zone="b") == ["10.0.0.2"]


def test_local_traffic_policy_ignores_topology_hints():
    objects = [service("s", internalTrafficPolicy="Local"),
               endpoint_slice("s-1", "s", [dict(hinted("10.0.0.1", "b"), nodeName="node-a"),
                                           dict(hinted("10.0.0.2", "a"), nodeName="node-b")])]
    assert addresses(objects, node_name="node-a", node_zone="a") == ["10.0.0.1"]


# --- NetworkPolicy inputs: every Pod, Namespace and NetworkPolicy ---------------------

def policy_objects() -> list[dict]:
    on_b = pod_obj("z/b")
    on_b["spec"]["nodeName"] = "node-b"
    on_b["spec"]["schedulerName"] = "default-scheduler"   # a field policy does not read
    return [ns_obj("x"), ns_obj("z"), pod_obj("x/a"), on_b,
            netpol("deny", "x", ingress=[]),
            netpol("allow-b", "x", {"matchLabels": {"pod": "a"}},
                   ingress=[{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}])]


def policy_names(state: DesiredState) -> dict[str, list[str]]:
    return {"pods": [f"{p.namespace}/{p.name}" for p in state.pods],
            "namespaces": [n.name for n in state.namespaces],
            "network_policies": [f"{p.namespace}/{p.name}" for p in state.network_policies]}


def test_policy_inputs_are_read_as_the_file_source_reads_them(api, make_source, cluster_list, tmp_path):
    api.load(cluster_list)
    api.apply(*policy_objects())
    state = make_source().first()
    (tmp_path / "all.yaml").write_text(cluster_list.read_text() + "\n---\n"
                                       + yaml.safe_dump_all(policy_objects()))
    assert state == read_config(tmp_path / "all.yaml", node_name="node-a").state
    assert policy_names(state) == {"pods": ["x/a", "z/b"], "namespaces": ["x", "z"],
                                   "network_policies": ["x/allow-b", "x/deny"]}


def test_pods_with_policy_on_are_every_pod_trimmed_and_pods_gives_this_nodes(api, make_source, cluster_list):
    api.load(cluster_list)
    api.apply(*policy_objects())
    p = make_source(node_name="node-1")
    p.first()
    assert {r.query.get("fieldSelector") for r in api.requests if r.kind == "Pod"} == {None}
    assert [pod["metadata"]["name"] for pod in p.source.pods()] == ["a"]
    everything = p.source.reflectors["pods"].items()
    assert len(everything) == 2 and all("schedulerName" not in pod["spec"] for pod in everything)


def test_a_policy_change_alone_names_no_frontend(api, make_source, cluster_list):
    api.load(cluster_list)
    api.apply(*policy_objects())
    p = make_source()
    first = p.first()
    api.apply(netpol("deny-egress", "x", egress=[]))
    wait_for(lambda: p.poll() is not None, "a state with the new policy")
    state = p.emitted[-1]
    assert "x/deny-egress" in policy_names(state)["network_policies"]
    assert state.delta is not None and state.delta.frontends == frozenset() and state.delta.base() is first
    assert state.service_ports == first.service_ports
    # A Service change afterwards (the incremental path) keeps the policy inputs.
    api.apply(service("late", "10.96.201.7"))
    last = p.until(lambda v: "10.96.201.7:80/TCP" in v, "the new Service")
    assert last.delta is not None and last.delta.frontends
    assert policy_names(last) == policy_names(state)


def test_rbac_refusing_namespaces_turns_policy_off_and_services_work(api, make_source, cluster_list, caplog):
    caplog.set_level(logging.INFO, logger="meshbpf")
    api.load(cluster_list)
    api.apply(*policy_objects())
    api.forbidden.add("Namespace")
    p = make_source()
    state = p.until(lambda v: WEB in v, "Services despite the refusal")
    assert policy_names(state) == {"pods": [], "namespaces": [], "network_policies": []}
    assert "namespaces (API server answered 403 Forbidden)" in (p.source.policy_off or "")
    off = [r.getMessage() for r in caplog.records if "NetworkPolicy is off" in r.getMessage()]
    assert len(off) == 1 and "\n" not in off[0]
    api.apply(service("late", "10.96.201.7"))
    p.until(lambda v: "10.96.201.7:80/TCP" in v, "a Service added while policy is off")
    # RBAC fixed: policy comes on by itself.
    api.forbidden.clear()
    p.wait(lambda: bool(p.emitted[-1].network_policies), "the policy inputs once the API server allows them")
    assert policy_names(p.emitted[-1])["network_policies"] == ["x/allow-b", "x/deny"]
    assert p.source.policy_off is None and "NetworkPolicy is on" in caplog.text
    assert len([r for r in caplog.records if "NetworkPolicy is off" in r.getMessage()]) == 1


def test_a_bad_policy_from_the_api_is_left_out_and_the_rest_applies(api, make_source, cluster_list):
    api.load(cluster_list)
    api.apply(*policy_objects(), netpol("bad", "x", ingress=[{"ports": [{"port": 70000}]}]))
    p = make_source()
    state = p.first()
    assert policy_names(state)["network_policies"] == ["x/allow-b", "x/deny"]
    assert WEB in view(state)
    assert p.source.problems == ["API server (NetworkPolicy x/bad): spec.ingress[0].ports[0].port: "
                                 "70000 is not a port number (1-65535)"]
