"""pytest-benchmark cases for sagas: the cost of durability.

Run: ``python -m pytest bench/test_bench_saga.py --benchmark-only``.
One unique name per case (no parametrize). Each case runs the contenders of
``engine.bench.saga`` (3-step sagas, durable and not, against the same three
functions called directly), checks that every saga delivered its payload
exactly once (count + checksum of the harness workload), and records the
rate in ``extra_info["sagas_per_s"]``. ``test_saga_overhead_same_run`` runs
ours and the plain calls interleaved in one test and records the ratios.
"""

from __future__ import annotations

import statistics

import pytest

from engine.bench import saga as sg

pytest.importorskip("pytest_benchmark")

ROUNDS = 3


def _bench(benchmark, fn, wl, ordered=True):
    rates = []

    def once():
        run = fn(wl)
        assert run.count == wl.count and run.checksum == wl.expected.checksum
        if ordered:
            assert run.in_order is not False
        rates.append(run.count / run.seconds)

    benchmark.pedantic(once, rounds=ROUNDS, iterations=1)
    benchmark.extra_info["sagas_per_s"] = statistics.median(rates)
    benchmark.extra_info["sagas"] = wl.count
    return statistics.median(rates)


def test_saga_3steps_none(benchmark, workload):
    _bench(benchmark, sg._saga("none"), workload(2_000))


def test_saga_3steps_always(benchmark, workload):
    _bench(benchmark, sg._saga("always"), workload(40))


def test_saga_3steps_always_8threads(benchmark, workload):
    _bench(benchmark, sg._saga("always", sg.THREADS), workload(160), ordered=False)


def test_saga_3steps_plain_calls(benchmark, workload):
    _bench(benchmark, sg._plain, workload(2_000))


def test_saga_overhead_same_run(benchmark, workload):
    """Ours and the plain calls, interleaved in one run: the overhead ratios."""
    wl_fast = workload(2_000)
    wl_slow = workload(40)
    rates = {"none": [], "always": [], "plain": []}

    def once():
        for name, fn, wl in (
            ("none", sg._saga("none"), wl_fast),
            ("always", sg._saga("always"), wl_slow),
            ("plain", sg._plain, wl_fast),
        ):
            run = fn(wl)
            assert run.count == wl.count and run.checksum == wl.expected.checksum
            rates[name].append(run.count / run.seconds)

    benchmark.pedantic(once, rounds=ROUNDS, iterations=1)
    med = {k: statistics.median(v) for k, v in rates.items()}
    benchmark.extra_info.update({f"{k}_sagas_per_s": v for k, v in med.items()})
    benchmark.extra_info["plain_over_none"] = med["plain"] / med["none"]
    benchmark.extra_info["none_over_always"] = med["none"] / med["always"]
    assert med["plain"] > med["none"] > med["always"] > 0
