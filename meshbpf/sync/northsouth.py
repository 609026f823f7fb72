"""North-south load balancing (issue 12): this node, the planner, the maps.

Each sync takes the desired Services, this node's context (its name, the
addresses of the external devices and the SNAT sources, read with pyroute2
in the node's network namespace), plans the writes
(reconcile/northsouth.py) and applies them through the datapath's pinned
maps (datapath/northsouth.py, NorthSouthMaps). It also keeps the
healthCheckNodePort servers in step. At start it takes over what the maps
hold, so an agent restart keeps every table and id (and writes nothing
when nothing changed). A failed write is retried with backoff from what
the maps hold; load balancing of the other families goes on.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from pathlib import Path
from typing import Callable, Protocol

from prometheus_client import Gauge
from prometheus_client.core import CounterMetricFamily

from ..metrics import AgentMetrics
from ..model import DesiredState, Frontend
from ..northsouth_health import HealthCheck, HealthCheckServers
from ..reconcile.northsouth import NodeContext, RowCache, disable, plan
from ..reconcile.northsouth_keys import DEFAULT_TABLE_SIZE, NorthSouthState, NsStep
from ..retry import Backoff
from . import one_line

log = logging.getLogger("meshbpf.agent")  # the agent's log, as users and tests filter it

# Conntrack garbage collection: flows idle both ways this long are removed
# (LRU eviction acts only once the map is full); sooner a TCP flow that saw
# a RST (10 s idle), one that saw a FIN (60 s idle) and UDP (120 s idle):
# datapath/northsouth.py's CT_*_IDLE_NS. That frees their SNAT ports.
# A flow idle longer comes back through its table: the same backend while
# the table is unchanged.
CT_GC_INTERVAL = 30.0
CT_IDLE_NS = 600 * 10**9
# A healthCheckNodePort another socket held is tried again this often, not
# only when the Services change: load balancers probe it every few seconds.
HEALTH_RETRY_INTERVAL = 10.0


class NorthSouthMapsLike(Protocol):
    """What the sync needs of datapath/northsouth.py's NorthSouthMaps; tests pass a fake."""

    def read(self) -> NorthSouthState: ...
    def apply(self, steps: list[NsStep]) -> None: ...


