"""Writes routes' status.parents (route_status) through the status subresource.

Every node's agent computes the same status from the same objects, so each
writes only when what the route holds differs from it (lastTransitionTime
aside): the first agent's write lands, the others then see it and write
nothing. A write carries the resourceVersion it was computed against, so
two agents racing cannot clobber an edit (409: tried again after the next
change or a backoff). Entries of other controllers are kept as they are;
ours for a parentRef the route no longer names are removed. A route left
out for a problem keeps the status it had.

Writes run on their own thread: the source's poll never waits on the network.
"""

from __future__ import annotations

import datetime
import logging
import threading
from typing import Any, Callable, Iterable

from kubernetes.client.exceptions import ApiException

from .route_status import CONTROLLER_NAME, ParentStatus

log = logging.getLogger(__name__)

Patch = Callable[[str, str, str, dict], Any]  # (plural, namespace, name, body)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def wanted_parents(obj: dict, ours: Iterable[ParentStatus], now: str) -> list[dict]:
    """status.parents as it should be: others' entries, then ours in parentRef
    order; a condition that keeps its status keeps its lastTransitionTime."""
    current = (obj.get("status") or {}).get("parents") or []
    others = [p for p in current if p.get("controllerName") != CONTROLLER_NAME]
    old = {_ref_key(p.get("parentRef") or {}): p for p in current if p.get("controllerName") == CONTROLLER_NAME}
    generation = (obj.get("metadata") or {}).get("generation")
    mine = []
    for ps in ours:
        ref = ps.parent_ref()
        before = {c.get("type"): c for c in (old.get(_ref_key(ref)) or {}).get("conditions") or []}
        conditions = []
        for c in ps.conditions:
            status = "True" if c.status else "False"
            was = before.get(c.type) or {}
            cond = {"type": c.type, "status": status, "reason": c.reason, "message": c.message,
                    "lastTransitionTime": was.get("lastTransitionTime") if was.get("status") == status else now}
            if generation is not None:
                cond["observedGeneration"] = generation
            conditions.append(cond)
        mine.append({"parentRef": ref, "controllerName": CONTROLLER_NAME, "conditions": conditions})
    return others + mine


def _ref_key(ref: dict) -> tuple:
    return (ref.get("group"), ref.get("kind"), ref.get("namespace"), ref.get("name"), ref.get("port"))


def _comparable(parents: list[dict]) -> list[dict]:
    return [{**p, "conditions": [{k: v for k, v in c.items() if k != "lastTransitionTime"}
                                 for c in p.get("conditions") or []]} for p in parents]


class RouteStatusWriter:
    """Keeps our entries in the routes' status.parents as route_status says.

    `offer` hands over the newest statuses; a thread writes what differs."""

    def __init__(self, patch: Patch, routes: Callable[[], list[tuple[str, dict]]],
                 retry_s: float = 5.0):
        self._patch = patch
        self._routes = routes   # [(plural, raw route object)] as the reflectors hold them
        self._retry_s = retry_s
        self._cond = threading.Condition()
        self._pending: tuple[dict[str, list[ParentStatus]], set[str]] | None = None
        self._stopping = False
        self._written: dict[tuple, tuple[str | None, list]] = {}  # route -> (resourceVersion, parents)
        self._refused: str | None = None
        self._thread = threading.Thread(target=self._run, name="route-status", daemon=True)
        self._thread.start()

    def offer(self, statuses: Iterable[ParentStatus], rejected: set[str]) -> None:
        """statuses: every route's; rejected: "Kind namespace/name" of the
        routes left out for a problem (their status is left alone)."""
        by_route: dict[str, list[ParentStatus]] = {}
        for ps in statuses:
            by_route.setdefault(str(ps.route), []).append(ps)
        with self._cond:
            self._pending = (by_route, set(rejected))
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(5)

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                pending, self._pending = self._pending, None
            try:
                ok = self.write(*pending)
            except Exception:  # never let the thread die: the next offer tries again
                log.exception("writing route status failed")
                ok = False
            if not ok:
                with self._cond:  # retry later unless a newer offer comes first
                    self._cond.wait(self._retry_s)
                    if self._pending is None:
                        self._pending = pending

    def write(self, by_route: dict[str, list[ParentStatus]], rejected: set[str]) -> bool:
        """Patches every route whose status differs; whether all writes went through."""
        ok = True
        now = _now()
        for plural, obj in self._routes():
            meta = obj.get("metadata") or {}
            label = f"{obj.get('kind')} {meta.get('namespace') or 'default'}/{meta.get('name')}"
            if label in rejected:
                continue
            parents = wanted_parents(obj, by_route.get(label, ()), now)
            current = (obj.get("status") or {}).get("parents") or []
            version = meta.get("resourceVersion")
            key = (plural, meta.get("namespace"), meta.get("name"))
            if _comparable(parents) == _comparable(current):
                continue
            if self._written.get(key) == (version, _comparable(parents)):
                continue  # written already; the watch has not brought it back yet
            done = self._write_one(plural, meta, parents, label)
            if done:
                self._written[key] = (version, _comparable(parents))
            ok = ok and done
        return ok

    def _write_one(self, plural: str, meta: dict, parents: list[dict], label: str) -> bool:
        body = {"metadata": {"resourceVersion": meta.get("resourceVersion")}, "status": {"parents": parents}}
        try:
            self._patch(plural, meta.get("namespace") or "default", meta.get("name"), body)
        except ApiException as exc:
            if exc.status == 409:
                return False  # changed meanwhile: the watch brings the new version, we try again
            reason = f"HTTP {exc.status} {exc.reason}"
            if reason != self._refused:
                log.warning("route status not written for %s: %s (grant patch on tcproutes/status and "
                            "udproutes/status, as deploy/ does)", label, reason)
                self._refused = reason
            return False
        if self._refused is not None:
            log.info("route status written again (%s)", label)
            self._refused = None
        return True
