"""`meshbpf sockmap list`: same-node socket pairs and how they are carried."""

from __future__ import annotations

from pathlib import Path

import click

from ..datapath import redirect
from .common import bpffs_option, friendly_errors, output_option, print_json, print_table


def _path(e: redirect.SockEntry | None) -> str:
    if e is None:
        return "-"
    if e.in_sockhash and e.mode == "redirect":
        return "spliced"
    if e.in_sockhash:
        return f"in sockhash ({e.mode})"
    return "native TCP" if e.evicted else f"not in sockhash ({e.mode})"


@click.group()
def sockmap() -> None:
    """Same-node socket redirection."""


@sockmap.command("list")
@bpffs_option
@output_option
@friendly_errors
def sockmap_list(bpffs: Path, output: str) -> None:
    """Tracked socket pairs: spliced, switched to TCP, or waiting to leave."""
    if not (bpffs / "mbpf_sockhash").exists():
        raise click.ClickException(f"socket redirection is not installed: no pinned sockhash under {bpffs}")
    pairs = redirect.pairs(redirect.read_sockets(bpffs))
    counters = redirect.read_counters(bpffs) or {}
    rows = [{
        "local": a.local, "remote": a.remote,
        "local_path": _path(a), "peer_path": _path(b),
        "mode": a.mode, "nodelay": a.nodelay,
        "redirected": a.in_sockhash and b is not None and b.in_sockhash and a.mode == "redirect",
    } for a, b in pairs]
    if output == "json":
        print_json({"pairs": rows, "counters": counters,
                    "sockhash_entries": redirect.sockhash_count(bpffs)})
        return
    print_table(["LOCAL", "REMOTE", "MODE", "LOCAL SOCKET", "PEER SOCKET"],
                [[r["local"], r["remote"], r["mode"], r["local_path"], r["peer_path"]] for r in rows])
    click.echo(f"\n{redirect.sockhash_count(bpffs)} socket(s) in the sockhash; "
               + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in counters.items()))
