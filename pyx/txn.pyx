# cython: binding=False
# The compiled hot path of engine.txn (two-phase commit).
#
# A non-durable transaction with two Log participants is seven log appends
# (two prepared records, one commit decision, two commit marks, two data
# batches) and bookkeeping around them: a txid, a Transaction, locks, dicts.
# In Python the bookkeeping cost three times the appends (~20 us a transaction
# on our 2-core VM against ~2.5 us of appends), and a general serializer
# (marshal.dumps) takes ~1 us for each small record (its write buffer starts
# small and grows).
# Here the same steps run as C: fields of cdef classes instead of instance
# dicts, PyThread locks taken without a Python call (_Mutex, mutex.pxi) and
# records encoded straight into their bytes (journal.pxi: the record kinds,
# the journal format and the reader of older releases' records).
#
# Durable commits from several threads run in groups (_Waiter, _CoordCore.
# _lead): one leader per group, one sync per journal per protocol step.
#
# What is not per transaction (recovery, compaction, abort, queries) stays
# in engine/txn.py, whose Coordinator,
# _Journal and participants subclass the cores below: their fields are the
# state both sides touch.  The steps, records, locks and crash points are the
# ones engine/txn.py documents; each method here says which it mirrors.
"""Compiled core of :mod:`engine.txn`: :class:`Transaction` and the
per-transaction paths of the coordinator and the journaled participants."""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItemWithError, PyDict_SetItem
from cpython.exc cimport PyErr_CheckSignals
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.long cimport PyLong_AsLongLongAndOverflow
from cpython.object cimport PyObject
from cpython.pythread cimport (NOWAIT_LOCK, PyThread_acquire_lock, PyThread_allocate_lock,
                               PyThread_free_lock, PyThread_release_lock, PyThread_type_lock)
from cpython.sequence cimport PySequence_Fast_GET_SIZE, PySequence_Fast_ITEMS
from libc.stdint cimport int64_t, uint8_t, uint32_t
from libc.string cimport memcpy

from eng_atomic cimport eng_now_ns

import logging
import os
import threading
import time

from engine.errors import Closed, EngineError, TransactionAborted

include "mutex.pxi"


cdef extern from "Python.h":
    bint PyUnicode_IS_ASCII(object o)
    void *PyUnicode_DATA(object o)
    Py_ssize_t PyUnicode_GET_LENGTH(object o)
    object PyUnicode_DecodeASCII(const char *s, Py_ssize_t size, const char *errors)


cdef extern from *:
    """
    /* time.monotonic() is CLOCK_MONOTONIC on Linux (eng_now_ns); elsewhere
       CPython may use another clock, so there we ask it */
    #if defined(__linux__)
    #define ENG_MONOTONIC_IS_PYTHONS 1
    #else
    #define ENG_MONOTONIC_IS_PYTHONS 0
    #endif
    """
    bint ENG_MONOTONIC_IS_PYTHONS


include "journal.pxi"

_logger = logging.getLogger("engine")
cdef object _monotonic = time.monotonic
cdef object _wall = time.time


cdef inline int _hex(char *out, unsigned long long v) noexcept:
    """Write ``"%x" % v`` at ``out`` (at most 16 characters); returns its length."""
    cdef char digits[16]
    cdef int n = 0, i
    while True:
        digits[n] = b"0123456789abcdef"[v & 15]
        n += 1
        v >>= 4
        if v == 0:
            break
    for i in range(n):
        out[i] = digits[n - 1 - i]
    return n


cdef inline double _now() except? -1.0:
    """``time.monotonic()`` (the clock transaction deadlines are on)."""
    if ENG_MONOTONIC_IS_PYTHONS:
        return <double>eng_now_ns() * 1e-9
    return <double>_monotonic()


# ---------------------------------------------------------------------------
# crash points: engine._crashpoints owns them (arm / point) and hands the
# hook over here while armed; unarmed, a point costs one C bool test

cdef bint _armed = False
cdef object _hook = None


def _set_crash_hook(hook):
    """``hook(name, party)`` is called at every crash point; None disarms."""
    global _armed, _hook
    _hook = hook
    _armed = hook is not None


def _journal_append(_JournalCore journal, log, rec, durable=True):
    """Append ``rec`` to the generation ``log`` captured under the owner's lock.

    ``durable``: the record must be on stable storage (with durability
    ``"always"``) before this returns.  If a concurrent switch already closed
    that generation, the record is in the new one (carried from memory), so
    a ``Closed`` there is not an error.
    """
    try:
        log.append(_encode(rec))
        if durable and journal.sync:
            log.flush()
    except Closed:
        if log is journal._log:
            raise
    journal.appended += 1


cdef class _JournalCore:
    """The fields of an ``engine.txn._Journal`` that the hot paths touch."""

    cdef object _log                 # the live generation (an engine.Log), or None once closed
    cdef object _append              # its bound append (looked up once, not per record)
    cdef public bint sync            # durability "always": flush() at the records that must be durable
    cdef public Py_ssize_t appended  # records in this generation (approximate)

    @property
    def log(self):
        """The live generation (an :class:`engine.Log`); None once closed."""
        return self._log

    @log.setter
    def log(self, value):
        self._append = None if value is None else value.append
        self._log = value


# ---------------------------------------------------------------------------
# transactions

cdef set _CHECKED_TYPES = set()   # participant classes known to have the protocol's methods
cdef tuple _TRUSTED = ()          # bases whose subclasses are checked once (see _trust)


def _trust(*classes):
    """Participant classes whose subclasses keep the protocol's methods: their
    types are checked once, a user's class at every enlist."""
    global _TRUSTED
    _TRUSTED = _TRUSTED + classes


@cython.final
cdef class Transaction:
    """One transaction of a :class:`Coordinator` (``coord.transaction()``).

    Enlist work with :meth:`enlist` (alias :meth:`add`), then :meth:`commit`
    or :meth:`abort`; as a context manager it commits on a clean exit and
    aborts when the block raises.  ``state`` is ``"active"``,
    ``"committed"`` or ``"aborted"``.
    """

    cdef readonly _CoordCore _coord
    cdef readonly str txid
    cdef public double deadline   # time.monotonic() after which it aborts
    cdef public str state
    cdef public dict _parts       # participant -> its ops (a list), in enlistment order
    cdef public object reason     # why it aborted (str) or None
    cdef public bint _doomed      # decision() answered "abort" after the deadline

    def __cinit__(self):
        self.state = "active"

    def __init__(self, _CoordCore coord, str txid, double deadline):
        self._coord = coord
        self.txid = txid
        self.deadline = deadline
        self.state = "active"
        self._parts = {}
        self.reason = None
        self._doomed = False

    def enlist(self, participant, ops):
        """Add ``ops`` for ``participant`` (appended to earlier ones for it)."""
        cdef type tp = type(participant)
        cdef PyObject *lst
        if self.state != "active":
            raise EngineError(f"transaction {self.txid} is {self.state}; start a new one")
        if tp not in _CHECKED_TYPES:
            for attr in ("name", "prepare", "commit", "abort", "recover"):
                if not hasattr(participant, attr):
                    raise TypeError(f"participant must have {attr!r} (see engine.txn.Participant)")
            if isinstance(participant, _TRUSTED):
                _CHECKED_TYPES.add(tp)
            # user classes: checked every time (their attributes may vary)
        tops = type(ops)
        if tops is not tuple and tops is not list and isinstance(
            ops, (bytes, bytearray, memoryview, str)
        ):
            raise TypeError("ops must be an iterable of operations, not a single bytes/str")
        parts = self._parts
        lst = PyDict_GetItemWithError(parts, participant)
        if lst == NULL:
            if parts:
                name = participant.name
                for other in parts:
                    if other.name == name:
                        raise ValueError(f"two participants named {name!r} in one transaction")
            PyDict_SetItem(parts, participant, list(ops))
        else:
            (<list>lst).extend(ops)
        return self

    def add(self, participant, ops):
        """Alias of :meth:`enlist`."""
        return self.enlist(participant, ops)

    @property
    def participants(self):
        """The enlisted participants, in enlistment order."""
        return list(self._parts)

    def commit(self):
        """Run two-phase commit; raises :class:`~engine.TransactionAborted` on abort."""
        if self.state != "active":
            if self.state == "committed":
                return
            raise TransactionAborted(self.txid, self.reason or "already aborted")
        self._coord._commit_c(self)

    def abort(self, reason="aborted by the application"):
        """Abort (nothing was prepared yet, so nothing needs undoing)."""
        if self.state == "active":
            self._coord._finish_abort(self, [], reason, raise_=False)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            if self.state == "active":
                self._coord._commit_c(self)
            else:
                self.commit()
        elif self.state == "active":
            self.abort(f"the transaction block raised {exc_type.__name__}")

    def __repr__(self):
        return f"<Transaction {self.txid} {self.state} {len(self._parts)} participant(s)>"


# ---------------------------------------------------------------------------
# group commit of durable transactions (leader/follower)
#
# With durability "always" a transaction waits for sync rounds in turn: the
# prepared records, the decision, then each participant's commit mark and
# batch.  Threads that each drive their own transaction meet in those rounds
# only by chance, and every round wakes every thread waiting on that journal.
# So durable commits queue up instead: one thread (the leader) takes every
# transaction waiting and runs the protocol for all of them at once, each
# step's records sharing one sync per journal (prepared records: one per
# participant journal; decisions: one; commit marks and batches: one each per
# participant), while the others sleep once, each on a lock of its own, until
# the leader hands them their outcome, or the leadership of the next group to
# the first that came meanwhile (which first gathers the threads just woken:
# _gather).  Per transaction the steps, records and
# crash points are _commit_one's; a group interleaves its transactions' (a
# prepared record's after_write point comes once its journal was synced for
# the whole group), and its steps hold across it: no decision is written
# before every prepared record of the group is durable, no participant hears
# commit before every decision of the group is.  A group of one runs
# _commit_one itself (its first prepared record's sync on the helper thread
# while the next participant prepares: _prepare_first; its LogParticipants'
# commit marks, then their batches, synced side by side: _complete_split).

