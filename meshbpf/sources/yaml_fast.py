"""A fast reader for the YAML that kubectl and go-yaml write, and nothing else.

libyaml builds a node per scalar through PyYAML's C extension, which takes
about 20 s for the 20 MB `kubectl get svc,endpointslices -A -o yaml` of
10 000 Services. kubectl's output uses a small, regular part of YAML:

- block mappings and block sequences, one entry per line, fixed indentation,
  `- ` items (the sequence under a key may sit at the key's own column);
- plain, 'single-quoted' and "double-quoted" scalars on one line;
- `|` and `|-` literal block scalars; `{}` and `[]`; `---` between documents.

This module reads exactly that, line by line: one regular expression per
*distinct* line (a dump repeats most of its lines), a dict per mapping, no
per-character Python loop. Plain scalars are resolved by yaml_load's own
resolver (YAML 1.1 as go-yaml v2 reads it), so values are the ones the
libyaml path gives.

Anything else -- flow collections, anchors, tags, multi-line flow scalars,
tabs, odd indentation, duplicate keys, any YAML error -- raises
NotInSubset, and the caller parses the text with libyaml, which gives the
answer or the located error. This reader never gives a different answer
than the libyaml path: tests/unit/test_yaml_fast.py checks that over
generated, fixture and mutated inputs.
"""

from __future__ import annotations

import functools
import re
from typing import Any

from yaml.nodes import ScalarNode

from .yaml_load import _Resolver, _cached_resolve, scalar_value

MAX_DEPTH = 100  # kubectl's objects nest a few dozen levels; deeper goes to libyaml


class NotInSubset(Exception):
    """The text uses YAML this reader does not handle; libyaml must read it."""


# YAML's printable characters minus tab, CR, NEL, LS, PS (line breaks and
# indentation rules differ for those) and the BOM: anything else bails out.
_UNUSUAL_CHAR = re.compile("[^\n\x20-\x7e\xa0-\u2027\u202a-\ud7ff\ue000-\ufefe\uff00-\ufffd"
                           "\U00010000-\U0010ffff]")

# A plain scalar: words separated by spaces. A word has no ': ' and no ' #',
# and may not end in ':'. Its first character is no YAML indicator ('-' only
# before a non-space, as in -1). Every repetition below is over one character
# whose alternatives exclude each other, so a match never backtracks more than
# linearly. (No possessive quantifiers or atomic groups: Python 3.11.2, Debian
# 12's, matches some of them wrongly.)
_WORD_CHAR = r"(?:[^ :#]|:(?=[^ ]))"
_WORD_REST = r"(?:[^ :#]|:(?=[^ ])|#)*"
_FIRST_CHAR = r"(?:[^ \-?:,\[\]{}#&*!|>'\"%@`<]|-(?=[^ ]))"
_PLAIN = rf"{_FIRST_CHAR}{_WORD_REST}(?:[ ]+{_WORD_CHAR}{_WORD_REST})*"
_DOUBLE = r'"(?:[^"\\]|\\.)*"'
_SINGLE = r"'(?:[^']|'')*'"
_SCALAR = rf"{_PLAIN}|{_DOUBLE}|{_SINGLE}"
_LINE = re.compile(
    rf"(?P<indent> *)(?P<dash>-(?: +|$))?"
    rf"(?:(?P<key>{_SCALAR}) *:(?= |$) *)?"
    rf"(?P<value>{_SCALAR}|\{{\}}|\[\]|\|-?)?"
    r" *(?:(?<![^ ])#.*)?")
MAX_LINE = 4096  # longer lines go to libyaml (and the regex stays cheap)

_ESCAPES = {"0": "\0", "a": "\a", "b": "\b", "t": "\t", "n": "\n", "v": "\v", "f": "\f",
            "r": "\r", "e": "\x1b", " ": " ", '"': '"', "/": "/", "\\": "\\",
            "N": "\x85", "_": "\xa0", "L": "\u2028", "P": "\u2029"}
_ESCAPE = re.compile(r"\\(?:x([0-9a-fA-F]{2})|u([0-9a-fA-F]{4})|U([0-9a-fA-F]{8})|(.))")

