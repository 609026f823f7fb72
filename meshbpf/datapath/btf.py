"""Field offsets of kernel structs, read from the running kernel's BTF.

bcc compiles against Debian's 6.1 headers whatever the running kernel is,
so a program that must look inside a kernel struct (not a uapi context)
cannot trust those headers' layout. The running kernel describes its own
structs in /sys/kernel/btf/vmlinux; this reads just enough of that format to
find a member's byte offset, and the loader passes it in as a -D constant.
"""

from __future__ import annotations

import struct
from functools import lru_cache
from pathlib import Path

VMLINUX = Path("/sys/kernel/btf/vmlinux")

BTF_MAGIC = 0xEB9F
KIND_STRUCT, KIND_UNION, KIND_TYPEDEF = 4, 5, 8
# Bytes that follow each btf_type header, by kind (per vlen where noted).
_FIXED_EXTRA = {1: 4, 3: 12, 14: 4, 17: 4}
_PER_VLEN = {4: 12, 5: 12, 6: 8, 13: 8, 15: 12, 19: 12}


class BTFError(Exception):
    pass


def _structs(path: Path = VMLINUX) -> dict[str, dict[str, int]]:
    """struct/union name -> {member name -> byte offset} (first definition wins)."""
    return _parse(path)[0]


def has_typedef(name: str, path: Path = VMLINUX) -> bool:
    """Is there a typedef of this name? (btf_trace_<event> names a tracepoint
    the kernel has.)"""
    return name in _parse(path)[1]


@lru_cache(maxsize=4)
def _parse(path: Path) -> tuple[dict[str, dict[str, int]], frozenset[str]]:
    """The structs and unions (as _structs), and the typedef names."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BTFError(f"cannot read {path}: {exc} (the kernel needs CONFIG_DEBUG_INFO_BTF)") from None
    magic, _ver, _flags, hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from("<HBBIIIII", data)
    if magic != BTF_MAGIC:
        raise BTFError(f"{path} is not BTF")
    types = data[hdr_len + type_off: hdr_len + type_off + type_len]
    strings = data[hdr_len + str_off: hdr_len + str_off + str_len]

    def name(off: int) -> str:
        return strings[off: strings.index(b"\0", off)].decode()

    out: dict[str, dict[str, int]] = {}
    typedefs = set()
    pos = 0
    while pos < len(types):
        name_off, info, _size = struct.unpack_from("<III", types, pos)
        pos += 12
        kind, vlen, kflag = (info >> 24) & 0x1F, info & 0xFFFF, info >> 31
        if kind in (KIND_STRUCT, KIND_UNION):
            members = {}
            for i in range(vlen):
                m_name, _m_type, m_off = struct.unpack_from("<III", types, pos + 12 * i)
                bits = m_off & 0xFFFFFF if kflag else m_off
                if m_name:
                    members[name(m_name)] = bits // 8
            if name_off:
                out.setdefault(name(name_off), members)
        elif kind == KIND_TYPEDEF and name_off:
            typedefs.add(name(name_off))
        pos += _FIXED_EXTRA.get(kind, 0) + _PER_VLEN.get(kind, 0) * vlen
    return out, frozenset(typedefs)


def member_offset(struct_name: str, member: str, path: Path = VMLINUX) -> int:
    structs = _structs(path)
    if struct_name not in structs:
        raise BTFError(f"struct {struct_name} is not in the kernel's BTF")
    if member not in structs[struct_name]:
        raise BTFError(f"struct {struct_name} has no member {member} in this kernel")
    return structs[struct_name][member]
