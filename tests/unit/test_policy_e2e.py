"""The Kubernetes NetworkPolicy e2e suite's cases as truth tables.

Ported from kubernetes/kubernetes test/e2e/network/netpol/network_policy.go
(the facts only: policies and expected reachability). Upstream now runs each
case on the few pods it needs; here every case runs on the full 9-pod world
(x, y, z by a, b, c), its expectations extended to the pods upstream left
out the way the older 9x9 form of the suite wrote them. Cases that mutate
labels or policies are split into their states. Left out: SCTP traffic and
multi-node cases. Loopback (a pod to itself) is always allowed here, as
upstream ignores it.
"""

from __future__ import annotations

import pytest

from meshbpf.policy.compile import verdict
from policy_world import ALL, NS_LABEL, Reach, compiled, expr, ip_of, labels, netpol, world


def R() -> Reach:
    return Reach()


def from_(*peers, ports=None) -> dict:
    rule = {"from": list(peers)}
    if ports is not None:
        rule["ports"] = ports
    return rule


def to(*peers, ports=None) -> dict:
    rule = {"to": list(peers)}
    if ports is not None:
        rule["ports"] = ports
    return rule


def pod_sel(sel: dict) -> dict:
    return {"podSelector": sel}


def ns_sel(sel: dict) -> dict:
    return {"namespaceSelector": sel}


def ip_block(cidr: str, *exc: str) -> dict:
    block = {"cidr": cidr}
    if exc:
        block["except"] = list(exc)
    return {"ipBlock": block}


A = labels(pod="a")
ALLOW_81_FROM_Y = netpol("allow-client-a-via-ns-selector", "x", A,
                         ingress=[from_(ns_sel(labels(**{NS_LABEL: "y"})), ports=[{"port": 81, "protocol": "TCP"}])])
ALLOW_80_FROM_Y = netpol("allow-client-a-via-ns-selector-80", "x", A,
                         ingress=[from_(ns_sel(labels(**{NS_LABEL: "y"})), ports=[{"port": 80, "protocol": "TCP"}])])
DENY_ALL_X = netpol("deny-all", "x", ingress=[], egress=[])
B_IP = f"{ip_of('x/b')}/32"

