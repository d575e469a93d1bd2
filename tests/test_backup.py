"""engine.backup / ``queue-engine backup``: the cut at T, incremental copies,
damage, locks, derived state (groups, snapshots, journals), the CLI.

The cut is exercised deterministically by replacing ``engine.backups._clock``
(the read of T) with a function that reads the clock and then, before the
backup copies anything, lets writers append, commit and snapshot: exactly
what concurrent writers do right after T.  The multi-process versions (real
writer processes, one SIGKILLed) are in tests/stress/test_backup_procs.py.
"""

from __future__ import annotations

import importlib
import json
import os
import struct
import subprocess
import sys
import time

import pytest

import engine
from engine import _log
from engine._log import Log, LogReader, _record_size
from engine.errors import CorruptLog, EngineError

backup_mod = importlib.import_module("engine.backups")


def _values(path):
    with LogReader(path, start=0) as r:
        return [bytes(rec.value) for rec in r]


def _act_at_t(monkeypatch, fn):
    """Make the backup's T the moment before ``fn`` runs (once)."""
    state = {"done": False}

    def clock():
        t = time.time_ns()
        if not state["done"]:
            state["done"] = True
            time.sleep(0.002)  # every record fn appends is stamped after t
            fn()
        return t

    monkeypatch.setattr(backup_mod, "_clock", clock)


def test_engine_backup_is_the_function():
    assert engine.backup is backup_mod.backup


def test_cut_at_t_drops_records_appended_after_t(tmp_path, monkeypatch):
    src, dst = tmp_path / "src", tmp_path / "dst"
    log = Log(src / "l", durability="none", segment_bytes=8192)
    before = [b"before-%04d" % i for i in range(300)]
    for v in before:
        log.append(v, key=b"k")
    bases_at_t = sorted(n for n in os.listdir(src / "l") if n.endswith(".seg"))

    def after_t():
        for i in range(400):  # rolls into new segments too
            log.append(b"after-%04d" % i)

    _act_at_t(monkeypatch, after_t)
    report = engine.backup(src, dst)
    log.close()
    assert _values(dst / "l") == before
    assert report.records == len(before) and report.log_ends == {"l": len(before)}
    # segments created after T are not in the copy
    assert sorted(n for n in os.listdir(dst / "l") if n.endswith(".seg")) == bases_at_t
    with Log(dst / "l") as copy:  # opens as an ordinary writer, clean
        assert copy.next_offset == len(before)
        assert copy.stats()["was_clean"] is True
        assert copy.append(b"next") == len(before)
    assert _values(dst / "l")[-1] == b"next"
    assert [bytes(v) for v in _values(src / "l")[:300]] == before


