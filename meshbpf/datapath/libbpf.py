"""The few bpf() operations bcc 0.26 does not wrap, through Debian's libbpf1.

libbpf1 is always present where bcc is (libbpfcc and iproute2 depend on it),
and its symbols used here are part of its stable ABI since 0.0.x. This is
also what the CLI uses to read pinned maps without compiling anything.
"""

from __future__ import annotations

import ctypes as ct
import ctypes.util
import os
from dataclasses import dataclass

from . import uapi

_lib = ct.CDLL(ctypes.util.find_library("bpf") or "libbpf.so.1", use_errno=True)

BPF_MAP_TYPE_RINGBUF = uapi.MAP_TYPE["ringbuf"]


class BPFError(OSError):
    pass


class LayoutError(ValueError):
    """A pinned map whose key or value size is not this build's (pinned by
    an older or newer meshbpf): reading it through our structs would have
    the kernel write past them."""


def _check(res: int, what: str) -> int:
    if res < 0:
        err = ct.get_errno() or -res
        raise BPFError(err, f"{what}: {os.strerror(err)}")
    return res


class _ProgInfo(ct.Structure):
    _fields_ = [
        ("type", ct.c_uint32), ("id", ct.c_uint32), ("tag", ct.c_uint8 * 8),
        ("jited_prog_len", ct.c_uint32), ("xlated_prog_len", ct.c_uint32),
        ("jited_prog_insns", ct.c_uint64), ("xlated_prog_insns", ct.c_uint64),
        ("load_time", ct.c_uint64), ("created_by_uid", ct.c_uint32),
        ("nr_map_ids", ct.c_uint32), ("map_ids", ct.c_uint64),
        ("name", ct.c_char * 16),
    ]


class _LinkInfo(ct.Structure):
    # struct bpf_link_info with the cgroup member of its union (at offset 16,
    # the union being 8-byte aligned); the tail pads for larger members.
    _fields_ = [
        ("type", ct.c_uint32), ("id", ct.c_uint32), ("prog_id", ct.c_uint32),
        ("_pad", ct.c_uint32), ("cgroup_id", ct.c_uint64), ("attach_type", ct.c_uint32),
        ("_tail", ct.c_uint8 * 36),
    ]


class _MapInfo(ct.Structure):
    _fields_ = [
        ("type", ct.c_uint32), ("id", ct.c_uint32), ("key_size", ct.c_uint32),
        ("value_size", ct.c_uint32), ("max_entries", ct.c_uint32),
        ("map_flags", ct.c_uint32), ("name", ct.c_char * 16),
    ]


_lib.bpf_obj_get.argtypes = [ct.c_char_p]
_lib.bpf_obj_pin.argtypes = [ct.c_int, ct.c_char_p]
_lib.bpf_link_create.argtypes = [ct.c_int, ct.c_int, ct.c_int, ct.c_void_p]
_lib.bpf_link_update.argtypes = [ct.c_int, ct.c_int, ct.c_void_p]
_lib.bpf_link_detach.argtypes = [ct.c_int]
_lib.bpf_raw_tracepoint_open.argtypes = [ct.c_char_p, ct.c_int]
_lib.bpf_prog_query.argtypes = [ct.c_int, ct.c_int, ct.c_uint32, ct.POINTER(ct.c_uint32),
                                ct.POINTER(ct.c_uint32), ct.POINTER(ct.c_uint32)]
_lib.bpf_prog_get_fd_by_id.argtypes = [ct.c_uint32]
_lib.bpf_obj_get_info_by_fd.argtypes = [ct.c_int, ct.c_void_p, ct.POINTER(ct.c_uint32)]
_lib.bpf_map_lookup_elem.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p]
_lib.bpf_map_get_next_key.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p]


# fd -> (pinned path, map id) of what obj_get opened, so a layout error can
# name the path; the id tells a reused fd number from the one we opened.
_pins: dict[int, tuple[str, int]] = {}


def obj_get(path: str) -> int:
    fd = _check(_lib.bpf_obj_get(path.encode()), f"open pinned {path}")
    try:
        _pins[fd] = (path, map_info(fd).id)
    except OSError:  # a pinned program or link: no map info, nothing to check
        _pins.pop(fd, None)
    return fd


