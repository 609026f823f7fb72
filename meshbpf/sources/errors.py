"""Errors a source reports: each names the place, the field and the reason."""

from __future__ import annotations

from dataclasses import dataclass

# Characters that would break a problem's line (log lines, `meshbpf status`):
# control characters and the Unicode line separators, shown escaped instead.
_ESCAPES = {c: repr(chr(c))[1:-1] for c in [*range(0x20), *range(0x7f, 0xa0), 0x2028, 0x2029]}
# Characters of one part shown: a value quoted in a reason can be megabytes.
MAX_PART = 400


def one_line(text: str, limit: int = MAX_PART) -> str:
    """text on one line (control characters escaped), cut to about limit characters."""
    text = text.translate(_ESCAPES)
    if len(text) > limit:
        text = f"{text[:limit]}... ({len(text)} characters)"
    return text


@dataclass(frozen=True)
class Problem:
    where: str   # "services.yaml: document 3 (line 41)" or "API Service default/web"
    obj: str     # "Service default/web", or "" before the object is known
    path: str    # "spec.ports[0].port", or "" for the whole object
    reason: str

    def __str__(self) -> str:
        """One line, whatever the input held: a name or value with a line
        break or a megabyte of text in it is shown escaped and cut."""
        parts = [one_line(self.where)]
        if self.obj:
            parts[0] += f" ({one_line(self.obj)})"
        if self.path:
            parts.append(one_line(self.path))
        parts.append(one_line(self.reason))
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
