"""The segment log: writer, reader, recovery, groups, retention (single process)."""

from __future__ import annotations

import json
import mmap
import os
import stat
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import engine
from engine import _log

SEG = 1 << 16  # small segments so tests roll often


def _values(n, start=0):
    return [f"value-{i}-".encode() * (1 + i % 5) for i in range(start, start + n)]


def test_append_read_roundtrip_with_rolls(tmp_path):
    d = tmp_path / "log"
    vals = _values(5000)
    with engine.Log(d, durability="none", segment_bytes=SEG) as log:
        for i, v in enumerate(vals[:2000]):
            assert log.append(v, key=(b"k%d" % i) if i % 3 == 0 else None) == i
        rolls = log.stats()["rolls"]
        assert rolls >= 2
        assert list(log.append_many(vals[2000:])) == list(range(2000, 5000))
        assert log.next_offset == 5000
        assert log.stats()["rolls"] > rolls  # the batch's frames roll too
    r = engine.LogReader(d)
    recs = list(r)
    assert [x.offset for x in recs] == list(range(5000))
    assert [x.value for x in recs] == vals
    assert [x.key for x in recs[:2000]] == [(b"k%d" % i) if i % 3 == 0 else None for i in range(2000)]
    ts = [x.timestamp for x in recs]
    assert ts == sorted(ts) and abs(ts[0] - time.time_ns()) < 60e9
    assert r.position == 5000 and r.read() is None
    r.close()
    with pytest.raises(engine.Closed):
        r.read()


@pytest.mark.parametrize("durability", ["none", "always"])
def test_end_offset_is_the_published_end(tmp_path, durability):
    """``end_offset - position`` is a reader's lag: the writer publishes its
    next offset with every batch (both write paths, across rolls, to readers
    in other processes); a notify block whose writer never set it says None."""
    d = tmp_path / "log"
    with engine.Log(d, durability=durability, segment_bytes=SEG) as log:
        r = engine.LogReader(d, start=0)
        assert r.end_offset == 0 and r.position == 0
        for v in _values(1500):
            log.append(v)
        assert r.end_offset == 1500 and log.stats()["rolls"] >= 1
        assert len(r.read_many(400)) == 400 and r.end_offset - r.position == 1100
        log.append_many(_values(100))
        assert r.end_offset == 1600
    assert r.end_offset == 1600  # the writer closed: its last publish stands
    child = (
        "import engine, sys\n"
        "with engine.Log(sys.argv[1], durability=sys.argv[2], segment_bytes=1 << 16) as log:\n"
        "    log.append_many([b'from another process'] * 250)\n"
    )
    subprocess.run([sys.executable, "-c", child, str(d), durability], check=True, timeout=60)
    assert r.end_offset == 1850
    assert len(r.read_many(5000)) == 1450 and r.end_offset == r.position == 1850
    r.close()
    with pytest.raises(engine.Closed):
        _ = r.end_offset
    with open(d / "notify", "r+b") as f:  # as a writer built before the field left it
        f.seek(32)
        f.write(bytes(8))
    with engine.LogReader(d, start=0) as r2:
        assert r2.end_offset is None


def test_empty_key_differs_from_none_and_buffers_accepted(tmp_path):
    with engine.Log(tmp_path, durability="none") as log:
        log.append(b"a", key=b"")
        log.append(bytearray(b"b"), key=memoryview(b"kk"))
        log.append(np.arange(4, dtype=np.uint8))
        log.append(b"")
        log.append_many([b"x", b"y"], keys=[None, b"k"])
        with pytest.raises(TypeError):
            log.append("text")
        with pytest.raises(TypeError):
            log.append(b"x", key=5)
        with pytest.raises(TypeError):
            log.append_many(b"abc")
        with pytest.raises(ValueError, match="keys"):
            log.append_many([b"a"], keys=[b"1", b"2"])
    recs = list(engine.LogReader(tmp_path))
    assert [(r.key, r.value) for r in recs] == [
        (b"", b"a"), (b"kk", b"b"), (None, bytes(range(4))), (None, b""), (None, b"x"), (b"k", b"y")]
    assert len(recs[1]) == 1


