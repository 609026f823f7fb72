"""--listen already in use: the agent fails at once, in one line, before the
lock, the compile or anything attached; unless the previous agent on the
same bpffs is still exiting (an upgrade), whose port goes with it."""

import socket
from pathlib import Path

import pytest

from meshbpf.agent import Agent, AgentOptions
from meshbpf.datapath import lock as lock_mod
from meshbpf.datapath.lock import LockError
from meshbpf.health import HealthServer, ListenError
from prometheus_client import CollectorRegistry
from test_agent_loop import FakeLB


@pytest.fixture
def busy_port():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock.getsockname()[1]
    sock.close()


class _Untouched:
    """The source: never polled, the agent must fail before."""

    def poll(self):
        raise AssertionError("polled")


def _agent(tmp_path: Path, port: int, monkeypatch) -> Agent:
    agent = Agent(AgentOptions(config=Path("unused"), bpffs=tmp_path / "meshbpf", lock_timeout=0.3,
                               listen=f"127.0.0.1:{port}"), source=_Untouched(), lb=FakeLB())
    # A datapath touched is this test failing (and never the node's: a fake
    # lock refuses before anything is compiled or attached).
    monkeypatch.setattr(agent, "_start_datapath", lambda: pytest.fail("datapath started"),
                        raising=False)
    return agent


def test_a_listen_address_in_use_fails_before_the_datapath(tmp_path, busy_port, monkeypatch):
    agent = _agent(tmp_path, busy_port, monkeypatch)
    acquired = []
    monkeypatch.setattr(agent.lock, "acquire", lambda timeout: acquired.append(timeout) or
                        pytest.fail("lock taken: the datapath would start next"))
    with pytest.raises(ListenError) as exc:
        agent.start()
    assert str(exc.value) == f"--listen 127.0.0.1:{busy_port}: cannot listen there: Address already in use"
    assert acquired == [] and agent.http is None


def test_a_listen_address_held_by_an_exiting_agent_waits_for_its_lock(tmp_path, busy_port, monkeypatch):
    monkeypatch.setattr(lock_mod, "check_bpffs", lambda folder: None)
    folder = tmp_path / "meshbpf"
    folder.mkdir()
    other = lock_mod.BpffsLock(folder)          # the previous agent, still exiting
    other.acquire(0)
    try:
        agent = _agent(tmp_path, busy_port, monkeypatch)
        with pytest.raises(LockError, match="another meshbpf agent"):
            agent.start()
    finally:
        other.release()


def test_the_health_server_names_the_address_it_cannot_bind(busy_port):
    with pytest.raises(ListenError, match=f"^--listen 127.0.0.1:{busy_port}: cannot listen there"):
        HealthServer(f"127.0.0.1:{busy_port}", CollectorRegistry(), lambda: True, lambda: True)