def obj_pin(fd: int, path: str) -> None:
    _check(_lib.bpf_obj_pin(fd, path.encode()), f"pin {path}")


def link_create(prog_fd: int, target_fd: int, attach_type: int) -> int:
    """A BPF link attaching prog to target (a cgroup fd). It stays attached
    while the link is pinned or an fd to it is open, and coexists with other
    programs on the same hook (like BPF_F_ALLOW_MULTI)."""
    return _check(_lib.bpf_link_create(prog_fd, target_fd, attach_type, None),
                  f"attach program (attach type {attach_type})")


def link_update(link_fd: int, new_prog_fd: int) -> None:
    """Swap the program behind a link atomically: no moment without one."""
    _check(_lib.bpf_link_update(link_fd, new_prog_fd, None), "replace program in link")


def raw_tracepoint_open(name: str, prog_fd: int) -> int:
    """A BPF link attaching a raw tracepoint program to the tracepoint `name`
    (attached while pinned or open; the kernel cannot detach it otherwise)."""
    return _check(_lib.bpf_raw_tracepoint_open(name.encode(), prog_fd),
                  f"attach to tracepoint {name}")


def link_detach(link_fd: int) -> None:
    """Detach now, even if another process still holds the link."""
    _check(_lib.bpf_link_detach(link_fd), "detach link")


def prog_query(target_fd: int, attach_type: int) -> list[int]:
    """IDs of the programs attached to a cgroup for one attach type."""
    count = ct.c_uint32(64)
    ids = (ct.c_uint32 * 64)()
    flags = ct.c_uint32(0)
    _check(_lib.bpf_prog_query(target_fd, attach_type, 0, ct.byref(flags), ids, ct.byref(count)),
           f"query attach type {attach_type}")
    return list(ids[: count.value])


def prog_fd_by_id(prog_id: int) -> int:
    return _check(_lib.bpf_prog_get_fd_by_id(prog_id), f"open program id {prog_id}")


@dataclass(frozen=True)
class ProgInfo:
    id: int
    type: int
    name: str
    tag: str


@dataclass(frozen=True)
class LinkInfo:
    id: int
    prog_id: int
    cgroup_id: int   # 0 unless type is LINK_TYPE_CGROUP
    attach_type: int
    type: int = 0    # BPF_LINK_TYPE_*


LINK_TYPE_RAW_TRACEPOINT, LINK_TYPE_CGROUP = uapi.LINK_TYPE["raw_tracepoint"], uapi.LINK_TYPE["cgroup"]


@dataclass(frozen=True)
class MapInfo:
    id: int
    type: int
    key_size: int
    value_size: int
    max_entries: int
    name: str
    map_flags: int = 0


def prog_info(fd: int) -> ProgInfo:
    info = _ProgInfo()
    size = ct.c_uint32(ct.sizeof(info))
    _check(_lib.bpf_obj_get_info_by_fd(fd, ct.byref(info), ct.byref(size)), "program info")
    return ProgInfo(info.id, info.type, info.name.decode(), bytes(info.tag).hex())


def prog_map_ids(prog_id: int) -> list[int]:
    """IDs of the maps a loaded program uses ([] if it is gone)."""
    try:
        fd = prog_fd_by_id(prog_id)
    except BPFError:
        return []
    try:
        ids = (ct.c_uint32 * 64)()
        info = _ProgInfo(nr_map_ids=64, map_ids=ct.addressof(ids))
        size = ct.c_uint32(ct.sizeof(info))
        _check(_lib.bpf_obj_get_info_by_fd(fd, ct.byref(info), ct.byref(size)), "program info")
        return list(ids[: min(info.nr_map_ids, 64)])
    finally:
        os.close(fd)


def link_info(fd: int) -> LinkInfo:
    info = _LinkInfo()
    size = ct.c_uint32(ct.sizeof(info))
    _check(_lib.bpf_obj_get_info_by_fd(fd, ct.byref(info), ct.byref(size)), "link info")
    cgroup = info.type == LINK_TYPE_CGROUP
    return LinkInfo(info.id, info.prog_id, info.cgroup_id if cgroup else 0,
                    info.attach_type if cgroup else 0, info.type)


