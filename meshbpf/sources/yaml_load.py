"""YAML (and JSON) text -> Python objects, read the way Kubernetes reads them.

kubectl and the API server read YAML with go-yaml v2 (through
sigs.k8s.io/yaml), which is YAML 1.1: `yes`/`no`/`on`/`off`/`y`/`n` are
booleans, `0777` is octal, `<<` merge keys work, and a timestamp stays a
string. This module gives the same reading on top of libyaml (PyYAML's C
parser), with our own resolver and constructor:

- why libyaml: it is the YAML library of most Linux distributions, it has a
  nesting limit (1000 levels) so no input can overflow a stack, and every
  problem comes back as a Python exception, never an abort;
- why our own constructor: PyYAML's Python constructor is most of the cost
  (about 8x libyaml's own parsing on a 10 000-Service file); ours converts
  the composed nodes in one pass, checks duplicate keys, and refuses
  recursive or exponential aliases ("billion laughs"), as go-yaml does;
- a file that is one JSON object (`kubectl get -o json`) takes the json
  module's fast path; if it is not valid JSON it is read as YAML, which
  gives the located error;
- the YAML kubectl writes takes yaml_fast's line reader, about 4x faster
  than libyaml here; it gives libyaml's answer or hands the text to
  libyaml (load_all_libyaml).

Every failure raises LoadError(message, line) with a 1-based line, or line
None when no line applies.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import yaml
from yaml.nodes import MappingNode, ScalarNode, SequenceNode

from yaml._yaml import CParser  # libyaml: PyYAML's wheels and Debian's python3-yaml have it

from . import yaml_fast
from .yaml_scalars import _MAP, _MERGE, _SEQ, _STR, LoadError, _Resolver, scalar_value

MAX_DEPTH = 200        # Kubernetes objects nest a few dozen levels at most
MIN_ALIAS_BUDGET = 100_000  # expanded nodes beyond the text's own: more is a "billion laughs"


class _Loader(CParser, _Resolver):
    def __init__(self, stream: str):
        CParser.__init__(self, stream)
        _Resolver.__init__(self)
        self.resolve = _cached_resolve  # libyaml asks for every scalar, keys included


class _Dumper(yaml.CSafeDumper):
    """Writes YAML that this module reads back as written: a string our
    resolver would take for something else (`y`, `on`, `0755`) is quoted,
    as kubectl quotes it. PyYAML's own dumpers know only YAML 1.1's shorter
    list and leave `y` and `n` bare, which Kubernetes reads as booleans."""

    yaml_implicit_resolvers = _Resolver.yaml_implicit_resolvers


def dump_all(documents: list[Any]) -> str:
    """Documents as multi-document YAML that load_all() reads back unchanged."""
    return yaml.dump_all(documents, Dumper=_Dumper, sort_keys=False)


# Resolving a tag runs regular expressions in Python for every scalar, and a
# kubectl dump repeats the same keys and values thousands of times: a C-level
# cache in front of it takes about a third off parsing a 10 000-Service file.
_cached_resolve = functools.lru_cache(maxsize=1 << 14)(_Resolver().resolve)


def _scalar(node: ScalarNode) -> Any:
    return scalar_value(node.tag, node.value, node.start_mark.line + 1)


class _Builder:
    """Composed nodes -> dicts, lists and scalars, in one pass."""

    def __init__(self, node_budget: int):
        self.done: dict[int, Any] = {}       # id(node) -> value, for aliases
        self.sizes: dict[int, int] = {}      # id(node) -> expanded node count
        self.open: set[int] = set()          # nodes being built: an alias to one is a loop
        self.budget = node_budget            # expanded nodes left before "excessive aliasing"

    def build(self, node: Any, depth: int = 0) -> Any:
        key = id(node)
        if key in self.done:  # an alias: the same object again
            self._spend(self.sizes[key], node)
            return self.done[key]
        if key in self.open:
            raise LoadError("an alias refers to a node that contains it (recursive alias)",
                            node.start_mark.line + 1)
        if depth > MAX_DEPTH:
            raise LoadError(f"nested deeper than {MAX_DEPTH} levels", node.start_mark.line + 1)
        before = self.budget
        self._spend(1, node)
        if type(node) is ScalarNode:
            value = _scalar(node)
        else:
            self.open.add(key)
            if type(node) is SequenceNode:
                if node.tag != _SEQ:
                    raise LoadError(f"unsupported tag {node.tag!r}", node.start_mark.line + 1)
                value = [self.build(item, depth + 1) for item in node.value]
            else:
                value = self._mapping(node, depth)
            self.open.discard(key)
        self.done[key] = value
        self.sizes[key] = before - self.budget
        return value

    def _spend(self, count: int, node: Any) -> None:
        self.budget -= count
        if self.budget < 0:
            raise LoadError("excessive aliasing: aliases expand the document far beyond its size",
                            node.start_mark.line + 1)

    def _mapping(self, node: MappingNode, depth: int) -> dict:
        if node.tag != _MAP:
            raise LoadError(f"unsupported tag {node.tag!r}", node.start_mark.line + 1)
        out: dict = {}
        merged: list[dict] = []
        for key_node, value_node in node.value:
            if type(key_node) is not ScalarNode:
                raise LoadError("a map key must be a plain value, not a map or a list",
                                key_node.start_mark.line + 1)
            if key_node.tag == _MERGE:
                merged.extend(self._merge_sources(value_node, depth))
                continue
            key = _scalar(key_node)
            if key in out:
                raise LoadError(f"duplicate key {key!r}", key_node.start_mark.line + 1)
            out[key] = self.build(value_node, depth + 1)
        # Merge keys (YAML 1.1): explicit keys win, then earlier merged maps.
        for source in merged:
            for k, v in source.items():
                out.setdefault(k, v)
        return out

    def _merge_sources(self, node: Any, depth: int) -> list[dict]:
        value = self.build(node, depth + 1)
        sources = value if type(node) is SequenceNode else [value]
        if not all(isinstance(s, dict) for s in sources):
            raise LoadError("a merge key (<<) needs a map or a list of maps", node.start_mark.line + 1)
        return sources


def _build_plain(node: Any, depth: int) -> Any:
    """_Builder.build for a document without anchors: no alias bookkeeping."""
    kind = type(node)
    if kind is ScalarNode:
        return node.value if node.tag == _STR else _scalar(node)
    if depth > MAX_DEPTH:
        raise LoadError(f"nested deeper than {MAX_DEPTH} levels", node.start_mark.line + 1)
    if node.tag != (_SEQ if kind is SequenceNode else _MAP):
        raise LoadError(f"unsupported tag {node.tag!r}", node.start_mark.line + 1)
    if kind is SequenceNode:
        return [_build_plain(item, depth + 1) for item in node.value]
    out: dict = {}
    for key_node, value_node in node.value:
        if type(key_node) is not ScalarNode or key_node.tag == _MERGE:
            return _Builder(MIN_ALIAS_BUDGET).build(node, depth)  # rare: let the full builder say
        key = key_node.value if key_node.tag == _STR else _scalar(key_node)
        if key in out:
            raise LoadError(f"duplicate key {key!r}", key_node.start_mark.line + 1)
        out[key] = _build_plain(value_node, depth + 1)
    return out


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise ValueError(f"duplicate key {k!r}")
            seen.add(k)
    return out


def starts_as_json(text: str) -> bool:
    """Whether text opens with a JSON object (`{` after any whitespace),
    which the readers take the json module's path for; without copying a
    big file's text as text.lstrip() would."""
    i = 0
    while i < len(text) and text[i].isspace():
        i += 1
    return text.startswith("{", i)


