"""Two-phase commit over the segment log (presumed abort), with crash recovery.

A :class:`Coordinator` drives transactions across :class:`Participant` objects
so that either every participant commits or every one aborts, even when any
party is SIGKILLed at any step::

    coord = engine.Coordinator("data/txlog")
    orders = engine.txn.LogParticipant(engine.Log("data/orders"))
    audit = engine.txn.LogParticipant(engine.Log("data/audit"))
    coord.recover([orders, audit])          # after a restart: resolve in-doubt txns
    with coord.transaction() as tx:         # commits on exit, aborts on exception
        tx.enlist(orders, [b"order 17"])
        tx.enlist(audit, [b"order 17 placed"])

The protocol (presumed abort):

1. *prepare*: the coordinator asks every participant to prepare.  A participant
   checks what it must (version checks, key locks), **persists a ``prepared``
   record durably**, and only then votes yes.  A no vote (or an exception, or
   a timeout) aborts the transaction: :class:`~engine.TransactionAborted`.
2. *decide*: on all yes votes the coordinator **persists a commit record**
   (durably with ``durability="always"``) before it tells anyone.  An abort
   writes nothing: no commit record means abort.
3. *complete*: the coordinator sends commit (or abort) to every participant;
   both are idempotent.  Once all acknowledge, an ``end`` record lets the
   coordinator forget the transaction.

Recovery: every party rebuilds its state from its own journal on open.  A
participant's in-doubt transactions (prepared, no outcome) are resolved by
:meth:`Coordinator.recover` (the coordinator answers from its log: a commit
record means commit, none means abort) or, from another process, by
:func:`decision` which reads the coordinator's log directly.  The coordinator
resends commit for every committed transaction not yet ended.

Journals are segment logs in generation directories; when one grows past
``compact_records`` records the owner writes what it still needs (in-doubt and
unfinished transactions) into a fresh generation and deletes the old one, so
journals stay bounded.
Each record is a tuple led by its kind (``REC_*`` in ``engine._txn``) in the
journal format of ``pyx/journal.pxi``: versioned, independent of the Python
version, and checked against the record's size before anything is allocated.
Records that releases before it wrote with ``marshal`` are read too, record by
record, so a journal written by an older release opens and keeps working.

Invariants (what every change to the protocol, replay or compaction must
keep; ``tests/stress/test_txn_crash.py`` and
``tests/stress/test_txn_replay_crash.py`` SIGKILL real processes at every
crash point, ``tests/test_txn_model.py`` runs a state machine per
participant kind with crashes at any point and journals compacting every few
records):

* **P1, prepared before yes.** A participant votes yes only once its ``P``
  record (the ops) is durable; from then until an outcome it can commit them
  whatever happens (its locks stay held, nothing is refused).
* **P2, decided before told.** The commit record is durable before any
  participant hears commit; no commit record means abort (presumed abort),
  and once :meth:`Coordinator.decision` answered ``"abort"`` for a txid no
  commit record for it can be written.
* **P3, no prepared transaction is forgotten.** Commit and abort are
  idempotent and a txid a participant does not know is a no-op; so a
  participant must keep every prepared transaction whose outcome it has not
  applied until it applies one, through crashes, reopens and compactions
  (J1-J3, R1 protect this).
* **P4, ended after every ack.** The coordinator forgets a committed
  transaction (``E`` record) only once every participant acknowledged its
  commit; until then :meth:`Coordinator.recover` resends it.
* **L1, mark before batch** (LogParticipant). The commit mark (where the
  batch starts in the log) is in the journal before any of the batch is in
  the log, and batches go to the log in mark order by its only writer, so
  recovery appends exactly the missing tail.
* **J1, memory first.** An owner puts a transaction in its tables (in doubt,
  marks, the coordinator's pending and deciding), under the lock a journal
  switch takes, before it appends the record that says so.
* **J2, a switch keeps what is needed.** A new generation is written from
  the tables alone: every transaction prepared and not finished (with its
  mark), every commit decision not ended, the incarnation.  So the tables
  must hold all of it whenever a write that may switch runs (R1).
* **J3, one live generation.** ``CURRENT`` names it and is replaced
  atomically once the new generation is complete and synced; a crash before
  that leaves the old one live (the half-built one is removed at open), one
  after it the new one.
* **R1, replay: tables first, then writes.** On open an owner folds its
  whole journal into its tables (in doubt, marks, locks) before it writes
  anything: finishing marked batches writes records, and any write may
  switch generations (J2).
* **R2, finished needs no record.** What was applied is recognised from the
  resource (a marked batch's length in the log, a store key's version moved
  off the one prepared, a group offset at or past the one prepared), so
  ``D``/``A`` records and compaction may drop finished transactions without
  changing any outcome.

Group commit: with ``"always"``, transactions committed from several
threads at once run in groups.  The first becomes the leader; the others
queue and sleep.  The leader runs the three steps for its whole group: every
prepared record, then one sync per participant journal; every decision, then
one sync of the coordinator's journal; each participant's commit marks and
batches, one sync each.  The syncs of different files overlap (a helper
thread takes one).  Then it wakes the group and passes the leadership to the
first that queued meanwhile, which waits a moment (at most half as long as
the last group ran) for the threads just woken to queue again, so that one
group carries them all instead of two halves taking turns.  Per transaction
the steps and crash points are the ones above; across the group, no decision
is written before every prepared record of the group is durable.  A
transaction alone runs the one-transaction path, except that the sync of its
first participant's prepared record runs on the helper thread while the next
participant prepares (the crash points pass in the same order; the decision
still waits for both), and that LogParticipants commit side by side: every
commit mark is written (in participant order), then per participant its
journal is synced and its batch appended, the first participant's on the
helper thread while this one does the others' (so the marks' syncs overlap,
then the batches'; per participant its mark is durable before its batch is
written, L1).  So a lone
transaction over two LogParticipants takes four sync rounds (prepared
records, decision, marks, batches) for its seven syncs.  The crash points
pass in the one-transaction order; past the first participant's mark the
writes run ahead of them (at every point at least what the one-transaction
path had written is written, all of it after the decision is durable).
``tests/test_txn_groupcommit.py`` checks that
a commit returns only once its records are durable, and SIGKILLs groups at
every crash point; ``tests/test_txn_lone_commit.py`` checks the lone commit's
overlap and its order.

Commit by the coordinator's log (``Coordinator(redo=True)``, the default;
durability ``"always"``): a transaction whose participants are all LogParticipants of
this process skips the vote.  Their prepare would only check the ops (a
LogParticipant holds no locks and never changes its mind), and a batch that
the log's only writer appends at an offset fixed in advance can be redone
exactly from a copy.  So the group's leader checks the ops in memory (the
same errors as prepare), takes each participant's commit lock, reserves the
offsets each batch will start at, and writes one ``REDO`` record per
transaction to the coordinator's journal (the decision and every batch with
its offset), one sync for the group: the commit point.  Then it appends the
batches to their logs without syncing them (visible when commit returns) and
lets go of the commit locks.  The participants' journals are not written.
Invariants of this path:

* **D1, committed before applied.** No batch reaches a log before its
  ``REDO`` record is durable; a batch goes exactly at its reserved offset
  (one leader at a time holds the commit locks while it reserves and
  appends, so ranges are consecutive per log, in journal order).
* **D2, durable before ended.** A redo transaction ends (``E``) only once
  every log it went to is durable past its batch (``_redo_settle``: one
  sync per log every ``end_batch`` transactions, on a settler thread off
  the commit's path, reaped by the commit that hands over the next batch);
  until then the journal keeps its ``REDO`` (compaction copies it from
  ``_redo``).
* **D3, redo in order.** ``recover()`` replays every ``REDO`` not ended in
  journal order: a log that ends at or past the batch's end holds it, one
  that ends inside it holds a prefix (the rest is appended), one that ends at
  its start lacks it; then the logs are synced and the transactions end.  A
  transaction that enlists a participant with such batches first has them
  put back (``_redo_catch_up``), as their offsets come first.
* **D4, marks after redo.** Before a LogParticipant writes a commit mark of
  a classic transaction it makes every redo batch in its log durable
  (``_settle``), so no mark ever points past a batch a power loss could take
  away; its own replay at open then finds the log as L1 says.

Durability: ``"always"`` survives power loss (every prepared/commit record is
fsynced before the next step), ``"none"`` survives a process crash (SIGKILL)
but not a power loss, exactly like :class:`engine.Log`.  With nothing to sync
(``"none"``, ``"interval"``) each party writes its record under its state
lock instead of around a sync (and an uncontended LogParticipant commits its
mark, batch and done list in one hold of its locks): the same records in the
same order with the same crash points as the synced path, which
``tests/test_txn_fastpath.py`` checks record by record.

Compiled core: the per-transaction steps (:class:`Transaction`, a
coordinator's ``transaction``/``_commit``/``_complete``, a participant's
``prepare``/``commit``, a LogParticipant's check and uncontended commit, the
record encoder) are in ``pyx/txn.pyx`` (``engine._txn``); the classes here
subclass its cores and keep everything that is not per transaction.

Crash points (``engine._crashpoints``, shared with ``engine.saga`` and the
compiled core): ``_crash_point`` marks every step of the protocol (before
and after each durable write and each message) and every record that open,
replay, close and a journal switch write (including the moments between two
generations).  ``ENGINE_CRASH_AT=<point>`` (or ``<point>#<k>`` for its k-th
hit, ``*#<k>`` for the k-th point of any name) SIGKILLs the process there; the
tests in ``tests/stress/test_txn_crash.py`` use it through
``tests/crashkit.py``, and in-process tests arm it to raise instead
(``_arm_crash(..., action="raise")``).
"""

