"""Compiling, attaching and pinning the socket-LB programs.

Everything meshbpf creates lives in one bpffs folder (default
/sys/fs/bpf/meshbpf): the maps, and under links/ one BPF link per hook. The
pinned links are what keep the programs attached while no agent runs; a new
agent swaps the program behind each link atomically (BPF_LINK_UPDATE), so
an upgrade or restart never leaves a moment without translation.
"""

from __future__ import annotations

import ctypes as ct
import errno
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from . import cgroup, libbpf
from .layout import LB_MAPS, MapSpec
from .source import bpf_dir, expand

log = logging.getLogger(__name__)

DEFAULT_BPFFS = Path("/sys/fs/bpf/meshbpf")

# bpf_attach_type values from uapi/linux/bpf.h
ATTACH = {
    "connect4": 10, "connect6": 11, "sendmsg4": 14, "sendmsg6": 15,
    "recvmsg4": 19, "recvmsg6": 20, "getpeername4": 29, "getpeername6": 30,
}
BPF_PROG_TYPE_CGROUP_SOCK_ADDR = 18


@dataclass(frozen=True)
class Hook:
    func: str        # entry point in bpf/sock_lb.c, also the link's pin name
    attach: str      # key of ATTACH


SOCK_LB_HOOKS = (
    Hook("mbpf_connect4", "connect4"), Hook("mbpf_connect6", "connect6"),
    Hook("mbpf_sendmsg4", "sendmsg4"), Hook("mbpf_sendmsg6", "sendmsg6"),
    Hook("mbpf_recvmsg4", "recvmsg4"), Hook("mbpf_recvmsg6", "recvmsg6"),
    Hook("mbpf_getpeer4", "getpeername4"), Hook("mbpf_getpeer6", "getpeername6"),
)


class DatapathError(Exception):
    pass


def check_bpffs(folder: Path) -> None:
    """The folder must sit on a mounted bpffs."""
    folder = folder.resolve()
    with open("/proc/mounts") as f:
        bpf_mounts = [Path(m[1]) for m in (line.split() for line in f) if len(m) > 2 and m[2] == "bpf"]
    if not any(folder == m or m in folder.parents for m in bpf_mounts):
        raise DatapathError(f"{folder} is not on a bpffs mount; mount one with "
                            f"`mount -t bpf bpf /sys/fs/bpf`")


@dataclass
class SockLB:
    """The socket-LB programs and their pinned maps for one bpffs folder."""

    bpffs: Path = DEFAULT_BPFFS
    sizes: dict[str, int] = field(default_factory=dict)      # map name -> max_entries
    features: dict[str, bool] = field(default_factory=dict)  # e.g. {"set_retval": True}
    bpf: object = None

    def compile(self) -> None:
        """Compile bpf/sock_lb.c, creating or reopening the pinned maps."""
        from bcc import BPF  # imported here: the CLI must work without bcc

        check_bpffs(self.bpffs)
        self.bpffs.mkdir(parents=True, exist_ok=True)
        cflags = [f'-DMBPF_PIN_DIR="{self.bpffs}"']
        for spec in LB_MAPS:
            cflags.append(f"-D{spec.size_macro}={self.capacity(spec)}")
        if self.features.get("set_retval", True):
            cflags.append("-DMBPF_HAVE_SET_RETVAL")
        text = expand(bpf_dir() / "sock_lb.c")
        try:
            self.bpf = BPF(text=text.encode(), cflags=cflags)
        except Exception as exc:
            raise DatapathError(f"compiling bpf/sock_lb.c failed: {exc}") from exc
        self._check_pinned_layouts()

    def capacity(self, spec: MapSpec) -> int:
        return self.sizes.get(spec.name, spec.default_size)

    def table(self, name: str):
        return self.bpf[name.encode()]

    def _check_pinned_layouts(self) -> None:
        """bcc reopens a pinned map without comparing layouts; do it here,
        before any program is loaded or any entry written."""
        problems = []
        for spec in LB_MAPS:
            t = self.table(spec.name)
            info = libbpf.map_info(t.map_fd)
            want = (ct.sizeof(t.Key), ct.sizeof(t.Leaf), self.capacity(spec))
            have = (info.key_size, info.value_size, info.max_entries)
            if want != have:
                problems.append(f"{self.bpffs / spec.name}: pinned map has key/value/entries "
                                f"{have}, this build needs {want}")
        if problems:
            raise DatapathError(
                "pinned maps do not match this build:\n  " + "\n  ".join(problems)
                + "\n`meshbpf uninstall` removes them (existing connections keep working; "
                  "affinity and reverse-NAT state is lost)")

    def attach(self, cgroup_path: Path) -> None:
        """Attach every hook to the cgroup, or swap the programs in place."""
        from bcc import BPF

        links_dir = self.bpffs / "links"
        links_dir.mkdir(exist_ok=True)
        target_id = cgroup.cgroup_id(cgroup_path)
        cg_fd = cgroup.open_cgroup(cgroup_path)
        try:
            for hook in SOCK_LB_HOOKS:
                fn = self.bpf.load_func(hook.func.encode(), BPF.CGROUP_SOCK_ADDR,
                                        attach_type=ATTACH[hook.attach])
                _attach_or_swap(fn.fd, cg_fd, target_id, ATTACH[hook.attach],
                                links_dir / hook.func)
        finally:
            os.close(cg_fd)


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


@dataclass
class Installed:
    """What a bpffs folder holds, read without compiling anything."""

    bpffs: Path
    maps: dict[str, Path]
    links: dict[str, libbpf.LinkInfo]

    @property
    def present(self) -> bool:
        return bool(self.maps or self.links)


def inspect(bpffs: Path) -> Installed:
    maps = {spec.name: bpffs / spec.name for spec in LB_MAPS if (bpffs / spec.name).exists()}
    links = {}
    links_dir = bpffs / "links"
    if links_dir.is_dir():
        for pin in sorted(links_dir.iterdir()):
            fd = libbpf.obj_get(str(pin))
            try:
                links[pin.name] = libbpf.link_info(fd)
            finally:
                os.close(fd)
    return Installed(bpffs, maps, links)


def uninstall(bpffs: Path) -> list[str]:
    """Detach and unpin everything meshbpf made in this folder, and nothing
    else. Returns what was removed."""
    removed: list[str] = []
    links_dir = bpffs / "links"
    if links_dir.is_dir():
        for pin in sorted(links_dir.iterdir()):
            if not pin.name.startswith("mbpf_"):
                continue
            fd = libbpf.obj_get(str(pin))
            try:
                libbpf.link_detach(fd)
            except libbpf.BPFError as exc:
                if exc.errno not in (errno.ENOLINK, errno.EINVAL):
                    raise
            finally:
                os.close(fd)
            pin.unlink()
            removed.append(f"link {pin.name}")
        _rmdir_if_empty(links_dir)
    for spec in LB_MAPS:
        pin = bpffs / spec.name
        if pin.exists():
            pin.unlink()
            removed.append(f"map {spec.name}")
    _rmdir_if_empty(bpffs)
    return removed


def _rmdir_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno != errno.ENOTEMPTY:
            raise
        log.warning("left %s in place: it holds files meshbpf did not make", path)
