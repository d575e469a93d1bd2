"""Every crash point of a saga, SIGKILLed in a real subprocess, then recovered.

For each scenario a forked child first runs the saga unarmed and records the
crash points it passes (``point#k``: the k-th hit of that point) (before/after each durable write of the
saga log, entering/leaving each action and compensation, and before/after the
effect inside each action and compensation). Then, for every one of those points, a
fresh child runs the same saga and SIGKILLs itself there; a second child
recovers and is itself SIGKILLed at a random point of its recovery; the parent
recovers what is left and checks:

* the saga ends fully done or fully compensated, as the scenario dictates (or
  never began, when the kill came before its first durable write, and then
  nothing ran);
* every action and every needed compensation ran at least once, and took
  effect exactly once (checked through their idempotency keys in a ledger
  file that survives the kill); nothing undone took effect again.

Children are forked from the test process by tests/crashkit.py (shared with
the 2PC tests): a kill costs a fork, not an interpreter start, and every child
is bounded in time.
"""

from __future__ import annotations

import os
import random
import threading
from collections import Counter

import crashkit
import pytest

from engine import saga as saga_mod
from engine.saga import Saga, SagaState, SagaStuck, StepFailed, list_sagas

pytestmark = pytest.mark.crash


class Ledger:
    """The effects of actions and compensations, as lines of an append-only
    file: one ``os.write`` per line, so a SIGKILL never leaves half an effect.

    ``run A key`` / ``run C key``: an action / compensation was called;
    ``eff A key``: the action took effect; ``eff C key``: it was undone;
    ``eff T key``: undone before it ever took effect (a tombstone: a late
    action with that key is a no-op). Idempotent by key.
    """

    def __init__(self, path):
        self.path = path
        self.lines = []
        if os.path.exists(path):
            with open(path) as f:
                self.lines = [tuple(line.split()) for line in f if line.strip()]
        self.applied = {k for t, a, k in self.lines if t == "eff" and a == "A"}
        self.undone = {k for t, a, k in self.lines if t == "eff" and a in "CT"}
        self.runs = Counter((a, k) for t, a, k in self.lines if t == "run")
        self.fd = None
        self.lock = threading.Lock()  # the steps of a parallel group share the ledger

    def _write(self, *words):
        with self.lock:
            if self.fd is None:
                self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            os.write(self.fd, (" ".join(words) + "\n").encode())
            self.lines.append(words)

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def action(self, name, fail=0):
        """``fail``: the first ``fail`` calls raise (before any effect)."""

        def fn(sc):
            key = sc.key
            earlier = self.runs[("A", key)]
            self.runs[("A", key)] += 1
            self._write("run", "A", key)
            saga_mod._crash_point(f"test.effect:{name}:before")
            if earlier < fail:
                raise RuntimeError(f"{name} fails (call {earlier + 1})")
            if key not in self.applied and key not in self.undone:
                self._write("eff", "A", key)
                self.applied.add(key)
            saga_mod._crash_point(f"test.effect:{name}:after")
            return {"step": name}

        return fn

    def compensate(self, name, fail=0):
        def fn(sc):
            key = sc.key
            earlier = self.runs[("C", key)]
            self.runs[("C", key)] += 1
            self._write("run", "C", key)
            saga_mod._crash_point(f"test.undo:{name}:before")
            if earlier < fail:
                raise RuntimeError(f"undo {name} fails (call {earlier + 1})")
            if key not in self.undone:
                self._write("eff", "C" if key in self.applied else "T", key)
                self.undone.add(key)
            saga_mod._crash_point(f"test.undo:{name}:after")

        return fn


# scenario -> (steps: (name, action failures, compensation failures, group), expected end)
ALWAYS = 10**6
SCENARIOS = {
    "ok": ([("a", 0, 0, None), ("b", 0, 0, None), ("c", 0, 0, None)], SagaState.DONE),
    "fail-last": (
        [("a", 0, 0, None), ("b", 0, 0, None), ("c", ALWAYS, 0, None)],
        SagaState.COMPENSATED,
    ),
    "transient": ([("a", 0, 0, None), ("b", 1, 0, None), ("c", 0, 0, None)], SagaState.DONE),
    "undo-transient": (
        [("a", 0, 1, None), ("b", 0, 0, None), ("c", ALWAYS, 0, None)],
        SagaState.COMPENSATED,
    ),
    "group": (
        [("a", 0, 0, None), ("b", 0, 0, "g"), ("c", 0, 0, "g"), ("d", ALWAYS, 0, None)],
        SagaState.COMPENSATED,
    ),
}


def build(path, ledger, scenario, durability):
    steps, _ = SCENARIOS[scenario]
    saga = Saga(
        path,
        durability=durability,
        segment_bytes=1 << 20,
        retries=1,
        compensate_retries=3,
        backoff=0.0,
        max_backoff=0.0,
    )
    for name, fa, fc, group in steps:
        saga.step(name, ledger.action(name, fa), ledger.compensate(name, fc), group=group)
    return saga


