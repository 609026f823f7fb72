"""A fast reader for the YAML that kubectl and go-yaml write, and nothing else.

Through PyYAML, libyaml builds a Python node object for every scalar, and
yaml_load converts the nodes: about 4x this reader's time for the 20 MB
`kubectl get svc,endpointslices -A -o yaml` of 10 000 Services (bench/parse.py).
kubectl's output uses a small, regular part of YAML:

- block mappings and block sequences, one entry per line, fixed indentation,
  `- ` items (the sequence under a key may sit at the key's own column);
- plain, 'single-quoted' and "double-quoted" scalars on one line, and
  plain and single-quoted ones wrapped onto the next lines (go-yaml wraps
  strings longer than 80 columns, kubernetes#32335);
- `|` and `|-` literal block scalars; `{}` and `[]`; `---` between documents.

This module reads exactly that, line by line: one regular expression per
*distinct* line (a dump repeats most of its lines), a dict per mapping, no
per-character Python loop. Plain scalars are resolved by yaml_scalars' (yaml_load's)
resolver (YAML 1.1 as go-yaml v2 reads it), so values are the ones the
libyaml path gives.

Anything else -- flow collections, anchors, tags, wrapped double quotes,
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

from .yaml_scalars import _Resolver, scalar_value

MAX_DEPTH = 100  # kubectl's objects nest a few dozen levels; deeper goes to libyaml


class NotInSubset(Exception):
    """The text uses YAML this reader does not handle; libyaml must read it."""


# YAML's printable characters minus tab, CR, NEL, LS, PS (line breaks and
# indentation rules differ for those) and the BOM: anything else bails out.
# Each distinct line is checked once, when it is first read (and _SIMPLE_LINE
# admits printable ASCII only), which costs less than a pass over the text.
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
# A 'single-quoted' scalar that go-yaml wrapped: its first line, and the rest
# of it on each next line (then, on its last line, the closing quote).
_QUOTE_OPEN = re.compile(rf"(?P<indent> *)(?P<dash>-(?: +|$))?(?:(?P<key>{_SCALAR}) *:(?= ) *)?"
                         r"'(?P<value>(?:[^']|'')*)")
_QUOTE_REST = re.compile(r" *((?:[^']|'')*)(?:(')(?: *| +#.*))?")

_ESCAPES = {"0": "\0", "a": "\a", "b": "\b", "t": "\t", "n": "\n", "v": "\v", "f": "\f",
            "r": "\r", "e": "\x1b", " ": " ", '"': '"', "/": "/", "\\": "\\",
            "N": "\x85", "_": "\xa0", "L": "\u2028", "P": "\u2029"}
_ESCAPE = re.compile(r"\\(?:x([0-9a-fA-F]{2})|u([0-9a-fA-F]{4})|U([0-9a-fA-F]{8})|(.))")

# The resolver's implicit tags by first character, as its resolve() looks
# them up; a plain scalar that none of them matches is a string. (resolve()
# itself costs a Python call, list concatenation and lookups per scalar.)
_RESOLVERS = {first: tuple(resolvers)
              for first, resolvers in _Resolver.yaml_implicit_resolvers.items()}
assert None not in _RESOLVERS and not _Resolver.yaml_path_resolvers  # what resolve() also reads

# What a line holds after its key (kinds of token).
(PENDING, SCALAR, EMPTY_MAP, EMPTY_SEQ, LITERAL_CLIP, LITERAL_STRIP, CONTINUATION,
 QUOTE_OPEN) = range(8)
_NO_KEY = object()
# A token is (simple, column, dash width, is an item, key, kind, value,
# opens, item, plain): simple is the column of a `key: scalar` line, opens
# that of a `key:` line and item that of a `- scalar` line, -1 otherwise, so
# the loop tests one number for its common cases; plain is the text of a
# plain scalar value that ends the line (go-yaml wraps long ones onto the
# next lines: CONTINUATION tokens), else None. These two stand for an empty
# or comment-only line and '---'.
_BLANK = (-1, -1, 0, False, _NO_KEY, PENDING, None, -1, -1, None)
_NEW_DOC = (-1, -1, 0, False, _NO_KEY, PENDING, None, -1, -1, None)


def _make_token(column: int, dash: int, key: Any, kind: int, value: Any,
                plain: str | None) -> tuple:
    plain_entry = column if not dash and key is not _NO_KEY else -1
    plain_item = column if dash and key is _NO_KEY and kind == SCALAR else -1
    return (plain_entry if kind == SCALAR else -1, column, dash, dash != 0, key, kind, value,
            plain_entry if kind == PENDING else -1, plain_item, plain)


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


def _scalar(text: str) -> Any:
    """A one-line scalar's text -> its value, as the libyaml path gives it."""
    first = text[0]
    if first == '"':
        body = text[1:-1]
        return _ESCAPE.sub(_unescape, body) if "\\" in body else body
    if first == "'":
        return text[1:-1].replace("''", "'")
    for tag, regexp in _RESOLVERS.get(first, ()):
        if regexp.match(text):
            try:
                return scalar_value(tag, text, None)
            except Exception:  # a merge key, or a value its tag refuses: libyaml's path says
                raise NotInSubset from None
    return text


