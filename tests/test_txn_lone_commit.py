"""The commit phase of a lone durable transaction (one thread, ``"always"``).

Its LogParticipants' commits run side by side (engine._txn's
``_complete_split``): every commit mark is written, the journals synced
together, then every batch appended, the logs synced together.  These tests
check that the syncs do overlap, and that the overlap keeps the order the
protocol needs, seen through the log's sync hook: no participant hears of
the commit (its mark is durable) before the decision is; no batch is written
before its mark is durable (invariant L1 of engine.txn); and the commit
returns only once every batch is durable.

The coordinator runs the vote protocol (``redo=False``): commit by the
coordinator's log, the default for LogParticipants alone, syncs once and has
its own tests in tests/test_txn_onesync.py.
"""

from __future__ import annotations

import threading
import time

import pytest
from synchook import Durable, installed

from engine import Log, LogReader
from engine.txn import Coordinator, LogParticipant, read_journal

SEG = 1 << 16
HOLD = 0.03  # every watched sync takes this much longer: overlapping ones are seen in flight


def values(path):
    with LogReader(str(path), start=0) as r:
        return [bytes(rec.value) for rec in r]


def _offsets(journal_path, kind):
    """txid -> (offset of its ``kind`` record in the journal, the record)."""
    _cur, recs = read_journal(journal_path, meta=True)
    return {rec[1]: (off, rec) for off, _ts, rec in recs if rec[0] == kind}


class _Watch(Durable):
    """A sync hook that holds every sync of the participants' journals and
    logs for ``HOLD`` seconds (after the sync, before its durable end is
    recorded) and counts how many were held at once per kind of file during
    the commit phase (``peak``), checking the protocol's order at each."""

    def __init__(self, coord, parts):
        super().__init__()
        self.coord, self.parts = coord, parts
        self.journals = {p._journal.log.path: p for p in parts}
        self.logs = {p.log.path: p for p in parts}
        self.inflight = {"journal": 0, "log": 0}
        self.peak = {"journal": 0, "log": 0}
        self.committing = False  # the current transaction's decision is durable
        self.errors = []

    def __call__(self, path, info):
        kind = "journal" if path in self.journals else "log" if path in self.logs else None
        if kind is not None:
            self._check(path, kind)
            with self._lock:
                self.inflight[kind] += 1
                if self.committing:
                    self.peak[kind] = max(self.peak[kind], self.inflight[kind])
            time.sleep(HOLD)
            with self._lock:
                self.inflight[kind] -= 1
        super().__call__(path, info)
        if path == self.coord._journal.log.path:
            self.committing = True

    def _check(self, path, kind):
        ends = self.snapshot()
        if kind == "journal":
            # a durable mark tells its participant commit: the decision first
            p = self.journals[path]
            decisions = _offsets(self.coord.path, "C")
            for txid in _offsets(p._journal.path, "M"):
                if ends.get(self.coord._journal.log.path, 0) <= decisions[txid][0]:
                    self.errors.append(f"{txid}: mark at {p.name} before its decision was durable")
        else:
            # a batch in the log: its mark durable before it was written
            p = self.logs[path]
            jpath = p._journal.log.path
            written = p.log.next_offset
            for txid, (off, rec) in _offsets(p._journal.path, "M").items():
                if rec[2] < written and ends.get(jpath, 0) <= off:
                    self.errors.append(f"{txid}: batch at {p.name} before its mark was durable")


def _world(tmp_path):
    coord = Coordinator(tmp_path / "coord", durability="always", segment_bytes=SEG, redo=False)
    la = Log(str(tmp_path / "a"), durability="always", segment_bytes=SEG)
    lb = Log(str(tmp_path / "b"), durability="always", segment_bytes=SEG)
    pa, pb = LogParticipant(la, segment_bytes=SEG), LogParticipant(lb, segment_bytes=SEG)
    return coord, la, lb, pa, pb


