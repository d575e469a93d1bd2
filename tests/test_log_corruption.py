"""Corruption of closed segments: >= 10,000 random bit flips and truncations.

Every single-bit flip anywhere in a closed segment file must be detected:
the CRC covers every record byte (length word and padding included), the
header has its own CRC, and every byte after the last record / end marker
must be zero.  Damage is reported at or before the flipped byte, never past
it, and nothing crashes.  Most flips run in-process on a bytearray copy
(flip, scan, flip back); a few hundred go through real files and the public
paths (LogReader, verify, the writer's recovery).
"""

from __future__ import annotations

import os
import random
import shutil

import pytest

import engine
from engine import _log

SEG = 4096
N_FLIPS_PER_SEGMENT = 1100   # x >= 9 segments -> > 10,000 flips
N_TRUNC_PER_SEGMENT = 60


def _make_log(path, n=200, seed=7):
    rng = random.Random(seed)
    vals, keys = [], []
    with engine.Log(path, durability="none", segment_bytes=SEG) as log:
        for _i in range(n):
            v = rng.randbytes(rng.randrange(0, 300))
            k = rng.choice([None, b"", rng.randbytes(rng.randrange(1, 20))])
            log.append(v, key=k)
            vals.append(v)
            keys.append(k)
    return vals, keys


def _segments(path):
    return sorted(p for p in os.listdir(path) if p.endswith(".seg"))


def test_every_bit_flip_and_truncation_is_detected(tmp_path):
    d = tmp_path / "log"
    _make_log(d)
    segs = _segments(d)
    assert len(segs) >= 9
    rng = random.Random(11)
    flips = truncs = 0
    for name in segs:
        base = int(name[:20])
        img = bytearray((d / name).read_bytes())
        clean = _log.scan_segment(img, base)
        assert clean.error is None, clean
        for _ in range(N_FLIPS_PER_SEGMENT):
            # bias half the flips to the used part, where records are
            hi = len(img) if rng.random() < 0.5 else max(clean.end_position + 40, 64)
            byte = rng.randrange(0, min(hi, len(img)))
            bit = 1 << rng.randrange(8)
            img[byte] ^= bit
            res = _log.scan_segment(img, base)
            img[byte] ^= bit
            assert res.error is not None, (name, byte, bit)
            assert res.error_position <= byte, (name, byte, res)
            flips += 1
        for _ in range(N_TRUNC_PER_SEGMENT):
            cut = rng.randrange(0, len(img))
            res = _log.scan_segment(memoryview(img)[:cut], base)
            assert res.error is not None and res.error_position <= cut
            truncs += 1
        assert _log.scan_segment(img, base).error is None  # every flip was undone
    assert flips + truncs >= 10_000


