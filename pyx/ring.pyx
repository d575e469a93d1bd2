# cython: freethreading_compatible=False
"""engine._ring -- a lock-free ring of variable-length byte messages.

One producer, one or more consumers, in private memory (threads of one
process) or in a named region under /dev/shm (any process of the same user).
The byte layout is ``pyx/ring_layout.h``; this module is the protocol.

Protocol in one paragraph
-------------------------
The producer appends records at ``head`` (a byte position that only grows)
and publishes it with a release store after the record bytes.  It may write up
to ``gate + capacity`` where ``gate`` is the lowest position some consumer
still needs; it caches ``gate`` and rescans the consumer table only when the
cached value says the ring is full (rigtorp SPSCQueue).  Consumers cache
``head`` likewise.  ``spsc`` / ``broadcast``: every consumer slot holds its
own read cursor.  ``shared``: consumers CAS a shared ``claim`` cursor forward
and announce the position they are about to claim in their slot first
(hazard-pointer style), so the producer never overwrites a record that a
consumer is still copying.  Sleeping uses a futex word per direction and a
sleeper flag: the waker pays a syscall only when someone may be asleep.

Lifecycle and failure semantics (what a user can rely on)
---------------------------------------------------------
* ``Producer.close()`` ends the stream: consumers drain, then ``Closed``.
  A producer process that dies without closing also ends it: a consumer
  that waits notices within ~0.1 s and drains, then gets ``Closed``.  The
  producer role of a dead process may be taken over by ``producer()``.
* Messages put while no consumer is registered are kept (up to capacity);
  a consumer that joins an spsc/broadcast ring starts at the retention
  floor: where the last consumer that left stopped, so an spsc ring behaves
  as a queue across consumer restarts.
* Dead consumers (pid gone or a zombie) are released by a producer blocked
  on them within ~0.1 s (and by ``consumer()`` when no slot is free).
  broadcast: the producer goes on gated by the others.  spsc: what the dead
  consumer had not read stays for its replacement.  shared: the message(s)
  it had claimed but not finished copying are counted in
  ``stats()["lost"]``: shared mode is at-most-once across a consumer crash
  (use the Log for at-least-once).  A pid the kernel handed to a new
  process is told from the dead holder by its start time.
* Every length and cursor read from shared memory is checked before use; a
  violation raises ``IncompatibleRegion("corrupt ring: ...")``.
* ``fork()``: a Producer or Consumer inherited by a child is inert there.
  Using it raises ``EngineError`` (attach anew in the child); closing,
  dropping it or the child's exit touch nothing shared, so the parent keeps
  its producer role and consumer slots.  The Ring handle itself is a mapping
  and stays usable: ``ring.consumer()`` in the child registers a new slot.
* Pid namespaces: each holder records its pid namespace beside its pid.  A
  holder in another namespace (a container sharing /dev/shm but not pids)
  is never taken for dead: its slot or role is freed by its own close(), by
  a process in its namespace, or with the region.  A consumer killed in
  another container therefore gates a broadcast/spsc producer until someone
  in that container (or ``Ring.unlink`` and a new ring) clears it.
* A producer whose stream was ended under it (a consumer took it for dead)
  gets ``Closed`` from ``put``: nothing is put into a stream that consumers
  have stopped reading.
* A handle is for one thread at a time (the ring itself is for many threads
  and processes: one producer handle, one handle per consumer).
"""

cimport cython
from cpython.buffer cimport (
    PyBUF_C_CONTIGUOUS,
    PyBUF_FORMAT,
    PyBUF_WRITABLE,
    PyBuffer_Release,
    PyObject_GetBuffer,
)
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.exc cimport PyErr_CheckSignals
from cpython.list cimport PyList_Append, PyList_New
from cpython.ref cimport PyObject
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t, INT32_MAX, UINT64_MAX
from libc.string cimport memcpy

from eng_atomic cimport *

cdef extern from "<sched.h>" nogil:
    int sched_yield()  # see _SPIN_CHECK

# The batch paths walk a list/tuple with borrowed references and build their
# result lists from raw new references: no reference-count traffic on the
# caller's messages (a forked child's inherited list would copy-on-write
# every page it increfs) and no temporaries per message.
cdef extern from "Python.h":
    PyObject **_seq_items "PySequence_Fast_ITEMS"(object o)
    Py_ssize_t _seq_len "PySequence_Fast_GET_SIZE"(object o)
    bint _is_bytes "PyBytes_CheckExact"(PyObject *o)
    char *_bytes_ptr "PyBytes_AS_STRING"(PyObject *o)
    Py_ssize_t _bytes_len "PyBytes_GET_SIZE"(PyObject *o)
    PyObject *_new_bytes "PyBytes_FromStringAndSize"(const char *v, Py_ssize_t n)
    void _list_fill "PyList_SET_ITEM"(object lst, Py_ssize_t i, PyObject *item)
    void _set_size "Py_SET_SIZE"(object o, Py_ssize_t n)
    void Py_DECREF_raw "Py_DECREF"(PyObject *o)
    PyObject *PyErr_Occurred_raw "PyErr_Occurred"()
    void PyErr_Clear_raw "PyErr_Clear"()

# The C calling convention of the per-message entries (see ring_entry.h).
cdef extern from "ring_entry.h":
    ctypedef struct PyMethodDef:
        const char *ml_name
        void *ml_meth
        int ml_flags
        const char *ml_doc
    int METH_FASTCALL
    int METH_KEYWORDS
    int ring_install_method(object tp, PyMethodDef *meth) except -1
    int ring_parse_args(const char *fname, const char **names, Py_ssize_t n, Py_ssize_t nreq,
                        PyObject **args, Py_ssize_t nargs, PyObject *kwnames,
                        PyObject **out) except -1

import logging as _logging
import mmap as _mmap
import os as _os
import time as _time
import weakref as _weakref

from engine._shm import SHM_DIR, region_path
from engine.errors import Closed, EngineError, IncompatibleRegion, Timeout

include "reserve.pxi"
include "liveness.pxi"

_logger = _logging.getLogger("engine")

# Every live Producer / Consumer of this process.  In a forked child they
# are all disowned at once (after_in_child below): the hot path then keeps
# its single "is this handle open?" test and pays nothing per call for fork
# safety.
_live_handles = _weakref.WeakSet()


def _disown_inherited():
    """Run in a forked child: every handle made before the fork becomes
    inert (its role, slot and mapping stay with the parent)."""
    for hnd in list(_live_handles):
        hnd._disown()


if hasattr(_os, "register_at_fork"):
    _os.register_at_fork(after_in_child=_disown_inherited)


cdef int _propagate() except -1:
    """Hand on the exception a C-API call (NULL result) has already set."""
    return -1


cdef object _inherited(str what, int32_t owner):
    """The error for a handle used in a process forked after it was made."""
    return EngineError(
        f"this ring {what} was made by process {owner} and inherited across fork(): it is inert "
        f"here (its role stays with process {owner}); attach anew in this process, e.g. "
        f"Ring.attach(name).{what}()")

cdef extern from "ring_layout.h" nogil:
    uint64_t RING_MAGIC
    uint32_t RING_LAYOUT_VERSION
    uint32_t RING_REC_HDR
    uint32_t RING_FLAG_PAD
    uint64_t RING_IDLE
    uint64_t RING_MIN_CAPACITY
    uint64_t RING_MAX_CAPACITY
    uint32_t RING_MAX_CONSUMERS
    uint32_t RING_MODE_SPSC
    uint32_t RING_MODE_BROADCAST
    uint32_t RING_MODE_SHARED
    uint32_t RING_SLOT_FREE
    uint32_t RING_SLOT_ACTIVE

    ctypedef struct ring_meta_t:
        uint64_t magic            # RING_MAGIC
        uint32_t version          # RING_LAYOUT_VERSION
        uint32_t header_size      # bytes before the data area
        uint64_t capacity         # data bytes, a power of two
        uint32_t mode             # RING_MODE_*
        uint32_t max_consumers    # slots in the consumer table
        uint32_t flags            # reserved
        uint32_t creator_pid      # informational
        uint64_t created_ns       # informational
    ctypedef struct ring_producer_t:
        uint64_t head             # bytes published
        int32_t pid               # producer process, 0 = none
        uint32_t closed           # 1 once closed
        uint32_t data_seq         # futex word consumers sleep on
        uint32_t data_waiters     # consumers that may be asleep (each adds / subtracts 1)
        uint64_t msgs_put         # statistics
        uint64_t bytes_put        # statistics
        uint64_t waits            # producer sleeps for space
        uint64_t lost             # shared mode: lost to dead consumers
        uint64_t pid_start        # start time of pid, 0 = unknown
        uint64_t pid_ns           # pid namespace inode of pid, 0 = unknown
    ctypedef struct ring_space_t:
        uint32_t space_seq        # futex word the producer sleeps on
        uint32_t space_waiters    # producer threads that may be asleep (add / subtract 1)
        uint64_t tail             # retention floor (spsc/broadcast)
    ctypedef struct ring_claim_t:
        uint64_t claim            # shared mode claim cursor
    ctypedef struct ring_slot_t:
        uint64_t cursor           # read / claim position, RING_IDLE = gates nothing
        int32_t pid               # owner process
        uint32_t state            # RING_SLOT_*
        uint64_t msgs_got         # statistics
        uint64_t bytes_got        # statistics
        uint64_t waits            # sleeps for data
        uint64_t claim_end        # shared: end of the batch being claimed (stored before the CAS)
        uint64_t pid_start        # start time of pid, 0 = unknown
        uint64_t pid_ns           # pid namespace inode of pid, 0 = unknown
        uint32_t sleeping         # 1 while counted in prod.data_waiters
    ctypedef struct ring_header_t:
        ring_meta_t meta
        ring_producer_t prod
        ring_space_t space
        ring_claim_t claim
        ring_slot_t *slots        # flexible array member (indexed only)

    uint64_t ring_header_bytes(uint32_t n) noexcept
    uint64_t ring_rec_size(uint64_t n) noexcept


# ---- public constants ------------------------------------------------------
MAGIC = RING_MAGIC
LAYOUT_VERSION = RING_LAYOUT_VERSION
HEADER_SIZE = ring_header_bytes(1)
RECORD_HEADER = RING_REC_HDR
MIN_CAPACITY = RING_MIN_CAPACITY
MAX_CAPACITY = RING_MAX_CAPACITY
MAX_CONSUMERS = RING_MAX_CONSUMERS
MODES = ("spsc", "broadcast", "shared")

# Spin this long before sleeping: long enough that a consumer actively waiting
# sees a message within a microsecond or two (ping-pong p50) and that a batch
# consumer bridges the gap between two put_many batches without a futex
# round trip (cross-process, 1024-message batches: a 50 or 100 us budget
# slept on ~85% of the batches, 200 us on ~1%, doubling the throughput),
# and bounded, so a waiter with nothing to do sleeps with no CPU at all
# after 0.2 ms.
cdef int64_t _SPIN_NS = 200000
# A spinning waiter looks at the clock every this many relax steps, and
# yields the CPU there (sched_yield): a waiter that shares its CPU with the
# process it waits for -- more processes than cores, as in one producer and
# two consumers on two cores -- lets it run instead of spinning out its time
# slice (1->2 shared on 2 cores: ~1-2 M/s -> ~6 M/s).  With nothing else to
# run the call returns at once, so a waiter alone on its core still sees a
# message within the same microsecond (ping-pong p50 unchanged).
cdef int _SPIN_CHECK = 64
# A batch call (put_many / put_array) publishes head every this many bytes,
# not only at its end, so the consumer starts on the first part of a long
# batch while the producer writes the rest (one release store and one fence
# per 64 KiB: ~900 records of 64 bytes).
cdef uint64_t _PUBLISH_BYTES = 65536
# Slots a get_many result list is allocated with before it grows by appends.
cdef Py_ssize_t _PREALLOC_MAX = 4096
# Longest futex sleep before re-taking the GIL to check signals / deadlines.
cdef int64_t _SLICE_NS = 50000000
# How often a waiting producer looks for dead consumers, a waiting consumer
# for a dead producer.
cdef int64_t _REAP_NS = 100000000
cdef int64_t _NO_DEADLINE = -1

cdef object _np = None
cdef object _aio_mod = None  # engine.aio, imported on first async call


cdef object _aio():
    global _aio_mod
    if _aio_mod is None:
        from engine import aio
        _aio_mod = aio
    return _aio_mod


cdef inline ring_slot_t *_slot_at(ring_header_t *h, uint32_t i) noexcept nogil:
    # The slot table starts right after the fixed part (offset 512, asserted
    # in ring_layout.h); Cython cannot spell a flexible array member.
    return <ring_slot_t *>((<unsigned char *>h) + sizeof(ring_meta_t) + sizeof(ring_producer_t)
                           + sizeof(ring_space_t) + sizeof(ring_claim_t)) + i


