"""The SNAT port range reserved on the node (issue 12).

North-south SNAT takes its ports from one range (--snat-ports). The
datapath skips a port whose reply tuple a node socket owns at the moment
it is claimed (bpf_skc_lookup_tcp / bpf_sk_lookup_udp), but a socket the
node opens later on the same tuple would lose its replies to the flow.
Adding the range to net.ipv4.ip_local_reserved_ports (which also covers
IPv6) keeps the node's automatic port choice (connect() without bind(),
bind() to port 0) out of it; an explicit bind() into the range still works
and is the one case left (see README, "North-south").

The sysctl is per network namespace: it is written in the devices' one
(--node-netns, else the agent's own), from a short-lived thread that
enters it (setns acts on the calling thread only), so the agent itself
never leaves its namespace.
"""

from __future__ import annotations

import ctypes
import os
import threading

SYSCTL = "/proc/sys/net/ipv4/ip_local_reserved_ports"
CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"


def parse(text: str) -> list[tuple[int, int]]:
    """"1000-1005,2000" -> [(1000, 1005), (2000, 2000)] (sorted, merged)."""
    ranges = []
    for item in text.replace("\n", ",").split(","):
        item = item.strip()
        if not item:
            continue
        lo, _, hi = item.partition("-")
        ranges.append((int(lo), int(hi or lo)))
    return merge(ranges)


def merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def format_ranges(ranges: list[tuple[int, int]]) -> str:
    return ",".join(f"{lo}-{hi}" if lo != hi else str(lo) for lo, hi in ranges)


def covered(ranges: list[tuple[int, int]], want: tuple[int, int]) -> bool:
    return any(lo <= want[0] and want[1] <= hi for lo, hi in merge(ranges))


def with_range(text: str, want: tuple[int, int]) -> str | None:
    """The sysctl's new value with `want` added; None if it is reserved already."""
    ranges = parse(text)
    if covered(ranges, want):
        return None
    return format_ranges(merge([*ranges, want]))


def without_range(text: str, drop: tuple[int, int]) -> str | None:
    """The sysctl's value with `drop` taken out (what reserve added); None
    if none of it is there."""
    out, changed = [], False
    for lo, hi in parse(text):
        if hi < drop[0] or lo > drop[1]:
            out.append((lo, hi))
            continue
        changed = True
        if lo < drop[0]:
            out.append((lo, drop[0] - 1))
        if hi > drop[1]:
            out.append((drop[1] + 1, hi))
    return format_ranges(out) if changed else None


def _in_netns(netns: str | None, fn):
    """fn() in the named netns (None: here), on a thread of its own."""
    if netns is None:
        return fn()
    result: dict = {}

    def run() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(os.path.join(NETNS_DIR, netns), os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns to netns {netns}: {os.strerror(err)}")
            finally:
                os.close(fd)
            result["value"] = fn()
        except BaseException as exc:  # handed to the caller
            result["error"] = exc

    thread = threading.Thread(target=run, name=f"netns-{netns}", daemon=True)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def read(netns: str | None = None) -> str:
    def go() -> str:
        with open(SYSCTL) as f:
            return f.read().strip()
    return _in_netns(netns, go)


def reserve(ports: tuple[int, int], netns: str | None = None) -> str | None:
    """Adds ports to the netns's ip_local_reserved_ports; returns the value
    it had before if it changed it, None if the range was reserved already."""
    def go() -> str | None:
        with open(SYSCTL) as f:
            before = f.read().strip()
        new = with_range(before, ports)
        if new is None:
            return None
        with open(SYSCTL, "w") as f:
            f.write(new)
        return before
    return _in_netns(netns, go)


def release(ports: tuple[int, int], netns: str | None = None) -> bool:
    """Takes ports out of the netns's ip_local_reserved_ports again."""
    def go() -> bool:
        with open(SYSCTL) as f:
            new = without_range(f.read().strip(), ports)
        if new is None:
            return False
        with open(SYSCTL, "w") as f:
            f.write(new if new else "\n")
        return True
    return _in_netns(netns, go)
