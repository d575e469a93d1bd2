"""Exactly-once effect through SIGKILL: the recipe of engine/versions.py, run for real.

A source log holds N distinct messages (id -> amount) plus producer retries
(the same id and amount appended again later).  A consumer process applies
each message to a running count and sum in a VersionedStore and is SIGKILLed
mid-stream again and again (at a random point after a random progress report),
then restarted; when it finally reaches the end, the store must hold exactly
count == N and sum == the sum of the distinct amounts: nothing lost, nothing
applied twice, whatever the kill points were.

Two recipes:

* ``dedup``: LogReader(group=...) + Deduplicator + the store's offset
  (effect and input offset in ONE apply; ids marked after the effect; the
  crash window re-marked on restart from the group's committed offset).
* ``versions``: the store alone: each id is a create-only key
  (``expected_version=0``) in the same apply as the effect, so a duplicate is
  a VersionConflict and changes nothing.
"""

from __future__ import annotations

import random
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine import Log, LogReader
from engine.versions import Deduplicator, VersionedStore

pytestmark = pytest.mark.crash

N = 4000  # distinct messages
RETRIES = 600  # producer duplicates mixed in
KILLS = 12  # SIGKILLs per recipe (at least)
AMOUNT = struct.Struct("<q")

CONSUMER = r"""
import os, signal, struct, sys
import engine
from engine import LogReader
from engine.versions import Deduplicator, VersionedStore

src, state, seen_dir, recipe, kill = sys.argv[1:6]
kill_point, _, kill_at = kill.partition(":")
kill_at = int(kill_at or -1)


def maybe_die(point, offset):
    # a targeted SIGKILL exactly inside a crash window of the recipe
    if offset == kill_at and point == kill_point:
        os.kill(os.getpid(), signal.SIGKILL)


AMOUNT = struct.Struct("<q")
store = VersionedStore(state, durability="none", snapshot_every=500)
reader = LogReader(src, group="billing")


def counters():
    (vc, c), (vs, s) = store.get_many(["count", "sum"])
    return vc, int(c or b"0"), vs, int(s or b"0")


done = int(store.get("offset")[1] or b"0")  # effect and offset are one record
committed = reader.committed() or 0
if recipe == "dedup":
    seen = Deduplicator(seen_dir, window=100_000, durability="none")
    # ids of [committed, done) were applied but maybe not marked: mark them again
    reader.seek(committed)
    while reader.position < done:
        rec = reader.read()
        seen.first_time(bytes(rec.key))
reader.seek(max(done, committed))
# one write(2) per line: a SIGKILL never leaves half a line in the pipe
os.write(1, b"start %d\n" % reader.position)
dups = 0
while True:
    rec = reader.read()
    if rec is None:
        break
    key = bytes(rec.key)
    (amount,) = AMOUNT.unpack(rec.value)
    if recipe == "dedup":
        if key in seen:
            dups += 1
        else:
            vc, c, vs, s = counters()
            store.apply([
                ("put", "count", b"%d" % (c + 1), vc),
                ("put", "sum", b"%d" % (s + amount), vs),
                ("put", "offset", b"%d" % (rec.offset + 1)),
            ])
            maybe_die("after-effect", rec.offset)
            seen.first_time(key)
            maybe_die("after-mark", rec.offset)
    else:
        vc, c, vs, s = counters()
        try:
            store.apply([
                ("put", b"seen/" + key, b"", 0),  # create-only: a duplicate conflicts
                ("put", "count", b"%d" % (c + 1), vc),
                ("put", "sum", b"%d" % (s + amount), vs),
                ("put", "offset", b"%d" % (rec.offset + 1)),
            ])
            maybe_die("after-effect", rec.offset)
        except engine.VersionConflict as e:
            assert e.key == b"seen/" + key, e
            store.put("offset", b"%d" % (rec.offset + 1))
            dups += 1
    if rec.offset % 16 == 15:
        reader.commit(rec.offset + 1)  # after the effect and the mark
        maybe_die("after-commit", rec.offset)
    if rec.offset % 50 == 0:
        os.write(1, b"at %d\n" % rec.offset)
reader.commit()
os.write(1, b"end %d %d\n" % (reader.position, dups))
"""


