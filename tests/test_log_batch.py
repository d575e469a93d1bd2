"""Batch frames of the segment log (``pyx/log_layout.h``): what
``append_many`` writes, how every reader of records walks them, the older
format still read and appended to, hostile inner records, and a torn batch
dropped whole."""

from __future__ import annotations

import json
import os
import struct
import tarfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import engine
from engine import _log

HDR = struct.Struct("<IIQqII")  # length, crc, offset, timestamp, key_len (span), flags
FLAG_KEY, FLAG_BATCH = 2, 4
FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "log_v1.tar.gz")


def _seg_files(path):
    return sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".seg"))


def _frames(seg_path):
    """(position, length, offset, span_or_key_len, flags) of each frame of a
    segment file, walked by length words (EOS marker included)."""
    with open(seg_path, "rb") as f:
        data = f.read()
    out, pos = [], 64
    while pos + 32 <= len(data):
        length, _crc, off, _ts, kl, flags = HDR.unpack_from(data, pos)
        if length == 0:
            break
        out.append((pos, length, off, kl, flags))
        pos += (length + 7) & ~7
    return out


def _varint(v):
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def _inner(delta, value, key=None, tsd=0, attr=None):
    a = (1 if key is not None else 0) if attr is None else attr
    rest = bytes([a]) + _varint(delta) + _varint(tsd)
    if key is not None:
        rest += _varint(len(key)) + key
    rest += value
    return _varint(len(rest)) + rest


def _frame(offset, ts, span, body, flags=FLAG_BATCH):
    """A batch frame with a correct CRC around `body` (whatever it holds)."""
    length = 32 + len(body)
    padded = (length + 7) & ~7
    raw = bytearray(HDR.pack(length, 0, offset, ts, span, flags) + body + bytes(padded - length))
    crc = _log._crc32c(bytes(raw[8:]), crc=_log._crc32c(struct.pack("<I", length)))
    struct.pack_into("<I", raw, 4, crc)
    return bytes(raw)


# ---------------------------------------------------------------- bytes per record


@pytest.mark.parametrize("durability", ["none", "always"])
def test_append_many_takes_at_most_72_bytes_per_64_byte_record(tmp_path, durability):
    """Measured from the segment file: the bytes up to the last non-zero one,
    less the segment header, over the records (a plain frame takes 96)."""
    path = str(tmp_path / "log")
    n = 5000
    with engine.Log(path, durability=durability, segment_bytes=1 << 20) as log:
        for i in range(0, n, 1000):
            log.append_many([b"%064d" % j for j in range(i, i + 1000)])
    (seg,) = _seg_files(path)
    with open(seg, "rb") as f:
        data = f.read()
    used = len(data.rstrip(b"\0")) - 64
    assert used / n <= 72, used / n
    assert used / n < 68.5, used / n  # 68 bytes each + a 32-byte header per 128
    assert [rec.value for rec in engine.LogReader(path)] == [b"%064d" % j for j in range(n)]
    assert all(fl == FLAG_BATCH for _p, _l, _o, _s, fl in _frames(seg))
    res = _log.verify(path)
    assert [(r.records, r.next_offset, r.error) for r in res] == [(n, n, None)]


def test_one_record_and_huge_records_stay_plain_frames(tmp_path):
    """A frame that would hold one record is a plain one (smaller); a record
    too big to share a 64 KiB frame gets its own plain frame, between batches."""
    path = str(tmp_path / "log")
    big = b"B" * (100 << 10)
    with engine.Log(path, durability="none", segment_bytes=1 << 20) as log:
        log.append_many([b"only"], [b"k"])
        log.append_many([b"a", b"b", big, b"c", b"d"], [None, b"kb", b"kbig", None, None])
    frames = _frames(_seg_files(path)[0])
    assert [(off, span if fl == FLAG_BATCH else 1, fl) for _p, _l, off, span, fl in frames] == [
        (0, 1, FLAG_KEY), (1, 2, FLAG_BATCH), (3, 1, FLAG_KEY), (4, 2, FLAG_BATCH)]
    recs = list(engine.LogReader(path))
    assert [(r.offset, r.key, r.value) for r in recs] == [
        (0, b"k", b"only"), (1, None, b"a"), (2, b"kb", b"b"), (3, b"kbig", big), (4, None, b"c"), (5, None, b"d")]


