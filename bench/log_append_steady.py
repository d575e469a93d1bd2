"""Steady-state Log.append throughput: 64 B values, durability "none".

    python bench/log_append_steady.py [N] [RUNS] [SEGMENT_BYTES] [--distinct] [--pause=S] [--batch=B]

Each run opens a fresh log in a temporary directory, appends N records of
64 B (default 1M) and times the append loop alone (open and close are not
counted).  Prints each run's M/s, its segment rolls, the minor page faults
and the user and system CPU time of the appending thread per append
(first-touch faults and rolls are kernel time; on a loaded machine the wall
time also holds the time the thread waited for a CPU) and how often it slept
(voluntary context switches: waits in the kernel, for a page another thread
is faulting in, say), then the median and the minimum.  Fresh logs on
purpose: every run pays its segment rolls and first-touch page faults, as a
steady writer does.

``--distinct``: N distinct payloads from the bench harness's pool, as the
bench case "log: append 64 B vs queuelib" appends them (each call reads a
payload object not in any cache); otherwise one payload N times.

``--batch=B``: ``Log.append_many`` of B records a call instead of ``append``
(the batches sliced before the clock starts).

``--pause=S``: sleep S seconds before each run (the previous run's log is
deleted by then, its pages free).  Where the host takes back memory a guest
leaves free for a couple of seconds (``python bench/first_touch.py`` says
whether and what it costs), runs after a 3 s pause write into pages the host
must supply again, and runs without one into the pages the previous run
freed: the two show the log's rate on cold and on warm memory.
"""

import os
import resource
import shutil
import statistics
import sys
import tempfile
import time

import engine


def _loop(append, msgs):
    for m in msgs:
        append(m)


def one(msgs, segment_bytes, batch=0):
    d = tempfile.mkdtemp(prefix="log_append_steady_")
    try:
        log = engine.Log(os.path.join(d, "log"), durability="none", segment_bytes=segment_bytes)
        calls = [msgs[i : i + batch] for i in range(0, len(msgs), batch)] if batch else msgs
        r0 = resource.getrusage(resource.RUSAGE_THREAD)
        t = time.perf_counter()
        _loop(log.append_many if batch else log.append, calls)
        dt = time.perf_counter() - t
        r1 = resource.getrusage(resource.RUSAGE_THREAD)
        rolls = log.stats()["rolls"]
        log.close()
        return (
            len(msgs) / dt / 1e6,
            rolls,
            r1.ru_minflt - r0.ru_minflt,
            r1.ru_utime - r0.ru_utime,
            r1.ru_stime - r0.ru_stime,
            r1.ru_nvcsw - r0.ru_nvcsw,
        )
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    distinct = "--distinct" in sys.argv[1:]
    pause = next((float(a.split("=", 1)[1]) for a in sys.argv[1:] if a.startswith("--pause=")), 0.0)
    batch = next((int(a.split("=", 1)[1]) for a in sys.argv[1:] if a.startswith("--batch=")), 0)
    n = int(args[0]) if len(args) > 0 else 1_000_000
    runs = int(args[1]) if len(args) > 1 else 7
    seg = int(args[2]) if len(args) > 2 else 64 << 20
    if distinct:
        from engine.bench.harness import _pool

        msgs = _pool(64, 0).payloads(n)
    else:
        msgs = [b"x" * 64] * n
    rates = []
    for _ in range(runs):
        time.sleep(pause)
        r, rolls, faults, user, sys_s, waits = one(msgs, seg, batch)
        rates.append(r)
        print(
            f"  {r:6.2f} M/s  rolls {rolls}  minor faults {faults}  "
            f"CPU per append: user {user / n * 1e9:5.1f} ns, system {sys_s / n * 1e9:5.1f} ns; "
            f"the thread slept {waits} times"
        )
    what = "distinct payloads" if distinct else "one payload"
    call = f"append_many of {batch}" if batch else "append"
    print(
        f"{call} 64 B none, {n} records ({what}), segment {seg >> 20} MiB, "
        f"{pause:g} s pause before each run: "
        f"median {statistics.median(rates):.2f} M/s, min {min(rates):.2f} M/s ({runs} runs)"
    )


if __name__ == "__main__":
    main()
