"""The queues bench section: its runs verify delivery, and its cases fit the
harness's section interface."""

from __future__ import annotations

import pytest

from engine.bench import harness
from engine.bench import queues as qb


def test_steady_state_measure_verifies_and_reports_rates():
    rates = qb.measure(qb._ours, qb.PAYLOADS[0], 2, 1, window=0.25, windows=1)
    assert len(rates) == 1 and rates[0] > 0


def test_measure_fails_loudly_on_a_lossy_queue():
    class Lossy:
        """Drops every 100th message: a fast wrong answer."""

        def __init__(self, q):
            self.q, self.n = q, 0

        def put(self, obj, block=True, timeout=None):
            self.n += 1
            if self.n % 100:
                self.q.put(obj, block, timeout)

        def get(self, block=True, timeout=None):
            return self.q.get(block, timeout)

    with pytest.raises(AssertionError, match="lost|got"):
        qb.measure(lambda m: Lossy(qb._ours(m)), qb.PAYLOADS[1], 1, 1, window=0.25, windows=1)


def test_cases_run_through_the_harness():
    profile = harness.Profile(messages=2000, repeat=1, min_window=0)
    cases = qb.cases(profile)
    assert [c.name for c in cases][:3] == ["small tuple 1->1", "small tuple 4->1", "small tuple 1->4"]
    assert len(cases) == 9
    case = cases[1]
    case.contenders = [c for c in case.contenders if c.ours]
    res = harness.run_case(case, qb.SECTION, profile)
    assert res.verified, [(c.status, c.reason, [r.error for r in c.runs]) for c in res.contenders]
    assert res.headline(res.contenders[0]) > 0