_key = functools.lru_cache(maxsize=1 << 12)(_scalar)  # keys repeat across lines; values less


def _token(line: str) -> tuple:
    """One line -> its token (above), _BLANK or _NEW_DOC."""
    m = _SIMPLE_LINE.fullmatch(line)
    if m is not None:
        indent, dash, key, value, quoted = m.groups()
        if key is not None or (dash is not None and (value or quoted) is not None):
            return _simple_token(indent, dash, key, value, quoted)
    return _general_token(line)


# The lines most of a kubectl dump is made of, `key: value`, `- value` and
# `key:` with ASCII names and values and no escapes, matched by a cheaper
# expression than _LINE. Each line it matches reads the same by _LINE.
_SIMPLE_LINE = re.compile(r'( *)(- )?(?:([A-Za-z][A-Za-z0-9_./-]*):(?: |$))?'
                          r'(?:([A-Za-z0-9_./][A-Za-z0-9_./-]*)|"([ !#-\[\]-~]*)")?')


def _simple_token(indent: str, dash: str | None, key: str | None, value: str | None,
                  quoted: str | None) -> tuple:
    """_make_token for a _SIMPLE_LINE, inline: a dump has 100 000s of these."""
    column = len(indent)
    plain = value
    if value is not None:
        kind = SCALAR
        if value[0] in _RESOLVERS:  # else it is a string: no call
            value = _scalar(value)
    elif quoted is not None:
        kind, value = SCALAR, quoted
    else:
        kind = PENDING
    if dash:
        if key is None:
            return (-1, column, 2, True, _NO_KEY, kind, value, -1, column, plain)
        return (-1, column, 2, True, _key(key), kind, value, -1, -1, plain)
    if kind == SCALAR:
        return (column, column, 0, False, _key(key), kind, value, -1, -1, plain)
    return (-1, column, 0, False, _key(key), kind, value, column, -1, plain)


def _general_token(line: str) -> tuple:
    if line.startswith(("---", "...")):
        if line == "---":
            return _NEW_DOC
        raise NotInSubset
    m = _LINE.fullmatch(line) if len(line) <= MAX_LINE else None
    if m is None or _UNUSUAL_CHAR.search(line):
        return _quote_open_token(line)
    indent, dash, key, value = m.group("indent", "dash", "key", "value")
    if key is None and value is None:
        if dash is None:
            return _BLANK
        raise NotInSubset  # '-' alone: an item on the next lines, or null
    ends_line = value is not None and line.rstrip(" ").endswith(value)  # no comment after it
    plain = value if ends_line and value[0] not in "\"'{[|" else None
    if dash is None and key is None:
        if plain is None:
            raise NotInSubset  # a document that is one scalar, or worse
        return (-1, len(indent), 0, False, _NO_KEY, CONTINUATION, plain, -1, -1, None)
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
    return _make_token(len(indent), len(dash) if dash else 0,
                       _NO_KEY if key is None else _key(key), kind, value,
                       plain if kind == SCALAR else None)


def _quote_open_token(line: str) -> tuple:
    m = _QUOTE_OPEN.fullmatch(line) if len(line) <= MAX_LINE else None
    if m is None or _UNUSUAL_CHAR.search(line):
        raise NotInSubset
    indent, dash, key, value = m.group("indent", "dash", "key", "value")
    if (dash is None and key is None) or (key is not None and len(key) > 1000):
        raise NotInSubset
    return _make_token(len(indent), len(dash) if dash else 0,
                       _NO_KEY if key is None else _key(key), QUOTE_OPEN, value, None)


def _new_container(kind: int) -> Any:
    return {} if kind == EMPTY_MAP else []


