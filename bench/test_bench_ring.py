"""pytest-benchmark microbenchmarks of engine.Ring.

Run: ``python -m pytest bench/test_bench_ring.py --benchmark-only``.
One unique name per case (no parametrize).  Each round moves a batch of the
harness workload (64-byte messages: sequence number + seeded filler) through
a private ring in one thread, so the figure is the per-call cost of the
compiled path without scheduler noise; every round checks delivery (count,
order-independent checksum, order) with ``assert_delivered``.  The
cross-process comparison against the peers is ``queue-engine bench``.
"""

from __future__ import annotations

import numpy as np
import pytest

import engine

pytest.importorskip("pytest_benchmark")

N = 10_000  # messages per round: 720 KB of records, fits the ring below
CAP = 1 << 21


def _pair(mode="spsc"):
    ring = engine.Ring(CAP, mode=mode, max_consumers=1)
    return ring, ring.producer(), ring.consumer()


def _run(benchmark, wl, assert_delivered, step, ordered=True, convert=None):
    out = {}

    def once():
        out["got"] = step()

    benchmark.pedantic(once, rounds=20, iterations=1, warmup_rounds=1)
    got = out["got"] if convert is None else convert(out["got"])
    assert_delivered(got, wl, ordered=ordered)
    benchmark.extra_info["messages"] = wl.count
    benchmark.extra_info["bytes"] = wl.count * wl.size


def test_ring_put_get_single(benchmark, workload, assert_delivered):
    wl = workload(N)
    msgs = wl.payloads()
    _ring, p, c = _pair()
    put, get = p.put, c.get

    def step():
        for m in msgs:
            put(m)
        return [get() for _ in range(len(msgs))]

    _run(benchmark, wl, assert_delivered, step)


def test_ring_try_put_try_get_single(benchmark, workload, assert_delivered):
    wl = workload(N)
    msgs = wl.payloads()
    _ring, p, c = _pair()
    try_put, try_get = p.try_put, c.try_get

    def step():
        for m in msgs:
            assert try_put(m)
        return [try_get() for _ in range(len(msgs))]

    _run(benchmark, wl, assert_delivered, step)


def test_ring_put_many_get_many_batch(benchmark, workload, assert_delivered):
    wl = workload(N)
    msgs = wl.payloads()
    _ring, p, c = _pair()

    def step():
        got = []
        for i in range(0, len(msgs), 1024):
            p.put_many(msgs[i : i + 1024])
        while len(got) < len(msgs):
            got.extend(c.get_many(1024))
        return got

    _run(benchmark, wl, assert_delivered, step)


def test_ring_put_array_get_array_batch(benchmark, workload, assert_delivered):
    wl = workload(N)
    arr = np.ascontiguousarray(wl.array())
    _ring, p, c = _pair()

    def step():
        assert p.put_array(arr) == N
        return c.get_array(N)

    # the rows of the last round, checked outside the timed part
    _run(benchmark, wl, assert_delivered, step, convert=lambda rows: [bytes(r) for r in rows])


def test_ring_get_view_single(benchmark, workload, assert_delivered):
    wl = workload(N)
    msgs = wl.payloads()
    _ring, p, c = _pair()

    def step():
        p.put_many(msgs)
        return [bytes(c.get_view()) for _ in range(len(msgs))]

    _run(benchmark, wl, assert_delivered, step)


def test_ring_shared_put_many_get_many_batch(benchmark, workload, assert_delivered):
    wl = workload(N)
    msgs = wl.payloads()
    _ring, p, c = _pair("shared")

    def step():
        p.put_many(msgs)
        got = []
        while len(got) < len(msgs):
            got.extend(c.get_many(1024))
        return got

    _run(benchmark, wl, assert_delivered, step)
