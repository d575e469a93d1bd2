"""Bench section "queues": engine.Queue against multiprocessing.Queue and
faster-fifo's Queue, as drop-in object queues between processes.

Run it on its own (``python -m engine.bench.queues [--window S] [--windows N]
[--json]``) or as a section of ``queue-engine bench``.

Method (steady state, the same for every contender)
---------------------------------------------------
Producers put as fast as the queue takes messages, one ``put`` per message,
into a *bounded* queue (so they wait for the consumers); consumers ``get``
one at a time and count into a shared counter. After a warm-up, the parent
reads the counters at the start and end of each timed window (>= 0.25 s).
Contenders alternate over repetitions (fresh processes each time) and each
reports the median rate over all its windows. Then producers stop, consumers
drain, and the run is verified: every message put was got exactly once, each
producer's messages came out in order at each consumer, and every payload's
content checks (a wrong answer fails the case).

Cases: small tuples, 1 KiB bytes and 1 MB numpy arrays; 1->1, 4->1, 1->4.
Targets: >= 10x multiprocessing.Queue on small objects, >= 2x faster-fifo on
small objects with 4 producers, >= 3x multiprocessing.Queue in GB/s on 1 MB
arrays.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import queue
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

SECTION = "queues"
# the cases the quick profile runs (fewer cases, never shorter windows); --full runs all
QUICK = ("small tuple 1->1", "small tuple 4->1", "1 MB ndarray 1->1")

CAPACITY = 1 << 24  # bytes of shared buffer for engine.Queue and faster-fifo alike
SMALL_MAXSIZE = 10_000  # messages queued at most (small and 1 KiB cases)
ARRAY_MAXSIZE = 8  # 1 MB arrays queued at most (the ring holds 15 of them)
ARRAY_BYTES = 1 << 20
ARRAY_POOL = ARRAY_MAXSIZE + 2  # producer arrays reused round-robin (see _producer)
WARMUP = 0.3


@dataclass(frozen=True)
class Payload:
    name: str
    size: int  # bytes per message, for MB/s
    maxsize: int


PAYLOADS = (
    Payload("small tuple", 40, SMALL_MAXSIZE),
    Payload("1 KiB bytes", 1024, SMALL_MAXSIZE),
    Payload("1 MB ndarray", ARRAY_BYTES, ARRAY_MAXSIZE),
)
TOPOLOGIES = ((1, 1), (4, 1), (1, 4))


# ---------------------------------------------------------------------------
# contenders: a factory making a bounded queue with the drop-in interface
# ---------------------------------------------------------------------------


def _ours(maxsize: int) -> Any:
    import engine

    return engine.Queue(maxsize, capacity=CAPACITY)


def _multiprocessing(maxsize: int) -> Any:
    return mp.get_context("fork").Queue(maxsize)


def _faster_fifo(maxsize: int) -> Any:
    import faster_fifo

    return faster_fifo.Queue(max_size_bytes=CAPACITY, maxsize=maxsize)


CONTENDERS: Tuple[Tuple[str, Callable[[int], Any], bool, str], ...] = (
    ("engine.Queue", _ours, True, "engine._mpq"),
    ("multiprocessing.Queue", _multiprocessing, False, "multiprocessing"),
    ("faster-fifo", _faster_fifo, False, "faster_fifo"),
)


# ---------------------------------------------------------------------------
# children
# ---------------------------------------------------------------------------


def _make(kind: str, tag: int, seq: int, pool: List[Any]) -> Any:
    if kind == "small tuple":
        return (tag, seq, 3.25, "abc")
    if kind == "1 KiB bytes":
        return tag.to_bytes(4, "little") + seq.to_bytes(8, "little") + pool[0]
    arr = pool[seq % len(pool)]
    arr[0] = tag
    arr[1] = seq
    arr[-1] = seq * 7 + tag
    return arr


def _parse(kind: str, msg: Any) -> Tuple[int, int]:
    """(tag, seq) of a message, after checking its content (AssertionError)."""
    if kind == "small tuple":
        tag, seq, x, s = msg
        assert x == 3.25 and s == "abc"
        return tag, seq
    if kind == "1 KiB bytes":
        assert len(msg) == 1024 and msg[12:] == b"\xab" * 1012
        return int.from_bytes(msg[:4], "little"), int.from_bytes(msg[4:12], "little")
    assert msg.shape == (ARRAY_BYTES // 8,) and msg.dtype == np.int64
    tag, seq = int(msg[0]), int(msg[1])
    assert int(msg[-1]) == seq * 7 + tag and int(msg[2]) == 12345
    return tag, seq


def _producer(q: Any, kind: str, tag: int, stop: Any, put_counts: Any) -> None:
    # Arrays are reused round-robin: multiprocessing.Queue pickles in a feeder
    # thread after put returns, so a pool larger than maxsize + 1 guarantees an
    # array is only rewritten once the message made from it was got.
    pool: List[Any] = [b"\xab" * 1012]
    if kind == "1 MB ndarray":
        pool = [np.full(ARRAY_BYTES // 8, 12345, np.int64) for _ in range(ARRAY_POOL)]
    seq = 0
    while not stop.value:
        try:
            q.put(_make(kind, tag, seq, pool), timeout=0.1)
        except queue.Full:
            continue
        seq += 1
    put_counts[tag] = seq


def _consumer(q: Any, kind: str, idx: int, stop: Any, counts: Any, conn: Any) -> None:
    last: Dict[int, int] = {}
    total = 0
    sums: Dict[int, int] = {}
    errors = 0
    while True:
        try:
            msg = q.get(timeout=0.1)
        except queue.Empty:
            if stop.value == 2:
                break
            continue
        try:
            tag, seq = _parse(kind, msg)
        except (AssertionError, ValueError, TypeError):
            errors += 1
            continue
        if seq <= last.get(tag, -1):
            errors += 1
        last[tag] = seq
        sums[tag] = sums.get(tag, 0) + seq
        total += 1
        counts[idx] = total
    conn.send((total, sums, errors))
    conn.close()


# ---------------------------------------------------------------------------
# one measurement
# ---------------------------------------------------------------------------


@dataclass
class Result:
    contender: str
    ours: bool
    rates: List[float] = field(default_factory=list)  # msg/s per window
    error: Optional[str] = None

    @property
    def msg_per_s(self) -> float:
        return statistics.median(self.rates) if self.rates else float("nan")


def measure(factory: Callable[[int], Any], payload: Payload, producers: int, consumers: int,
            window: float, windows: int) -> List[float]:
    """Rates (msg/s) of `windows` timed windows at steady state; raises
    AssertionError when delivery does not verify."""
    ctx = mp.get_context("fork")
    q = factory(payload.maxsize)
    stop = ctx.RawValue("i", 0)
    counts = ctx.RawArray("q", consumers)
    put_counts = ctx.RawArray("q", producers)
    pipes = [ctx.Pipe(duplex=False) for _ in range(consumers)]
    cs = [ctx.Process(target=_consumer, args=(q, payload.name, i, stop, counts, pipes[i][1]), daemon=True)
          for i in range(consumers)]
    ps = [ctx.Process(target=_producer, args=(q, payload.name, t, stop, put_counts), daemon=True)
          for t in range(producers)]
    for p in cs + ps:
        p.start()
    rates: List[float] = []
    try:
        time.sleep(WARMUP)
        for _ in range(windows):
            c0, t0 = sum(counts), time.perf_counter()
            time.sleep(window)
            c1, t1 = sum(counts), time.perf_counter()
            rates.append((c1 - c0) / (t1 - t0))
        stop.value = 1
        for p in ps:
            p.join(60)
            assert p.exitcode == 0, f"producer exit code {p.exitcode}"
        stop.value = 2
        results = []
        for (recv, _), c in zip(pipes, cs):
            assert recv.poll(60), "a consumer did not finish"
            results.append(recv.recv())
            c.join(30)
        total = sum(r[0] for r in results)
        errors = sum(r[2] for r in results)
        assert errors == 0, f"{errors} corrupt or out-of-order messages"
        expected = sum(put_counts)
        assert total == expected, f"got {total} messages, put {expected}"
        for tag in range(producers):
            n = put_counts[tag]
            got = sum(r[1].get(tag, 0) for r in results)
            assert got == n * (n - 1) // 2, f"producer {tag}: messages lost or duplicated"
    finally:
        stop.value = 2
        for p in cs + ps:
            if p.is_alive():
                p.kill()
                p.join(5)
    return rates


# ---------------------------------------------------------------------------
# the section
# ---------------------------------------------------------------------------


def _available(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def targets_for(payload: Payload, producers: int, consumers: int) -> List[Tuple[str, float]]:
    """(peer, minimum ratio) goals of a case."""
    out: List[Tuple[str, float]] = []
    if payload.name == "small tuple":
        out.append(("multiprocessing.Queue", 10.0))
        if producers == 4:
            out.append(("faster-fifo", 2.0))
    if payload.name == "1 MB ndarray":
        out.append(("multiprocessing.Queue", 3.0))
    return out


def run(window: float = 0.3, windows: int = 2, reps: int = 3, progress: bool = True,
        only: Optional[str] = None) -> List[Dict[str, Any]]:
    """Every case (or those whose name contains ``only``), every contender,
    in the same run.  Contenders alternate across ``reps`` repetitions
    (A B C, A B C, ...) so machine noise hits them alike; each repetition is
    a fresh set of processes timing ``windows`` windows, and a contender's
    figure is the median of all its windows.  Returns a list of case dicts."""
    window = max(window, 0.25)
    rows = []
    for payload in PAYLOADS:
        for producers, consumers in TOPOLOGIES:
            case = f"{payload.name} {producers}->{consumers}"
            if only and only not in case:
                continue
            res = [Result(name, ours) for name, _, ours, _ in CONTENDERS]
            for _ in range(reps):
                for r, (_name, factory, _, module) in zip(res, CONTENDERS):
                    if r.error:
                        continue
                    if not _available(module):
                        r.error = f"skipped: {module} not installed"
                        continue
                    try:
                        r.rates += measure(factory, payload, producers, consumers, window, windows)
                    except Exception as exc:  # a broken contender fails its case, loudly
                        r.error = f"FAILED: {type(exc).__name__}: {exc}"
            for r in res:
                if progress:
                    print(f"  {case:24} {r.contender:22} "
                          f"{r.error or f'{r.msg_per_s:12,.0f} msg/s {r.msg_per_s * payload.size / 1e9:8.3f} GB/s'}",
                          file=sys.stderr, flush=True)
            ours_r = next(r for r in res if r.ours)
            ratios = {r.contender: ours_r.msg_per_s / r.msg_per_s for r in res
                      if not r.ours and r.rates and ours_r.rates and not r.error and not ours_r.error}
            goals = [{"peer": peer, "required": need, "measured": ratios.get(peer),
                      "met": None if peer not in ratios else ratios[peer] >= need}
                     for peer, need in targets_for(payload, producers, consumers)]
            rows.append({
                "case": case,
                "payload_bytes": payload.size,
                "contenders": [{"name": r.contender, "msg_per_s": r.msg_per_s,
                                "gb_per_s": r.msg_per_s * payload.size / 1e9,
                                "windows": r.rates, "error": r.error} for r in res],
                "ratios": ratios,
                "targets": goals,
            })
    return rows


# ---------------------------------------------------------------------------
# the harness's section interface (queue-engine bench): fixed-count runs
# ---------------------------------------------------------------------------


def _wrap(kind: str, payload: bytes, i: int) -> Any:
    if kind == "small tuple":
        return (i, payload)
    if kind == "1 KiB bytes":
        return payload
    return np.frombuffer(payload, np.uint8)


def _unwrap(kind: str, msg: Any) -> Any:
    return msg[1] if kind == "small tuple" else msg


def _fixed_producer(q: Any, kind: str, msgs: List[bytes], first: int, step: int, barrier: Any,
                    starts: Any) -> None:
    barrier.wait(60)
    starts.put(time.perf_counter_ns())  # the clock starts at the first producer's start
    for i in range(first, len(msgs), step):
        q.put(_wrap(kind, msgs[i], i), timeout=60)


def _fixed_consumer(q: Any, kind: str, barrier: Any, conn: Any) -> None:
    from engine.bench.harness import digest

    barrier.wait(60)
    got = []
    t_end = time.perf_counter_ns()
    while True:
        msg = q.get(timeout=60)
        if msg is None:
            break
        got.append(_unwrap(kind, msg))
        t_end = time.perf_counter_ns()
    d = digest(got)  # after the clock stopped
    conn.send((t_end, d.count, d.checksum, d.in_order))
    conn.close()


def _fixed_run(factory: Callable[[int], Any], payload: Payload, producers: int, consumers: int,
               wl: Any) -> Any:
    """Move the workload's payloads (producers take every producers-th one),
    consumers digest what they got; the clock runs from the start barrier to
    the last consumer's last message."""
    from engine.bench.harness import Digest, Run

    ctx = mp.get_context("fork")
    msgs = wl.payloads()  # built before the fork, outside the clock
    q = factory(payload.maxsize)
    barrier = ctx.Barrier(producers + consumers + 1)
    starts = ctx.SimpleQueue()  # CLOCK_MONOTONIC stamps: comparable across processes
    pipes = [ctx.Pipe(duplex=False) for _ in range(consumers)]
    cs = [ctx.Process(target=_fixed_consumer, args=(q, payload.name, barrier, pipes[i][1]), daemon=True)
          for i in range(consumers)]
    ps = [ctx.Process(target=_fixed_producer, args=(q, payload.name, msgs, t, producers, barrier,
                                                    starts), daemon=True) for t in range(producers)]
    try:
        for p in cs + ps:
            p.start()
        barrier.wait(60)
        for p in ps:
            p.join(600)
            if p.exitcode != 0:
                raise RuntimeError(f"a producer ended with {p.exitcode}")
        for _ in cs:
            q.put(None, timeout=60)
        ends = []
        for recv, _ in pipes:
            if not recv.poll(600):
                raise RuntimeError("a consumer did not finish")
            ends.append(recv.recv())
    finally:
        for p in cs + ps:
            if p.is_alive():
                p.kill()
            p.join(5)
    if len(ends) == 1:
        t1, count, checksum, in_order = ends[0]
        d = Digest(count, checksum, in_order)
    else:
        d = Digest.combine(Digest(c, s, o) for _, c, s, o in ends)
        t1 = max(e[0] for e in ends)
    t0 = min(starts.get() for _ in range(producers))
    return Run.timed(t0, t1, d)