def load_all(text: str, tokens: dict[str, tuple] | None = None) -> list[Any]:
    """The documents of text, or NotInSubset. tokens: a cache of read lines
    to share between calls over pieces of one file (file_pieces), which
    repeat each other's lines; a fresh one per call by default."""
    return _documents(text.split("\n"), text.endswith("\n"), {} if tokens is None else tokens)


_NOT_PENDING = 1 << 62  # pending_column when no key is pending: no line is that deep


def _documents(lines: list[str], terminated: bool, tokens: dict[str, tuple]) -> list[Any]:
    """Lines -> documents; terminated: the last line ends with a line break.

    One loop over a million lines: the state is in local variables and the
    common cases come first and inline, because a call or an attribute per
    line would double the time. Every shortcut does what the general case
    at the end would do with that line."""
    docs: list[Any] = []
    get = tokens.get
    # The innermost container, its column and whether it is a sequence; the
    # outer ones are on the stack, as (column, container, is a sequence).
    container: Any = None
    at = -1
    in_seq = False
    stack: list[tuple[int, Any, bool]] = []
    # With no key pending: `column` is container's column when it is a
    # mapping and `item_column` when it is a sequence; the other is -2, as
    # both are while a key is pending. Lines that continue the container
    # (most lines) are recognised by one comparison.
    column = item_column = -2
    root: Any = _NO_KEY          # the current document's value, once it starts
    explicit = False             # the current document began with '---'
    pending_key: Any = _NO_KEY   # a key (of container) whose value starts on the next line,
    pending_column = _NOT_PENDING  # its column
    skip_to = 0                  # the lines of a block scalar are read already
    folded_key: Any = _NO_KEY    # a plain scalar over several lines: its key ...
    folded = ""                  # ... and its text so far
    for index, line in enumerate(lines):
        if index < skip_to:
            continue
        token = get(line)
        if token is None:
            token = tokens[line] = _token(line)
        # token: simple, column, dash, is item, key, kind, value, opens, item
        simple = token[0]
        if simple == column:  # `key: scalar` in the current mapping
            key = token[4]
            if key in container:
                raise NotInSubset  # libyaml's path names the duplicate and its line
            container[key] = token[6]
            continue
        if token[8] == item_column:  # `- scalar` in the current sequence
            container.append(token[6])
            continue
        if token[7] == column:  # `key:` in the current mapping: its value starts below
            key = token[4]
            if key in container:
                raise NotInSubset
            pending_key, pending_column, column = key, column, -2
            continue
        if simple > pending_column:  # `key: scalar` opening the pending key's mapping
            nested: Any = {token[4]: token[6]}
            container[pending_key] = nested
            stack.append((at, container, in_seq))
            container, at, in_seq, column = nested, simple, False, simple
            pending_key, pending_column = _NO_KEY, _NOT_PENDING
            if len(stack) > MAX_DEPTH:
                raise NotInSubset
            continue
        if token[8] >= pending_column:  # `- scalar` opening the pending key's sequence
            nested = [token[6]]
            container[pending_key] = nested
            stack.append((at, container, in_seq))
            container, at, in_seq, item_column = nested, token[1], True, token[1]
            pending_key, pending_column = _NO_KEY, _NOT_PENDING
            if len(stack) > MAX_DEPTH:
                raise NotInSubset
            continue
        if token is _BLANK:
            continue
        if token is _NEW_DOC:
            if pending_key is not _NO_KEY:
                container[pending_key] = None
                pending_key, pending_column = _NO_KEY, _NOT_PENDING
            if root is not _NO_KEY or explicit:
                docs.append(None if root is _NO_KEY else root)
            root, explicit, stack, container, at = _NO_KEY, True, [], None, -1
            column = item_column = -2
            continue
        _, indent, dash, is_item, key, kind, value, _, _, _ = token
        if kind == CONTINUATION:  # more of the plain scalar on the line before
            if index - 1 < skip_to or pending_key is not _NO_KEY or indent <= at:
                raise NotInSubset
            before = tokens[lines[index - 1]]
            if before[5] != CONTINUATION:
                if before[9] is None:
                    raise NotInSubset  # not after a plain scalar that ended its line
                folded_key, folded = before[4], before[9]
            folded = f"{folded} {value}"  # line folding: one break, one space
            if in_seq:
                container[-1] = _scalar(folded)
            else:
                container[folded_key] = _scalar(folded)
            continue
        if pending_key is _NO_KEY and container is not None:
            # Back out to the line's container; then the common lines again.
            while at > indent or (at == indent and in_seq and not is_item):
                if not stack:
                    raise NotInSubset
                at, container, in_seq = stack.pop()
            if in_seq:
                if token[8] == at:
                    container.append(value)
                    column, item_column = -2, at
                    continue
            elif simple == at or token[7] == at:
                if key in container:
                    raise NotInSubset
                if simple == at:
                    container[key] = value
                    column, item_column = at, -2
                else:
                    pending_key, pending_column = key, at
                    column = item_column = -2
                continue
        # The general case: any line, any state.
        if pending_key is not _NO_KEY:
            if indent > pending_column or (indent == pending_column and is_item):
                nested = [] if is_item else {}
                container[pending_key] = nested
                stack.append((at, container, in_seq))
                container, at, in_seq = nested, indent, is_item
            else:
                container[pending_key] = None
            pending_key, pending_column = _NO_KEY, _NOT_PENDING
        elif container is None:
            if root is not _NO_KEY:
                raise NotInSubset  # a line left of the document's own column
            container = root = [] if is_item else {}
            at, in_seq = indent, is_item
        while at > indent or (at == indent and in_seq and not is_item):
            if not stack:
                raise NotInSubset
            at, container, in_seq = stack.pop()
        if at != indent or in_seq != is_item:
            raise NotInSubset
        if is_item and key is _NO_KEY:  # `- value`
            if kind == SCALAR:
                container.append(value)
            elif kind == EMPTY_MAP or kind == EMPTY_SEQ:
                container.append(_new_container(kind))
            elif kind == PENDING:
                raise NotInSubset
            else:
                text, skip_to = _multiline(lines, index + 1, indent, kind, value, terminated)
                container.append(text)
        else:
            if is_item:  # `- key...`: a new mapping in the sequence
                item: dict = {}
                container.append(item)
                stack.append((at, container, in_seq))
                container, at, in_seq = item, indent + dash, False
            if key in container:
                raise NotInSubset
            if kind == SCALAR:
                container[key] = value
            elif kind == PENDING:
                pending_key, pending_column = key, at
            elif kind == EMPTY_MAP or kind == EMPTY_SEQ:
                container[key] = _new_container(kind)
            else:
                container[key], skip_to = _multiline(lines, index + 1, at, kind, value,
                                                     terminated)
        if len(stack) > MAX_DEPTH:
            raise NotInSubset
        if pending_key is not _NO_KEY:
            column = item_column = -2
        elif in_seq:
            column, item_column = -2, at
        else:
            column, item_column = at, -2
    if pending_key is not _NO_KEY:
        container[pending_key] = None
    if root is not _NO_KEY or explicit:
        docs.append(None if root is _NO_KEY else root)
    return docs


