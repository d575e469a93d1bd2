"""pytest-benchmark cases for the segment log.

Run: ``python -m pytest bench/test_bench_log.py --benchmark-only``.
One unique name per case (no parametrize); each verifies delivery (count
and the harness checksum, in order) by reading the log back after timing,
and records a rate in ``extra_info["per_s"]``.  The same-run peer
comparison (queuelib, persist-queue, diskcache) lives in the harness
(``queue-engine bench``); the peer cases here give quick local ratios.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile

import pytest

import engine
from engine import _log

pytest.importorskip("pytest_benchmark")

N = 50_000


@pytest.fixture
def logdir():
    d = tempfile.mkdtemp(prefix="qe-bench-log-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


_seq = itertools.count()


def _fresh(root):
    return os.path.join(root, f"l{next(_seq)}")


def _check(path, wl, assert_delivered, copy=True):
    got = [r.value for r in engine.LogReader(path, copy=copy)]
    assert_delivered(got, wl, ordered=True)


def test_log_append_64b_none(benchmark, logdir, workload, assert_delivered):
    wl = workload(N, 64)
    payloads = wl.payloads()
    paths = []

    def setup():
        p = _fresh(logdir)
        paths.append(p)
        return (engine.Log(p, durability="none"),), {}

    def run(log):
        append = log.append
        for v in payloads:
            append(v)
        log.close()

    benchmark.pedantic(run, setup=setup, rounds=5, iterations=1)
    benchmark.extra_info["per_s"] = N / benchmark.stats.stats.median
    _check(paths[-1], wl, assert_delivered)


def test_log_append_many_64b_none(benchmark, logdir, workload, assert_delivered):
    wl = workload(N, 64)
    payloads = wl.payloads()
    paths = []

    def setup():
        p = _fresh(logdir)
        paths.append(p)
        return (engine.Log(p, durability="none"),), {}

    def run(log):
        for i in range(0, N, 1000):
            log.append_many(payloads[i:i + 1000])
        log.close()

    benchmark.pedantic(run, setup=setup, rounds=5, iterations=1)
    benchmark.extra_info["per_s"] = N / benchmark.stats.stats.median
    _check(paths[-1], wl, assert_delivered)


def test_log_append_many_64b_always_batch1000(benchmark, logdir, workload, assert_delivered):
    n = 20_000
    wl = workload(n, 64)
    payloads = wl.payloads()
    paths = []

    def setup():
        p = _fresh(logdir)
        paths.append(p)
        return (engine.Log(p, durability="always"),), {}

    def run(log):
        for i in range(0, n, 1000):
            log.append_many(payloads[i:i + 1000])
        assert log.durable_offset == n
        log.close()

    benchmark.pedantic(run, setup=setup, rounds=3, iterations=1)
    benchmark.extra_info["per_s"] = n / benchmark.stats.stats.median
    _check(paths[-1], wl, assert_delivered)


def test_log_read_64b_copy(benchmark, logdir, workload, assert_delivered):
    wl = workload(N, 64)
    p = _fresh(logdir)
    with engine.Log(p, durability="none") as log:
        log.append_many(wl.payloads())
    out = []

    def run():
        out[:] = [r.value for r in engine.LogReader(p)]

    benchmark.pedantic(run, rounds=5, iterations=1)
    benchmark.extra_info["per_s"] = N / benchmark.stats.stats.median
    assert_delivered(out, wl, ordered=True)


def test_log_read_64b_zero_copy(benchmark, logdir, workload, assert_delivered):
    wl = workload(N, 64)
    p = _fresh(logdir)
    with engine.Log(p, durability="none") as log:
        log.append_many(wl.payloads())
    out = []

    def run():
        out[:] = [r.value for r in engine.LogReader(p, copy=False)]

    benchmark.pedantic(run, rounds=5, iterations=1)
    benchmark.extra_info["per_s"] = N / benchmark.stats.stats.median
    assert_delivered([bytes(v) for v in out], wl, ordered=True)


def test_log_verify_scan_32mib(benchmark, logdir):
    # the recovery / verify scan: CRC32C over every record, bounds, offsets
    p = _fresh(logdir)
    n = (32 << 20) // 1024
    with engine.Log(p, durability="none", segment_bytes=8 << 20) as log:
        v = os.urandom(1000)
        for i in range(0, n, 1000):
            log.append_many([v] * min(1000, n - i))
    total = sum(os.path.getsize(os.path.join(p, f)) for f in os.listdir(p) if f.endswith(".seg"))
    res = []

    def run():
        res[:] = _log.verify(p)

    benchmark.pedantic(run, rounds=3, iterations=1)
    assert all(r.error is None for r in res) and sum(r.records for r in res) == n
    benchmark.extra_info["GB_per_s"] = total / benchmark.stats.stats.median / 1e9


def test_peer_queuelib_fifodiskqueue_push_64b(benchmark, workload, assert_delivered):
    queuelib = pytest.importorskip("queuelib")
    wl = workload(N, 64)
    payloads = wl.payloads()
    root = tempfile.mkdtemp(prefix="qe-bench-ql-")
    qs = []

    def setup():
        q = queuelib.FifoDiskQueue(_fresh(root))
        qs.append(q)
        return (q,), {}

    def run(q):
        push = q.push
        for v in payloads:
            push(v)

    try:
        benchmark.pedantic(run, setup=setup, rounds=3, iterations=1)
        benchmark.extra_info["per_s"] = N / benchmark.stats.stats.median
        q = qs[-1]
        got = [q.pop() for _ in range(N)]
        assert_delivered(got, wl, ordered=True)
        for q in qs:
            q.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
