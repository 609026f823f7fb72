"""Read-only views of the pinned maps, and `meshbpf uninstall`.

These read bpffs directly (no agent, no compiler), so they work whether or
not the agent is running.
"""

from __future__ import annotations

from pathlib import Path

import click

from ..datapath import loader
from ..datapath.maps import read_pinned
from ..reconcile import PROTO_NAME, SLOT_READY, SLOT_REFUSE, SLOT_TERMINATING, SVC_F_NODE_NETNS, LBState
from .agent_views import AgentUnreachable, agent_option, fetch
from .common import bpffs_option, endpoint_text, friendly_errors, output_option, print_json, print_table

SLOT_STATE = {SLOT_READY: "ready", SLOT_TERMINATING: "terminating",
              SLOT_REFUSE: "refused (a route's backend Service is missing)"}


def _load(bpffs: Path) -> LBState:
    if not Path("/sys/fs/bpf").is_dir() or not bpffs.parent.exists():
        raise click.ClickException(f"{bpffs.parent} does not exist: bpffs is not mounted, "
                                   f"so meshbpf is not installed on this node")
    installed = loader.inspect(bpffs)
    if not installed.maps:
        raise click.ClickException(f"meshbpf is not installed: no pinned maps under {bpffs} "
                                   f"(start `meshbpf agent`, or pass --bpffs)")
    state, _ = read_pinned(bpffs)
    return state


def _frontend(key) -> str:
    return f"{endpoint_text(key.addr, key.port)}/{PROTO_NAME.get(key.proto, key.proto)}"


def _affinity(timeout: int) -> str:
    return f"ClientIP {timeout}s" if timeout else "None"


def services_view(state: LBState) -> list[dict]:
    out = []
    for key, svc in sorted(state.services.items(), key=lambda kv: kv[1].svc_id):
        backends = []
        for i in range(svc.count):
            slot = state.slots.get((svc.svc_id, i))
            be = state.backends.get(slot.backend_id) if slot else None
            backends.append({
                "slot": i,
                "backend_id": slot.backend_id if slot else None,
                "address": endpoint_text(be.addr, be.port) if be else None,
                "state": SLOT_STATE.get(slot.state, str(slot.state)) if slot and be else "missing",
            })
        out.append({"id": svc.svc_id, "frontend": _frontend(key), "affinity": _affinity(svc.affinity_timeout),
                    "affinity_timeout": svc.affinity_timeout, "node_only": _node_only(svc.flags),
                    "backends": backends, "shares": _shares(backends)})
    return out


def _node_only(flags: int) -> bool:
    """Translated for the node's own sockets only (an LB IP whose source
    ranges hold the node); a pod's packet goes on to tc."""
    return bool(flags & SVC_F_NODE_NETNS)


def _shares(backends: list[dict]) -> list[dict]:
    """Each distinct backend once, with the slots it fills: a weighted split
    (a TCPRoute/UDPRoute) repeats a backend over several of its slots."""
    by_backend: dict[tuple, dict] = {}
    for b in backends:
        entry = by_backend.setdefault((b["address"], b["state"]),
                                      {"address": b["address"], "state": b["state"], "slots": 0})
        entry["slots"] += 1
    for entry in by_backend.values():
        entry["share"] = round(entry["slots"] / len(backends), 4)
    return list(by_backend.values())


@click.group()
def service() -> None:
    """Services programmed on this node."""


@service.command("list")
@bpffs_option
@output_option
@friendly_errors
def service_list(bpffs: Path, output: str) -> None:
    """Each frontend, its backends and their states, and its affinity; a
    weighted split (TCPRoute/UDPRoute) shows each backend's share of slots."""
    view = services_view(_load(bpffs))
    if output == "json":
        print_json(view)
        return
    rows = []
    for svc in view:
        split = any(share["slots"] > 1 for share in svc["shares"])
        names = [f"{b['address']} ({b['state']})" + (f" {b['share']:.1%} ({b['slots']} slots)" if split else "")
                 for b in svc["shares"]] or ["none: connections are refused"]
        rows.append([svc["id"], svc["frontend"], svc["affinity"], names[0]])
        rows.extend(["", "", "", name] for name in names[1:])
    print_table(["ID", "FRONTEND", "AFFINITY", "BACKENDS"], rows)


