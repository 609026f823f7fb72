"""Waiting on, and reading, what the agent programmed."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

from meshbpf.cli.inspect_cmd import services_view
from meshbpf.datapath import redirect
from meshbpf.datapath.maps import read_pinned

from .conftest import PROBE

# What README promises (not copied from the implementation), so a changed
# default fails a test until README says so too.
# "Never slower than TCP": a send under 4 KB is small; with TCP_NODELAY from
# 128 B; more than 16 small sends in a row, with no reply, hand the pair to TCP.
README_SMALL_WRITE = 4096
README_NODELAY_SMALL_MIN = 128
README_SMALL_RUN_MAX = 16
# "Running the agent": default map sizes.
README_MAP_SIZES = {"mbpf_svc": 65536, "mbpf_slots": 262144, "mbpf_backends": 131072,
                    "mbpf_affinity": 65536, "mbpf_rnat": 131072, "mbpf_sockhash": 65536}


def services(bpffs: Path) -> dict[str, list[str]]:
    """frontend -> backend addresses, straight from the pinned maps.

    The maps are read one after another, so a read racing an update can see
    a slot whose backend is already gone; it shows as "missing"."""
    state, _ = read_pinned(bpffs)
    return {s["frontend"]: sorted(b["address"] or "missing" for b in s["backends"])
            for s in services_view(state)}


def wait_backends(bpffs: Path, frontend: str, expected: list[str], timeout: float = 5.0) -> float:
    """Waits until `frontend` has exactly these backends; returns seconds waited."""
    start = time.monotonic()
    while True:
        current = services(bpffs).get(frontend)
        if current == sorted(expected):
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{frontend}: backends {current}, expected {sorted(expected)}")
        time.sleep(0.02)


def metric(text: str, name: str, labels: str = "") -> float | None:
    """One sample from Prometheus text output."""
    pattern = re.escape(name) + (re.escape("{" + labels + "}") if labels else r"(?:\{\})?") + r" (\S+)"
    m = re.search(r"^" + pattern + r"$", text, re.MULTILINE)
    return float(m.group(1)) if m else None


def wait_log(agent, needle: str, timeout: float = 5.0) -> str:
    start = time.monotonic()
    while needle not in agent.log():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"agent log lacks {needle!r}:\n{agent.log()}")
        time.sleep(0.05)
    return agent.log()


# --- same-node redirection ---------------------------------------------------

def counters(bpffs) -> dict:
    return redirect.read_counters(bpffs)


def tx_bytes(lab, pod: str) -> int:
    """Bytes sent on the pod's eth0, read over netlink inside its namespace."""
    out = lab.run(pod, ["ip", "-s", "-j", "link", "show", "eth0"], in_cgroup=False)
    return json.loads(out.stdout)[0]["stats64"]["tx"]["bytes"]


def transfer(lab, probe, size: int, total: int, nodelay: str = "nagle", port: int = 7000,
             server_pod: str = "web-1", client_pod: str = "client", server_in_cgroup: bool = True,
             flags: int = 0, server_mode: str = "duplex", family: int = 4) -> tuple[dict, dict]:
    """Full duplex: client and server each send `total` bytes in `size` writes
    (server_mode "sink": only the client sends), over IPv4 or IPv6."""
    host = lab.pods[server_pod].ipv4 if family == 4 else lab.pods[server_pod].ipv6
    server = lab.popen(server_pod, [sys.executable, "-u", str(PROBE), "xfer-server", str(port),
                                    str(size), str(total), nodelay, server_mode],
                       in_cgroup=server_in_cgroup, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert json.loads(server.stdout.readline())["listening"]
        client = probe(client_pod, "xfer-client", host, port, size, total,
                       nodelay, flags, timeout=600)
        out, err = server.communicate(timeout=600)
        assert server.returncode == 0, f"server failed: {err}"
        return client, json.loads(out.strip().splitlines()[-1])
    finally:
        if server.poll() is None:
            server.kill()


def assert_intact(client: dict, server: dict, total: int) -> None:
    assert client["recv_bytes"] == total and server["recv_bytes"] == total
    assert client["sent_sha"] == server["recv_sha"], "client -> server bytes differ"
    assert server["sent_sha"] == client["recv_sha"], "server -> client bytes differ"


def popen_probe(lab, pod: str, argv: list[str], cgroup=None) -> subprocess.Popen:
    """A probe.py command in a pod: in the lab cgroup, or moved on into
    `cgroup` (a child of it) before it starts."""
    cmd = [sys.executable, "-u", str(PROBE), *map(str, argv)]
    if cgroup is not None:
        cmd = ["sh", "-c", f'echo 0 > {cgroup}/cgroup.procs && exec "$@"', "sh", *cmd]
    return lab.popen(pod, cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def probe_result(proc: subprocess.Popen, timeout: float = 120) -> dict:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"{proc.args} exited with {proc.returncode}"
    return json.loads(out.strip().splitlines()[-1])