# A plain scalar that none of the resolver's expressions match is a string:
# one match against their union saves the resolver's lookup for most values.
_MAYBE_NOT_STR = re.compile("|".join(sorted({
    f"(?:{regexp.pattern})" for resolvers in _Resolver.yaml_implicit_resolvers.values()
    for _tag, regexp in resolvers})))

# What a line holds after its key (kinds of token).
PENDING, SCALAR, EMPTY_MAP, EMPTY_SEQ, LITERAL_CLIP, LITERAL_STRIP = range(6)
_NO_KEY = object()
# A token is (simple, indent, dash width, key, kind, value); simple is the
# indent of a plain `key: scalar` line and -1 otherwise, so the hot loop tests
# one number. These two stand for an empty or comment-only line and '---'.
_BLANK = (-1, -1, 0, _NO_KEY, PENDING, None)
_NEW_DOC = (-1, -1, 0, _NO_KEY, PENDING, None)


def _unescape(match: "re.Match[str]") -> str:
    hex2, hex4, hex8, char = match.groups()
    if char is not None:
        if char not in _ESCAPES:
            raise NotInSubset
        return _ESCAPES[char]
    code = int(hex2 or hex4 or hex8, 16)
    if 0xD800 <= code <= 0xDFFF or code > 0x10FFFF:
        raise NotInSubset
    return chr(code)


@functools.lru_cache(maxsize=1 << 16)  # keys and common values repeat across lines
def _scalar(text: str) -> Any:
    first = text[0]
    if first == '"':
        body = text[1:-1]
        return _ESCAPE.sub(_unescape, body) if "\\" in body else body
    if first == "'":
        return text[1:-1].replace("''", "'")
    if _MAYBE_NOT_STR.match(text) is None:
        return text
    try:
        return scalar_value(_cached_resolve(ScalarNode, text, (True, False)), text, None)
    except Exception:  # a merge key or a value its tag refuses: libyaml's path says
        raise NotInSubset from None


def _token(line: str) -> Any:
    """One line -> its token (above), _BLANK or _NEW_DOC."""
    if line.startswith(("---", "...")):
        if line == "---":
            return _NEW_DOC
        raise NotInSubset
    m = _LINE.fullmatch(line) if len(line) <= MAX_LINE else None
    if m is None:
        raise NotInSubset
    indent, dash, key, value = m.group("indent", "dash", "key", "value")
    if key is None and value is None:
        if dash is None:
            return _BLANK
        raise NotInSubset  # '-' alone: an item on the next lines, or null
    if dash is None and key is None:
        raise NotInSubset  # a bare scalar: a document that is one value
    if key is not None and len(key) > 1000:
        raise NotInSubset  # YAML's limit on an implicit key's length
    if value is None:
        kind = PENDING
    elif value[0] == "|":
        if not line.endswith(value):
            raise NotInSubset  # a comment after the header
        kind = LITERAL_STRIP if value == "|-" else LITERAL_CLIP
    elif value == "{}":
        kind = EMPTY_MAP
    elif value == "[]":
        kind = EMPTY_SEQ
    else:
        kind, value = SCALAR, _scalar(value)
    simple = len(indent) if kind == SCALAR and dash is None else -1
    return (simple, len(indent), len(dash) if dash else 0,
            _NO_KEY if key is None else _scalar(key), kind, value)


def _new_container(kind: int) -> Any:
    return {} if kind == EMPTY_MAP else []


def load_all(text: str) -> list[Any]:
    """The documents of text, or NotInSubset."""
    if _UNUSUAL_CHAR.search(text):
        raise NotInSubset
    return _documents(text.split("\n"), text.endswith("\n"))


