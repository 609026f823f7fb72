"""Looking for policy filters in a named network namespace never creates it.

pyroute2 opens a named netns with O_CREAT unless told otherwise: the
uninstall's scan of every named netns, racing a pod (or a lab) whose netns
was just deleted, brought it back empty, and it stayed (seen while the
policy e2e tests ran beside other labs going down)."""

from __future__ import annotations

import pytest
from pyroute2 import netns

from meshbpf.datapath import policy
from meshbpf.lab.netlab import NETNS_PREFIX

from .conftest import LAB_PREFIX


@pytest.mark.userspace
def test_a_netns_gone_meanwhile_is_not_brought_back():
    name = f"{NETNS_PREFIX}{LAB_PREFIX}gone"
    assert name not in netns.listnetns()
    try:
        with pytest.raises(OSError):
            policy.attached_filters(name)
        assert name not in netns.listnetns(), "looking at a gone netns created it"
    finally:
        if name in netns.listnetns():
            netns.remove(name)