cdef int64_t _deadline(object timeout) except? -2:
    """None -> no deadline (-1); 0 -> do not wait (0); t -> now + t."""
    if timeout is None:
        return _NO_DEADLINE
    cdef double t = timeout
    if t != t or t < 0:
        raise ValueError(f"timeout must be None or a non-negative number, not {timeout!r}")
    if t == 0:
        return 0
    if t > 1e9:  # ~31 years: as good as none, and no int64 overflow
        return _NO_DEADLINE
    return eng_now_ns() + <int64_t>(t * 1e9) + 1


cdef bint _format_has_objects(const char *fmt) noexcept:
    """True if a struct-module format string has an 'O' (PyObject *) item.
    Field names of structured types (between colons) are skipped."""
    cdef bint in_name = False
    if fmt == NULL:
        return False
    while fmt[0] != 0:
        if fmt[0] == 58:  # ':'
            in_name = not in_name
        elif fmt[0] == 79 and not in_name:  # 'O'
            return True
        fmt += 1
    return False


cdef inline int _get_buffer(object msg, Py_buffer *view) except -1:
    """Borrow a C-contiguous buffer of msg; TypeError for anything else,
    and for a buffer of Python objects (their addresses mean nothing to
    another process or after the objects are freed)."""
    try:
        PyObject_GetBuffer(msg, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT)
    except (BufferError, ValueError):
        raise TypeError(
            f"message must be a C-contiguous buffer (bytes, bytearray, memoryview, numpy), "
            f"got a non-contiguous {type(msg).__name__}") from None
    except TypeError:
        raise TypeError(
            f"message must be bytes-like (bytes, bytearray, memoryview, numpy), "
            f"not {type(msg).__name__}") from None
    if _format_has_objects(view.format):
        PyBuffer_Release(view)
        raise TypeError(
            f"message must hold plain bytes, not Python objects (a {type(msg).__name__} "
            f"of object items): serialise them first")
    return 0


def _check_name(name):
    return region_path(name)


def list_rings():
    """Every region in :data:`SHM_DIR` that starts with the ring magic, with
    what its header says: name, bytes, version, capacity, mode and
    max_consumers.  Read without mapping or attaching (nothing is
    registered, nothing validated beyond the magic): ``Ring.attach`` is what
    checks a region."""
    cdef ring_meta_t meta
    out = []
    try:
        names = sorted(_os.listdir(SHM_DIR))
    except OSError:
        return out
    for name in names:
        path = _os.path.join(SHM_DIR, name)
        try:
            with open(path, "rb") as f:
                head = f.read(sizeof(ring_meta_t))
            size = _os.stat(path).st_size
        except OSError:
            continue
        if len(head) < sizeof(ring_meta_t):
            continue
        memcpy(&meta, <const char *>head, sizeof(ring_meta_t))
        if meta.magic != RING_MAGIC:
            continue
        out.append({
            "name": name,
            "bytes": size,
            "version": meta.version,
            "capacity": meta.capacity,
            "mode": MODES[meta.mode] if meta.mode < len(MODES) else f"?{meta.mode}",
            "max_consumers": meta.max_consumers,
        })
    return out


def _mode_code(mode):
    if mode == "spsc":
        return RING_MODE_SPSC
    if mode == "broadcast":
        return RING_MODE_BROADCAST
    if mode == "shared":
        return RING_MODE_SHARED
    raise ValueError(f"mode must be one of {MODES}, not {mode!r}")


def _round_capacity(capacity):
    if isinstance(capacity, bool) or not isinstance(capacity, int):
        raise TypeError(f"capacity must be an int (bytes), not {type(capacity).__name__}")
    if capacity <= 0:
        raise ValueError(f"capacity must be positive, got {capacity}")
    if capacity > RING_MAX_CAPACITY:
        raise ValueError(f"capacity must be at most {RING_MAX_CAPACITY} bytes (1 TiB), got {capacity}")
    c = RING_MIN_CAPACITY
    while c < capacity:
        c <<= 1
    return c


def _check_consumers(mode_code, max_consumers):
    if isinstance(max_consumers, bool) or not isinstance(max_consumers, int):
        raise TypeError(f"max_consumers must be an int, not {type(max_consumers).__name__}")
    if not 1 <= max_consumers <= RING_MAX_CONSUMERS:
        raise ValueError(f"max_consumers must be in 1..{RING_MAX_CONSUMERS}, got {max_consumers}")
    if mode_code == RING_MODE_SPSC and max_consumers != 1:
        raise ValueError("mode='spsc' has exactly one consumer: use max_consumers=1, "
                         "or mode='broadcast' / 'shared' for more")


@cython.final
@cython.no_gc_clear
cdef class _Mapping:
    """The mapped region: owns the mmap object and one buffer export of it.

    While the export is held the mmap cannot be closed, and memoryviews handed
    out by ``get_view`` hold the mmap object themselves, so no view can outlive
    the memory it points into.  Ring, Producer and Consumer each reference this
    object; the mapping goes away with the last of them (and the last view).
    """
    cdef object mm              # mmap.mmap of header + data
    cdef object view            # read-only memoryview of mm (slices are get_view results)
    cdef Py_buffer buf          # our export of mm (base pointer)
    cdef bint has_buf           # buf is held
    cdef ring_header_t *h       # header at the start of the mapping
    cdef unsigned char *data    # first data byte
    cdef uint64_t cap           # capacity (power of two)
    cdef uint64_t mask          # cap - 1
    cdef uint64_t max_msg       # largest payload accepted
    cdef uint32_t mode          # RING_MODE_*
    cdef uint32_t nslots        # consumer slots
    cdef object name            # region name, None for a private ring

    def __dealloc__(self):
        if self.has_buf:
            PyBuffer_Release(&self.buf)
            self.has_buf = False

    cdef int attach_mm(self, object mm, object name) except -1:
        self.mm = mm
        self.name = name
        PyObject_GetBuffer(mm, &self.buf, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE)
        self.has_buf = True
        self.h = <ring_header_t *>self.buf.buf
        self.view = memoryview(mm).toreadonly()
        return 0

    cdef int set_geometry(self) except -1:
        cdef ring_header_t *h = self.h
        self.cap = h.meta.capacity
        self.mask = self.cap - 1
        self.max_msg = self.cap // 2 - RING_REC_HDR
        self.mode = h.meta.mode
        self.nslots = h.meta.max_consumers
        self.data = (<unsigned char *>h) + h.meta.header_size
        return 0

    cdef str label(self):
        return self.name if self.name is not None else "<private ring>"

    cdef object corrupt(self, str why):
        return IncompatibleRegion(self.label(), "corrupt ring: " + why)


# Regions up to this size are mapped with MAP_POPULATE: every page is
# allocated and in our page table before the first message, so the hot path
# never takes a page fault (Aeron's and Chronicle's "pre-touch"; in a VM a
# first-touch fault can cost tens of microseconds).  Bigger rings fault in
# lazily rather than make create/attach allocate gigabytes up front.
PREFAULT_MAX = 1 << 28
_MAP_POPULATE = getattr(_mmap, "MAP_POPULATE", 0x8000 if _os.uname().sysname == "Linux" else 0)


def _map_flags(size):
    flags = _mmap.MAP_SHARED
    if size <= PREFAULT_MAX:
        flags |= _MAP_POPULATE
    return flags


cdef _Mapping _new_region(object name, object path, uint64_t cap, uint32_t mode, uint32_t nslots):
    cdef uint64_t hsize = ring_header_bytes(nslots)
    cdef uint64_t total = hsize + cap
    cdef int fd
    if path is None:
        mm = _mmap.mmap(-1, total, flags=_map_flags(total))
    else:
        mm = _create_mapped(path, total, _map_flags(total))
    cdef _Mapping m = _Mapping.__new__(_Mapping)
    m.attach_mm(mm, name)
    cdef ring_header_t *h = m.h
    cdef uint32_t i
    h.meta.version = RING_LAYOUT_VERSION
    h.meta.header_size = <uint32_t>hsize
    h.meta.capacity = cap
    h.meta.mode = mode
    h.meta.max_consumers = nslots
    h.meta.flags = 0
    h.meta.creator_pid = <uint32_t>_os.getpid()
    h.meta.created_ns = <uint64_t>eng_wall_ns()
    for i in range(nslots):
        _slot_at(h, i).cursor = RING_IDLE
    # The magic goes last, released: an attacher that sees it sees the rest.
    eng_store_release_u64(&h.meta.magic, RING_MAGIC)
    m.set_geometry()
    return m


cdef _Mapping _attach_region(object name, object path):
    try:
        fd = _os.open(path, _os.O_RDWR)
    except FileNotFoundError:
        raise IncompatibleRegion(name, "no such region (create it with Ring.create)") from None
    except PermissionError:
        raise IncompatibleRegion(name, "permission denied (regions are private to their user)") from None
    try:
        size = _os.fstat(fd).st_size
        if size < ring_header_bytes(1) + RING_MIN_CAPACITY:
            raise IncompatibleRegion(name, f"truncated: {size} bytes is smaller than any ring")
        mm = _mmap.mmap(fd, size, flags=_map_flags(size))
    finally:
        _os.close(fd)
    cdef _Mapping m = _Mapping.__new__(_Mapping)
    m.attach_mm(mm, name)
    cdef ring_header_t *h = m.h
    cdef int tries = 0
    # A creator publishes the magic last; give a racing creator a moment.
    while eng_load_acquire_u64(&h.meta.magic) == 0 and tries < 50:
        _time.sleep(0.001)
        tries += 1
    if eng_load_acquire_u64(&h.meta.magic) != RING_MAGIC:
        raise IncompatibleRegion(name, "not a queue-engine ring (bad magic)")
    if h.meta.version != RING_LAYOUT_VERSION:
        raise IncompatibleRegion(
            name, f"layout version {h.meta.version}, this build reads {RING_LAYOUT_VERSION}")
    cdef uint32_t mode = h.meta.mode
    cdef uint32_t n = h.meta.max_consumers
    cdef uint64_t cap = h.meta.capacity
    if mode > RING_MODE_SHARED:
        raise IncompatibleRegion(name, f"unknown mode {mode}")
    if n < 1 or n > RING_MAX_CONSUMERS or (mode == RING_MODE_SPSC and n != 1):
        raise IncompatibleRegion(name, f"bad max_consumers {n} for mode {MODES[mode]}")
    if h.meta.header_size != ring_header_bytes(n):
        raise IncompatibleRegion(name, f"bad header size {h.meta.header_size}")
    if cap < RING_MIN_CAPACITY or cap > RING_MAX_CAPACITY or (cap & (cap - 1)) != 0:
        raise IncompatibleRegion(name, f"bad capacity {cap}")
    if <uint64_t>size != h.meta.header_size + cap:
        raise IncompatibleRegion(
            name, f"file is {size} bytes, header says {h.meta.header_size + cap}")
    m.set_geometry()
    # Cursors: one consistent look; run-time checks guard every later read.
    cdef uint64_t head = eng_load_acquire_u64(&h.prod.head)
    cdef uint64_t floor = eng_load_acquire_u64(&h.claim.claim) if mode == RING_MODE_SHARED \
        else eng_load_acquire_u64(&h.space.tail)
    if head & 7 or floor & 7 or floor > head or head - floor > cap:
        raise IncompatibleRegion(name, f"corrupt cursors (head {head}, floor {floor})")
    cdef uint32_t i
    for i in range(n):
        if _slot_at(h, i).state > RING_SLOT_ACTIVE:
            raise IncompatibleRegion(name, f"corrupt consumer slot {i}")
    return m


# ---- producer-side helpers (also used by stats and reaping) ---------------

cdef uint64_t _scan_slots(_Mapping m, uint64_t head, int *bad) noexcept nogil:
    """Lowest slot cursor that can still gate, RING_IDLE if none.

    A cursor below head - capacity is a stale announcement that its owner has
    not validated (a validated one always gates the producer), so it is
    skipped; above head it can only be corruption."""
    cdef uint64_t lo = RING_IDLE, c
    cdef uint32_t i
    for i in range(m.nslots):
        # seq_cst: pairs with the consumer's seq_cst cursor store and floor
        # re-load (see _compute_gate).
        c = eng_load_seqcst_u64(&_slot_at(m.h, i).cursor)
        if c == RING_IDLE:
            continue
        if c > head:
            bad[0] = 1
            continue
        if head - c > m.cap:
            continue
        if c < lo:
            lo = c
    return lo


