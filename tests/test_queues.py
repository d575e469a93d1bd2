"""engine.Queue / JoinableQueue / SimpleQueue: multiprocessing's semantics,
across threads and processes (fork, spawn, forkserver, Pool initializers),
robust locks, hostile regions, the region's lifetime."""

from __future__ import annotations

import asyncio
import mmap
import multiprocessing as mp
import os
import pickle
import queue
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections import defaultdict

import numpy as np
import pytest
import test_queues_kit as kit

import engine
from engine import JoinableQueue, Queue, SimpleQueue
from engine._mpq import SHM_DIR

# header offsets (pyx/mpq_layout.h, static_asserted there)
PLOCK, PROD, CLOCK, CONS = 128, 256, 384, 512


def _raw(q):
    """A writable map of q's region, for tests that play a crashed or hostile process."""
    fd = os.open(os.path.join(SHM_DIR, q.name), os.O_RDWR)
    try:
        return mmap.mmap(fd, 0)
    finally:
        os.close(fd)


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_objects_round_trip():
    q = Queue(capacity=1 << 22)
    big = bytes(range(256)) * 1024  # > the no-GIL copy threshold
    arr = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    items = [
        (1, "two", 3.0),
        {"k": [1, 2, {"n": None}]},
        b"",
        b"raw bytes",
        big,
        bytearray(b"out of band"),
        arr,
        {"nested": [arr, np.zeros(0, np.uint8)]},
        arr[:, ::2],  # not contiguous: travels in-band
        "unicode \u00e9\u4e2d",
        None,
    ]
    for it in items:
        q.put(it)
    assert q.qsize() == len(items)
    for it in items:
        got = q.get(timeout=5)
        assert type(got) is type(it)
        if isinstance(it, np.ndarray):
            assert got.dtype == it.dtype and got.shape == it.shape
            assert np.array_equal(got, it)
            got[...] = 0  # received arrays are the receiver's own, writable
        elif isinstance(it, dict) and "nested" in it:
            assert np.array_equal(got["nested"][0], arr) and got["nested"][1].size == 0
        else:
            assert got == it
    assert q.empty() and q.qsize() == 0


def test_empty_full_timeouts_and_nowait():
    q = Queue(maxsize=2)
    assert q.empty() and not q.full()
    with pytest.raises(queue.Empty):
        q.get_nowait()
    with pytest.raises(queue.Empty):
        q.get(block=False)
    t0 = time.monotonic()
    with pytest.raises(queue.Empty):
        q.get(timeout=0.2)
    assert time.monotonic() - t0 >= 0.19
    q.put(1)
    q.put_nowait(2)
    assert q.full() and q.qsize() == 2 and not q.empty()
    with pytest.raises(queue.Full):
        q.put_nowait(3)
    t0 = time.monotonic()
    with pytest.raises(queue.Full):
        q.put(3, timeout=0.2)
    assert time.monotonic() - t0 >= 0.19
    assert [q.get(), q.get()] == [1, 2]
    assert issubclass(engine.queues.Empty, queue.Empty)


def test_blocked_put_and_get_wake_across_threads():
    q = Queue(maxsize=1)
    q.put("a")
    threading.Timer(0.2, q.get).start()
    t0 = time.monotonic()
    q.put("b", timeout=10)  # wakes when the timer thread takes "a"
    assert 0.15 < time.monotonic() - t0 < 5
    assert q.get() == "b"
    threading.Timer(0.2, q.put, args=("c",)).start()
    assert q.get(timeout=10) == "c"


def test_capacity_bounds_bytes_and_big_messages_are_refused():
    q = Queue(capacity=4096)
    with pytest.raises(ValueError, match="capacity="):
        q.put(b"x" * 4096)
    n = 0
    with pytest.raises(queue.Full):
        while True:
            q.put_nowait(b"y" * 500)
            n += 1
    assert 4 <= n <= 8  # 4 KiB of 512-byte records
    assert [q.get() for _ in range(n)] == [b"y" * 500] * n


