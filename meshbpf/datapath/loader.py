"""Compiling, attaching and pinning meshbpf's programs.

Everything meshbpf creates lives in one bpffs folder (default
/sys/fs/bpf/meshbpf): the maps, and under links/ one BPF link per hook and
cgroup. The pinned links are what keep the programs attached while no agent
runs; a new agent swaps the program behind each link atomically
(BPF_LINK_UPDATE), so an upgrade or restart never leaves a moment without
translation. The sk_msg program is attached to the pinned sockhash itself.
"""

from __future__ import annotations

import ctypes as ct
import errno
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from . import btf, cgroup, features as kernel_features, libbpf, uapi
from .bpffs import DatapathError, check_bpffs, is_bpffs, make_pin_folder  # noqa: F401 (DatapathError: re-exported)
from .layout import CAPTURE_MAPS, LB_MAPS, NO_PREALLOC, PINNED_MAPS, POLICY_MAPS, REDIR_MAPS, MapSpec
from .netns import netns_cookie
from .source import program_text

log = logging.getLogger(__name__)

DEFAULT_BPFFS = Path("/sys/fs/bpf/meshbpf")

# The cgroup hooks of socket-LB by name (uapi.ATTACH holds them all).
ATTACH = {name: uapi.ATTACH[name] for name in (
    "connect4", "connect6", "sendmsg4", "sendmsg6", "recvmsg4", "recvmsg6", "getpeername4", "getpeername6")}
ATTACH_SOCK_OPS = uapi.ATTACH["sock_ops"]
ATTACH_SK_MSG_VERDICT = uapi.ATTACH["sk_msg_verdict"]
ATTACH_SETSOCKOPT = uapi.ATTACH["setsockopt"]
ATTACH_GETSOCKOPT = uapi.ATTACH["getsockopt"]
ATTACH_GETSOCKNAME4, ATTACH_GETSOCKNAME6 = uapi.ATTACH["getsockname4"], uapi.ATTACH["getsockname6"]
ATTACH_SOCK_RELEASE = uapi.ATTACH["sock_release"]
PROG_TYPE_CGROUP_SOCK = uapi.PROG_TYPE["cgroup_sock"]
# Socket-LB maps compiled only where the kernel has their feature: map -> feature.
OPTIONAL_LB_MAPS = {"mbpf_sk_rnat": "sk_storage", "mbpf_conn_rnat": "conn_rnat", "mbpf_conn_slot": "conn_slots"}
# Empties the connection reverse-NAT table (mbpf_conn_rnat) as sockets go.
RELEASE_HOOK = "mbpf_sock_release"
PROG_TYPE_SOCK_OPS = uapi.PROG_TYPE["sock_ops"]
PROG_TYPE_SK_MSG = uapi.PROG_TYPE["sk_msg"]
PROG_TYPE_CGROUP_SOCKOPT = uapi.PROG_TYPE["cgroup_sockopt"]
PROG_TYPE_RAW_TRACEPOINT = uapi.PROG_TYPE["raw_tracepoint"]
# Pin of the recv tracepoint's link (bpf/recv_trace.c), beside the per-cgroup ones.
RECV_LINK = "mbpf_recv_len"


@dataclass(frozen=True)
class Hook:
    func: str        # entry point in bpf/*.c, also the link's pin name
    attach: str      # key of ATTACH


SOCK_LB_HOOKS = (
    Hook("mbpf_connect4", "connect4"), Hook("mbpf_connect6", "connect6"),
    Hook("mbpf_sendmsg4", "sendmsg4"), Hook("mbpf_sendmsg6", "sendmsg6"),
    Hook("mbpf_recvmsg4", "recvmsg4"), Hook("mbpf_recvmsg6", "recvmsg6"),
    Hook("mbpf_getpeer4", "getpeername4"), Hook("mbpf_getpeer6", "getpeername6"),
)

# Per-cgroup link pins of sidecar capture (<name>-<cgroup id>).
CAPTURE_LINKS = ("mbpf_cap_sockops-", "mbpf_getsockopt-", "mbpf_getsockname4-", "mbpf_getsockname6-")
# getsockname() names a captured connection's original destination (5.8+).
CAPTURE_SOCKNAME_HOOKS = (("mbpf_getsockname4", ATTACH_GETSOCKNAME4),
                          ("mbpf_getsockname6", ATTACH_GETSOCKNAME6))

