"""A config file cut into its documents, or the items of its one List, by
text scanning, so that an edit re-parses only the pieces it changed.

`split(path, text, known)` gives a `Split`: per piece, its place (as the
file source's messages name it), a digest of its text and, for a piece
not in `known` (the digests of the file's previous read), its parsed
value. A piece whose digest is known is not parsed: its text is the one
parsed last time. With `take`, each parsed value is handed to it as soon
as it is parsed instead of kept (a full read holds a file's pieces in
less than their parsed form, one at a time: file_held).

Cutting text must never change what the file means, so a cut is made only
where the structure guarantees it, and each piece proves itself by parsing
alone:

- a YAML stream: at each `---` line (a document marker at column 0 ends
  any block, so the documents are the same whether read one by one or
  together); a piece must give exactly one document;
- one YAML List document (`kubectl get -o yaml`): its `items:` key at
  column 0 and each `- ` line at column 0 below it; every other line of an
  item is indented or blank, a piece must read as a list of one item, and
  the List without its items (head and tail) is parsed too;
- one JSON List (`kubectl get -o json`, `jq -c`): the head up to
  `"items": [` is walked with the json module, and the List without its
  items is parsed; a new item is parsed where it starts, as json reads an
  array, which gives its end. A known item is found without parsing: its
  candidate end is the next separator between items (`}, {` as between
  the first two) where the braces balance, and its text must have a
  known digest, so it is one complete JSON value (it was parsed before),
  and a complete value where an item starts is that item.

In YAML, anchors (aliases may cross documents, and their expansion budget
is the file's), directives and `...` markers are not cut. Those, or any
piece that fails, give None: the caller parses the file as a whole, which
also locates any error.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import yaml_fast
from .yaml_load import _no_duplicates, load_all_libyaml, starts_as_json
from .yaml_scalars import LoadError

@dataclass
class Split:
    path: Path
    layout: str                                   # "stream" or "list"
    digests: list[bytes] = field(default_factory=list)
    values: dict[int, Any] = field(default_factory=dict)  # piece index -> value, for pieces parsed now
    envelope: dict | None = None                  # "list": the List object without its items
    lines: list[int] = field(default_factory=list)  # "stream": each document's first line
    take: Callable[["Split", int, Any], None] | None = None  # (split, piece index, value), instead of values

    def place(self, i: int) -> str:
        """Piece i's place in messages, as parse_documents and _flatten_lists name it."""
        if self.layout == "stream":
            return f"{self.path}: document {i + 1} (line {self.lines[i]})"
        return f"{self.path}: document 1 (line 1): items[{i}]"

    def documents(self) -> list[Any]:
        """The file's documents, when every piece was parsed now."""
        values = [self.values[i] for i in range(len(self.digests))]
        if self.layout == "stream":
            return values
        doc = dict(self.envelope or {})
        doc["items"] = values
        return [doc]


class _Failed(Exception):
    """The text does not cut cleanly: parse the file as a whole."""


def digest(kind: bytes, text: str) -> bytes:
    """128 bits of BLAKE2b: equal digests are equal texts, for any input
    (kind keeps a piece from matching a piece of another layout)."""
    h = _BLAKE2B(kind, digest_size=16)
    h.update(text.encode())
    return h.digest()


_BLAKE2B = hashlib.blake2b


def split(path: Path, text: str, known: frozenset[bytes] | set[bytes] = frozenset(),
          take: Callable[[Split, int, Any], None] | None = None) -> Split | None:
    """The pieces of text; None when it does not cut cleanly (see above).
    A None may come after `take` was given some pieces: the caller drops them."""
    try:
        if starts_as_json(text):
            return _json_list(path, text, known, take)
        if "&" in text or text.startswith(("%", "...")) or "\n%" in text or "\n..." in text:
            return None
        if text.startswith("---") or "\n---" in text:
            return _stream(path, text, known, take)
        return _yaml_list(path, text, known, take)
    except (_Failed, yaml_fast.NotInSubset, LoadError, ValueError, RecursionError):
        return None  # the whole parse gives the answer, or locates the error