def test_lock_notify_and_temp_files_are_not_copied(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    log = Log(src / "l", durability="none")
    log.append(b"x")
    coord = engine.Coordinator(src / "coord", durability="none")
    (src / "l" / ".meta.123.tmp").write_bytes(b"half")
    try:
        engine.backup(src, dst)
        for root, _dirs, files in os.walk(dst):
            for name in files:
                assert name not in ("writer.lock", "owner.lock", "notify"), os.path.join(root, name)
                assert not name.endswith(".tmp"), name
        # the copies open while the source's writers still hold their locks,
        # in another process too (no flock and no pid of theirs came along)
        code = (
            "import engine, sys;"
            "l = engine.Log(sys.argv[1]); assert l.next_offset == 1; l.close();"
            "c = engine.Coordinator(sys.argv[2]); c.close()"
        )
        subprocess.run([sys.executable, "-c", code, str(dst / "l"), str(dst / "coord")],
                       check=True, timeout=60)
    finally:
        coord.close()
        log.close()


def test_incremental_copies_only_new_bytes(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    log = Log(src / "l", durability="none", segment_bytes=1 << 18)
    first = [b"a" * (i % 50) for i in range(1000)]
    log.append_many(first)
    full = engine.backup(src, dst)
    assert full.bytes_copied == full.bytes_total > 0
    nothing = engine.backup(src, dst, incremental=True)
    assert nothing.bytes_copied == 0
    assert nothing.segments_kept == nothing.segments
    # new records in the same active segment: exactly their bytes move
    base_count = len(os.listdir(src / "l"))
    more = [b"b" * (i % 70) for i in range(100)]
    end0 = _log.verify(src / "l")[-1].end_position
    log.append_many(more)
    assert len(os.listdir(src / "l")) == base_count  # no roll: one segment grew
    inc = engine.backup(src, dst, incremental=True)
    assert inc.bytes_copied == _log.verify(src / "l")[-1].end_position - end0 > 0
    assert _values(dst / "l") == first + more
    # rolls: sealed segments already copied are kept, not copied again
    third = [b"c" * 200 for _ in range(2000)]
    log.append_many(third)
    inc2 = engine.backup(src, dst, incremental=True)
    assert inc2.segments_kept >= full.segments - 1
    assert inc2.bytes_copied < inc2.bytes_total
    log.close()
    assert _values(dst / "l") == first + more + third
    fresh = engine.backup(src, tmp_path / "fresh")
    assert fresh.bytes_total == inc2.bytes_total


def test_incremental_recopies_a_segment_whose_prefix_changed(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    with Log(src / "l", durability="none") as log:
        log.append_many([b"old-%d" % i for i in range(50)])
    engine.backup(src, dst)
    # the source is re-created under the same segment names
    import shutil

    shutil.rmtree(src / "l")
    with Log(src / "l", durability="none") as log:
        log.append_many([b"new-%d" % i for i in range(60)])
    with pytest.raises(EngineError):
        engine.backup(src, dst)  # not empty and not incremental
    inc = engine.backup(src, dst, incremental=True)
    assert inc.bytes_copied == inc.bytes_total
    assert _values(dst / "l") == [b"new-%d" % i for i in range(60)]


def _flip(path, pos):
    with open(path, "r+b") as f:
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0x40]))


