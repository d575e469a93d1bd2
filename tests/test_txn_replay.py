"""A participant's replay must not lose in-doubt transactions to a compaction.

On open a journaled participant rebuilds its tables from its journal and then
finishes the batches it had marked committed; finishing them writes records,
and a write can compact the journal (start a new generation holding what the
tables hold).  These tests put a participant in exactly that position: its
journal at the compaction threshold, some marked batches to finish and a
transaction in doubt, then check that the in-doubt transaction survives the
replay, a clean reopen, and is committed everywhere when the coordinator
resends its commit.
"""

from __future__ import annotations

import os
import signal

import crashkit

from engine._log import Log, LogReader
from engine.txn import Coordinator, LogParticipant

COMPACT = 200


class Killer:
    """A user participant that dies (SIGKILL) inside its own commit."""

    name = "K"

    def prepare(self, txid, ops):
        return True

    def commit(self, txid):
        os.kill(os.getpid(), signal.SIGKILL)

    def abort(self, txid):
        pass

    def recover(self):
        return []


class Quiet(Killer):
    """The same participant after its restart: commits do nothing."""

    def commit(self, txid):
        pass


class World:
    def __init__(self, root: str) -> None:
        self.la = Log(os.path.join(root, "a"), durability="none")
        self.lb = Log(os.path.join(root, "b"), durability="none")
        self.coord = Coordinator(os.path.join(root, "coord"), durability="none")
        self.pa = LogParticipant(self.la, name="A", compact_records=COMPACT)
        self.pb = LogParticipant(self.lb, name="B", compact_records=COMPACT)

    def close(self) -> None:
        for x in (self.pa, self.pb, self.coord, self.la, self.lb):
            x.close()


def _values(path: str) -> list:
    with LogReader(path, start=0) as r:
        return [bytes(rec.value) for rec in r]


def fill_then_die(root: str) -> None:
    """Commit until B's journal is one record short of compaction, then run X
    with a participant that SIGKILLs this process after A applied X."""
    w = World(root)
    for i in range(10 * COMPACT):
        if w.pb._journal.appended == COMPACT - 1:
            break
        with w.coord.transaction() as tx:
            tx.enlist(w.pa, [b"a%d" % i])
            tx.enlist(w.pb, [b"b%d" % i])
    else:
        raise AssertionError("B's journal never stood one record short of compaction")
    with open(os.path.join(root, "filled"), "w") as f:
        f.write(str(i))
    tx = w.coord.transaction()
    with open(os.path.join(root, "x"), "w") as f:
        f.write(tx.txid)
    with tx:
        tx.enlist(w.pa, [b"X"])
        tx.enlist(Killer(), [b"k"])
        tx.enlist(w.pb, [b"X"])
    raise AssertionError("the killer participant did not kill")


def test_replay_compaction_keeps_in_doubt_txn(tmp_path):
    root = str(tmp_path)
    res = crashkit.run(fill_then_die, root, timeout=120)
    assert res.killed, res.error
    with open(os.path.join(root, "x")) as f:
        x = f.read()
    with open(os.path.join(root, "filled")) as f:
        filled = int(f.read())

    # reopen: B finishes its marked batches (compacting on the way) and still
    # knows X is in doubt
    w = World(root)
    assert w.pb.recover() == [x]
    assert w.pa.recover() == []  # A had applied X before the kill
    w.close()

    # a clean close and reopen must not forget it either
    w = World(root)
    try:
        assert w.pb.recover() == [x]
        out = w.coord.recover([w.pa, w.pb, Quiet()])
        # X is resolved as B's in-doubt txn; every committed txn not yet ended
        # (X and the unended ones before it) gets its commit resent
        assert out["committed"] == 1 and out["unfinished"] == 0, out
        assert w.pb.recover() == [] and w.coord.in_doubt() == []
    finally:
        w.close()

    # atomicity: X is in both logs, once, after every earlier batch
    a = _values(os.path.join(root, "a"))
    b = _values(os.path.join(root, "b"))
    assert a == [b"a%d" % i for i in range(filled)] + [b"X"]
    assert b == [b"b%d" % i for i in range(filled)] + [b"X"]


