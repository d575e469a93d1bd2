"""Steady-state runs of the durable bench cases (engine.bench.steady): a
warm-up on the timed store before the clock, and threads that share the
messages so one starved thread cannot stretch the window."""

from __future__ import annotations

import threading
import time

import pytest

from engine.bench import saga, txn, versions
from engine.bench.harness import Profile, Workload, run_case, verify
from engine.bench.steady import run_steady


def test_one_slow_thread_does_not_end_the_window():
    # thread 0 is starved (50 ms per operation, like a SQLite connection in its busy
    # handler's back-off), the 3 others take 1 ms: with a fixed share per thread the
    # window would last 20 x 50 ms = 1 s; with a shared counter thread 0 does a few
    done = []
    lock = threading.Lock()

    def body(k, i):
        time.sleep(0.05 if k == 0 else 0.001)
        with lock:
            done.append(i)

    t0, t1, warmed = run_steady(4, 80, body, warm=None)
    assert sorted(done) == list(range(80))  # every message once
    assert warmed == 0
    assert (t1 - t0) / 1e9 < 0.5


def test_warm_up_runs_on_the_same_threads_before_the_clock():
    events = []
    lock = threading.Lock()

    def warm(k, j):
        time.sleep(0.002)
        with lock:
            events.append(("warm", k, j, time.perf_counter_ns()))

    def body(k, i):
        with lock:
            events.append(("body", k, i, time.perf_counter_ns()))

    t0, t1, warmed = run_steady(3, 200, body, warm=warm, warm_s=0.05)
    warms = [e for e in events if e[0] == "warm"]
    bodies = [e for e in events if e[0] == "body"]
    assert 0 < warmed == len(warms) <= 200
    assert sorted(e[2] for e in warms) == list(range(warmed))  # warm ids never repeat
    assert {e[1] for e in warms} == {0, 1, 2}  # every thread warmed up
    assert max(e[3] for e in warms) <= t0 <= min(e[3] for e in bodies)
    assert sorted(e[2] for e in bodies) == list(range(200))
    # the warm-up stops at warm_s (or at count warm-ups, whichever comes first)
    events.clear()
    t0, _, _ = run_steady(2, 5, body, warm=warm, warm_s=10)
    assert len([e for e in events if e[0] == "warm" and e[3] <= t0]) == 5


def test_the_window_closes_at_count_completions_and_stragglers_still_finish():
    # the first message sleeps 0.6 s (a connection in its busy handler's back-off) while
    # the 3 other threads could go on: they keep the store busy with warm operations,
    # and the window closes once 100 operations have completed
    done = []
    extra = []
    lock = threading.Lock()

    def body(k, i):
        time.sleep(0.6 if i == 0 else 0.001)
        with lock:
            done.append(i)

    def warm(k, j):
        time.sleep(0.001)
        with lock:
            extra.append(j)

    t = time.monotonic()
    t0, t1, warmed = run_steady(4, 100, body, warm=warm, warm_s=0)
    assert time.monotonic() - t >= 0.6  # it returns after the straggler...
    assert sorted(done) == list(range(100))  # ...with every message delivered once
    assert (t1 - t0) / 1e9 < 0.45  # but the window is the loaded store's
    assert 0 < warmed == len(extra) < 200 and len(set(extra)) == len(extra)
    # one thread: no warm operation after the messages, the window ends with the last one
    _, _, none_after = run_steady(1, 10, body, warm=warm, warm_s=0)
    assert none_after == 0


def test_an_error_in_one_thread_is_raised_and_no_thread_hangs():
    def body(k, i):
        if i == 7:
            raise ValueError("boom")

    def warm(k, j):
        if j == 3:
            raise KeyError("warm boom")

    with pytest.raises(ValueError, match="boom"):
        run_steady(4, 50, body)
    t = time.monotonic()
    with pytest.raises(KeyError):
        run_steady(4, 50, body, warm=warm, warm_s=0.05)
    assert time.monotonic() - t < 5


@pytest.mark.parametrize("mod", [saga, txn, versions], ids=lambda m: m.SECTION)
def test_durable_cases_exclude_their_warm_ups_from_what_they_deliver(mod):
    # the warm-up writes to the timed store; the digest, row and record counts
    # must still cover exactly the workload
    profile = Profile(messages=40, repeat=1, min_window=0)
    for case in mod.cases(profile):
        if case.name not in mod.QUICK:
            continue
        for cont in case.contenders:
            run = cont.fn(Workload(40, 64))
            assert verify(case, run, Workload(40, 64)) is None, (case.name, cont.name)
        assert run_case(case, mod.SECTION, profile).verified


def test_check_reruns_the_durable_cases_at_the_full_volume(capsys):
    import json

    from engine.cli import main

    main(["bench", "--only", "saga,txn,versions", "--check", "--messages", "30",
          "--repeat", "1", "--quiet", "--json", "-"])
    data = json.loads(capsys.readouterr().out)
    checked = {(r["section"], r["case"]) for r in data["check"]}
    quick = {(m.SECTION, name) for m in (saga, txn, versions) for name in m.QUICK}
    assert checked == quick


def test_a_starved_sqlite_connection_does_not_set_the_saga_window(monkeypatch):
    # one of the 8 connections takes 40 ms per statement (a writer in the busy handler's
    # back-off): the peer's rate must be the table's, not that connection's
    import sqlite3

    real = sqlite3.connect
    opened = []

    class Slow:
        def __init__(self, db):
            self.db = db

        def execute(self, *a):
            time.sleep(0.04)
            return self.db.execute(*a)

        def close(self):
            self.db.close()

    def connect(*a, **kw):
        db = real(*a, **kw)
        opened.append(db)
        return Slow(db) if len(opened) == 3 else db

    monkeypatch.setattr(sqlite3, "connect", connect)
    wl = Workload(160, 64)
    run = saga._sqlite("FULL", saga.THREADS)(wl)
    case = next(c for c in saga.cases(Profile()) if c.name == saga.QUICK[1])
    assert verify(case, run, wl) is None
    # a fixed share per thread: 20 sagas x 4 statements x 40 ms = 3.2 s on the slow one
    assert run.seconds < 2.5
