"""Unit tests of engine.Ring: every method, every error, in every mode."""

from __future__ import annotations

import os
import signal
import stat
import threading
import time

import numpy as np
import pytest

import engine
from engine import _ring

MODES = ["spsc", "broadcast", "shared"]


def _ring_for(mode, capacity=1 << 12):
    return engine.Ring(capacity, mode=mode, max_consumers=1 if mode == "spsc" else 3)


# ---- construction and validation ---------------------------------------------------------


def test_capacity_rounds_up_to_power_of_two_with_minimum():
    assert engine.Ring(1).capacity == 4096
    assert engine.Ring(5000).capacity == 8192
    assert engine.Ring(1 << 16).capacity == 1 << 16
    r = engine.Ring(1 << 16)
    assert r.max_message == (1 << 15) - 8
    assert r.mode == "spsc" and r.max_consumers == 1 and r.name is None


@pytest.mark.parametrize("cap", [0, -1, (1 << 40) + 1])
def test_bad_capacity_is_value_error(cap):
    with pytest.raises(ValueError, match="capacity"):
        engine.Ring(cap)


@pytest.mark.parametrize("cap", [1.5, "4096", None, True])
def test_capacity_type_error(cap):
    with pytest.raises(TypeError, match="capacity"):
        engine.Ring(cap)


def test_bad_mode_and_consumers():
    with pytest.raises(ValueError, match="mode"):
        engine.Ring(4096, mode="fanout")
    with pytest.raises(ValueError, match="spsc"):
        engine.Ring(4096, mode="spsc", max_consumers=2)
    with pytest.raises(ValueError, match="max_consumers"):
        engine.Ring(4096, mode="broadcast", max_consumers=0)
    with pytest.raises(ValueError, match="max_consumers"):
        engine.Ring(4096, mode="shared", max_consumers=_ring.MAX_CONSUMERS + 1)
    with pytest.raises(TypeError, match="max_consumers"):
        engine.Ring(4096, mode="shared", max_consumers="3")


def test_many_consumer_slots_grow_the_header(shm_name):
    r = engine.Ring.create(shm_name, 4096, mode="broadcast", max_consumers=100)
    size = os.stat(f"/dev/shm/{shm_name}").st_size
    assert size == 4096 + 16384  # 512 + 100*128 rounded to pages
    cs = [r.consumer() for _ in range(100)]
    with pytest.raises(engine.EngineError, match="slots are taken"):
        r.consumer()
    cs[0].close()
    r.consumer()
    r.close()


# ---- put/get basics in every mode -----------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_put_get_roundtrip_all_buffer_kinds(mode):
    r = _ring_for(mode)
    p, c = r.producer(), r.consumer()
    msgs = [
        b"",
        b"a",
        bytearray(b"bc"),
        memoryview(b"def"),
        np.arange(5, dtype=np.int16),
        b"x" * 2000,
    ]
    for m in msgs:
        p.put(m)
    for m in msgs:
        assert c.get() == bytes(memoryview(m).cast("B"))
    assert c.try_get() is None


@pytest.mark.parametrize("mode", MODES)
def test_wraparound_keeps_order_and_payloads(mode):
    r = _ring_for(mode, 4096)
    p, c = r.producer(), r.consumer()
    rnd = np.random.default_rng(1)
    for _i in range(3000):
        m = bytes(rnd.integers(0, 256, int(rnd.integers(0, 700)), dtype=np.uint8))
        p.put(m)
        assert c.get() == m
    assert r.stats()["head"] > 10 * 4096


def test_non_buffer_is_type_error_and_non_contiguous_too():
    r = engine.Ring(4096)
    p = r.producer()
    for bad in ("text", 12, None, object(), [b"a"]):
        with pytest.raises(TypeError):
            p.put(bad)
        with pytest.raises(TypeError):
            p.try_put(bad)
    with pytest.raises(TypeError, match="contiguous"):
        p.put(np.zeros((4, 4), np.uint8)[:, 1])
    with pytest.raises(TypeError):
        p.put_many([b"ok", "bad"])
    c = r.consumer()
    assert c.get_many(10) == [b"ok"]  # the messages before the bad one were put


