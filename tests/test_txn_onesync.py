"""Commit by the coordinator's log (``Coordinator(redo=True)``).

A durable transaction whose participants are all LogParticipants commits
with one REDO record in the coordinator's journal (the decision and every
batch with the offset it starts at), one sync; the batches then go to their
logs unsynced, and the transaction ends only once those logs are durable
past them.  These tests check the cost (one sync), the order (the commit
returns with its record durable and its batches visible; no end record
before the logs are durable), recovery from a power loss that drops every
unsynced byte of the logs, SIGKILL at every crash point (also during that
recovery), transactions of both kinds on one LogParticipant, and that
hostile bytes in a REDO record are a clean decoding error.
"""

from __future__ import annotations

import os
import random
import shutil
import threading
import time

import pytest
from synchook import Durable, installed, run_threads, snapshot

from engine import Log, LogReader
from engine._txn import _decode_record, _encode
from engine.txn import (
    REC_REDO,
    Coordinator,
    LogParticipant,
    StoreParticipant,
    read_journal,
)
from engine.versions import VersionedStore

SEG = 1 << 16


def values(path):
    with LogReader(str(path), start=0) as r:
        return [bytes(rec.value) for rec in r]


def _world(root, nparts=2, end_batch=64, store=False):
    """A redo coordinator and ``nparts`` LogParticipants over durable logs
    (plus a StoreParticipant with ``store``), recovered."""
    root = str(root)
    coord = Coordinator(
        os.path.join(root, "coord"), durability="always", segment_bytes=SEG,
        end_batch=end_batch, redo=True,
    )
    logs = [
        Log(os.path.join(root, "abc"[k]), durability="always", segment_bytes=SEG)
        for k in range(nparts)
    ]
    parts = [LogParticipant(lg, segment_bytes=SEG) for lg in logs]
    extra = []
    if store:
        st = VersionedStore(os.path.join(root, "s"), durability="always", segment_bytes=SEG)
        ps = StoreParticipant(st, segment_bytes=SEG)
        extra = [ps, st]
        parts.append(ps)
    coord.recover(parts)
    return coord, logs, parts, extra


def _close(coord, logs, parts, extra=()):
    for x in (*parts, coord, *logs, *extra[1:]):
        x.close()


def _journal(coord_path, kind):
    """txid -> (offset in the live generation, record) of every ``kind`` record."""
    _cur, recs = read_journal(coord_path, meta=True)
    return {rec[1]: (off, rec) for off, _ts, rec in recs if rec[0] == kind}


def _ended(coord_path):
    _cur, recs = read_journal(coord_path)
    return {t for rec in recs if rec[0] == "E" for t in rec[1]}


# ---------------------------------------------------------------------------
# cost and order


def test_a_lone_transaction_over_two_logs_costs_one_sync(tmp_path):
    """One thread, two LogParticipants over "always" logs: each transaction
    is one sync (the coordinator's journal), none of the logs or the
    participants' journals; every end_batch transactions the two logs are
    synced once, off the commit's path (a commit does not wait for them),
    and those transactions end only once both syncs succeeded."""
    coord, logs, parts, _ = _world(tmp_path, end_batch=8)
    paths = {lg.path for lg in logs}
    gate = threading.Event()
    hook = Durable()
    try:
        with installed(hook):
            for i in range(7):
                with coord.transaction() as tx:
                    tx.enlist(parts[0], [b"a%d" % i])
                    tx.enlist(parts[1], [b"b%d" % i, b"b%d+" % i])
        assert hook.syncs == {coord._journal.log.path: 7}, hook.syncs
        assert [lg.next_offset for lg in logs] == [7, 14]
        assert values(logs[0].path) == [b"a%d" % i for i in range(7)]
        assert _ended(coord.path) == set()
        # the 8th: its end batch's log syncs are held inside the sync hook;
        # the commit returns all the same, and nothing ends meanwhile
        held = []
        hook = Durable()
        hook.after = lambda path, _end: path in paths and (held.append(path), gate.wait(10))
        with installed(hook):
            t0 = time.monotonic()
            with coord.transaction() as tx:
                tx.enlist(parts[0], [b"a7"])
                tx.enlist(parts[1], [b"b7", b"b7+"])
            took = time.monotonic() - t0
            assert took < 5, f"the commit waited {took:.1f} s for the logs' syncs"
            assert values(logs[0].path)[-1] == b"a7"
            deadline = time.monotonic() + 10
            while not held and time.monotonic() < deadline:
                time.sleep(0.001)
            assert held, "the logs were never synced"
            assert coord._redo and _ended(coord.path) == set()
            gate.set()
            coord.flush()  # reaps the syncs, then writes the end record
        assert hook.syncs == {coord._journal.log.path: 1, logs[0].path: 1, logs[1].path: 1}
        assert hook.ends[logs[0].path] == 8 and hook.ends[logs[1].path] == 16
        assert len(_ended(coord.path)) == 8 and not coord._redo
        assert coord.in_doubt() == [] and all(p.recover() == [] for p in parts)
        # one participant alone: the same single sync
        hook = Durable()
        with installed(hook):
            with coord.transaction() as tx:
                tx.enlist(parts[1], [b"alone"])
        assert hook.syncs == {coord._journal.log.path: 1}
        assert values(logs[1].path)[-1] == b"alone"
        # the participants' journals were never written
        for p in parts:
            assert read_journal(p._journal.path)[1] == []
    finally:
        gate.set()
        _close(coord, logs, parts)


