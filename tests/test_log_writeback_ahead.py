"""Written blocks ahead of the tail on the mapping path: while a log syncs
often, a few KiB a sync (a saga's log, a group commit of small records), its
prefaulter also starts the writeback of the zero pages it populated ahead of
the tail, so that the syncs to come find written blocks instead of unwritten
extents to convert.  It must never change what the log holds or recovers,
never engage for a log that seldom syncs (its zeros would double the bytes
the device writes), keep no descriptor past a roll, a close or a fork, and a
refused call must only stop it."""

from __future__ import annotations

import os
import signal
import sys
import time

import faultkit
import pytest
from fiemap import has_unwritten_extents, unwritten_in

import engine
from engine import _log

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="sync_file_range is Linux's"
)


def _synced_appends(log, n, start=0, pad=b""):
    """n small batches, each made durable before the next (a saga's pattern)."""
    for i in range(start, start + n):
        end = log.append_many([b"rec-%06d" % i + pad, b"sum-%06d" % i]).stop
        log.flush(end)


def _wait_written_ahead(log, at_least=1, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = log.stats()["writeback_ahead_bytes"]
        if got >= at_least:
            return got
        time.sleep(0.01)
    return log.stats()["writeback_ahead_bytes"]


def _seg_fds(path):
    """This process's descriptors open on a segment file of the log at path."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(os.path.realpath(path)) and target.endswith(".seg"):
            out.append(fd)
    return out


def _values(path):
    with engine.LogReader(path) as rd:
        return [r.value for r in rd]


@linux_only
@pytest.mark.parametrize("durability", ["interval", "none"])
def test_a_log_synced_often_writes_back_zero_pages_ahead(tmp_path, durability):
    p = str(tmp_path / "log")
    with engine.Log(p, durability=durability, flush_interval=3600) as log:
        _synced_appends(log, 100)
        # a chunk at least, past the tail: the pages the next syncs reach
        assert _wait_written_ahead(log, 256 << 10) >= 256 << 10
        st = log.stats()
        tail = st["active_position"]
        assert tail < 64 << 10
        if has_unwritten_extents(str(tmp_path)):
            # on disk (the page cache not written back for the look): the
            # blocks from 64 KiB past the tail are written ones now
            seg = st["active_segment"]
            deadline = time.monotonic() + 10
            while unwritten_in(seg, tail + (64 << 10), tail + (256 << 10), sync=False):
                assert time.monotonic() < deadline, "no written blocks ahead of the tail"
                time.sleep(0.01)
    assert _values(p) == [v for i in range(100) for v in (b"rec-%06d" % i, b"sum-%06d" % i)]
    assert all(r.error is None for r in _log.verify(p))


@linux_only
def test_a_log_that_seldom_syncs_writes_no_zeros(tmp_path):
    # 8 MiB in 64 KiB batches, one flush at the end: bulk, not sync-bound
    p = str(tmp_path / "log")
    batch = [b"v" * 1000] * 64
    with engine.Log(p, durability="interval", flush_interval=3600, segment_bytes=64 << 20) as log:
        for _ in range(128):
            log.append_many(batch)
        log.flush()
        time.sleep(0.2)  # the prefaulter has long caught up with the tail
        assert log.stats()["writeback_ahead_bytes"] == 0


@linux_only
def test_writeback_ahead_follows_rolls_and_closes_its_descriptors(tmp_path):
    p = str(tmp_path / "log")
    log = engine.Log(p, durability="interval", flush_interval=3600, segment_bytes=256 << 10)
    pad = b"p" * 400
    _synced_appends(log, 8_000, pad=pad)  # ~3.6 MB: a dozen segments, a sync every ~450 bytes
    st = log.stats()
    assert st["rolls"] >= 10
    assert st["writeback_ahead_bytes"] > 0
    # the active segment and the one its roll retired (its page table
    # entries go in the background), nothing older: no descriptor is left
    # behind by a roll
    open_segs = {os.readlink(f"/proc/self/fd/{fd}") for fd in _seg_fds(p)}
    assert len(open_segs) <= 2, open_segs
    assert st["active_segment"] in open_segs
    log.close()
    assert _seg_fds(p) == []
    assert _values(p) == [v for i in range(8_000) for v in (b"rec-%06d" % i + pad, b"sum-%06d" % i)]
    assert all(r.error is None for r in _log.verify(p))


@linux_only
def test_a_forked_child_lets_go_of_the_prefaulters_descriptor(tmp_path):
    p = str(tmp_path / "log")
    log = engine.Log(p, durability="interval", flush_interval=3600)
    _synced_appends(log, 200)
    assert _wait_written_ahead(log) > 0
    parent = set(_seg_fds(p))  # the writer's and the prefaulter's, at least
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            try:
                log.append(b"child")
            except engine.Closed:
                child = set(_seg_fds(p))  # the prefaulter's went at the fork
                code = 0 if child < parent and len(child) == len(parent) - 1 else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    _synced_appends(log, 200, start=200)
    log.close()
    assert len(_values(p)) == 800


@linux_only
@pytest.mark.crash
def test_sigkill_while_writing_back_ahead_keeps_every_flushed_record(tmp_path):
    p = str(tmp_path / "log")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            log = engine.Log(p, durability="interval", flush_interval=3600, segment_bytes=128 << 10)
            i = 0
            while True:  # flushed batches, acknowledged one by one, rolls included
                end = log.append_many([b"rec-%06d" % i, b"sum-%06d" % i]).stop
                log.flush(end)
                os.write(w, b"%d %d\n" % (i, log.stats()["writeback_ahead_bytes"]))
                i += 1
        finally:
            os._exit(1)
    os.close(w)
    with os.fdopen(r) as f:
        deadline = time.monotonic() + 60
        acked = ahead = -1
        while acked < 8_000 and time.monotonic() < deadline:
            line = f.readline()
            if not line:
                break
            acked, ahead = map(int, line.split())
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert acked >= 8_000 and ahead > 0  # killed while writing back ahead
    with engine.Log(p, durability="interval", segment_bytes=128 << 10) as log:
        assert log.next_offset >= 2 * (acked + 1)
    vals = _values(p)
    assert vals[: 2 * (acked + 1)] == [
        v for i in range(acked + 1) for v in (b"rec-%06d" % i, b"sum-%06d" % i)
    ]
    assert all(r.error is None for r in _log.verify(p))


REFUSED = """
import engine
log = engine.Log({d!r}, durability="interval", flush_interval=3600)
arm()
for i in range(300):
    end = log.append_many([b"rec-%06d" % i]).stop
    log.flush(end)
import time
time.sleep(0.3)
ahead = log.stats()["writeback_ahead_bytes"]
for i in range(300, 600):
    end = log.append_many([b"rec-%06d" % i]).stop
    log.flush(end)
disarm()
log.close()
with engine.LogReader({d!r}) as rd:
    ok = [r.value for r in rd] == [b"rec-%06d" % i for i in range(600)]
report({{"ahead": ahead, "ok": ok}})
"""


@linux_only
@pytest.mark.parametrize("err", ["EIO", "EINTR"])
def test_a_refused_writeback_only_stops_it(tmp_path, err):
    # the first sync_file_range fails: no zeros ahead from then on, and the
    # log's appends, syncs and records are as without it
    d = str(tmp_path / "log")
    res = faultkit.run(
        REFUSED.format(d=d), prefix=str(tmp_path), func="sync_file_range", nth=1, err=err
    )
    assert res.rc == 0, res.stderr
    assert res.faults == [("sync_file_range", 1, err)]
    assert res.report == {"ahead": 0, "ok": True}
    counted = faultkit.run(REFUSED.format(d=str(tmp_path / "log2")), prefix=str(tmp_path))
    assert counted.report["ok"] and counted.report["ahead"] > 0
    assert counted.counts["sync_file_range"] > 1