def _load_json(text: str) -> list[Any] | None:
    """One JSON object, or None when text is not JSON (then YAML decides)."""
    if not starts_as_json(text):
        return None
    try:
        docs = [json.loads(text, object_pairs_hook=_no_duplicates)]
    except (ValueError, RecursionError):
        return None
    if ("\\ud" in text or "\\uD" in text) and not _utf8_clean(docs):
        return None  # a lone surrogate escape: the YAML path refuses it, with its place
    return docs


def _utf8_clean(docs: list[Any]) -> bool:
    """True if every string can be written as UTF-8 (metric labels, logs)."""
    try:
        json.dumps(docs, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def load_all(text: str) -> list[Any]:
    """The documents of text, in order. Raises LoadError."""
    fast = _load_json(text)
    if fast is not None:
        return fast
    try:
        return yaml_fast.load_all(text)
    except yaml_fast.NotInSubset:
        return load_all_libyaml(text)


def load_all_libyaml(text: str) -> list[Any]:
    """load_all without the fast paths: libyaml reads any YAML."""
    loader = _Loader(text)
    try:
        nodes = []
        while loader.check_node():
            nodes.append(loader.get_node())
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        reason = " ".join(filter(None, (exc.context, exc.problem))) or "not valid YAML"
        raise LoadError(reason, mark.line + 1 if mark else None) from None
    except yaml.YAMLError as exc:  # reader errors: control characters and the like
        raise LoadError(str(exc).splitlines()[0] if str(exc) else "not valid YAML") from None
    finally:
        dispose = getattr(loader, "dispose", None)
        if dispose:
            dispose()
    try:
        if "&" not in text:  # no anchors, so no aliases: the fast path
            return [_build_plain(node, 0) for node in nodes]
        builder = _Builder(MIN_ALIAS_BUDGET + len(text))  # a node takes at least one character
        return [builder.build(node) for node in nodes]
    except RecursionError:
        raise LoadError(f"nested deeper than {MAX_DEPTH} levels") from None


def load_one(text: str) -> Any:
    """A text that must hold at most one document (a ConfigMap value)."""
    docs = load_all(text)
    if len(docs) > 1:
        raise LoadError(f"expected one document, found {len(docs)}")
    return docs[0] if docs else None