cdef enum:
    _WAITING = 0   # queued for a group
    _DONE = 1      # its group ran: the outcome is in the _Waiter
    _LEAD = 2      # handed the leadership: it runs the next group


@cython.final
cdef class _Waiter:
    """One durable transaction waiting for its group commit."""

    cdef Transaction tx
    cdef PyThread_type_lock _lk   # held while it waits; the leader releases it
    cdef bint _held               # _lk is held (to free it released)
    cdef int role                 # _WAITING, _DONE or _LEAD (written before _lk is released)
    cdef PyThread_type_lock _next # woken: release this (the next waiter's _lk) first, or NULL
    cdef bint finished            # the leader is done with it (its outcome is set)
    cdef list asked               # the participants asked to prepare
    cdef tuple names              # their names (the decision record's)
    cdef object reason            # why it aborted, or None
    cdef object cause             # the exception behind that abort, or None
    cdef object error             # an error to raise as is (a broken journal), or None
    cdef Py_ssize_t failed        # participants that did not take commit
    cdef list infos               # commit by the coordinator's log: each participant's checked ops
    cdef tuple redo               # ... and the batches its REDO record holds

    def __cinit__(self):
        self._lk = PyThread_allocate_lock()
        if self._lk == NULL:
            raise MemoryError("cannot allocate a lock")
        PyThread_acquire_lock(self._lk, NOWAIT_LOCK)
        self._held = True

    def __dealloc__(self):
        if self._lk != NULL:
            if self._held:
                PyThread_release_lock(self._lk)
            PyThread_free_lock(self._lk)

    cdef void _park(self):
        """Sleep until the leader wakes us (a group's steps take a few syncs:
        bounded, so not interruptible; the leader always wakes us)."""
        with nogil:
            PyThread_acquire_lock(self._lk, 1)
            if self._next != NULL:
                # pass the wake on (_wake_chain) before queueing for the GIL
                PyThread_release_lock(self._next)
        self._held = True

    cdef void _wake(self):
        PyThread_release_lock(self._lk)
        self._held = False

    cdef int _outcome(self) except -1:
        """Raise what the transaction's commit raises (nothing if it committed)."""
        if self.error is not None:
            raise self.error
        if self.reason is not None:
            raise TransactionAborted(self.tx.txid, self.reason) from self.cause
        return 0


cdef int _wake_chain(list group, _Waiter me) except -1:
    """Wake every waiter of ``group`` but ``me``, its outcome set (_DONE):
    this thread wakes the first, and each woken waiter wakes the next before
    it takes the GIL (in _park, without it).  So the wakes are paced by the
    threads' own start-up instead of all of them contending at once for the
    GIL, which this thread holds while it would wake them one by one.  Each
    waiter's thread holds it (and so its lock) until it wakes: a lock in the
    chain is released only while its waiter still sleeps on it."""
    cdef _Waiter w, prev = None
    for w in group:
        if w is me:
            continue
        w.role = _DONE
        w._held = False
        if prev is not None:
            prev._next = w._lk
        prev = w
    for w in group:
        if w is not me:
            PyThread_release_lock(w._lk)
            break
    return 0


@cython.final
cdef class _Helper:
    """A thread that runs one job of a group next to its leader (the first
    journal's sync while the leader syncs the others, one participant's
    commits while the leader runs the others'): the syncs of different files
    overlap instead of queueing.  One leader at a time, so one job at a time."""

    cdef PyThread_type_lock _go     # held; the leader releases it when a job is set
    cdef PyThread_type_lock _done   # held; the helper releases it when the job ran
    cdef object _fn                 # the job: _fn(*_args)
    cdef tuple _args
    cdef object _result             # what the job returned
    cdef object _error              # what it raised, or None
    cdef bint _stop                 # stop() asked the thread to end
    cdef object _thread             # the threading.Thread, or None
    cdef object _pid                # the process it runs in (a forked child starts its own)

    def __dealloc__(self):
        self._free()

    cdef void _free(self):
        # only ever freed released (a held lock may not be freed on every platform)
        if self._go != NULL:
            PyThread_release_lock(self._go)
            PyThread_free_lock(self._go)
            self._go = NULL
        if self._done != NULL:
            PyThread_release_lock(self._done)
            PyThread_free_lock(self._done)
            self._done = NULL

    cdef int _start(self) except -1:
        if self._thread is not None and self._pid == os.getpid():
            return 0
        # (a child after fork: the parent's thread is not here; start afresh)
        self._free()
        self._go = PyThread_allocate_lock()
        self._done = PyThread_allocate_lock()
        if self._go == NULL or self._done == NULL:
            raise MemoryError("cannot allocate a lock")
        PyThread_acquire_lock(self._go, NOWAIT_LOCK)
        PyThread_acquire_lock(self._done, NOWAIT_LOCK)
        self._stop = False
        self._pid = os.getpid()
        self._thread = threading.Thread(target=self._loop, name="engine-txn-group", daemon=True)
        self._thread.start()
        return 0

    def _loop(self):
        cdef PyThread_type_lock go = self._go
        cdef PyThread_type_lock done = self._done
        while True:
            with nogil:
                PyThread_acquire_lock(go, 1)
            if self._stop:
                PyThread_release_lock(done)
                return
            try:
                self._result = self._fn(*self._args)
            except BaseException as exc:
                self._error = exc
            self._fn = self._args = None
            PyThread_release_lock(done)

    cdef int _submit(self, fn, tuple args) except -1:
        """Start ``fn(*args)`` on the thread; :meth:`_wait` must follow."""
        self._start()
        self._result = self._error = None
        self._fn = fn
        self._args = args
        PyThread_release_lock(self._go)
        return 0

    cdef tuple _wait(self):
        """Wait for the job: ``(result, error)``."""
        with nogil:
            PyThread_acquire_lock(self._done, 1)
        out = (self._result, self._error)
        self._result = self._error = None
        return out

    def stop(self):
        """End the thread (it is idle: no leader runs a group)."""
        if self._thread is None or self._pid != os.getpid():
            self._thread = None
            return
        self._stop = True
        PyThread_release_lock(self._go)
        with nogil:
            PyThread_acquire_lock(self._done, 1)
        self._thread.join()
        self._thread = None


def _flush_logs(dict logs):
    """Sync each ``[log, end]`` of ``logs`` past ``end`` (the settler's job);
    returns the first error (the rest are not synced), or None."""
    try:
        for e in logs.values():
            e[0].flush(e[1])
    except Exception as exc:
        return exc
    return None


cdef int _settle_failed(Py_ssize_t n, object exc) except -1:
    """Log a participant log's failed sync: ``n`` transactions stay unended."""
    _logger.warning("txn: a participant log did not sync; %d committed transactions "
                    "stay in the coordinator's journal until recover() after a restart",
                    n, exc_info=exc)
    return 0


cdef int _commit_not_taken(str txid, object name, object exc_info) except -1:
    """Log a participant that did not take a decided commit (recover() resends it)."""
    _logger.warning("txn %s: participant %r did not take commit; will resend", txid, name,
                    exc_info=exc_info)
    return 0


cdef bint _groupable(dict parts):
    """Whether a transaction can join a group: every participant is a
    built-in one whose prepare and commit the core runs itself."""
    if not parts:
        return False
    for p in parts:
        if not (isinstance(p, _PartCore) and (<_PartCore>p)._c_prepare
                and (<_PartCore>p)._c_commit):
            return False
    return True


cdef bint _redo_ok(dict parts):
    """Whether a transaction can commit by the coordinator's log: every
    participant a LogParticipant that keeps the built-in prepare, commit and
    apply (so its prepare is _check_c, nothing more), over an engine.Log."""
    if not parts:
        return False
    for p in parts:
        if not (isinstance(p, _LogPartCore) and (<_LogPartCore>p)._c_split
                and (<_LogPartCore>p)._c_prepare and (<_LogPartCore>p)._redo_log):
            return False
    return True


cdef int _sync_prepared(list deferred, list group, _Helper helper) except -1:
    """Sync every journal the group's prepared records went to (each once,
    the first on the helper thread while this one syncs the others); a
    transaction whose record a failed sync may have dropped votes no."""
    cdef dict failed = {}
    cdef list logs = []   # (participant, log), each log once
    cdef set seen = set()
    cdef _PartCore p
    cdef _Waiter w
    cdef Py_ssize_t i
    for entry in deferred:
        if id(entry[3]) not in seen:
            seen.add(id(entry[3]))
            logs.append((entry[0], entry[3]))
    if len(logs) > 1:
        helper._submit(logs[0][1].flush, ())
    try:
        for i in range(1 if len(logs) > 1 else 0, len(logs)):
            try:
                logs[i][1].flush()  # durable before the yes votes count
            except Exception as exc:
                failed[id(logs[i][1])] = exc
    finally:
        if len(logs) > 1:
            _result, err = helper._wait()
            if err is not None:
                if not isinstance(err, Exception):
                    raise err
                failed[id(logs[0][1])] = err
    for i in range(len(logs)):
        p = <_PartCore>logs[i][0]
        log = logs[i][1]
        err = failed.get(id(log))
        if isinstance(err, Closed) and log is not p._journal._log:
            # an append to a generation a switch closed went to the new one
            # (carried from memory), which the switch synced
            del failed[id(log)]
    for entry in deferred:
        p = <_PartCore>entry[0]
        txid, info, log = entry[1], entry[2], entry[3]
        exc = failed.get(id(log))
        if exc is None:
            p._journal.appended += 1
            if _armed:
                _hook("part.prepare.after_write", p.name)
            continue
        with p._lock:
            if p._doubt.pop(txid, None) is not None:
                p._release(txid, info)
        for w in group:
            if w.tx.txid == txid and w.reason is None:
                w.reason = f"participant {p.name!r} failed to prepare: {exc}"
                w.cause = exc
    return 0


