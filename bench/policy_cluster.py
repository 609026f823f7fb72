"""The cluster bench/policy.py enforces: Namespaces, Pods and NetworkPolicies
as `kubectl get ns,pods,netpol -A -o json` prints them.

- Namespace "bench" holds the lab's pods: srv (role=server) and cli
  (role=client) on the agent's node, and their twins srv-twin and cli-twin,
  which carry the same labels but sit on node TWIN_NODE: the iptables and
  nftables baselines are generated for that node and run on the twins, so
  meshbpf (which enforces only its own node's pods) never touches them.
- `remote` more pods on 49 other nodes (10.245.0.0/16), in 50 namespaces,
  labelled app=app-<k> (200 apps) and tier=web|api|db.
- `selecting` policies select the server pod. The last (zz-allow-client)
  allows role=client on the benchmark's ports; the others allow other pods
  on other ports (podSelector + namespaceSelector, namespaceSelector alone,
  ipBlock with except), so a new connection to the server is matched against
  every one of them by a rule walker, and the allowing one comes last.
- `background` policies select remote pods only (a node sees every policy
  of the cluster, and enforces the few that select its own pods).
"""

from __future__ import annotations

import ipaddress

NODE = "bench-node"
TWIN_NODE = "bench-twin"
NAMESPACE = "bench"
SERVER_PORTS = (8080, 8081)    # connection rate, stream
NS_COUNT = 50
APPS = 200
TIERS = ("web", "api", "db")
REMOTE_BASE = ipaddress.ip_address("10.245.0.1")


def namespace(name: str, team: str) -> dict:
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name, "ns": name,
                                                  "team": team}}}


def pod(ns: str, name: str, labels: dict, node: str, ips: list[str], uid: str = "") -> dict:
    meta = {"name": name, "namespace": ns, "labels": labels}
    if uid:
        meta["uid"] = uid
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta,
            "spec": {"nodeName": node, "containers": [{"name": "main", "image": "bench"}]},
            "status": {"phase": "Running", "podIP": ips[0], "podIPs": [{"ip": ip} for ip in ips]}}


def lab_pods(lab_pods_by_name: dict) -> list[dict]:
    """The lab's four pods (meshbpf.lab.netlab.Pod by name "bench/srv", ...)."""
    out = []
    for name, role, node in (("srv", "server", NODE), ("cli", "client", NODE),
                             ("srv-twin", "server", TWIN_NODE), ("cli-twin", "client", TWIN_NODE)):
        p = lab_pods_by_name[f"{NAMESPACE}/{name}"]
        out.append(pod(NAMESPACE, name, {"pod": name, "role": role}, node,
                       [str(p.ipv4), str(p.ipv6)], p.uid))
    return out


def remote_pods(count: int) -> list[dict]:
    return [pod(f"ns-{i % NS_COUNT:02d}", f"p-{i:05d}",
                {"app": f"app-{i % APPS}", "tier": TIERS[i % len(TIERS)]},
                f"node-{1 + i % 49:02d}", [str(REMOTE_BASE + i)])
            for i in range(count)]


def namespaces() -> list[dict]:
    return [namespace(NAMESPACE, "bench")] + [namespace(f"ns-{k:02d}", f"t{k % 5}") for k in range(NS_COUNT)]


def netpol(ns: str, name: str, selector: dict, ingress: list) -> dict:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"podSelector": {"matchLabels": selector}, "policyTypes": ["Ingress"],
                     "ingress": ingress}}


def decoy_rule(j: int) -> dict:
    """Allows something other than the benchmark's client, on another port."""
    port = [{"protocol": "TCP", "port": 9000 + j % 500}]
    if j % 10 == 3:
        return {"from": [{"ipBlock": {"cidr": "10.250.0.0/16", "except": [f"10.250.{j % 256}.0/24"]}}],
                "ports": port}
    if j % 7 == 1:
        return {"from": [{"namespaceSelector": {"matchLabels": {"team": f"t{j % 5}"}}}], "ports": port}
    return {"from": [{"namespaceSelector": {"matchLabels": {"ns": f"ns-{j % NS_COUNT:02d}"}},
                      "podSelector": {"matchLabels": {"app": f"app-{j % APPS}"}}}], "ports": port}


def allow_client(ports=SERVER_PORTS) -> dict:
    return netpol(NAMESPACE, "zz-allow-client", {"role": "server"},
                  [{"from": [{"podSelector": {"matchLabels": {"role": "client"}}}],
                    "ports": [{"protocol": "TCP", "port": p} for p in ports]}])


def deny_client() -> dict:
    """zz-allow-client edited so that it no longer allows the client."""
    return netpol(NAMESPACE, "zz-allow-client", {"role": "server"},
                  [{"from": [{"podSelector": {"matchLabels": {"role": "nobody"}}}],
                    "ports": [{"protocol": "TCP", "port": p} for p in SERVER_PORTS]}])


def selecting_policies(count: int) -> list[dict]:
    """count policies selecting the server; the last one allows the client."""
    if count == 0:
        return []
    decoys = [netpol(NAMESPACE, f"decoy-{j:04d}", {"role": "server"}, [decoy_rule(j)]) for j in range(count - 1)]
    return decoys + [allow_client()]


def background_policies(count: int) -> list[dict]:
    """Policies of other namespaces, selecting remote pods only."""
    return [netpol(f"ns-{j % NS_COUNT:02d}", f"bg-{j:04d}", {"app": f"app-{j % APPS}"}, [decoy_rule(j)])
            for j in range(count)]


def as_list(items: list[dict]) -> dict:
    return {"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": ""}, "items": items}
