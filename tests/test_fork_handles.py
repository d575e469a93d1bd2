"""fork() with live handles: what a child inherits is inert.

A forked child that drops, closes or uses an inherited ring producer or
consumer, a scheduling queue, a keyed-queue group member or a counter
sender must never touch the parent's roles, slots or group membership;
using one raises an EngineError that says to attach anew, and attaching
anew in the child works.
"""

from __future__ import annotations

import gc
import os
import struct
import sys
import traceback

import numpy as np
import pytest

import engine
from engine.counters import CounterAggregator, CounterSender
from engine.scheduling import KeyedQueue, PriorityQueue

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")


def _in_child(fn) -> str:
    """Run fn() in a forked child; return what it reported ("ok" or the
    failure). The child never returns into pytest."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        try:
            fn()
            msg = b"ok"
        except BaseException:  # noqa: BLE001 - reported to the parent
            msg = traceback.format_exc().encode()
        os.write(w, msg[:60000])
        os._exit(0)
    os.close(w)
    chunks = []
    while True:
        b = os.read(r, 65536)
        if not b:
            break
        chunks.append(b)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status), f"child died: status {status}"
    return b"".join(chunks).decode()


def _raises_inherited(call) -> None:
    try:
        call()
    except engine.EngineError as exc:
        assert "fork" in str(exc) and "attach anew" in str(exc), str(exc)
    else:
        raise AssertionError(f"{call} worked on an inherited handle")


@pytest.mark.parametrize("mode", ["spsc", "broadcast", "shared"])
@pytest.mark.parametrize("how", ["del", "close", "with"])
def test_child_that_drops_inherited_handles_leaves_the_parents_roles(shm_name, mode, how):
    n = 1 if mode == "spsc" else 2
    ring = engine.Ring.create(shm_name, capacity=1 << 16, mode=mode, max_consumers=n)
    p = ring.producer()
    c = ring.consumer()
    p.put(b"before")

    def child():
        nonlocal p, c
        if how == "del":
            del p, c
            gc.collect()
        elif how == "close":
            p.close()
            c.close()
        else:
            with p, c:
                pass
        ring.close()

    assert _in_child(child) == "ok"
    st = ring.stats()
    assert st["producer_pid"] == os.getpid()
    assert not st["closed"]
    assert [x["pid"] for x in st["consumers"]] == [os.getpid()]
    with pytest.raises(engine.EngineError, match="already has a live producer"):
        ring.producer()
    # the parent's handles go on as if nothing happened
    p.put(b"after")
    assert c.get(timeout=1) == b"before"
    assert c.get(timeout=1) == b"after"
    p.close()
    with pytest.raises(engine.Closed):
        c.get(timeout=1)


def test_child_that_exits_normally_leaves_the_parents_roles(shm_name):
    """The child runs its interpreter's shutdown (finalisers, module teardown)."""
    ring = engine.Ring.create(shm_name, capacity=1 << 16)
    p, c = ring.producer(), ring.consumer()
    pid = os.fork()
    if pid == 0:
        try:
            del p, c
        finally:
            # a normal interpreter exit would run pytest's teardown here;
            # run the finalisers the way it does, then leave
            gc.collect()
            sys.stdout.flush()
            os._exit(0)
    os.waitpid(pid, 0)
    st = ring.stats()
    assert st["producer_pid"] == os.getpid()
    assert len(st["consumers"]) == 1


def test_inherited_handles_raise_and_attaching_anew_works(shm_name):
    ring = engine.Ring.create(shm_name, capacity=1 << 16, mode="broadcast", max_consumers=2)
    p, c = ring.producer(), ring.consumer()
    p.put(b"m" * 16)

    def child():
        for call in (lambda: p.put(b"x"), lambda: p.try_put(b"x"), lambda: p.put_many([b"x"]),
                     lambda: p.put_array(np.zeros((2, 8), np.uint8)), lambda: p.wait_space(8),
                     c.try_get, lambda: c.get(timeout=0), lambda: c.get_many(4),
                     lambda: c.get_array(4), lambda: c.get_view(timeout=0),
                     lambda: c.wait(timeout=0)):
            _raises_inherited(call)
        # a fresh handle made in this process works (the producer role
        # stays with the parent, which is alive)
        mine = engine.Ring.attach(shm_name).consumer()
        assert mine.get(timeout=1) == b"m" * 16  # broadcast: it joins at the floor
        with pytest.raises(engine.EngineError, match="live producer"):
            engine.Ring.attach(shm_name).producer()
        mine.close()

    assert _in_child(child) == "ok"
    # nothing was consumed or put by the child's attempts
    assert c.get(timeout=1) == b"m" * 16
    assert c.try_get() is None
    assert ring.stats()["messages_put"] == 1


def test_private_ring_handles_are_inert_in_the_child_too():
    ring = engine.Ring(1 << 16)
    p, c = ring.producer(), ring.consumer()

    def child():
        _raises_inherited(lambda: p.put(b"x"))
        _raises_inherited(c.try_get)
        ring.close()  # closes the handles made from it: inert, no shared write

    assert _in_child(child) == "ok"
    st = ring.stats()
    assert st["producer_pid"] == os.getpid() and not st["closed"]
    assert len(st["consumers"]) == 1
    p.put(b"still mine")
    assert c.get(timeout=1) == b"still mine"


