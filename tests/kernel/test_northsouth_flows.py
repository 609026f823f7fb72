"""kube-proxy's packet-flow tables with real packets in the 2-node lab (issue 12).

The table is tests/data/kube_proxy_flows.py (kube-proxy's nftables and
iptables proxier tests, ported as facts). Here: a 2-node lab, an agent per
node started as a user starts one (`meshbpf agent --node-name nodeK
--node-netns <node netns>` on the node's cgroup), each setup written as the
agents' YAML, then every flow sent with real packets from where upstream sends
it (the router for external clients, a pod for pod clients, node1's netns
and cgroup for the node itself) and checked:

  backends  which backends answered (whoami names itself and the port it was
            reached on) is exactly the expected set; and the source address
            the backend saw: kube-proxy's `masq` as meshbpf does it (SNAT to
            the receiving node only for a backend on another node under
            Cluster; otherwise the client's own address)
  DROP      no answer within a few seconds, every attempt
  REJECT    a TCP RST / ICMP unreachable (connection refused), every attempt
  ACCEPT    the health-check port answers HTTP

A DROP or REJECT of an external client, or of any client to an LB or
external IP, must also be the north-south programs' own (their counters,
meshbpf_northsouth_packets_total, rise on a node):
without them, the node's stack or the lab's routing would answer the same.

The whole file is `twonode`: CI runs it on the host only (the VMs drive the
same programs in test_northsouth_datapath.py). Three setups and the host
processes' own cases (HOST_SETUPS) are the quick run; the rest of the table
is `bounds`. Per-case results are printed (pytest -s) as `pass`, `FAIL`,
`n/a`, `gap`.
"""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from meshbpf.datapath.loader import uninstall
from meshbpf.lab.netlab import NETNS_PREFIX, ROUTER, ROUTER_BRIDGE, Lab
from meshbpf.lab.workloads import AgentProcess, start_dnsmasq, wait_for, wait_listening
from tests.data import kube_proxy_flows as table
from tests.data.kube_proxy_flows import HOST_SETUPS, SETUPS, Flow, Setup

from . import k8s
from .conftest import AGENT_READY_TIMEOUT, BPFFS_ROOT, LAB_PREFIX, PIN_PREFIX, _names, _snapshot
from .helpers import metric

pytestmark = pytest.mark.twonode  # host only in CI (tests/conftest.py)

NS_AVAILABLE = importlib.util.find_spec("meshbpf.datapath.northsouth") is not None
NEEDS_NS = "needs north-south load balancing (meshbpf.datapath.northsouth: issue 12's ns-dp and ns-plan)"
PROBE = Path(__file__).with_name("ns_flow_probe.py")
BACKEND_PORTS = (80, 8443, 5353)
NS_FLAGS: list[str] = []   # north-south needs no flag: --devices defaults to the default-route device
EXTERNAL = ("router", "blocked")
# The quick run (SNAT or not, Local, REJECT); the rest is `bounds`.
REPRESENTATIVE = ("TestExternalTrafficPolicyCluster", "TestExternalTrafficPolicyLocal", "TestNoEndpointsReject")
VERDICT_COUNTERS = {"REJECT": {"reject"}, "DROP": {"drop_no_local", "drop_source_range"}}
# node1's own addresses: ext0's and the pods' bridge's (meshbpf/lab/netlab.py)
NODE1_OWN = {*table.NODES["node1"], "10.244.0.1", "fd00:244::1"}
NODE_OF = {**{p: "node1" for p in table.NODE1_PODS}, **{p: "node2" for p in table.NODE2_PODS}}


