"""`meshbpf status`: what the kernel supports and what is installed."""

from __future__ import annotations

from pathlib import Path

import click

from ..datapath import features, loader, redirect
from ..datapath.maps import read_pinned
from .common import bpffs_option, friendly_errors, output_option, print_json, print_table


@click.command()
@bpffs_option
@output_option
@friendly_errors
def status(bpffs: Path, output: str) -> None:
    """Kernel feature table, and meshbpf's programs and maps on this node."""
    probed = features.probe()
    enabled = features.as_dict(probed)
    installed = loader.inspect(bpffs) if bpffs.is_dir() else None
    counts = read_pinned(bpffs)[1] if installed and installed.maps else {}
    links = {name: {"cgroup_id": info.cgroup_id, "prog_id": info.prog_id}
             for name, info in (installed.links.items() if installed else [])}
    if output == "json":
        print_json({
            "features": [{"name": f.name, "available": enabled[f.name], "needed_for": f.needed_for,
                          "without": f.without} for f in probed],
            "bpffs": str(bpffs), "links": links, "map_entries": counts,
            "sockhash_entries": redirect.sockhash_count(bpffs) if installed else None,
        })
        return
    print_table(["FEATURE", "KERNEL", "NEEDED FOR", "WITHOUT IT"],
                [[f.name, "yes" if enabled[f.name] else "no", f.needed_for,
                  "" if enabled[f.name] else f.without] for f in probed])
    click.echo("")
    if not installed or not installed.present:
        click.echo(f"meshbpf is not installed in {bpffs}")
        return
    click.echo(f"installed in {bpffs}: {len(links)} link(s), maps: "
               + ", ".join(f"{name} {n}" for name, n in counts.items()))
    for name, info in links.items():
        where = f"cgroup id {info['cgroup_id']}" if info["cgroup_id"] else "tracepoint"
        click.echo(f"  {name}: {where}, program id {info['prog_id']}")
