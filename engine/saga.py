"""Sagas: flexible transactions made of steps that can be undone, over the segment log.

Two-phase commit needs every participant to hold a *prepared* state. Many real
steps (charge a card, send an e-mail, write to another team's queue) cannot be
prepared, only undone. A saga runs such steps in order and, when one fails,
runs the *compensations* of the steps that completed, in reverse order. The
world is temporarily inconsistent while it runs; it ends consistent.

Every step's start and outcome is written to an :class:`engine.Log` before the
saga moves on, so after a crash (even ``SIGKILL``) :meth:`Saga.recover` drives
each unfinished saga to an end: forward (retrying the step that was in flight)
or backward (compensating), as its log says.

Example::

    saga = Saga("/var/lib/app/orders")
    saga.step("reserve", reserve_stock, release_stock)
    saga.step("charge", charge_card, refund_card, timeout=5.0, retries=3)
    saga.step("ship", create_shipment, cancel_shipment)
    saga.recover()                      # finish whatever a crash left behind
    try:
        results = saga.run({"order": 42, "sku": "A-1", "qty": 2})
    except StepFailed as exc:           # everything done so far was undone
        print(exc.step, exc.cause)

What a step must do
-------------------
Each action and compensation is called with one :class:`StepContext`: ``sc.ctx``
(the saga's context, as recorded when it began), ``sc.key`` (the stable
idempotency key ``"<saga id>:<step name>"``, the same for the action and its
compensation and for every retry, in every process), ``sc.results`` (what the
earlier steps returned) and, for a compensation, ``sc.result`` (what the action
returned, or ``None`` if its outcome is not known).

* **Actions and compensations must be idempotent by key.** After a crash the
  step that was in flight runs again with the same key; a retry after a
  timeout may overlap the attempt that timed out.
* **A compensation may come first.** If a step's outcome is unknown (the
  process died inside it, or it timed out) and the saga goes backward, the
  compensation runs even though the action may never have taken effect; it
  must then do nothing, and remember the key so that a late action is a no-op
  (a tombstone).
* An action that *raises* is taken to have had no effect; it is retried
  (``retries`` times, exponential backoff with jitter) and, when it still
  fails, the saga compensates the steps that completed (and those whose
  outcome is unknown) and :meth:`Saga.run` raises :class:`StepFailed`.
* A compensation that keeps failing (``compensate_retries`` attempts) leaves the
  saga ``stuck``: it is logged, :meth:`Saga.run` raises :class:`SagaStuck`,
  ``queue-engine saga ls`` and :meth:`Saga.recover` report it, and
  ``recover(retry_stuck=True)`` tries again. It is never dropped.
* Return values are written to the log (JSON by default, see ``codec``), so
  they must be encodable; so must ``ctx``. Treat ``ctx`` as read-only (a
  recovered saga sees it as it was recorded) and pass data forward by
  returning it: later steps read it in ``sc.results``.

Durability
----------
``durability`` is the :class:`engine.Log`'s: with ``"always"`` each step's start
record is on disk (msync + fdatasync) before its action runs, and each outcome
before the next step starts; a saga's last record is on disk before
:meth:`Saga.run` returns. ``"none"`` survives a process crash (``SIGKILL``)
but not a power loss. An outcome and the next step's start share one sync, so a
saga of *n* steps costs *n* + 1 syncs.  A write waits for its sync after
releasing the saga's lock, so concurrent writes share syncs (the log
group-commits): sagas in several threads (8 threads running 3-step sagas:
about one sync per two sagas) and the parallel steps of a group (their start
records).  Then each step costs a wake-up of its thread and the saga's own
Python work, one after another under the GIL while the disk waits: so the
default codec's records are formatted from templates (the bytes the JSON
encoder would make), not encoded one by one, and a saga whose steps all run
alone, synchronous and without a timeout goes forward through one compiled
loop (``engine._saga.forward``) that writes the same records as the general
one.

Parallel groups
---------------
Consecutive steps declared with the same ``group`` run in parallel (sync
callables in worker threads, coroutines on the event loop). The stage ends
when all of them have ended; if any failed, all completed steps are
compensated in reverse declaration order.

Compaction
----------
The log keeps every saga's records until :meth:`Saga.compact` (run by itself
every ``compact_every`` finished sagas) records the *low-water mark*, the
first record of the oldest unfinished saga, and applies the log's
``retention_bytes`` / ``retention_age``: segments wholly below the mark may go,
nothing an unfinished or stuck saga needs ever does. Reopening reads from the
mark.

Invariants
----------
What every change to running, recovery or compaction must keep (the crash
tests in ``tests/stress/test_saga_crash.py`` and the state machine in
``tests/test_saga_model.py`` check them):

* **S1, log before effect.** A step's ``start`` record is written (durable
  per ``durability``) before its action or compensation runs; its outcome
  goes out with the next durable write of the saga (the next ``start``, or
  the ``end``), so before the next action runs. So after a crash every step
  that may have taken effect is ``done`` or in flight (outcome unknown) in
  the log.
* **S2, one saga's records in order.** A saga's records reach the log in the
  order they were folded (``_emit`` appends under the saga's lock): a
  ``start`` never lands before its ``begin``, an ``end`` never before the
  outcomes it sums up.
* **S3, the fold decides.** Live runs, recovery and ``saga ls`` all derive a
  saga's state from its records with one fold (``_Run.fold``; the live
  forward path, ``engine._saga.forward``, applies the ``start`` and ``done`` records
  through the same ``_Run`` methods the fold calls); a step in
  flight when its writer died counts as uncertain, and an uncertain step is
  compensated when the saga goes backward.
* **S4, forward or backward, never both.** Once an ``abort`` record is
  written a saga only compensates; it ends ``compensated`` (every step that
  was done or uncertain undone, in reverse order) or ``stuck``. Without one
  it only goes forward and ends ``done``.
* **S5, never dropped.** An unfinished or stuck saga stays in ``_runs`` until
  its ``end`` record (``done`` or ``compensated``) is written; ``stuck`` is
  not finished and stays until a retry finishes it.
* **S6, the low-water mark is below every unfinished saga.** ``compact``
  records as the mark the smallest ``begin_offset`` of ``_runs`` (or the log's
  end), read under the lock that registers new runs, whose begin records land
  at or after the ``next_offset`` read then. Retention never deletes a
  segment at or past the mark, and a reopen folds from it: so every record of
  every unfinished saga survives compaction and is folded again, at every
  crash point of compaction (before or after the mark is written, before or
  after segments are deleted).

Events
------
``events=`` takes an :class:`engine.Log` (each saga record is appended to it as
JSON, keyed by the saga id, after it is durable in the saga's own log) or a
callable taking a dict. Events are at-least-once: a record may be published
again by recovery after a crash.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import json
import logging
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii as _esc
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type, Union

from . import _crashpoints as _cp
from ._fsutil import Durability, check_durability
from ._saga import PLAIN as _PLAIN
from ._saga import T_BEGIN as _T_BEGIN
from ._saga import T_CDONE as _T_CDONE
from ._saga import T_CSTART as _T_CSTART
from ._saga import T_DONE as _T_DONE
from ._saga import T_END_DONE as _T_END_DONE
from ._saga import T_START as _T_START
from ._saga import RunCore, StepContext, append_pending, forward, json_value, wrote
from .errors import EngineError, Timeout

__all__ = [
    "Saga",
    "SagaState",
    "SagaInfo",
    "StepContext",
    "StepFailed",
    "SagaStuck",
    "list_sagas",
]

_logger = logging.getLogger("engine")


# ---------------------------------------------------------------------------
# public data types and errors
# ---------------------------------------------------------------------------


class SagaState(str, enum.Enum):
    """Where a saga stands.

    ``RUNNING`` (going forward), ``COMPENSATING`` (going backward),
    ``DONE`` (every step completed), ``COMPENSATED`` (a step failed and every
    completed step was undone) and ``STUCK`` (a compensation kept failing: the
    saga needs attention; ``recover(retry_stuck=True)`` tries again).
    """

    RUNNING = "running"
    COMPENSATING = "compensating"
    DONE = "done"
    COMPENSATED = "compensated"
    STUCK = "stuck"

    @property
    def finished(self) -> bool:
        """True for DONE and COMPENSATED (STUCK is not finished: it waits for a retry)."""
        return self in (SagaState.DONE, SagaState.COMPENSATED)

    def __str__(self) -> str:
        return self.value


# value -> state, without the Enum call's cost (a fold per saga end)
_STATES: Dict[Any, SagaState] = {s.value: s for s in SagaState}


class StepFailed(EngineError):
    """A step failed after its retries; the saga was rolled back by compensation.

    ``saga_id`` and ``step`` say which, ``cause`` is the last error (its text,
    and ``__cause__`` is the exception itself when it was raised in this
    process), ``compensated`` the steps whose compensations ran, in the order
    they ran. Nothing of the saga remains in effect; fix the cause and run a new
    saga.
    """

    def __init__(self, saga_id: str, step: str, cause: str, compensated: Sequence[str]) -> None:
        self.saga_id = saga_id
        self.step = step
        self.cause = cause
        self.compensated = list(compensated)
        done = ", ".join(self.compensated) or "nothing to undo"
        super().__init__(
            f"saga {saga_id}: step {step!r} failed ({cause}); compensated: {done}. "
            "Nothing of this saga is left in effect; fix the cause and run it again"
        )


class SagaStuck(EngineError):
    """A compensation kept failing: the saga is ``stuck`` and needs attention.

    ``step`` is the step whose compensation failed, ``cause`` its last error,
    ``failed_step`` the step whose failure started the rollback. The saga is
    recorded as stuck (``queue-engine saga ls PATH`` lists it); fix the cause,
    then call ``Saga.recover(retry_stuck=True)``.
    """

    def __init__(self, saga_id: str, step: str, cause: str, failed_step: Optional[str]) -> None:
        self.saga_id = saga_id
        self.step = step
        self.cause = cause
        self.failed_step = failed_step
        super().__init__(
            f"saga {saga_id} is stuck: compensating step {step!r} keeps failing ({cause}) "
            f"after step {failed_step!r} failed; fix the cause, then run "
            "Saga.recover(retry_stuck=True) (queue-engine saga ls shows it)"
        )


@dataclass
class SagaInfo:
    """A saga as its log tells it (``list_sagas``, ``Saga.recover``, ``saga ls``)."""

    saga_id: str
    state: SagaState
    steps: List[str]  # the definition's step names, in order
    ctx: Any = None
    done: List[str] = field(default_factory=list)  # steps whose action completed
    compensated: List[str] = field(default_factory=list)  # steps whose compensation completed
    uncertain: List[str] = field(default_factory=list)  # steps whose outcome is unknown
    current: Optional[str] = None  # the step in flight (action or compensation)
    failed_step: Optional[str] = None  # the step whose failure started the rollback
    stuck_step: Optional[str] = None  # the step whose compensation kept failing
    error: Optional[str] = None  # the last error recorded
    attempts: int = 0  # action and compensation attempts recorded
    results: Dict[str, Any] = field(default_factory=dict)
    begin_offset: int = -1  # offset of its first record in the log
    begun_ns: int = 0  # wall clock of its first record
    updated_ns: int = 0  # wall clock of its last record

    def as_dict(self) -> Dict[str, Any]:
        """A JSON-friendly dict (``saga ls --json``)."""
        return {
            "saga_id": self.saga_id,
            "state": self.state.value,
            "steps": list(self.steps),
            "done": list(self.done),
            "compensated": list(self.compensated),
            "uncertain": list(self.uncertain),
            "current": self.current,
            "failed_step": self.failed_step,
            "stuck_step": self.stuck_step,
            "error": self.error,
            "attempts": self.attempts,
            "begin_offset": self.begin_offset,
            "begun_ns": self.begun_ns,
            "updated_ns": self.updated_ns,
        }


# ---------------------------------------------------------------------------
# crash points (tests SIGKILL the process at a named moment)
# ---------------------------------------------------------------------------

# (engine._crashpoints: one state for every module's points; tests/crashkit.py
# arms them through these names).  Saga points: ``saga.before-write:KINDS``
# and ``saga.after-write:KINDS`` around each durable write (KINDS: the records
# written, e.g. ``done+start``), ``saga.action:STEP:enter|exit`` and
# ``saga.compensate:STEP:enter|exit`` around each call, ``saga.compact.*``.
_SimulatedCrash = _cp.SimulatedCrash
_arm_crash = _cp.arm
_crash_point = _cp.point
_CRASH_HITS = _cp.hits


# ---------------------------------------------------------------------------
# the fold of a saga's records (shared by live runs, recovery and `saga ls`)
# ---------------------------------------------------------------------------

# record kinds ("t"): begin, start, done, fail, abort, cstart, cdone, cfail, end, retry
# kinds that name a step ("s")
_STEP_KINDS = frozenset(("start", "done", "fail", "abort", "cstart", "cdone", "cfail"))
_KINDS = frozenset(
    ("begin", "start", "done", "fail", "abort", "cstart", "cdone", "cfail", "end", "retry")
)


class _Run(RunCore):
    """The state of one saga, folded from its records (its fields and the
    effects of ``start`` and ``done`` records: :class:`engine._saga.RunCore`)."""

    def __init__(self, saga_id: str, ctx: Any, steps: List[str], offset: int, ts: int) -> None:
        super().__init__(saga_id, ctx, steps, offset, ts, SagaState.RUNNING)

    def fold(self, rec: Dict[str, Any], ts: int) -> None:
        t = rec["t"]
        s: Any = rec.get("s")  # a str wherever a step is named (_decode checks it)
        self.updated_ns = ts
        if t == "start":
            self.started(s, int(rec.get("a", 1)))
        elif t == "done":
            self.succeeded(s, rec.get("r"))
        elif t == "fail":
            self.inflight.discard(s)
            if rec.get("u"):
                self.uncertain.add(s)
            self.error = rec.get("e")
        elif t == "abort":
            # a step left in flight by a crash may have taken effect
            self.uncertain |= self.inflight
            self.inflight.clear()
            self.state = SagaState.COMPENSATING
            self.failed_step = s
            self.error = rec.get("e", self.error)
        elif t == "cstart":
            self.comp_inflight.add(s)
            self.comp_attempts[s] = int(rec.get("a", 1))
            self.n_attempts += 1
        elif t == "cdone":
            self.comp_inflight.discard(s)
            if s not in self.comp_done:
                self.comp_done.add(s)
                self.comp_order.append(s)
        elif t == "cfail":
            self.comp_inflight.discard(s)
            self.error = rec.get("e")
        elif t == "end":
            self.inflight.clear()
            self.comp_inflight.clear()
            self.state = _STATES[rec.get("st")]  # (_decode checked it)
            if self.state is SagaState.STUCK:
                self.stuck_step = s
                self.error = rec.get("e", self.error)
        elif t == "retry":
            self.state = SagaState.COMPENSATING
            self.stuck_step = None

    def settle_after_crash(self) -> None:
        """Loaded from the log of a dead writer: what was in flight has an unknown outcome."""
        if self.state in (SagaState.RUNNING, SagaState.COMPENSATING):
            self.uncertain |= self.inflight - self.done
            self.inflight.clear()
            self.comp_inflight.clear()

    def to_compensate(self) -> List[str]:
        return [
            s
            for s in reversed(self.steps)
            if (s in self.done or s in self.uncertain) and s not in self.comp_done
        ]

    def info(self) -> SagaInfo:
        current = None
        if self.state is SagaState.RUNNING:
            # in flight now, or left in flight by a dead writer
            current = next(
                (s for s in self.steps if s in self.inflight or s in self.uncertain), None
            )
        elif self.state is SagaState.COMPENSATING and self.comp_inflight:
            current = next((s for s in reversed(self.steps) if s in self.comp_inflight), None)
        elif self.state is SagaState.STUCK:
            current = self.stuck_step
        return SagaInfo(
            saga_id=self.id,
            state=self.state,
            steps=list(self.steps),
            ctx=self.ctx,
            done=[s for s in self.steps if s in self.done],
            compensated=list(self.comp_order),
            uncertain=[s for s in self.steps if s in self.uncertain],
            current=current,
            failed_step=self.failed_step,
            stuck_step=self.stuck_step,
            error=self.error,
            attempts=self.n_attempts,
            results=dict(self.results),
            begin_offset=self.begin_offset,
            begun_ns=self.begun_ns,
            updated_ns=self.updated_ns,
        )


def _decode(raw: Any, loads: Callable[[bytes], Any]) -> Optional[Dict[str, Any]]:
    """A record's dict, or None (with a warning) for anything malformed."""
    try:
        rec = loads(bytes(raw))
    except Exception as exc:
        _logger.warning("saga log: skipping an undecodable record (%s)", exc)
        return None
    if (
        not isinstance(rec, dict)
        or rec.get("t") not in _KINDS
        or not isinstance(rec.get("id"), str)
        or ("s" in rec and not isinstance(rec["s"], str))
        or (rec["t"] in _STEP_KINDS and "s" not in rec)
        or ("a" in rec and (type(rec["a"]) is not int or rec["a"] < 0))
        or ("e" in rec and not isinstance(rec["e"], (str, type(None))))
    ):
        _logger.warning("saga log: skipping a malformed record %.80r", rec)
        return None
    if rec["t"] == "begin":
        steps = rec.get("steps")
        if not isinstance(steps, list) or not all(isinstance(x, str) for x in steps):
            _logger.warning("saga log: skipping a begin record without step names")
            return None
    if rec["t"] == "end":
        try:
            SagaState(rec.get("st"))
        except ValueError:
            _logger.warning("saga log: skipping an end record with state %.40r", rec.get("st"))
            return None
    return rec


