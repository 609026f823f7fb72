"""The `meshbpf` command: agent, node inspection, uninstall and the lab."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from .. import __version__
from ..datapath.source import bpf_dir
from .agent_cmd import agent
from .capture_cmd import capture
from .common import one_line
from .endpoint_cmd import endpoint
from .inspect_cmd import bpf, service, uninstall
from .lab_cmd import lab
from .logs import setup_logging
from .monitor_cmd import monitor
from .policy_cmd import policy
from .sockmap_cmd import sockmap
from .status_cmd import status

log = logging.getLogger("meshbpf")
_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())  # click >= 8.2


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging: -v adds debug lines.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
              envvar="MESHBPF_LOG_FORMAT", help="json: one JSON object per log line.")
@click.version_option(__version__, "--version", prog_name="meshbpf", message="%(prog)s %(version)s")
def cli(verbose: int, log_format: str) -> None:
    """meshbpf: eBPF socket-level load balancing for Kubernetes nodes."""
    setup_logging(verbose, log_format)
    log.debug("meshbpf %s from %s (C sources in %s), Python %s, argv %s", __version__,
              Path(__file__).parents[1], bpf_dir(), sys.version.split()[0], sys.argv[1:])


@click.command()
def version() -> None:
    """Print meshbpf's version."""
    click.echo(f"meshbpf {__version__}")


for command in (agent, service, bpf, sockmap, endpoint, policy, capture, monitor, status, uninstall, lab,
                version):
    cli.add_command(command)


def main() -> None:
    """Runs the CLI; every error it expects ends as one line on stderr."""
    try:
        status_code = cli.main(prog_name="meshbpf", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("meshbpf: aborted", err=True)
        sys.exit(1)
    except _NO_ARGS_IS_HELP as exc:  # plain `meshbpf lab`: the help, not an error line
        exc.show()
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        click.echo(f"meshbpf: error: {_error_text(exc)}", err=True)
        sys.exit(exc.exit_code)
    sys.exit(status_code if isinstance(status_code, int) else 0)


def _error_text(exc: click.ClickException) -> str:
    text = one_line(exc.format_message())
    ctx = getattr(exc, "ctx", None)
    if isinstance(exc, click.UsageError) and ctx is not None:
        text += f" (see `{ctx.command_path} --help`)"
    return text