cdef uint64_t _compute_gate(_Mapping m, uint64_t head, int *bad) noexcept nogil:
    """Lowest position any consumer may still read: the producer may write
    below gate + capacity.

    Ordering argument (both cases are Dekker-style, all seq_cst):
    shared: the producer loads ``claim`` FIRST, then every slot.  A consumer
      stores slot=c, then re-loads claim and goes on only if it is still c.
      If the producer's slot load missed that store, the producer's claim
      load came earlier in the total order than the consumer's re-load, so it
      read a claim <= c: the gate is <= c either way.
    spsc/broadcast: a joining consumer stores slot=t, then re-loads ``tail``
      and goes on only if it is still t.  The producer raises tail to the
      scanned minimum, then (after a full fence) scans again and takes the
      lower result: a joiner whose store the second scan missed re-loaded
      tail before the raise and sees the new value, so it retries."""
    cdef uint64_t g, lo, lo2, t
    if m.mode == RING_MODE_SHARED:
        g = eng_load_seqcst_u64(&m.h.claim.claim)
        if g > head or head - g > m.cap:
            bad[0] = 1
            return head
        lo = _scan_slots(m, head, bad)
        return lo if lo < g else g
    lo = _scan_slots(m, head, bad)
    t = eng_load_seqcst_u64(&m.h.space.tail)
    if t > head or head - t > m.cap:
        bad[0] = 1
        return head
    if lo == RING_IDLE:
        return t  # nobody reading: keep everything from the retention floor on
    while t < lo:
        if eng_cas_u64(&m.h.space.tail, &t, lo):
            break
    eng_fence_seqcst()
    lo2 = _scan_slots(m, head, bad)
    return lo2 if lo2 < lo else lo


cdef int _raise_tail(ring_header_t *h, uint64_t pos) noexcept nogil:
    cdef uint64_t t = eng_load_acquire_u64(&h.space.tail)
    while t < pos:
        if eng_cas_u64(&h.space.tail, &t, pos):
            return 1
    return 0


cdef uint64_t _count_records(_Mapping m, uint64_t start, uint64_t end) noexcept nogil:
    """Messages (not padding) in [start, end), reading only validated lengths.

    start and end come from shared memory: both must be 8-aligned and at
    most a capacity apart, so every record header read (8 bytes at an
    8-aligned offset below capacity) lies inside the data area.  The walk
    stops at the first record that does not fit in [pos, end)."""
    cdef uint64_t pos = start, off, n = 0, size
    cdef uint32_t ln, fl
    if start & 7 or end & 7 or end < start or end - start > m.cap:
        return 0
    while pos < end:
        off = pos & m.mask
        ln = (<uint32_t *>(m.data + off))[0]
        fl = (<uint32_t *>(m.data + off))[1]
        if fl == RING_FLAG_PAD:
            size = m.cap - off
        elif fl == 0:
            size = ring_rec_size(ln)
        else:
            break
        if off + size > m.cap or size > end - pos:
            break
        if fl == 0:
            n += 1
        pos += size
    return n


cdef int _reap_dead(_Mapping m) except -1:
    """Free the slots of consumers whose process is gone.  Returns how many.

    spsc/broadcast: the dead consumer's position becomes the retention floor,
    so what it had not read stays for the next consumer of an spsc ring and
    the producer goes on gated by the others in broadcast.  shared: whatever
    the dead consumer had claimed but not finished is counted as lost
    (at-most-once across a consumer crash)."""
    cdef ring_header_t *h = m.h
    cdef ring_slot_t *s
    cdef uint32_t i, st
    cdef int32_t pid
    cdef uint64_t cur, cl, end, head, n
    cdef int reaped = 0
    for i in range(m.nslots):
        s = _slot_at(h, i)
        if eng_load_acquire_u32(&s.state) != RING_SLOT_ACTIVE:
            continue
        pid = eng_load_acquire_i32(&s.pid)
        if pid <= 0 or _alive(pid, eng_load_acquire_u64(&s.pid_start),
                              eng_load_acquire_u64(&s.pid_ns)):
            continue
        # One reaper wins: the pid CAS hands the slot over exactly once.
        if not eng_cas_i32(&s.pid, &pid, -1):
            continue
        cur = eng_load_seqcst_u64(&s.cursor)
        head = eng_load_acquire_u64(&h.prod.head)
        # Every value below comes from shared memory: an unaligned or
        # out-of-range cursor is ignored (the slot is freed all the same).
        if cur != RING_IDLE and (cur & 7) == 0 and cur <= head and head - cur <= m.cap:
            if m.mode == RING_MODE_SHARED:
                # Lost: only a batch the dead consumer may have claimed,
                # [cursor, claim_end) with claim_end stored before its claim
                # CAS and the claim cursor past it.  A position it had only
                # announced (claim_end 0 or stale, <= cursor) was lost by
                # nobody: a competitor claimed it, or it is still unclaimed.
                cl = eng_load_seqcst_u64(&h.claim.claim)
                end = eng_load_acquire_u64(&s.claim_end)
                if cur < end and end <= cl and cl <= head:
                    n = _count_records(m, cur, end)
                    eng_fetch_add_relaxed_u64(&h.prod.lost, n if n > 0 else 1)
            else:
                _raise_tail(h, cur)
        # A consumer killed while asleep is still counted among the waiters.
        if eng_exchange_u32(&s.sleeping, 0):
            eng_fetch_sub_seqcst_u32(&h.prod.data_waiters, 1)
        eng_store_release_u64(&s.claim_end, 0)
        eng_store_release_u64(&s.cursor, RING_IDLE)
        eng_store_release_i32(&s.pid, 0)
        eng_store_release_u32(&s.state, RING_SLOT_FREE)
        reaped += 1
        _logger.warning("ring %s: released consumer slot %d of dead process %d", m.label(), i, pid)
    if reaped:
        eng_fetch_add_u32(&h.space.space_seq, 1)
        eng_futex_wake(&h.space.space_seq, INT32_MAX)
    return reaped


cdef inline void _wake_sleepers(uint32_t *waiters, uint32_t *seq) noexcept nogil:
    # Called after publishing a cursor (release).  The full fence orders that
    # store before the waiter-count load (StoreLoad): a waiter that counted
    # itself (then fenced) before re-checking its condition either sees our
    # cursor or is seen here.  The waker never writes the count: each waiter
    # adds itself and takes itself out, so a wake-up cannot erase the
    # registration of a waiter that just went back to sleep (a competitor
    # took the message, or another consumer still gates the producer).
    eng_fence_seqcst()
    if eng_load_relaxed_u32(waiters):  # ordered by the fence above
        eng_fetch_add_u32(seq, 1)
        eng_futex_wake(seq, INT32_MAX)


cdef inline void _wake_producer(ring_header_t *h) noexcept nogil:
    # After a consumer advanced its cursor.
    _wake_sleepers(&h.space.space_waiters, &h.space.space_seq)


cdef inline void _wake_consumers(ring_header_t *h) noexcept nogil:
    # After the producer published head.
    _wake_sleepers(&h.prod.data_waiters, &h.prod.data_seq)


