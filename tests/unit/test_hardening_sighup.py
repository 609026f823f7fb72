"""SIGHUP: a full resync, as other daemons re-read their configuration: the
sources are read again (every file parsed, changed or not), the state is
planned again and the pinned maps are re-read and repaired.

Fake maps (no root, no BPF), the real FileSource on a temporary folder."""

import os
import signal

import pytest

from meshbpf.sources import yaml_file
from test_agent_faults_file import folder, make_agent, maps_match, services  # noqa: F401 (fixture)
from test_kubernetes_source import api, make_source  # noqa: F401 (fixtures)


@pytest.fixture
def hup_handled():
    """SIGHUP's default would end pytest: ignored unless the agent handles it."""
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGHUP,)}
    saved.update({sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)})
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_sighup_reads_every_file_again_and_repairs_the_maps(folder, hup_handled, monkeypatch):
    agent = make_agent(folder)
    agent.opts.resync_interval = 0                # no periodic resync: only SIGHUP repairs
    agent.step()
    agent.step()                                  # a quiet poll (the incremental index is built)
    assert services(agent) == {"default/web"} and maps_match(agent)
    maps = agent.lbsync.maps
    maps.state.services.clear()                   # someone empties a map behind the agent's back
    reads = []
    real_read_text = yaml_file.read_text
    monkeypatch.setattr(yaml_file, "read_text", lambda path: reads.append(path) or real_read_text(path))
    for _ in range(3):
        agent.step()
    assert not maps.state.services and reads == []  # nothing changed: nothing read, nothing repaired

    agent.install_signal_handlers()
    os.kill(os.getpid(), signal.SIGHUP)
    agent.step()
    assert reads == [folder / "good.yaml"]          # read again, though unchanged
    assert maps_match(agent) and services(agent) == {"default/web"}
    assert agent.metrics.resync_drift._value.get() >= 1



def test_the_kubernetes_source_builds_everything_again_after_forget(api, make_source, cluster_list):
    api.load(cluster_list)
    p = make_source()
    first = p.first()
    assert p.poll() is None                       # nothing changed
    p.source.forget()
    again = p.poll()
    assert again is not None and again == first  # handed out again, built whole
