"""`meshbpf lab`: the network-namespace lab and its demo."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import click

from ..lab import netlab
from .common import friendly_errors


@click.group()
def lab() -> None:
    """Pods as network namespaces on a bridge, in a child cgroup."""


DEFAULT_PODS = "client,web-1,web-2,web-3"


@lab.command()
@click.argument("name")
@click.option("--pods", multiple=True, show_default=f"{DEFAULT_PODS} on node 1",
              help="Comma-separated pods, NAME or NAMESPACE/NAME (a bare name is in namespace "
                   "default); addresses follow this order from .2. With several nodes, give "
                   "--pods once per node: the k-th for node k.")
@click.option("--nodes", default=1, show_default=True, type=click.IntRange(1, netlab.MAX_NODES),
              help="Nodes, each a netns with its own bridge, pod CIDR 10.244.<k-1>.0/24 and cgroup; "
                   "more than one adds a router namespace with ECMP routes to all of them.")
@friendly_errors
def up(name: str, pods: tuple[str, ...], nodes: int) -> None:
    """Create lab NAME."""
    if len(pods) > nodes:
        raise click.BadParameter(f"{len(pods)} pod lists for {nodes} node(s): give --pods at most "
                                 "once per node", param_hint="--pods")
    per_node = [[p for p in spec.split(",") if p] for spec in (pods or (DEFAULT_PODS,))]
    if nodes == 1:
        created = netlab.Lab(name).up(per_node[0])
    else:
        created = netlab.Lab(name).up(*per_node, nodes=nodes)
    for pod in created.pods.values():
        # str() first: ip_address objects take no width in format() (Python 3.11).
        where = f" node{pod.node}" if nodes > 1 else ""
        click.echo(f"{pod.name:<16} {str(pod.ipv4):<14} {pod.ipv6}{where}")
    if nodes > 1:
        for node in created.nodes:
            click.echo(f"node{node.index}: {node.netns}, pods {node.subnet4} {node.subnet6}, "
                       f"{netlab.NODE_UPLINK} {node.ext_ipv4} {node.ext_ipv6}, cgroup {node.cgroup}")
        ranges = " ".join(str(r) for r in netlab.SERVICE_RANGES)
        click.echo(f"router: {created.router_ns}, ECMP to every node: {ranges}")
    click.echo(f"cgroup: {created.cgroup}")


@lab.command(name="exec", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("pod")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("--no-cgroup", is_flag=True, help="Run outside the lab cgroup (not load-balanced).")
@friendly_errors
def exec_(name: str, pod: str, command: tuple[str, ...], no_cgroup: bool) -> None:
    """Run COMMAND in POD of lab NAME (inside its cgroup). With several nodes,
    POD may also be node1, node2, ... or router."""
    existing = netlab.Lab.attach(name)
    places = {n.name: n.index for n in existing.nodes} if existing.node_count > 1 else {}
    if existing.node_count > 1:
        places[netlab.ROUTER] = netlab.ROUTER
    if pod in existing.pods:
        proc = existing.popen(pod, list(command), in_cgroup=not no_cgroup)
    elif pod in places:
        proc = existing.popen(None, list(command), in_cgroup=not no_cgroup, node=places[pod])
    else:
        known = ", ".join([*existing.pods, *places])
        raise click.ClickException(f"lab {name} has no pod {pod!r} (pods: {known})")
    sys.exit(proc.wait())


@lab.command()
@click.argument("name")
@click.option("--node-name", default=lambda: socket.gethostname(), show_default="this host's name",
              help="spec.nodeName of the pods: the agent's --node-name, whose default is the same.")
@friendly_errors
def objects(name: str, node_name: str) -> None:
    """Print lab NAME's Namespaces and Pods as `kubectl get ns,pods -o yaml` would."""
    from ..lab.objects import lab_objects
    from ..sources.yaml_load import dump_all
    existing = netlab.Lab.attach(name)
    # dump_all quotes a namespace named `y` or `n`, which Kubernetes reads as a boolean
    click.echo(dump_all([lab_objects(existing.pods.values(), node_name)]), nl=False)


@lab.command()
@click.argument("name")
@friendly_errors
def down(name: str) -> None:
    """Remove lab NAME: its processes, namespaces and cgroup."""
    netlab.Lab(name).down()
    click.echo(f"lab {name} removed")


@lab.command(name="list")
@friendly_errors
def list_() -> None:
    """Labs on this machine."""
    for name in netlab.list_labs():
        click.echo(name)


@lab.command()
@click.option("--config", type=click.Path(exists=True, path_type=Path), default=None,
              help="Services to program [default: the bundled example, meshbpf/examples/lab.yaml].")
@click.option("--requests", default=30, show_default=True, help="Requests per check.")
@click.option("--name", default="demo", show_default=True, help="Name of the demo's lab.")
@friendly_errors
def demo(config: Path | None, requests: int, name: str) -> None:
    """Bring up a lab, run the agent, send real traffic, tear down."""
    from ..lab.demo import run_demo
    if os.geteuid() != 0:
        raise click.ClickException("the lab needs root")
    run_demo(config, requests, name)
