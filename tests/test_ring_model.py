"""Hypothesis state machine: the ring against a pure-Python deque model.

Random message sizes (including ones that force the padding record at the
wrap), every put/get flavour, views, arrays and close, in a small ring so the
wrap-around and the full/empty edges are hit all the time."""

from __future__ import annotations

from collections import deque

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import engine

CAP = 4096
MAXMSG = CAP // 2 - 8


def rec(n: int) -> int:
    return (8 + n + 7) & ~7


sizes = st.one_of(st.integers(0, 64), st.integers(0, MAXMSG), st.sampled_from([0, 56, MAXMSG]))


class RingModel(RuleBasedStateMachine):
    """One producer, one consumer; the model tracks the bytes each message
    needs so it can predict exactly when try_put fails."""

    mode = "spsc"

    def __init__(self):
        super().__init__()
        self.ring = engine.Ring(CAP, mode=self.mode, max_consumers=1)
        self.p = self.ring.producer()
        self.c = self.ring.consumer()
        self.model: deque[bytes] = deque()
        self.head = 0  # byte positions, mirrored
        self.read_pos = 0  # where the consumer stands
        self.starts: deque[int] = deque()
        self.counter = 0
        self.closed = False
        self.view = None
        self.view_bytes = None
        self.view_end = None

    def teardown(self):
        self.ring.close()

    def _msg(self, n: int) -> bytes:
        self.counter += 1
        return (self.counter.to_bytes(4, "little") * (n // 4 + 1))[:n]

    def _need(self, n: int) -> int:
        off = self.head % CAP
        r = rec(n)
        return r if off + r <= CAP else (CAP - off) + r

    def _floor(self) -> int:
        # the consumer's position: after the last record it read (a padding
        # record before the next message is not free yet); a pending view
        # keeps its own record from being overwritten
        return self.view_end_start if self.view is not None else self.read_pos

    def _fits(self, n: int) -> bool:
        return self.head + self._need(n) - self._floor() <= CAP

    def _push(self, m: bytes) -> None:
        off = self.head % CAP
        r = rec(len(m))
        if off + r > CAP:
            self.head += CAP - off
        self.starts.append(self.head)
        self.head += r
        self.model.append(m)

    def _pop(self) -> bytes:
        start = self.starts.popleft()
        m = self.model.popleft()
        self.read_pos = start + rec(len(m))
        return m

    def _check_view(self):
        # a view stays intact until the next consumer call
        if self.view is not None:
            assert bytes(self.view) == self.view_bytes
            self.view = None

    @precondition(lambda self: not self.closed)
    @rule(n=sizes)
    def try_put(self, n):
        m = self._msg(n)
        fits = self._fits(n)
        assert self.p.try_put(m) == fits
        if fits:
            self._push(m)

    @precondition(lambda self: not self.closed)
    @rule(n=sizes, kind=st.sampled_from(["bytes", "bytearray", "memoryview", "numpy"]))
    def put_if_room(self, n, kind):
        m = self._msg(n)
        if not self._fits(n):
            return
        obj = {
            "bytes": m,
            "bytearray": bytearray(m),
            "memoryview": memoryview(m),
            "numpy": np.frombuffer(m, np.uint8),
        }[kind]
        self.p.put(obj, timeout=0 if n else 2)
        self._push(m)

    @precondition(lambda self: not self.closed)
    @rule(ns=st.lists(st.integers(0, 300), max_size=12))
    def put_many_if_room(self, ns):
        msgs = []
        for n in ns:
            if not self._fits(n):
                break
            m = self._msg(n)
            self._push(m)
            msgs.append(m)
        assert self.p.put_many(msgs, timeout=2) == len(msgs)

    @precondition(lambda self: not self.closed)
    @rule(rows=st.integers(1, 20), width=st.sampled_from([1, 8, 24, 64]))
    def put_array_if_room(self, rows, width):
        arr = np.random.default_rng(self.counter).integers(0, 255, (rows, width), dtype=np.uint8)
        self.counter += 1
        msgs = []
        for row in arr:
            if not self._fits(width):
                break
            self._push(bytes(row))
            msgs.append(row)
        if msgs:
            assert self.p.put_array(np.stack(msgs), timeout=2) == len(msgs)

    def _expect_closed_or(self, fn, empty):
        if self.model:
            return False
        if self.closed:
            try:
                fn()
            except engine.Closed:
                return True
            raise AssertionError("expected Closed after drain")
        assert fn() == empty
        return True

    @rule()
    def try_get(self):
        self._check_view()
        if self._expect_closed_or(self.c.try_get, None):
            return
        assert self.c.try_get() == self._pop()

    @rule()
    def get(self):
        self._check_view()
        if not self.model:
            if self.closed:
                try:
                    self.c.get(timeout=0)
                except engine.Closed:
                    return
                raise AssertionError("expected Closed")
            try:
                self.c.get(timeout=0)
            except engine.Timeout:
                return
            raise AssertionError("expected Timeout")
        assert self.c.get(timeout=0) == self._pop()

    @rule(mx=st.integers(1, 40))
    def get_many(self, mx):
        self._check_view()
        if self._expect_closed_or(lambda: self.c.get_many(mx), []):
            return
        want = [self._pop() for _ in range(min(mx, len(self.model)))]
        assert self.c.get_many(mx) == want

    @rule(mx=st.integers(1, 40))
    def get_array(self, mx):
        self._check_view()
        if not self.model:
            if self.closed:
                try:
                    self.c.get_array(mx)
                except engine.Closed:
                    return
                raise AssertionError("expected Closed")
            assert self.c.get_array(mx).shape == (0, 0)
            return
        width = len(self.model[0])
        want = []
        while self.model and len(want) < mx and len(self.model[0]) == width:
            want.append(self._pop())
        arr = self.c.get_array(mx)
        assert arr.shape == (len(want), width)
        assert [bytes(r) for r in arr] == want

    @rule()
    def get_view(self):
        self._check_view()
        if not self.model:
            try:
                self.c.get_view(timeout=0)
            except (engine.Closed, engine.Timeout) as exc:
                assert isinstance(exc, engine.Closed) == self.closed
                return
            raise AssertionError("expected Timeout or Closed")
        start = self.starts[0]
        m = self._pop()
        v = self.c.get_view(timeout=0)
        assert bytes(v) == m
        self.view, self.view_bytes, self.view_end_start = v, m, start

    @precondition(lambda self: not self.closed)
    @rule()
    def close_producer(self):
        self.p.close()
        self.closed = True

    @invariant()
    def stats_agree(self):
        s = self.ring.stats()
        assert s["head"] == self.head
        assert s["closed"] == self.closed


class SharedRingModel(RingModel):
    mode = "shared"


class BroadcastRingModel(RingModel):
    mode = "broadcast"


TestRingModel = RingModel.TestCase
TestRingModel.settings = settings(max_examples=60, stateful_step_count=60, deadline=None)
TestSharedRingModel = SharedRingModel.TestCase
TestSharedRingModel.settings = settings(max_examples=30, stateful_step_count=60, deadline=None)
TestBroadcastRingModel = BroadcastRingModel.TestCase
TestBroadcastRingModel.settings = settings(max_examples=20, stateful_step_count=60, deadline=None)
