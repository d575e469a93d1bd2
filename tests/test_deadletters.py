"""Dead letters: nack, max_deliveries, the delivery journal, the dead-letter
log and ``queue-engine dlq`` (engine.deadletters, engine/scheduling/durable.py).
"""

from __future__ import annotations

import errno
import json
import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from engine import EngineError, LogLocked, Timeout
from engine._log import Log, LogReader
from engine.deadletters import (
    DLQ_DIR,
    REPLAY_KEY,
    DeadLetterWriter,
    encode_letter,
    list_letters,
    purge,
    replay,
    show_letter,
)
from engine.errors import CorruptLog
from engine.scheduling import KeyedQueue, PriorityQueue

FORK = mp.get_context("fork")
SEG = 1 << 20  # each log preallocates one segment: keep them small


def _pq(path, max_deliveries=None, **kw):
    kw.setdefault("durability", "none")
    return PriorityQueue(levels=2, durable=True, path=str(path), segment_bytes=SEG,
                         max_deliveries=max_deliveries, **kw)


def _kq(path, max_deliveries=None, **kw):
    kw.setdefault("durability", "none")
    return KeyedQueue(partitions=2, durable=True, path=str(path), segment_bytes=SEG,
                      max_deliveries=max_deliveries, **kw)


def _drain(q, timeout=0.3, ack=True):
    out = []
    while True:
        try:
            m = q.get(timeout=timeout)
        except Timeout:
            return out
        out.append(m)
        if ack:
            q.ack()


def _dead(path):
    return {d.payload: d for d in list_letters(path, include_done=True)}


# ---------------------------------------------------------------------------
# nack
# ---------------------------------------------------------------------------


def test_nack_redelivers_at_once_first_in_its_level(tmp_path):
    with _pq(tmp_path) as q:
        for m in (b"a", b"b"):
            q.put(m)
        assert q.get(timeout=1) == b"a"
        q.nack(reason="try again")
        assert q.get(timeout=1) == b"a"
        q.ack()
        assert _drain(q) == [b"b"]
    with _pq(tmp_path) as q:
        assert _drain(q) == []  # everything acked: nothing comes back


def test_nack_delay_holds_it_back_never_early_and_survives_restart(tmp_path):
    with _pq(tmp_path) as q:
        q.put(b"slow")
        q.put(b"x")
        assert q.get(timeout=1) == b"slow"
        t0 = time.monotonic()
        q.nack(delay=0.6, reason="later")
        assert q.get(timeout=1) == b"x"
        q.ack()
        assert q.try_get() is None  # not due yet
    # after a restart the nack's due time still holds (it is on disk)
    with _pq(tmp_path) as q:
        assert q.try_get() is None
        assert q.get(timeout=2) == b"slow"
        assert time.monotonic() - t0 >= 0.6
        q.ack()
    with _pq(tmp_path) as q:
        assert _drain(q, timeout=0.2) == []


def test_acked_above_a_nacked_one_are_not_redelivered_after_restart(tmp_path):
    with _pq(tmp_path) as q:
        for m in (b"a", b"b", b"c"):
            q.put(m)
        assert q.get(timeout=1) == b"a"
        q.nack(delay=0.4)
        assert q.get(timeout=1) == b"b"
        q.ack()
        assert q.get(timeout=1) == b"c"
        q.ack()
    with _pq(tmp_path) as q:
        assert _drain(q, timeout=1) == [b"a"]
    with _pq(tmp_path) as q:
        assert _drain(q, timeout=0.2) == []


def test_nack_of_a_delayed_message_redelivers_it(tmp_path):
    with _pq(tmp_path, max_deliveries=2) as q:
        q.put(b"d", delay=0.05)
        assert q.get(timeout=2) == b"d"
        q.nack()
        assert q.get(timeout=2) == b"d"
        q.nack(reason="twice")
        assert q.try_get() is None
    letters = _dead(tmp_path)
    assert letters[b"d"].source == "delay" and letters[b"d"].deliveries == 2
    assert letters[b"d"].reason == "twice"


def test_nack_bad_arguments(tmp_path):
    with _pq(tmp_path) as q:
        q.put(b"a")
        q.get(timeout=1)
        with pytest.raises(ValueError, match="delay"):
            q.nack(delay=-1)
        with pytest.raises(ValueError, match="delay"):
            q.nack(delay=float("nan"))
        with pytest.raises(TypeError, match="reason"):
            q.nack(reason=b"bytes")
    for bad in (0, -1, 1.5, True, "3"):
        with pytest.raises((ValueError, TypeError), match="max_deliveries"):
            _pq(tmp_path / "bad", max_deliveries=bad)
        with pytest.raises((ValueError, TypeError), match="max_deliveries"):
            _kq(tmp_path / "badk", max_deliveries=bad)


