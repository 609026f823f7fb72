"""Compiler semantics the e2e suite does not pin down: endPort, named ports
(protocol and destination pod), hostNetwork pods, other nodes, IPv6, the
allow-set shape a datapath will load."""

from __future__ import annotations

import ipaddress

from meshbpf.policy.compile import AllowRule, PortRange, compile_policies, verdict
from meshbpf.policy.model import (IPBlock, LabelSelector, NamespaceInfo, NetworkPolicy, Peer,
                                  PodInfo, PolicyPort, Requirement, Rule)
from policy_world import ALL, compiled, ip_of, netpol, pod_obj, world

ip = ipaddress.ip_address
net = ipaddress.ip_network


def pod(ns, name, addr, node="n1", labels=None, ports=None, host=False):
    return PodInfo(ns, name, f"uid-{name}", labels or {"pod": name}, node, host, ports or {},
                   (ip(addr),) if addr else ())


def ingress_only(ns, selector, *rules):
    return NetworkPolicy(ns, "p", selector, frozenset({"Ingress"}), tuple(rules))


def test_end_port_range_is_inclusive():
    objects = world([netpol("range", "x", {"matchLabels": {"pod": "a"}},
                            ingress=[{"ports": [{"port": 81, "endPort": 90}]}])])
    c = compiled(objects)
    allowed = {port: verdict(c, ip_of("y/a"), ip_of("x/a"), "TCP", port) for port in (80, 81, 85, 90, 91)}
    assert allowed == {80: False, 81: True, 85: True, 90: True, 91: False}
    assert c.pods["x", "a"].ingress == (AllowRule(None, (PortRange("TCP", 81, 90),)),)


def test_named_port_needs_the_same_protocol():
    p = pod("x", "a", "10.0.0.1", ports={"dns": ("UDP", 53)})
    client = pod("x", "b", "10.0.0.2")
    policy = ingress_only("x", LabelSelector.of({"pod": "a"}), Rule((), (PolicyPort("TCP", "dns"),)))
    c = compile_policies([p, client], [], [policy], "n1")
    assert not verdict(c, "10.0.0.2", "10.0.0.1", "TCP", 53)
    assert not verdict(c, "10.0.0.2", "10.0.0.1", "UDP", 53)
    policy = ingress_only("x", LabelSelector.of({"pod": "a"}), Rule((), (PolicyPort("UDP", "dns"),)))
    c = compile_policies([p, client], [], [policy], "n1")
    assert verdict(c, "10.0.0.2", "10.0.0.1", "UDP", 53)


def test_egress_named_port_resolves_against_each_destination_pod():
    src = pod("x", "a", "10.0.0.1")
    web1 = pod("x", "w1", "10.0.0.2", ports={"http": ("TCP", 8080)})
    web2 = pod("x", "w2", "10.0.0.3", ports={"http": ("TCP", 9090)})
    policy = NetworkPolicy("x", "e", LabelSelector.of({"pod": "a"}), frozenset({"Egress"}), (),
                           (Rule((), (PolicyPort("TCP", "http"),)),))
    c = compile_policies([src, web1, web2], [], [policy], "n1")
    assert verdict(c, "10.0.0.1", "10.0.0.2", "TCP", 8080)
    assert not verdict(c, "10.0.0.1", "10.0.0.2", "TCP", 9090)
    assert verdict(c, "10.0.0.1", "10.0.0.3", "TCP", 9090)
    assert not verdict(c, "10.0.0.1", "10.0.0.3", "TCP", 8080)
    assert not verdict(c, "10.0.0.1", "192.0.2.1", "TCP", 8080)  # not a pod: no name to resolve


def test_host_network_pods_are_never_selected_and_count_as_their_node():
    server = pod("x", "a", "10.0.0.1")
    hostpod = pod("x", "h", "192.168.1.10", node="n2", host=True, labels={"role": "agent"})
    policy = ingress_only("x", LabelSelector(), Rule((Peer(pod_selector=LabelSelector.of({"role": "agent"})),)))
    c = compile_policies([server, hostpod], [], [policy], "n1",
                         node_ips={"n2": [ip("192.168.1.10"), ip("192.168.1.11")]})
    assert ("x", "h") not in c.pods
    assert c.pods["x", "a"].ingress[0].peers == {net("192.168.1.10/32"), net("192.168.1.11/32")}
    assert verdict(c, "192.168.1.11", "10.0.0.1", "TCP", 80)
    assert not verdict(c, "10.0.0.9", "10.0.0.1", "TCP", 80)


