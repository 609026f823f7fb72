"""Weighted splitting (issue 13): routes read from files, resolved into the
parent frontend's ServicePort, planned as weighted slots."""

from __future__ import annotations

from collections import Counter
from fractions import Fraction
from pathlib import Path

import pytest
import yaml

from meshbpf.reconcile import SLOT_REFUSE, LBState, plan, wanted_service, wanted_services
from meshbpf.reconcile.incremental import LBIndex, plan_services
from meshbpf.reconcile.split import SPLIT_SLOTS, slot_shares, split_budget
from meshbpf.sources.yaml_file import read_config

from k8s_builders import endpoint_slice, ep, fe, service
from reconcile_checks import check_realises, check_transition, members

V4 = {"web": "10.96.0.10", "v1": "10.96.1.1", "v2": "10.96.1.2", "v3": "10.96.1.3"}
V6 = {"web": "fd00::10", "v1": "fd00::1:1", "v2": "fd00::1:2", "v3": "fd00::1:3"}


def route(weights: dict[str, int], *, kind: str = "TCPRoute", name: str = "split",
          parent_port: int | None = None, port: int = 80) -> dict:
    parent = {"group": "", "kind": "Service", "name": "web"}
    if parent_port is not None:
        parent["port"] = parent_port
    return {"apiVersion": "gateway.networking.k8s.io/v1alpha2", "kind": kind,
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"parentRefs": [parent],
                     "rules": [{"backendRefs": [{"name": n, "port": port, "weight": w}
                                                for n, w in weights.items()]}]}}


def cluster(endpoints: dict[str, int], *, ips: dict[str, str] = V4, protocol: str = "TCP") -> list[dict]:
    """web plus backend Services v1..v3, each with the given endpoint count;
    the i-th Service's endpoints are 10.<i+1>.0.x (or fd01:<i+1>::x)."""
    objs = []
    v6 = ":" in ips["web"]
    for i, (name, count) in enumerate({"web": 1, **endpoints}.items()):
        addrs = [f"fd01:{i + 1}::{j + 1}" if v6 else f"10.{i + 1}.0.{j + 1}" for j in range(count)]
        objs.append(service(name, ips.get(name, "10.96.9.9"),
                            ports=[{"name": "p", "port": 80, "protocol": protocol, "targetPort": 8080}]))
        objs.append(endpoint_slice(f"{name}-abc", name, [ep(a) for a in addrs],
                                   ports=[{"name": "p", "port": 8080, "protocol": protocol}],
                                   address_type="IPv6" if v6 else "IPv4"))
    return objs


def read(tmp_path: Path, objs: list[dict]):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump_all(objs))
    return read_config(tmp_path / "c.yaml")


def service_share(result, parent: str = V4["web"], protocol: str = "TCP") -> dict[str, int]:
    """Slots per backend Service (by its endpoints' 10.N. prefix) of the parent."""
    import ipaddress
    sp = result.state.service_ports[fe(parent, 80, protocol)]
    _, want = wanted_service(sp)
    owner = {}
    for share in sp.split:
        for e in share.endpoints:
            owner[(e.address, e.port)] = share.service.split("/")[1].split(":")[0]
    counts: Counter = Counter()
    for be, state in want.backends:
        if state == SLOT_REFUSE:
            counts["refused"] += 1
            continue
        addr = ipaddress.ip_address(be.addr)
        addr = addr.ipv4_mapped or addr
        counts[owner[(addr, be.port)]] += 1
    return dict(counts)


@pytest.mark.parametrize("weights,endpoints,slots", [
    ({"v1": 70, "v2": 30}, {"v1": 3, "v2": 1}, 30),
    ({"v1": 50, "v2": 30, "v3": 20}, {"v1": 1, "v2": 4, "v3": 3}, 120),
    ({"v1": 1, "v2": 1, "v3": 1}, {"v1": 7, "v2": 2, "v3": 1}, 42),
])
def test_shares_are_exact_in_the_fewest_slots(tmp_path, weights, endpoints, slots):
    result = read(tmp_path, cluster(endpoints) + [route(weights)])
    shares = service_share(result)
    assert sum(shares.values()) == slots
    assert fractions(shares) == fractions(weights)
    # Within a backend Service its endpoints get the same number of slots.
    assert max_endpoint_spread(result) == 0