cdef object _overlap_done(list overlap, _Helper helper):
    """Wait for the sync _CoordCore._prepare_first started; None if the
    prepared record is durable, else the error (the participant forgets the
    transaction: it votes no, as in _sync_prepared)."""
    cdef _PartCore p = <_PartCore>overlap[0]
    txid, info, log = overlap[1], overlap[2], overlap[3]
    _result, err = helper._wait()
    if err is not None and not isinstance(err, Exception):
        raise err
    if isinstance(err, Closed) and log is not p._journal._log:
        # an append to a generation a switch closed went to the new one
        # (carried from memory), which the switch synced
        err = None
    if err is None:
        p._journal.appended += 1
        return None
    with p._lock:
        if p._doubt.pop(txid, None) is not None:
            p._release(txid, info)
    return err


# ---------------------------------------------------------------------------
# the coordinator


cdef class _CoordCore:
    """The state and per-transaction path of an ``engine.txn.Coordinator``.

    The subclass opens the journal and reads it, then sets the fields; the
    hot path calls back into it only off the commit path: ``_finish_abort``
    (a transaction aborts) and ``_compact`` (the journal is due a switch).
    """

    cdef public double timeout            # default transaction timeout (s)
    cdef public Py_ssize_t _end_batch     # ended txids per "E" record
    cdef public Py_ssize_t _compact_records
    cdef readonly _Mutex _lock            # guards the dicts below and the journal's order
    cdef public _JournalCore _journal
    cdef public dict _pending             # committed, not yet ended: txid -> participant names
    cdef public dict _active              # txid -> Transaction being decided
    cdef public dict _deciding            # commit record being written (synced outside the lock)
    cdef public set _finishing            # committed txids whose commit phase runs now
    cdef public list _ended               # ended txids awaiting their end record
    cdef public dict _participants        # name -> participant, for resends
    cdef public object _registered        # the last participant list put in _participants
    cdef public object _recent            # deque of (txid, outcome, wall time)
    cdef public bint _closed
    cdef public Py_ssize_t stats_committed
    cdef public Py_ssize_t stats_aborted
    cdef public int64_t _inc              # this opening's incarnation
    cdef public int64_t _seq              # txids issued in this incarnation
    cdef str _prefix_s                    # "<journal id[:12]>-<incarnation hex>-"
    cdef bytes _prefix_b                  # the same, ASCII, for snprintf
    cdef _Mutex _group_lock               # guards the two fields below
    cdef list _group_queue                # _Waiters for the next group (durable commits)
    cdef bint _group_leading              # a thread leads a group now
    cdef Py_ssize_t _group_expect         # waiters the next leader gathers before it starts
    cdef _Waiter _group_gatherer          # the leader gathering them now, or None
    cdef int64_t _group_run_ns            # how long the last group ran (its gathering's bound)
    cdef int64_t _group_end_ns            # when it ended (eng_now_ns)
    cdef _Helper _helper                  # runs one step of a group next to its leader
    # commit by the coordinator's log (_redo_commit)
    cdef public bint _redo_on             # the Coordinator's redo=True
    cdef public dict _redo                # txid -> its REDO record's batches, until ended
    cdef public list _redo_unsynced       # applied, their logs maybe not durable past them yet
    cdef public dict _redo_logs           # id(log) -> [log, end its batches among those reach]
    cdef public set _redo_stale           # participant names with REDO batches of an earlier
                                          # incarnation not yet put back (recover() does)
    cdef _Helper _settler                 # syncs the logs of applied redo batches (_redo_settle)
    cdef _Mutex _settle_mu                # owns _settler and the two fields below
    cdef bint _settling                   # a sync job is on _settler, not reaped yet
    cdef list _settle_txids               # the transactions it ends once it succeeded

    def __cinit__(self, *args, **kwargs):
        self._lock = _Mutex()
        self._group_lock = _Mutex()
        self._group_queue = []
        self._helper = _Helper()
        self._pending = {}
        self._active = {}
        self._deciding = {}
        self._finishing = set()
        self._ended = []
        self._participants = {}
        self._redo = {}
        self._redo_unsynced = []
        self._redo_logs = {}
        self._redo_stale = set()
        self._settler = _Helper()
        self._settle_mu = _Mutex()
        self._settle_txids = []
        self._prefix_s = ""
        self._prefix_b = b""

    @property
    def _prefix(self):
        """Every txid of this incarnation starts with it (hex digits and ``-``)."""
        return self._prefix_s

    @_prefix.setter
    def _prefix(self, str value):
        if not value.isascii() or len(value) > 64:
            raise ValueError("a txid prefix is at most 64 ASCII characters")
        self._prefix_s = value
        self._prefix_b = value.encode("ascii")

    def transaction(self, timeout=None):
        """Start a transaction (a context manager: commit on exit, abort on error)."""
        cdef double t
        cdef char buf[96]
        cdef int n
        if self._closed:
            raise Closed("the coordinator is closed")
        if timeout is None:
            t = self.timeout  # checked by __init__
        else:
            t = float(timeout)
            if not t > 0:
                raise ValueError(f"timeout must be positive, not {timeout!r}")
        self._seq += 1
        # txid = prefix + "%x" % seq (the prefix is at most 64 characters)
        n = <int>PyBytes_GET_SIZE(self._prefix_b)
        memcpy(buf, PyBytes_AS_STRING(self._prefix_b), n)
        n += _hex(buf + n, <unsigned long long>self._seq)
        txid = PyUnicode_DecodeASCII(buf, n, NULL)
        now = _now()
        # Transaction(self, txid, now + t) without parsing arguments
        tx = <Transaction>Transaction.__new__(Transaction)
        tx._coord = self
        tx.txid = txid
        tx.deadline = now + t
        tx.state = "active"
        tx._parts = {}
        self._active[txid] = tx
        if not self._seq & 4095:
            # forget transactions abandoned without commit/abort once overdue
            for old in [x for x in list(self._active.values()) if (<Transaction>x).deadline < now]:
                with self._lock:
                    if (<Transaction>old).state == "active":
                        (<Transaction>old)._doomed = True
                self._active.pop((<Transaction>old).txid, None)
        return tx

    def _commit(self, Transaction tx):
        """Run two-phase commit for ``tx`` (``tx.commit()`` calls this)."""
        self._commit_c(tx)

    cdef int _register(self, list asked) except -1:
        """Keep the participants of a transaction being decided by name, for
        resends (the caller holds ``_lock``); the same list as last time (a
        caller committing to the same participants again) is skipped."""
        cdef dict reg
        if asked != self._registered:
            reg = self._participants
            for p in asked:
                if reg.get(p.name) is not p:
                    reg[p.name] = p
            self._registered = asked
        return 0

    cdef int _commit_c(self, Transaction tx) except -1:
        if self._redo_stale:
            # a participant with committed batches of an earlier incarnation
            # not put back in its log yet: those first (their offsets come first)
            self._redo_catch_up(list(tx._parts))
        if self._journal.sync and _groupable(tx._parts):
            return self._commit_grouped(tx)
        return self._commit_one(tx)

    cdef int _commit_one(self, Transaction tx, bint lead=False) except -1:
        # engine.txn documents the protocol; this is its prepare and decide.
        # lead: called by a group's leader (_lead), which owns the helper
        # thread: the first durable prepared record's sync runs there while
        # the other participants prepare (see _prepare_first)
        cdef str txid = tx.txid
        cdef dict parts = tx._parts
        cdef list asked
        cdef object cause = None
        cdef object reason = None
        cdef double deadline = tx.deadline
        cdef _JournalCore journal = self._journal
        cdef bint sync = journal.sync
        cdef tuple names
        cdef object log = None
        if not parts:
            tx.state = "committed"
            self._active.pop(txid, None)
            return 0
        asked = []
        cdef list overlap = [] if lead and sync and len(parts) > 1 else None
        cdef Py_ssize_t left = len(parts)
        try:
            for p, ops in parts.items():
                left -= 1
                if _now() > deadline:
                    reason = "timed out before every participant prepared"
                    break
                if _armed:
                    _hook("coord.prepare.send", p.name)
                asked.append(p)
                try:
                    if overlap is not None and not overlap and left:
                        # a later participant follows: this one's sync overlaps its prepare
                        vote = self._prepare_first(<_PartCore>p, txid, ops, overlap)
                    elif isinstance(p, _PartCore) and (<_PartCore>p)._c_prepare:
                        vote = (<_PartCore>p)._prepare_c(txid, ops)  # a C call
                    else:
                        vote = p.prepare(txid, ops)
                except Exception as exc:  # a raising participant votes no
                    reason = f"participant {p.name!r} failed to prepare: {exc}"
                    cause = exc
                    break
                if _armed:
                    _hook("coord.prepare.vote", p.name)
                if not vote:
                    reason = f"participant {p.name!r} voted no"
                    break
        finally:
            if overlap:
                # every yes vote counts only once its record is durable
                err = _overlap_done(overlap, self._helper)
                if err is not None and reason is None:
                    reason = f"participant {(<_PartCore>overlap[0]).name!r} failed to prepare: {err}"
                    cause = err
        if reason is None:
            names = tuple([(<_PartCore>p).name if isinstance(p, _PartCore) else p.name
                           for p in asked])  # every participant prepared
            self._lock._take()
            try:
                # Checked under the lock that decision() takes: once decision()
                # answered "abort" for an overdue txn, it can never commit.
                if self._closed:
                    reason = "the coordinator closed"
                elif tx._doomed or _now() > deadline:
                    reason = "timed out before the decision"
                else:
                    self._finishing.add(txid)
                    self._register(asked)
                    log = journal._log
                    if sync:
                        # the sync runs outside the lock (group commit);
                        # decision() says "pending" meanwhile
                        self._deciding[txid] = names
                    else:
                        # No sync to wait for: write the decision under the
                        # lock, so no compaction can switch generations in
                        # between and decision() says "commit" exactly once
                        # the record is in the log (the same records and
                        # crash points as the synced path).
                        if _armed:
                            _hook("coord.decision.before_write", None)
                        try:
                            journal._append(_encode_rec(REC_DECISION, txid, names))
                        except BaseException:
                            # whether the record landed is unknown: "pending"
                            # until a restart reads the log
                            self._deciding[txid] = names
                            self._finishing.discard(txid)
                            raise
                        journal.appended += 1
                        self._pending[txid] = names
            finally:
                self._lock._give()
        if reason is not None:
            self._finish_abort(tx, asked, reason, cause)
            return 0  # (_finish_abort raises)
        if sync:
            if _armed:
                _hook("coord.decision.before_write", None)
            try:
                log.append(_encode_rec(REC_DECISION, txid, names))
                log.flush()  # the decision is durable before anyone hears of it
            except Closed:
                if log is journal._log:
                    raise
            journal.appended += 1
            with self._lock:
                # only now, with the record durable, may decision() say "commit"
                self._pending[txid] = self._deciding.pop(txid)
        if _armed:
            _hook("coord.decision.after_write", None)
        tx.state = "committed"
        self._active.pop(txid, None)
        if overlap is not None:
            self._complete_split(txid, asked)  # several durable participants: overlap their syncs
        else:
            self._complete_c(txid, asked)
        return 0

    cdef object _prepare_first(self, _PartCore p, str txid, object ops, list overlap):
        """``p``'s prepare for a lone durable transaction that more
        participants follow: the prepared record is written, its sync starts
        on the helper thread (``overlap`` gets ``[p, txid, info, log]``) and
        the next participant prepares meanwhile; _overlap_done waits for it
        before any vote counts (as a group's prepares, _sync_prepared).  The
        crash points pass in _prepare_c's order: the record is written at
        ``after_write`` (a crash keeps what the page cache holds), durable
        before the decision."""
        cdef list deferred = []
        vote = p._prepare_c(txid, ops, deferred)
        if deferred:
            entry = deferred[0]
            overlap.extend(entry)
            self._helper._submit(entry[3].flush, ())
            if _armed:
                _hook("part.prepare.after_write", p.name)
        return vote

    # -- group commit of durable transactions (see _Waiter)

    cdef int _commit_grouped(self, Transaction tx) except -1:
        """Commit ``tx`` in the next group: lead it, or wait for its leader."""
        cdef _Waiter me = _Waiter.__new__(_Waiter)
        me.tx = tx
        self._group_lock._take()
        if self._group_leading:
            self._group_queue.append(me)
            if (self._group_gatherer is not None
                    and len(self._group_queue) >= self._group_expect):
                self._group_gatherer._wake()  # everyone it waits for is here
                self._group_gatherer = None
            self._group_lock._give()
            me._park()
            if me.role == _DONE:
                return me._outcome()
            # else handed the leadership: lead the next group (ours is in it)
        else:
            self._group_leading = True
            self._group_lock._give()
        self._lead(me)
        return me._outcome()

    cdef int _lead(self, _Waiter me) except -1:
        """Run the group of ``me`` and everyone waiting, wake them, and pass
        the leadership on to the first waiter that came meanwhile.

        The leadership passes only once the whole group is done: passing it
        once the decisions are durable (the next group preparing while this
        one's participants commit) measured twice the syncs for a few percent
        more throughput, as the next group is smaller by as much as it starts
        earlier."""
        cdef _Waiter w
        cdef list group
        cdef list decided
        cdef int64_t t0
        self._gather(me)
        self._group_lock._take()
        group = self._group_queue
        group.insert(0, me)
        self._group_queue = []
        self._group_lock._give()
        t0 = eng_now_ns()
        try:
            # commits by the coordinator's log first (_redo_commit), then the others
            rest = self._redo_split(group) if self._redo_on else group
            if len(rest) == 1:
                # alone: the one-transaction path, step for step (its crash
                # points in the order of the non-durable path's, which
                # tests/test_txn_fastpath.py checks; a group's interleave)
                w = <_Waiter>rest[0]
                try:
                    self._commit_one(w.tx, True)
                except BaseException as exc:
                    w.error = exc
                w.finished = True
            elif rest:
                try:
                    decided = self._decide_group(rest)
                    if decided:
                        self._complete_group(decided)
                except BaseException as exc:
                    # a crash point, an interrupt or a bug half way: whoever
                    # has no outcome yet gets this error (a decided commit
                    # is resent by recover(), as after a crash)
                    for w in rest:
                        if not w.finished:
                            w.error = exc
        finally:
            self._group_end_ns = eng_now_ns()
            self._group_run_ns = self._group_end_ns - t0
            # the group first: those that commit again at once are gathered
            # into the next group (see _gather)
            _wake_chain(group, me)
            self._hand_over(len(group))
        return 0

    cdef int _gather(self, _Waiter me) except -1:
        """Before a group starts: wait (at most half as long as the last group
        ran) for the threads of the last group to queue again.

        Without it the threads split into two halves that take turns: while
        one half's group runs, the other queues for the next.  Gathered, one
        group carries them all for the same syncs (PostgreSQL's commit_delay,
        only while the last group's committers are expected back: a thread
        that commits alone, or long after the last group, never waits)."""
        cdef long long us
        cdef _LockStatus st
        self._group_lock._take()
        if (len(self._group_queue) >= self._group_expect or self._group_run_ns <= 0
                or eng_now_ns() - self._group_end_ns > self._group_run_ns):
            # nobody expected, or the last group's threads would be back by
            # now (they stopped committing)
            self._group_lock._give()
            return 0
        self._group_gatherer = me
        self._group_lock._give()
        us = self._group_run_ns // 2000
        if us > 5000:
            us = 5000
        # me._lk is held (taken when it was handed the leadership, or since
        # it was made): an enqueuer that completes the gathering releases it
        with nogil:
            st = PyThread_acquire_lock_timed(me._lk, us, 0)
        if st == _LOCK_ACQUIRED:
            me._held = True
        self._group_lock._take()
        if self._group_gatherer is me:
            self._group_gatherer = None  # timed out
        self._group_lock._give()
        return 0

    cdef int _hand_over(self, Py_ssize_t ran) except -1:
        """Pass the leadership to the first waiter, or end it; ``ran``: the
        size of the group that just ran (its threads may queue again)."""
        cdef _Waiter nxt = None
        self._group_lock._take()
        if self._group_queue:
            nxt = <_Waiter>self._group_queue.pop(0)
            nxt.role = _LEAD
            # the next leader gathers those queued now and those just done
            self._group_expect = len(self._group_queue) + ran
        else:
            self._group_leading = False
            # the first to come back leads, and gathers the others
            self._group_expect = ran - 1
        self._group_lock._give()
        if nxt is not None:
            nxt._wake()
        return 0

    cdef list _decide_group(self, list group):
        """_commit_one's prepare and decide for every transaction of ``group``
        at once (each step's records share one sync per journal); returns the
        _Waiters decided commit, whose participants are yet to hear it."""
        cdef _Waiter w
        cdef _JournalCore journal = self._journal
        cdef list deferred = []
        cdef list decided = []
        cdef list recs
        cdef Transaction tx
        cdef object log = None
        # 1. prepare: every participant writes its prepared records, then
        # each journal is synced once for all of them
        for w in group:
            self._prepare_group_member(w, deferred)
        if deferred:
            _sync_prepared(deferred, group, self._helper)
        # 2. decide, under the lock decision() takes (as _commit_one)
        self._lock._take()
        try:
            for w in group:
                if w.reason is not None:
                    continue
                tx = w.tx
                if self._closed:
                    w.reason = "the coordinator closed"
                elif tx._doomed or _now() > tx.deadline:
                    w.reason = "timed out before the decision"
                else:
                    w.names = tuple([p.name for p in w.asked])
                    self._finishing.add(tx.txid)
                    self._register(w.asked)
                    # decision() says "pending" until the record is durable
                    self._deciding[tx.txid] = w.names
                    decided.append(w)
            log = journal._log
        finally:
            self._lock._give()
        for w in group:
            if w.reason is not None:
                self._finish_abort(w.tx, w.asked, w.reason, w.cause, raise_=False)
                w.finished = True
        if not decided:
            return decided
        recs = []
        for w in decided:
            if _armed:
                _hook("coord.decision.before_write", None)
            recs.append(_encode_rec(REC_DECISION, w.tx.txid, w.names))
        try:
            try:
                log.append_many(recs)
                log.flush()  # the decisions are durable before anyone hears of them
            except Closed:
                if log is journal._log:
                    raise
                # a switch carried them (_deciding) into the new generation, synced
        except Exception as exc:
            # as _commit_one: the commit raises, the txn stays "pending"
            # until a restart reads the log
            for w in decided:
                w.error = exc
                w.finished = True
            return []
        journal.appended += len(recs)
        self._lock._take()
        try:
            for w in decided:
                # only now, with the record durable, may decision() say "commit"
                self._pending[w.tx.txid] = self._deciding.pop(w.tx.txid)
        finally:
            self._lock._give()
        for w in decided:
            if _armed:
                _hook("coord.decision.after_write", None)
            w.tx.state = "committed"
            self._active.pop(w.tx.txid, None)
        return decided

    cdef int _prepare_group_member(self, _Waiter w, list deferred) except -1:
        """_commit_one's prepare loop for ``w``'s transaction; durable prepared
        records are appended to ``deferred`` instead of synced one by one."""
        cdef Transaction tx = w.tx
        cdef str txid = tx.txid
        cdef double deadline = tx.deadline
        cdef list asked = []
        w.asked = asked
        for p, ops in tx._parts.items():
            if _now() > deadline:
                w.reason = "timed out before every participant prepared"
                return 0
            if _armed:
                _hook("coord.prepare.send", p.name)
            asked.append(p)
            try:
                vote = (<_PartCore>p)._prepare_c(txid, ops, deferred)
            except Exception as exc:  # a raising participant votes no
                w.reason = f"participant {p.name!r} failed to prepare: {exc}"
                w.cause = exc
                return 0
            if _armed:
                _hook("coord.prepare.vote", p.name)
            if not vote:
                w.reason = f"participant {p.name!r} voted no"
                return 0
        return 0

    cdef int _complete_group(self, list decided) except -1:
        """_complete_c for every transaction of ``decided``, participant by participant."""
        cdef _Waiter w
        cdef list order = []
        cdef dict members = {}
        cdef list ws, errs
        cdef Py_ssize_t i
        for w in decided:
            for p in w.asked:
                ws = members.get(p)
                if ws is None:
                    ws = members[p] = []
                    order.append(p)
                ws.append(w)
        try:
            for p in order:
                if _armed:
                    for w in <list>members[p]:
                        _hook("coord.commit.send", p.name)
            # the first participant's commits on the helper thread, the
            # others' here: their syncs (marks, batches) overlap
            results = {}
            if len(order) > 1:
                self._helper._submit((<_PartCore>order[0])._commit_many_py,
                                     ([w.tx.txid for w in <list>members[order[0]]],))
            try:
                for p in order[1:] if len(order) > 1 else order:
                    results[p] = (<_PartCore>p)._commit_many([w.tx.txid for w in <list>members[p]])
            finally:
                if len(order) > 1:
                    errs, err = self._helper._wait()
                    if err is not None:
                        raise err
                    results[order[0]] = errs
            for p in order:
                ws = members[p]
                errs = results[p]
                for i in range(len(ws)):
                    w = <_Waiter>ws[i]
                    if errs[i] is None:
                        if _armed:
                            _hook("coord.commit.ack", p.name)
                        continue
                    # Decided is decided: the txn stays pending and recover()
                    # resends commit until the participant takes it.
                    w.failed += 1
                    _commit_not_taken(w.tx.txid, p.name, errs[i])
        except BaseException:
            with self._lock:
                for w in decided:
                    self._finishing.discard(w.tx.txid)
            raise
        for w in decided:
            self._end_c(w.tx.txid, w.failed)
            w.finished = True
        return 0

    # -- commit by the coordinator's log (redo=True)
    #
    # A transaction whose participants are all LogParticipants of this
    # process needs no vote: their "prepare" is a check of the ops in memory
    # (it cannot change its mind later), and a batch appended by the log's
    # only writer at an offset known in advance can be redone exactly from
    # a copy.  So the coordinator writes ONE record, REDO (txid, and per
    # participant its name, the offset its batch starts at and the batch),
    # and makes it durable: that is the commit point (the participants'
    # journals are not written at all).  Then each batch goes to its log
    # unsynced; the transaction ends (E record) only once every log it went
    # to is durable past it, which _redo_settle does for _end_batch
    # transactions at a time.  After a crash, recover() puts back what a
    # log lacks of each REDO not ended, in journal order (_redo_replay in
    # engine.txn).  The offsets are reserved by the group's leader holding
    # each participant's commit lock from before it reads the log's end
    # until the batches are in: one leader at a time, so groups reserve
    # consecutive ranges, and a participant's own commits (a mixed
    # transaction's) start after them (LogParticipant._settle).

    cdef list _redo_split(self, list group):
        """Commit the transactions of ``group`` that can go by the
        coordinator's log (_redo_commit); returns the others."""
        cdef list fast = []
        cdef list rest = []
        cdef _Waiter w
        for w in group:
            if _redo_ok(w.tx._parts):
                fast.append(w)
            else:
                rest.append(w)
        if fast:
            try:
                self._redo_commit(fast)
            except BaseException as exc:
                # as _lead: whoever has no outcome yet gets the error (a
                # durable REDO is put in the logs by recover())
                for w in fast:
                    if not w.finished:
                        w.error = exc
        return rest

    cdef int _redo_commit(self, list ws) except -1:
        """Commit the transactions of ``ws`` (every participant a
        LogParticipant, durability "always") by one REDO record each in the
        journal, one sync for all of them."""
        cdef _Waiter w
        cdef Transaction tx
        cdef _LogPartCore p
        cdef list ready = []
        cdef list decided = []
        cdef list locked = []
        cdef list recs
        cdef dict seen = {}
        cdef _JournalCore journal = self._journal
        cdef object log = None
        cdef object err = None
        cdef int64_t start, nxt
        cdef Py_ssize_t i
        # 1. check each participant's ops as its prepare does (same errors), writing nothing
        for w in ws:
            tx = w.tx
            w.asked = []
            w.infos = []
            for q, ops in tx._parts.items():
                if _now() > tx.deadline:
                    w.reason = "timed out before every participant prepared"
                    break
                p = <_LogPartCore>q
                if _armed:
                    _hook("coord.redo.check", p.name)
                w.asked.append(p)
                try:
                    if p._closed:
                        raise Closed(f"participant {p.name!r} is closed")
                    w.infos.append(p._check_c(tx.txid, ops))
                except Exception as exc:
                    w.reason = f"participant {p.name!r} failed to prepare: {exc}"
                    w.cause = exc
                    break
            if w.reason is None:
                ready.append(w)
            else:
                # nobody wrote anything for it: nothing to tell anyone
                self._finish_abort(tx, [], w.reason, w.cause, raise_=False)
                w.finished = True
        if not ready:
            return 0
        for w in ready:
            for q in w.asked:
                seen[id(q)] = q
        try:
            # 2. reserve each batch's offsets (every log's commit lock held
            # from before its end is read until the batches are in) and
            # decide, under the lock decision() takes
            for q in sorted(seen.values(), key=id):
                (<_LogPartCore>q)._commit_lock._take()
                locked.append(q)
            self._lock._take()
            try:
                for w in ready:
                    tx = w.tx
                    if self._closed:
                        w.reason = "the coordinator closed"
                        continue
                    if tx._doomed or _now() > tx.deadline:
                        w.reason = "timed out before the decision"
                        continue
                    batches = []
                    for i in range(len(w.asked)):
                        p = <_LogPartCore>w.asked[i]
                        values, keys = w.infos[i]
                        nxt = p._log.next_offset
                        start = p._reserved if p._reserved > nxt else nxt
                        p._reserved = start + len(values)
                        batches.append((p.name, start, values, keys))
                    w.redo = tuple(batches)
                    w.names = tuple([p.name for p in w.asked])
                    self._finishing.add(tx.txid)
                    self._register(w.asked)
                    # memory first (a journal switch writes REDO from _redo);
                    # decision() says "pending" until the record is durable
                    self._redo[tx.txid] = w.redo
                    self._deciding[tx.txid] = w.names
                    decided.append(w)
                log = journal._log
            finally:
                self._lock._give()
            for w in ready:
                if w.reason is not None:
                    self._finish_abort(w.tx, [], w.reason, w.cause, raise_=False)
                    w.finished = True
            if not decided:
                return 0
            # 3. the commit point: the REDO records, durable (one sync)
            recs = [_encode((REC_REDO, w.tx.txid, w.redo)) for w in decided]
            if _armed:
                _hook("coord.redo.before_write", None)
            try:
                log.append_many(recs)
            except Closed as exc:
                if log is journal._log:
                    err = exc
            except Exception as exc:
                err = exc
            if err is None:
                if _armed:
                    _hook("coord.redo.after_write", None)
                try:
                    log.flush()
                except Closed as exc:
                    # a switch carried them (_redo) into the new generation, synced
                    if log is journal._log:
                        err = exc
                except Exception as exc:
                    err = exc
            if err is not None:
                # as _decide_group: the commit raises; "pending" until a
                # restart reads the journal (a REDO there is put in the logs)
                with self._lock:
                    for w in decided:
                        self._finishing.discard(w.tx.txid)
                for w in decided:
                    w.error = err
                    w.finished = True
                return 0
            journal.appended += len(recs)
            if _armed:
                _hook("coord.redo.after_sync", None)
            self._lock._take()
            try:
                for w in decided:
                    self._pending[w.tx.txid] = self._deciding.pop(w.tx.txid)
            finally:
                self._lock._give()
            for w in decided:
                w.tx.state = "committed"
                self._active.pop(w.tx.txid, None)
            # 4. each batch to its log, in reservation order, unsynced
            try:
                for w in decided:
                    self._redo_apply(w)
                    w.finished = True
            except BaseException:
                with self._lock:
                    for w in decided:
                        if not w.finished:
                            self._finishing.discard(w.tx.txid)
                raise
        finally:
            for q in locked:
                (<_LogPartCore>q)._commit_lock._give()
        # 5. every _end_batch of them: their logs durable, then they end
        self._redo_settle(False)
        return 0

    cdef int _redo_apply(self, _Waiter w) except -1:
        """Append ``w``'s batches to their logs (commit locks held); once
        all are in, it waits for _redo_settle, else stays pending for
        recover() (a log that failed a write is broken until reopened)."""
        cdef _LogPartCore p
        cdef Py_ssize_t i, failed = 0
        cdef str txid = w.tx.txid
        cdef int64_t end
        for i in range(len(w.asked)):
            p = <_LogPartCore>w.asked[i]
            _name, start, values, keys = w.redo[i]
            if _armed:
                _hook("coord.redo.before_apply", p.name)
            try:
                p._redo_append(start, values, keys)
            except Exception as exc:
                failed += 1
                _commit_not_taken(txid, p.name, exc)
                continue
            if _armed:
                _hook("coord.redo.after_apply", p.name)
        self._lock._take()
        try:
            self._finishing.discard(txid)
            if failed:
                w.failed = failed
                self._recent.append((txid, "committed, unacknowledged", _wall()))
                return 0
            self._pending.pop(txid, None)
            self.stats_committed += 1
            self._recent.append((txid, "committed", _wall()))
            self._redo_unsynced.append(txid)
            for i in range(len(w.asked)):
                p = <_LogPartCore>w.asked[i]
                end = <int64_t>w.redo[i][1] + len(<list>w.redo[i][2])
                e = self._redo_logs.get(id(p._log))
                if e is None:
                    self._redo_logs[id(p._log)] = [p._log, end]
                elif end > <int64_t>e[1]:
                    e[1] = end
        finally:
            self._lock._give()
        return 0

    def _redo_settle(self, bint force):
        """End the transactions committed by the coordinator's log whose
        batches are in their logs, once those logs are durable past them.

        Every ``_end_batch`` of them the leader hands their logs' syncs to
        the settler thread and goes on: those syncs are off the commit's
        path (they overlap the next commits' journal syncs).  The leader
        that hands over the next ``_end_batch`` first reaps the last job
        (waiting for it if it still runs, which it rarely does): on success
        its transactions end (their ``E`` record, unsynced).  So a job, its
        reaping and its end record come at commits that the count fixes,
        whatever the disk's timing (the crash points too).  ``force``:
        the job in flight and every applied transaction now, in this thread,
        their ``E`` record left to the caller's :meth:`flush`.  A log that
        fails its sync leaves them not ended: the journal keeps their REDO
        records and recover() after a restart checks each log."""
        cdef list txids = None
        cdef dict logs = None
        if force:
            # _settle_mu throughout: no leader hands a job over meanwhile
            self._settle_mu._take()
            try:
                self._settle_reap(False)
                self._lock._take()
                try:
                    if not self._redo_unsynced:
                        return 0
                    txids, self._redo_unsynced = self._redo_unsynced, []
                    logs, self._redo_logs = self._redo_logs, {}
                finally:
                    self._lock._give()
                if _armed:
                    _hook("coord.redo.before_flush", None)
                err = _flush_logs(logs)
                if err is not None:
                    _settle_failed(len(txids), err)
                    return 0
                if _armed:
                    _hook("coord.redo.after_flush", None)
                self._settle_end(txids, False)
            finally:
                self._settle_mu._give()
            return 0
        if len(self._redo_unsynced) < self._end_batch:
            return 0  # (a glance without the lock; what counts is taken under it)
        if not self._settle_mu._try():
            return 0  # a forced settle runs: it ends them
        try:
            # the last job first (it ran meanwhile): one at a time, and
            # reaped at a point the commits fix, not the disk's timing
            self._settle_reap(True)
            self._lock._take()
            try:
                txids, self._redo_unsynced = self._redo_unsynced, []
                logs, self._redo_logs = self._redo_logs, {}
            finally:
                self._lock._give()
            if not txids:
                return 0  # a forced settle took them meanwhile
            if _armed:
                _hook("coord.redo.before_flush", None)
            self._settle_txids = txids
            self._settler._submit(_flush_logs, (logs,))
            self._settling = True
        finally:
            self._settle_mu._give()
        return 0

    cdef int _settle_reap(self, bint write_end) except -1:
        """(``_settle_mu`` held) Reap the settler's job if there is one,
        waiting for it to run: on success its transactions end
        (``write_end``: their E record when due)."""
        cdef tuple out
        if not self._settling:
            return 0
        if self._settler._pid != os.getpid():
            # a forked child: the parent's thread is not here, and whether
            # its syncs ran is unknown (the journal keeps those REDO records)
            self._settling = False
            self._settle_txids = []
            return 0
        out = self._settler._wait()
        self._settling = False
        txids, self._settle_txids = self._settle_txids, []
        err = out[0] if out[0] is not None else out[1]
        if err is not None:
            _settle_failed(len(txids), err)
            return 0
        if _armed:
            _hook("coord.redo.after_flush", None)
        self._settle_end(txids, write_end)
        return 0

    cdef int _settle_end(self, list txids, bint write_end) except -1:
        """End ``txids`` (their logs are durable past their batches); with
        ``write_end`` write the ``E`` record once ``_end_batch`` ended."""
        cdef list batch = None
        cdef object jlog = None
        self._lock._take()
        try:
            for t in txids:
                if self._redo.pop(t, None) is not None:
                    self._ended.append(t)
            if write_end and len(self._ended) >= self._end_batch:
                batch, self._ended = self._ended, []
                jlog = self._journal._log
        finally:
            self._lock._give()
        if batch is not None:
            self._write_ended(batch, jlog)
        return 0

    cdef int _write_ended(self, list batch, object jlog) except -1:
        """Write the end record of ``batch`` (taken from ``_ended`` under the
        lock) to ``jlog``, not synced (a lost one only repeats a resend), and
        compact the journal when it has grown to ``_compact_records``."""
        if _armed:
            _hook("coord.end.before_write", None)
        _journal_append(self._journal, jlog, (REC_ENDED, batch), durable=False)
        if _armed:
            _hook("coord.end.after_write", None)
        if self._journal.appended >= self._compact_records:
            self._compact()
        return 0

    def _stop_helper(self):
        """End the group commit's helper thread (at close; left parked, a
        daemon, if a group still runs)."""
        self._group_lock._take()
        try:
            if self._group_leading:
                return
        finally:
            self._group_lock._give()
        self._helper.stop()
        self._settle_mu._take()
        try:
            if self._settling and self._settler._pid == os.getpid():
                self._settler._wait()  # its outcome is for recover() after a reopen
            self._settling = False
            self._settle_txids = []
            self._settler.stop()
        finally:
            self._settle_mu._give()

    def _complete(self, str txid, parts):
        """Tell every participant to commit; end the txn when all acknowledged."""
        return self._complete_c(txid, list(parts))

    cdef bint _complete_c(self, str txid, list parts) except -1:
        cdef Py_ssize_t failed = 0
        try:
            for p in parts:
                if _armed:
                    _hook("coord.commit.send", p.name)
                try:
                    if isinstance(p, _PartCore) and (<_PartCore>p)._c_commit:
                        (<_PartCore>p)._commit_c(txid)  # a C call
                    else:
                        p.commit(txid)
                except Exception:
                    # Decided is decided: the txn stays pending and recover()
                    # resends commit until the participant takes it.
                    failed += 1
                    _commit_not_taken(txid, p.name, True)
                    continue
                if _armed:
                    _hook("coord.commit.ack", p.name)
        except BaseException:
            with self._lock:
                self._finishing.discard(txid)
            raise
        return self._end_c(txid, failed)

    cdef bint _complete_split(self, str txid, list parts) except -1:
        """_complete_c for a lone durable transaction (a group's leader, which
        owns the helper thread) whose participants are all LogParticipants
        free to commit it now: each step's syncs overlap across them instead
        of running participant after participant (two sync rounds instead of
        two per participant).

        1. every participant's commit mark is written, in order (in memory
           first, as _commit_one), unsynced; 2. per participant its journal
           is synced, then its batch goes to its log (``append_many``, which
           syncs it under ``"always"``): the first participant's on the
           helper thread, the others' here meanwhile, so the marks' syncs
           overlap, then the batches'; 3. each is done.  So per participant
           a mark is durable before any of its batch is written (L1), and
           every batch is durable before this returns.
        The crash points pass in _complete_c's order (participant after
        participant); the first participant's mark is written at its
        ``after_mark``, the rest runs ahead of its points: at each point at
        least what _complete_c had written there is written, and the
        decision is durable before any of it (a crash anywhere here is a
        committed transaction that recovery finishes from the marks).
        Falls back to _complete_c when a participant is busy (another
        writer holds its commit lock or queues for it), is finishing a
        marked batch, or is not a plain LogParticipant."""
        cdef list ready = []
        cdef _LogPartCore p
        cdef Py_ssize_t i, n = len(parts), failed = 0
        for q in parts:
            if not (isinstance(q, _LogPartCore) and (<_LogPartCore>q)._split_take(txid)):
                for p in ready:
                    p._commit_lock._give()
                return self._complete_c(txid, parts)
            ready.append(q)
        cdef list infos = [None] * n   # each one's prepared ops, None: txid unknown there
        cdef list jlogs = [None] * n   # the journal generation its mark went to
        cdef list errs = [None] * n    # what its commit raised, or None
        cdef list stage = [0] * n      # 1: mark written, 2: mark durable, 3: batch in the log
        try:
            try:
                self._split_steps(txid, ready, infos, jlogs, errs, stage)
            finally:
                for p in ready:
                    p._commit_lock._give()
            for i in range(n):
                p = ready[i]
                if i and _armed:
                    _hook("coord.commit.send", p.name)
                if infos[i] is None and errs[i] is None:
                    # unknown there (finished meanwhile): a no-op
                    if _armed:
                        _hook("coord.commit.ack", p.name)
                    continue
                if i and _armed:
                    _hook("part.commit.before_apply", p.name)
                    _hook("log.commit.before_mark", p.name)
                    if stage[i] >= 2:
                        _hook("log.commit.after_mark", p.name)
                if errs[i] is None:
                    if _armed:
                        _hook("log.commit.after_append", p.name)
                        _hook("part.commit.after_apply", p.name)
                    try:
                        p._commit_done(txid, infos[i])
                    except Exception as exc:
                        errs[i] = exc
                if errs[i] is not None:
                    # Decided is decided: the txn stays pending and recover()
                    # resends commit; the mark stays, so the resend finishes
                    # the batch from it (_finish_marked)
                    failed += 1
                    _commit_not_taken(txid, p.name, errs[i])
                    continue
                if _armed:
                    _hook("coord.commit.ack", p.name)
        except BaseException:
            with self._lock:
                self._finishing.discard(txid)
            raise
        return self._end_c(txid, failed)

    cdef int _split_steps(self, str txid, list ready, list infos, list jlogs, list errs,
                          list stage) except -1:
        """Steps 1 and 2 of _complete_split (every participant's commit lock held)."""
        cdef _LogPartCore p
        cdef Py_ssize_t i
        cdef bint helped
        for i in range(len(ready)):
            p = ready[i]
            if i == 0 and _armed:
                _hook("coord.commit.send", p.name)
                _hook("part.commit.before_apply", p.name)
                _hook("log.commit.before_mark", p.name)
            try:
                got = p._split_mark(txid)
            except Exception as exc:
                errs[i] = exc
                continue
            if got is None:
                continue
            infos[i], jlogs[i] = got
            stage[i] = 1
            if i == 0 and _armed:
                _hook("log.commit.after_mark", p.name)
        # each participant's mark durable, then its batch (L1): the first
        # participant's on the helper thread, the others' here meanwhile
        todo = [i for i in range(len(ready)) if stage[i] == 1]
        helped = len(todo) > 1
        if helped:
            i = todo[0]
            self._helper._submit(_mark_then_batch, (ready[i], jlogs[i], infos[i]))
        try:
            for i in todo[1:] if helped else todo:
                stage[i], errs[i] = _mark_then_batch(ready[i], jlogs[i], infos[i])
        finally:
            if helped:
                got, err = self._helper._wait()
                i = todo[0]
                if err is None:
                    stage[i], errs[i] = got
                elif isinstance(err, Exception):
                    errs[i] = err
                else:
                    raise err
        return 0

    cdef bint _end_c(self, str txid, Py_ssize_t failed) except -1:
        """After the commit phase of ``txid`` (``failed``: participants that did
        not take commit): end it if every one acknowledged, else leave it
        pending for ``recover()``.  True if it ended."""
        cdef list batch = None
        cdef object log = None
        if failed:
            with self._lock:
                self._finishing.discard(txid)
            self._recent.append((txid, "committed, unacknowledged", _wall()))
            return False
        # every participant acknowledged: the txn ends (inline: the hot path)
        self._lock._take()
        try:
            self._finishing.discard(txid)
            if self._pending.pop(txid, None) is None:
                return True
            self.stats_committed += 1
            self._recent.append((txid, "committed", _wall()))
            self._ended.append(txid)
            if len(self._ended) >= self._end_batch:
                batch, self._ended = self._ended, []
                log = self._journal._log
        finally:
            self._lock._give()
        if batch is not None:
            self._write_ended(batch, log)
        return True


