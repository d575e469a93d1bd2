"""Stateful tests of two-phase commit: every participant kind against a model.

A hypothesis ``RuleBasedStateMachine`` per participant kind (``log``,
``store``, ``offset``, ``remote``; and ``log-always``: the log kind with every
log and journal at ``durability="always"``, whose prepare and commit take the
synced paths) runs a coordinator, the participant under
test ("S") and a LogParticipant partner ("P"), every journal with the
smallest ``compact_records`` (so journals switch generations every few
transactions, with transactions in doubt and during replay), and interleaves:

* transactions (S and P in either order, sometimes with a third participant
  that votes no), each possibly crashed at its k-th crash point;
* crashes at any crash point of any step (in-process: the armed point raises
  ``_SimulatedCrash``, then every object is abandoned without a clean close,
  as a SIGKILL leaves them, and reopened; the reopen itself, which replays
  and may compact, can crash again);
* clean closes and reopens (their ``done`` records can crash too);
* ``Coordinator.recover`` (which can crash), after which nothing may be in
  doubt anywhere.

It checks, at every step, that no acknowledged abort is applied anywhere and
(but for the remote kind, whose commit may fail and be resent) that every
acknowledged commit is applied everywhere; and after every completed
recovery, atomicity (each transaction applied at S exactly when at P, a
batch whole and once), durability of acknowledged commits, and that a
transaction once resolved never changes its outcome.

For ``remote`` the participant is served by a ParticipantServer in a thread
standing for another process: a crash point hit there crashes that "process"
alone (the coordinator goes on, sees the server gone, and the server is
restarted), one hit in the test's thread crashes the coordinator's side
alone.

``QE_TXN_MODEL_EXAMPLES`` / ``QE_TXN_MODEL_STEPS`` override the default
budget; the ``crash``-marked variant runs a heavier one.
"""

from __future__ import annotations

import collections
import os
import shutil
import tempfile
import threading
from typing import Any, Dict, List, Optional

import crashkit
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from engine._log import Log, LogReader
from engine._ring import Ring
from engine.errors import TransactionAborted
from engine.txn import (
    Coordinator,
    LogParticipant,
    OffsetParticipant,
    ParticipantServer,
    RemoteParticipant,
    StoreParticipant,
)
from engine.versions import VersionedStore

COMPACT = 16  # the smallest allowed: a journal switch every few transactions
SEG = 1 << 16
COUNTERS = [b"c0", b"c1"]  # store keys several transactions compare-and-set

# what the runs explored, per kind (printed by the tests, for the record)
STATS: Dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
POINTS: Dict[str, set] = collections.defaultdict(set)


def _tmpdir() -> str:
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    return tempfile.mkdtemp(prefix="qe-txn-model-", dir=base)


class NoVoter:
    """A user participant that votes no."""

    name = "N"

    def prepare(self, txid, ops):
        return False

    def commit(self, txid):
        raise AssertionError("a participant that voted no was told to commit")

    def abort(self, txid):
        pass

    def recover(self):
        return []


def _abandon(obj: Any) -> None:
    """Drop ``obj`` as a SIGKILL would: no clean close, locks released."""
    if isinstance(obj, VersionedStore):
        obj._log._simulate_crash()
    elif isinstance(obj, (LogReader, RemoteParticipant)):
        obj.close()  # holds no lock and writes nothing
    elif isinstance(obj, _Server):
        obj.kill()
    else:
        obj._simulate_crash()


class _Server:
    """A ParticipantServer in a thread standing for another process."""

    def __init__(self, root: str, endpoint: str) -> None:
        self.root = root
        self.endpoint = endpoint
        self.crashed = threading.Event()
        self.died: Optional[BaseException] = None
        self.objs: List[Any] = []
        try:
            self.log = Log(os.path.join(root, "s"), durability="none", segment_bytes=SEG)
            self.objs.append(self.log)
            self.part = LogParticipant(
                self.log, name="S", compact_records=COMPACT, segment_bytes=SEG
            )
            self.objs.append(self.part)
        except BaseException:
            for obj in reversed(self.objs):  # a crash while opening
                obj._simulate_crash()
            raise
        self.server = ParticipantServer(self.part, endpoint)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.server._thread = self.thread  # stop() joins it
        self.thread.start()

    def _serve(self) -> None:
        try:
            self.server.serve_forever()
        except crashkit.SimulatedCrash as exc:
            STATS["remote"]["server crashes"] += 1
            POINTS["remote"].add(str(exc).split("#")[0])
            self.crashed.set()
            self.server._close_rings()  # the client sees the server gone at once
        except BaseException as exc:  # a server that dies otherwise fails the test
            self.died = exc
            raise

    def kill(self) -> None:
        self.server.stop()
        self.server.close()
        for obj in reversed(self.objs):
            obj._simulate_crash()

    def close(self) -> None:
        self.server.close()
        self.part.close()
        self.log.close()