@pytest.mark.parametrize("where", ["sealed", "active"])
def test_a_damaged_source_segment_fails_loudly(tmp_path, where):
    src = tmp_path / "src"
    log = Log(src / "l", durability="none", segment_bytes=8192)
    log.append_many([b"v" * 40 for _ in range(400)])
    segs = sorted(n for n in os.listdir(src / "l") if n.endswith(".seg"))
    assert len(segs) > 2
    target = src / "l" / (segs[0] if where == "sealed" else segs[-1])
    _flip(target, 64 + 32 + 5)  # inside the first record's value
    with pytest.raises(CorruptLog):
        engine.backup(src, tmp_path / "dst")
    proc = subprocess.run([sys.executable, "-m", "engine", "backup", str(src), str(tmp_path / "dst2")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    log.close()


def _group_file(path, group):
    with LogReader(path, group=group) as r:
        return r.committed()


def test_group_committed_past_the_cut_is_clamped(tmp_path, monkeypatch):
    src, dst = tmp_path / "src", tmp_path / "dst"
    log = Log(src / "l", durability="none")
    log.append_many([b"%d" % i for i in range(100)])
    with LogReader(src / "l", group="slow") as r:
        r.commit(40)

    def after_t():
        log.append_many([b"%d" % i for i in range(100, 150)])
        with LogReader(src / "l", group="fast") as r:
            r.commit(150)

    _act_at_t(monkeypatch, after_t)
    report = engine.backup(src, dst)
    log.close()
    assert report.groups_clamped == 1
    assert _group_file(dst / "l", "slow") == 40
    assert _group_file(dst / "l", "fast") == 100  # the copy's end: re-read, never skipped
    assert _group_file(src / "l", "fast") == 150


def test_truncations_and_group_epochs_survive_the_backup(tmp_path, monkeypatch):
    """A log recovered once after a crash (truncation 1) whose groups commit
    at epoch 1: the copy keeps the truncations file and every group's epoch,
    also for a group clamped to the cut.  So a truncation of the restored
    copy below a group's offset makes that group re-read from it."""
    from engine._log import read_group, verify

    src, dst = tmp_path / "src", tmp_path / "dst"
    log = Log(src / "l", durability="none")
    log.append_many([b"a%03d" % i for i in range(50)])
    log._simulate_crash()
    log = Log(src / "l", durability="none")  # unclean: truncation 1, at offset 50
    log.append_many([b"b%03d" % i for i in range(50, 60)])
    log.append_many([b"b%03d" % i for i in range(60, 100)])  # a frame of its own, from 60
    with LogReader(src / "l", group="g") as r:
        r.commit(80)
    assert read_group(src / "l", "g") == (80, 1)

    def after_t():
        log.append_many([b"c%03d" % i for i in range(100, 120)])
        with LogReader(src / "l", group="late") as r:
            r.commit(120)

    _act_at_t(monkeypatch, after_t)
    report = engine.backup(src, dst)
    log.close()
    assert report.log_ends == {"l": 100} and report.groups_clamped == 1
    assert read_group(dst / "l", "g") == (80, 1)
    assert read_group(dst / "l", "late") == (100, 1)  # clamped to the cut, same epoch
    assert (dst / "l" / "truncations").read_bytes() == (src / "l" / "truncations").read_bytes()
    assert [r.error for r in verify(dst / "l")] == [None]
    with Log(dst / "l", durability="none") as copy:
        assert copy.stats()["was_clean"] and copy.next_offset == 100
    assert _values(dst / "l")[48:52] == [b"a048", b"a049", b"b050", b"b051"]

    # power loss on the restored copy: records from 60 on never reached the
    # disk; the next open truncates there (truncation 2) and appends reuse
    # offsets 60.. past the group's 80
    (seg,) = [dst / "l" / n for n in os.listdir(dst / "l") if n.endswith(".seg")]
    with open(seg, "r+b") as f:
        data = f.read()
        pos = 64  # walk the frames' length words to the one of offset 60
        while struct.unpack_from("<Q", data, pos + 8)[0] != 60:
            pos += (struct.unpack_from("<I", data, pos)[0] + 7) & ~7
        end = len(data.rstrip(b"\0"))
        f.seek(pos)
        f.write(b"\0" * (end - pos))
    os.unlink(dst / "l" / "checkpoint")
    with Log(dst / "l", durability="none") as copy:
        assert copy.next_offset == 60
        copy.append_many([b"d%03d" % i for i in range(60, 120)])
    with LogReader(dst / "l", group="g") as r:
        assert r.position == 60  # re-reads the new records, never skips 60..79
        assert bytes(r.read().value) == b"d060"


def test_snapshot_newer_than_the_cut_is_not_used(tmp_path, monkeypatch):
    src, dst = tmp_path / "src", tmp_path / "dst"
    store = engine.VersionedStore(src / "s", durability="none", snapshot_every=None)
    for i in range(50):
        store.put("k", b"%d" % i)
    store.snapshot()
    for i in range(50, 80):
        store.put("k", b"%d" % i)

    def after_t():
        for i in range(80, 120):
            store.put("k", b"%d" % i)
        store.snapshot()

    _act_at_t(monkeypatch, after_t)
    report = engine.backup(src, dst)
    store.close()
    snaps = sorted(n for n in os.listdir(dst / "s") if n.startswith("snap-"))
    assert snaps == sorted(n for n in os.listdir(dst / "s") if n.startswith("snap-") and int(n[5:25]) <= 80)
    assert snaps, "the snapshot taken before T is kept"
    assert report.log_ends == {"s/log": 80}
    with engine.VersionedStore(dst / "s", durability="none") as copy:
        assert copy.get("k") == (80, b"79")
        assert copy.revision == 80


def test_journal_compaction_at_t_retries(tmp_path, monkeypatch):
    src, dst = tmp_path / "src", tmp_path / "dst"
    coord = engine.Coordinator(src / "coord", durability="none", compact_records=16)
    part = engine.LogParticipant(Log(src / "a", durability="none"))
    calls = []

    def clock():
        t = time.time_ns()
        if not calls:
            time.sleep(0.002)
            gen = json.loads((src / "coord" / "CURRENT").read_bytes())["gen"]
            i = 0
            while json.loads((src / "coord" / "CURRENT").read_bytes())["gen"] == gen:
                with coord.transaction() as tx:  # until a compaction switches the generation
                    tx.enlist(part, [b"t%d" % i])
                i += 1
        calls.append(t)
        return t

    monkeypatch.setattr(backup_mod, "_clock", clock)
    for i in range(5):
        with coord.transaction() as tx:
            tx.enlist(part, [b"before-%d" % i])
    report = engine.backup(src, dst)
    assert report.attempts == 2 and len(calls) == 2
    coord.close()
    part.close()
    part.log.close()
    c2 = engine.Coordinator(dst / "coord", durability="none")
    p2 = engine.LogParticipant(Log(dst / "a", durability="none"))
    c2.recover([p2])
    got = _values(dst / "a")
    assert got[:5] == [b"before-%d" % i for i in range(5)] and len(got) >= 5
    c2.close()
    p2.close()
    p2.log.close()


def test_full_backup_needs_an_empty_destination(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    with Log(src / "l", durability="none") as log:
        log.append(b"x")
    dst.mkdir()
    (dst / "precious").write_text("keep me")
    with pytest.raises(EngineError):
        engine.backup(src, dst)
    with pytest.raises(EngineError):
        engine.backup(src, dst, incremental=True)  # no manifest: not a backup
    assert (dst / "precious").read_text() == "keep me"
    with pytest.raises(ValueError):
        engine.backup(src, src / "inside")


def test_cli_json_and_closing_note(tmp_path):
    src = tmp_path / "src"
    with Log(src / "l", durability="none") as log:
        log.append_many([b"x" * 100] * 100)
    proc = subprocess.run([sys.executable, "-m", "engine", "backup", str(src), str(tmp_path / "d1"), "--json"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stdout.splitlines()
    rep = json.loads(line)
    assert rep["records"] == 100 and rep["logs"] == 1
    proc = subprocess.run([sys.executable, "-m", "engine", "backup", str(src), str(tmp_path / "d1"),
                           "--incremental"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "GB/s" in proc.stderr and proc.stdout == ""
    proc = subprocess.run([sys.executable, "-m", "engine", "backup", "/nonexistent/qe-backup", str(tmp_path / "d2")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1


def test_durable_queue_restores_without_live_members(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    q = engine.DurablePriorityQueue(levels=2, path=str(src / "pq"), durability="none")
    for i in range(20):
        q.put(b"m%d" % i, priority=i % 2)
    engine.backup(src, dst)
    q.close()
    assert not os.path.exists(dst / "pq" / "bell")
    q2 = engine.DurablePriorityQueue(levels=2, path=str(dst / "pq"), durability="none")
    got = sorted(q2.get(timeout=5) for _ in range(20))
    q2.close()
    assert got == sorted(b"m%d" % i for i in range(20))


def test_acked_delayed_offsets_past_the_cut_are_not_copied(tmp_path, monkeypatch):
    """The durable queue lists delayed messages acked above its group offset;
    entries past the copy's cut would make the restored queue skip the new
    messages that get those offsets."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    q = engine.DurablePriorityQueue(levels=1, path=str(src / "pq"), durability="none")
    q.put(b"wait", delay=3600)  # holds the delay log's group offset at 0
    q.put(b"d0", delay=0.001)
    assert q.get(timeout=5) == b"d0"
    q.ack()  # the list of acked offsets exists before T (offset 1)
    assert os.listdir(src / "pq" / "delay-acked")

    def after_t():
        q.put(b"d1", delay=0.001)
        q.put(b"d2", delay=0.001)
        assert sorted([q.get(timeout=5), q.get(timeout=5)]) == [b"d1", b"d2"]
        q.ack()

    _act_at_t(monkeypatch, after_t)
    engine.backup(src, dst)
    q.close()
    q2 = engine.DurablePriorityQueue(levels=1, path=str(dst / "pq"), durability="none")
    try:
        q2.put(b"new1", delay=0.001)
        q2.put(b"new2", delay=0.001)
        assert sorted([q2.get(timeout=5), q2.get(timeout=5)]) == [b"new1", b"new2"]
    finally:
        q2.close()


def test_backup_without_verification_restores_the_same(tmp_path, monkeypatch):
    src = tmp_path / "src"
    log = Log(src / "l", durability="none", segment_bytes=8192)
    log.append_many([b"r%d" % i for i in range(500)])
    _act_at_t(monkeypatch, lambda: log.append_many([b"late"] * 50))
    report = engine.backup(src, tmp_path / "dst", verify=False)
    log.close()
    assert report.verified_segments == 0 and report.log_ends == {"l": 500}
    assert _values(tmp_path / "dst" / "l") == [b"r%d" % i for i in range(500)]
    with Log(tmp_path / "dst" / "l") as copy:
        assert copy.next_offset == 500


def test_saga_log_restores_and_recovers(tmp_path, monkeypatch):
    src, dst = tmp_path / "src", tmp_path / "dst"
    saga = engine.Saga(str(src / "saga"), durability="none", segment_bytes=8192)
    saga.step("one", lambda sc: None, lambda sc: None).step("two", lambda sc: None, lambda sc: None)
    for i in range(5):
        saga.run(saga_id=f"s{i}")
    _act_at_t(monkeypatch, lambda: [saga.run(saga_id=f"late{i}") for i in range(5)])
    engine.backup(src, dst)
    saga.close()
    from engine.saga import list_sagas

    infos = list_sagas(str(dst / "saga"))
    assert sorted(i.saga_id for i in infos) == [f"s{i}" for i in range(5)]
    assert {i.state.value for i in infos} == {"done"}
    again = engine.Saga(str(dst / "saga"), durability="none", segment_bytes=8192)
    again.step("one", lambda sc: None, lambda sc: None).step("two", lambda sc: None, lambda sc: None)
    assert again.recover() == []
    again.close()


def test_a_torn_tail_is_cut_and_damage_before_it_is_not(tmp_path):
    """A killed writer's half-written last record is not published: the copy
    ends before it, as the log's own recovery would.  The same bytes inside
    the published part are damage: CorruptLog."""
    import struct

    from engine._log import scan_segment

    src = tmp_path / "src"
    log = Log(src / "l", durability="none")
    log.append_many([b"v%d" % i for i in range(100)])
    log._simulate_crash()
    (seg,) = [src / "l" / n for n in os.listdir(src / "l") if n.endswith(".seg")]
    end = scan_segment(seg.read_bytes()).end_position
    with open(seg, "r+b") as f:  # a record header whose body never arrived
        f.seek(end)
        f.write(struct.pack("<IIQqII", 32 + 40, 0xDEADBEEF, 100, time.time_ns(), 0, 0) + b"\x01" * 8)
    report = engine.backup(src, tmp_path / "dst")
    assert report.log_ends == {"l": 100}
    assert _values(tmp_path / "dst" / "l") == [b"v%d" % i for i in range(100)]
    with Log(src / "l", durability="none") as again:  # the source's recovery agrees
        assert again.next_offset == 100
    # now damage a published record in the middle of the active segment
    _flip(seg, end - 8)
    with pytest.raises(CorruptLog):
        engine.backup(src, tmp_path / "dst2")


def test_keyed_queue_copy_has_no_live_members_and_keeps_acks(tmp_path):
    """The source's consumer is a live group member holding partitions; the
    copy must not inherit it (its control region is not copied), and what it
    acked stays acked in the copy."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    kq = engine.DurableKeyedQueue(partitions=2, path=str(src / "kq"), durability="none")
    for i in range(40):
        kq.put(b"m%d" % i, key=b"k%d" % (i % 5))
    c = kq.consumer()
    first = [c.get(timeout=5) for _ in range(10)]
    c.ack()
    engine.backup(src, dst)  # while the member is alive and holds its partitions
    assert not os.path.exists(dst / "kq" / "group")
    kq2 = engine.DurableKeyedQueue(partitions=2, path=str(dst / "kq"), durability="none")
    c2 = kq2.consumer()
    rest = [c2.get(timeout=5) for _ in range(30)]
    with pytest.raises(engine.Timeout):
        c2.get(timeout=0.2)
    assert sorted(first + rest) == sorted(b"m%d" % i for i in range(40))
    kq2.close()
    c.close()
    kq.close()


def test_an_interrupted_backup_is_never_taken_for_a_complete_one(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    with Log(src / "l", durability="none", segment_bytes=8192) as log:
        log.append_many([b"x" * 100] * 300)
        engine.backup(src, dst)
        log.append_many([b"y" * 100] * 300)

    def boom(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        engine.backup(src, dst, incremental=True, progress=boom)
    assert not os.path.exists(dst / "backup.json")
    with pytest.raises(EngineError, match="interrupted"):
        engine.backup(src, dst, incremental=True)


def test_cut_by_time_reads_a_descriptor_as_the_whole_image(tmp_path):
    """The log's walk for the cut, through pread windows (records crossing
    their edges) and over the same bytes in memory, stops at the same place:
    the timestamp limit, the end of what is written, a torn record."""
    from engine._log import SEGMENT_HEADER_SIZE, cut_by_time

    values = [bytes([65 + i % 26]) * (70_000 + 4099 * i) for i in range(40)]
    with Log(tmp_path / "l", durability="none") as log:
        stamps = []
        for v in values:
            log.append(v)
            stamps.append(time.time_ns())
            time.sleep(0.0005)
    (seg,) = [tmp_path / "l" / n for n in os.listdir(tmp_path / "l") if n.endswith(".seg")]
    image = seg.read_bytes()
    ends = [SEGMENT_HEADER_SIZE]
    for v in values:
        ends.append(ends[-1] + _record_size(len(v)))
    assert ends[-1] > 3 << 20  # several windows

    def both(pos, limit, expect=None):
        fd = os.open(seg, os.O_RDONLY)
        try:
            a = cut_by_time(fd, pos, limit, expect)
        finally:
            os.close(fd)
        b = cut_by_time(image, pos, limit, expect)
        got = (a.end_position, a.records, a.next_offset, a.sealed, a.error)
        assert got == (b.end_position, b.records, b.next_offset, b.sealed, b.error)
        return a

    r = both(SEGMENT_HEADER_SIZE, 2**63 - 1, 0)  # everything: the end of what is written
    assert (r.end_position, r.records, r.next_offset, r.error) == (ends[-1], 40, 40, None)
    r = both(ends[7], stamps[24])  # from a record boundary, its own offset; up to record 24
    assert (r.base_offset, r.end_position, r.records, r.next_offset) == (7, ends[25], 18, 25)
    r = both(ends[7], stamps[24], expect=8)  # the wrong offset there: not a record of this walk
    assert r.records == 0 and r.error == "record offset out of sequence"
    torn = bytearray(image)
    torn[ends[30] + 40] ^= 1  # record 30's body
    seg.write_bytes(bytes(torn))
    image = bytes(torn)
    r = both(SEGMENT_HEADER_SIZE, 2**63 - 1, 0)
    assert (r.end_position, r.records, r.error) == (ends[30], 30, "CRC32C mismatch")
    torn[ends[30]:ends[30] + 4] = (1 << 31).to_bytes(4, "little")  # a length past the file
    seg.write_bytes(bytes(torn))
    image = bytes(torn)
    r = both(ends[29], 2**63 - 1)
    assert (r.end_position, r.records, r.error) == (ends[30], 1, "record length out of bounds")
