"""The benchmark harness itself: verification fails loudly on lost, duplicated,
corrupted or reordered messages; statistics are right; the JSON schema is
stable; Markdown renders; the real ring section passes verification at small N."""

from __future__ import annotations

import json
import math
import os
import sys
import time
import types

import numpy as np
import pytest

from engine.bench import harness, report
from engine.bench.harness import (
    FAILED,
    LATENCY,
    OK,
    SKIPPED,
    THROUGHPUT,
    Case,
    Contender,
    Digest,
    LatencyHistogram,
    Profile,
    Run,
    Target,
    Workload,
    digest,
    run_case,
    run_suite,
)

# ---------------------------------------------------------------------------
# contenders: one honest, several deliberately broken
# ---------------------------------------------------------------------------


def _deliver(wl: Workload, mutate=None, lat=False) -> Run:
    msgs = wl.payloads()
    t0 = time.perf_counter_ns()
    out = list(msgs)
    t1 = time.perf_counter_ns() + 1
    if mutate is not None:
        out = mutate(out)
    samples = np.arange(1000, 1000 + len(out), dtype=np.int64) if lat else None
    return Run.timed(t0, t1, digest(out), samples)


def honest(wl):
    return _deliver(wl)


def loses_one(wl):
    return _deliver(wl, lambda o: o[:-1])


def duplicates_one(wl):
    return _deliver(wl, lambda o: o + [o[5]])


def duplicate_replaces_lost(wl):
    # same count: message 7 lost, message 3 delivered twice
    return _deliver(wl, lambda o: o[:7] + [o[3]] + o[8:])


def corrupts_a_byte(wl):
    def flip(o):
        b = bytearray(o[10])
        b[-1] ^= 1
        return o[:10] + [bytes(b)] + o[11:]

    return _deliver(wl, flip)


def reorders(wl):
    return _deliver(wl, lambda o: [o[1], o[0]] + o[2:])


def raises(wl):
    raise RuntimeError("peer exploded")


def returns_garbage(wl):
    return (1.0, wl.count)


BROKEN = [
    loses_one,
    duplicates_one,
    duplicate_replaces_lost,
    corrupts_a_byte,
    reorders,
    raises,
    returns_garbage,
]


def _case(contenders, kind=THROUGHPUT, ordered=True, n=500, size=64):
    return Case("c", "test case", kind, Workload(n, size), contenders, ordered=ordered)


# ---------------------------------------------------------------------------
# verification
# ---------------------------------------------------------------------------


def test_honest_contenders_verify_and_get_a_ratio():
    case = _case([Contender("ours", honest, ours=True), Contender("peer", honest)])
    res = run_case(case, "t", Profile(min_window=0, repeat=3))
    assert not res.failed and res.verified
    for c in res.contenders:
        assert c.status == OK
        assert len(c.runs) == 3 and all(r.ok for r in c.runs)
        assert all(r.count == 500 for r in c.runs)
    assert res.ratio is not None and res.ratio > 0
    assert res.best_peer.name == "peer" and res.best_ours.name == "ours"


@pytest.mark.parametrize("broken", BROKEN, ids=lambda f: f.__name__)
def test_broken_contender_fails_the_case_loudly(broken, capsys):
    case = _case([Contender("ours", honest, ours=True), Contender("broken", broken)])
    progress = harness.Progress(stream=sys.stderr, enabled=True)
    res = run_case(case, "t", Profile(min_window=0, repeat=2), progress)
    assert res.failed and not res.verified
    bad = res.contenders[1]
    assert bad.status == FAILED and bad.reason
    assert bad.runs and not bad.runs[0].ok
    # a failed contender is not retried and never becomes a figure
    assert len(bad.runs) == 1 and bad.ok_runs() == []
    assert res.contenders[0].status == OK and len(res.contenders[0].runs) == 2
    assert "FAILED" in capsys.readouterr().err
    text = report.render_terminal(harness.SuiteResult(Profile(), [res]), color=False, info=_INFO)
    assert "FAILED broken" in text and "1 FAILED" in text


def test_failure_reasons_say_what_went_wrong():
    def reason(fn, **kw):
        res = run_case(_case([Contender("x", fn)], **kw), "t", Profile(min_window=0, repeat=1))
        return res.contenders[0].reason

    assert "lost 1" in reason(loses_one)
    assert "duplicated 1" in reason(duplicates_one)
    assert "checksum" in reason(duplicate_replaces_lost)
    assert "checksum" in reason(corrupts_a_byte)
    assert "out of order" in reason(reorders)
    assert reason(reorders, ordered=False) is None  # competing consumers: order not promised
    assert "peer exploded" in reason(raises)
    assert "not Run" in reason(returns_garbage)


def test_workloads_of_one_size_share_one_build_of_their_payloads():
    small, big = Workload(1000, 64, seed=7), Workload(150_000, 64, seed=7)
    a = small.payloads()
    b = big.payloads()  # grows the pool: the first 1000 stay the same objects
    assert len(b) == 150_000 and all(x is y for x, y in zip(a, b[:1000]))
    assert all(x is y for x, y in zip(small.payloads(), a))
    assert np.shares_memory(small.array(), big.array())
    assert bytes(big.array()[123_456]) == b[123_456]
    assert [int.from_bytes(m[:8], "little") for m in b[-3:]] == [149_997, 149_998, 149_999]
    assert small.expected == digest(a) and big.expected == digest(b)
    assert Workload(1000, 64, seed=8).payloads() != a
    b.clear()  # each call gives its own list: emptying it touches nobody else's
    assert len(big.payloads()) == 150_000 and small.expected == digest(small.payloads())
    # a pool holds what was asked for, rounded up to one block of bytes
    huge = Workload(3, (1 << 20) + 1, seed=7)
    assert len(huge.payloads()) == 3
    assert harness._pool(huge.size, 7).rows.nbytes <= huge.nbytes + harness.POOL_BLOCK_BYTES