class World:
    """Every party of one machine, opened on ``root`` (a restart = a new World)."""

    def __init__(
        self, kind: str, root: str, endpoint: str, server: Optional[_Server], dur: str = "none"
    ) -> None:
        self.kind = kind
        self.dur = dur  # every log's and journal's durability
        self.root = root
        self.objs: List[Any] = []  # opened so far, in order (abandoned in reverse)
        self.server = server
        try:
            self._open_all(kind, root, endpoint)
        except BaseException:
            self.abandon()  # a crash while opening: what was opened dies with it
            raise

    def _open_all(self, kind: str, root: str, endpoint: str) -> None:
        j = os.path.join
        self.coord = self._add(
            Coordinator(
                j(root, "coord"),
                durability=self.dur,
                end_batch=2,
                compact_records=COMPACT,
                segment_bytes=SEG,
            )
        )
        self.plog = self._add(Log(j(root, "p"), durability=self.dur, segment_bytes=SEG))
        self.p = self._add(
            LogParticipant(self.plog, name="P", compact_records=COMPACT, segment_bytes=SEG)
        )
        self.slog = self.store = self.reader = None
        if kind == "log":
            self.slog = self._add(Log(j(root, "s"), durability=self.dur, segment_bytes=SEG))
            self.s = self._add(
                LogParticipant(self.slog, name="S", compact_records=COMPACT, segment_bytes=SEG)
            )
        elif kind == "store":
            fresh = not os.path.exists(j(root, "s"))
            self.store = self._add(
                VersionedStore(
                    j(root, "s"), durability=self.dur, segment_bytes=SEG, snapshot_every=None
                )
            )
            if fresh:
                for c in COUNTERS:
                    self.store.put(c, b"0")
            self.s = self._add(
                StoreParticipant(
                    self.store,
                    name="S",
                    state_path=j(root, "s.txn"),
                    compact_records=COMPACT,
                    segment_bytes=SEG,
                )
            )
        elif kind == "offset":
            if not os.path.exists(j(root, "src")):
                # offsets committed are transaction numbers: records to match
                with Log(j(root, "src"), durability=self.dur, segment_bytes=SEG) as src:
                    src.append_many([b"in"] * 512)
            self.reader = self._add(LogReader(j(root, "src"), group="g"))
            self.s = self._add(
                OffsetParticipant(
                    self.reader,
                    name="S",
                    state_path=j(root, "s.txn"),
                    durability=self.dur,
                    compact_records=COMPACT,
                    segment_bytes=SEG,
                )
            )
        else:
            self.s = self._add(RemoteParticipant("S", endpoint, timeout=10.0))

    def _add(self, obj: Any) -> Any:
        self.objs.append(obj)
        return obj

    def parts(self) -> list:
        return [self.s, self.p]

    def abandon(self) -> None:
        for obj in reversed(self.objs):
            _abandon(obj)
        self.objs = []

    def close(self) -> None:
        for obj in reversed(self.objs):
            obj.close()
        self.objs = []


def _txn_record(kind: str, n: int, nvals: int, ctr: Optional[int]) -> Dict[str, Any]:
    """What transaction ``n`` writes, as the checks read it."""
    return {
        "vals": [b"%d:%d" % (n, j) for j in range(nvals)],
        "keys": [b"t%d-%d" % (n, j) for j in range(nvals)] if kind == "store" else [],
        "ctr": COUNTERS[ctr] if kind == "store" and ctr is not None else None,
        "outcome": "unknown",
    }


def _run_txn(w: World, t: Dict[str, Any], n: int, s_first: bool, no_vote: Optional[str]) -> None:
    """Run transaction ``n`` (raises TransactionAborted if it aborts)."""
    vals = t["vals"]
    if w.kind == "store":
        ops: Any = [(k, b"v") for k in t["keys"]]
        if t["ctr"] is not None:
            ver, val = w.store.get(t["ctr"])
            ops.append((t["ctr"], b"%d" % (int(val) + 1), ver))
    elif w.kind == "offset":
        ops = [n]
    else:
        ops = [b"S" + v for v in vals]
    order = [(w.s, ops), (w.p, [b"P" + v for v in vals])]
    if not s_first:
        order.reverse()
    if no_vote == "first":
        order.insert(0, (NoVoter(), [b"n"]))
    elif no_vote == "last":
        order.append((NoVoter(), [b"n"]))
    with w.coord.transaction() as tx:
        for part, o in order:
            tx.enlist(part, o)