def test_messages_handed_out_are_not_kept_in_memory_until_the_ack(tmp_path):
    """nack re-reads what it puts back: a consumer that acks rarely does not
    hold every payload it was handed."""
    import tracemalloc

    size, n = 64 << 10, 400
    with PriorityQueue(levels=1, durable=True, path=str(tmp_path), segment_bytes=64 << 20,
                       durability="none", max_deliveries=3) as q:
        for i in range(n):
            q.put(bytes([i % 256]) * size)
        tracemalloc.start()
        try:
            for i in range(n):
                assert q.get(timeout=1)[0] == i % 256
            held, _peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert held < n * size // 4, held
        q.nack()  # every one of them comes back, read again from the log
        assert [m[0] for m in q.get_many(n, 0)] == [i % 256 for i in range(n)]
        q.ack()


def test_ring_backed_queues_refuse_nack():
    with PriorityQueue(levels=2) as q:
        q.put(b"a")
        q.get()
        with pytest.raises(EngineError, match="durable"):
            q.nack()
    with KeyedQueue(partitions=2) as kq:
        kq.put(b"a", key="k")
        c = kq.consumer()
        assert c.get(timeout=1) == b"a"
        with pytest.raises(EngineError, match="durable"):
            c.nack()
        with pytest.raises(EngineError, match="durable"):
            kq.nack()


# ---------------------------------------------------------------------------
# max_deliveries and the dead-letter log
# ---------------------------------------------------------------------------


def test_nacked_max_deliveries_times_goes_to_the_dlq_with_its_history(tmp_path):
    before = time.time_ns()
    with _pq(tmp_path, max_deliveries=3) as q:
        q.put(b"poison")
        q.put(b"fine", priority=1)
        for i in range(3):
            assert q.get(timeout=1) == b"poison"
            q.nack(reason=f"failure {i}")
        assert q.get(timeout=1) == b"fine"
        q.ack()
        assert q.try_get() is None
        assert q.stats()["dead_lettered"] == 1
    (d,) = list_letters(tmp_path)
    assert d.payload == b"poison" and d.deliveries == 3 and d.reason == "failure 2"
    assert d.kind == "priority" and d.source == "L0" and d.target == 0 and d.id.startswith("L0:0@")
    assert len(d.delivered_at) == 3 and before <= d.delivered_at[0] <= d.delivered_at[1] <= d.delivered_at[2]
    assert d.enqueued_at <= d.delivered_at[0] <= d.dead_at <= time.time_ns()
    with _pq(tmp_path, max_deliveries=3) as q:
        assert _drain(q, timeout=0.2) == []  # dead-lettered: never delivered again


def test_delivery_counts_survive_restarts_without_ack(tmp_path):
    """Closing (or dying) without ack uses a delivery: the third hand-out
    never happens, the message is dead-lettered on the way instead."""
    with _pq(tmp_path, max_deliveries=2) as q:
        q.put(b"p")
        q.put(b"q")
    for _ in range(2):
        with _pq(tmp_path, max_deliveries=2) as q:
            assert q.get(timeout=1) == b"p"  # never acked
    with _pq(tmp_path, max_deliveries=2) as q:
        assert _drain(q) == [b"q"]
    d = _dead(tmp_path)[b"p"]
    assert d.deliveries == 2 and d.reason is None
    assert list(_dead(tmp_path)) == [b"p"]


def test_dead_lettering_is_recorded_once_when_the_commit_is_lost(tmp_path):
    """A consumer that dies after the dead-letter append but before its
    commit dead-letters the message again on restart: the id is already in
    the log, so it is not appended twice and still not delivered."""
    with _pq(tmp_path, max_deliveries=1) as q:
        q.put(b"p")
        assert q.get(timeout=1) == b"p"
    for _ in range(3):
        q = _pq(tmp_path, max_deliveries=1)
        assert q.try_get() is None  # p dead-lettered on the way; no ack follows
        q.close()
    assert [d.payload for d in list_letters(tmp_path)] == [b"p"]
    with _pq(tmp_path, max_deliveries=1) as q:
        q.put(b"q")
        assert q.get(timeout=1) == b"q"  # p settled by this ack, q delivered
        q.ack()
    with _pq(tmp_path, max_deliveries=1) as q:
        assert q.try_get() is None
    assert [d.payload for d in list_letters(tmp_path)] == [b"p"]


def test_an_old_queue_directory_opens_with_fresh_counts(tmp_path):
    with _pq(tmp_path) as q:  # no max_deliveries: no journal written
        q.put(b"a")
        assert q.get(timeout=1) == b"a"
    assert not os.path.exists(tmp_path / "deliveries")
    with _pq(tmp_path, max_deliveries=1) as q:
        assert q.get(timeout=1) == b"a"  # the earlier delivery was not counted
        q.ack()
    assert list_letters(tmp_path) == []


