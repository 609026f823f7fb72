"""wanted_service's shortcuts against the definitions they stand for.

wanted_service takes the ready endpoints without building usable_endpoints'
objects, and addr16 packs from the address's integer: both must give
exactly what usable_endpoints() and ip.packed give (random states from
test_reconcile_property, every mix of conditions).
"""

from __future__ import annotations

import ipaddress
import random

import pytest

from meshbpf.model import usable_endpoints
from meshbpf.reconcile import (SLOT_READY, SLOT_TERMINATING, BackendVal, IPPROTO, addr16,
                               wanted_service)
from test_reconcile_property import random_desired


def reference_backends(sp):
    """The backends by the definition: usable_endpoints, de-duplicated."""
    proto = IPPROTO[sp.frontend.protocol]
    out, seen = [], set()
    for u in usable_endpoints(sp.endpoints):
        be = BackendVal(reference_addr16(u.endpoint.address), u.endpoint.port, proto)
        if be not in seen:
            seen.add(be)
            out.append((be, SLOT_TERMINATING if u.terminating_fallback else SLOT_READY))
    return tuple(out)


def reference_addr16(ip) -> bytes:
    return b"\0" * 10 + b"\xff\xff" + ip.packed if ip.version == 4 else ip.packed


@pytest.mark.parametrize("seed", range(40))
def test_backends_are_usable_endpoints_in_order(seed):
    state = random_desired(random.Random(seed))
    for sp in state.service_ports.values():
        assert wanted_service(sp)[1].backends == reference_backends(sp)


@pytest.mark.parametrize("text", ["0.0.0.0", "10.0.0.1", "255.255.255.255", "::", "::1",
                                  "fd00:96::2", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
                                  "2001:db8::ffff:0:1"])
def test_addr16_is_the_mapped_packed_address(text):
    ip = ipaddress.ip_address(text)
    assert addr16(ip) == reference_addr16(ip)
    assert len(addr16(ip)) == 16
