"""Sidecar capture: the local meshed pods, their cgroups, the capture maps.

Each sync takes AgentConfig's capture settings and the desired pods, keeps
this node's meshed ones (capture/settings.py), finds each one's kubelet pod
cgroup from its uid (datapath/endpoints.py's candidates; the cgroup's id
is the mbpf_cap_pod key), plans the writes (reconcile/capture.py) and
applies them. The capture hooks that file connections and answer
SO_ORIGINAL_DST (sockops, getsockopt) are attached before the first pod is
meshed and detached only after the last one's entries are gone. A pod
whose annotation does not parse, that has no address yet or whose cgroup
is not there is not captured, and says why in the view; the others go on.
A failed write is retried with backoff from what the maps hold. After the
writes, each meshed pod with inbound capture gets bpf/capture_in.c's tc
programs on its own interface (clients on other nodes); a pod whose
interface is not found yet is looked for again.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from ..capture.settings import AnnotationError, PodCapture, is_meshed, pod_capture
from ..datapath.endpoints import pod_cgroup_candidates
from ..metrics import AgentMetrics
from ..model import CaptureSettings, DesiredState
from ..reconcile.capture import MeshedPod, describe_rules, plan_capture
from ..reconcile.capture_keys import F_INBOUND, CaptureState
from ..retry import Backoff
from . import one_line

log = logging.getLogger("meshbpf.agent")  # the agent's log, as users and tests filter it

FIND_AGAIN = 2.0  # seconds between looks for meshed pods whose cgroup is not there yet


class CaptureDatapath(Protocol):
    """What the sync needs of the datapath (datapath/capture.py's CaptureMaps
    and the loader's capture hooks); tests pass a fake."""

    def read(self) -> CaptureState: ...
    def apply(self, steps) -> None: ...
    def counters(self) -> dict[str, int]: ...
    def attach(self) -> None: ...
    def detach(self) -> None: ...
    def inbound(self, places: dict[int, tuple[Path, tuple]]) -> set[int]: ...


class LoaderCapture:
    """The real CaptureDatapath: the pinned capture maps (datapath/capture.py)
    and the loader's capture hooks on the agent's cgroup (which holds every
    meshed pod's and every same-node client's cgroup)."""

    def __init__(self, lb, bpffs: Path, cgroup: Path):
        from ..datapath.capture import CaptureMaps, InboundTC
        from ..datapath.layout import CAPTURE_MAPS
        from ..datapath.loader import lb_event_cflags
        self.maps = CaptureMaps(bpffs)
        self.lb = lb
        self.cgroup = cgroup
        sizes = [f"-D{s.size_macro}={lb.capacity(s)}" for s in CAPTURE_MAPS if s.size_macro]
        # the monitor's ring buffer, as the connect hooks have it: same pin, same size
        self.tc = InboundTC(bpffs, sizes + lb_event_cflags(lb.sizes))
        self.inbound_at: dict[int, tuple[str, int, int]] = {}  # cgroup id -> netns path, ifindex, inode
        self.inbound_error = ""  # the last one logged: a failure that repeats is logged once

    def read(self) -> CaptureState:
        return self.maps.read()

    def apply(self, steps) -> None:
        self.maps.apply(steps)

    def counters(self) -> dict[str, int]:
        return self.maps.counters()

    def attach(self) -> None:
        self.lb.attach_capture([self.cgroup])

    def detach(self) -> None:
        self.lb.detach_capture()

    def inbound(self, places: dict[int, tuple[Path, tuple]]) -> set[int]:
        """bpf/capture_in.c's tc programs on the interface of each pod in
        places (cgroup id -> its kubelet cgroup and addresses), inside its
        netns, for clients the connect hooks do not see (other nodes); off
        pods no longer listed (a previous agent's on pods unmeshed while no
        agent ran stay, passing everything, until `meshbpf uninstall`).
        Returns the pods whose interface was not found (looked for again)."""
        from ..datapath.capture import detach_inbound, pod_interface
        missing = set()
        for cg_id, (path, ips) in places.items():
            if self._still_there(cg_id):
                continue
            try:
                where = pod_interface(path, ips)
                if where is not None:
                    self.tc.attach(*where)  # replaces a previous agent's programs on our slots
                    self.inbound_at[cg_id] = (*where, os.stat(where[0]).st_ino)
            except Exception as exc:  # this pod waits; the others and the maps go on
                where = None
                if one_line(exc) != self.inbound_error:
                    log.error("capture: inbound from other nodes not set up for pod cgroup %s: %s",
                              path, one_line(exc))
                self.inbound_error = one_line(exc)
            if where is None:
                missing.add(cg_id)
        for cg_id in set(self.inbound_at) - set(places):
            netns, ifindex, _ = self.inbound_at.pop(cg_id)
            try:
                detach_inbound(netns, ifindex)
            except Exception as exc:  # its entries are gone: the programs pass everything
                log.warning("capture: tc programs left on ifindex %d in %s: %s", ifindex, netns,
                            one_line(exc))
        return missing

    def _still_there(self, cg_id: int) -> bool:
        """Attached by this agent, to a netns that still exists (a pod's
        sandbox restarted in the same cgroup has a new one)."""
        at = self.inbound_at.get(cg_id)
        try:
            return at is not None and os.stat(at[0]).st_ino == at[2]
        except OSError:
            return False


@dataclass(frozen=True)
class PodState:
    """A local pod capture considered, for the views."""

    namespace: str
    name: str
    state: str                        # "captured", or why not
    cgroup_id: int | None = None
    settings: PodCapture | None = None


def pod_cgroup(cgroup_root: Path, uid: str) -> tuple[Path, int] | None:
    """The pod's kubelet cgroup below cgroup_root and its id (inode)."""
    for path in pod_cgroup_candidates(cgroup_root, uid):
        try:
            return path, os.stat(path).st_ino
        except OSError:
            continue
    return None


class CaptureSync:
    def __init__(self, metrics: AgentMetrics, error: Callable[..., None], node_name: str,
                 cgroup_root: Path | None = None):
        self.metrics = metrics
        self.error = error
        self.node_name = node_name
        self.cgroup_root = cgroup_root
        self.dp: CaptureDatapath | None = None   # None: capture not available (kernel, build)
        self.current = CaptureState()
        self.attached = False
        self.inputs: tuple | None = None
        self.pods: dict[tuple[str, str], PodState] = {}
        self.settings = CaptureSettings()
        self.retry = Backoff()
        self.stale = False
        self.missing: set[tuple[str, str]] = set()
        self.waiting_inbound: set[tuple[str, str]] = set()
        self.next_find = 0.0
        self.warned_unavailable = False

    # --- start-up ---------------------------------------------------------------
    def start(self, dp: CaptureDatapath, cgroup_root: Path) -> None:
        """Takes over what the pinned maps hold (a previous agent's pods keep
        being captured until a sync says otherwise)."""
        self.dp = dp
        self.cgroup_root = cgroup_root
        self.current = dp.read()
        self.attached = bool(self.current.pods)
        if self.current.pods:
            dp.attach()  # this build's programs in place of the previous agent's
            log.info("capture: %d meshed pod(s) held in the pinned maps", len(self.current.pods))

    # --- the sync -------------------------------------------------------------------
    def pending(self) -> bool:
        return self.stale or bool(self.missing)

    def due(self, now: float) -> bool:
        return self.retry.due(now) or (bool(self.missing) and now >= self.next_find)

    def sync(self, desired: DesiredState, reread: bool = False) -> bool:
        """Brings the capture maps to desired; reread: plan against what the
        maps hold now (the periodic resync repairs drift)."""
        settings = desired.settings.capture
        inputs = (settings, desired.pods)
        now = time.monotonic()
        # The resync's reread is skipped while capture is off and nothing is
        # held: the default agent never walks the capture maps.
        if reread and self.dp is not None and (settings.enabled or self.current.pods):
            self._reread()
        elif inputs == self.inputs and not self.stale and not (self.missing and now >= self.next_find):
            return True
        self.settings = settings
        if self.dp is None:
            self._unavailable(settings)
            self.inputs = inputs
            return True
        try:
            self._sync(desired, settings)
        except Exception as exc:
            self.stale = True
            self._reread()
            self.metrics.sync_errors.labels("capture").inc()
            delay = self.retry.failed(time.monotonic())
            self.error("sidecar capture not applied (load balancing goes on): %s; retrying in %gs",
                       one_line(exc), delay)
            return False
        self.inputs = inputs
        self.retry.reset()
        if self.stale:
            log.info("capture maps match the desired state again")
        self.stale = False
        return True

    def _unavailable(self, settings: CaptureSettings) -> None:
        if settings.enabled and not self.warned_unavailable:
            log.warning("AgentConfig turns sidecar capture on, but this kernel or build cannot do "
                        "it (see `meshbpf status`); pods stay uncaptured")
            self.warned_unavailable = True
        self.pods = {}

    def _sync(self, desired: DesiredState, settings: CaptureSettings) -> None:
        assert self.dp is not None
        views, meshed, places = self._local_meshed(desired, settings)
        plan = plan_capture(self.current, meshed)
        for problem in plan.problems:
            self.error("capture: %s", problem)
        if plan.state.pods and not self.attached:
            self.dp.attach()   # connections must be filed from the first capture on
            self.attached = True
        self.dp.apply(plan.steps)
        self.current = plan.state
        self._inbound(plan.state, places)
        if not plan.state.pods and self.attached:
            self.dp.detach()   # after the last pod's entries: nothing is captured any more
            self.attached = False
        for key, why in plan.left_out.items():
            views[key] = PodState(*key, f"not captured: {why}")
        self.pods = views  # replaced, not updated: the HTTP thread reads it
        if plan.writes:
            log.info("capture: %d meshed pod(s), %d map writes", len(plan.state.pods), plan.writes)

    def _local_meshed(self, desired: DesiredState, settings: CaptureSettings
                      ) -> tuple[dict[tuple[str, str], PodState], list[MeshedPod], dict]:
        views: dict[tuple[str, str], PodState] = {}
        meshed, missing = [], set()
        places: dict[int, tuple[tuple[str, str], Path, tuple]] = {}
        for pod in desired.pods:
            if pod.node_name != self.node_name or not is_meshed(pod, settings):
                continue
            key = (pod.namespace, pod.name)
            try:
                cap = pod_capture(pod, settings)
            except AnnotationError as exc:
                views[key] = PodState(*key, f"not captured: {exc}")
                continue
            found = pod_cgroup(self.cgroup_root, pod.uid) if pod.uid and self.cgroup_root else None
            if not pod.ips:
                views[key] = PodState(*key, "waiting: no pod address yet", settings=cap)
            elif found is None:
                missing.add(key)
                views[key] = PodState(*key, "waiting: no pod cgroup (not running here yet?)",
                                      settings=cap)
            else:
                views[key] = PodState(*key, "captured", found[1], cap)
                meshed.append(MeshedPod(found[1], cap))
                places[found[1]] = (key, found[0], tuple(pod.ips))
        for key in sorted(missing - self.missing):
            log.info("capture: pod %s/%s has no cgroup yet; looking again every %gs", *key, FIND_AGAIN)
        self.missing = missing
        self.next_find = time.monotonic() + FIND_AGAIN
        return views, meshed, places

    def _inbound(self, state: CaptureState, places: dict) -> None:
        """Inbound capture from other nodes on the pods the maps now hold with
        inbound capture on; a pod whose interface is not found yet is looked
        for again (with the pods that have no cgroup yet)."""
        assert self.dp is not None
        inbound = {cg: place[1:] for cg, place in places.items()
                   if cg in state.pods and state.pods[cg].flags & F_INBOUND}
        waiting = {places[cg][0] for cg in self.dp.inbound(inbound)}
        for key in sorted(waiting - self.waiting_inbound):
            log.info("capture: pod %s/%s: no interface with its address yet (inbound from "
                     "other nodes waits); looking again every %gs", *key, FIND_AGAIN)
        self.waiting_inbound = waiting
        self.missing |= waiting

    def _reread(self) -> None:
        if self.dp is None:
            return
        try:
            self.current = self.dp.read()
        except Exception as exc:
            log.error("could not read the capture maps back: %s", one_line(exc))

    # --- views ----------------------------------------------------------------------
    def counters(self) -> dict[str, int]:
        return self.dp.counters() if self.dp is not None else {}

    def known_counts(self) -> dict[str, int]:
        c = self.current
        return {"mbpf_cap_pod": len(c.pods), "mbpf_cap_addr": len(c.addresses),
                "mbpf_cap_cidr": len(c.cidrs), "mbpf_cap_port": len(c.ports)}

    def view(self) -> dict:
        """/v1/capture: the settings, and each local meshed pod with its
        effective settings as the maps hold them."""
        s, current = self.settings, self.current
        pods = []
        for key, pv in sorted(self.pods.items()):
            held = current.pods.get(pv.cgroup_id) if pv.cgroup_id is not None else None
            entry = _pod_json(pv, held, describe_rules(current, held.pod_id) if held else None)
            if held is not None and held.flags & F_INBOUND:
                entry["inbound_from_other_nodes"] = ("waiting: no interface with its address yet"
                                                     if key in self.waiting_inbound else "on")
            pods.append(entry)
        return {"available": self.dp is not None, "stale": self.stale,
                "settings": {"enabled": s.enabled, "mesh": s.mesh, "dns": s.dns,
                             "optInLabel": _label_text(s.opt_in_label)},
                "pods": pods}


def _label_text(label: tuple[str, str | None] | None) -> str | None:
    if label is None:
        return None
    return label[0] if label[1] is None else f"{label[0]}={label[1]}"


def _pod_json(pv: PodState, held, rules: dict | None) -> dict:
    out: dict = {"namespace": pv.namespace, "name": pv.name, "state": pv.state,
                 "cgroup_id": pv.cgroup_id}
    c = pv.settings
    if c is not None:
        out.update({
            "mesh": c.mesh, "ips": [str(ip) for ip in c.ips], "proxy_uid": c.proxy_uid,
            "outbound_port": c.out_port, "inbound_port": c.in_port, "dns_port": c.dns_port,
            "outbound": ("*" if c.include_out is None else [str(n) for n in c.include_out])
            if c.outbound else "none",
            "exclude_outbound_ranges": [str(n) for n in c.exclude_out],
            "inbound_ports": ("*" if c.include_in_ports is None else list(c.include_in_ports))
            if c.inbound else "none",
            "exclude_inbound_ports": list(c.exclude_in_ports),
            "exclude_outbound_ports": list(c.exclude_out_ports),
            "default_container": c.default_container,
        })
    if held is not None:
        out["pod_id"] = held.pod_id
        out["rules"] = rules
    return out
