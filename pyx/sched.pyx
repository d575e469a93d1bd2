# The hot path of engine.scheduling: dispatch over several rings in C.
#
# A PriorityQueue is one ring per level plus a delay ring; a KeyedQueue one
# ring per partition plus a delay ring per partition.  The rings do the
# lock-free work; this module adds what a Python loop would make ~3x slower:
# the level choice (strict / deficit round robin / aging), the enqueue-time
# header for aging, and one doorbell (a futex word in the control region
# described by sched_layout.h) that lets a consumer sleep on all its rings at
# once.  Ring methods are called as precomputed bound methods (vectorcall,
# no attribute lookup per message).  Everything that is not per message
# (delayed messages, rebalancing, configuration) stays in Python.
"""Compiled core of :mod:`engine.scheduling` (PriorityQueue / KeyedQueue dispatch)."""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.exc cimport PyErr_CheckSignals
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.limits cimport INT_MAX
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy, memset
from posix.unistd cimport getpid

from eng_atomic cimport *

import heapq as _heapq
from collections import deque as _deque

from engine.errors import Closed, EngineError, IncompatibleRegion, Timeout

include "reserve.pxi"
include "liveness.pxi"

# Queues and group members record the fork generation their region was
# mapped in (see eng_atomic.h): in a forked child they are inert.
if eng_install_fork_hook() != 0:
    raise ImportError("engine._sched: pthread_atfork failed")


cdef extern from "sched_layout.h" nogil:
    uint64_t ENG_SCHED_MAGIC
    uint32_t ENG_SCHED_VERSION
    uint32_t ENG_SCHED_CONFIG_MAX
    uint32_t ENG_SCHED_MAX_MEMBERS
    uint32_t ENG_SCHED_MAX_PARTS
    uint32_t ENG_SCHED_KIND_PRIORITY
    uint32_t ENG_SCHED_KIND_KEYED
    uint64_t ENG_SCHED_REGION_SIZE

    ctypedef struct eng_sched_meta_t:
        uint64_t magic          # ENG_SCHED_MAGIC, stored last by the creator
        uint32_t version        # layout version
        uint32_t kind           # ENG_SCHED_KIND_*
        uint64_t region_size    # bytes of the whole region
        uint32_t config_len     # bytes of JSON in config[]
        uint32_t creator_pid    # informational
        int64_t created_ns      # informational

    ctypedef struct eng_sched_bell_t:
        uint32_t seq            # futex word, bumped when waiters > 0
        uint32_t waiters        # sleeping consumers (seq_cst)
        uint64_t delayed        # delayed messages put so far

    ctypedef struct eng_sched_group_t:
        uint64_t epoch          # bumped on join / leave / reap
        uint64_t next_token     # unique member tokens
        uint64_t closed         # producer closed

    ctypedef struct eng_sched_counts_t:
        uint64_t put[64]        # messages put per level

    ctypedef struct eng_sched_member_t:
        uint64_t token          # 0 = free
        int64_t pid             # member process
        int64_t joined_ns       # informational
        uint64_t delivered      # statistics
        uint64_t pid_start      # start time of pid, 0 = unknown
        uint64_t pid_ns         # pid namespace inode of pid, 0 = unknown

    ctypedef struct eng_sched_region_t:
        eng_sched_meta_t meta           # immutable
        eng_sched_bell_t bell           # doorbell
        eng_sched_group_t group         # KeyedQueue group
        eng_sched_counts_t counts       # per-level put counts (emptiness hint)
        uint8_t config[1]               # ENG_SCHED_CONFIG_MAX bytes in C
        eng_sched_member_t members[1]   # ENG_SCHED_MAX_MEMBERS in C
        uint64_t parts[1]               # ENG_SCHED_MAX_PARTS in C


REGION_SIZE = ENG_SCHED_REGION_SIZE
CONFIG_MAX = ENG_SCHED_CONFIG_MAX
MAX_MEMBERS = ENG_SCHED_MAX_MEMBERS
MAX_PARTS = ENG_SCHED_MAX_PARTS
KIND_PRIORITY = ENG_SCHED_KIND_PRIORITY
KIND_KEYED = ENG_SCHED_KIND_KEYED
MAGIC = ENG_SCHED_MAGIC
VERSION = ENG_SCHED_VERSION

# Header of a timestamped level record (max_wait set): i64 enqueue time.
TS_HEADER = 8
# Header of a delay-ring record: i64 due (monotonic ns), u32 level/partition, u32 0.
DELAY_HEADER = 16

cdef int64_t _SLICE_NS = 50_000_000     # longest sleep before checking signals
cdef int64_t _NO_DEADLINE = -1


cdef int64_t _deadline(object timeout) except? -2:
    """None -> -1 (none); 0 -> 0 (do not wait); t -> now + t ns."""
    if timeout is None:
        return _NO_DEADLINE
    cdef double t = timeout
    if t != t or t < 0:
        raise ValueError(f"timeout must be None or a non-negative number, not {timeout!r}")
    if t == 0:
        return 0
    if t > 1e9:
        return _NO_DEADLINE
    return eng_now_ns() + <int64_t>(t * 1e9) + 1


def reserve_file(int fd, Py_ssize_t size):
    """Grow the file at ``fd`` to ``size`` bytes with its blocks allocated
    (see reserve.pxi): a region that does not fit fails with ENOSPC when it
    is created, instead of SIGBUS on first use."""
    _reserve_file(fd, size)