@click.group()
def route() -> None:
    """Gateway API routes (TCPRoute/UDPRoute) splitting Services."""


@route.command("list")
@agent_option
@output_option
@friendly_errors
def route_list(agent_addr: str, output: str) -> None:
    """Each route's status per Service parent (Accepted, ResolvedRefs), as
    the agent computes it (the maps hold no route names: the agent is asked)."""
    try:
        view = fetch(agent_addr, "/v1/routes")
    except AgentUnreachable as exc:
        raise click.ClickException(f"route status comes from the agent, which does not answer: {exc}")
    if output == "json":
        print_json(view)
        return
    rows = []
    for r in view["routes"]:
        accepted, resolved = r["conditions"]
        kind, name = r["route"].split(" ", 1)
        parent = f"{r['parent']['namespace']}/{r['parent']['name']}" + (
            f":{r['parent']['port']}" if "port" in r["parent"] else "")
        failed = [c for c in r["conditions"] if c["status"] != "True"]
        message = "; ".join(f"({c['reason']}) {c['message']}" for c in failed)
        rows.append([kind, name, parent, accepted["status"], resolved["status"], message])
    print_table(["ROUTE", "", "PARENT", "ACCEPTED", "RESOLVEDREFS", "MESSAGE"], rows)


@click.group()
def bpf() -> None:
    """Raw BPF map views."""


@bpf.group("lb")
def bpf_lb() -> None:
    """Socket-LB maps."""


@bpf_lb.command("list")
@bpffs_option
@output_option
@friendly_errors
def bpf_lb_list(bpffs: Path, output: str) -> None:
    """The service, slot and backend maps as the kernel holds them."""
    state = _load(bpffs)
    services = [{"frontend": _frontend(k), "svc_id": v.svc_id, "count": v.count,
                 "affinity_timeout": v.affinity_timeout, "node_only": _node_only(v.flags)}
                for k, v in sorted(state.services.items(), key=lambda kv: kv[1].svc_id)]
    slots = [{"svc_id": k.svc_id, "slot": k.slot, "backend_id": v.backend_id,
              "state": SLOT_STATE.get(v.state, str(v.state))}
             for k, v in sorted(state.slots.items())]
    backends = [{"backend_id": k, "address": endpoint_text(v.addr, v.port),
                 "proto": PROTO_NAME.get(v.proto, v.proto)}
                for k, v in sorted(state.backends.items())]
    if output == "json":
        print_json({"services": services, "slots": slots, "backends": backends})
        return
    click.echo(f"mbpf_svc ({len(services)} entries)")
    print_table(["FRONTEND", "SVC_ID", "COUNT", "AFFINITY_TIMEOUT"],
                [[s["frontend"], s["svc_id"], s["count"], s["affinity_timeout"]] for s in services])
    click.echo(f"\nmbpf_slots ({len(slots)} entries)")
    print_table(["SVC_ID", "SLOT", "BACKEND_ID", "STATE"],
                [[s["svc_id"], s["slot"], s["backend_id"], s["state"]] for s in slots])
    click.echo(f"\nmbpf_backends ({len(backends)} entries)")
    print_table(["BACKEND_ID", "ADDRESS", "PROTO"],
                [[b["backend_id"], b["address"], b["proto"]] for b in backends])


@click.command()
@bpffs_option
@friendly_errors
def uninstall(bpffs: Path) -> None:
    """Detach and unpin everything meshbpf made (in --bpffs), and nothing else.

    Connections already established keep working; new connections to service
    addresses are no longer translated."""
    if not bpffs.exists():
        click.echo(f"nothing to remove: {bpffs} does not exist")
        return
    removed = loader.uninstall(bpffs)
    for item in removed:
        click.echo(item if item.startswith("warning") else f"removed {item}")
    if not removed:
        click.echo(f"nothing to remove in {bpffs}")