# ---------------------------------------------------------------------------
# participants


cdef class _PartCore:
    """The state, prepare and commit of an ``engine.txn._JournaledParticipant``.

    Calls back into the subclass for what differs between participants:
    ``_check`` (through :meth:`_check_c`), ``_apply``, ``_acquire`` and
    ``_release`` (when the class sets ``_locking``), ``_maybe_compact``.
    """

    cdef public str name
    cdef readonly _Mutex _lock           # guards the tables below and the journal's order
    cdef public _JournalCore _journal
    cdef public dict _doubt              # txid -> info: prepared, outcome unknown
    cdef public dict _marks              # txid -> commit mark (LogParticipant)
    cdef public list _done               # committed txids awaiting their (batched) done record
    cdef public bint _closed
    cdef public Py_ssize_t _compact_records
    cdef bint _c_locking                 # the class's _locking: _acquire/_release hold resource locks
    cdef readonly bint _c_prepare        # the class keeps our prepare: the coordinator calls it in C
    cdef readonly bint _c_commit         # ... and our commit

    def __cinit__(self, *args, **kwargs):
        cdef type tp = type(self)
        self._lock = _Mutex()
        self._doubt = {}
        self._marks = {}
        self._done = []
        self._c_locking = bool(getattr(tp, "_locking", False))
        self._c_prepare = getattr(tp, "prepare", None) is _OUR_PREPARE
        self._c_commit = getattr(tp, "commit", None) in _OUR_COMMITS

    cdef object _check_c(self, str txid, object ops):
        return self._check(txid, ops)

    def prepare(self, str txid, ops):
        """Check and durably record ``ops``; ``True`` = ready to commit."""
        return self._prepare_c(txid, ops)

    cdef object _prepare_c(self, str txid, object ops, list deferred=None):
        # deferred (a group commit): a durable record is not synced here; its
        # (self, txid, info, log) goes to deferred and the leader syncs each
        # journal once for the whole group (_sync_prepared) before any vote counts
        cdef _JournalCore journal = self._journal
        cdef object info, log
        self._lock._take()
        try:
            if self._closed:
                raise Closed(f"participant {self.name!r} is closed")
            if txid in self._doubt:
                return True  # a resent prepare
            info = self._check_c(txid, ops)
            if info is None:
                return False
            self._doubt[txid] = info
            if self._c_locking:
                self._acquire(txid, info)
            log = journal._log
            if not journal.sync:
                # No sync to wait for: write under the lock (no compaction
                # can switch generations in between), same record and points.
                if _armed:
                    _hook("part.prepare.before_write", self.name)
                try:
                    journal._append(_encode_rec(REC_PREPARED, txid, info))
                except BaseException:
                    del self._doubt[txid]
                    self._release(txid, info)
                    raise
                journal.appended += 1
                if _armed:
                    _hook("part.prepare.after_write", self.name)
                return True
        finally:
            self._lock._give()
        if _armed:
            _hook("part.prepare.before_write", self.name)
        try:
            try:
                log.append(_encode_rec(REC_PREPARED, txid, info))
                if deferred is None:
                    log.flush()  # durable before the yes vote
            except Closed:
                if log is journal._log:
                    raise
            if deferred is not None:
                deferred.append((self, txid, info, log))
                return True
            journal.appended += 1
        except BaseException:
            with self._lock:
                if self._doubt.pop(txid, None) is not None:
                    self._release(txid, info)
            raise
        if _armed:
            _hook("part.prepare.after_write", self.name)
        return True

    def commit(self, str txid):
        """Apply the prepared ops of ``txid`` (idempotent; unknown txid: no-op)."""
        self._commit_c(txid)

    cdef int _commit_c(self, str txid) except -1:
        return self._commit_general(txid)

    cdef int _commit_general(self, str txid) except -1:
        info = self._doubt.get(txid)
        if info is None:
            return 0
        if _armed:
            _hook("part.commit.before_apply", self.name)
        self._apply(txid, info)
        if _armed:
            _hook("part.commit.after_apply", self.name)
        return self._commit_done(txid, info)

    def _commit_many_py(self, list txids):
        """:meth:`_commit_many` for the group's helper thread."""
        return self._commit_many(txids)

    cdef list _commit_many(self, list txids):
        """Commit each of ``txids`` (a group commit's); the exception each
        raised, or None, in order."""
        cdef list errs = [None] * len(txids)
        cdef Py_ssize_t i
        for i in range(len(txids)):
            try:
                self._commit_c(<str>txids[i])
            except Exception as exc:
                errs[i] = exc
        return errs

    cdef int _commit_done(self, str txid, object info) except -1:
        """After ``txid``'s ops were applied: forget it (batched done record)."""
        cdef list batch = None
        cdef object log = None
        with self._lock:
            if self._doubt.pop(txid, None) is None:
                return 0
            if self._c_locking:
                self._release(txid, info)
            if self._marks:
                self._marks.pop(txid, None)
            # Done records are not needed for safety (recovery sees the effect
            # in the resource); batched, they keep `txn ls` and restarts short.
            self._done.append(txid)
            if len(self._done) >= 64:
                batch, self._done = self._done, []
                log = self._journal._log
        if batch is not None:
            if _armed:
                _hook("part.done.before_write", self.name)
            _journal_append(self._journal, log, (REC_DONE, batch), durable=False)
            if _armed:
                _hook("part.done.after_write", self.name)
        if self._journal.appended >= self._compact_records:
            self._maybe_compact()
        return 0


