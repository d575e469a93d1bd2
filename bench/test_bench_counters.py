"""pytest-benchmark cases for sharded counters.

Run: ``python -m pytest bench/test_bench_counters.py --benchmark-only``.
One unique name per case (no parametrize).  Every case verifies the exact
final count (the contenders in engine.bench.counters raise when it is off),
and records its in-region rate (``extra_info["per_s"]``, timed inside the
adders, without process start-up).  ``test_counter_targets_same_run`` runs
ours and the peers interleaved in one test and records the issue-5 ratios.
"""

from __future__ import annotations

import statistics
import time

import pytest

from engine.bench import counters as ctr
from engine.bench.harness import Workload

pytest.importorskip("pytest_benchmark")

ROUNDS = 3


def _bench(benchmark, fn, wl):
    rates = []

    def once():
        run = fn(wl)  # raises if a single increment is missing or doubled
        assert run.count == wl.count
        rates.append(run.count / run.seconds)

    benchmark.pedantic(once, rounds=ROUNDS, iterations=1)
    benchmark.extra_info["per_s"] = statistics.median(rates)
    benchmark.extra_info["adds"] = wl.count
    return statistics.median(rates)


def test_counter_add_1proc_sharded(benchmark):
    # the tight loop itself, timed by pytest-benchmark
    from engine import ShardedCounter

    c = ShardedCounter()
    add = c.add
    n = 200_000

    def loop():
        for _ in range(n):
            add(1)

    benchmark.pedantic(loop, rounds=5, iterations=1)
    assert c.value() == 5 * n
    benchmark.extra_info["per_s"] = n / benchmark.stats.stats.median


def test_counter_add_1proc_mp_value(benchmark):
    _bench(benchmark, ctr.mpvalue_add_1p, Workload(100_000, 8))


def test_counter_add_1proc_lock_int(benchmark):
    _bench(benchmark, ctr.lock_int_add_1p, Workload(200_000, 8))


def test_counter_add_2proc_sharded(benchmark):
    _bench(benchmark, ctr.ours_add_2p(None), Workload(1_000_000, 8))


def test_counter_add_2proc_single_cell(benchmark):
    _bench(benchmark, ctr.single_cell_2p, Workload(1_000_000, 8))


def test_counter_add_2proc_call_ceiling(benchmark):
    # the same calls writing nothing: the most any one-call-per-add counter can do
    _bench(benchmark, ctr.call_ceiling_2p, Workload(1_000_000, 8))


def test_counter_add_2proc_mp_value(benchmark):
    _bench(benchmark, ctr.mpvalue_add_2p, Workload(100_000, 8))


def test_countermap_add_1proc(benchmark):
    _bench(benchmark, ctr.ours_map_1p, Workload(200_000, 8))


def test_countermap_manager_dict_1proc(benchmark):
    _bench(benchmark, ctr.manager_dict_1p, Workload(5_000, 8))


def test_counter_aggregator_ring(benchmark):
    _bench(benchmark, ctr.ours_aggregator, Workload(300_000, 8))


def test_counter_aggregator_mpqueue(benchmark):
    _bench(benchmark, ctr.mpqueue_aggregator, Workload(300_000, 8))


def test_counter_targets_same_run(benchmark):
    """Ours and the peers interleaved in one run; the issue-5 ratios."""
    contenders = {
        "add_1p": (ctr.ours_add_1p, Workload(1_000_000, 8)),
        "add_2p": (ctr.ours_add_2p(None), Workload(1_000_000, 8)),
        "single_cell_2p": (ctr.single_cell_2p, Workload(1_000_000, 8)),
        "call_ceiling_2p": (ctr.call_ceiling_2p, Workload(1_000_000, 8)),
        "mp_value_2p": (ctr.mpvalue_add_2p, Workload(100_000, 8)),
    }
    rates = {k: [] for k in contenders}

    def round_robin():
        for k, (fn, wl) in contenders.items():
            run = fn(wl)
            rates[k].append(run.count / run.seconds)

    t0 = time.monotonic()
    benchmark.pedantic(round_robin, rounds=ROUNDS, iterations=1)
    med = {k: statistics.median(v) for k, v in rates.items()}
    info = benchmark.extra_info
    info.update({f"{k}_per_s": v for k, v in med.items()})
    info["add_1p_target_15M"] = med["add_1p"] >= 15e6
    info["ratio_vs_mp_value"] = med["add_2p"] / med["mp_value_2p"]
    info["ratio_vs_single_cell"] = med["add_2p"] / med["single_cell_2p"]
    # no counter called once per increment beats the call ceiling, so this
    # ratio bounds the one above on this machine (the issue asks >= 2)
    info["bound_vs_single_cell"] = med["call_ceiling_2p"] / med["single_cell_2p"]
    info["seconds"] = time.monotonic() - t0
    # sanity that holds on any machine: no lock is far faster than a lock
    assert med["add_2p"] > 5 * med["mp_value_2p"]
