"""Durable 3-step sagas per second, ours and the SQLite saga-steps table, side by side.

    python bench/saga_threads.py                          # 1 and 8 threads, 5 rounds
    python bench/saga_threads.py --threads 8 --count 4000 --repeat 7
    python bench/saga_threads.py --threads 8 --ab-writeback   # + ours without writeback ahead

The ``saga`` bench section's durable workload (``engine.bench.saga``: three
steps, ``durability="always"``, the threads sharing one Saga) against its
peer, ``sqlite3 saga table, synchronous=FULL`` (the section's own contender),
both in steady state (:func:`engine.bench.steady.run_steady`).  They run in
turn, ``--repeat`` rounds of both per thread count, so both see the disk and
the CPUs at about the same moments: on a shared machine only ratios of the
same round mean much.  Each round prints both rates, their ratio and, for
ours, what a saga cost the process over the whole run (warm-up included):
CPU (user + system), voluntary context switches and the log's syncs, with
how long a sync took and the share of the run the log spent syncing
(``Log.stats()["sync_seconds"]``): near 100% the disk is the bound, well
below it the threads are (their wake-ups and their turns at the GIL).  The
last line per thread count gives the median ratio and its range.

On a machine with few cores the CPU column bounds the rate as much as the
disk does: at 8 threads a saga costs several times its single-thread CPU,
mostly thread wake-ups (futex calls) and the syncs' kernel time.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import tempfile
import time
from typing import Dict

from engine import _log
from engine.bench.harness import Workload, digest
from engine.bench.saga import _sqlite, _steps
from engine.bench.steady import run_steady


def _ours(threads: int, count: int) -> Dict[str, float]:
    """One steady-state run of ours: sagas/s and per-saga CPU, switches, syncs."""
    from engine.saga import Saga

    wl = Workload(count, 64)
    out: list = []
    reserve, charge, deliver = _steps(wl.payloads(), out)
    tmp = tempfile.mkdtemp(prefix="qe-saga-threads-")
    saga = Saga(f"{tmp}/saga", durability="always")
    try:
        saga.step("reserve", lambda sc: reserve(sc.ctx), lambda sc: None)
        saga.step("charge", lambda sc: charge(sc.ctx), lambda sc: None)
        saga.step("deliver", lambda sc: deliver(sc.ctx), lambda sc: None)
        st0 = saga.log.stats()
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        w0 = time.perf_counter()
        t0, t1, warmed = run_steady(
            threads, count, lambda _k, i: saga.run(i), lambda _k, j: saga.run(-1 - j)
        )
        wall = time.perf_counter() - w0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        st1 = saga.log.stats()
        syncs = st1["syncs"] - st0["syncs"]
        sync_s = st1["sync_seconds"] - st0["sync_seconds"]
    finally:
        saga.close()
        shutil.rmtree(tmp, ignore_errors=True)
    got, want = digest(out), wl.expected
    if (got.count, got.checksum) != (want.count, want.checksum):  # (threads interleave)
        raise RuntimeError("a saga was not delivered exactly once")
    total = count + warmed
    cpu = r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
    return {
        "rate": count / ((t1 - t0) / 1e9),
        "cpu_us": cpu / total * 1e6,
        "vcsw": (r1.ru_nvcsw - r0.ru_nvcsw) / total,
        "syncs": syncs / total,
        "sync_us": sync_s / max(syncs, 1) * 1e6,
        "busy": sync_s / wall,
    }


def _costs(run: Dict[str, float]) -> str:
    return (
        f"cpu {run['cpu_us']:4.0f} us, vcsw {run['vcsw']:4.1f}, syncs {run['syncs']:4.2f} of "
        f"{run['sync_us']:3.0f} us, disk busy {run['busy']:4.0%}"
    )


def _peer(threads: int, count: int) -> float:
    run = _sqlite("FULL", threads)(Workload(count, 64))
    if run.count != count:
        raise RuntimeError(f"{run.count} sagas delivered, {count} run")
    return count / run.seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--count", type=int, default=0, help="sagas per run (default: 400 x threads)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument(
        "--ab-writeback",
        action="store_true",
        help="each round also runs ours with the log's writeback ahead of the tail off "
        "(engine._log._set_writeback_ahead), for a paired comparison",
    )
    args = ap.parse_args()
    for threads in args.threads:
        count = args.count or 400 * threads
        ratios, gains = [], []
        for r in range(args.repeat):
            ours = _ours(threads, count)
            peer = _peer(threads, count)
            ratio = ours["rate"] / peer
            ratios.append(ratio)
            print(
                f"threads={threads} round={r} ours={ours['rate']:6.0f}/s sqlite={peer:6.0f}/s "
                f"ratio={ratio:5.2f}  ours per saga: {_costs(ours)}",
                flush=True,
            )
            if args.ab_writeback:
                _log._set_writeback_ahead(False)
                try:
                    off = _ours(threads, count)
                finally:
                    _log._set_writeback_ahead(True)
                gains.append(ours["rate"] / off["rate"])
                print(
                    f"threads={threads} round={r} ours without writeback ahead={off['rate']:6.0f}/s "
                    f"(with it: {gains[-1]:4.2f}x)  {_costs(off)}",
                    flush=True,
                )
        print(
            f"threads={threads} median ratio {statistics.median(ratios):.2f} "
            f"(range {min(ratios):.2f}-{max(ratios):.2f})"
            + (
                f"; writeback ahead {statistics.median(gains):.2f}x "
                f"({min(gains):.2f}-{max(gains):.2f})"
                if gains
                else ""
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
