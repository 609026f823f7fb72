"""Field checking for the Kubernetes objects meshbpf reads.

Kubernetes objects as kubectl prints them carry many fields meshbpf does not
use; those are accepted. A field that is not part of the object's schema at
all is a typo, and is reported with the nearest known name, the way
`kubectl apply --validate=strict` does.
"""

from __future__ import annotations

import difflib
from typing import Any

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

# Exact type checks: bool is an int in Python, and a YAML true is not a port number.


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
    reporter, valid = _compiled(schema)
    if value is None or reporter is None or valid(value):
        return []
    out: list[tuple[str, str]] = []
    reporter(value, path, out)
    return out


# The schemas are compiled once: checking 20 000 objects is on the path of
# every config reload, and walking the schema description anew for each
# value cost more than parsing the YAML. Each schema gets two checkers: a
# predicate (`valid`), one generated function that only says whether a
# value has no violation (almost every object of a config has none), and
# the reporter, nested closures that name each violation and its path, run
# only when the predicate says no.
_CACHE: dict[int, Any] = {}

_EXACT_TYPE = {STR: str, INT: int, BOOL: bool}


def _cache_key(schema: Any) -> Any:
    # A list schema is often written in the call itself ([ANY],
    # [CONTAINER_PORT]): keyed by what it holds, or each call would compile
    # it anew and keep it in the cache for good.
    if isinstance(schema, list):
        return ("list", _cache_key(schema[0]))
    return id(schema)


def _compiled(schema: Any):
    key = _cache_key(schema)
    if key not in _CACHE:
        # keep schema alive: ids are reused
        _CACHE[key] = (_compile(schema), _compile_valid(schema), schema)
    return _CACHE[key][:2]


def _compile(schema: Any):
    if schema == ANY:
        return None
    if isinstance(schema, dict):
        return _compile_object(schema)
    if isinstance(schema, list):
        return _compile_list(schema[0])
    if schema == STR_MAP:
        def check_str_map(value, path, out):
            if type(value) is not dict:
                shown = "" if isinstance(value, (list, tuple)) else f" {value!r}"  # `labels: app=web`
                out.append((path, f"expected a map of strings, got {_kind_name(value)}{shown}"))
                return
            for k, v in value.items():
                if type(k) is not str:  # YAML reads `1:` or `yes:` as a number or boolean
                    out.append((_join(path, str(k)), _str_problem(k, "a string key")))
                elif type(v) is not str:
                    out.append((_join(path, k), _str_problem(v, "a string")))
        return check_str_map
    wanted = _EXACT_TYPE[schema]

    def check_scalar(value, path, out):
        if type(value) is not wanted:
            out.extend(_scalar_problem(value, schema, path))
    return check_scalar


def _compile_object(schema: dict):
    allowed = frozenset(schema)
    names = list(schema)
    scalars = {k: _EXACT_TYPE[v] for k, v in schema.items() if isinstance(v, str) and v in _EXACT_TYPE}
    nested = {k: _compile(v) for k, v in schema.items()
              if k not in scalars and v != ANY}

    def check_object(value, path, out):
        if type(value) is not dict:
            out.append((path, f"expected a map, got {_kind_name(value)}"))
            return
        if not value.keys() <= allowed:
            for name in sorted(value.keys() - allowed, key=str):
                hint = difflib.get_close_matches(str(name), names, n=1)
                why = f"unknown field {name!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                out.append((_join(path, str(name)), why))
        for name, sub in value.items():
            if sub is None:
                continue
            wanted = scalars.get(name)
            if wanted is not None:
                if type(sub) is not wanted:
                    out.extend(_scalar_problem(sub, schema[name], _join(path, name)))
                continue
            fn = nested.get(name)
            if fn is not None:
                fn(sub, _join(path, name), out)
    return check_object


def _compile_list(item_schema: Any):
    item = _compile(item_schema)

    def check_list(value, path, out):
        if type(value) is not list:
            out.append((path, f"expected a list, got {_kind_name(value)}"))
            return
        for i, element in enumerate(value):
            if element is None:
                out.append((f"{path}[{i}]", "empty list item"))
            elif item is not None:
                item(element, f"{path}[{i}]", out)
    return check_list


def _compile_valid(schema: Any):
    """The predicate: true exactly when the reporter would find nothing.

    Generated as one function with the schema's nesting unrolled (a call per
    nested node made it no faster than the reporter). Each test mirrors one
    report of the reporter: not a map / unknown field / not a list / an
    empty list item / a wrong scalar type; None (unset) fields pass."""
    lines: list[str] = []
    names: dict[str, Any] = {}

    def const(value: Any) -> str:
        name = f"_c{len(names)}"
        names[name] = value
        return name

    def emit(var: str, node: Any, depth: int) -> None:
        pad = "    " * depth
        if isinstance(node, dict):
            lines.append(f"{pad}if type({var}) is not dict or not {var}.keys() <= {const(frozenset(node))}:")
            lines.append(f"{pad}    return False")
            for i, (field, sub) in enumerate(node.items()):
                if sub == ANY:
                    continue
                item = f"{var}_{i}"
                lines.append(f"{pad}{item} = {var}.get({field!r})")
                lines.append(f"{pad}if {item} is not None:")
                emit(item, sub, depth + 1)
        elif isinstance(node, list):
            item = f"{var}_i"
            lines.append(f"{pad}if type({var}) is not list:")
            lines.append(f"{pad}    return False")
            lines.append(f"{pad}for {item} in {var}:")
            lines.append(f"{pad}    if {item} is None:")
            lines.append(f"{pad}        return False")
            if node[0] != ANY:
                emit(item, node[0], depth + 1)
        elif node == STR_MAP:
            lines.append(f"{pad}if type({var}) is not dict or not all(type(k) is str and type(s) is str "
                         f"for k, s in {var}.items()):")
            lines.append(f"{pad}    return False")
        else:
            lines.append(f"{pad}if type({var}) is not {const(_EXACT_TYPE[node])}:")
            lines.append(f"{pad}    return False")

    if schema == ANY:
        return None
    emit("v", schema, 1)
    namespace = dict(names)
    exec("def valid(v):\n" + "\n".join(lines) + "\n    return True\n", namespace)
    return namespace["valid"]


def _scalar_problem(value: Any, schema: str, path: str) -> list[tuple[str, str]]:
    article = "an" if schema == INT else "a"
    return [(path, f"expected {article} {schema}, got {_kind_name(value)} {value!r}")]


def _str_problem(value: Any, wanted: str) -> str:
    """A map of strings' key or value that is not one, shown with its value:
    `version: 1` reads as a number, and "got an integer" alone sends the
    reader looking for which."""
    if value is None:  # `version:` with nothing after it
        return f"expected {wanted}, got nothing (write '' for an empty one)"
    if isinstance(value, (int, float)):  # a YAML number or boolean: quoted, it is a string
        return f"expected {wanted}, got {_kind_name(value)} {value!r} (quote it)"
    return f"expected {wanted}, got {_kind_name(value)} {value!r}"


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name
