"""YAML 1.1 plain scalars as go-yaml v2 (and so Kubernetes) reads them: the
resolver and the conversions that both YAML readers share (yaml_load's
libyaml path and yaml_fast's subset reader), so each reads a scalar the
same way and neither imports the other for it."""

from __future__ import annotations

import re
from typing import Any

import yaml


class LoadError(Exception):
    def __init__(self, message: str, line: int | None = None):
        super().__init__(message)
        self.message = message
        self.line = line


# --- YAML 1.1 scalars, as go-yaml v2 resolves them ------------------------------

_STR = "tag:yaml.org,2002:str"
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_BOOL = "tag:yaml.org,2002:bool"
_NULL = "tag:yaml.org,2002:null"
_MERGE = "tag:yaml.org,2002:merge"
_TIMESTAMP = "tag:yaml.org,2002:timestamp"
_MAP = "tag:yaml.org,2002:map"
_SEQ = "tag:yaml.org,2002:seq"

_TRUE = frozenset("y Y yes Yes YES true True TRUE on On ON".split())
_FALSE = frozenset("n N no No NO false False FALSE off Off OFF".split())
_NULLS = frozenset(("", "~", "null", "Null", "NULL"))
_INT_RE = re.compile(r"[-+]?(?:0b[01_]+|0x[0-9a-fA-F_]+|0o?[0-7_]*|[1-9][0-9_]*)")
_FLOAT_RE = re.compile(r"[-+]?(?:\.[0-9_]+|[0-9][0-9_]*(?:\.[0-9_]*)?)(?:[eE][-+]?[0-9]+)?"
                       r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)")


class _Resolver(yaml.resolver.BaseResolver):
    """Plain scalars -> tags by go-yaml v2's rules; no timestamps (they stay
    strings, as kubectl keeps them), no sexagesimal numbers."""

    yaml_implicit_resolvers: dict = {}


def _add(tag: str, regexp: "re.Pattern[str]", first: str) -> None:
    _Resolver.add_implicit_resolver(tag, regexp, list(first))


_add(_BOOL, re.compile("^(?:" + "|".join(sorted(_TRUE | _FALSE)) + ")$"), "yYnNtTfFoO")
_Resolver.add_implicit_resolver(_NULL, re.compile(r"^(?:~|null|Null|NULL|)$"), ["~", "n", "N", ""])
_add(_INT, re.compile(r"^(?:" + _INT_RE.pattern + r")$"), "-+0123456789")
_add(_FLOAT, re.compile(r"^(?:" + _FLOAT_RE.pattern + r")$"), "-+.0123456789")
_add(_MERGE, re.compile(r"^<<$"), "<")


def _int(text: str) -> int:
    digits = text.replace("_", "")
    sign = -1 if digits[:1] == "-" else 1
    digits = digits.lstrip("+-")
    if digits.startswith("0b"):
        return sign * int(digits[2:], 2)
    if digits.startswith("0x"):
        return sign * int(digits[2:], 16)
    if digits.startswith("0o"):
        return sign * int(digits[2:], 8)
    if len(digits) > 1 and digits[0] == "0":
        return sign * int(digits, 8)
    return sign * int(digits)


def _float(text: str) -> float:
    lowered = text.replace("_", "").lower()
    if lowered.endswith(".inf"):
        return float("-inf") if lowered[0] == "-" else float("inf")
    if lowered == ".nan":
        return float("nan")
    return float(lowered)


def scalar_value(tag: str, value: str, line: int | None) -> Any:
    """The Python value of a scalar with this tag; line is for the error."""
    if tag == _STR or tag == _TIMESTAMP:
        return value
    if tag == _INT:
        if _INT_RE.fullmatch(value):
            try:
                return _int(value)
            except ValueError:  # Python's limit on digits (4300), a guard against slow int()
                raise LoadError(f"integer {value[:20]}... has too many digits", line) from None
    elif tag == _FLOAT:
        if _FLOAT_RE.fullmatch(value) or _INT_RE.fullmatch(value):
            return _float(value)
    elif tag == _BOOL:
        if value in _TRUE:
            return True
        if value in _FALSE:
            return False
    elif tag == _NULL:
        if value in _NULLS:
            return None
    else:
        raise LoadError(f"unsupported tag {tag!r}", line)
    raise LoadError(f"{value!r} is not a valid {tag.rsplit(':', 1)[-1]}", line)
