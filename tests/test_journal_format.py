"""The on-disk format of the transaction journals (pyx/journal.pxi).

Records are written in the journal format (a 0x00 marker, a format version,
the kind's letter, tagged values) and read in it or in the marshal format
that releases before it wrote, record by record.  Checked here: every kind
round-trips; marshal records (fixture bytes, and marshal's own output for
random records) decode to what marshal reads, with the commit mark's old "C"
told from the commit decision's by the journal's kind; journals written in
marshal open, and keep working once new records follow the old ones; hostile
bytes raise CorruptLog, bounded in time and memory.
"""

from __future__ import annotations

import json
import marshal
import os
import struct
import tracemalloc
import uuid
from collections import OrderedDict

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import CorruptLog, Log, LogReader, VersionedStore
from engine._txn import (
    JOURNAL_FORMAT,
    REC_ABORTED,
    REC_DECISION,
    REC_DONE,
    REC_ENDED,
    REC_INCARNATION,
    REC_MARK,
    REC_PREPARED,
    _decode_record,
    _encode,
    _encode_record,
)
from engine.txn import (
    Coordinator,
    LogParticipant,
    OffsetParticipant,
    StoreParticipant,
    _decode,
    decision,
    read_journal,
    summarize_journal,
)

COORD_KINDS = {REC_INCARNATION, REC_DECISION, REC_ENDED}
PART_KINDS = {REC_PREPARED, REC_MARK, REC_ABORTED, REC_DONE}
MARSHAL_VERSIONS = range(
    2, marshal.version + 1
)  # 2: the compiled encoder; default: the first releases


def typed(v):
    """``v`` with every type spelled out (True != 1, (1,) != [1], NaN == NaN)."""
    if isinstance(v, float):
        return ("float", struct.pack("<d", v))
    if isinstance(v, (list, tuple)):
        return (type(v).__name__, [typed(x) for x in v])
    if isinstance(v, dict):
        return ("dict", [(typed(k), typed(x)) for k, x in v.items()])
    return (type(v).__name__, v)


def coordinator_journal(kind):
    return kind == "coordinator"


# ---------------------------------------------------------------------------
# strategies

texts = st.text(max_size=24) | st.text(
    alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), max_size=3
)  # lone surrogates: a str may hold them, and marshal kept them
txids = st.text(alphabet="0123456789abcdef-", min_size=1, max_size=30) | texts
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.sampled_from([2**63, -(2**63) - 1, 2**64, -(2**64)])
    | st.floats()
    | st.binary(max_size=40)
    | texts
)
hashables = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3).map(tuple), max_leaves=6
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.lists(inner, max_size=5).map(tuple)
        | st.dictionaries(hashables, inner, max_size=4)
    ),
    max_leaves=30,
)
txid_lists = st.lists(txids, max_size=70)
offsets = st.integers(min_value=0) | st.integers(min_value=0, max_value=2**40)

records = st.one_of(
    st.tuples(st.just(REC_INCARNATION), st.integers()),
    st.tuples(
        st.just(REC_DECISION), txids, st.lists(texts, max_size=4).map(tuple) | st.lists(texts)
    ),
    st.tuples(st.just(REC_ENDED), txid_lists),
    st.tuples(st.just(REC_PREPARED), txids, values),
    st.tuples(st.just(REC_MARK), txids, offsets),
    st.tuples(st.just(REC_ABORTED), txids),
    st.tuples(st.just(REC_DONE), txid_lists | txid_lists.map(tuple)),
)


def journal_of(rec):
    return "coordinator" if rec[0] in COORD_KINDS else "log-participant"


def legacy(rec):
    """``rec`` as releases before the journal format held it: "C" for a mark."""
    return ("C",) + rec[1:] if rec[0] == REC_MARK else rec


# ---------------------------------------------------------------------------
# the journal format


def test_record_kinds_are_distinct_letters():
    kinds = [
        REC_INCARNATION,
        REC_DECISION,
        REC_ENDED,
        REC_PREPARED,
        REC_MARK,
        REC_ABORTED,
        REC_DONE,
    ]
    assert len(set(kinds)) == 7 and all(isinstance(k, str) and len(k) == 1 for k in kinds)
    assert REC_DECISION != REC_MARK  # one letter meant both in the marshal records


