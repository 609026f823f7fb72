"""The north-south benchmark's rule generator (bench/kube_rules.py, NodePort
part): kube-proxy's chain shapes in both layouts, followed the way the kernel
follows them, and the same Services as the agent reads them."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import kube_rules as kr  # noqa: E402

from meshbpf.reconcile import northsouth as planner  # noqa: E402
from meshbpf.reconcile.northsouth_keys import F_NODEPORT, NorthSouthState, NsKey, WILDCARD4, WILDCARDS  # noqa: E402
from meshbpf.sources.yaml_file import read_config  # noqa: E402

TARGETS = [("web-tcp", "tcp", ("10.244.1.2",), 8080), ("web-udp", "udp", ("10.244.1.2",), 9090)]


def svcs(n: int = 6) -> list[kr.NpSvc]:
    return kr.nodeport_services(n, TARGETS)


def test_targets_come_last_and_every_service_has_its_own_addresses():
    s = svcs()
    assert [x.name for x in s[-2:]] == ["web-tcp", "web-udp"]
    assert [x.proto for x in s] == ["tcp"] * 5 + ["udp"]
    assert len({x.vip for x in s}) == len({x.node_port for x in s}) == 6
    assert all(len(x.endpoints) == 4 for x in s[:4])
    with pytest.raises(ValueError):
        kr.nodeport_services(1, TARGETS)


# --- iptables: chains as iptables-restore reads them -------------------------------

def ipt_tables(text: str) -> dict[str, dict[str, list[list[str]]]]:
    """{table: {chain: [rule words]}}; a rule naming an undeclared chain fails."""
    tables: dict = {}
    for line in text.splitlines():
        if line.startswith("*"):
            chains = tables[line[1:]] = {}
        elif line.startswith(":"):
            chains[line[1:].split()[0]] = []
        elif line.startswith("-A "):
            words = shlex.split(line)
            assert words[1] in chains, f"rule in undeclared chain: {line}"
            chains[words[1]].append(words[2:])
    return tables


def jump(rule: list[str]) -> str | None:
    return rule[rule.index("-j") + 1] if "-j" in rule else None


def follow_nodeport(nat: dict, proto: str, node_port: int) -> tuple[list[str], str]:
    """Walks a packet to a local address:node_port from PREROUTING: the
    chains it passes and where it is DNATed to (first match, statistic
    rules taken)."""
    path, chain = [], "PREROUTING"
    while True:
        path.append(chain)
        for rule in nat[chain]:
            if "-d" in rule and rule[rule.index("-d") + 1] != "LOCAL":
                continue                      # a ClusterIP rule: not our address
            if "--dport" in rule and (rule[rule.index("-p") + 1], rule[rule.index("--dport") + 1]) \
                    != (proto, str(node_port)):
                continue
            if "-s" in rule:
                continue                      # the client is not the endpoint
            target = jump(rule)
            if target == "DNAT":
                return path, rule[rule.index("--to-destination") + 1]
            if target == "KUBE-MARK-MASQ":
                path.append("KUBE-MARK-MASQ")
                continue
            if target in nat:
                chain = target
                break
        else:
            raise AssertionError(f"fell off {chain} along {path}")


@pytest.mark.parametrize("index", [0, 4, 5])
def test_iptables_nodeport_goes_through_nodeports_ext_svc_sep(index):
    s = svcs()
    tables = ipt_tables(kr.iptables_nodeport_restore(s))
    nat = tables["nat"]
    for chains in tables.values():                         # every jump names a chain or a target
        for rules in chains.values():
            for rule in rules:
                assert jump(rule) in chains or jump(rule) in ("ACCEPT", "DROP", "RETURN", "DNAT", "MARK",
                                                               "MASQUERADE")
    assert jump(nat["KUBE-SERVICES"][-1]) == "KUBE-NODEPORTS"             # the last rule
    assert "--dst-type" in nat["KUBE-SERVICES"][-1]
    path, dest = follow_nodeport(nat, s[index].proto, s[index].node_port)
    h = path[3][len("KUBE-EXT-"):]
    assert path[:5] == ["PREROUTING", "KUBE-SERVICES", "KUBE-NODEPORTS", f"KUBE-EXT-{h}", "KUBE-MARK-MASQ"]
    assert path[5] == f"KUBE-SVC-{h}" and path[6].startswith("KUBE-SEP-")
    assert dest in {f"{ep}:{s[index].target_port}" for ep in s[index].endpoints}
    # the masquerade mark is honoured on the way out
    assert any("MASQUERADE" in r for r in nat["KUBE-POSTROUTING"])
    assert ["-j", "MARK", "--or-mark", "0x4000"] == nat["KUBE-MARK-MASQ"][0]


def test_iptables_large_cluster_mode_drops_endpoint_comments():
    small = ipt_tables(kr.iptables_nodeport_restore(svcs(10)))["nat"]
    large = ipt_tables(kr.iptables_nodeport_restore(svcs(300)))["nat"]     # > 1000 endpoints
    sep = next(c for c in small if c.startswith("KUBE-SEP-"))
    assert "--comment" in small[sep][0]
    sep = next(c for c in large if c.startswith("KUBE-SEP-"))
    assert "--comment" not in large[sep][0]
    assert all("--comment" in r for r in large["KUBE-NODEPORTS"])


def test_iptables_flush_names_both_tables():
    assert set(ipt_tables(kr.iptables_flush())) == {"filter", "nat"}


# --- nftables ---------------------------------------------------------------------

def nft_parse(text: str) -> tuple[dict[str, list[str]], dict[str, dict[str, str]]]:
    """(chains: rules, maps: {key: verdict}); a rule or goto naming a chain
    not added before fails, as `nft -f` fails."""
    chains: dict[str, list[str]] = {}
    maps: dict[str, dict[str, str]] = {}
    prefix = f"add chain {kr.T} "
    for line in text.splitlines():
        if line.startswith(prefix):
            chains[line[len(prefix):].split()[0]] = []
        elif line.startswith(f"add rule {kr.T} "):
            chain, rule = line[len(f"add rule {kr.T} "):].split(" ", 1)
            assert chain in chains, line
            for target in re.findall(r"(?:goto|jump) (\S+)", rule):
                assert target in chains, line
            chains[chain].append(rule)
        elif line.startswith(f"add map {kr.T} "):
            maps[line.split()[4]] = {}
        elif line.startswith(f"add element {kr.T} ") and " : " in line:
            name = line.split()[4]
            key, verdict = line.split("{ ", 1)[1].rstrip(" }").split(" : ")
            assert verdict.split()[1] in chains, line
            maps[name][key] = verdict
    return chains, maps


@pytest.mark.parametrize("index", [0, 5])
def test_nft_nodeport_map_leads_to_external_then_service_chain(index):
    s = svcs()
    chains, maps = nft_parse(kr.nft_nodeport_ruleset(s))
    assert "fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports" \
        in chains["services"]
    assert chains["nat-prerouting"] == ["jump services"]
    assert len(maps["service-nodeports"]) == len(maps["service-ips"]) == len(s)
    kind, ext = maps["service-nodeports"][f"{s[index].proto} . {s[index].node_port}"].split()
    assert kind == "goto" and ext.startswith("external-")
    assert chains[ext][0].startswith("jump mark-for-masquerade")
    svc = chains[ext][1].split()[1]
    assert chains[ext][1] == f"goto {svc}" and svc.startswith("service-")
    assert maps["service-ips"][f"{s[index].vip} . {s[index].proto} . {s[index].port}"] == f"goto {svc}"
    eps = re.findall(r"goto (\S+)", chains[svc][1])
    assert len(eps) == len(s[index].endpoints)
    assert {r.split("dnat to ")[1] for e in eps for r in chains[e] if "dnat to" in r} == \
        {f"{ep}:{s[index].target_port}" for ep in s[index].endpoints}


# --- the same Services, as the agent reads and plans them ---------------------------------

def test_yaml_gives_each_service_a_nodeport_frontend(tmp_path):
    s = svcs()
    path = tmp_path / "np.yaml"
    path.write_text(kr.nodeport_yaml(s, {"10.244.1.2": "node2"}))
    desired = read_config(path, node_name="node1").state
    node = planner.NodeContext("node1")
    p = planner.plan(desired, node, NorthSouthState(), 251)
    assert not p.problems
    nodeports = {k: v for k, v in p.state.frontends.items() if k.addr in WILDCARDS}
    assert set(nodeports) == {NsKey(WILDCARD4, x.node_port, 6 if x.proto == "tcp" else 17) for x in s}
    assert all(v.flags & F_NODEPORT and v.count == len(x.endpoints)
               for x in s for k, v in nodeports.items() if k.port == x.node_port)
    web = next(sp for sp in desired.service_ports.values() if sp.service.startswith("bench/web-tcp"))
    assert web.node_port == s[-2].node_port
    assert [e.node_name for e in web.endpoints] == ["node2"]
