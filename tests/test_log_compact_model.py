"""Hypothesis state machine: key compaction against a dict of latest values per key.

Rules: append (keyed or not), append_many (batch frames), delete (a
tombstone), roll, compact (with tombstones kept or dropped), reopen (clean
or an unclean stop), seek and seek_time (into gaps).  The model is
the list of every record appended.  Invariants after every step: the log's
offsets are those of the model (a reader returns a subsequence of them, each
record byte for byte what was appended at that offset); every record without
a key and every latest record of a key is returned, except a latest
tombstone that a compaction with ``delete_retention=0`` dropped; so folding
the reader's records into a dict gives the model's dict of latest values.
"""

from __future__ import annotations

import shutil
import tempfile

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import engine

SEG = 4096
values = st.binary(max_size=200)
keys = st.sampled_from([b"a", b"b", b"c", b"d", b""])


class CompactModel(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="qe-compact-model-")
        self.model = []  # (key, value, tombstone) per offset
        self.dropped = set()  # latest tombstones a compaction may have dropped
        self.log = self._open(86400.0)

    def _open(self, delete_retention):
        return engine.Log(self.dir, durability="none", segment_bytes=SEG,
                          delete_retention=delete_retention)

    def teardown(self):
        if not self.log.closed:
            self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(value=values, key=st.one_of(st.none(), keys))
    def append(self, value, key):
        assert self.log.append(value, key=key) == len(self.model)
        self.model.append((key, value, False))

    @rule(batch=st.lists(st.tuples(st.one_of(st.none(), keys), values), min_size=1, max_size=30))
    def append_many(self, batch):
        # two or more records: one batch frame, whose inner records compaction filters
        offs = self.log.append_many([v for _, v in batch], keys=[k for k, _ in batch])
        assert list(offs) == list(range(len(self.model), len(self.model) + len(batch)))
        self.model.extend((k, v, False) for k, v in batch)

    @rule(key=keys)
    def delete(self, key):
        assert self.log.delete(key) == len(self.model)
        self.model.append((key, b"", True))

    @rule(fill=st.integers(SEG // 2, SEG - 200))
    def roll(self, fill):
        before = self.log.stats()["rolls"]
        self.append(b"R" * fill, None)
        self.append(b"R" * fill, None)
        assert self.log.stats()["rolls"] > before

    @rule(drop_tombstones=st.booleans())
    def compact(self, drop_tombstones):
        if drop_tombstones:
            self.log.close()
            self.log = self._open(0.0)
        self.log.compact()
        if drop_tombstones:
            self.dropped |= set(self._latest_offsets())
            self.log.close()
            self.log = self._open(86400.0)

    @rule(clean=st.booleans())
    def reopen(self, clean):
        if clean:
            self.log.close()
        else:
            self.log._simulate_crash()
        self.log = self._open(86400.0)
        assert self.log.next_offset == len(self.model)

    @rule(data=st.data())
    def seek(self, data):
        off = data.draw(st.integers(0, len(self.model)))
        with engine.LogReader(self.dir) as r:
            kept = [x.offset for x in r]
            r.seek(off)
            got = r.read()
            want = [o for o in kept if o >= off]
            assert (None if got is None else got.offset) == (want[0] if want else None)
            if got is not None:
                at = r.seek_time(got.timestamp)
                assert at <= got.offset
                first = r.read()
                assert first is not None and first.timestamp <= got.timestamp
                assert first.offset == min(o for o in kept if o >= at)

    def _latest_offsets(self):
        latest = {}
        for off, (key, _, _) in enumerate(self.model):
            if key is not None:
                latest[key] = off
        return latest.values()

    @invariant()
    def matches_model(self):
        assert self.log.next_offset == len(self.model)
        with engine.LogReader(self.dir) as r:
            got = list(r)
        offs = [x.offset for x in got]
        assert offs == sorted(set(offs))
        for x in got:  # every record returned is the one appended there
            assert (x.key, x.value, x.tombstone) == self.model[x.offset]
        present = set(offs)
        latest = set(self._latest_offsets())
        for off, (key, _, tomb) in enumerate(self.model):
            if key is None or (off in latest and not (tomb and off in self.dropped)):
                assert off in present, (off, self.model[off])
        # the fold of the log is the dict of latest values
        want = {}
        for key, value, tomb in self.model:
            if key is not None:
                want[key] = None if tomb else value
        fold = {}
        for x in got:
            if x.key is not None:
                fold[x.key] = None if x.tombstone else x.value
        assert {k: v for k, v in fold.items() if v is not None} == \
            {k: v for k, v in want.items() if v is not None}


CompactModel.TestCase.settings = settings(
    max_examples=30, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestCompactModel = CompactModel.TestCase
