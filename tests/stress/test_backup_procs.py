"""Online backup under load: real writer processes append while
``engine.backup`` copies, and the copies are restored and checked.

Three forked writer processes share one data directory:

* ``plain``: appends ``b"%d" % offset`` to the log ``plain`` (small segments,
  so it rolls during the backup) and commits the consumer group ``g``;
* ``txn``: a Coordinator with two LogParticipants (logs ``a`` and ``b``);
  transaction i appends ``i:0, i:1`` to ``a`` and ``i`` to ``b``; a small
  ``compact_records`` makes the journals switch generations meanwhile;
* ``store``: reads ``plain`` and applies each record exactly once to a
  VersionedStore (``offset`` and ``sum`` in one ``apply``), snapshotting often.

Each copy is restored (opened, ``Coordinator.recover`` run on it) and must
hold: every ``plain`` record in order, no gap, no extra; each transaction in
both ``a`` and ``b`` or in neither, whole and in order; a store whose state
reflects exactly the ``plain`` records the copy holds (``offset`` <= the
copy's end, ``sum`` = 0 + 1 + ... + offset-1, one version per record); group
offsets within the copy.  One test SIGKILLs two writers in the middle of the
backup (from its progress callback).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import pytest

import engine
from engine._log import Log, LogReader

pytestmark = pytest.mark.stress

_RUN_S = 1.0  # writers' head start before the backups


def _plain(src, stop, count):
    log = Log(os.path.join(src, "plain"), durability="none", segment_bytes=1 << 16)
    i = log.next_offset
    try:
        while not stop.is_set():
            log.append_many([b"%d" % (i + k) for k in range(16)])
            i += 16
            count.value = i
            if i % 1024 == 0:
                with LogReader(os.path.join(src, "plain"), group="g") as r:
                    r.commit(i)
    finally:
        log.close()


def _txn(src, stop, count):
    coord = engine.Coordinator(os.path.join(src, "coord"), durability="none", compact_records=64)
    pa = engine.LogParticipant(Log(os.path.join(src, "a"), durability="none"), compact_records=64)
    pb = engine.LogParticipant(Log(os.path.join(src, "b"), durability="none"), compact_records=64)
    i = 0
    try:
        while not stop.is_set():
            with coord.transaction() as tx:
                tx.enlist(pa, [b"%d:0" % i, b"%d:1" % i])
                tx.enlist(pb, [b"%d" % i])
            i += 1
            count.value = i
    finally:
        coord.close()
        for p in (pa, pb):
            p.close()
            p.log.close()


def _store(src, stop, count):
    plain = os.path.join(src, "plain")
    while not os.path.exists(os.path.join(plain, "meta")):
        time.sleep(0.01)
    store = engine.VersionedStore(os.path.join(src, "state"), durability="none", snapshot_every=300)
    done = int(store.get("offset")[1] or b"0")
    total = int(store.get("sum")[1] or b"0")
    reader = LogReader(plain, start=done)
    try:
        while not stop.is_set():
            rec = reader.poll(timeout=0.05)
            if rec is None:
                continue
            total += int(bytes(rec.value))
            store.apply([("put", "offset", b"%d" % (rec.offset + 1)), ("put", "sum", b"%d" % total)])
            count.value = rec.offset + 1
    finally:
        reader.close()
        store.close()


def _start(src):
    ctx = mp.get_context("fork")
    stop = ctx.Event()
    procs = {}
    for name, fn in (("plain", _plain), ("txn", _txn), ("store", _store)):
        count = ctx.Value("q", 0)
        p = ctx.Process(target=fn, args=(src, stop, count), daemon=True)
        p.start()
        procs[name] = (p, count)
    deadline = time.monotonic() + 30
    while any(c.value == 0 for _p, c in procs.values()):
        assert time.monotonic() < deadline, "writers did not start"
        time.sleep(0.01)
    time.sleep(_RUN_S)
    return stop, procs


def _stop(stop, procs):
    stop.set()
    for p, _c in procs.values():
        p.join(30)
        if p.is_alive():
            p.kill()
            p.join(5)


def _check_copy(d):
    """Restore the copy in ``d`` and check every invariant; returns counts."""
    plain = [bytes(r.value) for r in LogReader(os.path.join(d, "plain"), start=0)]
    assert plain == [b"%d" % i for i in range(len(plain))]  # count and order, no gap
    n = len(plain)
    with LogReader(os.path.join(d, "plain"), group="g") as r:
        assert (r.committed() or 0) <= n
    # 2PC: recover on the copy, then each txn in both logs or in neither
    coord = engine.Coordinator(os.path.join(d, "coord"), durability="none")
    pa = engine.LogParticipant(Log(os.path.join(d, "a"), durability="none"))
    pb = engine.LogParticipant(Log(os.path.join(d, "b"), durability="none"))
    try:
        coord.recover([pa, pb])
        assert not pa.recover() and not pb.recover()  # nothing in doubt
    finally:
        coord.close()
        for p in (pa, pb):
            p.close()
            p.log.close()
    a = [bytes(r.value) for r in LogReader(os.path.join(d, "a"), start=0)]
    b = [bytes(r.value) for r in LogReader(os.path.join(d, "b"), start=0)]
    assert len(a) == 2 * len(b)
    ids = [int(v) for v in b]
    assert ids == list(range(len(ids)))  # sequential txns: all committed before k are there
    assert a == [b"%d:%d" % (i, k) for i in ids for k in (0, 1)]  # whole batches, same txns
    # exactly-once state: the store reflects exactly the plain records it read
    with engine.VersionedStore(os.path.join(d, "state"), durability="none") as store:
        ver, off = store.get("offset")
        _v, total = store.get("sum")
    off = int(off or b"0")
    assert off <= n, (off, n)
    assert int(total or b"0") == off * (off - 1) // 2
    assert ver == off  # one apply per record: none applied twice, none skipped
    # the restored log keeps working
    with Log(os.path.join(d, "plain"), durability="none") as log:
        assert log.append(b"%d" % n) == n
    return n, len(ids), off


def test_backups_taken_under_load_restore_consistently(tmp_path):
    src = str(tmp_path / "src")
    os.makedirs(src)
    stop, procs = _start(src)
    try:
        r1 = engine.backup(src, str(tmp_path / "full"))
        time.sleep(0.3)
        r2 = engine.backup(src, str(tmp_path / "full"), incremental=True)
        time.sleep(0.3)
        r3 = engine.backup(src, str(tmp_path / "other"))
    finally:
        _stop(stop, procs)
    assert r2.bytes_copied < r2.bytes_total  # incremental: only what is new moved
    assert r2.segments_kept > 0
    counts = [_check_copy(str(tmp_path / d)) for d in ("full", "other")]
    for n, txns, applied in counts:
        assert n > 0 and txns > 0 and applied > 0
    assert counts[1][0] >= r1.log_ends["plain"]  # later copies hold more
    assert r3.cut_ns > r2.cut_ns > r1.cut_ns


@pytest.mark.crash
def test_a_writer_sigkilled_during_the_backup(tmp_path):
    src = str(tmp_path / "src")
    os.makedirs(src)
    stop, procs = _start(src)
    killed = []

    def kill_on_first_progress(done, total):
        if not killed:
            for name in ("plain", "txn"):
                os.kill(procs[name][0].pid, signal.SIGKILL)
                killed.append(name)

    try:
        report = engine.backup(src, str(tmp_path / "copy"), progress=kill_on_first_progress)
        assert killed == ["plain", "txn"]
        for name in ("plain", "txn"):
            procs[name][0].join(10)
        # after the kill: one more (incremental) backup of the dead writers' files
        again = engine.backup(src, str(tmp_path / "copy"), incremental=True)
    finally:
        _stop(stop, procs)
    n, txns, applied = _check_copy(str(tmp_path / "copy"))
    assert n >= report.log_ends["plain"] and txns > 0
    assert again.log_ends["plain"] >= report.log_ends["plain"]
    # the source itself recovers too (its writers were killed mid-append)
    with Log(os.path.join(src, "plain"), durability="none") as log:
        assert log.next_offset >= n
