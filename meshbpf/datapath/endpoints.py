"""Finding a local pod's host-side interface from its uid, the same way in
the lab and on a real node (both kubelet cgroup drivers): kubelet pod
cgroup -> a pid in it -> /proc/PID/ns/net -> the interface holding a pod IP
-> its veth peer's ifindex (IFLA_LINK) in the node's netns.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Iterable


def pod_cgroup_candidates(cgroup_root: Path, pod_uid: str) -> list[Path]:
    """Where kubelet puts a pod's cgroup below the cgroup it manages, for
    each QoS class: the cgroupfs driver (kubepods/<qos>/pod<uid>) and the
    systemd driver (kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_>.slice,
    dashes of the uid turned into underscores)."""
    uid_ = pod_uid.replace("-", "_")
    return [
        cgroup_root / "kubepods" / f"pod{pod_uid}",
        cgroup_root / "kubepods" / "burstable" / f"pod{pod_uid}",
        cgroup_root / "kubepods" / "besteffort" / f"pod{pod_uid}",
        cgroup_root / "kubepods.slice" / f"kubepods-pod{uid_}.slice",
        cgroup_root / "kubepods.slice" / "kubepods-burstable.slice" / f"kubepods-burstable-pod{uid_}.slice",
        cgroup_root / "kubepods.slice" / "kubepods-besteffort.slice" / f"kubepods-besteffort-pod{uid_}.slice",
    ]


def _pids_below(cg: Path) -> list[int]:
    """Pids in cg and its children (containers get their own child cgroups)."""
    pids = []
    for procs in [cg / "cgroup.procs", *cg.rglob("*/cgroup.procs")]:
        try:
            pids += [int(p) for p in procs.read_text().split()]
        except OSError:
            pass  # gone meanwhile
    return pids


def _peer_ifindex(netns_path: str, ips: set) -> int | None:
    """In the netns at netns_path: the peer ifindex (IFLA_LINK) of the
    interface holding one of ips."""
    from pyroute2 import IPRoute
    with IPRoute(netns=netns_path) as ipr:
        for a in ipr.get_addr():
            if ipaddress.ip_address(a.get_attr("IFA_ADDRESS")) not in ips:
                continue
            link = ipr.get_links(a["index"])[0]
            peer = link.get_attr("IFLA_LINK")
            if peer and peer != a["index"]:
                return peer
    return None


def find_endpoint(pod_uid: str, pod_ips: Iterable, cgroup_root: Path) -> int | None:
    """The ifindex, in the netns the pod's veth peer lives in (the node's),
    of the host side of the pod's interface; None if not found (the pod is
    not running here yet, or is not a veth pod)."""
    ips = {ipaddress.ip_address(str(ip)) for ip in pod_ips}
    for cg in pod_cgroup_candidates(cgroup_root, pod_uid):
        if not cg.is_dir():
            continue
        for pid in _pids_below(cg):
            path = f"/proc/{pid}/ns/net"
            try:
                if os.stat(path).st_ino == os.stat("/proc/self/ns/net").st_ino:
                    continue  # a host-network process tells nothing
                found = _peer_ifindex(path, ips)
            except OSError:
                continue  # exited meanwhile
            if found:
                return found
    return None
