"""Differential conformance: the same random sequence of operations, run by
real processes against multiprocessing.Queue / JoinableQueue and against
engine.Queue / JoinableQueue, must give the same observable results.

Each example starts two actor processes per implementation (fork, the
queue inherited as a Process argument) and plays the ops one at a time, each
by the actor it names, on both implementations in lockstep.  Compared:

* every op's outcome: the value returned (qsize, empty, full) or the
  exception raised (queue.Empty, queue.Full, ValueError from task_done
  called too many times or from a closed handle);
* the items: each implementation's gets, as a whole, are every acknowledged
  put exactly once, and each producer's items come out in the order it put
  them.  (Which producer's item a get returns is not compared:
  multiprocessing flushes each process's puts from its own feeder thread, so
  two producers' items may reach its pipe in either order.)

``empty()`` is read once the queue is quiescent (multiprocessing's feeder
thread has flushed); gets block (with a timeout) when the model says an item
is there and do not when it says none is, so timing never decides an outcome.
"""

from __future__ import annotations

import multiprocessing as mp
from collections import defaultdict

import numpy as np
import pytest
import test_queues_kit as kit
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import engine

ACTORS = 2
payloads = st.one_of(
    st.integers(),
    st.text(max_size=20),
    st.binary(max_size=64),
    st.lists(st.integers(), max_size=5),
    st.builds(lambda n, v: np.full(n, v, dtype=np.int32), st.integers(0, 8), st.integers(-5, 5)),
)
ops = st.lists(
    st.tuples(
        st.sampled_from(["put", "put", "put", "get", "get", "qsize", "empty", "full",
                         "task_done", "join", "close"]),
        st.integers(0, ACTORS - 1),
        st.sampled_from(["nowait", "block"]),
        payloads,
    ),
    min_size=1,
    max_size=40,
)


class _Side:
    """One implementation's queue and its actor processes."""

    def __init__(self, q):
        ctx = mp.get_context("fork")
        self.q = q
        self.conns = []
        self.procs = []
        for _ in range(ACTORS):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=kit.actor, args=(q, child), daemon=True)
            p.start()
            self.conns.append(parent)
            self.procs.append(p)
        self.got = []

    def do(self, actor, op, arg):
        conn = self.conns[actor]
        conn.send((op, arg))
        if not conn.poll(60):
            raise AssertionError(f"{op} by actor {actor} did not answer in 60 s")
        return conn.recv()

    def stop(self):
        for c in self.conns:
            c.send(None)
        for p in self.procs:
            p.join(30)
            assert p.exitcode == 0


def _check_items(name, puts, got):
    assert sorted(map(repr, got)) == sorted(map(repr, puts)), f"{name}: items lost or duplicated"
    per = defaultdict(list)
    for tag, seq, _ in got:
        per[tag].append(seq)
    for tag, seqs in per.items():
        assert seqs == sorted(seqs), f"{name}: producer {tag}'s items out of order"


@pytest.mark.parametrize("joinable", [False, True], ids=["Queue", "JoinableQueue"])
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(maxsize=st.sampled_from([0, 1, 3]), script=ops)
def test_same_observable_results_as_multiprocessing(joinable, maxsize, script):
    ctx = mp.get_context("fork")
    theirs_q = (ctx.JoinableQueue if joinable else ctx.Queue)(maxsize)
    ours_q = (engine.JoinableQueue if joinable else engine.Queue)(maxsize)
    sides = {"multiprocessing": _Side(theirs_q), "engine": _Side(ours_q)}
    queued = 0  # model: items in the queue
    unfinished = 0  # model: puts not yet task_done
    closed = set()
    seqs = [0] * ACTORS
    puts = []
    try:
        for op, actor, mode, payload in script:
            if op in ("task_done", "join") and not joinable:
                continue
            if actor in closed and op not in ("put", "get", "qsize"):
                continue
            if op == "join" and unfinished:
                continue  # it would wait forever in both
            if op == "put":
                item = (actor, seqs[actor], payload)
                arg = (item, mode)
            elif op == "get":
                arg = 30.0 if queued else ("nowait" if mode == "nowait" else 0.05)
            else:
                arg = None
            outcomes = {name: s.do(actor, op, arg) for name, s in sides.items()}
            theirs, ours = outcomes["multiprocessing"], outcomes["engine"]
            if op == "get":
                assert theirs[0] == ours[0], f"get by {actor}: {theirs} vs {ours}"
                if theirs[0] == "ok":
                    for name in sides:
                        sides[name].got.append(outcomes[name][1])
                    queued -= 1
            else:
                assert theirs == ours, f"{op} by {actor} (model: {queued} queued): {theirs} vs {ours}"
            if op == "put" and theirs[0] == "ok":
                puts.append(kit._report(item))
                seqs[actor] += 1
                queued += 1
                unfinished += 1
            elif op == "task_done" and theirs[0] == "ok":
                unfinished -= 1
            elif op == "close":
                closed.add(actor)
        # drain what is left through the parent's handles; compare the counts
        for name, s in sides.items():
            assert s.q.qsize() == queued, name
            for _ in range(queued):
                s.got.append(kit._report(s.q.get(timeout=30)))
            assert s.q.qsize() == 0 and s.q.empty(), name
            _check_items(name, puts, s.got)
            if joinable:
                for _ in range(unfinished):
                    s.q.task_done()
                s.q.join()
                with pytest.raises(ValueError):
                    s.q.task_done()
    finally:
        for s in sides.values():
            s.stop()
