"""The level policies have two implementations: the compiled core of the
ring-backed PriorityQueue (pyx/sched.pyx) and DurablePriorityQueue's, over
its logs.  One model test holds them to the same order: the same puts and
gets, with every policy and weight, hand out the same messages in the same
order from both."""

from __future__ import annotations

import shutil
import tempfile

from hypothesis import given, settings
from hypothesis import strategies as st

import engine

LEVELS = 3

ops = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.integers(0, LEVELS - 1)),
        st.tuples(st.just("get"), st.integers(1, 4)),
    ),
    min_size=1,
    max_size=60,
)
policies = st.one_of(
    st.tuples(st.just("strict"), st.none()),
    st.tuples(st.just("weighted"), st.lists(st.integers(1, 5), min_size=LEVELS, max_size=LEVELS)),
)


def _take(q, n):
    out = []
    for _ in range(n):
        m = q.try_get()
        if m is None:
            break
        out.append(bytes(m))
    return out


@settings(max_examples=60, deadline=None)
@given(policy=policies, script=ops)
def test_durable_and_ring_backed_queues_hand_out_the_same_order(policy, script):
    name, weights = policy
    d = tempfile.mkdtemp(prefix="qe-policy-")
    ring_q = engine.PriorityQueue(levels=LEVELS, policy=name, weights=weights)
    log_q = engine.DurablePriorityQueue(levels=LEVELS, policy=name, weights=weights, path=d,
                                        durability="none", segment_bytes=1 << 20)
    try:
        n = 0
        for op, arg in script:
            if op == "put":
                msg = b"m%d@%d" % (n, arg)
                n += 1
                ring_q.put(msg, priority=arg)
                log_q.put(msg, priority=arg)
            else:
                got_ring = _take(ring_q, arg)
                got_log = _take(log_q, arg)
                assert got_log == got_ring, (policy, script)
        assert _take(log_q, n + 1) == _take(ring_q, n + 1), (policy, script)
    finally:
        ring_q.close()
        log_q.close()
        shutil.rmtree(d, ignore_errors=True)