def test_weights_needing_more_than_the_cap_are_within_one_slot(tmp_path):
    """1:999 over 1 and 2 endpoints would take 2 000 slots to be exact."""
    weights = {"v1": 1, "v2": 999}
    result = read(tmp_path, cluster({"v1": 1, "v2": 2}) + [route(weights)])
    shares = service_share(result)
    assert sum(shares.values()) == SPLIT_SLOTS
    for name, w in weights.items():
        assert abs(shares[name] / SPLIT_SLOTS - w / 1000) <= 1 / SPLIT_SLOTS
    assert max_endpoint_spread(result) == 1


def max_endpoint_spread(result) -> int:
    """The most slots by which two endpoints of one backend Service differ."""
    sp = result.state.service_ports[fe(V4["web"], 80)]
    per_endpoint = Counter(be for be, _ in wanted_service(sp)[1].backends)
    spread = 0
    for share in sp.split:
        mine = [n for be, n in per_endpoint.items()
                if any(be.addr.endswith(e.address.packed) for e in share.endpoints)]
        assert len(mine) == len(share.endpoints)
        spread = max(spread, max(mine) - min(mine))
    return spread


def fractions(counts: dict[str, int]) -> dict[str, Fraction]:
    total = sum(counts.values())
    return {name: Fraction(n, total) for name, n in counts.items() if n}


def test_a_client_ip_parent_keeps_the_full_budget(tmp_path):
    """Session affinity remembers a slot: a budget that followed the weights
    would move every client whose slot went past the new count."""
    objs = cluster({"v1": 2, "v2": 1})
    objs[0]["spec"]["sessionAffinity"] = "ClientIP"
    result = read(tmp_path, objs + [route({"v1": 70, "v2": 30})])
    assert service_share(result) == {"v1": 700, "v2": 300}


def test_split_budget():
    assert split_budget([50, 50], [2, 2]) == 4
    assert split_budget([70, 30], [3, 1]) == 30
    assert split_budget([3, 5], [2, 1]) == 16       # a refused share counts as one member
    assert split_budget([1, 999], [1, 1]) == 1000
    assert split_budget([1, 999], [1, 2]) == SPLIT_SLOTS  # exact would take 2 000
    assert split_budget([7], [5]) == 5


def test_largest_remainder_is_exact():
    assert slot_shares([1, 1, 1], 1000) == [334, 333, 333]
    assert slot_shares([0, 5], 1000) == [0, 1000]
    assert slot_shares([0, 0], 1000) == [0, 0]
    assert sum(slot_shares([3, 7, 11, 13], 1000)) == 1000


def test_no_route_is_today(tmp_path):
    plain = read(tmp_path, cluster({"v1": 2, "v2": 1}))
    sp = plain.state.service_ports[fe(V4["web"], 80)]
    assert not sp.split and len(wanted_service(sp)[1].backends) == 1


def test_weight_zero_gets_no_slots_and_a_missing_backend_is_refused(tmp_path):
    result = read(tmp_path, cluster({"v1": 2, "v2": 1}) + [route({"v1": 3, "v2": 0, "gone": 5})])
    assert fractions(service_share(result)) == {"v1": Fraction(3, 8), "refused": Fraction(5, 8)}
    assert any("gone" in n and "does not exist" in n for n in result.notes)


def test_backend_service_without_endpoints_is_refused(tmp_path):
    objs = cluster({"v1": 1, "v2": 1})
    objs[-1]["endpoints"] = []  # v2's slice: no endpoint
    shares = service_share(read(tmp_path, objs + [route({"v1": 70, "v2": 30})]))
    assert fractions(shares) == {"v1": Fraction(7, 10), "refused": Fraction(3, 10)}


def test_udp_route_splits_udp_ports_only(tmp_path):
    objs = cluster({"v1": 1, "v2": 1}, protocol="UDP") + [route({"v1": 70, "v2": 30}, kind="UDPRoute")]
    result = read(tmp_path, objs)
    assert fractions(service_share(result, protocol="UDP")) == {"v1": Fraction(7, 10), "v2": Fraction(3, 10)}
    # A TCPRoute on a UDP-only parent splits nothing, and says so.
    tcp = read(tmp_path, cluster({"v1": 1, "v2": 1}, protocol="UDP") + [route({"v1": 1})])
    assert not tcp.state.service_ports[fe(V4["web"], 80, "UDP")].split
    assert any("has no TCP port" in n for n in tcp.notes)


