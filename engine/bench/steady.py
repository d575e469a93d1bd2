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
* **Unfair waits.**  Threads that each own a fixed share of the messages end
  the window when the unluckiest of them ends: SQLite's busy handler backs a
  writer off by sleeping (1, 2, 5, ... 100 ms), so one starved connection can
  finish its share alone, long after the others.  That tail is a large part
  of a short window and a small part of a long one, so the rate would depend
  on the volume.  Here the threads take the next message from a shared
  counter, as a pool of workers takes jobs from a queue: the window ends when
  the last message is done, and a thread's bad luck costs one operation.
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
    passed or ``count`` warm-ups have run, and all of them have finished
    (``warm`` must not touch what ``body`` delivers).  Returns
    ``(t0_ns, t1_ns, warmed)``: the clock stamps around the timed part and
    the number of warm-up operations run.  The first error of any thread is
    raised after all of them ended."""
    errors: List[BaseException] = []
    warm_ids = itertools.count()  # next() on it is atomic under the GIL
    warmed = [0]
    todo = itertools.count()
    lock = threading.Lock()
    stamps = [0]
    deadline = [0]
    ready = threading.Barrier(threads, action=lambda: stamps.__setitem__(0, time.perf_counter_ns()))

    def worker(k: int) -> None:
        try:
            if warm is not None:
                while time.perf_counter_ns() < deadline[0]:
                    j = next(warm_ids)
                    if j >= count:
                        break
                    warm(k, j)
                    with lock:
                        warmed[0] += 1
            ready.wait()  # every warm-up done: the last thread in stamps t0
            while True:
                i = next(todo)
                if i >= count:
                    break
                body(k, i)
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
    t1 = time.perf_counter_ns()
    real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
    if real or errors:
        raise (real or errors)[0]
    return stamps[0], t1, warmed[0]