@settings(max_examples=800, deadline=None)
@given(records)
def test_every_kind_round_trips(rec):
    raw = _encode(rec)
    assert raw[:3] == bytes([0, JOURNAL_FORMAT, ord(rec[0])])
    back = _decode_record(raw, journal_of(rec) == "coordinator")
    assert typed(back) == typed(rec)
    assert back[0] is rec[0]  # the module's kind constant, not an equal copy
    if len(rec) == 3:  # the per-transaction records, written without their tuple
        assert _encode_record(*rec) == raw


def test_values_are_written_as_their_base_types():
    class Int(int):
        pass

    class Str(str):
        pass

    class Tup(tuple):
        pass

    ops = [Int(7), Str("s"), bytearray(b"ba"), Tup((1,)), OrderedDict(a=1), True, 2.5]
    rec = _decode_record(_encode((REC_PREPARED, Str("t"), ops)), False)
    assert typed(rec) == typed((REC_PREPARED, "t", [7, "s", b"ba", (1,), {"a": 1}, True, 2.5]))
    assert _decode_record(_encode_record(REC_MARK, "t", Int(5)), False) == (REC_MARK, "t", 5)


@pytest.mark.parametrize(
    "rec, error",
    [
        ((REC_PREPARED, "t", {1, 2}), TypeError),  # a set: no record holds one
        ((REC_PREPARED, "t", [object()]), TypeError),
        ((REC_PREPARED, "t", memoryview(b"x")), TypeError),
        ((REC_PREPARED, 5, None), ValueError),  # a txid is a str
        ((REC_MARK, "t", -1), ValueError),  # a log offset is >= 0
        ((REC_MARK, "t", True), ValueError),
        ((REC_MARK, "t", "0"), ValueError),
        ((REC_DECISION, "t", "names"), ValueError),
        ((REC_DONE, ["t", 5]), ValueError),
        ((REC_INCARNATION, 1.0), ValueError),
        ((REC_ABORTED,), ValueError),
        ((REC_ABORTED, "t", "extra"), ValueError),
        (("Z", "t"), ValueError),  # no such kind
        (("PP", "t", None), ValueError),
        (("P", "t", None, None), ValueError),
        ((), TypeError),
        (["P", "t", None], TypeError),
    ],
)
def test_the_encoder_refuses_what_the_decoder_would(rec, error):
    with pytest.raises(error):
        _encode(rec)
    if isinstance(rec, tuple) and len(rec) == 3 and isinstance(rec[1], str):
        with pytest.raises(error):  # the per-transaction path refuses them too
            _encode_record(*rec)


def nested(lists, leaf="leaf"):
    v = leaf
    for _ in range(lists):
        v = [v]
    return v


def test_nesting_is_bounded_alike_when_writing_and_reading():
    # the record's items are level 1: a value 63 lists deep has its leaf at
    # level 64, the deepest there may be
    ok = (REC_PREPARED, "t", nested(63))
    assert _decode_record(_encode(ok), False) == ok
    with pytest.raises(ValueError, match="deeper"):
        _encode((REC_PREPARED, "t", nested(64)))
    with pytest.raises(ValueError, match="deeper"):
        _encode((REC_PREPARED, "t", nested(5000)))  # no RecursionError, no crash
    head = b"\x00\x01P" + b"\x07\x01\x00\x00\x00t"
    one_list = b"\x09\x01\x00\x00\x00"
    assert _decode_record(head + one_list * 63 + b"\x00", False) == (
        REC_PREPARED,
        "t",
        nested(63, None),
    )
    with pytest.raises(ValueError, match="deeper"):
        _decode_record(head + one_list * 64 + b"\x00", False)
    with pytest.raises(ValueError, match="deeper"):
        _decode_record(head + one_list * 100_000, False)


def test_a_record_of_a_later_format_is_refused_by_name(tmp_path):
    raw = bytearray(_encode((REC_ABORTED, "t")))
    raw[1] = JOURNAL_FORMAT + 1
    with pytest.raises(CorruptLog, match="later release"):
        _decode(bytes(raw), "log-participant", "gen", 7)


