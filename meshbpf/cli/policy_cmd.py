"""`meshbpf policy list`: the effective allow rules of each local pod."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import click

from ..reconcile.policy_keys import DIR_IN, PEER_ANY_PORT, PolicyState
from .agent_views import AgentUnreachable, agent_option, fetch, note_fallback
from .common import addr_text, bpffs_option, friendly_errors, output_option, print_json, print_table
from .endpoint_cmd import read_pinned

PROTOS = {6: "TCP", 17: "UDP", 132: "SCTP"}
NOT_ISOLATED = "(not isolated: everything allowed)"


def _join(value) -> str:
    return "any" if value == "any" else ", ".join(value)


def agent_rows(view: dict) -> list[list]:
    rows = []
    for pod in view["pods"]:
        name = f"{pod['namespace']}/{pod['name']}"
        for direction in ("ingress", "egress"):
            d = pod[direction]
            if not d["isolated"]:
                rows.append([name, direction, NOT_ISOLATED, "", ""])
            elif not d["rules"]:
                rows.append([name, direction, "(isolated, no rule: all denied)", "", ""])
            for r in d["rules"]:
                rows.append([name, direction, r["rule"], _join(r["peers"]), _join(r["ports"])])
    return rows


AGENT_HEADERS = ["POD", "DIRECTION", "RULE", "PEERS", "PORTS"]


def _prefix_text(addr: bytes, bits: int) -> str:
    ip = ipaddress.IPv6Address(addr)
    if ip.ipv4_mapped is not None and bits >= 96:
        return f"{addr_text(addr)}/{bits - 96}"
    return f"{ip}/{bits}"


def _port_text(proto: int, port: int, bits: int) -> str:
    name = PROTOS.get(proto, str(proto))
    if bits == 0:
        return f"{name}/any"
    last = port + (1 << (16 - bits)) - 1
    return f"{name}/{port}" if last == port else f"{name}/{port}-{last}"


def pinned_rules(state: PolicyState) -> list[dict]:
    """The current generation's peer prefixes with their ports and rule ids."""
    gens = {ep.ep_id: (ifindex, ep.gen) for ifindex, ep in state.endpoints.items()}
    out = []
    for k, v in sorted(state.peers.items()):
        if k.ep_id not in gens or gens[k.ep_id][1] != k.gen:
            continue  # another generation: half of a change in flight
        if v.flags & PEER_ANY_PORT:
            ports = [{"ports": "any", "rule": v.rule}]
        else:
            ports = [{"ports": _port_text(pk.proto, pk.port, pk.port_bits), "rule": pv.rule}
                     for pk, pv in sorted(state.ports.items())
                     if (pk.ep_id, pk.gen, pk.dir, pk.peer_set) == (k.ep_id, k.gen, k.dir, v.peer_set)]
        out.append({"ifindex": gens[k.ep_id][0], "ep_id": k.ep_id,
                    "direction": "ingress" if k.dir == DIR_IN else "egress",
                    "peer": _prefix_text(k.addr, k.addr_bits), "allowed": ports})
    return out


def pinned_rows(rules: list[dict]) -> list[list]:
    return [[r["ifindex"], r["ep_id"], r["direction"], r["peer"],
             ", ".join(f"{p['ports']} (rule {p['rule']})" for p in r["allowed"]) or "none"]
            for r in rules]


PINNED_HEADERS = ["IFINDEX", "EP", "DIRECTION", "PEER", "ALLOWED PORTS"]


@click.group()
def policy() -> None:
    """NetworkPolicy as this node enforces it."""


@policy.command("list")
@bpffs_option
@agent_option
@output_option
@friendly_errors
def policy_list(bpffs: Path, agent_addr: str, output: str) -> None:
    """The effective allow rules of each local pod."""
    try:
        view = fetch(agent_addr, "/v1/policy")
    except AgentUnreachable as exc:
        state = read_pinned(bpffs)
        note_fallback(exc)
        rules = pinned_rules(state)
        if output == "json":
            print_json({"source": "pinned maps", "rules": rules})
        else:
            print_table(PINNED_HEADERS, pinned_rows(rules))
        return
    if output == "json":
        print_json({"source": "agent", **view})
    else:
        print_table(AGENT_HEADERS, agent_rows(view))
        click.echo(f"\nalways allowed: {view['always_allowed']}")
