"""engine.scheduling: PriorityQueue, KeyedQueue, delayed delivery, durable variant.

Default-suite tests stay short (a few seconds each); the multi-process
ones with 100,000 keys and the SIGKILL tests live in
tests/stress/test_scheduling_procs.py.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import statistics
import struct
import threading
import time
from collections import deque

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import engine
from engine import Closed, IncompatibleRegion, Timeout
from engine.scheduling import DurablePriorityQueue, KeyedQueue, PriorityQueue, stable_hash

FORK = mp.get_context("fork")
# durable queues in tests: 1 MiB segments (each log preallocates one on open)
SEG = 1 << 20


def _msg(level: int, seq: int, pad: int = 0) -> bytes:
    return struct.pack("<II", level, seq) + b"x" * pad


def _unmsg(m: bytes):
    return struct.unpack_from("<II", m)


# ---------------------------------------------------------------------------
# PriorityQueue: order and policies
# ---------------------------------------------------------------------------


def test_strict_order_across_levels():
    rnd = random.Random(1)
    with PriorityQueue(levels=4) as pq:
        sent = []
        for seq in range(5000):
            lv = rnd.randrange(4)
            pq.put(_msg(lv, seq, rnd.randrange(40)), priority=lv)
            sent.append((lv, seq))
        got = [_unmsg(pq.get(timeout=1)) for _ in range(5000)]
        # most urgent level first, FIFO inside a level
        assert got == sorted(sent)
        assert pq.try_get() is None
        st_ = pq.stats()
        assert st_["put"] == st_["got"] == [sum(1 for lv, _ in sent if lv == i) for i in range(4)]


def test_strict_interleaved_puts_always_serve_most_urgent():
    with PriorityQueue(levels=3) as pq:
        pq.put(b"2a", 2)
        pq.put(b"1a", 1)
        assert pq.get() == b"1a"
        pq.put(b"0a", 0)
        pq.put(b"1b", 1)
        assert [pq.get(), pq.get(), pq.get()] == [b"0a", b"1b", b"2a"]


def test_get_many_strict_batches_keep_order():
    with PriorityQueue(levels=3) as pq:
        for i in range(300):
            pq.put(_msg(i % 3, i), i % 3)
        out = []
        while True:
            batch = pq.get_many(64)
            if not batch:
                break
            assert len(batch) <= 64
            out += batch
        got = [_unmsg(m) for m in out]
        assert got == sorted((i % 3, i) for i in range(300))


@pytest.mark.parametrize("weights", [[8, 3, 1], [1, 1, 1], [5, 1, 2, 2]])
def test_weighted_shares_within_5_percent_over_100k(weights):
    n = len(weights)
    total = 100_000
    with PriorityQueue(levels=n, policy="weighted", weights=weights, capacity=1 << 23) as pq:
        # every level stays backlogged for all 100,000 gets
        for lv in range(n):
            for seq in range(total):
                pq.put(_msg(lv, seq), lv)
        counts = [0] * n
        last = [-1] * n
        for _ in range(total):
            lv, seq = _unmsg(pq.get(timeout=1))
            assert seq == last[lv] + 1  # FIFO inside a level
            last[lv] = seq
            counts[lv] += 1
    wsum = sum(weights)
    for lv in range(n):
        expected = total * weights[lv] / wsum
        assert abs(counts[lv] - expected) <= 0.05 * expected, (lv, counts, weights)


def test_weighted_by_bytes_shares_within_5_percent_over_100k():
    weights = [3, 2, 1]
    sizes = [16, 80, 400]  # the levels differ in message size: counts would not share bytes
    queued = [100_000, 20_000, 5_000]  # every level stays backlogged for all 100,000 gets
    total = 100_000
    with PriorityQueue(levels=3, policy="weighted", weights=weights, by="bytes", capacity=1 << 22) as pq:
        for lv in range(3):
            for seq in range(queued[lv]):
                pq.put(_msg(lv, seq, sizes[lv] - 8), lv)
        got = [0] * 3
        for _ in range(total):
            m = pq.get(timeout=1)
            got[_unmsg(m)[0]] += len(m)
        assert all(pq.stats()["put"][lv] > pq.stats()["got"][lv] for lv in range(3))  # still backlogged
    wsum = sum(weights)
    for lv in range(3):
        expected = sum(got) * weights[lv] / wsum
        assert abs(got[lv] - expected) <= 0.05 * expected, (got, weights)


def test_by_bytes_arguments():
    with pytest.raises(ValueError, match="weighted"):
        PriorityQueue(levels=2, by="bytes")
    with pytest.raises(ValueError, match="by"):
        PriorityQueue(levels=2, policy="weighted", by="size")
    with pytest.raises(ValueError, match="quantum"):
        PriorityQueue(levels=2, policy="weighted", by="bytes", quantum=0)


def test_weighted_empty_level_gives_its_turn_away():
    with PriorityQueue(levels=3, policy="weighted", weights=[4, 2, 1]) as pq:
        for i in range(50):
            pq.put(_msg(2, i), 2)
        assert [_unmsg(pq.get())[0] for _ in range(50)] == [2] * 50
        assert pq.try_get() is None


def test_weighted_default_weights():
    pq = PriorityQueue(levels=3, policy="weighted")
    assert pq.stats()["weights"] == [4, 2, 1]
    pq.close()


# ---------------------------------------------------------------------------
# hypothesis: strict / weighted against a pure-Python model
# ---------------------------------------------------------------------------


class _Model:
    """Reference: a deque per level; strict, or deficit round robin by count."""

    def __init__(self, n, policy, weights, quantum=0):
        self.q = [deque() for _ in range(n)]
        self.n = n
        self.policy = policy
        self.w = weights or [1] * n
        self.credit = [0] * n
        self.rr = 0
        self.quantum = quantum  # > 0: weighted by bytes
        self.visited = False

    def _get_bytes(self):
        i = self.rr
        while True:
            any_ = False
            for _ in range(self.n):
                if self.q[i]:
                    any_ = True
                    if not self.visited:
                        self.credit[i] += self.w[i] * self.quantum
                        self.visited = True
                    size = len(self.q[i][0])
                    if size <= self.credit[i]:
                        self.credit[i] -= size
                        self.rr = i
                        return self.q[i].popleft()
                else:
                    self.credit[i] = 0
                i = (i + 1) % self.n
                self.visited = False
            if not any_:
                self.rr = i
                return None

    def put(self, m, lv):
        self.q[lv].append(m)

    def get(self):
        if self.policy == "strict":
            for q in self.q:
                if q:
                    return q.popleft()
            return None
        if self.quantum:
            return self._get_bytes()
        i = self.rr
        for _ in range(self.n + 1):
            if self.credit[i] <= 0:
                self.credit[i] = self.w[i]
            if self.q[i]:
                self.credit[i] -= 1
                self.rr = i if self.credit[i] > 0 else (i + 1) % self.n
                return self.q[i].popleft()
            self.credit[i] = 0
            i = (i + 1) % self.n
        return None


class PriorityMachine(RuleBasedStateMachine):
    @initialize(n=st.integers(1, 5), weighted=st.booleans(), timestamped=st.booleans(),
                by_bytes=st.booleans(), quantum=st.sampled_from([1, 64, 200]), data=st.data())
    def setup(self, n, weighted, timestamped, by_bytes, quantum, data):
        policy = "weighted" if weighted else "strict"
        weights = data.draw(st.lists(st.integers(1, 6), min_size=n, max_size=n)) if weighted else None
        by_bytes = by_bytes and weighted
        # max_wait far beyond the test: the timestamped read-ahead path runs,
        # aging never triggers, so the model's order stays exact
        self.pq = PriorityQueue(levels=n, policy=policy, weights=weights, capacity=1 << 16,
                                max_wait=1000.0 if timestamped else None,
                                by="bytes" if by_bytes else "count", quantum=quantum)
        self.model = _Model(n, policy, weights, quantum if by_bytes else 0)
        self.n = n
        self.seq = 0
        self.queued = 0

    @precondition(lambda self: hasattr(self, "pq") and self.queued < 400)
    @rule(data=st.data(), size=st.integers(0, 300))
    def put(self, data, size):
        lv = data.draw(st.integers(0, self.n - 1))
        m = struct.pack("<I", self.seq) + bytes([self.seq & 0xFF]) * size
        self.seq += 1
        self.pq.put(m, priority=lv)
        self.model.put(m, lv)
        self.queued += 1

    @precondition(lambda self: hasattr(self, "pq"))
    @rule()
    def try_get(self):
        got = self.pq.try_get()
        assert got == self.model.get()
        if got is not None:
            self.queued -= 1

    @precondition(lambda self: hasattr(self, "pq"))
    @rule(k=st.integers(1, 20))
    def get_many(self, k):
        got = self.pq.get_many(k)
        want = []
        while len(want) < k:
            m = self.model.get()
            if m is None:
                break
            want.append(m)
        assert got == want
        self.queued -= len(got)

    @precondition(lambda self: hasattr(self, "pq") and self.queued > 0)
    @rule()
    def get(self):
        assert self.pq.get(timeout=1) == self.model.get()
        self.queued -= 1

    @invariant()
    def counts(self):
        if hasattr(self, "pq"):
            s = self.pq.stats()
            assert sum(s["put"]) - sum(s["got"]) == self.queued

    def teardown(self):
        if hasattr(self, "pq"):
            self.pq.close()


PriorityMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=60, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestPriorityModel = PriorityMachine.TestCase


# ---------------------------------------------------------------------------
# aging: nothing starves behind a flood
# ---------------------------------------------------------------------------


def _flooder(name, seconds, every_low):
    pq = PriorityQueue.attach(name)
    end = time.monotonic() + seconds
    next_low = time.monotonic()
    seq = 0
    hi = b"h" * 24
    while time.monotonic() < end:
        now = time.monotonic()
        if now >= next_low:
            pq.put(struct.pack("<Q", time.monotonic_ns()) + b"LOW", priority=2)
            next_low = now + every_low
        for _ in range(50):
            pq.put(hi, priority=0)  # blocks while ring 0 is full: a permanent backlog
        seq += 1
    pq.close()  # closes the producer role: the consumer drains, then Closed
    os._exit(0)


def _flood_run(shm_name, max_wait, seconds=1.5, work_us=20):
    pq = PriorityQueue.create(shm_name, levels=3, max_wait=max_wait, capacity=1 << 16)
    try:
        proc = FORK.Process(target=_flooder, args=(shm_name, seconds, 0.005))
        proc.start()
        waits = []
        highs = 0
        t_end = time.monotonic() + seconds + 10
        while time.monotonic() < t_end:
            try:
                m = pq.get(timeout=5)
            except Closed:
                break
            if m.endswith(b"LOW"):
                waits.append((time.monotonic_ns() - struct.unpack_from("<Q", m)[0]) / 1e9)
            else:
                highs += 1
                spin_end = time.perf_counter() + work_us * 1e-6  # the consumer's work
                while time.perf_counter() < spin_end:
                    pass
        proc.join(10)
        assert proc.exitcode == 0
        return waits, highs
    finally:
        pq.close()
        PriorityQueue.unlink(shm_name)


def test_max_wait_bounds_lowest_level_under_flood(shm_name):
    max_wait = 0.1
    waits, highs = _flood_run(shm_name, max_wait)
    assert highs > 10_000  # there really was a flood
    assert len(waits) > 30  # low-priority messages kept arriving during the flood
    # waits measured while the flood ran (the tail after close drains freely)
    assert max(waits) <= max_wait, f"max wait {max(waits) * 1e3:.1f} ms > {max_wait * 1e3} ms"


def test_without_max_wait_the_lowest_level_starves(shm_name):
    # the control for the test above: the same flood, strict without aging
    waits, highs = _flood_run(shm_name + "c", None, seconds=1.0)
    assert highs > 5_000
    assert max(waits) > 0.3  # served only after the flood stopped


# ---------------------------------------------------------------------------
# delayed delivery
# ---------------------------------------------------------------------------


def test_delayed_never_early_and_late_at_most_10ms():
    rnd = random.Random(7)
    with PriorityQueue(levels=3) as pq:
        due = {}
        t0 = time.monotonic_ns()
        for i in range(40):
            d = rnd.uniform(0.005, 0.25)
            due[i] = t0 + int(d * 1e9)
            pq.put(struct.pack("<I", i), priority=rnd.randrange(3), delay=d)
        assert pq.try_get() is None  # nothing is due yet
        lateness = []
        for _ in range(40):
            m = pq.get(timeout=2)
            now = time.monotonic_ns()
            i = struct.unpack("<I", m)[0]
            assert now >= due[i], f"message {i} {(due[i] - now) / 1e6:.3f} ms early"
            lateness.append((now - due[i]) / 1e6)
        assert max(lateness) <= 10.0, f"late by up to {max(lateness):.2f} ms (median {statistics.median(lateness):.2f})"


def test_delayed_at_wall_clock_never_early():
    with PriorityQueue(levels=2) as pq:
        ats = []
        for i in range(10):
            at = time.time() + 0.02 + i * 0.01
            ats.append(at)
            pq.put(struct.pack("<I", i), priority=1, at=at)
        for _ in range(10):
            m = pq.get(timeout=2)
            now = time.time()
            i = struct.unpack("<I", m)[0]
            assert now >= ats[i]
            assert now - ats[i] <= 0.010


def test_delayed_messages_are_served_by_priority_once_due():
    with PriorityQueue(levels=3) as pq:
        pq.put(b"d2", priority=2, delay=0.02)
        pq.put(b"d0", priority=0, delay=0.02)
        pq.put(b"now1", priority=1)
        assert pq.get() == b"now1"
        assert pq.try_get() is None
        time.sleep(0.03)
        assert [pq.get(), pq.get()] == [b"d0", b"d2"]


def test_delay_zero_or_past_is_immediate():
    with PriorityQueue(levels=2) as pq:
        pq.put(b"a", 1, delay=0)
        pq.put(b"b", 0, at=time.time() - 10)
        assert pq.try_get() == b"b"
        assert pq.try_get() == b"a"


def test_close_put_drains_delayed_then_closed():
    with PriorityQueue(levels=2) as pq:
        pq.put(b"late", 1, delay=0.03)
        pq.put(b"now", 1)
        pq.close_put()
        assert pq.get(timeout=1) == b"now"
        assert pq.get(timeout=1) == b"late"
        with pytest.raises(Closed):
            pq.get(timeout=1)
        with pytest.raises(Closed):
            pq.try_get()


# ---------------------------------------------------------------------------
# blocking, errors, lifecycle
# ---------------------------------------------------------------------------


def test_get_timeout_and_wakeup_from_thread():
    with PriorityQueue(levels=2) as pq:
        t = time.monotonic()
        with pytest.raises(Timeout):
            pq.get(timeout=0.05)
        assert 0.045 <= time.monotonic() - t < 1.0
        with pytest.raises(TimeoutError):  # Timeout is also a TimeoutError
            pq.get(timeout=0.01)
        threading.Timer(0.05, lambda: pq.put(b"wake", 1)).start()
        t = time.monotonic()
        assert pq.get(timeout=5) == b"wake"
        assert time.monotonic() - t < 1.0


def test_ctrl_c_while_blocked_in_get(sigint_raises):
    with PriorityQueue(levels=2) as pq:
        main = threading.get_ident()
        threading.Timer(0.1, lambda: signal.pthread_kill(main, signal.SIGINT)).start()
        t = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            pq.get()
        assert time.monotonic() - t < 2.0


def test_bad_arguments():
    with pytest.raises(ValueError, match="levels"):
        PriorityQueue(levels=0)
    with pytest.raises(ValueError, match="policy"):
        PriorityQueue(levels=2, policy="fifo")
    with pytest.raises(ValueError, match="weights"):
        PriorityQueue(levels=3, policy="weighted", weights=[1, 2])
    with pytest.raises(ValueError, match="weights"):
        PriorityQueue(levels=2, policy="weighted", weights=[1, 0])
    with pytest.raises(ValueError, match="max_wait"):
        PriorityQueue(levels=2, max_wait=-1)
    with PriorityQueue(levels=2) as pq:
        with pytest.raises(ValueError, match="priority"):
            pq.put(b"x", priority=2)
        with pytest.raises(ValueError, match="priority"):
            pq.put(b"x", priority=-1)
        with pytest.raises(TypeError):
            pq.put(12345)
        with pytest.raises(ValueError):
            pq.put(b"x", delay=1, at=time.time())
        with pytest.raises(ValueError, match="timeout"):
            pq.get(timeout=-1)
        with pytest.raises(ValueError):
            pq.put(b"x" * (1 << 20))  # larger than the ring allows
    with pytest.raises(ValueError, match="path"):
        PriorityQueue(levels=2, durable=True)


def test_closed_queue_refuses():
    pq = PriorityQueue(levels=2)
    pq.put(b"a")
    pq.close()
    pq.close()  # idempotent
    with pytest.raises(Closed):
        pq.put(b"b")
    with pytest.raises(Closed):
        pq.get()
    with pytest.raises(Closed):
        pq.try_get()


def test_buffer_types_accepted():
    import numpy as np

    with PriorityQueue(levels=2, max_wait=1.0) as pq:  # timestamped path copies buffers
        pq.put(bytearray(b"ba"), 0)
        pq.put(memoryview(b"mv"), 1)
        pq.put(np.frombuffer(b"np", np.uint8), 1)
        assert [pq.get(), pq.get(), pq.get()] == [b"ba", b"mv", b"np"]


# ---------------------------------------------------------------------------
# shared between processes
# ---------------------------------------------------------------------------


def _shared_producer(name, n):
    pq = PriorityQueue.attach(name)
    for i in range(n):
        pq.put(_msg(i % 3, i), priority=i % 3)
    pq.put(b"delayed", priority=0, delay=0.05)
    pq.close()
    os._exit(0)


def test_shared_queue_producer_process(shm_name):
    n = 20_000
    with PriorityQueue.create(shm_name, levels=3, capacity=1 << 21) as pq:
        assert oct(os.stat(f"/dev/shm/{shm_name}").st_mode & 0o777) == "0o600"
        p = FORK.Process(target=_shared_producer, args=(shm_name, n))
        p.start()
        per_level = [[] for _ in range(3)]
        delayed = 0
        while True:
            try:
                m = pq.get(timeout=10)
            except Closed:
                break
            if m == b"delayed":
                delayed += 1
                continue
            lv, seq = _unmsg(m)
            per_level[lv].append(seq)
        p.join(10)
        assert p.exitcode == 0
        assert delayed == 1
        for lv in range(3):
            assert per_level[lv] == list(range(lv, n, 3))
    PriorityQueue.unlink(shm_name)
    assert not [f for f in os.listdir("/dev/shm") if f.startswith(shm_name)]


def test_attach_validates_region(shm_name):
    with pytest.raises(FileNotFoundError):
        PriorityQueue.attach(shm_name)
    with open(f"/dev/shm/{shm_name}", "wb") as f:
        f.write(os.urandom(4096))
    with pytest.raises(IncompatibleRegion):
        PriorityQueue.attach(shm_name)
    os.unlink(f"/dev/shm/{shm_name}")
    from engine._sched import REGION_SIZE

    with open(f"/dev/shm/{shm_name}", "wb") as f:
        f.write(os.urandom(REGION_SIZE))
    with pytest.raises(IncompatibleRegion):
        PriorityQueue.attach(shm_name)
    os.unlink(f"/dev/shm/{shm_name}")
    kq = KeyedQueue.create(shm_name, partitions=2)
    with pytest.raises(IncompatibleRegion, match="KeyedQueue"):
        PriorityQueue.attach(shm_name)
    kq.close()
    KeyedQueue.unlink(shm_name)
    with pytest.raises(FileExistsError):
        with PriorityQueue.create(shm_name, levels=2):
            PriorityQueue.create(shm_name, levels=2)
    PriorityQueue.unlink(shm_name)


def test_attach_reads_settings(shm_name):
    with PriorityQueue.create(shm_name, levels=4, policy="weighted", weights=[4, 3, 2, 1], max_wait=0.5) as a:
        b = PriorityQueue.attach(shm_name)
        assert (b.levels, b.policy) == (4, "weighted")
        assert b.stats()["weights"] == [4, 3, 2, 1]
        assert b.stats()["max_wait"] == 0.5
        a.put(b"x", 3)
        assert b.get(timeout=1) == b"x"
        b.close()
    PriorityQueue.unlink(shm_name)


# ---------------------------------------------------------------------------
# KeyedQueue
# ---------------------------------------------------------------------------


def test_stable_hash_is_stable():
    # fixed values: the partition of a key must not depend on the process
    assert stable_hash(b"abc") == stable_hash("abc") == stable_hash(bytearray(b"abc"))
    assert stable_hash(12) == stable_hash(b"12")
    for k in (0, 7, -1, -(2**63), 2**63 - 1, 2**63, 10**30, -(10**30)):
        assert stable_hash(k) == stable_hash(str(k)), k
    assert len({stable_hash(i) % 8 for i in range(1000)}) == 8
    with pytest.raises(TypeError):
        stable_hash(1.5)


def test_keyed_single_consumer_order():
    with KeyedQueue(partitions=4) as kq:
        for i in range(1000):
            kq.put(struct.pack("<II", i % 37, i), key=i % 37)
        c = kq.consumer()
        seen = {}
        for _ in range(1000):
            k, i = struct.unpack("<II", c.get(timeout=1))
            assert i > seen.get(k, -1)
            seen[k] = i
        assert c.partitions == [0, 1, 2, 3]
        assert c.try_get() is None


def test_keyed_key_function_and_partition_of():
    with KeyedQueue(partitions=8, key=lambda m: m[:3]) as kq:
        kq.put(b"abc-1")
        kq.put(b"abc-2")
        assert kq.partition_of(b"abc") == stable_hash(b"abc") % 8
        c = kq.consumer()
        assert [c.get(timeout=1), c.get(timeout=1)] == [b"abc-1", b"abc-2"]
    with KeyedQueue(partitions=2) as kq:
        with pytest.raises(TypeError, match="key"):
            kq.put(b"no key")


def test_keyed_consumers_in_threads_with_join_and_leave():
    n = 30_000
    kq = KeyedQueue(partitions=6, capacity=1 << 20)
    results = {}
    stop = threading.Event()

    members = {}

    def consume(tag, limit_s):
        c = kq.consumer()
        members[tag] = c
        got = []
        end = time.monotonic() + limit_s
        try:
            while time.monotonic() < end:
                try:
                    got += c.get_many(256, timeout=0.05)
                except Closed:
                    break
                if stop.is_set() and tag == "early-leaver":
                    break
        finally:
            c.close()  # leaving: its partitions move to the others, rest unread kept
            results[tag] = got

    a = threading.Thread(target=consume, args=("a", 30))
    a.start()
    for i in range(n):
        kq.put(struct.pack("<II", i % 500, i), key=i % 500)
        if i == n // 3:
            b = threading.Thread(target=consume, args=("early-leaver", 30))
            b.start()
            # a hand-over takes a call of the old owner and a retry of the new
            # one: wait for it, so the leaver really consumes before it leaves
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not (
                    "early-leaver" in members and members["early-leaver"].partitions):
                time.sleep(0.005)
            assert members["early-leaver"].partitions, "the joiner never got a partition"
        if i == 2 * n // 3:
            stop.set()
    c = threading.Thread(target=consume, args=("c", 30))
    c.start()
    kq.close_put()
    for t in (a, b, c):
        t.join(60)
    kq.close()
    everything = []
    for tag, got in results.items():
        per_key = {}
        for m in got:
            k, i = struct.unpack("<II", m)
            assert i > per_key.get(k, -1), f"{tag}: key {k} out of order"
            per_key[k] = i
        everything += [struct.unpack("<II", m)[1] for m in got]
    assert sorted(everything) == list(range(n))  # each exactly once
    assert len(results["early-leaver"]) > 0


def test_keyed_delayed():
    with KeyedQueue(partitions=3) as kq:
        c = kq.consumer()
        t0 = time.monotonic()
        kq.put(b"later", key="k", delay=0.03)
        kq.put(b"now", key="k")
        assert c.get(timeout=1) == b"now"
        assert c.get(timeout=1) == b"later"
        assert time.monotonic() - t0 >= 0.03


def test_keyed_group_full_and_closed():
    kq = KeyedQueue(partitions=2)
    members = [kq.consumer() for _ in range(64)]
    with pytest.raises(engine.EngineError, match="full"):
        kq.consumer()
    members[0].close()
    kq.consumer().close()
    kq.close()
    with pytest.raises(Closed):
        kq.put(b"x", key=1)


# ---------------------------------------------------------------------------
# durable
# ---------------------------------------------------------------------------


def test_durable_survives_restart_and_redelivers_unacked(tmp_path):
    path = tmp_path / "pq"
    pq = PriorityQueue(levels=3, durable=True, path=str(path), durability="none", segment_bytes=SEG)
    assert isinstance(pq, DurablePriorityQueue)
    for i in range(30):
        pq.put(_msg(i % 3, i), priority=i % 3)
    first = [_unmsg(pq.get(timeout=1)) for _ in range(10)]
    assert first == sorted((i % 3, i) for i in range(30))[:10]
    pq.ack()
    extra = [_unmsg(pq.get(timeout=1)) for _ in range(5)]  # handed out, not acked
    pq.close()
    pq = PriorityQueue(levels=3, durable=True, path=str(path), durability="none", segment_bytes=SEG)
    rest = []
    while True:
        m = pq.try_get()
        if m is None:
            break
        rest.append(_unmsg(m))
    pq.ack()
    assert rest[:5] == extra  # redelivered
    assert sorted(first + rest) == sorted((i % 3, i) for i in range(30))
    pq.close()
    pq = PriorityQueue(levels=3, durable=True, path=str(path), durability="none", segment_bytes=SEG)
    assert pq.try_get() is None  # everything acked
    pq.close()


@pytest.mark.parametrize("kind", ["priority", "keyed"])
def test_durable_segment_bytes_sizes_the_logs_and_bad_sizes_fail_at_construction(tmp_path, kind):
    def make(path, seg):
        if kind == "priority":
            return PriorityQueue(levels=2, durable=True, path=str(path), durability="none", segment_bytes=seg)
        return KeyedQueue(partitions=2, durable=True, path=str(path), durability="none", segment_bytes=seg)

    for bad, exc in [(1000, ValueError), (1 << 33, ValueError), (1.5 * SEG, TypeError), (True, TypeError)]:
        with pytest.raises(exc, match="segment_bytes"):
            make(tmp_path / f"bad{bad!r}", bad)
    seg = 64 << 10
    q = make(tmp_path / "q", seg)
    put = (lambda i: q.put(b"%06d" % i + b"." * 1000, priority=i % 2)) if kind == "priority" else (
        lambda i: q.put(b"%06d" % i + b"." * 1000, key=i % 2))
    for i in range(300):  # ~300 KiB: several 64 KiB segments per log
        put(i)
    c = q if kind == "priority" else q.consumer()
    got = sorted(int(c.get(timeout=1)[:6]) for _ in range(300))
    assert got == list(range(300))
    c.ack()
    q.close()
    segs = list((tmp_path / "q").rglob("*.seg"))
    data = ["L0", "L1"] if kind == "priority" else ["P0", "P1"]
    for d in data:  # each holds ~150 KiB, so it rolled into 3 segments of 64 KiB
        assert len(list((tmp_path / "q" / d).glob("*.seg"))) == 3
    assert all(f.stat().st_size == seg for f in segs)
    assert sum(f.stat().st_size for f in segs) < 2 * 300 * 1100 + 4 * seg  # nothing sized by the default


def test_durable_delayed_and_strict(tmp_path):
    with PriorityQueue(levels=2, durable=True, path=str(tmp_path / "d"), durability="none", segment_bytes=SEG) as pq:
        pq.put(b"warm", 1)  # the first put opens the logs: keep that out of the timing
        assert pq.get(timeout=1) == b"warm"
        t = time.monotonic()
        pq.put(b"d", 0, delay=0.3)
        pq.put(b"low", 1)
        # the most urgent level, but not due yet: the less urgent one goes first
        assert pq.get(timeout=1) == b"low"
        assert pq.get(timeout=5) == b"d"
        # never early; woken at the due time, not at the end of the timeout
        # (the bound leaves room for a loaded 2-core machine)
        assert 0.3 <= time.monotonic() - t < 2.0
        pq.ack()


def test_close_from_another_thread_wakes_blocked_get():
    pq = PriorityQueue(levels=2)
    threading.Timer(0.05, pq.close).start()
    t = time.monotonic()
    with pytest.raises(Closed):
        pq.get(timeout=5)
    assert time.monotonic() - t < 1.0


def test_keyed_close_from_another_thread_wakes_blocked_get():
    kq = KeyedQueue(partitions=2)
    c = kq.consumer()
    threading.Timer(0.05, kq.close).start()
    t = time.monotonic()
    with pytest.raises(Closed):
        c.get(timeout=5)
    assert time.monotonic() - t < 1.0


def test_shared_queue_competing_consumers(shm_name):
    n = 20_000
    pq = PriorityQueue.create(shm_name, levels=3, capacity=1 << 20, max_consumers=2)
    results = {}

    def consume(tag):
        h = PriorityQueue.attach(shm_name)
        got = []
        try:
            while True:
                got += h.get_many(128, timeout=5)
        except Closed:
            pass
        finally:
            h.close()
            results[tag] = got

    threads = [threading.Thread(target=consume, args=(t,)) for t in "ab"]
    for t in threads:
        t.start()
    for i in range(n):
        pq.put(_msg(i % 3, i), priority=i % 3)
    pq.close()
    for t in threads:
        t.join(30)
    everything = []
    for got in results.values():
        last = [-1] * 3
        for m in got:
            lv, seq = _unmsg(m)
            assert seq > last[lv]  # each consumer sees a level in FIFO order
            last[lv] = seq
            everything.append(seq)
    assert sorted(everything) == list(range(n))  # exactly once overall
    PriorityQueue.unlink(shm_name)


def test_keyed_survives_garbage_group_tables(shm_name):
    """Random bytes over the member and owner tables: a consumer still joins,
    reaps the garbage and consumes everything (no crash, no hang)."""
    import mmap as _mmap

    from engine._sched import REGION_SIZE

    kq = KeyedQueue.create(shm_name, partitions=4)
    try:
        with open(f"/dev/shm/{shm_name}", "r+b") as f:
            mm = _mmap.mmap(f.fileno(), REGION_SIZE)
            rnd = random.Random(9)
            start = 2688  # members, then partition owners (sched_layout.h)
            mm[start:] = bytes(rnd.getrandbits(8) for _ in range(REGION_SIZE - start))
            mm.close()
        for i in range(100):
            kq.put(struct.pack("<I", i), key=i % 7)
        c = KeyedQueue.attach(shm_name).consumer()
        got = sorted(struct.unpack("<I", c.get(timeout=2))[0] for _ in range(100))
        assert got == list(range(100))
        c.close()
    finally:
        kq.close()
        KeyedQueue.unlink(shm_name)


def _durable_keyed_child(path, out):
    kq = KeyedQueue(partitions=4, durable=True, path=path, durability="none", segment_bytes=SEG)
    c = kq.consumer()
    first = [c.get(timeout=5) for _ in range(150)]
    c.ack()
    extra = [c.get(timeout=5) for _ in range(20)]  # handed out, never acked
    with open(out, "wb") as f:
        f.write(b"".join(first) + b"".join(extra))
    os.kill(os.getpid(), signal.SIGKILL)  # crash: no close, no hand-over commit


def test_durable_keyed_order_ack_and_restart(tmp_path):
    from engine.scheduling import DurableKeyedQueue

    path = str(tmp_path / "kq")
    kq = KeyedQueue(partitions=4, durable=True, path=path, durability="none", segment_bytes=SEG)
    assert isinstance(kq, DurableKeyedQueue)
    for i in range(400):
        kq.put(struct.pack("<II", i % 13, i), key=i % 13)
    kq.close()
    out = str(tmp_path / "child")
    p = FORK.Process(target=_durable_keyed_child, args=(path, out))
    p.start()
    p.join(30)
    assert p.exitcode == -signal.SIGKILL
    data = open(out, "rb").read()
    got = [struct.unpack_from("<II", data, j) for j in range(0, len(data), 8)]
    first, extra = got[:150], got[150:]
    kq2 = KeyedQueue(partitions=4, durable=True, path=path, durability="none", segment_bytes=SEG)
    c2 = kq2.consumer()
    rest = []
    while True:
        b = c2.get_many(64, timeout=0.3)
        if not b:
            break
        rest += [struct.unpack("<II", m) for m in b]
    assert c2.partitions == [0, 1, 2, 3]  # the dead member's partitions moved
    assert sorted(i for _, i in set(first) | set(rest)) == list(range(400))
    assert set(extra) <= set(rest)  # un-acked ones were delivered again
    assert not set(first) & set(rest)  # acked ones were not
    per_key = {}
    for k, i in rest:
        assert i > per_key.get(k, -1)
        per_key[k] = i
    c2.ack()
    kq2.close()
    kq3 = KeyedQueue(partitions=4, durable=True, path=path, durability="none", segment_bytes=SEG)
    assert kq3.try_get() is None
    kq3.close()
    with pytest.raises(ValueError, match="partitions"):
        KeyedQueue(partitions=5, durable=True, path=path, segment_bytes=SEG)


def test_durable_weighted_by_bytes(tmp_path):
    with PriorityQueue(levels=2, policy="weighted", weights=[1, 1], by="bytes", quantum=100,
                       durable=True, path=str(tmp_path / "b"), durability="none", segment_bytes=SEG) as pq:
        for _ in range(40):
            pq.put(b"s" * 10, 0)
            pq.put(b"L" * 100, 1)
        got = [pq.get(timeout=1) for _ in range(22)]
        small = sum(len(m) for m in got if m[:1] == b"s")
        large = sum(len(m) for m in got if m[:1] == b"L")
        assert abs(small - large) <= 100  # equal byte shares, not equal counts


def test_keyed_membership_churn_keeps_ownership_exclusive():
    """Members join and leave at random while messages flow: a partition is
    never read by two members at once (the ring would refuse the second
    reader), every message arrives once, and each key stays in order."""
    import itertools

    n = 40_000
    kq = KeyedQueue(partitions=6, capacity=1 << 12)  # small rings: the producer waits on the churn
    stamp = itertools.count()
    received = []  # (stamp, key, seq)
    errors = []
    done = threading.Event()

    def member(seed):
        rnd = random.Random(seed)
        try:
            while not done.is_set():
                c = kq.consumer()
                end = time.monotonic() + rnd.uniform(0.01, 0.15)
                try:
                    while time.monotonic() < end:
                        batch = c.get_many(64, timeout=0.01)
                        t = next(stamp)  # before the next call, which may hand partitions over
                        received.extend((t, *struct.unpack("<II", m)) for m in batch)
                except Closed:
                    done.set()
                finally:
                    c.close()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            done.set()

    threads = [threading.Thread(target=member, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for i in range(n):
        kq.put(struct.pack("<II", i % 97, i), key=i % 97)
    kq.close_put()
    deadline = time.monotonic() + 60
    while len(received) < n and time.monotonic() < deadline and not errors:
        time.sleep(0.01)
    done.set()
    for t in threads:
        t.join(10)
    kq.close()
    assert not errors, errors
    assert sorted(r[2] for r in received) == list(range(n))
    last = {}
    for _t, k, i in sorted(received):
        assert i > last.get(k, -1), f"key {k}: {i} after {last.get(k)}"
        last[k] = i


# ---------------------------------------------------------------------------
# durable delayed delivery (DurableKeyedQueue and DurablePriorityQueue)
# ---------------------------------------------------------------------------


class _Durable:
    """One durable queue of either kind behind one surface: put(msg, i, ...)
    sends message i to key i % 7 (keyed) or level i % 3 (priority)."""

    def __init__(self, kind, path):
        self.kind, self.path = kind, str(path)
        if kind == "keyed":
            self.q = KeyedQueue(partitions=3, durable=True, path=self.path, durability="none", segment_bytes=SEG)
            self.c = self.q.consumer()
        else:
            self.q = PriorityQueue(levels=3, durable=True, path=self.path, durability="none", segment_bytes=SEG)
            self.c = self.q

    def put(self, msg, i, **when):
        if self.kind == "keyed":
            self.q.put(msg, key=i % 7, **when)
        else:
            self.q.put(msg, priority=i % 3, **when)

    def reopen(self):
        self.q.close()
        return _Durable(self.kind, self.path)

    def warm(self):
        """Create every log first (64 MiB each, tens of ms): the timings a
        test then measures are the queue's, not the file system's."""
        for i in range(7):
            self.put(b"warm", i, delay=0.001)
        assert [self.c.get(timeout=1) for i in range(7)] == [b"warm"] * 7
        self.c.ack()
        return self


KINDS = ["keyed", "priority"]


@pytest.mark.parametrize("kind", KINDS)
def test_durable_delayed_never_early_and_late_at_most_10ms(kind, tmp_path):
    rnd = random.Random(5)
    q = _Durable(kind, tmp_path / "q").warm()
    earliest, latest = {}, {}
    for i in range(30):
        d = rnd.uniform(0.005, 0.25)
        t = time.monotonic_ns()
        q.put(struct.pack("<I", i), i, delay=d)
        earliest[i], latest[i] = t + int(d * 1e9), time.monotonic_ns() + int(d * 1e9)
    q.put(b"\xff\xff\xff\xff", 1)  # not delayed: served first
    assert q.c.get(timeout=1) == b"\xff\xff\xff\xff"
    assert q.c.try_get() is None  # nothing is due yet
    lateness = []
    for _ in range(30):
        m = q.c.get(timeout=2)
        now = time.monotonic_ns()
        i = struct.unpack("<I", m)[0]
        assert now >= earliest[i], f"message {i} {(earliest[i] - now) / 1e6:.3f} ms early"
        lateness.append((now - latest[i]) / 1e6)
    assert max(lateness) <= 10.0, f"late by up to {max(lateness):.2f} ms (median {statistics.median(lateness):.2f})"
    assert q.c.get_many(10, timeout=0.05) == []  # each once
    q.c.ack()
    q.q.close()


@pytest.mark.parametrize("kind", KINDS)
def test_durable_delay_survives_restart_at_original_due_time(kind, tmp_path):
    q = _Durable(kind, tmp_path / "q").warm()
    due = {}
    for i in range(12):
        w = time.time()
        due[i] = w + 0.5 + 0.01 * i
        if i % 3 == 0:
            q.put(struct.pack("<I", i), i, at=due[i])
        else:
            q.put(struct.pack("<I", i), i, delay=0.5 + 0.01 * i)
    w = time.time()
    due[12] = w + 0.02  # due while no consumer runs: delivered right after the reopen
    q.put(struct.pack("<I", 12), 12, delay=0.02)
    q.q.close()  # nothing consumed; the process could as well have died here
    time.sleep(0.2)
    q = _Durable(kind, tmp_path / "q")
    assert time.time() < min(due[i] for i in range(12)), "the restart took longer than the delays"
    assert struct.unpack("<I", q.c.get(timeout=1))[0] == 12
    assert q.c.try_get() is None
    lateness = []
    for _ in range(12):
        m = q.c.get(timeout=2)
        now = time.time()
        i = struct.unpack("<I", m)[0]
        assert now >= due[i], f"message {i} {(due[i] - now) * 1e3:.3f} ms early"
        lateness.append(now - due[i])
    # re-delayed from the reopen would be >= 200 ms late (the 10 ms bound on an
    # idle machine is test_durable_delayed_never_early_and_late_at_most_10ms's)
    assert max(lateness) <= 0.050, f"late by up to {max(lateness) * 1e3:.2f} ms"
    q.c.ack()
    q = q.reopen()
    assert q.c.get_many(10, timeout=0.05) == []
    q.q.close()


def _take_one_and_die(kind, path, out):
    q = _Durable(kind, path)
    with open(out, "wb") as f:
        f.write(q.c.get(timeout=5))  # handed out, never acked
    os.kill(os.getpid(), signal.SIGKILL)  # no close: a keyed consumer's close would commit it


@pytest.mark.parametrize("kind", KINDS)
def test_durable_delayed_acked_out_of_order_are_not_delivered_again(kind, tmp_path):
    q = _Durable(kind, tmp_path / "q").warm()
    due = time.monotonic() + 1.0
    # i = 0, 7, 14...: one key (one partition's delay log) or three levels (the one delay log)
    q.put(b"long", 0, delay=1.0)  # the lowest offset of the delay log stays pending
    q.put(b"short1", 7, delay=0.01)
    q.put(b"short2", 14, delay=0.01)
    assert sorted([q.c.get(timeout=1), q.c.get(timeout=1)]) == [b"short1", b"short2"]
    q.c.ack()
    q.put(b"short3", 21, delay=0.01)
    q.q.close()
    out = tmp_path / "child"
    p = FORK.Process(target=_take_one_and_die, args=(kind, str(tmp_path / "q"), str(out)))
    p.start()
    p.join(30)
    assert p.exitcode == -signal.SIGKILL and out.read_bytes() == b"short3"
    q = _Durable(kind, tmp_path / "q")
    assert time.monotonic() < due, "the restarts took longer than the delay"
    assert q.c.get(timeout=1) == b"short3"  # redelivered
    assert q.c.get(timeout=2) == b"long"  # acked short1/short2 never came again
    assert time.monotonic() >= due
    q.c.ack()
    q = q.reopen()
    assert q.c.get_many(10, timeout=0.05) == []
    q.q.close()


@pytest.mark.parametrize("kind", KINDS)
def test_durable_delay_side_list_garbage_or_torn(kind, tmp_path):
    q = _Durable(kind, tmp_path / "q")
    q.put(b"long", 0, delay=30)
    for i in range(1, 4):
        q.put(b"s%d" % i, 7 * i, delay=0.005)  # one delay log (see above)
    got = sorted(q.c.get(timeout=1) for _ in range(3))
    assert got == [b"s1", b"s2", b"s3"]
    q.c.ack()
    q.q.close()
    acked = tmp_path / "q" / "delay-acked"
    (lists,) = list(acked.iterdir())
    data = lists.read_bytes()
    with open(lists, "ab") as f:
        f.write(b"\x01" * 7)  # a crash tore an append
    q = _Durable(kind, tmp_path / "q")
    assert q.c.get_many(10, timeout=0.05) == []  # the whole entries before the tear still count
    q.put(b"s4", 28, delay=0.005)
    assert q.c.get(timeout=1) == b"s4"
    q.c.ack()  # rewrites the list rather than appending after the torn tail
    q = q.reopen()
    assert q.c.get_many(10, timeout=0.05) == []
    q.q.close()
    assert len(lists.read_bytes()) == len(data) + 16
    # garbage: at-least-once still holds (acked ones may come again), nothing is lost or crashes
    lists.write_bytes(os.urandom(len(data)))
    q = _Durable(kind, tmp_path / "q")
    again = q.c.get_many(10, timeout=0.1)
    assert set(again) <= {b"s1", b"s2", b"s3", b"s4"} and len(again) == len(set(again))
    q.q.close()


def test_durable_keyed_delayed_partition_hands_over_at_once(tmp_path):
    """A member holding not-yet-due delayed messages of a durable partition
    releases it at once on rebalance (they stay in the log); the new owner
    delivers them at their due times, each once."""
    path = str(tmp_path / "kq")
    kq = KeyedQueue(partitions=4, durable=True, path=path, durability="none", segment_bytes=SEG)
    a = kq.consumer()
    assert a.get_many(10, timeout=0.05) == [] and a.partitions == [0, 1, 2, 3]
    due = {}
    # a delay well above what 40 puts take on a loaded 2-core CI machine (the
    # first put creates the logs): none may be due at the try_get below
    for i in range(40):
        due[i] = time.monotonic() + 1.0
        kq.put(struct.pack("<I", i), key=i, delay=1.0)
    assert time.monotonic() < min(due.values())
    assert a.try_get() is None  # read ahead, held, none due
    kq2 = KeyedQueue(partitions=4, durable=True, path=path, durability="none", segment_bytes=SEG)
    b = kq2.consumer()
    got = {"a": [], "b": []}

    def run(tag, c):
        end = time.monotonic() + 2.0
        while time.monotonic() < end:
            for m in c.get_many(64, timeout=0.02):
                got[tag].append((struct.unpack("<I", m)[0], time.monotonic()))

    ts = [threading.Thread(target=run, args=("a", a)), threading.Thread(target=run, args=("b", b))]
    t0 = time.monotonic()
    for t in ts:
        t.start()
    deadline = t0 + 0.25
    while time.monotonic() < deadline and not b.partitions:
        time.sleep(0.005)
    assert b.partitions, "the holder of delayed messages did not hand a partition over before they were due"
    for t in ts:
        t.join(10)
    everything = got["a"] + got["b"]
    assert sorted(i for i, _ in everything) == list(range(40))  # each once
    assert all(t >= due[i] for i, t in everything)
    assert got["b"], "the new owner delivered none of its partitions' delayed messages"
    a.ack()
    b.ack()
    kq2.close()
    kq.close()


class DurableDelayMachine(RuleBasedStateMachine):
    """A durable queue against a model across puts (now, soon, later), gets,
    acks and restarts: a delayed message is never early, an acked one never
    comes again, nothing put is lost (checked when all are due, at the end)."""

    KIND = "keyed"

    def __init__(self):
        super().__init__()
        import tempfile

        self.dir = tempfile.mkdtemp(prefix="sched-delay-")
        self.q = _Durable(self.KIND, os.path.join(self.dir, "q"))
        self.due = {}  # id -> earliest wall time it may be delivered
        self.handed, self.acked, self.delivered = set(), set(), set()
        self.n = 0

    @rule(delay=st.sampled_from([None, 0.002, 0.006, 0.08]))
    def put(self, delay):
        i = self.n
        self.n += 1
        self.due[i] = time.time() + (delay or 0)
        self.q.put(struct.pack("<I", i), i, delay=delay)

    def _got(self, m):
        now = time.time()
        i = struct.unpack("<I", m)[0]
        assert now >= self.due[i], f"message {i} early"
        assert i not in self.acked, f"acked message {i} delivered again"
        self.handed.add(i)
        self.delivered.add(i)

    @rule()
    def try_get(self):
        m = self.q.c.try_get()
        if m is not None:
            self._got(m)

    @rule(k=st.integers(1, 5))
    def get_many(self, k):
        for m in self.q.c.get_many(k, timeout=0):
            self._got(m)

    @rule()
    def wait(self):
        time.sleep(0.004)

    @rule()
    def ack(self):
        self.q.c.ack()
        self.acked |= self.handed
        self.handed = set()

    @rule()
    def restart(self):
        self.q = self.q.reopen()
        if self.KIND == "keyed":
            self.acked |= self.handed  # a keyed consumer's close commits what it was handed
        self.handed = set()  # a PriorityQueue's were not acked: they come again

    def teardown(self):
        try:
            time.sleep(max([0.0] + [d - time.time() for d in self.due.values()]) + 0.002)
            deadline = time.monotonic() + 5  # a busy machine may deliver late, never not at all
            while self.delivered != set(self.due) and time.monotonic() < deadline:
                for m in self.q.c.get_many(64, timeout=0.05):
                    self._got(m)
            for m in self.q.c.get_many(64, timeout=0.05):  # and nothing acked comes again
                self._got(m)
            assert self.delivered == set(self.due), sorted(set(self.due) - self.delivered)
            self.q.q.close()
        finally:
            import shutil

            shutil.rmtree(self.dir, ignore_errors=True)


class DurablePriorityDelayMachine(DurableDelayMachine):
    KIND = "priority"


@pytest.mark.parametrize("machine", [DurableDelayMachine, DurablePriorityDelayMachine])
def test_durable_delay_model(machine):
    from hypothesis.stateful import run_state_machine_as_test

    run_state_machine_as_test(machine, settings=settings(
        max_examples=10, stateful_step_count=25, deadline=None,
        suppress_health_check=[HealthCheck.too_slow]))
