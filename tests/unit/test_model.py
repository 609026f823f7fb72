"""usable_endpoints: which endpoints new connections may go to (kube-proxy rules)."""

from __future__ import annotations

import ipaddress

from meshbpf.model import DesiredState, Endpoint, Frontend, ServicePort, usable_endpoints


def E(last: int, **conditions) -> Endpoint:
    return Endpoint(ipaddress.ip_address(f"10.244.0.{last}"), 8080, **conditions)


READY = dict(ready=True, serving=True, terminating=False)
TERMINATING_SERVING = dict(ready=False, serving=True, terminating=True)
TERMINATING_NOT_SERVING = dict(ready=False, serving=False, terminating=True)
STARTING = dict(ready=False, serving=False, terminating=False)


def picked(endpoints) -> list[tuple[int, bool]]:
    return [(int(u.endpoint.address.packed[-1]), u.terminating_fallback)
            for u in usable_endpoints(tuple(endpoints))]


def test_endpoint_defaults_are_ready_serving_not_terminating():
    e = Endpoint(ipaddress.ip_address("10.0.0.1"), 80)
    assert (e.ready, e.serving, e.terminating) == (True, True, False)


def test_ready_endpoints_are_used_in_order():
    assert picked([E(3, **READY), E(1, **READY), E(2, **READY)]) == [
        (3, False), (1, False), (2, False)]


def test_only_ready_endpoints_are_used_when_there_are_any():
    eps = [E(1, **TERMINATING_SERVING), E(2, **READY), E(3, **STARTING),
           E(4, **TERMINATING_NOT_SERVING), E(5, **READY)]
    assert picked(eps) == [(2, False), (5, False)]


def test_without_ready_endpoints_serving_terminating_ones_are_the_fallback():
    eps = [E(1, **TERMINATING_SERVING), E(2, **STARTING), E(3, **TERMINATING_NOT_SERVING),
           E(4, **TERMINATING_SERVING)]
    assert picked(eps) == [(1, True), (4, True)]


def test_serving_but_not_terminating_is_not_a_fallback():
    # Not ready and not terminating: a pod that is starting; kube-proxy skips it.
    assert picked([E(1, ready=False, serving=True, terminating=False)]) == []


def test_no_usable_endpoint_gives_none():
    assert picked([E(1, **STARTING), E(2, **TERMINATING_NOT_SERVING)]) == []
    assert picked([]) == []


def test_a_single_ready_endpoint_hides_every_terminating_one():
    eps = [E(i, **TERMINATING_SERVING) for i in range(1, 10)] + [E(10, **READY)]
    assert picked(eps) == [(10, False)]


def test_ready_wins_even_when_also_marked_terminating():
    assert picked([E(1, ready=True, serving=True, terminating=True)]) == [(1, False)]


def test_frontend_text_brackets_ipv6():
    assert str(Frontend(ipaddress.ip_address("10.96.0.10"), 53, "UDP")) == "10.96.0.10:53/UDP"
    assert str(Frontend(ipaddress.ip_address("fd00::10"), 80, "TCP")) == "[fd00::10]:80/TCP"


def test_desired_state_services_are_namespace_slash_name():
    f1 = Frontend(ipaddress.ip_address("10.96.0.10"), 80, "TCP")
    f2 = Frontend(ipaddress.ip_address("10.96.0.10"), 443, "TCP")
    f3 = Frontend(ipaddress.ip_address("10.96.0.11"), 80, "TCP")
    state = DesiredState({
        f1: ServicePort("default", "web", "http", f1, ()),
        f2: ServicePort("default", "web", "https", f2, ()),
        f3: ServicePort("shop", "web", "", f3, ()),
    })
    assert state.services() == {"default/web", "shop/web"}
