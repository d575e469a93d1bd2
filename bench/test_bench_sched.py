"""pytest-benchmark cases for engine.scheduling.

Run: ``python -m pytest bench/test_bench_sched.py --benchmark-only``.
One unique name per case (no parametrize); every case verifies delivery
(count + the harness checksum via ``assert_delivered``; FIFO inside a level
where the case promises it). ``test_sched_targets_same_run`` runs ours and the
peers of engine.bench.scheduling interleaved in one test and records the
issue-6 ratios in ``extra_info``.
"""

from __future__ import annotations

import statistics
import struct

import pytest

from engine.bench import scheduling as sch

pytest.importorskip("pytest_benchmark")

N = 60_000


def _rounds(put, get, msgs, prio, rnd=4096):
    out = []
    append = out.append
    n = len(msgs)
    for s in range(0, n, rnd):
        e = min(n, s + rnd)
        for i in range(s, e):
            put(msgs[i], prio[i])
        for _ in range(e - s):
            append(get())
    return out


def _per_level_fifo(out, levels):
    last = [-1] * levels
    for m in out:
        seq = struct.unpack_from("<Q", m)[0]
        lv = seq % levels
        assert seq > last[lv], "FIFO inside a level broken"
        last[lv] = seq


def test_sched_pq_strict_put_get(benchmark, workload, assert_delivered):
    from engine import PriorityQueue

    wl = workload(N)
    msgs = wl.payloads()
    prio = [i % 3 for i in range(N)]
    pq = PriorityQueue(levels=3, capacity=1 << 22)

    out = benchmark.pedantic(lambda: _rounds(pq.put, pq.try_get, msgs, prio), rounds=5, iterations=1)
    pq.close()
    assert_delivered(out, wl, ordered=False)
    _per_level_fifo(out, 3)


def test_sched_pq_weighted_put_get(benchmark, workload, assert_delivered):
    from engine import PriorityQueue

    wl = workload(N)
    msgs = wl.payloads()
    prio = [i % 3 for i in range(N)]
    pq = PriorityQueue(levels=3, policy="weighted", weights=[4, 2, 1], capacity=1 << 22)

    out = benchmark.pedantic(lambda: _rounds(pq.put, pq.try_get, msgs, prio), rounds=5, iterations=1)
    pq.close()
    assert_delivered(out, wl, ordered=False)
    _per_level_fifo(out, 3)


def test_sched_pq_aging_put_get(benchmark, workload, assert_delivered):
    from engine import PriorityQueue

    wl = workload(N)
    msgs = wl.payloads()
    prio = [i % 3 for i in range(N)]
    pq = PriorityQueue(levels=3, max_wait=0.5, capacity=1 << 22)  # timestamped records

    out = benchmark.pedantic(lambda: _rounds(pq.put, pq.try_get, msgs, prio), rounds=5, iterations=1)
    pq.close()
    assert_delivered(out, wl, ordered=False)
    _per_level_fifo(out, 3)


def test_sched_pq_get_many(benchmark, workload, assert_delivered):
    from engine import PriorityQueue

    wl = workload(N)
    msgs = wl.payloads()
    pq = PriorityQueue(levels=3, capacity=1 << 22)
    put = pq.put

    def run():
        out = []
        for s in range(0, N, 4096):
            for i in range(s, min(N, s + 4096)):
                put(msgs[i], i % 3)
            while True:
                b = pq.get_many(1024)
                if not b:
                    break
                out += b
        return out

    out = benchmark.pedantic(run, rounds=5, iterations=1)
    pq.close()
    assert_delivered(out, wl, ordered=False)
    _per_level_fifo(out, 3)


def test_sched_keyed_put_get(benchmark, workload, assert_delivered):
    from engine import KeyedQueue

    wl = workload(N)
    msgs = wl.payloads()
    kq = KeyedQueue(partitions=8, capacity=1 << 22)
    c = kq.consumer()
    put = kq.put

    def run():
        out = []
        for s in range(0, N, 4096):
            for i in range(s, min(N, s + 4096)):
                put(msgs[i], i % 1000)
            while True:
                b = c.get_many(1024)
                if not b:
                    break
                out += b
        return out

    out = benchmark.pedantic(run, rounds=5, iterations=1)
    kq.close()
    assert_delivered(out, wl, ordered=False)


def test_sched_targets_same_run(benchmark, workload):
    """Ours and every peer of the one-process case, interleaved, same run."""
    wl = workload(N)
    fns = {
        "ours": sch.ours_one_process,
        "queue.PriorityQueue": sch.queue_priorityqueue,
        "heapq+lock": sch.heapq_locked,
        "deque per level+lock": sch.deque_per_level_locked,
    }
    rates = {k: [] for k in fns}

    def once():
        for k, fn in fns.items():
            run = fn(wl)
            assert run.count == wl.count and run.checksum == wl.expected.checksum
            rates[k].append(run.count / run.seconds)

    benchmark.pedantic(once, rounds=3, iterations=1)
    med = {k: statistics.median(v) for k, v in rates.items()}
    benchmark.extra_info.update({f"{k} msg/s": round(v) for k, v in med.items()})
    benchmark.extra_info["ours / queue.PriorityQueue"] = round(med["ours"] / med["queue.PriorityQueue"], 2)
    benchmark.extra_info["ours / deque per level"] = round(med["ours"] / med["deque per level+lock"], 2)