def test_close_then_valueerror_and_join_thread():
    q = Queue()
    other = pickle.loads(pickle.dumps(q))
    with pytest.raises(AssertionError):
        q.join_thread()
    q.put(1)
    q.close()
    q.join_thread()
    q.cancel_join_thread()
    with pytest.raises(ValueError, match="closed"):
        q.put(2)
    with pytest.raises(ValueError, match="closed"):
        q.get()
    assert q.qsize() == 1
    assert other.get() == 1  # other handles keep working


def test_put_many_is_atomic_and_get_many_bounded():
    q = Queue(maxsize=5)
    q.put(0)
    with pytest.raises(queue.Full):
        q.put_many([1, 2, 3, 4, 5], block=False)  # 6 > maxsize: all or nothing
    assert q.qsize() == 1
    q.put_many([1, 2, 3, 4])
    assert q.get_many(max_messages_to_get=3) == [0, 1, 2]
    assert q.get_many() == [3, 4]
    with pytest.raises(queue.Empty):
        q.get_many(timeout=0.05)
    with pytest.raises(ValueError):
        q.put_many(range(6))  # can never fit maxsize=5


def test_joinable_task_done_and_join():
    q = JoinableQueue()
    with pytest.raises(ValueError, match="too many"):
        q.task_done()
    q.put_many(["a", "b"])
    q.join_done = False

    def joiner():
        q.join()
        q.join_done = True

    t = threading.Thread(target=joiner)
    t.start()
    q.get()
    q.task_done()
    time.sleep(0.1)
    assert not q.join_done
    q.get()
    q.task_done()
    t.join(10)
    assert q.join_done
    with pytest.raises(ValueError):
        q.task_done()


def test_simple_queue():
    q = SimpleQueue()
    assert q.empty()
    q.put([1, 2])
    assert not q.empty()
    assert q.get() == [1, 2]
    q.close()
    with pytest.raises(ValueError):
        q.get()


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_child_processes_get_the_queue_as_an_argument(method):
    ctx = mp.get_context(method)
    q_in, q_out = Queue(), JoinableQueue()
    kids = [ctx.Process(target=kit.echo_child, args=(q_in, q_out, 5)) for _ in range(2)]
    for k in kids:
        k.start()
    for i in range(10):
        q_in.put(("job", i, np.full(3, i)))
    got = [q_out.get(timeout=60) for _ in range(10)]
    for k in kids:
        k.join(60)
        assert k.exitcode == 0
    assert {pid for pid, _ in got} <= {k.pid for k in kids}
    jobs = sorted(((m[1], m[2].tolist()) for _, m in got), key=lambda t: t[0])
    assert jobs == [(i, [i, i, i]) for i in range(10)]
    assert q_out.qsize() == 0 and q_in.empty()


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_pool_initializer(method):
    ctx = mp.get_context(method)
    q = Queue()
    with ctx.Pool(2, initializer=kit.pool_init, initargs=(q,)) as pool:
        assert sorted(pool.map(kit.pool_work, range(8))) == list(range(8))
    assert sorted(q.get(timeout=10)[1] for _ in range(8)) == [x * x for x in range(8)]


def test_fork_inherited_handle_is_usable():
    q = JoinableQueue()
    q.put("from parent")
    pid = os.fork()
    if pid == 0:  # the child uses the inherited handle, as with multiprocessing
        code = 1
        try:
            if q.get(timeout=10) == "from parent":
                q.task_done()
                q.put("from child")
                code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert q.get(timeout=10) == "from child"
    q.task_done()
    q.join()
    assert os.path.exists(os.path.join(SHM_DIR, q.name))  # the child did not remove it


