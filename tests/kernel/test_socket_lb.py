"""Socket-level load balancing with real sockets in lab pods."""

from __future__ import annotations

import subprocess

import pytest

from . import k8s
from .conftest import web_service
from .shared import dns_pods, lab, probe, start_agent  # noqa: F401 (one lab and agent for the module)

WEBS = ("web-1", "web-2", "web-3", "web-4")


def test_tcp_spreads_over_all_backends(lab, probe, start_agent):
    start_agent(web_service(lab))
    result = probe("client", "whoami", "10.96.0.10", 80, 400)
    assert result["errors"] == {}
    answers = result["answers"]
    assert set(answers) == set(WEBS)
    # Uniform choice: each of 4 backends expects 100 of 400 (sd ~8.7);
    # 50..150 is more than 5 sd either way.
    for pod, n in answers.items():
        assert 50 <= n <= 150, answers


def test_curl_through_service_reaches_a_backend(lab, start_agent):
    start_agent(web_service(lab))
    out = lab.run("client", ["curl", "-sS", "--max-time", "2", "http://10.96.0.10/"])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() in WEBS


def test_traffic_outside_the_cgroup_is_not_translated(lab, probe, start_agent):
    start_agent(web_service(lab))
    r = lab.run("client", ["curl", "-sS", "--max-time", "1", "http://10.96.0.10/"], in_cgroup=False)
    assert r.returncode != 0  # no route to the virtual IP without meshbpf


def test_ipv6_service(lab, start_agent):
    objects = [
        k8s.service("web6", ["fd00:96::10"], [k8s.port("http", 80, 8080)]),
        k8s.endpoint_slice("web6-1", "web6", [k8s.endpoint(str(lab.pods[p].ipv6)) for p in WEBS],
                           [k8s.slice_port("http", 8080)], address_type="IPv6"),
    ]
    start_agent(objects)
    seen = set()
    for _ in range(20):
        out = lab.run("client", ["curl", "-sS", "-g", "--max-time", "2", "http://[fd00:96::10]/"])
        assert out.returncode == 0, out.stderr
        seen.add(out.stdout.strip())
    assert seen <= set(WEBS) and len(seen) >= 2


def test_dual_stack_service_answers_on_both_families(lab, probe, start_agent):
    objects = [
        k8s.service("web", ["10.96.0.10", "fd00:96::10"], [k8s.port("http", 80, 8080)]),
        k8s.endpoint_slice("web-v4", "web", [k8s.endpoint(str(lab.pods["web-1"].ipv4))],
                           [k8s.slice_port("http", 8080)]),
        k8s.endpoint_slice("web-v6", "web", [k8s.endpoint(str(lab.pods["web-2"].ipv6))],
                           [k8s.slice_port("http", 8080)], address_type="IPv6"),
    ]
    start_agent(objects)
    for vip, pod in (("10.96.0.10", "web-1"), ("fd00:96::10", "web-2")):
        result = probe("client", "whoami", vip, 80, 5)
        assert result["errors"] == {} and result["answers"] == {pod: 5}, result


def test_getpeername_shows_the_service_address(lab, probe, start_agent):
    objects = web_service(lab)
    objects += [
        k8s.service("web6", ["fd00:96::10"], [k8s.port("http", 80, 8080)]),
        k8s.endpoint_slice("web6-1", "web6", [k8s.endpoint(str(lab.pods["web-1"].ipv6))],
                           [k8s.slice_port("http", 8080)], address_type="IPv6"),
    ]
    start_agent(objects)
    assert probe("client", "peername", "10.96.0.10", 80)["peer"] == ["10.96.0.10", 80]
    assert probe("client", "peername", "fd00:96::10", 80)["peer"] == ["fd00:96::10", 80]


def _dns_service(lab, pods) -> list[dict]:
    return [
        k8s.service("dns", ["10.96.0.53"], [k8s.port("dns", 53, 53, "UDP"), k8s.port("dns-tcp", 53, 53)],
                    namespace="kube-system"),
        k8s.endpoint_slice("dns-1", "dns", [k8s.endpoint(str(lab.pods[p].ipv4)) for p in pods],
                           [k8s.slice_port("dns", 53, "UDP"), k8s.slice_port("dns-tcp", 53)],
                           namespace="kube-system"),
    ]


def test_udp_dns_through_service_with_dig(lab, dns_pods, start_agent):
    start_agent(_dns_service(lab, dns_pods))
    answers = []
    for _ in range(30):
        out = lab.run("client", ["dig", "+tries=1", "+time=2", "@10.96.0.53", "whoami.lab", "TXT"])
        # dig drops replies from another address than it asked
        assert "unexpected source" not in out.stdout, out.stdout
        assert out.returncode == 0, out.stdout
        assert ";; SERVER: 10.96.0.53#53" in out.stdout
        answers.append(out.stdout.split("whoami.lab.")[-1].split('"')[1])
    assert set(answers) == set(dns_pods)