# One file per hook family, compiled together.
LB_SOURCES = ["sock_lb.c"]


def kernel_offsets() -> dict[str, int]:
    """Offsets inside kernel structs that sockops and sk_msg read (psock_idle,
    sock_has_waiter, sock_reads_block, sock_netns)."""
    offsets = {
        "MBPF_OFF_SK_USER_DATA": btf.member_offset("sock", "sk_user_data"),
        "MBPF_OFF_PSOCK_INGRESS_MSG": btf.member_offset("sk_psock", "ingress_msg"),
        "MBPF_OFF_PSOCK_REFCNT": btf.member_offset("sk_psock", "refcnt"),
        # sk->sk_socket->file->f_flags: is the socket non-blocking (sock_reads_block)
        "MBPF_OFF_SK_SOCKET": btf.member_offset("sock", "sk_socket"),
        "MBPF_OFF_SOCKET_FILE": btf.member_offset("socket", "file"),
        "MBPF_OFF_FILE_FLAGS": btf.member_offset("file", "f_flags"),
        # sk->__sk_common.skc_net.net: a listener's namespace (mbpf_listeners);
        # net is possible_net_t's only member (CONFIG_NET_NS, which pods need)
        "MBPF_OFF_SK_NET": btf.member_offset("sock", "__sk_common") + btf.member_offset("sock_common", "skc_net"),
    }
    # &sk->sk_socket->wq.wait.head: does a reader sleep on the socket
    # (psock_idle). Optional: without it a sleeping reader keeps its socket
    # in the sockhash until it wakes, as before.
    try:
        offsets["MBPF_OFF_SOCKET_WAIT_HEAD"] = (btf.member_offset("socket", "wq")
                                                + btf.member_offset("socket_wq", "wait")
                                                + btf.member_offset("wait_queue_head", "head"))
    except btf.BTFError:
        pass
    return offsets


def lb_event_cflags(sizes: dict[str, int]) -> list[str]:
    """Socket-LB translations go to the monitor's ring buffer (kernel 5.8+),
    the one the policy programs use: same pins, same size."""
    if not libbpf.ringbuf_supported():
        return []
    events = next(s for s in POLICY_MAPS if s.name == "mbpf_events")
    return ["-DMBPF_LB_EVENTS", "-DMBPF_HAVE_RINGBUF",
            f"-D{events.size_macro}={sizes.get(events.name, events.default_size)}"]


