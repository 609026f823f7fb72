"""Field checking for the Kubernetes objects meshbpf reads.

Kubernetes objects as kubectl prints them carry many fields meshbpf does not
use; those are accepted. A field that is not part of the object's schema at
all is a typo, and is reported with the nearest known name, the way
`kubectl apply --validate=strict` does.
"""

from __future__ import annotations

import difflib
from typing import Any, Callable

# A schema node is one of:
#   ANY                      anything (status, managedFields, targetRef ...)
#   STR, INT, BOOL           a scalar of that type (None allowed: "unset")
#   STR_MAP                  a map of strings to strings (labels, selector)
#   {"field": node, ...}     an object with exactly these optional fields
#   [node]                   a list whose items match node
ANY = "any"
STR = "string"
INT = "integer"
BOOL = "boolean"
STR_MAP = "map of strings"

OBJECT_META = {
    "name": STR, "namespace": STR, "generateName": STR, "uid": STR,
    "resourceVersion": STR, "generation": INT, "creationTimestamp": ANY,
    "deletionTimestamp": ANY, "deletionGracePeriodSeconds": INT,
    "labels": STR_MAP, "annotations": STR_MAP, "ownerReferences": ANY,
    "finalizers": [STR], "managedFields": ANY, "selfLink": STR,
}

SERVICE_PORT = {
    "name": STR, "protocol": STR, "appProtocol": STR, "port": INT,
    "targetPort": ANY,  # integer or string; checked where it is used
    "nodePort": INT,
}

SERVICE = {
    "apiVersion": STR, "kind": STR, "metadata": OBJECT_META, "status": ANY,
    "spec": {
        "ports": [SERVICE_PORT], "selector": STR_MAP, "clusterIP": STR,
        "clusterIPs": [STR], "type": STR, "externalIPs": [STR],
        "sessionAffinity": STR, "loadBalancerIP": STR,
        "loadBalancerSourceRanges": [STR], "externalName": STR,
        "externalTrafficPolicy": STR, "healthCheckNodePort": INT,
        "publishNotReadyAddresses": BOOL,
        "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": INT}},
        "ipFamilies": [STR], "ipFamilyPolicy": STR,
        "allocateLoadBalancerNodePorts": BOOL, "loadBalancerClass": STR,
        "internalTrafficPolicy": STR, "trafficDistribution": STR,
    },
}

ENDPOINT = {
    "addresses": [STR],
    "conditions": {"ready": BOOL, "serving": BOOL, "terminating": BOOL},
    "hostname": STR, "targetRef": ANY, "nodeName": STR, "zone": STR,
    "hints": {"forZones": [{"name": STR}], "forNodes": [{"name": STR}]},
    "deprecatedTopology": STR_MAP,
}

ENDPOINT_SLICE = {
    "apiVersion": STR, "kind": STR, "metadata": OBJECT_META,
    "addressType": STR, "endpoints": [ENDPOINT],
    "ports": [{"name": STR, "protocol": STR, "port": INT, "appProtocol": STR}],
}

LIST = {"apiVersion": STR, "kind": STR, "metadata": ANY, "items": [ANY]}

_SCALARS: dict[str, Callable[[Any], bool]] = {
    STR: lambda v: isinstance(v, str),
    # bool is an int in Python; a YAML true is not a port number.
    INT: lambda v: isinstance(v, int) and not isinstance(v, bool),
    BOOL: lambda v: isinstance(v, bool),
}


def _kind_name(value: Any) -> str:
    if isinstance(value, dict):
        return "a map"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, str):
        return "a string"
    return type(value).__name__


def check(value: Any, schema: Any, path: str = "") -> list[tuple[str, str]]:
    """Returns (field path, reason) for every violation below value."""
    if value is None or schema == ANY:
        return []
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            return [(path, f"expected a map, got {_kind_name(value)}")]
        out: list[tuple[str, str]] = []
        unknown = value.keys() - schema.keys()
        for name in sorted(unknown, key=str):
            hint = difflib.get_close_matches(str(name), list(schema), n=1)
            why = f"unknown field {name!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
            out.append((_join(path, str(name)), why))
        for name, sub in value.items():
            sub_schema = schema.get(name, ANY)
            if sub is None or sub_schema == ANY:
                continue
            scalar = _SCALARS.get(sub_schema) if isinstance(sub_schema, str) else None
            if scalar is not None:
                # Inline the common case: a scalar field needs no recursion.
                if not scalar(sub):
                    out.extend(_scalar_problem(sub, sub_schema, _join(path, name)))
            else:
                out.extend(check(sub, sub_schema, _join(path, name)))
        return out
    if isinstance(schema, list):
        if not isinstance(value, list):
            return [(path, f"expected a list, got {_kind_name(value)}")]
        out = []
        for i, item in enumerate(value):
            if item is None:
                out.append((f"{path}[{i}]", "empty list item"))
            else:
                out.extend(check(item, schema[0], f"{path}[{i}]"))
        return out
    if schema == STR_MAP:
        if not isinstance(value, dict):
            return [(path, f"expected a map of strings, got {_kind_name(value)}")]
        return [(_join(path, str(k)), f"expected a string, got {_kind_name(v)}")
                for k, v in value.items() if not isinstance(v, str)]
    if not _SCALARS[schema](value):
        return _scalar_problem(value, schema, path)
    return []


def _scalar_problem(value: Any, schema: str, path: str) -> list[tuple[str, str]]:
    article = "an" if schema == INT else "a"
    return [(path, f"expected {article} {schema}, got {_kind_name(value)} {value!r}")]


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name