def test_damaged_files_through_the_public_paths(tmp_path):
    d = tmp_path / "log"
    vals, keys = _make_log(d)
    segs = _segments(d)
    pristine = {n: (d / n).read_bytes() for n in segs}
    rng = random.Random(5)
    outcomes = {"reader-raised": 0, "reader-clean": 0, "writer-raised": 0, "writer-truncated": 0}
    for it in range(240):
        name = rng.choice(segs)
        img = bytearray(pristine[name])
        res0 = _log.scan_segment(img, int(name[:20]))
        if it % 4 == 3:
            cut = rng.randrange(0, len(img))
            img = img[:cut]
            byte = cut
        else:
            byte = rng.randrange(0, max(res0.end_position + 40, 64))
            img[byte] ^= 1 << rng.randrange(8)
        (d / name).write_bytes(bytes(img))
        try:
            # verify names the damaged file, at or before the damage
            bad = [r for r in _log.verify(d) if r.error]
            assert len(bad) == 1 and bad[0].segment.endswith(name) and bad[0].error_position <= byte
            # a reader returns only intact records, in order, then raises
            got = []
            try:
                r = engine.LogReader(d)
                for rec in r:
                    got.append(rec)
                outcomes["reader-clean"] += 1
            except engine.CorruptLog as exc:
                assert exc.segment.endswith(name) or "seg" in exc.segment
                outcomes["reader-raised"] += 1
            assert [x.offset for x in got] == list(range(len(got)))
            assert [x.value for x in got] == vals[: len(got)]
            assert [x.key for x in got] == keys[: len(got)]
            if len(got) == len(vals):
                # only bytes no reader looks at were hit (after the end): verify saw it
                assert bad[0].error.startswith("non-zero bytes after") or "truncated" in bad[0].error \
                    or "end-of-segment" in bad[0].error
            # the writer refuses damage before its checkpoint and cuts a torn tail after it
            if name == segs[-1]:
                try:
                    with engine.Log(d, durability="none", segment_bytes=SEG) as log:
                        n = log.next_offset
                    outcomes["writer-truncated"] += 1
                    after = list(engine.LogReader(d))
                    assert [x.value for x in after] == vals[:n]
                    assert all(r.error is None for r in _log.verify(d))
                except engine.CorruptLog:
                    outcomes["writer-raised"] += 1
        finally:
            for n in segs:
                (d / n).write_bytes(pristine[n])
            shutil.rmtree(d / "groups", ignore_errors=True)
            # the writer may have rewritten checkpoint/index: rebuild a clean log image
            if not all(r.error is None for r in _log.verify(d)) or len(list(engine.LogReader(d))) != len(vals):
                shutil.rmtree(d)
                _make_log(d)
                segs = _segments(d)
                pristine = {n: (d / n).read_bytes() for n in segs}
    assert outcomes["reader-raised"] > 50 and outcomes["writer-raised"] + outcomes["writer-truncated"] > 0


def test_random_garbage_never_crashes():
    rng = random.Random(9)
    for i in range(3000):
        n = rng.choice([0, 10, 63, 64, 100, 4096, rng.randrange(64, 9000)])
        data = bytearray(rng.randbytes(n))
        if n >= 64 and i % 2:
            # a valid header in front of garbage: exercises the record bounds checks
            with_header = bytearray(_valid_header(n))
            data[:64] = with_header
            # and record-shaped garbage: plausible lengths at the first position
            if n >= 100:
                data[64:68] = rng.randrange(0, 2 * n).to_bytes(4, "little")
        res = _log.scan_segment(data)
        assert res.error is not None


_HEADER_CACHE = {}


def _valid_header(size):
    if size not in _HEADER_CACHE:
        import struct
        import uuid
        head = struct.pack("<8sIIQQ16sqI", b"QELOGSG1", 1, 64, 0, size, uuid.uuid4().bytes, 0, 0)
        _HEADER_CACHE[size] = head + struct.pack("<I", _log._crc32c(head))
    return _HEADER_CACHE[size]


def test_zero_length_stop_inside_sealed_segment_is_reported(tmp_path):
    d = tmp_path / "log"
    vals, _ = _make_log(d)
    name = _segments(d)[0]
    img = bytearray((d / name).read_bytes())
    # zero a whole record's length word in a sealed segment: looks like "the end"
    img[64:68] = b"\0\0\0\0"
    (d / name).write_bytes(bytes(img))
    with pytest.raises(engine.CorruptLog, match="end-of-segment"):
        list(engine.LogReader(d))
    assert [r for r in _log.verify(d) if r.error]


def test_zeroed_length_in_the_middle_of_a_sealed_segment_is_reported(tmp_path):
    d = tmp_path / "log"
    vals, _ = _make_log(d)
    name = _segments(d)[1]
    img = bytearray((d / name).read_bytes())
    pos = 64
    for _ in range(3):  # walk to the fourth record
        pos += (int.from_bytes(img[pos:pos + 4], "little") + 7) & ~7
    base = int(name[:20])
    img[pos:pos + 4] = b"\0\0\0\0"
    (d / name).write_bytes(bytes(img))
    got = []
    with pytest.raises(engine.CorruptLog, match="end-of-segment"):
        for rec in engine.LogReader(d):
            got.append(rec)
    assert [x.offset for x in got] == list(range(base + 3))