def test_batch_frames_split_at_128_records_64k_and_at_rolls(tmp_path):
    """A batch frame holds at most 128 records (every offset delta one
    byte) and 64 KiB, and never crosses a segment end."""
    path = str(tmp_path / "log")
    vals = [b"v%05d" % i + b"." * (i % 50 if i < 3000 else 900) for i in range(6000)]
    keys = [b"k%d" % i if i % 4 == 0 else None for i in range(6000)]
    with engine.Log(path, durability="always", segment_bytes=1 << 18) as log:
        assert list(log.append_many(vals, keys)) == list(range(6000))
        assert log.stats()["rolls"] >= 2
    spans = []
    for seg in _seg_files(path):
        for _p, length, _o, span, fl in _frames(seg):
            assert length <= 64 << 10
            if fl == FLAG_BATCH:
                spans.append(span)
    assert max(spans) == 128 and 128 > min(spans) > 1
    assert spans.count(128) >= 3000 // 128 - 2  # the small records fill frames by count
    assert any(72 > s > 1 for s in spans)  # the 900-byte ones by size
    recs = list(engine.LogReader(path, copy=False))
    assert [bytes(r.value) for r in recs] == vals
    assert [None if r.key is None else bytes(r.key) for r in recs] == keys
    res = _log.verify(path)
    assert all(r.error is None for r in res)
    assert sum(r.records for r in res) == 6000 and res[-1].next_offset == 6000


# ---------------------------------------------------------------- reading inside batches


def _mixed_log(path, segment_bytes=8192):
    """Plain and batch frames, keys and none, over a few segments; returns
    the records as (key, value)."""
    want = []
    with engine.Log(path, durability="none", segment_bytes=segment_bytes) as log:
        for j in range(12):
            vals = [b"%d:%d" % (j, i) * (1 + i % 3) for i in range(150 + j)]
            keys = [b"k%d" % i if i % 3 else None for i in range(len(vals))]
            log.append_many(vals, keys)
            want += list(zip(keys, vals))
            log.append(b"single %d" % j)
            want.append((None, b"single %d" % j))
    return want


@pytest.mark.parametrize("copy", [True, False])
def test_seek_to_every_offset_inside_batches(tmp_path, copy):
    path = str(tmp_path / "log")
    want = _mixed_log(path)
    assert len(_seg_files(path)) >= 3
    r = engine.LogReader(path, copy=copy)
    for off in list(range(0, len(want), 7)) + [len(want) - 1]:
        r.seek(off)
        assert r.position == off
        got = r.read_many(3)
        assert [g.offset for g in got] == list(range(off, min(off + 3, len(want))))
        assert [(None if g.key is None else bytes(g.key), bytes(g.value)) for g in got] == want[off:off + 3]
    r.seek(len(want))
    assert r.read() is None
    with pytest.raises(ValueError):
        r.seek(len(want) + 1)
    # a fresh reader started inside a batch
    assert engine.LogReader(path, start=1000, copy=copy).read().offset == 1000


def test_seek_time_lands_inside_a_batch_frame(tmp_path):
    """Records of one append_many share a timestamp; seek_time lands on the
    first record of the first batch stamped at or after the time, even when
    the offset the time index names is inside a batch."""
    path = str(tmp_path / "log")
    _mixed_log(path)
    recs = list(engine.LogReader(path))
    r = engine.LogReader(path)
    for i in range(0, len(recs), 97):
        ts = recs[i].timestamp
        first = next(x.offset for x in recs if x.timestamp >= ts)
        assert r.seek_time(ts) == first
        assert r.read().offset == first
        # one ns later: the next timestamp's first record
        nxt = next((x.offset for x in recs if x.timestamp >= ts + 1), len(recs))
        assert r.seek_time(ts + 1) == nxt
    # a reader that is inside a batch seeks back
    r.seek(recs[-1].offset)
    assert r.seek_time(0) == 0