@pytest.mark.parametrize("threads", [1, 8])
def test_commit_returns_with_its_record_durable_and_its_batches_visible(tmp_path, threads):
    """When a commit returns, the coordinator's journal is durable past its
    REDO record and a reader sees its batches; an end record is written only
    for transactions whose logs were durable past their batches by then."""
    coord, logs, parts, _ = _world(tmp_path, end_batch=4)
    hook = Durable(0.001)
    seen = []
    early = []
    jpath = coord._journal.log.path

    def check_ends(path, end):
        # at every sync of the journal: each ended transaction's batches durable
        if path != jpath:
            return
        ends = hook.snapshot()
        redo = _journal(coord.path, REC_REDO)
        for txid in _ended(coord.path):
            for name, start, vals, _keys in redo[txid][1][2]:
                lg = logs["ab".index(name[-1])]
                if ends.get(lg.path, 0) < start + len(vals):
                    early.append((txid, name))

    hook.after = check_ends
    try:
        with installed(hook):

            def body(k):
                for i in range(6):
                    tx = coord.transaction()
                    tx.enlist(parts[0], [b"%d-%d" % (k, i)])
                    tx.enlist(parts[1], [b"%d" % k, b"%d+" % k])
                    tx.commit()
                    seen.append((tx.txid, hook.snapshot(), k, i))
                    assert b"%d-%d" % (k, i) in values(logs[0].path)

            run_threads(threads, body, what="a commit")
            hook.after = None
            coord.flush()
        redo = _journal(coord.path, REC_REDO)
        for txid, ends, k, i in seen:
            assert ends.get(jpath, 0) > redo[txid][0], f"{txid} returned before its record was durable"
            (na, sa, va, _), (nb, sb, vb, _) = redo[txid][1][2]
            assert va == [b"%d-%d" % (k, i)] and vb == [b"%d" % k, b"%d+" % k]
        assert not early, f"end records before the logs were durable: {early[:3]}"
    finally:
        _close(coord, logs, parts)
    a, b = values(tmp_path / "a"), values(tmp_path / "b")
    assert sorted(a) == sorted(b"%d-%d" % (k, i) for k in range(threads) for i in range(6))
    # each transaction's batch contiguous at b, in the order of a
    assert b == [x for v in a for x in (v.split(b"-")[0], v.split(b"-")[0] + b"+")]


def test_bad_ops_abort_with_the_prepare_errors_and_write_nothing(tmp_path):
    """A bad op aborts as the participant's prepare would make it (same
    error), and nothing reaches any journal or log."""
    from engine import TransactionAborted

    coord, logs, parts, _ = _world(tmp_path)
    try:
        for ops, err in (([], ValueError), ([1], TypeError), ([(b"k", b"v", 3)], ValueError)):
            tx = coord.transaction()
            tx.enlist(parts[0], [b"fine"])
            tx.enlist(parts[1], ops)
            with pytest.raises(TransactionAborted) as info:
                tx.commit()
            assert isinstance(info.value.__cause__, err)
            assert "failed to prepare" in str(info.value)
        # a closed participant votes no, as its prepare would
        parts[1].close()
        tx = coord.transaction()
        tx.enlist(parts[0], [b"fine"])
        tx.enlist(parts[1], [b"too"])
        with pytest.raises(TransactionAborted, match="is closed"):
            tx.commit()
        assert [lg.next_offset for lg in logs] == [0, 0]
        assert _journal(coord.path, REC_REDO) == {}
    finally:
        _close(coord, logs, parts)


