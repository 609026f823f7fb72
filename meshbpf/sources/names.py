"""Kubernetes' rules for object names and namespaces, by kind, for every
reader (kube_objects, kube_policy, routes, agent_config): a name the API
server would refuse is a problem at the field holding it."""

from __future__ import annotations

import functools
import re

# Kubernetes' rules for names (apimachinery's validation.go, by kind as the
# API server applies them). The server refuses anything else, so such a name
# comes from a file or a server that skipped validation; let through, it
# would reach log lines, notes and metric labels as it is.
_LABEL = "[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS1035 = ("DNS-1035 label", 63, re.compile("[a-z]([-a-z0-9]*[a-z0-9])?"),
            "lowercase letters, digits and '-', starting with a letter and ending with a letter or digit")
_DNS1123_LABEL = ("DNS-1123 label", 63, re.compile(_LABEL),
                  "lowercase letters, digits and '-', starting and ending with a letter or digit")
_DNS1123_SUBDOMAIN = ("DNS-1123 subdomain", 253, re.compile(rf"{_LABEL}(\.{_LABEL})*"),
                      "labels of lowercase letters, digits and '-' joined by '.', each starting "
                      "and ending with a letter or digit")
# Custom resources (the Gateway API's, and AgentConfig as it would be one)
# are held to a DNS-1123 subdomain: apiextensions' validator for any CRD.
_NAME_RULES = {"Service": _DNS1035, "Namespace": _DNS1123_LABEL, "EndpointSlice": _DNS1123_SUBDOMAIN,
               "Pod": _DNS1123_SUBDOMAIN, "NetworkPolicy": _DNS1123_SUBDOMAIN,
               "TCPRoute": _DNS1123_SUBDOMAIN, "UDPRoute": _DNS1123_SUBDOMAIN,
               "ReferenceGrant": _DNS1123_SUBDOMAIN, "AgentConfig": _DNS1123_SUBDOMAIN}


def name_problem(kind: str, name: str) -> str | None:
    """Why Kubernetes would refuse `name` for an object of `kind` (None: it
    would not, or meshbpf knows no rule for the kind)."""
    rule = _NAME_RULES.get(kind)
    return _rule_problem(f"{kind} names", rule, name) if rule else None


@functools.lru_cache(maxsize=4096)  # a cluster has few namespaces
def namespace_problem(namespace: str) -> str | None:
    """Why Kubernetes would refuse `namespace` (None: it would not)."""
    return _rule_problem("namespaces", _DNS1123_LABEL, namespace)


def _rule_problem(what: str, rule: tuple, value: str) -> str | None:
    rule_name, limit, pattern, spelled = rule
    if len(value) > limit:  # checked first: the value is not quoted, however long
        return f"{len(value)} characters; Kubernetes requires of {what} a {rule_name} of at most {limit}"
    if pattern.fullmatch(value) is None:  # fullmatch: "$" would let a final line break through
        return f"{value!r} is not a {rule_name} ({spelled}), which Kubernetes requires of {what}"
    return None


# Labels (apimachinery's IsQualifiedName and IsValidLabelValue): the API
# server refuses others, so a selector could never match them in a cluster;
# read from a file they would match nothing, or the wrong thing, silently.
_LABEL_NAME = ("label name", 63, re.compile("([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"),
               "letters, digits, '-', '_' and '.', starting and ending with a letter or digit")
_LABEL_VALUE = ("label value", *_LABEL_NAME[1:])


@functools.lru_cache(maxsize=4096)  # a cluster uses few distinct label keys
def label_key_problem(key: str) -> str | None:
    """Why Kubernetes would refuse `key` as a label key: [prefix/]name."""
    return _qualified_name_problem("label key", key)


def _qualified_name_problem(what: str, key: str) -> str | None:
    """apimachinery's IsQualifiedName: [prefix/]name, the prefix a DNS-1123
    subdomain, the name a label name."""
    prefix, slash, name = key.partition("/")
    if not slash:
        return _rule_problem(f"{what}s", _LABEL_NAME, key)
    if "/" in name:
        return f"{key!r} has more than one '/'; {what}s are [prefix/]name"
    why = _rule_problem(f"{what} prefixes", _DNS1123_SUBDOMAIN, prefix)
    return why or _rule_problem(f"{what}s (after the prefix)", _LABEL_NAME, name)


@functools.lru_cache(maxsize=4096)
def label_value_problem(value: str) -> str | None:
    """Why Kubernetes would refuse `value` as a label value ("" is allowed)."""
    return _rule_problem("label values", _LABEL_VALUE, value) if value else None


# Annotations (apimachinery's ValidateAnnotations): each key a qualified
# name once lowercased, and keys plus values at most 256 KiB in all. Never
# read by meshbpf but for a few it names; the API server refuses others,
# so a file holding one is not what a cluster could hold.
ANNOTATIONS_MAX_BYTES = 256 * 1024


@functools.lru_cache(maxsize=4096)  # a cluster uses few distinct annotation keys
def annotation_key_problem(key: str) -> str | None:
    """Why Kubernetes would refuse `key` as an annotation key: a label
    key's rule, case aside."""
    if _qualified_name_problem("annotation key", key.lower()) is None:  # as the API server checks it
        return None
    return _qualified_name_problem("annotation key", key)  # names the key as it is written


def annotation_problems(annotations: dict, path: str) -> list[tuple[str, str]]:
    """(path, reason) for each key of `annotations` Kubernetes would refuse,
    and for the map when it is too big; wrong types are left to the schema
    check, which names them."""
    out = []
    size = 0
    for key, value in annotations.items():
        if type(key) is not str or type(value) is not str:
            continue
        size += len(key.encode()) + len(value.encode())  # Go's len(): bytes
        why = annotation_key_problem(key)
        if why:
            out.append((f"{path}.{key}", why))
    if size > ANNOTATIONS_MAX_BYTES:
        out.append((path, f"{size} bytes of keys and values; Kubernetes allows at most "
                          f"{ANNOTATIONS_MAX_BYTES} (256 KiB) in all"))
    return out


def label_problems(labels: dict, path: str) -> list[tuple[str, str]]:
    """(path, reason) for each key and value of `labels` that Kubernetes
    would refuse; wrong types are left to the schema check, which names them."""
    out = []
    for key, value in labels.items():
        if type(key) is not str or type(value) is not str:
            continue
        why = label_key_problem(key) or label_value_problem(value)
        if why:
            out.append((f"{path}.{key}", why))
    return out
