"""The add fast path of sharded counters: the per-handle cache of the caller's
cell (keyed by thread state and fork generation) must follow threads and forks,
close must defeat it, and the benchmark's single-shared-cell reference must be
exact.  Small and quick (one fork, one thread, two short processes)."""

from __future__ import annotations

import multiprocessing as mp
import os
import struct
import threading

import pytest

from engine import Closed, CounterMap, IncompatibleRegion, ShardedCounter
from engine._counter import _AtomicCell, region_path

HEADER = 128
BLOCK = 128


def test_hot_add_methods_are_plain_builtin_methods():
    # binding=False: CPython calls them directly, with no bound-method object
    # (a CyFunction behind a `method`) in between; about 100 instructions a call.
    assert type(ShardedCounter().add).__name__ == "builtin_function_or_method"
    assert type(CounterMap(capacity=4).add).__name__ == "builtin_function_or_method"


def test_add_after_close_raises_even_with_a_warm_cache():
    c = ShardedCounter()
    c.add(1)  # the cache now holds this thread's cell
    c.close()
    with pytest.raises(Closed):
        c.add(1)
    m = CounterMap(capacity=4)
    m.add("k")
    m.close()
    with pytest.raises(Closed):
        m.add("k")


def test_keyword_and_default_n_still_accepted():
    c = ShardedCounter()
    c.add()
    c.add(n=4)
    m = CounterMap(capacity=4)
    m.add("k")
    m.add("k", n=-3)
    assert (c.value(), m.get("k")) == (5, -2)


def test_cached_cell_follows_the_calling_thread():
    c = ShardedCounter(shards=4096)
    c.add(1)  # warm the cache for the main thread
    main_shard = c.current_shard()
    seen = {}

    def other():
        c.add(10)  # must not reuse the main thread's cached cell
        seen["shard"] = c.current_shard()

    t = threading.Thread(target=other)
    t.start()
    t.join()
    c.add(100)  # and back: the main thread's own cell again
    vals = c.shard_values()
    assert seen["shard"] != main_shard  # sequential thread ids, 4096 shards
    assert vals[main_shard] == 101
    assert vals[seen["shard"]] == 10
    assert c.value() == 111


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_with_a_warm_map_cache_uses_its_own_row(shm_name):
    m = CounterMap.create(shm_name, capacity=2, shards=4096)
    m.add("k")  # warms the row cache; "k" takes some slot
    slot = next(i for i in range(2) if any(_slot_rows(shm_name, i)))
    pid = os.fork()
    if pid == 0:
        try:
            m.add("k", 5)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    rows = _slot_rows(shm_name, slot)
    assert sorted(v for v in rows if v) == [1, 5]  # two rows: parent's and child's
    assert m.get("k") == 6


def _slot_rows(name: str, slot: int):
    capacity, shards = 2, 4096
    stride = (capacity * 8 + BLOCK - 1) // BLOCK * BLOCK
    raw = open(region_path(name), "rb").read()
    rows = HEADER + capacity * BLOCK
    return [struct.unpack_from("<q", raw, rows + s * stride + slot * 8)[0] for s in range(shards)]


def _cell_adds(name: str, n: int, k: int) -> None:
    cell = _AtomicCell(name)
    add = cell.add
    for i in range(n):
        add(k if i & 1 else -2 * k)
    cell.nop(1)  # writes nothing
    cell.close()


def test_single_cell_reference_is_exact_across_processes(shm_name):
    ShardedCounter.create(shm_name, shards=1).close()
    ctx = mp.get_context("fork")
    n = 50_000
    procs = [ctx.Process(target=_cell_adds, args=(shm_name, n, k)) for k in (1, 3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    expect = sum((n // 2) * (k - 2 * k) for k in (1, 3))
    assert ShardedCounter.attach(shm_name).value() == expect
    cell = _AtomicCell(shm_name)
    assert cell.value() == expect
    with pytest.raises(TypeError):
        cell.add(1.0)
    cell.close()
    with pytest.raises(Closed):
        cell.add(1)


def test_single_cell_reference_needs_one_shard(shm_name):
    ShardedCounter.create(shm_name, shards=2).close()
    with pytest.raises(IncompatibleRegion):
        _AtomicCell(shm_name)