from __future__ import annotations

import collections
import errno
import fcntl
import itertools
import json
import logging
import marshal
import os
import shutil
import threading
import time
import uuid
from typing import (
    Any,
    Dict,
    Iterable,
    List,
    Optional,
    Protocol,
    Sequence,
    Tuple,
    Union,
)

from . import _crashpoints as _cp
from ._fsutil import Durability, atomic_write, check_durability, make_dirs
from ._log import Log as _Log
from ._txn import (
    REC_ABORTED,
    REC_DECISION,
    REC_DONE,
    REC_ENDED,
    REC_INCARNATION,
    REC_MARK,
    REC_PREPARED,
    REC_REDO,
    Transaction,
    _as_bytes,
    _CoordCore,
    _decode_record,
    _encode,
    _journal_append,
    _JournalCore,
    _LogPartCore,
    _PartCore,
    _split_commits,
    _trust,
)
from .errors import Closed, CorruptLog, EngineError, LogLocked, Timeout, TransactionAborted

__all__ = [
    "Coordinator",
    "Transaction",
    "Participant",
    "LogParticipant",
    "StoreParticipant",
    "OffsetParticipant",
    "ParticipantServer",
    "RemoteParticipant",
    "decision",
    "read_journal",
    "summarize_journal",
]

_logger = logging.getLogger("engine")

# Ring messages (ParticipantServer, RemoteParticipant) are marshalled with
# format version 2: versions >= 3 build a hash table per call to share
# repeated objects, which costs ~40% of a dumps() of these small tuples and
# saves nothing here.  Journal records have their own format (engine._txn:
# _encode, _decode_record), which does not change with the Python version.
_dumps = marshal.dumps

# ---------------------------------------------------------------------------
# crash points (tests only; one global bool load on the hot path when unarmed)

# (engine._crashpoints: one state for every module's points; tests/crashkit.py
# arms them through these names)
_SimulatedCrash = _cp.SimulatedCrash
_arm_crash = _cp.arm
_crash_point = _cp.point
_CRASH_HITS = _cp.hits


# ---------------------------------------------------------------------------
# journals: a segment log per generation, compacted by starting a new one

_CURRENT = "CURRENT"
_OWNER_LOCK = "owner.lock"
def _read_current(path: str) -> Optional[Dict[str, Any]]:
    try:
        with open(os.path.join(path, _CURRENT), "rb") as f:
            raw = f.read(4096)
    except FileNotFoundError:
        return None
    try:
        cur = json.loads(raw.decode())
        if not (
            isinstance(cur, dict)
            and isinstance(cur.get("kind"), str)
            and isinstance(cur.get("id"), str)
            and isinstance(cur.get("gen"), int)
            and cur["gen"] >= 1
        ):
            raise ValueError("missing fields")
    except (ValueError, UnicodeDecodeError) as exc:
        raise _CorruptJournal(
            os.path.join(path, _CURRENT), None,
            f"unreadable ({exc}): it is not a queue-engine journal or it was damaged",
        ) from None
    return cur


def _gen_dir(path: str, gen: int) -> str:
    return os.path.join(path, f"gen-{gen:08d}")


class _CorruptJournal(CorruptLog):
    """A journal's ``CURRENT`` file or one of its records does not decode.

    ``segment`` is the file or generation directory, ``position`` the
    record's offset in that generation's log (``None`` for ``CURRENT``).
    """

    def __init__(self, where: str, offset: Optional[int], reason: str) -> None:
        self.segment = where
        self.position = -1 if offset is None else offset
        self.reason = reason
        at = "" if offset is None else f" record {offset}"
        EngineError.__init__(self, f"corrupt transaction journal {where!r}{at}: {reason}")


def _decode(
    raw: Any, kind: str, where: str = "?", offset: Optional[int] = None
) -> Tuple[Any, ...]:
    """Decode one record of a ``kind`` journal (``"coordinator"`` or a
    participant kind), in the journal format or the marshal format of older
    releases; :class:`~engine.CorruptLog` if it is not one of that journal's
    records."""
    try:
        return _decode_record(raw, kind == "coordinator")
    except (ValueError, TypeError) as exc:
        raise _CorruptJournal(where, offset, f"undecodable record ({exc})") from None


def _read_gen(gen_dir: str, kind: str, meta: bool = False) -> List[Any]:
    """Decoded records of one generation of a ``kind`` journal; with ``meta``:
    ``(offset, ts_ns, rec)``."""
    from ._log import LogReader

    out: List[Any] = []
    with LogReader(gen_dir, start=0) as reader:
        while True:
            batch = reader.read_many(4096)
            if not batch:
                break
            if meta:
                out.extend(
                    (r.offset, r.timestamp, _decode(r.value, kind, gen_dir, r.offset)) for r in batch
                )
            else:
                out.extend(_decode(r.value, kind, gen_dir, r.offset) for r in batch)
    return out


class _Journal(_JournalCore):
    """The durable state of one party: a segment log per generation.

    ``CURRENT`` (JSON, replaced atomically) names the kind of journal, its id
    and the live generation ``gen-NNNNNNNN/`` (an :class:`engine.Log`).
    :meth:`switch` starts the next generation with the records its owner
    still needs, so the journal does not grow without bound.  One owner
    process at a time (``owner.lock``, fcntl); a reader that holds the lock
    shared knows no owner is running.
    """

    def __init__(
        self,
        path: Union[str, os.PathLike[str]],
        kind: str,
        durability: str,
        segment_bytes: int = 1 << 20,
    ) -> None:
        check_durability(durability)
        self.path = os.fspath(path)
        self.kind = kind
        self.durability = durability
        # "always": appends do not sync (_JournalLog) and we flush() at the
        # records that must be durable (prepared, commit decision, commit
        # mark, REDO); the others (aborted, done, end) ride along with the
        # next sync.  flush() is the log's group commit, so concurrent
        # transactions share syncs.
        self.sync = durability == "always"
        self._segment_bytes = segment_bytes
        make_dirs(self.path)  # its name and each new parent's durable
        self._lock_fd = os.open(os.path.join(self.path, _OWNER_LOCK), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._lock_fd)
            self._lock_fd = -1
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise LogLocked(self.path, _read_pid(self.path)) from None
            raise
        try:
            # the owner's pid, for the LogLocked message of a second opener
            os.ftruncate(self._lock_fd, 0)
            os.write(self._lock_fd, str(os.getpid()).encode())
            self._open_live(kind)
        except BaseException:
            self.close()  # a failed open lets go of the lock at once
            raise

    def _open_live(self, kind: str) -> None:
        """Read ``CURRENT``, drop other generations, open and read the live one."""
        cur = _read_current(self.path)
        if cur is None:
            cur = {"kind": kind, "id": uuid.uuid4().hex, "gen": 1}
            _new_gen_dir(_gen_dir(self.path, 1))
            atomic_write(self.path, _CURRENT, json.dumps(cur).encode())
        elif cur["kind"] != kind:
            raise EngineError(
                f"{self.path!r} is a {cur['kind']} journal, not a {kind} journal; use another path"
            )
        self.id: str = cur["id"]
        self.gen: int = cur["gen"]
        live = os.path.basename(_gen_dir(self.path, self.gen))
        for entry in os.listdir(self.path):
            # a generation left by a crash during a switch: the old one after the
            # switch, or a half-built new one before it
            if entry.startswith("gen-") and entry != live:
                shutil.rmtree(os.path.join(self.path, entry), ignore_errors=True)
            # a CURRENT replacement a crash interrupted (atomic_write's temp;
            # the lock we hold keeps every other writer out)
            elif entry.startswith(f".{_CURRENT}.") and entry.endswith(".tmp"):
                os.unlink(os.path.join(self.path, entry))
        # the writer first: opening it recovers the log (cuts a torn tail)
        self.log = self._open_log(self.gen)
        self.records: List[Tuple[Any, ...]] = _read_gen(_gen_dir(self.path, self.gen), kind)
        self.appended = len(self.records)  # records in this generation (approximate)

    def _open_log(self, gen: int) -> Any:
        if self.sync:
            return _JournalLog(
                _gen_dir(self.path, gen), durability="always", segment_bytes=self._segment_bytes
            )
        return _Log(
            _gen_dir(self.path, gen),
            durability="interval" if self.durability == "interval" else "none",
            segment_bytes=self._segment_bytes,
        )

    def append(self, rec: Tuple[Any, ...]) -> None:
        """Append one record now (durable per ``durability`` when this returns)."""
        self.log.append(_encode(rec))
        if self.sync:
            self.log.flush()
        self.appended += 1

    def switch(self, keep: Iterable[Tuple[Any, ...]]) -> None:
        """Start generation ``gen + 1`` holding ``keep``; drop the old one.

        Called with the owner's state lock held, ``keep`` built from the
        owner's in-memory state at that moment, which must hold everything
        the journal still needs (invariant J2 of the module docstring).  An
        append racing with the switch may land in the old generation: its
        content is in ``keep`` already (owners update memory before they
        append), so losing it is fine.

        Crash-safe at every step: until ``CURRENT`` names the new generation
        the old one is the journal (the half-built new one is removed at the
        next open); from then on the new one is, complete and synced.
        """
        new = self.gen + 1
        gdir = _gen_dir(self.path, new)
        _new_gen_dir(gdir)
        if _cp.armed:
            _crash_point("journal.switch.begin", self.kind)
        log = self._open_log(new)
        try:
            recs = [_encode(r) for r in keep]
            if recs:
                log.append_many(recs)
            if _cp.armed:
                _crash_point("journal.switch.after_write", self.kind)
            log.flush()
            if _cp.armed:
                _crash_point("journal.switch.before_current", self.kind)
            atomic_write(
                self.path,
                _CURRENT,
                json.dumps({"kind": self.kind, "id": self.id, "gen": new}).encode(),
            )
        except BaseException:
            # the old generation stays the journal; the next switch (or open)
            # removes what was built of the new one
            log.close()
            raise
        old, old_gen = self.log, self.gen
        self.log, self.gen, self.appended = log, new, len(recs)
        if _cp.armed:
            _crash_point("journal.switch.after_current", self.kind)
        try:
            old.close()
        except Exception:  # pragma: no cover - closing a healthy log does not fail
            _logger.exception("closing the old journal generation failed")
        shutil.rmtree(_gen_dir(self.path, old_gen), ignore_errors=True)
        if _cp.armed:
            _crash_point("journal.switch.after_remove", self.kind)

    def close(self) -> None:
        try:
            if self.log is not None:
                self.log.close()
                self.log = None
        finally:
            self._unlock()

    def _simulate_crash(self) -> None:
        """Test hook: stop as a SIGKILLed owner would (nothing more written,
        no sync, the owner lock released)."""
        if self.log is not None:
            self.log._simulate_crash()
            self.log = None
        self._unlock()

    def _unlock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1


