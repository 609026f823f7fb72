"""Capped exponential backoff for retrying a failed sync.

Sources hand each change over once; after a failed write, a capacity
refusal or a missing cgroup, the agent retries the desired state it holds
on this schedule instead of waiting for an unrelated change."""

from __future__ import annotations


class Backoff:
    """0.5 s, 1 s, 2 s ... up to `cap`, until reset by a success or a new change."""

    def __init__(self, first: float = 0.5, cap: float = 30.0):
        self.first, self.cap = first, cap
        self.delay = first
        self.due_at: float | None = None   # None: nothing to retry

    def failed(self, now: float) -> float:
        """Schedules the next try; returns how long until then."""
        delay = self.delay
        self.due_at = now + delay
        self.delay = min(self.delay * 2, self.cap)
        return delay

    def reset(self) -> None:
        self.delay = self.first
        self.due_at = None

    def due(self, now: float) -> bool:
        return self.due_at is not None and now >= self.due_at