# ---------------------------------------------------------------------------
# the marshal records of older releases

# As the encoder before the journal format wrote them: marshal version 2
# (the compiled encoder) and marshal's default, version 4 (the first releases).
T = "0123456789ab-1-1"
FIXTURE = [
    # (record as marshal held it, journal, marshal v2 bytes, marshal v4 bytes, decoded)
    (
        ("I", 1),
        "coordinator",
        "28020000007501000000496901000000",
        "a902da0149e901000000",
        (REC_INCARNATION, 1),
    ),
    (
        ("C", T, ("log:a", "log:b")),
        "coordinator",
        "280300000075010000004375100000003031323334353637383961622d312d3128020000007505000000"
        "6c6f673a6175050000006c6f673a62",
        "a903da0143fa103031323334353637383961622d312d31a902fa056c6f673a61fa056c6f673a62",
        (REC_DECISION, T, ("log:a", "log:b")),
    ),
    (
        ("E", [T]),
        "coordinator",
        "28020000007501000000455b0100000075100000003031323334353637383961622d312d31",
        "a902da01455b01000000fa103031323334353637383961622d312d31",
        (REC_ENDED, [T]),
    ),
    (
        ("P", T, ([b"x1", b"x2"], None)),
        "log-participant",
        "280300000075010000005075100000003031323334353637383961622d312d3128020000005b0200000073"
        "020000007831730200000078324e",
        "a903da0150fa103031323334353637383961622d312d3129025b02000000f3020000007831f30200000078324e",
        (REC_PREPARED, T, ([b"x1", b"x2"], None)),
    ),
    (
        ("C", T, 0),
        "log-participant",
        "280300000075010000004375100000003031323334353637383961622d312d316900000000",
        "a903da0143fa103031323334353637383961622d312d31e900000000",
        (REC_MARK, T, 0),
    ),
    (
        ("A", T),
        "log-participant",
        "280200000075010000004175100000003031323334353637383961622d312d31",
        "a902da0141fa103031323334353637383961622d312d31",
        (REC_ABORTED, T),
    ),
    (
        ("D", [T]),
        "log-participant",
        "28020000007501000000445b0100000075100000003031323334353637383961622d312d31",
        "a902da01445b01000000fa103031323334353637383961622d312d31",
        (REC_DONE, [T]),
    ),
]


@pytest.mark.parametrize("rec, journal, v2, v4, decoded", FIXTURE)
def test_marshal_records_of_older_releases_decode(rec, journal, v2, v4, decoded):
    for raw in (bytes.fromhex(v2), bytes.fromhex(v4)):
        assert raw[0] != 0  # a marshal record never starts with the marker
        assert typed(_decode_record(raw, journal == "coordinator")) == typed(decoded)
        assert typed(_decode(raw, journal)) == typed(decoded)
    # the fixture is what marshal writes for these records (while it still does)
    assert marshal.dumps(rec, 2).hex() == v2


def test_the_old_commit_letter_means_decision_or_mark_by_journal():
    old = marshal.dumps(("C", T, 5), 2)
    assert _decode_record(old, False) == (REC_MARK, T, 5)
    with pytest.raises(ValueError):  # a decision names participants, not an offset
        _decode_record(old, True)
    names = marshal.dumps(("C", T, ("a",)), 2)
    assert _decode_record(names, True) == (REC_DECISION, T, ("a",))
    # each journal refuses the other's kinds, in either format
    for rec in [(REC_DECISION, T, ("a",)), (REC_INCARNATION, 1), (REC_ENDED, [T])]:
        with pytest.raises(ValueError, match="participant journal"):
            _decode_record(_encode(rec), False)
    for rec in [(REC_MARK, T, 5), (REC_PREPARED, T, None), (REC_ABORTED, T), (REC_DONE, [T])]:
        with pytest.raises(ValueError, match="coordinator journal"):
            _decode_record(_encode(rec), True)
    with pytest.raises(ValueError, match="coordinator journal"):
        _decode_record(marshal.dumps(("P", T, None), 2), True)


