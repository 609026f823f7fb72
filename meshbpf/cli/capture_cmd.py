"""`meshbpf capture list`: the meshed pods on this node and their effective settings."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import click

from ..reconcile.capture import describe_rules
from ..reconcile.capture_keys import F_IN_ALL, F_INBOUND, F_OUT_ALL, F_OUTBOUND, CaptureState
from .agent_views import AgentUnreachable, agent_option, fetch, note_fallback
from .common import bpffs_option, friendly_errors, output_option, print_json, print_table

AGENT_HEADERS = ["POD", "STATE", "MESH", "PROXY UID", "OUT", "IN", "DNS", "OUTBOUND",
                 "INBOUND PORTS", "EXCLUDED"]
PINNED_HEADERS = ["CGROUP", "POD ID", "ADDRESSES", "PROXY UID", "OUT", "IN", "DNS", "FLAGS", "RULES"]


def _list(value) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value)) or "-"
    return str(value)


def agent_rows(view: dict) -> list[list]:
    rows = []
    for p in view["pods"]:
        excluded = []
        if p.get("exclude_outbound_ranges"):
            excluded.append("out " + _list(p["exclude_outbound_ranges"]))
        if p.get("exclude_outbound_ports"):
            excluded.append("out ports " + _list(p["exclude_outbound_ports"]))
        if p.get("exclude_inbound_ports"):
            excluded.append("in ports " + _list(p["exclude_inbound_ports"]))
        rows.append([f"{p['namespace']}/{p['name']}", p["state"], p.get("mesh", "-"),
                     p.get("proxy_uid", "-"), p.get("outbound_port", "-"), p.get("inbound_port", "-"),
                     p.get("dns_port") or "-", _list(p.get("outbound", "-")),
                     _list(p.get("inbound_ports", "-")), "; ".join(excluded) or "-"])
    return rows


def settings_line(view: dict) -> str:
    s = view["settings"]
    if not view.get("available", True):
        return "capture: not available on this kernel or build"
    if not s["enabled"]:
        return "capture: off (AgentConfig spec.capture.enabled)"
    label = f", opt-in label {s['optInLabel']}" if s.get("optInLabel") else ""
    return f"capture: on, mesh {s['mesh']}, DNS {'on' if s['dns'] else 'off'}{label}"


def _flags(flags: int) -> str:
    names = [(F_OUTBOUND, "out"), (F_OUT_ALL, "out-all"), (F_INBOUND, "in"), (F_IN_ALL, "in-all")]
    return ",".join(n for bit, n in names if flags & bit) or "-"


def pinned_pods(state: CaptureState) -> list[dict]:
    addresses: dict[int, list[str]] = {}
    for addr, cg in sorted(state.addresses.items()):
        ip = ipaddress.IPv6Address(addr)
        addresses.setdefault(cg, []).append(str(ip.ipv4_mapped or ip))
    return [{"cgroup_id": cg, "pod_id": p.pod_id, "addresses": addresses.get(cg, []),
             "proxy_uid": p.proxy_uid, "outbound_port": p.out_port, "inbound_port": p.in_port,
             "dns_port": p.dns_port, "flags": _flags(p.flags), "rules": describe_rules(state, p.pod_id)}
            for cg, p in sorted(state.pods.items())]


def pinned_rows(pods: list[dict]) -> list[list]:
    def rules(r: dict) -> str:
        return "; ".join([f"{k} {v}" for k, v in r["cidrs"].items()]
                         + [f"{k} {v}" for k, v in r["ports"].items()]) or "-"
    return [[p["cgroup_id"], p["pod_id"], ",".join(p["addresses"]) or "-", p["proxy_uid"],
             p["outbound_port"], p["inbound_port"], p["dns_port"] or "-", p["flags"], rules(p["rules"])]
            for p in pods]


def read_pinned(bpffs: Path) -> CaptureState:
    from ..datapath.capture import CaptureError, CaptureMaps
    try:
        with CaptureMaps(bpffs) as maps:
            return maps.read()
    except CaptureError as exc:
        raise click.ClickException(str(exc)) from None


@click.group()
def capture() -> None:
    """Sidecar capture as this node does it."""


@capture.command("list")
@bpffs_option
@agent_option
@output_option
@friendly_errors
def capture_list(bpffs: Path, agent_addr: str, output: str) -> None:
    """The meshed pods on this node and their effective capture settings."""
    try:
        view = fetch(agent_addr, "/v1/capture")
    except AgentUnreachable as exc:
        note_fallback(exc)
        pods = pinned_pods(read_pinned(bpffs))
        if output == "json":
            print_json({"source": "pinned maps", "pods": pods})
        else:
            print_table(PINNED_HEADERS, pinned_rows(pods))
        return
    if output == "json":
        print_json({"source": "agent", **view})
    else:
        click.echo(settings_line(view))
        print_table(AGENT_HEADERS, agent_rows(view))
