"""Two-phase commit (engine.txn): protocol, participants, recovery, compaction, CLI.

The crash-point and randomized crash tests are in tests/stress/test_txn_crash.py
and tests/stress/test_txn_random.py.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import engine
from engine import Log, LogReader, TransactionAborted, VersionConflict
from engine._txn import REC_MARK
from engine.errors import EngineError, LogLocked
from engine.txn import (
    Coordinator,
    LogParticipant,
    OffsetParticipant,
    ParticipantServer,
    RemoteParticipant,
    StoreParticipant,
    decision,
    read_journal,
)
from engine.versions import VersionedStore

SEG = 1 << 16


def values(path):
    with LogReader(str(path), start=0) as r:
        return [bytes(rec.value) for rec in r]


@pytest.fixture
def world(tmp_path):
    """A coordinator and two log participants, durability none."""
    opened = []

    class W:
        def __init__(self):
            self.open()

        def open(self, **kw):
            self.coord = Coordinator(tmp_path / "coord", durability="none", segment_bytes=SEG, **kw)
            self.la = Log(str(tmp_path / "a"), durability="none", segment_bytes=SEG)
            self.lb = Log(str(tmp_path / "b"), durability="none", segment_bytes=SEG)
            self.a = LogParticipant(self.la, segment_bytes=SEG)
            self.b = LogParticipant(self.lb, segment_bytes=SEG)
            opened.append(self)

        def close(self):
            for x in (self.a, self.b, self.coord, self.la, self.lb):
                x.close()

        def reopen(self, **kw):
            self.close()
            self.open(**kw)

    w = W()
    yield w
    w.close()


class Flaky:
    """A participant wrapper that fails chosen calls (a stand-in for a crash)."""

    def __init__(self, inner, fail=()):
        self.inner = inner
        self.name = inner.name
        self.fail = set(fail)
        self.calls = []

    def _do(self, what, *args):
        self.calls.append(what)
        if what in self.fail:
            raise OSError(f"injected {what} failure")
        return getattr(self.inner, what)(*args)

    def prepare(self, txid, ops):
        return self._do("prepare", txid, ops)

    def commit(self, txid):
        return self._do("commit", txid)

    def abort(self, txid):
        return self._do("abort", txid)

    def recover(self):
        return self._do("recover")


def test_public_names():
    for name in (
        "Coordinator",
        "Transaction",
        "Participant",
        "LogParticipant",
        "StoreParticipant",
        "OffsetParticipant",
        "ParticipantServer",
        "RemoteParticipant",
    ):
        assert getattr(engine, name) is getattr(engine.txn, name)
        assert getattr(engine, name).__doc__


def test_commit_on_exit(world, tmp_path):
    with world.coord.transaction() as tx:
        tx.enlist(world.a, [b"a1", b"a2"])
        tx.add(world.b, [(b"key", b"b1")])
    assert tx.state == "committed"
    assert tx.txid.startswith(world.coord._journal.id[:12])
    assert values(tmp_path / "a") == [b"a1", b"a2"]
    assert values(tmp_path / "b") == [b"b1"]
    with LogReader(str(tmp_path / "b"), start=0) as r:
        assert bytes(r.read().key) == b"key"
    assert world.coord.decision(tx.txid) in ("commit", "abort")  # ended: may be forgotten
    assert world.coord.stats()["committed"] == 1
    assert world.a.recover() == [] and world.b.recover() == []


def test_abort_on_exception(world, tmp_path):
    with pytest.raises(KeyError):
        with world.coord.transaction() as tx:
            tx.enlist(world.a, [b"a1"])
            raise KeyError("boom")
    assert tx.state == "aborted" and "KeyError" in tx.reason
    assert values(tmp_path / "a") == []
    with pytest.raises(EngineError):
        tx.enlist(world.a, [b"late"])
    with pytest.raises(TransactionAborted):
        tx.commit()


def test_explicit_commit_and_abort(world, tmp_path):
    tx = world.coord.transaction()
    tx.enlist(world.a, [b"x"])
    tx.commit()
    tx.commit()  # idempotent
    tx2 = world.coord.transaction()
    tx2.enlist(world.a, [b"y"])
    tx2.abort()
    assert tx2.state == "aborted"
    assert values(tmp_path / "a") == [b"x"]
    tx3 = world.coord.transaction()
    tx3.commit()  # nothing enlisted: trivially committed
    assert tx3.state == "committed"


def test_unique_txids_across_restarts(world):
    ids = {world.coord.transaction().txid for _ in range(100)}
    inc = world.coord.incarnation
    world.reopen()
    assert world.coord.incarnation == inc + 1
    ids2 = {world.coord.transaction().txid for _ in range(100)}
    assert len(ids | ids2) == 200


def test_store_vote_no_aborts_everyone(tmp_path, world):
    store = VersionedStore(str(tmp_path / "s"), durability="none", segment_bytes=SEG)
    sp = StoreParticipant(store, segment_bytes=SEG)
    try:
        store.put(b"k", b"v1")
        with pytest.raises(TransactionAborted) as ei:
            with world.coord.transaction() as tx:
                tx.enlist(world.a, [b"a"])
                tx.enlist(sp, [(b"k", b"v2", 7)])  # stale expected version
        assert isinstance(ei.value.__cause__, VersionConflict)
        assert ei.value.__cause__.actual == 1
        assert ei.value.txid == tx.txid and "failed to prepare" in ei.value.reason
        assert values(tmp_path / "a") == []
        assert world.a.recover() == [] and sp.recover() == []
        assert store.get(b"k") == (1, b"v1")
        # the right version commits both
        with world.coord.transaction() as tx:
            tx.enlist(world.a, [b"a"])
            tx.enlist(sp, [(b"k", b"v2", 1), (b"new", b"n"), (b"gone", None)])
        assert store.get(b"k") == (2, b"v2") and store.get(b"new") == (1, b"n")
        assert values(tmp_path / "a") == [b"a"]
        with world.coord.transaction() as tx:
            tx.enlist(sp, [(b"new", None, 1)])  # conditional delete
        assert store.get(b"new") == (0, None)
    finally:
        sp.close()
        store.close()


def test_store_locks_no_wait(tmp_path, world):
    store = VersionedStore(str(tmp_path / "s"), durability="none", segment_bytes=SEG)
    sp = StoreParticipant(store, segment_bytes=SEG)
    try:
        t1 = world.coord.transaction()
        assert sp.prepare(t1.txid, [(b"k", b"1")]) is True
        assert sp.prepare(t1.txid, [(b"k", b"1")]) is True  # resent prepare
        with pytest.raises(TransactionAborted, match="voted no"):
            with world.coord.transaction() as tx:
                tx.enlist(sp, [(b"k", b"2")])
        sp.abort(t1.txid)
        with world.coord.transaction() as tx:
            tx.enlist(sp, [(b"k", b"2")])
        assert store.get(b"k") == (1, b"2")
    finally:
        sp.close()
        store.close()


def test_voting_false_and_raising(world, tmp_path):
    class No:
        name = "no"

        def prepare(self, txid, ops):
            return False

        commit = abort = lambda self, txid: None

        def recover(self):
            return []

    with pytest.raises(TransactionAborted, match="'no' voted no"):
        with world.coord.transaction() as tx:
            tx.enlist(world.a, [b"a"])
            tx.enlist(No(), [1])
    assert world.a.recover() == [] and values(tmp_path / "a") == []
    flaky = Flaky(world.b, fail={"prepare"})
    with pytest.raises(TransactionAborted) as ei:
        with world.coord.transaction() as tx:
            tx.enlist(world.a, [b"a"])
            tx.enlist(flaky, [b"b"])
    assert isinstance(ei.value.__cause__, OSError)
    assert flaky.calls == ["prepare", "abort"]


def test_timeout_aborts(world, tmp_path):
    class Slow:
        name = "slow"

        def prepare(self, txid, ops):
            time.sleep(0.3)
            return True

        commit = abort = lambda self, txid: None

        def recover(self):
            return []

    with pytest.raises(TransactionAborted, match="timed out"):
        with world.coord.transaction(timeout=0.1) as tx:
            tx.enlist(Slow(), [1])
            tx.enlist(world.a, [b"late"])
    assert values(tmp_path / "a") == [] and world.a.recover() == []
    with pytest.raises(ValueError):
        world.coord.transaction(timeout=0)


def test_decision_answers(world, tmp_path):
    seen = {}

    class Asker:
        name = "asker"

        def prepare(self, txid, ops):
            seen["during"] = world.coord.decision(txid)
            return True

        def commit(self, txid):
            seen["commit"] = world.coord.decision(txid)

        def abort(self, txid):
            pass

        def recover(self):
            return []

    with world.coord.transaction() as tx:
        tx.enlist(Asker(), [1])
    assert seen == {"during": "pending", "commit": "commit"}
    stale = world.coord.transaction(timeout=0.05)
    time.sleep(0.1)
    assert world.coord.decision(stale.txid) == "abort"  # overdue: it may never commit now
    stale.enlist(world.a, [b"x"])
    with pytest.raises(TransactionAborted, match="timed out"):
        stale.commit()
    with pytest.raises(ValueError):
        world.coord.decision("ffff-1-1")
    # from another process's point of view (reading the log)
    t = world.coord.transaction()
    assert decision(world.coord.path, t.txid) == "pending"  # its coordinator runs
    world.close()
    assert decision(str(tmp_path / "coord"), t.txid) == "abort"
    world.open()


def test_participant_restart_resolves_in_doubt(world, tmp_path, caplog):
    # prepared at A and B, then the coordinator "crashes" before deciding
    tx = world.coord.transaction()
    assert world.a.prepare(tx.txid, [b"lost"]) and world.b.prepare(tx.txid, [b"lost"])
    world.reopen()
    assert world.a.recover() == [tx.txid] and world.b.recover() == [tx.txid]
    caplog.set_level("INFO", logger="engine")
    out = world.coord.recover([world.a, world.b])
    assert out["aborted"] == 2
    resolved = [r.getMessage() for r in caplog.records if "resolved" in r.getMessage()]
    assert len(resolved) == 2 and all(tx.txid in m and m.endswith("abort") for m in resolved)
    assert world.a.recover() == [] and values(tmp_path / "a") == []
    world.reopen()
    assert world.a.recover() == []  # the abort record spares the question


def test_participant_resolves_from_coordinator_log(world, tmp_path):
    flaky = Flaky(world.b, fail={"commit"})
    with world.coord.transaction() as tx:
        tx.enlist(world.a, [b"a"])
        tx.enlist(flaky, [b"b"])
    assert world.coord.in_doubt() == [tx.txid]
    assert values(tmp_path / "b") == []
    world.coord.close()  # the coordinator goes away; B restarts and asks its log
    world.b.close()
    world.lb.close()
    world.lb = Log(str(tmp_path / "b"), durability="none", segment_bytes=SEG)
    world.b = LogParticipant(world.lb, segment_bytes=SEG)
    assert world.b.recover() == [tx.txid]
    assert world.b.resolve(str(tmp_path / "coord")) == {"committed": 1, "aborted": 0, "pending": 0}
    assert values(tmp_path / "b") == [b"b"]
    world.coord = Coordinator(tmp_path / "coord", durability="none", segment_bytes=SEG)
    assert world.coord.in_doubt() == [tx.txid]
    out = world.coord.recover([world.a, world.b])
    assert out["resent"] == 1 and world.coord.in_doubt() == []
    assert values(tmp_path / "b") == [b"b"]  # commit idempotent: not twice


def test_commit_resent_until_acknowledged(world, tmp_path):
    flaky = Flaky(world.b, fail={"commit"})
    with world.coord.transaction() as tx:
        tx.enlist(world.a, [b"a"])
        tx.enlist(flaky, [b"b"])
    assert tx.state == "committed" and world.coord.in_doubt() == [tx.txid]
    assert world.coord.recover()["unfinished"] == 1  # still failing
    flaky.fail.clear()
    assert world.coord.recover()["resent"] == 1
    assert world.coord.in_doubt() == []
    assert values(tmp_path / "a") == [b"a"] and values(tmp_path / "b") == [b"b"]
    # idempotent: commit and abort again are no-ops
    world.a.commit(tx.txid)
    world.a.abort(tx.txid)
    assert values(tmp_path / "a") == [b"a"]


def test_commit_mark_blocks_abort(world):
    tx = world.coord.transaction()
    world.a.prepare(tx.txid, [b"x"])
    world.a._marks[tx.txid] = world.la.next_offset  # as if commit had started
    with pytest.raises(EngineError, match="committed"):
        world.a.abort(tx.txid)
    world.a.commit(tx.txid)
    assert world.a.recover() == []


def test_partial_batch_completed_on_recovery(world, tmp_path):
    tx = world.coord.transaction()
    world.a.prepare(tx.txid, [b"1", b"2", b"3"])
    # a crash after the commit mark and one record of the batch
    start = world.la.next_offset
    world.a._journal.append((REC_MARK, tx.txid, start))
    world.la.append(b"1")
    world.reopen()  # the participant finishes the marked batch on open
    assert values(tmp_path / "a") == [b"1", b"2", b"3"]
    assert world.a.recover() == []


def test_offset_participant_consume_transform_produce(tmp_path, world):
    src = Log(str(tmp_path / "src"), durability="none", segment_bytes=SEG)
    src.append_many([b"m%d" % i for i in range(10)])
    reader = LogReader(str(tmp_path / "src"), group="billing")
    op = OffsetParticipant(
        reader, state_path=str(tmp_path / "off.txn"), durability="none", segment_bytes=SEG
    )
    try:
        batch = reader.read_many(4)
        with world.coord.transaction() as tx:
            tx.enlist(world.a, [b"out-" + bytes(r.value) for r in batch])
            tx.enlist(op, [batch[-1].offset + 1])
        assert reader.committed() == 4
        batch = reader.read_many(4)
        with pytest.raises(TransactionAborted):
            with world.coord.transaction() as tx:
                tx.enlist(world.a, [b"out-" + bytes(r.value) for r in batch])
                tx.enlist(op, [batch[-1].offset + 1])
                raise TransactionAborted(tx.txid, "transform failed")
        assert reader.committed() == 4  # not moved: the next run re-reads m4..m7
        assert values(tmp_path / "a") == [b"out-m0", b"out-m1", b"out-m2", b"out-m3"]
        with pytest.raises(ValueError):
            op.prepare("x-1-1", [-1])
    finally:
        op.close()
        reader.close()
        src.close()
    with pytest.raises(ValueError, match="group"):
        OffsetParticipant(LogReader(str(tmp_path / "src")), state_path=str(tmp_path / "o2"))


def test_compaction_bounds_journals(tmp_path):
    coord = Coordinator(
        tmp_path / "c", durability="none", compact_records=64, end_batch=4, segment_bytes=SEG
    )
    log = Log(str(tmp_path / "a"), durability="none", segment_bytes=SEG)
    p = LogParticipant(log, compact_records=64, segment_bytes=SEG)
    flaky = Flaky(p, fail=set())
    try:
        for i in range(300):
            if i == 10:
                flaky.fail.add("commit")  # one txn stays unfinished across compactions
            with coord.transaction() as tx:
                tx.enlist(flaky, [b"%d" % i])
            if i == 10:
                stuck = tx.txid
                flaky.fail.clear()
        assert coord._journal.gen > 2 and p._journal.gen > 2
        _cur, recs = read_journal(coord.path)
        assert len(recs) < 100  # bounded, not 300+
        assert coord.in_doubt() == [stuck]
        assert any(r[0] == "C" and r[1] == stuck for r in recs)  # carried forward
        assert len(os.listdir(coord.path)) == 3  # CURRENT, owner.lock, one generation
    finally:
        coord.close()
        p.close()
    coord = Coordinator(tmp_path / "c", durability="none", segment_bytes=SEG)
    p = LogParticipant(log, segment_bytes=SEG)
    try:
        assert coord.in_doubt() == [stuck]
        assert p.recover() == [stuck]
        coord.recover([p])
        assert coord.in_doubt() == [] and p.recover() == []
        vals = values(tmp_path / "a")
        assert sorted(vals, key=int) == [b"%d" % i for i in range(300)]
    finally:
        coord.close()
        p.close()
        log.close()


def test_threads_share_syncs(tmp_path):
    """durability="always": concurrent transactions are group-committed."""
    coord = Coordinator(tmp_path / "c", durability="always", segment_bytes=SEG)
    la = Log(str(tmp_path / "a"), durability="always", segment_bytes=SEG)
    lb = Log(str(tmp_path / "b"), durability="always", segment_bytes=SEG)
    a, b = LogParticipant(la, segment_bytes=SEG), LogParticipant(lb, segment_bytes=SEG)
    n_threads, per = 32, 8
    errors = []
    import engine._log as _logmod

    # Make every sync take >= 1 ms (as on a real disk), so concurrent
    # transactions have something to share however fast this machine's fsync is.
    _logmod._set_sync_hook(lambda path, info: time.sleep(0.001))

    def worker(k):
        try:
            for i in range(per):
                with coord.transaction() as tx:
                    tx.enlist(a, [b"%d-%d" % (k, i)])
                    tx.enlist(b, [b"%d-%d" % (k, i)])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    try:
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors
        total = n_threads * per
        for path in ("a", "b"):
            vals = values(tmp_path / path)
            assert sorted(vals) == sorted(
                b"%d-%d" % (k, i) for k in range(n_threads) for i in range(per)
            )
        syncs = coord._journal.log.stats()["syncs"]
        assert syncs < total / 2  # far fewer syncs than commit decisions: they were shared
        for p in (a, b):
            assert p._journal.log.stats()["syncs"] < total  # prepared + marks shared too
    finally:
        _logmod._set_sync_hook(None)
        for x in (a, b, coord, la, lb):
            x.close()


def test_bad_arguments(tmp_path, world):
    with pytest.raises(ValueError):
        Coordinator(tmp_path / "x", durability="sometimes")
    with pytest.raises(ValueError):
        Coordinator(tmp_path / "y", timeout=-1)
    with pytest.raises(LogLocked):
        Coordinator(tmp_path / "coord")
    with Log(str(tmp_path / "c"), durability="none", segment_bytes=SEG) as lc:
        LogParticipant(lc, segment_bytes=SEG).close()
    with pytest.raises(EngineError, match="not a coordinator journal"):
        Coordinator(str(tmp_path / "c.txn"))  # a participant's journal
    tx = world.coord.transaction()
    with pytest.raises(TypeError):
        tx.enlist(object(), [])
    with pytest.raises(TypeError):
        tx.enlist(world.a, b"bytes is not a list of ops")
    with pytest.raises(TypeError):
        world.a.prepare(tx.txid, [12])
    with pytest.raises(ValueError):
        world.a.prepare(tx.txid, [])
    other = LogParticipant(world.la, name=world.a.name, state_path=str(tmp_path / "other.txn"))
    tx.enlist(world.a, [b"x"])
    with pytest.raises(ValueError, match="two participants"):
        tx.enlist(other, [b"y"])
    other.close()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "CURRENT").write_bytes(b"\x00garbage")
    with pytest.raises(EngineError, match="CURRENT"):
        Coordinator(tmp_path / "junk")


def test_txn_ls_cli(world, tmp_path, capsys):
    from engine.cli import main

    flaky = Flaky(world.b, fail={"commit"})
    with world.coord.transaction() as tx:
        tx.enlist(world.a, [b"a"])
        tx.enlist(flaky, [b"b"])
    world.coord.flush()
    assert main(["txn", "ls", str(tmp_path / "coord")]) == 3
    out = capsys.readouterr().out
    assert tx.txid in out and "not ended" in out
    flaky.fail.clear()
    world.coord.recover()
    world.coord.flush()
    assert main(["txn", "ls", str(tmp_path / "coord")]) == 0
    out = capsys.readouterr().out
    assert tx.txid in out and "committed" in out
    assert main(["txn", "ls", str(tmp_path / "a.txn"), "--json"]) == 0
    assert tx.txid in capsys.readouterr().out
    assert main(["txn", "ls", str(tmp_path / "nope")]) == 1


def _serve(endpoint, root, ready):
    log = Log(os.path.join(root, "remote"), durability="none", segment_bytes=SEG)
    p = LogParticipant(log, name="remote", segment_bytes=SEG)
    server = ParticipantServer(p, endpoint)
    ready.set()
    server.serve_forever()


@pytest.mark.timeout(120)
def test_remote_participant_over_rings(tmp_path, world, shm_name):
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    proc = ctx.Process(target=_serve, args=(shm_name, str(tmp_path), ready), daemon=True)
    proc.start()
    try:
        assert ready.wait(30)
        remote = RemoteParticipant("remote", shm_name, timeout=10)
        assert remote.ping() == "remote"
        with world.coord.transaction() as tx:
            tx.enlist(world.a, [b"local"])
            tx.enlist(remote, [b"r1", (b"k", b"r2")])
        assert values(tmp_path / "remote") == [b"r1", b"r2"]
        with pytest.raises(TransactionAborted):
            with world.coord.transaction() as tx:
                tx.enlist(world.a, [b"local2"])
                tx.enlist(remote, [12])  # the server refuses the op: votes no
        # the server dies after preparing: the coordinator aborts; after its
        # restart recovery resolves the in-doubt txn
        tx = world.coord.transaction()
        assert remote.prepare(tx.txid, [b"doomed"])
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        remote.timeout = 0.5
        with pytest.raises(TransactionAborted):
            with world.coord.transaction() as tx2:
                tx2.enlist(remote, [b"x"])
        ready = ctx.Event()
        proc = ctx.Process(target=_serve, args=(shm_name, str(tmp_path), ready), daemon=True)
        proc.start()
        assert ready.wait(30)
        remote.timeout = 10
        assert remote.recover() == [tx.txid]
        assert world.coord.recover([remote])["aborted"] == 0  # tx is still being decided
        tx.abort()  # the coordinator gives up on it: presumed abort
        assert world.coord.recover([remote])["aborted"] == 1
        assert remote.recover() == []
        assert values(tmp_path / "remote") == [b"r1", b"r2"]
        remote.close()
    finally:
        proc.kill()
        proc.join(10)


def test_marked_batches_finish_in_log_order(world, tmp_path):
    """A group of two batches marked, then a crash before either was appended:
    recovery appends them at their marked offsets, whatever the prepare order."""
    tx_x = world.coord.transaction()
    tx_y = world.coord.transaction()
    world.a.prepare(tx_x.txid, [b"x1", b"x2"])
    world.a.prepare(tx_y.txid, [b"y1"])
    start = world.la.next_offset
    world.a._journal.append((REC_MARK, tx_y.txid, start))  # y first in the group
    world.a._journal.append((REC_MARK, tx_x.txid, start + 1))
    world.reopen()
    assert values(tmp_path / "a") == [b"y1", b"x1", b"x2"]
    assert world.a.recover() == []
    world.reopen()
    assert values(tmp_path / "a") == [b"y1", b"x1", b"x2"]  # and never again


# ---------------------------------------------------------------------------
# stateful test against a pure-Python model


ACCTS = [(b, a) for b in range(2) for a in (b"x", b"y", b"z")]


class BankModel(RuleBasedStateMachine):
    """Transfers between two VersionedStores with an audit Log, against a dict model.

    Rules commit, abort (stale version, exception in the block), leave a
    transaction prepared with no decision, commit with one participant not
    taking the commit, and reopen everything; after each rule the stores and
    the audit log equal the model and nothing is in doubt once recovered.
    """

    def __init__(self):
        super().__init__()
        import tempfile

        base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        self.dir = tempfile.mkdtemp(prefix="qe-txn-model-", dir=base)
        self.model = {k: 100 for k in ACCTS}
        self.audit = []
        self.open(fresh=True)

    def open(self, fresh=False):
        d = self.dir
        self.stores = [
            VersionedStore(f"{d}/s{i}", durability="none", segment_bytes=SEG, snapshot_every=7)
            for i in range(2)
        ]
        if fresh:
            for i, s in enumerate(self.stores):
                s.apply([("put", a, b"100") for (b, a) in ACCTS if b == i])
        self.log = Log(f"{d}/audit", durability="none", segment_bytes=SEG)
        self.coord = Coordinator(
            f"{d}/coord", durability="none", segment_bytes=SEG, compact_records=40, end_batch=3
        )
        self.parts = [
            StoreParticipant(
                s, name=f"s{i}", state_path=f"{d}/s{i}.txn", segment_bytes=SEG, compact_records=40
            )
            for i, s in enumerate(self.stores)
        ]
        self.paudit = LogParticipant(self.log, name="audit", segment_bytes=SEG, compact_records=40)
        self.coord.recover(self.parts + [self.paudit])

    def close(self):
        for x in self.parts + [self.paudit, self.coord, self.log] + self.stores:
            x.close()

    def teardown(self):
        import shutil

        self.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _ops(self, src, dst, amount, skew=0):
        (b1, a1), (b2, a2) = src, dst
        v1, bal1 = self.stores[b1].get(a1)
        v2, bal2 = self.stores[b2].get(a2)
        o1 = (a1, b"%d" % (int(bal1) - amount), v1 + skew)
        o2 = (a2, b"%d" % (int(bal2) + amount), v2)
        if b1 == b2:
            return {b1: [o1, o2]}
        return {b1: [o1], b2: [o2]}

    def _enlist(self, tx, src, dst, amount, skew=0, parts=None):
        parts = parts or self.parts
        for b, ops in self._ops(src, dst, amount, skew).items():
            tx.enlist(parts[b], ops)
        tx.enlist(self.paudit, [b"%d %s %d %s %d" % (src[0], src[1], dst[0], dst[1], amount)])

    def _apply_model(self, src, dst, amount):
        self.model[src] -= amount
        self.model[dst] += amount
        self.audit.append(b"%d %s %d %s %d" % (src[0], src[1], dst[0], dst[1], amount))

    pair = st.lists(st.sampled_from(ACCTS), min_size=2, max_size=2, unique=True)

    @rule(p=pair, amount=st.integers(1, 30))
    def transfer(self, p, amount):
        with self.coord.transaction() as tx:
            self._enlist(tx, p[0], p[1], amount)
        self._apply_model(p[0], p[1], amount)

    @rule(p=pair, amount=st.integers(1, 30))
    def stale_transfer(self, p, amount):
        with pytest.raises(TransactionAborted):
            with self.coord.transaction() as tx:
                self._enlist(tx, p[0], p[1], amount, skew=1)

    @rule(p=pair, amount=st.integers(1, 30))
    def block_raises(self, p, amount):
        with pytest.raises(ZeroDivisionError):
            with self.coord.transaction() as tx:
                self._enlist(tx, p[0], p[1], amount)
                raise ZeroDivisionError("the block fails")

    @rule(p=pair, amount=st.integers(1, 30))
    def prepared_then_restart(self, p, amount):
        """Every participant prepared, no decision: after a restart, presumed abort."""
        tx = self.coord.transaction()
        self._enlist(tx, p[0], p[1], amount)
        for part, ops in tx._parts.items():
            assert part.prepare(tx.txid, ops)
        self.close()
        self.open()

    @rule(p=pair, amount=st.integers(1, 30), which=st.integers(0, 2))
    def commit_not_taken_then_restart(self, p, amount, which):
        """Decided commit, one participant misses it: a restart finishes it."""
        wrapped = [
            Flaky(x, fail={"commit"}) if i == which else x
            for i, x in enumerate(self.parts + [self.paudit])
        ]
        with self.coord.transaction() as tx:
            for b, ops in self._ops(p[0], p[1], amount).items():
                tx.enlist(wrapped[b], ops)
            tx.enlist(
                wrapped[2], [b"%d %s %d %s %d" % (p[0][0], p[0][1], p[1][0], p[1][1], amount)]
            )
        self._apply_model(p[0], p[1], amount)
        self.close()
        self.open()

    @rule()
    def reopen(self):
        self.close()
        self.open()

    @invariant()
    def matches_model(self):
        for (b, a), bal in self.model.items():
            assert int(self.stores[b].get(a)[1]) == bal
        assert sum(self.model.values()) == 600
        assert values(self.log.path) == self.audit
        assert [p.recover() for p in self.parts + [self.paudit]] == [[], [], []]
        assert self.coord.in_doubt() == []


TestBankModel = BankModel.TestCase
TestBankModel.settings = settings(
    max_examples=20, stateful_step_count=12, deadline=None, suppress_health_check=list(HealthCheck)
)


def test_bench_section_contenders_deliver():
    """The `queue-engine bench` txn section: every contender moves the workload exactly."""
    from engine.bench import txn as tb
    from engine.bench.harness import Profile, Workload

    cases = tb.cases(Profile())
    assert [c.name for c in cases] and all(c.contenders for c in cases)
    wl = Workload(64, 64)
    for fn, ordered in (
        (tb._ours("none"), True),
        (tb._ours("always", 4), False),
        (tb._sqlite("OFF"), True),
        (tb._plain_logs("none"), True),
    ):
        run = fn(wl)
        assert run.count == wl.count and run.checksum == wl.expected.checksum
        if ordered:
            assert run.in_order is not False


def test_summarize_journal_lists_in_doubt_and_recent(tmp_path):
    """The library's journal summary (what `queue-engine txn ls` prints):
    a participant's prepared txn is in doubt, a committed one is recent, and
    the coordinator lists the commit as ended."""
    from engine import Coordinator, Log, LogParticipant
    from engine.txn import summarize_journal

    with Log(str(tmp_path / "a"), durability="none") as log:
        coord = Coordinator(str(tmp_path / "c"), durability="none")
        part = LogParticipant(log, name="A")
        with coord.transaction() as tx:
            tx.enlist(part, [b"x", b"y"])
        assert part.prepare("ext-1-1", [b"z"])  # prepared, outcome unknown
        coord.flush()
        p = summarize_journal(str(tmp_path / "a.txn"), stale=0.0)
        c = summarize_journal(str(tmp_path / "c"))
        part.abort("ext-1-1")
        part.close()
        coord.close()
    assert p["kind"] == "log-participant"
    assert [(e["txid"], e["state"], e["ops"]) for e in p["in_doubt"]] == [("ext-1-1", "prepared", 1)]
    assert [(e["state"], e["ops"]) for e in p["recent"]] == [("committed", 2)]
    assert p["stale"] == 1
    assert c["kind"] == "coordinator" and c["in_doubt"] == [] and c["stale"] == 0
    assert [(e["state"], e["participants"]) for e in c["recent"]] == [("committed", ["A"])]
