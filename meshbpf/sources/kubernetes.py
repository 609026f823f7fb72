"""The Kubernetes API source: Services, EndpointSlices, this node's Node,
meshbpf's ConfigMap, and for NetworkPolicy every Pod, Namespace and
NetworkPolicy, followed with list-then-watch.

Each collection has its own Reflector (kube_watch.py) in a background thread.
poll() only reads their copies: once every collection has been listed, it
builds the desired state with kube_objects.build_by_service (build_state's
reading of the objects, the YAML file source's, one Service at a time) and
returns it when it differs from the
last one. Before the first complete list it returns None, and during an API
outage or a relist the copies stay as they were, so the datapath never sees
an empty or half-listed state: only ever a complete one, reached by a diff.

Unlike the file source, one bad object does not reject the rest: it is left
out, and its problem logged once.

NetworkPolicy's inputs are optional: when the API server refuses to list
Pods, Namespaces or NetworkPolicies (RBAC), policy is off (the state holds
none of them) with one log line, and Services carry on. A change to them
alone gives a state whose Delta names no frontend, so load balancing plans
nothing for it.

Gateway API TCPRoutes and UDPRoutes (weighted splitting, sources/routes.py)
are optional the same way: without their CRDs the server answers 404, and
one note says routes are not served. A route ties its parent to other
Services: the index holds the Services unsplit and each state it derives
is split again (routes.reapply_routes); a change to what the build reads
of a route or grant rebuilds everything (our own status writes do not).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import weakref
from dataclasses import replace
from functools import partial
from typing import Any, Callable, Iterable, Iterator

import urllib3

from kubernetes import client, config

from ..model import AgentSettings, Delta, DesiredState
from . import agent_config, schema
from .errors import ConfigError, Problem, internal_error
from .held_text import as_held, loaded
from .kube_incremental import ServiceIndex, hold_annotations, slice_service
from .kube_objects import PROXY_NAME_LABEL, BuildResult, SourceObject, build_by_service
from ..capture.settings import kept_annotations
from .kube_policy import NETWORK_POLICY, CachedReader, policy_fields
from .kube_watch import Backoff, Reflector
from .names import label_problems
from .routes import API_VERSION as ROUTE_API_VERSION
from .kube_route_status import RouteStatusWriter
from .route_status import route_statuses
from .routes import GRANT_KIND, read_grants, read_routes, reapply_routes, split_by_routes
from .yaml_load import LoadError, load_one

log = logging.getLogger(__name__)

CONFIG_MAP_KEY = "agent-config.yaml"
ZONE_LABEL = "topology.kubernetes.io/zone"
POLICY_REFLECTORS = ("pods", "namespaces", "networkpolicies")
# Gateway API routes (weighted splitting): watched where the CRDs exist.
ROUTE_REFLECTORS = {"tcproutes": "TCPRoute", "udproutes": "UDPRoute"}
GRANT_VERSION = "v1beta1"  # ReferenceGrant's served version
POLICY_FIELDS = ("pods", "namespaces", "network_policies")  # of DesiredState
# The parts of a Pod that NetworkPolicy reads (kube_policy); the rest of
# every pod of the cluster is not kept.
_POD_KEPT = {
    "apiVersion": schema.ANY, "kind": schema.ANY,
    "metadata": {"name": schema.ANY, "namespace": schema.ANY, "uid": schema.ANY,
                 "labels": schema.ANY, "resourceVersion": schema.ANY},
    "spec": {"nodeName": schema.ANY, "hostNetwork": schema.ANY,
             "containers": [{"name": schema.ANY, "ports": schema.ANY}]},
    "status": {"phase": schema.ANY, "podIP": schema.ANY, "podIPs": schema.ANY},
}


def load_client_config(kubeconfig: str | None) -> client.Configuration:
    """The API server address and credentials: the kubeconfig file given;
    without one, the pod's service account when running in a cluster, else
    $KUBECONFIG or ~/.kube/config (what kubectl would use)."""
    cfg = client.Configuration()
    failures = []
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        try:
            config.load_incluster_config(client_configuration=cfg)
            return _tuned(cfg)
        except config.ConfigException as exc:
            failures.append(f"in-cluster: {exc}")
    path = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
    try:
        # persist_config=False: never write refreshed tokens into the file,
        # which is read-only in a pod anyway.
        config.load_kube_config(config_file=path, client_configuration=cfg, persist_config=False)
        return _tuned(cfg)
    except (config.ConfigException, OSError, ValueError) as exc:
        failures.append(f"kubeconfig {path}: {exc}")
    raise ConfigError([Problem("--kubeconfig", "", "",
                               "cannot reach the Kubernetes API: " + "; ".join(failures))])


def _tuned(cfg: client.Configuration) -> client.Configuration:
    cfg.retries = 0                     # the reflectors back off and retry themselves
    cfg.connection_pool_maxsize = 10    # one long-lived watch per collection, and lists
    cfg.socket_options = _KEEPALIVE
    return cfg


# TCP keepalive on every API connection: a watch whose peer vanished (a node
# cut off, a load balancer that forgot the flow) fails within about 30 s
# (15 s idle, then 3 probes 5 s apart) instead of waiting on a read.
_KEEPALIVE = list(urllib3.connection.HTTPConnection.default_socket_options) + [
    (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
    (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 15),
    (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 5),
    (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3),
]


def _pruned(spec: Any) -> Callable[[dict], dict]:
    """Keeps the fields kube_objects knows. The API server has validated every
    object, so a field the schema lacks comes from a newer Kubernetes, not a
    typo: dropping it keeps the object usable (the file source reports such
    fields instead). managedFields is dropped to save memory."""
    prune = _compiled_pruner(spec) or (lambda obj: obj)

    def transform(obj: dict) -> dict:
        out = prune(obj)
        (out.get("metadata") or {}).pop("managedFields", None)
        return out
    return transform


def _compiled_pruner(node: Any) -> Callable[[Any], Any] | None:
    """A function keeping what `node` (a schema node) names; None for a leaf,
    which is kept whole. Compiled once per schema: a watched object then
    costs one call per map or list the schema descends into, not one per
    field (200 000 objects are pruned at a cold start). It prunes in place,
    deleting the other keys (the object was just decoded and is the
    reflector's alone): copying every map cost more than the deletions."""
    if isinstance(node, list):
        item = _compiled_pruner(node[0])
        if item is None:
            return None

        def prune_items(value: Any) -> Any:
            if isinstance(value, list):
                for v in value:
                    item(v)
            return value
        return prune_items
    if not isinstance(node, dict):
        return None
    known = frozenset(node)
    branches = tuple((k, f) for k, sub in node.items() if (f := _compiled_pruner(sub)) is not None)

    def prune(value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        if not value.keys() <= known:  # tested first: no set made for a map with nothing to drop
            for k in value.keys() - known:
                del value[k]
        for k, f in branches:
            sub = value.get(k)
            if sub is not None:
                f(sub)
        return value
    return prune


def _without(spec: dict, *paths: str) -> dict:
    """`spec` without the fields at these dotted paths ("a.b": field b of a;
    a list's items are passed through)."""
    out = dict(spec)
    for path in paths:
        head, _, rest = path.partition(".")
        if not rest:
            out.pop(head, None)
            continue
        sub = out[head]
        out[head] = [_without(sub[0], rest)] if isinstance(sub, list) else _without(sub, rest)
    return out


# What the source keeps of each object: what kube_objects reads, not all its
# schema knows. Kept for every Service and slice of the cluster, and the
# biggest part of the agent's memory at 100 000 Services; a dropped field
# is one the agent never reads (targetRef, ownership, a valid pod selector).
_UNREAD_META = tuple(f"metadata.{k}" for k in (
    "uid", "generateName", "generation", "creationTimestamp", "deletionTimestamp",
    "deletionGracePeriodSeconds", "ownerReferences", "finalizers", "managedFields", "selfLink"))
SERVICE_KEPT = _without(schema.SERVICE, *_UNREAD_META, "spec.selector")
ENDPOINT_SLICE_KEPT = _without(schema.ENDPOINT_SLICE, *_UNREAD_META, "endpoints.targetRef",
                               "endpoints.hostname", "endpoints.deprecatedTopology")


def _service_kept(obj: dict, _prune=_pruned(SERVICE_KEPT)) -> dict:
    """SERVICE_KEPT, and spec.selector only when Kubernetes would refuse it
    (from a server that skipped validation): build_state then names the
    problem and leaves the Service out, as it does for a file. A valid
    selector is never read, and held for every Service it would cost memory."""
    spec = obj.get("spec")
    selector = spec.get("selector") if type(spec) is dict else None  # before the prune drops it
    out = _prune(obj)
    if selector is not None and (schema.check(selector, schema.STR_MAP)
                                 or label_problems(selector, "spec.selector")):
        out["spec"]["selector"] = selector
    hold_annotations(out.get("metadata"))
    return out


def _slice_kept(obj: dict, _prune=_pruned(ENDPOINT_SLICE_KEPT)) -> dict:
    """ENDPOINT_SLICE_KEPT, its annotations as hold_annotations keeps them."""
    out = _prune(obj)
    hold_annotations(out.get("metadata"))
    return out


def _pod_kept(obj: dict, _prune=_pruned(_POD_KEPT)) -> dict:
    """_POD_KEPT, and the sidecar-capture annotations (Istio's, Linkerd's)
    only: a pod's other annotations can be large and are never read."""
    notes = kept_annotations((obj.get("metadata") or {}).get("annotations"))  # before the prune drops them
    out = _prune(obj)
    if notes and isinstance(out.get("metadata"), dict):
        out["metadata"]["annotations"] = notes
    return out


def _without_managed_fields(obj: dict) -> dict:
    (obj.get("metadata") or {}).pop("managedFields", None)
    return obj


def _where(obj: dict) -> str:
    meta = obj.get("metadata") or {}
    return f"API {obj.get('kind')} {meta.get('namespace')}/{meta.get('name')}"


class KubernetesSource:
    """Desired state from the Kubernetes API. See the module docstring."""

    def __init__(self, *, kubeconfig: str | None = None, node_name: str | None = None,
                 service_proxy_name: str | None = None,
                 config_map: str = "kube-system/meshbpf-config",
                 backoff: Backoff = Backoff(), page_size: int = 500,
                 watch_timeout: tuple[int, int] = (300, 600), bookmark_interval: float = 60.0,
                 network_policy: bool = True):
        namespace, _, name = config_map.partition("/")
        if not namespace or not name or "/" in name:
            raise ConfigError([Problem("--config-map", "", "", f"{config_map!r} is not NAMESPACE/NAME")])
        self.node_name = node_name
        self.service_proxy_name = service_proxy_name
        self.config_map = (namespace, name)
        self._api = client.ApiClient(load_client_config(kubeconfig))
        core, discovery = client.CoreV1Api(self._api), client.DiscoveryV1Api(self._api)
        networking = client.NetworkingV1Api(self._api)

        self._wake = threading.Event()  # set by every change, so the agent acts at once

        def reflector(name: str, func: Callable[..., Any], kind: str, api_version: str = "v1",
                      **kwargs: Any) -> Reflector:
            return Reflector(name, func, kind=kind, api_version=api_version, backoff=backoff,
                             page_size=page_size, watch_timeout=watch_timeout,
                             bookmark_interval=bookmark_interval, on_change=self._wake.set,
                             **kwargs)

        # kube-proxy's own selector, so the two never both handle a Service
        # (server side here, and again in build_state for the file source).
        proxy_selector = (f"{PROXY_NAME_LABEL}={service_proxy_name}" if service_proxy_name
                          else f"!{PROXY_NAME_LABEL}")
        self.reflectors: dict[str, Reflector] = {
            "services": reflector(
                "services", core.list_service_for_all_namespaces, "Service",
                selectors={"label_selector": proxy_selector}, transform=_service_kept,
                hold=as_held),
            # Slices are not filtered by label: hand-made ones may lack the
            # labels the controller copies from their Service. build_state
            # ignores the slices of Services it does not handle.
            "endpointslices": reflector(
                "endpointslices", discovery.list_endpoint_slice_for_all_namespaces, "EndpointSlice",
                "discovery.k8s.io/v1", transform=_slice_kept, hold=as_held),
            "configmap": reflector(
                f"configmap {config_map}", core.list_namespaced_config_map, "ConfigMap",
                selectors={"namespace": namespace, "field_selector": f"metadata.name={name}"},
                transform=_without_managed_fields),
        }
        if node_name:
            self.reflectors["node"] = reflector(
                f"node {node_name}", core.list_node, "Node",
                selectors={"field_selector": f"metadata.name={node_name}"},
                transform=lambda obj: {k: obj[k] for k in ("apiVersion", "kind", "metadata") if k in obj})
        custom = client.CustomObjectsApi(self._api)
        group, version = ROUTE_API_VERSION.split("/")
        for plural, kind in ROUTE_REFLECTORS.items():
            # Optional: without the Gateway API CRDs the server answers 404;
            # the collection is then empty, said once, and tried again quietly.
            self.reflectors[plural] = reflector(
                plural, partial(custom.list_cluster_custom_object, group, version, plural), kind,
                ROUTE_API_VERSION, transform=_without_managed_fields, optional=True)
        # Cross-namespace backendRefs need a ReferenceGrant (optional as well).
        self.reflectors["referencegrants"] = reflector(
            "referencegrants", partial(custom.list_cluster_custom_object, group, GRANT_VERSION,
                                       "referencegrants"),
            GRANT_KIND, f"{group}/{GRANT_VERSION}", transform=_without_managed_fields, optional=True)
        if network_policy:
            # Peers live on every node: every pod, the parts policy reads.
            self.reflectors["pods"] = reflector(
                "pods", core.list_pod_for_all_namespaces, "Pod", transform=_pod_kept,
                optional=True)
            self.reflectors["namespaces"] = reflector(
                "namespaces", core.list_namespace, "Namespace", transform=_without_managed_fields,
                optional=True)
            self.reflectors["networkpolicies"] = reflector(
                "networkpolicies", networking.list_network_policy_for_all_namespaces,
                "NetworkPolicy", "networking.k8s.io/v1", transform=_pruned(NETWORK_POLICY),
                optional=True)
        elif node_name:
            # Pods on this node are kept for the features to come (socket
            # redirection); they do not make up the load-balancing state.
            self.reflectors["pods"] = reflector(
                "pods", core.list_pod_for_all_namespaces, "Pod",
                selectors={"field_selector": f"spec.nodeName={node_name}"},
                transform=_without_managed_fields)

        self._inputs = [r for key, r in self.reflectors.items() if key not in POLICY_REFLECTORS]
        # Routes and grants: their status is ours to write, and a write comes
        # back as an event; only a change to what the build reads rebuilds all.
        self._route_inputs = {i for i, key in enumerate(k for k in self.reflectors if k not in POLICY_REFLECTORS)
                              if key in ROUTE_REFLECTORS or key == "referencegrants"}
        self._built_route_specs: list | None = None
        self._policy_inputs = [self.reflectors[k] for k in POLICY_REFLECTORS if network_policy]
        self._built: tuple[int, ...] | None = None
        self._policy_built: tuple[int, ...] | None = None
        self._index: ServiceIndex | None = None  # for incremental builds; None: build everything
        # With routes: (routes, grants, rejected route names) of the last full
        # build, and the frontends they split in the last state handed out.
        self._routes: tuple | None = None
        self._split: tuple = ()
        self._last: DesiredState | None = None
        self._problems: set[str] = set()
        self._policy_problems: set[str] = set()
        self._policy_reader = CachedReader()
        self.policy_off: str | None = None  # why the API server's refusal turned policy off
        self._notes: set[str] = set()
        self._good_settings = AgentSettings()  # of the last valid ConfigMap
        self._route_status = RouteStatusWriter(
            lambda plural, ns, name, body: custom.patch_namespaced_custom_object_status(
                group, version, ns, plural, name, body),
            lambda: [(plural, obj) for plural in ROUTE_REFLECTORS for obj in self.reflectors[plural].items()])
        for r in self.reflectors.values():
            r.start()

    # --- the Source interface --------------------------------------------------
    def poll(self) -> DesiredState | None:
        """A new DesiredState when the watched objects changed since the last
        one and every collection has been listed; None otherwise. Never
        blocks on the network; at most one build per poll however many
        events arrived since the last one.

        Service and EndpointSlice events rebuild only the Services they
        touch (kube_incremental), and the state carries a Delta naming the
        frontends that changed; a (re)list, or a change to the ConfigMap or
        the Node, rebuilds everything. A change to Pods, Namespaces or
        NetworkPolicies alone re-reads those, and the Delta names no frontend."""
        if not self.synced():
            return None
        # Generations are read before the objects: a change landing in
        # between is then in this build and triggers one more, never none.
        generations = tuple(r.generation for r in self._inputs)
        policy_generations = tuple(r.generation for r in self._policy_inputs)
        if generations == self._built and policy_generations == self._policy_built:
            return None
        previous, self._built = self._built, generations
        policy_changed = policy_generations != self._policy_built
        self._policy_built = policy_generations
        # Taken before any object is read, for the same reason.
        services = self.reflectors["services"].take_changes()
        slices = self.reflectors["endpointslices"].take_changes()
        incremental = (self._index is not None and services is not None and slices is not None
                       and previous is not None and self._only_services_changed(previous, generations))
        differs = False  # known to differ from the last state, without comparing all of it
        try:
            if generations == previous:
                state = None  # only NetworkPolicy's inputs changed
            elif incremental:
                before = self._index.state
                state = self._apply_events(services, slices)
                # Built from the last state, with the frontends that changed value.
                differs = state is not None
                if state is not None and self._routes is not None:
                    state = self._route(state, before)
            else:
                state = self.build().state
            if state is None:
                if self._last is None or not policy_changed:
                    return None
                state = replace(self._last, delta=Delta(weakref.ref(self._last), frozenset()),
                                trigger_times=())
            state = replace(state, **self._policy_fields(policy_changed))
        except Exception as exc:
            self._index = None  # the next poll builds everything again
            log.exception("building the state from the API objects failed")
            raise internal_error("API server objects", exc) from None
        same = not differs and state == self._last
        if self._index is not None and self._routes is None:
            # Deltas then name the state handed out, and carry its policy inputs.
            # (With routes the index keeps its own, unsplit, and _route names
            # the state handed out.)
            self._index.state = self._last if same else state
        if same:
            return None
        self._last = state
        return state

    def build(self) -> BuildResult:
        # Messages about these name the object themselves: "API server
        # (Service default/web): spec.ports[0]...".
        # Each object is read back from its held text as the build reaches
        # it and dropped once read, and each Service is built with its
        # slices before the next is read (kube_objects.build_by_service):
        # all of them at once, as dicts or as records, would be the cold
        # start's peak, which the heap keeps as RSS. Grouping the slices
        # costs one more read of each (~6 us).
        # The reflectors' own keys (interned there), where already in index form.
        services = [(key if key[0] else ("default", key[1]), raw)
                    for key, raw in self.reflectors["services"].held_items()]
        slices = [(key if key[0] else ("default", key[1]), raw)
                  for key, raw in self.reflectors["endpointslices"].held_items()]
        owners = [slice_service(loaded(raw)) for _, raw in slices]  # each slice's Service
        by_owner: dict[tuple[str, str] | None, list[Any]] = {}
        for (_, raw), owner in zip(slices, owners):
            by_owner.setdefault(owner, []).append(raw)

        def read(raws: Iterable[Any]) -> Iterator[SourceObject]:
            return (SourceObject(loaded(raw), "API server") for raw in raws)

        def groups() -> Iterator[tuple[SourceObject | None, Iterator[SourceObject]]]:
            for key, raw in services:
                yield SourceObject(loaded(raw), "API server"), read(by_owner.pop(key, ()))
            for raws in by_owner.values():  # slices of no Service listed: their problems
                yield None, read(raws)

        settings_problems: list[Problem] = []
        settings = self._settings(settings_problems)
        zone = self.node_zone()
        result = build_by_service(groups(), node_name=self.node_name,
                                  service_proxy_name=self.service_proxy_name, node_zone=zone)
        result.state.settings = settings
        self._index = ServiceIndex.of_held(
            result.state, services, [(key, owner, raw) for (key, raw), owner in zip(slices, owners)],
            result.problems, node_name=self.node_name, service_proxy_name=self.service_proxy_name,
            node_zone=zone)
        # The index holds the Services unsplit: with routes, each state it
        # derives is split again (_route); a change to a route or grant is a
        # full build. Read before them: a change landing in between rebuilds again.
        self._built_route_specs = self._route_specs()
        self._add_routes(result)
        result.problems[:0] = settings_problems
        if "node" in self.reflectors and not self.reflectors["node"].items():
            result.notes.append(f"Node {self.node_name} not found: topology hints are not used")
        if not self.reflectors["configmap"].items():
            result.notes.append(f"ConfigMap {'/'.join(self.config_map)} not found: "
                                f"agent settings are the defaults")
        self._report(result)
        return result

    def _add_routes(self, result: BuildResult) -> bool:
        """Splits the parents of the routes the API server holds (a bad
        route is left out alone); notes once when routes are not served.
        Whether any route was read."""
        route_objects = []
        for plural, kind in ROUTE_REFLECTORS.items():
            r = self.reflectors[plural]
            if r.refused:
                result.notes.append(f"{kind}: not served by the API server ({r.refused}; "
                                    f"no Gateway API CRDs?): no weighted splitting by {kind}")
            route_objects += [SourceObject(obj, "API server") for obj in r.items()]
        routes, problems, notes = read_routes(route_objects, self._last.routes if self._last else ())
        grant_reflector = self.reflectors["referencegrants"]
        grants, grant_problems = read_grants(SourceObject(obj, "API server") for obj in grant_reflector.items())
        if grant_reflector.refused and route_objects:
            result.notes.append(f"ReferenceGrant: not served by the API server ({grant_reflector.refused}): "
                                f"backendRefs to other namespaces are refused")
        result.problems += problems + grant_problems
        result.notes += notes
        self._routes, self._split = None, ()
        if routes:
            result.state, self._split, split_notes = split_by_routes(result.state, routes, grants,
                                                                     self._ports_of())
            result.notes += split_notes
            self._routes = (routes, grants, {p.obj for p in problems})
        if route_objects:
            self._route_status.offer(route_statuses(result.state, self._ports_of()) if routes else [],
                                     {p.obj for p in problems})
        return bool(routes)

    def _only_services_changed(self, previous: tuple[int, ...], generations: tuple[int, ...]) -> bool:
        """Whether the inputs but Services and EndpointSlices (the first two)
        are as the last build read them: their generations, or for routes
        and grants what the build reads of them (a status write of ours
        comes back as an event that changes nothing else)."""
        changed = [i for i in range(2, len(generations)) if previous[i] != generations[i]]
        if not changed:
            return True
        if not set(changed) <= self._route_inputs:
            return False
        return self._route_specs() == self._built_route_specs

    def _route_specs(self) -> list:
        """What the build reads of every route and grant: kind, name and spec."""
        out = []
        for key in (*ROUTE_REFLECTORS, "referencegrants"):
            for obj in self.reflectors[key].items():
                meta = obj.get("metadata") or {}
                out.append((obj.get("kind"), meta.get("namespace"), meta.get("name"), obj.get("spec")))
        out.sort(key=lambda t: tuple(str(x) for x in t[:3]))
        return out

    def _ports_of(self):
        """A Service's frontends, from the index (None without one)."""
        return None if self._index is None else self._index.service_ports

    def _route(self, state: DesiredState, before: DesiredState) -> DesiredState:
        """The index's next state split by the routes of the last full build,
        its Delta over the state handed out last when the index's was over
        `before`; the routes' statuses offered again (a backend Service may
        have come or gone)."""
        routes, grants, rejected = self._routes
        if state.delta is not None and state.delta.base() is not before:
            state = replace(state, delta=None)
        ports_of = self._ports_of()
        routed, self._split, split_notes = reapply_routes(state, self._last, self._split, routes, grants, ports_of)
        for text in split_notes:
            if text not in self._notes:
                log.info("%s", text)
                self._notes.add(text)
        self._route_status.offer(route_statuses(routed, ports_of), rejected)
        return routed

    def _apply_events(self, services: dict, slices: dict) -> DesiredState | None:
        assert self._index is not None
        update = self._index.apply(services, slices)
        problems = {str(p) for p in update.problems}
        for text in sorted(problems - self._problems):
            log.warning("left out of the state: %s", text)
        for text in sorted(update.resolved - problems):
            log.info("resolved: %s", text)
        for text in update.notes:
            if text not in self._notes:
                log.info("%s", text)
                self._notes.add(text)
        self._problems = (self._problems - update.resolved) | problems
        return update.state

    def _policy_fields(self, changed: bool) -> dict[str, tuple]:
        """DesiredState's policy inputs: read again when they changed, else
        those of the last state; none while the API server refuses any."""
        if not self._policy_inputs:
            return {}
        if not changed and self._last is not None:
            return {name: getattr(self._last, name) for name in POLICY_FIELDS}
        refused = [f"{r.name} ({r.refused})" for r in self._policy_inputs if r.refused]
        if refused:
            off = ", ".join(refused)
            if off != self.policy_off:
                log.warning("NetworkPolicy is off: the API server refuses to list %s; Services are "
                            "not affected (grant list and watch on pods, namespaces and "
                            "networkpolicies.networking.k8s.io, as deploy/meshbpf.yaml does)", off)
            self.policy_off, self._policy_problems = off, set()
            return dict.fromkeys(POLICY_FIELDS, ())
        if self.policy_off is not None:
            log.info("NetworkPolicy is on: the API server lists pods, namespaces and networkpolicies")
            self.policy_off = None
        inputs = self._policy_reader.read(SourceObject(obj, "API server")
                                          for r in self._policy_inputs for obj in r.items())
        problems = {str(p) for p in inputs.problems}
        for text in sorted(problems - self._policy_problems):
            log.warning("left out of the state: %s", text)
        for text in sorted(self._policy_problems - problems):
            log.info("resolved: %s", text)
        self._policy_problems = problems
        return policy_fields(inputs, self._last)

    def forget(self) -> None:
        """The next poll builds everything again from the watched copies and
        hands out the state even if it is the same (SIGHUP). The copies are
        kept: the watches keep them current."""
        self._built, self._policy_built, self._index, self._last = None, None, None, None
        self._policy_reader = CachedReader()  # policy objects parsed again too

    def wait(self, timeout: float) -> None:
        """Returns when an object changed, or after timeout: the agent's
        loop sleeps here, so an event is programmed in milliseconds, not at
        the next poll interval."""
        self._wake.wait(timeout)
        self._wake.clear()

    # --- views -----------------------------------------------------------------
    @property
    def problems(self) -> list[str]:
        """The objects left out of the last state, and why (for health checks)."""
        return sorted(self._problems | self._policy_problems)

    def health(self) -> dict[str, Any]:
        """Whether every watch thread runs, and how long ago each last heard
        from the API server (a list, an event or a bookmark). A thread that
        ended would leave its collection frozen while all else looks fine."""
        watches = {name: r.health() for name, r in self.reflectors.items()}
        return {"ok": all(w["alive"] for w in watches.values()), "watches": watches}

    def synced(self) -> bool:
        return all(r.synced.is_set() for r in self.reflectors.values())

    def node_zone(self) -> str | None:
        """This node's topology.kubernetes.io/zone label, as kube-proxy reads it."""
        nodes = self.reflectors["node"].items() if "node" in self.reflectors else []
        labels = (nodes[0].get("metadata") or {}).get("labels") if nodes else None
        zone = labels.get(ZONE_LABEL) if isinstance(labels, dict) else None
        return zone if isinstance(zone, str) and zone else None

    def pods(self) -> list[dict]:
        """The pods on this node, as the API server sent them (with
        NetworkPolicy on, only the parts policy reads)."""
        if not self.node_name or "pods" not in self.reflectors:
            return []
        return [pod for pod in self.reflectors["pods"].items()
                if (pod.get("spec") or {}).get("nodeName") == self.node_name]

    def stop(self) -> None:
        for r in self.reflectors.values():
            r.signal_stop()  # all at once, then wait for each
        for r in self.reflectors.values():
            r.stop()
        self._route_status.stop()
        self._api.close()

    def __enter__(self) -> KubernetesSource:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # --- helpers ---------------------------------------------------------------
    def _settings(self, problems: list[Problem]) -> AgentSettings:
        """The settings of the AgentConfig in the ConfigMap.

        No ConfigMap: the defaults (deleting it is a deliberate act). A
        ConfigMap that is present but invalid keeps the last good settings
        and reports a problem: one bad edit must not reset every node's
        settings at once."""
        found = self.reflectors["configmap"].items()
        if not found:
            self._good_settings = AgentSettings()
            return self._good_settings
        settings, found_problems = self._read_config_map(found[0])
        if settings is not None:
            self._good_settings = settings
            return settings
        keeping = ("keeping the previous settings" if self._good_settings != AgentSettings()
                   else "keeping the default settings")
        problems.extend(Problem(p.where, p.obj, p.path, f"{p.reason} ({keeping})")
                        for p in found_problems)
        return self._good_settings

    def _read_config_map(self, cm: dict) -> tuple[AgentSettings | None, list[Problem]]:
        where = f"{_where(cm)}: data.{CONFIG_MAP_KEY}"
        data = cm.get("data")
        text = data.get(CONFIG_MAP_KEY) if isinstance(data, dict) else None
        if not isinstance(text, str):
            return None, [Problem(_where(cm), "", f"data.{CONFIG_MAP_KEY}",
                                  "missing: the AgentConfig goes under this key")]
        try:
            doc = load_one(text)
        except LoadError as exc:
            line = f"line {exc.line}: " if exc.line else ""
            return None, [Problem(where, "", "", f"not valid YAML: {line}{exc.message}")]
        if not isinstance(doc, dict) or doc.get("kind") != agent_config.KIND:
            return None, [Problem(where, "", "kind", f"expected one {agent_config.KIND} object")]
        return agent_config.read_agent_config(doc, where)

    def _report(self, result: BuildResult) -> None:
        """Logs each problem and note once, when it appears, and says when a
        problem is gone: the same view is rebuilt on every change."""
        problems = {str(p) for p in result.problems}
        notes = set(result.notes)
        for text in sorted(problems - self._problems):
            log.warning("left out of the state: %s", text)
        for text in sorted(self._problems - problems):
            log.info("resolved: %s", text)
        for text in sorted(notes - self._notes):
            log.info("%s", text)
        self._problems, self._notes = problems, notes
