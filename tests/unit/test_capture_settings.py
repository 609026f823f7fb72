"""Sidecar capture's inputs: AgentConfig spec.capture, the Pod annotations
the sources keep and check, and each meshed pod's effective settings."""

from __future__ import annotations

import ipaddress
import os

import pytest
import yaml

from meshbpf.capture.settings import (AnnotationError, is_meshed, kept_annotations, pod_capture)
from meshbpf.model import AgentSettings, CaptureSettings
from meshbpf.policy.model import PodInfo
from meshbpf.sources.agent_config import read_agent_config
from meshbpf.sources.errors import ConfigError
from meshbpf.sources.kube_policy import read_policy_objects
from meshbpf.sources.kube_objects import SourceObject
from meshbpf.sources.yaml_file import FileSource
from policy_world import pod_obj

ip = ipaddress.ip_address
net = ipaddress.ip_network
ISTIO = CaptureSettings(enabled=True, mesh="istio")
STATUS = {"sidecar.istio.io/status": '{"containers":["istio-proxy"]}'}


def agent_config(capture: dict) -> dict:
    return {"apiVersion": "meshbpf.io/v1alpha1", "kind": "AgentConfig",
            "metadata": {"name": "meshbpf"}, "spec": {"capture": capture}}


def pod(annotations: dict | None = None, labels: dict | None = None, host_network=False) -> PodInfo:
    return PodInfo("x", "a", "uid-a", labels or {}, "node-a", host_network, {},
                   (ip("10.0.1.1"), ip("fd00::1:1")), annotations or {})


# --- AgentConfig -----------------------------------------------------------------

def test_capture_is_off_without_an_agent_config():
    assert AgentSettings().capture == CaptureSettings(enabled=False)


def test_agent_config_capture_settings_are_read():
    settings, problems = read_agent_config(agent_config(
        {"enabled": True, "mesh": "istio", "optInLabel": "meshbpf.io/capture=true", "dns": True}),
        "agent.yaml")
    assert not problems
    assert settings.capture == CaptureSettings(True, "istio", ("meshbpf.io/capture", "true"), True)
    settings, _ = read_agent_config(agent_config({"enabled": True, "optInLabel": "mesh"}), "f")
    assert settings.capture == CaptureSettings(True, "istio", ("mesh", None), False)


@pytest.mark.parametrize("capture, path, reason", [
    ({"mesh": "consul"}, "spec.capture.mesh", "'consul' is not one of istio, linkerd"),
    ({"mesh": "linkerd", "dns": True}, "spec.capture.dns", "linkerd has no DNS proxy"),
    ({"optInLabel": "bad key!"}, "spec.capture.optInLabel", "is not a label key"),
    ({"optInLabel": "=x"}, "spec.capture.optInLabel", "is not a label key"),
    ({"enabled": "sometimes"}, "spec.capture.enabled", "expected a boolean"),
    ({"dsn": True}, "spec.capture.dsn", "did you mean 'dns'"),
])
def test_a_bad_capture_setting_is_one_problem_naming_the_field(capture, path, reason):
    settings, problems = read_agent_config(agent_config(capture), "agent.yaml")
    assert settings is None
    (problem,) = problems
    assert problem.path == path and reason in problem.reason
    assert str(problem).startswith("agent.yaml") and "\n" not in str(problem)


def test_a_bad_capture_edit_keeps_the_last_good_settings(tmp_path):
    """The file source's machinery: the whole change is rejected, the last
    good state (capture on) stays."""
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(agent_config({"enabled": True})))
    src = FileSource(tmp_path, "node-a", settle_s=0, hold_s=0)
    assert src.poll().settings.capture.enabled
    tmp = tmp_path / ".agent.tmp"
    tmp.write_text(yaml.safe_dump(agent_config({"enabled": True, "mesh": "kuma"})))
    os.replace(tmp, path)
    with pytest.raises(Exception, match=r"spec.capture.mesh: 'kuma' is not one of"):
        src.poll()


