"""tests/vm/matrix's bookkeeping, with stub VMs (no qemu, no root).

The matrix script is copied into a scratch tree beside stubs of `run`,
`build-image` and `render`; the stub `run` exits with the status the test
names for its kernel series. What is checked: a VM's exit status reaches the
verdict (a failing share fails its kernel, and only its kernel), a VM that
ends without a status fails, a kernel's shares are merged into the one result
the table is drawn from, and stopping the matrix stops the VMs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

STUB_RUN = """#!/bin/bash
# Stub VM: the series is the first argument that names one; its status
# comes from $FAIL_<series with dots as underscores>, default 0.
for a in "$@"; do case $a in 5.10|6.1|6.12) s=$a;; esac; done
var=FAIL_${s//./_}
echo "stub vm $s: $*"
echo $$ >>"$STUB_PIDS"
echo "$s $*" >>"$STUB_PIDS.args"
sleep "${STUB_SLEEP:-0.2}"
exit "${!var:-0}"
"""


def _tree(tmp_path: Path) -> Path:
    vm = tmp_path / "tests" / "vm"
    vm.mkdir(parents=True)
    shutil.copy(REPO / "tests" / "vm" / "matrix", vm / "matrix")
    shutil.copy(REPO / "tests" / "vm" / "kernels", vm / "kernels")
    (vm / "run").write_text(STUB_RUN)
    for name in ("build-image", "render"):
        (vm / name).write_text("#!/bin/sh\nexit 0\n")
    for f in vm.iterdir():
        f.chmod(0o755)
    return tmp_path


def _matrix(root: Path, tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = dict(os.environ, STUB_PIDS=str(tmp_path / "pids"), **env)
    return subprocess.run(
        ["tests/vm/matrix", "--out", str(tmp_path / "out"), *args],
        cwd=root, env=environ, capture_output=True, text=True, timeout=120,
    )


def test_every_vm_passing_passes(tmp_path):
    done = _matrix(_tree(tmp_path), tmp_path)
    assert done.returncode == 0, done.stderr
    assert "matrix: passed on 5.10 6.1 6.12" in done.stdout
    # Two shares of 5.10 and of 6.1 ran, and one VM of 6.12 (a small subset).
    assert len((tmp_path / "pids").read_text().split()) == 5


def _vm_args(tmp_path: Path) -> dict[str, list[list[str]]]:
    """Each stub VM's arguments, by kernel series."""
    runs: dict[str, list[list[str]]] = {}
    for line in (tmp_path / "pids.args").read_text().splitlines():
        series, *args = line.split()
        runs.setdefault(series, []).append(args)
    return runs


def test_each_kernel_runs_its_subset(tmp_path):
    done = _matrix(_tree(tmp_path), tmp_path)
    assert done.returncode == 0, done.stderr
    runs = _vm_args(tmp_path)
    assert sorted(map(len, runs.values())) == [1, 2, 2]
    # The oldest: all of tests/kernel but the agent-level files, in two shares.
    for args in runs["5.10"]:
        assert "tests/kernel" in args and "--ignore=tests/kernel/test_updates.py" in args
        assert any(a.startswith("--shard") for a in args)
    # The middle: the program-level files, no emulated fallbacks.
    assert all("tests/kernel/test_northsouth_datapath.py" in a and "-m" in a
               for a in runs["6.1"])
    # The newest, one VM: the program files and socket-LB, not the datapath files.
    [newest] = runs["6.12"]
    assert "tests/kernel/test_layout.py" in newest and "tests/kernel/test_socket_lb.py" in newest
    assert "tests/kernel/test_northsouth_datapath.py" not in newest
    assert not any(a.startswith("--shard") for a in newest)


def test_full_runs_every_test_on_every_kernel(tmp_path):
    done = _matrix(_tree(tmp_path), tmp_path, "--full")
    assert done.returncode == 0, done.stderr
    runs = _vm_args(tmp_path)
    assert sorted(map(len, runs.values())) == [2, 2, 2]
    for series_runs in runs.values():
        for args in series_runs:
            assert "tests/kernel" in args
            assert not any(a.startswith("--ignore") or a == "-m" for a in args)


def test_a_failing_share_fails_its_kernel_only(tmp_path):
    done = _matrix(_tree(tmp_path), tmp_path, FAIL_6_1="3")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == "matrix: FAILED on 6.1"
    statuses = sorted(p.read_text().strip() for p in (tmp_path / "out").glob("*.status"))
    assert statuses == ["0", "0", "0", "3", "3"]


RESULT_WRITER = """
# Each stub VM writes its share's result, as tests/vm/collect would
for ((k = 1; k <= $#; k++)); do [ "${!k}" = --results ] && { n=$((k + 1)); dir=${!n}; }; done
mkdir -p "$dir"
passed=$(( ${#s} * 10 + ${#dir} ))
cat >"$dir/result.json" <<JSON
{"series": "$s", "shard": "x", "seconds": ${#dir}, "pytest_exit_status": 0,
 "counts": {"passed": $passed, "skipped": 1}, "skipped": [{"test": "$dir::s"}], "failed": [],
 "file_seconds": {"tests/kernel/test_a.py": 1.5}}
JSON
"""


def test_a_kernels_shares_are_merged_into_one_result(tmp_path):
    root = _tree(tmp_path)
    vm = root / "tests" / "vm"
    shutil.copy(REPO / "tests" / "vm" / "collect", vm / "collect")
    run = vm / "run"
    run.write_text(run.read_text().replace('sleep "${STUB_SLEEP:-0.2}"',
                                           RESULT_WRITER + 'sleep "${STUB_SLEEP:-0.2}"'))
    # render: the kernel table is drawn from the merged results (its arguments kept)
    (vm / "render").write_text("import sys\nprint('render:', *sys.argv[1:])\n")
    done = _matrix(root, tmp_path)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out"
    rendered = next(line for line in done.stdout.splitlines() if line.startswith("render:")).split()[1:]
    assert rendered == [str(out / s / "result.json") for s in ("5.10", "6.1", "6.12")]
    for series in ("5.10", "6.1"):
        shares = [json.loads((out / f"{series}.{i}of2" / "result.json").read_text()) for i in (1, 2)]
        merged = json.loads((out / series / "result.json").read_text())
        assert merged["shards"] == 2 and "shard" not in merged
        assert merged["counts"] == {k: sum(p["counts"][k] for p in shares) for k in ("passed", "skipped")}
        assert merged["seconds"] == max(p["seconds"] for p in shares)
        assert len(merged["skipped"]) == 2
        assert merged["file_seconds"] == {"tests/kernel/test_a.py": 3.0}
    # The newest kernel ran in one VM: its own result stands, nothing merged
    assert not (out / "6.12.1of1").exists()
    assert json.loads((out / "6.12" / "result.json").read_text())["shard"] == "x"


def test_a_vm_without_a_status_fails(tmp_path):
    root = _tree(tmp_path)
    # The stub VM of 5.10 is killed from outside (as an OOM kill would):
    # the matrix must not read that as a pass.
    run = root / "tests" / "vm" / "run"
    run.write_text(run.read_text().replace(
        'exit "${!var:-0}"', '[ "$s" = 5.10 ] && kill -9 $$\nexit "${!var:-0}"'))
    done = _matrix(root, tmp_path)
    assert done.returncode == 1
    assert "matrix: FAILED on 5.10" in done.stderr


def test_stopping_the_matrix_stops_its_vms(tmp_path):
    root = _tree(tmp_path)
    environ = dict(os.environ, STUB_PIDS=str(tmp_path / "pids"), STUB_SLEEP="60")
    matrix = subprocess.Popen(
        ["tests/vm/matrix", "--out", str(tmp_path / "out")], cwd=root, env=environ,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pids_file = tmp_path / "pids"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if pids_file.exists() and len(pids_file.read_text().split()) == 2:
                break
            time.sleep(0.1)
        vms = [int(p) for p in pids_file.read_text().split()]
        assert len(vms) == 2
        matrix.send_signal(signal.SIGTERM)
        assert matrix.wait(timeout=30) == 130
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(p) for p in vms):
            time.sleep(0.1)
        assert not any(_alive(p) for p in vms)
    finally:
        if matrix.poll() is None:
            matrix.kill()
        subprocess.run(["pkill", "-f", str(root / "tests" / "vm" / "run")], check=False)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for this purpose.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_a_number_of_vms_must_be_one_or_more(tmp_path):
    root = _tree(tmp_path)
    for args in (["--shares", "0"], ["--jobs", "x"], ["--hold-jobs", "-1"]):
        done = _matrix(root, tmp_path, *args)
        assert done.returncode == 2, (args, done.stdout)
        assert "whole number of VMs" in done.stderr
    assert not (tmp_path / "pids").exists()
