"""Pins of an old map layout: the CLI says so in one line and exits 1,
instead of reading them through structs of the wrong size (which has the
kernel write past them: a hang or a crash)."""

import ctypes as ct
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from meshbpf.datapath import libbpf
from meshbpf.datapath.layout import SvcC, SvcKeyC

SCRIPT = Path(sys.executable).parent / "meshbpf"


def test_a_wrong_value_size_is_one_line_naming_map_path_and_sizes(monkeypatch):
    info = libbpf.MapInfo(7, 1, ct.sizeof(SvcKeyC), ct.sizeof(SvcC) + 8, 16, "mbpf_svc")
    monkeypatch.setattr(libbpf, "map_info", lambda fd: info)
    monkeypatch.setitem(libbpf._pins, 999, ("/sys/fs/bpf/meshbpf/mbpf_svc", 7))
    with pytest.raises(libbpf.LayoutError) as exc:
        list(libbpf.map_items(999, SvcKeyC, SvcC))
    assert str(exc.value) == (
        f"map mbpf_svc (pinned at /sys/fs/bpf/meshbpf/mbpf_svc) has value size {ct.sizeof(SvcC) + 8}, "
        f"this build expects {ct.sizeof(SvcC)}: pinned by another meshbpf version "
        "(`meshbpf uninstall` removes it)")


def test_a_reused_fd_number_is_not_named_by_an_old_path(monkeypatch):
    info = libbpf.MapInfo(8, 1, 4, 4, 16, "other")
    monkeypatch.setattr(libbpf, "map_info", lambda fd: info)
    monkeypatch.setitem(libbpf._pins, 999, ("/sys/fs/bpf/old", 7))
    with pytest.raises(libbpf.LayoutError, match=r"map other \(map id 8\) has key size 4"):
        libbpf.map_count(999, 8)


_lib = libbpf._lib
_lib.bpf_map_create.argtypes = [ct.c_int, ct.c_char_p, ct.c_uint32, ct.c_uint32, ct.c_uint32, ct.c_void_p]


def _pin(folder, map_type, name, key_size, value_size, entries=16):
    fd = _lib.bpf_map_create(map_type, name.encode(), key_size, value_size, entries, None)
    assert fd >= 0, os.strerror(ct.get_errno())
    try:
        libbpf.obj_pin(fd, str(folder / name))
        if map_type == 1:
            libbpf.map_update(fd, (ct.c_uint8 * key_size)(), (ct.c_uint8 * value_size)())
    finally:
        os.close(fd)


@pytest.fixture
def old_pins():
    """A bpffs folder holding an mbpf_svc of an older layout (value 8 bytes longer)."""
    if os.geteuid() != 0 or not os.path.ismount("/sys/fs/bpf"):
        pytest.skip("needs root and bpffs")
    folder = Path(f"/sys/fs/bpf/mbpf-unit-{uuid.uuid4().hex[:8]}")
    folder.mkdir()
    try:
        _pin(folder, 1, "mbpf_svc", ct.sizeof(SvcKeyC), ct.sizeof(SvcC) + 8)
        _pin(folder, 2, "mbpf_pol_cfg", 4, 4)  # an older PolCfgC, without its pad
        _pin(folder, 27, "mbpf_events", 0, 0, 4096)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("command", [["service", "list"], ["status"]])
def test_the_cli_refuses_old_pins_in_one_line(old_pins, command):
    out = subprocess.run([str(SCRIPT), *command, "--bpffs", str(old_pins)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 1, out
    assert len(out.stderr.splitlines()) == 1, out.stderr
    assert out.stderr.startswith(f"meshbpf: error: map mbpf_svc (pinned at {old_pins}/mbpf_svc) has "
                                 f"value size {ct.sizeof(SvcC) + 8}, this build expects {ct.sizeof(SvcC)}")


def test_monitor_refuses_an_old_event_switch_in_one_line(old_pins):
    out = subprocess.run([str(SCRIPT), "monitor", "--no-names", "--count", "1", "--bpffs", str(old_pins)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out
    assert len(out.stderr.splitlines()) == 1, out.stderr
    assert out.stderr.startswith(f"meshbpf: error: map mbpf_pol_cfg (pinned at {old_pins}/mbpf_pol_cfg) "
                                 "has value size 4, this build expects 8")


def test_a_ring_buffer_has_no_layout_to_refuse(old_pins):
    """Its records are read whole (the monitor): key and value sizes are 0."""
    fd = libbpf.open_pinned(str(old_pins / "mbpf_events"), ct.c_uint32, ct.c_uint8)
    os.close(fd)