def test_too_large_is_value_error_never_a_hang():
    r = engine.Ring(4096)
    p, c = r.producer(), r.consumer()
    p.put(b"x" * r.max_message)
    assert len(c.get()) == r.max_message
    with pytest.raises(ValueError, match="larger"):
        p.put(b"x" * (r.max_message + 1))
    with pytest.raises(ValueError, match="larger"):
        p.try_put(b"x" * 4096)
    with pytest.raises(ValueError, match="larger"):
        p.put_many([b"a", b"x" * 5000])
    with pytest.raises(ValueError, match="larger"):
        p.put_array(np.zeros((2, 3000), np.uint8))
    assert c.get_many(10) == [b"a"]


def test_try_put_full_then_room_again():
    r = engine.Ring(4096)
    p, c = r.producer(), r.consumer()
    n = 0
    while p.try_put(b"y" * 56):  # 64-byte records
        n += 1
    assert n == 4096 // 64
    assert not p.try_put(b"")
    assert c.get() == b"y" * 56
    assert p.try_put(b"y" * 56)
    assert len(c.get_many(1000)) == n


def test_put_timeout_when_full():
    r = engine.Ring(4096)
    p, _c = r.producer(), r.consumer()
    while p.try_put(b"z" * 100):
        pass
    t = time.monotonic()
    with pytest.raises(engine.Timeout):
        p.put(b"z" * 100, timeout=0.1)
    assert 0.08 <= time.monotonic() - t < 2
    with pytest.raises(TimeoutError):  # Timeout is a TimeoutError too
        p.put(b"z" * 100, timeout=0)
    with pytest.raises(engine.Timeout):
        p.put_many([b"z" * 100] * 3, timeout=0.05)


def test_get_timeout_and_bad_timeouts():
    r = engine.Ring(4096)
    p, c = r.producer(), r.consumer()
    t = time.monotonic()
    with pytest.raises(engine.Timeout):
        c.get(timeout=0.1)
    assert 0.08 <= time.monotonic() - t < 2
    with pytest.raises(engine.Timeout):
        c.get(timeout=0)
    with pytest.raises(engine.Timeout):
        c.get_view(timeout=0.01)
    with pytest.raises(ValueError, match="timeout"):
        c.get(timeout=-1)
    with pytest.raises(ValueError, match="timeout"):
        p.put(b"x", timeout=float("nan"))
    with pytest.raises(ValueError, match="max"):
        c.get_many(0)


# ---- batches and arrays -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_put_many_get_many(mode):
    r = _ring_for(mode, 1 << 14)
    p, c = r.producer(), r.consumer()
    msgs = [b"m%05d" % i for i in range(5000)]
    got = []

    def consume():
        while len(got) < len(msgs):
            got.extend(c.get_many(700, timeout=5))

    t = threading.Thread(target=consume)
    t.start()
    assert p.put_many(iter(msgs)) == 5000  # any iterable, blocking as needed
    t.join(10)
    assert got == msgs
    assert c.get_many(10) == []


def test_get_many_blocking_flavours():
    r = engine.Ring(4096)
    p, c = r.producer(), r.consumer()
    assert c.get_many() == []
    t = time.monotonic()
    assert c.get_many(5, timeout=0.05) == []
    assert time.monotonic() - t >= 0.04
    threading.Timer(0.05, p.put, (b"late",)).start()
    assert c.get_many(5, timeout=None) == [b"late"]
    p.put_many([b"1", b"2", b"3"])
    assert c.get_many(2) == [b"1", b"2"]
    assert c.get_many(2) == [b"3"]