def test_only_pods_of_this_node_are_compiled_but_all_are_peers():
    local = pod("x", "a", "10.0.0.1", node="n1")
    remote = pod("x", "b", "10.0.1.1", node="n2")
    policy = ingress_only("x", LabelSelector(), Rule((Peer(pod_selector=LabelSelector.of({"pod": "b"})),)))
    c = compile_policies([local, remote], [], [policy], "n1")
    assert list(c.pods) == [("x", "a")]
    assert verdict(c, "10.0.1.1", "10.0.0.1", "TCP", 80)
    # The remote pod's ingress is its own node's business.
    assert verdict(c, "10.0.0.1", "10.0.1.1", "TCP", 80)


def test_ipv6_pods_and_blocks():
    a = PodInfo("x", "a", "u", {"pod": "a"}, "n1", False, {}, (ip("10.0.0.1"), ip("fd00::1")))
    policy = ingress_only("x", LabelSelector(),
                          Rule((Peer(ip_block=IPBlock(net("fd00::/64"), (net("fd00::bad/128"),))),)))
    c = compile_policies([a], [], [policy], "n1")
    assert verdict(c, "fd00::2", "fd00::1", "TCP", 80)
    assert not verdict(c, "fd00::bad", "fd00::1", "TCP", 80)
    assert not verdict(c, "10.0.0.2", "10.0.0.1", "TCP", 80)


def test_a_pod_always_reaches_itself():
    a = pod("x", "a", "10.0.0.1")
    policy = NetworkPolicy("x", "deny", LabelSelector(), frozenset({"Ingress", "Egress"}))
    c = compile_policies([a], [], [policy], "n1")
    assert verdict(c, "10.0.0.1", "10.0.0.1", "UDP", 53)


def test_namespace_without_an_object_still_has_its_name_label():
    a = pod("x", "a", "10.0.0.1")
    b = pod("y", "b", "10.0.0.2")
    sel = LabelSelector.of({"kubernetes.io/metadata.name": "y"})
    c = compile_policies([a, b], [], [ingress_only("x", LabelSelector(), Rule((Peer(namespace_selector=sel),)))], "n1")
    assert verdict(c, "10.0.0.2", "10.0.0.1", "TCP", 80)
    c = compile_policies([a, b], [NamespaceInfo("y", {"team": "b"})],
                         [ingress_only("x", LabelSelector(), Rule((Peer(namespace_selector=sel),)))], "n1")
    assert not verdict(c, "10.0.0.2", "10.0.0.1", "TCP", 80)


def test_selector_operators():
    lab = {"a": "1", "b": "2"}
    assert LabelSelector().matches({})
    assert LabelSelector.of({}, Requirement("a", "In", ("1", "3"))).matches(lab)
    assert not LabelSelector.of({}, Requirement("a", "NotIn", ("1",))).matches(lab)
    assert LabelSelector.of({}, Requirement("c", "NotIn", ("1",))).matches(lab)
    assert LabelSelector.of({}, Requirement("b", "Exists")).matches(lab)
    assert not LabelSelector.of({}, Requirement("b", "DoesNotExist")).matches(lab)
    assert not LabelSelector.of({"a": "1"}, Requirement("c", "Exists")).matches(lab)


def test_finished_pods_are_not_peers():
    objects = world([])
    done = pod_obj("z/a")
    done["status"]["phase"] = "Succeeded"
    objects = [o for o in objects if not (o["kind"] == "Pod" and o["metadata"]["namespace"] == "z"
                                          and o["metadata"]["name"] == "a")] + [done]
    c = compiled(objects)
    assert ("z", "a") not in c.pods
    assert len(c.pods) == len(ALL) - 1


