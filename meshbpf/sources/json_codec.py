"""JSON decoding and compact encoding for the sources' hot paths: orjson
where it is installed (a dependency: it decodes a cold start's lists about
three times as fast as the standard library's C accelerator and encodes
the held forms about ten times as fast, the biggest share of a cold start
at 100 000 Services), the standard library otherwise.

Where orjson refuses what the standard library accepts (NaN, Infinity,
bad UTF-8 to decode; an integer beyond 64 bits or a key that is not a
string to encode) the standard library answers instead. Two differences
remain, both on values the API server never sends (Go's encoder writes
no NaN, and its integer fields are 64 bits at most): an integer of more
than 64 bits decodes to a float, and NaN encodes as null. meshbpf rejects
either value as it rejects the original, with another message; the file
source, which reads files with its own decoder, checks its held forms read
back equal (held_text.as_held_exactly).

Encoded text is UTF-8 from orjson, ASCII with escapes from the standard
library: both compact, and the same object always takes the same path, so
equal objects still give equal text.
"""

from __future__ import annotations

import json
from typing import Any

try:
    import orjson
except ImportError:  # pip install . brings it; a source tree run without it still works
    orjson = None

_COMPACT = json.JSONEncoder(separators=(",", ":"))
# json.dumps() makes a new encoder per call: a third of the cost of the
# 200 000 small objects of a cold start. The C encoder is made once here,
# as JSONEncoder.iterencode makes it (the same text); without the C
# accelerator, JSONEncoder.encode. No cycle check (markers None): decoded
# JSON has no cycles, and a shared markers dict would be shared by threads.
_C_ENCODER = json.encoder.c_make_encoder
_encode = _C_ENCODER and _C_ENCODER(
    None, _COMPACT.default, json.encoder.encode_basestring_ascii, None, _COMPACT.key_separator,
    _COMPACT.item_separator, False, False, True)


def _stdlib_dumps(obj: Any) -> bytes:
    """obj as compact JSON by the standard library, UTF-8 encoded."""
    return ("".join(_encode(obj, 0)) if _encode else _COMPACT.encode(obj)).encode()


def loads(data: bytes | str) -> Any:
    """json.loads(data), faster where orjson is installed."""
    if orjson is not None:
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass    # NaN, Infinity, bad UTF-8: the standard library's answer, a value or its error
    return json.loads(data)


def dumps_compact(obj: Any) -> bytes:
    """obj as compact JSON, UTF-8 encoded."""
    if orjson is not None:
        try:
            return orjson.dumps(obj)
        except TypeError:
            pass    # an integer beyond 64 bits, a key that is not a string
    return _stdlib_dumps(obj)