def test_priority_queue_inherited_by_a_child_is_inert(shm_name):
    pq = PriorityQueue.create(shm_name, levels=2, max_consumers=2)
    pq.put(b"a", priority=1)
    assert pq.get(timeout=1) == b"a"  # producer and consumer roles are now held
    rings_before = [r.stats() for r in pq._rings]

    def child():
        _raises_inherited(lambda: pq.put(b"x"))
        _raises_inherited(pq.try_get)
        _raises_inherited(lambda: pq.get(timeout=0))
        _raises_inherited(pq.close_put)
        pq.close()

    assert _in_child(child) == "ok"
    rings_after = [r.stats() for r in pq._rings]
    for before, after in zip(rings_before, rings_after):
        assert after["producer_pid"] == before["producer_pid"] == os.getpid()
        assert not after["closed"]
        assert [x["pid"] for x in after["consumers"]] == [x["pid"] for x in before["consumers"]]
    pq.put(b"b", priority=0)
    assert pq.get(timeout=1) == b"b"
    pq.close()


def test_keyed_group_member_inherited_by_a_child_is_inert(shm_name):
    kq = KeyedQueue.create(shm_name, partitions=2)
    member = kq.consumer()
    kq.put(b"k1", key="x")
    assert member.get(timeout=1) == b"k1"  # owns the partitions now
    owners = [kq._region.owner(p) for p in range(2)]
    assert owners == [member.token] * 2

    def child():
        _raises_inherited(member.try_get)
        _raises_inherited(lambda: member.get(timeout=0))
        _raises_inherited(lambda: kq.put(b"x", key="x"))
        _raises_inherited(kq.close_put)
        member.close()
        kq.close()

    assert _in_child(child) == "ok"
    st = kq.stats()
    assert [m["token"] for m in st["members"]] == [member.token]
    assert st["owners"] == owners
    assert not kq._region.closed  # the stream was not ended by the child
    kq.put(b"k2", key="x")
    assert member.get(timeout=1) == b"k2"
    kq.close()


def test_counter_sender_and_aggregator_inherited_by_a_child_are_inert(shm_name):
    agg = CounterAggregator.create(shm_name)
    sender = CounterSender.attach(shm_name, batch=1_000_000)
    sender.add("k", 2)
    sender.flush()

    def child():
        sender.add("k", 5)
        _raises_inherited(sender.flush)
        _raises_inherited(lambda: agg.drain(timeout=0))
        sender._pending.clear()
        sender.close()  # flush of nothing, then an inert producer close
        agg.close()

    assert _in_child(child) == "ok"
    assert agg.drain(timeout=1) == 1
    assert agg.target.get("k") == 2
    sender.add("k", 1)
    sender.close()  # the parent's close ends the stream
    assert agg.run() == 1
    assert agg.target.get("k") == 3


def test_fork_generation_counts_forks():
    from engine import _sched

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(w, struct.pack("<I", _sched.fork_generation()))
        os._exit(0)
    os.waitpid(pid, 0)
    child_gen = struct.unpack("<I", os.read(r, 4))[0]
    os.close(r)
    os.close(w)
    assert child_gen == _sched.fork_generation() + 1


def _await_in_child(name, c, ready, q):
    import asyncio

    async def main():
        try:
            await asyncio.wait_for(c.aget(), 3)  # inherited: an error, never a hang
        except engine.EngineError as exc:
            assert "attach anew" in str(exc)
        else:
            raise AssertionError("an inherited consumer was awaited")
        mine = engine.Ring.attach(name).consumer()  # attached anew: a fresh waiter thread
        ready.set()
        while True:  # it joins at the retention floor: older messages may come first
            msg = await asyncio.wait_for(mine.aget(), 5)
            if msg == b"child":
                return msg

    try:
        q.put(asyncio.run(main()))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        q.put(repr(exc))


def test_forked_child_awaits_a_handle_attached_anew(shm_name):
    """The parent's aio waiter threads do not survive fork: awaiting an
    inherited handle fails at once, and a handle attached anew in the child
    gets a waiter of its own."""
    import asyncio
    import multiprocessing as mp
    import threading

    from engine import aio

    ctx = mp.get_context("fork")
    ring = engine.Ring.create(shm_name, capacity=4096, mode="broadcast", max_consumers=2)
    p, c = ring.producer(), ring.consumer()

    async def main():
        threading.Timer(0.2, lambda: p.put(b"parent")).start()
        return await c.aget(timeout=5)

    assert asyncio.run(main()) == b"parent"
    assert aio._waiters  # an idle waiter thread is kept in the parent
    ready, q = ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=_await_in_child, args=(shm_name, c, ready, q))
    proc.start()
    assert ready.wait(10)
    p.put(b"child")
    got = q.get(timeout=30)
    proc.join(10)
    assert got == b"child"
    assert c.get(timeout=1) == b"child"  # the parent's consumer is untouched
