"""`meshbpf monitor`: a live stream of policy flow events.

Events are read from the pinned ring buffer mbpf_events (PolicyEvents);
the programs emit them only while mbpf_pol_cfg.events is on. A BPF ring
buffer has one consumer position, shared by every process that maps it: two
readers would each get some of the events, silently. So one monitor reads
a bpffs folder's events at a time: it holds an exclusive flock on a lock
file named after the folder (in /run/meshbpf, holding its pid) from before
it turns events on until after it turns them off, and a second monitor
refuses with one line naming the first one's pid. Ctrl-C and SIGTERM turn
events off on the way out; a monitor killed with SIGKILL leaves them on (a
cost per new flow, not per packet) until the next monitor exits.

Three kinds of events share the stream: policy verdicts and drops (tc, per
new flow), socket-LB translations (connect() or an unconnected UDP send
to a Service: the client, the Service, the backend it got, or "refused"),
and sidecar capture decisions (connect() or a DNS send steered to a meshed
pod's proxy: "outbound", "inbound" or "dns", the original destination, the
proxy's address and port, and the pod). --type picks some.

Names come from the agent's /v1/endpoints view (addresses -> pods, rule
ids -> rule names, Service frontends -> Services, pod uids -> pods), asked
again at most every NAMES_MAX_AGE seconds when an event names something
unknown; without the agent, events are shown raw. Socket-LB and capture
events name their client (and a capture event its meshed pod) by cgroup
(connect() runs before the socket has an address): the cgroup's path names
the kubelet pod cgroup, pod<uid> (cgroupfs) or ...-pod<uid_>.slice
(systemd), and so the pod.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import re
import signal
import time
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

import click

from ..datapath import cgroup
from ..datapath.policy_events import (CAP_DECISIONS, EVENT_VERDICTS, LB_VERDICTS, CapEvent, Event,
                                      LbEvent, PolicyEvent, PolicyEvents)
from .agent_views import AgentUnreachable, agent_option, complete_pods, fetch
from .common import bpffs_option, friendly_errors

LOCK_DIR = Path("/run/meshbpf")
NAMES_MAX_AGE = 2.0
# cgroup ids the monitor keeps names for: far more than a node's live
# cgroups (110 pods of a few cgroups each, and the system's), so only
# removed cgroups' names are ever dropped.
MAX_CGROUP_NAMES = 8192
PROTOS = {6: "TCP", 17: "UDP", 132: "SCTP", 1: "ICMP", 58: "ICMPv6"}
COLUMNS = "{time:<15} {verdict:<10} {direction:<8} {proto:<5} {src:<34} {dst:<34} {rule}"
# kubelet's pod cgroup: cgroupfs "pod<uid>", systemd "kubepods-<qos>-pod<uid_>.slice"
POD_CGROUP = re.compile(r"(?:^|-)pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})(?:\.slice)?$")


class EventLease:
    """The one reader's hold on the events of a bpffs folder (see the module doc)."""

    def __init__(self, bpffs: Path):
        LOCK_DIR.mkdir(parents=True, exist_ok=True)
        name = str(bpffs.resolve()).strip("/").replace("/", "-") or "root"
        self.path = LOCK_DIR / f"monitor-{name}.lock"
        while True:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(self.fd)
                raise click.ClickException(
                    f"another `meshbpf monitor` (pid {holder}) is reading the events of {bpffs}; "
                    "a ring buffer has one reader at a time: stop it first") from None
            if self._still_linked():
                break
            os.close(self.fd)  # its holder unlinked it as we opened it: take the new file
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def _still_linked(self) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(self.fd).st_ino
        except FileNotFoundError:
            return False

    def release(self) -> None:
        """Removes the file while still holding it (a monitor that opened it
        meanwhile sees it unlinked and starts over), then lets go."""
        try:
            os.unlink(self.path)
        finally:
            os.close(self.fd)


class SharedEvents(PolicyEvents):
    """PolicyEvents read under the EventLease: it is taken before events
    are turned on and let go after they are turned off."""

    def __init__(self, bpffs: Path):
        self.lease = EventLease(bpffs)
        try:
            super().__init__(bpffs)
        except BaseException:
            self.lease.release()
            raise

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.lease.release()


