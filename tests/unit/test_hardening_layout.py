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
from meshbpf.datapath.layout import PickKeyC, SvcC, SvcKeyC

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


# --- opens that skipped the check: each refuses an old layout before any read or write ---

class FakePins:
    """obj_get over fake pins (real fds of /dev/null, so closing works),
    map_info by fd, and every lookup and update recorded: none may happen
    through a struct of the wrong size."""

    def __init__(self, monkeypatch, folder: Path, maps: dict[str, libbpf.MapInfo]):
        self.folder, self.maps, self.by_fd, self.calls, self.opened = folder, maps, {}, [], []
        monkeypatch.setattr(libbpf, "obj_get", self.obj_get)
        monkeypatch.setattr(libbpf, "map_info", lambda fd: self.by_fd[fd])
        for name in ("map_lookup", "map_update", "map_delete"):
            monkeypatch.setattr(libbpf, name, lambda *a, name=name: self.calls.append(name))
        monkeypatch.setattr(libbpf, "map_keys", lambda fd, key: iter(()))
        monkeypatch.setattr(libbpf, "map_count", lambda fd, size: 0)

    def obj_get(self, path: str) -> int:
        info = self.maps.get(Path(path).name)
        if info is None:
            raise FileNotFoundError(2, "No such file or directory")
        fd = os.open(os.devnull, os.O_RDONLY)
        self.by_fd[fd] = info
        libbpf._pins[fd] = (path, info.id)
        self.opened.append(fd)
        return fd

    def all_closed(self) -> bool:
        return all(_closed(fd) for fd in self.opened)


def _closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


PERCPU_ARRAY, PERCPU_HASH, ARRAY, SOCKHASH = 6, 5, 2, 18


def test_the_redirect_counters_of_an_old_layout_are_one_line_not_a_read(monkeypatch, tmp_path):
    from meshbpf.datapath import redirect
    pins = FakePins(monkeypatch, tmp_path,
                    {"mbpf_redir_cnt": libbpf.MapInfo(3, PERCPU_ARRAY, 4, 16, 8, "mbpf_redir_cnt")})
    with pytest.raises(libbpf.LayoutError) as exc:
        redirect.read_counters(tmp_path)
    assert str(exc.value).startswith(f"map mbpf_redir_cnt (pinned at {tmp_path}/mbpf_redir_cnt) has "
                                     "value size 16, this build expects 8")
    assert pins.calls == [] and pins.all_closed()


def test_the_redirect_counters_of_this_layout_are_read(monkeypatch, tmp_path):
    from meshbpf.datapath import redirect
    pins = FakePins(monkeypatch, tmp_path,
                    {"mbpf_redir_cnt": libbpf.MapInfo(3, PERCPU_ARRAY, 4, 8, 8, "mbpf_redir_cnt")})
    assert redirect.read_counters(tmp_path) is not None
    assert pins.calls and pins.all_closed()


def _route_counters(monkeypatch, tmp_path, value_size):
    from meshbpf.datapath.route_counters import RouteCounters
    pins = FakePins(monkeypatch, tmp_path, {"mbpf_route_cnt": libbpf.MapInfo(
        4, PERCPU_HASH, ct.sizeof(PickKeyC), value_size, 16, "mbpf_route_cnt")})
    counters = RouteCounters(tmp_path)
    counters.labels = {(1, 2): ("default/route", "default/web")}  # a split programmed before
    return pins, counters


def test_route_counters_of_an_old_layout_are_one_line_not_a_read(monkeypatch, tmp_path):
    from meshbpf.model import DesiredState
    from meshbpf.reconcile import LBState
    pins, counters = _route_counters(monkeypatch, tmp_path, 16)
    with pytest.raises(libbpf.LayoutError, match=r"^map mbpf_route_cnt \(pinned at .*\) has value size 16"):
        counters.read()
    with pytest.raises(libbpf.LayoutError, match=r"^map mbpf_route_cnt .* has value size 16"):
        counters.sync(DesiredState(), LBState())
    assert pins.calls == [] and pins.all_closed()


def test_route_counters_of_this_layout_are_read(monkeypatch, tmp_path):
    pins, counters = _route_counters(monkeypatch, tmp_path, 8)
    assert counters.read() == {("default/route", "default/web"): 0}
    assert pins.calls == ["map_lookup"] and pins.all_closed()


@pytest.mark.parametrize("old", ["mbpf_redir_cfg", "mbpf_sockhash"])
def test_uninstall_over_an_old_redirect_layout_changes_nothing_through_it_and_says_so(monkeypatch, tmp_path, old):
    from meshbpf.datapath import loader
    from meshbpf.datapath.layout import RedirCfgC, SockKeyC
    maps = {"mbpf_redir_cfg": libbpf.MapInfo(5, ARRAY, 4, ct.sizeof(RedirCfgC), 1, "mbpf_redir_cfg"),
            "mbpf_sockhash": libbpf.MapInfo(6, SOCKHASH, ct.sizeof(SockKeyC), 4, 16, "mbpf_sockhash")}
    info = maps[old]
    maps[old] = libbpf.MapInfo(info.id, info.type, info.key_size + 4, info.value_size, 16, old)
    pins = FakePins(monkeypatch, tmp_path, maps)
    monkeypatch.setattr(loader, "_ours", lambda pin, kind, name="": True)
    removed = []
    assert loader._drain_sockhash(tmp_path, 0.0, removed) == 0
    (warning,) = removed
    assert warning.startswith("warning: spliced sockets were not switched to TCP first, bytes they had not "
                              f"read yet may be lost: map {old} (pinned at {tmp_path}/{old}) has key size")
    assert "\n" not in warning
    assert pins.calls == [] and pins.all_closed()


def test_uninstall_over_this_redirect_layout_switches_redirection_off(monkeypatch, tmp_path):
    from meshbpf.datapath import loader
    from meshbpf.datapath.layout import RedirCfgC, SockKeyC
    pins = FakePins(monkeypatch, tmp_path, {
        "mbpf_redir_cfg": libbpf.MapInfo(5, ARRAY, 4, ct.sizeof(RedirCfgC), 1, "mbpf_redir_cfg"),
        "mbpf_sockhash": libbpf.MapInfo(6, SOCKHASH, ct.sizeof(SockKeyC), 4, 16, "mbpf_sockhash")})
    monkeypatch.setattr(loader, "_ours", lambda pin, kind, name="": kind == "map")
    removed = []
    assert loader._drain_sockhash(tmp_path, 0.0, removed) == 0
    assert removed == [] and pins.calls == ["map_lookup", "map_update"] and pins.all_closed()