@pytest.mark.parametrize("name", ["Mesh_BPF", "mesh\nbpf", "m" * 254, "-meshbpf"])
def test_an_agent_config_name_kubernetes_would_refuse_is_a_problem_with_the_others(name):
    """A DNS-1123 subdomain, as for any custom resource; named beside the
    other problems, so one edit fixes them all."""
    obj = agent_config({"mesh": "kuma"})
    obj["metadata"]["name"] = name
    settings, problems = read_agent_config(obj, "agent.yaml")
    assert settings is None
    assert [p.path for p in problems] == ["metadata.name", "spec.capture.mesh"], [str(p) for p in problems]
    assert "DNS-1123 subdomain" in problems[0].reason and "\n" not in str(problems[0])


@pytest.mark.parametrize("namespace", ["Kube_System", "kube.system", "n" * 64, "kube-system\n"])
def test_an_agent_config_namespace_kubernetes_would_refuse_is_a_problem_with_the_others(namespace):
    """A namespace is a DNS-1123 label; named beside the other problems."""
    obj = agent_config({"mesh": "kuma"})
    obj["metadata"]["namespace"] = namespace
    settings, problems = read_agent_config(obj, "agent.yaml")
    assert settings is None
    assert [p.path for p in problems] == ["metadata.namespace", "spec.capture.mesh"], [str(p) for p in problems]
    assert "DNS-1123 label" in problems[0].reason and "\n" not in str(problems[0])


@pytest.mark.parametrize("metadata", [{}, {"name": "meshbpf.node-a"}, {"name": "a" * 253},
                                      {"name": "meshbpf", "namespace": "kube-system"},
                                      {"namespace": "n" * 63}])
def test_an_agent_config_without_a_name_or_with_a_good_one_is_read(metadata):
    obj = agent_config({"enabled": True})
    obj["metadata"] = metadata
    settings, problems = read_agent_config(obj, "agent.yaml")
    assert not problems and settings.capture.enabled


def test_the_file_source_rejects_an_agent_config_name_kubernetes_would_refuse(tmp_path):
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(agent_config({"enabled": True})))
    src = FileSource(tmp_path, "node-a", settle_s=0, hold_s=0)
    assert src.poll().settings.capture.enabled
    bad = agent_config({"enabled": False})
    bad["metadata"]["name"] = "Mesh_BPF"
    tmp = tmp_path / ".agent.tmp"
    tmp.write_text(yaml.safe_dump(bad))
    os.replace(tmp, path)
    with pytest.raises(ConfigError) as rejected:
        src.poll()
    (problem,) = [str(p) for p in rejected.value.problems]
    assert problem.startswith(f"{path}: document 1 (line 1) (AgentConfig Mesh_BPF): metadata.name: "
                              "'Mesh_BPF' is not a DNS-1123 subdomain"), problem


# --- Pod annotations in the sources ---------------------------------------------------

def read_pods(*objs):
    return read_policy_objects([SourceObject(o, f"pods.yaml: document {i + 1}")
                                for i, o in enumerate(objs)])


def with_annotations(name: str, annotations: dict) -> dict:
    obj = pod_obj(name)
    obj["metadata"]["annotations"] = annotations
    return obj


def test_sources_keep_only_the_capture_annotations():
    inputs = read_pods(with_annotations("x/a", {
        **STATUS, "traffic.sidecar.istio.io/excludeOutboundPorts": "9000",
        "prometheus.io/scrape": "true", "kubectl.kubernetes.io/default-container": "app"}))
    (p,) = inputs.pods
    assert p.annotations == {**STATUS, "traffic.sidecar.istio.io/excludeOutboundPorts": "9000",
                             "kubectl.kubernetes.io/default-container": "app"}
    assert not inputs.problems