def _child_txn(kind: str, dur: str, root: str, t: Dict[str, Any], n: int) -> str:
    """In a forked child: open everything, run transaction ``n``, close."""
    w = World(kind, root, "", None, dur)
    try:
        _run_txn(w, t, n, True, None)
        return "committed"
    except TransactionAborted:
        return "aborted"
    finally:
        w.close()


def _log_values(path: str) -> List[bytes]:
    with LogReader(path, start=0) as r:
        return [bytes(rec.value) for rec in r]


class TxnMachine(RuleBasedStateMachine):
    kind = "log"
    label = "log"  # the name its figures are printed under
    durability = "none"  # of every log and journal (with "always": synced paths)
    sigkill = False  # also run transactions in forked processes, SIGKILLed

    def __init__(self) -> None:
        super().__init__()
        STATS[self.label]["examples"] += 1
        self.root = _tmpdir()
        self.endpoint = f"qe-txn-model-{os.getpid()}-{os.path.basename(self.root)}"
        self.server: Optional[_Server] = None
        self.n = 0  # transactions started
        # n -> {"vals": values per log, "keys": store keys, "ctr": counter key
        # or None, "outcome": committed | aborted | unknown}
        self.txns: Dict[int, Dict[str, Any]] = {}
        self.resolved: Dict[int, bool] = {}  # n -> applied, once recovery settled it
        self.w: Optional[World] = None
        self._open(None)

    # -- opening, crashing

    def _open(self, crash_k: Optional[int]) -> None:
        """Open everything; with ``crash_k`` the opening (replay, compaction)
        crashes at its k-th crash point, then everything opens again."""
        while True:
            self._arm(crash_k)
            try:
                if self.kind == "remote" and self.server is None:
                    self.server = _Server(self.root, self.endpoint)
                self.w = World(self.kind, self.root, self.endpoint, self.server, self.durability)
                self._disarm()
                return
            except crashkit.SimulatedCrash as exc:
                self._crashed(exc, "crashes while opening")
                if self.kind == "remote" and self.server is not None:
                    self.server.kill()
                    self.server = None
                crash_k = None

    def _arm(self, k: Optional[int]) -> None:
        crashkit.arm_in_process(None if k is None else f"*#{k}")

    def _disarm(self) -> None:
        crashkit.arm_in_process(None)

    def _crashed(self, exc: BaseException, what: str) -> None:
        self._disarm()
        STATS[self.label][what] += 1
        POINTS[self.label].add(str(exc).split("#")[0])
        if self.w is not None:
            self.w.abandon()
            self.w = None
        if self.kind != "remote":
            return
        # crashkit's hook fired in this thread: the coordinator's process
        # died; the server (another process) lives on

    def _server_check(self) -> None:
        """The server thread crashed: restart it (its own replay)."""
        if self.server is not None and self.server.crashed.is_set():
            self._disarm()
            self.server.kill()
            self.server = None
            while True:
                try:
                    self.server = _Server(self.root, self.endpoint)
                    return
                except crashkit.SimulatedCrash:  # pragma: no cover - disarmed
                    raise

    def teardown(self) -> None:
        try:
            self._disarm()
            if self.w is None:
                self._open(None)
            self._server_check()
            self._recover_and_check()
            gens = [self.w.coord._journal.gen, self.w.p._journal.gen]
            s_part = self.server.part if self.server is not None else self.w.s
            gens.append(s_part._journal.gen)
            STATS[self.label]["journal switches"] += sum(g - 1 for g in gens)
            self.w.close()
            self.w = None
            if self.server is not None:
                self.server.close()
                self.server = None
        finally:
            if self.w is not None:
                self.w.abandon()
            if self.server is not None:
                self.server.kill()
            for suffix in (".req", ".rsp"):  # a killed server leaves its rings, as a crash would
                Ring.unlink(self.endpoint + suffix, missing_ok=True)
            shutil.rmtree(self.root, ignore_errors=True)

    # -- rules

    @rule(
        nvals=st.integers(1, 3),
        s_first=st.booleans(),
        no_vote=st.sampled_from([None, None, None, "first", "last"]),
        ctr=st.sampled_from([None, 0, 1]),
        crash=st.one_of(st.none(), st.integers(1, 24)),
    )
    def transaction(self, nvals, s_first, no_vote, ctr, crash):
        self.n += 1
        n = self.n
        STATS[self.label]["transactions"] += 1
        t = _txn_record(self.kind, n, nvals, ctr)
        self.txns[n] = t
        self._arm(crash)
        try:
            _run_txn(self.w, t, n, s_first, no_vote)
            t["outcome"] = "committed"
        except TransactionAborted:
            t["outcome"] = "aborted"
        except crashkit.SimulatedCrash as exc:
            self._crashed(exc, "crashes in a transaction")
            self._open(None)
        finally:
            self._disarm()
        if self.server is not None and self.server.crashed.is_set():
            # the participant's process died during the transaction: what
            # the coordinator acknowledged is decided, not necessarily applied
            if t["outcome"] == "committed":
                t["outcome"] = "decided"
            self._server_check()
        STATS[self.label][t["outcome"]] += 1
        if no_vote is not None:
            assert t["outcome"] in ("aborted", "unknown"), t

    @rule(nvals=st.integers(1, 3), ctr=st.sampled_from([None, 0, 1]))
    def plain_transaction(self, nvals, ctr):
        """A transaction with no crash armed (builds journals up to compaction)."""
        self.transaction(nvals, True, None, ctr, None)

    @precondition(lambda self: self.sigkill and self.kind != "remote")
    @rule(nvals=st.integers(1, 3), ctr=st.sampled_from([None, 0, 1]), crash=st.integers(1, 30))
    def transaction_sigkilled(self, nvals, ctr, crash):
        """A transaction in a forked process that a real SIGKILL stops at
        its k-th crash point (this process closes everything first: one
        owner per journal)."""
        self.w.close()
        self.w = None
        self.n += 1
        n = self.n
        STATS[self.label]["transactions"] += 1
        t = _txn_record(self.kind, n, nvals, ctr)
        self.txns[n] = t
        res = crashkit.run(
            _child_txn, self.kind, self.durability, self.root, t, n, crash_at=f"*#{crash}"
        )
        if res.killed:
            STATS[self.label]["SIGKILLs"] += 1
        else:
            t["outcome"] = res.unwrap()
        STATS[self.label][t["outcome"]] += 1
        self._open(None)

    @rule(crash=st.one_of(st.none(), st.integers(1, 12)))
    def crash_and_reopen(self, crash):
        """A crash between steps, then a reopen that itself may crash."""
        STATS[self.label]["crash reopens"] += 1
        self.w.abandon()
        self.w = None
        if self.kind == "remote" and self.server is not None:
            self.server.kill()
            self.server = None
        self._open(crash)

    @rule(crash=st.one_of(st.none(), st.integers(1, 8)))
    def clean_reopen(self, crash):
        STATS[self.label]["clean reopens"] += 1
        self._arm(crash)
        try:
            self.w.close()
            self.w = None
            if self.server is not None:
                self.server.close()
                self.server = None
        except crashkit.SimulatedCrash as exc:
            self._crashed(exc, "crashes while closing")
            if self.server is not None:
                self.server.kill()
                self.server = None
        finally:
            self._disarm()
        self._open(None)

    @rule(crash=st.one_of(st.none(), st.integers(1, 30)))
    def recover(self, crash):
        STATS[self.label]["recovers"] += 1
        self._arm(crash)
        try:
            self.w.coord.recover(self.w.parts())
        except crashkit.SimulatedCrash as exc:
            self._crashed(exc, "crashes in recovery")
            self._open(None)
            return
        finally:
            self._disarm()
        if self.server is not None and self.server.crashed.is_set():
            self._server_check()
            return
        self._check_resolved()

    # -- checks

    def _applied(self) -> Dict[str, Dict[int, bool]]:
        """Per participant, per transaction: is its effect there?  Also
        checks each log holds whole batches, once and in order."""
        out: Dict[str, Dict[int, bool]] = {}
        logs = {"P": os.path.join(self.root, "p")}
        if self.kind in ("log", "remote"):
            logs["S"] = os.path.join(self.root, "s")
        for name, path in logs.items():
            seen: Dict[int, List[bytes]] = collections.OrderedDict()
            for v in _log_values(path):
                assert v[:1] == name.encode(), (name, v)
                n = int(v[1:].split(b":")[0])
                seen.setdefault(n, []).append(v[1:])
            # batches contiguous: a txn's values do not interleave with another's
            runs = [int(v[1:].split(b":")[0]) for v in _log_values(path)]
            assert all(
                a == b or runs.index(b) == i + 1 for i, (a, b) in enumerate(zip(runs, runs[1:]))
            ), (name, runs)
            for n, got in seen.items():
                assert got == self.txns[n]["vals"], (name, n, got)  # whole, once
            out[name] = {n: n in seen for n in self.txns}
        if self.kind == "store":
            st_: Dict[int, bool] = {}
            for n, t in self.txns.items():
                present = [self.w.store.get(k)[0] > 0 for k in t["keys"]]
                assert all(present) or not any(present), (n, present)
                st_[n] = all(present)
            for key in COUNTERS:
                ver, val = self.w.store.get(key)
                count = sum(1 for n, t in self.txns.items() if t["ctr"] == key and st_[n])
                assert (ver, int(val)) == (1 + count, count), (key, ver, val, count)
            out["S"] = st_
        return out

    def _check_resolved(self) -> None:
        """After a completed recovery: nothing in doubt, every transaction
        applied everywhere or nowhere, as acknowledged, and as before."""
        w = self.w
        assert w.coord.in_doubt() == [], w.coord.in_doubt()
        for p in w.parts():
            assert p.recover() == [], (p.name, p.recover())
        applied = self._applied()
        for n, t in self.txns.items():
            at_p = applied["P"][n]
            if self.kind == "offset":
                pass  # checked below as a whole
            else:
                assert applied["S"][n] == at_p, ("atomicity", n, t, applied["S"][n], at_p)
            if t["outcome"] in ("committed", "decided"):
                assert at_p, ("acknowledged commit lost", n, t)
            elif t["outcome"] == "aborted":
                assert not at_p, ("acknowledged abort applied", n, t)
            if n in self.resolved:
                assert self.resolved[n] == at_p, ("outcome changed", n, t)
            self.resolved[n] = at_p
        if self.kind == "offset":
            want = max((n for n in self.txns if applied["P"][n]), default=None)
            assert w.reader.committed() == want, ("offset", w.reader.committed(), want)
        STATS[self.label]["full checks"] += 1

    def _recover_and_check(self) -> None:
        self.w.coord.recover(self.w.parts())
        self._check_resolved()

    @invariant()
    def acknowledged_outcomes_hold(self):
        if self.w is None:
            return
        STATS[self.label]["steps"] += 1
        applied = self._applied()
        for n, t in self.txns.items():
            for name, at in applied.items():
                if t["outcome"] == "aborted":
                    assert not at[n], ("acknowledged abort applied", name, n, t)
                elif t["outcome"] == "committed":
                    assert at[n], ("acknowledged commit not applied", name, n, t)
        if self.kind == "offset":
            c = self.w.reader.committed()
            for n, t in self.txns.items():
                if t["outcome"] == "committed":
                    assert c is not None and c >= n, ("offset", c, n)


