"""Hostile regions: whatever a file under /dev/shm says, attach and every
later call end in a clean error (IncompatibleRegion / EngineError) or a
correct result; never a crash, a hang or a read outside the mapping."""

from __future__ import annotations

import mmap
import os
import struct
import uuid

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import engine
from engine import _ring

HOSTILE = settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

# header field offsets (ring_layout.h, static-asserted there)
META = {
    "magic": (0, "<Q"),
    "version": (8, "<I"),
    "header_size": (12, "<I"),
    "capacity": (16, "<Q"),
    "mode": (24, "<I"),
    "max_consumers": (28, "<I"),
}
HEAD, PROD_PID, CLOSED = 128, 136, 140
TAIL = 256 + 8
CLAIM = 384
SLOT0 = 512  # cursor, then pid/state at +8/+12


def _path(name):
    return f"/dev/shm/{name}"


@pytest.fixture
def name():
    n = f"qe-test-hostile-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    yield n
    try:
        os.unlink(_path(n))
    except FileNotFoundError:
        pass


def _exercise(ring):
    """Use an attached ring every way; only clean errors are allowed."""
    try:
        ring.stats()
        with ring.consumer() as c:
            for call in (
                c.try_get,
                lambda: c.get_many(50),
                lambda: c.get_array(50),
                lambda: c.get(timeout=0),
                lambda: c.get_view(timeout=0),
            ):
                try:
                    x = call()
                    if isinstance(x, list):
                        assert all(isinstance(m, bytes) for m in x)
                except (engine.EngineError, ValueError):
                    pass
        with ring.producer() as p:
            for _ in range(20):
                p.try_put(b"h" * 300)
    except engine.EngineError:
        pass


@HOSTILE
@given(data=st.binary(min_size=0, max_size=20000))
def test_random_bytes_are_refused(name, data):
    with open(_path(name), "wb") as f:
        f.write(data)
    with pytest.raises(engine.IncompatibleRegion):
        engine.Ring.attach(name)
    os.unlink(_path(name))


@HOSTILE
@given(mode=st.sampled_from(["spsc", "broadcast", "shared"]), cut=st.integers(0, 12287))
def test_truncated_files_are_refused(name, mode, cut):
    engine.Ring.create(name, 8192, mode=mode, max_consumers=1 if mode == "spsc" else 2).close()
    os.truncate(_path(name), cut)
    with pytest.raises(engine.IncompatibleRegion):
        engine.Ring.attach(name)
    os.unlink(_path(name))


def test_grown_file_is_refused(name):
    engine.Ring.create(name, 8192).close()
    with open(_path(name), "ab") as f:
        f.write(b"\0" * 4096)
    with pytest.raises(engine.IncompatibleRegion, match="file is"):
        engine.Ring.attach(name)


def _poke(name, offset, fmt, value):
    with open(_path(name), "r+b") as f:
        mm = mmap.mmap(f.fileno(), 0)
        try:
            struct.pack_into(fmt, mm, offset, value)
        finally:
            mm.close()


@HOSTILE
@given(
    field=st.sampled_from(sorted(META)),
    value=st.integers(0, 2**32 - 1),
    wide=st.integers(0, 2**64 - 1),
)
def test_corrupt_header_fields(name, field, value, wide):
    engine.Ring.create(name, 8192, mode="broadcast", max_consumers=2).close()
    off, fmt = META[field]
    _poke(name, off, fmt, wide if fmt == "<Q" else value)
    try:
        r = engine.Ring.attach(name)
    except engine.IncompatibleRegion:
        pass
    else:
        _exercise(r)
        r.close()
    os.unlink(_path(name))


def test_each_header_check_names_its_field(name):
    cases = [
        ("magic", 0, "bad magic"),
        ("version", 99, "layout version"),
        ("header_size", 8192, "header size"),
        ("capacity", 12345, "capacity"),
        ("mode", 7, "mode"),
        ("max_consumers", 0, "max_consumers"),
    ]
    for field, value, msg in cases:
        engine.Ring.create(name, 8192, mode="broadcast", max_consumers=2).close()
        off, fmt = META[field]
        _poke(name, off, fmt, value)
        with pytest.raises(engine.IncompatibleRegion, match=msg):
            engine.Ring.attach(name)
        os.unlink(_path(name))


