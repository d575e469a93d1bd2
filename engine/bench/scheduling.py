"""The scheduling section of ``queue-engine bench``: PriorityQueue and KeyedQueue.

Cases (every contender moves the same payloads, verified by count + checksum):

* ``priority 3 levels, 1 process``: put+get through 3 priority levels
  (message i at level i % 3), in rounds of ``ROUND`` puts then ``ROUND``
  gets, against :class:`queue.PriorityQueue` (``(level, seq, msg)`` tuples),
  :mod:`heapq` under a lock, and a :class:`collections.deque` per level
  under a lock (a bound method of each, looked up once, like ours).
* ``priority 3 levels, 2 processes``: a producer process and a consumer
  process; ours (a shared PriorityQueue) against one
  :class:`multiprocessing.Queue` per level (the consumer polls the levels
  in order with ``get_nowait`` and, when all are empty, sleeps on all three
  pipes at once with ``multiprocessing.connection.wait``).
* ``keyed 1 -> 2 processes``: a KeyedQueue (8 partitions) with two consumer
  processes against one multiprocessing.Queue per consumer with the key
  hashed to a consumer (how per-key order is usually kept with it).

Order is per level / per key, not global, so these cases are ``ordered=False``.
"""

from __future__ import annotations

import heapq
import os
import queue
import threading
import time
import uuid
from collections import deque
from typing import Any, List, Optional, Tuple

from engine.bench import peers
from engine.bench.harness import Case, Contender, Profile, Run, Target, Workload, digest

SECTION = "scheduling"
# the cases the quick profile runs (fewer cases, never shorter windows); --full runs all
QUICK = ("priority 3 levels, 2 processes",)
LEVELS = 3
ROUND = 4096  # puts, then gets, per round (bounded memory for every contender)
KEYS = 1000
PARTITIONS = 8
CAPACITY = 1 << 22


def _name() -> str:
    return f"qe-bench-sched-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _levels(n: int) -> List[int]:
    return [i % LEVELS for i in range(n)]


# ---------------------------------------------------------------------------
# one process
# ---------------------------------------------------------------------------


def _one_process(
    put: Any, get: Any, msgs: List[bytes], prio: List[int]
) -> Tuple[int, int, List[bytes]]:
    out: List[bytes] = []
    append = out.append
    n = len(msgs)
    t0 = time.perf_counter_ns()
    for start in range(0, n, ROUND):
        end = min(n, start + ROUND)
        for i in range(start, end):
            put(msgs[i], prio[i])
        for _ in range(end - start):
            append(get())
    t1 = time.perf_counter_ns()
    return t0, t1, out


def ours_one_process(wl: Workload) -> Run:
    from engine import PriorityQueue

    msgs = wl.payloads()
    prio = _levels(len(msgs))
    with PriorityQueue(levels=LEVELS, capacity=CAPACITY) as pq:
        t0, t1, out = _one_process(pq.put, pq.try_get, msgs, prio)
    return Run.timed(t0, t1, digest(out))


def queue_priorityqueue(wl: Workload) -> Run:
    msgs = wl.payloads()
    prio = _levels(len(msgs))
    q: queue.PriorityQueue[Any] = queue.PriorityQueue()
    qput, qget = q.put, q.get_nowait
    seq = iter(range(1 << 62))

    def put(m: bytes, p: int) -> None:
        qput((p, next(seq), m))

    def get() -> bytes:
        return qget()[2]

    t0, t1, out = _one_process(put, get, msgs, prio)
    return Run.timed(t0, t1, digest(out))


def heapq_locked(wl: Workload) -> Run:
    msgs = wl.payloads()
    prio = _levels(len(msgs))
    heap: List[Any] = []
    lock = threading.Lock()
    push, pop = heapq.heappush, heapq.heappop
    seq = iter(range(1 << 62))

    def put(m: bytes, p: int) -> None:
        with lock:
            push(heap, (p, next(seq), m))

    def get() -> bytes:
        with lock:
            return pop(heap)[2]

    t0, t1, out = _one_process(put, get, msgs, prio)
    return Run.timed(t0, t1, digest(out))


def deque_per_level_locked(wl: Workload) -> Run:
    msgs = wl.payloads()
    prio = _levels(len(msgs))
    qs = [deque() for _ in range(LEVELS)]  # type: ignore[var-annotated]
    appends = [q.append for q in qs]
    lock = threading.Lock()

    def put(m: bytes, p: int) -> None:
        with lock:
            appends[p](m)

    def get() -> Optional[bytes]:
        with lock:
            for q in qs:
                if q:
                    return q.popleft()
        return None

    t0, t1, out = _one_process(put, get, msgs, prio)
    return Run.timed(t0, t1, digest(out))


