"""engine.aio: awaiting rings, logs and scheduling queues on the default
asyncio loop and on uvloop (when installed): wake-ups from other processes,
timeouts, cancellation that loses nothing and leaves no waiter behind, and an
idle awaiting consumer that uses no CPU."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import resource
import sys
import threading
import time
import traceback

import pytest

import engine
from engine import aio

SEG = 1 << 20  # durable queues' segment size here (each log preallocates one)

pytestmark = pytest.mark.timeout(120)
CTX = mp.get_context("fork")

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is in the [test] extra off Windows
    uvloop = None

LOOPS = [
    "asyncio",
    pytest.param(
        "uvloop", marks=pytest.mark.skipif(uvloop is None, reason="uvloop is not installed")
    ),
]


@pytest.fixture(params=LOOPS)
def run(request):
    """run(coro) on a fresh loop of the parametrized kind."""

    def _run(coro):
        loop = uvloop.new_event_loop() if request.param == "uvloop" else asyncio.new_event_loop()
        try:
            return loop.run_until_complete(coro)
        finally:
            loop.close()

    return _run


def _settled(deadline=1.0):
    """Wait until no aio wait is in progress (a dropped wait ends within a slice)."""
    end = time.monotonic() + deadline
    while aio.active_waits() and time.monotonic() < end:
        time.sleep(0.01)
    return aio.active_waits()


def _cpu():
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _put_later(name, msgs, delay):
    time.sleep(delay)
    with engine.Ring.attach(name) as r, r.producer() as p:
        for m in msgs:
            p.put(m, timeout=10)


def _append_later(path, values, delay):
    time.sleep(delay)
    with engine.Log(path, durability="none") as lg:
        for v in values:
            lg.append(v)


# ---------------------------------------------------------------- ring


def test_aget_fast_path_in_order(run):
    ring = engine.Ring(capacity=1 << 16)
    p, c = ring.producer(), ring.consumer()
    for i in range(100):
        p.put(i.to_bytes(4, "little"))

    async def main():
        got = [int.from_bytes(await c.aget(), "little") for _ in range(60)]
        got += [int.from_bytes(m, "little") for m in await c.aget_many(1000)]
        return got

    assert run(main()) == list(range(100))
    ring.close()


def test_aget_woken_by_another_process(run, shm_name):
    ring = engine.Ring.create(shm_name, capacity=1 << 16)
    c = ring.consumer()
    proc = CTX.Process(target=_put_later, args=(shm_name, [b"a", b"b", b"c"], 0.3))
    proc.start()

    async def main():
        t0 = time.monotonic()
        first = await c.aget(timeout=10)
        waited = time.monotonic() - t0
        rest = [await c.aget(timeout=10), await c.aget(timeout=10)]
        with pytest.raises(engine.Closed):  # the producer process closed its handle
            await c.aget(timeout=10)
        return [first] + rest, waited

    got, waited = run(main())
    proc.join(10)
    assert got == [b"a", b"b", b"c"]
    assert 0.2 < waited < 5
    assert _settled() == 0
    c.close()
    ring.close()


def test_timeouts(run):
    ring = engine.Ring(capacity=1 << 16)
    c = ring.consumer()
    ring.producer()

    async def main():
        t0 = time.monotonic()
        with pytest.raises(engine.Timeout):
            await c.aget(timeout=0.1)
        t1 = time.monotonic()
        assert await c.aget_many(10, timeout=0.1) == []
        t2 = time.monotonic()
        with pytest.raises(engine.Timeout):
            await c.aget(timeout=0)
        return t1 - t0, t2 - t1

    a, b = run(main())
    assert 0.09 < a < 2 and 0.09 < b < 2
    assert _settled() == 0
    ring.close()


def _threads_in_wait():
    """Waiter threads that are inside a handle's wait (registered on its
    futex) right now, from their Python stacks."""
    frames = sys._current_frames()
    out = []
    for t in threading.enumerate():
        if t.name != "engine-aio-waiter" or t.ident not in frames:
            continue
        stack = traceback.extract_stack(frames[t.ident])
        if any(fr.line and "job.wait(" in fr.line for fr in stack):
            out.append(t.name)
    return out


def test_cancel_mid_wait_loses_nothing_and_leaves_no_waiter(run, shm_name):
    ring = engine.Ring.create(shm_name, capacity=1 << 16)
    c = ring.consumer()

    async def main():
        task = asyncio.ensure_future(c.aget())
        await asyncio.sleep(0.2)
        assert not task.done()
        assert aio.active_waits() == 1
        # (between its 50 ms slices the thread is out for microseconds: retry)
        assert any(_threads_in_wait() for _ in range(5))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # the waiter thread drops the job and leaves the futex within a slice
        await asyncio.sleep(0.2)
        assert aio.active_waits() == 0
        assert _threads_in_wait() == []
        # a message put after the cancellation is received by the next await
        proc = CTX.Process(target=_put_later, args=(shm_name, [b"after"], 0.1))
        proc.start()
        got = await c.aget(timeout=10)
        proc.join(10)
        return got

    assert run(main()) == b"after"
    with pytest.raises(engine.Closed):  # nothing else arrived, nothing was duplicated
        c.try_get()
    st = ring.stats()
    assert st["messages_put"] == st["messages_got"] == 1
    c.close()
    ring.close()


def test_cancellation_race_loses_no_message(run):
    """Timeouts (cancellations) racing with puts from a thread: every message
    arrives exactly once, in order. The producer resumes right after each
    timeout, so its puts land while the next wait starts or is cancelled."""
    rounds, per_round = 40, 50
    ring = engine.Ring(capacity=1 << 12)
    p, c = ring.producer(), ring.consumer()
    timed_out = threading.Event()

    def producer():
        i = 0
        try:
            for r in range(rounds):
                for _ in range(per_round):
                    p.put(i.to_bytes(4, "little"), timeout=10)
                    i += 1
                    if i % 7 == r % 7:
                        time.sleep(0.0003)  # about the consumer's timeout: races it
                if not timed_out.wait(10):
                    return  # the consumer never timed out: the count check fails
                timed_out.clear()
        finally:
            p.close()

    async def main():
        t = threading.Thread(target=producer)
        t.start()
        got = []
        cancels = 0
        while True:
            try:
                got.append(int.from_bytes(await asyncio.wait_for(c.aget(), 0.0005), "little"))
            except asyncio.TimeoutError:
                cancels += 1
                timed_out.set()
            except engine.Closed:
                break
        t.join()
        return got, cancels

    got, cancels = run(main())
    assert got == list(range(rounds * per_round))
    assert cancels >= rounds
    assert _settled() == 0
    ring.close()


def test_async_for_until_closed(run):
    ring = engine.Ring(capacity=1 << 12)
    p, c = ring.producer(), ring.consumer()

    def producer():
        for i in range(500):
            p.put(b"%d" % i, timeout=10)
        p.close()

    async def main():
        t = threading.Thread(target=producer)
        t.start()
        out = [m async for m in c]
        t.join()
        return out

    assert run(main()) == [b"%d" % i for i in range(500)]
    ring.close()


def test_aput_waits_for_room(run):
    ring = engine.Ring(capacity=4096)
    p, c = ring.producer(), ring.consumer()
    msg = b"x" * 1000
    while p.try_put(msg):
        pass
    full = ring.stats()["messages_put"]

    async def main():
        with pytest.raises(engine.Timeout):
            await p.aput(msg, timeout=0.1)
        # cancelled while waiting: the message is not put
        task = asyncio.ensure_future(p.aput(b"C" * 1000))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        threading.Timer(0.2, lambda: c.get_many(2)).start()
        t0 = time.monotonic()
        await p.aput(b"L" * 1000, timeout=10)
        return time.monotonic() - t0

    waited = run(main())
    assert 0.1 < waited < 5
    rest = c.get_many(100)
    assert rest[-1] == b"L" * 1000 and b"C" * 1000 not in rest
    assert ring.stats()["messages_put"] == full + 1
    assert _settled() == 0
    ring.close()


def test_second_waiter_on_same_handle_is_refused(run):
    ring = engine.Ring(capacity=4096)
    c = ring.consumer()
    ring.producer()

    async def main():
        t = asyncio.ensure_future(c.aget())
        await asyncio.sleep(0.05)
        with pytest.raises(RuntimeError):
            await c.aget()
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t

    run(main())
    assert _settled() == 0
    ring.close()


def test_idle_awaiting_consumer_uses_no_cpu(run, shm_name):
    ring = engine.Ring.create(shm_name, capacity=1 << 16)
    c = ring.consumer()

    async def main():
        task = asyncio.ensure_future(c.aget())
        await asyncio.sleep(0.1)  # settle: the wait is registered
        c0, w0 = _cpu(), time.monotonic()
        await asyncio.sleep(2.0)
        used = (_cpu() - c0) / (time.monotonic() - w0)
        assert not task.done()
        proc = CTX.Process(target=_put_later, args=(shm_name, [b"wake"], 0))
        proc.start()
        got = await asyncio.wait_for(task, 10)
        proc.join(10)
        return used, got

    used, got = run(main())
    assert got == b"wake"
    assert used < 0.02, f"idle awaiting consumer used {used:.1%} of a CPU"
    c.close()
    ring.close()


# ---------------------------------------------------------------- log


def test_apoll_woken_by_writer_process(run, tmp_path):
    path = str(tmp_path / "log")
    engine.Log(path, durability="none").close()
    r = engine.LogReader(path)
    proc = CTX.Process(target=_append_later, args=(path, [b"v0", b"v1", b"v2"], 0.3))
    proc.start()

    async def main():
        assert await r.apoll(timeout=0.05) is None
        first = await r.apoll(timeout=10)
        rest = []
        async for rec in r:
            rest.append(rec)
            if len(rest) == 2:
                break
        return [first] + rest

    recs = run(main())
    proc.join(10)
    assert [(x.offset, x.value) for x in recs] == [(0, b"v0"), (1, b"v1"), (2, b"v2")]
    assert _settled() == 0
    r.close()


def test_apoll_cancel_keeps_position_and_async_for_ends_on_close(run, tmp_path):
    path = str(tmp_path / "log")
    lg = engine.Log(path, durability="none")
    r = engine.LogReader(path)

    async def main():
        task = asyncio.ensure_future(r.apoll())
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        lg.append(b"kept")
        assert (await r.apoll(timeout=5)).value == b"kept"
        lg.append(b"tail")

        async def tail():
            return [rec.value async for rec in r]

        t = asyncio.ensure_future(tail())
        await asyncio.sleep(0.2)
        r.close()  # ends the async for (closing under a sleeping wait is safe)
        return await asyncio.wait_for(t, 5)

    assert run(main()) == [b"tail"]
    assert _settled() == 0
    lg.close()


def test_idle_awaiting_reader_uses_no_cpu(run, tmp_path):
    path = str(tmp_path / "log")
    lg = engine.Log(path, durability="none")
    r = engine.LogReader(path)

    async def main():
        task = asyncio.ensure_future(r.apoll())
        await asyncio.sleep(0.1)
        c0, w0 = _cpu(), time.monotonic()
        await asyncio.sleep(2.0)
        used = (_cpu() - c0) / (time.monotonic() - w0)
        lg.append(b"wake")
        return used, (await asyncio.wait_for(task, 5)).value

    used, got = run(main())
    assert got == b"wake"
    assert used < 0.02, f"idle awaiting reader used {used:.1%} of a CPU"
    r.close()
    lg.close()


# ---------------------------------------------------------------- scheduling


def test_priority_queue_aget(run):
    pq = engine.PriorityQueue(levels=3)

    async def main():
        threading.Timer(0.2, lambda: pq.put(b"late", priority=2)).start()
        first = await aio.aget(pq, timeout=10)
        for i, prio in enumerate([2, 0, 1]):
            pq.put(b"m%d" % i, priority=prio)
        order = [await aio.aget(pq, timeout=5) for _ in range(3)]
        with pytest.raises(engine.Timeout):
            await aio.aget(pq, timeout=0.1)
        pq.put(b"delayed", delay=0.2)
        t0 = time.monotonic()
        d = await aio.aget(pq, timeout=5)
        return first, order, d, time.monotonic() - t0

    first, order, d, waited = run(main())
    assert first == b"late"
    assert order == [b"m1", b"m2", b"m0"]
    assert d == b"delayed" and 0.19 < waited < 2
    assert _settled() == 0
    pq.close()


def test_durable_queues_aget(run, tmp_path):
    pq = engine.PriorityQueue(levels=2, durable=True, path=str(tmp_path / "pq"), segment_bytes=SEG)
    kq = engine.KeyedQueue(partitions=2, durable=True, path=str(tmp_path / "kq"), segment_bytes=SEG)

    async def main():
        threading.Timer(0.2, lambda: pq.put(b"p", priority=1)).start()
        a = await aio.aget(pq, timeout=10)
        threading.Timer(0.2, lambda: kq.put(b"k", key=3)).start()
        b = await aio.aget(kq, timeout=10)
        with pytest.raises(engine.Timeout):
            await aio.aget(pq, timeout=0.1)
        return a, b

    assert run(main()) == (b"p", b"k")
    assert _settled() == 0
    pq.close()
    kq.close()


@pytest.mark.parametrize("kind", ["priority", "priority-durable", "keyed", "keyed-durable"])
def test_awaited_delayed_message_wakes_at_its_due_time(run, tmp_path, kind):
    # The waiter sleeps until the held delayed message's due time, not in
    # fixed polling ticks (which made it late, or woke it every 5 ms).
    DELAY = 1.0  # s: room for a slow first put (it opens the logs) on a loaded machine
    durable = kind.endswith("durable")
    kw = {"durable": True, "path": str(tmp_path / "q"), "durability": "none", "segment_bytes": SEG} if durable else {}
    q = engine.PriorityQueue(levels=2, **kw) if kind.startswith("priority") else engine.KeyedQueue(partitions=2, **kw)
    put_at = time.monotonic()  # the due time counts from the call
    if kind.startswith("priority"):
        q.put(b"d", priority=1, delay=DELAY)
    else:
        q.put(b"d", key=1, delay=DELAY)
    target = aio._target(q)
    assert target.try_get() is None  # not due: now held by this consumer
    tick = aio._waiting(target)[2]
    if kind == "priority":
        assert tick is not None and DELAY / 2 < tick <= DELAY  # nothing else to poll for
    else:
        assert tick is not None and tick <= 0.05  # rebalancing / re-reading the logs
    time.sleep(max(0.0, put_at + DELAY - 0.02 - time.monotonic()))
    tick = aio._waiting(target)[2]
    assert tick is not None and tick <= 0.025  # wakes at the due time

    async def main():
        m = await aio.aget(q, timeout=5)
        return m, time.monotonic() - put_at

    m, waited = run(main())
    assert m == b"d" and DELAY - 0.01 <= waited < DELAY + 2  # never early
    assert _settled() == 0
    q.close()


def test_keyed_queue_aget_many_and_async_for(run):
    kq = engine.KeyedQueue(partitions=2)

    async def main():
        def producer():
            for i in range(300):
                kq.put(b"%d" % i, key=i % 3)
            kq.close_put()

        threading.Timer(0.1, producer).start()
        first = await aio.aget_many(kq, 50, timeout=10)
        rest = [m async for m in aio.aiter_messages(kq)]
        return first + rest

    got = run(main())
    assert sorted(got, key=int) == [b"%d" % i for i in range(300)]
    for k in range(3):  # per key, in order
        mine = [int(m) for m in got if int(m) % 3 == k]
        assert mine == sorted(mine)
    assert _settled() == 0
    kq.close()


# ---------------------------------------------------------------- bench section


def test_bench_section_verifies_at_small_n():
    from engine.bench import aio as bench_aio
    from engine.bench.harness import LATENCY, OK, SKIPPED, Profile, run_case

    profile = Profile(messages=50, repeat=1)
    cases = bench_aio.cases(profile)
    round_trip = {"engine.Ring aget (2 spsc rings)", "asyncio Unix socket streams"}
    expected = {
        "async round trip": round_trip,
        "async round trip, idle echo": round_trip,
        "delayed delivery, awaited": {"engine.KeyedQueue delay + aget", "asyncio call_later + Queue"},
    }
    assert [c.name for c in cases] == list(expected)
    for case in cases:
        res = run_case(case, "aio", profile, skipped_lines=[])
        ran = [c for c in res.contenders if c.status != SKIPPED]
        assert {c.name for c in ran} >= expected[case.name]
        for c in ran:
            assert c.status == OK, f"{case.name} / {c.name}: {c.reason}"
            assert [r.count for r in c.runs] == [case.workload.count]
        assert case.kind == LATENCY
        assert all(c.latency()["samples"] == case.workload.count for c in ran)