def test_group_commit_inside_a_batch_resumes_there(tmp_path):
    path = str(tmp_path / "log")
    want = _mixed_log(path)
    r = engine.LogReader(path, group="g")
    got = r.read_many(333)
    assert got[-1].offset == 332
    r.commit()
    r.close()
    r = engine.LogReader(path, group="g")
    assert r.position == 333
    assert [x.value for x in r.read_many(10)] == [v for _k, v in want[333:343]]
    r.close()


def test_tailing_reader_sees_whole_batches(tmp_path):
    """A reader polling while batches arrive sees every record once, in
    order, and never half a batch (a frame is published whole)."""
    path = str(tmp_path / "log")
    with engine.Log(path, durability="none", segment_bytes=1 << 15) as log:
        r = engine.LogReader(path, start=0)
        seen = []
        for j in range(40):
            log.append_many([b"%d-%d" % (j, i) for i in range(50)])
            while True:
                rec = r.poll(timeout=0)
                if rec is None:
                    break
                seen.append(rec.offset)
            assert len(seen) == 50 * (j + 1)
        assert seen == list(range(2000))
        assert r.end_offset == 2000


def test_cut_by_time_takes_a_batch_frame_whole(tmp_path):
    """The backup's cut: a batch frame is taken when its last record is
    stamped at or before the limit, else the cut is before it."""
    path = str(tmp_path / "log")
    with engine.Log(path, durability="none") as log:
        log.append_many([b"a%d" % i for i in range(100)])
        log.append_many([b"b%d" % i for i in range(100)])
    recs = list(engine.LogReader(path))
    (seg,) = _seg_files(path)
    with open(seg, "rb") as f:
        img = f.read()
    frames = _frames(seg)
    t1, t2 = recs[0].timestamp, recs[100].timestamp
    assert t1 < t2
    res = _log.cut_by_time(img, 64, t1, 0)
    assert (res.records, res.next_offset, res.end_position) == (100, 100, frames[1][0])
    res = _log.cut_by_time(img, 64, t2 - 1, None)
    assert (res.records, res.next_offset, res.end_position) == (100, 100, frames[1][0])
    res = _log.cut_by_time(img, 64, t2, None)
    assert (res.records, res.next_offset, res.error) == (200, 200, None)
    fd = os.open(seg, os.O_RDONLY)
    try:
        assert _log.cut_by_time(fd, frames[1][0], t2, 100).records == 100
    finally:
        os.close(fd)


# ---------------------------------------------------------------- the older format


def _unpack_fixture(tmp_path):
    with tarfile.open(FIXTURE) as t:
        for m in t.getmembers():  # a committed fixture, but no member may leave tmp_path
            assert m.name.startswith("log_v1/") and ".." not in m.name and (m.isfile() or m.isdir())
        t.extractall(tmp_path)
    return str(tmp_path / "log_v1")


def _fixture_values():
    vals = [(b"k%d" % i if i % 3 == 0 else None, b"v%03d" % i + b"x" * (i % 13)) for i in range(100)]
    vals += [(None if i % 2 else b"bk%d" % i, b"batch%03d" % i) for i in range(30)]
    return vals


def _seg_version(seg_path):
    with open(seg_path, "rb") as f:
        return struct.unpack_from("<I", f.read(12), 8)[0]