# ---------------------------------------------------------------------------
# two processes: PriorityQueue vs a multiprocessing.Queue per level
# ---------------------------------------------------------------------------


def _pq_producer(wl: Workload, barrier: Any, name: str) -> int:
    from engine import PriorityQueue

    pq = PriorityQueue.attach(name)
    msgs = wl.payloads()
    prio = _levels(len(msgs))
    put = pq.put
    barrier.wait(peers.BARRIER_TIMEOUT)
    t0 = time.perf_counter_ns()
    for i in range(len(msgs)):
        put(msgs[i], prio[i])
    pq.close()  # the consumer drains, then gets Closed
    return t0


def _pq_consumer(wl: Workload, barrier: Any, name: str) -> Tuple[int, int, int, Optional[bool]]:
    from engine import Closed, PriorityQueue

    pq = PriorityQueue.attach(name)
    out: List[bytes] = []
    append = out.append
    get = pq.get
    pq.try_get()  # take the consumer role before the clock starts
    barrier.wait(peers.BARRIER_TIMEOUT)
    try:
        while True:
            append(get(30.0))
    except Closed:
        pass
    t1 = time.perf_counter_ns()
    pq.close()
    return peers.consumer_result(t1, out)


def ours_two_processes(wl: Workload) -> Run:
    from engine import PriorityQueue

    name = _name()
    pq = PriorityQueue.create(name, levels=LEVELS, capacity=CAPACITY)
    try:
        return peers.flow_run(wl, (_pq_producer, (name,)), [(_pq_consumer, (name,))])
    finally:
        pq.close()
        PriorityQueue.unlink(name)


def _mpq_levels_producer(wl: Workload, barrier: Any, qs: List[Any]) -> int:
    msgs = wl.payloads()
    prio = _levels(len(msgs))
    puts = [q.put for q in qs]
    barrier.wait(peers.BARRIER_TIMEOUT)
    t0 = time.perf_counter_ns()
    for i in range(len(msgs)):
        puts[prio[i]](msgs[i])
    for q in qs:
        q.put(None)
    for q in qs:
        q.close()
        q.join_thread()
    return t0


def _mpq_levels_consumer(
    wl: Workload, barrier: Any, qs: List[Any]
) -> Tuple[int, int, int, Optional[bool]]:
    from multiprocessing.connection import wait

    out: List[bytes] = []
    append = out.append
    nowaits = [q.get_nowait for q in qs]
    # sleep on all three pipes at once when everything is empty (the best a
    # multiprocessing.Queue user can do; _reader is its pipe end)
    readers = [getattr(q, "_reader", None) for q in qs]
    can_wait = all(r is not None for r in readers)
    live = [True] * len(qs)
    Empty = queue.Empty
    barrier.wait(peers.BARRIER_TIMEOUT)
    deadline = time.monotonic() + 300
    while any(live) and time.monotonic() < deadline:
        got = False
        for lv, nowait in enumerate(nowaits):
            if not live[lv]:
                continue
            try:
                m = nowait()
            except Empty:
                continue
            got = True
            if m is None:
                live[lv] = False
            else:
                append(m)
            break  # strict: start again from the most urgent level
        if not got:
            if can_wait:
                wait([r for r, lv in zip(readers, live) if lv and r is not None], timeout=0.01)
            else:
                time.sleep(0.0001)
    t1 = time.perf_counter_ns()
    return peers.consumer_result(t1, out)


def mpqueue_per_level(wl: Workload) -> Run:
    ctx = peers.mp_context()
    qs = [ctx.Queue() for _ in range(LEVELS)]
    return peers.flow_run(wl, (_mpq_levels_producer, (qs,)), [(_mpq_levels_consumer, (qs,))])


# ---------------------------------------------------------------------------
# keyed: 1 producer -> 2 consumer processes
# ---------------------------------------------------------------------------


def _kq_producer(wl: Workload, barrier: Any, name: str) -> int:
    from engine import KeyedQueue

    kq = KeyedQueue.attach(name)
    msgs = wl.payloads()
    keys = [i % KEYS for i in range(len(msgs))]
    put = kq.put
    barrier.wait(peers.BARRIER_TIMEOUT)
    t0 = time.perf_counter_ns()
    for i in range(len(msgs)):
        put(msgs[i], keys[i])
    kq.close_put()
    kq.close()
    return t0


