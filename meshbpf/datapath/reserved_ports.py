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
(--node-netns, else the agent's own), through netns.run_in_netns, so the
agent itself never leaves its namespace.
"""

from __future__ import annotations

from .netns import run_in_netns

SYSCTL = "/proc/sys/net/ipv4/ip_local_reserved_ports"


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
    return run_in_netns(netns, go)
