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
    _, _, few = run_steady(2, 5, body, warm=warm, warm_s=10)
    assert few == 5


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