class _JournalLog(_Log):
    """The log of a journal whose owner syncs it (durability ``"always"``):
    ``append``/``append_many`` write without waiting for a sync
    (:meth:`engine.Log._append_unsynced`), the owner's ``flush()`` syncs.

    A ``"none"`` log would do the same through its shared mapping, but its
    sync is ``msync`` of pages that every write after a sync faults back
    in (writable again: a page fault per record, about 5 us here); the
    ``"always"`` log writes with ``pwrite`` and syncs with ``fdatasync``.
    """

    def append(self, value: Any, key: Any = None) -> int:
        """Append one record (not synced); returns its offset."""
        # (_append_unsynced is private to engine.Log: not in its stub)
        got = self._append_unsynced((value,), None if key is None else (key,))  # type: ignore[attr-defined]
        return int(got.start)

    def append_many(self, values: Any, keys: Any = None) -> range:
        """Append a batch of records (not synced); returns their offsets."""
        return self._append_unsynced(values, keys)  # type: ignore[attr-defined]


def _new_gen_dir(path: str) -> None:
    if os.path.exists(path):
        shutil.rmtree(path)
    os.mkdir(path, 0o700)


def _read_pid(path: str) -> Optional[int]:
    try:
        with open(os.path.join(path, _OWNER_LOCK), "rb") as f:
            return int(f.read(32).decode() or "0") or None
    except (OSError, ValueError):
        return None


def read_journal(
    path: Union[str, os.PathLike[str]], meta: bool = False
) -> Tuple[Dict[str, Any], List[Any]]:
    """Read a journal without owning it: ``(CURRENT info, records)``.

    Records are tuples whose first item is the kind (``REC_*``, see
    ``engine._txn``): coordinator ``(REC_INCARNATION, incarnation)``,
    ``(REC_DECISION, txid, participant names)``, ``(REC_REDO, txid,
    ((participant name, start offset, values, keys or None), ...))``,
    ``(REC_ENDED, [txids])``;
    participant ``(REC_PREPARED, txid, ops)``, ``(REC_MARK, txid, start
    offset)``, ``(REC_ABORTED, txid)``, ``(REC_DONE, [txids])``.
    With ``meta=True`` each item is ``(offset, timestamp_ns, record)``.
    Works while the owner runs (readers of an ``engine.Log`` may be in any
    process).  Used by ``queue-engine txn ls``.
    """
    path = os.fspath(path)
    cur = _read_current(path)
    if cur is None:
        raise FileNotFoundError(f"{path!r} is not a transaction journal (no {_CURRENT} file)")
    for _attempt in range(5):
        try:
            return cur, _read_gen(_gen_dir(path, cur["gen"]), cur["kind"], meta)
        except (FileNotFoundError, EngineError):
            # a switch replaced the generation under us: read the new one
            new = _read_current(path)
            if new is None or new["gen"] == cur["gen"]:
                raise
            cur = new
    raise EngineError(f"{path!r}: the journal keeps switching generations; try again")


def summarize_journal(
    path: Union[str, os.PathLike[str]], limit: int = 20, stale: float = 60.0
) -> Dict[str, Any]:
    """A journal's unfinished and recent transactions (what ``queue-engine txn ls`` shows).

    Returns a dict: ``path``, ``kind`` (``"coordinator"`` or a participant
    kind), ``id``, ``generation``; ``in_doubt``: coordinator transactions
    committed and not ended, or participant transactions prepared with no
    outcome, oldest first; ``recent``: the last ``limit`` finished ones
    (coordinator: committed and ended; participant: committed or aborted);
    each a dict with ``txid``, ``state``, ``time`` (ns) and ``participants``
    (coordinator) or ``ops`` (participant, their count).  ``stale``: how many
    need attention (coordinator: every unfinished one; participant: prepared
    longer than ``stale`` seconds ago); ``incarnation`` for a coordinator.
    Reads only (:func:`read_journal`): safe while the owner runs.
    """
    path = os.fspath(path)
    cur, recs = read_journal(path, meta=True)
    kind = cur["kind"]
    doubt: List[Dict[str, Any]] = []
    recent: List[Dict[str, Any]] = []
    out: Dict[str, Any] = {"path": path, "kind": kind, "id": cur["id"], "generation": cur["gen"]}
    if kind == "coordinator":
        pending: Dict[str, Dict[str, Any]] = {}
        inc = 0
        for _off, ts, rec in recs:
            if rec[0] == REC_INCARNATION:
                inc = max(inc, rec[1])
            elif rec[0] in (REC_DECISION, REC_REDO):
                pending[rec[1]] = {
                    "txid": rec[1],
                    "state": "not ended",
                    "time": ts,
                    "participants": list(rec[2])
                    if rec[0] == REC_DECISION
                    else [b[0] for b in rec[2]],
                }
            elif rec[0] == REC_ENDED:
                for t in rec[1]:
                    e = pending.pop(t, None)
                    if e is not None:
                        e["state"] = "committed"
                        e["ended"] = ts
                        recent.append(e)
        doubt = list(pending.values())
        out["incarnation"] = inc
        out["stale"] = len(doubt)
    else:
        prepared: Dict[str, Dict[str, Any]] = {}
        for _off, ts, rec in recs:
            if rec[0] == REC_PREPARED:
                ops = rec[2]
                n = (
                    len(ops[0])
                    if isinstance(ops, tuple) and ops and isinstance(ops[0], list)
                    else (len(ops) if isinstance(ops, list) else 1)
                )
                prepared[rec[1]] = {"txid": rec[1], "state": "prepared", "time": ts, "ops": n}
            elif rec[0] == REC_MARK and rec[1] in prepared:
                # a commit mark: decided commit; the participant finishes it itself
                e = prepared.pop(rec[1])
                e["state"] = "committed"
                e["start_offset"] = rec[2]
                e["ended"] = ts
                recent.append(e)
            elif rec[0] in (REC_ABORTED, REC_DONE):
                for t in [rec[1]] if rec[0] == REC_ABORTED else rec[1]:
                    e = prepared.pop(t, None)
                    if e is not None:
                        e["state"] = "aborted" if rec[0] == REC_ABORTED else "committed"
                        e["ended"] = ts
                        recent.append(e)
        doubt = list(prepared.values())
        now = time.time_ns()
        out["stale"] = sum(1 for e in doubt if now - e["time"] > stale * 1e9)
    out["in_doubt"] = doubt
    out["recent"] = recent[-limit:] if limit > 0 else []
    return out


# ---------------------------------------------------------------------------
# the coordinator


def _txid_parts(txid: str) -> Optional[Tuple[str, int, int]]:
    # "<journal id prefix>-<incarnation hex>-<sequence hex>"
    parts = txid.split("-") if isinstance(txid, str) else []
    if len(parts) != 3:
        return None
    try:
        return parts[0], int(parts[1], 16), int(parts[2], 16)
    except ValueError:
        return None


