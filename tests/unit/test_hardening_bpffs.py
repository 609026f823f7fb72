"""A read-only or unusable bpffs: one line naming the path, at the lock the
agent takes before anything is compiled or attached (not bcc's failure to
pin a map after the compile, with a traceback)."""

import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from meshbpf.datapath import lock as lock_mod
from meshbpf.datapath.bpffs import DatapathError
from meshbpf.datapath.lock import BpffsLock


class _ReadOnly:
    f_flag = os.ST_RDONLY


def test_a_read_only_mount_is_one_line_naming_the_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(lock_mod, "check_bpffs", lambda folder: None)
    monkeypatch.setattr(os, "statvfs", lambda path: _ReadOnly())
    folder = tmp_path / "meshbpf"
    with pytest.raises(DatapathError) as exc:
        BpffsLock(folder).acquire(0)
    assert str(exc.value) == (f"{folder}: the bpffs mount is read-only; the agent pins its maps and links "
                              f"there (remount it read-write, e.g. `mount -o remount,rw {tmp_path}`)")


def test_a_folder_that_cannot_be_made_is_one_line_naming_it(tmp_path, monkeypatch):
    monkeypatch.setattr(lock_mod, "check_bpffs", lambda folder: None)

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))
    monkeypatch.setattr(Path, "mkdir", refuse)
    folder = tmp_path / "meshbpf"
    with pytest.raises(DatapathError) as exc:
        BpffsLock(folder).acquire(0)
    assert str(exc.value) == f"{folder}: cannot create the pin folder: Permission denied"


def test_a_real_read_only_bpffs_is_refused_at_the_lock():
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a bpffs")
    mount = Path(tempfile.mkdtemp(prefix="mbpf-ro-"))
    subprocess.run(["mount", "-t", "bpf", "-o", "ro", "bpf", str(mount)], check=True)
    try:
        lock = BpffsLock(mount / "meshbpf")
        with pytest.raises(DatapathError, match=f"^{mount}/meshbpf: the bpffs mount is read-only"):
            lock.acquire(0)
        lock.release()
    finally:
        subprocess.run(["umount", str(mount)], check=True)
        mount.rmdir()
