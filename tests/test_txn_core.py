"""The compiled core of two-phase commit (engine._txn, pyx/txn.pyx).

Its record encoder must write exactly marshal's version-2 bytes (journals are
read back with marshal.loads, by this version and every earlier one), for the
shapes it encodes itself and for those it hands to marshal.  The protocol
itself is tested through engine.txn (tests/test_txn*.py, tests/stress).
"""

from __future__ import annotations

import marshal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import _txn
from engine.txn import Coordinator, LogParticipant, Transaction

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**40), max_value=2**40)
    | st.integers(min_value=-(2**31), max_value=2**31 - 1)
    | st.binary(max_size=40)
    | st.text(max_size=20)
    | st.text(alphabet=st.characters(max_codepoint=127), max_size=20)
    | st.floats(allow_nan=False)
)
records = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.lists(inner, max_size=5).map(tuple),
    max_leaves=30,
)


@settings(max_examples=600, deadline=None)
@given(records)
def test_encode_writes_marshal_version_2_bytes(rec):
    assert _txn._encode(rec) == marshal.dumps(rec, 2)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["P", "C", "é"]), st.none() | st.text(max_size=30), records)
def test_encode_record_writes_the_tuple_marshal_writes(kind, txid, body):
    # the per-transaction records, written without building their tuple
    assert _txn._encode_record(kind, txid, body) == marshal.dumps((kind, txid, body), 2)


@pytest.mark.parametrize(
    "rec",
    [
        ("P", "0123456789ab-1-1f", ([b"x" * 64], None)),
        ("P", "0123456789ab-1-20", ([b"a", b"b"], [b"k", None])),
        ("C", "0123456789ab-1-1f", ("log:a", "log:b")),
        ("C", "0123456789ab-1-1f", 2**31 - 1),
        ("C", "0123456789ab-1-1f", 2**31),  # beyond marshal's 'i': marshal writes it
        ("C", "0123456789ab-1-1f", -(2**31)),
        ("E", [f"0123456789ab-1-{i:x}" for i in range(64)]),
        ("I", 7),
        ("A", "é-not-ascii"),
        ("deep",) + ((((((((((("x",),),),),),),),),),),),  # nested past the encoder's depth
        (b"", "", (), []),
    ],
)
def test_encode_journal_shapes(rec):
    raw = _txn._encode(rec)
    assert raw == marshal.dumps(rec, 2)
    assert marshal.loads(raw) == rec


def test_subclasses_of_encoded_types_go_to_marshal():
    class S(str):
        pass

    class B(bytes):
        pass

    def outcome(f, rec):
        try:
            return f(rec)
        except ValueError as exc:  # marshal: "unmarshallable object"
            return str(exc)

    for rec in [("C", S("x")), ("P", B(b"y")), (True, False, 1), ("C", 1.5)]:
        assert outcome(_txn._encode, rec) == outcome(lambda r: marshal.dumps(r, 2), rec)


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