def _fold_log(
    path: str,
    loads: Callable[[bytes], Any],
    start: Optional[int] = None,
    keep_finished: bool = True,
) -> Tuple[Dict[str, _Run], int]:
    """Fold every record of the log at ``path``; returns (runs by id, next offset)."""
    from engine._log import LogReader

    runs: Dict[str, _Run] = {}
    next_offset = 0 if start is None else start
    reader = LogReader(path, start=start)
    try:
        for record in reader:
            next_offset = record.offset + 1
            rec = _decode(record.value, loads)
            if rec is None:
                continue
            sid = rec["id"]
            ts = int(getattr(record, "timestamp", 0) or 0)
            if rec["t"] == "begin":
                if sid in runs:
                    _logger.warning("saga log: saga %s begun twice; keeping the first", sid)
                    continue
                runs[sid] = _Run(sid, rec.get("ctx"), list(rec["steps"]), record.offset, ts)
                continue
            run = runs.get(sid)
            if run is None:
                # normal after compaction: its begin went with an old segment
                _logger.debug("saga log: record for unknown saga %s (its begin is gone)", sid)
                continue
            run.fold(rec, ts)
            if not keep_finished and run.state.finished:
                del runs[sid]
    finally:
        reader.close()
    for run in runs.values():
        run.settle_after_crash()
    return runs, next_offset