cdef class _LogPartCore(_PartCore):
    """:class:`engine.txn.LogParticipant`'s check and its uncontended commit."""

    cdef object _log                     # the engine.Log the batches go to
    cdef object _log_append              # its bound append (looked up once)
    cdef readonly _Mutex _commit_lock    # serializes batches into the log
    cdef public list _commit_queue       # [txid, info, done, error] waiting for the group commit
    cdef public bint _leader             # a thread is writing a group now
    cdef bint _c_split                   # the class keeps LogParticipant's _apply: the
                                         # coordinator may split its commit (_complete_split)
    cdef public int64_t _reserved        # the end of the last batch a coordinator reserved
                                         # here (commit by its log: _CoordCore._redo_commit)
    cdef readonly bint _redo_log         # the log appends unsynced (an engine.Log): its
                                         # transactions may commit by the coordinator's log
    cdef bint _log_always                # ... and its durability is "always"

    def __cinit__(self, *args, **kwargs):
        self._commit_lock = _Mutex()
        self._commit_queue = []
        self._c_split = (self._c_commit and _SPLIT_APPLY is not None
                         and getattr(type(self), "_apply", None) is _SPLIT_APPLY)

    cdef bint _split_take(self, str txid):
        """Whether _complete_split may commit ``txid`` here now (durable, not
        closed, nobody queued for the log, ``txid`` prepared and not
        finishing a marked batch); if so ``_commit_lock`` is held, for the
        caller to release."""
        if not (self._c_split and self._journal.sync and not self._closed
                and not self._commit_queue and txid in self._doubt and txid not in self._marks):
            return False
        return self._commit_lock._try()

    cdef object _split_mark(self, str txid):
        """_commit_one's mark, unsynced (``_commit_lock`` held): ``(info,
        journal generation written to)``, or None if ``txid`` is unknown."""
        cdef _JournalCore journal = self._journal
        if self._reserved:
            self._settle()
        start = self._log.next_offset
        with self._lock:
            # under the lock a journal switch takes: the mark is either in
            # memory before the switch copies it, or written to the new log
            if self._closed:
                raise Closed(f"participant {self.name!r} is closed")
            info = self._doubt.get(txid)
            if info is None:
                return None
            self._marks[txid] = start
            jlog = journal._log
        try:
            jlog.append(_encode_rec(REC_MARK, txid, start))
        except Closed:
            if jlog is journal._log:
                raise
        journal.appended += 1
        return (info, jlog)

    cdef int _redo_append(self, int64_t start, list values, object keys) except -1:
        """Append a batch committed by the coordinator's log at ``start``,
        where it reserved it (``_commit_lock`` held), without waiting for a
        sync: the coordinator's journal holds it until the log is durable."""
        log = self._log
        nxt = log.next_offset
        if nxt != start:
            raise EngineError(
                f"log {getattr(log, 'path', '?')!r} is at offset {nxt}, and a committed batch "
                f"was reserved at {start}: another writer appended to it, or a write failed "
                "(reopen the log and its participant, then Coordinator.recover())")
        if self._log_always:
            log._append_unsynced(values, keys)
        elif keys is None:
            log.append_many(values)
        else:
            log.append_many(values, keys)
        return 0

    def _settle(self):
        """Before this participant writes a commit mark (``_commit_lock``
        held): every batch a coordinator committed by its own log here is in
        the log and durable, so no mark ever points past a batch that a
        power loss could still take away (recovery redoes those only after
        the participant finished its marked batches)."""
        log = self._log
        if self._reserved > log.next_offset:
            raise EngineError(
                f"log {getattr(log, 'path', '?')!r} lacks batches committed through the "
                "coordinator's journal (their write failed): reopen the log, this participant "
                "and the coordinator, then Coordinator.recover()")
        if self._journal.sync:
            log.flush(self._reserved)

    @property
    def log(self):
        """The :class:`engine.Log` this participant appends batches to."""
        return self._log

    @log.setter
    def log(self, value):
        append = getattr(value, "append", None)
        if append is None:
            raise TypeError(f"a LogParticipant needs an engine.Log, not {type(value).__name__}")
        self._log_append = append
        self._log = value
        self._redo_log = getattr(value, "_append_unsynced", None) is not None
        self._log_always = self._redo_log and getattr(value, "durability", None) == "always"

    def _check(self, str txid, ops):
        """The durable form of ``ops``: ``(values, keys or None)``."""
        return self._check_c(txid, ops)

    cdef object _check_c(self, str txid, object ops):
        cdef list values, keys
        cdef bint anykey = False
        if type(ops) is list and PyList_GET_SIZE(ops) == 1 and type(<object>PyList_GET_ITEM(ops, 0)) is bytes:
            return (ops[:], None)  # one value, no key: the common case
        values = []
        keys = []
        for op in ops:
            if type(op) is bytes:  # the common case first
                keys.append(None)
                values.append(op)
            elif isinstance(op, tuple):
                if len(op) != 2:
                    raise ValueError("a LogParticipant op is a value or a (key, value) pair")
                k = None if op[0] is None else _as_bytes(op[0], "key")
                anykey = anykey or k is not None
                keys.append(k)
                values.append(_as_bytes(op[1], "value"))
            else:
                keys.append(None)
                values.append(_as_bytes(op, "value"))
        if not values:
            raise ValueError("a LogParticipant needs at least one value")
        return (values, keys if anykey else None)

    def commit(self, str txid):
        """Append the prepared batch of ``txid`` to the log (idempotent; unknown txid: no-op)."""
        self._commit_c(txid)

    cdef int _commit_c(self, str txid) except -1:
        cdef _JournalCore journal = self._journal
        cdef list values, done
        if (
            journal.sync
            or self._closed
            or self._commit_queue
            or txid in self._marks
            or not self._commit_lock._try()
        ):
            # durable, contended (group commit) or finishing a marked batch
            return self._commit_general(txid)
        # Uncontended and nothing to sync: the general path's steps (same
        # records, same crash points, same order) under one hold of each
        # lock; the state lock keeps a journal switch out for the whole
        # commit, so the mark and the done list go to the live generation.
        try:
            self._lock._take()
            try:
                info = self._doubt.get(txid)
                if info is None:
                    return 0
                if _armed:
                    _hook("part.commit.before_apply", self.name)
                log = self._log
                start = log.next_offset
                if _armed:
                    _hook("log.commit.before_mark", self.name)
                # durable (as the log is) before the batch: after a crash the
                # mark says where the batch starts, so recovery appends exactly
                # what is missing
                try:
                    journal._append(_encode_rec(REC_MARK, txid, start))
                    journal.appended += 1
                    if _armed:
                        _hook("log.commit.after_mark", self.name)
                    values, keys = info
                    if keys is not None:
                        log.append_many(values, keys)
                    elif len(values) == 1:
                        self._log_append(values[0])  # the same record, a cheaper call
                    else:
                        log.append_many(values)
                except BaseException:
                    # the mark may be in the journal: a resend (or recovery)
                    # finishes the batch from it, as the general path does
                    self._marks[txid] = start
                    raise
                if _armed:
                    _hook("log.commit.after_append", self.name)
                    _hook("part.commit.after_apply", self.name)
                del self._doubt[txid]
                done = self._done
                done.append(txid)
                if len(done) >= 64:
                    self._done = []
                    if _armed:
                        _hook("part.done.before_write", self.name)
                    journal._append(_encode((REC_DONE, done)))
                    journal.appended += 1
                    if _armed:
                        _hook("part.done.after_write", self.name)
            finally:
                self._lock._give()
        finally:
            self._commit_lock._give()
        if journal.appended >= self._compact_records:
            self._maybe_compact()
        return 0

    cdef list _commit_many(self, list txids):
        """A group commit's batches: one commit mark write and one log append
        for all of them (``_commit_batch``: one sync each), then each is done."""
        cdef list errs = [None] * len(txids)
        cdef list rows = []
        cdef list at = []
        cdef Py_ssize_t i
        if not self._journal.sync or self._closed:
            return _PartCore._commit_many(self, txids)
        for i in range(len(txids)):
            txid = txids[i]
            info = self._doubt.get(txid)
            if info is None:
                continue  # finished or never prepared: a no-op
            if txid in self._marks:
                # a batch a crash or a failed write cut short: finish it alone
                try:
                    self._commit_general(txid)
                except Exception as exc:
                    errs[i] = exc
                continue
            if _armed:
                _hook("part.commit.before_apply", self.name)
            rows.append([txid, info, False, None])
            at.append(i)
        if not rows:
            return errs
        try:
            self._commit_batch(rows)
        except Exception as exc:
            # the marks written stay in _marks: a resend finishes each batch
            for i in at:
                errs[i] = exc
            return errs
        for i in range(len(rows)):
            row = rows[i]
            if _armed:
                _hook("log.commit.after_append", self.name)
                _hook("part.commit.after_apply", self.name)
            try:
                self._commit_done(row[0], row[1])
            except Exception as exc:
                errs[at[i]] = exc
        return errs