def test_ipv6(tmp_path):
    result = read(tmp_path, cluster({"v1": 2, "v2": 3}, ips=V6) + [route({"v1": 50, "v2": 50})])
    sp = result.state.service_ports[fe(V6["web"], 80)]
    _, want = wanted_service(sp)
    assert len(want.backends) == 12  # 50/50 over 2 and 3 endpoints: 6 + 6
    assert Counter(be.addr[:15] for be, _ in want.backends)  # all IPv6 backends
    assert all(not be.addr.startswith(b"\0" * 10 + b"\xff\xff") for be, _ in want.backends)


def test_bad_route_is_left_out_alone(tmp_path):
    bad = route({"v1": 1}, name="bad")
    bad["spec"]["rules"][0]["backendRefs"][0]["weight"] = -1
    good = route({"v1": 1, "v2": 1}, name="good", kind="TCPRoute")
    result = read(tmp_path, cluster({"v1": 1, "v2": 1}) + [bad, good])
    (problem,) = [str(p) for p in result.skipped]
    assert problem.startswith(f"{tmp_path / 'c.yaml'}: document 7 (line ")
    assert problem.endswith("(TCPRoute default/bad): spec.rules[0].backendRefs[0].weight: "
                            "must be an integer from 0 to 1000000, not -1")
    assert fractions(service_share(result)) == {"v1": Fraction(1, 2), "v2": Fraction(1, 2)}


def backend_of_another_kind(r: dict, name: str) -> dict:
    r["spec"]["rules"][0]["backendRefs"].append({"group": "example.com", "kind": "Bucket", "name": name,
                                                 "port": 80, "weight": 1})
    return r


@pytest.mark.parametrize("field, value, reason", [
    (("metadata", "name"), "Split_1", "'Split_1' is not a DNS-1123 subdomain"),
    (("metadata", "namespace"), "Default", "'Default' is not a DNS-1123 label"),
    (("metadata", "namespace"), "n" * 64, "64 characters; Kubernetes requires of namespaces a DNS-1123 label"),
    (("spec", "parentRefs", 0, "name"), "w" * 254, "254 characters; the Gateway API takes names of at most 253"),
    (("spec", "rules", 0, "backendRefs", 0, "namespace"), "Other", "'Other' is not a DNS-1123 label"),
    # Not a Service: the Gateway API's ObjectName, of at most 253 characters.
    (("spec", "rules", 0, "backendRefs", 1, "name"), "b" * 254,
     "254 characters; the Gateway API takes names of at most 253"),
])
def test_a_name_kubernetes_would_refuse_leaves_the_route_out_alone(tmp_path, field, value, reason):
    """As the CRD and the API server check them: the route is left out with
    one problem naming file, document and field; the other route applies."""
    from wrong_types import replaced
    bad = replaced(backend_of_another_kind(route({"v1": 1}, name="bad"), "bucket"), field, value)
    result = read(tmp_path, cluster({"v1": 1, "v2": 1}) + [bad, route({"v1": 1, "v2": 1}, name="good")])
    path = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in field).lstrip(".")
    (problem,) = [str(p) for p in result.skipped]
    assert problem.startswith(f"{tmp_path / 'c.yaml'}: document 7 (line "), problem
    assert f"): {path}: {reason}" in problem and len(problem.splitlines()) == 1, problem
    assert [r.name for r in result.state.routes] == ["good"]
    assert fractions(service_share(result)) == {"v1": Fraction(1, 2), "v2": Fraction(1, 2)}


@pytest.mark.parametrize("name", ["1web", "v1\nx", "V1"])
def test_a_backend_name_no_service_can_have_is_a_missing_backend(tmp_path, name):
    """The CRD takes any ObjectName there; such a name names no Service, so
    its share is refused (BackendNotFound), as for any missing backend, and
    the note about it stays one line."""
    result = read(tmp_path, cluster({"v1": 1, "v2": 1}) + [route({"v1": 1, name: 1})])
    assert not result.skipped
    assert fractions(service_share(result)) == {"v1": Fraction(1, 2), "refused": Fraction(1, 2)}
    (note,) = [n for n in result.notes if "does not exist" in n]
    assert len(note.splitlines()) == 1


def test_names_the_api_server_takes_are_read(tmp_path):
    """A subdomain as the route's name; a name a Service cannot have is
    still an ObjectName for a backend of another kind (refused as InvalidKind)."""
    r = backend_of_another_kind(route({"v1": 1}, name="split.v2"), "Bucket_1.x")
    result = read(tmp_path, cluster({"v1": 1}) + [r])
    assert not result.skipped
    (read_route,) = result.state.routes
    assert read_route.name == "split.v2" and read_route.backend_refs[1].invalid == "InvalidKind"


