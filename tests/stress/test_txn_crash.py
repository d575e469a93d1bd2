"""Exhaustive crash points of two-phase commit, SIGKILLed in real processes.

For 2 and 3 participants (a Log, a VersionedStore and, with 3, a LogReader
group offset) and for both outcomes (all vote yes; the last participant votes
no), a forked child first runs the transaction unarmed and records every crash
point it passes: before/after each durable write (prepared records, the commit
mark, the coordinator's decision and end records) and before/after each
message (prepare sent, vote received, commit/abort sent, ack received), for
the coordinator and for each participant.  Then, for every one of those
points, a fresh child runs the same transaction and is SIGKILLed exactly
there; a second child restarts everything and runs recovery, itself armed to
die at one recovery step (a different one each time); finally the test
process restarts everything once more, recovers, and checks:

* every participant is resolved (nothing in doubt anywhere) and all of them
  committed or all aborted, exactly as the kill point dictates (committed iff
  the kill came after the decision record was written);
* a committed transaction's writes are all visible exactly once (the log batch
  whole and not duplicated, both store keys moved, the offset committed), an
  aborted one's not at all (no partial batch, keys unchanged and unlocked);
* the system keeps working: a new transaction over the same participants commits.

Children are forked from the test process (tests/crashkit.py), so a kill costs
a fork, not an interpreter start.
"""

from __future__ import annotations

import os
import random
import shutil

import crashkit
import pytest

from engine._log import Log, LogReader
from engine.errors import TransactionAborted
from engine.txn import Coordinator, LogParticipant, OffsetParticipant, StoreParticipant
from engine.versions import VersionedStore

pytestmark = pytest.mark.crash


SEG = 1 << 16
BATCH = [b"T-a1", b"T-a2", b"T-a3"]
RECOVERY_POINTS = [
    "part.commit.before_apply",
    "part.commit.after_apply",
    "log.commit.after_append",
    "part.abort.before_write",
    "part.abort.after_write",
    "coord.commit.send",
    "coord.commit.ack",
    "coord.end.before_write",
    "coord.end.after_write",
]


class World:
    """Every party of the scenario, opened on ``root`` (a restart = a new World)."""

    def __init__(self, root: str, nparts: int, compact: int = 50_000) -> None:
        fresh = not os.path.exists(os.path.join(root, "ready"))
        self.alog = Log(os.path.join(root, "a"), durability="none", segment_bytes=SEG)
        self.store = VersionedStore(
            os.path.join(root, "s"), durability="none", segment_bytes=SEG, snapshot_every=None
        )
        self.src = None
        self.reader = None
        if nparts == 3:
            self.src = Log(os.path.join(root, "src"), durability="none", segment_bytes=SEG)
        if fresh:
            self.alog.append(b"setup")
            self.store.put(b"k1", b"100")
            self.store.put(b"k2", b"0")
            if self.src is not None:
                self.src.append_many([b"in%d" % i for i in range(10)])
            with open(os.path.join(root, "ready"), "w"):
                pass
        self.coord = Coordinator(
            os.path.join(root, "coord"),
            durability="none",
            end_batch=1,
            segment_bytes=SEG,
            compact_records=compact,
        )
        self.plog = LogParticipant(self.alog, name="A", segment_bytes=SEG, compact_records=compact)
        self.pstore = StoreParticipant(
            self.store,
            name="S",
            state_path=os.path.join(root, "s.txn"),
            segment_bytes=SEG,
            compact_records=compact,
        )
        self.parts = [self.plog]
        if self.src is not None:
            self.reader = LogReader(os.path.join(root, "src"), group="g")
            self.poff = OffsetParticipant(
                self.reader,
                name="O",
                state_path=os.path.join(root, "o.txn"),
                durability="none",
                segment_bytes=SEG,
            )
            self.parts.append(self.poff)
        self.parts.append(self.pstore)  # last: it is the one that votes no

    def txn(self, vote_no: bool, tag: bytes = b"T") -> None:
        v1 = self.store.get(b"k1")
        v2 = self.store.get(b"k2")
        with self.coord.transaction() as tx:
            tx.enlist(self.plog, [x.replace(b"T", tag) for x in BATCH])
            if self.reader is not None:
                tx.enlist(self.poff, [5 if tag == b"T" else 8])
            bad = 1 if vote_no else 0
            tx.enlist(
                self.pstore,
                [
                    (b"k1", b"%d" % (int(v1[1]) - 10), v1[0] + bad),
                    (b"k2", b"%d" % (int(v2[1]) + 10), v2[0]),
                ],
            )

    def state(self) -> dict:
        with LogReader(self.alog.path, start=0) as r:
            values = [bytes(rec.value) for rec in r]
        return {
            "log": values,
            "k1": self.store.get(b"k1"),
            "k2": self.store.get(b"k2"),
            "offset": self.reader.committed() if self.reader is not None else None,
            "doubt": [p.recover() for p in self.parts],
            "coord_doubt": self.coord.in_doubt(),
        }

    def close(self) -> None:
        for p in self.parts:
            p.close()
        self.coord.close()
        if self.reader is not None:
            self.reader.close()
        if self.src is not None:
            self.src.close()
        self.store.close()
        self.alog.close()