class FlowLab:
    """The lab, its two agents and the config they read."""

    def __init__(self, lab: Lab, config: Path, agents: list[AgentProcess]):
        self.lab, self.config, self.agents = lab, config, agents
        self.pinned: tuple[str, ...] = ()
        self.pod_by_addr = {str(a): name for name, pod in lab.pods.items() for a in (pod.ipv4, pod.ipv6)}

    def apply(self, setup: Setup) -> None:
        """Writes the setup, waits until both agents have synced it, routes its
        pinned addresses to node1 only."""
        stamp = "meshbpf_last_sync_timestamp_seconds"
        before = [metric(a.get("/metrics")[1], stamp) for a in self.agents]
        k8s.write(self.config, setup.objects)
        for agent, was in zip(self.agents, before):
            wait_for(lambda: metric(agent.get("/metrics")[1], stamp) > was, 60,
                     f"an agent to sync {setup.name}")
        for addr in self.pinned:
            self.lab.run(None, ["ip", "route", "del", addr], node=ROUTER, check=True)
        for addr in setup.pinned:
            via = table.NODES["node1"][1 if ":" in addr else 0]
            self.lab.run(None, ["ip", "route", "replace", addr, "via", via], node=ROUTER, check=True)
        self.pinned = setup.pinned

    def verdicts(self) -> dict[str, float]:
        """The north-south programs' drop and reject counters, summed over the nodes."""
        names = ("reject", "drop_no_local", "drop_source_range")
        texts = [a.get("/metrics")[1] for a in self.agents]
        return {n: sum(metric(t, "meshbpf_northsouth_packets_total", f'result="{n}"') or 0 for t in texts)
                for n in names}

    def send(self, flow: Flow) -> dict:
        where: dict = {"pod": flow.client}
        args = [flow.dest, flow.port]
        if flow.client in EXTERNAL:
            where = {"pod": None, "node": ROUTER}
        elif flow.client == "node1":
            where = {"pod": None, "node": 1}
        if flow.expected == "ACCEPT":
            command = ["http", *args]
        else:
            backends = flow.expected.split(", ") if flow.expected not in ("DROP", "REJECT", "") else []
            count = 8 * len(backends) if len(backends) > 1 else (4 if backends or flow.expected == "" else 2)
            command = ["udp" if flow.protocol == "UDP" else "tcp", *args, count]
            if flow.client == "blocked":
                command.append(table.BLOCKED4)
        r = self.lab.run(where["pod"], [sys.executable, str(PROBE), *map(str, command)],
                         node=where.get("node", 1), timeout=240)
        assert r.returncode == 0, f"probe {command}: {r.stderr}"
        return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def flows_lab(tmp_path_factory):
    name = f"{LAB_PREFIX}{next(_names)}"
    tmp = tmp_path_factory.mktemp("ns-flows")
    config = k8s.write(tmp / "services.yaml", [])
    bpffs = [BPFFS_ROOT / f"{PIN_PREFIX}{next(_names)}" for _ in range(2)]
    agents: list[AgentProcess] = []
    with Lab(name) as lab:
        lab.up(table.NODE1_PODS, table.NODE2_PODS)
        lab.run(None, ["ip", "addr", "add", f"{table.BLOCKED4}/24", "dev", ROUTER_BRIDGE], node=ROUTER, check=True)
        # A router forwards: a pod's packet to an LB or external IP goes out of its
        # node and comes back to one (the lab's router only reaches the nodes).
        lab.run(None, ["sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"],
                node=ROUTER, check=True)
        # The nodes' ephemeral ports as a tuned node has them, over the SNAT range
        # (61000-65535): the agents reserve that range (ip_local_reserved_ports in
        # the node's netns), so the nodes' own connections never take a port whose
        # reply tuple a live SNAT entry holds
        # (test_a_host_connection_on_a_snat_port_gets_its_answers).
        for node in (1, 2):
            lab.run(None, ["sysctl", "-qw", "net.ipv4.ip_local_port_range=32768 65535"], node=node, check=True)
        for pod in table.BACKENDS:
            ports = [a for p in BACKEND_PORTS for a in ("--port", str(p))]
            lab.popen(pod, [sys.executable, "-m", "meshbpf.lab.whoami", "--name", pod, *ports],
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            start_dnsmasq(lab, pod, tmp)
        for pod in table.BACKENDS:
            for port in BACKEND_PORTS:
                wait_listening(lab, pod, port)
        try:
            for node, path in zip(lab.nodes, bpffs):
                agents.append(AgentProcess(config, node.cgroup, path, [
                    "--node-name", node.name, "--node-netns", node.netns, *NS_FLAGS]))
                agents[-1].start(timeout=AGENT_READY_TIMEOUT)
            yield FlowLab(lab, config, agents)
        finally:
            for agent in agents:
                print(f"--- {agent.bpffs.name} agent log (tail) ---\n{agent.log()[-4000:]}")
                agent.cleanup()
            for path in bpffs:
                if path.exists():
                    uninstall(path)
    left = {k: sorted(n for n in v if n.startswith(f"{NETNS_PREFIX}{name}-") or n in {p.name for p in bpffs}
                      or n.endswith(name)) for k, v in _snapshot().items()}
    assert not any(left.values()), f"the flows lab left these behind: {left}"


# --- judging one flow -------------------------------------------------------------
def _client_address(flow: Flow, lab: FlowLab) -> str:
    if flow.client == "blocked":
        return table.BLOCKED4
    if flow.client in EXTERNAL:
        return table.ROUTER6 if ":" in flow.dest else table.ROUTER4
    if flow.client == "node1":
        return table.NODES["node1"][1 if ":" in flow.dest else 0]
    pod = lab.lab.pods[flow.client]
    return str(pod.ipv6 if ":" in flow.dest else pod.ipv4)


def _masq_problem(flow: Flow, setup: Setup, backend: str, seen: str, client: str) -> str | None:
    """kube-proxy's `masq`, as meshbpf does it: the client's address is kept
    unless the backend is on another node than the one that received the
    packet (Cluster policy), which then SNATs to its own address. A host
    process sends from the address of the device its route takes (ext0 or
    the pods' bridge), masquerade or not: any address of node1 will do."""
    if flow.client == "node1":
        return None if seen in NODE1_OWN else f"{backend} saw {seen}, not an address of node1"
    if flow.client not in EXTERNAL or not flow.masq:
        return None if seen == client else f"{backend} saw {seen}, expected the client's {client}"
    node_of_addr = {a: n for n, pair in table.NODES.items() for a in pair}
    receiver = "node1" if flow.dest in table.NODES["node1"] or flow.dest in setup.pinned else None
    if seen == client:
        ok = receiver in (None, NODE_OF[backend])
        return None if ok else f"{backend} on {NODE_OF[backend]} saw the client {client}: not masqueraded"
    snat = node_of_addr.get(seen)
    if snat and snat != NODE_OF[backend] and receiver in (None, snat):
        return None
    return f"{backend} on {NODE_OF[backend]} saw {seen}"


def judge(flow: Flow, setup: Setup, lab: FlowLab, out: dict) -> str | None:
    """None when the flow went as expected, else what went wrong."""
    want = flow.expected
    if want == "ACCEPT":
        return None if "status" in out else f"health-check port: {out}"
    answers, errors = out["answers"], out["errors"]
    if want in ("DROP", "REJECT"):
        # A packet meshbpf leaves alone loops in the lab until its TTL runs
        # out: ICMP time exceeded (REJECT) or, rate-limited, nothing (DROP).
        allowed = {"DROP", "REJECT"} if flow.why == table.NO_ROUTE else {want}
        if answers or not errors or not set(errors) <= allowed:
            return f"wanted {want}, got {out}"
        rose = {n for n, v in out.get("counted", {}).items() if v > 0}
        through_tc = flow.client in EXTERNAL or flow.dest.startswith(("10.240.0.", "fd00:240:"))  # LB/external IPs
        if through_tc and flow.ours is None and not rose & VERDICT_COUNTERS[want]:
            return f"{want} as wanted, but not by the north-south programs (counters rose: {sorted(rose)})"
        return None
    if errors:
        return f"wanted answers, got errors {errors} (answers {answers})"
    if want == "":   # no rule: the destination itself answers
        wanted = {(lab.pod_by_addr[flow.dest], str(flow.port))}
    else:
        wanted = {(lab.pod_by_addr[b.rsplit(":", 1)[0].strip("[]")], b.rsplit(":", 1)[1])
                  for b in want.split(", ")}
    if flow.protocol == "UDP":
        got = set(answers)
        return None if got == {n for n, _ in wanted} else f"answered by {sorted(got)}, wanted {sorted(wanted)}"
    parsed = [line.split() for line in answers]
    got = {(name, port) for name, _, port in parsed}
    if got != wanted:
        return f"answered by {sorted(got)}, wanted {sorted(wanted)}"
    client = _client_address(flow, lab)
    problems = [p for name, seen, _ in parsed if (p := _masq_problem(flow, setup, name, seen, client))]
    return "; ".join(problems) or None


def run_setup(lab: FlowLab, setup: Setup) -> None:
    def why_not(flow: Flow) -> str:
        if flow.skip:
            return flow.skip
        if flow.client in EXTERNAL and not NS_AVAILABLE:
            return NEEDS_NS
        return ""
    runnable = [f for f in setup.flows if not why_not(f)]
    if not runnable:
        pytest.skip(NEEDS_NS if not NS_AVAILABLE else "no case of this setup applies")
    lab.apply(setup)
    failed = []
    for flow in setup.flows:
        if why_not(flow):
            print(f"n/a   {setup.name} / {flow.case}: {why_not(flow)}")
            continue
        before = lab.verdicts() if NS_AVAILABLE else {}
        out = lab.send(flow)
        if NS_AVAILABLE:
            out["counted"] = {n: v - before[n] for n, v in lab.verdicts().items()}
        problem = judge(flow, setup, lab, out)
        if flow.gap:   # a known gap: reported while it lasts, a failure once it is closed
            problem = "gap closed: drop its `gap` mark" if problem is None else None
            print(f"{'FAIL' if problem else 'gap '}  {setup.name} / {flow.case}: {problem or flow.gap}")
        else:
            print(f"{'FAIL' if problem else 'pass'}  {setup.name} / {flow.case}"
                  f"{': ' + problem if problem else ''}")
        if problem:
            failed.append(f"{flow.case}: {problem}")
    assert not failed, f"{setup.name}:\n" + "\n".join(failed)


def _ids(setup: Setup) -> str:
    return setup.name


@pytest.mark.parametrize("setup", [s for s in SETUPS if s.name.split("/")[0] in REPRESENTATIVE], ids=_ids)
def test_kube_proxy_flows(flows_lab, setup):
    run_setup(flows_lab, setup)


@pytest.mark.bounds
@pytest.mark.parametrize("setup", [s for s in SETUPS if s.name.split("/")[0] not in REPRESENTATIVE], ids=_ids)
def test_kube_proxy_flows_whole_table(flows_lab, setup):
    run_setup(flows_lab, setup)


@pytest.mark.parametrize("setup", HOST_SETUPS, ids=_ids)
def test_host_processes(flows_lab, setup):
    """A process on node1 (its netns and cgroup, as the kubelet or a
    hostNetwork pod) to external IPs, LB IPs and NodePorts, TCP and UDP, both
    families, Local, source ranges, no endpoints (tests/data/kube_proxy_flows.py)."""
    run_setup(flows_lab, setup)


HOLD = """
import socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(family, socket.SOCK_STREAM)
s.settimeout(10)
s.bind((sys.argv[1], int(sys.argv[2])))
s.connect((sys.argv[3], 80))
print("connected", flush=True)
sys.stdin.readline()
s.sendall(b"GET /client HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n")
data = b""
try:
    while chunk := s.recv(4096):
        data += chunk
except OSError as exc:
    print("error", exc, flush=True)
s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\\1\\0\\0\\0\\0\\0\\0\\0")
s.close()
print("answer", data.split(b"\\r\\n\\r\\n", 1)[-1].decode().strip(), flush=True)
"""


def _reserved_ports(lab: Lab, node: int | str | None) -> str:
    argv = ["sysctl", "-n", "net.ipv4.ip_local_reserved_ports"]
    if node is None:   # the host's own netns: read, never written
        return subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip()
    return lab.run(None, argv, node=node, check=True).stdout.strip()


@pytest.mark.skipif(not NS_AVAILABLE, reason=NEEDS_NS)
def test_the_snat_ports_are_reserved_in_the_nodes_netns_only(flows_lab):
    from meshbpf.datapath.reserved_ports import covered, parse
    for node in (1, 2):
        assert covered(parse(_reserved_ports(flows_lab.lab, node)), (61000, 65535)), node
    assert not covered(parse(_reserved_ports(flows_lab.lab, ROUTER)), (61000, 65535))


@pytest.mark.skipif(not NS_AVAILABLE, reason=NEEDS_NS)
@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_a_host_connection_on_a_snat_port_gets_its_answers(flows_lab, family):
    """node1 SNATs an external client's flow to a backend on node2 to
    node1's address and a port of the SNAT range. A node1 connection that
    holds the port the flow would try first (an explicit bind() into the
    reserved range: the one way a node socket gets there), to the same
    backend, has that reply tuple: the flow takes another port (the
    datapath looks the tuple up among the node's sockets), and the node's
    connection still gets its answers. Before: SNAT kept the client's port,
    checked against the conntrack map only, and node1's tc took the node
    connection's replies for the flow."""
    from meshbpf.datapath.northsouth import NorthSouthMaps
    from meshbpf.reconcile import addr16
    from meshbpf.reconcile.northsouth_keys import flow_hash, snat_port_tries
    import ipaddress

    v6 = family == "ipv6"
    setup = next(s for s in SETUPS if s.name == f"TestNodePorts/{family}")   # b1 and a1 behind node1:30001
    flows_lab.apply(setup)
    node, router = table.NODES["node1"][v6], (table.ROUTER6 if v6 else table.ROUTER4)
    b1 = table.B1_6 if v6 else table.B1
    a16 = lambda a: addr16(ipaddress.ip_address(a))  # noqa: E731

    def probe(where: int | str, *args) -> dict:
        r = flows_lab.lab.run(None, [sys.executable, str(PROBE), *map(str, args)], node=where, timeout=60)
        return json.loads(r.stdout.strip().splitlines()[-1])

    maps = NorthSouthMaps(flows_lab.agents[0].bpffs)
    try:
        for cport in range(45100, 45140):
            first = snat_port_tries(flow_hash(a16(router), a16(node), cport, 30001, 6))[0]
            held = flows_lab.lab.popen(None, [sys.executable, "-c", HOLD, node, str(first), b1], node=1,
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            try:
                assert held.stdout.readline().strip() == "connected"
                answers = probe(ROUTER, "tcp", node, 30001, 1, f"{router},{cport}")["answers"]
                if not any(a.startswith(f"b1 {node} ") for a in answers):
                    continue   # a1 on node1 took it: no SNAT
                snat = [socket.ntohs(v.sport) for k, v in maps.conntrack()
                        if k.dir == 1 and bytes(k.saddr) == a16(router) and socket.ntohs(k.sport) == cport]
                out, _ = held.communicate("go\n", timeout=30)
                assert f"answer b1 {node} 80" in out, out   # the node's connection has its answer
                assert snat and snat[0] != first and 61000 <= snat[0] <= 65535, (first, snat)
                return
            finally:
                if held.poll() is None:
                    held.kill()
                    held.wait()
        pytest.fail("no client port of 45100..45139 reached b1")
    finally:
        maps.close()


# bounds: the planners agreeing is Python; the datapath side runs on every kernel
# (test_northsouth_datapath.py, the same table programmed on both nodes)
@pytest.mark.bounds
@pytest.mark.skipif(not NS_AVAILABLE, reason=NEEDS_NS)
def test_a_flow_keeps_its_backend_whichever_node_receives_it(flows_lab):
    """Maglev: every node builds the same table, so the same flow (client
    address and port) gets the same backend through node1 and through node2:
    an ECMP change that moves a flow to another node keeps its backend."""
    setup = next(s for s in SETUPS if s.name == "TestExternalTrafficPolicyCluster")
    flows_lab.apply(setup)
    lb = table.LB1

    def backends_via(node: str) -> dict[int, str]:
        flows_lab.lab.run(None, ["ip", "route", "replace", lb, "via", table.NODES[node][0]],
                          node=ROUTER, check=True)
        got = {}
        # Below the router's ephemeral ports (32768 up): no earlier flow of the
        # module used these tuples, so no node holds a flow of another setup on them
        for sport in range(24000, 24012):
            r = flows_lab.lab.run(None, [sys.executable, str(PROBE), "tcp", lb, "80", "1",
                                         f"{table.ROUTER4},{sport}"], node=ROUTER, timeout=60)
            out = json.loads(r.stdout.strip().splitlines()[-1])
            assert not out["errors"], (node, sport, out)
            got[sport] = next(iter(out["answers"])).split()[0]
        return got

    try:
        via1, via2 = backends_via("node1"), backends_via("node2")
    finally:
        flows_lab.lab.run(None, ["ip", "route", "del", lb], node=ROUTER)
    assert via1 == via2
    assert set(via1.values()) == {"a1", "b1"}, via1   # 12 flows on one backend by chance: 1 in 2048
