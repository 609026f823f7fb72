"""Shared test setup: kernel tests (tests/kernel) need root; unit tests do not.

Markers for the kernel matrix (tests/vm), where the tests run under qemu TCG,
about ten times slower than on a real machine:

- ``heavy``: throughput or scale (GiB transfers, 100 000 connections,
  10 000 services). Under emulation they take many minutes and show nothing
  a small run does not.
- ``timing``: asserts on elapsed time or on a rate (connections within a
  window, an affinity timeout of a second). Under emulation they measure the
  emulator.
- ``userspace``: the outcome cannot depend on the kernel version (input
  handling, agent lifecycle, CLI, packaging): runs on the host only; the
  kernel matrix skips it. Anything that sends traffic through a BPF program
  is not ``userspace``.
- ``realtool``: a real third-party program (HAProxy as a sidecar) composed
  with a datapath whose kernel side other kernel tests cover on every
  kernel (test_capture_datapath for capture): runs on the host only, for
  CI's time budget.
- ``needs_feature(name, ...)``: needs these kernel features (names from
  `meshbpf status`); skipped, naming what is missing, on a kernel without
  them. The table is probed once per session, the same way the agent does.
  ``MESHBPF_EXPECT_FEATURES=all`` (or ``name,...``) says this kernel has
  them: a test that would skip for one of them fails instead, and so does
  the ``kernel_features`` fixture, so a wrong probe cannot turn tests into
  silent skips (CI's host run sets it: ``.ci/run``).

``MESHBPF_FAIL_ON_SKIP=1`` turns every skip into a failure naming its reason:
CI's host run has every tool and feature (scripts/setup.sh installs them), so
there a skip (a missing command, a wrong probe) means a test did not run.

``MESHBPF_SKIP_MARKS=heavy,timing,userspace,realtool,bounds,twonode`` skips tests with those markers (the VMs
set it); the summary names each skip and why. ``--shard I/N`` runs the I-th
of N shares of the test files (1-based; tests/sharding.py, balanced by
``--shard-weights``), so that N VMs share one kernel's run.
"""

import json
import os
import subprocess
import sys

import pytest

from tests import sharding

SKIPPABLE = {
    "heavy": "throughput or scale test",
    "timing": "asserts on elapsed time or a rate",
    "userspace": "outcome cannot depend on the kernel version (input handling, agent lifecycle, "
                 "CLI, packaging): runs on the host only; the kernel matrix skips it",
    "fallback": "emulates a missing kernel feature (MESHBPF_DISABLE_FEATURES): the kernel matrix "
                "runs it on its oldest kernel only, where the real fallbacks are",
    "realtool": "a real third-party program (HAProxy as a sidecar) over a datapath whose kernel side "
                "other kernel tests cover on every kernel: runs on the host only (CI's time budget)",
    "bounds": "long real-traffic test of a path whose kernel side the other tests cover (agent "
              "lifecycle under load, whole tables): runs on the host only; the kernel matrix skips it "
              "(CI's time budget)",
    "twonode": "a test in the two-node lab (a router, an agent per node: minutes of compiling under "
               "TCG) whose programs the prog and datapath tests drive on every kernel: runs on the host "
               "only; the kernel matrix skips it (CI's time budget)",
}


def pytest_addoption(parser):
    parser.addoption("--shard", default=None, metavar="I/N",
                     help="run only the I-th of N shares of the test files (1-based; tests/sharding.py)")
    parser.addoption("--shard-weights", default=None, metavar="RESULT_JSON",
                     help="a kernel matrix result.json whose file_seconds the shares are balanced by")


def _shard(config) -> tuple[int, int] | None:
    value = config.getoption("--shard")
    if not value:
        return None
    try:
        i, n = (int(x) for x in value.split("/"))
    except ValueError:
        raise pytest.UsageError(f"--shard {value!r}: expected I/N, like 1/2") from None
    if not 1 <= i <= n:
        raise pytest.UsageError(f"--shard {value!r}: I must be 1..N")
    return i, n


def pytest_configure(config):
    for name, what in SKIPPABLE.items():
        config.addinivalue_line("markers", f"{name}: {what}; MESHBPF_SKIP_MARKS={name} skips it")
    config.addinivalue_line("markers", "needs_feature(*names): needs these kernel features "
                                       "(`meshbpf status`); skipped on a kernel without them")