def map_info(fd: int) -> MapInfo:
    info = _MapInfo()
    size = ct.c_uint32(ct.sizeof(info))
    _check(_lib.bpf_obj_get_info_by_fd(fd, ct.byref(info), ct.byref(size)), "map info")
    return MapInfo(info.id, info.type, info.key_size, info.value_size, info.max_entries,
                   info.name.decode(), info.map_flags)


PERCPU_MAP_TYPES = {uapi.MAP_TYPE[t] for t in ("percpu_hash", "percpu_array", "lru_percpu_hash",
                                                 "percpu_cgroup_storage")}


def check_layout(fd: int, key_size: int, value_size: int | None = None) -> MapInfo:
    """Raises LayoutError unless the map's key (and value, if given) sizes
    are ours: one line naming the map, its pinned path, expected and found."""
    info = map_info(fd)
    if info.type == BPF_MAP_TYPE_RINGBUF:
        return info  # records, not entries: no key or value to read through a struct
    values = {info.value_size}
    if info.type in PERCPU_MAP_TYPES:  # a spec's one value, or a lookup's one per CPU
        values.add((info.value_size + 7) // 8 * 8 * possible_cpus())
    for what, want, have in (("key", key_size, {info.key_size}), ("value", value_size, values)):
        if want is not None and want not in have:
            path, map_id = _pins.get(fd, ("", 0))
            where = f"pinned at {path}" if path and map_id == info.id else f"map id {info.id}"
            raise LayoutError(f"map {info.name or '?'} ({where}) has {what} size {min(have)}, this "
                              f"build expects {want}: pinned by another meshbpf version "
                              "(`meshbpf uninstall` removes it)")
    return info


def open_pinned(path: str, key_type: type, value_type: type | None = None) -> int:
    """obj_get of a pinned map, refused with LayoutError if its sizes are not ours."""
    fd = obj_get(path)
    try:
        check_layout(fd, ct.sizeof(key_type), None if value_type is None else ct.sizeof(value_type))
    except BaseException:
        os.close(fd)
        raise
    return fd


def map_items(fd: int, key_type: type, value_type: type):
    """Every (key, value) of a map, read with get_next_key + lookup."""
    check_layout(fd, ct.sizeof(key_type), ct.sizeof(value_type))
    key, next_key, value = key_type(), key_type(), value_type()
    res = _lib.bpf_map_get_next_key(fd, None, ct.byref(next_key))
    while res == 0:
        ct.memmove(ct.byref(key), ct.byref(next_key), ct.sizeof(key))
        if _lib.bpf_map_lookup_elem(fd, ct.byref(key), ct.byref(value)) == 0:
            copy_v = value_type()
            ct.memmove(ct.byref(copy_v), ct.byref(value), ct.sizeof(value))
            copy_k = key_type()
            ct.memmove(ct.byref(copy_k), ct.byref(key), ct.sizeof(key))
            yield copy_k, copy_v
        res = _lib.bpf_map_get_next_key(fd, ct.byref(key), ct.byref(next_key))


def map_count(fd: int, key_size: int) -> int:
    """Number of entries, by walking the keys (no value copies)."""
    check_layout(fd, key_size)
    key = ct.create_string_buffer(key_size)
    next_key = ct.create_string_buffer(key_size)
    count = 0
    res = _lib.bpf_map_get_next_key(fd, None, next_key)
    while res == 0:
        count += 1
        ct.memmove(key, next_key, key_size)
        res = _lib.bpf_map_get_next_key(fd, key, next_key)
    return count


_lib.bpf_map_update_elem.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_uint64]
_lib.bpf_map_delete_elem.argtypes = [ct.c_int, ct.c_void_p]


def map_update(fd: int, key, value, flags: int = 0) -> None:
    _check(_lib.bpf_map_update_elem(fd, ct.byref(key), ct.byref(value), flags), "map update")