class _YAML:
    """Pieces of one file through yaml_fast, sharing its line cache."""

    def __init__(self) -> None:
        self.tokens: dict[str, tuple] = {}

    def load(self, text: str) -> list[Any]:
        try:
            return yaml_fast.load_all(text, self.tokens)
        except yaml_fast.NotInSubset:
            return load_all_libyaml(text)


def _piece(out: Split, kind: bytes, text: str, known, parse: Callable[[str], Any]) -> None:
    d = digest(kind, text)
    out.digests.append(d)
    if d not in known:
        _parsed(out, len(out.digests) - 1, parse(text))


def _parsed(out: Split, index: int, value: Any) -> None:
    if out.take is None:
        out.values[index] = value
    else:
        out.take(out, index, value)


# --- a YAML stream ---------------------------------------------------------------

def _stream(path: Path, text: str, known, take) -> Split:
    out, yaml = Split(path, "stream", take=take), _YAML()

    def one(piece: str) -> Any:
        docs = yaml.load(piece)
        if len(docs) != 1:
            raise _Failed
        return docs[0]

    starts = _markers(text)
    head = text[: starts[0]] if starts else text
    if any(ln.strip() and not ln.lstrip().startswith("#") for ln in head.splitlines()):
        starts = [0] + starts  # content before the first marker: a document of its own
    line = 1
    for i, start in enumerate(starts):
        line += text.count("\n", starts[i - 1] if i else 0, start)
        end = starts[i + 1] if i + 1 < len(starts) else len(text)
        out.lines.append(line)
        _piece(out, b"doc:", text[start:end], known, one)
    return out


def _markers(text: str) -> list[int]:
    """Offsets of the lines that are `---` markers (as yaml_file's _DOC_START)."""
    found: list[int] = []
    pos = 0 if text.startswith("---") else text.find("\n---") + 1
    if pos == 0 and not text.startswith("---"):
        return found
    while True:
        if text[pos + 3: pos + 4] in ("", "\n", " ", "\t"):
            found.append(pos)
        pos = text.find("\n---", pos + 3) + 1
        if pos == 0:
            return found


# --- one YAML List document -----------------------------------------------------

_COLUMN0 = re.compile(r"\n(?=[^ \n])")


def _yaml_list(path: Path, text: str, known, take) -> Split:
    at = 0 if text.startswith("items:\n") else text.find("\nitems:\n") + 1
    if at <= 0 and not text.startswith("items:\n"):
        raise _Failed
    first = at + len("items:\n")
    if not text.startswith("- ", first):
        raise _Failed  # no items, or not kubectl's layout: small, or not ours to cut
    bounds = [first]
    tail_at = len(text)
    for m in _COLUMN0.finditer(text, first):
        if text.startswith("- ", m.end()) or text.startswith("-\n", m.end()):
            bounds.append(m.end())
        else:
            tail_at = m.end()
            break
    tail = text[tail_at:]
    if "\n-" in "\n" + tail:
        raise _Failed  # an item after the tail started: not a plain List
    yaml = _YAML()
    skeleton = yaml.load(text[:at] + "items: []\n" + tail)
    if len(skeleton) != 1 or not isinstance(skeleton[0], dict) or skeleton[0].get("items") != []:
        raise _Failed
    out = Split(path, "list", envelope=skeleton[0], take=take)

    def item(piece: str) -> Any:
        docs = yaml.load(piece)
        if len(docs) != 1 or not isinstance(docs[0], list) or len(docs[0]) != 1:
            raise _Failed
        return docs[0][0]

    bounds.append(tail_at)
    for i in range(len(bounds) - 1):
        _piece(out, b"yitem:", text[bounds[i]:bounds[i + 1]], known, item)
    return out


# --- one JSON List --------------------------------------------------------------