def pytest_collection_modifyitems(config, items):
    skip = {m.strip() for m in os.environ.get("MESHBPF_SKIP_MARKS", "").split(",") if m.strip()}
    unknown = skip - SKIPPABLE.keys()
    if unknown:
        raise pytest.UsageError(f"MESHBPF_SKIP_MARKS: unknown marker(s) {sorted(unknown)}; "
                                f"known: {sorted(SKIPPABLE)}")
    for item in items:
        if "/tests/kernel/" in str(item.fspath):
            item.add_marker(pytest.mark.kernel)
        for name in sorted(skip):
            if item.get_closest_marker(name):
                item.add_marker(pytest.mark.skip(
                    reason=f"{SKIPPABLE[name]} (marked {name}; MESHBPF_SKIP_MARKS skips it here)"))
                break
        else:
            needed = [n for m in item.iter_markers("needs_feature") for n in m.args]
            if needed and os.geteuid() == 0:
                table = kernel_features()
                missing = [n for n in dict.fromkeys(needed) if not table[n]]
                if missing and expected_features() & set(missing):
                    item.stash[_UNEXPECTED_SKIP] = missing  # fails in pytest_runtest_setup
                elif missing:
                    item.add_marker(pytest.mark.skip(
                        reason=f"this kernel lacks {', '.join(missing)} (meshbpf status)"))
    shard = _shard(config)
    if shard:
        i, n = shard
        running: dict[str, int] = {}
        for item in items:
            file = item.nodeid.split("::")[0]
            running[file] = running.get(file, 0) + (item.get_closest_marker("skip") is None)
        mine = sharding.deal(running, sharding.file_weights(config.getoption("--shard-weights")), n)[i - 1]
        keep, drop = [], []
        for item in items:
            (keep if item.nodeid.split("::")[0] in mine else drop).append(item)
        items[:] = keep
        config.hook.pytest_deselected(items=drop)


_features: dict[str, bool] | None = None
_UNEXPECTED_SKIP = pytest.StashKey[list]()


def expected_features() -> set[str]:
    """Features MESHBPF_EXPECT_FEATURES says this kernel has ("all": every one)."""
    names = {n.strip() for n in os.environ.get("MESHBPF_EXPECT_FEATURES", "").split(",") if n.strip()}
    if names == {"all"}:
        return set(kernel_features())
    unknown = names - set(kernel_features()) if names else set()
    if unknown:
        raise pytest.UsageError(f"MESHBPF_EXPECT_FEATURES: unknown feature(s) {sorted(unknown)}")
    return names


def _unexpectedly_missing(table: dict[str, bool]) -> list[str]:
    return sorted(n for n in expected_features() if not table[n])


def kernel_features() -> dict[str, bool]:
    """Feature name -> available, from `meshbpf status -o json` (which also
    honours MESHBPF_DISABLE_FEATURES), probed once per test session."""
    global _features
    if _features is None:
        out = subprocess.run([sys.executable, "-m", "meshbpf", "status", "-o", "json",
                              "--bpffs", "/sys/fs/bpf/meshbpf-test-status"],
                             capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"meshbpf status failed: {out.stderr}")
        _features = {f["name"]: f["available"] for f in json.loads(out.stdout)["features"]}
    return _features


@pytest.fixture(scope="session", name="kernel_features")
def kernel_features_fixture() -> dict[str, bool]:
    table = kernel_features()
    # Tests that adapt to the table would quietly take the fallback path.
    missing = _unexpectedly_missing(table)
    if missing:
        pytest.fail(f"MESHBPF_EXPECT_FEATURES: this kernel was expected to have {', '.join(missing)}, "
                    f"but meshbpf status says no", pytrace=False)
    return table


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if (report.skipped and not hasattr(report, "wasxfail")
            and os.environ.get("MESHBPF_FAIL_ON_SKIP") == "1"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped where every test must run (MESHBPF_FAIL_ON_SKIP=1): {reason}"


def pytest_runtest_setup(item):
    if item.get_closest_marker("kernel") and os.geteuid() != 0:
        pytest.fail("kernel tests need root (bpf(), cgroups, namespaces): run scripts/test as root",
                    pytrace=False)
    missing = item.stash.get(_UNEXPECTED_SKIP, None)
    if missing:
        pytest.fail(f"would skip for lack of {', '.join(missing)}, but MESHBPF_EXPECT_FEATURES "
                    f"says this kernel has it: is the probe wrong? (meshbpf status)", pytrace=False)