def test_bad_arguments_name_the_argument(tmp_path):
    for kw, exc, word in [
        (dict(durability="sometimes"), ValueError, "durability"),
        (dict(segment_bytes=10), ValueError, "segment_bytes"),
        (dict(segment_bytes="big"), TypeError, "segment_bytes"),
        (dict(retention_bytes=-1), ValueError, "retention_bytes"),
        (dict(retention_age="1d"), TypeError, "retention_age"),
        (dict(flush_interval=0), ValueError, "flush_interval"),
    ]:
        with pytest.raises(exc, match=word):
            engine.Log(tmp_path / "x", **kw)
    with pytest.raises(TypeError, match="path"):
        engine.Log(42)
    with engine.Log(tmp_path / "y", durability="none") as log:
        log.append(b"x")
        with pytest.raises(ValueError, match="start"):
            engine.LogReader(tmp_path / "y", start=-1)
        with pytest.raises(TypeError, match="start"):
            engine.LogReader(tmp_path / "y", start="0")
        with pytest.raises(ValueError, match="group"):
            engine.LogReader(tmp_path / "y", group="../etc")
        r = engine.LogReader(tmp_path / "y")
        with pytest.raises(ValueError, match="offset"):
            r.seek(5)
        with pytest.raises(TypeError, match="timeout"):
            r.poll("1")
        with pytest.raises(ValueError, match="group"):
            r.commit()
    with pytest.raises(FileNotFoundError):
        engine.LogReader(tmp_path / "nothing")


def test_value_too_large_for_segment(tmp_path):
    with engine.Log(tmp_path, durability="none", segment_bytes=4096) as log:
        with pytest.raises(ValueError, match="segment_bytes"):
            log.append(b"x" * 5000)
        assert log.append(b"x" * 3900) == 0  # fits after a roll
        assert log.append(b"y" * 3900) == 1
    assert [len(r.value) for r in engine.LogReader(tmp_path)] == [3900, 3900]


def test_flush_in_none_mode_syncs_rolled_segments_too(tmp_path, monkeypatch):
    # durability="none" never syncs on a roll, so flush() must reach the rolled
    # segments as well as the active one ("every record appended so far")
    synced = []
    real_datasync = os.fdatasync
    real_fsync = os.fsync

    def note(real):
        def call(fd):
            synced.append(os.fstat(fd).st_ino)
            return real(fd)
        return call

    monkeypatch.setattr(os, "fdatasync", note(real_datasync))
    monkeypatch.setattr(os, "fsync", note(real_fsync))
    with engine.Log(tmp_path, durability="none", segment_bytes=SEG) as log:
        for v in _values(3000):
            log.append(v)
        segs = sorted(p for p in os.listdir(tmp_path) if p.endswith(".seg"))
        assert len(segs) >= 3
        synced.clear()
        log.flush()
        rolled = {os.stat(tmp_path / p).st_ino for p in segs[:-1]}
        assert rolled <= set(synced), "flush() left a rolled segment unsynced"
        synced.clear()
        log.flush()  # nothing new: the rolled ones are not synced again
        assert not (rolled & set(synced))


def test_second_writer_is_locked_in_process_and_across_processes(tmp_path):
    log = engine.Log(tmp_path, durability="none")
    with pytest.raises(engine.LogLocked) as ei:
        engine.Log(tmp_path)
    assert ei.value.holder == os.getpid()
    code = (f"import sys, engine\ntry:\n    engine.Log({str(tmp_path)!r})\nexcept engine.LogLocked as e:\n"
            f"    sys.exit(0 if e.holder == {os.getpid()} else 3)\nsys.exit(1)\n")
    # conftest puts the package under test on PYTHONPATH for children
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
    log.close()
    engine.Log(tmp_path).close()  # free again


