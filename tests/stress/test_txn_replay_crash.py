"""SIGKILL at every crash point of a participant's replay, compaction and recovery.

The state is the one of tests/test_txn_replay.py: participant B's journal at
its compaction threshold with marked batches to finish and transaction X in
doubt (committed by the coordinator, applied at A, not at B), left by a
SIGKILL.  From that state a restart opens every party (B's replay finishes
the marked batches and compacts: a new journal generation), closes them
cleanly, opens them again and lets the coordinator recover.

A clean run of that restart lists every crash point it passes (replay
finishes, done records, each step of the journal switch including the
moments between the two generations, close, the coordinator's incarnation
record, recovery's messages).  For each point a copy of the state is
restarted and SIGKILLed there, restarted again and SIGKILLed at another point
(chosen at random, seeded), then restarted cleanly; X must then be in both
logs exactly once, after exactly the batches committed before it, and
nothing may be in doubt anywhere.
"""

from __future__ import annotations

import os
import random
import shutil

import crashkit
import pytest
from test_txn_replay import Quiet, World, _values, fill_then_die

pytestmark = pytest.mark.crash


def restart(root: str) -> None:
    """Open (replay), close cleanly, open again and recover, close."""
    w = World(root)
    w.close()
    w = World(root)
    try:
        w.coord.recover([w.pa, w.pb, Quiet()])
    finally:
        w.close()


def check(root: str, x: str, filled: int, where: str) -> None:
    w = World(root)
    try:
        w.coord.recover([w.pa, w.pb, Quiet()])
        assert w.pa.recover() == [] and w.pb.recover() == [], where
        assert w.coord.in_doubt() == [], where
    finally:
        w.close()
    a = _values(os.path.join(root, "a"))
    b = _values(os.path.join(root, "b"))
    assert a == [b"a%d" % i for i in range(filled)] + [b"X"], (where, a[-3:])
    assert b == [b"b%d" % i for i in range(filled)] + [b"X"], (where, b[-3:])


def test_every_crash_point_of_replay_and_compaction(workdir):
    base = os.path.join(str(workdir), "base")
    os.mkdir(base)
    res = crashkit.run(fill_then_die, base, timeout=120)
    assert res.killed, res.error
    with open(os.path.join(base, "x")) as f:
        x = f.read()
    with open(os.path.join(base, "filled")) as f:
        filled = int(f.read())

    clean = os.path.join(str(workdir), "clean")
    shutil.copytree(base, clean)
    points = crashkit.trace(restart, clean, timeout=120)
    names = {crashkit.split_point(p)[0] for p in points}
    # the restart does replay B's marked batches, write done records and
    # switch B's journal (every step of it) before it resolves X
    for must in (
        "part.replay.before_finish",
        "part.replay.after_finish",
        "journal.switch.begin",
        "journal.switch.after_write",
        "journal.switch.before_current",
        "journal.switch.after_current",
        "journal.switch.after_remove",
        "part.close.before_done",
        "coord.open.after_incarnation",
        "coord.commit.send",
    ):
        assert must in names, (must, sorted(names))
    check(clean, x, filled, "no crash")

    # Every point name, at its first, second and last hit (the restart passes
    # the per-transaction points once per resent commit: the same code, the
    # same state but for which batch it is; its first hits, the last one and
    # every point of replay and compaction, which occur only a few times,
    # are what differ).
    by_name: dict = {}
    for p in points:
        by_name.setdefault(p.rsplit("#", 1)[0], []).append(p)
    chosen = set()
    for hits in by_name.values():
        chosen.update((hits[0], hits[min(1, len(hits) - 1)], hits[-1]))
    points = [p for p in points if p in chosen]
    rng = random.Random(23)
    twice = 0
    for i, point in enumerate(points):
        root = os.path.join(str(workdir), f"p{i}")
        shutil.copytree(base, root)
        r1 = crashkit.run(restart, root, crash_at=point, timeout=120)
        assert r1.killed, f"not killed at {point}: {r1.error}"
        second = rng.choice(points)
        r2 = crashkit.run(restart, root, crash_at=second, timeout=120)
        if r2.killed:
            twice += 1
        else:
            r2.unwrap()
        check(root, x, filled, f"{point} then {second}")
        shutil.rmtree(root)
    print(
        f"\nreplay/compaction restart: {len(points)} crash points, each SIGKILLed, "
        f"{twice} restarts SIGKILLed a second time"
    )
