"""Out-of-range --map-size and interval flags are usage errors: one line,
exit 2, before anything is compiled (not a traceback, nor a stalled timer)."""

import pytest
from click.testing import CliRunner

from meshbpf.cli import agent_cmd, cli


@pytest.fixture
def no_agent(monkeypatch):
    """Never starts an agent (a flag let through would run one on the cgroup2 root)."""
    def refuse(options):
        raise AssertionError(f"the agent was started with {options}")
    monkeypatch.setattr(agent_cmd, "run_agent", refuse)


@pytest.mark.parametrize("args, words", [
    (["--map-size", "mbpf_svc=4294967296"], "ENTRIES must be 1 to 4294967295"),
    (["--map-size", "mbpf_svc=99999999999999999999"], "ENTRIES must be 1 to 4294967295"),
    (["--map-size", "mbpf_svc=0"], "ENTRIES must be 1 to 4294967295"),
    (["--map-size", "mbpf_conn_slot=100000"], "mbpf_conn_slot's ENTRIES must be a power of two"),
    (["--map-size", "mbpf_svc=-1"], "use NAME=ENTRIES"),
    (["--map-size", "mbpf_svc=²"], "use NAME=ENTRIES"),
    (["--resync-interval", "nan"], "Invalid value for '--resync-interval'"),
    (["--resync-interval", "inf"], "finite number of seconds"),
    (["--resync-interval", "-1"], "finite number of seconds"),
    (["--lock-timeout", "NaN"], "Invalid value for '--lock-timeout'"),
    (["--lock-timeout", "-inf"], "finite number of seconds"),
    (["--lock-timeout", "soon"], "is not a number of seconds"),
])
def test_bad_sizes_and_intervals_are_usage_errors(tmp_path, no_agent, args, words):
    out = CliRunner().invoke(cli, ["agent", "--config", str(tmp_path / "x.yaml"), "--bpffs", str(tmp_path),
                                   "--listen", "127.0.0.1:0", *args])
    assert out.exit_code == 2, (out.output, out.exception)
    line = out.output.splitlines()[-1]
    assert line.startswith("Error: ") and words in line, out.output


def test_a_u32_max_map_size_is_accepted():
    from meshbpf.cli.agent_cmd import _map_sizes
    assert _map_sizes(("mbpf_svc=4294967295",)) == {"mbpf_svc": 4294967295}