@settings(max_examples=800, deadline=None)
@given(records, st.sampled_from(list(MARSHAL_VERSIONS)))
def test_marshal_records_decode_as_marshal_reads_them(rec, version):
    # the claim the marker rests on: marshal starts these tuples with ( or ),
    # maybe with its reference flag, never with 0x00
    raw = marshal.dumps(legacy(rec), version)
    assert raw[0] in (0x28, 0x29, 0xA8, 0xA9)
    back = _decode_record(raw, journal_of(rec) == "coordinator")
    assert typed(back) == typed(rec)
    expected = marshal.loads(raw)
    assert typed(back[1:]) == typed(expected[1:])


def test_marshal_back_references_are_followed():
    s = "s-" + "x" * 10
    lst = [s, s]
    rec = ("P", T, (lst, lst, [s, (s, lst)]))
    raw = marshal.dumps(rec, 4)
    assert raw.count(b"r") >= 3  # written once, referenced after
    assert _decode_record(raw, False) == (REC_PREPARED,) + rec[1:]
    # a reference to an object not yet read, or to the container being read
    with pytest.raises(ValueError, match="back-reference"):
        _decode_record(b"\xa9\x02" + b"r\x00\x00\x00\x00" + b"N", False)
    with pytest.raises(ValueError, match="back-reference"):
        _decode_record(b"\xa9\x02\xda\x01Ar\x05\x00\x00\x00", False)


def test_marshal_never_takes_a_new_record_for_its_own():
    # an older release reading a journal this one wrote says it is corrupt
    # (marshal refuses the marker) instead of misreading it
    for rec in [(REC_INCARNATION, 3), (REC_PREPARED, T, [b"x"]), (REC_DONE, [T])]:
        with pytest.raises(ValueError, match="bad marshal data"):
            marshal.loads(_encode(rec))


# ---------------------------------------------------------------------------
# journals on disk: written by an older release, then by this one


def journal(path, kind, raws):
    """A journal as its owner leaves it: CURRENT, one generation holding the
    records ``raws(journal id prefix)`` returns (bytes each)."""
    jid = uuid.uuid4().hex
    os.makedirs(path, mode=0o700)
    os.mkdir(os.path.join(path, "gen-00000001"), 0o700)
    with Log(os.path.join(path, "gen-00000001"), durability="none", segment_bytes=1 << 20) as log:
        for raw in raws(jid[:12]):
            log.append(raw)
    with open(os.path.join(path, "CURRENT"), "w") as f:
        json.dump({"kind": kind, "id": jid, "gen": 1}, f)
    return jid


def old_journal(path, kind, recs, version=2):
    """A journal as releases before the journal format left it: every record
    ``marshal.dumps(rec, version)``."""
    return journal(path, kind, lambda p: [marshal.dumps(rec, version) for rec in recs(p)])


def raw_records(path):
    cur = json.load(open(os.path.join(path, "CURRENT")))
    with LogReader(os.path.join(path, f"gen-{cur['gen']:08d}"), start=0) as r:
        return [bytes(rec.value) for rec in r]


@pytest.mark.parametrize("version", [2, 4])
def test_a_coordinator_journal_written_in_marshal_opens_and_keeps_working(tmp_path, version):
    path = str(tmp_path / "coord")
    old_journal(
        path,
        "coordinator",
        lambda p: [
            ("I", 1),
            ("C", f"{p}-1-1", ("log:a",)),
            ("C", f"{p}-1-2", ("log:a", "log:b")),
            ("E", [f"{p}-1-1"]),
        ],
        version,
    )
    jid = json.load(open(os.path.join(path, "CURRENT")))["id"]
    t1, t2, t3 = (f"{jid[:12]}-1-{i}" for i in (1, 2, 3))
    assert decision(path, t2) == "commit" and decision(path, t1) == "commit"
    assert decision(path, t3) == "abort"  # never decided, and its incarnation is gone
    assert [e["txid"] for e in summarize_journal(path)["in_doubt"]] == [t2]

    log = Log(str(tmp_path / "a"), durability="none")
    with Coordinator(path, durability="none") as coord, LogParticipant(log, name="log:a") as pa:
        assert coord.incarnation == 2 and coord.in_doubt() == [t2]
        with coord.transaction() as tx:  # new records after the old ones
            tx.enlist(pa, [b"new"])
        new = tx.txid
    with Coordinator(path, durability="none") as coord:  # a mixed journal replays
        assert coord.incarnation == 3 and coord.in_doubt() == [t2]
    assert decision(path, new) == "commit" and decision(path, t2) == "commit"
    raws = raw_records(path)
    assert [r[0] != 0 for r in raws] == [True] * 4 + [False] * (len(raws) - 4)
    _cur, recs = read_journal(path)
    assert recs[:4] == [
        (REC_INCARNATION, 1),
        (REC_DECISION, t1, ("log:a",)),
        (REC_DECISION, t2, ("log:a", "log:b")),
        (REC_ENDED, [t1]),
    ]
    assert (REC_DECISION, new, ("log:a",)) in recs[4:]
    log.close()