def test_a_failed_open_lets_go_of_the_journal(tmp_path):
    """An open that fails (here: a journal record that does not decode)
    releases the journal's owner lock at once: the next open fails the
    same way, not with LogLocked."""
    import pytest

    from engine.errors import CorruptLog

    log = Log(str(tmp_path / "a"), durability="none")
    LogParticipant(log, name="A").close()
    Coordinator(str(tmp_path / "c"), durability="none").close()
    for gen in (tmp_path / "a.txn" / "gen-00000001", tmp_path / "c" / "gen-00000001"):
        with Log(str(gen), durability="none") as g:
            g.append(b"not a journal record")
    for _attempt in range(2):
        with pytest.raises(CorruptLog, match="undecodable") as e1:
            LogParticipant(log, name="A")
        with pytest.raises(CorruptLog, match="undecodable") as e2:
            Coordinator(str(tmp_path / "c"), durability="none")
        # the failed objects are still referenced (by the tracebacks): the
        # lock must not depend on their collection
        assert e1.value is not None and e2.value is not None
    log.close()


def test_a_failed_pid_write_lets_go_of_the_journal(tmp_path, monkeypatch):
    """The journal's owner lock is let go when writing the owner's pid into
    it fails (the step right after taking the lock)."""
    import pytest

    from engine.errors import LogLocked

    def fail(*args):
        raise OSError(5, "Input/output error")

    log = Log(str(tmp_path / "a"), durability="none")
    for make in (lambda: Coordinator(str(tmp_path / "c"), durability="none"),
                 lambda: LogParticipant(log, name="A")):
        with monkeypatch.context() as m:
            m.setattr(os, "ftruncate", fail)
            with pytest.raises(OSError) as e:
                make()
            assert not isinstance(e.value, LogLocked)
        make().close()  # not LogLocked: the failed open let go of the lock
    log.close()


class _BreakingLog:
    """An engine.Log whose appends fail (as a broken log's do) once
    ``broken`` is set, without moving its end."""

    def __init__(self, log):
        self._log = log
        self.broken = False

    def __getattr__(self, name):
        return getattr(self._log, name)

    def append_many(self, *args):
        if self.broken:
            raise OSError(5, "Input/output error")
        return self._log.append_many(*args)


def test_marked_batches_of_a_broken_log_are_all_finished(tmp_path):
    """Commits whose data append failed leave their marks in the journal,
    all at the offset where the log stopped.  On reopen every one of those
    batches is appended once, in commit order: counting records past a mark
    would take the first batch for all of them."""
    root = str(tmp_path)
    la = Log(os.path.join(root, "a"), durability="always")
    lb = Log(os.path.join(root, "b"), durability="always")
    wrapped = _BreakingLog(la)
    coord = Coordinator(os.path.join(root, "c"), durability="always")
    pa = LogParticipant(wrapped, name="A", state_path=os.path.join(root, "a.txn"))
    pb = LogParticipant(lb, name="B")
    for i in range(2):
        with coord.transaction() as tx:
            tx.enlist(pa, [b"a%d" % i])
            tx.enlist(pb, [b"b%d" % i])
    wrapped.broken = True
    for i in range(2, 6):
        # committed: the decision is durable; A's part is resent at recover()
        with coord.transaction() as tx:
            tx.enlist(pa, [b"a%d" % i, b"a%d+" % i])
            tx.enlist(pb, [b"b%d" % i])
    pa._simulate_crash()
    pb.close()
    coord.close()
    la.close()

    la = Log(os.path.join(root, "a"), durability="always")
    coord = Coordinator(os.path.join(root, "c"), durability="always")
    pa = LogParticipant(la, name="A", state_path=os.path.join(root, "a.txn"))
    pb = LogParticipant(lb, name="B")
    coord.recover([pa, pb])
    assert pa.recover() == []
    want = [b"a0", b"a1"] + [x for i in range(2, 6) for x in (b"a%d" % i, b"a%d+" % i)]
    assert _values(os.path.join(root, "a")) == want
    assert _values(os.path.join(root, "b")) == [b"b%d" % i for i in range(6)]
    for o in (pa, pb, coord, la, lb):
        o.close()


def test_a_damaged_current_file_is_corrupt_log(tmp_path):
    """A journal whose CURRENT file does not parse raises CorruptLog naming
    the file, and lets go of the lock (the next open fails the same way)."""
    import pytest

    from engine.errors import CorruptLog

    Coordinator(str(tmp_path / "c"), durability="none").close()
    (tmp_path / "c" / "CURRENT").write_bytes(b"{not json")
    for _attempt in range(2):
        with pytest.raises(CorruptLog, match="CURRENT") as e:
            Coordinator(str(tmp_path / "c"), durability="none")
        assert e.value.segment == str(tmp_path / "c" / "CURRENT")