_LOW_WATER_GROUP = "saga-low-water"  # the log consumer group holding the low-water mark


def _read_low_water(path: str) -> Optional[int]:
    from engine._log import LogReader

    try:
        reader = LogReader(path, group=_LOW_WATER_GROUP)
    except (EngineError, OSError, ValueError):
        return None
    try:
        low = reader.committed()
    finally:
        reader.close()
    return low if isinstance(low, int) and low >= 0 else None


def list_sagas(
    path: Union[str, os.PathLike[str]], codec: Optional[Tuple[Any, Any]] = None
) -> List[SagaInfo]:
    """Every saga recorded in the log directory ``path``, oldest first.

    Reads only (a :class:`engine.LogReader`): safe while a :class:`Saga` runs in
    another process. A saga that is running there shows as ``running`` or
    ``compensating``; so does one whose process died (``recover`` finishes it).
    After :meth:`Saga.compact` has let the log delete old segments, finished
    sagas whose first record went with them are no longer listed; unfinished
    and stuck ones always are.
    """
    loads = (codec or _JSON)[1]
    runs, _ = _fold_log(os.fspath(path), loads)
    return [r.info() for r in runs.values()]


# ---------------------------------------------------------------------------
# steps and the saga
# ---------------------------------------------------------------------------


# one encoder, built once: json.dumps with options builds a new one per call
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def _json_dumps(obj: Any) -> bytes:
    return _ENCODER.encode(obj).encode()