@pytest.mark.parametrize("version", [2, 4])
def test_a_participant_journal_written_in_marshal_opens_and_keeps_working(tmp_path, version):
    state = str(tmp_path / "a.txn")
    t = [f"0123456789ab-1-{i}" for i in range(6)]
    old_journal(
        state,
        "log-participant",
        lambda _p: [
            ("P", t[1], ([b"x1", b"x2"], None)),
            ("C", t[1], 0),  # the commit mark: its batch starts at offset 0
            ("P", t[2], ([b"y"], [b"k"])),  # in doubt
            ("P", t[3], ([b"z"], None)),
            ("A", t[3]),
            ("P", t[4], ([b"w"], None)),
            ("D", [t[4]]),
        ],
        version,
    )
    summary = summarize_journal(state)  # txn ls: the mark reads as a commit
    assert {e["txid"]: e["state"] for e in summary["recent"]} == {
        t[1]: "committed",
        t[3]: "aborted",
        t[4]: "committed",
    }
    assert [e["txid"] for e in summary["in_doubt"]] == [t[2]]

    log = Log(str(tmp_path / "a"), durability="none")

    def contents():
        with LogReader(str(tmp_path / "a"), start=0) as r:
            return [(None if rec.key is None else bytes(rec.key), bytes(rec.value)) for rec in r]

    with LogParticipant(log, name="A", state_path=state) as p:
        assert contents() == [(None, b"x1"), (None, b"x2")]  # the marked batch, finished
        assert p.recover() == [t[2]]
        p.commit(t[2])  # new records follow the old ones
        assert p.prepare(t[5], [b"v"])
    raws = raw_records(state)
    assert raws[0][0] != 0 and raws[-1][0] == 0
    with LogParticipant(log, name="A", state_path=state) as p:  # a mixed journal replays
        assert p.recover() == [t[5]]
        p.abort(t[5])
    with LogParticipant(log, name="A", state_path=state) as p:
        assert p.recover() == []
    assert contents() == [(None, b"x1"), (None, b"x2"), (b"k", b"y")]
    log.close()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(records, st.sampled_from(["new", 2, 4])), max_size=16), st.booleans())
def test_a_generation_mixing_both_formats_reads_in_order(tmp_path_factory, recs, coordinator):
    kinds = COORD_KINDS if coordinator else PART_KINDS
    recs = [(r, how) for r, how in recs if r[0] in kinds]
    gen = str(tmp_path_factory.mktemp("gen") / "gen-00000001")
    with Log(gen, durability="none", segment_bytes=1 << 16) as log:
        for rec, how in recs:
            log.append(_encode(rec) if how == "new" else marshal.dumps(legacy(rec), how))
    kind = "coordinator" if coordinator else "offset-participant"
    with LogReader(gen, start=0) as r:
        back = [_decode(x.value, kind, gen, x.offset) for x in r]
    assert typed(back) == typed([r for r, _how in recs])


# ---------------------------------------------------------------------------
# hostile bytes


def decode_or_corrupt(raw, kind):
    """What a journal reader does with ``raw``: a record of ``kind``'s journal, or CorruptLog."""
    tracemalloc.start()
    try:
        rec = _decode(raw, kind, "gen", 3)
    except CorruptLog as exc:
        assert exc.position == 3 and "gen" in str(exc)
        rec = None
    finally:
        _cur, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    # every length and count is checked against the bytes left before anything
    # is allocated: what a record costs is bounded by its size
    assert peak <= 100 * len(raw) + (64 << 10), (peak, len(raw))
    if rec is not None:
        assert type(rec) is tuple and rec[0] in (
            COORD_KINDS if kind == "coordinator" else PART_KINDS
        )
    return rec


