"""pytest-benchmark cases for two-phase commit: committed txn/s, 2 participants.

Run: ``python -m pytest bench/test_bench_txn.py --benchmark-only``.
One unique name per case (no parametrize).  Each case runs a contender of
``engine.bench.txn`` (2PC over two Log participants, durable and not; SQLite
two-table transactions; two plain appends with no transaction), checks that
every transaction delivered its message exactly once (count + checksum of the
harness workload, read back from the log after the clock), and records the
rate in ``extra_info["txn_per_s"]``.  ``test_txn_same_run`` runs ours and the
peers interleaved in one test and records the ratios.
"""

from __future__ import annotations

import statistics

import pytest

from engine.bench import txn as tb

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
    benchmark.extra_info["txn_per_s"] = statistics.median(rates)
    benchmark.extra_info["transactions"] = wl.count
    return statistics.median(rates)


def test_txn_2p_none(benchmark, workload):
    _bench(benchmark, tb._ours("none"), workload(5_000))


def test_txn_2p_always_32threads(benchmark, workload):
    _bench(benchmark, tb._ours("always", tb.THREADS), workload(640), ordered=False)


def test_txn_sqlite_2tables_off(benchmark, workload):
    _bench(benchmark, tb._sqlite("OFF"), workload(5_000))


def test_txn_sqlite_2tables_full(benchmark, workload):
    _bench(benchmark, tb._sqlite("FULL"), workload(100))


def test_txn_plain_appends_none(benchmark, workload):
    _bench(benchmark, tb._plain_logs("none"), workload(5_000))


def test_txn_same_run(benchmark, workload):
    """Ours and the peers interleaved in one run: the ratios (machine noise hits all alike)."""
    wl = workload(3_000)
    wl_d = workload(320)
    rates = {
        "ours_none": [],
        "sqlite_off": [],
        "plain_none": [],
        "ours_always32": [],
        "sqlite_full": [],
    }

    def once():
        for key, fn, w, ordered in (
            ("ours_none", tb._ours("none"), wl, True),
            ("sqlite_off", tb._sqlite("OFF"), wl, True),
            ("plain_none", tb._plain_logs("none"), wl, True),
            ("ours_always32", tb._ours("always", tb.THREADS), wl_d, False),
            ("sqlite_full", tb._sqlite("FULL"), workload(50), True),
        ):
            run = fn(w)
            assert run.count == w.count and run.checksum == w.expected.checksum
            if ordered:
                assert run.in_order is not False
            rates[key].append(run.count / run.seconds)

    benchmark.pedantic(once, rounds=2, iterations=1)
    med = {k: statistics.median(v) for k, v in rates.items()}
    benchmark.extra_info.update({f"{k}_txn_per_s": v for k, v in med.items()})
    benchmark.extra_info["none_vs_sqlite_off"] = med["ours_none"] / med["sqlite_off"]
    benchmark.extra_info["none_vs_plain_appends"] = med["ours_none"] / med["plain_none"]
    benchmark.extra_info["always32_vs_sqlite_full"] = med["ours_always32"] / med["sqlite_full"]