def create_mapped(str path, Py_ssize_t size):
    """Create the shared region file ``path`` (0600, blocks allocated, see
    reserve.pxi) and return its shared mapping; the file is removed again if
    that fails."""
    return _create_mapped(path, size, _rsv_mmap.MAP_SHARED)


def now_ns():
    """CLOCK_MONOTONIC in ns (the clock every header and due time uses)."""
    return eng_now_ns()


def pid_alive(int32_t pid, uint64_t start=0, uint64_t ns=0):
    """True if a process with this pid exists (any user), is not a zombie
    and, when ``start`` is known (not 0), started at that time: not a new
    process that reused a dead member's pid; and always when ``ns`` (its pid
    namespace inode) is known and not ours (see liveness.pxi)."""
    return bool(_alive(pid, start, ns))


cdef object _inherited(str what, int32_t owner):
    """The error for a handle used in a process forked after it was made."""
    return EngineError(
        f"this {what} was opened by process {owner} and inherited across fork(): it is inert "
        f"here (its rings, slots and group membership stay with process {owner}); attach "
        f"anew in this process, e.g. PriorityQueue.attach(name) / KeyedQueue.attach(name)")


def fork_generation():
    """How many times this process's ancestors forked since this module was
    imported (0 in the importing process): a handle made at another
    generation was inherited across fork()."""
    return eng_fork_generation()


cdef inline void _ring_bell(eng_sched_region_t *r) noexcept nogil:
    # Dekker with the waiter: our ring publish (release) -> full fence -> read
    # waiters; the waiter does fetch_add(waiters, seq_cst) -> re-reads the
    # rings.  One of the two must see the other, so no wake-up is lost.
    eng_fence_seqcst()
    if eng_load_relaxed_u32(&r.bell.waiters) != 0:  # ordered by the fence above
        eng_fetch_add_u32(&r.bell.seq, 1)
        eng_futex_wake(&r.bell.seq, INT_MAX)


cdef uint64_t _fnv1a(const uint8_t *p, Py_ssize_t n) noexcept nogil:
    cdef uint64_t h = 14695981039346656037ULL
    cdef Py_ssize_t i
    for i in range(n):
        h = (h ^ p[i]) * 1099511628211ULL
    # final avalanche (splitmix64) so that low bits depend on every byte
    h ^= h >> 30
    h *= 0xbf58476d1ce4e5b9ULL
    h ^= h >> 27
    h *= 0x94d049bb133111ebULL
    h ^= h >> 31
    return h


cpdef uint64_t stable_hash(object key) except? 0:
    """A hash of ``key`` (bytes-like, str or int) that is the same in every
    process and run (Python's ``hash`` of str/bytes is salted per process)."""
    cdef Py_buffer view
    cdef const char *s
    cdef Py_ssize_t n
    cdef uint64_t h
    if type(key) is bytes:
        return _fnv1a(<const uint8_t *>PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key))
    if isinstance(key, str):
        s = PyUnicode_AsUTF8AndSize(key, &n)
        return _fnv1a(<const uint8_t *>s, n)
    cdef char digits[24]
    cdef int64_t v
    cdef uint64_t u
    cdef int pos
    if type(key) is int:
        # the hash of its decimal text (== stable_hash(str(key))), without
        # allocating the text when it fits in 64 bits
        try:
            v = key
        except OverflowError:
            key = str(key).encode()
            return _fnv1a(<const uint8_t *>PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key))
        pos = 24
        u = <uint64_t>(-(v + 1)) + 1 if v < 0 else <uint64_t>v
        while True:
            pos -= 1
            digits[pos] = <char>(48 + u % 10)
            u //= 10
            if u == 0:
                break
        if v < 0:
            pos -= 1
            digits[pos] = 45  # '-'
        return _fnv1a(<const uint8_t *>&digits[pos], 24 - pos)
    if isinstance(key, int) and not isinstance(key, bool):
        key = str(int(key)).encode()
        return _fnv1a(<const uint8_t *>PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key))
    if PyObject_GetBuffer(key, &view, PyBUF_SIMPLE) < 0:
        raise TypeError("key must be bytes-like, str or int")
    try:
        h = _fnv1a(<const uint8_t *>view.buf, view.len)
    finally:
        PyBuffer_Release(&view)
    return h


cdef bytes _with_header(int64_t a, object msg, Py_ssize_t hdr, uint32_t level):
    """``msg`` prefixed by an 8- or 16-byte header, in one allocation."""
    cdef Py_buffer view
    cdef const char *src
    cdef Py_ssize_t n
    cdef bint borrowed = False
    if type(msg) is bytes:
        src = PyBytes_AS_STRING(msg)
        n = PyBytes_GET_SIZE(msg)
    else:
        if PyObject_GetBuffer(msg, &view, PyBUF_SIMPLE) < 0:
            raise TypeError(f"message must be a C-contiguous buffer, not {type(msg).__name__}")
        borrowed = True
        src = <const char *>view.buf
        n = view.len
    cdef bytes out
    cdef char *dst
    try:
        out = PyBytes_FromStringAndSize(NULL, n + hdr)
        dst = PyBytes_AS_STRING(out)
        memcpy(dst, &a, 8)
        if hdr == 16:
            memcpy(dst + 8, &level, 4)
            memset(dst + 12, 0, 4)
        memcpy(dst + hdr, src, n)
    finally:
        if borrowed:
            PyBuffer_Release(&view)
    return out


cdef inline int64_t _ts_of(bytes rec) except? -1:
    cdef int64_t ts
    if PyBytes_GET_SIZE(rec) < 8:
        raise EngineError("corrupt scheduling record: shorter than its 8-byte header")
    memcpy(&ts, PyBytes_AS_STRING(rec), 8)
    return ts