def cases(profile: Any) -> List[Any]:
    """The cases of this section for ``queue-engine bench`` (fixed message
    counts; ``python -m engine.bench.queues`` measures steady-state windows)."""
    import functools

    from engine.bench.harness import Case, Contender, Target, Workload

    sizes = {"small tuple": (16, 100_000, 1_000_000), "1 KiB bytes": (1024, 50_000, 500_000),
             "1 MB ndarray": (ARRAY_BYTES, 200, 1_000)}
    out = []
    for payload in PAYLOADS:
        size, quick, full = sizes[payload.name]
        for producers, consumers in TOPOLOGIES:
            out.append(Case(
                name=f"{payload.name} {producers}->{consumers}",
                description=f"drop-in object queue, {producers} producer(s) -> {consumers} "
                            f"consumer(s), one put/get per message, bounded queue",
                kind="throughput",
                workload=Workload(profile.count(quick=quick, full=full), size),
                contenders=[Contender(name, functools.partial(_fixed_run, factory, payload, producers,
                                                              consumers),
                                      ours=ours, requires=(module,))
                            for name, factory, ours, module in CONTENDERS],
                unit="MB/s" if payload.name == "1 MB ndarray" else "msg/s",
                buffer_bytes=CAPACITY,
                ordered=producers == 1 and consumers == 1,
                targets=[Target("ratio", need, peer) for peer, need in
                         targets_for(payload, producers, consumers)],
            ))
    return out