def test_files_are_private(tmp_path):
    with engine.Log(tmp_path / "l", durability="always", segment_bytes=SEG) as log:
        log.append(b"x")
        engine.LogReader(tmp_path / "l", group="g").commit()
    for p in (tmp_path / "l").rglob("*"):
        if p.is_file():
            assert stat.S_IMODE(p.stat().st_mode) == 0o600, p


def test_reopen_continues_and_keeps_log_id(tmp_path):
    with engine.Log(tmp_path, durability="always", segment_bytes=SEG) as log:
        lid = log.log_id
        log.append_many(_values(1000))
    with engine.Log(tmp_path, durability="always", segment_bytes=SEG) as log:
        assert log.log_id == lid and log.next_offset == 1000
        assert log.stats()["was_clean"]
        log.append(b"after")
    recs = list(engine.LogReader(tmp_path))
    assert len(recs) == 1001 and recs[-1].value == b"after" and recs[-1].offset == 1000
    assert all(r.error is None for r in _log.verify(tmp_path))


def test_unclean_stop_recovers_everything_published(tmp_path):
    log = engine.Log(tmp_path, durability="none", segment_bytes=SEG)
    log.append_many(_values(1500))
    del log  # no close: no checkpoint, no index written for the active segment
    with engine.Log(tmp_path, durability="none", segment_bytes=SEG) as log:
        assert log.next_offset == 1500
        assert not log.stats()["was_clean"]
    assert [r.value for r in engine.LogReader(tmp_path)] == _values(1500)


def test_torn_tail_is_truncated_and_logged(tmp_path, caplog):
    log = engine.Log(tmp_path, durability="none", segment_bytes=SEG)
    log.append_many(_values(10))
    pos = log.stats()["active_position"]
    seg = log.stats()["active_segment"]
    del log
    # a half-written record: a length word and garbage, bad CRC
    with open(seg, "r+b") as f:
        f.seek(pos)
        f.write((48).to_bytes(4, "little") + os.urandom(44))
    with caplog.at_level("WARNING", logger="engine"):
        log = engine.Log(tmp_path, durability="none", segment_bytes=SEG)
    assert "torn tail" in caplog.text
    assert log.next_offset == 10
    assert log.append(b"new") == 10
    log.close()
    assert [r.value for r in engine.LogReader(tmp_path)] == _values(10) + [b"new"]
    assert all(r.error is None for r in _log.verify(tmp_path))


def test_corruption_before_checkpoint_is_never_skipped(tmp_path):
    with engine.Log(tmp_path, durability="always", segment_bytes=SEG) as log:
        log.append_many(_values(2000))
    first = tmp_path / f"{0:020d}.seg"
    data = bytearray(first.read_bytes())
    data[64 + 36] ^= 0x10  # inside the first record's value
    first.write_bytes(bytes(data))
    r = engine.LogReader(tmp_path)
    with pytest.raises(engine.CorruptLog) as ei:
        list(r)
    assert ei.value.segment.endswith(first.name) and ei.value.position == 64
    bad = [x for x in _log.verify(tmp_path) if x.error]
    assert len(bad) == 1 and "CRC" in bad[0].error
    # repair cuts there: offsets stay dense, appending continues
    assert _log.repair_truncate(tmp_path) is not None
    assert all(x.error is None for x in _log.verify(tmp_path))
    with engine.Log(tmp_path, durability="always", segment_bytes=SEG) as log:
        assert log.next_offset == 0
        log.append(b"fresh")
    assert [x.value for x in engine.LogReader(tmp_path)] == [b"fresh"]


def test_foreign_segment_refused(tmp_path):
    with engine.Log(tmp_path / "a", durability="none", segment_bytes=SEG) as log:
        log.append(b"a")
    with engine.Log(tmp_path / "b", durability="none", segment_bytes=SEG) as log:
        log.append(b"b")
    os.replace(tmp_path / "a" / f"{0:020d}.seg", tmp_path / "b" / f"{0:020d}.seg")
    with pytest.raises(engine.CorruptLog, match="another log"):
        engine.LogReader(tmp_path / "b")
    with pytest.raises(engine.CorruptLog):
        engine.Log(tmp_path / "b", durability="none", segment_bytes=SEG)