# ---------------------------------------------------------------------------
# power loss: every byte the logs did not sync is gone


class _Images(Durable):
    """A sync hook that keeps, per log, the image of its directory at its
    last sync: what a power loss leaves of it."""

    def __init__(self, paths):
        super().__init__()
        self.paths = {os.path.realpath(p) for p in paths}
        self.images = {os.path.realpath(p): snapshot(p) for p in paths}

    def __call__(self, path, info):
        super().__call__(path, info)
        if os.path.realpath(path) in self.paths:
            self.images[os.path.realpath(path)] = snapshot(path)

    def restore(self):
        for path, snap in self.images.items():
            for name in os.listdir(path):
                full = os.path.join(path, name)
                if os.path.isfile(full) and name not in ("writer.lock", "notify"):
                    os.unlink(full)
            for name, data in snap.items():
                with open(os.path.join(path, name), "wb") as f:
                    f.write(data)


def _power_loss_run(root, n=5):
    """``n`` committed transactions over two "always" logs, then a power
    loss: each log keeps what it had synced (the transactions' batches
    were not).  Returns the committed batches, in order."""
    coord, logs, parts, _ = _world(root)
    for k, lg in enumerate(logs):
        lg.append(b"before-%d" % k)  # durable: the image starts with it
    hook = _Images([lg.path for lg in logs])
    want = [[b"before-0"], [b"before-1"]]
    with installed(hook):
        for i in range(n):
            with coord.transaction() as tx:
                tx.enlist(parts[0], [b"a%d" % i])
                tx.enlist(parts[1], [b"b%d" % i, b"b%d+" % i])
            want[0].append(b"a%d" % i)
            want[1].extend([b"b%d" % i, b"b%d+" % i])
        assert values(logs[0].path) == want[0]  # visible before the power loss
    for x in (*parts, coord, *logs):
        x._simulate_crash()
    hook.restore()
    return want


def test_power_loss_after_commit_returned(tmp_path):
    """Commit returned, then the power fails before the logs were synced:
    reopened and recovered, both logs hold every batch exactly once, in
    commit order, and new transactions follow them."""
    want = _power_loss_run(tmp_path)
    # the logs lost the batches (the test's premise)
    assert values(tmp_path / "a") == [b"before-0"]
    assert values(tmp_path / "b") == [b"before-1"]
    # a participant opened without its coordinator is fine (its journal knows nothing)
    lg = Log(str(tmp_path / "a"), durability="always", segment_bytes=SEG)
    p = LogParticipant(lg, segment_bytes=SEG)
    assert p.recover() == [] and values(lg.path) == [b"before-0"]
    p.close()
    lg.close()
    coord, logs, parts, _ = _world(tmp_path)
    try:
        assert [values(lg.path) for lg in logs] == want
        assert coord.in_doubt() == []
        with coord.transaction() as tx:
            tx.enlist(parts[0], [b"after"])
            tx.enlist(parts[1], [b"after/b"])
    finally:
        _close(coord, logs, parts)
    assert values(tmp_path / "a") == want[0] + [b"after"]
    assert values(tmp_path / "b") == want[1] + [b"after/b"]
    # recovery ended them: a second restart has nothing to put back
    coord, logs, parts, _ = _world(tmp_path)
    try:
        assert coord._redo == {} and set(_journal(coord.path, REC_REDO)) <= _ended(coord.path)
    finally:
        _close(coord, logs, parts)