@dataclass
class SockLB:
    """meshbpf's programs and pinned maps for one bpffs folder.

    (Named for its first job; it also carries same-node redirection.)"""

    bpffs: Path = DEFAULT_BPFFS
    sizes: dict[str, int] = field(default_factory=dict)      # map name -> max_entries
    features: dict[str, bool] | None = None                  # None: probe the kernel
    redirect: bool = True                                    # compile redirection if the kernel can
    capture: bool = True                                     # compile sidecar capture if the kernel can
    spin: bool = False                                       # compiled: readers spinning on recv() are seen
    node_netns: str | None = None                            # the node's netns (None: this process's)
    bpf: object = None

    def compile(self) -> None:
        """Compile the programs, creating or reopening the pinned maps."""
        from bcc import BPF  # imported here: the CLI must work without bcc

        check_bpffs(self.bpffs)
        if self.features is None:
            self.features = kernel_features.as_dict(kernel_features.probe())
        if not self.features["cgroup_sock_addr"]:
            missing = kernel_features.missing_capabilities()
            if missing:
                raise DatapathError(f"not permitted to load BPF programs: this process lacks "
                                    f"{' and '.join(missing)} (run as root, or see deploy/README.md)")
            raise DatapathError("this kernel has no cgroup socket-address hooks (4.17+ with "
                                "bpf_get_socket_cookie, 5.0+): meshbpf cannot run here")
        self.redirect = self.redirect and kernel_features.redirect_possible(self.features)
        # The slots need the release hook, and socket storage for a socket
        # whose slot is held (either may be turned off alone).
        slots = all(self.features.get(name) for name in ("conn_slots", "conn_rnat", "sk_storage"))
        self.features = {**self.features, "conn_slots": slots}
        # Compiled in whenever the kernel can: with no pod meshed it costs
        # connect() one array lookup, and turning it on needs no recompile.
        self.capture = self.capture and bool(self.features.get("capture"))
        make_pin_folder(self.bpffs)
        cflags = [f'-DMBPF_PIN_DIR="{self.bpffs}"']
        for spec in self.maps():
            if spec.size_macro:
                cflags.append(f"-D{spec.size_macro}={self.capacity(spec)}")
        for feature in ("set_retval", "sk_storage", "netns_cookie", "conn_rnat", "conn_slots"):
            if self.features.get(feature):
                cflags.append(f"-DMBPF_HAVE_{feature.upper()}")
        cflags += self._node_netns_cflags()
        files = list(LB_SOURCES)
        if self.redirect:
            cflags += [f"-D{k}={v}" for k, v in kernel_offsets().items()]
            cflags.append("-DMBPF_REDIRECT")
            if self.features.get("redir_netns_cookie"):
                cflags.append("-DMBPF_HAVE_REDIR_NETNS_COOKIE")
        self.spin = self.redirect and bool(self.features.get("recv_tracepoint"))
        if self.spin:
            from .redirect import spin_cflags
            cflags += spin_cflags()
        if self.capture:
            cflags.append("-DMBPF_CAPTURE")
        cflags += lb_event_cflags(self.sizes)
        if self.redirect or self.capture:
            files.append("sockops.c")
        if self.redirect:
            files.append("sk_msg.c")
        if self.spin:
            files.append("recv_trace.c")
        if self.capture or (self.redirect and self.features["cgroup_sockopt"]):
            files.append("sockopt.c")
        try:
            self.bpf = BPF(text=program_text(files).encode(), cflags=cflags)
        except Exception as exc:
            raise DatapathError(f"compiling {', '.join(files)} failed: {exc}") from exc
        self._check_pinned_layouts()

    def _node_netns_cflags(self) -> list[str]:
        """MBPF_NODE_NETNS: which sockets are the node's own (sock_lb.c's
        svc_serves). Fixed for the netns's life, so compiled in."""
        if not self.features.get("netns_cookie"):
            return []
        try:
            cookie = netns_cookie(self.node_netns)
        except OSError as exc:
            # North-south reports a bad --node-netns itself; socket-LB goes
            # on, its flagged LB IPs left to tc as before the flag.
            log.warning("socket-LB: the node netns %r is not readable (%s): LB IPs with source "
                        "ranges are left to tc for the node's sockets too", self.node_netns, exc)
            return []
        return [f"-DMBPF_NODE_NETNS={cookie}ULL"] if cookie else []

    def maps(self) -> tuple[MapSpec, ...]:
        feats = self.features or {}
        lb = tuple(m for m in LB_MAPS if feats.get(OPTIONAL_LB_MAPS.get(m.name, ""), True))
        return lb + (REDIR_MAPS if self.redirect else ()) + (CAPTURE_MAPS if self.capture else ())

    def capacity(self, spec: MapSpec) -> int:
        return self.sizes.get(spec.name, spec.default_size)

    def table(self, name: str):
        return self.bpf[name.encode()]

    def compiled_types(self, name: str) -> tuple[type, type]:
        """bcc's Key and Leaf ctypes for any map, including the map types
        bcc has no Table class for (sockhash, socket storage)."""
        import json

        from bcc import BPF
        from bcc.libbcc import lib
        key = lib.bpf_table_key_desc(self.bpf.module, name.encode()).decode()
        leaf = lib.bpf_table_leaf_desc(self.bpf.module, name.encode()).decode()
        return BPF._decode_table_type(json.loads(key)), BPF._decode_table_type(json.loads(leaf))

    def map_fd(self, name: str) -> int:
        """The fd of any map, sockhash included (bcc has no Table for it)."""
        from bcc.libbcc import lib
        fd = lib.bpf_table_fd(self.bpf.module, name.encode())
        if fd < 0:
            raise DatapathError(f"no map {name} in the compiled programs")
        return fd

    def _check_pinned_layouts(self) -> None:
        """bcc reopens a pinned map without comparing layouts; do it here,
        before any program is loaded or any entry written."""
        problems = []
        for spec in self.maps():
            info = libbpf.map_info(self.map_fd(spec.name))
            want = (ct.sizeof(spec.key), ct.sizeof(spec.value), self.capacity(spec))
            have = (info.key_size, info.value_size, info.max_entries)
            if want != have:
                problems.append(f"{self.bpffs / spec.name}: pinned map has key/value/entries "
                                f"{have}, this build needs {want}")
            elif bool(info.map_flags & NO_PREALLOC) != spec.no_prealloc:
                pinned = "preallocated" if spec.no_prealloc else "not preallocated"
                needed = "not preallocated" if spec.no_prealloc else "preallocated"
                problems.append(f"{self.bpffs / spec.name}: pinned map is {pinned}, this build "
                                f"needs it {needed}")
        if problems:
            raise DatapathError(
                "pinned maps do not match this build:\n  " + "\n  ".join(problems)
                + "\n`meshbpf uninstall` removes them (existing connections keep working; "
                  "affinity and reverse-NAT state is lost)")

    def _links_dir(self) -> Path:
        links = self.bpffs / "links"
        links.mkdir(exist_ok=True)
        return links

    def attach(self, cgroup_path: Path) -> None:
        """Attach every socket-LB hook to the cgroup, or swap the programs in place."""
        from bcc import BPF

        target_id = cgroup.cgroup_id(cgroup_path)
        cg_fd = cgroup.open_cgroup(cgroup_path)
        try:
            if self.features.get("conn_rnat"):
                # Before the connect hooks: an entry they write must find
                # its socket's release hook already in place, or it stays.
                fn = self._load(RELEASE_HOOK.encode(), PROG_TYPE_CGROUP_SOCK,
                                attach_type=ATTACH_SOCK_RELEASE)
                _attach_or_swap(fn.fd, cg_fd, target_id, ATTACH_SOCK_RELEASE,
                                self._links_dir() / RELEASE_HOOK)
            for hook in SOCK_LB_HOOKS:
                fn = self.bpf.load_func(hook.func.encode(), BPF.CGROUP_SOCK_ADDR,
                                        attach_type=ATTACH[hook.attach])
                _attach_or_swap(fn.fd, cg_fd, target_id, ATTACH[hook.attach],
                                self._links_dir() / hook.func)
        finally:
            os.close(cg_fd)
        if not self.features.get("conn_rnat"):
            # An earlier build's, now that no connect hook writes the table.
            self._remove_links(lambda name: name == RELEASE_HOOK)

    def attach_redirect(self, cgroups: list[Path]) -> None:
        """sk_msg on the sockhash; sockops and setsockopt on each cgroup whose
        workloads take part. Links to cgroups no longer listed are removed."""
        from bcc import BPF

        if not self.redirect:
            missing = [f.name for f in kernel_features.probe()
                       if not f.available and "redirection" in f.needed_for]
            raise DatapathError("socket redirection is not available on this kernel "
                                f"(missing: {', '.join(missing) or 'disabled at build'})")
        msg = self._load(b"mbpf_sk_msg", PROG_TYPE_SK_MSG)
        hooks = [(self._load(b"mbpf_sockops", PROG_TYPE_SOCK_OPS), ATTACH_SOCK_OPS, "mbpf_sockops")]
        if self.features["cgroup_sockopt"]:
            hooks.append((self._load(b"mbpf_setsockopt", PROG_TYPE_CGROUP_SOCKOPT,
                                     attach_type=ATTACH_SETSOCKOPT),
                          ATTACH_SETSOCKOPT, "mbpf_setsockopt"))
        recv = self._load(RECV_LINK.encode(), PROG_TYPE_RAW_TRACEPOINT) if self.spin else None
        # Loaded (verified) all first, attached after: a refusal changes nothing.
        BPF.attach_func(msg, self.map_fd("mbpf_sockhash"), ATTACH_SK_MSG_VERDICT)
        if recv is not None:
            self._attach_recv_tracepoint(recv.fd)
        self._attach_per_cgroup(hooks, cgroups, ("mbpf_sockops-", "mbpf_setsockopt-"))

    def _attach_recv_tracepoint(self, prog_fd: int) -> None:
        """The empty-read counter on the recv tracepoint, pinned as a link.
        Such a link cannot swap its program: the new one is attached before
        the old one goes, so for a moment both count (harmless: only more
        reads look empty, for microseconds)."""
        pin = self._links_dir() / RECV_LINK
        fd = libbpf.raw_tracepoint_open(kernel_features.RECV_TRACEPOINT, prog_fd)
        try:
            if pin.exists():
                _detach_pin(pin)
            libbpf.obj_pin(fd, str(pin))
        finally:
            os.close(fd)

    def attach_capture(self, cgroups: list[Path]) -> None:
        """Sidecar capture's sockops (files captured connections),
        getsockopt (answers SO_ORIGINAL_DST) and, where the kernel has them,
        getsockname (names the original destination) on each cgroup holding
        meshed pods or their same-node clients; links to cgroups no longer
        listed go. The connect hooks need nothing more: they capture as soon
        as mbpf_cap_cfg.pods is set (meshbpf/datapath/capture.py)."""
        if not self.capture:
            raise DatapathError("sidecar capture is not available on this kernel (needs 5.7+: "
                                "cgroup and uid helpers in connect(), sockops, getsockopt)")
        hooks = [(self._load(b"mbpf_cap_sockops", PROG_TYPE_SOCK_OPS), ATTACH_SOCK_OPS,
                  "mbpf_cap_sockops"),
                 (self._load(b"mbpf_getsockopt", PROG_TYPE_CGROUP_SOCKOPT,
                             attach_type=ATTACH_GETSOCKOPT), ATTACH_GETSOCKOPT, "mbpf_getsockopt")]
        if self.features.get("capture_getsockname"):
            from bcc import BPF

            hooks += [(self._load(func.encode(), BPF.CGROUP_SOCK_ADDR, attach_type=attach_type),
                       attach_type, func) for func, attach_type in CAPTURE_SOCKNAME_HOOKS]
        self._attach_per_cgroup(hooks, cgroups, CAPTURE_LINKS)

    def _attach_per_cgroup(self, hooks: list, cgroups: list[Path], prefixes: tuple[str, ...]) -> None:
        """Each (program, attach type, name) on each cgroup as a pinned link
        <name>-<cgroup id>, swapped in place where one is pinned; links of
        these prefixes to cgroups no longer listed go."""
        wanted: set[str] = set()
        for path in cgroups:
            cg_id = cgroup.cgroup_id(path)
            cg_fd = cgroup.open_cgroup(path)
            try:
                for fn, attach_type, name in hooks:
                    pin = self._links_dir() / f"{name}-{cg_id}"  # bpffs refuses "." in names
                    wanted.add(pin.name)
                    _attach_or_swap(fn.fd, cg_fd, cg_id, attach_type, pin)
            finally:
                os.close(cg_fd)
        self._remove_links(lambda name: name.startswith(prefixes) and name not in wanted)

    def detach_capture(self) -> None:
        """No more SO_ORIGINAL_DST/getsockname answers nor filing (clear mbpf_cap_pod
        first, or captured connects reach a proxy that cannot route them)."""
        self._remove_links(lambda name: name.startswith(CAPTURE_LINKS))

    def _load(self, name: bytes, prog_type: int, **kwargs):
        """load_func, with the verifier's refusal as one DatapathError line
        (bcc raises a bare Exception and prints the verifier log)."""
        try:
            return self.bpf.load_func(name, prog_type, **kwargs)
        except Exception as exc:
            lines = str(exc).strip().splitlines() or [repr(exc)]
            raise DatapathError(f"the kernel refused {name.decode()}: {lines[-1]}") from exc

    def detach_redirect(self) -> None:
        """Stop adding sockets (sockops and setsockopt links go); the sk_msg
        program stays on the sockhash so pairs already spliced drain."""
        self._remove_links(lambda name: name.startswith(("mbpf_sockops-", "mbpf_setsockopt-"))
                           or name == RECV_LINK)

    def _remove_links(self, which) -> None:
        links = self.bpffs / "links"
        if not links.is_dir():
            return
        for pin in links.iterdir():
            if which(pin.name):
                _detach_pin(pin)