@pytest.mark.parametrize("size", [1, 3, 7, 8, 9, 63, 64, 100, 4096, 65536 + 24])
def test_the_compiled_digest_equals_the_numpy_definition(size, monkeypatch):
    # the C loops digest each delivered object in place; numpy joins and
    # multiplies rows: the two must agree on every shape the harness sees
    pytest.importorskip("engine._benchdigest")
    wl = Workload(3 if size > 60_000 else 300, size, seed=3)
    p = wl.payloads()
    flipped = bytearray(p[1])
    flipped[-1] ^= 0x80
    shapes = [
        p,
        p[::-1],
        p + [p[0]],
        p[:1] + [bytes(flipped)] + p[2:],
        [memoryview(m) for m in p],
        [bytearray(m) for m in p],
        list(wl.array()),
        [b"ab", b"abc", b"a", b"cd"],
        [b"", b""],
    ]
    rows = wl.array()
    fast = [digest(x) for x in shapes] + [harness.digest_array(rows), digest(rows)]
    monkeypatch.setattr(harness, "_cdigest", None)
    slow = [digest(x) for x in shapes] + [harness.digest_array(rows), digest(rows)]
    assert fast == slow
    assert fast[0] != fast[2] and fast[0] != fast[3] and fast[0].checksum == fast[1].checksum
    wraps = size < 8 and wl.count > 256**size  # a 1-byte sequence number cannot order 300
    assert (fast[0].in_order, fast[1].in_order) == ((None, None) if wraps else (True, False))


def test_shared_payloads_are_verified_per_contender():
    # every contender gets the same payload objects; a corrupted delivery by
    # one fails that one only, and the next one still verifies
    case = _case(
        [
            Contender("ours", honest, ours=True),
            Contender("corrupt", corrupts_a_byte),
            Contender("peer", honest),
        ]
    )
    res = run_case(case, "t", Profile(min_window=0, repeat=2))
    ours, bad, peer = res.contenders
    assert bad.status == FAILED and "checksum" in (bad.reason or "")
    assert ours.status == OK and peer.status == OK and len(peer.runs) == 2
    assert all(r.checksum == case.workload.expected.checksum for r in ours.runs + peer.runs)


def test_latency_case_needs_samples():
    res = run_case(
        _case([Contender("x", honest)], kind=LATENCY), "t", Profile(min_window=0, repeat=1)
    )
    assert res.failed and "no latency samples" in res.contenders[0].reason
    res = run_case(
        _case([Contender("x", lambda wl: _deliver(wl, lat=True))], kind=LATENCY),
        "t",
        Profile(min_window=0, repeat=2),
    )
    assert not res.failed
    lat = res.contenders[0].latency()
    assert lat["samples"] == 1000 and lat["p50"] == pytest.approx(1249, rel=0.002)


def test_contenders_are_interleaved_across_repetitions():
    calls = []

    def rec(name):
        def fn(wl):
            calls.append(name)
            return honest(wl)

        return fn

    case = _case(
        [Contender("a", rec("a"), ours=True), Contender("b", rec("b")), Contender("c", rec("c"))]
    )
    run_case(case, "t", Profile(min_window=0, repeat=3))
    assert calls == ["a", "b", "c"] * 3


def test_missing_requirement_is_skipped_with_a_pip_line():
    lines = []
    case = _case(
        [
            Contender("ours", honest, ours=True),
            Contender("ghost", honest, requires=("no_such_mod_qe",)),
        ]
    )
    res = run_case(case, "t", Profile(min_window=0, repeat=1), skipped_lines=lines)
    ghost = res.contenders[1]
    assert ghost.status == SKIPPED and ghost.runs == []
    assert lines == ['skipped: ghost (pip install "queue-engine[bench]")']
    assert res.verified and not res.failed and res.ratio is None


# ---------------------------------------------------------------------------
# steady state: windows, warm-up, sizing, validity
# ---------------------------------------------------------------------------


def paced(rate: float, warm_s: float = 0.0):
    """A contender that moves ``rate`` msg/s after ``warm_s`` s of start-up
    (reported as its in-run warm-up), delivering every message."""

    def fn(wl):
        msgs = wl.payloads()
        t0 = 1_000_000_000
        t_warm = t0 + int(warm_s * 1e9)
        n_warm = min(wl.count, 10)
        t1 = t_warm + int((wl.count - n_warm) / rate * 1e9)
        return Run.timed(t0, t1, digest(list(msgs)), window=(t_warm, n_warm))

    return fn


def test_run_window_excludes_the_warm_up():
    wl = Workload(100, 8)
    r = Run.timed(0, 2_000_000_000, digest(wl.payloads()), window=(1_500_000_000, 40))
    assert r.seconds == 2.0 and r.window() == (0.5, 60)
    assert Run.timed(0, 10, digest(wl.payloads())).window() == (1e-8, 100)


def test_short_windows_are_flagged_invalid_and_never_ranked():
    # --messages pins the count: no sizing, so the short windows stay short
    case = _case([Contender("ours", paced(1e9), ours=True), Contender("peer", paced(1e3))], n=600)
    res = run_case(case, "t", Profile(messages=600, repeat=2))
    ours, peer = res.contenders
    assert ours.status == OK and len(ours.runs) == 2 and all(r.ok for r in ours.runs)
    assert not any(r.valid for r in ours.runs) and ours.valid_runs() == []
    assert all(r.valid and r.window_seconds >= 0.25 for r in peer.runs)
    # the fast-looking but invalid ours is not ranked: no ratio, no best ours
    assert res.best_ours is None and res.ratio is None and res.best_peer is peer
    assert math.isnan(ours.rates(64)["msg_per_s"]["median"])
    # every run, the warm-up included, keeps its window for the JSON
    assert len(ours.warmups) == 1 and ours.warmups[0].window_count == 590
    data = report.to_json(harness.SuiteResult(Profile(), [res]), "x", _INFO)
    runs = data["cases"][0]["contenders"][0]["runs"]
    assert [r["valid"] for r in runs] == [False, False]
    assert runs[0]["window_count"] == 590 and runs[0]["window_seconds"] > 0
    text = report.render_terminal(harness.SuiteResult(Profile(), [res]), color=False, info=_INFO)
    assert "INVALID" in text


