"""Lab pieces that need no root: `lab up`'s output, and whoami's start-up."""

from __future__ import annotations

import socket
import threading
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner

from meshbpf.cli import cli
from meshbpf.lab import netlab, whoami


class FakeLab:
    """netlab.Lab's interface, without namespaces."""

    def __init__(self, name: str):
        self.name = name
        self.cgroup = Path(f"/sys/fs/cgroup/meshbpf-lab-{name}")
        self.pods: dict[str, netlab.Pod] = {}

    def up(self, pods: list[str]) -> "FakeLab":
        for i, pod in enumerate(pods):
            self.pods[pod] = netlab.Pod(pod, f"mbl-{self.name}-{pod}", i + 2)
        return self


def test_lab_up_prints_each_pod_and_its_addresses(monkeypatch):
    # Python 3.11's IPv4Address refuses a width in format(); this crashed.
    monkeypatch.setattr(netlab, "Lab", FakeLab)
    result = CliRunner().invoke(cli, ["lab", "up", "t1", "--pods", "a,web-2"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "a                10.244.0.2     fd00:244::2",
        "web-2            10.244.0.3     fd00:244::3",
        "cgroup: /sys/fs/cgroup/meshbpf-lab-t1",
    ]


def test_whoami_listens_without_resolving_any_name(monkeypatch):
    # A pod whose resolver answers nothing stalls any lookup: whoami must not make one.
    def no_resolver(*args, **kwargs):
        raise AssertionError("whoami looked up a name")
    for name in ("getfqdn", "gethostbyaddr", "gethostbyname", "getaddrinfo"):
        monkeypatch.setattr(socket, name, no_resolver)
    server = whoami.make_server("web-7", 0)
    monkeypatch.undo()  # the client below may resolve what it likes
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        for host in ("127.0.0.1", "[::1]"):
            with urllib.request.urlopen(f"http://{host}:{port}/", timeout=5) as resp:
                assert resp.read() == b"web-7\n"
    finally:
        server.shutdown()
        server.server_close()


def test_demo_refuses_to_take_over_an_existing_lab(monkeypatch):
    from meshbpf.lab import demo

    downs = []
    monkeypatch.setattr(demo.Lab, "exists", lambda self: True)
    monkeypatch.setattr(demo.Lab, "down", lambda self: downs.append(self.name))
    with pytest.raises(netlab.LabError, match="already exists"):
        demo.run_demo(name="busy")
    assert downs == []  # the other lab was left alone