@pytest.mark.parametrize("mode", MODES)
def test_arrays_roundtrip_and_dtype(mode):
    r = _ring_for(mode, 1 << 16)
    p, c = r.producer(), r.consumer()
    a = np.arange(200 * 16, dtype=np.float32).reshape(200, 16)
    assert p.put_array(a) == 200
    got = c.get_array(150, dtype=np.float32)
    assert got.shape == (150, 16) and got.dtype == np.float32
    np.testing.assert_array_equal(got, a[:150])
    got = c.get_array(1000, dtype="float32")
    np.testing.assert_array_equal(got, a[150:])
    assert c.get_array(10).shape == (0, 0)
    # a 1-D array: every element is one message
    p.put_array(np.arange(5, dtype=np.int64))
    assert [int.from_bytes(c.get(), "little") for _ in range(5)] == list(range(5))
    assert p.put_array(np.zeros((0, 8), np.uint8)) == 0


def test_get_array_stops_at_other_size_and_checks_itemsize():
    r = engine.Ring(1 << 14)
    p, c = r.producer(), r.consumer()
    p.put_many([b"a" * 8, b"b" * 8, b"c" * 12, b"d" * 8])
    arr = c.get_array(10)
    assert arr.shape == (2, 8) and bytes(arr[1]) == b"b" * 8
    with pytest.raises(ValueError, match="whole number"):
        c.get_array(10, dtype=np.int64)  # 12 bytes is not a whole number of int64
    assert c.get_array(10, dtype=np.int32).shape == (1, 3)
    assert c.get() == b"d" * 8
    with pytest.raises(TypeError):
        p.put_array([1, 2, 3])
    with pytest.raises(ValueError, match="dimension"):
        p.put_array(np.float64(1.0))


def test_arrays_across_the_wrap():
    r = engine.Ring(4096)
    p, c = r.producer(), r.consumer()
    rows = np.arange(30 * 40, dtype=np.uint8).reshape(30, 40)  # 48-byte records
    for _ in range(20):
        p.put_array(rows)
        out = []
        while sum(len(x) for x in out) < 30:
            out.append(c.get_array(7))
        np.testing.assert_array_equal(np.concatenate(out), rows)


# ---- zero-copy views ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_get_view_valid_until_next_call(mode):
    r = _ring_for(mode, 4096)
    p, c = r.producer(), r.consumer()
    p.put(b"A" * 1000)
    v = c.get_view()
    assert v.readonly and bytes(v) == b"A" * 1000
    # the producer cannot overwrite the viewed record before our next call
    n = 0
    while p.try_put(b"B" * 1000):
        n += 1
    assert bytes(v) == b"A" * 1000
    assert c.get() == b"B" * 1000  # releases the view
    assert p.try_put(b"C" * 1000) or p.try_put(b"C" * 1000)


def test_view_outlives_close_without_crashing():
    r = engine.Ring(4096)
    p, c = r.producer(), r.consumer()
    p.put(b"keep me")
    v = c.get_view()
    r.close()
    del p, c, r
    assert bytes(v) == b"keep me"  # the mapping lives as long as the view


# ---- lifecycle -------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_close_drains_then_closed(mode):
    r = _ring_for(mode)
    p, c = r.producer(), r.consumer()
    p.put_many([b"1", b"2", b"3"])
    p.close()
    assert p.closed
    with pytest.raises(engine.Closed):
        p.put(b"4")
    with pytest.raises(engine.Closed):
        p.try_put(b"4")
    with pytest.raises(engine.Closed):
        r.producer()
    assert c.get() == b"1"
    assert c.get_many(10) == [b"2", b"3"]
    for call in (c.get, c.try_get, c.get_many, c.get_view, lambda: c.get_array(3)):
        with pytest.raises(engine.Closed):
            call()


def test_close_wakes_a_blocked_consumer():
    r = engine.Ring(4096)
    p, c = r.producer(), r.consumer()
    threading.Timer(0.1, p.close).start()
    t = time.monotonic()
    with pytest.raises(engine.Closed):
        c.get(timeout=10)
    assert time.monotonic() - t < 5


def test_one_producer_at_a_time_and_handle_lifecycle():
    r = engine.Ring(4096, mode="broadcast", max_consumers=2)
    p = r.producer()
    with pytest.raises(engine.EngineError, match="producer"):
        r.producer()
    del p  # dropping the handle gives the role back without closing
    with r.producer() as p2:
        p2.put(b"x")
    assert r.stats()["closed"]
    with r.consumer() as c:
        assert c.get() == b"x"
    assert c.closed
    with pytest.raises(engine.Closed):
        c.try_get()


