"""What the CLI commands share: the bpffs option, errors, tables and JSON."""

from __future__ import annotations

import functools
import ipaddress
import json
from pathlib import Path
from typing import Any, Callable

import click

from ..datapath.loader import DEFAULT_BPFFS

bpffs_option = click.option(
    "--bpffs", type=click.Path(path_type=Path), default=DEFAULT_BPFFS, show_default=True,
    envvar="MESHBPF_BPFFS", help="bpffs folder holding meshbpf's pinned maps and links.")

output_option = click.option("-o", "--output", type=click.Choice(["table", "json"]),
                             default="table", show_default=True)


def friendly_errors(fn: Callable) -> Callable:
    """Known failures become one clear line and exit status 1, not a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except (OSError, ValueError, RuntimeError, LookupError) as exc:
            raise click.ClickException(one_line(exc)) from None
        except Exception as exc:  # errors of our own modules carry a message
            if type(exc).__module__.startswith("meshbpf"):
                raise click.ClickException(one_line(exc)) from None
            raise
    return wrapper


def one_line(text: str) -> str:
    """A message on one line: its lines joined with "; " (" " after a line
    that ends with ":"), so a problem list or a hint on a second line still
    reads as one error line."""
    out = ""
    for line in (part.strip() for part in str(text).splitlines()):
        if line:
            out += ("" if not out else " " if out.endswith(":") else "; ") + line
    return out


def addr_text(addr: bytes) -> str:
    """16-byte map address -> text; IPv4-mapped shows as plain IPv4."""
    ip = ipaddress.IPv6Address(addr)
    return str(ip.ipv4_mapped) if ip.ipv4_mapped else str(ip)


def endpoint_text(addr: bytes, port: int) -> str:
    text = addr_text(addr)
    return f"[{text}]:{port}" if ":" in text else f"{text}:{port}"


def print_table(headers: list[str], rows: list[list[Any]]) -> None:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    for row in [headers] + cells:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False))
