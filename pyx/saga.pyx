# cython: binding=False
# The compiled hot path of engine.saga: a saga's forward steps.
#
# With durability="always" and sagas in several threads, every step of every
# saga costs its thread a wake-up and then the saga's own work under the GIL,
# one thread after another, while the disk waits for the next group's sync
# (engine.saga's module docs).  On our 2-core VM, 8 threads each hold the GIL
# a median 16-18 us a step for ~5 us of warm work (the saga's objects and
# code come over from the other CPU), 7-8 holds between two syncs of ~210 us.
# Here the same steps run as C: fields of cdef classes instead of slot
# lookups and frames, the lock taken without a Python call (_Mutex,
# mutex.pxi): a median hold of 14-15 us, and 1.01-1.06x the sagas a second
# of the same loop in Python (bench/saga_threads.py's workload, alternating
# runs).
#
# What is not a forward step (retries, compensation, recovery, the fold of a
# log, parallel groups, other codecs) stays in engine/saga.py, whose _Run
# subclasses RunCore.  The records, their order, the locks and the crash
# points are the ones engine/saga.py documents (S1-S6); forward() does for
# a plain saga what Saga._run_stage and Saga._attempts do, and the tests
# compare the two record for record.
"""Compiled core of :mod:`engine.saga`: :class:`StepContext`, the state the
forward steps change, the default codec's record templates and the loop
that runs a plain saga's steps."""

cimport cython
from cpython.exc cimport PyErr_CheckSignals
from cpython.pythread cimport (NOWAIT_LOCK, PyThread_acquire_lock, PyThread_allocate_lock,
                               PyThread_free_lock, PyThread_release_lock, PyThread_type_lock)
from posix.time cimport CLOCK_REALTIME, clock_gettime, timespec

import inspect
from json.encoder import encode_basestring_ascii as _esc

from engine import _crashpoints as _cp

include "mutex.pxi"


# The default codec's records, formatted from templates: the bytes
# engine.saga._json_dumps makes of the same dict (key order, separators,
# ASCII escapes), at a fraction of the encoder's cost per call (a saga writes
# 2n + 2 records).  tests/test_saga_records.py checks the equality on every
# kind and value.
T_BEGIN = b'{"t":"begin","id":%s,"ctx":%s,"steps":%s}'
T_START = b'{"t":"start","id":%s,"s":%s,"a":%d}'
T_CSTART = b'{"t":"cstart","id":%s,"s":%s,"a":%d}'
T_DONE = b'{"t":"done","id":%s,"s":%s,"r":%s}'
T_CDONE = b'{"t":"cdone","id":%s,"s":%s}'
T_END_DONE = b'{"t":"end","id":%s,"st":"done"}'

# result types that are never awaitable (exact types: a subclass may define __await__)
PLAIN = frozenset((type(None), int, str, bytes, float, bool, dict, list, tuple))

# the same, typed, for the loop below (no module dict lookup per use)
cdef bytes _T_START = T_START
cdef bytes _T_DONE = T_DONE
cdef frozenset _PLAIN = PLAIN


cdef inline long long _time_ns() noexcept nogil:
    """time.time_ns(): the wall clock, as the records' fold stamps them."""
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return <long long>ts.tv_sec * 1_000_000_000 + ts.tv_nsec


cpdef bytes json_value(object v, object dumps):
    """``dumps(v)`` (the default codec's encoder), without the encoder for
    the commonest values: ints, strs and None."""
    cdef type t = type(v)
    if t is int:
        return b"%d" % v
    if t is str:
        return (<str>_esc(v)).encode("ascii")
    if v is None:
        return b"null"
    return dumps(v)


@cython.final
cdef class StepContext:
    """What an action or a compensation is called with.

    ``saga_id``; ``step`` (its name); ``key`` (``"<saga id>:<step>"``, the
    idempotency key, stable across retries, crashes and processes); ``ctx``
    (the saga's context); ``attempt`` (1, 2, ... across crashes too);
    ``results`` (step name -> result of the steps completed so far);
    ``result`` (compensations only: this step's action result, or ``None`` when
    the action's outcome is not known); ``compensating`` (True in a compensation).
    """

    cdef public str saga_id
    cdef public str step
    cdef public str key
    cdef public object ctx
    cdef public object attempt
    cdef public dict results
    cdef public object result
    cdef public bint compensating

    def __init__(self, str saga_id, str step, ctx, attempt, dict results,
                 result=None, bint compensating=False):
        self._set(saga_id, step, ctx, attempt, results, result, compensating)

    cdef inline void _set(self, str saga_id, str step, ctx, attempt, dict results,
                          result, bint compensating):
        self.saga_id = saga_id
        self.step = step
        self.key = saga_id + ":" + step
        self.ctx = ctx
        self.attempt = attempt
        self.results = results
        self.result = result
        self.compensating = compensating

    def __repr__(self):
        kind = "compensate" if self.compensating else "action"
        return f"StepContext({kind} key={self.key!r} attempt={self.attempt})"


cdef StepContext _action_context(str saga_id, str step, ctx, attempt, dict results):
    """``StepContext(saga_id, step, ctx, attempt, results)`` of an action,
    without parsing the arguments of a Python call."""
    cdef StepContext sc = StepContext.__new__(StepContext)
    sc._set(saga_id, step, ctx, attempt, results, None, False)
    return sc


