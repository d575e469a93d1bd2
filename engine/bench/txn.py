"""The two-phase-commit section: committed transactions per second, 2 participants.

Each workload message is one transaction: a :class:`engine.Coordinator`
commits it atomically to two :class:`engine.Log` participants
(:class:`engine.txn.LogParticipant`), the message going to log A and its
8-byte sequence number to log B.  After the clock stops, log A is read back
and digested (count + checksum; a transaction lost or applied twice fails the
case) and log B's record count is checked.

Peers, on the same messages:

* SQLite (stdlib ``sqlite3``, WAL): one ``BEGIN; INSERT INTO a; INSERT INTO
  b; COMMIT`` per transaction, ``synchronous=OFF`` for the non-durable case
  (page cache, as ours) and ``synchronous=FULL`` for the durable ones (one
  connection: SQLite has one writer; with several threads they share it
  under a lock, as a user would);
* (pytest-benchmark only, ``bench/test_bench_txn.py``) the same two
  ``Log.append`` calls with no transaction: what atomicity costs.

Cases (quick / --full): durability "none", one thread (5,000 / 100,000
transactions; target >= 50,000 txn/s); durability "always", 32 threads
sharing the coordinator (1,000 / 10,000; targets >= 2,000 txn/s and >= 3x
SQLite: with two LogParticipants a transaction commits by one record in the
coordinator's journal that carries both batches, the default, and concurrent
commits queue behind one leader that writes all of theirs with one sync; the
logs themselves are synced once per ``end_batch`` transactions).  ``--full`` adds the same durable case
at 1 and 8 threads (a thread sweep: ``--plot`` draws throughput against
threads).  ``bench/sync_counts.py --only txn`` counts the syncs per transaction of both.

Every contender runs in steady state (:func:`engine.bench.steady.run_steady`):
a quarter second of warm-up transactions (of :data:`WARM_MSG`, left out when
reading back) on the logs or database it then times, threads that take the
next transaction from a shared counter and stay busy until the window
closes, and a SQLite file whose WAL starts at full size.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from typing import Callable, List, Literal

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

SECTION = "txn"
SQLITE_FULL = "sqlite3 2 tables, synchronous=FULL"

OURS = ("engine._log", "engine.txn")
THREADS = 32
SWEEP = (1, 8, THREADS)  # threads of the durable cases (--full); the plot's x axis
SWEEP_GROUP = "durable 2PC, 2 participants"


def _durable_name(threads: int) -> str:
    return f"2 participants, durability always, {threads} thread{'s' if threads > 1 else ''}"


# the cases the quick profile runs (fewer cases, never shorter windows); --full runs all
QUICK = (_durable_name(THREADS),)


# what warm-up transactions commit (engine.bench.steady): never a workload message, whose
# first 8 bytes are its sequence number
WARM_MSG = b"\xff" * 64


def _read_back(path: str) -> List[bytes]:
    """Log ``path``'s records, warm-up transactions left out."""
    from engine._log import LogReader

    with LogReader(path, start=0) as r:
        return [v for v in (bytes(rec.value) for rec in r) if v != WARM_MSG]


Durability = Literal["always", "interval", "none"]


def _ours(durability: Durability, threads: int = 1) -> Callable[[Workload], Run]:
    def run(wl: Workload) -> Run:
        from engine._log import Log
        from engine.txn import Coordinator, LogParticipant

        payloads = wl.payloads()
        tmp = tempfile.mkdtemp(prefix="qe-bench-txn-")
        coord = Coordinator(f"{tmp}/coord", durability=durability)
        la = Log(f"{tmp}/a", durability=durability)
        lb = Log(f"{tmp}/b", durability=durability)
        pa, pb = LogParticipant(la), LogParticipant(lb)
        try:

            def one(msg: bytes) -> None:
                with coord.transaction() as tx:
                    tx.enlist(pa, (msg,))
                    tx.enlist(pb, (msg[:8],))

            t0, t1, warmed = run_steady(
                threads, wl.count, lambda _k, i: one(payloads[i]), lambda _k, j: one(WARM_MSG)
            )
            if lb.next_offset != warmed + wl.count:
                raise AssertionError(
                    f"log B holds {lb.next_offset} records, not {warmed} + {wl.count}"
                )
            got = _read_back(f"{tmp}/a")
        finally:
            for x in (pa, pb, coord, la, lb):
                x.close()
            shutil.rmtree(tmp, ignore_errors=True)
        return Run.timed(t0, t1, digest(got))

    return run