def test_consumer_joining_later_gets_what_is_kept():
    r = engine.Ring(4096)
    p = r.producer()
    p.put_many([b"a", b"b", b"c"])
    c1 = r.consumer()
    assert c1.get() == b"a"
    c1.close()  # spsc: unread messages stay for the next consumer
    c2 = r.consumer()
    assert c2.get_many() == [b"b", b"c"]


def test_broadcast_every_consumer_gets_every_message():
    r = engine.Ring(4096, mode="broadcast", max_consumers=3)
    p = r.producer()
    cs = [r.consumer() for _ in range(3)]
    for i in range(500):
        p.put(b"%d" % i)
        assert [c.get() for c in cs] == [b"%d" % i] * 3
    # the producer is gated by the slowest consumer
    while p.try_put(b"q" * 100):
        pass
    cs[0].get_many(1000)
    cs[1].get_many(1000)
    assert not p.try_put(b"q" * 100)
    cs[2].get_many(1000)
    assert p.try_put(b"q" * 100)


def test_shared_each_message_once():
    r = engine.Ring(1 << 14, mode="shared", max_consumers=3)
    p = r.producer()
    cs = [r.consumer() for _ in range(3)]
    p.put_many([b"%d" % i for i in range(300)])
    got = []
    for i in range(300):
        x = cs[i % 3].try_get()
        if x is not None:
            got.append(x)
    for c in cs:
        got.extend(c.get_many(1000))
    assert sorted(got, key=int) == [b"%d" % i for i in range(300)]


def test_ring_close_closes_handles_and_context_managers():
    with engine.Ring(4096) as r:
        p, c = r.producer(), r.consumer()
        p.put(b"x")
    assert r.closed and p.closed and c.closed
    with pytest.raises(engine.Closed):
        r.producer()
    with pytest.raises(engine.Closed):
        r.stats()
    r.close()  # idempotent
    assert "closed" in repr(r)


def test_stats_fields():
    r = engine.Ring(4096, mode="broadcast", max_consumers=2)
    p = r.producer()
    c1, _c2 = r.consumer(), r.consumer()
    p.put_many([b"x" * 56] * 10)
    c1.get_many(4)
    s = r.stats()
    assert s["mode"] == "broadcast" and s["capacity"] == 4096
    assert s["messages_put"] == 10 and s["bytes_put"] == 560
    assert s["used_bytes"] == 640
    lags = sorted(x["lag_bytes"] for x in s["consumers"])
    assert lags == [6 * 64, 640]
    assert s["messages_got"] == 4 and s["lost"] == 0
    assert s["producer_pid"] == os.getpid()


# ---- named regions ------------------------------------------------------------------------------


def test_create_attach_unlink(shm_name):
    r = engine.Ring.create(shm_name, 1 << 13, mode="shared", max_consumers=2)
    path = f"/dev/shm/{shm_name}"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with pytest.raises(FileExistsError):
        engine.Ring.create(shm_name, 4096)
    r2 = engine.Ring.attach(shm_name)
    assert (r2.capacity, r2.mode, r2.max_consumers) == (1 << 13, "shared", 2)
    r.producer().put(b"over shm")
    assert r2.consumer().get() == b"over shm"
    r3 = engine.Ring.create(shm_name, exist_ok=True)
    assert r3.mode == "shared"
    engine.Ring.unlink(shm_name)
    assert not os.path.exists(path)
    with pytest.raises(engine.IncompatibleRegion, match="no such region"):
        engine.Ring.attach(shm_name)
    with pytest.raises(FileNotFoundError):
        engine.Ring.unlink(shm_name)
    engine.Ring.unlink(shm_name, missing_ok=True)


def test_unlink_refuses_foreign_file(shm_name):
    with open(f"/dev/shm/{shm_name}", "wb") as f:
        f.write(b"not a ring at all")
    with pytest.raises(engine.IncompatibleRegion, match="not a queue-engine ring"):
        engine.Ring.unlink(shm_name)


