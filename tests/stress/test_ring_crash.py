"""Crash tests: real processes SIGKILLed at the worst moment."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time

import pytest

import engine

pytestmark = [pytest.mark.crash, pytest.mark.timeout(60)]
CTX = mp.get_context("fork")
MSG = b"m" * 120  # 128-byte records: 64 fill a 8 KiB ring


def _idle_consumer(name, ready, take, via_view):
    """Register, read `take` messages (holding a view of the last one when
    via_view), report, then hang until killed."""
    r = engine.Ring.attach(name)
    c = r.consumer()
    got = []
    for _ in range(take):
        if via_view:
            got.append(bytes(c.get_view(timeout=10)))
        else:
            got.append(c.get(timeout=10))
    ready.send([int.from_bytes(m[:8], "little") for m in got])
    time.sleep(120)


def _msg(i):
    return i.to_bytes(8, "little") + MSG[8:]


def _start(name, take, via_view=False):
    a, b = CTX.Pipe()
    child = CTX.Process(target=_idle_consumer, args=(name, b, take, via_view), daemon=True)
    child.start()
    return child, a


def _kill_and_time_blocked_put(p, child, next_i):
    """Kill the child while the producer is blocked in put; return seconds
    from the kill to the put going through."""
    done = {}

    def killer():
        time.sleep(0.3)  # the producer is asleep in put() by now
        done["kill"] = time.monotonic()
        os.kill(child.pid, signal.SIGKILL)

    threading.Thread(target=killer).start()
    p.put(_msg(next_i), timeout=20)
    child.join(10)
    return time.monotonic() - done["kill"]


def test_broadcast_producer_goes_on_within_a_second(shm_name):
    r = engine.Ring.create(shm_name, 8192, mode="broadcast", max_consumers=2)
    child, pipe = _start(shm_name, 0)
    assert pipe.recv() == []
    live = r.consumer()
    p = r.producer()
    got = []
    i = 0
    while p.try_put(_msg(i)):
        i += 1
    got.extend(live.get_many(1000))  # the live consumer keeps up; the child does not
    assert not p.try_put(_msg(i))
    delay = _kill_and_time_blocked_put(p, child, i)
    assert delay < 1.0, f"producer blocked {delay:.2f}s after the gating consumer died"
    i += 1
    for _ in range(200):
        p.put(_msg(i), timeout=5)
        i += 1
        got.extend(live.get_many(1000))
    p.close()
    with pytest.raises(engine.Closed):
        got.extend(live.get_many(1000))
    assert [int.from_bytes(m[:8], "little") for m in got] == list(range(i))
    assert len(r.stats()["consumers"]) == 1  # the dead slot was freed
    r.close()


def test_shared_lost_message_is_counted(shm_name):
    r = engine.Ring.create(shm_name, 8192, mode="shared", max_consumers=2)
    p = r.producer()
    for i in range(3):
        p.put(_msg(i))
    child, pipe = _start(shm_name, 1, via_view=True)  # holds message 0 in a view
    assert pipe.recv() == [0]
    i = 3
    while p.try_put(_msg(i)):
        i += 1
    live = r.consumer()
    got = live.get_many(1000)
    assert not p.try_put(_msg(i))  # the child's claim gates the producer
    delay = _kill_and_time_blocked_put(p, child, i)
    assert delay < 1.0
    i += 1
    p.close()
    got.extend(live.get_many(1000))
    ids = [int.from_bytes(m[:8], "little") for m in got]
    assert ids == list(range(1, i))  # message 0 went to the dead consumer
    assert r.stats()["lost"] == 1
    r.close()


def test_spsc_replacement_consumer_resumes_where_the_dead_one_stopped(shm_name):
    r = engine.Ring.create(shm_name, 8192, mode="spsc")
    p = r.producer()
    i = 0
    while p.try_put(_msg(i)):
        i += 1
    child, pipe = _start(shm_name, 10)
    assert pipe.recv() == list(range(10))
    os.kill(child.pid, signal.SIGKILL)
    child.join(10)
    c = r.consumer()  # the dead consumer's slot is taken over
    got = c.get_many(1000)
    assert [int.from_bytes(m[:8], "little") for m in got] == list(range(10, i))
    r.close()


def _dead_producer(name, ready):
    r = engine.Ring.attach(name)
    p = r.producer()
    p.put(b"last words")
    ready.send(True)
    time.sleep(120)


def test_dead_producer_role_is_taken_over_and_consumers_are_released(shm_name):
    r = engine.Ring.create(shm_name, 8192, mode="spsc")
    c = r.consumer()
    a, b = CTX.Pipe()
    child = CTX.Process(target=_dead_producer, args=(shm_name, b), daemon=True)
    child.start()
    assert a.recv()
    with pytest.raises(engine.EngineError, match="live producer"):
        r.producer()
    assert c.get(timeout=5) == b"last words"
    os.kill(child.pid, signal.SIGKILL)
    child.join(10)
    # a consumer blocked on a dead producer does not wait forever
    t = time.monotonic()
    with pytest.raises(engine.Closed):
        c.get(timeout=10)
    assert time.monotonic() - t < 2
    r.close()


def test_dead_producer_role_can_be_taken_over(shm_name):
    r = engine.Ring.create(shm_name, 8192, mode="spsc")
    a, b = CTX.Pipe()
    child = CTX.Process(target=_dead_producer, args=(shm_name, b), daemon=True)
    child.start()
    assert a.recv()
    os.kill(child.pid, signal.SIGKILL)
    child.join(10)
    with r.producer() as p:  # no consumer noticed the death: the role is free
        p.put(b"new producer")
    c = r.consumer()
    assert c.get_many() == [b"last words", b"new producer"]
    r.close()
