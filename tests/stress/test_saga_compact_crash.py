"""SIGKILL at every crash point of a saga log's compaction, with a stuck saga in it.

A saga log of 4 KiB segments and 4 KiB of retention holds one stuck saga
(its compensation refused) between many finished ones.  A forked child reopens
it, runs more sagas, compacts (records the low-water mark, deletes segments),
runs more and compacts again; it is SIGKILLed at each crash point it passes
(every durable write, every action, every step of compaction: before and
after the mark is written, after retention).  Then the test reopens the log:
the stuck saga must still be known as stuck (compaction never drops it, nor
the records it needs), and once the world accepts compensations,
``recover(retry_stuck=True)`` must finish everything: the stuck saga wholly
undone, every other saga wholly done (a saga the kill cut short is driven
forward), each effect once.
"""

from __future__ import annotations

import os
import shutil
from collections import Counter

import crashkit
import pytest

from engine.saga import Saga, SagaState, SagaStuck

pytestmark = pytest.mark.crash

HOOKS = ("engine.saga",)
STEPS = ("a", "b")


class World:
    """Effects in an append-only file (one write per line: a kill never
    leaves half a line); compensations refused while the file ``refuse`` exists."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.path = os.path.join(root, "ledger")

    def _write(self, line: str) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)

    def lines(self) -> list:
        if not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            return [tuple(x.split()) for x in f if x.strip()]

    def action(self, sc):
        eff = self.lines()
        if ("A", sc.key) not in eff and ("C", sc.key) not in eff:
            self._write(f"A {sc.key}")

    def compensate(self, sc):
        if os.path.exists(os.path.join(self.root, "refuse")):
            raise RuntimeError("the world refuses compensations for now")
        if ("C", sc.key) not in self.lines():
            self._write(f"C {sc.key}")


def open_saga(root: str, world: World) -> Saga:
    saga = Saga(
        os.path.join(root, "saga"),
        durability="none",
        segment_bytes=4096,
        retention_bytes=4096,
        compact_every=0,
        retries=0,
        compensate_retries=0,
        backoff=0,
        max_backoff=0,
    )

    def fail_if_asked(sc):
        if sc.ctx.get("fail"):
            raise ValueError("this saga fails at its last step")

    saga.step("a", world.action, world.compensate)
    saga.step("b", world.action, world.compensate)
    saga.step("c", fail_if_asked)
    return saga


def setup(root: str) -> None:
    world = World(root)
    with open(os.path.join(root, "refuse"), "w"):
        pass
    saga = open_saga(root, world)
    try:
        # finished sagas below the stuck one (compaction may drop them), and above
        for i in range(40):
            saga.run({}, saga_id=f"old{i}")
        try:
            saga.run({"fail": True}, saga_id="STUCK")
            raise AssertionError("the saga did not get stuck")
        except SagaStuck:
            pass
        for i in range(40, 60):
            saga.run({}, saga_id=f"old{i}")
    finally:
        saga.close()


def phase(root: str) -> None:
    saga = open_saga(root, World(root))
    try:
        for r in range(2):
            for i in range(15):
                saga.run({}, saga_id=f"new{r}-{i}")
            saga.compact()
    finally:
        saga.close()


def check(root: str, where: str) -> None:
    world = World(root)
    saga = open_saga(root, world)
    try:
        known = {i.saga_id: i.state for i in saga.unfinished()}
        assert known.get("STUCK") is SagaState.STUCK, (where, known)
        os.unlink(os.path.join(root, "refuse"))
        saga.recover(retry_stuck=True)
        assert saga.unfinished() == [], where
    finally:
        saga.close()
    effects = Counter(world.lines())
    assert max(effects.values()) == 1, where  # each effect once
    ids = {k.rsplit(":", 1)[0] for _, k in effects}
    for sid in ids:
        for s in STEPS:
            key = f"{sid}:{s}"
            if sid == "STUCK":
                assert effects[("A", key)] == effects[("C", key)] == 1, (where, key)
            else:
                assert effects[("A", key)] == 1 and effects[("C", key)] == 0, (where, key)


def test_every_crash_point_of_compaction_with_a_stuck_saga(tmp_path):
    base = str(tmp_path / "base")
    os.mkdir(base)
    setup(base)
    clean = str(tmp_path / "clean")
    shutil.copytree(base, clean)
    points = crashkit.trace(phase, clean, hooks=HOOKS)
    names = {crashkit.split_point(p)[0] for p in points}
    for must in (
        "saga.compact.before_low_water",
        "saga.compact.after_low_water",
        "saga.compact.after_retention",
    ):
        assert must in names, (must, sorted(names))
    check(clean, "no crash")
    # compaction did delete segments: the log starts past its first offset
    # (below the stuck saga, which keeps the rest)
    segs = sorted(f for f in os.listdir(os.path.join(clean, "saga")) if f.endswith(".seg"))
    first = int(segs[0].split(".")[0])
    assert first > 0, segs
    # every point of compaction, and around them every durable write and
    # action of the first sagas after each compaction and the last ones before
    chosen = [
        i
        for i, p in enumerate(points)
        if p.startswith("saga.compact") or any(f":new{r}-{j}" in p for r in (0, 1) for j in (0, 14))
    ]
    chosen = sorted(set(chosen) | set(range(0, len(points), 7)))
    for i in chosen:
        root = str(tmp_path / f"p{i}")
        shutil.copytree(base, root)
        res = crashkit.run(phase, root, crash_at=f"*#{i + 1}", hooks=HOOKS, timeout=60)
        assert res.killed, f"not killed at {points[i]}: {res.error}"
        check(root, points[i])
        shutil.rmtree(root)
    print(
        f"\nsaga compaction: {len(chosen)} of {len(points)} crash points SIGKILLed "
        f"(every compaction point); a clean phase deletes the log below offset {first}"
    )
