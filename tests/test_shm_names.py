"""One naming rule for every shared-memory region: rings, counters,
scheduling regions and drop-in queues accept and refuse the same names."""

from __future__ import annotations

import pytest

import engine
from engine import _shm

BAD = ["", "a/b", "nul\0", ".hidden", "x" * (_shm.NAME_MAX + 1)]


@pytest.mark.parametrize("bad", BAD, ids=repr)
def test_every_region_kind_refuses_the_same_bad_names(bad):
    makers = [
        lambda n: engine.Ring.create(n, 4096),
        lambda n: engine.Ring.attach(n),
        lambda n: engine.ShardedCounter.create(n),
        lambda n: engine.CounterMap.create(n, capacity=16),
        lambda n: engine.PriorityQueue(levels=2, name=n),
    ]
    for make in makers:
        with pytest.raises(ValueError, match="no '/', no NUL, not starting with '.'"):
            make(bad)


def test_non_string_names_are_type_errors():
    for make in (lambda: engine.Ring.create(5, 4096), lambda: engine.ShardedCounter.create(b"x"),
                 lambda: engine.PriorityQueue(levels=2, name=3.0)):
        with pytest.raises(TypeError):
            make()


def test_derived_names_leave_room_for_their_suffix(shm_name):
    longest = "q" * (_shm.NAME_MAX - 20)
    with pytest.raises(ValueError):
        engine.PriorityQueue(levels=2, name=longest + "q")
    pq = engine.PriorityQueue(levels=2, name=longest)
    try:
        pq.put(b"x", priority=1)
        assert pq.get(timeout=1) == b"x"
    finally:
        pq.close()
        engine.PriorityQueue.unlink(longest)