class SyncedLogMachine(TxnMachine):
    label = "log-always"
    durability = "always"


class StoreMachine(TxnMachine):
    kind = label = "store"


class OffsetMachine(TxnMachine):
    kind = label = "offset"


class RemoteMachine(TxnMachine):
    kind = label = "remote"


MACHINES = {
    "log": TxnMachine,
    "log-always": SyncedLogMachine,
    "store": StoreMachine,
    "offset": OffsetMachine,
    "remote": RemoteMachine,
}


def _run(kind: str, examples: int, steps: int, sigkill: bool = False) -> None:
    examples = int(os.environ.get("QE_TXN_MODEL_EXAMPLES", examples))
    steps = int(os.environ.get("QE_TXN_MODEL_STEPS", steps))
    STATS[kind].clear()
    POINTS[kind].clear()
    machine = type(MACHINES[kind].__name__, (MACHINES[kind],), {"sigkill": sigkill})
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=examples,
            stateful_step_count=steps,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        ),
    )
    s = STATS[kind]
    print(
        f"\n2PC model, {kind}: {s['examples']} examples, {s['steps']} steps, "
        f"{s['transactions']} transactions ({s['committed']} committed, {s['aborted']} aborted, "
        f"{s['unknown']} crashed, {s['decided']} decided with the participant down), "
        f"crashes: {sum(v for k, v in s.items() if 'crashes' in k)} "
        f"({', '.join(f'{k} {v}' for k, v in sorted(s.items()) if 'crashes' in k)}), "
        f"{len(POINTS[kind])} distinct crash points fired, "
        f"{s['crash reopens']} crash reopens, {s['clean reopens']} clean reopens, "
        f"{s['recovers']} recovers, {s['full checks']} full checks, "
        f"{s['journal switches']} journal switches, "
        f"{s['SIGKILLs']} transactions SIGKILLed in a child"
    )
    assert s["full checks"] >= s["examples"]  # every example ends with a full check


@pytest.mark.parametrize("kind", sorted(MACHINES))
def test_model(kind):
    _run(kind, examples=10, steps=20)


@pytest.mark.crash
@pytest.mark.parametrize("kind", sorted(MACHINES))
def test_model_heavy(kind):
    _run(kind, examples=30, steps=40, sigkill=True)