def test_a_torn_or_hostile_journal_never_invents_deliveries(tmp_path):
    with _pq(tmp_path, max_deliveries=3) as q:
        q.put(b"a")
        assert q.get(timeout=1) == b"a"
    jpath = tmp_path / "deliveries" / "L0.pq"
    good = jpath.read_bytes()
    jpath.write_bytes(good + good[-20:])  # a torn append
    with _pq(tmp_path, max_deliveries=3) as q:
        assert q.get(timeout=1) == b"a"  # second delivery
    with _pq(tmp_path, max_deliveries=3) as q:
        assert q.get(timeout=1) == b"a"  # third
    with _pq(tmp_path, max_deliveries=3) as q:
        assert q.try_get() is None  # the fourth hand-out dead-letters it
    assert _dead(tmp_path)[b"a"].deliveries == 3
    rng = random.Random(5)
    for n in (0, 7, 36, 200):
        jpath.write_bytes(bytes(rng.getrandbits(8) for _ in range(n)))
        with _pq(tmp_path / "x", max_deliveries=2) as q:
            q.put(b"z")
        os.makedirs(tmp_path / "x" / "deliveries", exist_ok=True)
        (tmp_path / "x" / "deliveries" / "L0.pq").write_bytes(bytes(rng.getrandbits(8) for _ in range(n)))
        with _pq(tmp_path / "x", max_deliveries=2) as q:
            assert q.get(timeout=1) == b"z"


def test_journal_records_of_an_earlier_message_at_the_same_offset_do_not_apply(tmp_path):
    """After a log is cut (repair, a backup's cut), new messages reuse its
    offsets: records naming another message (by timestamp) are ignored, so
    the new one is neither skipped as done nor short of deliveries."""
    from engine.scheduling._deliveries import Journal

    with _pq(tmp_path, max_deliveries=2) as q:
        q.put(b"new")
    with LogReader(str(tmp_path / "L0"), start=0) as r:
        log_id = r.log_id
        ts = r.read().timestamp
    j = Journal(str(tmp_path / "deliveries" / "L0.pq"), log_id, 0, False)
    j.delivering(0, ts - 1)
    j.delivering(0, ts - 1)
    j.mark_done([(0, ts - 1)])  # written for an earlier message at offset 0
    with _pq(tmp_path, max_deliveries=2) as q:
        assert q.get(timeout=1) == b"new"
    with _pq(tmp_path, max_deliveries=2) as q:
        assert q.get(timeout=1) == b"new"  # its own second delivery
    with _pq(tmp_path, max_deliveries=2) as q:
        assert q.try_get() is None
    assert _dead(tmp_path)[b"new"].deliveries == 2


class _Flaky:
    """The journal's writes (append and rewrite) failing with ENOSPC once
    armed with :meth:`fail_next`."""

    def __init__(self, mod):
        self.fail = 0
        for name in ("write_all", "atomic_write"):
            setattr(self, name, self._wrap(getattr(mod, name)))

    def _wrap(self, real):
        def call(*args):
            if self.fail:
                self.fail -= 1
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(*args)
        return call

    def fail_next(self):
        self.fail = 1


@pytest.mark.parametrize("kind", ["pq", "kq"])
def test_a_failed_journal_write_hands_nothing_out_and_loses_nothing(tmp_path, monkeypatch, kind):
    from engine.scheduling import _deliveries

    flaky = _Flaky(_deliveries)
    monkeypatch.setattr(_deliveries, "write_all", flaky.write_all)
    monkeypatch.setattr(_deliveries, "atomic_write", flaky.atomic_write)
    q = _pq(tmp_path, max_deliveries=5) if kind == "pq" else _kq(tmp_path, max_deliveries=5)
    c = q if kind == "pq" else q.consumer()
    for m in (b"a", b"b", b"c", b"d", b"e"):
        q.put(m, key="k") if kind == "kq" else q.put(m)
    got = [c.get(timeout=1)]  # creates the journal file
    c.ack()
    flaky.fail_next()
    with pytest.raises(OSError):
        c.get(timeout=1)
    got.append(c.get(timeout=1))
    c.ack()
    flaky.fail_next()
    with pytest.raises(OSError):
        c.get_many(10, 0)
    flaky.fail_next()
    with pytest.raises(OSError):
        c.get_many(10, 1)
    got += c.get_many(10, 0)
    c.ack()
    assert got == [b"a", b"b", b"c", b"d", b"e"]
    assert c.try_get() is None
    q.close()
    q = _pq(tmp_path, max_deliveries=5) if kind == "pq" else _kq(tmp_path, max_deliveries=5)
    assert _drain(q, timeout=0.2) == []
    q.close()


