# cython: freethreading_compatible=False
"""engine._mpq -- a multi-producer multi-consumer queue of Python objects in
shared memory: the core behind ``engine.Queue``, ``JoinableQueue`` and
``SimpleQueue`` (engine/queues.py adds naming, pickling of handles and the
region's lifetime).

Protocol in one paragraph
-------------------------
The byte layout is ``pyx/mpq_layout.h``.  Producers take the producer lock,
append one record (or a batch) at ``tail`` and commit by a release store of
``tail``; consumers take the consumer lock, copy the record at ``head`` out
into Python objects and commit by a release store of ``head``.  The two sides
never take each other's lock: between them the queue is an SPSC ring.  Both
locks are robust: the futex word holds the holder's pid (set by one CAS), the
holder's start time sits next to it, and a waiter that finds the holder dead
(pid gone, a zombie, or a reused pid with another start time) takes the lock
over and completes the half-done commit of message counts (see the layout
header).  A holder killed at any instruction therefore leaves whole records
or none: a put killed before its commit never happened, a get killed before
its commit leaves the message for the next consumer.

Objects travel as protocol-5 pickles; out-of-band buffers (numpy arrays,
bytearray, ``pickle.PickleBuffer``) are copied once from the object into the
ring and once from the ring into the receiving buffer.  A top-level ``bytes``
object is stored raw (no pickle).

Waiting sleeps on a futex "doorbell" per direction; a waker pays a syscall
only when a sleeper registered.  Waits run with the GIL released, in slices
so signals (KeyboardInterrupt) and dead lock holders are noticed.
"""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_FromStringAndSize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.exc cimport PyErr_CheckSignals
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t, INT32_MAX
from libc.string cimport memcpy


cdef extern from "<sched.h>" nogil:
    int sched_yield()

from eng_atomic cimport *

import mmap as _mmap
import os as _os
import pickle as _pickle
import queue as _queue
import time as _time

from engine._shm import SHM_DIR, region_path
from engine.errors import IncompatibleRegion

include "reserve.pxi"
include "liveness.pxi"

cdef extern from "mpq_layout.h" nogil:
    uint64_t MPQ_MAGIC
    uint32_t MPQ_LAYOUT_VERSION
    uint32_t MPQ_REC_HDR
    uint64_t MPQ_MIN_CAPACITY
    uint64_t MPQ_MAX_CAPACITY
    uint32_t MPQ_HEADER_BYTES
    uint32_t MPQ_KIND_PAD
    uint32_t MPQ_KIND_PICKLE
    uint32_t MPQ_KIND_BYTES
    uint32_t MPQ_KIND_OOB
    uint32_t MPQ_KIND_MAX
    uint32_t MPQ_FLAVOUR_QUEUE
    uint32_t MPQ_FLAVOUR_JOINABLE
    uint32_t MPQ_FLAVOUR_SIMPLE

    ctypedef struct mpq_meta_t:
        uint64_t magic
        uint32_t version
        uint32_t header_size
        uint64_t capacity
        uint64_t maxsize
        uint32_t flavour
        uint32_t creator_pid
        uint64_t created_ns
    ctypedef struct mpq_lock_t:
        uint32_t owner
        uint32_t waiters
        uint64_t owner_start
        uint64_t takeovers
        uint64_t owner_ns
    ctypedef struct mpq_cursor_t:
        uint64_t pos
        uint64_t count
        uint64_t pend_pos
        uint64_t pend_count
        uint64_t prev_count
    ctypedef struct mpq_bell_t:
        uint32_t seq
        uint32_t waiters
    ctypedef struct mpq_tasks_t:
        uint64_t done
        uint32_t seq
        uint32_t waiters
    ctypedef struct mpq_header_t:
        mpq_meta_t meta
        mpq_lock_t plock
        mpq_cursor_t prod
        mpq_lock_t clock
        mpq_cursor_t cons
        mpq_bell_t data
        mpq_bell_t space
        mpq_tasks_t tasks
    ctypedef struct mpq_oob_t:
        uint32_t nbufs
        uint32_t _reserved
        uint64_t pickle_len

MAGIC = MPQ_MAGIC
LAYOUT_VERSION = MPQ_LAYOUT_VERSION
HEADER_SIZE = MPQ_HEADER_BYTES
MIN_CAPACITY = MPQ_MIN_CAPACITY
MAX_CAPACITY = MPQ_MAX_CAPACITY
FLAVOURS = ("queue", "joinable", "simple")

Empty = _queue.Empty
Full = _queue.Full

cdef object _dumps = _pickle.dumps
cdef object _loads = _pickle.loads
cdef object _PickleBuffer = _pickle.PickleBuffer

# one futex sleep of a blocked call (ns): then re-take the GIL for signals and
# to look at the lock holder's liveness
cdef int64_t _SLICE_NS = 50_000_000
# a lock held this long by one holder gets its liveness checked (ns)
cdef int64_t _SUSPECT_NS = 20_000_000
# spins (pause instructions) before a waiter sleeps: a lock is held for
# a memcpy, and a message usually arrives within microseconds when busy
cdef int _SPIN = 256
# sched_yield calls before a waiter sleeps on the futex
cdef int _YIELDS = 8
# payloads at least this big are copied with the GIL released
cdef Py_ssize_t _NOGIL_COPY = 1 << 16