def test_a_log_of_the_older_format_reads_verifies_and_appends(tmp_path):
    """The committed fixture was written by the format-1 code (two 4 KiB
    segments, plain frames only, a group at 25): it reads, verifies, seeks,
    then a writer of this format appends to it (plain frames while the
    format-1 segment is active, batch frames in the format-2 segments it
    rolls to) and everything reads and verifies again."""
    path = _unpack_fixture(tmp_path)
    want = _fixture_values()
    with open(os.path.join(path, "meta")) as f:
        assert json.load(f)["format"] == 1
    assert [_seg_version(s) for s in _seg_files(path)] == [1, 1]
    got = [(r.key, r.value) for r in engine.LogReader(path)]
    assert got == want
    res = _log.verify(path)
    assert [r.error for r in res] == [None, None] and res[-1].next_offset == 130
    r = engine.LogReader(path, group="g1")
    assert r.position == 25 and r.read().value == want[25][1]
    r.close()
    assert engine.LogReader(path).seek_time(0) == 0

    old_active = _seg_files(path)[-1]
    n_old_frames = len(_frames(old_active))
    more = [b"new%04d" % i + b"." * (i % 40) for i in range(400)]
    with engine.Log(path, durability="always", segment_bytes=4096) as log:
        assert log.next_offset == 130
        assert log.append(b"plain") == 130
        assert list(log.append_many(more)) == list(range(131, 531))
    with open(os.path.join(path, "meta")) as f:
        assert json.load(f)["format"] == _log.FORMAT_VERSION == 2
    segs = _seg_files(path)
    assert [_seg_version(s) for s in segs[:2]] == [1, 1]
    assert len(segs) > 3 and all(_seg_version(s) == 2 for s in segs[2:])
    # the format-1 segment got plain frames only; the new ones hold batches
    assert all(fl in (0, FLAG_KEY, 1) for _p, _l, _o, _s, fl in _frames(old_active)[n_old_frames:])
    assert any(fl == FLAG_BATCH for s in segs[2:] for _p, _l, _o, _s, fl in _frames(s))
    got = [(r.key, r.value) for r in engine.LogReader(path)]
    assert got == want + [(None, b"plain")] + [(None, v) for v in more]
    res = _log.verify(path)
    assert all(r.error is None for r in res) and res[-1].next_offset == 531
    assert sum(r.records for r in res) == 531


def test_a_segment_of_an_unknown_version_is_refused(tmp_path):
    path = str(tmp_path / "log")
    with engine.Log(path, durability="none") as log:
        log.append_many([b"a", b"b"])
    (seg,) = _seg_files(path)
    with open(seg, "rb") as f:
        img = bytearray(f.read())
    struct.pack_into("<I", img, 8, 3)
    struct.pack_into("<I", img, 60, _log._crc32c(bytes(img[:60])))
    res = _log.scan_segment(bytes(img))
    assert res.error == "unsupported segment format 3"


# ---------------------------------------------------------------- hostile inner records

_INNER_RULES_BROKEN = "malformed records inside a batch frame"


def _seg_image(tmp_path):
    """A real segment header (4 KiB segment), zeros after it."""
    path = str(tmp_path / "hdr")
    if not os.path.exists(path):
        with engine.Log(path, durability="none", segment_bytes=4096):
            pass
    with open(_seg_files(path)[0], "rb") as f:
        return f.read()[:64] + bytes(4096 - 64)


def _reference_batch(body, span, ts):
    """The inner-record rules of log_layout.h, in plain Python: the record
    count, or None when the body breaks one."""
    def varint(at, end):
        v, shift = 0, 0
        while at < end:
            b = body[at]
            at += 1
            if shift == 63 and b > 1:
                return None
            v |= (b & 0x7F) << shift
            if b < 0x80:
                return v, at
            shift += 7
            if shift > 63:
                return None
        return None

    at, n, prev_d, prev_t = 0, 0, None, 0
    while at < len(body):
        got = varint(at, len(body))
        if got is None or got[0] == 0 or got[0] > len(body) - got[1]:
            return None
        blen, at = got
        bend = at + blen
        attr = body[at]
        at += 1
        if attr & ~3:
            return None
        got = varint(at, bend)
        if got is None:
            return None
        d, at = got
        got = varint(at, bend)
        if got is None:
            return None
        t, at = got
        if attr & 1:
            got = varint(at, bend)
            if got is None or got[0] > bend - got[1]:
                return None
            at = got[1] + got[0]
        elif attr & 2:
            return None
        if attr & 2 and at != bend:
            return None
        if d >= span or (prev_d is not None and d <= prev_d) or t < prev_t or ts + t > (1 << 63) - 1:
            return None
        prev_d, prev_t, n, at = d, t, n + 1, bend
    return n or None


