"""Syncs per operation and operations per second of the durable paths, ours and SQLite's.

    python bench/sync_counts.py                       # every workload, its default threads
    python bench/sync_counts.py --only txn --threads 1 32 --count 5000 --repeat 5
    python bench/sync_counts.py --only saga --threads 8 --count 800 --repeat 5

``txn`` (the ``txn`` bench section's durable case): one operation = one
64-byte message to log A and its first 8 bytes to log B, two
:class:`engine.txn.LogParticipant` and a :class:`engine.Coordinator`,
``durability="always"``.  The peer is SQLite (WAL, ``synchronous=FULL``), one
writer connection that the threads share under a lock (SQLite has one
writer), one ``BEGIN; INSERT; INSERT; COMMIT`` per transaction.  Default
threads 1, 8, 32.

``saga``: one operation = one saga of three steps (reserve, charge, deliver)
on one :class:`engine.saga.Saga` with ``durability="always"`` shared by the
threads; the peer is the ``saga`` bench section's: a SQLite saga-steps table
(WAL, ``synchronous=FULL``), one row inserted per saga and updated after each
step, every statement its own commit, one connection per thread.  Default
threads 1, 8.

``put``: one operation = one compare-and-set ``put(key, value,
expected_version=1)`` of a distinct key on one :class:`engine.VersionedStore`
with ``durability="always"``; the peer is SQLite (WAL, ``synchronous=FULL``)
doing ``UPDATE kv SET value=?, version=version+1 WHERE key=? AND version=?``
in autocommit, one connection per thread.  Default threads 1, 8.

Every run is a child process with ``tests/faultinject/shim.c`` preloaded,
which counts the fdatasync, fsync and msync calls on files under the run's
directory between the first operation and the last (not open or close).  The
shim makes every call it numbers dearer (it looks up the fd's path), and
SQLite makes more such calls per operation than we do with several threads,
so the op/s here lean our way; ``queue-engine bench --only txn,saga,versions
--full`` measures throughput without the shim.  The CPU columns are the
process's user + system time over the timed window per operation (the
median-throughput round's), shim included: on a machine this small (2 cores)
the CPU a durable operation costs (thread wake-ups and syncs, mostly in the
kernel) bounds throughput as much as the syncs do.  Ours and SQLite's run in
turn, ``--repeat`` rounds of both, so both see the same disk at about the
same moments; the table shows each one's median round and the median (and
range) of the rounds' ratios, steadier than a ratio of medians on a disk
whose speed drifts.  After the clock stops every run reads its result back
and checks it: a transaction lost or applied twice, a saga not delivered
once, a key not at version 2 with its value fails the run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import faultkit  # noqa: E402

COMMON = r"""
import os, threading, time
N, THREADS, D = {count}, {threads}, {d!r}
msgs = [i.to_bytes(8, "little") + bytes([i % 251]) * 56 for i in range(N)]
keys = [b"key:%010d" % i for i in range(N)]

CPU = [0.0]  # user + system seconds of the process over the last in_threads window

def in_threads(setup, one):
    go = threading.Barrier(THREADS + 1)
    errs = []
    def worker(k):
        ctx = setup(k)
        go.wait()
        try:
            for i in range(k, N, THREADS):
                one(ctx, i)
        except BaseException as exc:
            errs.append(exc)
    ts = [threading.Thread(target=worker, args=(k,)) for k in range(THREADS)]
    for t in ts:
        t.start()
    arm()
    go.wait()
    t0, c0 = time.perf_counter(), os.times()
    for t in ts:
        t.join()
    t1, c1 = time.perf_counter(), os.times()
    disarm()
    CPU[0] = c1.user - c0.user + c1.system - c0.system
    if errs:
        raise errs[0]
    return t1 - t0

def check(got_a, n_b):
    if sorted(got_a) != sorted(msgs) or n_b != N:
        raise SystemExit(f"delivery check failed: {{len(got_a)}} / {{n_b}} of {{N}}")

