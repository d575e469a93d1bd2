"""The saga section: what durability costs a 3-step saga.

Each workload message is one saga of three steps (reserve, charge, deliver);
the third step delivers the saga's payload (the harness's 64-byte message) to
a list that is digested after the clock stops, so a saga that ran twice, or
not at all, fails the case.

The peer is what a user would write instead: a SQLite table of saga steps
(WAL), one row per saga inserted when it starts and updated after each step,
each statement its own commit: 4 commits per saga, like our 4 syncs. Durability
"always" runs it at ``synchronous=FULL`` (an fsync per commit), durability
"none" at ``synchronous=OFF`` (the page cache: survives a process crash, as
ours does). The same three functions called one after another with no record
at all are shown as a floor (a reference row, never ranked): no user would
run a saga that way.

Cases (quick / --full): durability "none" (2,000 / 50,000 sagas: the page
cache, survives a process crash), durability "always" (40 / 1,000 sagas:
a sync (pwrite + fdatasync on Linux) before each step, n + 1 = 4 syncs per saga),
and "always" from 8 threads sharing one Saga (160 / 4,000 sagas: the log
group-commits concurrent sagas' syncs, about 0.5 syncs per saga instead of 4;
target >= 3x the SQLite peer).  ``bench/sync_counts.py --only saga`` counts the syncs per saga
of both.

Every ranked contender runs in steady state (:func:`engine.bench.steady.run_steady`):
a quarter second of warm-up sagas (negative indices, delivering nothing) on
the Saga or table it then times, and threads that take the next saga from a
shared counter, all of them busy until the window closes; the SQLite file
starts with its WAL at full size (:func:`engine.bench.steady.presize_wal`).
A fresh WAL grows through its first checkpoint, and SQLite's busy handler
leaves some connections sleeping while one writes: both would make a short
window slower than a long one.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from typing import Any, Callable, List, Literal, Tuple

from engine.bench.harness import (
    THROUGHPUT,
    Case,
    Contender,
    Profile,
    Run,
    Target,
    Workload,
    digest,
)
from engine.bench.steady import presize_wal, run_steady, sqlite_wal

SECTION = "saga"
OURS = ("engine._log", "engine.saga")
THREADS = 8
# the cases the quick profile runs (fewer cases, never shorter windows); --full runs all
QUICK = ("3 steps, durability always", f"3 steps, durability always, {THREADS} threads")
STEPS = ("reserve", "charge", "deliver")
SQLITE_FULL_THREADS = f"sqlite3 saga table, synchronous=FULL x{THREADS}"
FLOOR = "plain calls (no record; floor, not a saga)"


def _steps(payloads: List[bytes], out: List[bytes]) -> Tuple[Callable[..., Any], ...]:
    """The three steps; each takes the saga's index. Warm-up sagas (see
    :mod:`engine.bench.steady`) have negative indices and deliver nothing."""
    stock = [0]
    paid = [0]

    def reserve(i: int) -> int:
        stock[0] += 1
        return i

    def charge(i: int) -> int:
        paid[0] += 1
        return i

    def deliver(i: int) -> int:
        if i >= 0:
            out.append(payloads[i])
        return i

    return reserve, charge, deliver


def _plain(wl: Workload) -> Run:
    payloads = wl.payloads()
    out: List[bytes] = []
    reserve, charge, deliver = _steps(payloads, out)
    t0 = time.perf_counter_ns()
    for i in range(wl.count):
        reserve(i)
        charge(i)
        deliver(i)
    t1 = time.perf_counter_ns()
    return Run.timed(t0, t1, digest(out))


def _sqlite(synchronous: str, threads: int = 1) -> Callable[[Workload], Run]:
    """The saga-steps table in SQLite (WAL, ``synchronous``): insert the saga's
    row, then after each step update it, every statement committed."""

    def run(wl: Workload) -> Run:

        payloads = wl.payloads()
        out: List[bytes] = []
        steps = tuple(zip(STEPS, _steps(payloads, out)))
        tmp = tempfile.mkdtemp(prefix="qe-bench-saga-sqlite-")
        path = f"{tmp}/sagas.db"

        def one(db: Any, i: int) -> None:
            db.execute("INSERT INTO saga_steps VALUES (?, 'started', 'running')", (i,))
            for name, fn in steps:
                fn(i)
                db.execute(
                    "UPDATE saga_steps SET step = ?, state = ? WHERE saga = ?",
                    (name, "done" if name == STEPS[-1] else "running", i),
                )

        dbs = [sqlite_wal(path, synchronous) for _ in range(threads)]
        try:
            presize_wal(dbs[0])
            dbs[0].execute(
                "CREATE TABLE saga_steps (saga INTEGER PRIMARY KEY, step TEXT NOT NULL, "
                "state TEXT NOT NULL)"
            )
            t0, t1, _ = run_steady(
                threads, wl.count, lambda k, i: one(dbs[k], i), lambda k, j: one(dbs[k], -1 - j)
            )
            (done,) = dbs[0].execute(
                "SELECT count(*) FROM saga_steps WHERE state = 'done' AND saga >= 0"
            ).fetchone()
            if done != wl.count:
                raise RuntimeError(f"{done} sagas done in the table, {wl.count} run")
        finally:
            for db in dbs:
                db.close()
            shutil.rmtree(tmp, ignore_errors=True)
        return Run.timed(t0, t1, digest(out))

    return run


def _saga(
    durability: Literal["always", "interval", "none"], threads: int = 1
) -> Callable[[Workload], Run]:
    def run(wl: Workload) -> Run:
        from engine.saga import Saga

        payloads = wl.payloads()
        out: List[bytes] = []
        reserve, charge, deliver = _steps(payloads, out)
        tmp = tempfile.mkdtemp(prefix="qe-bench-saga-")
        saga = Saga(f"{tmp}/saga", durability=durability)
        try:
            saga.step("reserve", lambda sc: reserve(sc.ctx), lambda sc: None)
            saga.step("charge", lambda sc: charge(sc.ctx), lambda sc: None)
            saga.step("deliver", lambda sc: deliver(sc.ctx), lambda sc: None)
            t0, t1, _ = run_steady(
                threads, wl.count, lambda _k, i: saga.run(i), lambda _k, j: saga.run(-1 - j)
            )
        finally:
            saga.close()
            shutil.rmtree(tmp, ignore_errors=True)
        return Run.timed(t0, t1, digest(out))

    return run


def cases(profile: Profile) -> List[Case]:
    """The saga cases: durability none, always, and always from 8 threads."""
    floor = Contender(FLOOR, _plain, rank=False)
    return [
        Case(
            name="3 steps, durability none",
            description="one saga = 3 logged steps (page cache), vs a SQLite saga-steps table "
            "at synchronous=OFF (WAL)",
            kind=THROUGHPUT,
            workload=Workload(profile.count(quick=2_000, full=50_000), 64),
            contenders=[
                Contender("engine.Saga none", _saga("none"), ours=True, requires=OURS),
                Contender("sqlite3 saga table, synchronous=OFF", _sqlite("OFF")),
                floor,
            ],
        ),
        Case(
            name="3 steps, durability always",
            description="one saga = 3 logged steps, 4 syncs (fdatasync) per saga, vs a SQLite "
            "saga-steps table at synchronous=FULL (WAL), 4 commits per saga",
            kind=THROUGHPUT,
            workload=Workload(profile.count(quick=40, full=1_000), 64),
            contenders=[
                Contender("engine.Saga always", _saga("always"), ours=True, requires=OURS),
                Contender("sqlite3 saga table, synchronous=FULL", _sqlite("FULL")),
                floor,
            ],
        ),
        Case(
            name=f"3 steps, durability always, {THREADS} threads",
            description=f"{THREADS} threads share one Saga: the log group-commits their syncs; "
            f"vs {THREADS} threads on one SQLite saga-steps table at synchronous=FULL",
            kind=THROUGHPUT,
            workload=Workload(profile.count(quick=160, full=4_000), 64),
            ordered=False,  # threads interleave; count and checksum still cover every saga
            contenders=[
                Contender(
                    f"engine.Saga always x{THREADS}",
                    _saga("always", THREADS),
                    ours=True,
                    requires=OURS,
                ),
                Contender(SQLITE_FULL_THREADS, _sqlite("FULL", THREADS)),
                floor,
            ],
            targets=[Target("ratio", 3, SQLITE_FULL_THREADS)],
        ),
    ]
