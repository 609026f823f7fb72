"""Loopback sockhash keys carry the netns cookie; views show the address."""

from __future__ import annotations

import sys

from meshbpf.datapath import redirect
from meshbpf.datapath.layout import SCOPE_NETNS, SockKeyC


def _loopback_key(cookie: int, local_port: int, remote_port: int) -> SockKeyC:
    key = SockKeyC(local_port=local_port, remote_port=remote_port, family=4, scope=SCOPE_NETNS)
    addr = cookie.to_bytes(8, sys.byteorder) + bytes(2) + b"\xff\xff" + bytes([127, 0, 0, 1])
    key.local_ip[:] = addr
    key.remote_ip[:] = addr
    return key


def _entry(key: SockKeyC) -> redirect.SockEntry:
    return redirect.SockEntry(key, "redirect", False, False, True)


def test_a_loopback_key_shows_its_address_and_namespace():
    entry = _entry(_loopback_key(4097, 47100, 7100))
    assert (entry.local, entry.remote) == ("127.0.0.1:47100", "127.0.0.1:7100")
    assert entry.netns_cookie == 4097


def test_loopback_pairs_of_two_namespaces_pair_within_their_namespace():
    entries = [_entry(_loopback_key(ns, a, b)) for ns in (11, 12) for a, b in ((47100, 7100), (7100, 47100))]
    pairs = redirect.pairs(entries)
    assert len(pairs) == 2
    for one, other in pairs:
        assert other is not None and one.netns_cookie == other.netns_cookie