def scenario(root: str, nparts: int, vote_no: bool) -> str:
    w = World(root, nparts)
    try:
        w.coord.recover(w.parts)
        try:
            w.txn(vote_no)
            return "committed"
        except TransactionAborted:
            return "aborted"
    finally:
        w.close()


def recover_child(root: str, nparts: int) -> dict:
    w = World(root, nparts)
    try:
        return w.coord.recover(w.parts)
    finally:
        w.close()


def check_recovered(root: str, nparts: int, expect_commit: bool, where: str) -> None:
    w = World(root, nparts)
    try:
        w.coord.recover(w.parts)
        st = w.state()
        assert st["doubt"] == [[]] * nparts, (where, st)
        assert st["coord_doubt"] == [], (where, st)
        if expect_commit:
            assert st["log"] == [b"setup"] + BATCH, (where, st)
            assert st["k1"] == (2, b"90") and st["k2"] == (2, b"10"), (where, st)
            if nparts == 3:
                assert st["offset"] == 5, (where, st)
        else:
            assert st["log"] == [b"setup"], (where, st)
            assert st["k1"] == (1, b"100") and st["k2"] == (1, b"0"), (where, st)
            if nparts == 3:
                assert st["offset"] in (None, 0), (where, st)
        # money conserved whatever happened
        assert int(st["k1"][1]) + int(st["k2"][1]) == 100, (where, st)
        # and the participants still work: keys unlocked, marks consistent
        w.txn(False, tag=b"U")
        st2 = w.state()
        assert st2["log"] == st["log"] + [b"U-a1", b"U-a2", b"U-a3"], (where, st2)
        assert int(st2["k1"][1]) == int(st["k1"][1]) - 10, (where, st2)
        assert st2["k1"][0] == st["k1"][0] + 1, (where, st2)
        if nparts == 3:
            assert st2["offset"] == 8, (where, st2)
    finally:
        w.close()


@pytest.mark.parametrize("nparts", [2, 3])
@pytest.mark.parametrize("vote_no", [False, True], ids=["commit", "vote-no"])
def test_every_crash_point(workdir, nparts, vote_no):
    base = str(workdir)
    points = crashkit.trace(scenario, os.path.join(base, "trace"), nparts, vote_no)
    names = {crashkit.split_point(p)[:2] for p in points}
    # each party shows up: coordinator steps and each participant's own writes
    assert ("coord.decision.before_write", None) in names or vote_no
    for party in ["A", "S"] + (["O"] if nparts == 3 else []):
        assert ("part.prepare.before_write", party) in names or (vote_no and party == "S")
    decided = points.index("coord.decision.after_write#1") if not vote_no else len(points)
    rng = random.Random(nparts * 10 + vote_no)
    fired_in_recovery = 0
    for i, point in enumerate(points):
        root = os.path.join(base, f"p{i}")
        res = crashkit.run(scenario, root, nparts, vote_no, crash_at=point, timeout=60)
        assert res.killed, f"not killed at {point}: {res.error or res.value}"
        # restart #1: recovery, itself killed at some recovery step
        rpoint = rng.choice(RECOVERY_POINTS) + "@" + rng.choice(["A", "S", "O"][:nparts])
        if rpoint.startswith(("coord.end", "coord.commit")):
            rpoint = rpoint.split("@")[0] if rpoint.startswith("coord.end") else rpoint
        r2 = crashkit.run(recover_child, root, nparts, crash_at=rpoint, timeout=60)
        if r2.killed:
            fired_in_recovery += 1
        else:
            r2.unwrap()
        # restart #2: everything, then check
        check_recovered(root, nparts, expect_commit=i >= decided, where=f"{point} / {rpoint}")
        shutil.rmtree(root)
    print(
        f"\n2PC {nparts} participants, {'vote-no' if vote_no else 'commit'}: "
        f"{len(points)} crash points covered, {fired_in_recovery} recoveries also killed"
    )
    # 2 participants: 8 prepare steps + 2 decision + 7 (Log commit) + 4 (store
    # commit) + 2 end; vote-no: 8 prepare steps + 3 per abort told; 3: + the offset
    assert (
        len(points)
        >= {(2, False): 23, (3, False): 31, (2, True): 9, (3, True): 16}[(nparts, vote_no)]
    )