def test_unknown_field_is_named(tmp_path):
    bad = route({"v1": 1})
    bad["spec"]["rules"][0]["backendRefs"][0]["wieght"] = 3
    result = read(tmp_path, cluster({"v1": 1}) + [bad])
    assert "spec.rules[0].backendRefs[0].wieght: unknown field" in str(result.skipped[0])
    assert not result.state.routes


def test_gateway_parent_is_not_ours(tmp_path):
    r = route({"v1": 1})
    r["spec"]["parentRefs"] = [{"name": "my-gateway"}]
    result = read(tmp_path, cluster({"v1": 1}) + [r])
    assert not result.skipped and not result.state.routes
    assert not result.state.service_ports[fe(V4["web"], 80)].split


def plan_and_apply(state: LBState, want) -> tuple[LBState, object]:
    p = plan(state, want)
    check_transition(state, want, p)
    new = p.apply_to(state)
    check_realises(new, want)
    return new, p


def test_weight_change_rewrites_only_moved_slots(tmp_path):
    # 70/30 and 90/10 over one endpoint each: 10 slots both; 2 move from v2 to v1.
    before = wanted_services(read(tmp_path, cluster({"v1": 1, "v2": 1}) + [route({"v1": 70, "v2": 30})]).state)
    after = wanted_services(read(tmp_path, cluster({"v1": 1, "v2": 1}) + [route({"v1": 90, "v2": 10})]).state)
    state, _ = plan_and_apply(LBState(), before)
    state, p = plan_and_apply(state, after)
    assert len(p.slot_updates) == 2 and not p.slot_deletes and not p.backend_updates
    # The same again plans nothing; the incremental planner agrees with plan().
    assert not plan(state, after)
    index_state = plan(LBState(), before).apply_to(LBState())
    inc = plan_services(index_state, LBIndex(index_state), after)
    assert inc.slot_updates == plan(index_state, after).slot_updates


def test_backend_service_removed_and_route_deleted(tmp_path):
    objs = cluster({"v1": 2, "v2": 1})
    split = wanted_services(read(tmp_path, objs + [route({"v1": 70, "v2": 30})]).state)
    state, _ = plan_and_apply(LBState(), split)
    key = next(k for k, w in split.items() if w.name.startswith("default/web"))
    # v2 removed: its 6 slots of 20 now refuse; v1 keeps the slots it held.
    no_v2 = [o for o in objs if o["metadata"]["name"] not in ("v2", "v2-abc")]
    gone = wanted_services(read(tmp_path, no_v2 + [route({"v1": 70, "v2": 30})]).state)
    state, p = plan_and_apply(state, gone)
    assert len(p.slot_updates) == 6 and len(p.backend_deletes) == 1
    assert {v.state for v in p.slot_updates.values()} == {SLOT_REFUSE}
    # Route deleted: the parent goes back to its own endpoint, one slot.
    plain = wanted_services(read(tmp_path, no_v2).state)
    state, p = plan_and_apply(state, plain)
    assert state.services[key].count == 1 and len(members(state, key)) == 1


def test_service_list_shows_each_backend_share(tmp_path):
    from meshbpf.cli.inspect_cmd import services_view
    want = wanted_services(read(tmp_path, cluster({"v1": 2, "v2": 1}) + [route({"v1": 70, "v2": 30})]).state)
    state = plan(LBState(), want).apply_to(LBState())
    view = {s["frontend"]: s for s in services_view(state)}
    shares = {b["address"]: (b["slots"], b["share"]) for b in view["10.96.0.10:80/TCP"]["shares"]}
    assert shares == {"10.2.0.1:8080": (7, 0.35), "10.2.0.2:8080": (7, 0.35), "10.3.0.1:8080": (6, 0.3)}
    assert [b["slots"] for b in view["10.96.1.1:80/TCP"]["shares"]] == [1, 1]


def test_file_source_sees_a_backend_service_change_through_the_route(tmp_path):
    """A backend Service edited in another file than the route: the parent's
    split follows (the incremental file path would not know the parent)."""
    import os
    from meshbpf.sources.yaml_file import FileSource
    folder = tmp_path / "cfg"
    folder.mkdir()
    (folder / "routes.yaml").write_text(yaml.safe_dump(route({"v1": 70, "v2": 30})))
    services_file = folder / "services.yaml"
    services_file.write_text(yaml.safe_dump_all(cluster({"v1": 1, "v2": 1})))
    src = FileSource(folder, settle_s=0, hold_s=0)
    first = src.poll()
    assert len(first.service_ports[fe(V4["web"], 80)].split[1].endpoints) == 1
    services_file.write_text(yaml.safe_dump_all(cluster({"v1": 1, "v2": 3})))
    os.utime(services_file, ns=(1, 1))  # settled at once, whatever the clock
    second = src.poll()
    assert second is not None
    assert len(second.service_ports[fe(V4["web"], 80)].split[1].endpoints) == 3


