"""The log's group commit gathers the writers its last sync served.

When a sync served several waiting writers, the next syncer waits (at most as
long as that sync ran, 5 ms at most) for them to append again, so one sync
carries all their records; a writer that syncs alone never waits.  Each
writer here appends and calls ``flush()``, as a durable saga does.
"""

from __future__ import annotations

import threading
import time

import pytest
from synchook import Durable, installed

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