# This process's pid and start time, refreshed in a forked child: the lock
# word is the pid, the start time tells it from a later process with the same pid.
cdef uint32_t _PID = <uint32_t>_os.getpid()
cdef uint64_t _START = _my_start()


cdef uint64_t _pid_ns():
    """This process's pid namespace (an inode number), 0 when unknown."""
    try:
        return _os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


# A pid means something only in its own pid namespace: a lock holder in
# another one (a container sharing /dev/shm) is never judged dead by its pid.
cdef uint64_t _NS = _pid_ns()


def _after_fork():
    global _PID, _START
    _PID = <uint32_t>_os.getpid()
    _START = _my_start()


_os.register_at_fork(after_in_child=_after_fork)


cdef inline uint64_t _align8(uint64_t n) noexcept nogil:
    return (n + 7) & ~(<uint64_t>7)


cdef inline int64_t _deadline(bint block, object timeout) except? -2:
    """Absolute monotonic deadline in ns; -1 = none; now for a non-blocking call."""
    if not block:
        return eng_now_ns()
    if timeout is None:
        return -1
    cdef double t = timeout
    if t != t:
        raise ValueError("timeout must be a number of seconds, not NaN")
    if t < 0:
        t = 0
    return eng_now_ns() + <int64_t>(t * 1e9)


cdef inline int64_t _slice(int64_t deadline) noexcept:
    """The next sleep: a slice, or what is left before the deadline (0: none left)."""
    if deadline < 0:
        return _SLICE_NS
    cdef int64_t left = deadline - eng_now_ns()
    if left <= 0:
        return 0
    return left if left < _SLICE_NS else _SLICE_NS


