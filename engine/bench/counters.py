"""The counters section: engine.ShardedCounter / CounterMap / CounterAggregator
against multiprocessing.Value (with its lock), a single shared atomic cell
(our counter with ``shards=1``: every adder on one cache line), a
threading.Lock around a Python int, and multiprocessing.Manager().dict().

Each workload message is one increment (``add(1)``); a contender verifies the
exact final value itself and raises if it is off by one, so the harness's
count/checksum stand for "every increment counted exactly once".

Cases (quick / --full): add in 1 process (1M / 5M); 2 processes adding to one
counter against multiprocessing.Value (300k / 1M) and against the single
shared cell (2M / 8M); CounterMap against Manager().dict() (20k / 100k, 64
keys); the queue-fed aggregator, one sender process -> one aggregator, against
the same batching over multiprocessing.Queue (500k / 2M).
"""

from __future__ import annotations

import os
import queue
import threading
import time
import uuid
from typing import Any, List, Tuple

from engine.bench import peers
from engine.bench.harness import THROUGHPUT, Case, Contender, Profile, Run, Workload

SECTION = "counters"

OURS = ("engine._counter",)
BUILD_HINT = "build it: pip install . (or python setup.py build_ext --inplace)"
KEYS = 64  # distinct keys in the CounterMap / aggregator cases
BATCH = 4096  # increments coalesced per aggregator message, for both contenders


def _name() -> str:
    return f"qe-bench-ctr-{os.getpid()}-{uuid.uuid4().hex[:10]}"


def _verified(wl: Workload, t0: int, t1: int, got: int, expect: int, who: str) -> Run:
    if got != expect:
        raise AssertionError(f"{who}: counted {got}, expected exactly {expect}")
    exp = wl.expected
    return Run((t1 - t0) / 1e9, exp.count, exp.checksum, None)


def _keys() -> List[str]:
    return [f"key-{i:03d}" for i in range(KEYS)]


def _shares(n: int, parts: int) -> List[int]:
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


# ---------------------------------------------------------------------------
# one process
# ---------------------------------------------------------------------------


def ours_add_1p(wl: Workload) -> Run:
    from engine import ShardedCounter

    c = ShardedCounter()
    add = c.add
    rng = range(wl.count)
    t0 = time.perf_counter_ns()
    for _ in rng:
        add(1)
    t1 = time.perf_counter_ns()
    return _verified(wl, t0, t1, c.value(), wl.count, "ShardedCounter")


def mpvalue_add_1p(wl: Workload) -> Run:
    ctx = peers.mp_context()
    v = ctx.Value("q", 0)
    lock = v.get_lock()
    rng = range(wl.count)
    t0 = time.perf_counter_ns()
    for _ in rng:
        with lock:
            v.value += 1
    t1 = time.perf_counter_ns()
    return _verified(wl, t0, t1, v.value, wl.count, "multiprocessing.Value")


def lock_int_add_1p(wl: Workload) -> Run:
    lock = threading.Lock()
    box = [0]
    rng = range(wl.count)
    t0 = time.perf_counter_ns()
    for _ in rng:
        with lock:
            box[0] += 1
    t1 = time.perf_counter_ns()
    return _verified(wl, t0, t1, box[0], wl.count, "threading.Lock + int")


# ---------------------------------------------------------------------------
# two processes adding to one counter
# ---------------------------------------------------------------------------


def _child_add(wl: Workload, barrier: Any, name: str, n: int) -> Tuple[int, int]:
    from engine import ShardedCounter

    c = ShardedCounter.attach(name)
    add = c.add
    rng = range(n)
    barrier.wait(peers.BARRIER_TIMEOUT)
    t0 = time.perf_counter_ns()
    for _ in rng:
        add(1)
    t1 = time.perf_counter_ns()
    c.close()
    return t0, t1


def _child_mpvalue(wl: Workload, barrier: Any, v: Any, n: int) -> Tuple[int, int]:
    lock = v.get_lock()
    rng = range(n)
    barrier.wait(peers.BARRIER_TIMEOUT)
    t0 = time.perf_counter_ns()
    for _ in rng:
        with lock:
            v.value += 1
    t1 = time.perf_counter_ns()
    return t0, t1


def _span(res: List[Tuple[int, int]]) -> Tuple[int, int]:
    return min(r[0] for r in res), max(r[1] for r in res)


def ours_add_2p(shards: Any) -> Any:
    """2 processes adding to one shared ShardedCounter (``shards=1``: the
    single shared atomic cell)."""

    def run(wl: Workload) -> Run:
        from engine import ShardedCounter

        name = _name()
        c = ShardedCounter.create(name, shards=shards)
        try:
            roles = [(_child_add, (name, k)) for k in _shares(wl.count, 2)]
            t0, t1 = _span(peers.run_children(wl, roles))
            who = "single shared cell" if shards == 1 else "ShardedCounter"
            return _verified(wl, t0, t1, c.value(), wl.count, who)
        finally:
            c.close()
            ShardedCounter.unlink(name)

    run.__name__ = f"ours_add_2p_shards_{shards}"
    return run


