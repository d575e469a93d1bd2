"""Key compaction: offsets kept, tombstones after delete_retention, readers,
groups, seeks, verify, backup, the CLI, the background mode, retention."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

import engine
from engine import _log
from engine.compaction import Entry, compact_log, compact_path, plan_removals

SEG = 4096


def _fill(path, n=300, keys=7, **kw):
    """A log of n records, key k<i % keys> (every 10th without a key)."""
    model = []
    log = engine.Log(path, durability="none", segment_bytes=SEG, **kw)
    for i in range(n):
        key = None if i % 10 == 9 else b"k%d" % (i % keys)
        value = b"v%d-" % i * 6
        assert log.append(value, key=key) == i
        model.append((key, value))
    return log, model


def _read(path, **kw):
    with engine.LogReader(path, **kw) as r:
        return list(r)


def _latest(model):
    latest = {}
    for off, (key, _) in enumerate(model):
        if key is not None:
            latest[key] = off
    return latest


def test_keeps_latest_per_key_and_keyless_at_their_offsets(tmp_path):
    log, model = _fill(tmp_path / "l")
    before = _read(tmp_path / "l")
    res = log.compact()
    assert res.segments_rewritten >= 2 and res.records_removed > 0
    assert res.bytes_after < res.bytes_before
    got = _read(tmp_path / "l")
    active = log._compaction_state()[1]
    latest = _latest(model)
    offs = [r.offset for r in got]
    for r in got:
        assert (r.key, r.value) == model[r.offset]
    want = [o for o, (k, _) in enumerate(model) if k is None or latest[k] == o or o >= active]
    assert offs == want
    assert len(got) == len(before) - res.records_removed
    # the log goes on: offsets continue after the compacted ones
    assert log.append(b"more", key=b"k1") == len(model)
    log.close()
    # reopen: recovery accepts the compacted segments and rebuilds their index files
    with engine.Log(tmp_path / "l", durability="none", segment_bytes=SEG) as log2:
        assert log2.next_offset == len(model) + 1
    assert all(os.path.exists(tmp_path / "l" / f"{b:020d}.idx") for b in res.segments)
    assert [r.offset for r in _read(tmp_path / "l")] == want + [len(model)]
    assert all(r.error is None for r in _log.verify(tmp_path / "l"))


def test_a_second_pass_changes_nothing(tmp_path):
    log, _ = _fill(tmp_path / "l")
    log.compact()
    got = _read(tmp_path / "l")
    res = log.compact()
    assert res.segments_rewritten == 0 and res.records_removed == 0
    assert _read(tmp_path / "l") == got
    log.close()


def test_tombstone_stays_until_delete_retention(tmp_path):
    log, model = _fill(tmp_path / "l", delete_retention=3600)
    t = log.delete(b"k3")
    assert log.append(b"x" * 3000) and log.append(b"y" * 3000)  # seal the tombstone's segment
    rec = [r for r in _read(tmp_path / "l") if r.offset == t][0]
    assert rec.tombstone and rec.value == b"" and rec.key == b"k3"
    log.compact()
    k3 = [r for r in _read(tmp_path / "l") if r.key == b"k3"]
    assert [r.offset for r in k3] == [t]  # every older value gone, the marker kept
    res = compact_log(log, now_ns=time.time_ns() + 3601 * 10**9)
    assert res.tombstones_removed == 1
    assert not [r for r in _read(tmp_path / "l") if r.key == b"k3"]
    log.close()


def test_tombstone_in_the_active_segment_is_kept(tmp_path):
    log, _ = _fill(tmp_path / "l", delete_retention=0)
    t = log.delete(b"k2")
    log.compact()
    k2 = [r for r in _read(tmp_path / "l") if r.key == b"k2"]
    assert k2[-1].offset == t and k2[-1].tombstone
    log.close()


def test_bad_arguments(tmp_path):
    with engine.Log(tmp_path / "l") as log:
        with pytest.raises(TypeError):
            log.delete(None)
        with pytest.raises(ValueError):
            engine.Log(tmp_path / "m", cleanup="shrink")
        with pytest.raises(ValueError):
            engine.Log(tmp_path / "m", delete_retention=-1)


def test_open_reader_keeps_its_view_and_groups_resume_at_the_next_record(tmp_path):
    path = tmp_path / "l"
    log, model = _fill(path)
    r = engine.LogReader(path)
    first = [r.read() for _ in range(5)]  # reading segment 0 from its old mapping
    reader = engine.LogReader(path, group="g")
    reader.read()
    reader.read()
    reader.commit()  # offset 2: k2, superseded
    reader.close()
    log.compact()
    rest = list(r)
    seen = first + rest
    offs = [x.offset for x in seen]
    assert offs == sorted(set(offs)) and offs[:5] == [0, 1, 2, 3, 4]
    for x in seen:
        assert (x.key, x.value) == model[x.offset]
    r.close()
    kept = [x.offset for x in _read(path)]
    with engine.LogReader(path, group="g") as g:
        assert g.read().offset == min(o for o in kept if o >= 2)
    log.close()


def test_seek_and_seek_time_across_gaps(tmp_path):
    path = tmp_path / "l"
    log, model = _fill(path)
    stamps = {r.offset: r.timestamp for r in _read(path)}
    log.compact()
    kept = [x.offset for x in _read(path)]
    gone = [o for o in range(len(model)) if o not in kept]
    assert gone
    with engine.LogReader(path) as r:
        for o in gone[:20] + gone[-5:]:
            r.seek(o)
            assert r.read().offset == min(k for k in kept if k > o)
        o = gone[len(gone) // 2]
        at = r.seek_time(stamps[o])
        assert at <= min(k for k in kept if k > o)
        assert r.read().offset == min(k for k in kept if k >= at)
    log.close()


def test_verify_and_backup_after_compaction(tmp_path):
    src = tmp_path / "src"
    log, _ = _fill(src / "l")
    log.compact()
    got = _read(src / "l")
    out = subprocess.run([sys.executable, "-m", "engine", "log", "verify", str(src / "l")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    engine.backup(src, tmp_path / "dst")
    assert _read(tmp_path / "dst" / "l") == got
    log.append(b"after", key=b"k0")
    log.compact()
    engine.backup(src, tmp_path / "dst", incremental=True)
    assert _read(tmp_path / "dst" / "l") == _read(src / "l")
    log.close()


def test_stray_temp_file_is_removed_at_open(tmp_path):
    log, _ = _fill(tmp_path / "l")
    log.close()
    stray = tmp_path / "l" / f".{0:020d}.seg.compact.tmp"
    stray.write_bytes(b"half a copy")
    engine.Log(tmp_path / "l", durability="none", segment_bytes=SEG).close()
    assert not stray.exists()


def test_cli_compact(tmp_path):
    path = tmp_path / "l"
    log, model = _fill(path)
    held = subprocess.run([sys.executable, "-m", "engine", "log", "compact", str(path)],
                          capture_output=True, text=True)
    assert held.returncode == 1 and "writer holds" in held.stderr and "Traceback" not in held.stderr
    log.close()
    out = subprocess.run([sys.executable, "-m", "engine", "log", "compact", str(path), "--json"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["records_removed"] > 0 and res["bytes_after"] < res["bytes_before"]
    text = subprocess.run([sys.executable, "-m", "engine", "log", "compact", str(path)],
                          capture_output=True, text=True)
    assert text.returncode == 0 and "rewrote 0 segment(s)" in text.stdout
    latest = _latest(model)
    for r in _read(path):
        assert r.key is None or latest[r.key] == r.offset or r.offset >= res["segments"][-1]
    # the meta file keeps its segment size
    with engine.Log(path, durability="none", segment_bytes=SEG) as again:
        assert again.stats()["segments"] >= 2


def test_cleanup_compact_runs_after_rolls(tmp_path):
    path = tmp_path / "l"
    log, model = _fill(path, cleanup="compact")
    deadline = time.monotonic() + 30
    while len(_read(path)) == len(model) and time.monotonic() < deadline:
        time.sleep(0.01)  # the pass runs in the background
    log.close()  # waits for a pass in progress
    got = _read(path)
    latest = _latest(model)
    sealed = sorted(int(n[:20]) for n in os.listdir(path) if n.endswith(".seg"))[:-1]
    superseded = [o for o, (k, _) in enumerate(model) if k is not None and latest[k] != o]
    assert len(got) < len(model)
    assert sealed and any(o not in {r.offset for r in got} for o in superseded)


def test_with_retention_the_chain_stays_intact(tmp_path):
    path = tmp_path / "l"
    log, model = _fill(path, n=600, cleanup="compact", retention_bytes=4 * SEG)
    log.apply_retention()
    log.compact()
    got = _read(path)
    for r in got:
        assert (r.key, r.value) == model[r.offset]
    assert all(r.error is None for r in _log.verify(path))
    log.close()


def test_plan_drops_superseded_and_old_latest_tombstones():
    e = [Entry(0, b"a", False, 1), Entry(1, None, False, 1), Entry(2, b"a", True, 5),
         Entry(3, b"b", False, 6), Entry(4, b"b", True, 100), Entry(5, b"c", False, 7)]
    plan = plan_removals(e, [0, 3], 5, tombstone_before_ns=50)
    # a: the tombstone at 2 is old and latest; b's tombstone at 4 is too new
    assert plan.drop == {0: {0, 2}, 3: {3}} and plan.tombstones == {0: 1} and plan.scanned == 6
    plan = plan_removals(e, [0, 3], 5, tombstone_before_ns=0)
    assert plan.drop == {0: {0}, 3: {3}} and plan.tombstones == {}


def test_compact_path_refuses_while_a_writer_runs(tmp_path):
    log, _ = _fill(tmp_path / "l")
    with pytest.raises(engine.LogLocked):
        compact_path(str(tmp_path / "l"))
    log.close()


@pytest.mark.parametrize("durability", ["none", "interval", "always"])
def test_unclean_stop_after_compacting_the_checkpoints_segment(tmp_path, durability):
    # the checkpoint holds a byte position in its segment: compaction never
    # rewrites that segment (it moves the checkpoint past it first)
    path = tmp_path / "l"
    log = engine.Log(path, durability=durability, segment_bytes=SEG)
    log.append(b"a1", key=b"a")
    log.append(b"a2", key=b"a")
    log.append(b"R" * 3000)
    log._simulate_crash()
    log = engine.Log(path, durability=durability, segment_bytes=SEG)  # checkpoint: the end of segment 0
    log.append(b"R" * 3000)  # rolls there: segment 0 is sealed
    assert log.compact().records_removed == 1  # a1: segment 0's end moves back
    log._simulate_crash()
    with engine.Log(path, durability=durability, segment_bytes=SEG) as again:
        assert again.next_offset == 4
    assert [(r.offset, r.value) for r in _read(path)][:2] == [(1, b"a2"), (2, b"R" * 3000)]


def _find_hole(data):
    import struct

    pos = 64
    while pos + 32 <= len(data):
        length, _, _, _, _, flags = struct.unpack_from("<IIQqII", data, pos)
        if flags == 16:
            return pos
        pos += (length + 7) & ~7
    raise AssertionError("no hole")


@pytest.mark.parametrize("flags,span,why", [
    (16 | 2, None, "unknown record flags"),
    (16 | 8, None, "unknown record flags"),
    (16 | 4, None, "unknown record flags"),
    (16, 0, "batch frame span out of bounds"),  # a hole covers at least one offset
    (8, None, "key length out of bounds"),
    (8, 0, "unknown record flags"),  # a tombstone without a key
])
def test_a_malformed_hole_or_tombstone_is_corruption(tmp_path, flags, span, why):
    import struct

    path = tmp_path / "l"
    log, _ = _fill(path)
    log.compact()
    log.close()
    seg = path / f"{0:020d}.seg"
    data = bytearray(seg.read_bytes())
    pos = _find_hole(data)
    struct.pack_into("<I", data, pos + 28, flags)  # CRC made valid: only the frame rules can object
    if span is not None:
        struct.pack_into("<I", data, pos + 24, span)
    crc = _log._crc32c(bytes(data[pos + 8:pos + 32]), crc=_log._crc32c(bytes(data[pos:pos + 4])))
    struct.pack_into("<I", data, pos + 4, crc)
    seg.write_bytes(bytes(data))
    res = _log.verify(path)
    assert res[0].error == why and res[0].error_position == pos
    with pytest.raises(engine.CorruptLog):
        _read(path)


def test_a_failed_copy_changes_nothing(tmp_path, monkeypatch):
    import engine.compaction as comp

    path = tmp_path / "l"
    log, _ = _fill(path)
    before = _read(path)
    real = comp.rewrite_compacted
    calls = []

    def failing(*args):
        calls.append(args[1])
        if len(calls) == 2:
            real(*args)  # the copy is written, then the "disk" fails
            raise OSError(28, "No space left on device")
        return real(*args)

    monkeypatch.setattr(comp, "rewrite_compacted", failing)
    with pytest.raises(OSError):
        log.compact()
    assert not [n for n in os.listdir(path) if n.endswith(".tmp")]
    got = _read(path)
    # the first segment was compacted, the second not: still the same latest values
    assert {r.key: r.value for r in got} == {r.key: r.value for r in before}
    assert [r.offset for r in got if r.offset >= calls[1]] == [r.offset for r in before if r.offset >= calls[1]]
    monkeypatch.setattr(comp, "rewrite_compacted", real)
    assert log.compact().segments_rewritten >= 1
    log.close()


def test_the_evidence_is_durable_before_anything_is_removed(tmp_path, monkeypatch):
    # durability="none": nothing appended is synced until compaction asks;
    # every segment holding a newer value must be on disk before a rename
    # makes the older value's removal durable
    import engine.compaction as comp

    path = tmp_path / "l"
    log, model = _fill(path)
    events = []
    real_sync, real_rename = os.fdatasync, os.rename

    def fdatasync(fd):
        events.append(("sync", os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))))
        return real_sync(fd)

    def rename(a, b):
        events.append(("rename", os.path.basename(b)))
        return real_rename(a, b)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    monkeypatch.setattr(comp.os, "rename", rename)
    _log._set_sync_hook(lambda p, info: events.append(("data", info)))
    try:
        res = log.compact()
    finally:
        _log._set_sync_hook(None)
    assert res.segments_rewritten >= 2
    first = next(i for i, e in enumerate(events) if e[0] == "rename")
    synced = {e[1] for e in events[:first] if e[0] == "sync"}
    segs = sorted(n for n in os.listdir(path) if n.endswith(".seg"))
    assert set(segs[:-1]) <= synced  # every sealed segment
    assert any(e[0] == "data" and e[1]["next_offset"] == len(model) for e in events[:first])  # the active one
    log.close()


def test_background_passes_wait_for_enough_change(tmp_path):
    # a pass after each roll would reread the whole log per segment written
    from engine.compaction import MIN_DIRTY_RATIO

    path = tmp_path / "l"
    log, _ = _fill(path, n=600)
    i = 0

    def roll():
        nonlocal i
        rolls = log.stats()["rolls"]
        while log.stats()["rolls"] == rolls:
            log.append(b"v%d-" % i * 6, key=b"k%d" % (i % 7))
            i += 1

    def sealed_sizes():
        names = sorted(n for n in os.listdir(path) if n.endswith(".seg"))[:-1]
        return [os.path.getsize(path / n) for n in names]

    assert not compact_log(log, force=False).skipped  # no pass yet: runs
    roll()
    assert compact_log(log, force=False).skipped  # one new segment of several: too little
    assert compact_log(log).segments_rewritten >= 1  # an explicit pass always runs
    clean = sealed_sizes()
    for _ in range(100):
        roll()
        new = sum(sealed_sizes()[len(clean):])
        if new >= MIN_DIRTY_RATIO * (new + sum(clean)):
            break
        assert compact_log(log, force=False).skipped
    res = compact_log(log, force=False)
    assert not res.skipped and res.records_removed > 0
    log.close()