def test_power_loss_after_the_journal_compacted(tmp_path):
    """The coordinator's journal switches generations while redo
    transactions are not ended: the new generation carries their REDO
    records, so a power loss that drops the logs' unsynced batches loses
    none of them."""
    coord = Coordinator(tmp_path / "coord", durability="always", segment_bytes=SEG, redo=True,
                        compact_records=16, end_batch=1000)
    logs = [Log(str(tmp_path / x), durability="always", segment_bytes=SEG) for x in "ab"]
    parts = [LogParticipant(lg, segment_bytes=SEG) for lg in logs]
    for k, lg in enumerate(logs):
        lg.append(b"before-%d" % k)
    hook = _Images([lg.path for lg in logs])
    with installed(hook):
        for i in range(40):
            with coord.transaction() as tx:
                tx.enlist(parts[0], [b"a%d" % i])
                tx.enlist(parts[1], [b"b%d" % i])
            if i % 8 == 7:
                coord._journal.appended = coord._compact_records  # due: switch now
                coord._compact()
    assert coord._journal.gen > 1
    for x in (*parts, coord, *logs):
        x._simulate_crash()
    hook.restore()
    assert values(tmp_path / "a") == [b"before-0"]
    coord, logs, parts, _ = _world(tmp_path)
    try:
        assert values(logs[0].path) == [b"before-0"] + [b"a%d" % i for i in range(40)]
        assert values(logs[1].path) == [b"before-1"] + [b"b%d" % i for i in range(40)]
    finally:
        _close(coord, logs, parts)


def test_a_transaction_before_recover_puts_the_old_batches_back_first(tmp_path):
    """After the power loss the application commits before calling
    recover(): the batches the journal holds go back first, at their
    offsets, and the new one after them."""
    want = _power_loss_run(tmp_path, n=3)
    coord = Coordinator(tmp_path / "coord", durability="always", segment_bytes=SEG, redo=True)
    logs = [Log(str(tmp_path / x), durability="always", segment_bytes=SEG) for x in "ab"]
    parts = [LogParticipant(lg, segment_bytes=SEG) for lg in logs]
    try:
        with coord.transaction() as tx:
            tx.enlist(parts[0], [b"new"])
            tx.enlist(parts[1], [b"new/b"])
        assert values(logs[0].path) == want[0] + [b"new"]
        assert values(logs[1].path) == want[1] + [b"new/b"]
    finally:
        _close(coord, logs, parts)


def _recover_at(root):
    coord, logs, parts, _ = _world(root)
    _close(coord, logs, parts)
    return "done"


@pytest.mark.crash
def test_sigkill_at_every_point_of_recovery_after_a_power_loss(tmp_path):
    """Recovery puts the lost batches back; SIGKILL it at every crash point
    it passes, then recover again: every batch once, in order."""
    import crashkit

    base = tmp_path / "base"
    want = _power_loss_run(base)
    trace_root = tmp_path / "trace"
    shutil.copytree(base, trace_root)
    points = crashkit.trace(_recover_at, str(trace_root), timeout=120)
    assert any(p.startswith("coord.redo.before_replay@") for p in points), points
    for i, spot in enumerate(points):
        root = tmp_path / f"p{i}"
        shutil.copytree(base, root)
        res = crashkit.run(_recover_at, str(root), crash_at=spot, timeout=120)
        assert res.killed, (spot, res.error)
        coord, logs, parts, _ = _world(root)
        try:
            assert [values(lg.path) for lg in logs] == want, spot
            assert coord.in_doubt() == [], spot
        finally:
            _close(coord, logs, parts)


# ---------------------------------------------------------------------------
# SIGKILL at every crash point of redo commits

TXNS = 3