@pytest.mark.parametrize("seed", range(10))
def test_random_split_changes_plan_minimal_writes_and_incremental_equals_full(tmp_path, seed):
    """Weights, endpoint counts and backend Services change at random: every
    plan is safe mid-way, realises the wanted state, writes only the slots
    whose content must change (a backend keeps as many of its positions as it
    still fills), and the incremental planner gives the full plan's writes."""
    import random
    rng = random.Random(seed)
    state, index = LBState(), None
    for _ in range(8):
        endpoints = {n: rng.randint(0, 4) for n in ("v1", "v2", "v3") if rng.random() < 0.9}
        weights = {n: rng.choice([0, 1, 3, 7, 50]) for n in ("v1", "v2", "v3") if rng.random() < 0.8}
        objs = cluster(endpoints) + ([route(weights)] if weights else [])
        want = wanted_services(read(tmp_path, objs).state)
        full = plan(state, want)
        if index is not None:
            inc = plan_services(state, index, {**want, **{k: None for k in state.services if k not in want}})
            assert (inc.slot_updates, sorted(inc.slot_deletes)) == (full.slot_updates, sorted(full.slot_deletes))
            assert (inc.backend_updates, sorted(inc.backend_deletes)) == (
                full.backend_updates, sorted(full.backend_deletes))
        writes = Counter(sk.svc_id for sk in [*full.slot_updates, *full.slot_deletes])
        for key, w in want.items():
            old = state.services.get(key)
            if old is None:
                continue
            m, n = old.count, len(w.backends)
            old_slots = members(state, key)[:min(m, n)]
            old_pairs = set(old_slots)
            old_count = Counter(be for be, _ in old_slots)
            new_count = Counter(be for be, _ in w.backends)
            new_state = dict(reversed(w.backends))  # a backend's first state, as the planner keeps
            keepable = sum(min(old_count[be], new_count[be]) for be in new_count
                           if (be, new_state[be]) in old_pairs)
            assert writes[old.svc_id] == n - keepable + max(0, m - n), w.name
        check_transition(state, want, full, granularity="step")  # per entry: 1000s of state copies
        state = full.apply_to(state)
        check_realises(state, want)
        index = LBIndex(state)


def test_a_bad_route_edit_keeps_the_previous_version(tmp_path):
    """Like a bad Service edit: the route's last good version stays (the
    parent keeps its split), the problem is reported; fixing it applies."""
    import os
    from meshbpf.sources.yaml_file import FileSource
    folder = tmp_path / "cfg"
    folder.mkdir()
    (folder / "services.yaml").write_text(yaml.safe_dump_all(cluster({"v1": 1, "v2": 1})))
    routes_file = folder / "routes.yaml"

    def write_route(weights: dict, stamp: int) -> None:
        routes_file.write_text(yaml.safe_dump(route(weights)))
        os.utime(routes_file, ns=(stamp, stamp))  # settled at once, whatever the clock

    def weights(state) -> dict:
        return {s.service: s.weight for s in state.service_ports[fe(V4["web"], 80)].split}

    write_route({"v1": 70, "v2": 30}, 1)
    src = FileSource(folder, settle_s=0, hold_s=0)
    assert weights(src.poll()) == {"default/v1:80": 70, "default/v2:80": 30}
    write_route({"v1": 70, "v2": -5}, 2)
    kept = src.poll()
    assert kept is None or weights(kept) == {"default/v1:80": 70, "default/v2:80": 30}
    assert weights(src._read_state) == {"default/v1:80": 70, "default/v2:80": 30}
    (problem,) = src.problems
    assert "(TCPRoute default/split): spec.rules[0].backendRefs[1].weight" in problem
    write_route({"v1": 40, "v2": 60}, 3)
    assert weights(src.poll()) == {"default/v1:80": 40, "default/v2:80": 60}
    assert not src.problems
    # A route that was never good is left out: nothing to keep.
    first_bad = read(tmp_path, cluster({"v1": 1}) + [route({"v1": -1})])
    assert not first_bad.state.routes and first_bad.skipped
