"""`meshbpf agent`."""

from __future__ import annotations

import socket
from pathlib import Path

import click

from ..agent import AgentOptions, run_agent
from ..datapath.layout import LB_MAPS
from .common import bpffs_option, friendly_errors


def _map_sizes(values: tuple[str, ...]) -> dict[str, int]:
    known = {spec.name: spec for spec in LB_MAPS}
    sizes = {}
    for item in values:
        name, _, number = item.partition("=")
        if name not in known or not number.isdigit() or int(number) < 1:
            raise click.BadParameter(f"{item!r}: use NAME=ENTRIES with NAME one of {', '.join(known)}",
                                     param_hint="--map-size")
        sizes[name] = int(number)
    return sizes


@click.command()
@click.option("--config", type=click.Path(path_type=Path), required=True,
              help="YAML file or folder of Services and EndpointSlices (watched for changes).")
@click.option("--cgroup", "cgroup_path", default=None,
              help="cgroup v2 to attach to, absolute or relative to the cgroup2 mount "
                   "[default: the cgroup2 root, i.e. the whole node].")
@bpffs_option
@click.option("--listen", default="127.0.0.1:9890", show_default=True,
              help="Address for /healthz, /readyz and /metrics (port 0 picks a free one).")
@click.option("--node-name", default=lambda: socket.gethostname(), show_default="hostname",
              help="This node's name, for internalTrafficPolicy: Local.")
@click.option("--map-size", multiple=True, metavar="NAME=ENTRIES",
              help="max_entries of a map, e.g. mbpf_svc=131072 (repeatable).")
@friendly_errors
def agent(config: Path, cgroup_path: str | None, bpffs: Path, listen: str, node_name: str,
          map_size: tuple[str, ...]) -> None:
    """Compile, attach, sync the maps to the config, and keep them in sync."""
    run_agent(AgentOptions(config=config, cgroup=cgroup_path, bpffs=bpffs, listen=listen,
                           node_name=node_name, map_sizes=_map_sizes(map_size)))