def test_a_malformed_annotation_is_one_problem_and_the_pod_and_others_stay():
    inputs = read_pods(
        with_annotations("x/a", {**STATUS,
                                 "traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.0.0.0/33"}),
        with_annotations("x/b", {**STATUS, "traffic.sidecar.istio.io/excludeInboundPorts": "80,http"}),
        with_annotations("x/c", STATUS))
    assert sorted(p.name for p in inputs.pods) == ["a", "b", "c"]   # policy still sees them
    assert not inputs.rejected
    texts = sorted(str(p) for p in inputs.problems)
    assert len(texts) == 2
    assert ("(Pod x/a): metadata.annotations[traffic.sidecar.istio.io/excludeOutboundIPRanges]: "
            "'10.0.0.0/33' is not a CIDR") in texts[0]
    assert texts[0].endswith("the pod is left unmeshed")
    assert ("(Pod x/b): metadata.annotations[traffic.sidecar.istio.io/excludeInboundPorts]: "
            "'http' is not a port number or range") in texts[1]
    # ... and the capture side refuses the same pods (fail closed), takes the other.
    by_name = {p.name: p for p in inputs.pods}
    for name in ("a", "b"):
        with pytest.raises(AnnotationError):
            pod_capture(by_name[name], ISTIO)
    assert pod_capture(by_name["c"], ISTIO).outbound


def test_kept_annotations_survive_any_input():
    assert kept_annotations(None) == {} and kept_annotations("x") == {}
    assert kept_annotations({"linkerd.io/proxy-version": "stable", 3: "x"}) == {
        "linkerd.io/proxy-version": "stable"}


# --- who is meshed, with what -------------------------------------------------------

def test_meshed_needs_capture_on_and_the_marker_or_the_opt_in_label():
    assert not is_meshed(pod(STATUS), CaptureSettings(enabled=False))
    assert is_meshed(pod(STATUS), ISTIO)
    assert not is_meshed(pod(), ISTIO)
    assert not is_meshed(pod({"linkerd.io/proxy-version": "edge"}), ISTIO)   # another mesh's pod
    assert is_meshed(pod({"linkerd.io/proxy-version": "edge"}), CaptureSettings(True, "linkerd"))
    label = CaptureSettings(True, "istio", ("mesh", "on"))
    assert is_meshed(pod(labels={"mesh": "on"}), label)
    assert not is_meshed(pod(labels={"mesh": "off"}), label)
    assert is_meshed(pod(labels={"mesh": ""}), CaptureSettings(True, "istio", ("mesh", None)))
    assert not is_meshed(pod(STATUS, host_network=True), ISTIO)


def test_istio_defaults_capture_everything_but_its_own_ports():
    c = pod_capture(pod(STATUS), ISTIO)
    assert (c.proxy_uid, c.out_port, c.in_port, c.dns_port) == (1337, 15001, 15006, 0)
    assert c.include_out is None and c.include_in_ports is None
    assert c.exclude_in_ports == (15008, 15020, 15021, 15090)
    assert c.outbound and c.inbound
    assert pod_capture(pod(STATUS), CaptureSettings(True, "istio", dns=True)).dns_port == 15053


def test_istio_annotations_narrow_the_capture():
    c = pod_capture(pod({**STATUS,
                         "traffic.sidecar.istio.io/includeOutboundIPRanges": "10.0.0.0/8, fd00::/8",
                         "traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.1.0.0/16,",
                         "traffic.sidecar.istio.io/includeInboundPorts": "8080,9090,15021",
                         "traffic.sidecar.istio.io/excludeInboundPorts": "9090",
                         "traffic.sidecar.istio.io/excludeOutboundPorts": "5432,3306"}), ISTIO)
    assert c.include_out == (net("10.0.0.0/8"), net("fd00::/8"))
    assert c.exclude_out == (net("10.1.0.0/16"),)
    assert c.include_in_ports == (8080,)        # 9090 excluded, 15021 the proxy's own
    assert c.exclude_out_ports == (3306, 5432)
    empty = pod_capture(pod({**STATUS, "traffic.sidecar.istio.io/includeOutboundIPRanges": "",
                             "traffic.sidecar.istio.io/includeInboundPorts": ""}), ISTIO)
    assert not empty.outbound and not empty.inbound


