"""Lab pods in Kubernetes namespaces: their own netns and kubelet-style
cgroup inside the lab cgroup, found again by Lab.attach, printed by
`meshbpf lab objects`; and the socket LB still applies to them."""

from __future__ import annotations

from click.testing import CliRunner

import pytest

from meshbpf.cli import cli
from meshbpf.lab.netlab import Lab, kubelet_cgroup
from meshbpf.sources.kube_objects import SourceObject
from meshbpf.sources.kube_policy import read_policy_objects
from meshbpf.sources.yaml_load import load_one

from .conftest import LAB_PREFIX, _names, web_service


def cgroup_of(lab: Lab, pod: str) -> str:
    out = lab.run(pod, ["cat", "/proc/self/cgroup"], check=True).stdout
    return next(line.split(":", 2)[2] for line in out.splitlines() if line.startswith("0::"))


@pytest.mark.userspace
def test_namespaced_pods_get_a_netns_and_a_kubelet_cgroup():
    with Lab(f"{LAB_PREFIX}{next(_names)}") as lab:
        lab.up(["client", "x/a", "y/a"])
        xa = lab.pods["x/a"]
        assert xa.netns == f"mbl-{lab.name}-x.a"
        assert xa.cgroup == kubelet_cgroup(lab.cgroup, xa.uid) and xa.cgroup.is_dir()
        lab_cg = "/" + lab.cgroup.name
        assert cgroup_of(lab, "x/a") == f"{lab_cg}/kubepods/besteffort/pod{xa.uid}"
        assert cgroup_of(lab, "client") == lab_cg  # bare names stay where they were
        ping = lab.run("x/a", ["ping", "-c1", "-W2", str(lab.pods["y/a"].ipv4)])
        assert ping.returncode == 0, ping.stdout + ping.stderr

        again = Lab.attach(lab.name)
        assert again.pods == lab.pods

        result = CliRunner().invoke(cli, ["lab", "objects", lab.name, "--node-name", "n1"])
        assert result.exit_code == 0, result.output
        # Read the way the agent reads it: `y` unquoted would be a boolean.
        read = read_policy_objects([SourceObject(load_one(result.output), "objects")])
        assert not read.problems
        assert {(p.namespace, p.name, p.ips[0]) for p in read.pods} == {
            (p.namespace, p.pod_name, p.ipv4) for p in lab.pods.values()}
        assert {ns.name for ns in read.namespaces} == {"default", "x", "y"}
        lab.popen("x/a", ["sleep", "60"])  # down() must kill it in the pod's cgroup
    assert not lab.cgroup.exists()


def test_socket_lb_applies_to_a_pod_in_its_own_cgroup(lab, start_agent):
    lab.add_pod("x/a")
    start_agent(web_service(lab))
    out = lab.run("x/a", ["curl", "-sS", "--max-time", "2", "http://10.96.0.10/"])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() in ("web-1", "web-2", "web-3", "web-4")
