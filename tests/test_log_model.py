"""Hypothesis state machine: the log against a plain list.

Rules: append, append_many, reopen (clean close or an unclean stop), seek,
roll (a value that fills most of a segment), retention.  Invariants after
every step: offsets are dense, ``next_offset == len(model)``, and a reader
from the log's start returns exactly ``model[start:]`` (values and keys).
"""

from __future__ import annotations

import shutil
import tempfile

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import engine

SEG = 4096
values = st.binary(max_size=300)
keys = st.one_of(st.none(), st.binary(max_size=24))


class LogModel(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="qe-log-model-")
        self.model = []       # (key, value) per offset
        self.start = 0        # first offset retention kept
        self.retention = None
        self.log = self._open()

    def _open(self):
        return engine.Log(self.dir, durability="none", segment_bytes=SEG, retention_bytes=self.retention)

    def teardown(self):
        if not self.log.closed:
            self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(value=values, key=keys)
    def append(self, value, key):
        assert self.log.append(value, key=key) == len(self.model)
        self.model.append((key, value))

    @rule(batch=st.lists(st.tuples(keys, values), max_size=40))
    def append_many(self, batch):
        offs = self.log.append_many([v for _, v in batch], keys=[k for k, _ in batch])
        assert list(offs) == list(range(len(self.model), len(self.model) + len(batch)))
        self.model.extend(batch)

    @rule(clean=st.booleans())
    def reopen(self, clean):
        if clean:
            self.log.close()
        else:
            self.log._simulate_crash()  # drop everything without a checkpoint
        self.log = self._open()
        assert self.log.next_offset == len(self.model)

    @rule(fill=st.integers(SEG // 2, SEG - 200))
    def roll(self, fill):
        before = self.log.stats()["rolls"]
        self.append(b"R" * fill, None)
        self.append(b"R" * fill, None)
        assert self.log.stats()["rolls"] > before

    @precondition(lambda self: self.retention is None)
    @rule(segments=st.integers(2, 6))
    def enable_retention(self, segments):
        self.retention = segments * SEG
        self.log.close()
        self.log = self._open()

    @rule()
    def apply_retention(self):
        self.log.apply_retention()

    @rule(data=st.data())
    def seek(self, data):
        lo = self.log.start_offset
        off = data.draw(st.integers(lo, len(self.model)))
        r = engine.LogReader(self.dir)
        r.seek(off)
        got = r.read_many(5)
        assert [x.offset for x in got] == list(range(off, min(off + 5, len(self.model))))
        assert [(x.key, x.value) for x in got] == self.model[off:off + 5]
        r.close()

    @invariant()
    def matches_model(self):
        assert self.log.next_offset == len(self.model)
        start = self.log.start_offset
        assert self.start <= start <= len(self.model)
        if self.retention is None:
            assert start == 0
        self.start = start
        r = engine.LogReader(self.dir)
        got = list(r)
        assert [x.offset for x in got] == list(range(start, len(self.model)))
        assert [(x.key, x.value) for x in got] == self.model[start:]
        r.close()


LogModel.TestCase.settings = settings(
    max_examples=25, stateful_step_count=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestLogModel = LogModel.TestCase
