"""Errors a source reports: each names the place, the field and the reason."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    where: str   # "services.yaml: document 3 (line 41)" or "API Service default/web"
    obj: str     # "Service default/web", or "" before the object is known
    path: str    # "spec.ports[0].port", or "" for the whole object
    reason: str

    def __str__(self) -> str:
        parts = [self.where]
        if self.obj:
            parts[0] += f" ({self.obj})"
        if self.path:
            parts.append(self.path)
        parts.append(self.reason)
        return ": ".join(parts)


class ConfigError(Exception):
    """Desired state was rejected; the running state stays as it was."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        shown = "\n".join(f"  {p}" for p in self.problems[:20])
        more = len(self.problems) - 20
        if more > 0:
            shown += f"\n  ... and {more} more"
        super().__init__(f"{len(self.problems)} problem(s) in the configuration:\n{shown}")


def internal_error(where: str, exc: BaseException) -> ConfigError:
    """A bug met while reading input, as a rejected change: the agent logs it
    and keeps running the previous state instead of dying on one input."""
    return ConfigError([Problem(where, "", "", f"internal error while reading it "
                                               f"({type(exc).__name__}: {exc}); please report this")])
