"""engine._fsutil: the one atomic write, full write, directory fsync, durable
directory creation and durability check that every durable object uses."""

from __future__ import annotations

import errno
import os

import pytest

from engine import _fsutil


def test_atomic_write_replaces_whole_and_leaves_no_temp(tmp_path):
    (tmp_path / "f").write_bytes(b"old")
    _fsutil.atomic_write(str(tmp_path), "f", b"new contents")
    assert (tmp_path / "f").read_bytes() == b"new contents"
    _fsutil.atomic_write(str(tmp_path), "f", [b"a", bytearray(b"b"), memoryview(b"c")], durable=False)
    assert (tmp_path / "f").read_bytes() == b"abc"
    assert sorted(os.listdir(tmp_path)) == ["f"]
    assert (os.stat(tmp_path / "f").st_mode & 0o777) == 0o600


def test_short_writes_are_retried(tmp_path, monkeypatch):
    real = os.write

    def one_byte(fd, data):
        return real(fd, bytes(memoryview(data)[:1]))

    monkeypatch.setattr(_fsutil.os, "write", one_byte)
    _fsutil.atomic_write(str(tmp_path), "f", b"0123456789")
    assert (tmp_path / "f").read_bytes() == b"0123456789"


def test_a_failed_write_keeps_the_old_file_and_removes_the_temp(tmp_path, monkeypatch):
    (tmp_path / "f").write_bytes(b"old")

    def chunks():
        yield b"half"
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as exc:
        _fsutil.atomic_write(str(tmp_path), "f", chunks())
    assert exc.value.errno == errno.ENOSPC
    assert (tmp_path / "f").read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["f"]

    monkeypatch.setattr(_fsutil.os, "write", lambda fd, data: 0)
    with pytest.raises(OSError) as exc:
        _fsutil.atomic_write(str(tmp_path), "f", b"x")
    assert exc.value.errno == errno.ENOSPC
    assert sorted(os.listdir(tmp_path)) == ["f"]


def test_check_durability():
    for d in _fsutil.DURABILITIES:
        assert _fsutil.check_durability(d) == d
    with pytest.raises(ValueError, match="'always', 'interval' or 'none'"):
        _fsutil.check_durability("sometimes")
    with pytest.raises(TypeError):
        _fsutil.check_durability(1)


def test_every_durable_object_checks_durability_the_same_way(tmp_path):
    import engine

    makers = [
        lambda d: engine.Log(str(tmp_path / "log"), durability=d),
        lambda d: engine.VersionedStore(str(tmp_path / "vs"), durability=d),
        lambda d: engine.DurablePriorityQueue(levels=2, path=str(tmp_path / "pq"), durability=d),
        lambda d: engine.DurableKeyedQueue(partitions=2, path=str(tmp_path / "kq"), durability=d),
    ]
    for make in makers:
        with pytest.raises(ValueError, match="'always', 'interval' or 'none'"):
            make("sometimes")
        with pytest.raises(TypeError):
            make(3)


def test_make_dirs_syncs_each_new_name_and_undoes_itself_on_failure(tmp_path, monkeypatch):
    synced = []
    real = _fsutil.fsync_dir
    monkeypatch.setattr(_fsutil, "fsync_dir", lambda p: (synced.append(p), real(p)))
    root = str(tmp_path)
    made = _fsutil.make_dirs(os.path.join(root, "a", "b"))
    assert made == [f"{root}/a/b", f"{root}/a"]
    assert synced == [f"{root}/a", root]            # "b" in a, "a" in root
    assert (os.stat(f"{root}/a/b").st_mode & 0o777) == 0o700
    synced.clear()
    assert _fsutil.make_dirs(f"{root}/a/b") == [] and synced == []   # present: nothing to do

    def failing(p):
        raise OSError(errno.EIO, "fsync failed")

    monkeypatch.setattr(_fsutil, "fsync_dir", failing)
    with pytest.raises(OSError) as ei:
        _fsutil.make_dirs(f"{root}/c/d")
    assert ei.value.errno == errno.EIO
    assert not os.path.exists(f"{root}/c")   # a retry creates and syncs them anew