def test_seek_and_seek_time(tmp_path):
    with engine.Log(tmp_path, durability="none", segment_bytes=SEG) as log:
        stamps = []
        for i in range(3000):
            log.append(b"v%d" % i)
            if i % 500 == 0:
                time.sleep(0.002)
    recs = list(engine.LogReader(tmp_path))
    r = engine.LogReader(tmp_path)
    for off in (0, 1, 777, 1499, 2999, 3000):
        r.seek(off)
        rec = r.read()
        assert (rec.offset if rec else 3000) == off
    for i in (0, 1, 500, 501, 1700, 2999):
        ts = recs[i].timestamp
        off = r.seek_time(ts)
        first = next(x.offset for x in recs if x.timestamp >= ts)
        assert off == first and r.read().offset == first
    assert r.seek_time(recs[-1].timestamp + 1) == 3000
    assert r.seek_time(0) == 0
    stamps.append(0)


def test_index_files_rebuilt_when_missing_or_stale(tmp_path):
    with engine.Log(tmp_path, durability="none", segment_bytes=SEG) as log:
        log.append_many(_values(3000))
    for p in tmp_path.glob("*.idx"):
        p.unlink()
    for p in tmp_path.glob("*.tix"):
        p.write_bytes(b"garbage")
    r = engine.LogReader(tmp_path)
    r.seek(2222)
    assert r.read().value == _values(1, 2222)[0]
    with engine.Log(tmp_path, durability="none", segment_bytes=SEG) as log:
        assert log.next_offset == 3000
    assert len(list(tmp_path.glob("*.idx"))) == len(list(tmp_path.glob("*.seg")))


def test_zero_copy_views_survive_close_and_deletion(tmp_path):
    with engine.Log(tmp_path, durability="none", segment_bytes=4096) as log:
        log.append_many([bytes([i]) * 300 for i in range(40)], keys=[b"k"] * 40)
    r = engine.LogReader(tmp_path, copy=False)
    recs = list(r)
    assert isinstance(recs[0].value, memoryview) and recs[0].value.readonly
    assert isinstance(recs[0].key, memoryview)
    r.close()
    for p in tmp_path.glob("*.seg"):
        p.unlink()
    import gc
    gc.collect()
    assert [bytes(x.value) for x in recs] == [bytes([i]) * 300 for i in range(40)]


def test_poll_waits_and_wakes(tmp_path):
    log = engine.Log(tmp_path, durability="none", segment_bytes=SEG)
    r = engine.LogReader(tmp_path)
    t0 = time.monotonic()
    cpu0 = time.process_time()
    assert r.poll(timeout=0.3) is None
    assert 0.28 <= time.monotonic() - t0 < 5
    assert time.process_time() - cpu0 < 0.1  # it slept: no busy loop
    assert r.poll(timeout=0) is None

    def later():
        time.sleep(0.2)
        log.append(b"hello")

    th = threading.Thread(target=later)
    th.start()
    t0 = time.monotonic()
    rec = r.poll(timeout=10)
    assert rec is not None and rec.value == b"hello"
    assert time.monotonic() - t0 < 5
    th.join()
    log.close()


def test_groups_commit_and_resume(tmp_path):
    with engine.Log(tmp_path, durability="always", segment_bytes=SEG) as log:
        log.append_many(_values(100))
        r = log.reader(group="billing")
        assert r.committed() is None
        got = [r.read().offset for _ in range(40)]
        assert got == list(range(40))
        r.commit()
        assert r.committed() == 40
        r.read()
        r.close()  # processed 40 but never committed it: redelivered
        r = engine.LogReader(tmp_path, group="billing")
        assert r.position == 40 and r.read().offset == 40
        r.commit(75)
        r2 = engine.LogReader(tmp_path, group="billing", start=0)
        assert r2.position == 75
        other = engine.LogReader(tmp_path, group="audit")
        assert other.position == 0


