"""The form the sources hold every Service and EndpointSlice in: compact
JSON text, deflated against a dictionary of typical such text.

A source keeps each object of the cluster to rebuild its Service when an
event touches it, which is rare per object; as text that was ~1.3 KB a
Service with its slice, the biggest part of the agent at 100 000 Services.
Objects of one kind repeat the same keys and most values, so deflate with
a preset dictionary of one typical Service and one EndpointSlice brings
them to a tenth of that: ~3 µs to pack, ~1 µs to unpack (what a watch
event or a rebuild adds), against ~3 µs to decode the JSON itself.

Packing is deterministic (one dictionary, one level): equal objects give
equal bytes, so held forms still compare as the objects do.
"""

from __future__ import annotations

import zlib
from typing import Any

from .json_codec import dumps_compact, loads

# A Service and an EndpointSlice as the source keeps them (pruned, compact,
# keys in the API server's order), with placeholder values: what later
# objects copy their common text from. Changing it changes every packed
# form, which is fine: nothing packed outlives the process.
_TYPICAL = (
    '{"metadata":{"labels":{"app":"name","app.kubernetes.io/name":"name"},"name":"name",'
    '"namespace":"default","resourceVersion":"1000"},"spec":{"clusterIP":"10.96.0.1",'
    '"clusterIPs":["10.96.0.1"],"internalTrafficPolicy":"Cluster","ipFamilies":["IPv4"],'
    '"ipFamilyPolicy":"SingleStack","ports":[{"name":"http","port":80,"protocol":"TCP",'
    '"targetPort":8080}],"sessionAffinity":"None","type":"ClusterIP"},'
    '"status":{"loadBalancer":{}},"kind":"Service","apiVersion":"v1"}'
    '{"addressType":"IPv4","endpoints":[{"addresses":["10.244.0.1"],"conditions":{"ready":true,'
    '"serving":true,"terminating":false},"nodeName":"node","zone":"zone"},'
    '{"addresses":["10.244.0.2"],"conditions":{"ready":true,"serving":true,"terminating":false},'
    '"nodeName":"node"}],"metadata":{"annotations":{"endpoints.kubernetes.io/'
    'last-change-trigger-time":"2024-01-01T00:00:00Z"},"labels":{"endpointslice.kubernetes.io/'
    'managed-by":"endpointslice-controller.k8s.io","kubernetes.io/service-name":"name"},'
    '"name":"name-abcde","namespace":"default","resourceVersion":"1000"},"ports":[{"name":"http",'
    '"port":8080,"protocol":"TCP"}],"kind":"EndpointSlice","apiVersion":"discovery.k8s.io/v1"}'
).encode()

# Raw deflate (no header: a few bytes an object), a 2 KB window (the
# dictionary fits) and little hashing memory: a copy of the primed
# compressor per object is then cheap (a fresh one with a dictionary is ~80 µs).
_WBITS, _MEM_LEVEL, _LEVEL = -11, 2, 1
_PRIMED = zlib.compressobj(_LEVEL, zlib.DEFLATED, _WBITS, _MEM_LEVEL, zlib.Z_DEFAULT_STRATEGY, _TYPICAL)


def as_text(obj: dict) -> str:
    """The object as compact JSON text (what is packed)."""
    return dumps_compact(obj).decode()


def as_held(obj: dict) -> bytes:
    """What a source holds of a Service or EndpointSlice: its compact text, packed."""
    return _pack_bytes(dumps_compact(obj))


def as_held_exactly(obj: dict) -> Any:
    """as_held(), for an object JSON may not carry as it is (a YAML file's:
    dates, keys that are not strings, which JSON would turn into strings
    and so hide a problem the reader would name): held as the dict itself
    then. Costs a read back."""
    try:
        held = as_held(obj)
    except (TypeError, ValueError):
        return obj
    return held if loaded(held) == obj else obj


def pack(text: str) -> bytes:
    """Compact JSON text as held."""
    return _pack_bytes(text.encode())


def _pack_bytes(data: bytes) -> bytes:
    c = _PRIMED.copy()  # the copy is made under the compressor's own lock: safe across watch threads
    return c.compress(data) + c.flush()


def unpack(held: bytes) -> str:
    return _unpack_bytes(held).decode()


def _unpack_bytes(held: bytes) -> bytes:
    d = zlib.decompressobj(_WBITS, _TYPICAL)
    return d.decompress(held) + d.flush()


def loaded(held: Any) -> Any:
    """An object as held (packed bytes, plain text or a dict) as a dict."""
    if isinstance(held, bytes):
        return loads(_unpack_bytes(held))
    return loads(held) if isinstance(held, str) else held