def _attach_or_swap(prog_fd: int, cg_fd: int, target_id: int, attach_type: int, pin: Path) -> None:
    old_fd = None
    try:
        if pin.exists():
            old_fd = libbpf.obj_get(str(pin))
            info = libbpf.link_info(old_fd)
            if info.cgroup_id == target_id and info.attach_type == attach_type:
                libbpf.link_update(old_fd, prog_fd)
                log.debug("swapped program behind %s", pin)
                return
        new_fd = libbpf.link_create(prog_fd, cg_fd, attach_type)
        try:
            if old_fd is not None:
                # Moving to another cgroup: the old place stops translating.
                pin.unlink()
                libbpf.link_detach(old_fd)
            libbpf.obj_pin(new_fd, str(pin))
        finally:
            os.close(new_fd)
        log.debug("attached %s", pin)
    finally:
        if old_fd is not None:
            os.close(old_fd)


def _detach_pin(pin: Path) -> None:
    fd = libbpf.obj_get(str(pin))
    try:
        libbpf.link_detach(fd)
    except libbpf.BPFError as exc:
        # A tracepoint's link has no detach (EOPNOTSUPP): it goes with its
        # pin, once no one holds it open.
        if exc.errno not in (errno.ENOLINK, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)
    pin.unlink()


@dataclass
class Installed:
    """What a bpffs folder holds, read without compiling anything."""

    bpffs: Path
    maps: dict[str, Path]
    links: dict[str, libbpf.LinkInfo]

    @property
    def present(self) -> bool:
        return bool(self.maps or self.links)


