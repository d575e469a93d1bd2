"""What recovery may call a torn tail, what it must sync, and the smaller
recovery cases: damage followed by valid data is CorruptLog (only `repair`
cuts it); recovery makes what it accepts durable before it publishes or
checkpoints it; the last timestamp comes from the last record; a forked
child's writer is inert."""

from __future__ import annotations

import os
import struct
import sys
import time

import faultkit
import pytest

import engine
from engine import _log

needs_shim = pytest.mark.skipif(not faultkit.available(), reason="needs Linux and a C compiler")


def _val(i: int) -> bytes:
    return b"r%d-" % i + bytes([i % 251]) * (i % 50)


def _seg_path(d, base=0):
    return os.path.join(d, f"{base:020d}.seg")


def _record_positions(d, base=0):
    """[(position, length)] of the records of segment `base`."""
    with open(_seg_path(d, base), "rb") as f:
        data = f.read()
    out, pos = [], 64
    while pos + 32 <= len(data):
        length = struct.unpack_from("<I", data, pos)[0]
        if length == 0:
            break
        out.append((pos, length))
        pos += (length + 7) & ~7
    return out


def _flip(path, at):
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x10]))


@pytest.mark.parametrize("mode", ["always", "interval"])
def test_a_flipped_bit_before_valid_records_is_corruption(tmp_path, mode):
    d = str(tmp_path / "log")
    log = engine.Log(d, durability=mode, segment_bytes=1 << 20)
    for i in range(300):
        log.append(_val(i))
    log.flush()
    log._simulate_crash()          # a SIGKILL: the page cache keeps everything
    pos, length = _record_positions(d)[20]
    _flip(_seg_path(d), pos + 32 + 1)  # a value byte of offset 20
    with pytest.raises(engine.CorruptLog) as ei:
        engine.Log(d, durability=mode, segment_bytes=1 << 20)
    # (a checkpoint moved past it by then says so too: either way, damage)
    assert ei.value.position == pos
    # repair cuts it; the records before the damage stay
    _log.repair_truncate(d)
    with engine.Log(d, durability=mode, segment_bytes=1 << 20) as log:
        assert log.next_offset == 20
    assert [r.value for r in engine.LogReader(d)] == [_val(i) for i in range(20)]


def test_a_lost_end_marker_before_later_segments_is_corruption(tmp_path):
    d = str(tmp_path / "log")
    log = engine.Log(d, durability="none", segment_bytes=4096)
    for i in range(200):
        log.append(_val(i))
    log._simulate_crash()
    segs = sorted(n for n in os.listdir(d) if n.endswith(".seg"))
    assert len(segs) >= 3
    eos, length = _record_positions(d)[-1]   # the last "record" is the end marker
    assert length == 32
    with open(_seg_path(d), "r+b") as f:   # the end marker of the first segment reads as zeros
        f.seek(eos)
        f.write(bytes(32))
    with pytest.raises(engine.CorruptLog) as ei:
        engine.Log(d, durability="none", segment_bytes=4096)
    assert "holds records" in ei.value.reason
    assert sorted(n for n in os.listdir(d) if n.endswith(".seg")) == segs  # nothing dropped


def test_a_torn_tail_with_nothing_valid_after_it_is_still_cut(tmp_path):
    d = str(tmp_path / "log")
    log = engine.Log(d, durability="none", segment_bytes=1 << 20)
    for i in range(50):
        log.append(_val(i))
    log._simulate_crash()
    pos, length = _record_positions(d)[-1]
    _flip(_seg_path(d), pos + 40)  # the last record: a torn write looks like this
    with engine.Log(d, durability="none", segment_bytes=1 << 20) as log:
        assert log.next_offset == 49


RECOVER_SYNC = """
import engine
d = {d!r}
arm()
try:
    engine.Log(d, durability="none", segment_bytes=4096).close()
    out = "opened"
except engine.LogBroken as exc:
    out = "LogBroken %d" % exc.errno
disarm()
report(out)
"""


