"""Multi-process stress: >= 1,000,000 messages through a named ring in each
mode, checking counts, order and checksums of every message."""

from __future__ import annotations

import multiprocessing as mp
import time

import numpy as np
import pytest

import engine

N = 1_000_000
CHUNK = 4096
pytestmark = [pytest.mark.stress, pytest.mark.timeout(120)]
CTX = mp.get_context("fork")


def _produce_arrays(name, n):
    with engine.Ring.attach(name) as r, r.producer() as p:
        for lo in range(0, n, CHUNK):
            p.put_array(np.arange(lo, min(n, lo + CHUNK), dtype=np.uint64), timeout=60)


def _produce_bytes(name, n):
    with engine.Ring.attach(name) as r, r.producer() as p:
        for lo in range(0, n, CHUNK):
            p.put_many([i.to_bytes(8, "little") for i in range(lo, min(n, lo + CHUNK))], timeout=60)
        # and some single puts at the end
        p.put((n).to_bytes(8, "little"), timeout=60)


def _drain_arrays(name, ready, rows, width):
    # attach, signal ready, get_array uint64 blocks of `rows` until Closed;
    # every row received, in order, as one (n, width) array
    with engine.Ring.attach(name) as r, r.consumer() as c:
        ready.set()
        parts = []
        try:
            while True:
                # an empty block comes back (0, 0): the reshape keeps concatenate happy
                parts.append(c.get_array(rows, dtype=np.uint64, timeout=None).reshape(-1, width))
        except engine.Closed:
            pass
    return np.concatenate(parts) if parts else np.empty((0, width), np.uint64)


def _consume_arrays(name, out, ready):
    got = _drain_arrays(name, ready, CHUNK, 1).ravel()
    out.put(
        (
            len(got),
            int(got.sum()),
            bool(np.all(np.diff(got.astype(np.int64)) > 0)),
            got.tobytes() if len(got) < 2_000_000 else b"",
        )
    )


def _consume_bytes(name, out, ready):
    r = engine.Ring.attach(name)
    c = r.consumer()
    ready.set()
    vals = []
    try:
        while True:
            batch = c.get_many(CHUNK, timeout=None)
            vals.extend(int.from_bytes(m, "little") for m in batch)
    except engine.Closed:
        pass
    arr = np.array(vals, dtype=np.uint64)
    out.put(
        (len(arr), int(arr.sum()), bool(np.all(np.diff(arr.astype(np.int64)) > 0)), arr.tobytes())
    )
    c.close()
    r.close()


def _run(name, mode, consumers, consumer_fn, producer_fn, n):
    r = engine.Ring.create(name, 1 << 16, mode=mode, max_consumers=max(consumers, 1))
    out = CTX.Queue()
    readies = [CTX.Event() for _ in range(consumers)]
    cs = [CTX.Process(target=consumer_fn, args=(name, out, ev)) for ev in readies]
    for p in cs:
        p.start()
    for ev in readies:
        assert ev.wait(30)
    t = time.monotonic()
    prod = CTX.Process(target=producer_fn, args=(name, n))
    prod.start()
    results = [out.get(timeout=100) for _ in cs]
    prod.join(30)
    for p in cs:
        p.join(30)
    assert prod.exitcode == 0 and all(p.exitcode == 0 for p in cs)
    elapsed = time.monotonic() - t
    s = r.stats()
    r.close()
    return results, s, elapsed


def test_spsc_million_bytes_messages(shm_name):
    results, s, _ = _run(shm_name, "spsc", 1, _consume_bytes, _produce_bytes, N)
    ((count, total, increasing, raw),) = results
    assert count == N + 1 and increasing
    assert total == N * (N + 1) // 2
    assert np.array_equal(np.frombuffer(raw, np.uint64), np.arange(N + 1, dtype=np.uint64))
    assert s["messages_put"] == N + 1 and s["messages_got"] == 0  # consumer left


def _produce_rows64(name, n):
    # 64-byte rows (the row size put_array/get_array copy with an inlined
    # constant-size copy): row i is i, i+1, ..., i+7 as uint64
    with engine.Ring.attach(name) as r, r.producer() as p:
        for lo in range(0, n, 8192):
            base = np.arange(lo, min(n, lo + 8192), dtype=np.uint64)
            p.put_array(base[:, None] + np.arange(8, dtype=np.uint64), timeout=60)


def _consume_rows64(name, out, ready):
    got = _drain_arrays(name, ready, 8192, 8)
    first = got[:, 0]
    out.put(
        (
            got.shape,
            bool(
                np.array_equal(
                    got - first[:, None], np.tile(np.arange(8, dtype=np.uint64), (len(got), 1))
                )
            ),
            bool(np.array_equal(first, np.arange(len(got), dtype=np.uint64))),
        )
    )


def test_spsc_million_64_byte_rows(shm_name):
    results, s, _ = _run(shm_name, "spsc", 1, _consume_rows64, _produce_rows64, N)
    ((shape, rows_intact, in_order),) = results
    assert shape == (N, 8) and rows_intact and in_order
    assert s["messages_put"] == N


def test_broadcast_three_consumers_each_get_every_message(shm_name):
    results, s, _ = _run(shm_name, "broadcast", 3, _consume_arrays, _produce_arrays, N)
    want = np.arange(N, dtype=np.uint64)
    for count, total, increasing, raw in results:
        assert count == N and increasing
        assert total == N * (N - 1) // 2
        assert np.array_equal(np.frombuffer(raw, np.uint64), want)
    assert s["messages_put"] == N and s["lost"] == 0


@pytest.mark.parametrize(
    "consumer_fn", [_consume_arrays, _consume_bytes], ids=["get_array", "get_many"]
)
def test_shared_three_consumers_every_message_exactly_once(shm_name, consumer_fn):
    producer = _produce_arrays if consumer_fn is _consume_arrays else _produce_bytes
    n_expect = N if consumer_fn is _consume_arrays else N + 1
    results, s, _ = _run(shm_name, "shared", 3, consumer_fn, producer, N)
    assert sum(r[0] for r in results) == n_expect
    assert sum(r[1] for r in results) == n_expect * (n_expect - 1) // 2
    # each consumer sees its share in order (claims only move forward)
    assert all(r[2] for r in results)
    allv = np.sort(np.concatenate([np.frombuffer(r[3], np.uint64) for r in results]))
    assert np.array_equal(allv, np.arange(n_expect, dtype=np.uint64))
    assert s["lost"] == 0


def _pingpong_child(name_a, name_b, n):
    with engine.Ring.attach(name_a) as ra, engine.Ring.attach(name_b) as rb:
        c = ra.consumer()
        p = rb.producer()
        for _ in range(n):
            p.put(c.get(timeout=30))
        p.close()


def test_ping_pong_single_put_get_across_processes(shm_name):
    a, b = shm_name + "-a", shm_name + "-b"
    ra, rb = engine.Ring.create(a, 1 << 12), engine.Ring.create(b, 1 << 12)
    n = 20000
    child = CTX.Process(target=_pingpong_child, args=(a, b, n))
    child.start()
    p, c = ra.producer(), rb.consumer()
    for i in range(n):
        m = i.to_bytes(8, "little")
        p.put(m, timeout=30)
        assert c.get(timeout=30) == m
    child.join(30)
    assert child.exitcode == 0
    with pytest.raises(engine.Closed):
        c.get(timeout=5)
    ra.close()
    rb.close()
