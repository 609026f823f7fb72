"""The `meshbpf` command: agent, node inspection, uninstall and the lab."""

from __future__ import annotations

import logging
import sys

import click

from .agent_cmd import agent
from .inspect_cmd import bpf, service, uninstall
from .lab_cmd import lab
from .sockmap_cmd import sockmap
from .status_cmd import status


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
def cli(verbose: int) -> None:
    """meshbpf: eBPF socket-level load balancing for Kubernetes nodes."""
    level = logging.WARNING - 10 * verbose if verbose else logging.INFO
    logging.basicConfig(level=max(level, logging.DEBUG), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


for command in (agent, service, bpf, sockmap, status, uninstall, lab):
    cli.add_command(command)


def main() -> None:
    cli(prog_name="meshbpf")
