"""Steady-state Log.append throughput: 64 B values, durability "none".

    python bench/log_append_steady.py [N] [RUNS] [SEGMENT_BYTES]

Each run opens a fresh log in a temporary directory, appends N records of
64 B (default 1M) and times the append loop alone (open and close are not
counted).  Prints each run's M/s, its segment rolls, and the minor page
faults and system time of the appending thread (first-touch faults and rolls
are kernel time), then the median and the minimum.  Fresh logs on purpose:
every run pays its segment rolls and first-touch page faults, as a steady
writer does.
"""

import resource
import shutil
import statistics
import sys
import tempfile
import time

import engine


def one(n, segment_bytes):
    d = tempfile.mkdtemp(prefix="log_append_steady_")
    try:
        log = engine.Log(d, durability="none", segment_bytes=segment_bytes)
        a = log.append
        v = b"x" * 64
        r0 = resource.getrusage(resource.RUSAGE_THREAD)
        t = time.perf_counter()
        for _ in range(n):
            a(v)
        dt = time.perf_counter() - t
        r1 = resource.getrusage(resource.RUSAGE_THREAD)
        rolls = log.stats()["rolls"]
        log.close()
        return n / dt / 1e6, rolls, r1.ru_minflt - r0.ru_minflt, r1.ru_stime - r0.ru_stime, dt
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 7
    seg = int(sys.argv[3]) if len(sys.argv) > 3 else 64 << 20
    rates = []
    for _ in range(runs):
        r, rolls, faults, sys_s, dt = one(n, seg)
        rates.append(r)
        print(f"  {r:6.2f} M/s  rolls {rolls}  minor faults {faults}  "
              f"system time {sys_s * 1e3:5.1f} ms of {dt * 1e3:5.1f} ms")
    print(f"append 64 B none, {n} records, segment {seg >> 20} MiB: "
          f"median {statistics.median(rates):.2f} M/s, min {min(rates):.2f} M/s ({runs} runs)")


if __name__ == "__main__":
    main()
