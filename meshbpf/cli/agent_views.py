"""The agent's read-only JSON views (/v1/endpoints, /v1/policy), for the CLI.

Names (pods, policy rules) live in the agent, not in the maps: the CLI asks
the agent for them, and falls back to what the pinned maps alone say when
the agent does not answer.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import click

DEFAULT_AGENT = "127.0.0.1:9890"  # the agent's default --listen

agent_option = click.option(
    "--agent", "agent_addr", default=DEFAULT_AGENT, show_default=True, envvar="MESHBPF_AGENT",
    help="HOST:PORT of the agent's HTTP server (its --listen), asked for pod and rule names.")


class AgentUnreachable(Exception):
    pass


def fetch(agent_addr: str, path: str, timeout: float = 2.0) -> Any:
    """GET http://agent/path as JSON; AgentUnreachable with the reason on failure."""
    url = f"http://{agent_addr}{path}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raise AgentUnreachable(f"{url}: HTTP {exc.code}") from None
    except (OSError, ValueError) as exc:  # refused, timed out, not JSON
        reason = getattr(exc, "reason", exc)
        raise AgentUnreachable(f"{url}: {reason}") from None


def note_fallback(exc: AgentUnreachable) -> None:
    click.echo(f"meshbpf: note: agent not reachable ({exc}); showing what the pinned maps alone "
               "say (no pod or rule names)", err=True)


def complete_pods(ctx: click.Context, _param, incomplete: str) -> list[str]:
    """Shell completion of --pod: the local pods the agent knows (none if it
    does not answer at once)."""
    try:
        view = fetch(ctx.params.get("agent_addr") or DEFAULT_AGENT, "/v1/endpoints", timeout=0.5)
    except AgentUnreachable:
        return []
    names = [f"{e['namespace']}/{e['name']}" for e in view.get("endpoints", [])]
    return [n for n in names if n.startswith(incomplete)]