def _multiline(lines: list[str], start: int, owner_column: int, kind: int, head: str,
               terminated: bool) -> tuple[str, int]:
    """A scalar whose header or first part (head) is on line start - 1: its
    value and the index of the first line after it."""
    if kind == QUOTE_OPEN:
        return _wrapped_quote(lines, start, owner_column, head)
    return _literal(lines, start, owner_column, kind, terminated)


def _wrapped_quote(lines: list[str], start: int, owner_column: int,
                   head: str) -> tuple[str, int]:
    """A single-quoted scalar over several lines: each line break between
    two lines of text folds to one space, with the spaces around it."""
    parts = [head.rstrip(" ")]
    for index in range(start, min(len(lines), start + 1000)):
        line = lines[index]
        text = line.lstrip(" ")
        m = _QUOTE_REST.fullmatch(text)
        if (not text or len(line) - len(text) <= owner_column or m is None
                or _UNUSUAL_CHAR.search(line)):
            raise NotInSubset  # an empty line (a line feed), too little indent, ...
        body, closed = m.groups()
        if closed:
            parts.append(body)
            return " ".join(parts).replace("''", "'"), index + 1
        parts.append(body.rstrip(" "))
    raise NotInSubset


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
    if _UNUSUAL_CHAR.search("".join(body)):
        raise NotInSubset
    if end == len(lines) and not terminated:
        raise NotInSubset  # the last line has no line break to clip or keep
    while body[-1] == "":
        body.pop()
    return "\n".join(body) + ("" if kind == LITERAL_STRIP else "\n"), end