class NorthSouthSync:
    def __init__(self, metrics: AgentMetrics, error: Callable[..., None], node: Callable[[], NodeContext],
                 *, table_size: int = DEFAULT_TABLE_SIZE, max_tables: int | None = None,
                 health: HealthCheckServers | None = None, all_cluster_ips: bool = False):
        self.metrics = metrics
        self.error = error
        self.node_reader = node           # re-read at start and on every resync
        self.table_size = table_size
        self.max_tables = max_tables
        self.health = health
        self.all_cluster_ips = all_cluster_ips   # see reconcile.northsouth.plan
        self.maps: NorthSouthMapsLike | None = None
        self.node: NodeContext | None = None
        self.current = NorthSouthState()
        self.rows: RowCache = {}
        self.inputs: tuple | None = None
        self.synced: DesiredState | None = None       # the state the maps were last brought to
        self.exposed: frozenset[Frontend] = frozenset()  # its ServicePorts with exposure
        self.problems: list[str] = []
        self.retry = Backoff()
        self.stale = False
        self.next_gc = time.monotonic() + CT_GC_INTERVAL
        self.next_health_try = 0.0
        self.frontends = Gauge("meshbpf_northsouth_frontends",
                               "North-south frontends programmed (NodePorts, external, "
                               "LoadBalancer and ClusterIP addresses)", registry=metrics.registry)

    def start(self, maps: NorthSouthMapsLike) -> None:
        """Takes over what the pinned maps hold."""
        self.maps = maps
        self.current = maps.read()
        self.node = self.node_reader()
        log.info("north-south: node addresses %s; the pinned maps hold %d frontends, %d tables",
                 ", ".join(map(str, self.node.addresses)) or "none",
                 len(self.current.frontends), len(self.current.tables))

    def load(self, bpffs: Path, devices: list[str], netns: str | None, map_sizes: dict[str, int],
             reserve_snat_ports: tuple[int, int] | None = None):
        """Compiles and attaches the datapath (datapath/northsouth.py) and
        takes over its maps; returns the NorthSouthDatapath.
        reserve_snat_ports: the SNAT range, reserved in netns first."""
        from ..datapath.northsouth import NorthSouthDatapath
        kwargs = {"reserve_snat_ports": reserve_snat_ports} if reserve_snat_ports else {}
        dp = NorthSouthDatapath.load(str(bpffs), devices, netns=netns, table_size=self.table_size,
                                     map_sizes=dict(map_sizes), **kwargs)
        self._fit_tables(dp.maps)
        self.start(dp.maps)
        return dp

    def _fit_tables(self, maps) -> None:
        """Rows of the size the pinned mbpf_maglev has (a previous agent's,
        when it was there), and no more tables than it holds."""
        size = getattr(maps, "table_size", None) or self.table_size
        if size != self.table_size:
            log.warning("north-south: the pinned mbpf_maglev holds tables of %d, not "
                        "--maglev-table-size %d; using %d", size, self.table_size, size)
        self.table_size = size
        fd = getattr(maps, "fds", {}).get("mbpf_maglev")
        if fd is not None:
            from ..datapath import libbpf
            self.max_tables = libbpf.map_info(fd).max_entries // size

    def turn_off_pinned(self, bpffs: Path) -> None:
        """A previous agent's north-south programs may still be attached:
        --no-north-south makes them pass everything (their maps stay)."""
        if not (Path(bpffs) / "mbpf_ns_cfg").exists():
            return
        from ..datapath.northsouth import NorthSouthMaps
        maps = NorthSouthMaps(bpffs)
        try:
            maps.apply(disable(maps.read()))
            log.info("north-south: the pinned programs now pass everything (--no-north-south)")
        finally:
            maps.close()

    def collect_garbage(self, now: float) -> None:
        """Every CT_GC_INTERVAL: the datapath's idle flows (when its maps
        can: NorthSouthMaps.collect_garbage). Never holds up anything."""
        gc = getattr(self.maps, "collect_garbage", None)
        if gc is None or now < self.next_gc:
            return
        self.next_gc = now + CT_GC_INTERVAL
        try:
            removed = gc(CT_IDLE_NS)
        except Exception as exc:
            log.error("north-south conntrack garbage collection failed: %s", one_line(exc))
            return
        if removed:
            log.debug("north-south: %d idle conntrack entries removed", removed)

    def due(self, now: float) -> bool:
        return self.retry.due(now) or self._health_due(now)

    def _health_due(self, now: float) -> bool:
        """A healthCheckNodePort could not be bound and its next try is due."""
        return self.health is not None and bool(self.health.failed) and now >= self.next_health_try

    def sync(self, desired: DesiredState, reread: bool = False) -> bool:
        """Brings the maps to desired; reread: the maps and the node's
        addresses are read anew first (the periodic resync repairs drift)."""
        if self.maps is None:
            return True
        if reread:
            self._reread()
        inputs = (desired.service_ports, self.node)
        if not reread and not self.stale and self.inputs is not None and (
                self._untouched(desired) or _same(inputs, self.inputs)):
            self.synced, self.inputs = desired, inputs
            if self._health_due(time.monotonic()):
                self._health(desired)
            return True
        try:
            self._sync(desired)
        except Exception as exc:
            self.stale = True
            self._reread()
            self.metrics.sync_errors.labels("northsouth").inc()
            delay = self.retry.failed(time.monotonic())
            self.error("north-south maps not updated (load balancing goes on): %s; retrying in %gs",
                       one_line(exc), delay)
            return False
        self.inputs, self.synced = inputs, desired
        self.exposed = frozenset(f for f, sp in desired.service_ports.items() if sp.exposure is not None)
        self.retry.reset()
        if self.stale:
            log.info("north-south maps match the desired state again")
        self.stale = False
        self._health(desired)
        return True

    def _untouched(self, desired: DesiredState) -> bool:
        """The source says (DesiredState.delta) what changed since the state
        last synced, and none of it is exposed, before or now: an
        EndpointSlice event of a ClusterIP-only Service costs no replan."""
        delta = desired.delta
        if delta is None or delta.base() is not self.synced:
            return False
        for f in delta.frontends:
            sp = desired.service_ports.get(f)
            if self.all_cluster_ips or f in self.exposed or (sp is not None and sp.exposure is not None):
                return False
        return True

    def _sync(self, desired: DesiredState) -> None:
        result = plan(desired, self.node, self.current, self.table_size,
                      max_tables=self.max_tables, row_cache=self.rows,
                      all_cluster_ips=self.all_cluster_ips)
        for problem in result.problems:
            if problem not in self.problems:
                self.error("north-south: %s", problem)
        self.problems = result.problems
        self.maps.apply(result.steps)
        self.current = result.state
        self.frontends.set(len(result.state.frontends))
        if result.steps:
            log.info("north-south: %d frontends, %d tables, %d backends (%d map writes)",
                     len(result.state.frontends), len(result.state.tables), len(result.state.backends),
                     sum(len(s.entries) for s in result.steps))

    def _reread(self) -> None:
        try:
            self.current = self.maps.read()
            self.node = self.node_reader()
        except Exception as exc:
            log.error("could not read the north-south maps or node addresses back: %s", one_line(exc))

    def _health(self, desired: DesiredState) -> None:
        if self.health is None:
            return
        self.next_health_try = time.monotonic() + HEALTH_RETRY_INTERVAL
        try:
            self.health.update(health_checks(desired, self.node.name))
        except Exception as exc:  # a health port never holds up the maps
            log.error("healthCheckNodePort servers not updated: %s", one_line(exc))

    def stop(self) -> None:
        if self.health is not None:
            self.health.stop()

    def view(self) -> dict:
        node = self.node
        return {"available": self.maps is not None, "stale": self.stale,
                "node_addresses": [str(a) for a in node.addresses] if node else [],
                "frontends": len(self.current.frontends), "tables": len(self.current.tables),
                "backends": len(self.current.backends), "problems": list(self.problems),
                "health_check_ports": self.health.ports() if self.health else []}