def test_retention_bytes_and_groups(tmp_path):
    log = engine.Log(tmp_path, durability="none", segment_bytes=4096, retention_bytes=5 * 4096)
    g = engine.LogReader(tmp_path, group="slow")
    g.commit(0)
    log.append_many([b"x" * 200] * 400)  # ~20 segments
    assert log.start_offset == 0  # the group holds everything
    g.commit(300)
    log.append_many([b"y" * 200] * 40)
    assert 0 < log.start_offset <= 300
    nseg = len(list(tmp_path.glob("*.seg")))
    g.commit(log.next_offset)
    log.apply_retention()
    assert len(list(tmp_path.glob("*.seg"))) <= 6 < nseg
    start = log.start_offset
    r = engine.LogReader(tmp_path)
    recs = list(r)
    assert recs[0].offset == start and recs[-1].offset == log.next_offset - 1
    assert [x.offset for x in recs] == list(range(start, log.next_offset))
    log.close()


def test_retention_never_pulls_a_segment_from_under_a_reader(tmp_path):
    log = engine.Log(tmp_path, durability="none", segment_bytes=4096, retention_bytes=2 * 4096,
                     retain_uncommitted=False)
    log.append_many([b"a" * 100] * 30)
    r = engine.LogReader(tmp_path, copy=False)
    first = [r.read() for _ in range(5)]
    log.append_many([b"b" * 100] * 300)  # deletes the segment r is in, and the next ones
    assert log.start_offset > 35
    rest = list(r)
    # the mapped segment stays readable; then the reader jumps over what was deleted
    assert [x.offset for x in first] == list(range(5))
    offs = [x.offset for x in rest]
    assert offs[: 30 - 5 - 0][:1] == [5]
    assert offs == sorted(offs) and offs[-1] == log.next_offset - 1
    assert r.skipped == log.next_offset - 5 - len(offs)
    assert r.skipped > 0
    r2 = engine.LogReader(tmp_path, start=0)
    assert r2.read().offset == log.start_offset and r2.skipped == log.start_offset
    log.close()


def test_retention_by_age(tmp_path):
    log = engine.Log(tmp_path, durability="none", segment_bytes=4096, retention_age=0.3)
    log.append_many([b"o" * 200] * 60)
    time.sleep(0.4)
    log.append_many([b"n" * 200] * 60)  # rolls: the old segments are now over age
    log.apply_retention()
    recs = list(engine.LogReader(tmp_path))
    olds = [x for x in recs if x.value[:1] == b"o"]
    # only the boundary segment (old and new records) may keep old ones
    assert recs[: len(olds)] == olds and len(olds) < 4096 // 232
    assert log.start_offset == recs[0].offset > 0
    assert [x.offset for x in recs] == list(range(recs[0].offset, 120))
    log.close()


@pytest.mark.parametrize("durability", ["always", "interval"])
def test_sync_hook_and_durable_offset(tmp_path, durability):
    calls = []
    _log._set_sync_hook(lambda path, info: calls.append(dict(info)))
    try:
        log = engine.Log(tmp_path, durability=durability, segment_bytes=SEG, flush_interval=0.02)
        log.append(b"a")
        log.append_many([b"b", b"c"])
        if durability == "always":
            assert log.durable_offset == 3
        deadline = time.monotonic() + 5
        while log.durable_offset < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert log.durable_offset == 3
        log.close()
    finally:
        _log._set_sync_hook(None)
    data = [c for c in calls if c["kind"] == "data"]
    assert data and data[-1]["next_offset"] == 3
    assert any(c["kind"] == "checkpoint" for c in calls)