def test_dns_over_tcp_through_service(lab, dns_pods, start_agent):
    start_agent(_dns_service(lab, dns_pods))
    out = lab.run("client", ["dig", "+tcp", "+short", "+tries=1", "+time=2", "@10.96.0.53", "whoami.lab", "TXT"])
    assert out.returncode == 0 and out.stdout.strip().strip('"') in dns_pods, out


def test_udp_reply_comes_from_the_service_address(lab, probe, dns_pods, start_agent):
    start_agent(_dns_service(lab, dns_pods))
    for connected in ("no", "yes"):
        reply = probe("client", "udp-peer", "10.96.0.53", 53, connected)
        assert reply["from"] == ["10.96.0.53", 53]
        assert reply["txt"] in dns_pods


def test_service_without_endpoints_refuses_at_once(lab, probe, start_agent, kernel_features):
    # A kernel without bpf_set_retval (before 5.18) cannot choose the errno:
    # meshbpf status says so, and the refusal comes as EPERM.
    refused = "ECONNREFUSED" if kernel_features["set_retval"] else "EPERM"
    objects = [k8s.service("empty", ["10.96.0.20"], [k8s.port("http", 80, 8080), k8s.port("dns", 53, 53, "UDP")])]
    start_agent(objects)
    result = probe("client", "connect-error", "10.96.0.20", 80)
    # The errno is the proof that the refusal was immediate: with no route to
    # the virtual IP the connect would time out (probe: 5 s) instead.
    assert result["errno"] == refused, result
    assert probe("client", "udp-send-error", "10.96.0.20", 53)["errno"] == refused


@pytest.mark.needs_feature("netns_cookie")
def test_session_affinity_pins_a_client_to_one_backend(lab, probe, start_agent):
    start_agent(web_service(lab, affinity_timeout=600))
    first = probe("client", "whoami", "10.96.0.10", 80, 50)
    assert first["errors"] == {} and len(first["answers"]) == 1, first
    # A second pod is a second client: it is pinned too, independently.
    second = probe("client2", "whoami", "10.96.0.10", 80, 30)
    assert second["errors"] == {} and len(second["answers"]) == 1, second
    # And the first stays where it was.
    again = probe("client", "whoami", "10.96.0.10", 80, 10)
    assert again["errors"] == {} and again["answers"] == {next(iter(first["answers"])): 10}, again


@pytest.mark.needs_feature("netns_cookie")
@pytest.mark.timing
def test_session_affinity_expires_after_its_timeout(lab, probe, start_agent):
    start_agent(web_service(lab, affinity_timeout=1))
    seen = set()
    for _ in range(8):
        result = probe("client", "whoami", "10.96.0.10", 80, 3)
        assert result["errors"] == {} and len(result["answers"]) == 1, result  # pinned within the timeout
        seen |= set(result["answers"])
        subprocess.run(["sleep", "1.2"])
    # Re-chosen uniformly after each expiry: 8 rounds on one backend has p = 4^-7.
    assert len(seen) >= 2


# README claims: reverse NAT for UDP over IPv6, and IPv4 Services reached from
# IPv6 sockets.
DNS_V4, DNS_V6 = "10.96.0.53", "fd00:96::53"


def _dual_stack_dns(lab, pods) -> list[dict]:
    ports = [k8s.port("dns", 53, 53, "UDP")]
    slice_ports = [k8s.slice_port("dns", 53, "UDP")]
    return [
        k8s.service("dns", [DNS_V4, DNS_V6], ports, namespace="kube-system"),
        k8s.endpoint_slice("dns-v4", "dns", [k8s.endpoint(str(lab.pods[p].ipv4)) for p in pods],
                           slice_ports, namespace="kube-system"),
        k8s.endpoint_slice("dns-v6", "dns", [k8s.endpoint(str(lab.pods[p].ipv6)) for p in pods],
                           slice_ports, namespace="kube-system", address_type="IPv6"),
    ]


def test_udp_replies_over_ipv6_and_to_ipv4_mapped_sockets_come_from_the_service(
        lab, probe, dns_pods, start_agent):
    """recvmsg6 turns the backend's address back into the Service's: for an
    IPv6 Service, and for an IPv4 Service asked from an AF_INET6 socket as
    ::ffff:a.b.c.d (one lookup path serves both, README "Maps")."""
    start_agent(_dual_stack_dns(lab, dns_pods))
    for service in (DNS_V6, f"::ffff:{DNS_V4}"):
        for connected in ("no", "yes"):
            reply = probe("client", "udp-peer", service, 53, connected)
            assert reply["from"] == [service, 53], (service, connected, reply)
            assert reply["txt"] in dns_pods, reply


def test_ipv4_service_from_an_ipv6_socket(lab, probe, start_agent):
    start_agent(web_service(lab))
    mapped = "::ffff:10.96.0.10"
    result = probe("client", "whoami", mapped, 80, 40)
    assert result["errors"] == {} and len(result["answers"]) >= 2, result
    assert probe("client", "peername", mapped, 80)["peer"] == [mapped, 80]
