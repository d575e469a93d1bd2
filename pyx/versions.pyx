# The compiled hot path of engine.versions.VersionedStore.
#
# A compare-and-set put is: normalise the key and value, take the store's
# lock, look the key up, compare the version, append one log record, store
# (version + 1, value), release.  In Python that is ~20 bytecodes, a
# threading.Lock acquire/release (two calls that parse their arguments) and a
# frame, which on a 2-core VM cost more than the log append itself.  Here it is
# one C function: the lock is a PyThread lock taken without a Python call
# (try first; block only under contention, GIL released, in slices so Ctrl-C
# works), the dict is read with PyDict_GetItemWithError and the only Python
# call left per put is the log's append (through its cached bound method).
#
# Everything that is not per-message (conflicts, merge, batches, snapshots,
# reopen, close) stays in engine/versions.py, whose VersionedStore subclasses
# _StoreCore: its fields are the store's state that both sides touch.
"""Compiled core of :class:`engine.VersionedStore` (the ``put``/``get`` hot path)."""

cimport cython
from cpython.dict cimport PyDict_GetItemWithError, PyDict_SetItem
from cpython.exc cimport PyErr_CheckSignals
from cpython.object cimport PyObject
from cpython.ref cimport Py_DECREF, Py_INCREF, _Py_REFCNT
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_SET_ITEM
from cpython.pythread cimport (NOWAIT_LOCK, PyThread_acquire_lock, PyThread_allocate_lock,
                               PyThread_free_lock, PyThread_release_lock, PyThread_type_lock)
from libc.stdint cimport int64_t

from engine.errors import Closed, LogBroken


cdef extern from "Python.h":
    void PyObject_GC_UnTrack(void *op)


# a missing key: version 0, no value (returned as is, never copied)
cdef tuple _MISSING = (0, None)


def _norm_key(key):
    """``key`` as ``bytes`` (``str`` is UTF-8); ``TypeError`` for anything else."""
    if type(key) is bytes:
        return key
    if isinstance(key, bytes):
        return bytes(key)
    if isinstance(key, str):
        return (<str>key).encode("utf-8")
    raise TypeError(f"key must be bytes or str, got {type(key).__name__}")


def _norm_value(value):
    """``value`` copied to ``bytes`` (any bytes-like object); ``TypeError`` otherwise."""
    if type(value) is bytes:
        return value
    if isinstance(value, (str, int)) and not isinstance(value, bytes):
        raise TypeError(f"value must be bytes-like, got {type(value).__name__}")
    try:
        return memoryview(value).tobytes()
    except TypeError:
        raise TypeError(f"value must be bytes-like, got {type(value).__name__}") from None


cdef inline tuple _entry(object version, object value):
    """A new ``(version, value)`` entry, untracked by the cyclic GC: it holds an
    int and a bytes, so it can never be part of a cycle, and a dict holding
    only such entries stays untracked too (a collection never walks a store
    of a million keys).  CPython untracks such tuples itself, but only later,
    in the collection that finds them."""
    cdef tuple t = (version, value)
    PyObject_GC_UnTrack(<PyObject *>t)
    return t


cdef inline void _reuse(PyObject *entry, object version, object value) noexcept:
    """Overwrite the entry the store alone references (refcount 1: no reader
    holds it, so no one can see it change) with ``(version, value)`` instead
    of allocating a new tuple and freeing the old one (CPython's zip and
    dict.items iterators reuse their result tuple the same way)."""
    cdef PyObject *old0 = PyTuple_GET_ITEM(<object>entry, 0)
    cdef PyObject *old1 = PyTuple_GET_ITEM(<object>entry, 1)
    Py_INCREF(version)
    Py_INCREF(value)
    PyTuple_SET_ITEM(<object>entry, 0, version)
    PyTuple_SET_ITEM(<object>entry, 1, value)
    Py_DECREF(<object>old0)
    Py_DECREF(<object>old1)
    PyObject_GC_UnTrack(entry)  # (made by the Python layer: tracked until a collection)


include "mutex.pxi"


