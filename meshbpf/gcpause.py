"""Pausing Python's cyclic garbage collector around bulk work.

Reading a large config builds millions of short-lived dicts and lists; the
cyclic collector, triggered by allocation counts, would walk the growing
heap again and again while they are built. Reference counting still frees
everything; cycles (there are none in this data) wait until the pause ends.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import threading

# Pauses are counted: the collector is process-wide, and a thread ending its
# pause must not turn it back on under another still paused (the Kubernetes
# source lists Services and EndpointSlices at once, in two threads).
_lock = threading.Lock()
_paused = 0
_was_enabled = False


@contextlib.contextmanager
def gc_paused():
    global _paused, _was_enabled
    with _lock:
        if not _paused:
            _was_enabled = gc.isenabled()
            gc.disable()
        _paused += 1
    try:
        yield
    finally:
        with _lock:
            _paused -= 1
            if not _paused and _was_enabled:
                gc.enable()


def freeze_heap(collect: bool = True) -> None:
    """Moves every object alive now out of the cyclic collector's sight
    (gc.freeze). After a full sync the heap holds the whole desired state
    and the maps' mirror, hundreds of thousands of long-lived objects; left
    in the oldest generation, each full collection walks them all, a pause
    of tens of milliseconds that lands on whichever change comes next.
    Reference counting still frees them when they are replaced (nothing in
    the state forms cycles). The collection first frees the cyclic garbage
    of the paused step, which would otherwise be frozen for good. It walks
    the young generations only: everything allocated while the collector
    was paused is in them, while a full collection would also walk every
    older object (seconds at 100 000 Services). collect=False skips it, for
    the first full sync: the whole new state is young then, a walk of
    seconds at 100 000 Services to free a few dozen cyclic objects (they
    stay frozen instead, once). Then the C allocator's free pages go back
    (trim_malloc)."""
    if collect:
        gc.collect(1)
    gc.freeze()
    trim_malloc()


def _libc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None


_malloc_trim = _libc_trim()


def trim_malloc() -> bool:
    """Hands the C allocator's free pages back to the system (glibc's
    malloc_trim(0); nothing elsewhere). A full sync frees the big
    transient tables and strings it built, which glibc otherwise keeps as
    RSS: ~20 MB at 100 000 Services, in a few milliseconds. (Python's own
    small-object arenas go back by themselves once empty.) Whether it ran."""
    if _malloc_trim is None:
        return False
    _malloc_trim(0)
    return True