@pytest.mark.parametrize("name", ["", "a/b", "..", "x" * 300])
def test_bad_names(name):
    with pytest.raises(ValueError, match="name"):
        engine.Ring.create(name)
    with pytest.raises(ValueError, match="name"):
        engine.Ring.attach(name)


def test_named_ring_across_fork(shm_name):
    r = engine.Ring.create(shm_name, 1 << 16)
    pid = os.fork()
    if pid == 0:  # child: producer
        code = 1
        try:
            with engine.Ring.attach(shm_name) as rr, rr.producer() as p:
                for i in range(10000):
                    p.put(i.to_bytes(4, "little"))
            code = 0
        finally:
            os._exit(code)
    c = r.consumer()
    got = []
    while True:
        try:
            got.extend(c.get_many(1000, timeout=10))
        except engine.Closed:
            break
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert [int.from_bytes(x, "little") for x in got] == list(range(10000))


# ---- blocking: threads, wake-ups, Ctrl-C ----------------------------------------------------------


def test_threads_blocking_both_ways():
    r = engine.Ring(4096)
    p, c = r.producer(), r.consumer()
    n = 20000
    out = []

    def consume():
        for _ in range(n):
            out.append(c.get(timeout=10))

    t = threading.Thread(target=consume)
    t.start()
    for i in range(n):
        p.put(i.to_bytes(4, "little") * 10, timeout=10)
    t.join(20)
    assert [int.from_bytes(x[:4], "little") for x in out] == list(range(n))
    assert r.stats()["messages_got"] == n


def _interrupt_main_after(delay):
    main = threading.main_thread().ident

    def fire():
        time.sleep(delay)
        signal.pthread_kill(main, signal.SIGINT)

    threading.Thread(target=fire, daemon=True).start()


def test_keyboard_interrupt_while_blocked_in_get(sigint_raises):
    r = engine.Ring(4096)
    c = r.consumer()
    _interrupt_main_after(0.2)
    t = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        c.get()
    assert time.monotonic() - t < 5
    # the handle still works afterwards
    r.producer().put(b"after")
    assert c.get(timeout=1) == b"after"


def test_keyboard_interrupt_while_blocked_in_put(sigint_raises):
    r = engine.Ring(4096)
    p, _c = r.producer(), r.consumer()
    while p.try_put(b"f" * 500):
        pass
    _interrupt_main_after(0.2)
    with pytest.raises(KeyboardInterrupt):
        p.put(b"f" * 500)


def test_idle_waiter_burns_no_cpu():
    r = engine.Ring(4096)
    c = r.consumer()
    t0 = time.process_time()
    with pytest.raises(engine.Timeout):
        c.get(timeout=0.5)
    # spinning the whole time would cost ~0.5 s of CPU
    assert time.process_time() - t0 < 0.1


# ---- the `queue-engine ring` command ---------------------------------------------------------------