def test_the_volume_rule_validates_a_short_window():
    case = _case([Contender("ours", paced(1e9), ours=True)], n=600, size=64)
    case.buffer_bytes = 600 * 64 // harness.VOLUME_FACTOR  # the window moves 4x the buffer...
    res = run_case(case, "t", Profile(messages=600, repeat=1))
    assert not res.contenders[0].runs[0].valid  # ...but its 590 messages fall short of 600
    case.buffer_bytes = 590 * 64 // harness.VOLUME_FACTOR
    res = run_case(case, "t", Profile(messages=600, repeat=1))
    assert res.contenders[0].runs[0].valid


def test_sizing_grows_each_contender_to_a_steady_window():
    case = _case(
        [Contender("ours", paced(400_000, 0.05), ours=True), Contender("peer", paced(100_000))],
        n=1000,
    )
    res = run_case(case, "t", Profile(repeat=2))
    assert not res.failed and res.verified
    for c, rate in zip(res.contenders, (400_000, 100_000)):
        wl = c.workload
        assert wl is not None and wl.count > 1000
        # sized from the warm-up so the window lasts about TARGET_WINDOW_S
        assert all(r.ok and r.valid and r.count == wl.count for r in c.runs)
        assert all(
            harness.MIN_WINDOW_S <= r.window_seconds <= 2 * harness.TARGET_WINDOW_S for r in c.runs
        )
        assert c.warmups and c.warmups[0].count == 1000  # the warm-up ran the case count first
        assert c.rates(64)["msg_per_s"]["median"] == pytest.approx(rate, rel=0.01)
    assert res.ratio == pytest.approx(4.0, rel=0.02)
    spread = res.ratio_spread()
    assert spread is not None and spread["min"] <= spread["median"] <= spread["max"]


def test_a_timed_run_that_falls_short_resizes_and_runs_again():
    # the warm-ups run slow (a disk hiccup, a busy core), so sizing settles on
    # a small workload; the first timed run is fast and short: it stays
    # recorded as invalid, and that repetition runs again at a larger size
    calls = []

    def hiccup(wl):
        calls.append(wl.count)
        rate = 1_000 if len(calls) == 1 else 400_000  # the one warm-up: 1 s, no growth
        return paced(rate)(wl)

    case = _case([Contender("ours", hiccup, ours=True)], n=1000)
    res = run_case(case, "t", Profile(repeat=2))
    (c,) = res.contenders
    assert not res.failed and res.verified
    assert [r.valid for r in c.runs] == [False, True, True]
    assert [r.rep for r in c.runs] == [0, 0, 1]
    assert c.runs[1].count > c.runs[0].count and c.workload is not None
    assert all(r.window_seconds >= harness.MIN_WINDOW_S for r in c.runs[1:])


def test_the_last_sizing_run_counts_as_the_first_repetition():
    # a sizing run at the final size, after an earlier run (its warm-up), with
    # a valid window is the run repetition 0 would repeat: it is kept as rep 0
    calls = []

    def counted(wl):
        calls.append(wl.count)
        return paced(100_000)(wl)

    case = _case([Contender("ours", counted, ours=True)], n=1000)
    res = run_case(case, "t", Profile(repeat=2))
    (c,) = res.contenders
    assert not res.failed and res.verified and c.workload is not None
    # 1000 (cold, far too short), then the sized run, then one more repetition
    assert calls == [1000, c.workload.count, c.workload.count]
    assert [w.count for w in c.warmups] == calls[:2]
    assert [(r.rep, r.reused) for r in c.runs] == [(0, True), (1, False)]
    assert all(r.ok and r.valid and r.window_seconds >= harness.MIN_WINDOW_S for r in c.runs)
    assert c.runs[0].window_count == c.warmups[1].window_count
    runs = report.to_json(harness.SuiteResult(Profile(), [res]), "x", _INFO)["cases"][0]
    assert [r["reused"] for r in runs["contenders"][0]["runs"]] == [True, False]


def test_a_first_run_is_never_a_repetition():
    # long enough on its own, but cold: no earlier run warmed it up, so every
    # repetition runs after it
    calls = []

    def slow(wl):
        calls.append(wl.count)
        return paced(1_000)(wl)

    case = _case([Contender("ours", slow, ours=True), Contender("ref", slow, rank=False)], n=1000)
    res = run_case(case, "t", Profile(repeat=2))
    assert calls == [1000] * 6
    for c in res.contenders:
        assert len(c.warmups) == 1
        assert [(r.rep, r.reused) for r in c.runs] == [(0, False), (1, False)]


def test_a_sizing_run_short_of_the_minimum_is_not_reused():
    # capped by memory below the minimum window and the volume rule: the
    # sizing runs stay warm-ups, every repetition runs on its own
    calls = []

    def fast(wl):
        calls.append(wl.count)
        return paced(1e9)(wl)

    case = _case([Contender("ours", fast, ours=True)], n=1000)
    case.max_bytes = 4000 * 64
    res = run_case(case, "t", Profile(repeat=2))
    (c,) = res.contenders
    assert calls == [1000, 4000, 4000, 4000]
    assert [(r.rep, r.reused, r.valid) for r in c.runs] == [(0, False, False), (1, False, False)]


