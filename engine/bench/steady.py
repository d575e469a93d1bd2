"""Steady-state runs of blocking operations from a pool of threads.

The durable cases (saga, txn, versions) time one blocking operation per
message (a saga, a transaction, a put), ours and SQLite's alike.  Two things
make a short window measure something other than the store:

* **Start-up.**  A fresh store's first operations create and grow its files
  (SQLite's WAL grows to its checkpoint size before it is reused; a log maps
  and touches its first segment), connections open, threads start.  So every
  run first does :data:`WARM_S` seconds of warm-up operations on the same
  store, the same connections and the same threads (at most as many as the
  timed part, so a small sizing run stays small), and only then starts the
  clock.
* **Unfair waits.**  SQLite's busy handler backs a writer off by sleeping
  (1, 2, 5, ... 100 ms), so some connections starve while one writes.
  Threads that each own a fixed share of the messages end the window when
  the unluckiest of them ends, and even with shared work the last messages
  wait in those sleeps while the others have nothing left to do.  That
  tail is a large part of a short window and a small part of a long one.
  So the threads take the next message from a shared counter, as a pool of
  workers takes jobs from a queue, and keep every thread busy to the end:
  once the messages are all taken, a free thread runs more ``warm``
  operations, and the window closes when ``count`` operations have
  completed (the rate of a loaded store); the messages still in flight then
  complete after it.

SQLite files get one more step (:func:`presize_wal`): a database in service
has its WAL at full size, reused after each checkpoint, where a fresh one
grows through its first thousand commits, each sync then also committing the
file's new size.
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any, Callable, List, Optional, Tuple

WARM_S = 0.25  # warm-up seconds per run, on the store that is then timed


def run_steady(
    threads: int,
    count: int,
    body: Callable[[int, int], Any],
    warm: Optional[Callable[[int, int], Any]] = None,
    warm_s: float = WARM_S,
) -> Tuple[int, int, int]:
    """Warm up, then time ``body(k, i)`` for every i in ``range(count)``.

    ``k`` is the calling thread's index (it names per-thread state, a
    connection say); the threads take the next ``i`` from a shared counter.
    Before the clock starts the same threads run ``warm(k, j)`` (``j`` = 0,
    1, 2, ... across threads, never repeated) until ``warm_s`` seconds have
    passed or ``count`` warm-ups have run, and all of them have finished.
    Once every ``i`` is taken, free threads run more ``warm`` operations
    (``j`` < ``2 * count`` in all) until ``count`` operations have completed
    since the clock started, which stops it; every ``body`` call has
    returned when this does.  ``warm`` must not touch what ``body`` delivers.
    Returns ``(t0_ns, t1_ns, warmed)``: the clock stamps around the timed
    part and the number of ``warm`` operations run.  The first error of any
    thread is raised after all of them ended."""
    errors: List[BaseException] = []
    warm_ids = itertools.count()  # next() on it is atomic under the GIL
    todo = itertools.count()
    lock = threading.Lock()
    warmed = [0]  # warm operations run, before the clock and after the messages
    completed = [0]  # operations completed since the clock started
    stamps = [0, 0]  # t0, t1
    deadline = [0]
    ready = threading.Barrier(threads, action=lambda: stamps.__setitem__(0, time.perf_counter_ns()))

    def done() -> None:
        with lock:
            completed[0] += 1
            if completed[0] == count:
                stamps[1] = time.perf_counter_ns()

    def extra(k: int, limit: int) -> bool:
        j = next(warm_ids)
        if j >= limit or warm is None:
            return False
        warm(k, j)
        with lock:
            warmed[0] += 1
        return True

    def worker(k: int) -> None:
        try:
            while time.perf_counter_ns() < deadline[0] and extra(k, count):
                pass
            ready.wait()  # every warm-up done: the last thread in stamps t0
            while True:
                i = next(todo)
                if i < count:
                    body(k, i)
                elif stamps[1] or not extra(k, 2 * count):
                    break  # the window is closed (or nothing to keep the store busy with)
                done()
        except BaseException as exc:  # reported below, never lost
            errors.append(exc)
            ready.abort()  # the others must not wait for this thread

    deadline[0] = time.perf_counter_ns() + int(warm_s * 1e9)
    if threads == 1:
        worker(0)
    else:
        ts = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    t_end = time.perf_counter_ns()
    real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
    if real or errors:
        raise (real or errors)[0]
    return stamps[0], stamps[1] or t_end, warmed[0]


def sqlite_wal(path: str, synchronous: str) -> Any:
    """A SQLite connection as the durable peers use it: autocommit (one
    statement, one commit), WAL, ``synchronous`` (``"FULL"``: an fsync per
    commit), a 60 s busy timeout, usable from any thread."""
    import sqlite3

    db = sqlite3.connect(path, isolation_level=None, timeout=60.0, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={synchronous}")
    return db


def presize_wal(db: Any) -> None:
    """Bring a fresh SQLite WAL database (``db``, a ``sqlite3`` connection in
    autocommit mode) to its size in service: one transaction of more pages
    than the auto-checkpoint limit grows the WAL past it, and the next commit
    checkpoints, so later commits overwrite the WAL in place.  Leaves no rows
    behind."""
    (pages,) = db.execute("PRAGMA wal_autocheckpoint").fetchone()
    (page,) = db.execute("PRAGMA page_size").fetchone()
    db.execute("CREATE TABLE presize_wal (b BLOB)")
    db.execute("BEGIN")
    db.executemany(
        "INSERT INTO presize_wal VALUES (zeroblob(?))", [(page // 2,)] * (2 * max(pages, 1) + 64)
    )
    db.execute("COMMIT")
    db.execute("DROP TABLE presize_wal")  # this commit finds the WAL over the limit
    db.execute("PRAGMA wal_checkpoint(PASSIVE)")