def _interned_keys(pairs: list[tuple[str, Any]]) -> dict:
    """_no_duplicates, with each key interned: json shares equal keys within
    one call only, and each item is a call of its own here (without this,
    10 000 Services' keys cost ~30 MB more than one json.loads of the file)."""
    out = {_intern(k): v for k, v in pairs}
    return out if len(out) == len(pairs) else _no_duplicates(pairs)


_intern = sys.intern
_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates)
_SCAN = json.JSONDecoder(object_pairs_hook=_interned_keys).scan_once  # raw_decode without its Python frame
# For items handed to `take` (held at once, their dicts dropped): nothing to share.
_SCAN_PASSING = json.JSONDecoder(object_pairs_hook=_no_duplicates).scan_once
_WS = re.compile(r"[ \t\n\r]*")


def _ws(text: str, pos: int) -> int:
    return _WS.match(text, pos).end()


def _expect(text: str, pos: int, char: str) -> int:
    pos = _ws(text, pos)
    if text[pos:pos + 1] != char:
        raise _Failed
    return pos + 1


def _items_start(text: str) -> int:
    """Offset just after the top-level `"items": [`, the head's values parsed on the way."""
    pos = _expect(text, 0, "{")
    while True:
        pos = _ws(text, pos)
        key, pos = _DECODER.raw_decode(text, pos)
        pos = _expect(text, pos, ":")
        if key == "items":
            return _expect(text, pos, "[")
        _, pos = _DECODER.raw_decode(text, _ws(text, pos))
        pos = _expect(text, pos, ",")


def _known_item(text: str, pos: int, sep: str, known) -> tuple[int, bytes]:
    """The end and digest of the item at pos if its text is a known piece,
    else (-1, b""), without parsing: a known text is one complete JSON value (it was parsed
    before), and a complete value where an item starts is that item."""
    cut, braces, counted = text.find(sep, pos), 0, pos
    while cut >= 0:
        # Balanced braces: a cheap filter for the candidates worth a digest.
        segment = text[counted:cut + 1]
        braces += segment.count("{") - segment.count("}")
        counted = cut + 1
        if braces == 0:
            d = digest(b"jitem:", text[pos:cut + 1])
            return (cut + 1, d) if d in known else (-1, b"")
        cut = text.find(sep, cut + 1)  # the separator was inside the item: grow it
    return -1, b""  # the last item (or a separator in a string): parse it


def _json_list(path: Path, text: str, known, take) -> Split:
    items_at = _items_start(text)
    pos = _ws(text, items_at)
    if text[pos:pos + 1] != "{":
        raise _Failed  # no items (or not objects): nothing to gain
    out = Split(path, "list", take=take)
    digests, scan = out.digests, _SCAN if take is None else _SCAN_PASSING
    sep = ""  # between two items: "}" + the comma and whitespace after the first + "{"
    between = ""  # the comma and whitespace between the first two items
    while True:
        end, d = _known_item(text, pos, sep, known) if sep and known else (-1, b"")
        if end >= 0:
            digests.append(d)
        else:  # parsed where it starts, as json reads an array: its end is the item's
            try:
                value, end = scan(text, pos)
            except StopIteration:
                raise _Failed from None
            d = digest(b"jitem:", text[pos:end])
            digests.append(d)
            if d not in known:
                _parsed(out, len(digests) - 1, value)
        if between and text.startswith(between, end) and text.startswith("{", end + len(between)):
            pos = end + len(between)  # the common case: as between the first two
            continue
        after = _ws(text, end)
        if text[after:after + 1] != ",":
            break
        pos = _ws(text, after + 1)
        if not sep:
            between = text[end:pos]
            sep = "}" + between + "{"
    tail = text[_expect(text, end, "]"):]
    envelope = json.loads(text[:items_at] + "]" + tail, object_pairs_hook=_no_duplicates)
    if not isinstance(envelope, dict) or envelope.get("items") != []:
        raise _Failed
    out.envelope = envelope
    return out
