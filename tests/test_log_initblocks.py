"""Durable logs write into initialised blocks: a background thread writes
zeros over the active segment ahead of the tail while the appender is idle,
so a sync after a batch commits no extent conversion.  The zeros are an
optimisation only: a failing zero write leaves the data path as it was, a
crash at any point of the zeroing recovers exactly, a fork's child has no
such thread."""

import os
import signal
import subprocess
import sys
import time

import pytest

import engine
from engine import _log

from . import faultkit
from .fiemap import extents as _extents
from .fiemap import has_unwritten_extents as _has_unwritten_extents
from .fiemap import unwritten_in as _unwritten_in

HDR = 64


@pytest.fixture
def extents_dir(tmp_path):
    if not sys.platform.startswith("linux") or not _has_unwritten_extents(str(tmp_path)):
        pytest.skip("the file system here has no unwritten extents (nothing to initialise)")
    return tmp_path


def _seg(path):
    (seg,) = [os.path.join(path, f) for f in os.listdir(path) if f.endswith(".seg")]
    return seg


def _vals(n, salt=0):
    return [(salt * 1_000_000 + i).to_bytes(8, "little") + bytes(56) for i in range(n)]


def _wait(cond, timeout=10.0):
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            return False
        time.sleep(0.005)
    return True


def test_blocks_ahead_of_the_durable_tail_are_initialised(extents_dir):
    """After durable batches and a short idle time, the segment from the
    tail to well past it holds no unwritten extent: the next batches' syncs
    land in written blocks.  Records read back exactly."""
    path = str(extents_dir / "log")
    vals = _vals(20_000)
    with engine.Log(path, durability="always") as log:
        for i in range(0, len(vals), 1000):
            log.append_many(vals[i:i + 1000])
        seg = _seg(path)
        tail = os.path.getsize(seg) - 1
        # the tail: the last non-zero byte the batches wrote
        with open(seg, "rb") as f:
            tail = len(f.read(4 << 20).rstrip(b"\0"))
        assert tail > 20_000 * 64
        ahead = 1 << 20  # its window grows with the log (128 KiB, doubled each push, up to 4 MiB)
        assert _wait(lambda: _unwritten_in(seg, HDR, tail + ahead) == 0), _extents(seg)[:4]
        log.append_many(_vals(1000, salt=1))
    assert [r.value for r in engine.LogReader(path)] == vals + _vals(1000, salt=1)
    assert all(r.error is None for r in _log.verify(path))


def test_zeroing_waits_for_idle_time(extents_dir):
    """While batches follow each other without a pause, the zeroer writes
    nothing (its writes would delay the appender's syncs); once they pause it
    catches up."""
    path = str(extents_dir / "log")
    _log._set_zero_ahead(True, ahead=4 << 20, step=256 << 10)
    try:
        log = engine.Log(path, durability="always")
    finally:
        _log._set_zero_ahead(True)
    try:
        vals = _vals(1000)
        assert _wait(lambda: log._zero_ahead_state()[0] > 0)  # the first window, at open
        time.sleep(0.05)
        before = log._zero_ahead_state()[0]
        starts = []
        for _ in range(500):  # a burst, no pause: 34 MB, within the first segment
            starts.append(time.perf_counter())
            log.append_many(vals)
        starts.append(time.perf_counter())
        during = log._zero_ahead_state()[0] - before
        tail = HDR + 500 * len(vals) * 68  # about: a record takes 68.3 bytes in batch frames
        # the zeros do not keep pace with a burst, they wait for pauses: a
        # step needs a full millisecond without a write (a batch delayed
        # that long on a busy machine lets one in, no more)
        gaps = [b - a for a, b in zip(starts, starts[1:])]
        steps = sum(int(g / 0.001) for g in gaps) + 2
        assert during <= steps * (256 << 10), (during, steps, max(gaps))
        assert _wait(lambda: _unwritten_in(_seg(path), tail, tail + (2 << 20)) == 0)
    finally:
        log.close()


FAIL_ZERO = r"""
import os, time, engine
from engine import _log
d = {d!r}
_log._set_zero_ahead(True, ahead=64 << 10, step=16 << 10)
log = engine.Log(d, durability="always")
vals = [i.to_bytes(8, "little") + bytes(56) for i in range(3000)]
for i in range(0, 1000, 100):
    log.append_many(vals[i:i + 100])
time.sleep(0.2)               # idle: the zeroer catches up
log.append_many(vals[1000:2000])  # past what it zeroed: it has work again
arm()
time.sleep(0.3)               # only the zeroer writes while armed
disarm()
st = log._zero_ahead_state()
faults = nfaults()
for i in range(2000, 3000, 100):
    log.append_many(vals[i:i + 100])
durable = log.durable_offset
after = log._zero_ahead_state()
log._simulate_crash()
report({{"faults": faults, "state": st, "after": after, "durable": durable}})
"""