@needs_shim
def test_recovery_syncs_what_it_accepts_before_the_checkpoint(tmp_path):
    d = str(tmp_path / "log")
    log = engine.Log(d, durability="none", segment_bytes=4096)
    for i in range(120):          # several segments, none of them synced
        log.append(_val(i))
    log._simulate_crash()
    with open(os.path.join(d, "checkpoint"), "rb") as f:
        ck = f.read()
    counted = faultkit.run(RECOVER_SYNC.format(d=d), prefix=str(tmp_path))
    assert counted.report == "opened"
    nsegs = len([n for n in os.listdir(d) if n.endswith(".seg")])
    assert counted.counts["fdatasync"] >= nsegs - 1   # every segment it walked
    # again from the crashed state, with recovery's first data sync failing:
    # the open fails and the checkpoint has not moved past unsynced records
    d2 = str(tmp_path / "log2")
    log = engine.Log(d2, durability="none", segment_bytes=4096)
    for i in range(120):
        log.append(_val(i))
    log._simulate_crash()
    with open(os.path.join(d2, "checkpoint"), "rb") as f:
        ck = f.read()
    res = faultkit.run(RECOVER_SYNC.format(d=d2), prefix=str(tmp_path), func="fdatasync", nth=1)
    assert res.report == "LogBroken 5", res.stderr[-2000:]
    with open(os.path.join(d2, "checkpoint"), "rb") as f:
        assert f.read() == ck
    with engine.Log(d2, durability="none", segment_bytes=4096) as log:  # a retry recovers
        assert log.next_offset == 120


def test_the_last_timestamp_comes_from_the_last_record(tmp_path):
    d = str(tmp_path / "log")
    with engine.Log(d, durability="none", segment_bytes=1 << 20) as log:
        for i in range(40):
            log.append(_val(i))
    pos, length = _record_positions(d)[-1]
    future = time.time_ns() + 10**12   # the clock stepped back since this record
    with open(_seg_path(d), "r+b") as f:
        f.seek(pos)
        rec = bytearray(f.read((length + 7) & ~7))
        struct.pack_into("<q", rec, 16, future)
        crc = _log._crc32c(bytes(rec[8:]), crc=_log._crc32c(bytes(rec[0:4])))
        struct.pack_into("<I", rec, 4, crc)
        f.seek(pos)
        f.write(rec)
    with engine.Log(d, durability="none", segment_bytes=1 << 20) as log:
        off = log.append(b"next")
    recs = list(engine.LogReader(d, start=off - 1))
    assert recs[0].timestamp == future
    assert recs[1].timestamp >= future   # timestamps never go back


ORPHAN = """
import os, engine
d = {d!r}
log = engine.Log(d, durability="always", segment_bytes=4096)
arm()
out = {{}}
try:
    for i in range(100):
        log.append(b"x" * 100)
    out["append"] = "ok"
except OSError as exc:
    out["append"] = type(exc).__name__
out["segs"] = sorted(n for n in os.listdir(d) if n.endswith(".seg"))
disarm()
for i in range(60):
    log.append(b"y" * 100)   # the same writer goes on: the roll succeeds now
log.close()
out["n"] = sum(1 for _ in engine.LogReader(d))
report(out)
"""


@needs_shim
def test_no_orphan_segment_when_mapping_a_new_one_fails(tmp_path):
    d = str(tmp_path / "log")
    res = faultkit.run(ORPHAN.format(d=d), prefix=str(tmp_path), func="mmap", nth=1, err="ENOSPC")
    assert res.rc == 0, res.stderr[-2000:]
    assert res.faults == [("mmap", 1, "ENOSPC")]
    assert res.report["append"] == "OSError"
    assert res.report["segs"] == [f"{0:020d}.seg"]
    appended_before = res.report["n"] - 60
    assert appended_before > 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_childs_writer_is_inert(tmp_path):
    d = str(tmp_path / "log")
    log = engine.Log(d, durability="always", segment_bytes=1 << 16)
    log.append(b"parent-0")
    with open(os.path.join(d, "checkpoint"), "rb") as f:
        ck = f.read()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: using the log raises; closing and exiting touch nothing
        code = 1
        try:
            try:
                log.append(b"child")
            except engine.Closed as exc:
                if "fork" in str(exc):
                    code = 0
            log.close()
            del log
            os.write(w, b"x")
            time.sleep(1.0)   # alive while the parent closes and reopens
        finally:
            sys.stdout.flush()
            os._exit(code)
    os.read(r, 1)
    with open(os.path.join(d, "checkpoint"), "rb") as f:
        assert f.read() == ck          # the child wrote no clean checkpoint
    log.append(b"parent-1")
    log.close()
    # the child's copy of the lock fd does not keep the lock from the parent
    with engine.Log(d, durability="always", segment_bytes=1 << 16) as log2:
        log2.append(b"parent-2")
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert [r.value for r in engine.LogReader(d)] == [b"parent-0", b"parent-1", b"parent-2"]