_inner_st = st.builds(
    _inner,
    delta=st.integers(0, 300),
    value=st.binary(max_size=40),
    key=st.none() | st.binary(max_size=10),
    tsd=st.sampled_from([0, 0, 1, 5, 1 << 40, (1 << 64) - 1]),
    attr=st.none() | st.integers(0, 7),
)


def _install_image(d, img):
    """A log at ``d`` (made once, with no writer left: length words rule)
    whose first segment holds ``img``'s records under its own header."""
    if not d.exists():
        with engine.Log(str(d), durability="none", segment_bytes=4096):
            pass
        os.unlink(d / "notify")
    with open(_seg_files(str(d))[0], "r+b") as f:
        hdr = f.read(64)
        f.seek(0)
        f.write(hdr + bytes(img[64:]))
    return str(d)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    parts=st.lists(_inner_st, max_size=6),
    flips=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=3),
    cut=st.integers(0, 8),
    span=st.integers(0, 400),
)
def test_hostile_inner_records_are_corruption_never_a_crash(tmp_path, parts, flips, cut, span):
    """CRC-valid batch frames with any inner bytes (well-formed records,
    mutated ones, cut ones): the scan accepts exactly those that keep the
    rules (a Python reference decides) and calls the rest corruption; a
    reader of such a log reads the same records or raises CorruptLog, and
    nothing reads outside the frame."""
    body = bytearray(b"".join(parts))
    for at, byte in flips:
        if body:
            body[at % len(body)] = byte
    body = bytes(body[: max(0, len(body) - cut)])
    ts = 1_700_000_000_000_000_000
    img = bytearray(_seg_image(tmp_path))
    frame = _frame(0, ts, span, body)
    if 64 + len(frame) + 32 > len(img):
        return
    img[64 : 64 + len(frame)] = frame
    res = _log.scan_segment(bytes(img), 0)
    want = _reference_batch(body, span, ts) if span and len(body) >= 4 else None
    if want is None:
        assert res.error in (_INNER_RULES_BROKEN, "batch frame span out of bounds"), res
        assert res.error_position == 64 and res.records == 0
    else:
        assert res.error is None, res
        assert (res.records, res.next_offset, res.end_position) == (want, span, 64 + len(frame))
    # the same bytes through a reader (no writer ever ran: length words rule)
    r = engine.LogReader(_install_image(tmp_path / "rd", img))
    if want is None:
        with pytest.raises(engine.CorruptLog):
            list(r)
    else:
        recs = list(r)
        assert len(recs) == want and r.position == span
        assert all(0 <= x.offset < span and x.timestamp >= ts for x in recs)


def test_hand_made_batch_with_gaps_reads_and_seeks(tmp_path):
    """Offset deltas may leave gaps (room for key compaction): readers return
    the records there, the next frame follows the span, and a seek into a gap
    lands on the next record."""
    img = bytearray(_seg_image(tmp_path))
    ts = 1_700_000_000_000_000_000
    body = _inner(0, b"zero") + _inner(3, b"three", key=b"k3", tsd=1) + _inner(4, b"four", tsd=2)
    f1 = _frame(0, ts, 7, body)
    # the next frame: a plain one at offset 7
    plain_len = 32 + 5
    raw = bytearray(HDR.pack(plain_len, 0, 7, ts + 5, 0, 0) + b"seven" + bytes(3))
    struct.pack_into("<I", raw, 4, _log._crc32c(bytes(raw[8:]), crc=_log._crc32c(struct.pack("<I", plain_len))))
    f2 = bytes(raw)
    img[64 : 64 + len(f1) + len(f2)] = f1 + f2
    res = _log.scan_segment(bytes(img), 0)
    assert (res.error, res.records, res.next_offset) == (None, 4, 8)
    r = engine.LogReader(_install_image(tmp_path / "gaps", img))
    assert [(x.offset, x.key, x.value, x.timestamp - ts) for x in r] == [
        (0, None, b"zero", 0), (3, b"k3", b"three", 1), (4, None, b"four", 2), (7, None, b"seven", 5)]
    assert r.position == 8
    r.seek(1)
    assert r.read().offset == 3
    r.seek(5)
    assert r.read().offset == 7
    assert r.seek_time(ts + 2) == 4