cdef class RunCore:
    """The state of one saga (engine.saga._Run adds the fold of its records
    and the views of it).  ``started``/``succeeded`` are the effects of a
    ``start`` and a ``done`` record: the fold applies them through these, the
    forward steps directly."""

    cdef public str id
    cdef public object ctx
    cdef public list steps
    cdef public object state
    cdef public dict results
    cdef public set done
    cdef public set uncertain
    cdef public set inflight
    cdef public dict attempts
    cdef public set comp_done
    cdef public list comp_order
    cdef public set comp_inflight
    cdef public dict comp_attempts
    cdef public object error
    cdef public object failed_step
    cdef public object stuck_step
    cdef public long long n_attempts
    cdef public long long begin_offset
    cdef public long long begun_ns
    cdef public long long updated_ns
    cdef public _Mutex lock           # the saga's lock: its records' fold and append
    cdef public list pending          # encoded records not yet written
    cdef public list pending_kinds    # their kinds ("t"), for the crash points' names
    cdef public bytes key             # the log key of its records (the id's UTF-8)
    cdef public bytes jid             # the id as a JSON string (the templates' records)
    cdef public object exc            # the last exception raised here (live runs)
    cdef public bint driving          # a thread drives it now (run() or recover()); under Saga._lock

    def __init__(self, str saga_id, ctx, list steps, long long offset, long long ts, state):
        self.id = saga_id
        self.ctx = ctx
        self.steps = steps
        self.state = state
        self.results = {}
        self.done = set()
        self.uncertain = set()
        self.inflight = set()
        self.attempts = {}
        self.comp_done = set()
        self.comp_order = []
        self.comp_inflight = set()
        self.comp_attempts = {}
        self.n_attempts = 0
        self.begin_offset = offset
        self.begun_ns = ts
        self.updated_ns = ts
        self.lock = _Mutex()
        self.pending = []
        self.pending_kinds = []
        self.key = saga_id.encode()
        self.jid = (<str>_esc(saga_id)).encode("ascii")

    cdef inline int _started(self, str s, object a) except -1:
        self.inflight.add(s)
        self.attempts[s] = a
        self.n_attempts += 1
        return 0

    cdef inline int _succeeded(self, str s, object r) except -1:
        self.inflight.discard(s)
        self.uncertain.discard(s)
        self.done.add(s)
        self.results[s] = r
        return 0

    def started(self, str s, a):
        """A ``start`` record: attempt ``a`` of step ``s``'s action is in flight."""
        self._started(s, a)

    def succeeded(self, str s, r):
        """A ``done`` record: step ``s``'s action returned ``r``."""
        self._succeeded(s, r)


cpdef tuple append_pending(saga, RunCore run):
    """Holding ``run.lock``: append every queued record of ``run`` to the
    saga's log in one ``append_many``; returns the end of the append, the
    records and, while crash points are armed, their kinds (``""``
    otherwise).  Records that could not be appended stay queued for the
    saga's next write."""
    cdef list batch = run.pending
    cdef list batch_kinds = run.pending_kinds
    cdef Py_ssize_t n = len(batch)
    cdef str kinds = ""
    run.pending = []
    run.pending_kinds = []
    if _cp.armed:
        kinds = "+".join(batch_kinds)
        _cp.point(f"saga.before-write:{kinds}")
    try:
        # (its range's start is this batch's first offset)
        end = saga._log.append_many(batch, [run.key] * n).start + n
    except BaseException:
        run.pending[:0] = batch
        run.pending_kinds[:0] = batch_kinds
        raise
    return end, batch, kinds


cpdef wrote(saga, bytes key, end, list batch, str kinds):
    """After ``append_pending``, the saga's lock released: return once the
    append is durable, then publish it to the saga's ``events``."""
    log = saga._sync_log
    if log is not None:
        # durable before the step's action (or the caller) goes on; the
        # first sync that covers these records is enough (not one that
        # also covers what other sagas appended since).  A failed sync
        # breaks the log: this and every later write raise
        log.flush(end)
    if _cp.armed:
        _cp.point(f"saga.after-write:{kinds}")
    if saga._events is not None:
        saga._publish(key, batch)


def forward(saga, RunCore run, list steps, loop):
    """The forward steps of a saga whose steps are all plain (they run
    alone, synchronous, without a timeout; the default codec): what
    ``_run_stage`` and ``_attempts`` do for them, each step's first attempt
    here (its retries go to ``saga._attempts``).  Returns the first failure
    (step name, error) or None."""
    cdef bytes jid = run.jid
    cdef dict results = run.results
    cdef object dumps = saga._dumps
    cdef object attempt
    cdef str name
    cdef StepContext sc
    cdef tuple written
    for step in steps:
        name = step.name
        if name in run.done:
            continue
        attempt = run.attempts.get(name, 0) + 1
        raw = _T_START % (jid, step.jname, attempt)
        run.lock._take()
        try:
            run.updated_ns = _time_ns()
            run._started(name, attempt)
            run.pending.append(raw)
            run.pending_kinds.append("start")
            written = append_pending(saga, run)
        finally:
            run.lock._give()
        wrote(saga, run.key, written[0], written[1], written[2])
        sc = _action_context(run.id, name, run.ctx, attempt, dict(results))
        if _cp.armed:
            _cp.point(f"saga.action:{name}:enter")
        try:
            result = step.action(sc)
            if type(result) not in _PLAIN and inspect.isawaitable(result):
                result = saga._await(result, None, loop)
        except Exception as exc:
            err = saga._failed(run, step, attempt, 1, exc, False)
            if err is None:
                err = saga._attempts(run, step, loop, False, 1)
            if err is not None:
                return name, err
            continue
        if _cp.armed:
            _cp.point(f"saga.action:{name}:exit")
        try:
            raw = _T_DONE % (jid, step.jname, json_value(result, dumps))
        except (TypeError, ValueError) as exc:
            return name, saga._unrecordable(run, step, attempt, exc)
        run.lock._take()
        try:
            run.updated_ns = _time_ns()
            run._succeeded(name, result)
            run.pending.append(raw)
            run.pending_kinds.append("done")
        finally:
            run.lock._give()
    return None
