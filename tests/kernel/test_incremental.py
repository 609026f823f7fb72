"""Incremental sync (issue 14) on the real maps, with real traffic: a change
is written over the frontends it touches, the pinned maps end exactly as a
full plan would leave them, and connections through the changing Services
keep working."""

from __future__ import annotations

import json

import pytest

from meshbpf.datapath.maps import read_pinned
from meshbpf.reconcile import plan, wanted_services
from meshbpf.sources.yaml_file import read_config

from . import k8s
from .conftest import web_service
from .helpers import wait_backends, wait_log

FILLERS = 200

# The same on every kernel: the host runs it, the kernel matrix skips it.
pytestmark = pytest.mark.userspace


def _objects(lab, web_pods, extra=()):
    objects = web_service(lab, pods=web_pods)
    for i in range(FILLERS):  # Services sharing the web pods as backends
        objects += web_service(lab, pods=("web-1", "web-4"), name=f"f{i}",
                               ip=f"10.97.{i // 250}.{i % 250 + 1}")
    for name, ip, pods in extra:
        objects += web_service(lab, pods=pods, name=name, ip=ip)
    return objects


def test_changes_are_written_incrementally_and_leave_the_maps_as_a_full_plan(
        lab, probe, bpffs, config, start_agent):
    agent = start_agent(_objects(lab, ("web-1", "web-2")))
    held = probe.popen("client", "hold", "10.96.0.10", 80, "stdin")
    first = json.loads(held.stdout.readline())["first"]
    assert first in ("web-1", "web-2")

    # web moves to web-3/web-4 (web-2 is then no backend of anything), a new
    # Service arrives on web-2, and a filler goes.
    objects = _objects(lab, ("web-3", "web-4"), extra=[("api", "10.96.0.20", ("web-2",))])
    objects = [o for o in objects if o["metadata"]["name"] not in ("f7", "f7-1")]
    k8s.write(config, objects)
    ip = {p: f"{lab.pods[p].ipv4}:8080" for p in ("web-1", "web-2", "web-3", "web-4")}
    wait_backends(bpffs, "10.96.0.20:80/TCP", [ip["web-2"]], timeout=10)
    wait_backends(bpffs, "10.96.0.10:80/TCP", [ip["web-3"], ip["web-4"]])
    log = wait_log(agent, "(changed frontends only)")
    assert "Traceback" not in log

    # The pinned maps hold what a full plan of the file gives: nothing to write.
    state, _ = read_pinned(bpffs)
    desired = read_config(config, None).state
    assert plan(state, wanted_services(desired)).writes == 0
    assert "10.97.0.8:80/TCP" not in {f"{a}" for a in desired.service_ports}

    # Real traffic through the changed Services; the held connection lives on.
    web = probe("client", "whoami", "10.96.0.10", 80, 40)
    assert web["errors"] == {} and set(web["answers"]) == {"web-3", "web-4"}
    api = probe("client", "whoami", "10.96.0.20", 80, 10)
    assert api["errors"] == {} and set(api["answers"]) == {"web-2"}
    filler = probe("client", "whoami", "10.97.0.1", 80, 20)
    assert filler["errors"] == {} and set(filler["answers"]) <= {"web-1", "web-4"}
    out, _ = held.communicate("\n", timeout=10)
    assert json.loads(out.strip().splitlines()[-1])["second"] == first