def test_sizing_backs_off_an_estimate_that_overshot():
    # the first run fits in the buffers (the producer never waits): it looks
    # twice as fast as the steady rate, so the first estimate overshoots; the
    # warm-up steps back toward the target window before the timed runs
    calls = []

    def bursty(wl):
        calls.append(wl.count)
        return paced(2_000_000 if len(calls) == 1 else 1_000_000)(wl)

    case = _case([Contender("ours", bursty, ours=True)], n=30_000)
    res = run_case(case, "t", Profile(repeat=2))
    (c,) = res.contenders
    assert not res.failed and res.verified
    counts = [w.count for w in c.warmups]
    assert counts[0] == 30_000 and counts[1] > counts[2] >= 30_000, counts
    assert c.workload is not None and c.workload.count == counts[2]
    assert all(
        harness.MIN_WINDOW_S <= r.window_seconds <= 1.5 * harness.TARGET_WINDOW_S for r in c.runs
    )


def test_sizing_is_capped_in_memory():
    wl = Workload(1000, 64)
    case = _case([Contender("x", honest)], n=1000)
    big = harness.sized_workload(case, wl, 1e-9)
    assert big.count * big.size <= harness.SIZED_BYTES_CAP
    assert harness.sized_workload(case, wl, 10.0) is wl  # never shrinks
    assert harness.sized_workload(case, wl, 0.01).count == 50_000  # 1000 * 0.5 / 0.01


def test_p99_9_needs_a_thousand_samples():
    h = LatencyHistogram()
    h.record(range(1, 1000))
    assert math.isnan(h.summary()["p99_9"]) and h.summary()["samples"] == 999
    h.record([5000])
    assert h.summary()["p99_9"] > 0
    assert math.isnan(harness.exact_percentiles(list(range(1, 500)))["p99_9"])


def test_profile_scaling_and_overrides():
    assert Profile().count(10, 100) == 10 and Profile(full=True).count(10, 100) == 100
    assert Profile(messages=7).count(10, 100) == 7
    assert (
        Profile().reps() == 2
        and Profile(full=True).reps() == 5
        and Profile(min_window=0, repeat=3).reps() == 3
    )
    case = _case([Contender("x", honest)])
    case.repeat = 4
    assert len(run_case(case, "t", Profile(min_window=0)).contenders[0].runs) == 4
    assert (
        len(run_case(case, "t", Profile(min_window=0, repeat=1)).contenders[0].runs) == 1
    )  # --repeat wins


# ---------------------------------------------------------------------------
# workload and digest
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 3, 8, 13, 64, 4096, 65536])
def test_workload_payloads_are_deterministic_and_sequenced(size):
    wl = Workload(300, size, seed=5)
    msgs = wl.payloads()
    assert len(msgs) == 300 and all(len(m) == size for m in msgs)
    assert msgs == Workload(300, size, seed=5).payloads()
    assert np.array_equal(wl.array(), np.frombuffer(b"".join(msgs), np.uint8).reshape(300, size))
    if size >= 8:
        assert [int.from_bytes(m[:8], "little") for m in msgs] == list(range(300))
    assert digest(msgs) == wl.expected and wl.expected.count == 300
    if size > 8:  # sizes <= 8 are all sequence number, no filler
        assert Workload(300, size, seed=6).expected.checksum != wl.expected.checksum


def test_digest_is_order_independent_and_additive():
    msgs = Workload(1000, 64).payloads()
    d = digest(msgs)
    shuffled = list(msgs)
    np.random.default_rng(1).shuffle(shuffled)
    ds = digest(shuffled)
    assert (ds.count, ds.checksum) == (d.count, d.checksum)
    assert d.in_order is True and ds.in_order is False
    parts = Digest.combine([digest(msgs[0::3]), digest(msgs[1::3]), digest(msgs[2::3])])
    assert (parts.count, parts.checksum) == (d.count, d.checksum) and parts.in_order is None
    # competing consumers each see a rising subsequence: in order
    assert digest(msgs[1::2]).in_order is True
    # memoryviews, bytearrays and numpy rows digest like bytes
    assert digest([memoryview(m) for m in msgs]) == d
    assert digest(Workload(1000, 64).array()) == d


def test_digest_catches_every_single_loss_duplication_or_swap():
    msgs = Workload(200, 16).payloads()
    exp = digest(msgs).checksum
    seen = {exp}
    for i in range(0, 200, 7):
        for j in range(3, 200, 11):
            if i == j:
                continue
            swapped = msgs[:i] + [msgs[j]] + msgs[i + 1 :]  # i lost, j twice
            c = digest(swapped).checksum
            assert c != exp
            seen.add(c)
    assert len(seen) > 100


def test_mixed_size_digest_combines_groups():
    a, b = Workload(50, 8).payloads(), Workload(50, 24).payloads()
    d = digest(a + b)
    assert d.count == 100
    assert d.checksum == (digest(a).checksum + digest(b).checksum) % (1 << 64)


# ---------------------------------------------------------------------------
# latency histogram
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["default", "numpy"])
def test_latency_histogram_percentiles(backend):
    rng = np.random.default_rng(3)
    samples = np.concatenate(
        [rng.integers(2_000, 6_000, 9_900), rng.integers(50_000, 2_000_000, 100)]
    )
    h = LatencyHistogram()
    if backend == "numpy":
        h._hdr = None
        h._counts = {}
    h.record(samples[:5000])
    h.record(samples[5000:])
    s = h.summary()
    assert s["samples"] == 10_000 and s["max"] == samples.max() and s["min"] == samples.min()
    for key, p in (("p50", 50), ("p90", 90), ("p99", 99), ("p99_9", 99.9)):
        # within the histogram's 0.1 % resolution of the exact value, give or
        # take one rank (HDR and numpy round the rank differently)
        srt = np.sort(samples)
        rank = math.ceil(p / 100 * len(srt))
        lo, hi = srt[rank - 2], srt[min(rank, len(srt) - 1)]
        assert lo * 0.998 <= s[key] <= hi * 1.002, (key, s[key], lo, hi)
    assert s["p50"] <= s["p90"] <= s["p99"] <= s["p99_9"] <= s["max"]


def test_latency_histogram_empty_is_nan():
    s = LatencyHistogram().summary()
    assert math.isnan(s["p50"]) and s["samples"] == 0


