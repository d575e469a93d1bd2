"""Log hot paths, measured alone: the verify scan's GB/s and a loop of appends
for counting instructions per append.

    python bench/log_scan.py verify [DIR] [REPS]
        builds a ~1 GB log of 64 B records in DIR once (default
        /tmp/log_scan_1g), reads it once into the page cache, then times
        engine._log.verify REPS times (default 5): median and best GB/s.

    python bench/log_scan.py verify-batch [DIR] [REPS]
        the same for a log written by append_many (batch frames, default
        /tmp/log_scan_1g_batch), the same number of records; also records/s.

    PYTHONHASHSEED=0 valgrind --tool=callgrind python bench/log_scan.py append N
        N appends of 64 B (durability "none") after 1000 warm-up ones.
        Instructions per append = (Ir with N - Ir with 0) / N.

Both leave the throughput comparison with peers to `queue-engine bench --only log`.
"""

import os
import shutil
import statistics
import sys
import time

import engine
from engine import _log


def verify(path, reps, batch=False):
    if not os.path.exists(path):
        with engine.Log(path, durability="none") as log:
            v = b"x" * 64
            if batch:
                vals = [v] * 1000
                for _ in range((1 << 30) // 96 // 1000):
                    log.append_many(vals)
            else:
                for _ in range((1 << 30) // 96):
                    log.append(v)
    total = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".seg"))
    _log.verify(path)  # page cache
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        res = _log.verify(path)
        times.append(time.perf_counter() - t)
        assert all(r.error is None for r in res), res
    records = sum(r.records for r in res)
    print(f"verify {total / 1e9:.2f} GB, {records} records: median {total / statistics.median(times) / 1e9:.2f} GB/s "
          f"({records / statistics.median(times) / 1e6:.1f} M records/s), "
          f"best {total / min(times) / 1e9:.2f} GB/s ({reps} runs)")


def append_loop(n, path="/tmp/log_scan_append"):
    shutil.rmtree(path, ignore_errors=True)
    log = engine.Log(path, durability="none")
    v = b"x" * 64
    a = log.append
    for _ in range(1000):
        a(v)
    for _ in range(n):
        a(v)
    log.close()
    shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "verify"
    if what == "verify":
        verify(sys.argv[2] if len(sys.argv) > 2 else "/tmp/log_scan_1g", int(sys.argv[3]) if len(sys.argv) > 3 else 5)
    elif what == "verify-batch":
        verify(sys.argv[2] if len(sys.argv) > 2 else "/tmp/log_scan_1g_batch",
               int(sys.argv[3]) if len(sys.argv) > 3 else 5, batch=True)
    elif what == "append":
        append_loop(int(sys.argv[2]))
    else:
        sys.exit(__doc__)
