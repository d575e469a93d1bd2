"""Stress: an asyncio consumer receives 1,000,000 messages from a producer
process, in order, on the default loop and on uvloop (when installed)."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import time

import pytest

import engine
from engine import aio

N = 1_000_000
CHUNK = 2048
pytestmark = [pytest.mark.stress, pytest.mark.timeout(120)]
CTX = mp.get_context("fork")

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None

LOOPS = [
    "asyncio",
    pytest.param(
        "uvloop", marks=pytest.mark.skipif(uvloop is None, reason="uvloop is not installed")
    ),
]


def _produce(name, n, start):
    start.wait(30)
    with engine.Ring.attach(name) as r, r.producer() as p:
        for lo in range(0, n, CHUNK):
            p.put_many([i.to_bytes(8, "little") for i in range(lo, min(n, lo + CHUNK))], timeout=60)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_million_messages_in_order(shm_name, loop_kind):
    ring = engine.Ring.create(shm_name, capacity=1 << 20)
    c = ring.consumer()
    start = CTX.Event()
    proc = CTX.Process(target=_produce, args=(shm_name, N, start))
    proc.start()

    async def main():
        expect = 0
        batches = 0
        bad = None
        start.set()
        while True:
            try:
                batch = await c.aget_many(4096, timeout=60)
            except engine.Closed:
                break
            assert batch, "no message for 60 s"
            batches += 1
            for m in batch:
                v = int.from_bytes(m, "little")
                if v != expect and bad is None:
                    bad = (expect, v)
                expect += 1
        return expect, batches, bad

    loop = uvloop.new_event_loop() if loop_kind == "uvloop" else asyncio.new_event_loop()
    t0 = time.monotonic()
    try:
        count, batches, bad = loop.run_until_complete(main())
    finally:
        loop.close()
    elapsed = time.monotonic() - t0
    proc.join(30)
    assert proc.exitcode == 0
    assert bad is None, f"out of order: expected {bad[0]}, got {bad[1]}"
    assert count == N
    st = ring.stats()
    assert st["messages_put"] == st["messages_got"] == N
    assert aio.active_waits() == 0 or time.sleep(0.2) or aio.active_waits() == 0
    assert elapsed < 60, f"{N} messages took {elapsed:.1f} s"
    print(f"{loop_kind}: {N} messages in {elapsed:.2f} s, {batches} batches")
    c.close()
    ring.close()