# ---------------------------------------------------------------------------
# reports: JSON schema, Markdown, terminal, plots
# ---------------------------------------------------------------------------

_INFO = {
    "cpu_model": "Test CPU",
    "cpu_count": 2,
    "usable_cpus": 2,
    "machine": "x86_64",
    "system": "Linux",
    "kernel": "6.0",
    "platform": "Linux-6.0",
    "python": "3.11.0",
    "python_implementation": "CPython",
    "engine_version": "0.1.0",
    "packages": {"numpy": "2.0"},
    "loadavg": [0.1, 0.1, 0.1],
}


def _fake_section():
    def lat(wl):
        return _deliver(wl, lat=True)

    def cases(profile):
        return [
            Case(
                "thr",
                "throughput",
                THROUGHPUT,
                Workload(profile.count(400, 800), 64),
                [
                    Contender("ours", honest, ours=True),
                    Contender("peer", honest),
                    Contender("ghost", honest, requires=("no_such_mod_qe",)),
                ],
                targets=[Target("ratio", 1e-6, "peer"), Target("min_msg_per_s", 1e18)],
            ),
            Case(
                "lat",
                "latency",
                LATENCY,
                Workload(200, 64),
                [Contender("ours", lat, ours=True), Contender("peer", lat)],
                unit="us",
            ),
            Case(
                "bad",
                "broken",
                THROUGHPUT,
                Workload(100, 8),
                [Contender("ours", honest, ours=True), Contender("lossy", loses_one)],
            ),
            Case(
                "sweep 64",
                "size sweep",
                THROUGHPUT,
                Workload(100, 64),
                [Contender("ours", honest, ours=True), Contender("peer", honest)],
                params={"sweep": "size", "x": 64, "group": "g"},
            ),
            Case(
                "sweep 512",
                "size sweep",
                THROUGHPUT,
                Workload(100, 512),
                [Contender("ours", honest, ours=True), Contender("peer", honest)],
                params={"sweep": "size", "x": 512, "group": "g"},
            ),
            Case(
                "consumers 2",
                "consumer sweep",
                THROUGHPUT,
                Workload(100, 64),
                [Contender("ours", honest, ours=True), Contender("peer", honest)],
                params={"sweep": "consumers", "x": 2, "group": "g"},
            ),
        ]

    return types.SimpleNamespace(SECTION="fake", cases=cases)


@pytest.fixture
def suite():
    return run_suite(Profile(min_window=0, repeat=2), sections=[("fake", _fake_section())])


_SPREAD = {"median", "min", "max", "q1", "q3"}
_NUM = (int, float)


def test_json_schema_is_stable(suite):
    data = json.loads(
        json.dumps(report.to_json(suite, "queue-engine bench", _INFO), allow_nan=False)
    )
    assert data["schema_version"] == 1
    assert set(data) == {
        "schema_version",
        "tool",
        "command",
        "profile",
        "started",
        "seconds",
        "ok",
        "latency_backend",
        "machine",
        "skipped",
        "errors",
        "min_window_s",
        "pinning",
        "notes",
        "check",
        "cases",
    }
    assert data["ok"] is False  # the lossy contender
    assert set(data["profile"]) == {"name", "full", "messages", "repeat"}
    assert data["profile"]["repeat"] == 2 and data["profile"]["name"] == "quick"
    assert data["machine"] == _INFO
    assert data["skipped"] == ['skipped: ghost (pip install "queue-engine[bench]")']
    assert isinstance(data["started"], str) and data["started"].endswith("Z")
    assert data["latency_backend"] in ("hdrhistogram", "numpy-log-linear")
    assert len(data["cases"]) == 6
    for c in data["cases"]:
        assert set(c) == {
            "section",
            "name",
            "description",
            "kind",
            "unit",
            "ordered",
            "params",
            "workload",
            "verified",
            "failed",
            "best_ours",
            "best_peer",
            "ratio",
            "ratio_spread",
            "buffer_bytes",
            "targets",
            "contenders",
        }
        for t in c["targets"]:
            assert set(t) == {"target", "kind", "required", "peer", "measured", "met"}
            assert t["met"] in (True, False, None) and isinstance(t["target"], str)
        assert c["kind"] in ("throughput", "latency") and isinstance(c["verified"], bool)
        assert set(c["workload"]) == {"count", "size", "seed", "bytes", "checksum"}
        assert all(isinstance(v, int) for v in c["workload"].values())
        assert c["ratio"] is None or isinstance(c["ratio"], _NUM)
        for k in c["contenders"]:
            assert set(k) == {
                "name",
                "ours",
                "status",
                "reason",
                "msg_per_s",
                "mb_per_s",
                "latency_ns",
                "rank",
                "workload_count",
                "valid_runs",
                "window",
                "runs",
                "warmups",
            }
            assert k["status"] in ("ok", "FAILED", "skipped")
            assert set(k["msg_per_s"]) == _SPREAD and set(k["mb_per_s"]) == _SPREAD
            for v in list(k["msg_per_s"].values()) + list(k["mb_per_s"].values()):
                assert v is None or isinstance(v, _NUM)
            if k["latency_ns"] is not None:
                assert set(k["latency_ns"]) == {
                    "p50",
                    "p90",
                    "p99",
                    "p99_9",
                    "max",
                    "min",
                    "samples",
                }
            for r in k["runs"]:
                assert set(r) == {
                    "rep",
                    "seconds",
                    "count",
                    "checksum",
                    "in_order",
                    "ok",
                    "error",
                    "latency_ns",
                    "msg_per_s",
                    "mb_per_s",
                    "window_seconds",
                    "window_count",
                    "valid",
                    "reused",
                }
                if c["kind"] == "latency" and r["ok"]:
                    assert set(r["latency_ns"]) == {"p50", "p90", "p99", "p99_9", "max"}
                else:
                    assert r["latency_ns"] is None
                assert (
                    isinstance(r["count"], int)
                    and isinstance(r["checksum"], int)
                    and 0 <= r["checksum"] < 1 << 64
                )
    by = {c["name"]: c for c in data["cases"]}
    assert [t["met"] for t in by["thr"]["targets"]] == [True, False]
    assert by["thr"]["verified"] and by["thr"]["best_peer"] == "peer" and by["thr"]["ratio"] > 0
    assert [k["status"] for k in by["thr"]["contenders"]] == ["ok", "ok", "skipped"]
    assert by["bad"]["failed"] and by["bad"]["contenders"][1]["status"] == "FAILED"
    assert by["bad"]["contenders"][1]["runs"][0]["msg_per_s"] is None
    assert by["lat"]["contenders"][0]["latency_ns"]["samples"] == 400
    assert len(by["thr"]["contenders"][0]["runs"]) == 2


