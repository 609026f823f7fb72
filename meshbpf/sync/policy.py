"""NetworkPolicy: the local pods' endpoints, their tc programs, the policy maps.

Each sync compiles the desired pods, namespaces and policies for this node
(meshbpf/policy/compile.py), finds each local pod's host-side interface
(datapath/endpoints.py: pod cgroup -> netns -> veth peer), plans the map
writes (reconcile/policy.py: make-before-break per pod) and applies them:
programs are attached to a new endpoint's interface before its first write
(no endpoint entry: the programs pass), and detached after a departed
endpoint's entries are gone.

The policy programs are compiled only once there is something to enforce
(a local pod in the desired state) or maps pinned by an earlier agent to
take over, so an agent that only load-balances pays nothing for them.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..datapath.endpoints import find_endpoint
from ..datapath.policy import PolicyDatapath, PolicyMaps
from ..metrics import AgentMetrics
from ..model import DesiredState
from ..policy.compile import Compiled, PolicyCompiler
from ..reconcile.policy import MAP_NAMES, PolicyPlan, plan_policy
from ..reconcile.policy_keys import PolicyState
from ..retry import Backoff
from . import one_line

log = logging.getLogger("meshbpf.agent")  # the agent's log, as users and tests filter it

FIND_AGAIN = 2.0  # seconds between looks for local pods whose interface is not there yet


@dataclass(frozen=True)
class Endpoint:
    """A local pod as the agent enforces it, for the views (CLI, metrics)."""

    namespace: str
    name: str
    ifindex: int | None     # host-side interface; None: not found (not running here yet)
    ep_id: int | None
    isolated_ingress: bool
    isolated_egress: bool
    policies: tuple[str, ...]  # "namespace/name" of the policies that select it


class PolicySync:
    def __init__(self, metrics: AgentMetrics, error: Callable[..., None], datapath: PolicyDatapath,
                 node_name: str, cgroup_root: Path | None = None):
        self.metrics = metrics
        self.error = error
        self.dp = datapath
        self.node_name = node_name
        self.cgroup_root = cgroup_root
        self.maps: PolicyMaps | None = None
        self.current = PolicyState()
        self.inputs: tuple | None = None        # the desired inputs the maps were last brought to
        self.endpoints: dict[tuple[str, str], Endpoint] = {}
        self.compiled: Compiled | None = None
        self.compiler = PolicyCompiler()        # keeps work between edits (same result)
        self.retry = Backoff()
        self.stale = False
        self.missing: set[tuple[str, str]] = set()  # local pods whose interface was not found
        self.rules: dict[int, str] = {}         # rule id -> "ns/name/ingress/0", for the views
        self.pod_names: dict[str, str] = {}     # pod address -> "ns/name" (every pod), for the views
        self.next_find = 0.0

    # --- start-up: only when there is something to enforce or take over -------
    def wanted(self, desired: DesiredState) -> bool:
        return self.maps is not None or any(self._local(p) for p in desired.pods)

    def pinned(self) -> bool:
        """Maps an earlier agent pinned: take them over at start, so a new
        build's programs replace the old ones even with no pod to enforce."""
        return (self.dp.bpffs / "mbpf_pol_ep").exists()

    def start(self) -> None:
        self.dp.compile()
        self.maps = PolicyMaps(self.dp.bpffs)
        self.current = self.maps.read()
        for ifindex in self.current.endpoints:  # swap in this build's programs
            self._attach(ifindex)
        log.info("policy datapath ready: %d endpoint(s) held in the pinned maps",
                 len(self.current.endpoints))

    # --- the sync -------------------------------------------------------------
    def pending(self) -> bool:
        """Something to retry or to look for soon: the loop polls, not waits."""
        return self.stale or bool(self.missing)

    def due(self, now: float) -> bool:
        return self.retry.due(now) or (bool(self.missing) and now >= self.next_find)

    def sync(self, desired: DesiredState) -> bool:
        """Brings the policy maps to desired. A change that leaves the policy
        inputs as they were (a Service edit) costs a comparison."""
        inputs = (desired.pods, desired.namespaces, desired.network_policies)
        now = time.monotonic()
        if inputs == self.inputs and not self.stale and not (self.missing and now >= self.next_find):
            return True
        try:
            if self.maps is None:
                if not self.wanted(desired):
                    return True
                self.start()
            self._sync(desired)
        except Exception as exc:
            self.stale = True
            self._reread()  # a write that failed half-way: plan the retry from what the maps hold
            self.metrics.sync_errors.labels("policy").inc()
            delay = self.retry.failed(time.monotonic())
            self.error("NetworkPolicy not applied (load balancing goes on): %s; retrying in %gs",
                       one_line(exc), delay)
            return False
        self.inputs = inputs
        self.retry.reset()
        if self.stale:
            log.info("policy maps match the desired state again")
        self.stale = False
        return True

    def _reread(self) -> None:
        if self.maps is None:
            return
        try:
            self.current = self.maps.read()
        except Exception as exc:
            log.error("could not read the policy maps back: %s", one_line(exc))

    def _sync(self, desired: DesiredState) -> None:
        assert self.maps is not None
        node_ips = self._node_ips()
        compiled = self.compiler.compile(desired.pods, desired.namespaces, desired.network_policies,
                                         self.node_name, {self.node_name: node_ips})
        found = self._find(compiled)
        self._keep_unseen(compiled, found)
        p: PolicyPlan = plan_policy(self.current, compiled, found, node_ips, self._capacity())
        for problem in p.problems:
            self.error("%s", problem)
        for ifindex in set(found.values()) - set(self.current.endpoints):
            self._attach(ifindex)
        self.maps.apply(p.steps())
        before = set(self.current.endpoints)
        self.current = p.apply_to(self.current)
        for ifindex in before - set(self.current.endpoints):
            self._detach(ifindex)
        self.compiled = compiled
        # Replaced, not updated: the HTTP thread reads these while the loop runs.
        self.rules = {**self.rules, **p.rules}
        self.pod_names = {str(ip): f"{pod.namespace}/{pod.name}" for pod in desired.pods
                          for ip in pod.ips}
        self.endpoints = self._views(desired, compiled, found)
        if p.writes:
            log.info("policy: %d local pod(s), %d enforced, %d map writes",
                     len(compiled.pods), len(found), p.writes)

    def _local(self, pod) -> bool:
        return pod.node_name == self.node_name and not pod.host_network

    def _find(self, compiled: Compiled) -> dict[tuple[str, str], int]:
        """Host-side ifindex of each local pod that runs here now."""
        found, missing = {}, set()
        for key, pol in compiled.pods.items():
            ifindex = find_endpoint(pol.pod.uid, pol.pod.ips, self.cgroup_root) if pol.pod.ips else None
            if ifindex is None:
                missing.add(key)
            else:
                found[key] = ifindex
        for key in sorted(missing - self.missing):
            log.info("pod %s/%s: no interface found yet (not running on this node?); "
                     "looking again every %gs", *key, FIND_AGAIN)
        self.missing = missing
        self.next_find = time.monotonic() + FIND_AGAIN
        return found

    def _keep_unseen(self, compiled: Compiled, found: dict) -> None:
        """A pod still desired here whose interface was found before and still
        exists keeps its endpoint even if the look failed this time (its pause
        process restarting, say): enforcement never lapses on a failed look."""
        held = {key: ep.ifindex for key, ep in self.endpoints.items() if ep.ifindex is not None}
        for key in compiled.pods.keys() - found.keys():
            ifindex = held.get(key)
            if ifindex is not None and ifindex in self.current.endpoints and self._exists(ifindex):
                found[key] = ifindex

    def _exists(self, ifindex: int) -> bool:
        from ..datapath.policy import _ipr
        try:
            with _ipr(self.dp.netns) as ipr:
                return bool(ipr.get_links(ifindex))
        except Exception:
            return False

    def _capacity(self) -> dict[str, int]:
        specs = {s.name: s for s in self.dp.maps()}
        return {role: self.dp.capacity(specs[name]) for role, name in MAP_NAMES.items()}

    def _node_ips(self) -> list:
        """This node's own addresses (traffic to and from them always passes),
        in the netns that holds the pods' host-side interfaces."""
        from ..datapath.policy import _ipr
        with _ipr(self.dp.netns) as ipr:
            ips = [ipaddress.ip_address(a.get_attr("IFA_ADDRESS")) for a in ipr.get_addr()]
        return [ip for ip in ips if not ip.is_loopback and not ip.is_link_local]

    def _attach(self, ifindex: int) -> None:
        try:
            self.dp.attach(ifindex)
        except Exception as exc:
            raise RuntimeError(f"attaching the policy programs to ifindex {ifindex}: "
                               f"{one_line(exc)}") from exc

    def _detach(self, ifindex: int) -> None:
        try:
            self.dp.detach(ifindex)
        except Exception as exc:  # the interface went with its pod: nothing left to do
            log.debug("detaching from ifindex %d: %s", ifindex, one_line(exc))

    def _views(self, desired: DesiredState, compiled: Compiled, found: dict
               ) -> dict[tuple[str, str], Endpoint]:
        out = {}
        for key, pol in compiled.pods.items():
            selecting = tuple(sorted(f"{np.namespace}/{np.name}" for np in desired.network_policies
                                     if np.namespace == key[0]
                                     and np.pod_selector.matches(pol.pod.labels)))
            ifindex = found.get(key)
            ep = self.current.endpoints.get(ifindex) if ifindex is not None else None
            out[key] = Endpoint(key[0], key[1], ifindex, ep.ep_id if ep else None,
                                pol.isolated_ingress, pol.isolated_egress, selecting)
        return out

    def known_counts(self) -> dict[str, int]:
        """Entries of the maps this agent writes, for map pressure (no walk)."""
        if self.maps is None:
            return {}
        current = self.current
        return {name: len(getattr(current, role)) for role, name in MAP_NAMES.items()}

    # --- read-only views for the HTTP server (/v1/endpoints, /v1/policy) -------
    def endpoints_view(self) -> dict:
        """The local pods: identity, enforcement state, selecting policies;
        and every pod address's name and every rule id's name (the monitor's)."""
        endpoints = self.endpoints
        return {"endpoints": [_endpoint_json(ep, self.compiled) for _, ep in sorted(endpoints.items())],
                "pod_names": dict(self.pod_names),
                "rules": {str(k): v for k, v in sorted(self.rules.items())}}

    def policy_view(self) -> dict:
        """The effective allow rules per local pod, as compiled."""
        compiled = self.compiled
        pods = [] if compiled is None else [_pod_policy_json(pol) for _, pol in sorted(compiled.pods.items())]
        return {"pods": pods, "always_allowed": "the pod itself and its node, any port"}