_FD_KINDS = {"anon_inode:bpf-map": "map", "anon_inode:bpf-link": "link", "anon_inode:bpf-prog": "prog"}


def pin_kind(pin: Path) -> tuple[str, str] | None:
    """("map", its kernel name), ("link", "") or ("prog", "") for a BPF
    object pinned at pin; None if pin is anything else."""
    try:
        fd = libbpf.obj_get(str(pin))
    except OSError:
        return None
    try:
        kind = _FD_KINDS.get(os.readlink(f"/proc/self/fd/{fd}"))
        if kind == "map":
            return kind, libbpf.map_info(fd).name
        return (kind, "") if kind else None
    finally:
        os.close(fd)


def _ours(pin: Path, kind: str, name: str = "") -> bool:
    """Is pin a BPF object of that kind (and, for a map, that kernel name)?"""
    found = pin_kind(pin)
    return found is not None and found[0] == kind and (not name or found[1] == name)


def inspect(bpffs: Path) -> Installed:
    """meshbpf's pins in bpffs: maps under their names, links under links/.
    Anything else, or a folder that is not on bpffs, counts as nothing."""
    if not is_bpffs(bpffs):
        return Installed(bpffs, {}, {})
    maps = {spec.name: bpffs / spec.name for spec in PINNED_MAPS if _ours(bpffs / spec.name, "map")}
    links = {}
    links_dir = bpffs / "links"
    if links_dir.is_dir():
        for pin in sorted(links_dir.iterdir()):
            if not _ours(pin, "link"):
                continue
            fd = libbpf.obj_get(str(pin))
            try:
                links[pin.name] = libbpf.link_info(fd)
            finally:
                os.close(fd)
    return Installed(bpffs, maps, links)