@cython.no_gc_clear
cdef class QueueCore:
    """The shared-memory queue, as one process's handle.  Subclassed by
    ``engine.Queue`` and friends; use those."""

    cdef object _mm               # mmap.mmap of header + data
    cdef Py_buffer _buf           # our export of _mm (base pointer)
    cdef bint _has_buf            # _buf is held
    cdef mpq_header_t *_h         # header at the start of the mapping
    cdef unsigned char *_data     # first data byte
    cdef uint64_t _cap            # data bytes (power of two)
    cdef uint64_t _mask           # _cap - 1
    cdef uint64_t _max_msg        # largest record payload
    cdef uint64_t _maxsize        # message count limit, 0 = none
    cdef uint32_t _flavour        # MPQ_FLAVOUR_*
    cdef readonly object _name    # region name (file name under SHM_DIR)
    cdef readonly bint _closed    # this handle was closed (put/get raise ValueError)
    cdef object _last             # the record _take1 copied out (handed over at once)
    cdef uint32_t _last_kind      # its kind

    def __dealloc__(self):
        if self._has_buf:
            PyBuffer_Release(&self._buf)
            self._has_buf = False

    # ---- region ----------------------------------------------------------

    def _create(self, str name, uint64_t capacity, uint64_t maxsize, str flavour):
        """Create ``SHM_DIR/name`` (0600, blocks allocated) and map it."""
        if capacity < MPQ_MIN_CAPACITY or capacity > MPQ_MAX_CAPACITY:
            raise ValueError(f"capacity must be in {MPQ_MIN_CAPACITY}..{MPQ_MAX_CAPACITY} bytes, "
                             f"got {capacity}")
        cdef uint64_t cap = MPQ_MIN_CAPACITY
        while cap < capacity:
            cap <<= 1
        if flavour not in FLAVOURS:
            raise ValueError(f"flavour must be one of {FLAVOURS}, got {flavour!r}")
        cdef uint64_t total = MPQ_HEADER_BYTES + cap
        path = region_path(name)
        mm = _create_mapped(path, total, _mmap.MAP_SHARED)
        self._map(mm, name)
        cdef mpq_header_t *h = self._h
        h.meta.version = MPQ_LAYOUT_VERSION
        h.meta.header_size = MPQ_HEADER_BYTES
        h.meta.capacity = cap
        h.meta.maxsize = maxsize
        h.meta.flavour = <uint32_t>FLAVOURS.index(flavour)
        h.meta.creator_pid = _PID
        h.meta.created_ns = <uint64_t>eng_wall_ns()
        # the magic goes last, released: an attacher that sees it sees the rest
        eng_store_release_u64(&h.meta.magic, MPQ_MAGIC)
        self._geometry()

    def _attach(self, str name):
        """Map the existing region ``SHM_DIR/name``, validating its header."""
        path = region_path(name)
        try:
            fd = _os.open(path, _os.O_RDWR)
        except FileNotFoundError:
            raise IncompatibleRegion(
                name, "no such queue: its creator ended (the region goes with it); "
                "keep the creating Queue alive while others attach") from None
        except PermissionError:
            raise IncompatibleRegion(name, "permission denied (queues are private to their user)") from None
        try:
            size = _os.fstat(fd).st_size
            if size < MPQ_HEADER_BYTES + MPQ_MIN_CAPACITY:
                raise IncompatibleRegion(name, f"truncated: {size} bytes is smaller than any queue")
            mm = _mmap.mmap(fd, size, flags=_mmap.MAP_SHARED)
        finally:
            _os.close(fd)
        self._map(mm, name)
        cdef mpq_header_t *h = self._h
        cdef int tries = 0
        while eng_load_acquire_u64(&h.meta.magic) == 0 and tries < 50:
            _time.sleep(0.001)  # a racing creator publishes the magic last
            tries += 1
        if eng_load_acquire_u64(&h.meta.magic) != MPQ_MAGIC:
            raise IncompatibleRegion(name, "not a queue-engine queue (bad magic)")
        if h.meta.version != MPQ_LAYOUT_VERSION:
            raise IncompatibleRegion(
                name, f"layout version {h.meta.version}, this build reads {MPQ_LAYOUT_VERSION}")
        cdef uint64_t cap = h.meta.capacity
        if (h.meta.header_size != MPQ_HEADER_BYTES or cap < MPQ_MIN_CAPACITY
                or cap > MPQ_MAX_CAPACITY or (cap & (cap - 1)) != 0
                or <uint64_t>size < MPQ_HEADER_BYTES + cap):
            raise IncompatibleRegion(name, f"corrupt queue: bad geometry (capacity {cap}, {size} bytes)")
        if h.meta.flavour > MPQ_FLAVOUR_SIMPLE:
            raise IncompatibleRegion(name, f"corrupt queue: unknown flavour {h.meta.flavour}")
        self._geometry()

    cdef int _map(self, object mm, object name) except -1:
        self._mm = mm
        self._name = name
        PyObject_GetBuffer(mm, &self._buf, PyBUF_SIMPLE | PyBUF_WRITABLE)
        self._has_buf = True
        self._h = <mpq_header_t *>self._buf.buf
        return 0

    cdef int _geometry(self) except -1:
        self._cap = self._h.meta.capacity
        self._mask = self._cap - 1
        self._max_msg = self._cap // 2 - MPQ_REC_HDR
        self._maxsize = self._h.meta.maxsize
        self._flavour = self._h.meta.flavour
        self._data = (<unsigned char *>self._h) + MPQ_HEADER_BYTES
        return 0

    cdef object _corrupt(self, str why):
        return IncompatibleRegion(self._name, "corrupt queue: " + why)

    cdef int _check_open(self) except -1:
        if self._closed:
            raise ValueError(f"Queue {self!r} is closed")
        if not self._has_buf:
            raise ValueError(f"Queue {self!r} is not attached to a region")
        return 0

    @property
    def _flavour_name(self):
        return FLAVOURS[self._flavour]

    @property
    def _maxsize_value(self):
        return self._maxsize

    @property
    def _capacity(self):
        return self._cap

    def _mark_closed(self):
        self._closed = True

    # ---- robust locks ----------------------------------------------------

    cdef inline bint _lock(self, mpq_lock_t *lk, mpq_cursor_t *cur, int64_t deadline) except -1:
        """Take a side's lock; False when the deadline passed first."""
        cdef uint32_t free = 0
        if eng_cas_u32(&lk.owner, &free, _PID):
            eng_store_release_u64(&lk.owner_start, _START)
            eng_store_release_u64(&lk.owner_ns, _NS)
            return True
        return self._lock_slow(lk, cur, deadline)

    cdef bint _lock_slow(self, mpq_lock_t *lk, mpq_cursor_t *cur, int64_t deadline) except -1:
        cdef uint32_t seen, free
        cdef uint32_t suspect = 0
        cdef uint64_t ns
        cdef int64_t suspect_since = 0
        cdef int64_t wait_ns
        cdef int i
        for i in range(_SPIN):
            eng_cpu_relax()
            if eng_load_relaxed_u32(&lk.owner) == 0:
                free = 0
                if eng_cas_u32(&lk.owner, &free, _PID):
                    eng_store_release_u64(&lk.owner_start, _START)
                    eng_store_release_u64(&lk.owner_ns, _NS)
                    return True
        while True:
            seen = eng_load_acquire_u32(&lk.owner)
            if seen == 0:
                free = 0
                if eng_cas_u32(&lk.owner, &free, _PID):
                    eng_store_release_u64(&lk.owner_start, _START)
                    eng_store_release_u64(&lk.owner_ns, _NS)
                    return True
                continue
            if seen != suspect:
                suspect = seen
                suspect_since = eng_now_ns()
            elif eng_now_ns() - suspect_since >= _SUSPECT_NS:
                ns = eng_load_acquire_u64(&lk.owner_ns)
                if (ns == 0 or ns == _NS) and not _alive(<int32_t>seen, eng_load_acquire_u64(&lk.owner_start)):
                    free = seen
                    if eng_cas_u32(&lk.owner, &free, _PID):
                        eng_store_release_u64(&lk.owner_start, _START)
                        eng_store_release_u64(&lk.owner_ns, _NS)
                        eng_fetch_add_relaxed_u64(&lk.takeovers, 1)
                        _repair(cur)
                        return True
                    continue
                suspect_since = eng_now_ns()
            wait_ns = _slice(deadline)
            if wait_ns == 0:
                return False
            if wait_ns > _SUSPECT_NS:
                wait_ns = _SUSPECT_NS
            with nogil:
                eng_store_seqcst_u32(&lk.waiters, 1)
                if eng_load_seqcst_u32(&lk.owner) == seen:
                    eng_futex_wait(&lk.owner, seen, wait_ns)
            PyErr_CheckSignals()

    cdef inline void _unlock(self, mpq_lock_t *lk) noexcept:
        eng_store_relaxed_u64(&lk.owner_start, 0)  # ordered before the release below
        eng_store_relaxed_u64(&lk.owner_ns, 0)
        eng_store_release_u32(&lk.owner, 0)
        eng_fence_seqcst()  # the release, then "is anyone asleep?" (Dekker with the waiter)
        _wake_all(&lk.waiters, &lk.owner, False)

    cdef inline void _unlock_ring(self, mpq_lock_t *lk, mpq_bell_t *b) noexcept:
        """Unlock after a commit and ring the other side's bell: one fence
        orders the commit and the release before both "is anyone asleep?"."""
        eng_store_relaxed_u64(&lk.owner_start, 0)
        eng_store_relaxed_u64(&lk.owner_ns, 0)
        eng_store_release_u32(&lk.owner, 0)
        eng_fence_seqcst()
        _wake_all(&lk.waiters, &lk.owner, False)
        _wake_all(&b.waiters, &b.seq, True)

    # ---- doorbells -------------------------------------------------------

    cdef inline bint _has_data(self) noexcept nogil:
        return eng_load_acquire_u64(&self._h.prod.pos) != eng_load_acquire_u64(&self._h.cons.pos)

    cdef inline bint _has_room(self, uint64_t need, uint64_t n) noexcept nogil:
        """Room for n messages taking `need` record bytes at the current tail."""
        cdef mpq_header_t *h = self._h
        cdef uint64_t tail = eng_load_acquire_u64(&h.prod.pos)
        cdef uint64_t head = eng_load_acquire_u64(&h.cons.pos)
        cdef uint64_t idx = tail & self._mask
        if self._maxsize != 0:
            if eng_load_acquire_u64(&h.prod.count) - eng_load_acquire_u64(&h.cons.count) + n > self._maxsize:
                return False
        if idx + need > self._cap:
            need += self._cap - idx
        return self._cap - (tail - head) >= need

    cdef int _sleep(self, mpq_bell_t *b, int which, uint64_t need, uint64_t n, int64_t deadline) except -1:
        """Sleep one slice on a doorbell unless the condition already holds
        (which: 0 data, 1 room for need/n).  Returns 0; the caller re-checks."""
        cdef int64_t wait_ns = _slice(deadline)
        cdef uint32_t seq
        cdef bint ready
        cdef int i
        if wait_ns == 0:
            return 0
        with nogil:
            for i in range(_SPIN):
                eng_cpu_relax()
                ready = self._has_data() if which == 0 else self._has_room(need, n)
                if ready:
                    break
            # then give the CPU away a few times before a futex sleep: on a
            # machine with fewer free cores than busy processes the other side
            # runs sooner, and a sleeping waiter costs the waker a syscall
            if not ready:
                for i in range(_YIELDS):
                    sched_yield()
                    ready = self._has_data() if which == 0 else self._has_room(need, n)
                    if ready:
                        break
            if not ready:
                seq = eng_load_acquire_u32(&b.seq)
                eng_store_seqcst_u32(&b.waiters, 1)
                ready = self._has_data() if which == 0 else self._has_room(need, n)
                if not ready:
                    eng_futex_wait(&b.seq, seq, wait_ns)
        PyErr_CheckSignals()
        return 0

    # ---- producing -------------------------------------------------------

    cdef tuple _encode(self, object obj):
        """(kind, payload, buffers, payload size) of one message."""
        cdef list bufs
        cdef Py_ssize_t size
        if type(obj) is bytes:
            return (MPQ_KIND_BYTES, obj, None, PyBytes_GET_SIZE(obj))
        if _plain(obj):
            data = _dumps(obj, 5)
            return (MPQ_KIND_PICKLE, data, None, PyBytes_GET_SIZE(data))
        bufs = []
        data = _dumps(obj, 5, buffer_callback=bufs.append)
        if not bufs:
            return (MPQ_KIND_PICKLE, data, None, PyBytes_GET_SIZE(data))
        raws = []
        size = sizeof(mpq_oob_t) + 8 * len(bufs) + _align8(PyBytes_GET_SIZE(data))
        try:
            for b in bufs:
                r = b.raw()  # a flat 'B' view; BufferError when not contiguous
                raws.append(r)
                size += _align8(len(r))
        except BufferError:
            data = _dumps(obj, 5)  # non-contiguous buffers travel in-band
            return (MPQ_KIND_PICKLE, data, None, PyBytes_GET_SIZE(data))
        return (MPQ_KIND_OOB, data, raws, size)

    cdef uint64_t _write(self, uint64_t tail, uint32_t kind, object payload, list raws,
                         uint64_t size) except 0:
        """Write one record at tail (a PAD first when it would cross the end);
        returns the tail after it.  Space was checked by the caller."""
        cdef uint64_t idx = tail & self._mask
        cdef uint64_t rec = MPQ_REC_HDR + _align8(size)
        cdef unsigned char *p
        cdef uint32_t *hdr
        if idx + rec > self._cap:
            hdr = <uint32_t *>(self._data + idx)
            hdr[0] = <uint32_t>(self._cap - idx - MPQ_REC_HDR)
            hdr[1] = MPQ_KIND_PAD
            tail += self._cap - idx
            idx = 0
        hdr = <uint32_t *>(self._data + idx)
        hdr[0] = <uint32_t>size
        hdr[1] = kind
        p = self._data + idx + MPQ_REC_HDR
        cdef char *src
        cdef Py_ssize_t n
        cdef mpq_oob_t *t
        cdef uint64_t *lens
        cdef Py_buffer vb
        cdef Py_ssize_t i
        if kind != MPQ_KIND_OOB:
            src = PyBytes_AS_STRING(payload)
            n = PyBytes_GET_SIZE(payload)
            _copy(p, src, n)
        else:
            t = <mpq_oob_t *>p
            t.nbufs = <uint32_t>len(raws)
            t._reserved = 0
            t.pickle_len = <uint64_t>PyBytes_GET_SIZE(payload)
            lens = <uint64_t *>(p + sizeof(mpq_oob_t))
            p += sizeof(mpq_oob_t) + 8 * len(raws)
            _copy(p, PyBytes_AS_STRING(payload), PyBytes_GET_SIZE(payload))
            p += _align8(PyBytes_GET_SIZE(payload))
            for i in range(len(raws)):
                PyObject_GetBuffer(raws[i], &vb, PyBUF_SIMPLE)
                try:
                    lens[i] = <uint64_t>vb.len
                    _copy(p, <char *>vb.buf, vb.len)
                    p += _align8(vb.len)
                finally:
                    PyBuffer_Release(&vb)
        return tail + rec

    cdef int _commit(self, mpq_cursor_t *cur, uint64_t pos, uint64_t n) noexcept:
        """Commit a side's cursor and count (the order the layout header gives)."""
        cdef uint64_t count = eng_load_relaxed_u64(&cur.count)
        eng_store_release_u64(&cur.prev_count, count)
        eng_store_release_u64(&cur.pend_pos, pos)
        eng_store_release_u64(&cur.pend_count, count + n)
        eng_store_release_u64(&cur.count, count + n)
        eng_store_release_u64(&cur.pos, pos)  # the commit point
        return 0

    cdef bint _put_encoded(self, list items, uint64_t need, int64_t deadline) except -1:
        """Put encoded messages as one atomic batch; False on timeout."""
        cdef mpq_header_t *h = self._h
        cdef uint64_t tail, n = len(items)
        cdef bint ok
        while True:
            if not self._lock(&h.plock, &h.prod, deadline):
                return False
            ok = False
            try:
                if self._has_room(need, n):
                    tail = eng_load_relaxed_u64(&h.prod.pos)
                    for it in items:
                        tail = self._write(tail, it[0], it[1], it[2], it[3])
                    self._commit(&h.prod, tail, n)
                    ok = True
            finally:
                if ok:
                    self._unlock_ring(&h.plock, &h.data)
                else:
                    self._unlock(&h.plock)
            if ok:
                return True
            if deadline >= 0 and eng_now_ns() >= deadline:
                return False
            self._sleep(&h.space, 1, need, n, deadline)

    def put(self, obj, block=True, timeout=None):
        """Put obj; wait for room when ``block`` (at most ``timeout`` s),
        else ``queue.Full``."""
        self._check_open()
        cdef int64_t deadline = _deadline(block, timeout)
        cdef uint32_t kind
        cdef uint64_t size
        cdef object payload
        cdef list raws = None
        if type(obj) is bytes:
            kind = MPQ_KIND_BYTES
            payload = obj
        elif _plain(obj):
            kind = MPQ_KIND_PICKLE
            payload = _dumps(obj, 5)
        else:
            it = self._encode(obj)
            kind = it[0]
            payload = it[1]
            raws = it[2]
            size = it[3]
        if kind != MPQ_KIND_OOB:
            size = <uint64_t>PyBytes_GET_SIZE(payload)
        if size > self._max_msg:
            raise ValueError(f"message of {size} bytes is larger than this queue takes "
                             f"({self._max_msg}: half its capacity); create it with a larger capacity=")
        if not self._put1(kind, payload, raws, size, deadline):
            raise Full
        return None

    cdef bint _put1(self, uint32_t kind, object payload, list raws, uint64_t size,
                    int64_t deadline) except -1:
        """Put one encoded message; False on timeout."""
        cdef mpq_header_t *h = self._h
        cdef uint64_t need = MPQ_REC_HDR + _align8(size)
        cdef uint64_t tail
        cdef bint ok
        while True:
            if not self._lock(&h.plock, &h.prod, deadline):
                return False
            ok = False
            try:
                if self._has_room(need, 1):
                    tail = self._write(eng_load_relaxed_u64(&h.prod.pos), kind, payload, raws, size)
                    self._commit(&h.prod, tail, 1)
                    ok = True
            finally:
                if ok:
                    self._unlock_ring(&h.plock, &h.data)
                else:
                    self._unlock(&h.plock)
            if ok:
                return True
            if deadline >= 0 and eng_now_ns() >= deadline:
                return False
            self._sleep(&h.space, 1, need, 1, deadline)

    def _record_bytes(self, obj):
        """Record bytes obj would take (what ``_wait_writable`` waits for)."""
        it = self._encode(obj)
        return MPQ_REC_HDR + _align8(<uint64_t>it[3])

    def put_nowait(self, obj):
        """``put(obj, False)``."""
        return self.put(obj, False)

    def put_many(self, objs, block=True, timeout=None):
        """Put every object of ``objs``, in order, as one atomic batch: all of
        them or (``queue.Full`` after ``timeout``) none.  The batch must fit
        in half the capacity (and ``maxsize``); ``ValueError`` if it cannot."""
        self._check_open()
        cdef int64_t deadline = _deadline(block, timeout)
        cdef list items = [self._encode(o) for o in objs]
        cdef uint64_t need = 0
        cdef uint64_t size
        if not items:
            return None
        for it in items:
            size = it[3]
            if size > self._max_msg:
                raise ValueError(f"message of {size} bytes is larger than this queue takes "
                                 f"({self._max_msg}: half its capacity); create it with a larger capacity=")
            need += MPQ_REC_HDR + _align8(size)
        if need > self._cap // 2:
            raise ValueError(f"a batch of {need} bytes is larger than half this queue's capacity "
                             f"({self._cap}); split it or create the queue with a larger capacity=")
        if self._maxsize and <uint64_t>len(items) > self._maxsize:
            raise ValueError(f"a batch of {len(items)} messages can never fit maxsize={self._maxsize}")
        if not self._put_encoded(items, need, deadline):
            raise Full
        return None

    # ---- consuming -------------------------------------------------------

    cdef uint64_t _take(self, uint64_t head, uint64_t tail, list out) except 0:
        """Copy the record at head onto out as kind, object (two items: no
        tuple is made while the lock is held, since allocating a GC-tracked
        object may run a collection, and a finalizer that used this queue
        would wait for the lock its own thread holds); returns the head after it."""
        head = self._take1(head, tail)
        out.append(self._last_kind)  # 1..3: cached small ints, no allocation
        out.append(self._last)
        self._last = None
        return head

    cdef uint64_t _take1(self, uint64_t head, uint64_t tail) except 0:
        """Copy the record at head into _last (_last_kind its kind); returns
        the head after it.  Validates everything read from shared memory."""
        cdef uint64_t idx = head & self._mask
        cdef uint32_t *hdr = <uint32_t *>(self._data + idx)
        cdef uint32_t n = hdr[0]
        cdef uint32_t kind = hdr[1]
        if kind == MPQ_KIND_PAD:
            if <uint64_t>n != self._cap - idx - MPQ_REC_HDR or head + self._cap - idx > tail:
                raise self._corrupt(f"bad padding record at {head}")
            head += self._cap - idx
            if head == tail:
                raise self._corrupt(f"padding record without a record after it at {head}")
            idx = 0
            hdr = <uint32_t *>self._data
            n = hdr[0]
            kind = hdr[1]
        cdef uint64_t rec = MPQ_REC_HDR + _align8(n)
        if kind == MPQ_KIND_PAD or kind > MPQ_KIND_MAX or n > self._max_msg or head + rec > tail \
                or idx + rec > self._cap:
            raise self._corrupt(f"bad record (kind {kind}, length {n}) at {head}")
        cdef char *src = <char *>(self._data + idx + MPQ_REC_HDR)
        cdef object obj
        if kind == MPQ_KIND_OOB:
            obj = PyByteArray_FromStringAndSize(NULL, n)
            _copy(<unsigned char *>PyByteArray_AS_STRING(obj), src, n)
        else:
            obj = PyBytes_FromStringAndSize(NULL, n)
            _copy(<unsigned char *>PyBytes_AS_STRING(obj), src, n)
        self._last_kind = kind
        self._last = obj
        return head + rec

    cdef list _get_raw(self, Py_ssize_t most, int64_t deadline):
        """Up to `most` raw messages (at least one) as a flat list of kind,
        raw, kind, raw, ...; None on timeout."""
        cdef mpq_header_t *h = self._h
        cdef uint64_t head, tail, start
        cdef list out = []
        cdef Py_ssize_t i
        while True:
            if not self._lock(&h.clock, &h.cons, deadline):
                return None
            try:
                start = head = eng_load_relaxed_u64(&h.cons.pos)
                tail = eng_load_acquire_u64(&h.prod.pos)
                i = 0
                while head != tail and i < most:
                    head = self._take(head, tail, out)
                    i += 1
                if i:
                    self._commit(&h.cons, head, <uint64_t>i)
            finally:
                if i:
                    self._unlock_ring(&h.clock, &h.space)
                else:
                    self._unlock(&h.clock)
            if out:
                return out
            if deadline >= 0 and eng_now_ns() >= deadline:
                return None
            self._sleep(&h.data, 0, 0, 0, deadline)

    cdef object _decode(self, uint32_t kind, object raw):
        cdef mpq_oob_t *t
        cdef uint64_t *lens
        cdef uint64_t n, off, pk, nb, i, ln
        if kind == MPQ_KIND_BYTES:
            return raw
        if kind == MPQ_KIND_PICKLE:
            return _loads(raw)
        n = len(raw)
        t = <mpq_oob_t *>PyByteArray_AS_STRING(raw)
        if n < sizeof(mpq_oob_t):
            raise self._corrupt("out-of-band record shorter than its table")
        nb = t.nbufs
        pk = t.pickle_len
        off = sizeof(mpq_oob_t) + 8 * nb
        if nb > n // 8 or off > n or pk > n - off:
            raise self._corrupt("out-of-band record table out of bounds")
        lens = <uint64_t *>(PyByteArray_AS_STRING(raw) + sizeof(mpq_oob_t))
        mv = memoryview(raw)
        data = mv[off:off + pk]
        off += _align8(pk)
        bufs = []
        for i in range(nb):
            ln = lens[i]
            if off > n or ln > n - off:
                raise self._corrupt("out-of-band buffer out of bounds")
            bufs.append(mv[off:off + ln])
            off += _align8(ln)
        return _loads(data, buffers=bufs)

    def get(self, block=True, timeout=None):
        """Remove and return a message; wait for one when ``block`` (at most
        ``timeout`` s), else ``queue.Empty``."""
        self._check_open()
        cdef int64_t deadline = _deadline(block, timeout)
        cdef mpq_header_t *h = self._h
        cdef uint64_t head, tail
        cdef object raw = None
        while True:
            if not self._lock(&h.clock, &h.cons, deadline):
                raise Empty
            try:
                head = eng_load_relaxed_u64(&h.cons.pos)
                tail = eng_load_acquire_u64(&h.prod.pos)
                if head != tail:
                    head = self._take1(head, tail)
                    raw = self._last
                    self._last = None
                    self._commit(&h.cons, head, 1)
            finally:
                if raw is not None:
                    self._unlock_ring(&h.clock, &h.space)
                else:
                    self._unlock(&h.clock)
            if raw is not None:
                return self._decode(self._last_kind, raw)
            if deadline >= 0 and eng_now_ns() >= deadline:
                raise Empty
            self._sleep(&h.data, 0, 0, 0, deadline)

    def get_nowait(self):
        """``get(False)``."""
        return self.get(False)

    def get_many(self, block=True, timeout=None, max_messages_to_get=1_000_000_000):
        """Remove and return up to ``max_messages_to_get`` messages (a list,
        in queue order), waiting for the first one like ``get``."""
        self._check_open()
        if max_messages_to_get < 1:
            raise ValueError(f"max_messages_to_get must be >= 1, got {max_messages_to_get}")
        cdef list got = self._get_raw(max_messages_to_get, _deadline(block, timeout))
        cdef Py_ssize_t i
        if got is None:
            raise Empty
        return [self._decode(got[i], got[i + 1]) for i in range(0, len(got), 2)]

    # ---- state -----------------------------------------------------------

    def qsize(self):
        """Messages in the queue (exact once producers and consumers are quiet)."""
        self._check_attached()
        cdef uint64_t got = eng_load_acquire_u64(&self._h.cons.count)
        cdef uint64_t put = eng_load_acquire_u64(&self._h.prod.count)
        return <int64_t>(put - got) if put > got else 0

    def empty(self):
        """True when no message is ready to get."""
        self._check_attached()
        return not self._has_data()

    def full(self):
        """True when ``maxsize`` messages are queued (never for maxsize 0)."""
        self._check_attached()
        return self._maxsize != 0 and self.qsize() >= self._maxsize

    cdef int _check_attached(self) except -1:
        if not self._has_buf:
            raise ValueError(f"Queue {self!r} is not attached to a region")
        return 0

    def _wait_readable(self, double timeout):
        """Sleep until a message may be ready (or ``timeout`` s); takes nothing."""
        self._check_attached()
        cdef int64_t deadline = eng_now_ns() + <int64_t>(timeout * 1e9)
        while not self._has_data() and eng_now_ns() < deadline:
            self._sleep(&self._h.data, 0, 0, 0, deadline)
        return self._has_data()

    def _wait_writable(self, double timeout, uint64_t need=MPQ_REC_HDR + 8):
        """Sleep until there may be room for one message of ``need`` record
        bytes (or ``timeout`` s); puts nothing."""
        self._check_attached()
        cdef int64_t deadline = eng_now_ns() + <int64_t>(timeout * 1e9)
        while not self._has_room(need, 1) and eng_now_ns() < deadline:
            self._sleep(&self._h.space, 1, need, 1, deadline)
        return self._has_room(need, 1)

    # ---- JoinableQueue accounting ----------------------------------------

    def _task_done(self):
        """One more task finished; ValueError when none is unfinished."""
        self._check_attached()
        cdef mpq_tasks_t *t = &self._h.tasks
        cdef uint64_t done = eng_load_acquire_u64(&t.done)
        cdef uint64_t put
        while True:
            put = eng_load_acquire_u64(&self._h.prod.count)
            if done >= put:
                raise ValueError("task_done() called too many times")
            if eng_cas_u64(&t.done, &done, done + 1):
                break
        if done + 1 >= put:
            eng_fence_seqcst()
            _wake_all(&t.waiters, &t.seq, True)
        return None

    def _unfinished(self):
        """Messages put and not yet marked done."""
        self._check_attached()
        cdef uint64_t put = eng_load_acquire_u64(&self._h.prod.count)
        cdef uint64_t done = eng_load_acquire_u64(&self._h.tasks.done)
        return <int64_t>(put - done) if put > done else 0

    def _join(self, timeout=None):
        """Wait until every message put was marked done; False on timeout."""
        self._check_attached()
        cdef mpq_tasks_t *t = &self._h.tasks
        cdef int64_t deadline = _deadline(True, timeout)
        cdef int64_t wait_ns
        cdef uint32_t seq
        cdef bint done
        while True:
            if eng_load_acquire_u64(&t.done) >= eng_load_acquire_u64(&self._h.prod.count):
                return True
            wait_ns = _slice(deadline)
            if wait_ns == 0:
                return False
            with nogil:
                seq = eng_load_acquire_u32(&t.seq)
                eng_store_seqcst_u32(&t.waiters, 1)
                done = eng_load_seqcst_u64(&t.done) >= eng_load_seqcst_u64(&self._h.prod.count)
                if not done:
                    eng_futex_wait(&t.seq, seq, wait_ns)
            PyErr_CheckSignals()

    def _stats(self):
        """Counters of the shared region (a dict)."""
        self._check_attached()
        cdef mpq_header_t *h = self._h
        return {
            "capacity": h.meta.capacity,
            "maxsize": h.meta.maxsize,
            "flavour": FLAVOURS[h.meta.flavour],
            "used_bytes": eng_load_acquire_u64(&h.prod.pos) - eng_load_acquire_u64(&h.cons.pos),
            "put": eng_load_acquire_u64(&h.prod.count),
            "got": eng_load_acquire_u64(&h.cons.count),
            "tasks_done": eng_load_acquire_u64(&h.tasks.done),
            "producer_lock_takeovers": eng_load_relaxed_u64(&h.plock.takeovers),
            "consumer_lock_takeovers": eng_load_relaxed_u64(&h.clock.takeovers),
        }