def _documents(lines: list[str], terminated: bool) -> list[Any]:
    """Lines -> documents; terminated: the last line ends with a line break.

    One loop over a million lines: the state is in local variables and the
    common cases are inline, because a call or an attribute per line would
    double the time."""
    docs: list[Any] = []
    tokens: dict[str, tuple] = {}
    get = tokens.get
    stack: list[tuple[int, Any, bool]] = []  # (column, container, is a sequence), innermost last
    root: Any = _NO_KEY          # the current document's value, once it starts
    explicit = False             # the current document began with '---'
    pending_key: Any = _NO_KEY   # a key whose value starts on the next line ...
    pending_map: Any = None      # ... its mapping
    pending_column = 0           # ... and its column
    # The innermost container and the column of its keys when it is a
    # mapping and no key is pending; else -2: a `key: scalar` line at that
    # column (the common case) is then stored without further checks.
    container: Any = None
    column = -2
    skip_to = 0                  # the lines of a block scalar are read already
    for index, line in enumerate(lines):
        if index < skip_to:
            continue
        token = get(line)
        if token is None:
            token = tokens[line] = _token(line)
        if token[0] == column:
            key = token[3]
            if key in container:
                raise NotInSubset  # libyaml's path names the duplicate and its line
            container[key] = token[5]
            continue
        if token is _BLANK:
            continue
        if token is _NEW_DOC:
            if pending_key is not _NO_KEY:
                pending_map[pending_key] = None
                pending_key = _NO_KEY
            if root is not _NO_KEY or explicit:
                docs.append(None if root is _NO_KEY else root)
            root, explicit, stack, column = _NO_KEY, True, [], -2
            continue
        _, indent, dash, key, kind, value = token
        is_item = dash != 0
        if pending_key is not _NO_KEY:
            if indent > pending_column or (indent == pending_column and is_item):
                nested: Any = [] if is_item else {}
                pending_map[pending_key] = nested
                stack.append((indent, nested, is_item))
                if len(stack) > MAX_DEPTH:
                    raise NotInSubset
            else:
                pending_map[pending_key] = None
            pending_key = _NO_KEY
        elif not stack:
            if root is not _NO_KEY:
                raise NotInSubset  # a line left of the document's own column
            root = [] if is_item else {}
            stack.append((indent, root, is_item))
        top = stack[-1]
        while top[0] > indent or (top[0] == indent and top[2] and not is_item):
            stack.pop()
            if not stack:
                raise NotInSubset
            top = stack[-1]
        if top[0] != indent or top[2] != is_item:
            raise NotInSubset
        container = top[1]
        if is_item:
            if key is _NO_KEY:  # `- value`
                column = -2
                if kind == SCALAR:
                    container.append(value)
                elif kind == EMPTY_MAP or kind == EMPTY_SEQ:
                    container.append(_new_container(kind))
                elif kind == PENDING:
                    raise NotInSubset
                else:
                    text, skip_to = _literal(lines, index + 1, indent, kind, terminated)
                    container.append(text)
                continue
            item: dict = {}
            container.append(item)
            indent += dash
            stack.append((indent, item, False))
            if len(stack) > MAX_DEPTH:
                raise NotInSubset
            container = item
        if key in container:
            raise NotInSubset
        column = indent
        if kind == SCALAR:
            container[key] = value
        elif kind == PENDING:
            pending_key, pending_map, pending_column = key, container, indent
            column = -2
        elif kind == EMPTY_MAP or kind == EMPTY_SEQ:
            container[key] = _new_container(kind)
        else:
            container[key], skip_to = _literal(lines, index + 1, indent, kind, terminated)
    if pending_key is not _NO_KEY:
        pending_map[pending_key] = None
    if root is not _NO_KEY or explicit:
        docs.append(None if root is _NO_KEY else root)
    return docs


def _literal(lines: list[str], start: int, owner_column: int, kind: int,
             terminated: bool) -> tuple[str, int]:
    """A `|` / `|-` block scalar whose header is on line start - 1: its value
    and the index of the first line after it."""
    if start >= len(lines):
        raise NotInSubset
    first = lines[start]
    indent = len(first) - len(first.lstrip(" "))
    if indent <= owner_column or indent == len(first):
        raise NotInSubset  # empty, or starting with an empty line: rare, libyaml's
    prefix = " " * indent
    body: list[str] = []
    end = len(lines)
    for index in range(start, len(lines)):
        line = lines[index]
        if line.startswith(prefix) and line.strip(" "):
            body.append(line[indent:])
        elif not line:
            body.append("")
        elif line.strip(" "):
            end = index
            break
        else:
            raise NotInSubset  # a line of spaces: content or blank, by its length
    if end == len(lines) and not terminated:
        raise NotInSubset  # the last line has no line break to clip or keep
    while body[-1] == "":
        body.pop()
    return "\n".join(body) + ("" if kind == LITERAL_STRIP else "\n"), end
