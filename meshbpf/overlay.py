"""An immutable mapping whose next version costs the change, not the size.

A DesiredState is never changed once handed out, so each Kubernetes event
used to copy the whole frontend dict (100 000 entries: ~5 ms to copy, as
much again to free). `OverlayMap` shares one base dict, never written once
shared, between every version derived from it and keeps the differences in a
small overlay; a new version copies only the overlay. When the overlay grows
past a fraction of the base, the next version folds it into a new base (one
C-level copy, amortised over the many events that filled the overlay).

Every version reads, iterates and compares as a dict edited the same way
would: a key set in place keeps its position, one deleted and set again
moves to the end (the full planner hands out new IDs in iteration order,
and the incremental one must match it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Iterable, Iterator

_GONE = object()     # in an overlay: the base's key is deleted
_MISSING = object()

# Fold the overlay into a new base once it holds more than this share of it
# (and more than MIN_FOLD entries): a version then copies at most 1/64 of
# the entries, and a fold happens once per that many changed keys.
FOLD_SHARE = 64
MIN_FOLD = 256


class OverlayMap(Mapping):
    """A read-only mapping: a shared base dict, the base's keys set in place
    (`_upd`, base positions) and the keys deleted or appended (`_over`, in
    order; _GONE marks a deleted base key)."""

    __slots__ = ("_base", "_upd", "_over", "_len")

    def __init__(self, items: Mapping | Iterable = ()):
        self._base: dict = dict(items)
        self._upd: dict = {}
        self._over: dict = {}
        self._len = len(self._base)

    @classmethod
    def of(cls, mapping: Mapping) -> "OverlayMap":
        """`mapping` as an OverlayMap. A dict is taken as the base without a
        copy: the caller hands it over and never writes it again."""
        if isinstance(mapping, OverlayMap):
            return mapping
        out = cls.__new__(cls)
        out._base = mapping if type(mapping) is dict else dict(mapping)
        out._upd, out._over, out._len = {}, {}, len(out._base)
        return out

    def editor(self) -> "OverlayEditor":
        return OverlayEditor(self)

    # --- reading ---------------------------------------------------------------
    def __getitem__(self, key: Any) -> Any:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            raise KeyError(key)
        return value

    def get(self, key: Any, default: Any = None) -> Any:
        return _get(self, key, default)

    def __contains__(self, key: Any) -> bool:
        return _get(self, key, _MISSING) is not _MISSING

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator:
        if not self._over:
            return iter(self._base)
        return (k for k, _ in self._items())

    def values(self):  # type: ignore[override]
        if not self._over and not self._upd:
            return self._base.values()
        return [v for _, v in self._items()]

    def items(self):  # type: ignore[override]
        if not self._over and not self._upd:
            return self._base.items()
        return list(self._items())

    def _items(self) -> Iterator[tuple[Any, Any]]:
        over, upd = self._over, self._upd
        for k, v in self._base.items():
            if k not in over:
                yield k, upd.get(k, v)
        yield from ((k, v) for k, v in over.items() if v is not _GONE)

    def __eq__(self, other: Any) -> bool:
        if self is other:
            return True
        if not isinstance(other, Mapping):
            return NotImplemented
        if len(self) != len(other):
            return False
        if isinstance(other, OverlayMap) and other._base is self._base:
            # Versions of one base differ at most where their edits do.
            edited = self._over.keys() | self._upd.keys() | other._over.keys() | other._upd.keys()
            return all(self.get(k, _MISSING) == other.get(k, _MISSING) for k in edited)
        return all(other.get(k, _MISSING) == v for k, v in self._items())

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"OverlayMap({len(self)} entries, {len(self._over) + len(self._upd)} edited)"


def _get(m: "OverlayMap | OverlayEditor", key: Any, default: Any) -> Any:
    value = m._over.get(key, _MISSING)
    if value is not _MISSING:
        return default if value is _GONE else value
    value = m._upd.get(key, _MISSING)
    if value is not _MISSING:
        return value
    return m._base.get(key, default)


class OverlayEditor:
    """Changes for the next version of an OverlayMap, which stays as it is."""

    __slots__ = ("_base", "_upd", "_over", "_len")

    def __init__(self, source: OverlayMap):
        self._base, self._len = source._base, source._len
        self._upd, self._over = dict(source._upd), dict(source._over)

    def get(self, key: Any, default: Any = None) -> Any:
        return _get(self, key, default)

    def __setitem__(self, key: Any, value: Any) -> None:
        if _get(self, key, _MISSING) is _MISSING:  # new, or deleted before: to the end
            self._len += 1
            self._over.pop(key, None)
            self._over[key] = value
        elif key in self._over:                     # appended before: stays where it is
            self._over[key] = value
        else:                                       # the base's: in place
            self._upd[key] = value

    def __delitem__(self, key: Any) -> None:
        if _get(self, key, _MISSING) is _MISSING:
            raise KeyError(key)
        self._len -= 1
        self._upd.pop(key, None)
        self._over.pop(key, None)
        if key in self._base:
            self._over[key] = _GONE

    def done(self) -> OverlayMap:
        out = OverlayMap.__new__(OverlayMap)
        out._len = self._len
        if len(self._over) + len(self._upd) > max(MIN_FOLD, len(self._base) // FOLD_SHARE):
            base = dict(self._base)  # one C-level copy, then the edits in their order
            base.update(self._upd)
            for key in self._over:
                base.pop(key, None)
            for key, value in self._over.items():
                if value is not _GONE:
                    base[key] = value
            out._base, out._upd, out._over = base, {}, {}
        else:
            out._base, out._upd, out._over = self._base, self._upd, self._over
        self._upd, self._over = {}, {}  # spent: the version owns its edits now
        return out
