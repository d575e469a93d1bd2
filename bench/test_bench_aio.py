"""pytest-benchmark cases for engine.aio.

Run: ``python -m pytest bench/test_bench_aio.py --benchmark-only``.
One unique name per case (no parametrize); every case verifies delivery
(count + the harness checksum). ``test_aio_round_trip_same_run`` runs ours and
the peers of engine.bench.aio interleaved in one test and records p50/p99 and
the ratio against the asyncio Unix-socket pair in ``extra_info``.
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

import engine
from engine.bench import aio as bench_aio

pytest.importorskip("pytest_benchmark")

N = 20_000
ROUND_TRIPS = 1_000


def _check(run, wl):
    assert run.count == wl.count, f"delivered {run.count} of {wl.count}"
    assert run.checksum == wl.expected.checksum, "payload checksum differs"


def test_aio_aget_many_drain(benchmark, workload, assert_delivered):
    """A thread puts N messages; an asyncio consumer drains them with aget_many."""
    wl = workload(N)
    msgs = wl.payloads()

    def once():
        ring = engine.Ring(capacity=1 << 20)
        p, c = ring.producer(), ring.consumer()

        def produce():
            p.put_many(msgs, timeout=30)
            p.close()

        async def consume():
            out = []
            while True:
                try:
                    out.extend(await c.aget_many(4096, timeout=30))
                except engine.Closed:
                    return out

        t = threading.Thread(target=produce)
        t.start()
        loop = asyncio.new_event_loop()
        try:
            out = loop.run_until_complete(consume())
        finally:
            loop.close()
        t.join()
        ring.close()
        return out

    out = benchmark.pedantic(once, rounds=3, iterations=1)
    assert_delivered(out, wl)


def test_aio_aget_one_by_one(benchmark, workload, assert_delivered):
    """The same with one ``await aget()`` per message (the per-message cost)."""
    wl = workload(N)
    msgs = wl.payloads()

    def once():
        ring = engine.Ring(capacity=1 << 22)
        p, c = ring.producer(), ring.consumer()
        p.put_many(msgs)
        p.close()

        async def consume():
            return [m async for m in c]

        loop = asyncio.new_event_loop()
        try:
            out = loop.run_until_complete(consume())
        finally:
            loop.close()
        ring.close()
        return out

    out = benchmark.pedantic(once, rounds=3, iterations=1)
    assert_delivered(out, wl)


def test_aio_round_trip_same_run(benchmark, workload):
    """Async round trip, ours and every peer interleaved in the same run."""
    wl = workload(ROUND_TRIPS)
    fns = {
        "engine.Ring aget": bench_aio.ours_ring,
        "asyncio Unix socket": bench_aio.peer_unix_socket,
    }
    try:
        import zmq  # noqa: F401

        fns["zmq.asyncio"] = bench_aio.peer_zmq_asyncio
    except ImportError:
        pass
    lat = {k: [] for k in fns}

    def once():
        for k, fn in fns.items():
            run = fn(wl)
            _check(run, wl)
            lat[k].append(np.asarray(run.latencies_ns))

    benchmark.pedantic(once, rounds=3, iterations=1)
    p50 = {k: float(np.percentile(np.concatenate(v), 50)) / 1e3 for k, v in lat.items()}
    p99 = {k: float(np.percentile(np.concatenate(v), 99)) / 1e3 for k, v in lat.items()}
    benchmark.extra_info.update({f"{k} p50 us": round(v, 2) for k, v in p50.items()})
    benchmark.extra_info.update({f"{k} p99 us": round(v, 2) for k, v in p99.items()})
    ratio = p50["asyncio Unix socket"] / p50["engine.Ring aget"]
    benchmark.extra_info["Unix socket p50 / ours p50"] = round(ratio, 2)