def map_delete(fd: int, key) -> None:
    _check(_lib.bpf_map_delete_elem(fd, ct.byref(key)), "map delete")


def map_lookup(fd: int, key, value) -> None:
    _check(_lib.bpf_map_lookup_elem(fd, ct.byref(key), ct.byref(value)), "map lookup")


_lib.bpf_map_update_batch.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p, ct.POINTER(ct.c_uint32),
                                      ct.c_void_p]


def map_update_batch(fd: int, keys, values, count: int) -> None:
    """count entries in one BPF_MAP_UPDATE_BATCH (5.6+): keys and values
    are ctypes arrays."""
    n = ct.c_uint32(count)
    _check(_lib.bpf_map_update_batch(fd, ct.byref(keys), ct.byref(values), ct.byref(n), None),
           "map batch update")


_lib.bpf_map_lookup_batch.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_void_p, ct.c_void_p,
                                      ct.POINTER(ct.c_uint32), ct.c_void_p]
_ENOENT = 2


def array_values(fd: int, value_type: type, chunk: int = 8192):
    """Every value of an array map, in index order, read CHUNK at a time
    with BPF_MAP_LOOKUP_BATCH (5.6+): a 131 072-entry array in a few
    milliseconds, where one lookup per index takes a quarter second."""
    info = check_layout(fd, ct.sizeof(ct.c_uint32), ct.sizeof(value_type))
    keys, values = (ct.c_uint32 * chunk)(), (value_type * chunk)()
    token, next_token, first = ct.c_uint32(), ct.c_uint32(), True
    read = 0
    while read < info.max_entries:
        n = ct.c_uint32(chunk)
        res = _lib.bpf_map_lookup_batch(fd, None if first else ct.byref(token), ct.byref(next_token),
                                        keys, values, ct.byref(n), None)
        if res < 0 and res != -_ENOENT:
            _check(res, "map batch lookup")
        yield from values[:n.value]
        read += n.value
        if res < 0 or n.value == 0:
            return
        token, first = ct.c_uint32(next_token.value), False


def map_keys(fd: int, key_type: type):
    """Every key of a map (works for sockhash, whose values are sockets)."""
    check_layout(fd, ct.sizeof(key_type))
    key, next_key = key_type(), key_type()
    res = _lib.bpf_map_get_next_key(fd, None, ct.byref(next_key))
    while res == 0:
        ct.memmove(ct.byref(key), ct.byref(next_key), ct.sizeof(key))
        copy = key_type()
        ct.memmove(ct.byref(copy), ct.byref(key), ct.sizeof(key))
        yield copy
        res = _lib.bpf_map_get_next_key(fd, ct.byref(key), ct.byref(next_key))


def possible_cpus() -> int:
    """Per-CPU map values have one slot per possible CPU."""
    text = open("/sys/devices/system/cpu/possible").read().strip()
    count = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        count += int(hi or lo) - int(lo) + 1
    return count


class _TestRunOpts(ct.Structure):
    # struct bpf_test_run_opts (libbpf 1.1); sz says how much of it we fill.
    _fields_ = [
        ("sz", ct.c_size_t), ("data_in", ct.c_void_p), ("data_out", ct.c_void_p),
        ("data_size_in", ct.c_uint32), ("data_size_out", ct.c_uint32),
        ("ctx_in", ct.c_void_p), ("ctx_out", ct.c_void_p),
        ("ctx_size_in", ct.c_uint32), ("ctx_size_out", ct.c_uint32),
        ("retval", ct.c_uint32), ("repeat", ct.c_int), ("duration", ct.c_uint32),
        ("flags", ct.c_uint32), ("cpu", ct.c_uint32), ("batch_size", ct.c_uint32),
    ]


_lib.bpf_prog_test_run_opts.argtypes = [ct.c_int, ct.POINTER(_TestRunOpts)]

# struct __sk_buff up to data_meta (144 bytes); only ifindex (offset 40) is
# filled: BPF_PROG_TEST_RUN then runs the skb as if on that device (5.10+).
SKB_CTX_SIZE = 144
SKB_IFINDEX_OFFSET = 40