def format_table(rows: List[Dict[str, Any]]) -> str:
    lines = [f"{'case':24} {'contender':22} {'msg/s':>12} {'GB/s':>8}  ratio (ours / it)"]
    for row in rows:
        for c in row["contenders"]:
            ratio = row["ratios"].get(c["name"])
            fig = c["error"] or f"{c['msg_per_s']:12,.0f} {c['gb_per_s']:8.3f}"
            lines.append(f"{row['case']:24} {c['name']:22} {fig}"
                         + (f"  {ratio:6.2f}x" if ratio else ""))
        for t in row["targets"]:
            m = "n/a" if t["measured"] is None else f"{t['measured']:.2f}x"
            verdict = {True: "met", False: "NOT MET", None: "not measured"}[t["met"]]
            lines.append(f"{'':24} target >= {t['required']:g}x {t['peer']}: {m} {verdict}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m engine.bench.queues", description=__doc__.split("\n")[0])
    ap.add_argument("--window", type=float, default=0.3, help="seconds per timed window (>= 0.25)")
    ap.add_argument("--windows", type=int, default=2, help="timed windows per repetition")
    ap.add_argument("--reps", type=int, default=3, help="repetitions per contender (interleaved)")
    ap.add_argument("--json", action="store_true", help="JSON on stdout instead of the table")
    ap.add_argument("--only", help="run the cases whose name contains this (e.g. 'small', '4->1')")
    args = ap.parse_args(argv)
    rows = run(args.window, args.windows, args.reps, only=args.only)
    print(json.dumps(rows, indent=1) if args.json else format_table(rows))
    failed = any(c["error"] and c["error"].startswith("FAILED") for r in rows for c in r["contenders"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