def _kq_consumer(wl: Workload, barrier: Any, name: str) -> Tuple[int, int, int, Optional[bool]]:
    from engine import Closed, KeyedQueue

    kq = KeyedQueue.attach(name)
    c = kq.consumer()
    out: List[bytes] = []
    extend = out.extend
    get_many = c.get_many
    barrier.wait(peers.BARRIER_TIMEOUT)
    try:
        while True:
            extend(get_many(peers.BATCH, 30.0))
    except Closed:
        pass
    t1 = time.perf_counter_ns()
    c.close()
    kq.close()
    return peers.consumer_result(t1, out)


def ours_keyed(wl: Workload) -> Run:
    from engine import KeyedQueue

    name = _name()
    kq = KeyedQueue.create(name, partitions=PARTITIONS, capacity=CAPACITY)
    try:
        return peers.flow_run(wl, (_kq_producer, (name,)), [(_kq_consumer, (name,))] * 2)
    finally:
        kq.close()
        KeyedQueue.unlink(name)


def _mpq_keyed_producer(wl: Workload, barrier: Any, qs: List[Any]) -> int:
    from engine.scheduling import stable_hash

    msgs = wl.payloads()
    # the key -> consumer map is part of the peer's work: hash per message
    keys = [i % KEYS for i in range(len(msgs))]
    puts = [q.put for q in qs]
    n = len(qs)
    barrier.wait(peers.BARRIER_TIMEOUT)
    t0 = time.perf_counter_ns()
    for i in range(len(msgs)):
        puts[stable_hash(keys[i]) % n](msgs[i])
    for q in qs:
        q.put(None)
        q.close()
        q.join_thread()
    return t0


def _mpq_keyed_consumer(
    wl: Workload, barrier: Any, qs: List[Any], j: int
) -> Tuple[int, int, int, Optional[bool]]:
    q = qs[j]
    out: List[bytes] = []
    append = out.append
    get = q.get
    barrier.wait(peers.BARRIER_TIMEOUT)
    while True:
        m = get(timeout=30.0)
        if m is None:
            break
        append(m)
    t1 = time.perf_counter_ns()
    return peers.consumer_result(t1, out)


def mpqueue_keyed(wl: Workload) -> Run:
    ctx = peers.mp_context()
    qs = [ctx.Queue() for _ in range(2)]
    return peers.flow_run(
        wl,
        (_mpq_keyed_producer, (qs,)),
        [(_mpq_keyed_consumer, (qs, 0)), (_mpq_keyed_consumer, (qs, 1))],
    )


def cases(profile: Profile) -> List[Case]:
    one = Workload(count=profile.count(quick=50_000, full=1_000_000), size=64)
    two = Workload(count=profile.count(quick=25_000, full=500_000), size=64)
    req = ("engine._sched", "engine._ring")
    return [
        Case(
            name="priority 3 levels, 1 process",
            description=f"put + get through 3 levels (msg i at level i % 3), rounds of {ROUND}",
            kind="throughput",
            workload=one,
            ordered=False,
            contenders=[
                Contender("engine.PriorityQueue", ours_one_process, ours=True, requires=req),
                Contender("queue.PriorityQueue", queue_priorityqueue),
                Contender("heapq + Lock", heapq_locked),
                Contender("deque per level + Lock", deque_per_level_locked),
            ],
            targets=[Target("ratio", 8, "queue.PriorityQueue")],
        ),
        Case(
            name="priority 3 levels, 2 processes",
            description="producer process -> consumer process, strict priority over 3 levels",
            kind="throughput",
            workload=two,
            ordered=False,
            contenders=[
                Contender("engine.PriorityQueue", ours_two_processes, ours=True, requires=req),
                Contender("multiprocessing.Queue per level", mpqueue_per_level),
            ],
            targets=[Target("ratio", 10, "multiprocessing.Queue per level")],
        ),
        Case(
            name="keyed 1 -> 2 processes",
            description=f"{KEYS} keys, per-key order, one producer and two consumer processes",
            kind="throughput",
            workload=two,
            ordered=False,
            contenders=[
                Contender("engine.KeyedQueue", ours_keyed, ours=True, requires=req),
                Contender("multiprocessing.Queue per consumer", mpqueue_keyed),
            ],
        ),
    ]