class Names:
    """Pod and rule names from the agent, refreshed when something is unknown."""

    def __init__(self, agent_addr: str | None):
        self.agent_addr = agent_addr
        self.pods: dict[str, str] = {}
        self.rules: dict[int, str] = {}
        self.by_ifindex: dict[int, str] = {}
        self.services: dict[str, str] = {}
        self.pod_uids: dict[str, str] = {}
        self.cgroups = CgroupNames()
        self.fetched = float("-inf")
        self.reachable = False
        self.noted = False  # the "not reachable" note was shown
        self.refresh()

    def refresh(self) -> None:
        if self.agent_addr is None or time.monotonic() - self.fetched < NAMES_MAX_AGE:
            return
        self.fetched = time.monotonic()
        try:
            view = fetch(self.agent_addr, "/v1/endpoints", timeout=1.0)
        except AgentUnreachable as exc:
            if self.reachable or not self.noted:
                self.noted = True
                click.echo(f"meshbpf: note: agent not reachable ({exc}); showing addresses and rule ids",
                           err=True)
            self.reachable = False
            return
        self.reachable = True
        self.pods = view.get("pod_names", {})
        self.rules = {int(k): v for k, v in view.get("rules", {}).items()}
        self.by_ifindex = {e["ifindex"]: f"{e['namespace']}/{e['name']}"
                           for e in view.get("endpoints", []) if e.get("ifindex") is not None}
        self.services = view.get("services", {})
        self.pod_uids = view.get("pod_uids", {})

    def pod(self, endpoint: str) -> str | None:
        addr = endpoint.rsplit(":", 1)[0].strip("[]")
        return self.pods.get(addr)

    def describe(self, ev: Event) -> dict:
        if isinstance(ev, LbEvent):
            return self._describe_lb(ev)
        if isinstance(ev, CapEvent):
            return self._describe_cap(ev)
        known = (self.pod(ev.src), self.pod(ev.dst), self.by_ifindex.get(ev.ifindex),
                 self.rules.get(ev.rule) if ev.rule else "")
        if None in known:
            self.refresh()
            known = (self.pod(ev.src), self.pod(ev.dst), self.by_ifindex.get(ev.ifindex),
                     self.rules.get(ev.rule) if ev.rule else "")
        src_pod, dst_pod, endpoint, rule = known
        return {**asdict(ev), "protocol": PROTOS.get(ev.proto, str(ev.proto)),
                "src_pod": src_pod, "dst_pod": dst_pod, "pod": endpoint, "rule_name": rule}

    def _cgroup_pod(self, cg_id: int) -> tuple[str | None, str | None]:
        """The pod a cgroup is (or is below), "" if none, None if unknown
        yet; and the cgroup's path."""
        uid, path = self.cgroups.pod_uid(cg_id)
        return (self.pod_uids.get(uid) if uid else "", path)

    def _lb_known(self, ev: LbEvent, frontend: str) -> tuple:
        return (self.services.get(frontend), self.pod(ev.backend) if ev.backend else "",
                *self._cgroup_pod(ev.cgroup_id))

    def _cap_known(self, ev: CapEvent) -> tuple:
        if ev.peer:  # from tc: no task, the client is the packet's source ("": not a pod we know)
            return (*self._cgroup_pod(ev.pod_cgroup_id), self.pod(ev.peer) or "", None)
        return (*self._cgroup_pod(ev.pod_cgroup_id), *self._cgroup_pod(ev.cgroup_id))

    def _describe_cap(self, ev: CapEvent) -> dict:
        known = self._cap_known(ev)
        if None in known:
            self.refresh()
            known = self._cap_known(ev)
        pod, pod_path, client_pod, client_path = known
        return {**asdict(ev), "protocol": PROTOS.get(ev.proto, str(ev.proto)), "pod": pod or None,
                "pod_cgroup": pod_path, "client_pod": client_pod or None, "client_cgroup": client_path}

    def _describe_lb(self, ev: LbEvent) -> dict:
        protocol = PROTOS.get(ev.proto, str(ev.proto))
        frontend = f"{ev.service}/{protocol}"
        known = self._lb_known(ev, frontend)
        if None in known:
            self.refresh()
            known = self._lb_known(ev, frontend)
        service, backend_pod, client_pod, path = known
        return {**asdict(ev), "protocol": protocol, "service_name": service,
                "backend_pod": backend_pod or None, "client_pod": client_pod or None,
                "client_cgroup": path}