# ---------------------------------------------------------------------------
# every party in its own process: the killed one dies alone


def _serve_part(root: str, name: str, endpoint: str, spec, trace_path: str) -> None:
    """Child: serve participant ``name`` over rings until killed."""
    import engine.txn as txn_mod
    from engine.txn import ParticipantServer

    txn_mod._arm_crash(spec, trace_path)
    if name == "A":
        log = Log(os.path.join(root, "a"), durability="none", segment_bytes=SEG)
        p = LogParticipant(log, name="A", segment_bytes=SEG)
    else:
        store = VersionedStore(
            os.path.join(root, "s"), durability="none", segment_bytes=SEG, snapshot_every=None
        )
        p = StoreParticipant(
            store, name="S", state_path=os.path.join(root, "s.txn"), segment_bytes=SEG
        )
    server = ParticipantServer(p, endpoint)
    with open(os.path.join(root, f"up-{name}"), "w"):
        pass
    server.serve_forever()


def _coord_proc(root: str, endpoints: dict, spec, trace_path: str) -> str:
    import engine.txn as txn_mod
    from engine.txn import RemoteParticipant

    txn_mod._arm_crash(spec, trace_path)
    coord = Coordinator(
        os.path.join(root, "coord"), durability="none", end_batch=1, segment_bytes=SEG
    )
    ra = RemoteParticipant("A", endpoints["A"], timeout=2.0)
    rs = RemoteParticipant("S", endpoints["S"], timeout=2.0)
    try:
        tx = coord.transaction()
        with open(os.path.join(root, "txid"), "w") as f:
            f.write(tx.txid)
        with tx:
            tx.enlist(ra, BATCH)
            tx.enlist(rs, [(b"k1", b"90", 1), (b"k2", b"10", 1)])
        return "committed"
    except TransactionAborted:
        return "aborted"
    finally:
        coord.close()
        ra.close()
        rs.close()


def _spawn(fn, *args):
    """Fork ``fn(*args)``; returns ``(pid, reaper thread)``.

    The thread reaps the child the moment it dies, so a SIGKILLed server does
    not linger as a zombie that still looks alive to the coordinator's
    liveness check while this test waits for the coordinator process.
    """
    import threading

    pid = os.fork()
    if pid == 0:
        try:
            fn(*args)
        finally:
            os._exit(0)
    reaper = threading.Thread(target=os.waitpid, args=(pid, 0), daemon=True)
    reaper.start()
    return pid, reaper


def run_distributed(root: str, tag: str, spec, trace_path: str) -> None:
    """One run: servers A and S and the coordinator, each in its own process."""
    import signal
    import time

    World(root, 2).close()  # the initial state
    endpoints = {n: f"qe-txn-{os.getpid()}-{tag}-{n}" for n in ("A", "S")}
    servers = [_spawn(_serve_part, root, n, endpoints[n], spec, trace_path) for n in ("A", "S")]
    try:
        deadline = time.monotonic() + 30
        while not all(os.path.exists(os.path.join(root, f"up-{n}")) for n in ("A", "S")):
            assert time.monotonic() < deadline, "participant servers did not start"
            time.sleep(0.005)
        res = crashkit.run(_coord_proc, root, endpoints, spec, trace_path, hooks=(), timeout=60)
        if res.error:
            raise AssertionError(res.error)
    finally:
        for pid, reaper in servers:  # "restart everything": whoever is alive dies now
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            reaper.join(10)
            assert not reaper.is_alive()
        for n in endpoints.values():
            for suffix in (".req", ".rsp"):
                try:
                    os.unlink(f"/dev/shm/{n}{suffix}")
                except FileNotFoundError:
                    pass


