"""Syncs per transaction and transactions per second of durable 2PC, ours and SQLite's.

    python bench/txn_syncs.py                    # 1, 8, 32 threads, 2,000 txns, 3 rounds
    python bench/txn_syncs.py --threads 1 32 --count 5000 --repeat 5

The workload is the ``txn`` bench section's durable case (``queue-engine bench
--only txn``): one transaction = one 64-byte message to log A and its first 8
bytes to log B, two :class:`engine.txn.LogParticipant` and a
:class:`engine.Coordinator`, ``durability="always"``.  The peer is SQLite in
WAL mode with ``synchronous=FULL``, one writer connection that the threads
share under a lock (SQLite has one writer), one ``BEGIN; INSERT; INSERT;
COMMIT`` per transaction.

Every run is a child process with ``tests/faultinject/shim.c`` preloaded, which
counts the fdatasync, fsync and msync calls on files under the run's directory
(counted from the first transaction to the last, not open or close).  The
shim makes every call it numbers dearer (it looks up the fd's path), and
SQLite makes more such calls per transaction (its WAL writes) than we do with
several threads, so the txn/s here lean our way; ``queue-engine bench --only
txn --full`` measures throughput without the shim.  Ours and
SQLite's run in turn at each thread count, ``--repeat`` rounds of both, so both
see the same disk at about the same moments; the table shows each one's median
round and the median (and range) of the rounds' ratios.  This machine is
shared, so compare ratios, not figures across runs.  After the clock stops every run reads its data back and checks the count
and the checksum: a transaction lost or applied twice fails the run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import faultkit  # noqa: E402

COMMON = r"""
import hashlib, threading, time
N, THREADS, D = {count}, {threads}, {d!r}
msgs = [i.to_bytes(8, "little") + bytes([i % 251]) * 56 for i in range(N)]

def in_threads(one):
    go = threading.Barrier(THREADS + 1)
    errs = []
    def worker(k):
        go.wait()
        try:
            for i in range(k, N, THREADS):
                one(i)
        except BaseException as exc:
            errs.append(exc)
    ts = [threading.Thread(target=worker, args=(k,)) for k in range(THREADS)]
    for t in ts:
        t.start()
    arm()
    go.wait()
    t0 = time.perf_counter()
    for t in ts:
        t.join()
    t1 = time.perf_counter()
    disarm()
    if errs:
        raise errs[0]
    return t1 - t0

def check(got_a, n_b):
    if sorted(got_a) != sorted(msgs) or n_b != N:
        raise SystemExit(f"delivery check failed: {{len(got_a)}} / {{n_b}} of {{N}}")
"""

OURS = COMMON + r"""
from engine import Log, LogReader
from engine.txn import Coordinator, LogParticipant
coord = Coordinator(D + "/coord", durability="always")
la, lb = Log(D + "/a", durability="always"), Log(D + "/b", durability="always")
pa, pb = LogParticipant(la), LogParticipant(lb)

def one(i):
    msg = msgs[i]
    with coord.transaction() as tx:
        tx.enlist(pa, (msg,))
        tx.enlist(pb, (msg[:8],))

wall = in_threads(one)
for x in (pa, pb, coord):
    x.close()
with LogReader(D + "/a", start=0) as r:
    got = [bytes(rec.value) for rec in r]
check(got, lb.next_offset)
la.close(); lb.close()
report({{"wall": wall}})
"""

SQLITE = COMMON + r"""
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

wall = in_threads(one)
got = [row[0] for row in db.execute("SELECT v FROM a")]
(nb,) = db.execute("SELECT count(*) FROM b").fetchone()
check(got, nb)
db.close()
report({{"wall": wall}})
"""


def measure(source: str, threads: int, count: int) -> tuple:
    """(syncs per txn, txn/s) of one child run."""
    with tempfile.TemporaryDirectory(prefix="qe-txn-syncs-") as base:
        d = os.path.join(base, "run")
        res = faultkit.run(source.format(count=count, threads=threads, d=d), prefix=base,
                           timeout=600)
        if res.rc != 0 or not isinstance(res.report, dict):
            raise SystemExit(f"run failed (rc {res.rc}): {res.stderr[-3000:]}")
        syncs = sum(res.counts.get(f, 0) for f in faultkit.SYNC_FUNCS)
        return syncs / count, count / res.report["wall"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--count", type=int, default=2000, help="transactions per run")
    ap.add_argument("--repeat", type=int, default=3, help="rounds of both (medians shown)")
    args = ap.parse_args()
    print("| threads | ours syncs/txn | SQLite syncs/txn | ours txn/s | SQLite txn/s "
          "| ours / SQLite (per round: median, range) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for t in args.threads:
        ours, sq = [], []
        for _ in range(max(1, args.repeat)):
            ours.append(measure(OURS, t, args.count))
            sq.append(measure(SQLITE, t, args.count))
        ours_s, ours_r = sorted(ours, key=lambda r: r[1])[len(ours) // 2]
        sq_s, sq_r = sorted(sq, key=lambda r: r[1])[len(sq) // 2]
        # the ratio of each round (ours and SQLite's back to back), median and range:
        # steadier than a ratio of medians on a disk whose speed drifts
        ratios = sorted(o[1] / q[1] for o, q in zip(ours, sq))
        print(f"| {t} | {ours_s:.2f} | {sq_s:.2f} | {ours_r:,.0f} | {sq_r:,.0f} | "
              f"{ratios[len(ratios) // 2]:.2f}x ({ratios[0]:.2f}-{ratios[-1]:.2f}) |", flush=True)


if __name__ == "__main__":
    main()