@pytest.mark.parametrize("nparts", [2, 3])
def test_a_lone_transactions_commit_syncs_overlap_in_order(tmp_path, nparts):
    """One thread, two or three LogParticipants: the commit marks sync side
    by side, then the batches; each mark durable only after the decision,
    each batch written only after its mark is durable, and the commit
    returns with every batch durable."""
    coord, la, lb, pa, pb = _world(tmp_path)
    logs, parts = [la, lb], [pa, pb]
    if nparts == 3:
        logs.append(Log(str(tmp_path / "c"), durability="always", segment_bytes=SEG))
        parts.append(LogParticipant(logs[2], segment_bytes=SEG))
    hook = _Watch(coord, parts)
    try:
        with installed(hook):
            for i in range(4):
                hook.committing = False
                hook.peak = {"journal": 0, "log": 0}
                with coord.transaction() as tx:
                    for k, p in enumerate(parts):
                        tx.enlist(p, [b"%d-%d" % (k, i), b"%d-%d+" % (k, i)][: 1 + k % 2])
                ends = hook.snapshot()
                for k, lg in enumerate(logs):
                    assert lg.next_offset == (i + 1) * (1 + k % 2)
                    assert ends.get(lg.path, 0) >= lg.next_offset, (
                        f"transaction {i}: returned before the batch of {lg.path} was durable"
                    )
                assert hook.peak == {"journal": 2, "log": 2}, (
                    f"transaction {i}: the commit syncs ran one after the other: {hook.peak}"
                )
        assert not hook.errors, hook.errors
        assert all(p.recover() == [] for p in parts) and coord.in_doubt() == []
    finally:
        for x in (*parts, coord, *logs):
            x.close()
    for k in range(nparts):
        want = [x for i in range(4) for x in (b"%d-%d" % (k, i), b"%d-%d+" % (k, i))[: 1 + k % 2]]
        assert values(tmp_path / "abc"[k]) == want


def test_a_busy_participant_commits_the_sequential_way(tmp_path):
    """A participant whose log another writer holds (its commit lock taken):
    the lone transaction does not wait for it with the others' locks held;
    it commits participant after participant, each batch whole, in order."""
    coord, la, lb, pa, pb = _world(tmp_path)
    try:
        assert pb._commit_lock.acquire(False)
        released = threading.Timer(0.2, pb._commit_lock.release)
        released.start()
        with coord.transaction() as tx:
            tx.enlist(pa, [b"a0"])
            tx.enlist(pb, [b"b0"])
        released.join()
        with coord.transaction() as tx:
            tx.enlist(pa, [b"a1"])
            tx.enlist(pb, [b"b1"])
        assert pa.recover() == [] and pb.recover() == [] and coord.in_doubt() == []
    finally:
        for x in (pa, pb, coord, la, lb):
            x.close()
    assert values(tmp_path / "a") == [b"a0", b"a1"]
    assert values(tmp_path / "b") == [b"b0", b"b1"]


# ---------------------------------------------------------------------------
# SIGKILL at every crash point of lone durable transactions

LONE_TXNS = 2


def _lone_scenario(root):
    """Lone durable transactions over two LogParticipants; each acknowledged
    tag is appended to ``acked`` (unbuffered) right after its commit returns."""
    import os

    coord, la, lb, pa, pb = _world_at(root)
    fd = os.open(f"{root}/acked", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    for i in range(LONE_TXNS):
        tag = b"T%d" % i
        with coord.transaction() as tx:
            tx.enlist(pa, [tag])
            tx.enlist(pb, [tag + b"/b", tag + b"/b+"])
        os.write(fd, tag + b"\n")
    for x in (pa, pb, coord, la, lb):
        x.close()
    return "done"


def _world_at(root):
    from pathlib import Path

    coord, la, lb, pa, pb = _world(Path(root))
    coord.recover([pa, pb])
    return coord, la, lb, pa, pb


@pytest.mark.crash
def test_sigkill_at_every_point_of_a_lone_commit(tmp_path):
    """SIGKILL at every hit of every crash point that lone durable
    transactions pass, then reopen and recover: each transaction whole at
    both participants or at neither, none applied twice, every acknowledged
    one there, and the participants keep working."""
    import crashkit

    points = crashkit.trace(_lone_scenario, str(tmp_path / "trace"), timeout=120)
    assert f"log.commit.after_mark@log:b#{LONE_TXNS}" in points
    for i, spot in enumerate(points):
        root = str(tmp_path / f"p{i}")
        res = crashkit.run(_lone_scenario, root, crash_at=spot, timeout=120)
        assert res.killed, (spot, res.error)
        coord, la, lb, pa, pb = _world_at(root)
        try:
            a, b = values(la.path), values(lb.path)
            assert len(a) == len(set(a)), (spot, "a batch applied twice", a)
            assert [x + s for x in a for s in (b"/b", b"/b+")] == b, (spot, "half a transaction", a, b)
            try:
                with open(f"{root}/acked", "rb") as f:
                    acked = f.read().split()
            except FileNotFoundError:
                acked = []
            assert acked == a[: len(acked)], (spot, "acknowledged transactions lost", acked, a)
            assert pa.recover() == [] and pb.recover() == [] and coord.in_doubt() == [], spot
            with coord.transaction() as tx:
                tx.enlist(pa, [b"after"])
                tx.enlist(pb, [b"after/b", b"after/b+"])
        finally:
            for x in (pa, pb, coord, la, lb):
                x.close()
        assert values(la.path)[-1] == b"after"