# (id, policies, [(protocol, port, expected)], pod label changes, namespace label changes)
CASES = [
    ("default-deny-ingress", [netpol("deny-ingress", "x", ingress=[])],
     [("TCP", 80, R().peer("", "x", False))], None, None),
    ("default-deny-all", [DENY_ALL_X],
     [("TCP", 80, R().peer("", "x", False).peer("x", "", False))], None, None),
    ("allow from pods within server namespace by podSelector",
     [netpol("x-a-allows-x-b", "x", A, ingress=[from_(pod_sel(labels(pod="b")))])],
     [("TCP", 80, R().all_ingress("x/a", False).expect("x/b", "x/a", True))], None, None),
    ("allow ingress for a target",
     [netpol("deny-all", "x", ingress=[]),
      netpol("allow-all-to-a", "x", A, ingress=[from_({"podSelector": {}, "namespaceSelector": {}})])],
     [("TCP", 80, R().peer("", "x", False).all_ingress("x/a", True))], None, None),
    ("allow ingress from pods in all namespaces",
     [netpol("allow-from-another-ns", "x", A, ingress=[from_(ns_sel({"matchLabels": {}}))])],
     [("TCP", 80, R())], None, None),
    ("allow only from a different namespace by namespaceSelector",
     [netpol("allow-client-a-via-ns-selector", "x", A, ingress=[from_(ns_sel(labels(**{NS_LABEL: "y"})))])],
     [("TCP", 80, R().peer("x", "x/a", False).peer("z", "x/a", False))], None, None),
    ("podSelector with matchExpressions",
     [netpol("x-a-allows-x-b", "x", A, ingress=[from_(pod_sel(expr("pod", "In", "b")))])],
     [("TCP", 80, R().all_ingress("x/a", False).expect("x/b", "x/a", True))], None, None),
    ("namespaceSelector with matchExpressions",
     [netpol("allow-ns-y-match-selector", "x", A, ingress=[from_(ns_sel(expr(NS_LABEL, "In", "y")))])],
     [("TCP", 80, R().peer("x", "x/a", False).peer("z", "x/a", False))], None, None),
    ("podSelector or namespaceSelector",
     [netpol("allow-ns-y-match-selector", "x", A,
             ingress=[from_(ns_sel(expr(NS_LABEL, "NotIn", "x")), pod_sel(labels(pod="b")))])],
     [("TCP", 80, R().expect("x/c", "x/a", False))], None, None),
    ("podSelector and namespaceSelector",
     [netpol("allow-ns-y-podselector-and-nsselector", "x", A,
             ingress=[from_({**ns_sel(expr(NS_LABEL, "NotIn", "x")), **pod_sel(labels(pod="b"))})])],
     [("TCP", 80, R().all_ingress("x/a", False).expect("y/b", "x/a", True).expect("z/b", "x/a", True))],
     None, None),
    ("multiple podSelectors and namespaceSelectors",
     [netpol("allow-ns-y-z-pod-b-c", "x", A,
             ingress=[from_({**ns_sel(expr(NS_LABEL, "NotIn", "x")), **pod_sel(expr("pod", "In", "b", "c"))})])],
     [("TCP", 80, R().all_ingress("x/a", False).expect("y/b", "x/a", True).expect("y/c", "x/a", True)
       .expect("z/b", "x/a", True).expect("z/c", "x/a", True))], None, None),
    ("any podSelectors",
     [netpol("allow-ns-x-pod-b-c", "x", A, ingress=[from_(pod_sel(labels(pod="b")), pod_sel(labels(pod="c")))])],
     [("TCP", 80, R().all_ingress("x/a", False).expect("x/b", "x/a", True).expect("x/c", "x/a", True))],
     None, None),
    ("only from a pod in a different namespace by podSelector and namespaceSelector",
     [netpol("allow-ns-y-pod-a", "x", A,
             ingress=[from_({**ns_sel(labels(**{NS_LABEL: "y"})), **pod_sel(labels(pod="a"))})])],
     [("TCP", 80, R().all_ingress("x/a", False).expect("y/a", "x/a", True))], None, None),
    ("ports", [ALLOW_81_FROM_Y],
     [("TCP", 81, R().peer("x", "x/a", False).peer("z", "x/a", False)),
      ("TCP", 80, R().all_ingress("x/a", False))], None, None),
    ("stacked policies with overlapping podSelectors", [ALLOW_81_FROM_Y, ALLOW_80_FROM_Y],
     [("TCP", 81, R().peer("x", "x/a", False).peer("z", "x/a", False)),
      ("TCP", 80, R().peer("x", "x/a", False).peer("z", "x/a", False))], None, None),
    ("allow-all", [netpol("allow-all", "x", ingress=[{}])],
     [("TCP", 80, R()), ("TCP", 81, R())], None, None),
    ("ingress on one named port",
     [netpol("allow-all", "x", ingress=[{"ports": [{"port": "serve-81-tcp"}]}])],
     [("TCP", 81, R()), ("TCP", 80, R().peer("", "x", False))], None, None),
    ("ingress from namespace on one named port",
     [netpol("allow-client-a-via-ns-selector-80", "x", A,
             ingress=[from_(ns_sel(labels(**{NS_LABEL: "y"})), ports=[{"port": "serve-80-tcp", "protocol": "TCP"}])])],
     [("TCP", 80, R().peer("x", "x/a", False).peer("z", "x/a", False)),
      ("TCP", 81, R().all_ingress("x/a", False))], None, None),
    ("egress on one named port",
     [netpol("allow-egress", "x", egress=[{"ports": [{"port": "serve-80-tcp"}]}])],
     [("TCP", 80, R()), ("TCP", 81, R().peer("x", "", False))], None, None),
    ("updated policy, before: allow all",
     [netpol("allow-all-mutate-to-deny-all", "x", ingress=[{}])], [("TCP", 81, R())], None, None),
    ("updated policy, after: deny all",
     [netpol("allow-all-mutate-to-deny-all", "x", ingress=[])],
     [("TCP", 81, R().peer("", "x", False))], None, None),
    ("ingress from updated namespace, before",
     [netpol("allow-client-a-via-ns-selector", "x", A, ingress=[from_(ns_sel(labels(ns2="updated")))])],
     [("TCP", 80, R().all_ingress("x/a", False))], None, None),
    ("ingress from updated namespace, after",
     [netpol("allow-client-a-via-ns-selector", "x", A, ingress=[from_(ns_sel(labels(ns2="updated")))])],
     [("TCP", 80, R().all_ingress("x/a", False).peer("y", "", True))], None, {"y": {"ns2": "updated"}}),
    ("ingress from updated pod, before",
     [netpol("allow-client-a-via-pod-selector", "x", A, ingress=[from_(pod_sel(labels(pod="b", pod2="updated")))])],
     [("TCP", 80, R().all_ingress("x/a", False))], None, None),
    ("ingress from updated pod, after",
     [netpol("allow-client-a-via-pod-selector", "x", A, ingress=[from_(pod_sel(labels(pod="b", pod2="updated")))])],
     [("TCP", 80, R().all_ingress("x/a", False).expect("x/b", "x/a", True))], {"x/b": {"pod2": "updated"}}, None),
    ("deny ingress from pods on other namespaces",
     [netpol("deny-empty-policy", "x", ingress=[from_(pod_sel({"matchLabels": {}}))])],
     [("TCP", 80, R().peer("y", "x", False).peer("z", "x", False))], None, None),
    ("deny ingress access to updated pod, before",
     [netpol("deny-ingress-via-label-selector", "x", labels(target="isolated"), ingress=[])],
     [("TCP", 80, R())], None, None),
    ("deny ingress access to updated pod, after",
     [netpol("deny-ingress-via-label-selector", "x", labels(target="isolated"), ingress=[])],
     [("TCP", 80, R().all_ingress("x/a", False))], {"x/a": {"target": "isolated"}}, None),
    ("deny egress from pods by podSelector", [netpol("deny-egress-pod-a", "x", A, egress=[])],
     [("TCP", 80, R().all_egress("x/a", False))], None, None),
    ("deny egress from all pods in a namespace", [netpol("deny-egress-ns-x", "x", egress=[])],
     [("TCP", 80, R().peer("x", "", False))], None, None),
    ("ingress and egress together",
     [netpol("allow-client-a-via-pod-selector", "x", A, ingress=[from_(pod_sel(labels(pod="b")))],
             egress=[{"ports": [{"port": 80}]}], types=["Egress", "Ingress"])],
     [("TCP", 80, R().all_ingress("x/a", False).expect("x/b", "x/a", True)),
      ("TCP", 81, R().all_ingress("x/a", False).all_egress("x/a", False).expect("x/b", "x/a", True))],
     None, None),
    ("egress denied on the client side although the server allows it",
     [netpol("allow-to-ns-y-pod-a", "x", A,
             egress=[to({**ns_sel(labels(**{NS_LABEL: "y"})), **pod_sel(labels(pod="a"))})]),
      netpol("allow-from-xa-on-ya", "y", A,
             ingress=[from_({**ns_sel(labels(**{NS_LABEL: "x"})), **pod_sel(labels(pod="a"))})]),
      netpol("allow-from-xa-on-yb", "y", labels(pod="b"),
             ingress=[from_({**ns_sel(labels(**{NS_LABEL: "x"})), **pod_sel(labels(pod="a"))})])],
     [("TCP", 80, R().peer("x/a", "", False).peer("", "y/a", False).expect("x/a", "y/a", True)
       .peer("", "y/b", False))], None, None),
    ("egress to a server in another namespace by podSelector and namespaceSelector",
     [netpol("allow-to-ns-y-pod-a", "x", A,
             egress=[to({**ns_sel(labels(**{NS_LABEL: "y"})), **pod_sel(labels(pod="a"))})])],
     [("TCP", 80, R().all_egress("x/a", False).expect("x/a", "y/a", True))], None, None),
    ("ingress any port on a specific protocol",
     [netpol("allow-ingress-by-proto", "x", A, ingress=[{"ports": [{"protocol": "TCP"}]}])],
     [("TCP", 80, R()), ("UDP", 80, R().all_ingress("x/a", False))], None, None),
    ("ingress allow-all takes precedence, before",
     [netpol("allow-ingress-port-80", "x", ingress=[{"ports": [{"port": 80}]}])],
     [("TCP", 81, R().peer("", "x", False))], None, None),
    ("ingress allow-all takes precedence, after",
     [netpol("allow-ingress-port-80", "x", ingress=[{"ports": [{"port": 80}]}]),
      netpol("allow-ingress", "x", ingress=[{}])], [("TCP", 81, R())], None, None),
    ("egress allow-all takes precedence, before",
     [netpol("allow-egress-port-80", "x", egress=[{"ports": [{"port": 80}]}])],
     [("TCP", 81, R().peer("x", "", False))], None, None),
    ("egress allow-all takes precedence, after",
     [netpol("allow-egress-port-80", "x", egress=[{"ports": [{"port": 80}]}]),
      netpol("allow-egress", "x", egress=[{}])], [("TCP", 81, R())], None, None),
    ("policies deleted: back to all allowed, before", [DENY_ALL_X],
     [("TCP", 80, R().peer("x", "", False).peer("", "x", False))], None, None),
    ("policies deleted: back to all allowed, after", [], [("TCP", 80, R())], None, None),
    ("egress to a server in a CIDR block",
     [netpol("allow-client-a-via-cidr-egress-rule", "x", A, egress=[to(ip_block(f"{ip_of('y/b')}/32"))])],
     [("TCP", 80, R().all_egress("x/a", False).expect("x/a", "y/b", True))], None, None),
    ("except clause in an egress CIDR block",
     [netpol("allow-client-a-via-cidr-egress-rule", "x", A, egress=[to(ip_block("0.0.0.0/4", B_IP))])],
     [("TCP", 80, R().expect("x/a", "x/b", False))], None, None),
    ("IP in both CIDR and except is allowed by a second policy (policy replaced)",
     [netpol("allow-client-a-via-cidr-egress-rule", "x", A, egress=[to(ip_block(B_IP))])],
     [("TCP", 80, R().all_egress("x/a", False).expect("x/a", "x/b", True))], None, None),
    ("ingress and egress controlled independently, egress allowed",
     [netpol("allow-egress-for-target", "x", A, egress=[{}])], [("TCP", 80, R())], None, None),
    ("ingress and egress controlled independently, ingress denied",
     [netpol("allow-egress-for-target", "x", A, egress=[{}]),
      netpol("deny-ingress-via-label-selector", "x", A, ingress=[])],
     [("TCP", 80, R().all_ingress("x/a", False))], None, None),
    ("SCTP is not TCP",
     [netpol("deny-ingress", "x", ingress=[]),
      netpol("allow-only-sctp-ingress-on-port-81", "x", A, ingress=[{"ports": [{"port": 81, "protocol": "SCTP"}]}])],
     [("TCP", 81, R().peer("", "x", False))], None, None),
    ("a policy allowing only SCTP isolates for TCP",
     [netpol("allow-only-sctp-ingress-on-port-80", "x", A, ingress=[{"ports": [{"port": 80, "protocol": "SCTP"}]}])],
     [("TCP", 81, R().all_ingress("x/a", False))], None, None),
    ("no TCP when a policy allows only UDP",
     [netpol("allow-only-udp-ingress-on-port-81", "x", A, ingress=[{"ports": [{"port": 81, "protocol": "UDP"}]}])],
     [("TCP", 81, R().all_ingress("x/a", False)), ("UDP", 81, R())], None, None),
    ("namespaceSelector matchLabels on the default namespace label",
     [netpol("allow-client-a-via-ns-selector-for-immutable-ns-label", "x", A,
             ingress=[from_(ns_sel(labels(**{NS_LABEL: "y"})))])],
     [("TCP", 80, R().peer("x", "x/a", False).peer("z", "x/a", False))], None, None),
    ("namespaceSelector matchExpressions on the default namespace label, egress",
     [netpol("allow-ns-y-match-selector-for-immutable-ns-label", "x", A,
             egress=[to(ns_sel(expr(NS_LABEL, "NotIn", "y")))])],
     [("TCP", 80, R().peer("x/a", "y", False))], None, None),
    ("UDP default-deny-ingress", [netpol("deny-all", "x", ingress=[])],
     [("UDP", 80, R().peer("", "x", False))], None, None),
    ("UDP ports",
     [netpol("allow-ingress-on-port-81-ns-x", "x", A,
             ingress=[from_(ns_sel(labels(**{NS_LABEL: "y"})), ports=[{"port": 81, "protocol": "UDP"}])])],
     [("UDP", 81, R().peer("x", "x/a", False).peer("z", "x/a", False)),
      ("TCP", 81, R().all_ingress("x/a", False))], None, None),
    ("UDP only from a pod in a different namespace by podSelector and namespaceSelector",
     [netpol("allow-ns-y-pod-a", "x", A,
             ingress=[from_({**ns_sel(labels(**{NS_LABEL: "y"})), **pod_sel(labels(pod="a"))})])],
     [("UDP", 80, R().all_ingress("x/a", False).expect("y/a", "x/a", True))], None, None),
]


def mismatches(objects: list[dict], protocol: str, port: int, expected: Reach) -> list[str]:
    c = compiled(objects)
    out = []
    for src in ALL:
        for dst in ALL:
            want = True if src == dst else expected.m[src, dst]
            got = verdict(c, ip_of(src), ip_of(dst), protocol, port)
            if got != want:
                out.append(f"{src} -> {dst} {protocol}/{port}: expected {'allow' if want else 'deny'}, "
                           f"got {'allow' if got else 'deny'}")
    return out


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_e2e_case(case):
    _, policies, checks, pod_labels, ns_labels = case
    objects = world(policies, pod_labels, ns_labels)
    problems = [m for protocol, port, expected in checks for m in mismatches(objects, protocol, port, expected)]
    assert not problems, "\n".join(problems)