def test_every_crash_point_separate_processes(workdir):
    """Coordinator, Log participant and store participant in three processes
    talking over rings; each crash point kills only the process it is in."""
    from engine.txn import decision

    base = str(workdir)
    tpath = os.path.join(base, "trace")
    run_distributed(os.path.join(base, "clean"), "clean", None, tpath)
    with open(tpath) as f:
        points = [line.strip() for line in f if line.strip()]
    decided = points.index("coord.decision.after_write#1")
    parties = {crashkit.split_point(p)[1] for p in points}
    assert {"A", "S"} <= parties
    for i, point in enumerate(points):
        root = os.path.join(base, f"p{i}")
        run_distributed(root, str(i), point, os.path.join(base, f"t{i}"))
        try:
            with open(os.path.join(root, "txid")) as f:
                txid = f.read()
        except FileNotFoundError:
            # killed while the coordinator opened, before the transaction began
            assert i < decided, point
            committed = False
        else:
            committed = decision(os.path.join(root, "coord"), txid) == "commit"
        if i >= decided:
            assert committed, point
        check_recovered(root, 2, expect_commit=committed, where=f"separate processes, {point}")
        shutil.rmtree(root)
    print(f"\n2PC, parties in separate processes: {len(points)} crash points covered")
    assert len(points) >= 23


# ---------------------------------------------------------------------------
# crashes while a journal switches generations (compaction)

COMPACT = 16  # the smallest allowed: a switch every few transactions
NTX = 40


def many(root: str) -> int:
    """NTX transfers of 1 from k1 to k2, each also appending one record to A;
    every tenth one is left undecided (prepared, then abandoned) so switches
    have in-doubt transactions to carry."""
    w = World(root, 2, compact=COMPACT)
    done = 0
    try:
        w.coord.recover(w.parts)
        for i in range(NTX):
            v1, b1 = w.store.get(b"k1")
            v2, b2 = w.store.get(b"k2")
            ops = [(b"k1", b"%d" % (int(b1) - 1), v1), (b"k2", b"%d" % (int(b2) + 1), v2)]
            if i % 10 == 9:
                tx = w.coord.transaction()
                assert w.plog.prepare(tx.txid, [b"undecided"])
                tx.abort()
                continue
            with w.coord.transaction() as tx:
                tx.enlist(w.plog, [b"t%d" % i])
                tx.enlist(w.pstore, ops)
            done += 1
    finally:
        w.close()
    return done


def test_crash_during_compaction(workdir):
    base = str(workdir)
    points = crashkit.trace(many, os.path.join(base, "trace"))
    switch = [p for p in points if p.startswith("journal.switch")]
    kinds = {crashkit.split_point(p)[1] for p in switch}
    assert {"coordinator", "log-participant", "store-participant"} <= kinds, kinds
    for i, point in enumerate(switch):
        root = os.path.join(base, f"c{i}")
        res = crashkit.run(many, root, crash_at=point, timeout=60)
        assert res.killed, point
        w = World(root, 2, compact=COMPACT)
        try:
            w.coord.recover(w.parts)
            st = w.state()
            assert st["doubt"] == [[], []] and st["coord_doubt"] == [], (point, st)
            moved = int(st["k2"][1])
            # every committed transfer has its record in A, once, and nothing else is there
            assert (
                st["log"] == [b"setup"] + [b"t%d" % j for j in range(NTX) if j % 10 != 9][:moved]
            ), (point, st)
            assert int(st["k1"][1]) + moved == 100 and st["k1"][0] == 1 + moved, (point, st)
        finally:
            w.close()
        shutil.rmtree(root)
    print(f"\n2PC compaction: {len(switch)} journal-switch crash points covered")
    assert len(switch) >= 6