cdef inline void _wake_all(uint32_t *flag, uint32_t *word, bint bump) noexcept nogil:
    """Wake every sleeper on word if the sleepers' flag is set (the caller
    fenced after its store).  Sleepers set the flag; the waker clears it and
    wakes them all, so a sleeper killed in its sleep costs at most one
    needless wake (a count of sleepers would stay raised for ever).  bump:
    word is a doorbell sequence, moved so a sleeper about to sleep on the old
    value returns at once.  (A lock word is not bumped: a thread that sets
    the flag just before it is cleared and sleeps on the next holder's pid
    sleeps one slice at most, _SUSPECT_NS.)"""
    if eng_load_relaxed_u32(flag) == 0:
        return
    eng_store_release_u32(flag, 0)
    if bump:
        eng_fetch_add_u32(word, 1)
    eng_futex_wake(word, INT32_MAX)


cdef inline bint _plain(object obj):
    """True for objects that pickle without out-of-band buffers for sure:
    scalars, and tuples/lists of up to 16 scalars (the common small message;
    pickling it needs no buffer callback)."""
    cdef type t = type(obj)
    if t is int or t is str or t is float or t is bool or obj is None:
        return True
    if (t is tuple or t is list) and len(obj) <= 16:
        for x in obj:
            t = type(x)
            if not (t is int or t is str or t is float or t is bool or t is bytes or x is None):
                return False
        return True
    return False


cdef inline void _copy(unsigned char *dst, const char *src, Py_ssize_t n) noexcept:
    if n >= _NOGIL_COPY:
        with nogil:
            memcpy(dst, src, n)
    else:
        memcpy(dst, src, n)


cdef void _repair(mpq_cursor_t *cur) noexcept:
    """Complete or roll back the commit a dead lock holder left half done
    (the journal order is in mpq_layout.h): pos == pend_pos means the commit
    point was reached or the holder died before announcing one (then
    pend_count is the committed count either way), otherwise nothing was
    committed and count goes back to prev_count."""
    cdef uint64_t pos = eng_load_acquire_u64(&cur.pos)
    if pos == eng_load_acquire_u64(&cur.pend_pos):
        eng_store_release_u64(&cur.count, eng_load_acquire_u64(&cur.pend_count))
    else:
        eng_store_release_u64(&cur.count, eng_load_acquire_u64(&cur.prev_count))
    eng_store_release_u64(&cur.pend_pos, pos)
    eng_store_release_u64(&cur.pend_count, eng_load_acquire_u64(&cur.count))
