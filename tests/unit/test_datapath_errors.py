"""Refusals from the kernel become one clear line, not a traceback or a
misleading "this kernel lacks it"."""

import pytest

from meshbpf.datapath import features
from meshbpf.datapath.loader import DatapathError, SockLB


def _status(tmp_path, cap_eff: int):
    path = tmp_path / "status"
    path.write_text(f"Name:\tpython3\nCapInh:\t0000000000000000\nCapEff:\t{cap_eff:016x}\n")
    return str(path)


@pytest.mark.parametrize("caps,missing", [
    (1 << 39 | 1 << 12, []),                        # CAP_BPF + CAP_NET_ADMIN
    (1 << 21 | 1 << 12, []),                        # CAP_SYS_ADMIN stands in for CAP_BPF
    (1 << 12, ["CAP_BPF"]),
    (1 << 39, ["CAP_NET_ADMIN"]),
    (0, ["CAP_BPF", "CAP_NET_ADMIN"]),
])
def test_missing_capabilities_are_named(tmp_path, caps, missing):
    assert features.missing_capabilities(_status(tmp_path, caps)) == missing


def test_an_unprivileged_process_is_told_it_lacks_capabilities_not_kernel_support(tmp_path, monkeypatch):
    monkeypatch.setattr(features, "missing_capabilities", lambda: ["CAP_BPF"])
    lb = SockLB(bpffs=tmp_path, features={"cgroup_sock_addr": False})
    monkeypatch.setattr("meshbpf.datapath.loader.check_bpffs", lambda path: None)
    with pytest.raises(DatapathError, match="not permitted to load BPF programs: this process lacks CAP_BPF"):
        lb.compile()


class _Refusing:
    def load_func(self, name, prog_type, **kwargs):
        raise Exception(f"Failed to load BPF program {name}: Permission denied\n")


def test_a_program_the_verifier_refuses_is_one_line(tmp_path):
    lb = SockLB(bpffs=tmp_path, features={"cgroup_sockopt": True}, bpf=_Refusing())
    with pytest.raises(DatapathError) as exc:
        lb.attach_redirect([])
    assert str(exc.value) == ("the kernel refused mbpf_sk_msg: "
                              "Failed to load BPF program b'mbpf_sk_msg': Permission denied")


def test_the_node_netns_cookie_is_compiled_in_when_the_kernel_gives_it(tmp_path, monkeypatch):
    """sock_lb.c's svc_serves tells the node's sockets by their netns cookie;
    without the helper or the cookie (before 5.14) no MBPF_NODE_NETNS, and
    frontends for the node's sockets only stay tc's."""
    seen = []
    monkeypatch.setattr("meshbpf.datapath.loader.netns_cookie", lambda ns: seen.append(ns) or 4242)
    lb = SockLB(bpffs=tmp_path, features={"netns_cookie": True}, node_netns="node1")
    assert lb._node_netns_cflags() == ["-DMBPF_NODE_NETNS=4242ULL"] and seen == ["node1"]
    assert SockLB(bpffs=tmp_path, features={"netns_cookie": False})._node_netns_cflags() == []
    monkeypatch.setattr("meshbpf.datapath.loader.netns_cookie", lambda ns: None)
    assert lb._node_netns_cflags() == []


def test_an_unreadable_node_netns_leaves_socket_lb_running(tmp_path, monkeypatch, caplog):
    """A --node-netns that names no netns stops north-south (which says so),
    not the socket-LB: it compiles without the cookie, its node-only LB IPs
    left to tc."""
    def missing(ns):
        raise FileNotFoundError(2, "No such file or directory", f"/run/netns/{ns}")
    monkeypatch.setattr("meshbpf.datapath.loader.netns_cookie", missing)
    lb = SockLB(bpffs=tmp_path, features={"netns_cookie": True}, node_netns="nowhere")
    with caplog.at_level("WARNING"):
        assert lb._node_netns_cflags() == []
    assert "'nowhere' is not readable" in caplog.text and "left to tc" in caplog.text


def test_netns_cookie_reads_this_netns_or_none():
    from meshbpf.datapath.netns import netns_cookie
    cookie = netns_cookie(None)
    assert cookie is None or (cookie > 0 and netns_cookie(None) == cookie)