def mpvalue_add_2p(wl: Workload) -> Run:
    v = peers.mp_context().Value("q", 0)
    roles = [(_child_mpvalue, (v, k)) for k in _shares(wl.count, 2)]
    t0, t1 = _span(peers.run_children(wl, roles))
    return _verified(wl, t0, t1, v.value, wl.count, "multiprocessing.Value")


# ---------------------------------------------------------------------------
# CounterMap against Manager().dict()
# ---------------------------------------------------------------------------


def _expected_map(n: int) -> dict:
    keys = _keys()
    out = dict.fromkeys(keys, n // KEYS)
    for i in range(n % KEYS):
        out[keys[i]] += 1
    return out


def ours_map_1p(wl: Workload) -> Run:
    from engine import CounterMap

    m = CounterMap(capacity=4 * KEYS)
    add = m.add
    keys = _keys()
    seq = [keys[i % KEYS] for i in range(wl.count)]
    t0 = time.perf_counter_ns()
    for k in seq:
        add(k)
    t1 = time.perf_counter_ns()
    got = dict(m.items())
    ok = got == _expected_map(wl.count)
    return _verified(wl, t0, t1, wl.count if ok else -1, wl.count, "CounterMap")


def manager_dict_1p(wl: Workload) -> Run:
    mgr = peers.mp_context().Manager()
    try:
        d = mgr.dict()
        keys = _keys()
        seq = [keys[i % KEYS] for i in range(wl.count)]
        get = d.get
        t0 = time.perf_counter_ns()
        for k in seq:
            d[k] = get(k, 0) + 1  # one process: no lock needed for exactness
        t1 = time.perf_counter_ns()
        got = dict(d.items())
    finally:
        mgr.shutdown()
    ok = got == _expected_map(wl.count)
    return _verified(wl, t0, t1, wl.count if ok else -1, wl.count, "Manager().dict()")


# ---------------------------------------------------------------------------
# the queue-fed aggregator: 1 sender process -> 1 aggregator process
# ---------------------------------------------------------------------------


def _child_sender(wl: Workload, barrier: Any, ring_name: str) -> int:
    from engine.counters import CounterSender

    s = CounterSender.attach(ring_name, batch=BATCH)
    add = s.add
    keys = _keys()
    seq = [keys[i % KEYS] for i in range(wl.count)]
    barrier.wait(peers.BARRIER_TIMEOUT)
    t0 = time.perf_counter_ns()
    for k in seq:
        add(k)
    s.close()
    return t0


def _child_aggregator(wl: Workload, barrier: Any, ring_name: str, map_name: str) -> int:
    from engine import CounterAggregator, CounterMap, Ring

    agg = CounterAggregator(Ring.attach(ring_name), target=CounterMap.attach(map_name))
    barrier.wait(peers.BARRIER_TIMEOUT)
    agg.run(max_messages=256, poll=0.05)
    t1 = time.perf_counter_ns()
    agg.close()
    return t1


def ours_aggregator(wl: Workload) -> Run:
    from engine import CounterMap, Ring

    ring_name, map_name = _name(), _name()
    ring = Ring.create(ring_name, capacity=1 << 22)
    m = CounterMap.create(map_name, capacity=4 * KEYS)
    try:
        res = peers.run_children(
            wl, [(_child_sender, (ring_name,)), (_child_aggregator, (ring_name, map_name))]
        )
        ok = dict(m.items()) == _expected_map(wl.count)
        return _verified(wl, res[0], res[1], wl.count if ok else -1, wl.count, "aggregator")
    finally:
        m.close()
        ring.close()
        CounterMap.unlink(map_name)
        Ring.unlink(ring_name)


class _QueueRing:
    """A multiprocessing.Queue dressed as a ring, so the peer runs the very same
    CounterSender / CounterAggregator code: only the transport differs."""

    max_message = 1 << 20

    def __init__(self, q: Any) -> None:
        self.q = q

    def producer(self) -> _QueueProducer:
        return _QueueProducer(self.q)

    def consumer(self) -> _QueueConsumer:
        return _QueueConsumer(self.q)


class _QueueProducer:
    def __init__(self, q: Any) -> None:
        self.q = q

    def put(self, msg: bytes, timeout: Any = None) -> None:
        self.q.put(msg)

    def close(self) -> None:
        self.q.put(None)  # end of stream


class _QueueConsumer:
    def __init__(self, q: Any) -> None:
        self.q = q
        self.closed = False

    def get_many(self, max: int = 1024, timeout: Any = 0) -> List[bytes]:
        from engine import Closed

        if self.closed:
            raise Closed("sender closed")
        out: List[bytes] = []
        try:
            m = self.q.get(timeout=timeout) if timeout else self.q.get_nowait()
        except queue.Empty:
            return out
        while True:
            if m is None:
                self.closed = True
                if out:
                    return out
                raise Closed("sender closed")
            out.append(m)
            if len(out) >= max:
                return out
            try:
                m = self.q.get_nowait()
            except queue.Empty:
                return out

    def close(self) -> None:
        pass


def _child_mpq_sender(wl: Workload, barrier: Any, q: Any) -> int:
    from engine.counters import CounterSender

    s = CounterSender(_QueueRing(q), batch=BATCH)
    add = s.add
    keys = _keys()
    seq = [keys[i % KEYS] for i in range(wl.count)]
    barrier.wait(peers.BARRIER_TIMEOUT)
    t0 = time.perf_counter_ns()
    for k in seq:
        add(k)
    s.close()
    return t0


def _child_mpq_aggregator(wl: Workload, barrier: Any, q: Any, map_name: str) -> int:
    from engine import CounterAggregator, CounterMap

    agg = CounterAggregator(_QueueRing(q), target=CounterMap.attach(map_name))
    barrier.wait(peers.BARRIER_TIMEOUT)
    agg.run(max_messages=256, poll=0.05)
    t1 = time.perf_counter_ns()
    agg.close()
    return t1


def mpqueue_aggregator(wl: Workload) -> Run:
    from engine import CounterMap

    q = peers.mp_context().Queue()
    map_name = _name()
    m = CounterMap.create(map_name, capacity=4 * KEYS)
    try:
        res = peers.run_children(
            wl, [(_child_mpq_sender, (q,)), (_child_mpq_aggregator, (q, map_name))]
        )
        ok = dict(m.items()) == _expected_map(wl.count)
        return _verified(wl, res[0], res[1], wl.count if ok else -1, wl.count, "mp.Queue-fed")
    finally:
        m.close()
        CounterMap.unlink(map_name)


# ---------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------


def _ours(name: str, fn: Any) -> Contender:
    return Contender(name, fn, ours=True, requires=OURS, pip_hint=BUILD_HINT)


def cases(profile: Profile) -> List[Case]:
    """Every counters case for this profile."""
    return [
        Case(
            "add 1 process",
            "add(1) in a tight loop, one process (one message = one increment)",
            THROUGHPUT,
            Workload(profile.count(quick=1_000_000, full=5_000_000), 8),
            [
                _ours("engine.ShardedCounter", ours_add_1p),
                Contender("multiprocessing.Value + lock", mpvalue_add_1p),
                Contender("threading.Lock + int", lock_int_add_1p),
            ],
            ordered=False,
        ),
        Case(
            "add 2 processes vs multiprocessing.Value",
            "two processes add(1) to one shared counter at once; aggregate rate",
            THROUGHPUT,
            Workload(profile.count(quick=300_000, full=1_000_000), 8),
            [
                _ours("engine.ShardedCounter", ours_add_2p(None)),
                Contender("multiprocessing.Value + lock", mpvalue_add_2p),
            ],
            ordered=False,
        ),
        Case(
            "add 2 processes vs single shared cell",
            "two processes add(1) at once: sharded cells vs one atomic int64 on one cache line",
            THROUGHPUT,
            Workload(profile.count(quick=2_000_000, full=8_000_000), 8),
            [
                _ours("engine.ShardedCounter", ours_add_2p(None)),
                Contender(
                    "single shared atomic cell (shards=1)",
                    ours_add_2p(1),
                    requires=OURS,
                    pip_hint=BUILD_HINT,
                ),
            ],
            ordered=False,
        ),
        Case(
            "CounterMap vs Manager().dict()",
            f"one process, {KEYS} keys round robin, add(key)",
            THROUGHPUT,
            Workload(profile.count(quick=20_000, full=100_000), 8),
            [
                _ours("engine.CounterMap", ours_map_1p),
                Contender("multiprocessing.Manager().dict()", manager_dict_1p),
            ],
            ordered=False,
        ),
        Case(
            "aggregator 1 sender -> 1 aggregator",
            f"increments over a ring, coalesced {BATCH} per message, applied by another "
            f"process into a CounterMap ({KEYS} keys)",
            THROUGHPUT,
            Workload(profile.count(quick=500_000, full=2_000_000), 8),
            [
                _ours("engine.CounterAggregator (Ring)", ours_aggregator),
                Contender("multiprocessing.Queue-fed aggregator", mpqueue_aggregator),
            ],
            ordered=False,
        ),
    ]