def enforcement(ep: Endpoint) -> str:
    if ep.ifindex is None:
        return "no interface"   # not running here yet: nothing to attach to
    if ep.ep_id is None:
        return "not programmed"  # found, but its entries are not in the maps (see the log)
    return "enforced"


def _endpoint_json(ep: Endpoint, compiled: Compiled | None) -> dict:
    pol = compiled.pods.get((ep.namespace, ep.name)) if compiled else None
    return {"namespace": ep.namespace, "name": ep.name,
            "ips": [str(ip) for ip in pol.pod.ips] if pol else [],
            "ifindex": ep.ifindex, "ep_id": ep.ep_id, "state": enforcement(ep),
            "isolated_ingress": ep.isolated_ingress, "isolated_egress": ep.isolated_egress,
            "policies": list(ep.policies)}


def _allow_json(allow) -> dict:
    from ..reconcile.policy import rule_id
    peers = "any" if allow.peers is None else sorted(str(n) for n in allow.peers)
    ports = "any" if allow.ports is None else [
        f"{r.protocol}/{r.first}" if r.first == r.last else f"{r.protocol}/{r.first}-{r.last}"
        for r in allow.ports]
    return {"rule": allow.origin, "id": rule_id(allow.origin), "peers": peers, "ports": ports}


def _pod_policy_json(pol) -> dict:
    return {"namespace": pol.pod.namespace, "name": pol.pod.name,
            "ingress": {"isolated": pol.isolated_ingress,
                        "rules": [_allow_json(a) for a in pol.ingress]},
            "egress": {"isolated": pol.isolated_egress,
                       "rules": [_allow_json(a) for a in pol.egress]}}