class CgroupNames:
    """cgroup id -> its path (relative to the cgroup2 mount) and the pod uid
    in it, if it is a kubelet pod's cgroup or below one. The whole tree is
    walked for an id not seen yet, at most every NAMES_MAX_AGE seconds: one
    walk names every cgroup there is then (an event often names two: a
    capture event its client and its pod).

    At most MAX_CGROUP_NAMES ids are kept, the least recently used going
    first: cgroup ids are never reused, so on a node where pods come and go
    a monitor left running would otherwise keep every cgroup it ever saw.
    A removed cgroup's name is not dropped at once: its last events may
    still be in the ring buffer."""

    def __init__(self):
        self.paths: dict[int, str] = {}  # in order of use, the oldest first
        self.walked = float("-inf")

    def path(self, cg_id: int) -> str | None:
        path = self.paths.pop(cg_id, None)
        if path is not None:
            self.paths[cg_id] = path  # now the most recently used
            return path
        if time.monotonic() - self.walked < NAMES_MAX_AGE:
            return None
        self.walked = time.monotonic()
        try:
            root = cgroup.cgroup2_mount()
            found = cgroup.paths_by_id()
        except cgroup.CgroupError:
            return None
        walked = {i: "/" + str(p.relative_to(root)).lstrip(".") for i, p in found.items()}
        self._remember(walked)
        return walked.get(cg_id)  # named even on a tree too big to keep whole

    def _remember(self, walked: dict[int, str]) -> None:
        """A walk's cgroups, as the most recently used (they exist now);
        then the least recently used beyond MAX_CGROUP_NAMES are dropped."""
        for cg_id, path in walked.items():
            self.paths.pop(cg_id, None)
            self.paths[cg_id] = path
        for cg_id in list(itertools.islice(self.paths, max(0, len(self.paths) - MAX_CGROUP_NAMES))):
            del self.paths[cg_id]

    def pod_uid(self, cg_id: int) -> tuple[str | None, str | None]:
        path = self.path(cg_id)
        if path is None:
            return None, None
        for part in reversed(path.split("/")):
            m = POD_CGROUP.search(part)
            if m:
                return m.group(1).replace("_", "-"), path
        return "", path  # not a pod's cgroup (a host process, a bare lab pod)


def matches(event: dict, pods: tuple[str, ...], verdicts: tuple[str, ...],
            types: tuple[str, ...] = ()) -> bool:
    if types and event.get("type", "policy") not in types:
        return False
    if verdicts and event["verdict"] not in verdicts:
        return False
    if not pods:
        return True
    if event.get("type") == "lb":
        names = {event["client_pod"], event["backend_pod"]} - {None}
    elif event.get("type") == "capture":
        names = {event["client_pod"], event["pod"]} - {None}
    else:
        names = {event["src_pod"], event["dst_pod"], event["pod"]} - {None}
    return any(p in names or any(n.split("/", 1)[1] == p for n in names) for p in pods)


def _side(addr: str, pod: str | None) -> str:
    return f"{addr} ({pod})" if pod else addr


def _cgroup_side(pod: str | None, path: str | None, cg_id: int) -> str:
    return pod or (f"cgroup {path}" if path else f"cgroup id {cg_id}")


def lb_table_line(event: dict) -> str:
    """CLIENT -> SERVICE, then the backend it got: a translation shows no
    addresses on the client side (connect() runs before it has one)."""
    client = _cgroup_side(event["client_pod"], event["client_cgroup"], event["cgroup_id"])
    if event["backend"] is None:
        backend = "(no usable backend)"
    else:
        backend = "-> " + _side(event["backend"], event["backend_pod"])
    return COLUMNS.format(time=datetime.now().strftime("%H:%M:%S.%f")[:-3],
                          verdict=event["verdict"].upper(), direction=event["hook"],
                          proto=event["protocol"], src=client,
                          dst=_side(event["service"], event["service_name"]), rule=backend)


