"""The log bench section at small N: every contender (ours and each installed
peer) passes the harness's count + checksum + order verification, every case
has the workload the section promises, and the verify-scan contender fails
the case when the scan does not account for every record written."""

from __future__ import annotations

import importlib.util
import os

import pytest

from engine.bench import harness, log
from engine.bench.harness import FAILED, OK, SKIPPED, Profile, run_case

pytest.importorskip("engine._log")

N = 1_050  # one full append_many batch of 1,000 and a partial one


def _installed(requires) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in requires)


def test_every_log_contender_verifies_at_small_n():
    profile = Profile(messages=N, repeat=1, min_window=0)  # verification only, no ranking floor
    cases = log.cases(profile)
    assert [c.name for c in cases] == [
        "append 64 B vs queuelib",
        "append 64 B vs per-put queues",
        "durable append_many vs os.write+fdatasync",
        "durable append_many vs SQLiteQueue",
        "read back vs queuelib",
        "read back vs per-put queues",
        "verify scan",
    ]
    seen = set()
    for case in cases:
        assert case.workload.count == N
        assert case.workload.size == (96 if case.name == "verify scan" else 64)
        res = run_case(case, "log", profile)
        for cont, r in zip(case.contenders, res.contenders):
            seen.add(cont.name)
            if _installed(cont.requires):
                assert r.status == OK, f"{case.name}: {cont.name}: {r.reason}"
                assert len(r.runs) == 1 and r.runs[0].ok
                assert r.runs[0].count == N
            else:
                assert r.status == SKIPPED
        assert res.verified, case.name
        for t in res.target_results():
            # every target names a contender of its case and gets a figure
            assert t["peer"] is None or t["peer"] in [c.name for c in case.contenders]
            if t["peer"] is None or _installed(
                next(c for c in case.contenders if c.name == t["peer"]).requires
            ):
                assert t["measured"] is not None and t["met"] is not None, (case.name, t)
    for peer in (log.QUEUELIB_FIFO, log.PQ_FILE, log.PQ_SQLITE, log.DISKCACHE_DEQUE, log.REFERENCE):
        assert peer in seen


def test_scan_that_misses_records_fails_the_case(monkeypatch):
    import engine._log as _log

    real = _log.verify

    def loses_a_segment(path):
        return real(path)[:-1]  # one segment here: the scan "finds" nothing

    monkeypatch.setattr(_log, "verify", loses_a_segment)
    profile = Profile(messages=500, repeat=1)
    case = next(c for c in log.cases(profile) if c.name == "verify scan")
    res = run_case(case, "log", profile)
    assert res.failed and not res.verified
    r = res.contenders[0]
    assert r.status == FAILED and "records scanned" in (r.reason or "")


def test_scan_workload_counts_records_without_building_payloads(monkeypatch):
    def no(*a):
        raise AssertionError("the scan workload built the payload array")

    monkeypatch.setattr(harness, "_build_array", no)
    monkeypatch.setattr(harness, "_expected", no)
    wl = log._ScanWorkload(3_000_000, 96)
    exp = wl.expected
    assert (exp.count, exp.checksum, exp.in_order) == (3_000_000, 0, None)
    with pytest.raises(AssertionError):
        _ = harness.Workload(10, 96).expected  # the plain workload does build it


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reopens the fd through /proc")
@pytest.mark.parametrize("damage", ["flip", "partial"])
def test_the_reference_verifies_what_its_file_holds(damage, monkeypatch):
    # the plain os.write + fdatasync reference is digested from the bytes it
    # reads back from its file: a flipped byte or a torn last record fails it
    real = log._fdatasync
    calls = []

    def sync_then_damage(fd):
        calls.append(fd)
        if len(calls) == 3:  # the warm-up batch, then two timed batches
            if damage == "flip":  # the fd appends: write through a second one
                other = os.open(os.readlink(f"/proc/self/fd/{fd}"), os.O_WRONLY)
                try:
                    os.pwrite(other, b"\xff", 100 * 64 + 1000 * 64 + 17)
                finally:
                    os.close(other)
            else:
                os.write(fd, b"torn")
        real(fd)

    monkeypatch.setattr(log, "_fdatasync", sync_then_damage)
    profile = Profile(messages=N, repeat=1, min_window=0)
    case = next(c for c in log.cases(profile) if c.name.startswith("durable append_many vs os"))
    case.contenders = [c for c in case.contenders if c.name == log.REFERENCE]
    res = run_case(case, "log", profile)
    (r,) = res.contenders
    assert r.status == FAILED and not res.verified
    assert ("checksum" if damage == "flip" else "not whole records") in (r.reason or "")


def test_queuelib_read_back_pops_a_fresh_copy_each_run():
    # the filled queue is built once per workload and copied for each run:
    # popping a copy leaves the template whole, and another workload refills it
    pytest.importorskip("queuelib")
    from queuelib import FifoDiskQueue

    for n in (N, N, N + 7):
        wl = harness.Workload(n, 64)
        run = log.queuelib_pop(wl)
        assert (run.count, run.checksum, run.in_order) == (n, wl.expected.checksum, True)
        template = log._QUEUELIB_FILLED.dir.path
        q = FifoDiskQueue(os.path.join(template, "q"))
        try:
            assert len(q) == n
        finally:
            q.close()
    log._QUEUELIB_FILLED.drop()
    assert not os.path.exists(template)