def test_cli_ring_ls_stats_unlink(shm_name, capsys):
    import json

    from engine.cli import main

    r = engine.Ring.create(shm_name, 8192, mode="broadcast", max_consumers=2)
    p, _c = r.producer(), r.consumer()
    p.put(b"abc")
    with open(f"/dev/shm/{shm_name}-foreign", "wb") as f:
        f.write(b"\0" * 64)
    assert main(["ring", "ls", "--json"]) == 0
    listed = {x["name"]: x for x in map(json.loads, capsys.readouterr().out.splitlines())}
    assert listed[shm_name]["mode"] == "broadcast" and listed[shm_name]["capacity"] == 8192
    assert f"{shm_name}-foreign" not in listed
    assert main(["ring", "ls"]) == 0
    assert shm_name in capsys.readouterr().out
    assert main(["ring", "stats", shm_name, "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["messages_put"] == 1 and st["consumers"][0]["lag_bytes"] == 16
    assert main(["ring", "stats", shm_name]) == 0
    assert "messages_put: 1" in capsys.readouterr().out
    assert main(["ring", "unlink", f"{shm_name}-foreign"]) == 1
    assert "not a queue-engine ring" in capsys.readouterr().err
    assert main(["ring", "unlink", shm_name]) == 0
    assert main(["ring", "stats", shm_name]) == 1
    assert "no such region" in capsys.readouterr().err
    assert main(["ring", "unlink", shm_name]) == 1
    assert main(["ring", "unlink", shm_name, "--missing-ok"]) == 0
    r.close()


def test_get_array_sees_everything_published_so_far():
    # regression (found by the state machine): a cached head must not hide
    # messages published after the consumer's last call
    r = engine.Ring(4096)
    p, c = r.producer(), r.consumer()
    p.put_array(np.array([[1], [2], [3]], np.uint8))
    assert c.get() == b"\x01" and c.get() == b"\x02"
    p.put(b"\x04")
    assert c.get_array(2).tolist() == [[3], [4]]


# ---- batch fast paths ------------------------------------------------------------------------


def test_put_many_leaves_the_callers_messages_alone():
    # borrowed references on the fast path: no reference count changes (and
    # none leaked) on the caller's list, tuple or items, any buffer kind
    import sys

    r = engine.Ring(1 << 16)
    p, c = r.producer(), r.consumer()
    msgs = [b"m%05d" % i for i in range(500)]
    before = [sys.getrefcount(m) for m in msgs]
    assert p.put_many(msgs) == 500
    assert p.put_many(tuple(msgs[:10])) == 10
    assert [sys.getrefcount(m) for m in msgs] == before
    mixed = [b"x", bytearray(b"yy"), memoryview(b"zzz"), np.arange(4, dtype=np.uint8)]
    refs = [sys.getrefcount(m) for m in mixed]
    assert p.put_many(mixed) == 4
    assert [sys.getrefcount(m) for m in mixed] == refs
    assert c.get_many(1000) == msgs + msgs[:10] + [b"x", b"yy", b"zzz", bytes(range(4))]


def test_get_many_beyond_the_preallocated_list():
    # more messages than the list slots allocated up front: the rest append
    r = engine.Ring(1 << 20)
    p, c = r.producer(), r.consumer()
    msgs = [b"%d" % i for i in range(10_000)]
    p.put_many(msgs)
    assert c.get_many(3) == msgs[:3]
    assert c.get_many(5000) == msgs[3:5003]
    assert c.get_many(100_000) == msgs[5003:]
    assert c.get_many(10) == []


@pytest.mark.parametrize("width", [13, 24, 64])
def test_long_put_array_streams_through_a_small_ring(width):
    # a put_array call 20x the ring: it publishes as it goes and waits for
    # room; the consumer thread gets every row once, in order, across wraps
    # (13-byte rows: records padded to 24 bytes)
    r = engine.Ring(1 << 14)
    p, c = r.producer(), r.consumer()
    rows = np.random.default_rng(width).integers(0, 256, (20_000, width), dtype=np.uint8)
    got = []

    def consume():
        n = 0
        while n < len(rows):
            a = c.get_array(997, timeout=10)
            assert a.shape[0] > 0, "no rows within 10 s"
            got.append(a)
            n += a.shape[0]

    t = threading.Thread(target=consume)
    t.start()
    assert p.put_array(rows, timeout=10) == len(rows)
    t.join(30)
    assert not t.is_alive()
    assert np.array_equal(np.concatenate(got), rows)
    assert c.get_array(10).shape == (0, 0)


def test_put_many_streams_through_a_small_ring_to_get_many():
    r = engine.Ring(1 << 14)
    p, c = r.producer(), r.consumer()
    msgs = [os.urandom(i % 300) for i in range(30_000)]
    got = []

    def consume():
        while len(got) < len(msgs):
            b = c.get_many(1500, timeout=10)
            assert b, "no messages within 10 s"
            got.extend(b)

    t = threading.Thread(target=consume)
    t.start()
    assert p.put_many(msgs, timeout=10) == len(msgs)
    t.join(30)
    assert not t.is_alive()
    assert got == msgs
