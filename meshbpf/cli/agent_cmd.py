"""`meshbpf agent`."""

from __future__ import annotations

import logging
import math
import socket
from pathlib import Path

import click

from .. import __version__
from ..agent import AgentOptions, run_agent
from ..datapath.layout import LB_MAPS, POWER_OF_TWO
from ..health import parse_listen
from ..reconcile.maglev import TABLE_SIZES
from ..reconcile.northsouth_keys import DEFAULT_SNAT_PORTS, DEFAULT_TABLE_SIZE, parse_port_range
from .common import bpffs_option, friendly_errors

log = logging.getLogger("meshbpf.agent")


def _devices(ctx, param, value: str | None) -> list[str]:
    names = [d.strip() for d in (value or "").split(",") if d.strip()]
    if value is not None and not names:
        raise click.BadParameter("give one or more device names, comma separated")
    return names


def _table_size(ctx, param, value: int) -> int:
    if value not in TABLE_SIZES:
        raise click.BadParameter(f"{value} is not one of {', '.join(map(str, TABLE_SIZES))}")
    return value


U32_MAX = 2**32 - 1  # max_entries is a u32 in the kernel


def _snat_ports(ctx, param, value: str) -> tuple[int, int]:
    try:
        lo, hi = parse_port_range(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if hi - lo + 1 < 8:
        raise click.BadParameter(f"{value!r}: give at least 8 ports (a new flow tries up to 8)")
    return lo, hi


def _map_sizes(values: tuple[str, ...]) -> dict[str, int]:
    known = {spec.name: spec for spec in LB_MAPS}
    sizes = {}
    for item in values:
        name, _, number = item.partition("=")
        # isascii: str.isdigit() also takes digits such as "²" that int() refuses
        if name not in known or not (number.isascii() and number.isdigit()):
            raise click.BadParameter(f"{item!r}: use NAME=ENTRIES with NAME one of {', '.join(known)}",
                                     param_hint="--map-size")
        if not 1 <= int(number) <= U32_MAX:
            raise click.BadParameter(f"{item!r}: ENTRIES must be 1 to {U32_MAX}", param_hint="--map-size")
        if name in POWER_OF_TWO and int(number) & (int(number) - 1):
            raise click.BadParameter(f"{item!r}: {name}'s ENTRIES must be a power of two",
                                     param_hint="--map-size")
        sizes[name] = int(number)
    return sizes


class Seconds(click.ParamType):
    """A finite, non-negative number of seconds: FloatRange(min=0) lets nan
    and inf through, which would stall or spin the agent's timers."""

    name = "seconds"

    def convert(self, value, param, ctx):
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        if not math.isfinite(seconds) or seconds < 0:
            self.fail(f"{value!r}: give a finite number of seconds, 0 or more", param, ctx)
        return seconds


@click.command()
@click.option("--source", type=click.Choice(["file", "kubernetes"]), default="file", show_default=True,
              help="Where desired state comes from.")
@click.option("--config", type=click.Path(path_type=Path), default=None,
              help="File source: YAML file or folder of Services, EndpointSlices and an "
                   "AgentConfig (watched for changes).")
@click.option("--kubeconfig", default=None,
              help="Kubernetes source: kubeconfig file [default: in-cluster, then ~/.kube/config].")
@click.option("--service-proxy-name", default=None,
              help="Kubernetes source: handle only Services labelled "
                   "service.kubernetes.io/service-proxy-name=NAME (coexist with kube-proxy).")
@click.option("--config-map", default="kube-system/meshbpf-config", show_default=True,
              help="Kubernetes source: NAMESPACE/NAME of the ConfigMap holding the AgentConfig.")
@click.option("--cgroup", "cgroup_path", default=None,
              help="cgroup v2 to attach to, absolute or relative to the cgroup2 mount "
                   "[default: the cgroup2 root, i.e. the whole node].")
@bpffs_option
@click.option("--listen", default="127.0.0.1:9890", show_default=True,
              help="Address for /healthz, /readyz and /metrics (port 0 picks a free one).")
@click.option("--node-name", default=lambda: socket.gethostname(), show_default="hostname",
              help="This node's name, for internalTrafficPolicy: Local.")
@click.option("--node-netns", default=None, metavar="NAME",
              help="Network namespace (ip netns name) holding the pods' host-side interfaces "
                   "[default: the agent's own, as on a node]; the lab's is meshbpf-lab-LAB-node.")
@click.option("--map-size", multiple=True, metavar="NAME=ENTRIES",
              help="max_entries of a map, e.g. mbpf_svc=131072 (repeatable).")
@click.option("--resync-interval", type=Seconds(), default=300, show_default=True,
              help="Seconds between re-reading the pinned maps to repair drift (0: never).")
@click.option("--lock-timeout", type=Seconds(), default=10, show_default=True,
              help="Seconds to wait for another agent on the same --bpffs to exit.")
@click.option("--north-south/--no-north-south", "north_south", default=None,
              help="Translate packets from outside the node to NodePorts, external and "
                   "LoadBalancer IPs and ClusterIPs with tc/XDP on the --devices [default: on "
                   "when --devices are given, or when --node-netns has default-route devices].")
@click.option("--devices", default=None, callback=_devices, metavar="DEV[,DEV...]",
              help="North-south: the node's external devices [default: those of the default "
                   "routes, in --node-netns].")
@click.option("--maglev-table-size", type=int, default=DEFAULT_TABLE_SIZE, callback=_table_size,
              show_default=True, help="North-south: Maglev table size, a prime (65537 moves under "
                                      "1% of flows when one of 100 backends goes); the same on every node.")
@click.option("--north-south-cluster-ips", type=click.Choice(["exposed", "all"]), default="exposed",
              show_default=True, help="North-south: translate packets from outside to the ClusterIPs "
                                      "of exposed Services (NodePort, LoadBalancer, externalIPs) only, "
                                      "or of every Service (a Maglev table each).")
@click.option("--snat-ports", default="%d-%d" % DEFAULT_SNAT_PORTS, callback=_snat_ports,
              metavar="LO-HI", show_default=True,
              help="North-south: the source ports SNAT to a backend on another node takes "
                   "(a port whose reply tuple a node socket owns is skipped).")
@click.option("--reserve-snat-ports/--no-reserve-snat-ports", default=True, show_default=True,
              help="North-south: add --snat-ports to net.ipv4.ip_local_reserved_ports in the "
                   "devices' network namespace (--node-netns, else the agent's), so the node's "
                   "own connections take none of them; it stays after the agent stops, as the "
                   "programs do.")
@friendly_errors
def agent(source: str, config: Path | None, kubeconfig: str | None, service_proxy_name: str | None,
          config_map: str, cgroup_path: str | None, bpffs: Path, listen: str, node_name: str,
          node_netns: str | None, map_size: tuple[str, ...], resync_interval: float, lock_timeout: float,
          north_south: bool | None, devices: list[str], maglev_table_size: int,
          north_south_cluster_ips: str, snat_ports: tuple[int, int], reserve_snat_ports: bool) -> None:
    """Compile, attach, sync the maps to the desired state, and keep them in sync."""
    if source == "file" and config is None:
        raise click.UsageError("--config is required with --source file")
    sizes = _map_sizes(map_size)
    try:  # checked before anything is compiled or attached
        parse_listen(listen)
    except ValueError as exc:
        raise click.BadParameter(str(exc).removeprefix(f"--listen {listen!r}: "), param_hint="--listen")
    # The first line of every agent log: which build is running.
    log.info("meshbpf %s starting: source %s, bpffs %s, cgroup %s, listen %s", __version__,
             config if source == "file" else source, bpffs, cgroup_path or "the cgroup2 root", listen)
    run_agent(AgentOptions(config=config, source=source, kubeconfig=kubeconfig,
                           service_proxy_name=service_proxy_name, config_map=config_map,
                           cgroup=cgroup_path, bpffs=bpffs, listen=listen,
                           node_name=node_name, node_netns=node_netns, map_sizes=sizes,
                           resync_interval=resync_interval, lock_timeout=lock_timeout,
                           north_south=north_south, devices=devices,
                           maglev_table_size=maglev_table_size,
                           north_south_cluster_ips=north_south_cluster_ips,
                           snat_ports=snat_ports, reserve_snat_ports=reserve_snat_ports))