journal_kinds = st.sampled_from(["coordinator", "log-participant"])


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200), journal_kinds)
def test_random_bytes_are_a_record_or_corrupt(raw, kind):
    decode_or_corrupt(raw, kind)


heads = st.sampled_from(
    [b"\x00\x01" + k.encode() for k in "ICEPMAD"] + [b"(", b"\xa9", b")\x03", b"[", b"{"]
)
big = st.sampled_from([0x7FFFFFFF, 0xFFFFFFFF, 0x80000000, 1 << 30, 65535])
tags = st.sampled_from(
    b"\x00\x03\x04\x06\x07\x08\x09\x0a(sul[{r)"
)  # both formats' length/count tags


@settings(max_examples=1000, deadline=None)
@given(heads, st.lists(st.tuples(tags, big)), st.binary(max_size=40), journal_kinds)
def test_huge_lengths_and_counts_allocate_nothing_big(head, claims, tail, kind):
    raw = head + b"".join(bytes([tag]) + n.to_bytes(4, "little") for tag, n in claims) + tail
    decode_or_corrupt(raw, kind)


encoded = st.one_of(
    records.map(lambda r: (_encode(r), journal_of(r))),
    st.tuples(records, st.sampled_from(list(MARSHAL_VERSIONS))).map(
        lambda rv: (marshal.dumps(legacy(rv[0]), rv[1]), journal_of(rv[0]))
    ),
)


@settings(max_examples=400, deadline=None)
@given(encoded)
def test_every_truncated_record_is_corrupt(enc):
    raw, kind = enc
    for n in range(len(raw)):
        with pytest.raises(CorruptLog):
            _decode(raw[:n], kind)