def _inputs(objects):
    from meshbpf.sources.kube_objects import SourceObject
    from meshbpf.sources.kube_policy import read_policy_objects
    inputs = read_policy_objects(SourceObject(o, f"t.yaml: document {i + 1}") for i, o in enumerate(objects))
    assert not inputs.problems
    return inputs


def _exact(c):
    """A compiled result with the rules' origins (left out of AllowRule equality)."""
    return c, {k: ([a.origin for a in p.ingress], [a.origin for a in p.egress]) for k, p in c.pods.items()}


def test_incremental_compile_equals_the_full_one_over_random_edits():
    """PolicyCompiler keeps work between compiles; over random sequences of
    policy edits, pod relabels, pods moving node or address, namespace
    relabels and node IP changes, every result is exactly compile_policies'."""
    import copy
    import random

    from meshbpf.policy.compile import PolicyCompiler
    from test_policy_plan import random_policy
    for seed in range(10):
        rnd = random.Random(seed)
        compiler = PolicyCompiler()
        policies, pod_labels, ns_labels, pods_extra = {}, {}, {}, {}
        node_ips = {"node-1": (ip("192.168.50.1"),)}
        order = rnd.sample(ALL, len(ALL))   # pods of a namespace need not be listed together
        for _ in range(25):
            what = rnd.random()
            if what < 0.5:
                name = f"p{rnd.randrange(5)}"
                policies[name] = random_policy(rnd, name)
                if rnd.random() < 0.3:   # an egress rule by port name
                    policies[name]["spec"].setdefault("egress", []).append(
                        {"to": [{"namespaceSelector": {}}], "ports": [{"port": "serve-81-tcp"}]})
                if rnd.random() < 0.3:
                    policies[name]["spec"].setdefault("ingress", []).append(
                        {"from": [{"namespaceSelector": {"matchLabels": {"team": "t"}}}]})
                    policies[name]["spec"]["policyTypes"] = ["Ingress", "Egress"]
            elif what < 0.6 and policies:
                del policies[rnd.choice(sorted(policies))]
            elif what < 0.75:
                pod_labels[rnd.choice(ALL)] = {"pod": rnd.choice("abcd")}
            elif what < 0.85:
                ns_labels[rnd.choice("xyz")] = {"team": rnd.choice("tu")}
            elif what < 0.93:
                who = rnd.choice(ALL)
                pods_extra[who] = {"nodeName": rnd.choice(["node-1", "node-2"]),
                                   "hostNetwork": rnd.random() < 0.3}
            else:
                node_ips = {"node-1": (ip(rnd.choice(["192.168.50.1", "192.168.50.2"])),)}
            objects = ([ns_obj for ns_obj in world([], pod_labels, ns_labels) if ns_obj["kind"] == "Namespace"]
                       + [pod_obj(p, pod_labels.get(p), **pods_extra.get(p, {})) for p in order]
                       + copy.deepcopy(list(policies.values())))
            inputs = _inputs(objects)
            args = (inputs.pods, inputs.namespaces, inputs.policies, "node-1", node_ips)
            assert _exact(compiler.compile(*args)) == _exact(compile_policies(*args))


def test_incremental_compile_reuses_the_unchanged_pods():
    from meshbpf.policy.compile import PolicyCompiler
    base = [netpol("a", "x", {"matchLabels": {"pod": "a"}}, ingress=[{"ports": [{"port": 80}]}]),
            netpol("b", "y", {"matchLabels": {"pod": "b"}}, ingress=[{"ports": [{"port": 80}]}])]
    compiler = PolicyCompiler()
    first = _inputs(world(base))
    c1 = compiler.compile(first.pods, first.namespaces, first.policies, "node-1")
    edited = _inputs(world([base[0], netpol("b", "y", {"matchLabels": {"pod": "b"}},
                                            ingress=[{"ports": [{"port": 81}]}])]))
    c2 = compiler.compile(first.pods, first.namespaces, edited.policies, "node-1")
    assert c2.pods[("x", "a")] is c1.pods[("x", "a")]        # not selected by the edit: kept
    assert c2.pods[("y", "b")] != c1.pods[("y", "b")]
    assert c2.pods == compile_policies(first.pods, first.namespaces, edited.policies, "node-1").pods