def sqlite_conn(path):
    import sqlite3
    db = sqlite3.connect(path, isolation_level=None, timeout=60.0, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    return db
"""

TXN_OURS = COMMON + r"""
from engine import Log, LogReader
from engine.txn import Coordinator, LogParticipant
coord = Coordinator(D + "/coord", durability="always", redo=True)
la, lb = Log(D + "/a", durability="always"), Log(D + "/b", durability="always")
pa, pb = LogParticipant(la), LogParticipant(lb)

def one(i):
    msg = msgs[i]
    with coord.transaction() as tx:
        tx.enlist(pa, (msg,))
        tx.enlist(pb, (msg[:8],))

wall = in_threads(lambda k: None, lambda _c, i: one(i))
for x in (pa, pb, coord):
    x.close()
with LogReader(D + "/a", start=0) as r:
    got = [bytes(rec.value) for rec in r]
check(got, lb.next_offset)
la.close(); lb.close()
report({{"wall": wall, "cpu": CPU[0]}})
"""

TXN_SQLITE = COMMON + r"""
import os, sqlite3
os.makedirs(D)
db = sqlite3.connect(D + "/db.sqlite", isolation_level=None, check_same_thread=False)
db.execute("PRAGMA journal_mode=WAL")
db.execute("PRAGMA synchronous=FULL")
db.execute("CREATE TABLE a (id INTEGER PRIMARY KEY, v BLOB)")
db.execute("CREATE TABLE b (id INTEGER PRIMARY KEY, v BLOB)")
lock = threading.Lock()

def one(i):
    msg = msgs[i]
    with lock:
        db.execute("BEGIN")
        db.execute("INSERT INTO a (v) VALUES (?)", (msg,))
        db.execute("INSERT INTO b (v) VALUES (?)", (msg[:8],))
        db.execute("COMMIT")

wall = in_threads(lambda k: None, lambda _c, i: one(i))
got = [row[0] for row in db.execute("SELECT v FROM a")]
(nb,) = db.execute("SELECT count(*) FROM b").fetchone()
check(got, nb)
db.close()
report({{"wall": wall, "cpu": CPU[0]}})
"""

SAGA_OURS = COMMON + r"""
from engine.saga import Saga
out = []
saga = Saga(D + "/saga", durability="always")
saga.step("reserve", lambda sc: sc.ctx, lambda sc: None)
saga.step("charge", lambda sc: sc.ctx, lambda sc: None)
saga.step("deliver", lambda sc: out.append(msgs[sc.ctx]), lambda sc: None)
wall = in_threads(lambda k: None, lambda _c, i: saga.run(i))
saga.close()
if sorted(out) != sorted(msgs):
    raise SystemExit(f"delivery check failed: {{len(out)}} of {{N}}")
report({{"wall": wall, "cpu": CPU[0]}})
"""

SAGA_SQLITE = COMMON + r"""
os.makedirs(D)
out = []
first = sqlite_conn(D + "/sagas.db")
first.execute("CREATE TABLE saga_steps (saga INTEGER PRIMARY KEY, step TEXT NOT NULL, "
              "state TEXT NOT NULL)")
STEPS = ("reserve", "charge", "deliver")

def one(db, i):
    db.execute("INSERT INTO saga_steps VALUES (?, 'started', 'running')", (i,))
    for name in STEPS:
        if name == "deliver":
            out.append(msgs[i])
        db.execute("UPDATE saga_steps SET step = ?, state = ? WHERE saga = ?",
                   (name, "done" if name == "deliver" else "running", i))

wall = in_threads(lambda k: sqlite_conn(D + "/sagas.db"), one)
(done,) = first.execute("SELECT count(*) FROM saga_steps WHERE state = 'done'").fetchone()
if sorted(out) != sorted(msgs) or done != N:
    raise SystemExit(f"delivery check failed: {{len(out)}} / {{done}} of {{N}}")
report({{"wall": wall, "cpu": CPU[0]}})
"""

PUT_OURS = COMMON + r"""
from engine.versions import VersionedStore
st = VersionedStore(D + "/store", durability="always", snapshot_every=None)
st.apply([("put", k, b"") for k in keys])
wall = in_threads(lambda k: None, lambda _c, i: st.put(keys[i], msgs[i], 1))
got = [st.get(k) for k in keys]
st.close()
if got != [(2, m) for m in msgs]:
    raise SystemExit("put check failed")
report({{"wall": wall, "cpu": CPU[0]}})
"""

PUT_SQLITE = COMMON + r"""
os.makedirs(D)
first = sqlite_conn(D + "/kv.db")
first.execute("CREATE TABLE kv (key BLOB PRIMARY KEY, value BLOB NOT NULL, "
              "version INTEGER NOT NULL) WITHOUT ROWID")
first.execute("BEGIN")
first.executemany("INSERT INTO kv VALUES (?, x'', 1)", [(k,) for k in keys])
first.execute("COMMIT")
UPDATE = "UPDATE kv SET value=?, version=version+1 WHERE key=? AND version=?"

def one(db, i):
    if db.execute(UPDATE, (msgs[i], keys[i], 1)).rowcount != 1:
        raise AssertionError(f"CAS of {{keys[i]!r}} failed")

wall = in_threads(lambda k: sqlite_conn(D + "/kv.db"), one)
rows = dict((k, (v, val)) for k, val, v in first.execute("SELECT key, value, version FROM kv"))
if [rows[k] for k in keys] != [(2, m) for m in msgs]:
    raise SystemExit("put check failed")
report({{"wall": wall, "cpu": CPU[0]}})
"""

# name -> (ours, SQLite's, default thread counts)
WORKLOADS = {
    "txn": (TXN_OURS, TXN_SQLITE, [1, 8, 32]),
    "saga": (SAGA_OURS, SAGA_SQLITE, [1, 8]),
    "put": (PUT_OURS, PUT_SQLITE, [1, 8]),
}


def measure(source: str, threads: int, count: int) -> tuple:
    """(syncs per op, ops/s, CPU us per op) of one child run."""
    with tempfile.TemporaryDirectory(prefix="qe-sync-counts-") as base:
        d = os.path.join(base, "run")
        res = faultkit.run(source.format(count=count, threads=threads, d=d), prefix=base,
                           timeout=600)
        if res.rc != 0 or not isinstance(res.report, dict):
            raise SystemExit(f"run failed (rc {res.rc}): {res.stderr[-3000:]}")
        syncs = sum(res.counts.get(f, 0) for f in faultkit.SYNC_FUNCS)
        return syncs / count, count / res.report["wall"], res.report["cpu"] / count * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=sorted(WORKLOADS), nargs="+", default=list(WORKLOADS))
    ap.add_argument("--threads", type=int, nargs="+", default=None,
                    help="thread counts (default: each workload's own)")
    ap.add_argument("--count", type=int, default=1000, help="operations per run")
    ap.add_argument("--repeat", type=int, default=3, help="rounds of both (medians shown)")
    args = ap.parse_args()
    print("| op | threads | ours syncs/op | SQLite syncs/op | ours op/s | SQLite op/s "
          "| ours / SQLite (per round: median, range) | ours CPU us/op | SQLite CPU us/op |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.only:
        ours_src, sq_src, default_threads = WORKLOADS[name]
        for t in args.threads or default_threads:
            ours, sq = [], []
            for _ in range(max(1, args.repeat)):
                ours.append(measure(ours_src, t, args.count))
                sq.append(measure(sq_src, t, args.count))
            ours_s, ours_r, ours_c = sorted(ours, key=lambda r: r[1])[len(ours) // 2]
            sq_s, sq_r, sq_c = sorted(sq, key=lambda r: r[1])[len(sq) // 2]
            ratios = sorted(o[1] / q[1] for o, q in zip(ours, sq))
            print(f"| {name} | {t} | {ours_s:.2f} | {sq_s:.2f} | {ours_r:,.0f} | {sq_r:,.0f} | "
                  f"{ratios[len(ratios) // 2]:.2f}x ({ratios[0]:.2f}-{ratios[-1]:.2f}) | "
                  f"{ours_c:.0f} | {sq_c:.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
