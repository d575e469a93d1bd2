"""Durable sagas (``durability="always"``): what each write must wait for, and
that concurrent sagas share their syncs.

A sync hook (``engine._log._set_sync_hook``) tells how far the saga's log is
durable after every sync; a proxy around the saga's log remembers which
records each saga wrote last.  S1 (docs of engine/saga.py) asks that a step's
start record is durable before its action runs and that a saga's last record
is durable before :meth:`Saga.run` returns; the log's group commit lets
sagas in several threads share one sync.  The crash points are covered by
tests/stress/test_saga_crash.py.
"""

from __future__ import annotations

import json
import threading

import pytest
from synchook import Durable, installed, run_threads

import engine._log as _logmod
from engine.saga import Saga

SEG = 1 << 16
STEPS = ("reserve", "charge", "deliver")


@pytest.fixture
def durable():
    with installed(Durable()) as hook:
        yield hook


class Recording:
    """The saga's log, remembering per saga the last batch it appended."""

    def __init__(self, log) -> None:
        self._log = log
        self._lock = threading.Lock()
        self.last: dict = {}  # saga id -> (range of offsets, decoded records)
        self.starts: dict = {}  # (saga id, step) -> offset of its last start record

    def append_many(self, values, keys=None):
        values = list(values)
        r = self._log.append_many(values, keys)
        mine = r
        if keys:
            recs = [json.loads(v) for v in values]
            with self._lock:
                self.last[bytes(keys[0]).decode()] = (mine, recs)
                for off, rec in zip(mine, recs):
                    if rec.get("t") == "start":
                        self.starts[(rec["id"], rec["s"])] = off
        return r

    def __getattr__(self, name):
        return getattr(self._log, name)


def _saga(path):
    saga = Saga(str(path), durability="always", segment_bytes=SEG)
    rec = Recording(saga._log)
    saga._log = rec
    return saga, rec


@pytest.mark.parametrize("threads", [1, 8])
def test_a_step_runs_and_a_saga_returns_only_once_its_records_are_durable(
    tmp_path, durable, threads
):
    """When each action starts, the saga's last records written are its
    step's start record (and the outcome before it) and the sync hook has
    already seen the log durable past them; when run() returns, its end
    record is written and durable too."""
    saga, rec = _saga(tmp_path / "saga")
    path = saga._log.path
    early = []  # (saga id, step, what) for every write not yet durable

    def action(sc):
        r, recs = rec.last[sc.saga_id]
        if recs[-1].get("t") != "start" or recs[-1].get("s") != sc.step:
            early.append((sc.saga_id, sc.step, f"last write {recs[-1]}, not this step's start"))
        if durable.end(path) < r.stop:
            early.append((sc.saga_id, sc.step, f"durable to {durable.end(path)}, wrote {r}"))
        return sc.step

    for name in STEPS:
        saga.step(name, action, lambda sc: None)
    per = 5
    done = []

    def body(k):
        for i in range(per):
            sid = f"s{k}-{i}"
            assert saga.run({"k": k, "i": i}, saga_id=sid) == {n: n for n in STEPS}
            r, recs = rec.last[sid]
            if recs[-1] != {"t": "end", "id": sid, "st": "done"}:
                early.append((sid, None, f"last write {recs[-1]}, not its end"))
            if durable.end(path) < r.stop:
                early.append((sid, None, f"returned durable to {durable.end(path)}, wrote {r}"))
            done.append(sid)

    try:
        run_threads(threads, body, what="a saga")
    finally:
        saga.close()
    assert len(done) == threads * per
    assert early == []


def test_concurrent_sagas_share_syncs(tmp_path):
    """8 threads run sagas in step with each other (a barrier in every
    action): their durable writes (begin+start, done+start, done+start,
    done+end: 4 per saga) meet at the log and share syncs, fewer syncs than
    writes."""
    hook = Durable(slow=0.002)
    _logmod._set_sync_hook(hook)
    threads, per = 8, 3
    saga, rec = _saga(tmp_path / "saga")
    path = saga._log.path
    meet = threading.Barrier(threads)

    def action(sc):
        meet.wait(30)
        return sc.step

    for name in STEPS:
        saga.step(name, action, lambda sc: None)
    writes = []

    def body(k):
        for i in range(per):
            saga.run(i, saga_id=f"s{k}-{i}")
            writes.append(len(STEPS) + 1)

    try:
        before = saga._log.stats()["syncs"]
        run_threads(threads, body, what="a saga")
        syncs = saga._log.stats()["syncs"] - before
    finally:
        _logmod._set_sync_hook(None)
        saga.close()
    assert sum(writes) == threads * per * (len(STEPS) + 1)
    assert hook.syncs.get(path, 0) >= syncs > 0  # every sync the log counts, the hook saw
    assert syncs < sum(writes), (syncs, sum(writes))


def test_parallel_steps_of_a_saga_share_syncs_and_each_waits_for_its_own(tmp_path):
    """A group of 4 parallel steps: each action starts only once its own
    start record is durable, and the 4 start records (written from 4 worker
    threads) share syncs: fewer syncs than the saga's durable writes (4
    starts and the end)."""
    hook = Durable(slow=0.002)
    _logmod._set_sync_hook(hook)
    names = ("a", "b", "c", "d")
    sagas = 6
    saga, rec = _saga(tmp_path / "saga")
    path = saga._log.path
    early = []

    def action(sc):
        off = rec.starts.get((sc.saga_id, sc.step))
        if off is None or hook.end(path) <= off:
            early.append((sc.saga_id, sc.step, off, hook.end(path)))
        return sc.step

    for name in names:
        saga.step(name, action, lambda sc: None, group="g")
    try:
        before = saga._log.stats()["syncs"]
        for i in range(sagas):
            assert saga.run(i, saga_id=f"p{i}") == {n: n for n in names}
        syncs = saga._log.stats()["syncs"] - before
    finally:
        _logmod._set_sync_hook(None)
        saga.close()
    assert early == []
    assert 0 < syncs < sagas * (len(names) + 1), (syncs, sagas * (len(names) + 1))
