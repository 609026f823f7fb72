"""Where desired state comes from.

Every source has the same shape: `poll()` returns a new DesiredState when
something changed, None when nothing did, and raises ConfigError when the
change is rejected (the caller keeps running what it had).
"""

from __future__ import annotations

from typing import Protocol

from ..model import DesiredState


class Source(Protocol):
    def poll(self) -> DesiredState | None: ...