def _plain_logs(durability: Durability, threads: int = 1) -> Callable[[Workload], Run]:
    def run(wl: Workload) -> Run:
        from engine._log import Log

        payloads = wl.payloads()
        tmp = tempfile.mkdtemp(prefix="qe-bench-txn-")
        la = Log(f"{tmp}/a", durability=durability)
        lb = Log(f"{tmp}/b", durability=durability)
        try:

            def one(msg: bytes) -> None:
                la.append(msg)
                lb.append(msg[:8])

            t0, t1, _ = run_steady(
                threads, wl.count, lambda _k, i: one(payloads[i]), lambda _k, j: one(WARM_MSG)
            )
            got = _read_back(f"{tmp}/a")
        finally:
            la.close()
            lb.close()
            shutil.rmtree(tmp, ignore_errors=True)
        return Run.timed(t0, t1, digest(got))

    return run


def _sqlite(synchronous: str, threads: int = 1) -> Callable[[Workload], Run]:
    def run(wl: Workload) -> Run:
        payloads = wl.payloads()
        tmp = tempfile.mkdtemp(prefix="qe-bench-txn-")
        db = sqlite_wal(os.path.join(tmp, "db.sqlite"), synchronous)
        try:
            presize_wal(db)
            db.execute("CREATE TABLE a (id INTEGER PRIMARY KEY, v BLOB)")
            db.execute("CREATE TABLE b (id INTEGER PRIMARY KEY, v BLOB)")
            ex = db.execute
            lock = threading.Lock()  # SQLite has one writer: the threads share it

            def one(msg: bytes) -> None:
                with lock:
                    ex("BEGIN")
                    ex("INSERT INTO a (v) VALUES (?)", (msg,))
                    ex("INSERT INTO b (v) VALUES (?)", (msg[:8],))
                    ex("COMMIT")

            t0, t1, warmed = run_steady(
                threads, wl.count, lambda _k, i: one(payloads[i]), lambda _k, j: one(WARM_MSG)
            )
            got = [r[0] for r in db.execute("SELECT v FROM a WHERE v != ? ORDER BY id", (WARM_MSG,))]
            (nb,) = db.execute("SELECT count(*) FROM b").fetchone()
            if nb != warmed + wl.count:
                raise AssertionError(f"table b holds {nb} rows, not {warmed} + {wl.count}")
        finally:
            db.close()
            shutil.rmtree(tmp, ignore_errors=True)
        return Run.timed(t0, t1, digest(got))

    return run


def cases(profile: Profile) -> List[Case]:
    """The 2PC cases: durability none (1 thread) and always (1, 8, 32 threads)."""
    return [
        Case(
            name="2 participants, durability none",
            description="one txn = prepare + commit on 2 Log participants (page cache), vs a "
            "SQLite txn inserting into 2 tables (synchronous=OFF)",
            kind=THROUGHPUT,
            workload=Workload(profile.count(quick=5_000, full=100_000), 64),
            contenders=[
                Contender("engine.Coordinator none", _ours("none"), ours=True, requires=OURS),
                Contender("sqlite3 2 tables, synchronous=OFF", _sqlite("OFF")),
            ],
            targets=[Target("min_msg_per_s", 50_000, label=">= 50,000 txn/s")],
        ),
    ] + [_durable_case(profile, t) for t in SWEEP]


def _durable_case(profile: Profile, threads: int) -> Case:
    """Durability "always" from ``threads`` threads sharing one coordinator."""
    # the goals: >= 3x SQLite at 32 threads, no worse than it alone
    targets = []
    if threads == THREADS:
        targets = [Target("min_msg_per_s", 2_000, label=">= 2,000 durable txn/s"),
                   Target("ratio", 3, SQLITE_FULL)]
    elif threads == 1:
        targets = [Target("ratio", 1, SQLITE_FULL)]
    return Case(
        name=_durable_name(threads),
        description=f"{threads} thread(s) share one coordinator; a txn commits by one "
        "journal record carrying both batches, and concurrent commits queue behind one "
        "leader that syncs all of theirs at once (group commit); vs SQLite "
        "synchronous=FULL (one writer)",
        kind=THROUGHPUT,
        workload=Workload(profile.count(quick=1_000, full=10_000) if threads > 1
                          else profile.count(quick=300, full=3_000), 64),
        ordered=threads == 1,  # threads interleave; count and checksum still cover every txn
        contenders=[
            Contender(
                f"engine.Coordinator always x{threads}",
                _ours("always", threads),
                ours=True,
                requires=OURS,
            ),
            Contender(SQLITE_FULL, _sqlite("FULL", threads)),
        ],
        params={"threads": threads, "group": SWEEP_GROUP},
        targets=targets,
    )

