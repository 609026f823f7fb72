"""Wrong-type tables: every field and list item of an object, replaced by a
value of each other JSON type. Readers must answer each with a Problem,
never an exception."""

from __future__ import annotations

import copy
from typing import Any, Iterator

WRONG = {"string": "x", "list": ["x"], "map": {"x": 1}, "null": None, "number": 7, "bool": True}


def paths(value: Any, prefix: tuple = ()) -> Iterator[tuple]:
    """Every path to a field or list item below value."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return
    for key, sub in items:
        yield prefix + (key,)
        yield from paths(sub, prefix + (key,))


def replaced(obj: dict, path: tuple, new: Any) -> dict:
    """A deep copy of obj with the value at path replaced by new."""
    out = copy.deepcopy(obj)
    parent = out
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = copy.deepcopy(new)
    return out
