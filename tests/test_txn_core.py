"""The compiled core of two-phase commit (engine._txn, pyx/txn.pyx).

Its record encoder and decoder are tested in tests/test_journal_format.py;
the protocol itself through engine.txn (tests/test_txn*.py, tests/stress).
"""

from __future__ import annotations

import pytest

from engine.txn import Coordinator, LogParticipant, Transaction


def test_transaction_built_by_hand_and_by_the_coordinator(tmp_path):
    from engine import Log

    with Coordinator(tmp_path / "c", durability="none") as coord:
        tx = coord.transaction(timeout=5)
        assert isinstance(tx, Transaction) and tx.state == "active" and tx.reason is None
        assert tx.txid.startswith(coord._prefix) and int(tx.txid.rsplit("-", 1)[1], 16) == 1
        assert coord.transaction().txid.endswith("-2")  # sequence numbers, in hex
        for seq in (15, 255, 2**32 - 1, 2**63 - 2):
            coord._seq = seq
            assert coord.transaction().txid == f"{coord._prefix}{seq + 1:x}"
        tx.abort("by hand")
        assert tx.state == "aborted" and tx.reason == "by hand"
        with pytest.raises(TypeError):
            coord.transaction().enlist(object(), [b"x"])  # not a participant
        log = Log(str(tmp_path / "a"), durability="none")
        with LogParticipant(log) as p:
            manual = Transaction(coord, coord._prefix + "ff", tx.deadline)
            with pytest.raises(TypeError, match="single bytes"):
                manual.enlist(p, b"abc")
            manual.enlist(p, [b"1"]).add(p, [b"2"])
            assert manual.participants == [p]
        log.close()


def test_crash_hook_sees_every_point_of_the_compiled_path(tmp_path):
    import engine.txn as txn_mod
    from engine import Log

    seen = []
    trace = tmp_path / "trace"
    txn_mod._arm_crash(None, str(trace))
    try:
        with Coordinator(tmp_path / "c", durability="none") as coord:
            log = Log(str(tmp_path / "a"), durability="none")
            with LogParticipant(log, name="A") as p:
                with coord.transaction() as tx:
                    tx.enlist(p, [b"1"])
            log.close()
    finally:
        txn_mod._arm_crash(None)
    seen = [line.rsplit("#", 1)[0] for line in trace.read_text().split()]
    assert seen == [
        "coord.open.before_incarnation",
        "coord.open.after_incarnation",
        "coord.prepare.send@A",
        "part.prepare.before_write@A",
        "part.prepare.after_write@A",
        "coord.prepare.vote@A",
        "coord.decision.before_write",
        "coord.decision.after_write",
        "coord.commit.send@A",
        "part.commit.before_apply@A",
        "log.commit.before_mark@A",
        "log.commit.after_mark@A",
        "log.commit.after_append@A",
        "part.commit.after_apply@A",
        "coord.commit.ack@A",
        "part.close.before_done@A",
        "part.close.after_done@A",
    ]


def test_python_overrides_of_a_built_in_participant_still_run(tmp_path):
    """The coordinator calls the built-in participants in C (cpdef), but a
    subclass's Python prepare/commit must still be the one that runs."""
    from engine import Log, LogReader, TransactionAborted

    calls = []

    class Picky(LogParticipant):
        def prepare(self, txid, ops):
            calls.append(("prepare", txid))
            if ops == [b"no"]:
                return False
            return super().prepare(txid, ops)

        def commit(self, txid):
            calls.append(("commit", txid))
            super().commit(txid)

    log = Log(str(tmp_path / "a"), durability="none")
    with Coordinator(tmp_path / "c", durability="none") as coord, Picky(log, name="A") as p:
        with coord.transaction() as tx:
            tx.enlist(p, [b"yes"])
        assert calls == [("prepare", tx.txid), ("commit", tx.txid)]
        with pytest.raises(TransactionAborted, match="voted no"):
            with coord.transaction() as tx2:
                tx2.enlist(p, [b"no"])
        assert calls[-1] == ("prepare", tx2.txid) and len(calls) == 3
    with LogReader(str(tmp_path / "a"), start=0) as r:
        assert [bytes(rec.value) for rec in r] == [b"yes"]
    log.close()
