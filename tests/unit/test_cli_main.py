"""The meshbpf command as users meet it: version, logging, errors, completion.

Run through the installed script (.venv/bin/meshbpf), as typed; the log-level
checks use click's runner to look at the configured loggers.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from meshbpf import __version__
from meshbpf.cli import cli
from meshbpf.cli.common import friendly_errors
from meshbpf.health import parse_listen

SCRIPT = Path(sys.executable).parent / "meshbpf"


def meshbpf(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def test_version_command_and_option():
    assert meshbpf("version").stdout == f"meshbpf {__version__}\n"
    assert meshbpf("--version").stdout == f"meshbpf {__version__}\n"


@pytest.fixture
def restore_logging():
    root, ours = logging.getLogger(), logging.getLogger("meshbpf")
    saved = root.handlers[:], root.level, ours.level
    yield
    root.handlers[:], root.level = saved[0], saved[1]
    ours.setLevel(saved[2])


@pytest.mark.parametrize("args, level", [([], logging.INFO), (["-v"], logging.DEBUG),
                                         (["-vv"], logging.DEBUG)])
def test_verbose_raises_the_log_level(restore_logging, args, level):
    result = CliRunner().invoke(cli, [*args, "version"])
    assert result.exit_code == 0, result.output
    assert logging.getLogger("meshbpf.agent").getEffectiveLevel() == level


def test_verbose_shows_debug_lines_and_the_default_does_not():
    quiet, verbose = meshbpf("version"), meshbpf("-v", "version")
    assert "DEBUG" not in quiet.stderr
    assert f"DEBUG meshbpf: meshbpf {__version__} from " in verbose.stderr


def test_json_log_format_prints_one_object_per_line():
    out = meshbpf("--log-format", "json", "-v", "version")
    lines = out.stderr.splitlines()
    assert lines
    for line in lines:
        entry = json.loads(line)
        assert {"time", "level", "logger", "message"} <= entry.keys()
    assert json.loads(lines[0])["level"] == "debug"


@pytest.mark.parametrize("args, words", [
    (["lab", "up"], "Missing argument 'NAME'"),
    (["no-such-command"], "No such command"),
    (["service", "list", "-o", "yaml"], "'yaml' is not one of"),
    (["agent"], "--config is required"),
    (["agent", "--config", "x.yaml", "--map-size", "nope=1"], "--map-size"),
    (["agent", "--config", "x.yaml", "--listen", "::1:9890"], "Invalid value for --listen: expected HOST:PORT"),
])
def test_usage_errors_are_one_line(args, words):
    out = meshbpf(*args)
    assert out.returncode == 2
    assert out.stdout == ""
    assert len(out.stderr.splitlines()) == 1, out.stderr
    assert words in out.stderr and out.stderr.startswith("meshbpf: error: ")


def test_a_multi_line_failure_becomes_one_error_line():
    @click.command()
    @friendly_errors
    def broken() -> None:
        raise RuntimeError("pinned maps do not match this build:\n  mbpf_svc: differs\n"
                           "`meshbpf uninstall` removes them")

    result = CliRunner().invoke(broken, [])
    assert result.exit_code == 1
    assert result.output == ("Error: pinned maps do not match this build: mbpf_svc: differs; "
                             "`meshbpf uninstall` removes them\n")


def test_bash_completion_script_is_printed():
    out = meshbpf(env={"_MESHBPF_COMPLETE": "bash_source"})
    assert out.returncode == 0
    assert "_meshbpf_completion()" in out.stdout and "complete -o nosort -F _meshbpf_completion meshbpf" in out.stdout


def test_uninstall_refuses_a_folder_that_is_not_bpffs(tmp_path):
    names = ["mbpf_svc", "mbpf_slots", "mbpf_backends", "notes.txt"]
    for name in names:
        (tmp_path / name).write_text("someone's file\n")
    out = meshbpf("uninstall", "--bpffs", str(tmp_path))
    assert out.returncode == 1
    assert out.stderr == (f"meshbpf: error: {tmp_path} is not on a bpffs mount: refusing to delete "
                          f"anything in it (pass the --bpffs folder the agent pins to)\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)


def test_views_of_a_plain_folder_say_nothing_is_installed(tmp_path):
    (tmp_path / "mbpf_svc").write_text("not a map\n")
    out = meshbpf("service", "list", "--bpffs", str(tmp_path))
    assert out.returncode == 1
    assert len(out.stderr.splitlines()) == 1 and "meshbpf is not installed" in out.stderr


@pytest.mark.parametrize("listen, address", [
    ("127.0.0.1:9890", ("127.0.0.1", 9890)), ("[::1]:9890", ("::1", 9890)),
    (":9890", ("127.0.0.1", 9890)), ("0.0.0.0:0", ("0.0.0.0", 0)), ("[::]:80", ("::", 80)),
])
def test_listen_addresses(listen, address):
    assert parse_listen(listen) == address