def test_a_failed_dead_letter_append_keeps_the_message(tmp_path, monkeypatch):
    real = DeadLetterWriter.add
    calls = {"fail": 1}

    def flaky(self, *a):
        if calls["fail"]:
            calls["fail"] -= 1
            raise OSError(errno.EIO, "Input/output error")
        return real(self, *a)

    monkeypatch.setattr(DeadLetterWriter, "add", flaky)
    with _pq(tmp_path, max_deliveries=1) as q:
        q.put(b"p")
        q.put(b"x")
        assert q.get(timeout=1) == b"p"
        with pytest.raises(OSError):
            q.nack(reason="bad")
        q.nack(reason="bad")  # still handed out: dead-lettered now
        calls["fail"] = 1
        q.put(b"y")
        assert q.get(timeout=1) == b"x"
    with _pq(tmp_path, max_deliveries=1) as q:
        calls["fail"] = 1
        with pytest.raises(OSError):
            q.get(timeout=1)  # x comes round again: its dead-lettering fails
        assert q.get(timeout=1) == b"y"
        q.ack()
        assert q.try_get() is None
    assert sorted(_dead(tmp_path)) == [b"p", b"x"]


def test_keyed_queue_dead_letters_and_keeps_other_keys_flowing(tmp_path):
    with _kq(tmp_path, max_deliveries=2) as kq:
        p_bad = kq.partition_of("bad")
        good = [k for k in ("g1", "g2", "g3", "g4", "g5", "g6") if kq.partition_of(k) != p_bad][:2]
        kq.put(b"bad", key="bad")
        for i in range(3):
            for k in good:
                kq.put(f"{k}-{i}".encode(), key=k)
        c = kq.consumer()
        got = []
        while True:
            try:
                m = c.get(timeout=0.3)
            except Timeout:
                break
            if m == b"bad":
                c.nack(delay=0.01, reason="cannot parse")
            else:
                got.append(m)
                c.ack()
        for k in good:
            assert [m for m in got if m.startswith(k.encode())] == [f"{k}-{i}".encode() for i in range(3)]
        assert kq.stats()["dead_lettered"] == 1
    (d,) = list_letters(tmp_path)
    assert (d.payload, d.kind, d.source, d.target, d.deliveries, d.reason) == (
        b"bad", "keyed", f"P{p_bad}", p_bad, 2, "cannot parse")


def test_keyed_nack_survives_a_hand_over_to_another_member(tmp_path):
    kq = _kq(tmp_path, max_deliveries=3)
    kq.put(b"m", key="k")
    c1 = kq.consumer()
    assert c1.get(timeout=1) == b"m"
    c1.nack(delay=0.3, reason="r1")
    c1.close()  # hands its partitions over
    c2 = kq.consumer()
    t0 = time.monotonic()
    assert c2.try_get() is None  # the nack's delay still holds
    assert c2.get(timeout=2) == b"m"
    assert time.monotonic() - t0 >= 0.2
    c2.nack(reason="r2")
    assert c2.get(timeout=1) == b"m"
    c2.nack(reason="r3")
    assert c2.try_get() is None
    kq.close()
    d = _dead(tmp_path)[b"m"]
    assert d.deliveries == 3 and d.reason == "r3"


def _nacking_member(path, report):
    kq = _kq(path, max_deliveries=2)
    c = kq.consumer()
    fd = os.open(report, os.O_WRONLY | os.O_APPEND)
    idle = time.monotonic() + 1.5
    while time.monotonic() < idle:
        try:
            m = c.get(timeout=0.1)
        except Timeout:
            continue
        idle = time.monotonic() + 1.5
        if m.startswith(b"bad"):
            c.nack(reason="bad")
        else:
            c.ack()
            os.write(fd, m + b"\n")
    kq.close()
    os._exit(0)


