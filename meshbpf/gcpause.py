"""Pausing Python's cyclic garbage collector around bulk work.

Reading a large config builds millions of short-lived dicts and lists; the
cyclic collector, triggered by allocation counts, would walk the growing
heap again and again while they are built. Reference counting still frees
everything; cycles (there are none in this data) wait until the pause ends.
"""

from __future__ import annotations

import contextlib
import gc


@contextlib.contextmanager
def gc_paused():
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
