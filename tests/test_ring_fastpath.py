"""The single-message hot paths of engine.Ring: ``put``/``get``/``try_get``
take a straight run for the common case (bytes, room, a message at the
cursor) and hand every other case to the general path.  These tests pin
that the straight run is what CPython calls, and that it keeps every
contract of the general path at the edges where the two meet."""

from __future__ import annotations

import mmap
import struct
import types

import numpy as np
import pytest

import engine
from engine._shm import region_path
from engine.errors import Closed

HOT = {
    "Producer": ("put", "try_put", "put_many", "put_array"),
    "Consumer": ("get", "try_get", "get_view", "get_many", "get_array"),
}


def test_hot_methods_are_plain_builtin_methods():
    """A bound hot method is a builtin method: CPython calls the C entry
    point directly, with no bound-method object and function layer between
    (about 100 instructions per call)."""
    ring = engine.Ring(1 << 16)
    handles = {"Producer": ring.producer(), "Consumer": ring.consumer()}
    for kind, names in HOT.items():
        for name in names:
            bound = getattr(handles[kind], name)
            assert isinstance(bound, types.BuiltinMethodType), (kind, name, type(bound))
            assert bound.__self__ is handles[kind]
    ring.close()


def test_keywords_still_accepted_on_the_hot_methods():
    ring = engine.Ring(1 << 16)
    p, c = ring.producer(), ring.consumer()
    p.put(msg=b"a", timeout=1.0)
    p.put(b"b", timeout=None)
    assert c.get(timeout=1.0) == b"a"
    assert c.get(timeout=None) == b"b"
    ring.close()


def test_put_and_get_signatures_are_introspectable():
    """put and get are C entry points with a text signature: inspect sees
    the same parameters as the stubs."""
    import inspect

    put = inspect.signature(engine.Producer.put).parameters
    get = inspect.signature(engine.Consumer.get).parameters
    assert list(put) == ["self", "msg", "timeout"] and put["timeout"].default is None
    assert put["msg"].default is inspect.Parameter.empty
    assert list(get) == ["self", "timeout"] and get["timeout"].default is None
    assert "Timeout" in engine.Consumer.get.__doc__ and "Timeout" in engine.Producer.put.__doc__


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda p, c: p.put(), "missing required argument 'msg'"),
        (lambda p, c: p.put(timeout=1), "missing required argument 'msg'"),
        (lambda p, c: p.put(b"x", 1, 2), "at most 2 positional arguments"),
        (lambda p, c: p.put(b"x", tmeout=1), "unexpected keyword argument 'tmeout'"),
        (lambda p, c: p.put(b"x", msg=b"y"), "multiple values for argument 'msg'"),
        (lambda p, c: c.get(1, 2), "at most 1 positional argument"),
        (lambda p, c: c.get(timout=1), "unexpected keyword argument 'timout'"),
        (lambda p, c: c.get(1, timeout=1), "multiple values for argument 'timeout'"),
        (lambda p, c: engine.Consumer.get(p), "doesn't apply"),
    ],
)
def test_put_and_get_reject_bad_arguments_without_touching_the_ring(call, match):
    ring = engine.Ring(1 << 16)
    p, c = ring.producer(), ring.consumer()
    p.put(b"first")
    with pytest.raises(TypeError, match=match):
        call(p, c)
    assert c.get_many() == [b"first"]  # nothing put, nothing taken by the failed call
    ring.close()


def test_positional_timeouts_take_the_general_path():
    ring = engine.Ring(4096)
    p, c = ring.producer(), ring.consumer()
    with pytest.raises(engine.Timeout):
        c.get(0)
    with pytest.raises(engine.Timeout):
        c.get(0.01)
    n = 0
    while p.try_put(b"x" * 100):
        n += 1
    with pytest.raises(engine.Timeout):
        p.put(b"y" * 100, 0.01)
    with pytest.raises(ValueError):
        p.put(b"y" * 100, -1)
    assert c.get(None) == b"x" * 100
    p.put(b"z", None)
    assert c.get_many(1000) == [b"x" * 100] * (n - 1) + [b"z"]
    ring.close()


def test_put_checks_its_timeout_even_when_there_is_room():
    ring = engine.Ring(1 << 16)
    p, c = ring.producer(), ring.consumer()
    for bad in (-1, float("nan")):
        with pytest.raises(ValueError):
            p.put(b"x", timeout=bad)
    assert c.try_get() is None  # nothing was put by a call that raised
    ring.close()