def uninstall(bpffs: Path, drain_timeout: float = 2.0) -> list[str]:
    """Detach and unpin everything meshbpf made in this folder, and nothing
    else. Returns what was removed, and a warning for each pin left.

    The folder must be on bpffs, and a pin is removed only if it is a BPF
    link (under links/) or a BPF map of the name it is pinned under: a
    plain folder with files named like ours is refused, not emptied.
    Spliced socket pairs are first switched to TCP and given drain_timeout
    to leave the sockhash: freeing the sockhash frees what a socket still
    holds spliced and unread."""
    if not is_bpffs(bpffs):
        raise DatapathError(f"{bpffs} is not on a bpffs mount: refusing to delete anything in it "
                            f"(pass the --bpffs folder the agent pins to)")
    removed: list[str] = []
    left = _drain_sockhash(bpffs, drain_timeout, removed)
    if left:
        removed.append(f"warning: {left} socket(s) were still spliced; bytes they had not "
                       f"read yet are lost")
    links_dir = bpffs / "links"
    if links_dir.is_dir():
        for pin in sorted(links_dir.iterdir()):
            if not pin.name.startswith("mbpf_"):
                continue
            if not _ours(pin, "link"):
                removed.append(f"warning: left {pin}: it is not a BPF link")
                continue
            _detach_pin(pin)
            removed.append(f"link {pin.name}")
        _rmdir_if_empty(links_dir)
    removed += _remove_policy_filters(bpffs)
    from .capture import remove_inbound_filters  # inbound capture's, in the pods' netns
    removed += remove_inbound_filters(bpffs)
    from .northsouth import remove_filters  # north-south's, on the nodes' devices
    removed += remove_filters(bpffs)
    for spec in PINNED_MAPS:
        pin = bpffs / spec.name
        if not pin.exists() and not pin.is_symlink():
            continue
        if not _ours(pin, "map", spec.name):
            removed.append(f"warning: left {pin}: it is not a BPF map named {spec.name}")
            continue
        pin.unlink()
        removed.append(f"map {spec.name}")
    _rmdir_if_empty(bpffs)
    return removed