def test_markdown_renders(suite):
    md = report.render_markdown(suite, "queue-engine bench --markdown", _INFO)
    assert "`queue-engine bench --markdown`" in md and "Test CPU" in md
    lines = md.splitlines()
    thr_head = [i for i, ln in enumerate(lines) if ln.startswith("| Case |")]
    lat_head = [i for i, ln in enumerate(lines) if ln.startswith("| Latency case |")]
    assert len(thr_head) == 1 and len(lat_head) == 1
    ncols = lines[thr_head[0]].count("|")
    for ln in lines[thr_head[0] : lat_head[0]]:
        if ln.startswith("|"):
            assert ln.count("|") - ln.count("\\|") == ncols, ln
    assert "| **ours** |" in md  # ours in bold
    assert "fake: bad **FAILED**" in md and "| lossy | 100 x 8 B | | FAILED |" in md
    assert "ghost" in md and "Not installed here" in md
    assert "ghost |" not in md  # a skipped contender gets no row


def test_markdown_says_when_ours_loses():
    def slow(wl):
        r = honest(wl)
        r.seconds *= 1000
        return r

    res = run_suite(
        Profile(min_window=0, repeat=1),
        sections=[
            (
                "s",
                types.SimpleNamespace(
                    cases=lambda p: [
                        _case([Contender("ours", slow, ours=True), Contender("peer", honest)])
                    ]
                ),
            )
        ],
    )
    assert res.cases[0].ratio < 1
    assert "(loses)" in report.render_markdown(res, info=_INFO)
    assert "LOSES" in report.render_terminal(res, color=False, info=_INFO)


def test_terminal_table(suite):
    text = report.render_terminal(suite, color=False, info=_INFO)
    assert "== fake ==" in text and "* ours" in text and "p99.9 us" in text
    assert "FAILED lossy" in text and "1 FAILED" in text and "skipped: ghost" in text