@settings(max_examples=1500, deadline=None)
@given(encoded, st.data())
def test_bit_flipped_records_are_a_record_or_corrupt(enc, data):
    raw, kind = enc
    flips = data.draw(st.lists(st.integers(0, len(raw) * 8 - 1), min_size=1, max_size=3))
    b = bytearray(raw)
    for bit in flips:
        b[bit // 8] ^= 1 << (bit % 8)
    decode_or_corrupt(bytes(b), kind)


@pytest.mark.parametrize(
    "raw, reason",
    [
        (b"", "empty"),
        (b"\x00", "truncated"),
        (b"\x00\x00P\x07\x01\x00\x00\x00t\x00", "no release wrote"),
        (b"\x00\x01Z", "'Z' record"),
        (b"\x00\x01P\x07\x01\x00\x00\x00t\x0b", "tag 0x0b"),
        (b"\x00\x01A\x07\x01\x00\x00\x00t\x00", "holds (txid str), not (str, NoneType)"),
        (b"\x00\x01P\x07\x01\x00\x00\x00t\x00\x00", "1 bytes after the record's items"),
        (b"\x00\x01P\x07\x01\x00\x00\x00t\x07\x02\x00\x00\x00\xff\xfe", "utf-8"),
        (b"\x00\x01P\x07\x01\x00\x00\x00t\x0a\x01\x00\x00\x00\x09\x00\x00\x00\x00\x00", "dict key"),
        (b"\x00\x01P\x07\xff\xff\xff\xff", "truncated"),
        (b"\x00\x01P\x07\x01\x00\x00\x00t\x08\xff\xff\xff\xff", "count of"),
        (b"(\xff\xff\xff\x7f", "count of"),  # marshal would allocate a 16 GiB tuple first
        (b"[\xff\xff\xff\x7f", "count of"),
        (b"s\xff\xff\xff\x7f", "truncated"),
        (b"l\xff\xff\xff\x7f", "count of"),
        (b"(\x01\x00\x00\x00l\x01\x00\x00\x00\x00\x80", "long digits"),
        (b"(\x01\x00\x00\x00s\xff\xff\xff\xff", "negative length"),
        (b"c" + b"\x00" * 40, "type code 'c'"),  # a code object: never in a journal
        (b"(\x01\x00\x00\x00<\x00\x00\x00\x00", "type code '<'"),
        (b"\xa9\x01\xce", "reference flag"),
        (b"\x29\x02\x4e\x4e\x4e", "after the record"),
        (b"N", "not a journal record"),
        (b")\x02z\x01Qi\x01\x00\x00\x00", "'Q' record"),
        (b")\x02z\x02PP\x4e", "'PP' record"),
        (b"(" + b"\x01\x00\x00\x00(" * 100 + b"\x00\x00\x00\x00", "deeper"),
    ],
)
def test_hostile_records_say_what_is_wrong(raw, reason):
    with pytest.raises(CorruptLog, match="record 3: undecodable record") as err:
        _decode(raw, "log-participant", "gen", 3)
    assert reason.lower() in str(err.value).lower()
    decode_or_corrupt(raw, "log-participant")


def test_a_long_marshal_int_decodes_in_linear_time():
    digits = 200_000  # a 400 kB int: quadratic decoding would take minutes
    raw = b")\x03z\x01Pz\x01tl" + digits.to_bytes(4, "little") + b"\xff\x7f" * digits
    rec = decode_or_corrupt(raw, "log-participant")
    assert rec[2] == (1 << (15 * digits)) - 1


def test_a_corrupt_record_in_a_journal_is_reported_not_crashed_on(tmp_path):
    path = str(tmp_path / "coord")
    with Coordinator(path, durability="none") as coord:
        coord._journal.log.append(b"(\xff\xff\xff\x7f")
    with pytest.raises(CorruptLog) as err:
        Coordinator(path, durability="none")
    assert err.value.position == 1 and "gen-00000001" in err.value.segment
    with pytest.raises(CorruptLog):
        read_journal(path)


def open_participant(kind, tmp_path, state):
    if kind == "log-participant":
        return LogParticipant(
            Log(str(tmp_path / "a"), durability="none"), name="A", state_path=state
        )
    if kind == "store-participant":
        store = VersionedStore(str(tmp_path / "s"), durability="none")
        return StoreParticipant(store, name="S", state_path=state, durability="none")
    Log(str(tmp_path / "src"), durability="none").close()
    reader = LogReader(str(tmp_path / "src"), group="g")
    return OffsetParticipant(reader, state_path=state, durability="none")


@pytest.mark.parametrize(
    "kind, info",
    [
        ("log-participant", 5),
        ("log-participant", ([], None)),  # no values
        ("log-participant", ([b"x"], [b"k", b"j"])),  # more keys than values
        ("log-participant", ([b"x"], b"k")),
        ("log-participant", ([b"x", "y"], None)),
        ("log-participant", [b"x"]),
        ("store-participant", [(b"k",)]),
        ("store-participant", [("k", None, 1)]),
        ("store-participant", [(b"k", b"v", "1")]),
        ("store-participant", 5),
        ("offset-participant", -1),
        ("offset-participant", "12"),
        ("offset-participant", None),
    ],
)
def test_a_prepared_record_its_participant_never_writes_is_corrupt(tmp_path, kind, info):
    """It decodes, but replaying it would fail later, somewhere else."""
    state = str(tmp_path / "p.txn")
    journal(state, kind, lambda p: [_encode((REC_PREPARED, f"{p}-1-1", info))])
    with pytest.raises(CorruptLog, match="does not hold a .*Participant's ops"):
        open_participant(kind, tmp_path, state)


@pytest.mark.parametrize(
    "kind, info",
    [
        ("log-participant", ([b"x"], None)),
        ("log-participant", ([b"x", b"y"], [b"k", None])),
        ("store-participant", [(b"k", b"v", 0), (b"j", None, 3)]),
        ("offset-participant", 12),
    ],
)
def test_what_each_participant_writes_replays(tmp_path, kind, info):
    state = str(tmp_path / "p.txn")
    jid = journal(state, kind, lambda p: [_encode((REC_PREPARED, f"{p}-1-1", info))])
    with open_participant(kind, tmp_path, state) as p:
        assert p.recover() == [f"{jid[:12]}-1-1"]