def _same(a: tuple, b: tuple) -> bool:
    # The dict of ServicePorts: the same object when the source handed out
    # no change to it; equal dicts compare their values otherwise.
    return a[1] == b[1] and (a[0] is b[0] or a[0] == b[0])


def health_checks(desired: DesiredState, node_name: str) -> dict[int, HealthCheck]:
    """healthCheckNodePort -> its Service and local ready endpoints (the
    most any port of the Service has, as kube-proxy counts per Service)."""
    out: dict[int, HealthCheck] = {}
    for sp in desired.service_ports.values():
        exp = sp.exposure
        if exp is None or not exp.local or not exp.health_check_node_port:
            continue
        count = sum(1 for e in sp.all_endpoints if e.ready and e.node_name == node_name)
        held = out.get(exp.health_check_node_port)
        if held is None or ((held.namespace, held.name) == (sp.namespace, sp.name)
                            and held.local_endpoints < count):
            out[exp.health_check_node_port] = HealthCheck(sp.namespace, sp.name, count)
    return out


# --- this node ------------------------------------------------------------------------

def north_south_devices(north_south: bool | None, devices: list[str], netns: str | None) -> list[str]:
    """The devices to attach to: --devices; else, when asked (True) or in
    a node netns (None: the default), those of the default routes there;
    never the agent's own netns's devices unless asked."""
    if north_south is False:
        return []
    if devices:
        return list(devices)
    if north_south is None and netns is None:
        return []
    found = default_route_devices(netns)
    if not found and north_south:
        raise ValueError("--north-south: no device carries a default route; give --devices")
    return found


def default_route_devices(netns: str | None = None) -> list[str]:
    """The devices of the default routes (IPv4 and IPv6) in that netns."""
    from pyroute2 import IPRoute
    names: list[str] = []
    with IPRoute(netns=netns) if netns else IPRoute() as ipr:
        for family in (2, 10):
            for route in ipr.get_routes(family=family, dst_len=0, table=254):
                for index in _route_ifindexes(route):
                    name = ipr.get_links(index)[0].get_attr("IFLA_IFNAME")
                    if name not in names:
                        names.append(name)
    return names


def _route_ifindexes(route) -> list[int]:
    oif = route.get_attr("RTA_OIF")
    if oif:
        return [oif]
    return [hop["oif"] for hop in route.get_attr("RTA_MULTIPATH") or [] if hop.get("oif")]


def node_context(name: str, devices: list[str], netns: str | None = None) -> NodeContext:
    """The global addresses of `devices` in that netns; the first of each
    family is its SNAT source."""
    from pyroute2 import IPRoute
    addresses = []
    with IPRoute(netns=netns) if netns else IPRoute() as ipr:
        for dev in devices:
            found = ipr.link_lookup(ifname=dev)
            if not found:
                raise ValueError(f"--devices: no device {dev!r} in "
                                 f"{'netns ' + netns if netns else 'the node'}")
            for msg in ipr.get_addr(index=found[0]):
                ip = ipaddress.ip_address(msg.get_attr("IFA_ADDRESS"))
                if msg["scope"] == 0 and not ip.is_link_local and ip not in addresses:
                    addresses.append(ip)
    snat4 = next((a for a in addresses if a.version == 4), None)
    snat6 = next((a for a in addresses if a.version == 6), None)
    return NodeContext(name, tuple(addresses), snat4, snat6)


# --- counters -------------------------------------------------------------------------

class NsCountersCollector:
    """meshbpf_northsouth_packets_total{result}: the datapath's per-result
    counters (mbpf_ns_stats), when its maps offer counters()."""

    def __init__(self, counters: Callable[[], dict[str, int]]):
        self.counters = counters

    def collect(self):
        family = CounterMetricFamily("meshbpf_northsouth_packets", "Packets the north-south "
                                     "programs handled, by result", labels=["result"])
        try:
            for result, value in sorted(self.counters().items()):
                family.add_metric([result], value)
        except Exception as exc:  # a scrape never fails for it
            log.debug("north-south counters not read: %s", one_line(exc))
        yield family


def register_ns_counters(registry, maps) -> None:
    counters = getattr(maps, "counters", None)
    if callable(counters):
        registry.register(NsCountersCollector(counters))
