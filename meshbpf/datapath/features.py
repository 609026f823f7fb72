"""What the running kernel supports, probed the way bpftool does.

libbpf's probes load a tiny program or map of each kind and see whether the
verifier takes it; they cost a few milliseconds and need no compiler. The
loader turns the answers into -D flags, and a feature the kernel lacks
either gets a fallback or is turned off with a clear message; loading never
fails on it.
"""

from __future__ import annotations

import ctypes as ct
import os
from dataclasses import dataclass
from pathlib import Path

from . import btf, uapi
from .libbpf import _lib

# The tracepoint every recvmsg() passes once the protocol's recvmsg returns
# (6.3+): redirection counts empty reads there (bpf/recv_trace.c).
RECV_TRACEPOINT = "sock_recv_length"

_lib.libbpf_probe_bpf_prog_type.argtypes = [ct.c_int, ct.c_void_p]
_lib.libbpf_probe_bpf_map_type.argtypes = [ct.c_int, ct.c_void_p]
_lib.libbpf_probe_bpf_helper.argtypes = [ct.c_int, ct.c_int, ct.c_void_p]


class _ProgLoadOpts(ct.Structure):
    """The head of struct bpf_prog_load_opts: libbpf reads the rest as zero."""
    _fields_ = [("sz", ct.c_size_t), ("attempts", ct.c_int), ("expected_attach_type", ct.c_uint32)]


_lib.bpf_prog_load.argtypes = [ct.c_int, ct.c_char_p, ct.c_char_p, ct.c_void_p, ct.c_size_t,
                               ct.POINTER(_ProgLoadOpts)]
_RETURN_1 = bytes([0xb7, 0, 0, 0, 1, 0, 0, 0,     # r0 = 1
                   0x95, 0, 0, 0, 0, 0, 0, 0])    # exit


def _attach_type(prog: str, attach_type: int) -> bool:
    """Does the kernel load a program of this type for this attach point?
    (libbpf's type probe sets none; a kernel that predates the attach
    point refuses it.)"""
    opts = _ProgLoadOpts(sz=ct.sizeof(_ProgLoadOpts), expected_attach_type=attach_type)
    fd = _lib.bpf_prog_load(uapi.PROG_TYPE[prog], None, b"GPL", _RETURN_1, 2, ct.byref(opts))
    if fd < 0:
        return False
    os.close(fd)
    return True


# r1 = 0; *(u64 *)(r10 - 8) = r1; r0 = 0; r1 = 1;
# r0 = cmpxchg((u64 *)(r10 - 8), r0, r1); r0 = 1; exit
_CMPXCHG = bytes([0xb7, 1, 0, 0, 0, 0, 0, 0,
                  0x7b, 0x1a, 0xf8, 0xff, 0, 0, 0, 0,
                  0xb7, 0, 0, 0, 0, 0, 0, 0,
                  0xb7, 1, 0, 0, 1, 0, 0, 0,
                  0xdb, 0x1a, 0xf8, 0xff, 0xf1, 0, 0, 0,   # BPF_STX | BPF_ATOMIC | BPF_DW, BPF_CMPXCHG
                  0xb7, 0, 0, 0, 1, 0, 0, 0,
                  0x95, 0, 0, 0, 0, 0, 0, 0])


def _cmpxchg() -> bool:
    """Does the verifier take BPF_CMPXCHG (5.12+)? The connection slots
    claim theirs with it."""
    opts = _ProgLoadOpts(sz=ct.sizeof(_ProgLoadOpts), expected_attach_type=uapi.ATTACH["connect4"])
    fd = _lib.bpf_prog_load(uapi.PROG_TYPE["cgroup_sock_addr"], None, b"GPL", _CMPXCHG, len(_CMPXCHG) // 8,
                            ct.byref(opts))
    if fd < 0:
        return False
    os.close(fd)
    return True


def _prog(name: str) -> bool:
    return _lib.libbpf_probe_bpf_prog_type(uapi.PROG_TYPE[name], None) == 1


def _map(name: str) -> bool:
    return _lib.libbpf_probe_bpf_map_type(uapi.MAP_TYPE[name], None) == 1


def _helper(prog: str, helper: str) -> bool:
    return _lib.libbpf_probe_bpf_helper(uapi.PROG_TYPE[prog], uapi.HELPER[helper], None) == 1


@dataclass(frozen=True)
class Feature:
    name: str
    available: bool
    needed_for: str
    without: str     # what meshbpf does when the kernel lacks it


def _redir_netns_cookie() -> bool:
    """bpf_get_netns_cookie in every program that builds a sockhash key."""
    progs = ["sock_ops", "sk_msg"] + (["cgroup_sockopt"] if _prog("cgroup_sockopt") else [])
    return all(_helper(p, "get_netns_cookie") for p in progs)


