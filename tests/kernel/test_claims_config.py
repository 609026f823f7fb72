"""AgentConfig is checked like the rest of the config (README "Configuration"):
a CIDR that does not parse, a cgroup that does not exist and a second
AgentConfig are each refused through a running agent, with a clear one-line
error, and the running state stays."""

from __future__ import annotations

import pytest

from . import k8s
from .conftest import web_service
from .helpers import metric, services, wait_backends, wait_log

pytestmark = pytest.mark.userspace


def _redirect_links(bpffs) -> list[str]:
    links = bpffs / "links"
    return sorted(p.name for p in links.iterdir() if p.name.startswith("mbpf_sockops-")) if links.is_dir() else []


def _error_line(agent, needle: str) -> str:
    log = wait_log(agent, needle)
    return [line for line in log.splitlines() if needle in line][-1]


def test_bad_agent_configs_are_refused_and_the_running_state_stays(lab, bpffs, config, start_agent):
    good = web_service(lab) + [k8s.agent_config()]
    agent = start_agent(good)
    before_services, before_links = services(bpffs), _redirect_links(bpffs)
    missing_cgroup = f"{lab.cgroup.name}/no-such-cgroup"
    second = k8s.agent_config(enabled=False)
    second["metadata"]["name"] = "another"
    # (objects, what the error line must name, the sync_errors reason counted).
    # A cgroup missing on this node is not a config error: the same AgentConfig
    # may be right on other nodes, so redirection retries it on its own while
    # Service updates go on (README "Running the agent").
    bad = [
        (web_service(lab) + [k8s.agent_config(cidrs=["10.244.0.0/33"])],
         ["spec.socketRedirect.podCIDRs[0]", "10.244.0.0/33", str(config)], "config"),
        (web_service(lab) + [k8s.agent_config(cgroups=[missing_cgroup])],
         ["spec.socketRedirect.cgroups", missing_cgroup], "redirect"),
        (good + [second],
         ["a second AgentConfig", str(config)], "config"),
    ]
    counted = {"config": 0, "redirect": 0}
    for objects, names, reason in bad:
        k8s.write(config, objects)
        line = _error_line(agent, names[0])
        assert all(name in line for name in names), (names, line)
        log = agent.log()
        # Tracebacks only under -v, each after the DEBUG line that announces it.
        assert log.count("Traceback (most recent") == log.count("traceback of the failure above"), log
        counted[reason] += 1
        text = agent.get("/metrics")[1]
        for why, n in counted.items():
            assert metric(text, "meshbpf_sync_errors_total", f'reason="{why}"') >= n, (why, text)
        assert metric(text, "meshbpf_sync_errors_total", 'reason="config"') == counted["config"]
        assert services(bpffs) == before_services
        assert _redirect_links(bpffs) == before_links
        assert agent.proc.poll() is None
        k8s.write(config, good)  # each bad edit breaks the good config in one place
    # And a real change after them all still applies.
    k8s.write(config, web_service(lab, pods=("web-1",)) + [k8s.agent_config()])
    wait_backends(bpffs, "10.96.0.10:80/TCP", [f"{lab.pods['web-1'].ipv4}:8080"])
