"""LBMaps.apply packs each step's entries with struct; the bytes must be the
codec's (layout.CODECS filling the ctypes structs field by field), and any
disagreement falls back to the codec."""

from __future__ import annotations

import ctypes as ct
import logging
import random

import pytest

from meshbpf.datapath import maps
from meshbpf.datapath.layout import BY_ROLE, CODECS, SvcKeyC
from meshbpf.reconcile import BackendVal, SlotKey, SlotVal, SvcKey, SvcVal


def random_entries(role: str, part: str, rng: random.Random, n: int) -> list:
    addr = lambda: bytes(rng.randrange(256) for _ in range(16))  # noqa: E731
    u32 = lambda: rng.choice((0, 1, 0xFFFFFFFF, rng.randrange(1 << 32)))  # noqa: E731
    port = lambda: rng.choice((0, 1, 80, 0xFF00, 65535, rng.randrange(1 << 16)))  # noqa: E731
    make = {
        ("services", "key"): lambda: SvcKey(addr(), port(), rng.choice((6, 17))),
        ("services", "value"): lambda: SvcVal(u32(), u32(), u32(), u32()),
        ("slots", "key"): lambda: SlotKey(u32(), u32()),
        ("slots", "value"): lambda: SlotVal(u32(), rng.randrange(256)),
        ("backends", "key"): u32,
        ("backends", "value"): lambda: BackendVal(addr(), port(), rng.choice((6, 17))),
    }[(role, part)]
    return [make() for _ in range(n)]


def by_codec(ctype, into, entries) -> bytes:
    array = (ctype * len(entries))()
    for i, e in enumerate(entries):
        if issubclass(ctype, ct.Structure):
            into(array[i], e)
        else:
            array[i] = into(None, e)
    return bytes(array)


@pytest.mark.parametrize("role", sorted(BY_ROLE))
@pytest.mark.parametrize("part", ["key", "value"])
def test_packed_arrays_hold_the_codecs_bytes(role, part):
    spec = BY_ROLE[role]
    ctype = spec.key if part == "key" else spec.value
    into = CODECS[role][1 if part == "key" else 3]
    entries = random_entries(role, part, random.Random(f"{role}{part}"), 500)
    assert bytes(maps._array(ctype, into, (role, part), entries)) == by_codec(ctype, into, entries)
    if issubclass(ctype, ct.Structure):
        assert maps._packer(ctype, (role, part)) is not None  # the fast path was the one tested


def test_a_row_that_disagrees_with_the_codec_falls_back_to_it(monkeypatch, caplog):
    names, _ = maps._ROWS[("services", "key")]
    monkeypatch.setitem(maps._ROWS, ("services", "key"), (names, lambda k: (k.addr, k.port, k.proto, 0)))
    monkeypatch.setattr(maps, "_packers", {})
    entries = [SvcKey(b"\0" * 16, 80, 6), SvcKey(b"\1" * 16, 443, 17)]
    into = CODECS["services"][1]
    with caplog.at_level(logging.WARNING):
        got = bytes(maps._array(SvcKeyC, into, ("services", "key"), entries))
    assert got == by_codec(SvcKeyC, into, entries)
    assert "disagrees with the codec" in caplog.text


def test_only_plain_unsigned_structs_with_the_rows_fields_get_a_format():
    class Renamed(ct.Structure):
        _fields_ = [("address", ct.c_uint8 * 16), ("port", ct.c_uint16), ("proto", ct.c_uint8),
                    ("pad", ct.c_uint8)]

    class Signed(ct.Structure):
        _fields_ = [("svc_id", ct.c_int32), ("slot", ct.c_uint32)]

    class Padded(ct.Structure):
        _fields_ = [("backend_id", ct.c_uint32), ("state", ct.c_uint8), ("pad", ct.c_uint8 * 3),
                    ("more", ct.c_uint64)]
    assert maps._struct_format(Renamed, maps._ROWS[("services", "key")][0]) is None
    assert maps._struct_format(Signed, ("svc_id", "slot")) is None
    assert maps._struct_format(Padded, ("backend_id", "state", "pad")) is None
    assert maps._struct_format(SvcKeyC, maps._ROWS[("services", "key")][0]) == "=16sHBB"