def split_delayed(bytes rec):
    """Parse a delay-ring record -> (due_ns, level, payload)."""
    cdef int64_t due
    cdef uint32_t level
    if PyBytes_GET_SIZE(rec) < 16:
        raise EngineError("corrupt delay record: shorter than its 16-byte header")
    memcpy(&due, PyBytes_AS_STRING(rec), 8)
    memcpy(&level, PyBytes_AS_STRING(rec) + 8, 4)
    return due, level, rec[16:]


def delayed_record(int64_t due_ns, object msg, uint32_t level):
    """Build a delay-ring record (see :func:`split_delayed`)."""
    return _with_header(due_ns, msg, 16, level)


# ---------------------------------------------------------------------------
# the control region
# ---------------------------------------------------------------------------


@cython.final
cdef class _Region:
    """A mapped control region (sched_layout.h): doorbell, config, group
    tables.  Holds a buffer export of the mmap so it can never be unmapped
    while this object still points into it."""

    cdef Py_buffer _view        # export of the mmap (pins the mapping)
    cdef bint _held             # _view is held
    cdef eng_sched_region_t *r  # the region, NULL after close
    cdef object mm              # the mmap.mmap object
    cdef readonly object name   # shm name or None (private)
    cdef uint32_t _gen          # fork generation it was mapped in
    cdef readonly int32_t pid   # process that mapped it

    def __init__(self, mm, name=None):
        if PyObject_GetBuffer(mm, &self._view, PyBUF_WRITABLE) < 0:
            raise TypeError("region needs a writable mapping")
        self._held = True
        if <uint64_t>self._view.len < ENG_SCHED_REGION_SIZE:
            PyBuffer_Release(&self._view)
            self._held = False
            raise IncompatibleRegion(name or "<private>", f"region is {self._view.len} bytes, "
                                     f"a scheduling region has {ENG_SCHED_REGION_SIZE}")
        self.r = <eng_sched_region_t *>self._view.buf
        self.mm = mm
        self._gen = eng_fork_generation()
        self.pid = getpid()
        self.name = name

    def __dealloc__(self):
        self.r = NULL
        if self._held:
            PyBuffer_Release(&self._view)   # then the mmap object unmaps when freed
            self._held = False

    @property
    def inherited(self):
        """True in a process forked after this region was mapped: every
        queue handle and group member over it is inert there."""
        return self._gen != eng_fork_generation()

    def check_fork(self, str what="queue"):
        """Raise ``EngineError`` if this region was inherited across fork()."""
        if self._gen != eng_fork_generation():
            raise _inherited(what, self.pid)

    cdef inline int _check(self) except -1:
        if self.r == NULL:
            raise Closed("the scheduling region is closed")
        return 0

    def close(self):
        """Refuse further use.  The mapping itself goes when the last reference
        to this object does (``__dealloc__``): a thread still asleep on the
        doorbell holds one, so it never wakes up into unmapped memory."""
        self.r = NULL

    def initialize(self, uint32_t kind, bytes config):
        """Creator: write meta and config, then the magic (release)."""
        self._check()
        cdef eng_sched_region_t *r = self.r
        if <uint32_t>len(config) > ENG_SCHED_CONFIG_MAX:
            raise ValueError(f"configuration too large ({len(config)} > {ENG_SCHED_CONFIG_MAX} bytes)")
        memcpy(r.config, PyBytes_AS_STRING(config), len(config))
        r.meta.version = ENG_SCHED_VERSION
        r.meta.kind = kind
        r.meta.region_size = ENG_SCHED_REGION_SIZE
        r.meta.config_len = <uint32_t>len(config)
        r.meta.creator_pid = <uint32_t>getpid()
        r.meta.created_ns = eng_wall_ns()
        eng_store_relaxed_u64(&r.group.next_token, 1)
        eng_store_release_u64(&r.meta.magic, ENG_SCHED_MAGIC)

    def validate(self, uint32_t kind):
        """Attacher: check every meta field -> the config bytes.  Returns None
        while the creator has not stored the magic yet."""
        self._check()
        cdef eng_sched_region_t *r = self.r
        label = self.name or "<private>"
        cdef uint64_t magic = eng_load_acquire_u64(&r.meta.magic)
        if magic == 0:
            return None
        if magic != ENG_SCHED_MAGIC:
            raise IncompatibleRegion(label, "not a queue-engine scheduling region (bad magic)")
        if r.meta.version != ENG_SCHED_VERSION:
            raise IncompatibleRegion(label, f"layout version {r.meta.version}, this build reads "
                                     f"{ENG_SCHED_VERSION}")
        if r.meta.region_size != ENG_SCHED_REGION_SIZE:
            raise IncompatibleRegion(label, f"region size field {r.meta.region_size} != "
                                     f"{ENG_SCHED_REGION_SIZE}")
        if r.meta.kind != kind:
            what = {1: "PriorityQueue", 2: "KeyedQueue"}.get(r.meta.kind, f"kind {r.meta.kind}")
            raise IncompatibleRegion(label, f"region belongs to a {what}")
        if r.meta.config_len > ENG_SCHED_CONFIG_MAX:
            raise IncompatibleRegion(label, f"config length {r.meta.config_len} out of range")
        return PyBytes_FromStringAndSize(<char *>r.config, r.meta.config_len)

    # ---- doorbell -----------------------------------------------------
    def ring_bell(self):
        """Wake every consumer sleeping on the doorbell (if any)."""
        self._check()
        _ring_bell(self.r)

    def force_bell(self):
        """Bump the doorbell and wake sleepers unconditionally (rebalance)."""
        self._check()
        eng_fetch_add_u32(&self.r.bell.seq, 1)
        eng_futex_wake(&self.r.bell.seq, INT_MAX)

    def arm(self):
        """Register as a sleeper; returns the sequence to pass to ``sleep``.
        Re-check the rings after this and before ``sleep`` (no lost wake-up);
        every ``arm`` must be followed by exactly one ``sleep`` or ``disarm``."""
        self._check()
        cdef uint32_t seq = eng_load_acquire_u32(&self.r.bell.seq)
        eng_fetch_add_seqcst_u32(&self.r.bell.waiters, 1)
        return seq

    def disarm(self):
        """Undo ``arm`` without sleeping."""
        self._check()
        eng_fetch_sub_seqcst_u32(&self.r.bell.waiters, 1)

    def sleep(self, uint32_t seq, double seconds):
        """Sleep until the doorbell moves from ``seq`` or ``seconds`` pass
        (at most 50 ms per call, so Ctrl-C is seen); then disarms."""
        self._check()
        cdef int64_t ns = <int64_t>(seconds * 1e9)
        if ns > _SLICE_NS:
            ns = _SLICE_NS
        cdef eng_sched_region_t *r = self.r
        cdef object keep = self   # the mapping outlives the nogil section
        if ns > 0:
            with nogil:
                eng_futex_wait(&r.bell.seq, seq, ns)
        eng_fetch_sub_seqcst_u32(&r.bell.waiters, 1)
        PyErr_CheckSignals()

    @property
    def delayed(self):
        """Delayed messages put so far (acquire)."""
        self._check()
        return eng_load_acquire_u64(&self.r.bell.delayed)

    def add_delayed(self):
        self._check()
        eng_fetch_add_u64(&self.r.bell.delayed, 1)

    # ---- group (KeyedQueue) --------------------------------------------
    @property
    def epoch(self):
        self._check()
        return eng_load_acquire_u64(&self.r.group.epoch)

    def bump_epoch(self):
        """A membership change: every member rebalances at its next call."""
        self._check()
        eng_fetch_add_u64(&self.r.group.epoch, 1)
        self.force_bell()

    @property
    def closed(self):
        """True once the producer closed the queue."""
        self._check()
        return eng_load_acquire_u64(&self.r.group.closed) != 0

    def mark_closed(self):
        """Producer: no more messages (consumers drain, then Closed)."""
        self._check()
        eng_store_release_u64(&self.r.group.closed, 1)
        self.force_bell()

    def new_token(self):
        self._check()
        return eng_fetch_add_u64(&self.r.group.next_token, 1)

    def member(self, uint32_t i):
        """(token, pid, pid start time, pid namespace inode) of member slot i
        (acquire; start and namespace are read after the pid, which was
        stored after them)."""
        self._check()
        if i >= ENG_SCHED_MAX_MEMBERS:
            raise IndexError(i)
        cdef eng_sched_member_t *m = &self.r.members[i]
        tok = eng_load_acquire_u64(&m.token)
        pid = eng_load_acquire_i64(&m.pid)
        return tok, pid, eng_load_acquire_u64(&m.pid_start), eng_load_acquire_u64(&m.pid_ns)

    def claim_member(self, uint32_t i, uint64_t expected, uint64_t token, int64_t pid):
        """CAS member slot i's token expected -> token, then set pid (with its
        start time when it is this process: pid 0 frees the slot)."""
        self._check()
        if i >= ENG_SCHED_MAX_MEMBERS:
            raise IndexError(i)
        cdef eng_sched_member_t *m = &self.r.members[i]
        cdef uint64_t exp = expected
        if not eng_cas_u64(&m.token, &exp, token):
            return False
        # start and namespace before pid: a checker that reads this pid
        # reads them too
        cdef bint mine = pid == _lv_os.getpid()
        eng_store_release_u64(&m.pid_start, _my_start() if mine else 0)
        eng_store_release_u64(&m.pid_ns, _my_ns() if mine else 0)
        eng_store_release_i64(&m.pid, pid)
        eng_store_relaxed_u64(<uint64_t *>&m.joined_ns, <uint64_t>eng_wall_ns())
        return True

    def add_delivered(self, uint32_t i, uint64_t n):
        self._check()
        if i < ENG_SCHED_MAX_MEMBERS:
            eng_fetch_add_relaxed_u64(&self.r.members[i].delivered, n)

    def member_delivered(self, uint32_t i):
        self._check()
        if i >= ENG_SCHED_MAX_MEMBERS:
            raise IndexError(i)
        return eng_load_relaxed_u64(&self.r.members[i].delivered)

    def owner(self, uint32_t p):
        """Owner token of partition p (0 = unowned), acquire."""
        self._check()
        if p >= ENG_SCHED_MAX_PARTS:
            raise IndexError(p)
        return eng_load_acquire_u64(&self.r.parts[p])

    def cas_owner(self, uint32_t p, uint64_t expected, uint64_t token):
        """Move partition p from ``expected`` to ``token`` (seq_cst CAS)."""
        self._check()
        if p >= ENG_SCHED_MAX_PARTS:
            raise IndexError(p)
        cdef uint64_t exp = expected
        return bool(eng_cas_u64(&self.r.parts[p], &exp, token))