def _json_loads(data: bytes) -> Any:
    return json.loads(data)


_JSON = (_json_dumps, _json_loads)

Callable_ = Callable[[StepContext], Any]


class _Step:
    __slots__ = (
        "name",
        "action",
        "compensate",
        "timeout",
        "retries",
        "retry_on",
        "group",
        "action_async",
        "compensate_async",
        "jname",
    )

    def __init__(
        self,
        name: str,
        action: Callable_,
        compensate: Optional[Callable_],
        timeout: Optional[float],
        retries: int,
        retry_on: Tuple[Type[BaseException], ...],
        group: Optional[str],
    ) -> None:
        self.name = name
        self.action = action
        self.compensate = compensate
        self.timeout = timeout
        self.retries = retries
        self.retry_on = retry_on
        self.group = group
        self.action_async = inspect.iscoroutinefunction(action)
        self.compensate_async = compensate is not None and inspect.iscoroutinefunction(compensate)
        self.jname = _esc(name).encode()  # the name as a JSON string


class Saga:
    """Steps with compensations, run with a durable execution log at ``path``.

    ``path`` is an :class:`engine.Log` directory (created if missing); the
    Saga is its single writer (a second one, in any process, gets
    :class:`engine.LogLocked`). ``durability`` and ``segment_bytes`` are the
    log's (see the module docs; saga records are small, so segments are
    smaller than the log's default), and so are ``retention_bytes`` /
    ``retention_age``, which :meth:`compact` applies without ever deleting
    an unfinished saga's records. ``retries`` / ``compensate_retries`` are the default number of
    retries after a failed attempt, ``backoff`` the first delay in seconds
    (doubled per retry, with jitter, up to ``max_backoff``). ``events`` is an
    :class:`engine.Log` or a callable that receives every saga record after it
    is durable. ``codec`` is a ``(dumps, loads)`` pair for records (JSON by
    default: ``ctx`` and results must be JSON values).

    Declare the steps with :meth:`step`, then :meth:`recover` whatever a
    crash left unfinished, then :meth:`run` sagas (from several threads at
    once if you like; :meth:`arun` from asyncio code).
    """

    def __init__(
        self,
        path: Union[str, os.PathLike[str]],
        durability: Durability = "always",
        *,
        segment_bytes: int = 16 << 20,
        retention_bytes: Optional[int] = None,
        retention_age: Optional[float] = None,
        compact_every: int = 10_000,
        retries: int = 3,
        compensate_retries: int = 5,
        backoff: float = 0.05,
        max_backoff: float = 2.0,
        events: Any = None,
        codec: Optional[Tuple[Callable[[Any], bytes], Callable[[bytes], Any]]] = None,
    ) -> None:
        check_durability(durability)
        for argname, value in (("retries", retries), ("compensate_retries", compensate_retries)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{argname} must be an int >= 0, not {value!r}")
        if not (isinstance(backoff, (int, float)) and backoff >= 0):
            raise ValueError(f"backoff must be a number >= 0, not {backoff!r}")
        if not (isinstance(max_backoff, (int, float)) and max_backoff >= backoff):
            raise ValueError(f"max_backoff must be a number >= backoff, not {max_backoff!r}")
        if events is not None and not (callable(events) or hasattr(events, "append")):
            raise TypeError("events must be an engine.Log, a callable or None")
        if codec is not None and not (
            isinstance(codec, tuple) and len(codec) == 2 and all(map(callable, codec))
        ):
            raise TypeError("codec must be a (dumps, loads) pair of callables")
        if (
            not isinstance(compact_every, int)
            or isinstance(compact_every, bool)
            or compact_every < 0
        ):
            raise ValueError(f"compact_every must be an int >= 0, not {compact_every!r}")
        from engine._log import Log

        self._path = os.fspath(path)
        self._durability = durability
        self._retries = retries
        self._compensate_retries = compensate_retries
        self._backoff = float(backoff)
        self._max_backoff = float(max_backoff)
        self._events = events
        self._dumps, self._loads = codec or _JSON
        # the default codec: records are formatted from templates (_T_*)
        self._templates = codec is None
        self._steps: List[_Step] = []
        self._stages: Optional[List[List[_Step]]] = None
        # every step runs alone, synchronous, without a timeout, and records
        # are the templates': the saga goes forward through engine._saga.forward
        self._plain = False
        self._names: List[str] = []  # the step names (shared by every run: never mutated)
        self._jnames = b"[]"  # the same, as JSON
        self._lock = threading.Lock()  # guards _runs, _pool, _loop
        self._pool: Optional[ThreadPoolExecutor] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._loop_thread: Optional[threading.Thread] = None
        self._closed = False
        self._compact_every = compact_every
        self._finished = 0  # sagas finished since the last compact()
        # "always": group commit across a saga's parallel steps and across
        # threads.  The log's own "always" syncs inside append_many, i.e.
        # under the saga's lock (_emit), so the parallel steps of one saga
        # would take turns at one sync each.  Instead the log appends without
        # waiting ("interval" with the longest period: its background sync
        # practically never runs) and _emit, once the lock is released,
        # waits for log.flush(end), end the end of its append: writes
        # appended meanwhile share that sync (the log's flush is
        # group-committed).  flush(end) makes every record below end
        # durable, rolled segments included, in every mode: that contract is
        # all this relies on.
        group_commit = durability == "always"
        # (otherwise the log's own flush_interval)
        period: Dict[str, Any] = {"flush_interval": 3600.0} if group_commit else {}
        self._log = Log(
            self._path,
            durability="interval" if group_commit else durability,
            segment_bytes=segment_bytes,
            retention_bytes=retention_bytes,
            retention_age=retention_age,
            **period,
        )
        # the log a durable write waits for (after the lock), or None
        self._sync_log: Optional[Any] = self._log if group_commit else None
        try:
            # every saga begun below the low-water mark had finished when it
            # was recorded: start the fold there
            low = _read_low_water(self._path)
            start = self._log.start_offset if low is None else max(low, self._log.start_offset)
            runs, _ = _fold_log(self._path, self._loads, start=start, keep_finished=False)
            # unfinished (and stuck) sagas, by id: recover() drives them
            self._runs: Dict[str, _Run] = runs
            if retention_bytes is not None or retention_age is not None:
                # the log's retention never deletes past a group's committed
                # offset: commit the mark before any segment can roll away
                self._commit_low_water()
        except BaseException:
            self._log.close()
            raise

    # -- definition -------------------------------------------------------

    def step(
        self,
        name: str,
        action: Callable_,
        compensate: Optional[Callable_] = None,
        *,
        timeout: Optional[float] = None,
        retries: Optional[int] = None,
        retry_on: Union[Type[BaseException], Tuple[Type[BaseException], ...]] = (Exception,),
        group: Optional[str] = None,
    ) -> Saga:
        """Declare the next step; returns the saga (calls chain).

        ``action(sc)`` and ``compensate(sc)`` are plain or ``async`` callables
        taking a :class:`StepContext`; ``compensate=None`` declares a step with
        nothing to undo (a read, or a step made last on purpose). ``timeout``
        (seconds) bounds each attempt: a timed-out attempt counts as failed with
        an unknown outcome (a plain callable keeps running in its abandoned
        thread, so the retry or compensation may overlap it: key them).
        ``retries`` (default: the saga's) is the number of retries after a
        failed attempt, for exceptions matching ``retry_on`` only (others fail
        the step at once: raise e.g. a business error that way). Consecutive
        steps with the same ``group`` run in parallel.
        """
        if not isinstance(name, str) or not name:
            raise TypeError(f"name must be a non-empty str, not {name!r}")
        if any(s.name == name for s in self._steps):
            raise ValueError(f"name: a step named {name!r} is already declared")
        if not callable(action):
            raise TypeError(f"action of step {name!r} must be callable")
        if compensate is not None and not callable(compensate):
            raise TypeError(f"compensate of step {name!r} must be callable or None")
        if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ValueError(f"timeout must be a number > 0 or None, not {timeout!r}")
        if retries is None:
            retries = self._retries
        if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
            raise ValueError(f"retries must be an int >= 0, not {retries!r}")
        if isinstance(retry_on, type):
            retry_on = (retry_on,)
        if not (
            isinstance(retry_on, tuple)
            and all(isinstance(t, type) and issubclass(t, BaseException) for t in retry_on)
        ):
            raise TypeError("retry_on must be an exception type or a tuple of them")
        if group is not None:
            if not isinstance(group, str):
                raise TypeError(f"group must be a str or None, not {group!r}")
            if (
                self._steps
                and self._steps[-1].group != group
                and any(s.group == group for s in self._steps)
            ):
                raise ValueError(
                    f"group: the steps of group {group!r} must be declared one after another"
                )
        self._steps.append(_Step(name, action, compensate, timeout, retries, retry_on, group))
        self._stages = None
        self._plain = self._templates and all(
            s.group is None and not s.action_async and s.timeout is None for s in self._steps
        )
        self._names = [s.name for s in self._steps]
        self._jnames = _json_dumps(self._names)
        return self

    @property
    def steps(self) -> List[str]:
        """The declared step names, in order."""
        return [s.name for s in self._steps]

    @property
    def path(self) -> str:
        """The saga log directory."""
        return self._path

    @property
    def log(self) -> Any:
        """The :class:`engine.Log` that records this saga's executions."""
        return self._log

    def _stage_list(self) -> List[List[_Step]]:
        stages = self._stages
        if stages is None:
            stages = []
            for s in self._steps:
                if s.group is not None and stages and stages[-1][0].group == s.group:
                    stages[-1].append(s)
                else:
                    stages.append([s])
            self._stages = stages
        return stages

    # -- running ----------------------------------------------------------

    def run(self, ctx: Any = None, *, saga_id: Optional[str] = None) -> Dict[str, Any]:
        """Run one saga with context ``ctx``; returns ``{step name: result}``.

        Raises :class:`StepFailed` when a step failed and the saga was
        compensated, :class:`SagaStuck` when a compensation kept failing. Any
        other exception escaping (``KeyboardInterrupt``...) leaves the saga
        unfinished in the log for :meth:`recover`. ``saga_id`` (default: a new
        UUID) must not name a saga this Saga already knows to be unfinished.
        """
        return self._run(ctx, saga_id, None)

    async def arun(self, ctx: Any = None, *, saga_id: Optional[str] = None) -> Dict[str, Any]:
        """:meth:`run` for asyncio code: the saga runs in a worker thread,
        ``async`` steps on the calling event loop, which stays responsive."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, lambda: self._run(ctx, saga_id, loop))

    def _run(
        self, ctx: Any, saga_id: Optional[str], loop: Optional[asyncio.AbstractEventLoop]
    ) -> Dict[str, Any]:
        self._check_open()
        if not self._steps:
            raise ValueError("this saga has no steps: declare them with step() first")
        if saga_id is None:
            saga_id = os.urandom(16).hex()  # a random 128-bit id, as uuid4 without its cost
        elif not isinstance(saga_id, str) or not saga_id:
            raise TypeError(f"saga_id must be a non-empty str, not {saga_id!r}")
        names = self._names
        begin = {"t": "begin", "id": saga_id, "ctx": ctx, "steps": names}
        run = _Run(saga_id, ctx, names, 0, time.time_ns())
        try:
            # only queued: begin and the first start share one sync (the
            # first attempt writes both); encoding fails before anything is
            if self._templates:
                raw = _T_BEGIN % (run.jid, json_value(ctx, _json_dumps), self._jnames)
            else:
                raw = self._dumps(begin)
            self._queue(run, begin, raw)
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"ctx must be encodable by the saga's codec (JSON by default): {exc}"
            ) from exc
        with self._lock:
            if saga_id in self._runs:
                raise ValueError(f"saga_id {saga_id!r} names an unfinished saga; call recover()")
            # read under the lock: compact() relies on it (see _low_water)
            run.begin_offset = self._log.next_offset
            run.driving = True
            self._runs[saga_id] = run
        try:
            return self._drive(run, loop)
        finally:
            with self._lock:
                run.driving = False

    def recover(self, *, retry_stuck: bool = False) -> List[SagaInfo]:
        """Drive every unfinished saga in the log to an end; returns their infos.

        A saga going forward retries its step in flight (same key) and goes on;
        one going backward compensates what completed or may have. Each ends
        ``done``, ``compensated`` or ``stuck`` (reported here, never dropped);
        ``retry_stuck=True`` also retries the stuck ones. A saga begun with
        other step names than this Saga declares is left as it is and
        reported with an ``error`` saying so.
        """
        self._check_open()
        with self._lock:
            # sagas that run() (or another recover()) drives right now are theirs
            runs = sorted(
                (r for r in self._runs.values() if not r.driving), key=lambda r: r.begin_offset
            )
            for r in runs:
                r.driving = True
        out: List[SagaInfo] = []
        try:
            for run in runs:
                out.append(self._recover_one(run, retry_stuck))
        finally:
            with self._lock:
                for r in runs:
                    r.driving = False
        return out

    def _recover_one(self, run: _Run, retry_stuck: bool) -> SagaInfo:
        names = [s.name for s in self._steps]
        if run.state is SagaState.STUCK and not retry_stuck:
            return run.info()
        if run.steps != names:
            info = run.info()
            info.error = (
                f"saga was begun with steps {run.steps}, this Saga declares {names}; not recovered"
            )
            _logger.error("saga %s: %s", run.id, info.error)
            return info
        if run.state is SagaState.STUCK:
            self._emit(run, [{"t": "retry", "id": run.id}], sync=False)
        try:
            self._drive(run, None)
        except (StepFailed, SagaStuck):
            pass
        return run.info()

    def unfinished(self) -> List[SagaInfo]:
        """The sagas this Saga knows to be running, compensating or stuck."""
        with self._lock:
            return [r.info() for r in sorted(self._runs.values(), key=lambda r: r.begin_offset)]

    # -- the driver -------------------------------------------------------

    def _drive(self, run: _Run, loop: Optional[asyncio.AbstractEventLoop]) -> Dict[str, Any]:
        if run.state is SagaState.RUNNING:
            failed: Optional[Tuple[str, BaseException]] = None
            if self._plain:
                failed = forward(self, run, self._steps, loop)
            else:
                for stage in self._stage_list():
                    failed = self._run_stage(run, stage, loop)
                    if failed is not None:
                        break
            if failed is None:
                end = {"t": "end", "id": run.id, "st": "done"}
                self._emit(run, [end], True, [_T_END_DONE % run.jid] if self._templates else None)
                self._forget(run)
                return dict(run.results)
            step, exc = failed
            run.exc = exc
            self._emit(
                run, [{"t": "abort", "id": run.id, "s": step, "e": _describe(exc)}], sync=False
            )
        if run.state is SagaState.COMPENSATING:
            by_name = {s.name: s for s in self._steps}
            for name in run.to_compensate():
                cexc = self._attempts(run, by_name[name], loop, compensating=True)
                if cexc is not None:
                    self._emit(
                        run,
                        [
                            {
                                "t": "end",
                                "id": run.id,
                                "st": "stuck",
                                "s": name,
                                "e": _describe(cexc),
                            }
                        ],
                        sync=True,
                    )
                    err = SagaStuck(run.id, name, _describe(cexc), run.failed_step)
                    raise err from cexc
            self._emit(run, [{"t": "end", "id": run.id, "st": "compensated"}], sync=True)
            self._forget(run)
            err2 = StepFailed(
                run.id, run.failed_step or "?", run.error or "unknown", run.comp_order
            )
            raise err2 from run.exc
        if run.state is SagaState.DONE:
            return dict(run.results)
        if run.state is SagaState.COMPENSATED:
            raise StepFailed(run.id, run.failed_step or "?", run.error or "unknown", run.comp_order)
        raise SagaStuck(run.id, run.stuck_step or "?", run.error or "unknown", run.failed_step)

    def _forget(self, run: _Run) -> None:
        with self._lock:
            self._runs.pop(run.id, None)
            self._finished += 1
            due = self._compact_every and self._finished >= self._compact_every
        if due:
            self.compact()

    # -- compaction -------------------------------------------------------

    def _low_water(self) -> int:
        # Under the lock: a saga registered later gets begin_offset >= this
        # next_offset (it only grows), one registered earlier is in _runs.
        with self._lock:
            low = self._log.next_offset
            for r in self._runs.values():
                if r.begin_offset < low:
                    low = r.begin_offset
            self._finished = 0
        return low

    def _commit_low_water(self) -> int:
        from engine._log import LogReader

        low = self._low_water()
        if _cp.armed:
            _crash_point("saga.compact.before_low_water")
        reader = LogReader(self._path, group=_LOW_WATER_GROUP)
        try:
            reader.commit(low)
        finally:
            reader.close()
        if _cp.armed:
            _crash_point("saga.compact.after_low_water")
        return low

    def compact(self) -> int:
        """Let the log forget finished sagas; returns the segments deleted.

        Records durably the *low-water mark* (the offset of the oldest
        unfinished or stuck saga's first record, or the log's end), so that
        the next open reads only from there, and applies the log's retention
        (``retention_bytes`` / ``retention_age``), which never deletes a
        segment at or past the mark: an unfinished saga is never lost. Runs by
        itself every ``compact_every`` finished sagas (0: only when called).
        """
        self._check_open()
        self._commit_low_water()
        deleted = int(self._log.apply_retention())
        if _cp.armed:
            _crash_point("saga.compact.after_retention")
        return deleted

    def _run_stage(
        self, run: _Run, stage: List[_Step], loop: Optional[asyncio.AbstractEventLoop]
    ) -> Optional[Tuple[str, BaseException]]:
        """Run the steps of ``stage`` not done yet; the first failure (step name, error) or None."""
        if len(stage) == 1:  # the common stage: no list to build
            todo = stage if stage[0].name not in run.done else []
        else:
            todo = [s for s in stage if s.name not in run.done]
        if not todo:
            return None
        if len(todo) == 1:
            exc = self._attempts(run, todo[0], loop, compensating=False)
            return None if exc is None else (todo[0].name, exc)
        pool = self._get_pool()
        futures = [pool.submit(self._attempts, run, s, loop, False) for s in todo]
        errors = [f.result() for f in futures]  # every one ends: attempts are bounded
        for s, exc in zip(todo, errors):
            if exc is not None:
                return s.name, exc
        return None

    def _attempts(
        self,
        run: _Run,
        step: _Step,
        loop: Optional[asyncio.AbstractEventLoop],
        compensating: bool,
        tries: int = 0,
    ) -> Optional[BaseException]:
        """Run an action (or compensation) with its retries; the last error or
        None.  ``tries``: the attempts of this call already made and failed
        (``engine._saga.forward``'s first)."""
        name = step.name
        if compensating:
            fn = step.compensate
            is_async = step.compensate_async
            k_start, k_ok = "cstart", "cdone"
            t_start = _T_CSTART
            attempt = run.comp_attempts.get(name, 0)
            if fn is None:  # nothing to undo: record it so recovery does not ask again
                self._emit(run, [{"t": "cdone", "id": run.id, "s": name}], sync=False)
                return None
        else:
            fn = step.action
            is_async = step.action_async
            k_start, k_ok = "start", "done"
            t_start = _T_START
            attempt = run.attempts.get(name, 0)
        templates = self._templates
        while True:
            attempt += 1
            tries += 1
            start = {"t": k_start, "id": run.id, "s": name, "a": attempt}
            raw = [t_start % (run.jid, step.jname, attempt)] if templates else None
            self._emit(run, [start], True, raw)
            sc = StepContext(
                run.id,
                name,
                run.ctx,
                attempt,
                dict(run.results),
                run.results.get(name) if compensating else None,
                compensating,
            )
            where = "compensate" if compensating else "action"
            if _cp.armed:
                _crash_point(f"saga.{where}:{name}:enter")
            try:
                result = self._call(fn, is_async, sc, step.timeout, loop)
            except Exception as exc:
                err = self._failed(run, step, attempt, tries, exc, compensating)
                if err is not None:
                    return err
                continue
            if _cp.armed:
                _crash_point(f"saga.{where}:{name}:exit")
            ok: Dict[str, Any] = {"t": k_ok, "id": run.id, "s": name}
            if not compensating:
                ok["r"] = result
            try:
                if not templates:
                    self._queue(run, ok, self._dumps(ok))
                elif compensating:
                    self._queue(run, ok, _T_CDONE % (run.jid, step.jname))
                else:
                    self._queue(
                        run, ok, _T_DONE % (run.jid, step.jname, json_value(result, _json_dumps))
                    )
            except (TypeError, ValueError) as exc:
                return self._unrecordable(run, step, attempt, exc)
            return None

    def _failed(
        self, run: _Run, step: _Step, attempt: int, tries: int, exc: Exception, compensating: bool
    ) -> Optional[BaseException]:
        """Attempt ``attempt`` (the ``tries``-th of this run of attempts) of
        the step's action or compensation raised ``exc``: record it; returns
        the error to give up with, or None once the backoff before the retry
        has passed."""
        name = step.name
        timed_out = isinstance(exc, _StepTimeout)
        if timed_out:
            where = "compensate" if compensating else "action"
            exc = Timeout(f"step {name!r} ({where}) timed out after {step.timeout} s")
        rec = {
            "t": "cfail" if compensating else "fail",
            "id": run.id,
            "s": name,
            "a": attempt,
            "e": _describe(exc),
        }
        if timed_out and not compensating:
            rec["u"] = True  # the action may have taken effect
        self._emit(run, [rec], sync=False)
        if compensating:
            retries = self._compensate_retries
            retry_on: Tuple[Type[BaseException], ...] = (Exception,)
        else:
            retries = step.retries
            retry_on = step.retry_on
        if tries > retries or not (timed_out or isinstance(exc, retry_on)):
            return exc
        self._sleep_backoff(tries)
        return None

    def _unrecordable(self, run: _Run, step: _Step, attempt: int, exc: Exception) -> TypeError:
        """The action took effect but its result cannot be encoded (``exc``):
        record an unknown outcome (compensated if the saga goes backward) and
        return the error to give up with (a retry would return the same
        unencodable value)."""
        err = TypeError(
            f"result of step {step.name!r} cannot be encoded by the saga's codec: {exc}"
        )
        rec = {
            "t": "fail",
            "id": run.id,
            "s": step.name,
            "a": attempt,
            "e": _describe(err),
            "u": True,
        }
        self._emit(run, [rec], sync=False)
        return err

    def _sleep_backoff(self, tries: int) -> None:
        delay = min(self._max_backoff, self._backoff * (2 ** (tries - 1)))
        if delay > 0:
            time.sleep(delay * (0.5 + random.random() / 2))

    def _call(
        self,
        fn: Callable_,
        is_async: bool,
        sc: StepContext,
        timeout: Optional[float],
        loop: Optional[asyncio.AbstractEventLoop],
    ) -> Any:
        if is_async:
            return self._await(fn(sc), timeout, loop)
        if timeout is None:
            result = fn(sc)
        else:
            result = _call_with_timeout(fn, sc, timeout)
        # a plain function that returned a coroutine (the common results skip the check)
        if type(result) not in _PLAIN and inspect.isawaitable(result):
            result = self._await(result, timeout, loop)
        return result

    def _await(
        self, aw: Any, timeout: Optional[float], loop: Optional[asyncio.AbstractEventLoop]
    ) -> Any:
        if loop is None:
            loop = self._get_loop()

        async def _bounded() -> Any:
            if timeout is None:
                return await aw
            try:
                return await asyncio.wait_for(aw, timeout)
            except asyncio.TimeoutError:
                raise _StepTimeout() from None

        return asyncio.run_coroutine_threadsafe(_bounded(), loop).result()

    # -- log writes -------------------------------------------------------

    def _queue(self, run: _Run, rec: Dict[str, Any], raw: bytes) -> None:
        """Fold one record, encoded as ``raw``, into ``run`` and queue it for
        the saga's next durable write (``_emit`` with ``sync``)."""
        ts = time.time_ns()
        with run.lock:
            run.fold(rec, ts)
            run.pending.append(raw)
            run.pending_kinds.append(rec["t"])

    def _emit(
        self,
        run: _Run,
        recs: List[Dict[str, Any]],
        sync: bool,
        raw: Optional[List[bytes]] = None,
    ) -> None:
        """Fold ``recs`` into ``run`` and queue them; with ``sync`` write every
        queued record of the saga in one append and return once it is durable
        (per ``durability``).  ``raw``: the records already encoded (the
        templates of the default codec), else the codec encodes them.

        The append happens under the saga's lock, so the records of one saga
        reach the log in the order they were folded (parallel steps of a group
        write through here too: a start must never land before its begin).
        With ``durability="always"`` the wait for the sync comes after the
        lock is released, so the parallel steps of a group, and sagas in other
        threads, share syncs (group commit)."""
        if raw is None:
            dumps = self._dumps
            raw = [dumps(r) for r in recs]  # raises before anything changes
        ts = time.time_ns()
        with run.lock:
            for r in recs:
                run.fold(r, ts)
                run.pending_kinds.append(r["t"])
            run.pending += raw
            if not sync:
                return
            end, batch, kinds = append_pending(self, run)
        wrote(self, run.key, end, batch, kinds)

    def _publish(self, key: bytes, batch: List[bytes]) -> None:
        try:
            if hasattr(self._events, "append_many"):
                self._events.append_many(batch, [key] * len(batch))
            elif hasattr(self._events, "append"):
                for b in batch:
                    self._events.append(b, key)
            else:
                for b in batch:
                    self._events(self._loads(b))
        except Exception:
            # the saga's own log is the truth; a broken subscriber must not stop it
            _logger.exception("saga events hook failed (the saga goes on)")

    # -- resources --------------------------------------------------------

    def _get_pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="saga-step")
            return self._pool

    def _get_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                t = threading.Thread(target=loop.run_forever, name="saga-loop", daemon=True)
                t.start()
                self._loop, self._loop_thread = loop, t
            return self._loop

    def _check_open(self) -> None:
        if self._closed:
            from .errors import Closed

            raise Closed(f"saga {self._path!r} is closed; open a new Saga to go on")

    def close(self) -> None:
        """Close the log and stop the worker threads (unfinished sagas stay in
        the log for the next :meth:`recover`)."""
        if self._closed:
            return
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._loop_thread is not None:
                self._loop_thread.join(5)
            if not self._loop.is_running():
                self._loop.close()
        self._log.close()

    def _simulate_crash(self) -> None:
        """Test hook: stop as a SIGKILLed process would (queued records are
        not written, the log is not synced, its lock is released)."""
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._loop_thread is not None:
                self._loop_thread.join(5)
        self._log._simulate_crash()

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    def __enter__(self) -> Saga:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Saga({self._path!r}, steps={self.steps}, durability={self._durability!r})"


class _StepTimeout(Exception):
    """Internal: an attempt ran out of time (its outcome is unknown)."""


def _call_with_timeout(fn: Callable_, sc: StepContext, timeout: float) -> Any:
    # a daemon thread, not a pool: an abandoned hung action must neither block
    # the next attempt nor the interpreter's exit
    box: List[Any] = []
    done = threading.Event()

    def target() -> None:
        try:
            box.append((True, fn(sc)))
        except BaseException as exc:
            box.append((False, exc))
        finally:
            done.set()

    threading.Thread(target=target, name=f"saga-{sc.step}", daemon=True).start()
    if not done.wait(timeout):
        raise _StepTimeout()
    ok, value = box[0]
    if ok:
        return value
    raise value


def _describe(exc: BaseException) -> str:
    text = str(exc)
    name = type(exc).__name__
    return f"{name}: {text}" if text else name