cdef class Ring:
    """A bounded ring of variable-length byte messages.

    ``Ring(capacity, mode, max_consumers)`` makes a private ring (threads of
    this process); ``Ring.create(name, ...)`` a named one under /dev/shm
    (mode 0600) that ``Ring.attach(name)`` opens from any process of the same
    user.  ``capacity`` is in bytes, rounded up to a power of two (at least
    4 KiB); the largest message is ``capacity // 2 - 8`` bytes.

    ``mode``: ``"spsc"`` (one consumer), ``"broadcast"`` (every consumer gets
    every message, the producer waits for the slowest) or ``"shared"`` (each
    message goes to exactly one of the competing consumers).

    >>> ring = Ring(1 << 16)
    >>> with ring.producer() as p, ring.consumer() as c:
    ...     p.put(b"hello")
    ...     c.get()
    b'hello'
    """
    cdef _Mapping _m            # the mapping (None after close)
    cdef object _handles        # WeakSet of the Producer/Consumer handles made here
    cdef object _name_          # region name or None
    cdef object __weakref__

    def __init__(self, capacity=1 << 20, mode="spsc", max_consumers=1):
        code = _mode_code(mode)
        _check_consumers(code, max_consumers)
        cap = _round_capacity(capacity)
        self._m = _new_region(None, None, cap, code, max_consumers)
        self._handles = _weakref.WeakSet()

    @classmethod
    def create(cls, name, capacity=1 << 20, mode="spsc", max_consumers=1, *, exist_ok=False):
        """Create the named region ``/dev/shm/NAME`` (mode 0600).

        ``FileExistsError`` if it exists, unless ``exist_ok`` (then attach)."""
        path = _check_name(name)
        code = _mode_code(mode)
        _check_consumers(code, max_consumers)
        cap = _round_capacity(capacity)
        cdef Ring r = cls.__new__(cls)
        try:
            r._m = _new_region(name, path, cap, code, max_consumers)
        except FileExistsError:
            if not exist_ok:
                raise FileExistsError(
                    f"ring {name!r} already exists: attach to it with Ring.attach, "
                    f"or remove it with Ring.unlink / 'queue-engine ring unlink'") from None
            return cls.attach(name)
        r._name_ = name
        r._handles = _weakref.WeakSet()
        return r

    @classmethod
    def attach(cls, name):
        """Open an existing named ring; ``IncompatibleRegion`` if it is
        missing, foreign, truncated or corrupt."""
        path = _check_name(name)
        cdef Ring r = cls.__new__(cls)
        r._m = _attach_region(name, path)
        r._name_ = name
        r._handles = _weakref.WeakSet()
        return r

    @staticmethod
    def unlink(name, missing_ok=False):
        """Remove the named region.  Processes that have it mapped keep
        working on their mapping; new attaches fail.  Refuses (with
        ``IncompatibleRegion``) to remove a file that is not a ring."""
        path = _check_name(name)
        try:
            with open(path, "rb") as f:
                magic = f.read(8)
        except FileNotFoundError:
            if missing_ok:
                return
            raise FileNotFoundError(f"no ring named {name!r} in {SHM_DIR}") from None
        if len(magic) == 8 and int.from_bytes(magic, "little") != RING_MAGIC:
            raise IncompatibleRegion(name, "not a queue-engine ring; refusing to unlink it")
        try:
            _os.unlink(path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    cdef _Mapping _live(self):
        if self._m is None:
            raise Closed("this Ring handle is closed")
        return self._m

    @property
    def name(self):
        """The region name (None for a private ring)."""
        return self._name_

    @property
    def capacity(self):
        """Data bytes (a power of two)."""
        return self._live().cap

    @property
    def mode(self):
        """``"spsc"``, ``"broadcast"`` or ``"shared"``."""
        return MODES[self._live().mode]

    @property
    def max_consumers(self):
        """Slots in the consumer table."""
        return self._live().nslots

    @property
    def max_message(self):
        """The largest message in bytes (capacity // 2 - 8)."""
        return self._live().max_msg

    @property
    def closed(self):
        """True once this handle is closed."""
        return self._m is None

    def producer(self):
        """The producer handle (one live producer per ring: a second is
        ``EngineError`` until the first closes or its process dies)."""
        p = Producer._make(self, self._live())
        self._handles.add(p)
        return p

    def consumer(self):
        """Register a consumer in a free slot (``EngineError`` when all are
        taken; slots of dead processes are freed first)."""
        c = Consumer._make(self, self._live())
        self._handles.add(c)
        return c

    def stats(self):
        """A snapshot: capacity, used bytes, messages put/got, per-consumer
        lag, waits, lost (shared mode), mode, name."""
        cdef _Mapping m = self._live()
        cdef ring_header_t *h = m.h
        cdef int bad = 0
        cdef uint64_t head = eng_load_acquire_u64(&h.prod.head)
        cdef uint64_t lo = _scan_slots(m, head, &bad)
        cdef uint64_t floor = 0
        if m.mode == RING_MODE_SHARED:
            floor = eng_load_acquire_u64(&h.claim.claim)
            if lo > floor:
                lo = floor
        elif lo == RING_IDLE:
            lo = eng_load_acquire_u64(&h.space.tail)
        used = head - lo if lo <= head and head - lo <= m.cap else None
        consumers = []
        cdef uint32_t i
        cdef ring_slot_t *s
        for i in range(m.nslots):
            s = _slot_at(h, i)
            if eng_load_acquire_u32(&s.state) != RING_SLOT_ACTIVE:
                continue
            pid = eng_load_acquire_i32(&s.pid)
            cur = eng_load_acquire_u64(&s.cursor)
            if m.mode == RING_MODE_SHARED:
                lag = head - floor if floor <= head else None
            else:
                lag = head - cur if cur != RING_IDLE and cur <= head else None
            consumers.append({
                "slot": i,
                "pid": pid,
                "alive": _alive(pid, eng_load_acquire_u64(&s.pid_start),
                                eng_load_acquire_u64(&s.pid_ns)),
                "cursor": None if cur == RING_IDLE else cur,
                "lag_bytes": lag,
                "messages_got": eng_load_relaxed_u64(&s.msgs_got),
                "bytes_got": eng_load_relaxed_u64(&s.bytes_got),
                "waits": eng_load_relaxed_u64(&s.waits),
            })
        put = eng_load_relaxed_u64(&h.prod.msgs_put)
        got = sum(c["messages_got"] for c in consumers)
        return {
            "name": self._name_,
            "mode": MODES[m.mode],
            "capacity": m.cap,
            "max_message": m.max_msg,
            "max_consumers": m.nslots,
            "head": head,
            "used_bytes": used,
            "messages_put": put,
            "bytes_put": eng_load_relaxed_u64(&h.prod.bytes_put),
            "messages_got": got,
            "producer_pid": eng_load_acquire_i32(&h.prod.pid),
            "producer_waits": eng_load_relaxed_u64(&h.prod.waits),
            "consumer_waits": sum(c["waits"] for c in consumers),
            "closed": bool(eng_load_acquire_u32(&h.prod.closed)),
            "lost": eng_load_relaxed_u64(&h.prod.lost),
            "consumers": consumers,
        }

    def close(self):
        """Close every producer/consumer handle made from this Ring (a
        producer's close ends the stream) and drop this process's reference
        to the mapping.  Views returned by ``get_view`` stay readable."""
        if self._m is None:
            return
        for hnd in list(self._handles):
            hnd.close()
        self._m = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close()

    def __repr__(self):
        if self._m is None:
            return f"<Ring {self._name_!r} closed>"
        return (f"<Ring {self._name_!r} mode={MODES[self._m.mode]} capacity={self._m.cap} "
                f"max_consumers={self._m.nslots}>")


@cython.final
@cython.no_gc_clear
cdef class Producer:
    """The single writer of a ring.  Use one thread at a time.

    ``put`` blocks while the ring is full (spinning briefly, then sleeping on
    a futex with the GIL released); ``close()`` ends the stream: consumers
    drain what is left, then get ``Closed``.  Dropping the handle without
    ``close()`` gives the producer role back without ending the stream.
    """
    cdef _Mapping _m            # mapping (None once closed)
    cdef ring_header_t *_h      # header
    cdef unsigned char *_data   # data area
    cdef uint64_t _cap          # capacity
    cdef uint64_t _mask         # capacity - 1
    cdef uint64_t _max_msg      # largest payload
    cdef uint64_t _head         # our copy of head (we are its only writer)
    cdef uint64_t _gate         # cached lowest consumer position
    cdef uint64_t _pub          # head as last published
    cdef uint64_t _msgs         # messages put by this handle's ring (stats mirror)
    cdef uint64_t _bytes        # bytes put (stats mirror)
    cdef int32_t _pid           # our pid, held in the producer block
    cdef bint _forked           # inherited across fork(): inert (and _m is None)
    cdef object __weakref__

    @staticmethod
    cdef Producer _make(Ring ring, _Mapping m):
        cdef ring_header_t *h = m.h
        if eng_load_acquire_u32(&h.prod.closed):
            raise Closed(f"ring {m.label()} is closed: no more messages can be put")
        cdef int32_t me = _os.getpid()
        cdef uint64_t my_start = _my_start()
        cdef uint64_t my_ns = _my_ns()
        cdef int32_t cur
        cdef uint64_t cur_start, cur_ns
        while True:
            # A consistent (pid, start, ns): a holder stores start and ns
            # after its pid CAS, so seeing the pid unchanged after reading
            # them means they are that holder's (or 0 while it takes over).
            cur = eng_load_acquire_i32(&h.prod.pid)
            cur_start = eng_load_acquire_u64(&h.prod.pid_start)
            cur_ns = eng_load_acquire_u64(&h.prod.pid_ns)
            if eng_load_acquire_i32(&h.prod.pid) != cur:
                continue
            if cur != 0:
                # our own pid is ours only if the start time says so: a dead
                # producer's pid may have been reused by this very process
                if (cur == me and (cur_start == 0 or cur_start == my_start)
                        and (cur_ns == 0 or cur_ns == my_ns)) or (
                        cur != me and _alive(cur, cur_start, cur_ns)):
                    raise EngineError(
                        f"ring {m.label()} already has a live producer (pid {cur}); "
                        "close it first (one producer at a time)")
            # The start time belongs to whoever holds the pid: clear it before
            # the pid CAS, so a checker that sees our pid never pairs it with
            # the previous owner's start (it sees 0, "unknown", or ours).  A
            # CAS from the value just read, not a store: a racer that took the
            # role meanwhile has stored its own start, which must stay.
            if not eng_cas_u64(&h.prod.pid_start, &cur_start, 0):
                continue
            if eng_cas_i32(&h.prod.pid, &cur, me):
                break
        eng_store_release_u64(&h.prod.pid_ns, my_ns)
        eng_store_release_u64(&h.prod.pid_start, my_start)
        # Only the role holder sleeps on space_seq: a count left by a holder
        # killed while asleep would cost every consumer a syscall per read.
        eng_store_seqcst_u32(&h.space.space_waiters, 0)
        # A consumer that found the previous holder dead stores `closed`
        # before it frees the role: re-checked here, so the stream it ended
        # is never handed to us.
        if eng_load_acquire_u32(&h.prod.closed):
            eng_cas_i32(&h.prod.pid, &me, 0)
            raise Closed(f"ring {m.label()} is closed: no more messages can be put")
        cdef Producer p = Producer.__new__(Producer)
        p._m = m
        p._h = h
        p._data = m.data
        p._cap = m.cap
        p._mask = m.mask
        p._max_msg = m.max_msg
        p._pid = me
        _live_handles.add(p)
        p._head = eng_load_acquire_u64(&h.prod.head)
        p._pub = p._head
        p._msgs = eng_load_relaxed_u64(&h.prod.msgs_put)
        p._bytes = eng_load_relaxed_u64(&h.prod.bytes_put)
        cdef int bad = 0
        p._gate = _compute_gate(m, p._head, &bad)
        if bad or p._head & 7:
            eng_store_release_i32(&h.prod.pid, 0)
            raise m.corrupt("cursors out of range when taking the producer role")
        return p

    def __dealloc__(self):
        # A handle inherited across fork() has _m None: the role is the parent's.
        cdef int32_t me = self._pid
        if self._m is not None and self._h != NULL:
            eng_cas_i32(&self._h.prod.pid, &me, 0)

    def _disown(self):
        """fork() child: this handle is the parent's; make it inert here."""
        if self._m is not None:
            self._forked = True
            self._m = None

    @property
    def closed(self):
        """True once this producer (or the ring) is closed."""
        return self._m is None or bool(eng_load_acquire_u32(&self._h.prod.closed))

    cdef inline int _check(self) except -1:
        # One branch on the hot path; the reasons are sorted out off it.
        if self._m is None or eng_load_acquire_u32(&self._h.prod.closed):
            return self._refuse()
        return 0

    cdef int _refuse(self) except -1:
        if self._forked:
            raise _inherited("producer", self._pid)
        if self._m is None:
            raise Closed("producer is closed")
        # ended under us (a consumer took us for dead): never put into a
        # stream the consumers will stop reading
        raise Closed(f"ring {self._m.label()} was closed: no more messages can be put")

    cdef inline uint64_t _need(self, uint64_t rec) noexcept nogil:
        # bytes a record takes at the current head, with the padding record
        # that fills the tail when it does not fit before the end
        cdef uint64_t off = self._head & self._mask
        if off + rec <= self._cap:
            return rec
        return (self._cap - off) + rec

    cdef inline bint _fits(self, uint64_t need) noexcept nogil:
        return self._head + need - self._gate <= self._cap

    cdef int _refresh_gate(self) except -1:
        cdef int bad = 0
        self._gate = _compute_gate(self._m, self._head, &bad)
        if bad:
            raise self._m.corrupt(f"a consumer cursor or the floor is beyond head {self._head}")
        return 0

    cdef inline void _write(self, const char *src, uint64_t n) noexcept nogil:
        # Room was checked (including the padding record).  Plain stores: the
        # release store of head in _publish orders them for the consumers.
        cdef uint64_t off = self._head & self._mask
        cdef uint64_t rec = ring_rec_size(n)
        cdef uint32_t *hdr
        if off + rec > self._cap:
            hdr = <uint32_t *>(self._data + off)
            hdr[0] = <uint32_t>(self._cap - off - RING_REC_HDR)
            hdr[1] = RING_FLAG_PAD
            self._head += self._cap - off
            off = 0
        self._put_rec(off, rec, src, n)

    cdef inline void _put_rec(self, uint64_t off, uint64_t rec, const char *src,
                              uint64_t n) noexcept nogil:
        # One message record at data offset `off` (room and wrap already
        # settled by the caller), then the private cursor and counters.
        cdef uint32_t *hdr = <uint32_t *>(self._data + off)
        hdr[0] = <uint32_t>n
        hdr[1] = 0
        memcpy(self._data + off + RING_REC_HDR, src, n)
        self._head += rec
        self._msgs += 1
        self._bytes += n

    cdef inline void _publish(self) noexcept nogil:
        cdef ring_header_t *h = self._h
        self._pub = self._head
        eng_store_release_u64(&h.prod.head, self._head)
        eng_store_relaxed_u64(&h.prod.msgs_put, self._msgs)
        eng_store_relaxed_u64(&h.prod.bytes_put, self._bytes)
        _wake_consumers(h)

    cdef inline uint64_t _run_rows(self, uint64_t rec, uint64_t left) noexcept nogil:
        # How many records of `rec` bytes fit from head on without a wrap,
        # within the cached gate and within one publish interval.
        cdef uint64_t off = self._head & self._mask
        cdef uint64_t room = self._cap - off
        cdef uint64_t free = self._gate + self._cap - self._head
        if free < room:
            room = free
        if room > _PUBLISH_BYTES:
            room = _PUBLISH_BYTES
        room //= rec
        return room if room < left else left

    cdef inline void _write_rows(self, const char *src, uint64_t n, uint64_t rec,
                                 uint64_t k) noexcept nogil:
        # k records of n payload bytes each, from k contiguous rows at src.
        # Room was checked by _run_rows (no wrap inside the run).
        cdef unsigned char *d = self._data + (self._head & self._mask)
        cdef uint32_t *hdr
        cdef uint64_t j
        if n == 64:
            # the common row size: a constant-size copy the compiler inlines
            for j in range(k):
                hdr = <uint32_t *>d
                hdr[0] = 64
                hdr[1] = 0
                memcpy(d + RING_REC_HDR, src, 64)
                d += rec
                src += 64
        else:
            for j in range(k):
                hdr = <uint32_t *>d
                hdr[0] = <uint32_t>n
                hdr[1] = 0
                memcpy(d + RING_REC_HDR, src, n)
                d += rec
                src += n
        self._head += k * rec
        self._msgs += k
        self._bytes += k * n

    cdef inline bint _write_now(self, const char *src, uint64_t n) noexcept nogil:
        # One record if it fits before the wrap within the cached gate: the
        # batch fast path (no padding, no waiting, no Python).  0 = use
        # _batch_item.
        cdef uint64_t rec = ring_rec_size(n)
        cdef uint64_t off = self._head & self._mask
        if n > self._max_msg or off + rec > self._cap or not self._fits(rec):
            return False
        self._put_rec(off, rec, src, n)
        return True

    cdef int _wait_room(self, uint64_t need, int64_t deadline) except -1:
        """Wait until `need` bytes fit.  1: they fit; 0: deadline passed.

        Spins ~50 us (GIL released), then sleeps on space_seq in slices,
        re-taking the GIL between slices for signals, deadline and reaping."""
        cdef _Mapping m = self._m   # keeps the mapping alive while the GIL is released
        cdef ring_header_t *h = self._h
        cdef int bad = 0
        cdef int64_t now, spin_end, next_reap, slice_ns
        cdef uint32_t seq
        cdef int spins = 0
        if deadline == 0:
            return 0
        with nogil:
            spin_end = eng_now_ns() + _SPIN_NS
            while True:
                self._gate = _compute_gate(m, self._head, &bad)
                if bad or self._fits(need):
                    break
                eng_cpu_relax()
                spins += 1
                if spins % _SPIN_CHECK == 0:
                    if eng_now_ns() > spin_end:
                        break
                    sched_yield()
        if bad:
            raise m.corrupt("a consumer cursor is beyond head")
        if self._fits(need):
            return 1
        eng_fetch_add_relaxed_u64(&h.prod.waits, 1)
        next_reap = eng_now_ns()
        while True:
            now = eng_now_ns()
            if now >= next_reap:
                _reap_dead(m)
                next_reap = now + _REAP_NS
            if deadline > 0 and now >= deadline:
                return 0
            slice_ns = _SLICE_NS
            if deadline > 0 and deadline - now < slice_ns:
                slice_ns = deadline - now
            with nogil:
                # Count ourselves, then a full fence: the registration is seen
                # before the re-check's loads (Dekker with _wake_sleepers; an
                # RMW alone does not order later acquire loads on ARMv8).
                eng_fetch_add_seqcst_u32(&h.space.space_waiters, 1)
                eng_fence_seqcst()
                seq = eng_load_acquire_u32(&h.space.space_seq)
                self._gate = _compute_gate(m, self._head, &bad)
                if not bad and not self._fits(need):
                    eng_futex_wait(&h.space.space_seq, seq, slice_ns)
                    self._gate = _compute_gate(m, self._head, &bad)
                eng_fetch_sub_seqcst_u32(&h.space.space_waiters, 1)
            if bad:
                raise m.corrupt("a consumer cursor is beyond head")
            if self._m is None:
                raise Closed("producer was closed while waiting")
            if self._fits(need):
                return 1
            if eng_load_acquire_u32(&h.prod.closed):
                raise Closed(f"ring {m.label()} was closed while waiting for room")
            PyErr_CheckSignals()

    cdef int _put_ptr(self, const char *src, uint64_t n, int64_t deadline) except -1:
        """Put one message; 1 = put, 0 = no room by the deadline."""
        if n > self._max_msg:
            raise ValueError(f"message of {n} bytes is larger than this ring's limit of "
                             f"{self._max_msg} (capacity // 2 - 8); use a bigger ring")
        cdef uint64_t need = self._need(ring_rec_size(n))
        if not self._fits(need):
            self._refresh_gate()
            if not self._fits(need):
                if not self._wait_room(need, deadline):
                    return 0
                if self._m is None:
                    raise Closed("producer is closed")
        self._write(src, n)
        self._publish()
        return 1

    cdef int _put_obj(self, object msg, int64_t deadline) except -1:
        cdef Py_buffer view
        cdef int rc
        if type(msg) is bytes:
            return self._put_ptr(PyBytes_AS_STRING(msg), PyBytes_GET_SIZE(msg), deadline)
        _get_buffer(msg, &view)
        try:
            rc = self._put_ptr(<const char *>view.buf, view.len, deadline)
        finally:
            PyBuffer_Release(&view)
        return rc

    # put(msg, timeout=None) is _producer_put below, a C entry point.
    cdef inline bint _put_now(self, PyObject *msg) noexcept:
        # The common call -- bytes, room by the cached gate, no wrap, an open
        # handle and stream -- in one straight run, published.  False leaves
        # everything else to _put_general, which reports it.
        if (_is_bytes(msg) and self._m is not None
                and not eng_load_acquire_u32(&self._h.prod.closed)
                and self._write_now(_bytes_ptr(msg), <uint64_t>_bytes_len(msg))):
            self._publish()
            return True
        return False

    cdef object _put_general(self, object msg, object timeout):
        self._check()
        cdef int64_t dl = _NO_DEADLINE
        if timeout is not None:
            dl = _deadline(timeout)
        if not self._put_obj(msg, dl):
            raise Timeout(f"ring stayed full for {timeout} s")

    @cython.binding(False)
    def try_put(self, msg):
        """Append one message if it fits right now; False if the ring is full."""
        self._check()
        return bool(self._put_obj(msg, 0))

    def wait_space(self, Py_ssize_t nbytes, timeout=None):
        """Wait until a message of ``nbytes`` bytes fits, without writing
        anything: True then, False once ``timeout`` seconds passed.  Sleeps
        on the same futex as ``put`` (GIL released, registered as a waiter);
        made for ``engine.aio``'s waiter thread."""
        self._check()
        if nbytes < 0 or <uint64_t>nbytes > self._max_msg:
            raise ValueError(f"nbytes must be between 0 and this ring's limit of "
                             f"{self._max_msg}, not {nbytes}")
        cdef uint64_t need = self._need(ring_rec_size(<uint64_t>nbytes))
        if self._fits(need):
            return True
        self._refresh_gate()
        if self._fits(need):
            return True
        return self._wait_room(need, _deadline(timeout)) == 1

    def aput(self, msg, timeout=None):
        """Coroutine: ``put`` that waits for room without blocking the event
        loop (``engine.aio.aput``)."""
        return _aio().aput(self, msg, timeout)

    cdef int _batch_item(self, const char *src, uint64_t n, int64_t deadline) except -1:
        # One record of a batch: publish only when we must wait.
        if n > self._max_msg:
            self._publish()
            raise ValueError(f"message of {n} bytes is larger than this ring's limit of "
                             f"{self._max_msg} (capacity // 2 - 8); use a bigger ring")
        cdef uint64_t need = self._need(ring_rec_size(n))
        if not self._fits(need):
            self._refresh_gate()
            if not self._fits(need):
                self._publish()  # let the consumers see what is written so far
                if not self._wait_room(need, deadline):
                    return 0
                if self._m is None:
                    raise Closed("producer is closed")
        self._write(src, n)
        return 1

    @cython.binding(False)
    def put_many(self, msgs, timeout=None):
        """Append every message of ``msgs``, publishing every 64 KiB and at
        the end (and whenever it must wait for room).  Returns how many were
        put.

        On an error (``TypeError`` / ``ValueError`` for one message,
        ``Timeout``) the messages before it are already put."""
        self._check()
        cdef int64_t dl = _NO_DEADLINE
        if timeout is not None:
            dl = _deadline(timeout)
        cdef Py_ssize_t i = 0, count = 0
        cdef PyObject *item
        cdef object held
        cdef Py_buffer view
        cdef int ok
        cdef const char *src
        cdef Py_ssize_t ln
        if type(msgs) is not list and type(msgs) is not tuple:
            msgs = list(msgs)
        try:
            # The length and item array are re-read every round: Python code
            # (a buffer export, another thread while we wait) may resize a list.
            while i < _seq_len(msgs):
                item = _seq_items(msgs)[i]
                if _is_bytes(item):
                    src = _bytes_ptr(item)
                    ln = _bytes_len(item)
                    if self._write_now(src, <uint64_t>ln):
                        count += 1
                        i += 1
                        if self._head - self._pub >= _PUBLISH_BYTES:
                            self._publish()
                        continue
                    # may wait with the GIL released: own the message meanwhile
                    held = <object>item
                    ok = self._batch_item(src, <uint64_t>ln, dl)
                else:
                    held = <object>item
                    _get_buffer(held, &view)
                    try:
                        ok = self._batch_item(<const char *>view.buf, view.len, dl)
                    finally:
                        PyBuffer_Release(&view)
                held = None
                if not ok:
                    raise Timeout(f"ring stayed full for {timeout} s after {count} messages")
                count += 1
                i += 1
        finally:
            if self._m is not None:
                self._publish()
        return count

    @cython.binding(False)
    def put_array(self, arr, timeout=None):
        """Append each row of a C-contiguous array (``arr[i]``, of
        ``arr.nbytes // len(arr)`` bytes) as one message, publishing every
        64 KiB and at the end.  Returns the number of rows."""
        self._check()
        cdef int64_t dl = _NO_DEADLINE
        if timeout is not None:
            dl = _deadline(timeout)
        cdef Py_buffer view
        cdef Py_ssize_t rows
        cdef uint64_t rowbytes, rec, i, k
        cdef const char *p
        _get_buffer(arr, &view)
        try:
            if view.ndim < 1:
                raise ValueError("put_array needs an array with at least one dimension")
            rows = view.shape[0]
            if rows == 0:
                return 0
            rowbytes = <uint64_t>(view.len // rows)
            if rowbytes > self._max_msg:
                raise ValueError(f"rows of {rowbytes} bytes are larger than this ring's limit "
                                 f"of {self._max_msg} (capacity // 2 - 8)")
            p = <const char *>view.buf
            rec = ring_rec_size(rowbytes)
            i = 0
            try:
                while i < <uint64_t>rows:
                    k = self._run_rows(rec, <uint64_t>rows - i)
                    if k == 0:
                        # a wrap (padding record), a full ring or a stale
                        # cached gate: the one-record path sorts it out
                        if not self._batch_item(p + i * rowbytes, rowbytes, dl):
                            raise Timeout(f"ring stayed full for {timeout} s after {i} rows")
                        i += 1
                    else:
                        self._write_rows(p + i * rowbytes, rowbytes, rec, k)
                        i += k
                    if self._head - self._pub >= _PUBLISH_BYTES:
                        self._publish()
            finally:
                if self._m is not None:
                    self._publish()
        finally:
            PyBuffer_Release(&view)
        return rows

    def close(self):
        """End the stream: consumers drain what is left, then get ``Closed``.

        In a process forked after this handle was made, only the handle is
        closed: the stream and the role stay with the parent."""
        if self._m is None:
            return  # closed, or inherited across fork() (inert: the stream is the parent's)
        cdef ring_header_t *h = self._h
        self._publish()
        eng_store_release_u32(&h.prod.closed, 1)
        # Unconditional wake: sleepers re-check and find `closed`.
        eng_fetch_add_u32(&h.prod.data_seq, 1)
        eng_futex_wake(&h.prod.data_seq, INT32_MAX)
        eng_fetch_add_u32(&h.space.space_seq, 1)
        eng_futex_wake(&h.space.space_seq, INT32_MAX)
        eng_store_release_i32(&h.prod.pid, 0)
        self._m = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close()


@cython.final
@cython.no_gc_clear
cdef class Consumer:
    """One registered reader of a ring.  Use one thread at a time.

    In ``spsc``/``broadcast`` mode it reads from its own cursor (a consumer
    that joins starts where the last one that left stopped, or at the oldest
    message kept); in ``shared`` mode it competes for messages with the other
    consumers.  After the producer closes, it drains what is left and then
    raises ``Closed``.
    """
    cdef _Mapping _m            # mapping (None once closed)
    cdef ring_header_t *_h      # header
    cdef ring_slot_t *_slot     # our slot in the consumer table
    cdef unsigned char *_data   # data area
    cdef uint64_t _cap          # capacity
    cdef uint64_t _mask         # capacity - 1
    cdef uint64_t _cursor       # next byte to read (spsc/broadcast)
    cdef uint64_t _head         # cached head
    cdef uint64_t _view_adv     # bytes to release at the next call (pending get_view)
    cdef uint64_t _msgs         # messages got (stats mirror)
    cdef uint64_t _bytes        # bytes got (stats mirror)
    cdef uint32_t _mode         # RING_MODE_*
    cdef uint32_t _idx          # slot index
    cdef bint _shared           # mode == shared
    cdef int32_t _pid           # our pid, held in the slot
    cdef bint _forked           # inherited across fork(): inert (and _m is None)
    cdef object __weakref__

    @staticmethod
    cdef Consumer _make(Ring ring, _Mapping m):
        cdef ring_header_t *h = m.h
        cdef int32_t me = _os.getpid()
        cdef uint32_t i, st
        cdef ring_slot_t *s = NULL
        cdef int attempt
        for attempt in range(2):
            for i in range(m.nslots):
                st = RING_SLOT_FREE
                if eng_cas_u32(&_slot_at(h, i).state, &st, RING_SLOT_ACTIVE):
                    s = _slot_at(h, i)
                    break
            if s != NULL or not _reap_dead(m):
                break
        if s == NULL:
            raise EngineError(
                f"ring {m.label()}: all {m.nslots} consumer slots are taken; close a consumer "
                "or create the ring with a larger max_consumers")
        cdef Consumer c = Consumer.__new__(Consumer)
        c._m = m
        c._h = h
        c._slot = s
        c._idx = i
        c._data = m.data
        c._cap = m.cap
        c._mask = m.mask
        c._mode = m.mode
        c._shared = m.mode == RING_MODE_SHARED
        c._pid = me
        _live_handles.add(c)
        # start and namespace before pid: while pid is 0 the slot is skipped
        # by reapers
        eng_store_release_u64(&s.claim_end, 0)
        eng_store_release_u64(&s.pid_start, _my_start())
        eng_store_release_u64(&s.pid_ns, _my_ns())
        eng_store_release_i32(&s.pid, me)
        eng_store_relaxed_u64(&s.msgs_got, 0)
        eng_store_relaxed_u64(&s.bytes_got, 0)
        eng_store_relaxed_u64(&s.waits, 0)
        cdef uint64_t t, head
        if c._shared:
            eng_store_release_u64(&s.cursor, RING_IDLE)
        else:
            # Announce the retention floor as our cursor, then make sure it
            # did not move meanwhile (see _compute_gate for the argument).
            while True:
                t = eng_load_seqcst_u64(&h.space.tail)
                eng_store_seqcst_u64(&s.cursor, t)
                if eng_load_seqcst_u64(&h.space.tail) == t:
                    break
            head = eng_load_acquire_u64(&h.prod.head)
            if t > head or head - t > m.cap or t & 7:
                c._release_slot()
                raise m.corrupt(f"retention floor {t} out of range (head {head})")
            c._cursor = t
            c._head = t
        return c

    cdef void _release_slot(self) noexcept:
        cdef ring_slot_t *s = self._slot
        cdef uint64_t cur
        if not self._shared:
            cur = self._cursor + self._view_adv
            self._view_adv = 0
            # Whatever we have not read stays for the next consumer (spsc).
            _raise_tail(self._h, cur)
        eng_store_release_u64(&s.cursor, RING_IDLE)
        eng_store_release_i32(&s.pid, 0)
        eng_store_release_u32(&s.state, RING_SLOT_FREE)
        _wake_producer(self._h)

    def __dealloc__(self):
        # A handle inherited across fork() has _m None: the slot is the parent's.
        if self._m is not None and self._slot != NULL:
            self._release_slot()

    def _disown(self):
        """fork() child: this handle is the parent's; make it inert here."""
        if self._m is not None:
            self._forked = True
            self._view_adv = 0
            self._m = None

    @property
    def slot(self):
        """Index of this consumer's slot in the consumer table."""
        return self._idx

    @property
    def closed(self):
        """True once this consumer handle is closed."""
        return self._m is None

    cdef inline int _check(self) except -1:
        if self._m is None:
            return self._refuse()
        if self._view_adv:
            self._release_view()
        return 0

    cdef int _refuse(self) except -1:
        if self._forked:
            raise _inherited("consumer", self._pid)
        raise Closed("consumer is closed")

    cdef void _release_view(self) noexcept:
        # The previous get_view's record may now be overwritten.
        if self._shared:
            eng_store_release_u64(&self._slot.cursor, RING_IDLE)
        else:
            self._cursor += self._view_adv
            eng_store_release_u64(&self._slot.cursor, self._cursor)
        self._view_adv = 0
        _wake_producer(self._h)

    cdef inline void _advanced(self) noexcept:
        # Publish our cursor and statistics after reading.
        eng_store_release_u64(&self._slot.cursor, self._cursor)
        eng_store_relaxed_u64(&self._slot.msgs_got, self._msgs)
        eng_store_relaxed_u64(&self._slot.bytes_got, self._bytes)
        _wake_producer(self._h)

    # ---- record walking (both modes) -----------------------------------
    cdef inline int _rec_check(self, uint64_t pos, uint64_t head, uint64_t *size,
                               uint32_t *ln) noexcept nogil:
        """The record at pos (pos < head): 1 for a message (*ln payload
        bytes), 0 for padding, -1 if malformed; *size = bytes it occupies.
        Lengths come from shared memory and are never trusted."""
        cdef uint64_t off = pos & self._mask
        cdef uint32_t n = (<uint32_t *>(self._data + off))[0]
        cdef uint32_t fl = (<uint32_t *>(self._data + off))[1]
        cdef uint64_t sz
        # every path sets both outputs (callers read them only by the result)
        size[0] = 0
        ln[0] = 0
        if fl & RING_FLAG_PAD:
            sz = self._cap - off
            if fl != RING_FLAG_PAD or <uint64_t>n + RING_REC_HDR != sz or sz > head - pos:
                return -1
            size[0] = sz
            return 0
        sz = ring_rec_size(n)
        if fl != 0 or off + sz > self._cap or sz > head - pos:
            return -1
        size[0] = sz
        ln[0] = n
        return 1

    cdef int _bad_rec(self, uint64_t pos, uint64_t head) except -1:
        """Raise the corrupt-ring error for the malformed record at pos."""
        cdef uint64_t off = pos & self._mask
        cdef uint32_t n = (<uint32_t *>(self._data + off))[0]
        cdef uint32_t fl = (<uint32_t *>(self._data + off))[1]
        if fl & RING_FLAG_PAD:
            raise self._m.corrupt(f"bad padding record at position {pos}")
        raise self._m.corrupt(
            f"record at position {pos} (length {n}, flags {fl}) crosses the end of the "
            f"data area or head {head}")

    cdef inline int _rec_at(self, uint64_t pos, uint64_t head, uint64_t *size,
                            uint32_t *ln) except -1:
        """_rec_check that raises IncompatibleRegion for a malformed record."""
        cdef int k = self._rec_check(pos, head, size, ln)
        if k < 0:
            return self._bad_rec(pos, head)
        return k

    cdef inline int _load_head(self) except -1:
        cdef uint64_t h = eng_load_acquire_u64(&self._h.prod.head)
        if h < self._cursor or h - self._cursor > self._cap or h & 7:
            raise self._m.corrupt(f"head {h} is not within capacity of cursor {self._cursor}")
        self._head = h
        return 0

    cdef int _claim(self, uint64_t maxn, uint64_t *start, uint64_t *end) except -1:
        """Shared mode: claim up to maxn messages.  0 = none available; 1 =
        [start, end) is ours (our slot announces start until we release it)."""
        cdef ring_header_t *h = self._h
        cdef uint64_t c, hd, pos, size, cnt
        cdef uint32_t ln
        cdef int k
        while True:
            c = eng_load_seqcst_u64(&h.claim.claim)
            eng_store_seqcst_u64(&self._slot.cursor, c)
            if eng_load_seqcst_u64(&h.claim.claim) != c:
                continue
            hd = eng_load_acquire_u64(&h.prod.head)
            if c > hd or hd - c > self._cap or c & 7:
                eng_store_release_u64(&self._slot.cursor, RING_IDLE)
                raise self._m.corrupt(f"claim cursor {c} out of range (head {hd})")
            if c == hd:
                eng_store_release_u64(&self._slot.cursor, RING_IDLE)
                return 0
            pos = c
            cnt = 0
            while pos < hd and cnt < maxn:
                k = self._rec_check(pos, hd, &size, &ln)
                if k < 0:
                    eng_store_release_u64(&self._slot.cursor, RING_IDLE)
                    return self._bad_rec(pos, hd)
                cnt += k
                pos += size
            # claim_end before the CAS (0 again if it fails): a reaper then
            # counts [c, pos) as lost only if this claim may have happened.
            # Relaxed: only a reaper reads it, after this process died.
            eng_store_relaxed_u64(&self._slot.claim_end, pos)
            if eng_cas_u64(&h.claim.claim, &c, pos):
                if cnt == 0:
                    continue  # we consumed a padding record only
                start[0] = c
                end[0] = pos
                return 1
            eng_store_relaxed_u64(&self._slot.claim_end, 0)

    cdef inline int _avail(self) except -1:
        """spsc/broadcast: 1 if a record is at the cursor (refreshing head)."""
        if self._cursor != self._head:
            return 1
        self._load_head()
        return self._cursor != self._head

    cdef int _closed_empty(self) except -1:
        """Raise Closed if the producer closed and nothing is left."""
        cdef ring_header_t *h = self._h
        if not eng_load_acquire_u32(&h.prod.closed):
            return 0
        if self._shared:
            if eng_load_acquire_u64(&h.claim.claim) != eng_load_acquire_u64(&h.prod.head):
                return 0
        else:
            if self._avail():
                return 0
        raise Closed("the producer closed the ring and every message has been read")

    cdef inline bint _ready(self) noexcept nogil:
        # data or close visible (used while waiting, no validation needed)
        cdef ring_header_t *h = self._h
        cdef uint64_t hd = eng_load_acquire_u64(&h.prod.head)
        if self._shared:
            if eng_load_acquire_u64(&h.claim.claim) != hd:
                return True
        elif hd != self._cursor:
            return True
        return eng_load_acquire_u32(&h.prod.closed) != 0

    cdef int _wait(self, int64_t deadline) except -1:
        """Wait for data or close.  1: something to look at; 0: deadline."""
        cdef _Mapping m = self._m   # keeps the mapping alive while the GIL is released
        cdef ring_header_t *h = self._h
        cdef int64_t now, spin_end, next_check, slice_ns
        cdef uint32_t seq
        cdef int32_t ppid
        cdef int spins = 0
        cdef bint ok = False
        if deadline == 0:
            return 0
        with nogil:
            spin_end = eng_now_ns() + _SPIN_NS
            while True:
                if self._ready():
                    ok = True
                    break
                eng_cpu_relax()
                spins += 1
                if spins % _SPIN_CHECK == 0:
                    if eng_now_ns() > spin_end:
                        break
                    sched_yield()
        if ok:
            return 1
        eng_store_relaxed_u64(&self._slot.waits, eng_load_relaxed_u64(&self._slot.waits) + 1)
        next_check = eng_now_ns() + _REAP_NS
        while True:
            now = eng_now_ns()
            if deadline > 0 and now >= deadline:
                return 0
            if now >= next_check:
                # A producer that died without closing ends the stream too.
                # `closed` first, then the role is freed: a new producer can
                # take the role only after the stream is marked closed, and
                # it re-checks `closed` (Producer._make), so its messages are
                # never put into a stream the consumers have stopped reading.
                ppid = eng_load_acquire_i32(&h.prod.pid)
                if ppid > 0 and not _alive(ppid, eng_load_acquire_u64(&h.prod.pid_start),
                                           eng_load_acquire_u64(&h.prod.pid_ns)):
                    eng_store_seqcst_u32(&h.prod.closed, 1)
                    eng_cas_i32(&h.prod.pid, &ppid, 0)
                    return 1
                next_check = now + _REAP_NS
            slice_ns = _SLICE_NS
            if deadline > 0 and deadline - now < slice_ns:
                slice_ns = deadline - now
            with nogil:
                # Count ourselves (the slot flag lets a reaper take the count
                # back if we die asleep), then a full fence: the registration
                # is seen before the re-check's loads (Dekker with
                # _wake_sleepers; ARMv8 may hoist acquire loads above an RMW).
                eng_store_release_u32(&self._slot.sleeping, 1)
                eng_fetch_add_seqcst_u32(&h.prod.data_waiters, 1)
                eng_fence_seqcst()
                seq = eng_load_acquire_u32(&h.prod.data_seq)
                if not self._ready():
                    eng_futex_wait(&h.prod.data_seq, seq, slice_ns)
                if eng_exchange_u32(&self._slot.sleeping, 0):
                    eng_fetch_sub_seqcst_u32(&h.prod.data_waiters, 1)
                ok = self._ready()
            if self._m is None:
                raise Closed("consumer was closed while waiting")
            if ok:
                return 1
            PyErr_CheckSignals()

    # ---- single messages ---------------------------------------------------
    cdef object _take_claimed(self, uint64_t start, uint64_t end):
        """Shared mode: the message of the claimed range [start, end) as
        bytes (a padding record claimed with it comes first), the slot
        released.  Written without a try block (that saves and restores the
        exception state on every call): each failure is handled where it
        happens."""
        cdef uint64_t size
        cdef uint32_t ln
        cdef int k
        cdef PyObject *b
        cdef object out
        while True:
            k = self._rec_check(start, end, &size, &ln)
            if k != 0:
                break
            start += size
        if k < 0:
            self._lose_claim()
            return self._bad_rec(start, end)
        b = _new_bytes(<char *>self._data + (start & self._mask) + RING_REC_HDR, ln)
        if b == NULL:
            self._lose_claim()
            _propagate()
        self._msgs += 1
        self._bytes += ln
        eng_store_relaxed_u64(&self._slot.msgs_got, self._msgs)
        eng_store_relaxed_u64(&self._slot.bytes_got, self._bytes)
        eng_store_release_u64(&self._slot.cursor, RING_IDLE)
        _wake_producer(self._h)
        out = <object>b  # takes a reference of its own
        Py_DECREF_raw(b)
        return out

    cdef void _lose_claim(self) noexcept:
        # A MemoryError (or a corrupt record) after the claim: the message is
        # ours and cannot be handed out, so it is lost (at-most-once) and
        # counted; the slot must not keep announcing it, or the producer
        # stays gated on it.
        eng_fetch_add_relaxed_u64(&self._h.prod.lost, 1)
        eng_store_release_u64(&self._slot.cursor, RING_IDLE)
        _wake_producer(self._h)

    cdef object _take(self, bint view):
        """One message as bytes (or a view), None if none is available now."""
        cdef uint64_t size, start, end
        cdef uint32_t ln
        cdef uint64_t off
        cdef object out
        if self._shared:
            if not self._claim(1, &start, &end):
                return None
            if not view:
                return self._take_claimed(start, end)
            try:
                # skip a leading padding record claimed together with the message
                while not self._rec_at(start, end, &size, &ln):
                    start += size
                off = start & self._mask
                if view:
                    out = self._m.view[self._m.buf.len - self._cap + off + RING_REC_HDR:
                                       self._m.buf.len - self._cap + off + RING_REC_HDR + ln]
                else:
                    out = PyBytes_FromStringAndSize(<char *>self._data + off + RING_REC_HDR, ln)
            except BaseException:
                # A MemoryError (or a corrupt record) after the claim: the
                # message is ours and cannot be handed out, so it is lost
                # (at-most-once) and counted; the slot must not keep
                # announcing it, or the producer stays gated on it.
                eng_fetch_add_relaxed_u64(&self._h.prod.lost, 1)
                eng_store_release_u64(&self._slot.cursor, RING_IDLE)
                _wake_producer(self._h)
                raise
            self._msgs += 1
            self._bytes += ln
            eng_store_relaxed_u64(&self._slot.msgs_got, self._msgs)
            eng_store_relaxed_u64(&self._slot.bytes_got, self._bytes)
            if view:
                self._view_adv = 1  # release the slot at the next call
                # gate only on the viewed record, not a padding record before it
                eng_store_release_u64(&self._slot.cursor, start)
                return out
            eng_store_release_u64(&self._slot.cursor, RING_IDLE)
            _wake_producer(self._h)
            return out
        while True:
            if not self._avail():
                return None
            if self._rec_at(self._cursor, self._head, &size, &ln):
                break
            self._cursor += size  # padding: the message is at the start
        off = self._cursor & self._mask
        self._msgs += 1
        self._bytes += ln
        if view:
            self._view_adv = size
            eng_store_release_u64(&self._slot.cursor, self._cursor)
            eng_store_relaxed_u64(&self._slot.msgs_got, self._msgs)
            eng_store_relaxed_u64(&self._slot.bytes_got, self._bytes)
            return self._m.view[self._m.buf.len - self._cap + off + RING_REC_HDR:
                                self._m.buf.len - self._cap + off + RING_REC_HDR + ln]
        out = PyBytes_FromStringAndSize(<char *>self._data + off + RING_REC_HDR, ln)
        self._cursor += size
        self._advanced()
        return out

    cdef inline bint _at_message(self, uint32_t *ln, uint64_t *size) noexcept:
        """spsc/broadcast fast path: True if a well-formed message record is
        at the cursor of this open handle with no view pending (*ln payload
        bytes, *size bytes it occupies).  False leaves every other case --
        shared mode, nothing there, padding, a closed handle and anything
        malformed -- to the general path, which reports it."""
        cdef uint64_t c = self._cursor, hd, off, sz
        cdef uint32_t n
        if self._m is None or self._view_adv or self._shared:
            return False
        if c == self._head:
            hd = eng_load_acquire_u64(&self._h.prod.head)
            if hd <= c or hd - c > self._cap or hd & 7:
                return False
            self._head = hd
        off = c & self._mask
        n = (<uint32_t *>(self._data + off))[0]
        if (<uint32_t *>(self._data + off))[1] != 0:
            return False
        sz = ring_rec_size(n)
        if off + sz > self._cap or sz > self._head - c:
            return False
        ln[0] = n
        size[0] = sz
        return True

    cdef inline object _take_at(self, uint32_t ln, uint64_t size):
        # The message _at_message found, as bytes; the cursor moves past it.
        out = PyBytes_FromStringAndSize(
            <char *>self._data + (self._cursor & self._mask) + RING_REC_HDR, ln)
        self._cursor += size
        self._msgs += 1
        self._bytes += ln
        self._advanced()
        return out

    cdef object _get(self, object timeout, bint view):
        self._check()
        out = self._take(view)
        if out is not None:
            return out
        cdef int64_t dl = _deadline(timeout)
        while True:
            self._closed_empty()
            if not self._wait(dl):
                raise Timeout(f"no message within {timeout} s")
            out = self._take(view)
            if out is not None:
                return out

    # get(timeout=None) is _consumer_get below, a C entry point.
    cdef object _get_general(self, object timeout):
        # every get that _at_message leaves: shared mode, waiting, errors
        cdef uint64_t start, end
        if self._shared and self._m is not None and not self._view_adv:
            # shared mode: one claim attempt straight away (none: the
            # general path waits and claims again)
            if self._claim(1, &start, &end):
                return self._take_claimed(start, end)
        return self._get(timeout, False)

    @cython.binding(False)
    def try_get(self):
        """The next message, or None if none is there right now (``Closed``
        once drained after the producer closed)."""
        cdef uint32_t ln
        cdef uint64_t size, start, end
        if self._at_message(&ln, &size):
            return self._take_at(ln, size)
        if self._shared and self._m is not None and not self._view_adv:
            if self._claim(1, &start, &end):
                return self._take_claimed(start, end)
            self._closed_empty()
            return None
        self._check()
        out = self._take(False)
        if out is None:
            self._closed_empty()
        return out

    def wait(self, timeout=None):
        """Wait until a message is available or the stream ended, without
        consuming anything: True then, False once ``timeout`` seconds passed
        (None: no limit).  Sleeps on the same futex as ``get`` (GIL released,
        registered as a waiter, so a producer in any process wakes it); made
        for ``engine.aio``'s waiter thread.  ``Closed`` if this handle is
        closed (also while waiting)."""
        if self._m is None:
            return self._refuse()
        if self._ready():
            return True
        return self._wait(_deadline(timeout)) == 1

    def aget(self, timeout=None):
        """Coroutine: the next message without blocking the event loop
        (``engine.aio.aget``); ``Timeout`` / ``Closed`` as in ``get``."""
        return _aio().aget(self, timeout)

    def aget_many(self, Py_ssize_t max=1024, timeout=None):
        """Coroutine: up to ``max`` messages, waiting (without blocking the
        event loop) for the first one (``engine.aio.aget_many``)."""
        return _aio().aget_many(self, max, timeout)

    def __aiter__(self):
        """``async for msg in consumer``: every message until ``Closed``."""
        return _aio().aiter_messages(self)

    @cython.binding(False)
    def get_view(self, timeout=None):
        """Like ``get`` but a zero-copy read-only memoryview into the ring,
        valid until this consumer's next call (the producer cannot overwrite
        it before then).  Copy it (``bytes(v)``) to keep it longer."""
        return self._get(timeout, True)

    # ---- batches -----------------------------------------------------------
    cdef int _batch_ready(self, object timeout) except -1:
        """1 when a batch may be read now; 0 when the caller returns empty."""
        if self._shared:
            if eng_load_acquire_u64(&self._h.claim.claim) != eng_load_acquire_u64(&self._h.prod.head):
                return 1
        elif self._avail():
            return 1
        self._closed_empty()
        if timeout is not None and timeout == 0:
            return 0
        cdef int64_t dl = _deadline(timeout)
        while True:
            if not self._wait(dl):
                return 0
            if self._shared:
                if eng_load_acquire_u64(&self._h.claim.claim) != eng_load_acquire_u64(&self._h.prod.head):
                    return 1
            elif self._avail():
                return 1
            self._closed_empty()

    @cython.boundscheck(False)
    @cython.wraparound(False)
    @cython.binding(False)
    def get_many(self, Py_ssize_t max=1024, timeout=0):
        """Up to ``max`` messages that are available right away, as a list of
        bytes, with one cursor update for the whole batch.

        ``timeout=0`` (default) never blocks and may return ``[]``;
        ``None`` blocks until the first message; ``t > 0`` waits at most
        ``t`` seconds for the first one, then returns ``[]``.  Raises
        ``Closed`` once the producer closed and everything is drained."""
        self._check()
        if max < 1:
            raise ValueError(f"max must be at least 1, got {max}")
        cdef list out = []
        if not self._batch_ready(timeout):
            return out
        cdef uint64_t size, start, end, pos, off
        cdef uint32_t ln
        cdef Py_ssize_t n = 0
        if self._shared:
            while n == 0:
                if not self._claim(<uint64_t>max, &start, &end):
                    return out
                pos = start
                try:
                    while pos < end:
                        if self._rec_at(pos, end, &size, &ln):
                            off = pos & self._mask
                            out.append(PyBytes_FromStringAndSize(
                                <char *>self._data + off + RING_REC_HDR, ln))
                            self._bytes += ln
                            n += 1
                        pos += size
                except BaseException:
                    # A MemoryError (or a corrupt record) inside our claim:
                    # the rest of it is lost (at-most-once) and counted; the
                    # slot stops announcing it; what was copied is returned.
                    size = _count_records(self._m, pos, end)
                    eng_fetch_add_relaxed_u64(&self._h.prod.lost, size if size > 0 else 1)
                    self._msgs += n
                    eng_store_relaxed_u64(&self._slot.msgs_got, self._msgs)
                    eng_store_relaxed_u64(&self._slot.bytes_got, self._bytes)
                    eng_store_release_u64(&self._slot.cursor, RING_IDLE)
                    _wake_producer(self._h)
                    if n == 0:
                        raise
                    return out
                self._msgs += n
                eng_store_relaxed_u64(&self._slot.msgs_got, self._msgs)
                eng_store_relaxed_u64(&self._slot.bytes_got, self._bytes)
                eng_store_release_u64(&self._slot.cursor, RING_IDLE)
                _wake_producer(self._h)
            return out
        return self._take_many(max)

    @cython.boundscheck(False)
    @cython.wraparound(False)
    cdef list _take_many(self, Py_ssize_t maxn):
        """spsc/broadcast get_many: up to maxn messages from the cursor on
        (re-loading head when it drained what it saw), into a list whose
        slots are allocated up front.  Validation is inline (the same checks
        as _rec_at); the cursor moves past exactly the records returned."""
        if self._cursor == self._head:
            self._load_head()
        cdef uint64_t cur = self._cursor, hd = self._head
        cdef uint64_t mask = self._mask, cap = self._cap, off, sz
        cdef unsigned char *data = self._data
        cdef uint32_t ln, fl
        cdef PyObject *b = <PyObject *>1  # non-NULL: no allocation failed
        cdef Py_ssize_t n = 0, k
        cdef uint64_t nbytes = 0
        cdef str bad = None
        # Slots for the messages there can be (a record is >= 8 bytes);
        # beyond that the list grows by appends.
        k = <Py_ssize_t>((hd - cur) >> 3)
        if k > maxn:
            k = maxn
        if k > _PREALLOC_MAX:
            k = _PREALLOC_MAX
        cdef list out = PyList_New(k)
        cdef bint stop = False
        while not stop:
            while n < maxn and cur != hd:
                off = cur & mask
                ln = (<uint32_t *>(data + off))[0]
                fl = (<uint32_t *>(data + off))[1]
                if fl == 0:
                    sz = ring_rec_size(ln)
                    if off + sz > cap or sz > hd - cur:
                        bad = (f"record at position {cur} (length {ln}, flags 0) crosses the "
                               f"end of the data area or head {hd}")
                        break
                    b = _new_bytes(<char *>data + off + RING_REC_HDR, ln)
                    if b == NULL:
                        break  # MemoryError: return what we have, or raise it if nothing
                    if n < k:
                        _list_fill(out, n, b)  # steals the new reference
                    else:
                        try:
                            PyList_Append(out, <object>b)
                        finally:
                            Py_DECREF_raw(b)
                    n += 1
                    nbytes += ln
                elif fl == RING_FLAG_PAD:
                    sz = cap - off
                    if <uint64_t>ln + RING_REC_HDR != sz or sz > hd - cur:
                        bad = f"bad padding record at position {cur}"
                        break
                else:
                    bad = f"record at position {cur} (length {ln}, flags {fl}) has unknown flags"
                    break
                cur += sz
            stop = True
            if cur == hd and n < maxn and bad is None and b != NULL:
                # drained what we saw: take what was published meanwhile too
                # (the list is made whole first: _load_head may raise)
                if n < k:
                    _set_size(out, n)
                    k = n
                self._cursor = cur
                self._load_head()
                if self._head != hd:
                    hd = self._head
                    stop = False
        if n < k:
            _set_size(out, n)  # the unused slots are NULL: nothing to release
        self._cursor = cur
        self._msgs += n
        self._bytes += nbytes
        self._advanced()
        if n == 0:
            if bad is not None:
                raise self._m.corrupt(bad)
            if PyErr_Occurred_raw() != NULL:
                raise MemoryError()
        # A problem after some messages: return them; the next call, at the
        # same cursor, meets the problem again and raises it.
        PyErr_Clear_raw()
        return out

    @cython.binding(False)
    def get_array(self, Py_ssize_t max, dtype=None, timeout=0):
        """Consecutive messages of equal size as the rows of a new array of
        shape ``(n, rowbytes // itemsize)`` (n <= max), one cursor update per
        batch; stops before the first message of another size.  ``timeout``
        as in ``get_many``; an empty result has shape ``(0, 0)``.
        ``ValueError`` (nothing consumed) if the row size is not a multiple of
        the dtype's itemsize."""
        global _np
        self._check()
        if max < 1:
            raise ValueError(f"max must be at least 1, got {max}")
        if _np is None:
            import numpy
            _np = numpy
        dt = _np.dtype(_np.uint8 if dtype is None else dtype)
        if dt.hasobject:
            # the rows would be message bytes taken for object pointers
            raise TypeError(f"dtype must hold plain data, not Python objects: {dt}")
        cdef Py_ssize_t isz = dt.itemsize
        if not self._batch_ready(timeout):
            return _np.empty((0, 0), dtype=dt)
        if self._shared:
            # claim one message to learn the row size, then the rest of a
            # same-size run in the same claim would need a look-ahead: claim
            # a walk of equal-size records directly.
            return self._get_array_shared(max, dt, isz)
        return self._take_array(max, dt, isz)

    @cython.boundscheck(False)
    @cython.wraparound(False)
    @cython.cdivision(True)
    cdef object _take_array(self, Py_ssize_t maxn, object dt, Py_ssize_t isz):
        """spsc/broadcast get_array: one pass that validates and copies.

        A fresh head (one acquire load per call, so everything published so
        far is seen); padding records at the cursor are skipped; the first
        message gives the row size, and the array is allocated for as many
        rows of that size as [cursor, head) can hold.  The copy stops before
        a message of another size, and never consumes a padding record after
        the last row (it belongs to the next message).  Fewer rows than
        allocated (padding or another size on the way): the array shrinks in
        place."""
        self._load_head()
        cdef uint64_t hd = self._head, pos = self._cursor, endpos
        cdef uint64_t mask = self._mask, cap = self._cap, off, sz, rec, rowlen
        cdef unsigned char *data = self._data
        cdef uint32_t ln = 0, fl
        cdef Py_ssize_t kmax, n = 0
        cdef int bad = 0
        cdef char *dst
        cdef Py_buffer view
        cdef uint32_t hdr[2]
        cdef uint64_t expect, run, j
        cdef unsigned char *src
        # leading padding records (a wrap) belong to no row
        while pos != hd:
            off = pos & mask
            ln = (<uint32_t *>(data + off))[0]
            fl = (<uint32_t *>(data + off))[1]
            if fl != RING_FLAG_PAD:
                break
            sz = cap - off
            if <uint64_t>ln + RING_REC_HDR != sz or sz > hd - pos:
                raise self._m.corrupt(f"bad padding record at position {pos}")
            pos += sz
        if pos == hd:
            self._cursor = pos  # only padding was there
            self._advanced()
            return _np.empty((0, 0), dtype=dt)
        if fl != 0:
            raise self._m.corrupt(f"record at position {pos} (length {ln}, flags {fl}) has "
                                  f"unknown flags")
        rowlen = ln
        if isz == 0 or rowlen % <uint64_t>isz:
            raise ValueError(f"message of {rowlen} bytes is not a whole number of "
                             f"{dt} items ({isz} bytes)")
        rec = ring_rec_size(rowlen)
        kmax = <Py_ssize_t>((hd - pos) // rec)
        if kmax == 0:
            raise self._m.corrupt(f"record at position {pos} (length {rowlen}) crosses head {hd}")
        if kmax > maxn:
            kmax = maxn
        arr = _np.empty((kmax, rowlen // <uint64_t>isz), dtype=dt)
        PyObject_GetBuffer(arr, &view, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE)
        dst = <char *>view.buf
        endpos = pos
        hdr[0] = <uint32_t>rowlen
        hdr[1] = 0
        memcpy(&expect, hdr, 8)
        with nogil:
            while n < kmax and pos != hd:
                off = pos & mask
                # A run of whole records that lie before the end of the data
                # area and head: each one whose 8-byte header is exactly
                # (rowlen, no flags) is a row, with no further check needed.
                run = (cap - off) // rec
                if (hd - pos) // rec < run:
                    run = (hd - pos) // rec
                if <uint64_t>(kmax - n) < run:
                    run = <uint64_t>(kmax - n)
                src = data + off
                j = 0
                if rowlen == 64:
                    while j < run and (<uint64_t *>src)[0] == expect:
                        memcpy(dst, src + RING_REC_HDR, 64)  # inlined
                        src += rec
                        dst += 64
                        j += 1
                else:
                    while j < run and (<uint64_t *>src)[0] == expect:
                        memcpy(dst, src + RING_REC_HDR, rowlen)
                        src += rec
                        dst += rowlen
                        j += 1
                if j:
                    n += <Py_ssize_t>j
                    pos += j * rec
                    endpos = pos
                    continue
                # the record at pos is not a plain row: padding, another size,
                # or malformed
                ln = (<uint32_t *>(data + off))[0]
                fl = (<uint32_t *>(data + off))[1]
                if fl == RING_FLAG_PAD:
                    sz = cap - off
                    if <uint64_t>ln + RING_REC_HDR != sz or sz > hd - pos:
                        bad = 1
                        break
                    pos += sz
                    continue
                if fl != 0:
                    bad = 2
                    break
                if ln != rowlen:
                    break  # another size: the next call starts there
                # a row's header on a record that crosses the end of the data
                # area or head (the run above stopped short of it)
                bad = 3
                break
        PyBuffer_Release(&view)
        if bad and n == 0:
            raise self._m.corrupt(f"bad record at position {pos} (length {ln}, flags {fl})")
        # (a problem after some rows: they are returned; the next call meets it)
        if n < kmax:
            arr.resize((n, rowlen // <uint64_t>isz), refcheck=False)  # nobody else sees it yet
        self._cursor = endpos
        self._msgs += n
        self._bytes += <uint64_t>n * rowlen
        self._advanced()
        return arr

    cdef object _get_array_shared(self, Py_ssize_t maxn, object dt, Py_ssize_t isz):
        """Shared get_array: walk (validating) a run of equal-size records
        from the claim cursor, claim exactly that run, then copy it.  The
        copy re-validates every header it reads (a record can change under
        us only in a hostile region, but nothing read from shared memory is
        trusted twice)."""
        cdef ring_header_t *h = self._h
        cdef uint64_t c, hd, pos, size, rowlen = 0, off, endpos = 0, rec, cap = self._cap
        cdef uint32_t ln, fl
        cdef Py_ssize_t n, i
        cdef bint first
        cdef int bad
        cdef Py_buffer view
        cdef char *dst
        cdef unsigned char *data = self._data
        while True:
            c = eng_load_seqcst_u64(&h.claim.claim)
            eng_store_seqcst_u64(&self._slot.cursor, c)
            if eng_load_seqcst_u64(&h.claim.claim) != c:
                continue
            hd = eng_load_acquire_u64(&h.prod.head)
            if c > hd or hd - c > self._cap or c & 7:
                eng_store_release_u64(&self._slot.cursor, RING_IDLE)
                raise self._m.corrupt(f"claim cursor {c} out of range (head {hd})")
            pos = c
            n = 0
            first = True
            try:
                while pos < hd and n < maxn:
                    if self._rec_at(pos, hd, &size, &ln):
                        if first:
                            rowlen = ln
                            first = False
                            if isz == 0 or rowlen % isz:
                                raise ValueError(
                                    f"message of {rowlen} bytes is not a whole number of "
                                    f"{dt} items ({isz} bytes)")
                        elif ln != rowlen:
                            break
                        n += 1
                        endpos = pos + size
                    pos += size
            except BaseException:
                eng_store_release_u64(&self._slot.cursor, RING_IDLE)
                raise
            if n == 0:
                # only padding was published (cannot happen with our own
                # producer, which publishes padding with the next record)
                endpos = pos
            pos = endpos
            if pos == c:
                eng_store_release_u64(&self._slot.cursor, RING_IDLE)
                return _np.empty((0, 0), dtype=dt)
            # claim_end before the CAS, 0 again if it fails (see _claim)
            eng_store_relaxed_u64(&self._slot.claim_end, pos)
            if not eng_cas_u64(&h.claim.claim, &c, pos):
                eng_store_relaxed_u64(&self._slot.claim_end, 0)
                continue
            if n == 0:
                continue
            try:
                arr = _np.empty((n, rowlen // isz), dtype=dt)
                PyObject_GetBuffer(arr, &view, PyBUF_C_CONTIGUOUS)
            except BaseException:
                # the claimed rows cannot be handed out: lost (at-most-once)
                eng_fetch_add_relaxed_u64(&h.prod.lost, <uint64_t>n)
                eng_store_release_u64(&self._slot.cursor, RING_IDLE)
                _wake_producer(h)
                raise
            dst = <char *>view.buf
            rec = ring_rec_size(rowlen)
            pos = c  # the start we claimed (ours, not re-read from the region)
            i = 0
            bad = 0
            with nogil:
                while i < n:
                    if pos >= endpos:
                        bad = 1
                        break
                    off = pos & self._mask
                    ln = (<uint32_t *>(data + off))[0]
                    fl = (<uint32_t *>(data + off))[1]
                    if fl == RING_FLAG_PAD:
                        size = cap - off
                        if <uint64_t>ln + RING_REC_HDR != size or size > endpos - pos:
                            bad = 1
                            break
                        pos += size
                        continue
                    if fl != 0 or ln != rowlen or off + rec > cap or rec > endpos - pos:
                        bad = 1
                        break
                    memcpy(dst + i * rowlen, data + off + RING_REC_HDR, rowlen)
                    pos += rec
                    i += 1
            PyBuffer_Release(&view)
            if bad:
                eng_fetch_add_relaxed_u64(&h.prod.lost, <uint64_t>(n - i))
                eng_store_release_u64(&self._slot.cursor, RING_IDLE)
                _wake_producer(h)
                raise self._m.corrupt(f"record at position {pos} changed while it was claimed")
            self._msgs += n
            self._bytes += n * rowlen
            eng_store_relaxed_u64(&self._slot.msgs_got, self._msgs)
            eng_store_relaxed_u64(&self._slot.bytes_got, self._bytes)
            eng_store_release_u64(&self._slot.cursor, RING_IDLE)
            _wake_producer(h)
            return arr

    def close(self):
        """Leave the ring: free the slot (in spsc mode what is unread stays
        for the next consumer).  In a process forked after this handle was
        made, only the handle is closed: the slot stays with the parent."""
        if self._m is None:
            return  # closed, or inherited across fork() (inert: the slot is the parent's)
        self._release_slot()
        # wake a thread of ours that may be sleeping in this handle
        eng_fetch_add_u32(&self._h.prod.data_seq, 1)
        eng_futex_wake(&self._h.prod.data_seq, INT32_MAX)
        self._m = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close()


# ---- C entry points of put and get ----------------------------------------
# METH_FASTCALL | METH_KEYWORDS functions (ring_entry.h): a call with
# positional arguments only reaches the ring's straight run with no argument
# parsing and no reference taken to a default; keywords go through
# ring_parse_args.  CPython passes `self` of the method's own type.

cdef const char *_PUT_NAMES[2]
_PUT_NAMES[0] = "msg"
_PUT_NAMES[1] = "timeout"
cdef const char *_GET_NAMES[1]
_GET_NAMES[0] = "timeout"


cdef object _producer_put(Producer self, PyObject **args, Py_ssize_t nargs, PyObject *kwnames):
    cdef PyObject *a[2]
    if nargs == 1 and kwnames == NULL:
        if self._put_now(args[0]):
            return None
        return self._put_general(<object>args[0], None)
    ring_parse_args("put", _PUT_NAMES, 2, 1, args, nargs, kwnames, a)
    return self._put_general(<object>a[0], None if a[1] == NULL else <object>a[1])


cdef object _consumer_get(Consumer self, PyObject **args, Py_ssize_t nargs, PyObject *kwnames):
    cdef uint32_t ln
    cdef uint64_t size
    cdef PyObject *a[1]
    if nargs == 0 and kwnames == NULL:
        if self._at_message(&ln, &size):
            return self._take_at(ln, size)
        return self._get_general(None)
    ring_parse_args("get", _GET_NAMES, 1, 0, args, nargs, kwnames, a)
    return self._get_general(None if a[0] == NULL else <object>a[0])


cdef PyMethodDef _PUT_DEF
_PUT_DEF.ml_name = "put"
_PUT_DEF.ml_meth = <void *>_producer_put
_PUT_DEF.ml_flags = METH_FASTCALL | METH_KEYWORDS
_PUT_DEF.ml_doc = (
    "put($self, /, msg, timeout=None)\n--\n\n"
    "Append one message (any C-contiguous buffer), waiting for room up\n"
    "to ``timeout`` seconds (None: as long as it takes) -> ``Timeout``.")
cdef PyMethodDef _GET_DEF
_GET_DEF.ml_name = "get"
_GET_DEF.ml_meth = <void *>_consumer_get
_GET_DEF.ml_flags = METH_FASTCALL | METH_KEYWORDS
_GET_DEF.ml_doc = (
    "get($self, /, timeout=None)\n--\n\n"
    "The next message as bytes, waiting up to ``timeout`` seconds (None:\n"
    "as long as it takes) -> ``Timeout``; ``Closed`` once drained after\n"
    "the producer closed.")
ring_install_method(Producer, &_PUT_DEF)
ring_install_method(Consumer, &_GET_DEF)


def _have_futex():
    """True when blocking waits sleep on a real futex (False in the
    ENGINE_PORTABLE build, which naps instead); CI checks which one it built."""
    return bool(eng_have_futex())