def test_plots_are_written(suite, tmp_path):
    pytest.importorskip("matplotlib")
    files = report.write_plots(suite, str(tmp_path / "plots"))
    names = sorted(p.rsplit("/", 1)[1] for p in files)
    assert names == [
        "latency_fake_lat.png",
        "ratios.png",
        "scaling_consumers_g.png",
        "throughput_by_size_g.png",
    ]
    for f in files:
        with open(f, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_threads_plot_draws_one_line_per_peer_across_thread_counts(tmp_path):
    pytest.importorskip("matplotlib")

    def cases(profile):
        return [
            Case(
                f"t{n}",
                "thread scaling",
                THROUGHPUT,
                Workload(100, 64),
                [Contender(f"ours x{n}", honest, ours=True), Contender("peer", honest)],
                params={"threads": n, "group": "t"},
            )
            for n in (1, 8)
        ]

    s = run_suite(
        Profile(min_window=0, repeat=2),
        sections=[("threads", types.SimpleNamespace(SECTION="threads", cases=cases))],
    )
    files = report.write_plots(s, str(tmp_path / "plots"))
    assert "scaling_threads_t.png" in [p.rsplit("/", 1)[1] for p in files]


# ---------------------------------------------------------------------------
# the CLI end to end (a fake section installed as a module)
# ---------------------------------------------------------------------------


@pytest.fixture
def fake_section_module(monkeypatch):
    mod = _fake_section()
    mod.__name__ = "engine.bench.fakesec"
    monkeypatch.setitem(sys.modules, "engine.bench.fakesec", mod)
    monkeypatch.setattr(harness, "SECTIONS", harness.SECTIONS + ("fakesec",))
    return mod


def test_cli_exits_nonzero_on_a_failed_case_and_writes_json(fake_section_module, tmp_path, capsys):
    from engine.cli import main

    out = tmp_path / "b.json"
    md = tmp_path / "b.md"
    rc = main(
        [
            "bench",
            "--only",
            "fakesec",
            "--quiet",
            "--repeat",
            "1",
            "--json",
            str(out),
            "--markdown",
            str(md),
        ]
    )
    assert rc == 1
    captured = capsys.readouterr()
    assert "FAILED lossy" in captured.out and "FAILED" in captured.err
    data = json.loads(out.read_text())
    assert data["ok"] is False and data["profile"]["repeat"] == 1
    assert "--only fakesec" in data["command"]
    assert md.read_text().startswith("Measured with `queue-engine bench --only fakesec")


def test_cli_ok_run_and_options(fake_section_module, monkeypatch, capsys):
    from engine.cli import main

    # drop the broken case: a clean run exits 0
    orig = fake_section_module.cases
    monkeypatch.setattr(
        fake_section_module, "cases", lambda p: [c for c in orig(p) if c.name != "bad"]
    )
    assert main(["bench", "--only", "fakesec", "--quiet", "--messages", "50", "--markdown"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Measured with") and "50 x 64 B" in out
    assert main(["bench", "--only", "fakesec", "--list"]) == 0
    assert "thr [throughput" in capsys.readouterr().out
    assert main(["bench", "--only", "nosuchsection", "--quiet"]) == 2
    # a listed section whose module has not landed is named, not run
    monkeypatch.setattr(harness, "SECTIONS", harness.SECTIONS + ("qe_not_landed",))
    assert main(["bench", "--only", "fakesec,qe_not_landed", "--quiet"]) == 2
    assert "not in this build yet: qe_not_landed" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--repeat", "0"])


def test_section_list_starts_with_ring_and_skips_absent_modules():
    assert harness.SECTIONS[0] == "ring"
    names = [n for n, _ in harness.load_sections()]
    assert names[0] == "ring"
    assert set(names) <= set(harness.SECTIONS)


# ---------------------------------------------------------------------------
# the real ring section, tiny
# ---------------------------------------------------------------------------


def test_real_ring_section_verifies_at_small_n():
    from engine.bench import ring

    profile = Profile(messages=3000, repeat=1)
    cases = ring.cases(profile)
    assert [c.name for c in cases][:2] == ["threads 1->1", "processes 1->1 put/get"]
    skipped = []
    for case in cases:
        res = run_case(case, "ring", profile, skipped_lines=skipped)
        ran = [c for c in res.contenders if c.status != SKIPPED]
        assert ran, case.name
        for c in ran:
            assert c.status == OK, f"{case.name} / {c.name}: {c.reason}"
            assert [r.count for r in c.runs] == [case.workload.count]
        if case.kind == LATENCY:
            assert all(c.latency()["samples"] == case.workload.count for c in ran)
    # stdlib peers never skip
    assert not any("multiprocessing" in s or "queue.Queue" in s for s in skipped)


def test_full_profile_has_the_sweeps():
    from engine.bench import ring

    cases = ring.cases(Profile(full=True))
    main = {c.name: c for c in cases}
    assert main["processes 1->1 put/get"].workload.count >= 1_000_000
    sizes = sorted(c.params["x"] for c in cases if c.params.get("sweep") == "size")
    assert sizes[0] == 1 and 8 in sizes and sizes[-1] == 65536
    assert sorted(c.params["x"] for c in cases if c.params.get("sweep") == "consumers") == [
        1,
        2,
        3,
        4,
    ]


def test_targets_met_not_met_and_not_measured():
    def fixed(seconds, lat_ns=None):
        def fn(wl):
            r = honest(wl)
            r.seconds = seconds
            if lat_ns is not None:
                r.latencies_ns = [lat_ns] * wl.count
            return r

        return fn

    case = _case(
        [Contender("ours", fixed(1.0), ours=True), Contender("peer", fixed(30.0))],
        n=1000,
    )
    case.targets = [
        Target("ratio", 25, "peer"),
        Target("ratio", 40, "peer"),
        Target("ratio", 2, "absent peer"),
        Target("min_msg_per_s", 999),
        Target("min_mb_per_s", 0.064),
        Target("min_mb_per_s", 0.065),
    ]
    got = run_case(case, "t", Profile(min_window=0, repeat=1)).target_results()
    assert [t["met"] for t in got] == [True, False, None, True, True, False]
    assert got[0]["measured"] == pytest.approx(30.0)
    assert got[0]["target"] == ">= 25x peer"
    lat = _case(
        [Contender("ours", fixed(1.0, 4_000), ours=True), Contender("peer", fixed(1.0, 50_000))],
        kind=LATENCY,
    )
    lat.targets = [
        Target("max_p50_ns", 5_000),
        Target("max_p50_ns", 3_000),
        Target("ratio", 10, "peer"),
    ]
    got = run_case(lat, "t", Profile(min_window=0, repeat=1)).target_results()
    assert [t["met"] for t in got] == [True, False, True]
    assert got[2]["measured"] == pytest.approx(12.5, rel=0.01)
    text = report.render_terminal(
        harness.SuiteResult(Profile(), [run_case(lat, "t", Profile(min_window=0, repeat=1))]),
        color=False,
        info=_INFO,
    )
    assert "target p50 <= 5 us: 4 us met" in text and "NOT MET" in text
    md = report.render_markdown(
        harness.SuiteResult(Profile(), [run_case(lat, "t", Profile(min_window=0, repeat=1))]),
        info=_INFO,
    )
    assert "| p50 <= 3 us | t: c | 4 us | **not met** |" in md


def test_row_sink_counts_duplicate_rows():
    from engine.bench.peers import RowSink

    wl = Workload(100, 64)
    arr = wl.array()
    sink = RowSink(wl)
    sink.add(arr[:60])
    sink.add(arr[60:60])  # an empty batch is fine
    sink.add(arr[60:])
    t1, count, checksum, in_order = sink.result(5)
    assert (t1, count, checksum, in_order) == (5, 100, wl.expected.checksum, True)
    sink.add(arr[:10])  # ten rows delivered twice
    _, count, _, _ = sink.result(6)
    assert count == 110
    lossy = RowSink(wl)
    lossy.add(arr[1:])
    _, count, checksum, _ = lossy.result(7)
    assert count == 99 and checksum != wl.expected.checksum


# ---------------------------------------------------------------------------
# --check: quick ratios against the --full volume; --json - on stdout
# ---------------------------------------------------------------------------


def _check_section():
    def cases(profile):
        return [
            # holds: the same rates at every volume
            Case(
                "steady",
                "ratio 2 at every volume",
                THROUGHPUT,
                Workload(profile.count(300, 600), 64),
                [Contender("ours", paced(20_000), ours=True), Contender("peer", paced(10_000))],
                # a case's own repetitions: the check reruns it with the same
                repeat=profile.reps(quick=3, full=4),
            ),
            # a quick ratio that does not hold at the full volume (x2 apart)
            Case(
                "drifts",
                "ratio 4 quick, 2 full",
                THROUGHPUT,
                Workload(profile.count(300, 600), 64),
                [
                    Contender("ours", paced(20_000 if profile.full else 40_000), ours=True),
                    Contender("peer", paced(10_000)),
                ],
            ),
        ]

    mod = types.SimpleNamespace(SECTION="chk", cases=cases)
    mod.__name__ = "engine.bench.chk"
    return mod


def test_check_reports_quick_ratios_that_do_not_hold(monkeypatch, capsys):
    from engine.cli import main

    monkeypatch.setitem(sys.modules, "engine.bench.chk", _check_section())
    monkeypatch.setattr(harness, "SECTIONS", harness.SECTIONS + ("chk",))
    monkeypatch.setattr(harness, "CHECK_SECTIONS", ("chk",))
    rc = main(["bench", "--only", "chk", "--check", "--quiet", "--json", "-"])
    captured = capsys.readouterr()
    assert rc == 3 and "CHECK" in captured.err
    data = json.loads(captured.out)  # stdout holds the JSON alone; the table went to stderr
    assert "check chk: drifts: quick 4x, full 2x (x2.00) DIFFERS" in captured.err
    rows = {r["case"]: r for r in data["check"]}
    assert rows["steady"]["ok"] is True and rows["steady"]["factor"] == pytest.approx(1, abs=0.02)
    assert rows["drifts"]["ok"] is False
    assert rows["drifts"]["quick_ratio"] == pytest.approx(4, rel=0.02)
    assert rows["drifts"]["full_ratio"] == pytest.approx(2, rel=0.02)
    # quick and full-volume runs differ in volume only, not in repetitions
    reps = [(c["name"], len(c["contenders"][0]["runs"])) for c in data["cases"]]
    assert reps == [("steady", 3), ("drifts", 2)]
    assert [(r["case"], len(r["full_contenders"][0]["runs"])) for r in data["check"]] == [
        ("steady", 3),
        ("drifts", 2),
    ]
    # every run of the check is a steady-state window too
    for c in data["cases"]:
        for k in c["contenders"]:
            assert all(r["valid"] and r["window_seconds"] >= 0.25 for r in k["runs"])
    assert "--check" in data["command"] and data["pinning"].startswith("CPU pinning")


def test_saga_section_ranks_a_sqlite_saga_table_not_plain_calls():
    from engine.bench import saga

    profile = Profile(messages=24, repeat=1, min_window=0)
    for case in saga.cases(profile):
        res = run_case(case, "saga", profile)
        assert res.verified, case.name
        names = [c.name for c in res.contenders]
        assert saga.FLOOR in names  # the floor is shown...
        assert res.best_peer is not None and res.best_peer.name.startswith("sqlite3 saga table")
        floor = next(c for c in res.contenders if c.name == saga.FLOOR)
        assert floor.status == OK and not floor.rank  # ...measured, never the best peer
        sync = "FULL" if "always" in case.name else "OFF"
        assert f"synchronous={sync}" in res.best_peer.name


def test_quick_profile_runs_the_named_cases_of_each_section():
    for name, mod in harness.load_sections():
        quick = getattr(mod, "QUICK", None)
        full = [c.name for c in mod.cases(Profile(full=True))]
        if quick is not None:
            assert set(quick) <= set(full), name  # every QUICK name is a real case
        picked = [c.name for c in mod.cases(Profile()) if harness.in_profile(mod, c, Profile())]
        assert picked == [n for n in full if quick is None or n in quick]
        assert all(harness.in_profile(mod, c, Profile(full=True)) for c in mod.cases(Profile()))


# ---------------------------------------------------------------------------
# the machine: what a wake-up costs, whether the host takes free memory back
# ---------------------------------------------------------------------------


def test_wake_round_trip_counts_two_wakeups_per_trip():
    from engine.bench.machine import wake_round_trip

    per_trip, cpu, switches = wake_round_trip(500)
    assert 0 < per_trip < 0.01
    assert cpu >= 0
    # each side sleeps once per trip on the semaphore the other releases
    # (and may wait for the GIL once more)
    assert 0.5 <= switches <= 6.0


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no CPU affinity on this OS")
def test_wake_round_trip_pins_both_threads_and_gives_the_cpus_back():
    import threading

    from engine.bench.machine import wake_round_trip

    usable = sorted(os.sched_getaffinity(0))
    seen = []
    real = os.sched_setaffinity

    def spy(pid, cpus):
        seen.append((threading.get_ident(), frozenset(cpus)))
        real(pid, cpus)

    cpus = (usable[0], usable[-1])
    os.sched_setaffinity = spy
    try:
        per_trip, _, _ = wake_round_trip(200, cpus)
    finally:
        os.sched_setaffinity = real
    assert per_trip > 0
    main = threading.get_ident()
    # the caller pinned to the first CPU, the other thread to the second,
    # then the caller's own CPU set restored
    assert seen[0] == (main, frozenset({cpus[0]}))
    assert any(t != main and c == frozenset({cpus[1]}) for t, c in seen)
    assert seen[-1] == (main, frozenset(usable))
    assert sorted(os.sched_getaffinity(0)) == usable


def test_machine_info_and_line_carry_the_wake_cost_and_page_reporting():
    from engine.bench.machine import machine_info, machine_line

    info = machine_info()
    wake = info["thread_wake_us"]
    if not hasattr(os, "sched_getaffinity"):
        # no CPU placement to pin to: nothing measured, nothing claimed
        assert wake == {"cross_cpu": None, "same_cpu": None}
        assert "wake-up" not in machine_line(info)
        return
    assert wake["same_cpu"] is not None and wake["same_cpu"] > 0
    assert info["free_page_reporting"] in ("on", "off", "no virtio balloon")
    line = machine_line(info)
    if wake["cross_cpu"] is not None:
        assert wake["cross_cpu"] > 0
        assert (
            f"thread wake-up {wake['cross_cpu']:.1f} µs across CPUs ({wake['same_cpu']:.1f} µs on one)"
            in line
        )
    else:
        assert f"thread wake-up {wake['same_cpu']:.1f} µs" in line
    assert ("free page reporting" in line) == (info["free_page_reporting"] == "on")
    # a report made elsewhere (no probe figures) still renders
    assert "wake-up" not in machine_line(_INFO)