def _scenario(root, nparts, mixed):
    """TXNS transactions over ``nparts`` LogParticipants (with ``mixed``, a
    transaction of LogParticipant a and a StoreParticipant after each); each
    acknowledged tag is appended to ``acked`` right after its commit returns."""
    coord, logs, parts, extra = _world(root, nparts, end_batch=2, store=mixed)
    fd = os.open(f"{root}/acked", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    for i in range(TXNS):
        tag = b"T%d" % i
        with coord.transaction() as tx:
            for k in range(nparts):
                tx.enlist(parts[k], [tag + b"/%d" % j for j in range(k + 1)])
        os.write(fd, tag + b"\n")
        if mixed:
            tag = b"S%d" % i
            with coord.transaction() as tx:
                tx.enlist(parts[0], [tag + b"/0", tag + b"/0+"])
                tx.enlist(parts[-1], [(b"k%d" % i, tag)])
            os.write(fd, tag + b"\n")
    _close(coord, logs, parts, extra)
    return "done"


def _check_after_crash(root, nparts, mixed, spot):
    coord, logs, parts, extra = _world(root, nparts, end_batch=2, store=mixed)
    try:
        got = [values(lg.path) for lg in logs]
        try:
            with open(f"{root}/acked", "rb") as f:
                acked = f.read().split()
        except FileNotFoundError:
            acked = []
        # log a: whole batches in commit order, none twice
        tags = []
        a = got[0]
        i = 0
        while i < len(a):
            tag = a[i].split(b"/")[0]
            size = 2 if tag.startswith(b"S") else 1
            want = [tag + b"/0"] if size == 1 else [tag + b"/0", tag + b"/0+"]
            assert a[i: i + size] == want, (spot, "a torn batch", a)
            tags.append(tag)
            i += size
        order = [b"%s%d" % (c, n) for n in range(TXNS) for c in ((b"T", b"S") if mixed else (b"T",))]
        assert tags == order[: len(tags)], (spot, "batches out of order or twice", tags)
        assert acked == tags[: len(acked)], (spot, "acknowledged transactions lost", acked, tags)
        # every other log: the same redo transactions, each batch whole
        t_tags = [t for t in tags if t.startswith(b"T")]
        for k in range(1, nparts):
            assert got[k] == [t + b"/%d" % j for t in t_tags for j in range(k + 1)], (spot, k, got)
        if mixed:
            store = extra[1]
            s_tags = [t for t in tags if t.startswith(b"S")]
            for n in range(TXNS):
                v = store.get(b"k%d" % n)
                assert (v[1] == b"S%d" % n) == (b"S%d" % n in s_tags), (spot, n, v, s_tags)
        assert coord.in_doubt() == [] and all(p.recover() == [] for p in parts), spot
        with coord.transaction() as tx:
            for k in range(nparts):
                tx.enlist(parts[k], [b"after/%d" % k])
    finally:
        _close(coord, logs, parts, extra)
    assert values(os.path.join(root, "a"))[-1] == b"after/0"


@pytest.mark.crash
@pytest.mark.parametrize("nparts,mixed", [(2, False), (3, False), (2, True)])
def test_sigkill_at_every_point_of_redo_commits(tmp_path, nparts, mixed):
    """SIGKILL at every hit of every crash point that redo commits pass
    (with 2 and 3 participants; and interleaved with classic transactions
    of a LogParticipant and a StoreParticipant), then reopen and recover:
    each transaction whole in every log or in none, none twice, every
    batch at its place in commit order, every acknowledged one there."""
    import crashkit

    def scenario(root):
        return _scenario(root, nparts, mixed)

    points = crashkit.trace(scenario, str(tmp_path / "trace"), timeout=120)
    for want in ("coord.redo.after_write", "coord.redo.after_sync", "coord.redo.before_flush",
                 "coord.redo.after_flush", "coord.redo.after_apply@log:b"):
        assert any(p.startswith(want) for p in points), (want, points)
    if mixed:
        assert any(p.startswith("log.commit.after_mark@log:a") for p in points), points
    for i, spot in enumerate(points):
        root = str(tmp_path / f"p{i}")
        res = crashkit.run(scenario, root, crash_at=spot, timeout=120)
        assert res.killed, (spot, res.error)
        _check_after_crash(root, nparts, mixed, spot)


# ---------------------------------------------------------------------------
# both kinds of transaction on one LogParticipant


def test_redo_and_classic_transactions_share_a_participant(tmp_path):
    """Redo transactions (two LogParticipants) and classic ones (LogParticipant
    a and a StoreParticipant) from several threads: every batch in log a is
    contiguous, the redo ones at the offsets their records reserved; a
    power loss after it all loses none of them."""
    coord, logs, parts, extra = _world(tmp_path, store=True)
    pa, pb, ps = parts
    hook = _Images([lg.path for lg in logs])

    def body(k):
        for i in range(8):
            with coord.transaction() as tx:
                if i % 2:
                    tx.enlist(pa, [b"S%d-%d" % (k, i), b"S%d-%d+" % (k, i)])
                    tx.enlist(ps, [(b"k%d-%d" % (k, i), b"v")])
                else:
                    tx.enlist(pa, [b"T%d-%d" % (k, i)])
                    tx.enlist(pb, [b"T%d-%d" % (k, i)])

    with installed(hook):
        run_threads(4, body, what="a commit")
        a = values(logs[0].path)
    redo = _journal(coord.path, REC_REDO)
    for _off, rec in redo.values():
        name, start, vals, _keys = rec[2][0]
        assert a[start: start + len(vals)] == vals, (start, vals)
    for x in (*parts, coord, *logs):
        x._simulate_crash()
    extra[1].close()  # (the store is not what this test looks at)
    hook.restore()
    coord, logs, parts, extra = _world(tmp_path, store=True)
    try:
        got = values(logs[0].path)
        assert got == a
        i = 0
        while i < len(got):
            if got[i].startswith(b"S"):
                assert got[i + 1] == got[i] + b"+", got[i: i + 2]
                i += 2
            else:
                i += 1
        assert sorted(x for x in got if x.startswith(b"T")) == sorted(values(logs[1].path))
        assert len(got) == 4 * (4 * 1 + 4 * 2)
    finally:
        _close(coord, logs, parts, extra)


# ---------------------------------------------------------------------------
# the REDO record's bytes


def _redo_bytes():
    return _encode((REC_REDO, "abc-1-2", (("log:a", 3, [b"x", b"yz"], None),
                                          ("log:b", 0, [b"v"], [b"k"]))))


def test_a_redo_record_round_trips_and_bad_shapes_are_refused():
    raw = _redo_bytes()
    assert _decode_record(raw, True) == (
        REC_REDO, "abc-1-2", (("log:a", 3, [b"x", b"yz"], None), ("log:b", 0, [b"v"], [b"k"]))
    )
    # a participant's journal never holds one
    with pytest.raises(ValueError):
        _decode_record(raw, False)
    for bad in (
        (),  # no batch
        (("log:a", -1, [b"x"], None),),  # negative offset
        (("log:a", 0, [], None),),  # empty batch
        (("log:a", 0, ["x"], None),),  # a str value
        (("log:a", 0, [b"x"], [b"k", b"l"]),),  # keys not as long as values
        (("log:a", 0, [b"x"]),),  # three fields
        ((7, 0, [b"x"], None),),  # the name not a str
    ):
        with pytest.raises(ValueError):
            _encode((REC_REDO, "t", bad))


def test_hostile_bytes_in_a_redo_record_are_a_decoding_error():
    """Every truncation and many random corruptions of a REDO record either
    decode to a well-formed record or raise ValueError (CorruptLog in the
    journal), never anything else."""
    raw = _redo_bytes()
    rng = random.Random(7)
    cases = [raw[:n] for n in range(len(raw))]
    for _ in range(3000):
        b = bytearray(raw)
        for _k in range(rng.randrange(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        cases.append(bytes(b))
    for case in cases:
        try:
            rec = _decode_record(case, True)
        except ValueError:
            continue
        if rec[0] == REC_REDO:
            for name, start, vals, keys in rec[2]:
                assert isinstance(name, str) and start >= 0 and vals
                assert all(type(v) is bytes for v in vals)
                assert keys is None or len(keys) == len(vals)


# ---------------------------------------------------------------------------
# the log's unsynced append (what the batches go to their logs with)


def test_an_unsynced_append_is_visible_at_once_and_durable_after_flush(tmp_path):
    """``Log._append_unsynced`` on an "always" log: no sync, a reader sees
    the records at once, a sync of an earlier end never hides them again,
    and ``flush(end)`` makes them durable."""
    hook = Durable()
    lg = Log(str(tmp_path / "l"), durability="always", segment_bytes=SEG)
    try:
        lg.append(b"first")
        with installed(hook):
            r = lg._append_unsynced([b"x", b"y"], [b"k", None])
            assert list(r) == [1, 2] and hook.syncs == {}
            with LogReader(lg.path, start=0) as rd:
                assert [(None if x.key is None else bytes(x.key), bytes(x.value)) for x in rd] == [
                    (None, b"first"), (b"k", b"x"), (None, b"y")]
            lg.flush(2)
            assert values(lg.path) == [b"first", b"x", b"y"]
            lg.flush(3)
            assert hook.ends[lg.path] == 3
    finally:
        lg.close()
    assert values(tmp_path / "l") == [b"first", b"x", b"y"]
