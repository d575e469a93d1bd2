"""A dead role holder whose pid was reused by a new process is still dead.

A ring producer or consumer, or a keyed consumer-group member, is SIGKILLed;
then its pid field in the shared header
is pointed at a live, unrelated process (what the kernel does when it hands
the pid out again), keeping the dead holder's start time. Liveness by pid
alone would take the stranger for the holder: consumers would wait for a
producer that will never put again, and the role would stay taken forever.
"""

from __future__ import annotations

import mmap
import multiprocessing as mp
import os
import signal
import struct
import subprocess
import sys
import time

import pytest

import engine
from engine.scheduling import KeyedQueue

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc start times")

CTX = mp.get_context("fork")
BLOCK = 128
PROD_PID = 1 * BLOCK + 8  # ring_producer_t.pid
PROD_START = 1 * BLOCK + 56  # ring_producer_t.pid_start
SLOT0_PID = 4 * BLOCK + 8  # ring_slot_t.pid of slot 0
SLOT0_START = 4 * BLOCK + 48  # ring_slot_t.pid_start
MEMBER0_PID = 2688 + 8  # eng_sched_member_t.pid of member slot 0 (sched_layout.h)
MEMBER0_START = 2688 + 32  # eng_sched_member_t.pid_start


def _hold_producer(name, ready):
    p = engine.Ring.attach(name).producer()
    p.put(b"last words")
    ready.set()
    time.sleep(60)


def _hold_consumer(name, ready):
    c = engine.Ring.attach(name).consumer()
    ready.set()
    time.sleep(60)  # SIGKILLed holding the slot
    c.close()


def _die_holding(target, name):
    ready = CTX.Event()
    proc = CTX.Process(target=target, args=(name, ready))
    proc.start()
    assert ready.wait(30)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)


def _reuse_pid(name, pid_off, start_off, stranger):
    """Point the role's pid at `stranger`, keep the dead holder's start time."""
    with open(f"/dev/shm/{name}", "r+b") as f, mmap.mmap(f.fileno(), 4096) as mm:
        start = struct.unpack_from("<Q", mm, start_off)[0]
        assert start != 0 and start != _start_time(stranger)  # the holder recorded its own start
        struct.pack_into("<i", mm, pid_off, stranger)


def _start_time(pid):
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    return int(stat[stat.rfind(b")") + 2:].split()[19])


@pytest.fixture
def stranger():
    """Start a live, unrelated process later (call it after the holder died):
    start times tick in 1/100 s, and a real reuse comes long after."""
    procs = []

    def start():
        time.sleep(0.05)
        proc = subprocess.Popen(["sleep", "60"])
        procs.append(proc)
        return proc.pid

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def _dead_producer_pid_reused(name, stranger):
    """A ring and a consumer; its producer put one message, died, and its pid
    now names the stranger."""
    ring = engine.Ring.create(name, capacity=1 << 16)
    c = ring.consumer()
    _die_holding(_hold_producer, name)
    _reuse_pid(name, PROD_PID, PROD_START, stranger())
    return ring, c


def test_reused_producer_pid_ends_the_stream(shm_name, stranger):
    ring, c = _dead_producer_pid_reused(shm_name, stranger)
    assert c.get(timeout=5) == b"last words"
    t = time.monotonic()
    with pytest.raises(engine.Closed):
        c.get(timeout=20)  # not Timeout: the producer is known dead
    assert time.monotonic() - t < 10
    ring.close()


def test_reused_producer_pid_does_not_block_a_new_producer(shm_name, stranger):
    ring, c = _dead_producer_pid_reused(shm_name, stranger)
    with ring.producer() as p:  # takes the role over from the dead holder
        p.put(b"new")
    assert c.get(timeout=5) == b"last words"
    assert c.get(timeout=5) == b"new"
    ring.close()


def test_reused_consumer_pid_frees_the_slot(shm_name, stranger):
    ring = engine.Ring.create(shm_name, capacity=1 << 16, max_consumers=1)
    _die_holding(_hold_consumer, shm_name)
    _reuse_pid(shm_name, SLOT0_PID, SLOT0_START, stranger())
    with ring.producer() as p:
        p.put(b"for whoever comes next")
    c = ring.consumer()  # the only slot: reaped from the dead holder
    assert c.get(timeout=5) == b"for whoever comes next"
    ring.close()


def test_a_live_holder_is_still_alive(shm_name):
    # the start time recorded is the holder's own: no false death
    ring = engine.Ring.create(shm_name, capacity=1 << 16, max_consumers=1)
    p = ring.producer()
    c = ring.consumer()
    with pytest.raises(engine.EngineError, match="live producer"):
        ring.producer()
    with pytest.raises(engine.EngineError, match="slots are taken"):
        ring.consumer()
    p.put(b"x")
    assert c.get(timeout=1) == b"x"
    ring.close()


def _join_group(name, ready):
    c = KeyedQueue.attach(name).consumer()
    deadline = time.monotonic() + 20
    while c.partitions != [0, 1, 2, 3]:  # the only member: takes every partition
        assert c.try_get() is None and time.monotonic() < deadline
        time.sleep(0.01)
    ready.set()
    time.sleep(60)  # SIGKILLed holding them
    c.close()


def test_reused_member_pid_gives_its_partitions_back(shm_name, stranger):
    kq = KeyedQueue.create(shm_name, partitions=4)
    try:
        _die_holding(_join_group, shm_name)
        _reuse_pid(shm_name, MEMBER0_PID, MEMBER0_START, stranger())
        for i in range(100):
            kq.put(struct.pack("<I", i), key=i % 7)
        c = kq.consumer()  # reaps the dead member, then owns its partitions
        got = sorted(struct.unpack("<I", c.get(timeout=5))[0] for _ in range(100))
        assert got == list(range(100))
        assert c.partitions == [0, 1, 2, 3]
        c.close()
    finally:
        kq.close()
        KeyedQueue.unlink(shm_name)