def _remove_policy_filters(bpffs: Path) -> list[str]:
    """The policy tc filters whose programs use this folder's mbpf_pol_ep,
    in this netns and in every named one (the lab's node netns): filters
    keep programs and maps alive after their pins go."""
    pin = bpffs / "mbpf_pol_ep"
    if not _ours(pin, "map", pin.name):
        return []
    from pyroute2 import netns as named_netns

    from . import policy
    fd = libbpf.obj_get(str(pin))
    try:
        map_id = libbpf.map_info(fd).id
    finally:
        os.close(fd)
    removed = []
    for ns in [None, *named_netns.listnetns()]:
        try:
            found = policy.attached_filters(ns)
        except Exception as exc:  # a namespace going away meanwhile
            log.debug("policy filters in netns %s: %s", ns, exc)
            continue
        for ifindex, progs in found.items():
            if any(map_id in libbpf.prog_map_ids(pid) for pid in progs.values()):
                names = policy.detach_filters(ns, ifindex)
                removed += [f"tc filter {n} on ifindex {ifindex}" + (f" in netns {ns}" if ns else "")
                            for n in names]
    return removed


def _redirection_off(cfg_pin: Path, hash_pin: Path, removed: list[str]) -> bool:
    """mbpf_redir_cfg.enabled = 0: sk_msg then switches every pair it sees
    to TCP. Both maps' layouts are checked first (a RedirCfgC of the wrong
    size would have the kernel write past it); pinned by another version,
    nothing is changed and False returned with a warning: uninstall, the
    way out of an old layout, goes on."""
    from .layout import RedirCfgC, SockKeyC
    try:
        os.close(libbpf.open_pinned(str(hash_pin), SockKeyC))
        fd = libbpf.open_pinned(str(cfg_pin), ct.c_uint32, RedirCfgC)
    except libbpf.LayoutError as exc:
        removed.append(f"warning: spliced sockets were not switched to TCP first, bytes they had "
                       f"not read yet may be lost: {exc}")
        return False
    try:
        cfg = RedirCfgC()
        libbpf.map_lookup(fd, ct.c_uint32(0), cfg)
        cfg.enabled = 0
        libbpf.map_update(fd, ct.c_uint32(0), cfg)
    finally:
        os.close(fd)
    return True


def _drain_sockhash(bpffs: Path, timeout: float, removed: list[str]) -> int:
    """Turns redirection off, waits for the sockhash to empty, then detaches
    sockops (noting it in `removed`). Returns the sockets still in it."""
    import time

    from .layout import SockKeyC
    cfg_pin, hash_pin = bpffs / "mbpf_redir_cfg", bpffs / "mbpf_sockhash"
    if not _ours(cfg_pin, "map", cfg_pin.name) or not _ours(hash_pin, "map", hash_pin.name):
        return 0
    if not _redirection_off(cfg_pin, hash_pin, removed):
        return 0
    fd = libbpf.obj_get(str(hash_pin))
    try:
        deadline = time.monotonic() + timeout
        while True:
            left = libbpf.map_count(fd, ct.sizeof(SockKeyC))
            if left == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        os.close(fd)
    # Only now: sockops is what takes a drained socket out of the sockhash
    # (try_evict, on its ACKs); with redirection off it adds none.
    links = bpffs / "links"
    if links.is_dir():
        for pin in links.iterdir():
            if pin.name.startswith(("mbpf_sockops-", "mbpf_setsockopt-")) and _ours(pin, "link"):
                _detach_pin(pin)
                removed.append(f"link {pin.name}")
    return left


def _rmdir_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno != errno.ENOTEMPTY:
            raise
        log.warning("left %s in place: it holds files meshbpf did not make", path)