def test_members_in_several_processes_dead_letter_each_message_once(tmp_path):
    path = str(tmp_path / "q")
    with _kq(path) as kq:
        for i in range(40):
            kq.put(b"good-%d" % i, key=f"k{i % 8}")
            if i % 5 == 0:
                kq.put(b"bad-%d" % i, key=f"k{i % 8}")
    report = str(tmp_path / "report")
    open(report, "w").close()
    procs = [FORK.Process(target=_nacking_member, args=(path, report)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    with open(report, "rb") as f:
        acked = f.read().split()
    assert sorted(acked) == sorted(b"good-%d" % i for i in range(40))
    letters = list_letters(path)
    assert sorted(d.payload for d in letters) == sorted(b"bad-%d" % i for i in range(0, 40, 5))
    assert len({d.id for d in letters}) == len(letters)
    assert all(d.deliveries == 2 and d.reason == "bad" for d in letters)


def test_dead_letter_writer_appends_each_id_once(tmp_path):
    w = DeadLetterWriter(str(tmp_path), "none", SEG)
    meta = {"kind": "priority", "source": "L0", "target": 0, "deliveries": 1, "delivered_at": [1],
            "reason": None, "enqueued_at": 0}
    assert w.add("L0:1@x", meta, b"p")
    assert not w.add("L0:1@x", meta, b"p")
    w.close()
    w2 = DeadLetterWriter(str(tmp_path), "none", SEG)  # another process: reads the log
    assert not w2.add("L0:1@x", meta, b"p")
    assert w2.add("L0:2@x", meta, b"p2")
    w2.close()
    (tmp_path / "queue.json").write_text(json.dumps({"levels": 1}))
    assert [d.id for d in list_letters(tmp_path)] == ["L0:1@x", "L0:2@x"]


def test_hostile_dead_letter_records_raise_corruptlog(tmp_path):
    (tmp_path / "queue.json").write_text(json.dumps({"levels": 2}))
    with Log(str(tmp_path / DLQ_DIR), durability="none", segment_bytes=SEG) as lg:
        lg.append(b"garbage", key=b"k")
    with pytest.raises(CorruptLog):
        list_letters(tmp_path)
    bad_values = [b"EQDL\xff\xff\xff\xff", b"EQDL\x05\x00\x00\x00[1,2]", b"EQDL\x02\x00\x00\x00{}",
                  encode_letter({"kind": "priority", "source": "L0", "target": -1, "deliveries": 1}, b""),
                  encode_letter({"kind": "other", "source": "L0", "target": 0, "deliveries": 1}, b"")]
    for v in bad_values:
        d = tmp_path / f"q{len(v)}{v[-3:].hex()}"
        os.makedirs(d)
        (d / "queue.json").write_text(json.dumps({"levels": 2}))
        with Log(str(d / DLQ_DIR), durability="none", segment_bytes=SEG) as lg:
            lg.append(v, key=b"k")
        with pytest.raises(CorruptLog):
            list_letters(d)


# ---------------------------------------------------------------------------
# ls / show / purge / replay (library)
# ---------------------------------------------------------------------------


def _make_letters(path, n, kind="priority", targets=2):
    """A queue directory with ``n`` dead letters (payload b"dl-<i>")."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "queue.json"), "w") as f:
        json.dump({"levels" if kind == "priority" else "partitions": targets}, f)
    with Log(os.path.join(path, DLQ_DIR), durability="none", segment_bytes=SEG) as lg:
        for i in range(n):
            meta = {"kind": kind, "source": f"L{i % targets}", "target": i % targets, "deliveries": 3,
                    "delivered_at": [1, 2, 3], "reason": f"r{i}", "enqueued_at": 0, "dead_at": 5}
            lg.append(encode_letter(meta, f"dl-{i}".encode()), key=f"L{i % targets}:{i}@x".encode())


def _replayed(path, targets=2, prefix="L"):
    """Payloads in the queue's target logs that came from a replay."""
    out = []
    for t in range(targets):
        d = os.path.join(path, f"{prefix}{t}")
        if not os.path.exists(os.path.join(d, "meta")):
            continue
        with LogReader(d, start=0) as r:
            for rec in r.read_many(100000):
                if rec.key is not None and bytes(rec.key).startswith(REPLAY_KEY):
                    out.append(bytes(rec.value))
    return out


def test_replay_puts_pending_letters_back_once_and_the_queue_delivers_them(tmp_path):
    with _pq(tmp_path, max_deliveries=1) as q:
        for m in (b"a", b"b", b"c"):
            q.put(m, priority=1 if m == b"b" else 0)
        for _ in range(3):
            q.get(timeout=1)
            q.nack(reason="no")
        assert q.try_get() is None
    assert sorted(d.payload for d in list_letters(tmp_path)) == [b"a", b"b", b"c"]
    rep = replay(tmp_path, durability="none", limit=2)
    assert (rep.replayed, rep.recovered) == (2, 0)
    assert [d.payload for d in list_letters(tmp_path)] == [b"b"]  # level 1: dead-lettered last
    rep = replay(tmp_path, durability="none")
    assert (rep.replayed, rep.head) == (1, 3)
    assert replay(tmp_path, durability="none").replayed == 0  # nothing pending: a no-op
    assert list_letters(tmp_path) == []
    assert len(list_letters(tmp_path, include_done=True)) == 3
    with _pq(tmp_path, max_deliveries=1) as q:
        assert sorted(_drain(q)) == [b"a", b"b", b"c"]  # fresh counts: delivered again
        assert _drain(q) == []


def test_replay_into_a_keyed_queue_goes_to_the_same_partition(tmp_path):
    with _kq(tmp_path, max_deliveries=1) as kq:
        p = kq.partition_of("k")
        kq.put(b"m", key="k")
        c = kq.consumer()
        assert c.get(timeout=1) == b"m"
        c.nack()
    replay(tmp_path, durability="none")
    assert _replayed(str(tmp_path), prefix="P") == [b"m"]
    with LogReader(str(tmp_path / f"P{p}"), start=0) as r:
        assert [bytes(x.value) for x in r.read_many(10)] == [b"m", b"m"]


def test_replay_needs_the_producer_stopped(tmp_path):
    _make_letters(str(tmp_path), 2)
    with _pq(tmp_path) as q:
        q.put(b"x")  # takes the producer role
        with pytest.raises(LogLocked):
            replay(tmp_path, durability="none")
    assert replay(tmp_path, durability="none").replayed == 2


def test_purge_and_show(tmp_path):
    _make_letters(str(tmp_path), 5)
    assert show_letter(tmp_path, 3).payload == b"dl-3"
    assert show_letter(tmp_path, "L1:1@x").payload == b"dl-1"
    with pytest.raises(KeyError):
        show_letter(tmp_path, 99)
    assert purge(tmp_path, before=2) == 2
    assert [d.offset for d in list_letters(tmp_path)] == [2, 3, 4]
    assert purge(tmp_path, before=1) == 0  # the head never moves back
    assert purge(tmp_path) == 3
    assert list_letters(tmp_path) == []
    assert replay(tmp_path, durability="none").replayed == 0
    assert show_letter(tmp_path, 0).payload == b"dl-0"  # still shown by offset
    with pytest.raises(ValueError):
        purge(tmp_path, before=-1)


def test_a_head_past_the_end_of_a_cut_dlq_lists_nothing(tmp_path):
    _make_letters(str(tmp_path), 2)
    assert purge(tmp_path) == 2
    with open(tmp_path / "dlq.head") as f:
        head = json.load(f)
    head["head"] = 50  # as in a copy whose dead-letter log was cut before the head
    (tmp_path / "dlq.head").write_text(json.dumps(head))
    assert list_letters(tmp_path) == []
    assert replay(tmp_path, durability="none").replayed == 0
    assert len(list_letters(tmp_path, include_done=True)) == 2


def test_library_refuses_a_directory_that_is_no_queue(tmp_path):
    for fn in (list_letters, purge, replay):
        with pytest.raises(EngineError, match="queue.json"):
            fn(tmp_path)
    (tmp_path / "queue.json").write_text("[")
    with pytest.raises(EngineError):
        list_letters(tmp_path)
    (tmp_path / "queue.json").write_text(json.dumps({"levels": 1}))
    assert list_letters(tmp_path) == []  # a queue without dead letters
    (tmp_path / "dlq.head").write_text("{not json")
    _make_letters(str(tmp_path), 1, targets=1)
    with pytest.raises(EngineError, match="dlq.head"):
        list_letters(tmp_path)


def test_replay_resumes_after_a_crash_at_each_step_without_duplicates(tmp_path):
    """In-process: a SimulatedCrash at each crash point of replay, then a
    replay that starts again; every letter ends in the queue exactly once."""
    from engine import _crashpoints as cp

    n = 600  # three batches
    for spec in ("dlq.replay.appended#1", "dlq.replay.appended#300", "dlq.replay.flushed#2",
                 "dlq.replay.head#1", "dlq.replay.appended#600"):
        d = str(tmp_path / spec.replace("#", "_"))
        _make_letters(d, n)
        cp.arm(spec, action="raise")
        try:
            with pytest.raises(cp.SimulatedCrash):
                replay(d, durability="none")
        finally:
            cp.arm(None)
        with open(os.path.join(d, "dlq.head")) as f:
            head_before = json.load(f)["head"]
        rep = replay(d, durability="none")
        assert rep.head == n
        assert rep.replayed + rep.recovered == n - head_before
        assert sorted(_replayed(d)) == sorted(f"dl-{i}".encode() for i in range(n)), spec


# ---------------------------------------------------------------------------
# model: delivery counting against a dict
# ---------------------------------------------------------------------------

MAX_D = 3


class DeliveryModel(RuleBasedStateMachine):
    """A durable PriorityQueue with max_deliveries against a dict of counts:
    gets, acks, nacks and restarts (close without ack) in any order."""

    def __init__(self):
        super().__init__()
        import tempfile

        self.dir = tempfile.mkdtemp(prefix="dlq-model-")
        self.q = _pq(self.dir, max_deliveries=MAX_D)
        self.n = 0
        self.counts = {}  # payload -> deliveries seen
        self.acked = set()
        self.handed = []
        self.must_be_dead = set()
        self.dead_seen = {}  # what the dead-letter log held at the last check

    def _dead(self):
        return {d.payload: d for d in list_letters(self.dir, include_done=True)}

    @rule(k=st.integers(1, 3))
    def put(self, k):
        for _ in range(k):
            m = b"m%d" % self.n
            self.n += 1
            self.q.put(m)
            self.counts[m] = 0

    @rule()
    def get(self):
        m = self.q.try_get()
        if m is None:
            # whatever is left unacked and not handed out was exhausted
            left = {x for x in self.counts if x not in self.acked and x not in self.handed}
            assert all(self.counts[x] >= MAX_D for x in left), left
            self.must_be_dead |= left
            return
        assert m not in self.acked, m
        assert m not in self.handed, m
        assert self.counts[m] < MAX_D, (m, self.counts[m])
        assert m not in self.dead_seen, m
        self.counts[m] += 1
        self.handed.append(m)

    @rule()
    def ack(self):
        self.q.ack()
        self.acked.update(self.handed)
        self.handed = []

    @rule()
    def nack(self):
        self.q.nack(reason="model")
        for m in self.handed:
            if self.counts[m] >= MAX_D:
                self.must_be_dead.add(m)
        self.handed = []

    @rule()
    def restart(self):
        self.q.close()  # no ack: what was handed out comes back, its deliveries counted
        self.q = _pq(self.dir, max_deliveries=MAX_D)
        self.handed = []

    @invariant()
    def dead_letters_match_the_counts(self):
        dead = self.dead_seen = self._dead()
        assert self.must_be_dead <= set(dead)
        for m, d in dead.items():
            assert m not in self.acked
            assert d.deliveries == self.counts[m] == MAX_D, (m, d.deliveries, self.counts[m])
            assert len(d.delivered_at) == MAX_D

    def teardown(self):
        try:
            self.q.nack()
            while True:  # nack everything round after round: each ends dead
                got = self.q.get_many(1 << 20, 0)
                if not got:
                    break
                for m in got:
                    self.counts[m] += 1
                self.q.nack()
            dead = self._dead()
            for m in self.counts:
                assert (m in self.acked) != (m in dead), m  # exactly one fate
                if m in dead:
                    assert dead[m].deliveries == self.counts[m] == MAX_D
        finally:
            self.q.close()
            import shutil

            shutil.rmtree(self.dir, ignore_errors=True)


TestDeliveryModel = DeliveryModel.TestCase
TestDeliveryModel.settings = settings(max_examples=20, stateful_step_count=20, deadline=None,
                                      suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------
# real processes killed (crash)
# ---------------------------------------------------------------------------


def _consumer_child(kind, path, max_d, report):
    """Consume until the queue is empty: ack every message but the poison,
    on which it reports and waits to be killed."""
    q = _pq(path, max_deliveries=max_d) if kind == "pq" else _kq(path, max_deliveries=max_d)
    fd = os.open(report, os.O_WRONLY | os.O_APPEND)
    while True:
        try:
            m = q.get(timeout=0.5)
        except Timeout:
            os._exit(0)
        os.write(fd, b"got " + m + b"\n")
        if m == b"poison":
            os.write(fd, b"processing\n")
            time.sleep(60)  # killed here
        q.ack()
        os.write(fd, b"acked " + m + b"\n")


@pytest.mark.crash
@pytest.mark.parametrize("kind", ["pq", "kq"])
def test_sigkill_mid_processing_dead_letters_the_poison_after_exactly_max_deliveries(tmp_path, kind):
    max_d = 4
    path = str(tmp_path / "q")
    others = [b"m%03d" % i for i in range(60)]
    q = _pq(path) if kind == "pq" else _kq(path)
    for i, m in enumerate(others):
        if i == 20:
            q.put(b"poison", key="k7") if kind == "kq" else q.put(b"poison")
        q.put(m, key=f"k{i % 9}") if kind == "kq" else q.put(m)
    q.close()
    report = str(tmp_path / "report")
    open(report, "w").close()
    kills = 0
    deadline = time.monotonic() + 60
    while True:
        assert time.monotonic() < deadline, "consumer never finished"
        p = FORK.Process(target=_consumer_child, args=(kind, path, max_d, report))
        p.start()
        while p.is_alive():
            with open(report, "rb") as f:
                n = f.read().count(b"processing\n")
            if n > kills:  # this child is processing the poison
                break
            time.sleep(0.005)
        if p.is_alive():
            os.kill(p.pid, signal.SIGKILL)  # mid-processing of the poison
            kills += 1
            assert kills <= max_d, "the poison was handed out more than max_deliveries times"
        p.join(10)
        if p.exitcode == 0:
            break
    with open(report, "rb") as f:
        lines = f.read().splitlines()
    got = [ln[4:] for ln in lines if ln.startswith(b"got ")]
    acked = [ln[6:] for ln in lines if ln.startswith(b"acked ")]
    assert kills == max_d
    assert got.count(b"poison") == max_d  # exactly max_deliveries deliveries
    assert b"poison" not in acked
    assert sorted(acked) == sorted(others)  # every other message, once
    (d,) = list_letters(path)
    assert d.payload == b"poison" and d.deliveries == max_d and len(d.delivered_at) == max_d
    q = _pq(path, max_deliveries=max_d) if kind == "pq" else _kq(path, max_deliveries=max_d)
    try:
        assert _drain(q, timeout=0.3) == []  # dead-lettered: never delivered again
    finally:
        q.close()
    assert len(list_letters(path)) == 1


def _replay_cmd(path, env=None):
    return subprocess.Popen([sys.executable, "-m", "engine", "dlq", "replay", path, "--durability", "none",
                             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


@pytest.mark.crash
def test_sigkill_during_replay_neither_loses_nor_duplicates(tmp_path):
    n = 700
    # killed at named steps (fresh interpreters armed by the environment)
    for spec in ("dlq.replay.appended#1", "dlq.replay.appended#400", "dlq.replay.flushed#2",
                 "dlq.replay.head#1"):
        d = str(tmp_path / spec.replace("#", "_").replace(".", "_"))
        _make_letters(d, n)
        proc = _replay_cmd(d, env=dict(os.environ, ENGINE_CRASH_AT=spec))
        proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL, spec
        proc = _replay_cmd(d)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert json.loads(out)["head"] == n
        assert sorted(_replayed(d)) == sorted(f"dl-{i}".encode() for i in range(n)), spec
    # killed at random moments of a long replay, again and again: each run
    # reports every durable step, and is killed a random while after one
    rng = random.Random(11)
    d = str(tmp_path / "random")
    total = 6000
    _make_letters(d, total)
    script = ("import sys; from engine.deadletters import replay; "
              "replay(sys.argv[1], durability='none', progress=lambda n: print(n, flush=True))")
    kills = 0
    while kills < 6:
        proc = subprocess.Popen([sys.executable, "-c", script, d], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        for _ in range(rng.randint(1, 3)):
            if not proc.stdout.readline():
                break  # finished
        time.sleep(rng.uniform(0, 0.003))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.communicate(timeout=60)
        if proc.returncode == 0:
            break
    assert kills >= 3  # 24 batches: several runs were killed before the end
    proc = _replay_cmd(d)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert sorted(_replayed(d)) == sorted(f"dl-{i}".encode() for i in range(total))
    assert list_letters(d) == []


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "engine", "dlq", *args], capture_output=True, text=True,
                          timeout=60)


def test_cli_ls_show_replay_purge(tmp_path):
    path = str(tmp_path)
    _make_letters(path, 4)
    r = _cli("ls", path, "--json")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert [x["offset"] for x in rows] == [0, 1, 2, 3]
    assert rows[2]["reason"] == "r2" and rows[2]["deliveries"] == 3 and rows[2]["size"] == 4
    r = _cli("ls", path)
    assert r.returncode == 0 and "4 pending dead letters" in r.stdout and "r3" in r.stdout
    r = _cli("show", path, "2", "--json")
    assert json.loads(r.stdout)["payload_text"] == "dl-2"
    r = _cli("show", path, "L1:3@x")
    assert r.returncode == 0 and "dl-3" in r.stdout and "last reason:  r3" in r.stdout
    r = _cli("purge", path, "--before", "1", "--json")
    assert json.loads(r.stdout) == {"purged": 1}
    r = _cli("replay", path, "--durability", "none", "--limit", "2", "--json")
    assert json.loads(r.stdout) == {"replayed": 2, "recovered": 0, "head": 3}
    assert sorted(_replayed(path)) == [b"dl-1", b"dl-2"]
    r = _cli("ls", path, "--json")
    assert [json.loads(x)["offset"] for x in r.stdout.splitlines()] == [3]
    r = _cli("ls", path, "--all", "--json")
    assert len(r.stdout.splitlines()) == 4


@pytest.mark.parametrize("args", [["ls"], ["show", None, "0"], ["replay"], ["purge"]],
                         ids=lambda a: a[0])
def test_cli_errors_are_one_line_exit_1(tmp_path, args):
    missing = str(tmp_path / "nope")
    argv = [a if a is not None else missing for a in args]
    if len(argv) == 1:
        argv.append(missing)
    r = _cli(*argv)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("queue-engine dlq") and "Traceback" not in r.stderr


def test_cli_show_unknown_and_replay_while_producing_exit_1(tmp_path):
    path = str(tmp_path)
    _make_letters(path, 1)
    r = _cli("show", path, "9")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    with _pq(path) as q:
        q.put(b"x")
        r = _cli("replay", path)
        assert r.returncode == 1 and "already has a writer" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
