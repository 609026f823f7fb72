"""The usual fixture names, served by one lab and one agent per module.

A test module whose tests only need some Services programmed imports these
(`from .shared import bpffs, config, dns_pods, lab, probe, start_agent`):
they shadow conftest's per-test fixtures, so the module compiles and starts
one agent instead of one per test (CI time: ~10 s each under the VMs'
emulation). start_agent(objects) rewrites the config and waits until the
agent has synced it. A test that needs its own agent flags, stops the agent
or breaks things belongs in a module without this import.
"""

from __future__ import annotations

import pytest


@pytest.fixture
def lab(shared_lb):
    return shared_lb.lab


@pytest.fixture
def probe(shared_lb):
    return shared_lb.probe


@pytest.fixture
def dns_pods(shared_lb):
    return shared_lb.dns_pods


@pytest.fixture
def bpffs(shared_lb):
    return shared_lb.bpffs


@pytest.fixture
def config(shared_lb):
    return shared_lb.config


@pytest.fixture
def start_agent(shared_lb):
    def serve(objects: list[dict], *extra: str):
        assert not extra, "the shared agent takes no flags: use a module with its own agents"
        return shared_lb.serve(objects)
    return serve
