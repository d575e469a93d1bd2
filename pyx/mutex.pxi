# _Mutex: threading.Lock's interface with C-level _take/_give/_try, for the
# compiled hot paths (included by versions.pyx, txn.pyx and saga.pyx: each module gets
# its own copy of the type, from this one source).
#
# The including module cimports PyThread_* (cpython.pythread), cython and
# PyErr_CheckSignals (cpython.exc).

cdef extern from "pythread.h":
    ctypedef enum _LockStatus "PyLockStatus":
        _LOCK_FAILURE "PY_LOCK_FAILURE"
        _LOCK_ACQUIRED "PY_LOCK_ACQUIRED"
        _LOCK_INTR "PY_LOCK_INTR"
    _LockStatus PyThread_acquire_lock_timed(PyThread_type_lock lock, long long microseconds,
                                            int intr_flag) nogil


# one blocking slice of a contended lock wait (us): then re-take the GIL for signals
cdef long long _WAIT_SLICE_US = 50_000


@cython.final
cdef class _Mutex:
    """A lock with ``threading.Lock``'s interface (``acquire``,
    ``release``, ``locked``, ``with``), and C-level ``_take``/``_give`` so the
    hot path takes it without a Python call.  Not reentrant."""

    cdef PyThread_type_lock _lk   # the OS lock (a semaphore or mutex+cond, CPython's choice)
    cdef bint _held               # taken (for locked(); read and written with the GIL held)

    def __cinit__(self):
        self._lk = PyThread_allocate_lock()
        if self._lk == NULL:
            raise MemoryError("cannot allocate a lock")

    def __dealloc__(self):
        if self._lk != NULL:
            PyThread_free_lock(self._lk)
            self._lk = NULL

    cdef inline int _take(self) except -1:
        # uncontended: one atomic, no GIL release (the common case)
        if PyThread_acquire_lock(self._lk, NOWAIT_LOCK):
            self._held = True
            return 0
        self._wait(-1.0)
        return 0

    cdef bint _wait(self, double timeout) except -1:
        """Block for the lock with the GIL released, in slices (signals are
        checked between them); ``timeout`` < 0: forever.  True if taken."""
        cdef _LockStatus st = _LOCK_FAILURE
        cdef long long left_us = -1 if timeout < 0 else <long long>(timeout * 1e6)
        cdef long long slice_us
        while True:
            slice_us = _WAIT_SLICE_US if left_us < 0 or left_us > _WAIT_SLICE_US else left_us
            with nogil:
                st = PyThread_acquire_lock_timed(self._lk, slice_us, 0)
            if st == _LOCK_ACQUIRED:
                self._held = True
                return True
            if left_us >= 0:
                left_us -= slice_us
                if left_us <= 0:
                    return False
            PyErr_CheckSignals()  # raises KeyboardInterrupt (or what a handler raised)

    cdef inline bint _try(self) noexcept:
        # take it only if it is free (never blocks)
        if PyThread_acquire_lock(self._lk, NOWAIT_LOCK):
            self._held = True
            return True
        return False

    cdef inline void _give(self) noexcept:
        self._held = False
        PyThread_release_lock(self._lk)

    def acquire(self, blocking=True, timeout=-1):
        """Take the lock; ``False`` if not taken (``blocking=False``, or after ``timeout`` s)."""
        if PyThread_acquire_lock(self._lk, NOWAIT_LOCK):
            self._held = True
            return True
        if not blocking:
            return False
        return self._wait(<double>timeout)

    def release(self):
        """Release the lock (``RuntimeError`` if it is not held)."""
        if not self._held:
            raise RuntimeError("release unlocked lock")
        self._give()

    def locked(self):
        """Whether the lock is held (by any thread)."""
        return self._held

    def __enter__(self):
        self._take()
        return True

    def __exit__(self, *exc):
        self._give()
        return False