def prog_test_run_skb(prog_fd: int, packet: bytes, ifindex: int = 0) -> int:
    """Runs a tc program once on packet (Ethernet frame) with BPF_PROG_TEST_RUN;
    returns its return value as a signed int (TC_ACT_UNSPEC is -1)."""
    return prog_test_run_skb_out(prog_fd, packet, ifindex)[0]


def prog_test_run_skb_out(prog_fd: int, packet: bytes, ifindex: int = 0) -> tuple[int, bytes]:
    """prog_test_run_skb, also returning the packet as the program left it."""
    data_in = ct.create_string_buffer(packet, len(packet))
    data_out = ct.create_string_buffer(len(packet) + 256)
    ctx = ct.create_string_buffer(SKB_CTX_SIZE)
    ct.memmove(ct.addressof(ctx) + SKB_IFINDEX_OFFSET, ct.byref(ct.c_uint32(ifindex)), 4)
    opts = _TestRunOpts(sz=ct.sizeof(_TestRunOpts), data_in=ct.addressof(data_in),
                        data_out=ct.addressof(data_out), data_size_in=len(packet),
                        data_size_out=len(data_out), ctx_in=ct.addressof(ctx),
                        ctx_size_in=SKB_CTX_SIZE, repeat=1)
    _check(_lib.bpf_prog_test_run_opts(prog_fd, ct.byref(opts)), "BPF_PROG_TEST_RUN")
    return ct.c_int32(opts.retval).value, data_out.raw[:opts.data_size_out]


def prog_test_run_xdp_out(prog_fd: int, packet: bytes) -> tuple[int, bytes]:
    """Runs an XDP program once on packet (Ethernet frame), as if received
    on loopback; its verdict (XDP_PASS is 2) and the packet it left."""
    data_in = ct.create_string_buffer(packet, len(packet))
    data_out = ct.create_string_buffer(len(packet) + 256)
    opts = _TestRunOpts(sz=ct.sizeof(_TestRunOpts), data_in=ct.addressof(data_in),
                        data_out=ct.addressof(data_out), data_size_in=len(packet),
                        data_size_out=len(data_out), repeat=1)
    _check(_lib.bpf_prog_test_run_opts(prog_fd, ct.byref(opts)), "BPF_PROG_TEST_RUN")
    return ct.c_int32(opts.retval).value, data_out.raw[:opts.data_size_out]


_lib.libbpf_probe_bpf_map_type.argtypes = [ct.c_int, ct.c_void_p]
RINGBUF_CALLBACK = ct.CFUNCTYPE(ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_size_t)
_lib.ring_buffer__new.argtypes = [ct.c_int, RINGBUF_CALLBACK, ct.c_void_p, ct.c_void_p]
_lib.ring_buffer__new.restype = ct.c_void_p
_lib.ring_buffer__poll.argtypes = [ct.c_void_p, ct.c_int]
_lib.ring_buffer__free.argtypes = [ct.c_void_p]


def ringbuf_supported() -> bool:
    """Does this kernel have BPF ring buffers (5.8+)?"""
    return _lib.libbpf_probe_bpf_map_type(BPF_MAP_TYPE_RINGBUF, None) == 1


class RingBuffer:
    """A reader of a BPF ring buffer map: poll() hands each record's bytes to
    on_record."""

    def __init__(self, map_fd: int, on_record):
        def callback(_ctx, data, size):
            on_record(ct.string_at(data, size))
            return 0
        self._callback = RINGBUF_CALLBACK(callback)  # kept alive as long as the reader
        ptr = _lib.ring_buffer__new(map_fd, self._callback, None, None)
        if not ptr:
            err = ct.get_errno()
            raise BPFError(err, f"open ring buffer: {os.strerror(err)}")
        self._rb = ptr

    def poll(self, timeout_ms: int) -> int:
        """Records consumed (waits up to timeout_ms for the first)."""
        return _check(_lib.ring_buffer__poll(self._rb, timeout_ms), "poll ring buffer")

    def close(self) -> None:
        if self._rb:
            _lib.ring_buffer__free(self._rb)
            self._rb = None