HOOKS = ("engine.saga",)


def first_run(tmp, scenario, durability):
    ledger = Ledger(os.path.join(tmp, "ledger"))
    saga = build(os.path.join(tmp, "saga"), ledger, scenario, durability)
    try:
        saga.run({"scenario": scenario}, saga_id="S")
    except (StepFailed, SagaStuck):
        pass
    saga.close()
    ledger.close()


def recover(tmp, scenario, durability):
    ledger = Ledger(os.path.join(tmp, "ledger"))
    saga = build(os.path.join(tmp, "saga"), ledger, scenario, durability)
    saga.recover()
    left = saga.unfinished()
    saga.close()
    ledger.close()
    return left


def check(tmp, scenario):
    steps, expected = SCENARIOS[scenario]
    infos = list_sagas(os.path.join(tmp, "saga"))
    ledger = Ledger(os.path.join(tmp, "ledger"))
    effects = Counter((a, k) for t, a, k in ledger.lines if t == "eff")
    runs = ledger.runs
    if not infos:
        # killed before the first durable write: the saga never began, and
        # no action ran (its start is written before it runs)
        assert runs == Counter() and effects == Counter()
        return "never-began"
    [info] = infos
    assert info.saga_id == "S"
    assert info.state is expected, info
    for name, fa, _fc, _ in steps:
        key = f"S:{name}"
        assert effects[("A", key)] <= 1 and effects[("C", key)] <= 1 and effects[("T", key)] <= 1
        if expected is SagaState.DONE:
            assert effects[("A", key)] == 1 and runs[("A", key)] >= 1
            assert effects[("C", key)] == effects[("T", key)] == runs[("C", key)] == 0
            assert info.results[name] == {"step": name}
        elif fa >= ALWAYS:
            # the failing step never takes effect
            assert effects[("A", key)] == 0 and effects[("C", key)] == 0
            assert runs[("A", key)] >= 2  # tried, retried
        else:
            # completed, then undone exactly once
            assert effects[("A", key)] == 1 and effects[("C", key)] == 1, (key, effects)
            assert effects[("T", key)] == 0 and runs[("C", key)] >= 1
    if expected is SagaState.COMPENSATED:
        done_names = {n for n, fa, _, _ in steps if fa < ALWAYS}
        failing = {n for n, fa, _, _ in steps if fa >= ALWAYS}
        # every completed step is undone; the failing one only if a crash left
        # its outcome unknown (then its compensation found nothing to undo)
        assert done_names <= set(info.compensated) <= done_names | failing
        assert len(info.compensated) == len(set(info.compensated))
    return info.state.value


@pytest.mark.parametrize(
    "scenario,durability",
    [("ok", "always"), ("fail-last", "always")] + [(s, "none") for s in SCENARIOS],
)
def test_every_crash_point(tmp_path, scenario, durability):
    rng = random.Random(f"{scenario}-{durability}")
    base = str(tmp_path)
    clean = os.path.join(base, "clean")
    os.mkdir(clean)
    points = crashkit.trace(first_run, clean, scenario, durability, hooks=HOOKS)
    assert check(clean, scenario) == SCENARIOS[scenario][1].value
    names = {crashkit.split_point(p)[0] for p in points}
    # the points the brief names are all there: each durable write, each action
    assert any(n.startswith("saga.before-write:") for n in names)
    assert any(n.startswith("saga.after-write:") for n in names)
    for name, _, _, _ in SCENARIOS[scenario][0]:
        assert f"test.effect:{name}:before" in names and f"saga.action:{name}:enter" in names
    outcomes = Counter()
    # die at the k-th point passed, for every k: in a sequential saga that is
    # exactly points[k - 1]; in the parallel group the interleaving (and so
    # which records share a sync) varies from run to run, the count does not
    for k in range(1, len(points) + 1):
        tmp = os.path.join(base, f"k{k}")
        os.mkdir(tmp)
        res = crashkit.run(
            first_run, tmp, scenario, durability, crash_at=f"*#{k}", hooks=HOOKS, timeout=60
        )
        assert res.killed, f"crash point #{k} ({points[k - 1]}) was not reached: {res}"
        if k % 2:
            # crash the recovery too, somewhere (or let it finish, if j is past
            # its end); every other k, to keep the suite's time in bounds
            j = rng.randint(1, 12)
            res = crashkit.run(
                recover, tmp, scenario, durability, crash_at=f"*#{j}", hooks=HOOKS, timeout=60
            )
            if not res.killed:
                assert res.unwrap() == []
        assert recover(tmp, scenario, durability) == []
        outcomes[check(tmp, scenario)] += 1
    print(f"{scenario}/{durability}: {len(points)} crash points, outcomes {dict(outcomes)}")
    assert sum(outcomes.values()) == len(points) >= 8
    # a kill at the very first point (before the begin record) leaves nothing
    assert outcomes["never-began"] >= 1
    assert outcomes[SCENARIOS[scenario][1].value] >= len(points) - 2
