"""Shared test setup: kernel tests (tests/kernel) need root; unit tests do not."""

import os

import pytest


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "/tests/kernel/" in str(item.fspath):
            item.add_marker(pytest.mark.kernel)


def pytest_runtest_setup(item):
    if item.get_closest_marker("kernel") and os.geteuid() != 0:
        pytest.fail("kernel tests need root (bpf(), cgroups, namespaces): run scripts/test as root",
                    pytrace=False)
