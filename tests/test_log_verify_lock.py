"""verify / repair and the live writer: decided by the lock itself (a
non-blocking flock), never by the pid in writer.lock; a read error of a
damaged sector is reported, never a SIGBUS; flush() in "none" makes the
directory entries of rolled segments durable."""

from __future__ import annotations

import os

import faultkit
import pytest

import engine
from engine import _log

needs_shim = pytest.mark.skipif(not faultkit.available(), reason="needs Linux and a C compiler")


def _crashed_log_with_garbage_tail(d):
    log = engine.Log(d, durability="none", segment_bytes=1 << 16)
    for i in range(30):
        log.append(b"v%d" % i)
    end = log.stats()["active_position"]
    log._simulate_crash()        # no writer holds the lock now
    with open(os.path.join(d, f"{0:020d}.seg"), "r+b") as f:
        f.seek(end + 64)
        f.write(b"\xde\xad\xbe\xef" * 4)
    return end


@pytest.mark.parametrize("pid", ["self", "init"])
def test_a_live_pid_in_writer_lock_does_not_hide_damage(tmp_path, pid):
    d = str(tmp_path / "log")
    _crashed_log_with_garbage_tail(d)
    # a reused pid (init), or the process running verify: alive, but no lock
    with open(os.path.join(d, "writer.lock"), "w") as f:
        f.write(f"{os.getpid() if pid == 'self' else 1}\n")
    bad = [r for r in _log.verify(d) if r.error is not None]
    assert bad and "non-zero bytes" in bad[0].error


def test_repair_holding_the_lock_itself_still_sees_the_damage(tmp_path):
    d = str(tmp_path / "log")
    end = _crashed_log_with_garbage_tail(d)
    bad = _log.repair_truncate(d)
    assert bad is not None and bad.error_position == end
    assert all(r.error is None for r in _log.verify(d))
    with engine.Log(d, durability="none", segment_bytes=1 << 16) as log:
        assert log.next_offset == 30


def test_a_writer_holding_the_lock_still_hides_its_tail_in_progress(tmp_path):
    d = str(tmp_path / "log")
    with engine.Log(d, durability="none", segment_bytes=1 << 16) as log:
        for i in range(30):
            log.append(b"v%d" % i)
        assert all(r.error is None for r in _log.verify(d))


VERIFY = """
import engine
from engine import _log
arm()
res = _log.verify({d!r})
disarm()
report([r.error for r in res])
"""

RECOVER = """
import engine
arm()
try:
    engine.Log({d!r}, durability="none", segment_bytes=1 << 16).close()
    out = "opened"
except engine.CorruptLog as exc:
    out = "CorruptLog: " + exc.reason
disarm()
report(out)
"""


@needs_shim
def test_a_read_error_is_reported_not_a_crash(tmp_path):
    d = str(tmp_path / "log")
    log = engine.Log(d, durability="none", segment_bytes=1 << 16)
    for i in range(30):
        log.append(b"v%d" % i)
    log._simulate_crash()
    res = faultkit.run(VERIFY.format(d=d), prefix=str(tmp_path), func="pread", nth=1, err="EIO")
    assert res.rc == 0, res.stderr[-2000:]
    assert res.report and "unreadable" in res.report[0] and "Input/output error" in res.report[0]
    res = faultkit.run(RECOVER.format(d=d), prefix=str(tmp_path), func="pread", nth=1, err="EIO")
    assert res.rc == 0, res.stderr[-2000:]
    assert res.report.startswith("CorruptLog: unreadable")


FLUSH = """
import os, engine
log = engine.Log({d!r}, durability="none", segment_bytes=4096)
for i in range(200):
    log.append(b"x" * 60)
arm()
log.flush()
disarm()
report(sorted(n for n in os.listdir({d!r}) if n.endswith(".seg")))
log.close()
"""


@needs_shim
def test_flush_in_none_syncs_the_directory_of_new_segments(tmp_path):
    d = os.path.realpath(tmp_path / "log")
    res = faultkit.run(FLUSH.format(d=d), prefix=d, trace=True)
    assert res.rc == 0, res.stderr[-2000:]
    segs = res.report
    assert len(segs) >= 3
    synced = {t[1] for t in res.trace}
    # every segment (the rolled ones by fdatasync, the active one by msync) ...
    assert {f"{d}/{n}" for n in segs} <= synced, (segs, res.trace)
    # ... and the directory holding their names
    assert ("fsync", d) in res.trace, res.trace