def test_many_producers_many_consumers_every_message_once_in_order_per_producer():
    ctx = mp.get_context("fork")
    q, out = Queue(capacity=1 << 16), Queue()
    n, producers, consumers = 3000, 4, 3
    ps = [ctx.Process(target=kit.produce, args=(q, t, n, True)) for t in range(producers)]
    cs = [ctx.Process(target=kit.consume_until_none, args=(q, out)) for _ in range(consumers)]
    for p in ps + cs:
        p.start()
    for p in ps:
        p.join(120)
        assert p.exitcode == 0
    for _ in cs:
        q.put(None)
    results = [out.get(timeout=120) for _ in cs]
    for c in cs:
        c.join(60)
        assert c.exitcode == 0
    seen = defaultdict(list)
    for got in results:
        last = {}
        for tag, seq, payload in got:
            assert seq > last.get(tag, -1), "a consumer saw one producer's messages out of order"
            last[tag] = seq
            assert payload == ("array" if seq % 7 == 0 else f"m{seq}")
            seen[tag].append(seq)
    for t in range(producers):
        assert sorted(seen[t]) == list(range(n)), f"producer {t}: lost or duplicated"


def test_many_threads_share_one_handle():
    q = Queue(maxsize=50, capacity=1 << 16)
    n, producers, consumers = 2000, 4, 4
    got = [[] for _ in range(consumers)]

    def produce(t):
        for i in range(n):
            q.put((t, i, b"x" * (i % 300)), timeout=30)

    def consume(c):
        while True:
            item = q.get(timeout=30)
            if item is None:
                return
            got[c].append(item)

    ts = [threading.Thread(target=produce, args=(t,)) for t in range(producers)]
    cs = [threading.Thread(target=consume, args=(c,)) for c in range(consumers)]
    for t in ts + cs:
        t.start()
    for t in ts:
        t.join(60)
    for _ in cs:
        q.put(None)
    for c in cs:
        c.join(60)
    seen = defaultdict(list)
    for items in got:
        last = {}
        for t, i, body in items:
            assert body == b"x" * (i % 300) and i > last.get(t, -1)
            last[t] = i
            seen[t].append(i)
    assert {t: sorted(v) for t, v in seen.items()} == {t: list(range(n)) for t in range(producers)}