def _mark_then_batch(_LogPartCore p, jlog, info):
    """Make the commit mark written to ``jlog`` (``p``'s journal generation)
    durable, then append its batch (``(values, keys or None)``) to ``p``'s
    log: ``(stage, error)``, stage 3 when the batch is in, 2 when the batch
    failed, 1 when the mark's sync did (its batch not written)."""
    try:
        jlog.flush()
    except Closed as exc:
        # a switch closed that generation: it carried the mark (from memory)
        # into the new one, which it synced
        if jlog is p._journal._log:
            return 1, exc
    except Exception as exc:
        return 1, exc
    values, keys = info
    try:
        if keys is None:
            p._log.append_many(values)
        else:
            p._log.append_many(values, keys)
    except Exception as exc:
        return 2, exc
    return 3, None


cdef object _SPLIT_APPLY = None   # LogParticipant._apply (engine.txn registers it)


def _split_commits(cls):
    """``cls`` (LogParticipant) and its subclasses that keep its ``_apply``
    may have their commit split by the coordinator (_complete_split)."""
    global _SPLIT_APPLY
    _SPLIT_APPLY = cls.__dict__["_apply"]


# The coordinator calls a built-in participant's prepare/commit in C unless
# its class overrides them in Python (checked when the object is made).
cdef object _OUR_PREPARE = _PartCore.__dict__["prepare"]
cdef tuple _OUR_COMMITS = (_PartCore.__dict__["commit"], _LogPartCore.__dict__["commit"])


def _as_bytes(x, what):
    """``x`` as bytes (str is UTF-8); TypeError for anything else."""
    if isinstance(x, bytes):
        return x
    if isinstance(x, str):
        return x.encode()
    if isinstance(x, (bytearray, memoryview)):
        return bytes(x)
    raise TypeError(f"{what} must be bytes-like or str, not {type(x).__name__}")