cdef class _StoreCore:
    """The state and hot path of a :class:`engine.VersionedStore` (subclass it).

    The subclass opens the log and loads the state, then sets ``_data``,
    ``_append`` (the log's bound ``append``), ``_snap_at`` and, for
    ``durability="always"``, ``_sync_log``.  ``put`` calls back into the subclass
    only off the hot path: ``_check_open`` (closed), ``_snapshot_locked``
    (a snapshot is due), ``_put_conflict`` (the compare failed).
    """

    cdef public dict _data          # key (bytes) -> (version, value): the store
    cdef readonly _Mutex _lock      # guards _data, the log's order and the snapshot bookkeeping
    cdef public object _append      # the log's bound append(value, key), or a stub raising Closed
    cdef public object _sync_log    # the log when a write waits for its sync outside the lock, else None
    cdef public int64_t _snap_at    # log offset at which the next automatic snapshot is due
    cdef public bint _closed        # close() ran
    cdef public object _broken      # the LogBroken a write or sync of the log raised, or None
    # (from then on reads raise it too: the table may hold a write whose
    # put raised, which must never be seen as if it were acknowledged)

    def __cinit__(self, *args, **kwargs):
        self._data = {}
        self._lock = _Mutex()
        self._snap_at = 1 << 62

    cpdef _check_broken(self):
        """Raise :class:`engine.LogBroken` if a write or sync of the log failed."""
        b = self._broken
        if b is not None:
            raise LogBroken(b.path, b.cause, b.errno)

    cpdef _note_broken(self, exc):
        """Remember ``exc`` if it is a :class:`engine.LogBroken` (reads refuse from then on)."""
        if isinstance(exc, LogBroken) and self._broken is None:
            self._broken = exc

    def get(self, key):
        """``(version, value)`` of ``key``; ``(0, None)`` if it is absent.

        Raises :class:`engine.LogBroken` once a write or sync of the log failed."""
        cdef PyObject *p
        if self._broken is not None:
            self._check_broken()
        if type(key) is not bytes:
            key = _norm_key(key)
        p = PyDict_GetItemWithError(self._data, key)
        if p == NULL:
            return _MISSING
        return <object>p

    def put(self, key, value, expected_version=None, merge=None):
        """Write ``value`` under ``key``; return the new version.

        With ``expected_version`` the write is a compare-and-set: it happens
        only if the key's version is exactly that (0 = absent), else
        :class:`engine.VersionConflict` is raised and nothing changes, unless
        a ``merge`` (here or the store's) resolves it.  ``expected_version``
        is compared with ``==``.
        """
        cdef PyObject *p
        cdef object cur
        cdef object ver
        cdef object new = None
        cdef object off = None
        if type(key) is not bytes:
            key = _norm_key(key)
        if type(value) is not bytes:
            value = _norm_value(value)
        self._lock._take()
        try:
            if self._closed:
                self._check_open()
            p = PyDict_GetItemWithError(self._data, key)
            ver = 0 if p == NULL else (<tuple>p)[0]
            if expected_version is None or expected_version is ver or expected_version == ver:
                new = ver + 1
                try:
                    off = self._append(value, key)
                except LogBroken as exc:
                    self._note_broken(exc)
                    raise
                if p != NULL and _Py_REFCNT(p) == 1:
                    # (the log call may have let other threads run, but every
                    # change of _data takes the lock we hold: p is still the entry)
                    _reuse(p, new, value)
                else:
                    PyDict_SetItem(self._data, key, _entry(new, value))
                if <int64_t>off >= self._snap_at:
                    self._snapshot_locked(False)
        finally:
            self._lock._give()
        if new is None:
            return self._put_conflict(key, value, expected_version, merge)
        if self._sync_log is not None:
            self._wait_durable(off)
        return new

    cpdef _wait_durable(self, off):
        """Return once log offset ``off`` is on stable storage (``durability="always"``).

        Called after the store's lock is released: writers in other threads
        append meanwhile, and one sync (the log's group commit) covers all of
        them.  A no-op when the store does not sync per write."""
        log = self._sync_log
        if log is None or log.durable_offset > off:
            return
        try:
            log.flush(off + 1)  # this record: not what others appended since
        except LogBroken as exc:
            self._note_broken(exc)
            raise
        except Closed:
            # close() in another thread got there first; it syncs everything
            if log.durable_offset <= off:
                raise

    def __len__(self):
        if self._broken is not None:
            self._check_broken()
        return len(self._data)

    def __contains__(self, key):
        if self._broken is not None:
            self._check_broken()
        if type(key) is not bytes:
            key = _norm_key(key)
        return key in self._data