@pytest.mark.skipif(not faultkit.available(), reason="needs Linux and a C compiler")
@pytest.mark.parametrize("err", ["EIO", "ENOSPC"])
def test_a_failed_zero_write_stops_the_zeroer_and_loses_nothing(extents_dir, err):
    """The zeroer's write fails (the shim fails the first pwrite while only
    it writes): it stops, the log goes on writing and syncing every batch
    itself, and after a crash every acknowledged record is back, intact."""
    d = str(extents_dir / "log")
    res = faultkit.run(FAIL_ZERO.format(d=d), prefix=str(extents_dir), func="pwrite", nth=1, err=err)
    assert res.rc == 0, res.stderr[-2000:]
    rep = res.report
    assert rep["faults"] == 1, rep
    assert rep["state"][2] == getattr(__import__("errno"), err), rep  # the zeroer saw it and stopped
    assert rep["after"] is None, rep  # the next push let it go
    assert rep["durable"] == 3000
    with engine.Log(d, durability="always") as log:
        assert log.next_offset == 3000
    assert [r.value for r in engine.LogReader(d)] == _vals(3000)
    assert all(r.error is None for r in _log.verify(d))


CHILD = r"""
import os, sys, time, engine
d = sys.argv[1]
log = engine.Log(d, durability="always")
vals = [i.to_bytes(8, "little") + bytes(56) for i in range(1000)]
n = log.next_offset
while True:
    log.append_many([(n + i).to_bytes(8, "little") + bytes(56) for i in range(1000)])
    n += 1000
    sys.stdout.write(f"{{n}}\n")
    sys.stdout.flush()
    time.sleep({pause})   # idle: the zeroer writes now
"""


@pytest.mark.crash
def test_kill_while_zeroing_recovers_exactly(extents_dir):
    """SIGKILL at points spread over the zeroer's writes (the appender
    pauses after each batch, the zeroer fills the pause): every acknowledged
    record comes back, in order, nothing after the last one, and verify finds
    no damage; appending goes on after each recovery."""
    path = str(extents_dir / "log")
    acked = 0
    for i in range(8):
        src = CHILD.format(pause=0.002 + 0.001 * i)
        p = subprocess.Popen([sys.executable, "-c", src, path], stdout=subprocess.PIPE, text=True)
        lines = []
        for _ in range(3 + i):
            lines.append(p.stdout.readline())
        time.sleep(0.001 * i)
        p.send_signal(signal.SIGKILL)
        rest = p.stdout.read()
        p.wait()
        got = [int(x) for x in (lines + rest.splitlines()) if x.strip()]
        acked = max([acked] + got)
        with engine.Log(path, durability="always") as log:
            assert log.next_offset >= acked
            assert log.next_offset % 1000 == 0  # whole batches: a torn one is cut
        values = [r.value for r in engine.LogReader(path)]
        assert values == [k.to_bytes(8, "little") + bytes(56) for k in range(len(values))]
        assert all(r.error is None for r in _log.verify(path))
    assert acked >= 8 * 3000


def test_crash_mid_zeroing_then_reopen_is_exact(extents_dir):
    """A writer stopped like a killed process while its zeroer is writing:
    the reopened log holds exactly the records appended, and new appends
    after the recovery land in the zeroed region and read back."""
    path = str(extents_dir / "log")
    log = engine.Log(path, durability="always")
    vals = _vals(5000)
    for i in range(0, 5000, 500):
        log.append_many(vals[i:i + 500])
    time.sleep(0.002)  # the zeroer has begun
    log._simulate_crash()
    with engine.Log(path, durability="always") as log:
        assert log.next_offset == 5000
        log.append_many(_vals(500, salt=2))
    assert [r.value for r in engine.LogReader(path)] == vals + _vals(500, salt=2)
    assert all(r.error is None for r in _log.verify(path))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_fork_with_a_zeroing_log(extents_dir):
    """A child forked while the zeroer runs finds its handle inert and exits
    cleanly; the parent's zeroer goes on and its log closes and reads back."""
    path = str(extents_dir / "log")
    log = engine.Log(path, durability="always")
    log.append_many(_vals(1000))
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            try:
                log.append(b"x")
            except engine.EngineError:
                code = 0
            log.close()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert log._zero_ahead_state() is not None
    log.append_many(_vals(1000, salt=3))
    time.sleep(0.05)
    assert log._zero_ahead_state() is not None
    log.close()
    assert [r.value for r in engine.LogReader(path)] == _vals(1000) + _vals(1000, salt=3)


def test_rolls_move_the_zeroer_to_the_new_segment(extents_dir):
    """Small segments roll often: each roll's end marker and the new
    segment's records are never overwritten by zeros; every segment
    verifies and reads back."""
    path = str(extents_dir / "log")
    vals = _vals(30_000)
    with engine.Log(path, durability="always", segment_bytes=512 << 10) as log:
        for i in range(0, len(vals), 700):
            log.append_many(vals[i:i + 700])
            if i % 2800 == 0:
                time.sleep(0.003)  # idle: zeros ahead, up to the end of the segment
        assert log.stats()["rolls"] >= 3
    assert [r.value for r in engine.LogReader(path)] == vals
    assert all(r.error is None for r in _log.verify(path))