# ---------------------------------------------------------------------------
# PriorityQueue core
# ---------------------------------------------------------------------------

cdef int _STRICT = 0
cdef int _WEIGHTED = 1


cdef class _PQCore:
    """Per-message path of :class:`engine.PriorityQueue` (subclassed there)."""

    cdef _Region _reg           # control region (keeps the mapping alive)
    cdef eng_sched_region_t *_r # doorbell, NULL until set up / after close
    cdef int _n                 # levels
    cdef int _policy            # _STRICT or _WEIGHTED
    cdef bint _ts               # level records carry an 8-byte enqueue time (max_wait set)
    cdef int64_t _age_ns        # serve a head older than this first (0: no aging)
    cdef bint _bytes            # weighted by bytes (DRR on payload sizes) instead of count
    cdef int64_t _quantum       # bytes: credit a level gets per visit, times its weight
    cdef bint _visited          # bytes: level _rr already got its quantum this visit
    cdef list _puts             # producer put bound methods per level, None until first put
    cdef object _dput           # delay ring put, None until first delayed put
    cdef list _gets             # consumer try_get bound methods per level, None until first get
    cdef list _many             # consumer get_many bound methods per level
    cdef object _dmany          # delay ring get_many
    cdef bint _deof             # the delay ring is closed and drained
    cdef int64_t *_w            # weight of each level (DRR quantum, by count)
    cdef int64_t *_credit       # DRR: messages level i may still take this turn
    cdef int _rr                # DRR: level whose turn it is
    cdef uint8_t *_eof          # level ring closed and drained
    cdef int64_t *_nlocal       # entries in _local[i] (avoids a len() per call)
    cdef list _local            # per level deque of (ts, payload): delayed messages now due
    cdef list _heads            # timestamped mode: the head payload read ahead per level, or None
    cdef int64_t *_head_ts      # its enqueue time
    cdef list _heap             # delayed messages held by this consumer: (due, seq, level, payload)
    cdef int64_t _next_due      # earliest due in _heap (INT64 max when empty)
    cdef uint64_t _dseen        # bell.delayed value at our last drain
    cdef uint64_t _hseq         # tie-breaker for _heap
    cdef uint64_t *_seen        # per level: put count up to which everything was consumed (hint)
    cdef uint64_t *_nput        # messages put per level by this handle
    cdef uint64_t *_ngot        # messages got per level by this handle
    cdef uint64_t _aged         # messages served out of order by aging

    def __dealloc__(self):
        free(self._w); free(self._credit); free(self._eof); free(self._nlocal)
        free(self._head_ts); free(self._nput); free(self._ngot); free(self._seen)

    def _core_setup(self, _Region reg, int levels, str policy, weights, double max_wait,
                    bint by_bytes=False, int64_t quantum=4096):
        """Called once by PriorityQueue.__init__/attach before any put/get."""
        if levels < 1 or levels > 64:
            raise ValueError(f"levels must be 1..64, not {levels}")
        self._reg = reg
        self._r = reg.r
        self._n = levels
        self._policy = _WEIGHTED if policy == "weighted" else _STRICT
        self._age_ns = <int64_t>(max_wait * 1e9) if max_wait > 0 else 0
        self._ts = self._age_ns > 0
        self._bytes = by_bytes and self._policy == _WEIGHTED
        self._quantum = quantum if quantum > 0 else 4096
        self._w = <int64_t *>calloc(levels, sizeof(int64_t))
        self._credit = <int64_t *>calloc(levels, sizeof(int64_t))
        self._eof = <uint8_t *>calloc(levels, 1)
        self._nlocal = <int64_t *>calloc(levels, sizeof(int64_t))
        self._head_ts = <int64_t *>calloc(levels, sizeof(int64_t))
        self._nput = <uint64_t *>calloc(levels, sizeof(uint64_t))
        self._ngot = <uint64_t *>calloc(levels, sizeof(uint64_t))
        self._seen = <uint64_t *>calloc(levels, sizeof(uint64_t))
        if (self._seen == NULL or self._w == NULL or self._credit == NULL or self._eof == NULL or self._nlocal == NULL
                or self._head_ts == NULL or self._nput == NULL or self._ngot == NULL):
            raise MemoryError()
        cdef int i
        for i in range(levels):
            self._w[i] = int(weights[i]) if weights is not None else 1
        self._local = [_deque() for _ in range(levels)]
        self._heads = [None] * levels
        self._heap = []
        self._next_due = 0x7FFFFFFFFFFFFFFF

    def _core_set_producers(self, list puts, dput):
        if len(puts) != self._n:
            raise ValueError("one producer per level")
        self._puts = puts
        self._dput = dput

    def _core_set_consumers(self, list gets, list many, dmany):
        if len(gets) != self._n or len(many) != self._n:
            raise ValueError("one consumer per level")
        self._gets = gets
        self._many = many
        self._dmany = dmany
        self._dseen = 0

    def _core_close(self):
        self._r = NULL
        self._puts = None
        self._gets = None
        self._many = None
        self._dput = None
        self._dmany = None

    cdef inline int _check(self) except -1:
        if self._r == NULL:
            raise Closed("the queue is closed")
        if self._reg._gen != eng_fork_generation():
            raise _inherited("queue", self._reg.pid)
        return 0

    # ---- put ------------------------------------------------------------
    def put(self, msg, int priority=0, delay=None, at=None):
        """Enqueue ``msg`` (any C-contiguous buffer) at level ``priority``
        (0 = most urgent).  ``delay=seconds`` or ``at=time.time()``-style
        wall-clock time: invisible until then, then served by its priority.
        Blocks while the level's ring is full."""
        self._check()
        if priority < 0 or priority >= self._n:
            raise ValueError(f"priority must be 0..{self._n - 1}, not {priority}")
        if delay is not None or at is not None:
            return self._put_later(msg, priority, delay, at)
        if self._puts is None:
            self._open_producers()
        if self._ts:
            self._puts[priority](_with_header(eng_now_ns(), msg, 8, 0))
        else:
            self._puts[priority](msg)
        self._nput[priority] += 1
        cdef uint64_t *cnt = &self._r.counts.put[priority]
        # single producer: a plain increment published with release (after the ring's)
        eng_store_release_u64(cnt, eng_load_relaxed_u64(cnt) + 1)
        _ring_bell(self._r)

    def _put_later(self, msg, int priority, delay, at):
        cdef int64_t wall, now, due
        wall = eng_wall_ns()   # wall first, then monotonic: never early (see docs)
        now = eng_now_ns()
        if delay is not None and at is not None:
            raise ValueError("give delay or at, not both")
        if delay is not None:
            d = float(delay)
            if d != d:
                raise ValueError("delay must be a number of seconds")
            due = now + <int64_t>(d * 1e9) if d > 0 else now
        else:
            a = float(at)
            if a != a:
                raise ValueError("at must be a wall-clock time in seconds")
            due = now + (<int64_t>(a * 1e9) - wall)
        if due <= now:
            return self.put(msg, priority)
        if self._puts is None:
            self._open_producers()
        self._dput(_with_header(due, msg, 16, <uint32_t>priority))
        self._nput[priority] += 1
        eng_fetch_add_u64(&self._r.bell.delayed, 1)
        _ring_bell(self._r)

    # ---- the level choice -----------------------------------------------
    cdef object _level_take(self, int i):
        """Non-timestamped: the next message of level i, or None."""
        cdef object m
        cdef uint64_t p
        if self._nlocal[i]:
            self._nlocal[i] -= 1
            return (<object>self._local[i]).popleft()[1]
        if self._eof[i]:
            return None
        p = eng_load_acquire_u64(&self._r.counts.put[i])
        if p == self._seen[i]:
            return None   # nothing put since the ring was last seen empty
        try:
            m = self._gets[i]()
        except Closed:
            self._eof[i] = 1
            return None
        if m is None:
            # empty now: every message counted in p was consumed (by someone)
            self._seen[i] = p
        else:
            self._seen[i] += 1
        return m

    cdef object _ring_read(self, int i):
        """One record of level i's ring, using the put-count hint (raw record)."""
        cdef uint64_t p = eng_load_acquire_u64(&self._r.counts.put[i])
        if p == self._seen[i]:
            return None
        try:
            rec = self._gets[i]()
        except Closed:
            self._eof[i] = 1
            return None
        if rec is None:
            self._seen[i] = p
        else:
            self._seen[i] += 1
        return rec

    cdef int64_t _peek_ts(self, int i) except -2:
        """Read-ahead modes: enqueue time of level i's head (0 without
        timestamps; -1: empty)."""
        if self._nlocal[i]:
            return (<object>self._local[i])[0][0]
        if self._heads[i] is not None:
            return self._head_ts[i]
        if self._eof[i]:
            return -1
        rec = self._ring_read(i)
        if rec is None:
            return -1
        if self._ts:
            self._head_ts[i] = _ts_of(rec)
            self._heads[i] = rec[8:]
        else:   # read-ahead only for the head's size (weighted by bytes)
            self._head_ts[i] = 0
            self._heads[i] = rec
        return self._head_ts[i]

    cdef object _pop_head(self, int i):
        """Timestamped: remove and return level i's head (peeked before)."""
        if self._nlocal[i]:
            self._nlocal[i] -= 1
            return (<object>self._local[i]).popleft()[1]
        m = self._heads[i]
        self._heads[i] = None
        return m

    cdef object _take(self):
        """The next message by policy, or None if every level is empty."""
        cdef int i, k, n = self._n
        cdef int64_t now, ts, best_ts
        cdef int best
        cdef object m
        if self._gets is None:
            self._open_consumers()
        # delayed messages: drain the delay ring when the counter moved,
        # move those that are due to their level
        if self._dmany is not None:
            if eng_load_acquire_u64(&self._r.bell.delayed) != self._dseen:
                self._drain_delayed()
            if self._next_due != 0x7FFFFFFFFFFFFFFF and eng_now_ns() >= self._next_due:
                self._promote()
        if self._ts:
            # aging: an overdue head of a less urgent level (1..n-1) goes
            # first, the longest-waiting one if several.  Level 0 does not
            # age: nothing outranks it, and letting its own backlog age would
            # turn the queue into FIFO under overload and starve the others.
            now = eng_now_ns()
            best = -1
            best_ts = 0
            for i in range(1, n):
                ts = self._peek_ts(i)
                if ts >= 0 and now - ts >= self._age_ns and (best < 0 or ts < best_ts):
                    best = i
                    best_ts = ts
            if best >= 0:
                if best != 0:
                    for i in range(best):
                        if self._peek_ts(i) >= 0:
                            self._aged += 1
                            break
                self._ngot[best] += 1
                return self._pop_head(best)
            if self._policy == _STRICT:
                for i in range(n):
                    if self._peek_ts(i) >= 0:
                        self._ngot[i] += 1
                        return self._pop_head(i)
                return None
        if self._policy == _STRICT:
            for i in range(n):
                m = self._level_take(i)
                if m is not None:
                    self._ngot[i] += 1
                    return m
            return None
        if self._bytes:
            return self._take_bytes()
        # weighted: deficit round robin by count.  Level i takes up to w[i]
        # messages per turn; an empty level forfeits the rest of its turn.
        i = self._rr
        for k in range(n + 1):
            if self._credit[i] <= 0:
                self._credit[i] = self._w[i]
            if self._ts:
                m = self._pop_head(i) if self._peek_ts(i) >= 0 else None
            else:
                m = self._level_take(i)
            if m is None:
                self._credit[i] = 0
                i += 1
                if i == n:
                    i = 0
                continue
            self._credit[i] -= 1
            self._ngot[i] += 1
            if self._credit[i] <= 0:
                self._rr = i + 1 if i + 1 < n else 0
            else:
                self._rr = i
            return m
        return None

    cdef Py_ssize_t _head_len(self, int i) except -1:
        if self._nlocal[i]:
            return len((<object>self._local[i])[0][1])
        return len(self._heads[i])

    cdef object _take_bytes(self):
        """Weighted by bytes: deficit round robin (Shreedhar & Varghese).
        Each visit to a non-empty level adds w[i] * quantum bytes of credit;
        the level is served while its head fits in the credit; an empty level
        loses its credit.  Heads are read ahead to know their size."""
        cdef int i = self._rr, k, n = self._n
        cdef Py_ssize_t size
        cdef bint any_
        while True:
            any_ = False
            for k in range(n):
                if self._peek_ts(i) >= 0:
                    any_ = True
                    if not self._visited:
                        self._credit[i] += self._w[i] * self._quantum
                        self._visited = True
                    size = self._head_len(i)
                    if size <= self._credit[i]:
                        self._credit[i] -= size
                        self._rr = i
                        self._ngot[i] += 1
                        return self._pop_head(i)
                else:
                    self._credit[i] = 0
                i = i + 1 if i + 1 < n else 0
                self._visited = False
            if not any_:
                self._rr = i
                return None

    cdef int _drain_delayed(self) except -1:
        cdef uint64_t seen = eng_load_acquire_u64(&self._r.bell.delayed)
        cdef int64_t due
        cdef uint32_t level
        if self._deof:
            self._dseen = seen
            return 0
        while True:
            try:
                recs = self._dmany(1024, 0)
            except Closed:
                self._deof = True
                break
            if not recs:
                break
            for rec in recs:
                due, level, payload = split_delayed(rec)
                if level >= <uint32_t>self._n:
                    raise EngineError(f"corrupt delay record: level {level} >= {self._n}")
                self._hseq += 1
                _heapq.heappush(self._heap, (due, self._hseq, level, payload))
        self._dseen = seen
        self._next_due = self._heap[0][0] if self._heap else 0x7FFFFFFFFFFFFFFF
        return 0

    cdef int _promote(self) except -1:
        cdef int64_t now = eng_now_ns()
        heap = self._heap
        while heap and heap[0][0] <= now:
            due, _, level, payload = _heapq.heappop(heap)
            (<object>self._local[level]).append((due, payload))
            self._nlocal[level] += 1
        self._next_due = heap[0][0] if heap else 0x7FFFFFFFFFFFFFFF
        return 0

    cdef int _drained(self) except -1:
        """Every level and the delay ring closed and nothing left here."""
        cdef int i
        if self._heap:
            return False
        if self._dmany is not None and not self._deof:
            self._drain_delayed()   # sets _deof once the delay ring is closed and empty
            if not self._deof or self._heap:
                return False
        for i in range(self._n):
            if self._nlocal[i] or self._heads[i] is not None:
                return False
        for i in range(self._n):
            if self._eof[i]:
                continue
            # a close does not move the put count: ask the ring itself
            try:
                rec = self._gets[i]()
            except Closed:
                self._eof[i] = 1
                continue
            if rec is not None:   # arrived meanwhile: keep it for the next take
                self._seen[i] += 1
                if self._ts:
                    (<object>self._local[i]).append((_ts_of(rec), rec[8:]))
                else:
                    (<object>self._local[i]).append((0, rec))
                self._nlocal[i] += 1
            return False
        return True

    # ---- get ------------------------------------------------------------
    def try_get(self):
        """The next message by policy, or None if nothing is ready now
        (``Closed`` once the producer closed and everything was served)."""
        self._check()
        m = self._take()
        if m is None and self._drained():
            raise Closed("the producer closed the queue and every message has been served")
        return m

    def get(self, timeout=None):
        """The next message by policy, waiting up to ``timeout`` seconds
        (None: as long as it takes) -> ``engine.Timeout``; ``engine.Closed``
        once the producer closed and everything was served."""
        self._check()
        m = self._take()
        if m is not None:
            return m
        return self._wait_take(_deadline(timeout), timeout)

    cdef object _wait_take(self, int64_t deadline, object timeout):
        cdef int64_t now, ns
        cdef uint32_t seq
        cdef eng_sched_region_t *r
        cdef _Region keep
        while True:
            self._check()
            r = self._r
            keep = self._reg
            seq = eng_load_acquire_u32(&r.bell.seq)
            eng_fetch_add_seqcst_u32(&r.bell.waiters, 1)
            try:
                m = self._take()
                if m is None and self._drained():
                    raise Closed("the producer closed the queue and every message has been served")
            except BaseException:
                eng_fetch_sub_seqcst_u32(&r.bell.waiters, 1)
                raise
            if m is not None:
                eng_fetch_sub_seqcst_u32(&r.bell.waiters, 1)
                return m
            now = eng_now_ns()
            if deadline >= 0 and now >= deadline:
                eng_fetch_sub_seqcst_u32(&r.bell.waiters, 1)
                raise Timeout(f"no message within {timeout} s")
            ns = _SLICE_NS
            if deadline >= 0 and deadline - now < ns:
                ns = deadline - now
            if self._next_due != 0x7FFFFFFFFFFFFFFF and self._next_due - now < ns:
                ns = self._next_due - now
                if ns < 1:
                    ns = 1
            with nogil:
                eng_futex_wait(&r.bell.seq, seq, ns)
            eng_fetch_sub_seqcst_u32(&r.bell.waiters, 1)
            PyErr_CheckSignals()

    def get_many(self, Py_ssize_t max=1024, timeout=0):
        """Up to ``max`` messages in policy order.  ``timeout=0`` never
        blocks (may return ``[]``); otherwise waits like ``get`` for the
        first one (``None``: forever), then takes what is ready."""
        self._check()
        if max < 1:
            raise ValueError(f"max must be >= 1, not {max}")
        cdef list out = []
        cdef int i
        cdef Py_ssize_t room
        cdef uint64_t p
        m = self._take()
        if m is None:
            if timeout is not None and timeout == 0:
                if self._drained():
                    raise Closed("the producer closed the queue and every message has been served")
                return out
            try:
                m = self._wait_take(_deadline(timeout), timeout)
            except Timeout:
                return out
        out.append(m)
        if not self._ts and not self._bytes and self._policy == _STRICT and not self._heap:
            # strict without aging: whole batches from the most urgent level
            # that has anything (each batch is one ring call)
            for i in range(self._n):
                while len(out) < max and self._nlocal[i]:
                    out.append(self._level_take(i))
                    self._ngot[i] += 1
                room = max - len(out)
                if room <= 0:
                    break
                if self._eof[i]:
                    continue
                p = eng_load_acquire_u64(&self._r.counts.put[i])
                if p == self._seen[i]:
                    continue
                try:
                    got = self._many[i](room, 0)
                except Closed:
                    self._eof[i] = 1
                    continue
                if len(got) < room:
                    self._seen[i] = p   # drained: everything counted in p is consumed
                else:
                    self._seen[i] += len(got)
                if got:
                    self._ngot[i] += len(got)
                    out.extend(got)
                    if len(got) == room:
                        break
            return out
        while len(out) < max:
            m = self._take()
            if m is None:
                break
            out.append(m)
        return out

    def _due_in(self):
        """Seconds until the earliest delayed message this handle holds comes
        due (None: it holds none); engine.aio sleeps no longer than this."""
        cdef int64_t left
        if self._next_due == 0x7FFFFFFFFFFFFFFF:
            return None
        left = self._next_due - eng_now_ns()
        return left / 1e9 if left > 1000 else 1e-6

    def _core_counts(self):
        """(put per level, got per level, aged) for stats()."""
        cdef int i
        return ([self._nput[i] for i in range(self._n)],
                [self._ngot[i] for i in range(self._n)], self._aged,
                len(self._heap), [self._nlocal[i] for i in range(self._n)])

    def _open_producers(self):  # overridden in Python
        raise NotImplementedError

    def _open_consumers(self):  # overridden in Python
        raise NotImplementedError


