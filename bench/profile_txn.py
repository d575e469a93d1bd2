"""CPU cost of one non-durable 2PC transaction (2 LogParticipants), for profiling.

    python bench/profile_txn.py 100000            # user + system CPU us per txn
    valgrind --tool=callgrind --callgrind-out-file=cg.20k python bench/profile_txn.py 20000
    valgrind --tool=callgrind --callgrind-out-file=cg.40k python bench/profile_txn.py 40000
    # instructions per txn = (total of cg.40k - total of cg.20k) / 20000: the
    # difference cancels start-up and setup, which callgrind counts too

The same transaction as the ``txn`` bench section (``queue-engine bench --only
txn``); after the clock both logs are read back: a transaction lost or applied
twice fails the run.  CPU time, not wall time, because this machine is shared;
instruction counts are what to compare between builds (CPU time moves 2x here).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time

from engine import Log, LogReader
from engine.txn import Coordinator, LogParticipant

WARMUP = 2000


def main(n: int) -> None:
    tmp = tempfile.mkdtemp(prefix="qe-profile-txn-")
    try:
        coord = Coordinator(f"{tmp}/coord", durability="none")
        la, lb = Log(f"{tmp}/a", durability="none"), Log(f"{tmp}/b", durability="none")
        pa, pb = LogParticipant(la), LogParticipant(lb)
        msgs = [i.to_bytes(8, "little") + b"x" * 56 for i in range(WARMUP + n)]

        def run(lo: int, hi: int) -> None:
            for i in range(lo, hi):
                msg = msgs[i]
                with coord.transaction() as tx:
                    tx.enlist(pa, (msg,))
                    tx.enlist(pb, (msg[:8],))

        run(0, WARMUP)
        t0, w0 = os.times(), time.perf_counter()
        run(WARMUP, WARMUP + n)
        t1, w1 = os.times(), time.perf_counter()
        for x in (pa, pb, coord):
            x.close()
        with LogReader(f"{tmp}/a", start=0) as r:
            got = [bytes(rec.value) for rec in r]
        if got != msgs or lb.next_offset != len(msgs):
            raise SystemExit(f"delivery check failed: {len(got)} / {lb.next_offset} of {len(msgs)}")
        la.close()
        lb.close()
        user, system = (t1.user - t0.user) / n * 1e6, (t1.system - t0.system) / n * 1e6
        wall = (w1 - w0) / n * 1e6
        print(
            f"{n} txns: {user + system:.2f} us CPU per txn (user {user:.2f}, system {system:.2f}), "
            f"{wall:.2f} us wall ({1e6 / wall:,.0f} txn/s)"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000)