def test_put_after_close_is_closed_not_a_write():
    ring = engine.Ring(1 << 16)
    p, c = ring.producer(), ring.consumer()
    p.put(b"last")
    p.close()
    with pytest.raises(Closed):
        p.put(b"after")
    assert c.get() == b"last"
    with pytest.raises(Closed):
        c.get(timeout=0)
    ring.close()


def test_get_on_a_closed_consumer_is_closed():
    ring = engine.Ring(1 << 16)
    p, c = ring.producer(), ring.consumer()
    p.put(b"kept")
    c.close()
    for call in (c.get, c.try_get):
        with pytest.raises(Closed):
            call()
    ring.close()


@pytest.mark.parametrize("mode", ["spsc", "broadcast", "shared"])
def test_views_gets_and_padding_interleaved_across_many_wraps(mode):
    """get/try_get after a get_view release the viewed record first, and a
    padding record at the end of the data area is stepped over: the ring
    wraps many times with every payload intact and the producer never
    blocked by a record that was already read."""
    ring = engine.Ring(4096, mode=mode)
    p, c = ring.producer(), ring.consumer()
    sizes = [1, 64, 200, 7, 1000, 0, 63]
    n = 3000
    for i in range(n):
        msg = bytes([i % 251]) * sizes[i % len(sizes)]
        assert p.try_put(msg), i  # room: every earlier record was released
        how = i % 3
        if how == 0:
            got = bytes(c.get_view(timeout=0))
        elif how == 1:
            got = c.get(timeout=0)
        else:
            got = c.try_get()
        assert got == msg, i
    assert c.try_get() is None
    st = ring.stats()
    assert st["messages_put"] == n
    assert st["consumers"][0]["messages_got"] == n
    if mode != "shared":
        # the last get_view is released by the next call: the cursor is at head
        assert st["consumers"][0]["cursor"] == st["head"]
    ring.close()


def test_cursor_is_published_by_every_get():
    """The producer sees each get's cursor at once (a consumer that dies
    after a get leaves only the unread messages for its replacement)."""
    ring = engine.Ring(1 << 16)
    p, c = ring.producer(), ring.consumer()
    for i in range(10):
        p.put(bytes([i]) * 10)
    for i in range(10):
        assert c.get() == bytes([i]) * 10
        cons = ring.stats()["consumers"][0]
        assert cons["cursor"] == (i + 1) * 24  # 8-byte header + 10 bytes, 8-aligned
        assert cons["messages_got"] == i + 1
        assert cons["bytes_got"] == (i + 1) * 10
    ring.close()


def _poke(name, offset, fmt, value):
    with open(region_path(name), "r+b") as f:
        mm = mmap.mmap(f.fileno(), 0)
        try:
            struct.pack_into(fmt, mm, offset, value)
        finally:
            mm.close()


@pytest.mark.parametrize("bad", ["flags", "length"])
def test_get_array_run_stops_at_a_row_header_that_is_not_exact(shm_name, bad):
    """get_array copies a run of rows while each 8-byte header is exactly
    (row length, no flags): a row in the middle with flags set or another
    length ends the run there -- the rows before it come back, and the
    next call reports the bad one (flags) or starts an array of the other
    size (length)."""
    r = engine.Ring.create(shm_name, 1 << 16)
    p, c = r.producer(), r.consumer()
    rows = np.arange(20 * 64, dtype=np.uint8).reshape(20, 64)
    p.put_array(rows)  # 72-byte records from data offset 0
    rec13 = 4096 + 13 * 72
    if bad == "flags":
        _poke(shm_name, rec13 + 4, "<I", 4)
        assert c.get_array(100).tolist() == rows[:13].tolist()
        with pytest.raises(engine.IncompatibleRegion, match="corrupt ring"):
            c.get_array(100)
        _poke(shm_name, rec13 + 4, "<I", 0)
        assert c.get_array(100).tolist() == rows[13:].tolist()
    else:
        _poke(shm_name, rec13, "<I", 56)  # a 56-byte message (64-byte record) there
        assert c.get_array(100).tolist() == rows[:13].tolist()
        assert c.get_array(1).tolist() == [rows[13][:56].tolist()]
    c.close()
    p.close()
    r.close()
