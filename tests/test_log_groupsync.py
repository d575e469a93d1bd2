"""The log's group commit gathers the writers its last sync served.

When a sync served several waiting writers, the next syncer waits (at most as
long as that sync ran, 5 ms at most) for them to append again, so one sync
carries all their records; a writer that syncs alone never waits.  Each
writer here appends and calls ``flush()``, as a durable saga does.
"""

from __future__ import annotations

import signal
import threading
import time

import pytest
from synchook import Durable, installed, run_threads

from engine import Log

BIG = 8 << 20  # dirty bytes that make the first sync long (several ms)
SEG = 64 << 20


@pytest.fixture
def durable():
    with installed(Durable()) as hook:
        yield hook


def _log(tmp_path):
    return Log(
        str(tmp_path / "log"), durability="interval", flush_interval=3600.0, segment_bytes=SEG
    )


def test_a_writer_back_shortly_after_a_shared_sync_shares_the_next_one(tmp_path, durable):
    """Two writers wait for one long sync; then one comes back at once and
    the other a little later (well within the last sync's run time): both
    records go out in one sync (without the gathering the first back syncs
    its record alone), and each flush returns with its record durable."""
    log = _log(tmp_path)
    path = log.path
    both = threading.Barrier(2)
    late = []  # (writer, its record's end, durable end) for every early return

    def writer(k):
        # a long sync that serves both writers
        log.append(bytes([k]) * (BIG // 2))
        both.wait()
        log.flush()
        both.wait()
        if k == 1:
            time.sleep(0.0003)  # still framing its next record
        end = log.append(b"x" * 64) + 1
        log.flush()
        if durable.end(path) < end:
            late.append((k, end, durable.end(path)))

    rounds = 5
    joined = 0
    try:
        for _ in range(rounds):
            before = durable.syncs.get(path, 0)
            ts = [threading.Thread(target=writer, args=(k,)) for k in range(2)]
            for t in ts:
                t.start()
            for t in ts:
                t.join(30)
            assert not any(t.is_alive() for t in ts)
            # the shared long sync, then one for both small records
            joined += durable.syncs.get(path, 0) - before == 2
    finally:
        log.close()
    assert late == []
    # on a loaded machine a writer may now and then come back too late
    assert joined >= rounds - 1, f"{joined} of {rounds} rounds shared the second sync"


def test_a_lone_writer_never_waits_for_siblings(tmp_path, durable):
    """A writer alone syncs at once: right after a long sync (which would
    open a gathering window if others had waited on it) its next flush takes
    one sync and no gathering delay."""
    log = _log(tmp_path)
    path = log.path
    try:
        log.append(b"a" * BIG)
        t0 = time.perf_counter()
        log.flush()
        long_sync = time.perf_counter() - t0
        before = durable.syncs.get(path, 0)
        end = log.append(b"x" * 64) + 1
        t0 = time.perf_counter()
        log.flush()
        took = time.perf_counter() - t0
        assert durable.end(path) >= end
        assert durable.syncs.get(path, 0) - before == 1
        # a small sync: far shorter than the long one, no window waited out
        assert took < long_sync
    finally:
        log.close()


def test_flush_to_an_end_waits_for_the_records_below_it_only(tmp_path, durable):
    """``flush(end)`` returns once every record below ``end`` is durable: a
    record appended after them needs no sync of its own for it."""
    log = _log(tmp_path)
    path = log.path
    try:
        log.append(b"a")
        log.flush()
        assert log.durable_offset == 1
        log.append(b"b")
        before = durable.syncs.get(path, 0)
        log.flush(1)
        log.flush(0)
        assert durable.syncs.get(path, 0) == before
        assert log.durable_offset == 1
        log.flush(2)
        assert log.durable_offset == 2 and durable.end(path) >= 2
        with pytest.raises(ValueError):
            log.flush(3)  # past next_offset: nothing there to make durable
        with pytest.raises(ValueError):
            log.flush(-1)
        for bad in ("1", 1.0, True):
            with pytest.raises(TypeError):
                log.flush(bad)
    finally:
        log.close()


def test_each_of_many_writers_returns_once_its_record_is_durable(tmp_path, durable):
    """Eight writers append and ``flush(end)`` at once, again and again:
    those that find a sync in flight sleep, and a sync wakes only those whose
    records it covered (the others sleep on, one of them picked to sync
    next), so each flush returns with its record durable, and the writers
    share syncs."""
    log = _log(tmp_path)
    path = log.path
    early = []  # (record end, durable end) of every flush that returned too soon
    n, rounds = 8, 60

    def writer(k):
        for i in range(rounds):
            end = log.append(b"%d:%d" % (k, i)) + 1
            log.flush(end)
            got = durable.end(path)
            if got < end:
                early.append((end, got))

    try:
        run_threads(n, writer, "a writer")
        syncs = durable.syncs.get(path, 0)
    finally:
        log.close()
    assert early == []
    assert syncs < n * rounds, "no two writers shared a sync"


def test_an_interrupted_flush_leaves_no_writer_without_a_sync(tmp_path):
    """A signal handler that raises in a thread asleep in flush (a long
    sync in flight) ends that flush with its exception; the writers asleep
    beside it are still woken and synced, and the next flush works.  (No
    sync hook here: the handler may raise inside it, in the syncing thread.)"""
    log = _log(tmp_path)

    class Alarm(Exception):
        pass

    def ring(_sig, _frame):
        raise Alarm()

    started = threading.Event()
    ends = []

    def other(k):
        started.wait(10)
        for i in range(20):
            end = log.append(b"%d:%d" % (k, i)) + 1
            log.flush(end)
            ends.append((end, log.durable_offset))

    old = signal.signal(signal.SIGALRM, ring)
    ts = [threading.Thread(target=other, args=(k,)) for k in range(3)]
    try:
        for t in ts:
            t.start()
        # a long sync (many dirty pages) for the others to sleep behind
        log.append(b"z" * BIG)
        started.set()
        interrupted = 0
        for _ in range(5):
            signal.setitimer(signal.ITIMER_REAL, 0.002)
            try:
                log.append(b"main")
                log.flush()
                time.sleep(0.01)  # (the alarm may ring after the flush)
            except Alarm:
                interrupted += 1
            log.append(b"z" * (BIG // 4))
        signal.setitimer(signal.ITIMER_REAL, 0)
        for t in ts:
            t.join(60)
        assert not any(t.is_alive() for t in ts), "a writer was left asleep"
        log.flush()
        assert log.durable_offset == log.next_offset
        assert all(got >= end for end, got in ends)
        assert len(ends) == 60
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        log.close()
