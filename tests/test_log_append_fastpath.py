"""The single-record append path of the segment log: exact ``bytes`` and
buffer values frame identically, and on the mapping path (durability "none"
and "interval") a background thread faults in the pages ahead of the tail,
without changing a byte the log or its recovery sees."""

from __future__ import annotations

import os
import signal
import struct
import sys
import threading
import time

import pytest

import engine
from engine import _log

HDR = struct.Struct("<IIQqII")  # length, crc, offset, timestamp, key_len, flags

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_POPULATE_WRITE is Linux's")


def _seg_files(path):
    return sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".seg"))


def _frames(seg_path):
    """(header fields, raw key+value bytes) of each frame of a segment, end marker included."""
    with open(seg_path, "rb") as f:
        data = f.read()
    out, pos = [], 64
    while pos + 32 <= len(data):
        h = HDR.unpack_from(data, pos)
        if h[0] == 0:
            break
        out.append((h, data[pos + 32:pos + h[0]]))
        pos += (h[0] + 7) & ~7
    return out


def _rss_kib(seg_path):
    """Resident KiB of this process's mapping of seg_path (0 if unmapped)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            first = line.split(maxsplit=1)[0]
            if "-" in first and not first.endswith(":"):
                inside = line.rstrip("\n").endswith(seg_path)
            elif inside and first == "Rss:":
                total += int(line.split()[1])
    return total


def _threads():
    return len(os.listdir("/proc/self/task"))


@pytest.mark.parametrize("durability", ["none", "always"])
def test_bytes_and_buffer_values_write_identical_frames(tmp_path, durability):
    values = [b"", b"v", b"x" * 64, bytes(range(256)) * 3]
    kinds = [bytes, bytearray, memoryview, lambda b: memoryview(bytearray(b))]
    p = str(tmp_path / "log")
    with engine.Log(p, durability=durability) as log:
        for v in values:
            for kind in kinds:
                log.append(kind(v))
                log.append(kind(v), key=kind(b"key-" + v[:5]))
    frames = [f for f in _frames(_seg_files(p)[0]) if not f[0][5] & 1]  # without the end marker
    assert len(frames) == len(values) * len(kinds) * 2
    for i, ((length, _crc, off, _ts, key_len, flags), body) in enumerate(frames):
        v = values[i // (2 * len(kinds))]
        keyed = i % 2 == 1
        key = b"key-" + v[:5] if keyed else b""
        assert off == i
        assert (key_len, flags) == ((len(key), 2) if keyed else (0, 0))
        assert length == 32 + len(key) + len(v)
        assert body == key + v
    assert all(r.error is None for r in _log.verify(p))
    with engine.LogReader(p) as r:
        got = [(rec.key, rec.value) for rec in r]
    assert got == [(None if i % 2 == 0 else b"key-" + values[i // (2 * len(kinds))][:5],
                    values[i // (2 * len(kinds))]) for i in range(len(frames))]


def test_non_buffer_value_is_refused_and_the_log_goes_on(tmp_path):
    with engine.Log(str(tmp_path / "log"), durability="none") as log:
        with pytest.raises(TypeError, match="value must be a bytes-like object, not str"):
            log.append("text")
        with pytest.raises(TypeError, match="key must be a bytes-like object or None, not int"):
            log.append(b"v", key=3)
        assert log.append(b"v") == 0


def _wait_rss(seg, at_least_kib, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rss = _rss_kib(seg)
        if rss >= at_least_kib:
            return rss
        time.sleep(0.01)
    return _rss_kib(seg)


@linux_only
@pytest.mark.parametrize("durability", ["none", "interval"])
def test_pages_ahead_of_the_tail_are_faulted_in(tmp_path, durability):
    # one 96-byte append touches one page itself; the prefaulter brings in
    # megabytes ahead of it (bounded by the segment), so later appends do not
    # fault in the appending thread
    p = str(tmp_path / "log")
    with engine.Log(p, durability=durability, segment_bytes=64 << 20) as log:
        log.append(b"x" * 64)
        seg = _seg_files(p)[0]
        assert _wait_rss(seg, 2048) >= 2048  # KiB: far more than the page written
        assert _rss_kib(seg) <= 8 << 10  # ... and a bounded distance, not the whole segment


@linux_only
def test_durable_pwrite_path_prefaults_nothing(tmp_path):
    p = str(tmp_path / "log")
    with engine.Log(p, durability="always", segment_bytes=64 << 20) as log:
        n = _threads()
        for _ in range(100):
            log.append(b"x" * 64)
        assert _threads() == n  # the pwrite path never writes through the mapping


@linux_only
def test_prefaulter_follows_rolls_and_stops_at_close(tmp_path):
    before = _threads()
    p = str(tmp_path / "log")
    v = b"y" * 64
    log = engine.Log(p, durability="none", segment_bytes=1 << 20)
    n = 40_000  # ~3.7 segments of 1 MiB
    for i in range(n):
        assert log.append(v, key=b"%d" % i) == i
    assert log.stats()["rolls"] >= 3
    assert _threads() == before + 1
    seg = _seg_files(p)[-1]
    assert _wait_rss(seg, 1000) >= 1000  # the active (last) segment, faulted in whole
    log.close()
    assert _threads() == before
    assert all(r.error is None for r in _log.verify(p))
    with engine.LogReader(p) as r:
        recs = list(r)
    assert [(x.offset, x.key, x.value) for x in recs] == [(i, b"%d" % i, v) for i in range(n)]


@linux_only
def test_collected_writer_stops_its_prefaulter(tmp_path):
    before = _threads()
    for i in range(20):
        log = engine.Log(str(tmp_path / f"log{i}"), durability="none")
        log.append(b"z")
        if i % 2:
            log.close()
        del log  # unclosed: collected, the next open recovers
    assert _threads() == before


@linux_only
@pytest.mark.crash
def test_sigkill_with_prefaulted_pages_recovers_every_record(tmp_path):
    # prefaulted pages past the tail are dirty zero pages: after a SIGKILL the
    # reopened log sees exactly the records appended, then appends after them
    p = str(tmp_path / "log")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            log = engine.Log(p, durability="none", segment_bytes=4 << 20)
            n = 0
            for n in range(1, 70_001):  # rolls, then a tail in a prefaulted segment
                log.append(b"%08d" % n * 8)
            _wait_rss(_seg_files(p)[-1], 2048)
            os.write(w, b"%d\n" % n)
            time.sleep(60)
        finally:
            os._exit(1)
    os.close(w)
    with os.fdopen(r) as f:
        acked = int(f.readline())
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    with engine.Log(p, durability="none", segment_bytes=4 << 20) as log:
        assert log.append(b"after") == acked
    assert all(x.error is None for x in _log.verify(p))
    with engine.LogReader(p) as rd:
        vals = [x.value for x in rd]
    assert vals == [b"%08d" % n * 8 for n in range(1, acked + 1)] + [b"after"]


def test_threads_appending_concurrently_keep_every_record(tmp_path):
    p = str(tmp_path / "log")
    with engine.Log(p, durability="none", segment_bytes=1 << 20) as log:
        def run(t):
            for i in range(5000):
                log.append(b"%d:%d" % (t, i))
        ts = [threading.Thread(target=run, args=(t,)) for t in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    with engine.LogReader(p) as rd:
        got = sorted(x.value for x in rd)
    assert got == sorted(b"%d:%d" % (t, i) for t in range(4) for i in range(5000))


@linux_only
def test_fork_while_the_prefaulter_runs(tmp_path):
    # the child has no prefault thread and an inert writer; the parent's goes on
    p = str(tmp_path / "log")
    log = engine.Log(p, durability="none", segment_bytes=1 << 20)
    for i in range(20_000):
        log.append(b"%d" % i)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            log.append(b"child")
        except engine.Closed:
            code = 0 if _threads() == 1 else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    for i in range(20_000, 30_000):
        log.append(b"%d" % i)
    log.close()
    with engine.LogReader(p) as rd:
        assert [x.value for x in rd] == [b"%d" % i for i in range(30_000)]


def test_returned_offsets_stay_what_they_were(tmp_path):
    # append() hands back the int it returned last when nothing else holds
    # it: an offset the caller keeps (a variable, a list, a dict key, a
    # thread's local) must never change afterwards, dropped ones must not
    # leak into kept ones, and every one equals its record's offset
    p = str(tmp_path / "log")
    with engine.Log(p, durability="none", segment_bytes=1 << 20) as log:
        append = log.append
        kept, by_off = [], {}
        for i in range(30_000):  # past the one-digit reuse floor, across rolls
            off = append(b"v%d" % i)
            assert off == i and type(off) is int
            if i % 7 == 0:
                kept.append(off)
                by_off[off] = i
            del off
        held = append(b"held")
        for _ in range(3):
            append(b"dropped")  # results discarded: the reused int is free
        assert held == 30_000 and str(held) == "30000" and hash(held) == hash(30_000)
        assert kept == list(range(0, 30_000, 7))
        assert all(by_off[k] == k for k in by_off)
        assert log.delete(b"k") == 30_004
        assert [append(b"x") for _ in range(3)] == [30_005, 30_006, 30_007]
        got = []
        ts = [threading.Thread(target=lambda: got.extend(append(b"t") for _ in range(2000)))
              for _ in range(3)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert sorted(got) == list(range(30_008, 36_008))
    with engine.LogReader(p) as rd:
        assert [r.offset for r in rd] == list(range(36_008))


def test_append_signature():
    # append is a plain method of the type: still introspectable
    import inspect

    params = inspect.signature(engine.Log.append).parameters
    assert list(params)[-2:] == ["value", "key"] and params["key"].default is None


def test_rolled_segments_index_files_point_at_their_records(tmp_path):
    # a roll writes the segment's .idx (rel, pos) and .tix (ts, rel, pos)
    # entries: each names a record of that segment by offset, position and
    # timestamp, in order
    p = str(tmp_path / "log")
    with engine.Log(p, durability="none", segment_bytes=1 << 20) as log:
        for i in range(40_000):
            log.append(b"%d" % i * 5, key=b"k" if i % 3 else None)
    segs = _seg_files(p)
    assert len(segs) >= 3
    for seg in segs[:-1]:  # written by the rolls
        base = int(os.path.basename(seg)[:20])
        with open(seg, "rb") as f:
            data = f.read()
        with open(seg[:-4] + ".idx", "rb") as f:
            idx = f.read()
        with open(seg[:-4] + ".tix", "rb") as f:
            tix = f.read()
        n = (len(idx) - 32) // 8
        assert n > 100 and len(tix) == 32 + 16 * n
        prev = -1
        for i in range(n):
            rel, pos = struct.unpack_from("<II", idx, 32 + 8 * i)
            ts, rel2, pos2 = struct.unpack_from("<qII", tix, 32 + 16 * i)
            h = HDR.unpack_from(data, pos)
            assert (rel2, pos2) == (rel, pos) and pos > prev
            assert h[2] == base + rel and h[3] == ts
            prev = pos
    with engine.LogReader(p) as rd:  # the index files load and seek by offset and time
        rd.seek(31_234)
        assert bytes(next(iter(rd)).value) == b"31234" * 5
