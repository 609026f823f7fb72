"""`meshbpf endpoint list`: the local pods the policy datapath enforces."""

from __future__ import annotations

from pathlib import Path

import click

from ..datapath.policy import PolicyMaps
from ..reconcile.policy_keys import EP_ISOLATE_IN, EP_ISOLATE_OUT, PolicyState
from .agent_views import AgentUnreachable, agent_option, fetch, note_fallback
from .common import addr_text, bpffs_option, friendly_errors, output_option, print_json, print_table


def read_pinned(bpffs: Path) -> PolicyState:
    if not (bpffs / "mbpf_pol_ep").exists():
        raise click.ClickException(f"NetworkPolicy is not installed: no pinned mbpf_pol_ep under {bpffs}")
    with PolicyMaps(bpffs) as maps:
        return maps.read()


def _isolation(isolated: bool) -> str:
    return "isolated" if isolated else "open"


def agent_rows(view: dict) -> list[list]:
    return [[f"{e['namespace']}/{e['name']}", " ".join(e["ips"]) or "-",
             "-" if e["ifindex"] is None else e["ifindex"], "-" if e["ep_id"] is None else e["ep_id"],
             e["state"], _isolation(e["isolated_ingress"]), _isolation(e["isolated_egress"]),
             ", ".join(e["policies"]) or "-"] for e in view["endpoints"]]


AGENT_HEADERS = ["POD", "IPS", "IFINDEX", "EP", "STATE", "INGRESS", "EGRESS", "POLICIES"]


def pinned_endpoints(state: PolicyState) -> list[dict]:
    """Per endpoint in the maps: its ifindex, id, flags and entry counts."""
    out = []
    for ifindex, ep in sorted(state.endpoints.items()):
        out.append({
            "ifindex": ifindex, "ep_id": ep.ep_id, "generation": ep.gen,
            "isolated_ingress": bool(ep.flags & EP_ISOLATE_IN),
            "isolated_egress": bool(ep.flags & EP_ISOLATE_OUT),
            "ips": sorted(addr_text(a) for a, i in state.addresses.items() if i == ep.ep_id),
            "peer_entries": sum(1 for k in state.peers if (k.ep_id, k.gen) == (ep.ep_id, ep.gen)),
            "port_entries": sum(1 for k in state.ports if (k.ep_id, k.gen) == (ep.ep_id, ep.gen)),
        })
    return out


def pinned_rows(eps: list[dict]) -> list[list]:
    return [[e["ifindex"], e["ep_id"], " ".join(e["ips"]) or "-", _isolation(e["isolated_ingress"]),
             _isolation(e["isolated_egress"]), e["peer_entries"], e["port_entries"]] for e in eps]


PINNED_HEADERS = ["IFINDEX", "EP", "IPS", "INGRESS", "EGRESS", "PEER ENTRIES", "PORT ENTRIES"]


@click.group()
def endpoint() -> None:
    """Local pods under NetworkPolicy."""


@endpoint.command("list")
@bpffs_option
@agent_option
@output_option
@friendly_errors
def endpoint_list(bpffs: Path, agent_addr: str, output: str) -> None:
    """Local pods: identity, enforcement state, the policies that select them."""
    try:
        view = fetch(agent_addr, "/v1/endpoints")
    except AgentUnreachable as exc:
        state = read_pinned(bpffs)
        note_fallback(exc)
        eps = pinned_endpoints(state)
        if output == "json":
            print_json({"source": "pinned maps", "endpoints": eps})
        else:
            print_table(PINNED_HEADERS, pinned_rows(eps))
        return
    if output == "json":
        print_json({"source": "agent", "endpoints": view["endpoints"]})
    else:
        print_table(AGENT_HEADERS, agent_rows(view))