# ---------------------------------------------------------------- torn batch frames


@pytest.mark.parametrize("durability", ["none", "always"])
def test_a_torn_batch_frame_is_dropped_whole(tmp_path, durability, caplog):
    """A crash that tore the last batch frame (its last page never reached
    the file) loses that frame whole, atomically: every earlier frame
    survives, no record of the torn one is read, the log verifies and
    appends go on from its first offset."""
    path = str(tmp_path / "log")
    log = engine.Log(path, durability=durability, segment_bytes=1 << 20)
    log.append_many([b"a%05d" % i + b"." * 50 for i in range(100)])
    log.append_many([b"b%05d" % i + b"." * 50 for i in range(100)])
    log._simulate_crash()
    (seg,) = _seg_files(path)
    frames = _frames(seg)
    pos, length, off, span, flags = frames[-1]
    assert flags == FLAG_BATCH and (off, span) == (100, 100)
    with open(seg, "r+b") as f:
        f.seek(pos + length - 100)
        f.write(bytes(100))  # the frame's tail never written
    # a durable log's checkpoint may name the torn frame's end: make the
    # crash one before any checkpoint covered it (the recovery-rule tests
    # cover damage before a checkpoint)
    if durability == "always":
        os.unlink(os.path.join(path, "checkpoint"))
    with engine.Log(path, durability=durability, segment_bytes=1 << 20) as log:
        assert log.next_offset == 100
        assert log.stats()["recovered_bytes"] > 0
        assert log.append_many([b"c1", b"c2"]) == range(100, 102)
    recs = list(engine.LogReader(path))
    assert [r.offset for r in recs] == list(range(102))
    assert [r.value[:1] for r in recs] == [b"a"] * 100 + [b"c", b"c"]
    assert all(r.error is None for r in _log.verify(path))
    assert any("torn tail" in m for m in caplog.messages)


def test_a_damaged_batch_before_the_checkpoint_is_corruption(tmp_path):
    """Damage inside a batch frame the checkpoint covers is CorruptLog at
    open (never a silent truncation of acknowledged records), and repair
    cuts the log at that frame's first offset."""
    path = str(tmp_path / "log")
    with engine.Log(path, durability="always", segment_bytes=1 << 20) as log:
        log.append_many([b"a%d" % i for i in range(200)])
        log.append_many([b"b%d" % i for i in range(200)])
    (seg,) = _seg_files(path)
    (pos, length, off, span, _fl), = [f for f in _frames(seg) if f[2] == 200]
    with open(seg, "r+b") as f:
        f.seek(pos + 200)
        b = f.read(1)
        f.seek(pos + 200)
        f.write(bytes([b[0] ^ 0x10]))
    with pytest.raises(engine.CorruptLog):
        engine.Log(path, durability="always", segment_bytes=1 << 20)
    r = engine.LogReader(path)
    with pytest.raises(engine.CorruptLog):
        list(r)
    bad = _log.repair_truncate(path)
    assert bad is not None and bad.next_offset == 200 and bad.records == 200
    assert [x.offset for x in engine.LogReader(path)] == list(range(200))


def test_damage_followed_by_a_valid_batch_frame_is_corruption_not_a_torn_tail(tmp_path):
    """Past the checkpoint, a damaged frame with a valid batch frame after it
    is damage (CorruptLog at open), never a torn tail to cut: the batch
    frame's offset is checked against how many records the bytes between
    could hold, and its inner records against the rules."""
    path = str(tmp_path / "log")
    log = engine.Log(path, durability="none", segment_bytes=1 << 20)
    for j in range(3):
        log.append_many([b"%d-%d" % (j, i) for i in range(100)])
    log._simulate_crash()
    (seg,) = _seg_files(path)
    pos = _frames(seg)[0][0]
    with open(seg, "r+b") as f:
        f.seek(pos + 40)
        f.write(b"\xff\xff")  # the first frame's CRC fails; two valid frames follow
    with pytest.raises(engine.CorruptLog, match="followed by a valid record"):
        engine.Log(path, durability="none", segment_bytes=1 << 20)