def cap_table_line(event: dict) -> str:
    """CLIENT -> the destination it asked, then the proxy it went to and
    whose: the pod's (for inbound, the destination pod's)."""
    if event.get("peer"):  # from tc: a client outside every connect hook, by its address
        client = _side(event["peer"], event["client_pod"])
    else:
        client = _cgroup_side(event["client_pod"], event["client_cgroup"], event["cgroup_id"])
    pod = _cgroup_side(event["pod"], event["pod_cgroup"], event["pod_cgroup_id"])
    return COLUMNS.format(time=datetime.now().strftime("%H:%M:%S.%f")[:-3],
                          verdict=event["verdict"].upper(), direction=event["hook"],
                          proto=event["protocol"], src=client, dst=event["original"],
                          rule=f"-> {event['to']} (proxy of {pod})")


def table_line(event: dict) -> str:
    if event.get("type") == "lb":
        return lb_table_line(event)
    if event.get("type") == "capture":
        return cap_table_line(event)
    side = _side
    if event["verdict"] == "allow" and event["rule"]:
        rule = event["rule_name"] or f"rule {event['rule']}"
    elif event["verdict"] == "allow":
        rule = "(not isolated)"
    elif event["verdict"] == "deny":
        rule = "(no rule allows)"
    else:
        rule = f"drop: {event['verdict']}"
    return COLUMNS.format(time=datetime.now().strftime("%H:%M:%S.%f")[:-3],
                          verdict=event["verdict"].upper(), direction=event["direction"],
                          proto=event["protocol"], src=side(event["src"], event["src_pod"]),
                          dst=side(event["dst"], event["dst_pod"]), rule=rule)


@contextlib.contextmanager
def _stop_on_sigterm():
    """SIGTERM ends the monitor as Ctrl-C does: through the finally that turns events off."""
    def raise_interrupt(*_):
        raise KeyboardInterrupt
    old = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@click.command()
@bpffs_option
@agent_option
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True,
              help="json: one JSON object per event and line.")
@click.option("--pod", "pods", multiple=True, metavar="[NS/]NAME", shell_complete=complete_pods,
              help="Only events from or to this pod (repeatable).")
@click.option("--verdict", "verdicts", multiple=True,
              type=click.Choice(sorted({*EVENT_VERDICTS.values(), *LB_VERDICTS.values(),
                                        *CAP_DECISIONS.values()})),
              help="Only events with this verdict (repeatable; translated and refused are socket-LB's, "
                   "outbound, inbound and dns sidecar capture's).")
@click.option("--type", "types", multiple=True, type=click.Choice(["policy", "lb", "capture"]),
              help="Only policy verdicts and drops, socket-LB translations or sidecar capture "
                   "decisions (repeatable).")
@click.option("--count", type=click.IntRange(min=1), default=None, help="Stop after this many events.")
@click.option("--no-names", is_flag=True, help="Do not ask the agent for names.")
@friendly_errors
def monitor(bpffs: Path, agent_addr: str, output: str, pods: tuple[str, ...], verdicts: tuple[str, ...],
            types: tuple[str, ...], count: int | None, no_names: bool) -> None:
    """Live flow events: socket-LB translations, sidecar capture decisions,
    NetworkPolicy verdicts with the rule that decided, and drops."""
    if not (bpffs / "mbpf_pol_cfg").exists():
        raise click.ClickException(f"no flow events here: no pinned mbpf_pol_cfg under {bpffs} "
                                   "(no agent ran on this folder, or the kernel predates 5.8)")
    shown = 0
    with _stop_on_sigterm(), contextlib.suppress(KeyboardInterrupt, BrokenPipeError), \
            SharedEvents(bpffs) as events:
        names = Names(None if no_names else agent_addr)
        click.echo(f"listening for flow events on {bpffs} (Ctrl-C stops)", err=True)
        if output == "table":
            click.echo(COLUMNS.format(time="TIME", verdict="VERDICT", direction="DIR", proto="PROTO",
                                      src="SOURCE", dst="DESTINATION", rule="RULE"))
        while count is None or shown < count:
            for ev in events.poll(200):
                event = names.describe(ev)
                if not matches(event, pods, verdicts, types):
                    continue
                click.echo(json.dumps(event) if output == "json" else table_line(event))
                shown += 1
                if count is not None and shown >= count:
                    break
