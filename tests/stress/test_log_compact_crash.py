"""Key compaction SIGKILLed at every step, in real processes.

A log with several sealed segments (keys rewritten many times, tombstones,
records without a key, a consumer group committed at an offset compaction
removes) is compacted by ``queue-engine log compact``'s library call in a
forked child.  A clean run lists every crash point it passes (the plan, and
for each segment: the synced copy, the index files removed, the rename, the
directory sync); then, for each point, a fresh copy of the log is compacted
by a child SIGKILLed exactly there.  The test process then reopens the log
and checks:

* recovery opens it and ``verify`` finds every segment intact;
* every record without a key is there, byte for byte, at its offset; every
  record returned is the one appended at its offset; each key's latest
  record is there, unless it is a tombstone (the pass drops those), and
  folding the log gives the latest value of every key (nothing removed
  brought an older value back);
* the group resumes at its committed offset or the next record kept;
* a second compaction completes, and the same holds after it, with every
  superseded record gone and no temp file left.
"""

from __future__ import annotations

import os
import shutil

import crashkit
import pytest

from engine._log import Log, LogReader, verify, write_group
from engine.compaction import compact_path

pytestmark = pytest.mark.crash

SEG = 4096
HOOKS = ("engine.compaction",)


def _build(path):
    """The log and its model: [(key, value, tombstone)] per offset."""
    model = []
    with Log(path, durability="none", segment_bytes=SEG) as log:
        for i in range(240):
            if i in (10, 70, 130):  # a key deleted for good: its tombstone is the
                key = b"gone"       # latest record of a sealed segment
                value = b"old-%d" % i
                log.append(value, key=key)
                model.append((key, value, False))
            elif i == 190:
                log.delete(b"gone")
                model.append((b"gone", b"", True))
            elif i % 17 == 5:
                key = b"k%d" % (i % 5)
                log.delete(key)
                model.append((key, b"", True))
            elif i % 9 == 0:
                value = b"plain-%d" % i
                log.append(value)
                model.append((None, value, False))
            elif i % 3:
                key, value = b"k%d" % (i % 5), b"v%d-" % i * 8
                log.append(value, key=key)
                model.append((key, value, False))
            else:  # a batch frame, whose inner records compaction filters
                batch = [(b"k%d" % ((i + j) % 5), b"b%d.%d-" % (i, j) * 4) for j in range(3)]
                log.append_many([v for _, v in batch], keys=[k for k, _ in batch])
                model.extend((k, v, False) for k, v in batch)
    write_group(path, "g", 3, 0)  # offset 3: a superseded record
    return model


def _check(path, model, complete):
    with Log(path, durability="none", segment_bytes=SEG) as log:
        assert log.next_offset == len(model)
    assert all(r.error is None for r in verify(path)), [r.error for r in verify(path)]
    with LogReader(path) as r:
        got = list(r)
    offs = [x.offset for x in got]
    assert offs == sorted(set(offs))
    for x in got:
        assert (x.key, x.value, x.tombstone) == model[x.offset]
    present = set(offs)
    latest = {}
    for off, (key, _, _) in enumerate(model):
        if key is not None:
            latest[key] = off
    for off, (key, _, tomb) in enumerate(model):
        if key is None or (latest[key] == off and not tomb):
            assert off in present, off
    want = {}
    for k, v, t in model:
        if k is not None:
            want[k] = None if t else v
    fold = {}
    for x in got:
        if x.key is not None:
            fold[x.key] = None if x.tombstone else x.value
    assert {k: v for k, v in fold.items() if v is not None} == {k: v for k, v in want.items() if v is not None}
    with LogReader(path, group="g") as r:
        first = r.read()
        assert first is not None and first.offset == min(o for o in present if o >= 3)
    if complete:
        assert b"gone" not in fold  # the tombstone and every older value are gone
        active = max(b for b in (int(n[:20]) for n in os.listdir(path) if n.endswith(".seg")))
        for off, (key, _, _) in enumerate(model):
            if key is not None and off < active and latest[key] != off:
                assert off not in present, off
        assert not [n for n in os.listdir(path) if n.endswith(".tmp")]


def _compact(path):
    return compact_path(path, delete_retention=0.0).as_dict()


def test_compaction_survives_sigkill_at_every_step(workdir):
    template = os.path.join(workdir, "template")
    model = _build(template)
    clean = os.path.join(workdir, "clean")
    shutil.copytree(template, clean)
    points = crashkit.trace(_compact, clean, hooks=HOOKS)
    assert any(p.startswith("compact.after_rename@") for p in points), points
    assert len([p for p in points if p.startswith("compact.after_dirsync@")]) >= 3, points
    _check(clean, model, complete=True)
    for i, point in enumerate(points):
        d = os.path.join(workdir, f"run{i}")
        shutil.copytree(template, d)
        res = crashkit.run(_compact, d, crash_at=point, hooks=HOOKS, timeout=60)
        assert res.killed, (point, res.error)
        _check(d, model, complete=False)
        done = compact_path(d, delete_retention=0.0)
        assert done.records_scanned > 0
        _check(d, model, complete=True)
        shutil.rmtree(d)
