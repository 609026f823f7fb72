"""A plain (non-editable) install carries what the agent compiles.

Built offline from this checkout with the venv's own setuptools
(`pip install --no-deps --no-build-isolation --target DIR .`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def install_copy(target: Path) -> Path:
    """pip-installs this checkout into target (no deps, no network), built
    from a clean copy: a build/ folder left in the checkout would leak
    into the wheel and hide what the build itself carries."""
    source = target.with_name(target.name + "-src")
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", ".pytest_cache", "out", "bin"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", "--disable-pip-version-check", "--target", str(target), str(source)],
                   check=True, capture_output=True, text=True)
    shutil.rmtree(source)
    return target


def installed_env(target: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MESHBPF_BPF_DIR"}
    env["PYTHONPATH"] = str(target)
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    return install_copy(tmp_path_factory.mktemp("site"))


def test_the_installed_package_carries_every_bpf_source(installed):
    bundled = installed / "meshbpf" / "_bpf"
    sources = sorted(p.relative_to(REPO / "bpf") for p in [*(REPO / "bpf").glob("*.c"),
                                                           *(REPO / "bpf" / "lib").glob("*.h")])
    assert sources, "no bpf/ sources in the checkout?"
    assert sorted(p.relative_to(bundled) for p in bundled.rglob("*") if p.is_file()) == sources
    for rel in sources:
        assert (bundled / rel).read_bytes() == (REPO / "bpf" / rel).read_bytes(), rel


def test_the_installed_copy_finds_and_expands_its_own_sources(installed, tmp_path):
    # Run away from the checkout, so only the installed copy is importable.
    code = ("import meshbpf, meshbpf.datapath.source as s, meshbpf.datapath.loader as l;"
            "print(meshbpf.__file__); print(s.bpf_dir());"
            "print(len(s.program_text(l.LB_SOURCES + ['sockops.c', 'sk_msg.c', 'sockopt.c'])))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=installed_env(installed),
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    package, bpf_dir, length = out.stdout.split()
    assert Path(package).is_relative_to(installed)
    assert Path(bpf_dir) == installed / "meshbpf" / "_bpf"
    assert int(length) > 10_000


def test_the_installed_script_reports_the_package_version(installed, tmp_path):
    out = subprocess.run([str(installed / "bin" / "meshbpf"), "version"], cwd=tmp_path,
                         env=installed_env(installed), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    metadata = next(installed.glob("meshbpf-*.dist-info")) / "METADATA"
    version = next(line.split()[1] for line in metadata.read_text().splitlines() if line.startswith("Version:"))
    assert out.stdout == f"meshbpf {version}\n"