def probe() -> list[Feature]:
    """The feature table `meshbpf status` prints and the loader uses."""
    sock_addr = _prog("cgroup_sock_addr")
    try:
        btf.member_offset("sk_psock", "ingress_msg")
        has_btf = True
    except btf.BTFError:
        has_btf = False
    sockops = _prog("sock_ops") and _helper("sock_ops", "sock_hash_update")
    sk_storage = _map("sk_storage") and sock_addr and _helper("cgroup_sock_addr", "sk_storage_get")
    conn_rnat = (sock_addr and _attach_type("cgroup_sock", uapi.ATTACH["sock_release"])
                 and _helper("cgroup_sock", "get_socket_cookie"))
    return [
        Feature("cgroup_sock_addr", sock_addr and _helper("cgroup_sock_addr", "get_socket_cookie"),
                "socket-level load balancing", "meshbpf cannot run: no socket-LB"),
        Feature("set_retval", sock_addr and _helper("cgroup_sock_addr", "set_retval"),
                "ECONNREFUSED for services without endpoints (5.18+)",
                "connect() and UDP sends to such services fail with EPERM instead"),
        Feature("sk_storage", sk_storage,
                "reverse NAT kept per socket (getpeername, connected UDP)",
                "kept in the LRU map instead: heavy connection churn can evict live entries"),
        Feature("conn_rnat", conn_rnat,
                "reverse NAT per connection in a table (cheaper connect)",
                "kept in socket storage: about 0.5 µs more per connect() and close"),
        Feature("conn_slots", conn_rnat and sk_storage and _cmpxchg(),
                "the connection table direct-mapped, claimed by compare-and-swap (5.12+)",
                "a hash table: about 0.3 µs more per connect() and close"),
        Feature("netns_cookie", sock_addr and _helper("cgroup_sock_addr", "get_netns_cookie"),
                "sessionAffinity: ClientIP", "session affinity is not applied"),
        Feature("sockmap", _map("sockhash") and _prog("sk_msg") and sockops
                and _helper("sk_msg", "msg_redirect_hash"),
                "same-node socket redirection", "socket redirection is off"),
        # sk_msg reads kernel structs too (is either end a blocking socket?)
        Feature("sockops_probe_read", sockops and _helper("sock_ops", "probe_read_kernel")
                and _helper("sk_msg", "probe_read_kernel"),
                "redirection: evicting sockets safely", "socket redirection is off"),
        Feature("kernel_btf", has_btf and Path(btf.VMLINUX).exists(),
                "redirection: kernel struct offsets", "socket redirection is off"),
        Feature("redir_netns_cookie", sockops and _redir_netns_cookie(),
                "redirection: loopback connections, keyed per pod (5.15+)",
                "loopback connections are not spliced (two pods' would share keys)"),
        Feature("recv_tracepoint", _prog("raw_tracepoint") and _has_tracepoint(RECV_TRACEPOINT),
                "redirection: seeing readers that spin on recv() or block in it (6.3+)",
                "pairs whose reader spins on non-blocking recv() stay spliced, slower than TCP; "
                "a blocking socket accepted from a non-blocking listener that only reads can see EAGAIN"),
        Feature("cgroup_sockopt", _prog("cgroup_sockopt"),
                "redirection: seeing TCP_NODELAY set after connect",
                "TCP_NODELAY set after connect is not seen; such sockets may switch to TCP"),
        Feature("capture", _capture(sock_addr), "sidecar capture without iptables (5.7+)",
                "sidecar capture is off"),
        Feature("capture_getsockname", sock_addr
                and _attach_type("cgroup_sock_addr", uapi.ATTACH["getsockname4"])
                and _attach_type("cgroup_sock_addr", uapi.ATTACH["getsockname6"]),
                "sidecar capture: getsockname() names the original destination (5.8+)",
                "capture works; a proxy that reads getsockname() (HAProxy for IPv6) sees its own port"),
    ]


def _has_tracepoint(name: str) -> bool:
    """The kernel has this tracepoint (BTF names each as btf_trace_<name>)."""
    try:
        return btf.has_typedef(f"btf_trace_{name}")
    except btf.BTFError:
        return False


def _capture(sock_addr: bool) -> bool:
    """connect() and an unconnected UDP send (DNS) find the caller's pod and
    uid (helpers of the program type: the sendmsg hooks have them wherever
    connect has); sockops files the socket by cookie; getsockopt answers
    SO_ORIGINAL_DST."""
    return (sock_addr and _helper("cgroup_sock_addr", "get_current_ancestor_cgroup_id")
            and _helper("cgroup_sock_addr", "get_current_uid_gid")
            and _prog("sock_ops") and _helper("sock_ops", "get_socket_cookie")
            and _prog("cgroup_sockopt"))


def as_dict(features: list[Feature]) -> dict[str, bool]:
    """name -> available. MESHBPF_DISABLE_FEATURES=a,b makes meshbpf act as
    if the kernel lacked them: how the fallbacks are tested on a new kernel."""
    disabled = {n.strip() for n in os.environ.get("MESHBPF_DISABLE_FEATURES", "").split(",") if n.strip()}
    return {f.name: f.available and f.name not in disabled for f in features}


CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_BPF = 12, 21, 39


def missing_capabilities(status: str = "/proc/self/status") -> list[str]:
    """The capabilities bpf() and cgroup attach need that this process lacks.
    libbpf's probes read a refusal (EPERM) as "unsupported", so without them
    every feature looks missing; this tells the two apart."""
    try:
        eff = next(int(line.split()[1], 16) for line in open(status) if line.startswith("CapEff:"))
    except (OSError, StopIteration, ValueError):
        return []
    has = lambda cap: bool(eff >> cap & 1)  # noqa: E731
    missing = [] if has(CAP_BPF) or has(CAP_SYS_ADMIN) else ["CAP_BPF"]
    return missing + ([] if has(CAP_NET_ADMIN) else ["CAP_NET_ADMIN"])


def redirect_possible(f: dict[str, bool]) -> bool:
    return f["sockmap"] and f["sockops_probe_read"] and f["kernel_btf"]