def decision(path: Union[str, os.PathLike[str]], txid: str) -> str:
    """The outcome of ``txid`` as the coordinator's log at ``path`` says it.

    For a participant in another process that restarts and wants to resolve
    its in-doubt transactions itself: returns ``"commit"`` (a commit record
    exists), ``"abort"`` (none exists and the coordinator that issued the
    txid can no longer write one: it restarted since, or it is not running)
    or ``"pending"`` (that coordinator is running and may still decide: ask
    again later, or let its :meth:`Coordinator.recover` resolve it).
    """
    path = os.fspath(path)
    parts = _txid_parts(txid)
    cur = _read_current(path)
    if parts is None or cur is None or not cur["id"].startswith(parts[0]):
        raise ValueError(f"txid {txid!r} was not issued by the coordinator at {path!r}")
    fd = os.open(os.path.join(path, _OWNER_LOCK), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            # Shared lock held while reading: no coordinator can (re)start and
            # write a commit record between our read and our answer.
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            running = False
        except OSError:
            running = True
        _cur, recs = read_journal(path)
        max_inc = 0
        for rec in recs:
            if rec[0] in (REC_DECISION, REC_REDO) and rec[1] == txid:
                return "commit"
            if rec[0] == REC_INCARNATION:
                max_inc = max(max_inc, rec[1])
        if running and parts[1] >= max_inc:
            return "pending"
        return "abort"
    finally:
        os.close(fd)


class Participant(Protocol):
    """What a coordinator needs from a resource (structural: no base class needed).

    ``name`` must be stable across restarts and unique among the participants
    of a coordinator: commit records name participants by it.

    * ``prepare(txid, ops) -> bool``: check ``ops``, make them impossible to
      refuse later (locks), **persist them durably**, then return ``True``.
      ``False`` (or raising) votes no; the transaction aborts.
    * ``commit(txid)`` / ``abort(txid)``: finish; both idempotent, and a txid
      the participant does not know (finished, forgotten, never prepared) is a
      no-op.  Commit must never fail for a prepared transaction except by a
      crash; the coordinator resends it.
    * ``recover() -> list[str]``: the txids prepared and not yet finished.
    """

    name: str

    def prepare(self, txid: str, ops: Sequence[Any]) -> bool: ...

    def commit(self, txid: str) -> None: ...

    def abort(self, txid: str) -> None: ...

    def recover(self) -> List[str]: ...


class Coordinator(_CoordCore):
    """The coordinator of two-phase-commit transactions, with its durable log.

    ``path`` is a directory (created, mode 0700) holding the coordinator's
    journal; one ``Coordinator`` per path at a time (a second gets
    :class:`~engine.LogLocked`).  ``durability`` is the journal's (see
    :class:`engine.Log`): ``"always"`` fsyncs every commit decision before
    any participant hears of it (transactions committed from several
    threads at once are group-committed: they share syncs).
    ``timeout`` (seconds) bounds a transaction: one still undecided that
    long after :meth:`transaction` aborts.

    ``redo`` (default True; with ``durability="always"``): a transaction whose
    participants are all :class:`LogParticipant` objects commits with ONE
    durable record in this journal, which carries every participant's batch
    and the offset it starts at in its log (the commit point: one sync,
    shared by concurrent commits); the batches then go to their logs
    without a sync of their own, each visible when :meth:`Transaction.commit`
    returns.  The participants' journals are not written; the logs are
    synced once per ``end_batch`` transactions before those end.  After a
    crash, :meth:`recover` (given the participants) appends what a log lacks
    of each such transaction, whole and once, in commit order.  Other
    transactions, every transaction under another durability, and all of
    them with ``redo=False`` (each participant's batch durable in its own
    log when commit returns, at 7 syncs in 4 rounds for two participants),
    run the protocol below.

    ``end_batch``: ``end`` records (which let the log forget finished
    transactions) are written in batches of that many txids.
    ``compact_records``: the journal is compacted when it holds that many.
    ``segment_bytes``: the journal's segment size (see :class:`engine.Log`).

    After a restart call :meth:`recover` with the participants, so every
    in-doubt transaction is resolved and every committed one finished.
    """

    def __init__(
        self,
        path: Union[str, os.PathLike[str]],
        durability: Durability = "always",
        timeout: float = 30.0,
        *,
        end_batch: int = 64,
        compact_records: int = 50_000,
        segment_bytes: int = 1 << 20,
        redo: bool = True,
    ) -> None:
        if not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
        if not isinstance(redo, bool):
            raise TypeError(f"redo must be a bool, not {type(redo).__name__}")
        if end_batch < 1 or compact_records < 16:
            raise ValueError("end_batch must be >= 1 and compact_records >= 16")
        self.timeout = float(timeout)
        self._end_batch = int(end_batch)
        self._compact_records = int(compact_records)
        self._redo_on = redo
        # (the lock and the tables are the compiled core's: _CoordCore)
        self._journal = _Journal(path, "coordinator", durability, segment_bytes)
        try:
            self._open_journal()
        except BaseException:
            self._journal.close()  # a failed open lets go of the journal at once
            raise
        self._prefix = f"{self._journal.id[:12]}-{self._inc:x}-"  # txid: prefix + hex seq
        self._recent = collections.deque(maxlen=256)
        self._closed = False
        self.stats_committed = 0
        self.stats_aborted = 0

    def _open_journal(self) -> None:
        """Rebuild the tables from the journal, then start this incarnation."""
        inc = 0
        for rec in self._journal.records:
            kind = rec[0]
            if kind == REC_DECISION:
                self._pending[rec[1]] = tuple(rec[2])
            elif kind == REC_REDO:
                # committed by this journal: recover() checks each log
                self._pending[rec[1]] = tuple(b[0] for b in rec[2])
                self._redo[rec[1]] = rec[2]
            elif kind == REC_ENDED:
                for t in rec[1]:
                    self._pending.pop(t, None)
                    self._redo.pop(t, None)
            elif kind == REC_INCARNATION:
                inc = max(inc, rec[1])
        self._journal.records = []
        # new transactions on these participants wait for their old batches (_redo_catch_up)
        self._redo_stale = {b[0] for batches in self._redo.values() for b in batches}
        self._inc = inc + 1
        if _cp.armed:
            _crash_point("coord.open.before_incarnation", None)
        # Durable before any txid of this incarnation exists: txids never repeat.
        self._journal.append((REC_INCARNATION, self._inc))
        self._journal.log.flush()
        if _cp.armed:
            _crash_point("coord.open.after_incarnation", None)

    # -- properties

    @property
    def path(self) -> str:
        """The journal directory."""
        return self._journal.path

    @property
    def incarnation(self) -> int:
        """This opening's number (txids carry it; it grows at every open)."""
        return self._inc

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return self._closed

    def _compact(self) -> None:
        with self._lock:
            if self._closed or self._journal.appended < self._compact_records:
                return
            keep: List[Tuple[Any, ...]] = [(REC_INCARNATION, self._inc)]
            # every REDO not ended (decided, in flight or applied and not yet
            # durable in its logs), in commit order: recovery replays them so
            keep.extend((REC_REDO, t, batches) for t, batches in self._redo.items())
            keep.extend(
                (REC_DECISION, t, names) for t, names in self._pending.items() if t not in self._redo
            )
            # a commit record in flight may land in the old generation: carry it
            keep.extend(
                (REC_DECISION, t, names) for t, names in self._deciding.items() if t not in self._redo
            )
            self._journal.switch(keep)

    def _finish_abort(
        self,
        tx: Transaction,
        asked: Sequence[Any],
        reason: str,
        cause: Optional[BaseException] = None,
        raise_: bool = True,
    ) -> None:
        # Presumed abort: no record.  Tell whoever may have prepared (best effort:
        # a participant that misses it resolves it on recovery).
        tx.state = "aborted"
        tx.reason = reason
        self._active.pop(tx.txid, None)
        for p in asked:
            if _cp.armed:
                _crash_point("coord.abort.send", p.name)
            try:
                p.abort(tx.txid)
            except Exception:
                _logger.warning(
                    "txn %s: participant %r did not take abort", tx.txid, p.name, exc_info=True
                )
        with self._lock:
            self.stats_aborted += 1
            self._recent.append((tx.txid, "aborted: " + reason, time.time()))
        if raise_:
            raise TransactionAborted(tx.txid, reason) from cause

    # -- recovery and queries

    def owns(self, txid: str) -> bool:
        """True if ``txid`` was issued by this coordinator (any incarnation)."""
        parts = _txid_parts(txid)
        return parts is not None and self._journal.id.startswith(parts[0])

    def decision(self, txid: str) -> str:
        """``"commit"``, ``"abort"`` or ``"pending"`` (being decided right now)."""
        if not self.owns(txid):
            raise ValueError(f"txid {txid!r} was not issued by this coordinator")
        with self._lock:
            if txid in self._pending:
                return "commit"
            if txid in self._deciding:
                return "pending"  # its commit record is being written
            if txid in self._redo:
                return "commit"  # committed by this journal, not ended yet
            tx = self._active.get(txid)
            if tx is not None and tx.state == "active":
                if time.monotonic() <= tx.deadline:
                    return "pending"
                tx._doomed = True  # overdue: _commit sees this under the lock
        return "abort"  # presumed abort: no commit record, and none will come

    def recover(self, participants: Iterable[Participant] = ()) -> Dict[str, int]:
        """Resolve every in-doubt transaction and finish every committed one.

        Registers ``participants`` (by name), asks each for its in-doubt txids
        and answers from the log (commit record -> commit, none -> abort),
        then resends commit for committed transactions not yet ended.  Safe
        to call at any time, and repeatedly (all of it is idempotent).
        Returns counts: ``committed``, ``aborted``, ``resent``, ``unfinished``
        (committed transactions whose participants are missing or failing).
        """
        with self._lock:
            for p in participants:
                self._participants[p.name] = p
            self._registered = None
            known = dict(self._participants)
        out = {"committed": 0, "aborted": 0, "resent": 0, "unfinished": 0}
        redone, unfinished = self._redo_replay(known)
        out["resent"] += redone
        out["unfinished"] += unfinished
        for p in known.values():
            try:
                doubts = list(p.recover())
            except Exception:
                _logger.warning("recover: participant %r unreachable", p.name, exc_info=True)
                continue
            for txid in doubts:
                if not self.owns(txid):
                    continue
                d = self.decision(txid)
                try:
                    if d == "commit":
                        p.commit(txid)
                        out["committed"] += 1
                    elif d == "abort":
                        p.abort(txid)
                        out["aborted"] += 1
                    if d in ("commit", "abort"):
                        _logger.info("recover: in-doubt %s resolved at %r: %s", txid, p.name, d)
                except Exception:
                    _logger.warning(
                        "recover: participant %r did not take %s of %s",
                        p.name,
                        d,
                        txid,
                        exc_info=True,
                    )
        with self._lock:
            todo = [
                (t, n)
                for t, n in self._pending.items()
                if t not in self._finishing and t not in self._redo
            ]
            for t, _n in todo:
                self._finishing.add(t)
        for txid, names in todo:
            parts = [known.get(n) for n in names]
            if any(p is None for p in parts):
                with self._lock:
                    self._finishing.discard(txid)
                out["unfinished"] += 1
                continue
            out["resent"] += 1
            if not self._complete(txid, parts):
                out["unfinished"] += 1
        self.flush()
        if any(out.values()):
            _logger.info("recover: %(committed)d committed, %(aborted)d aborted, "
                         "%(resent)d commits resent, %(unfinished)d unfinished", out)
        return out

    def _redo_replay(self, known: Dict[str, Any]) -> Tuple[int, int]:
        """Put back in its log every batch of the transactions this journal
        committed (``REDO``) that a log lacks: ``(transactions finished,
        transactions left unfinished)``.

        In journal order, so per log in the order the batches were reserved.
        Each batch was to start at its recorded offset, and the participant
        is its log's only writer: a log whose end is at or past the batch's
        end holds it; one that ends inside it holds a prefix (the rest is
        appended); one that ends at its start lacks it.  Then the logs are
        synced and the transactions end.  Idempotent: a crash anywhere here
        leaves the same question for the next recover().
        """
        with self._lock:
            todo = [
                (t, self._redo[t])
                for t in self._pending
                if t in self._redo and t not in self._finishing
            ]
            for t, _b in todo:
                self._finishing.add(t)
        done = unfinished = 0
        stuck: set = set()  # names whose earlier batch is missing: their later ones wait
        for txid, batches in todo:
            ok = True
            for name, start, values, keys in batches:
                p = known.get(name)
                if name in stuck or not isinstance(p, LogParticipant):
                    stuck.add(name)
                    ok = False
                    continue
                try:
                    p._redo_replay(start, values, keys)
                except Exception:
                    _logger.warning(
                        "recover: committed batch of %s not put back in %r", txid, name,
                        exc_info=True,
                    )
                    stuck.add(name)
                    ok = False
            with self._lock:
                self._finishing.discard(txid)
                if ok:
                    self._pending.pop(txid, None)
                    self.stats_committed += 1
                    self._redo_unsynced.append(txid)
                    for name, start, values, _keys in batches:
                        log = known[name].log
                        e = self._redo_logs.setdefault(id(log), [log, 0])
                        e[1] = max(e[1], start + len(values))
            if ok:
                done += 1
            else:
                unfinished += 1
        with self._lock:
            left = {
                b[0] for t in self._pending if t in self._redo for b in self._redo[t]
            }
            self._redo_stale = self._redo_stale & left
        self._redo_settle(True)
        return done, unfinished

    def _redo_catch_up(self, parts: List[Any]) -> None:
        """Before a transaction on ``parts``: put back the batches an earlier
        incarnation committed to them (their offsets precede any new batch)."""
        stale = {p.name: p for p in parts if p.name in self._redo_stale}
        if stale:
            self._redo_replay({**self._participants, **stale})

    def in_doubt(self) -> List[str]:
        """Committed transactions not yet acknowledged by every participant."""
        with self._lock:
            return list(self._pending)

    def recent(self) -> List[Tuple[str, str, float]]:
        """The last finished transactions: ``(txid, outcome, wall time)``."""
        return list(self._recent)

    def flush(self) -> None:
        """Write the pending ``end`` batch now (transactions committed by
        this journal end once their logs are synced past them)."""
        self._redo_settle(True)
        with self._lock:
            batch, self._ended = self._ended, []
            log = self._journal.log
        if batch and log is not None:
            _journal_append(self._journal, log, (REC_ENDED, batch), durable=False)

    def stats(self) -> Dict[str, Any]:
        """Counters and sizes (committed, aborted, in flight, unfinished, journal)."""
        return {
            "path": self.path,
            "incarnation": self._inc,
            "committed": self.stats_committed,
            "aborted": self.stats_aborted,
            "active": len(self._active),
            "unfinished": len(self._pending),
            "journal_generation": self._journal.gen,
            "journal_records": self._journal.appended,
            "durability": self._journal.durability,
        }

    def close(self) -> None:
        """Write pending ``end`` records and release the journal."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            # a failed end write (a broken journal) still lets go of the journal
            with self._lock:
                self._closed = True
                self._journal.close()
            self._stop_helper()  # the group commit's thread

    def _simulate_crash(self) -> None:
        """Test hook: stop as a SIGKILLed process would (no ``end`` batch
        written, the journal's lock released)."""
        with self._lock:
            self._closed = True
            self._journal._simulate_crash()
        self._stop_helper()

    def __enter__(self) -> Coordinator:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Coordinator {self.path!r} incarnation {self._inc}>"


# ---------------------------------------------------------------------------
# built-in participants


def _fold_participant(
    records: Iterable[Tuple[Any, ...]], keys: Any
) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """A participant journal's unfinished transactions: ``(doubt, marks)``.

    ``doubt``: txid -> prepared ops, in journal order, for every transaction
    prepared and neither aborted nor done; ``marks``: txid -> commit mark for
    those of them marked committed.  ``keys(info)`` names the resource locks a
    transaction held: a later prepare taking one proves the earlier holder had
    finished (applied if it committed), so it leaves ``doubt``.
    """
    doubt: Dict[str, Any] = {}
    marks: Dict[str, Any] = {}
    holder: Dict[Any, str] = {}  # lock key -> last txid that prepared it
    for rec in records:
        kind = rec[0]
        if kind == REC_PREPARED:
            for k in keys(rec[2]):
                prev = holder.get(k)
                if prev is not None and prev in doubt and prev not in marks:
                    del doubt[prev]
                holder[k] = rec[1]
            doubt[rec[1]] = rec[2]
        elif kind == REC_MARK:
            marks[rec[1]] = rec[2]
        elif kind == REC_ABORTED:
            doubt.pop(rec[1], None)
            marks.pop(rec[1], None)
        elif kind == REC_DONE:
            for t in rec[1]:
                doubt.pop(t, None)
                marks.pop(t, None)
    # a mark without its prepared record says nothing (its txn finished)
    return doubt, {t: m for t, m in marks.items() if t in doubt}


class _JournaledParticipant(_PartCore):
    """Shared machinery: a journal of ``P`` (prepared), ``M`` (commit mark)
    and ``A`` (aborted) records and the in-doubt table rebuilt from it.

    Subclasses implement ``_check(txid, ops)`` (under the lock: return the
    durable form of the ops, or raise / return None to vote no),
    ``_apply(txid, info)`` (idempotent), ``_applied(info)`` (True if the
    effect is already there, used on recovery) and ``_release(info)``.
    """

    _kind = "participant"
    _locking = False  # True: _acquire/_release hold locks on the resource

    def __init__(
        self, name: str, state_path: str, durability: str, compact_records: int, segment_bytes: int
    ) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError("name must be a non-empty str")
        self.name = name
        self._compact_records = int(compact_records)
        self._journal = _Journal(state_path, self._kind, durability, segment_bytes)
        # the lock and the _doubt/_marks/_done tables are the compiled core's (_PartCore)

    def _replay(self) -> None:
        """Rebuild the tables from the journal and finish marked batches.

        Called by subclasses once their resource is set up; if it fails the
        journal is let go at once (its lock with it).
        """
        try:
            self._replay_journal()
        except BaseException:
            self._journal.close()
            raise

    def _replay_journal(self) -> None:
        # Two phases, in
        # this order (invariant R1 of the module docstring): first every
        # table is rebuilt from the journal, then the marked batches are
        # finished.  Finishing writes records, a write may compact, and a
        # compaction keeps exactly what the tables hold: so nothing may be
        # written while a transaction the journal still needs is missing
        # from them.
        for rec in self._journal.records:
            if rec[0] == REC_PREPARED and not self._info_ok(rec[2]):
                # a record that decodes but holds what this class never writes
                raise _CorruptJournal(
                    _gen_dir(self._journal.path, self._journal.gen),
                    None,
                    f"the prepared record of {rec[1]!r} does not hold a "
                    f"{type(self).__name__}'s ops",
                )
        doubt, marks = _fold_participant(self._journal.records, self._keys)
        self._journal.records = []
        for txid, info in doubt.items():
            if txid in marks:
                # the decision was commit and the apply may be partial
                self._marks[txid] = marks[txid]
            elif self._applied(info):
                continue  # committed and applied before the crash
            self._doubt[txid] = info
            self._acquire(txid, info)
        # marked batches in the order they were written to the resource
        # (ties: in the order the marks were written; a broken log gives the
        # marks written after it broke the same offset)
        order = {t: i for i, t in enumerate(marks)}
        for txid in sorted(self._marks, key=lambda t: (self._marks[t], order[t])):
            if _cp.armed:
                _crash_point("part.replay.before_finish", self.name)
            self.commit(txid)
            if _cp.armed:
                _crash_point("part.replay.after_finish", self.name)

    # hooks (defaults suit participants without locks)
    def _info_ok(self, info: Any) -> bool:
        """``info`` has the shape ``_check`` gives ops (checked on replay)."""
        return True

    def _keys(self, info: Any) -> Iterable[Any]:
        return ()

    def _acquire(self, txid: str, info: Any) -> None:
        pass

    def _release(self, txid: str, info: Any) -> None:
        pass

    def _applied(self, info: Any) -> bool:
        return False

    def abort(self, txid: str) -> None:
        """Drop the prepared ops of ``txid`` (idempotent; unknown txid: no-op)."""
        with self._lock:
            info = self._doubt.pop(txid, None)
            if info is None:
                return
            if txid in self._marks:
                # A commit mark means the coordinator decided commit; an abort
                # for it is a protocol violation, never honoured.
                self._doubt[txid] = info
                raise EngineError(f"txn {txid} is committed at {self.name!r}; cannot abort it")
            self._release(txid, info)
            log = self._journal.log
        if _cp.armed:
            _crash_point("part.abort.before_write", self.name)
        # Not needed for safety (no outcome = ask the coordinator = abort);
        # it spares that question after a restart.
        _journal_append(self._journal, log, (REC_ABORTED, txid), durable=False)
        if _cp.armed:
            _crash_point("part.abort.after_write", self.name)
        self._maybe_compact()

    def recover(self) -> List[str]:
        """The txids prepared here whose outcome is not known yet."""
        with self._lock:
            return [t for t in self._doubt if t not in self._marks]

    def resolve(self, coordinator: Union[Coordinator, str, os.PathLike[str]]) -> Dict[str, int]:
        """Resolve in-doubt txns by asking ``coordinator`` (object or log path).

        For a participant that restarts on its own.  Transactions the
        coordinator is still deciding stay in doubt (see :func:`decision`).
        """
        out = {"committed": 0, "aborted": 0, "pending": 0}
        for txid in self.recover():
            if isinstance(coordinator, Coordinator):
                if not coordinator.owns(txid):
                    continue
                d = coordinator.decision(txid)
            else:
                try:
                    d = decision(coordinator, txid)
                except ValueError:
                    continue
            if d == "commit":
                self.commit(txid)
                out["committed"] += 1
            elif d == "abort":
                self.abort(txid)
                out["aborted"] += 1
            else:
                out["pending"] += 1
        return out

    def _maybe_compact(self) -> None:
        if self._journal.appended < self._compact_records:
            return
        with self._lock:
            if self._closed or self._journal.appended < self._compact_records:
                return
            keep: List[Tuple[Any, ...]] = []
            for txid, info in self._doubt.items():
                keep.append((REC_PREPARED, txid, info))
                if txid in self._marks:
                    keep.append((REC_MARK, txid, self._marks[txid]))
            self._journal.switch(keep)

    def close(self) -> None:
        """Release the journal (in-doubt transactions stay in it)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                if self._done:
                    if _cp.armed:
                        _crash_point("part.close.before_done", self.name)
                    self._journal.log.append(_encode((REC_DONE, self._done)))
                    self._done = []
                    if _cp.armed:
                        _crash_point("part.close.after_done", self.name)
            finally:
                # a failed done write (a broken journal) still lets go of the journal
                self._journal.close()

    def _simulate_crash(self) -> None:
        """Test hook: stop as a SIGKILLed process would (no ``done`` batch
        written, the journal's lock released; the resource is the caller's)."""
        with self._lock:
            self._closed = True
            self._journal._simulate_crash()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} in doubt: {len(self._doubt)}>"

    # subclass API
    def _check(self, txid: str, ops: Sequence[Any]) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def _apply(self, txid: str, info: Any) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


def _default_state_path(resource_path: Optional[str], name: str, kind: str) -> str:
    if resource_path is None:
        raise TypeError(f"{kind} needs state_path= (its resource has no .path to derive it from)")
    return os.fspath(resource_path).rstrip(os.sep) + ".txn"


class LogParticipant(_LogPartCore, _JournaledParticipant):
    """Atomic appends to an :class:`engine.Log`: a transaction's batch for this
    log appears in it whole (contiguously) or not at all.

    ``ops``: values (bytes-like or str) or ``(key, value)`` pairs.  While a
    ``LogParticipant`` manages a log, append to it only through transactions
    (commits are serialized and the participant relies on being the log's
    only writer to find out, after a crash, how much of a batch is in).

    Its journal lives at ``state_path`` (default ``<log path>.txn``) with the
    log's durability.  A SIGKILL in the middle of a commit can leave a prefix
    of the batch in the log until recovery (which runs when the participant
    is opened again) appends the rest.
    """

    _kind = "log-participant"

    def __init__(
        self,
        log: Any,
        name: Optional[str] = None,
        state_path: Optional[str] = None,
        *,
        compact_records: int = 50_000,
        segment_bytes: int = 1 << 20,
    ) -> None:
        path = getattr(log, "path", None)
        if name is None:
            name = "log:" + os.path.basename(os.fspath(path).rstrip(os.sep)) if path else None
        if name is None:
            raise TypeError("name is required")
        self.log = log
        self._commit_cv = threading.Condition(threading.Lock())  # group commit queue
        self._finish_floor = 0  # where the last marked batch finished ends (see _finish_marked)
        super().__init__(
            name,
            state_path or _default_state_path(path, name, "LogParticipant"),
            getattr(log, "durability", "always"),
            compact_records,
            segment_bytes,
        )
        self._replay()

    def _info_ok(self, info: Any) -> bool:
        # (values, keys or None), as _check makes it
        if not (isinstance(info, tuple) and len(info) == 2 and isinstance(info[0], list)):
            return False
        values, keys = info
        return (
            bool(values)
            and all(type(v) is bytes for v in values)
            and (
                keys is None
                or isinstance(keys, list)
                and len(keys) == len(values)
                and all(k is None or type(k) is bytes for k in keys)
            )
        )

    def _apply(self, txid: str, info: Any) -> None:
        if txid in self._marks:
            self._finish_marked(txid, info)  # recovery: a batch cut short by a crash
            return
        # Group commit: concurrent commits queue up; one thread (the leader)
        # writes every queued batch with ONE durable mark write and ONE
        # append_many (one sync each), then wakes the others.
        if not self._commit_queue and self._commit_lock.acquire(False):
            # uncontended: write it now (no queue, no wakeups)
            try:
                self._commit_one(txid, info)
            finally:
                self._commit_lock.release()
            if _cp.armed:
                _crash_point("log.commit.after_append", self.name)
            return
        req = [txid, info, False, None]  # txid, info, done, error
        cv = self._commit_cv
        with cv:
            self._commit_queue.append(req)
            while not req[2]:
                if not self._leader:
                    self._leader = True
                    batch, self._commit_queue = self._commit_queue, []
                    break
                cv.wait()
            else:
                batch = None
        if batch is not None:
            err: Optional[BaseException] = None
            try:
                self._commit_batch(batch)
            except BaseException as exc:
                err = exc
            with cv:
                for r in batch:
                    r[2], r[3] = True, err
                self._leader = False
                cv.notify_all()
        if req[3] is not None:
            raise req[3]
        if _cp.armed:
            _crash_point("log.commit.after_append", self.name)

    def _commit_one(self, txid: str, info: Any) -> None:
        """:meth:`_commit_batch` for one transaction (the uncontended path)."""
        if self._reserved:
            self._settle()
        start = self.log.next_offset
        with self._lock:
            # under the lock a journal switch takes: the mark is either in
            # memory before the switch copies it, or written to the new log
            self._marks[txid] = start
            jlog = self._journal.log
        if _cp.armed:
            _crash_point("log.commit.before_mark", self.name)
        try:
            jlog.append(_encode((REC_MARK, txid, start)))
            if self._journal.sync:
                jlog.flush()
        except Closed:
            if jlog is self._journal.log:
                raise
        self._journal.appended += 1
        if _cp.armed:
            _crash_point("log.commit.after_mark", self.name)
        values, keys = info
        if keys is None:
            self.log.append_many(values)
        else:
            self.log.append_many(values, keys)

    def _commit_batch(self, batch: List[List[Any]], locked: bool = False) -> None:
        """Write the batches of ``batch`` (``[txid, info, ...]`` each) as one group."""
        if not locked:
            with self._commit_lock:
                self._commit_batch(batch, True)
            return
        if self._reserved:
            self._settle()
        start = self.log.next_offset
        marks = []
        at = start
        anykey = False
        with self._lock:
            for r in batch:
                self._marks[r[0]] = at
                marks.append(_encode((REC_MARK, r[0], at)))
                at += len(r[1][0])
                anykey = anykey or r[1][1] is not None
            jlog = self._journal.log
        if len(batch) == 1:
            values, keys = batch[0][1]
        else:
            values = [x for r in batch for x in r[1][0]]
            keys = None
            if anykey:
                keys = []
                for r in batch:
                    v, k = r[1]
                    keys.extend([None] * len(v) if k is None else k)
        if _cp.armed:
            _crash_point("log.commit.before_mark", self.name)
        # Durable before the batch: after a crash a mark says where its
        # batch starts, so recovery appends exactly what is missing.
        try:
            jlog.append_many(marks)
            if self._journal.sync:
                jlog.flush()
        except Closed:
            if jlog is self._journal.log:
                raise
        self._journal.appended += len(marks)
        if _cp.armed:
            _crash_point("log.commit.after_mark", self.name)
        if keys is not None:
            self.log.append_many(values, keys)
        else:
            self.log.append_many(values)

    def _redo_replay(
        self, start: int, values: List[bytes], keys: Optional[List[Optional[bytes]]]
    ) -> None:
        """Recovery of a batch a coordinator committed by its own journal
        (see :meth:`Coordinator._redo_replay`): make the log hold it from
        ``start``, appending the part it lacks."""
        with self._commit_lock:
            n = len(values)
            end = self.log.next_offset
            if end < start:
                raise EngineError(
                    f"log {getattr(self.log, 'path', '?')!r} ends at {end}, before the committed "
                    f"batch reserved at {start}: it lost records behind the participant's back"
                )
            if end < start + n:
                have = end - start
                if _cp.armed:
                    _crash_point("coord.redo.before_replay", self.name)
                if keys is None:
                    self.log.append_many(values[have:])
                else:
                    self.log.append_many(values[have:], keys[have:])
                if _cp.armed:
                    _crash_point("coord.redo.after_replay", self.name)
            self._reserved = max(self._reserved, start + n)

    def _finish_marked(self, txid: str, info: Any) -> None:
        """Make the log hold ``txid``'s batch, whole and once, from its mark on.

        The mark says where the batch was to start; what the log holds there
        is checked record by record, because a mark is durable before its
        batch and the batch's write may have failed (a broken log keeps the
        marks of later commits at the same offset) or stopped part way (a
        crash: a prefix at the log's end).  Marked batches are finished in
        the order they were written, each placed after the previous one
        (``_finish_floor``).
        """
        values, keys = info
        with self._commit_lock:
            start = self._marks[txid]
            end = self.log.next_offset
            if end < start:
                raise EngineError(
                    f"log {getattr(self.log, 'path', '?')!r} ends before txn {txid}'s batch "
                    f"(offset {start}): it was truncated behind the participant's back"
                )
            pos = max(start, self._finish_floor)
            at, have = self._locate(pos, end, values, keys)
            if at is None:
                at, have = end, 0  # not in the log at all: the whole batch goes at its end
            if have < len(values):
                if _cp.armed:
                    _crash_point("log.finish.before_append", self.name)
                if keys is None:
                    self.log.append_many(values[have:])
                else:
                    self.log.append_many(values[have:], keys[have:])
                if _cp.armed:
                    _crash_point("log.finish.after_append", self.name)
            self._finish_floor = at + len(values)

    def _locate(
        self, pos: int, end: int, values: List[bytes], keys: Optional[List[Any]]
    ) -> Tuple[Optional[int], int]:
        """Where the batch is in the log at or after ``pos``: ``(offset, records
        there)``, records < ``len(values)`` only for a prefix at the log's end;
        ``(None, 0)`` when no place from ``pos`` on holds it."""
        if pos >= end:
            return pos, 0
        path = getattr(self.log, "path", None)
        if path is None:
            # no reader for this log: trust the count past the mark (one writer)
            return pos, min(end - pos, len(values))
        from ._log import LogReader

        recs: List[Tuple[bytes, Optional[bytes]]] = []
        with LogReader(path, start=pos) as reader:
            while len(recs) < end - pos:
                got = reader.read_many(end - pos - len(recs))
                if not got:
                    break
                recs.extend((bytes(r.value), None if r.key is None else bytes(r.key)) for r in got)
        want = [(v, None if keys is None else keys[i]) for i, v in enumerate(values)]
        for i in range(len(recs)):
            n = 0
            while n < len(want) and i + n < len(recs) and recs[i + n] == want[n]:
                n += 1
            if n == len(want) or i + n == len(recs):
                return pos + i, n
        return None, 0


def _store_apply(store: Any, ops: List[Tuple[bytes, Optional[bytes], int]]) -> None:
    """Apply resolved ``(key, value-or-None, expected_version)`` ops atomically."""
    apply = getattr(store, "apply", None)
    if apply is None:
        raise TypeError("StoreParticipant needs a store with an atomic apply(ops)")
    apply([_store_op(k, v, e) for k, v, e in ops])


def _store_op(key: bytes, value: Optional[bytes], expected: int) -> Any:
    if value is None:
        return ("delete", key, expected)
    return ("put", key, value, expected)


def _store_version(store: Any, key: bytes) -> int:
    return int(store.get(key)[0])


class StoreParticipant(_JournaledParticipant):
    """Conditional writes to an :class:`engine.VersionedStore` that commit together.

    ``ops``: ``(key, value)`` (unconditional put), ``(key, value,
    expected_version)`` (compare-and-set) or ``(key, None, expected)`` (delete).
    Prepare checks every expected version (a mismatch raises
    :class:`~engine.VersionConflict`: the transaction aborts) and locks the
    keys until the outcome (a second transaction touching a locked key votes
    no: no-wait locking, so no deadlock); commit applies all writes as one
    atomic ``store.apply``.  Write the managed keys only through
    transactions while the participant runs.

    Recovery tells a committed-and-applied transaction by the versions: each
    key's version moves off the one recorded at prepare exactly when the
    transaction's writes are in (a later transaction on the same key in the
    journal proves the earlier one finished, which rules out an A-B-A through
    a delete resetting the version to 0).
    """

    _kind = "store-participant"
    _locking = True

    def __init__(
        self,
        store: Any,
        name: Optional[str] = None,
        state_path: Optional[str] = None,
        *,
        durability: Optional[str] = None,
        compact_records: int = 50_000,
        segment_bytes: int = 1 << 20,
    ) -> None:
        path = getattr(store, "path", None)
        if name is None:
            name = "store:" + os.path.basename(os.fspath(path).rstrip(os.sep)) if path else None
        if name is None:
            raise TypeError("name is required")
        self.store = store
        self._locks: Dict[bytes, str] = {}  # key -> txid holding it
        dur = (
            durability or getattr(store, "durability", None) or getattr(store, "_durability", None)
        )
        super().__init__(
            name,
            state_path or _default_state_path(path, name, "StoreParticipant"),
            str(dur or "always"),
            compact_records,
            segment_bytes,
        )
        self._replay()

    def _check(self, txid: str, ops: Sequence[Any]) -> Any:
        from .errors import VersionConflict

        resolved: List[Tuple[bytes, Optional[bytes], int]] = []
        seen = set()
        for op in ops:
            if not isinstance(op, tuple) or len(op) not in (2, 3):
                raise ValueError(
                    "a StoreParticipant op is (key, value) or (key, value, expected_version)"
                )
            key = _as_bytes(op[0], "key")
            value = None if op[1] is None else _as_bytes(op[1], "value")
            if key in seen:
                raise ValueError(f"key {key!r} twice in one transaction")
            seen.add(key)
            holder = self._locks.get(key)
            if holder is not None and holder != txid:
                _logger.debug("txn %s: key %r locked by %s", txid, key, holder)
                return None  # no-wait: vote no rather than risk a deadlock
            cur = _store_version(self.store, key)
            if len(op) == 3 and op[2] is not None and op[2] != cur:
                raise VersionConflict(key, op[2], cur)
            if value is None and cur == 0:
                continue  # deleting a missing key: nothing to do
            resolved.append((key, value, cur))
        return resolved

    def _info_ok(self, info: Any) -> bool:
        # [(key, value or None, version prepared at)], as _check makes it
        return isinstance(info, list) and all(
            isinstance(op, tuple)
            and len(op) == 3
            and type(op[0]) is bytes
            and (op[1] is None or type(op[1]) is bytes)
            and type(op[2]) is int
            for op in info
        )

    def _keys(self, info: Any) -> Iterable[Any]:
        return [op[0] for op in info]

    def _acquire(self, txid: str, info: Any) -> None:
        for key, _v, _e in info:
            self._locks[key] = txid

    def _release(self, txid: str, info: Any) -> None:
        for key, _v, _e in info:
            if self._locks.get(key) == txid:
                del self._locks[key]

    def _applied(self, info: Any) -> bool:
        # apply() is atomic and the keys were locked: one moved key = all moved
        return bool(info) and _store_version(self.store, info[0][0]) != info[0][2]

    def _apply(self, txid: str, info: Any) -> None:
        if info and not self._applied(info):
            _store_apply(self.store, info)


class OffsetParticipant(_JournaledParticipant):
    """A :class:`engine.LogReader` group offset committed with the transaction,
    for consume-transform-produce: read from one log, write to others, and
    commit the read position, all or nothing.

    ``ops``: one int (or several: the largest wins), the offset passed to
    ``reader.commit(offset)`` (the next offset to read).  The reader must
    have a ``group``.  The committed offset never moves backwards.
    """

    _kind = "offset-participant"

    def __init__(
        self,
        reader: Any,
        name: Optional[str] = None,
        state_path: Optional[str] = None,
        *,
        durability: Durability = "always",
        compact_records: int = 50_000,
        segment_bytes: int = 1 << 20,
        log_path: Optional[str] = None,
    ) -> None:
        group = getattr(reader, "group", None)
        if not group:
            raise ValueError("the reader needs a group= (its committed offset is what commits)")
        if name is None:
            name = f"offset:{group}"
        self.reader = reader
        if state_path is None:
            if log_path is None:
                raise TypeError("OffsetParticipant needs state_path= (or log_path= to derive it)")
            state_path = os.fspath(log_path).rstrip(os.sep) + f".{group}.txn"
        super().__init__(name, state_path, durability, compact_records, segment_bytes)
        self._replay()

    def _check(self, txid: str, ops: Sequence[Any]) -> Any:
        if isinstance(ops, int):
            ops = [ops]
        offs = list(ops)
        if not offs or not all(isinstance(o, int) and o >= 0 for o in offs):
            raise ValueError("OffsetParticipant ops are non-negative int offsets")
        return max(offs)

    def _info_ok(self, info: Any) -> bool:
        # the offset to commit, as _check makes it
        return isinstance(info, int) and info >= 0

    def _applied(self, info: Any) -> bool:
        c = self.reader.committed()
        return c is not None and c >= info

    def _apply(self, txid: str, info: Any) -> None:
        if not self._applied(info):
            self.reader.commit(info)


# ---------------------------------------------------------------------------
# participants in other processes, over the project's rings


def _ring_names(endpoint: str) -> Tuple[str, str]:
    return f"{endpoint}.req", f"{endpoint}.rsp"


class ParticipantServer:
    """Serve a participant to coordinators in other processes over two rings.

    Creates the shared rings ``<endpoint>.req`` (requests) and
    ``<endpoint>.rsp`` (responses) under /dev/shm (mode 0600); a
    :class:`RemoteParticipant` with the same endpoint in the coordinator's
    process talks to it.  Run :meth:`serve_forever` (or :meth:`start` for a
    background thread).  ``coordinator`` (a coordinator log path, optional)
    lets the server resolve its in-doubt transactions itself at start
    (:func:`decision`); otherwise the coordinator's ``recover()`` does.

    One request at a time; requests carry an id and responses echo it, so a
    stale response (from before a restart of either side) is ignored.
    Payloads are marshalled tuples of plain values (bytes, str, int, None,
    tuples, lists).
    """

    def __init__(
        self,
        participant: Participant,
        endpoint: Optional[str] = None,
        *,
        capacity: int = 1 << 20,
        coordinator: Optional[str] = None,
    ) -> None:
        self.participant = participant
        self.endpoint = endpoint or participant.name.replace("/", "_").replace(":", "_")
        self._capacity = capacity
        self._open_rings()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.served = 0
        if coordinator is not None and hasattr(participant, "resolve"):
            participant.resolve(coordinator)

    def _open_rings(self) -> None:
        from ._ring import Ring

        req, rsp = _ring_names(self.endpoint)
        for n in (req, rsp):
            try:
                Ring.unlink(n)  # a ring left by an earlier run: start clean
            except (FileNotFoundError, EngineError, OSError):
                pass
        # rsp first: a client that sees the new req ring finds rsp there too
        self._rsp_ring = Ring.create(rsp, capacity=self._capacity, mode="spsc")
        self._req_ring = Ring.create(req, capacity=self._capacity, mode="spsc")
        self._in = self._req_ring.consumer()
        self._out = self._rsp_ring.producer()

    def _handle(self, raw: bytes) -> bytes:
        try:
            req = marshal.loads(raw)
            rid, method, txid, ops = req
        except Exception:
            return _dumps((None, False, "malformed request"), 2)
        p = self.participant
        try:
            if method == "prepare":
                result: Any = bool(p.prepare(txid, ops))
            elif method == "commit":
                p.commit(txid)
                result = None
            elif method == "abort":
                p.abort(txid)
                result = None
            elif method == "recover":
                result = list(p.recover())
            elif method == "ping":
                result = p.name
            else:
                return _dumps((rid, False, f"unknown method {method!r}"), 2)
        except Exception as exc:
            return _dumps((rid, False, f"{type(exc).__name__}: {exc}"), 2)
        return _dumps((rid, True, result), 2)

    def serve_once(self, timeout: float = 0.05) -> bool:
        """Serve one request if one arrives within ``timeout``; True if served."""
        try:
            raw = self._in.get(timeout=timeout)
        except Timeout:
            return False
        except Closed:
            # a client closed the request stream: start fresh rings
            self._close_rings()
            self._open_rings()
            return False
        try:
            self._out.put(self._handle(raw), timeout=5.0)
        except Timeout:
            # nobody drains responses (the client died): start fresh rings so
            # the next client is not stuck behind stale answers
            self._close_rings()
            self._open_rings()
        self.served += 1
        return True

    def serve_forever(self) -> None:
        """Serve until :meth:`stop` (from another thread) or :meth:`close`."""
        while not self._stop.is_set():
            self.serve_once(0.05)

    def start(self) -> ParticipantServer:
        """Serve in a daemon thread."""
        self._thread = threading.Thread(
            target=self.serve_forever, name=f"txn-server-{self.endpoint}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving (the thread, if started, ends within ~50 ms)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None

    def close(self) -> None:
        """Stop, close and unlink the rings."""
        from ._ring import Ring

        self.stop()
        self._close_rings()
        for n in _ring_names(self.endpoint):
            try:
                Ring.unlink(n)
            except Exception:
                pass

    def _close_rings(self) -> None:
        for obj in (self._in, self._out, self._req_ring, self._rsp_ring):
            try:
                obj.close()
            except Exception:  # pragma: no cover
                pass

    def __enter__(self) -> ParticipantServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class RemoteParticipant:
    """The coordinator-side handle of a :class:`ParticipantServer` in another process.

    ``name`` must be the served participant's name (it goes into commit
    records); ``endpoint`` defaults to the server's default for that name.
    Each call waits at most ``timeout`` seconds; a prepare that times out
    votes no (the transaction aborts), a commit that times out is resent by
    the coordinator's ``recover()``.  Re-attaches to the rings after the
    server restarts.
    """

    def __init__(self, name: str, endpoint: Optional[str] = None, *, timeout: float = 5.0) -> None:
        self.name = name
        self.endpoint = endpoint or name.replace("/", "_").replace(":", "_")
        self.timeout = float(timeout)
        self._lock = threading.Lock()
        self._rids = itertools.count(1)
        self._nonce = int.from_bytes(os.urandom(4), "little") << 32
        self._rings: Optional[Tuple[Any, Any, Any, Any]] = None
        self._inodes: Tuple[int, ...] = ()

    def _attach(self) -> Tuple[Any, Any, Any, Any]:
        from ._ring import Ring

        if self._rings is None:
            req, rsp = _ring_names(self.endpoint)
            self._inodes = self._ring_inodes()
            rq = Ring.attach(req)
            rs = Ring.attach(rsp)
            self._rings = (rq, rs, rq.producer(), rs.consumer())
        return self._rings

    def _ring_inodes(self) -> Tuple[int, ...]:
        from . import _ring

        shm_dir = getattr(_ring, "SHM_DIR", "/dev/shm")
        out = []
        for n in _ring_names(self.endpoint):
            try:
                out.append(os.stat(os.path.join(shm_dir, n)).st_ino)
            except OSError:
                out.append(-1)
        return tuple(out)

    def _detach(self) -> None:
        # Never close our producer: that would end the request stream for
        # the server.  Dropping it frees the producer slot for the next one.
        if self._rings is not None:
            try:
                self._rings[3].close()  # our consumer slot
            except Exception:
                pass
            self._rings = None

    def _call(self, method: str, txid: Optional[str] = None, ops: Any = None) -> Any:
        with self._lock:
            rid = self._nonce | next(self._rids)
            msg = _dumps((rid, method, txid, ops), 2)
            deadline = time.monotonic() + self.timeout
            if self._rings is not None and self._ring_inodes() != self._inodes:
                self._detach()  # the server restarted (new rings): attach afresh
            try:
                rq, _rs, prod, cons = self._attach()
                prod.put(msg, timeout=self.timeout)
                while True:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise Timeout(f"participant {self.name!r} did not answer {method} in time")
                    try:
                        # in slices: a server that died is noticed within ~50 ms
                        raw = cons.get(timeout=min(left, 0.05))
                    except Timeout:
                        if not any(c["alive"] for c in rq.stats()["consumers"]):
                            raise EngineError(
                                f"participant server {self.endpoint!r} is not running"
                            ) from None
                        continue
                    rrid, ok, result = marshal.loads(raw)
                    if rrid == rid:
                        break
            except Closed:
                self._detach()  # the server closed its rings: attach afresh next time
                raise
        if not ok:
            raise EngineError(f"participant {self.name!r}: {result}")
        return result

    def prepare(self, txid: str, ops: Sequence[Any]) -> bool:
        """Ask the server to prepare; a timeout or remote error votes no (raises)."""
        return bool(self._call("prepare", txid, list(ops)))

    def commit(self, txid: str) -> None:
        """Tell the server to commit (idempotent)."""
        self._call("commit", txid)

    def abort(self, txid: str) -> None:
        """Tell the server to abort (idempotent)."""
        self._call("abort", txid)

    def recover(self) -> List[str]:
        """The server's in-doubt txids."""
        return list(self._call("recover"))

    def ping(self) -> str:
        """Round trip; returns the served participant's name."""
        return str(self._call("ping"))

    def close(self) -> None:
        """Detach from the rings."""
        with self._lock:
            self._detach()

    def __enter__(self) -> RemoteParticipant:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# their types are checked once at enlist (a user's participant class every time)
_trust(_JournaledParticipant, RemoteParticipant)
# a lone durable transaction's commit overlaps the syncs of its LogParticipants
_split_commits(LogParticipant)