def _make_source(path: Path, rng: random.Random):
    amounts = {b"m%06d" % i: rng.randint(-1000, 10_000) for i in range(N)}
    order = [(k, v) for k, v in amounts.items()]
    # producer retries: the same message appended again a little later
    for _ in range(RETRIES):
        i = rng.randrange(N)
        k = b"m%06d" % i
        order.insert(min(len(order), i + rng.randint(1, 400)), (k, amounts[k]))
    with Log(path, durability="none", segment_bytes=1 << 20) as log:
        for k, v in order:
            log.append(AMOUNT.pack(v), key=k)
    firsts = {}
    last_first = 0  # offset after the last first occurrence (the last effect)
    retried = []  # offsets of first occurrences that a retry follows: the risky ones
    for off, (k, _) in enumerate(order):
        if k not in firsts:
            firsts[k] = off
            last_first = off + 1
        elif firsts[k] is not None:
            retried.append(firsts[k])
            firsts[k] = None
    return amounts, len(order), last_first, sorted(retried)


@pytest.mark.parametrize("recipe", ["dedup", "versions"])
def test_consumer_killed_mid_stream_applies_each_message_once(tmp_path, recipe):
    rng = random.Random(f"exactly-once-{recipe}")
    src = tmp_path / "src"
    amounts, total_records, last_effect, retried = _make_source(src, rng)
    state = tmp_path / "state"
    seen = tmp_path / "seen"
    kills = 0
    runs = 0
    targeted = 0
    progress = 0
    deadline = time.monotonic() + 240
    finished = False
    while not finished:
        assert time.monotonic() < deadline, "the consumer never finished"
        runs += 1
        # odd runs die at a random moment; even runs SIGKILL themselves inside a
        # crash window (after the effect / after the mark / after a commit) at a
        # message whose id a producer retry repeats later
        kill = "none"
        if kills < KILLS and runs % 2 == 0:
            ahead = [o for o in retried if o > progress + 200]
            if ahead:
                points = ["after-effect", "after-commit"]
                if recipe == "dedup":
                    points.insert(1, "after-mark")
                point = points[(runs // 2) % len(points)]
                at = rng.choice(ahead[:8])
                if point == "after-commit":
                    at = at | 15  # commits happen at offsets 16k + 15
                kill = f"{point}:{at}"
                targeted += 1
        child = subprocess.Popen(
            [sys.executable, "-c", CONSUMER, str(src), str(state), str(seen), recipe, kill],
            stdout=subprocess.PIPE,
        )
        try:
            assert child.stdout is not None
            # kill after a random number of progress reports, at a random moment after it
            target = rng.randint(1, 6) if kills < KILLS and kill == "none" else None
            reports = 0
            for line in child.stdout:
                if line.startswith(b"at"):
                    reports += 1
                    progress = max(progress, int(line.split()[1]))
                    if target is not None and reports >= target:
                        time.sleep(rng.random() * 0.004)
                        child.send_signal(signal.SIGKILL)
                        break
                elif line.startswith(b"end"):
                    finished = True
                    _, position, _dups = line.split()
                    assert int(position) == total_records
            rc = child.wait(timeout=60)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        if rc == -signal.SIGKILL:
            kills += 1
        else:
            assert rc == 0 and finished, f"consumer exited with {rc}"
    assert kills >= KILLS and runs == kills + 1 and targeted >= KILLS // 2 - 1

    with VersionedStore(state, durability="none") as store:
        count = int(store.get("count")[1])
        total = int(store.get("sum")[1])
        offset = int(store.get("offset")[1])
        # versions count the effects too: one put per applied message
        assert store.get("count")[0] == N
    assert count == N, f"{count - N:+d} messages (lost if negative, applied twice if positive)"
    assert total == sum(amounts.values())
    # dedup: the store's offset is the one after the last effect (duplicates
    # only move the group's commit); versions: a duplicate moves it too
    assert offset == (last_effect if recipe == "dedup" else total_records)
    with LogReader(src, group="billing") as r:
        assert r.committed() == total_records
    if recipe == "dedup":
        with Deduplicator(seen, window=100_000, durability="none") as d:
            assert len(d) == N and all(k in d for k in amounts)