def test_sync_seconds_counts_the_syncs_only(tmp_path):
    # a sync hook that sleeps runs after each sync's clock stops: the
    # log's sync time must not include it (nor the GIL wait after a sync)
    nap = 0.02
    _log._set_sync_hook(lambda path, info: time.sleep(nap) if info["kind"] == "data" else None)
    try:
        log = engine.Log(tmp_path / "a", durability="always", segment_bytes=SEG)
        assert log.stats()["sync_seconds"] == 0.0
        t0 = time.perf_counter()
        for i in range(10):
            log.append(b"%d" % i)
        wall = time.perf_counter() - t0
        st = log.stats()
        log.close()
    finally:
        _log._set_sync_hook(None)
    assert st["syncs"] == 10
    assert 0.0 < st["sync_seconds"] < wall - 10 * nap * 0.9, (st, wall)

    # a log that never syncs spends no time syncing
    none = engine.Log(tmp_path / "b", durability="none", segment_bytes=SEG)
    none.append_many([b"x"] * 100)
    assert none.stats()["sync_seconds"] == 0.0
    none.close()


def test_group_commit_across_threads(tmp_path):
    log = engine.Log(tmp_path, durability="always", segment_bytes=1 << 20)
    n_threads, per = 4, 60
    errors = []

    def work(t):
        try:
            for i in range(per):
                log.append(b"t%d-%d" % (t, i))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    ths = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    assert not errors
    st = log.stats()
    assert st["appends"] == n_threads * per and log.durable_offset == n_threads * per
    # appends made while a sync ran shared the next one
    assert st["syncs"] < n_threads * per
    log.close()
    vals = [r.value for r in engine.LogReader(tmp_path)]
    for t in range(n_threads):
        assert [v for v in vals if v.startswith(b"t%d-" % t)] == [b"t%d-%d" % (t, i) for i in range(per)]


def test_closed_log_refuses(tmp_path):
    log = engine.Log(tmp_path, durability="none")
    log.close()
    log.close()
    with pytest.raises(engine.Closed):
        log.append(b"x")
    with pytest.raises(engine.Closed):
        log.flush()


