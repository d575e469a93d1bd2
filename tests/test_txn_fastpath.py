"""The non-durable fast paths of two-phase commit write exactly what the general paths write.

With nothing to sync (durability "none" or "interval") the coordinator writes
its decision, a participant its prepared record, and an uncontended
LogParticipant its commit mark, batch and done list under one hold of the
owner's lock; with durability "always" the same steps run the general way
(syncs outside the lock, group commit).  Both must leave identical journals,
identical data and pass the same crash points in the same order, since the
crash tests (tests/stress/test_txn_crash.py, durability "none") only exercise
the fast paths.  The "always" world runs the vote protocol (``redo=False``),
the one the fast paths mirror.  Plus: a failure in the middle of a fast commit is finished by
a resend, and threads mixing the fast and the group-commit path lose nothing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading

import pytest

import engine.txn as txn_mod
from engine import Log, LogReader, TransactionAborted, VersionConflict
from engine._txn import (
    REC_ABORTED,
    REC_DECISION,
    REC_DONE,
    REC_ENDED,
    REC_INCARNATION,
    REC_MARK,
    REC_PREPARED,
)
from engine.txn import Coordinator, LogParticipant, StoreParticipant, read_journal
from engine.versions import VersionedStore

SEG = 1 << 16


@pytest.fixture
def shmdir(tmp_path):
    """A directory on tmpfs when there is one: durability "always" syncs cheaply there."""
    if not (os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK)):
        yield str(tmp_path)
        return
    d = tempfile.mkdtemp(prefix="qe-txn-fast-", dir="/dev/shm")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def values(path, keys=False):
    with LogReader(str(path), start=0) as r:
        if keys:
            return [(None if rec.key is None else bytes(rec.key), bytes(rec.value)) for rec in r]
        return [bytes(rec.value) for rec in r]


def _scenario(root: str, durability: str) -> dict:
    """A fixed mix of transactions; returns journals (txids numbered), data and trace."""
    os.makedirs(root)
    trace = os.path.join(root, "trace")
    txn_mod._arm_crash(None, trace)  # record every crash point passed, kill nowhere
    try:
        coord = Coordinator(
            os.path.join(root, "coord"), durability=durability, segment_bytes=SEG, end_batch=4, redo=False
        )
        la = Log(os.path.join(root, "a"), durability=durability, segment_bytes=SEG)
        lb = Log(os.path.join(root, "b"), durability=durability, segment_bytes=SEG)
        store = VersionedStore(
            os.path.join(root, "s"), durability=durability, segment_bytes=SEG, snapshot_every=None
        )
        a = LogParticipant(la, name="A", segment_bytes=SEG)
        b = LogParticipant(lb, name="B", segment_bytes=SEG)
        s = StoreParticipant(
            store, name="S", state_path=os.path.join(root, "s.txn"), segment_bytes=SEG
        )
        outcomes = []
        for i in range(150):  # > 64: the participants' done batches are written too
            try:
                with coord.transaction() as tx:
                    tx.enlist(a, [b"a%d" % i])  # one value: the common case
                    if i % 3 == 0:
                        tx.enlist(b, [(b"k%d" % i, b"b%d" % i), b"b%d+" % i])  # keys, 2 values
                    elif i % 3 == 1:
                        tx.enlist(b, [b"b%d" % i, b"b%d+" % i, b"b%d++" % i])
                    if i % 5 == 0:
                        ver = store.get(b"acct")[0]
                        tx.enlist(s, [(b"acct", b"%d" % i, ver + (1 if i % 10 == 0 else 0))])
                outcomes.append("committed")
            except TransactionAborted as exc:
                assert isinstance(exc.__cause__, VersionConflict)
                outcomes.append("aborted")
        tx = coord.transaction()
        tx.enlist(a, [b"never"])
        tx.abort()
        outcomes.append(tx.state)
        for x in (a, b, s, coord, la, lb, store):
            x.close()
    finally:
        txn_mod._arm_crash(None)
    numbering: dict = {}

    def norm(x):
        # txids differ between runs (journal ids): number them by first appearance
        if isinstance(x, str) and txn_mod._txid_parts(x) is not None:
            return f"tx{numbering.setdefault(x, len(numbering))}"
        if isinstance(x, (list, tuple)):
            return type(x)(norm(y) for y in x)
        return x

    journals = {
        name: [norm(rec) for rec in read_journal(os.path.join(root, name))[1]]
        for name in ("coord", "a.txn", "b.txn", "s.txn")
    }
    with open(trace) as f:
        points = f.read().split()
    return {
        "outcomes": outcomes,
        "journals": journals,
        "a": values(os.path.join(root, "a")),
        "b": values(os.path.join(root, "b"), keys=True),
        "points": points,
    }


def test_fast_paths_write_what_the_general_paths_write(shmdir):
    fast = _scenario(os.path.join(shmdir, "none"), "none")
    general = _scenario(os.path.join(shmdir, "always"), "always")
    assert fast["outcomes"] == general["outcomes"]
    assert fast["outcomes"].count("aborted") == 15 + 1 and fast["outcomes"][-1] == "aborted"
    assert fast["a"] == general["a"] == [b"a%d" % i for i in range(150) if i % 10 != 0]
    assert fast["b"] == general["b"]
    assert len(fast["b"]) == sum(2 if i % 3 == 0 else 3 for i in range(150) if i % 3 != 2 and i % 10)
    for name in fast["journals"]:
        assert fast["journals"][name] == general["journals"][name], name
    # every kind of record is there (decisions, ends, prepared, marks, aborts, done lists)
    kinds = {name: {rec[0] for rec in recs} for name, recs in fast["journals"].items()}
    assert kinds["coord"] == {REC_INCARNATION, REC_DECISION, REC_ENDED}
    assert {REC_PREPARED, REC_MARK, REC_ABORTED, REC_DONE} <= kinds["a.txn"]
    assert fast["points"] == general["points"]
    assert "log.commit.after_mark@A#135" in fast["points"]


class _FailingLog:
    """A Log stand-in whose next append_many writes ``keep`` values, then fails."""

    def __init__(self, log):
        self._log = log
        self.path = log.path
        self.durability = log.durability
        self.fail_after = None  # None: healthy

    @property
    def next_offset(self):
        return self._log.next_offset

    def append(self, value, key=None):
        return self._log.append(value, key=key)

    def append_many(self, values, keys=None):
        if self.fail_after is not None:
            keep, self.fail_after = self.fail_after, None
            if keep:
                self._log.append_many(values[:keep], None if keys is None else keys[:keep])
            raise OSError("injected: the disk is full")
        return self._log.append_many(values, keys)


@pytest.mark.parametrize("written", [0, 1, 2])
def test_fast_commit_failure_is_finished_by_a_resend(tmp_path, written):
    coord = Coordinator(tmp_path / "coord", durability="none", segment_bytes=SEG)
    la = Log(str(tmp_path / "a"), durability="none", segment_bytes=SEG)
    lb = Log(str(tmp_path / "b"), durability="none", segment_bytes=SEG)
    fl = _FailingLog(la)
    a, b = LogParticipant(fl, name="A", segment_bytes=SEG), LogParticipant(lb, name="B")
    try:
        with coord.transaction() as tx0:
            tx0.enlist(a, [b"0-1", b"0-2"])
        fl.fail_after = written
        with coord.transaction() as tx:
            tx.enlist(a, [b"1-1", b"1-2", b"1-3"])
            tx.enlist(b, [b"1-b"])
        # decided: committed, B took it, A failed after its mark
        assert tx.state == "committed" and coord.in_doubt() == [tx.txid]
        assert a.recover() == [] and tx.txid in a._marks  # marked: never aborted now
        assert values(tmp_path / "a") == [b"0-1", b"0-2"] + [b"1-1", b"1-2", b"1-3"][:written]
        assert coord.recover()["resent"] == 1 and coord.in_doubt() == []
        assert values(tmp_path / "a") == [b"0-1", b"0-2", b"1-1", b"1-2", b"1-3"]
        assert values(tmp_path / "b") == [b"1-b"]
        with coord.transaction() as tx2:  # and the fast path goes on
            tx2.enlist(a, [b"2"])
        assert values(tmp_path / "a")[-1] == b"2" and a._marks == {}
    finally:
        for x in (a, b, coord, la, lb):
            x.close()


def test_threads_mix_fast_and_group_commit(tmp_path, monkeypatch):
    """durability none, 8 threads switching every few microseconds: the
    uncontended path and the group-commit queue interleave; every batch lands
    whole, contiguous and once."""
    import sys

    coord = Coordinator(tmp_path / "coord", durability="none", segment_bytes=SEG)
    la = Log(str(tmp_path / "a"), durability="none", segment_bytes=SEG)
    lb = Log(str(tmp_path / "b"), durability="none", segment_bytes=SEG)
    a, b = LogParticipant(la, segment_bytes=SEG), LogParticipant(lb, segment_bytes=SEG)
    n_threads, per = 8, 150
    errors = []
    general = []  # commits that found the fast path taken and went the general way
    plain_apply = LogParticipant._apply  # (only the general path calls _apply)

    def counting_apply(self, txid, info):
        general.append(txid)
        plain_apply(self, txid, info)

    monkeypatch.setattr(LogParticipant, "_apply", counting_apply)

    def worker(r, k):
        try:
            for i in range(per):
                with coord.transaction() as tx:
                    tx.enlist(a, [b"%d-%d-%d-x" % (r, k, i), b"%d-%d-%d-y" % (r, k, i)])
                    tx.enlist(b, [b"%d-%d-%d" % (r, k, i)])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    rounds = 0
    try:
        while rounds < 5 and not general:  # until the paths did meet (first round, nearly always)
            threads = [threading.Thread(target=worker, args=(rounds, k)) for k in range(n_threads)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            rounds += 1
        sys.setswitchinterval(old)
        assert not errors
        assert general, "no commit ever took the contended path"
        total = rounds * n_threads * per
        got_a = values(tmp_path / "a")
        assert len(got_a) == 2 * total
        for j in range(0, len(got_a), 2):  # each batch contiguous, in its order
            assert got_a[j].endswith(b"-x") and got_a[j + 1] == got_a[j][:-1] + b"y"
        want = [(r, k, i) for r in range(rounds) for k in range(n_threads) for i in range(per)]
        assert sorted(got_a[0::2]) == sorted(b"%d-%d-%d-x" % w for w in want)
        assert sorted(values(tmp_path / "b")) == sorted(b"%d-%d-%d" % w for w in want)
        assert coord.in_doubt() == [] and a.recover() == [] and b.recover() == []
        assert coord.stats()["committed"] == total
    finally:
        sys.setswitchinterval(old)
        for x in (a, b, coord, la, lb):
            x.close()


def test_participant_registry_follows_replaced_participants(tmp_path):
    coord = Coordinator(tmp_path / "coord", durability="none", segment_bytes=SEG)
    logs = [Log(str(tmp_path / n), durability="none", segment_bytes=SEG) for n in ("a", "b")]
    a1 = LogParticipant(logs[0], name="A", segment_bytes=SEG)
    try:
        with coord.transaction() as tx:
            tx.enlist(a1, [b"1"])
        assert coord._participants["A"] is a1
        a1.close()
        a2 = LogParticipant(logs[0], name="A", segment_bytes=SEG)  # reopened: a new object
        with coord.transaction() as tx:
            tx.enlist(a2, [b"2"])
        assert coord._participants["A"] is a2  # recover() would resend to the live one
        coord.recover([a1])
        assert coord._participants["A"] is a1
        with coord.transaction() as tx:
            tx.enlist(a2, [b"3"])
        assert coord._participants["A"] is a2
        a2.close()
    finally:
        coord.close()
        for x in logs:
            x.close()