@HOSTILE
@given(
    mode=st.sampled_from(["spsc", "broadcast", "shared"]),
    where=st.sampled_from(["head", "tail", "claim", "slot", "len", "flags"]),
    value=st.one_of(
        st.integers(0, 2**64 - 1),
        st.integers(0, 20000),
        st.sampled_from([2**64 - 1, 2**63, 8, 8192, 16384, 4]),
    ),
    when=st.sampled_from(["before_attach", "after_attach"]),
)
def test_corrupt_cursors_and_lengths(name, mode, where, value, when):
    n = 1 if mode == "spsc" else 2
    # a ring with data in it (about 3 KiB of 8)
    r = engine.Ring.create(name, 8192, mode=mode, max_consumers=n)
    p = r.producer()
    assert p.put_many([bytes([i]) * (i * 37 % 200) for i in range(30)], timeout=0) == 30
    c0 = r.consumer()
    c0.get_many(5)
    hdr = 4096
    target = {
        "head": (HEAD, "<Q"),
        "tail": (TAIL, "<Q"),
        "claim": (CLAIM, "<Q"),
        "slot": (SLOT0, "<Q"),
        "len": (hdr + 0, "<I"),
        "flags": (hdr + 4, "<I"),
    }[where]
    fmt = target[1]
    v = value if fmt == "<Q" else value % 2**32
    attached = None
    if when == "before_attach":
        _poke(name, target[0], fmt, v)
        try:
            attached = engine.Ring.attach(name)
        except engine.IncompatibleRegion:
            attached = None
    else:
        attached = engine.Ring.attach(name)
        _poke(name, target[0], fmt, v)
    rings = [r] + ([attached] if attached is not None else [])
    for ring in rings:
        try:
            ring.stats()
        except engine.EngineError:
            pass
    # the live handles made before the corruption
    for call in (
        c0.try_get,
        lambda: c0.get_many(100),
        lambda: c0.get_array(100),
        lambda: c0.get(timeout=0),
        lambda: c0.get_view(timeout=0),
    ):
        try:
            x = call()
            if isinstance(x, bytes):
                assert len(x) <= r.max_message
        except (engine.EngineError, ValueError):
            pass
    for _ in range(40):
        try:
            if not p.try_put(b"z" * 200):
                break
        except engine.EngineError:
            break
    c0.close()
    p.close()
    if attached is not None:
        _exercise(attached)
        attached.close()
    r.close()
    os.unlink(_path(name))


def test_corrupt_record_length_is_a_clean_error(name):
    r = engine.Ring.create(name, 8192)
    p, c = r.producer(), r.consumer()
    p.put(b"a" * 100)
    _poke(name, 4096, "<I", 100000)  # would run past the data area
    with pytest.raises(engine.IncompatibleRegion, match="corrupt ring"):
        c.get(timeout=0)
    with pytest.raises(engine.IncompatibleRegion, match="corrupt ring"):
        c.get_many()
    _poke(name, 4096, "<I", 100)
    assert c.get() == b"a" * 100
    _poke(name, HEAD, "<Q", 2**40)  # head beyond the capacity of our cursor
    with pytest.raises(engine.IncompatibleRegion, match="corrupt ring"):
        c.try_get()
    r.close()


def test_foreign_pid_in_consumer_table_is_reaped(name):
    r = engine.Ring.create(name, 8192, mode="broadcast", max_consumers=1)
    # a slot held by a process that does not exist any more
    _poke(name, SLOT0 + 8, "<i", 2**31 - 2)
    _poke(name, SLOT0 + 12, "<I", 1)
    _poke(name, SLOT0, "<Q", 0)
    c = r.consumer()  # the dead slot is freed, not an error
    assert c.slot == 0
    r.close()


def test_random_header_bytes_over_a_valid_ring(name):
    rng = np.random.default_rng(7)
    for _ in range(200):
        engine.Ring.create(name, 8192, mode="shared", max_consumers=2).close()
        with open(_path(name), "r+b") as f:
            mm = mmap.mmap(f.fileno(), 0)
            k = int(rng.integers(1, 16))
            for _ in range(k):
                off = int(rng.integers(0, 4096 + 256))
                mm[off] = int(rng.integers(0, 256))
            mm.close()
        try:
            ring = engine.Ring.attach(name)
        except engine.IncompatibleRegion:
            pass
        else:
            _exercise(ring)
            ring.close()
        os.unlink(_path(name))


def test_layout_constants():
    assert _ring.MAGIC == int.from_bytes(b"QENGRING", "little")
    assert _ring.HEADER_SIZE == 4096 and _ring.RECORD_HEADER == 8


def test_batch_gets_return_the_good_prefix_then_raise(name):
    # A corrupt record after good ones: get_many / get_array hand back the
    # messages before it (nothing is lost), and the next call, which starts
    # at the bad record, raises.
    r = engine.Ring.create(name, 8192)
    p, c = r.producer(), r.consumer()
    p.put_many([b"a" * 56, b"b" * 56, b"c" * 56])  # 64-byte records at 0, 64, 128
    _poke(name, 4096 + 128 + 4, "<I", 7)  # unknown flags on the third
    assert c.get_many(10) == [b"a" * 56, b"b" * 56]
    with pytest.raises(engine.IncompatibleRegion, match="corrupt ring"):
        c.get_many(10)
    _poke(name, 4096 + 128 + 4, "<I", 0)
    assert c.get_many(10) == [b"c" * 56]
    p.put_array(np.arange(3 * 56, dtype=np.uint8).reshape(3, 56))  # records at 192, 256, 320
    _poke(name, 4096 + 320, "<I", 5000)  # the third row runs past head
    got = c.get_array(10)
    assert got.tolist() == np.arange(2 * 56, dtype=np.uint8).reshape(2, 56).tolist()
    with pytest.raises(engine.IncompatibleRegion, match="corrupt ring"):
        c.get_array(10)
    _poke(name, 4096 + 320, "<I", 56)
    assert c.get_array(10).tolist() == [list(range(112, 168))]
    c.close()
    p.close()
    r.close()