def test_cli_dump_verify_stats_repair(tmp_path, capsys):
    from engine.cli import main

    d = str(tmp_path / "log")
    with engine.Log(d, durability="none", segment_bytes=4096) as log:
        for i in range(0, 100, 10):  # ten batch frames
            log.append_many([b"hello %d" % j for j in range(i, i + 10)], keys=[b"k"] * 10)
    engine.LogReader(d, group="g").commit(40)
    assert main(["log", "dump", d, "--from", "5", "--count", "2", "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(x)["value"] for x in lines] == ["hello 5", "hello 6"]
    assert main(["log", "stats", d, "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["next_offset"] == 100 and st["groups"] == {"g": {"committed": 40, "lag": 60}}
    assert main(["log", "verify", d]) == 0
    capsys.readouterr()
    last = _log.verify(d)[-1]
    with open(last.segment, "r+b") as f:
        f.seek(last.end_position - 8)  # inside the last frame: repair drops it alone
        f.write(b"\xff")
    assert main(["log", "verify", d]) == 1
    assert "DAMAGED" in capsys.readouterr().out
    assert main(["log", "repair", d, "--truncate"]) == 0
    assert main(["log", "verify", d]) == 0
    assert main(["log", "tail", d, "--from", "0", "--count", "3"]) == 0
    assert len(capsys.readouterr().out.splitlines()) >= 3


# ---- the durable path: pwrite + fdatasync, readers bounded by `published`


def _notify_map(path: str) -> mmap.mmap:
    with open(os.path.join(path, "notify"), "r+b") as f:
        return mmap.mmap(f.fileno(), 64)


def test_reader_reads_the_active_segment_only_up_to_published(tmp_path):
    """In the active segment a record counts only below the writer's
    `published` word: bytes beyond it may be a pwrite in progress (a length
    word with half a record behind it), which must read as the end, not as
    damage, for readers and for verify."""
    path = str(tmp_path / "log")
    rs = _log._record_size(10)
    with engine.Log(path, durability="always", segment_bytes=1 << 16) as log:
        for i in range(5):
            log.append(b"%010d" % i)  # plain frames, published one by one
        mm = _notify_map(path)
        try:
            base = struct.unpack_from("<Q", mm, 16)[0]
            pub = struct.unpack_from("<Q", mm, 24)[0]
            assert pub >> 32 == base & 0xFFFFFFFF
            end = pub & 0xFFFFFFFF
            assert end == 64 + 5 * rs
            seg = os.path.join(path, f"{base:020d}.seg")
            # pretend the last record and a torn one after it are still being written
            fd = os.open(seg, os.O_RDWR)
            try:
                os.pwrite(fd, struct.pack("<I", 0x1234) + b"\xee" * 20, end)
                struct.pack_into("<Q", mm, 24, (pub & ~0xFFFFFFFF) | (end - rs))
                r = engine.LogReader(path)
                assert [rec.value for rec in r] == [b"%010d" % i for i in range(4)]
                assert r.read() is None and r.poll(timeout=0.01) is None
                with pytest.raises(ValueError):
                    engine.LogReader(path, start=5)
                res = _log.verify(path)
                assert [x.error for x in res] == [None]  # the live writer's tail is in progress
                # once published, the record is there; the torn bytes after it are still not read
                struct.pack_into("<Q", mm, 24, pub)
                assert r.read().value == b"%010d" % 4
                assert r.read() is None
                os.pwrite(fd, bytes(24), end)
            finally:
                os.close(fd)
        finally:
            mm.close()
        assert log.append(b"x") == 5
    r = engine.LogReader(path)
    assert [rec.offset for rec in r] == list(range(6))


def test_always_publishes_to_readers_only_what_is_durable(tmp_path):
    """durability="always" writes with pwrite and publishes after fdatasync:
    at every data sync point a reader sees exactly the synced records."""
    path = str(tmp_path / "log")
    seen = []

    def hook(d, info):
        if info["kind"] == "data":
            seen.append((info["next_offset"], sum(1 for _ in engine.LogReader(d))))

    _log._set_sync_hook(hook)
    try:
        with engine.Log(path, durability="always", segment_bytes=1 << 14) as log:
            for i in range(30):
                log.append_many([b"v%d" % j for j in range(i % 7 + 1)])
                log.append(b"single")
    finally:
        _log._set_sync_hook(None)
    assert len(seen) >= 60
    assert all(n == got for n, got in seen), seen[:5]
    assert [rec.value for rec in engine.LogReader(path)][-1] == b"single"
    assert _log.verify(path)[-1].error is None


def test_always_with_zero_fill_ahead_reads_back_and_recovers(tmp_path):
    """The zero-fill ahead of a durable log's tail (on by default) never
    overwrites records: read back, verify and recovery after a crash agree."""
    path = str(tmp_path / "log")
    vals = _values(3000)
    _log._set_zero_ahead(True)
    try:
        log = engine.Log(path, durability="always", segment_bytes=SEG)
        for i in range(0, 2000, 100):
            log.append_many(vals[i:i + 100])
        for v in vals[2000:2100]:
            log.append(v)
        log._simulate_crash()
        with engine.Log(path, durability="always", segment_bytes=SEG) as log:
            assert log.next_offset == 2100
            log.append_many(vals[2100:])
    finally:
        _log._set_zero_ahead(True)  # the default
    assert [rec.value for rec in engine.LogReader(path)] == vals
    assert all(r.error is None for r in _log.verify(path))


@pytest.mark.parametrize("durability", ["always", "none"])
def test_append_many_from_threads_returns_its_own_offsets(tmp_path, durability):
    # each call's range names exactly its records, while other threads append
    # during its sync wait
    got = []
    with engine.Log(tmp_path / "l", durability=durability, segment_bytes=1 << 20) as log:

        def writer(t):
            for i in range(50):
                vals = [b"%d:%d:%d" % (t, i, j) for j in range(2)]
                got.append((log.append_many(vals), vals))

        threads = [threading.Thread(target=writer, args=(t,)) for t in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        log.flush()
        with engine.LogReader(tmp_path / "l", start=0) as r:
            records = {rec.offset: bytes(rec.value) for rec in r}
    assert len(records) == 800
    for rng, vals in got:
        assert len(rng) == len(vals) and [records[o] for o in rng] == vals