# ---------------------------------------------------------------------------
# KeyedQueue core (producer side)
# ---------------------------------------------------------------------------


cdef class _KQCore:
    """Per-message producer path of :class:`engine.KeyedQueue`."""

    cdef _Region _reg           # control region
    cdef eng_sched_region_t *_r # doorbell, NULL after close
    cdef uint64_t _np           # partitions
    cdef object _keyfn          # key function or None
    cdef list _puts             # producer put per partition, None until the first put
    cdef uint64_t _nput         # messages put by this handle

    def _core_setup(self, _Region reg, int partitions, keyfn):
        if partitions < 1 or <uint32_t>partitions > ENG_SCHED_MAX_PARTS:
            raise ValueError(f"partitions must be 1..{ENG_SCHED_MAX_PARTS}, not {partitions}")
        self._reg = reg
        self._r = reg.r
        self._np = partitions
        self._keyfn = keyfn

    def _core_set_producers(self, list puts):
        if <uint64_t>len(puts) != self._np:
            raise ValueError("one producer per partition")
        self._puts = puts

    def _core_close(self):
        self._r = NULL
        self._puts = None

    cpdef int partition_of(self, key) except -1:
        """The partition a key maps to (stable across processes and runs)."""
        return <int>(stable_hash(key) % self._np)

    def put(self, msg, key=None, delay=None, at=None):
        """Enqueue ``msg``; messages with equal keys keep their order and go
        to the same partition (so to one consumer at a time).  ``key`` may be
        omitted when the queue has a key function.  ``delay``/``at`` as for
        PriorityQueue (a delayed message is ordered by its due time)."""
        if self._r == NULL:
            raise Closed("the queue is closed")
        if self._reg._gen != eng_fork_generation():
            raise _inherited("queue", self._reg.pid)
        if key is None:
            if self._keyfn is None:
                raise TypeError("put() needs key= (or create the KeyedQueue with key=function)")
            key = self._keyfn(msg)
        cdef int p = <int>(stable_hash(key) % self._np)
        if delay is not None or at is not None:
            return self._put_later(msg, p, delay, at)
        if self._puts is None:
            self._open_producers()
        self._puts[p](msg)
        self._nput += 1
        _ring_bell(self._r)

    def _put_later(self, msg, int p, delay, at):
        raise NotImplementedError

    def _open_producers(self):
        raise NotImplementedError

    @property
    def _put_count(self):
        return self._nput