def test_linkerd_preset_and_skip_annotations():
    c = pod_capture(pod({"linkerd.io/proxy-version": "stable-2.14",
                         "config.linkerd.io/skip-inbound-ports": "25,4000-4002",
                         "config.linkerd.io/skip-outbound-ports": "3306",
                         "config.linkerd.io/skip-subnets": "192.168.0.0/16"}),
                    CaptureSettings(True, "linkerd"))
    assert (c.mesh, c.proxy_uid, c.out_port, c.in_port) == ("linkerd", 2102, 4140, 4143)
    assert c.exclude_in_ports == (25, 4000, 4001, 4002, 4190, 4191)
    assert c.exclude_out_ports == (3306,) and c.exclude_out == (net("192.168.0.0/16"),)
    assert c.include_out is None and c.include_in_ports is None


@pytest.mark.parametrize("key, value, reason", [
    ("traffic.sidecar.istio.io/excludeOutboundIPRanges", "10.0.0.1", r"not a CIDR \(address/prefix\)"),
    ("traffic.sidecar.istio.io/excludeOutboundIPRanges", "*", "not a CIDR"),
    ("traffic.sidecar.istio.io/includeOutboundIPRanges", "::ffff:10.0.0.0/104", "IPv4-mapped"),
    ("traffic.sidecar.istio.io/excludeInboundPorts", "0", "is not a port"),
    ("traffic.sidecar.istio.io/excludeInboundPorts", "70000", "is not a port"),
    ("config.linkerd.io/skip-inbound-ports", "9-3", "ascending range"),
    ("config.linkerd.io/skip-outbound-ports", "1-5000", "more than 1024 ports"),
])
def test_malformed_values_are_refused(key, value, reason):
    settings = CaptureSettings(True, "linkerd" if key.startswith("config.linkerd") else "istio")
    with pytest.raises(AnnotationError, match=reason) as info:
        pod_capture(pod({**STATUS, "linkerd.io/proxy-version": "x", key: value}), settings)
    assert info.value.key == key


def test_a_lab_pod_is_marked_meshed_with_an_annotation():
    from meshbpf.lab.objects import lab_objects
    from test_lab_objects import make_pod
    pods = [make_pod("x/a", 2), make_pod("x/b", 3), make_pod("x/c", 4)]
    doc = yaml.safe_load(yaml.safe_dump(lab_objects(pods, "node-7", meshed={
        "x/a": {}, "x/b": {"traffic.sidecar.istio.io/excludeOutboundPorts": "5432"}})))
    by_name = {p.name: p for p in read_policy_objects([SourceObject(doc, "lab.yaml")]).pods}
    assert [n for n, p in sorted(by_name.items()) if is_meshed(p, ISTIO)] == ["a", "b"]
    assert pod_capture(by_name["b"], ISTIO).exclude_out_ports == (5432,)
    assert lab_objects(pods, "n", meshed=["x/c"])["items"][-1]["metadata"]["annotations"]


def test_the_kubernetes_source_keeps_the_annotations_and_reports_a_bad_one(tmp_path, cluster_list):
    from test_kubernetes_source import FAST, KubernetesSource, Poller
    from fake_apiserver import FakeAPIServer
    api = FakeAPIServer().start()
    source = None
    try:
        api.load(cluster_list)
        good = with_annotations("x/a", {**STATUS, "traffic.sidecar.istio.io/excludeOutboundPorts": "22",
                                        "unrelated.example.com/x": "y"})
        bad = with_annotations("x/b", {**STATUS, "traffic.sidecar.istio.io/excludeInboundPorts": "x"})
        api.apply(good, bad)
        source = KubernetesSource(kubeconfig=str(api.kubeconfig(tmp_path / "kubeconfig")),
                                  node_name="node-a", backoff=FAST)
        state = Poller(source, api).first()
        by_name = {p.name: p for p in state.pods}
        assert by_name["a"].annotations == {**STATUS, "traffic.sidecar.istio.io/excludeOutboundPorts": "22"}
        assert pod_capture(by_name["a"], ISTIO).exclude_out_ports == (22,)
        assert any("(Pod x/b): metadata.annotations[traffic.sidecar.istio.io/excludeInboundPorts]"
                   in text for text in source.problems)
    finally:
        if source is not None:
            source.stop()
        api.stop()
