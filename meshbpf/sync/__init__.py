"""The agent's parts that each bring one map family to the desired state:
lb (socket-LB maps). The agent owns the loop, retries and health; each part
owns its maps' state and reports success or failure of a sync."""

from __future__ import annotations


def one_line(exc: BaseException) -> str:
    """An exception as one log line: its type and its message's words."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