def test_a_dead_lock_holder_is_taken_over_and_its_half_commit_rolled_back():
    q = Queue()
    q.put("kept")
    raw = _raw(q)
    dead = _dead_pid()
    # a producer that died holding the lock, after storing the new count but
    # before the commit point (pos): the count must roll back
    tail, count = struct.unpack_from("<QQ", raw, PROD)
    struct.pack_into("<QQQQQ", raw, PROD, tail, count + 1, tail + 64, count + 1, count)
    struct.pack_into("<IIQ", raw, PLOCK, dead, 0, 0)
    assert q.qsize() == 2  # what the dead holder left
    t0 = time.monotonic()
    q.put("after", timeout=10)
    assert time.monotonic() - t0 < 5
    assert q.stats()["producer_lock_takeovers"] == 1
    assert q.qsize() == 2
    # a consumer that died after its commit point but before the count
    q2 = Queue()
    q2.put("x")
    q2.put("y")
    raw2 = _raw(q2)
    h2, c2 = struct.unpack_from("<QQ", raw2, CONS)
    first = 8 + 8 * ((len(pickle.dumps("x", 5)) + 7) // 8)
    struct.pack_into("<QQQQQ", raw2, CONS, h2 + first, c2, h2 + first, c2 + 1, c2)
    struct.pack_into("<IIQ", raw2, CLOCK, dead, 0, 0)
    assert q2.get(timeout=10) == "y"
    assert q2.stats()["consumer_lock_takeovers"] == 1
    assert q2.qsize() == 0 and q2.stats()["got"] == 2
    assert [q.get(), q.get()] == ["kept", "after"]
    raw.close()
    raw2.close()


def test_a_live_lock_holder_is_waited_for():
    q = Queue()
    raw = _raw(q)
    struct.pack_into("<IIQ", raw, PLOCK, os.getppid(), 0, 0)  # alive: never taken over
    with pytest.raises(queue.Full):
        q.put(1, timeout=0.2)
    struct.pack_into("<IIQ", raw, PLOCK, 0, 0, 0)
    q.put(1, timeout=1)
    raw.close()


def test_a_holder_in_another_pid_namespace_is_never_judged_by_its_pid():
    q = Queue()
    raw = _raw(q)
    my_ns = os.stat("/proc/self/ns/pid").st_ino
    struct.pack_into("<IIQQQ", raw, PLOCK, _dead_pid(), 0, 0, 0, my_ns + 1)
    with pytest.raises(queue.Full):
        q.put(1, timeout=0.3)  # its pid names nobody here, yet it may be alive
    assert q.stats()["producer_lock_takeovers"] == 0
    struct.pack_into("<Q", raw, PLOCK + 24, my_ns)  # the same namespace: dead, taken over
    q.put(1, timeout=5)
    assert q.stats()["producer_lock_takeovers"] == 1
    raw.close()


def test_hostile_region_is_refused_not_crashed():
    q = Queue(capacity=4096)
    q.put(b"abc")
    raw = _raw(q)
    data = 1024
    struct.pack_into("<II", raw, data, 1 << 30, 2)  # length past everything
    with pytest.raises(engine.IncompatibleRegion, match="corrupt"):
        q.get_nowait()
    struct.pack_into("<II", raw, data, 3, 9)  # unknown kind
    with pytest.raises(engine.IncompatibleRegion, match="corrupt"):
        q.get_nowait()
    struct.pack_into("<II", raw, data, 40, 3)  # out-of-band table beyond its record
    struct.pack_into("<IIQ", raw, data + 8, 1000, 0, 1 << 40)
    struct.pack_into("<Q", raw, PROD, 48)
    with pytest.raises(engine.IncompatibleRegion, match="corrupt"):
        q.get_nowait()
    struct.pack_into("<Q", raw, 0, 0xDEAD)  # bad magic
    with pytest.raises(engine.IncompatibleRegion, match="magic"):
        pickle.loads(pickle.dumps(q))
    raw.close()


_LIFETIME = textwrap.dedent("""
    import multiprocessing as mp, os, signal, sys, time
    import engine
    def child(q):
        q.put(os.getpid())
    if __name__ == "__main__":
        ctx = mp.get_context(sys.argv[1])
        q = engine.Queue()
        print(q.name, flush=True)
        p = ctx.Process(target=child, args=(q,))
        p.start(); q.get(timeout=60); p.join()
        if sys.argv[2] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
""")


@pytest.mark.parametrize("method", ["fork", "spawn"])
@pytest.mark.parametrize("end", ["exit", "kill"])
def test_nothing_is_left_in_dev_shm(tmp_path, method, end):
    script = tmp_path / "life.py"
    script.write_text(_LIFETIME)
    res = subprocess.run([sys.executable, str(script), method, end], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == (-signal.SIGKILL if end == "kill" else 0), res.stderr
    name = res.stdout.split()[0]
    assert name.startswith("eq-")
    path = os.path.join(SHM_DIR, name)
    deadline = time.monotonic() + 30  # the resource tracker cleans up after a kill
    while os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(path)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_child_process_that_created_a_queue_removes_it_when_it_exits(method):
    ctx = mp.get_context(method)
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=kit.make_queue_and_exit, args=(send,))
    p.start()
    name = recv.recv()
    p.join(60)
    assert p.exitcode == 0
    assert not os.path.exists(os.path.join(SHM_DIR, name))


def test_garbage_collected_creator_removes_its_region():
    q = Queue()
    path = os.path.join(SHM_DIR, q.name)
    assert os.path.exists(path)
    del q
    assert not os.path.exists(path)


def test_aget_aput():
    async def main():
        q = Queue(maxsize=1)
        with pytest.raises(queue.Empty):
            await q.aget(timeout=0.05)
        await q.aput("a")
        with pytest.raises(queue.Full):
            await q.aput("b", timeout=0.05)
        waiter = asyncio.ensure_future(q.aget(timeout=10))
        await asyncio.sleep(0.01)
        assert await waiter == "a"
        loop = asyncio.get_running_loop()
        loop.call_later(0.1, q.put, "late")
        assert await q.aget(timeout=10) == "late"
        await q.aput("c")
        putter = asyncio.ensure_future(q.aput("d", timeout=10))
        await asyncio.sleep(0.05)
        assert q.get() == "c"
        await putter
        assert q.get() == "d"

    asyncio.run(main())
