# Sharded counters: cache-line-padded int64 cells in private or shared memory.
#
# ``add`` is one atomic read-modify-write on the caller's shard (picked from
# the kernel thread id), so adders on different threads or processes rarely
# touch the same cache line; ``value`` sums the shards.  Each handle caches a
# pointer to the caller's cell keyed by (Python thread state, fork
# generation), so a repeated ``add`` from the same thread costs a compare, not
# a TLS lookup; the hot ``add`` methods are ``binding=False`` (a plain builtin
# method: CPython calls it directly, no bound-method object in between).  The
# layout lives in counter_layout.h; this module maps regions, validates them
# on attach and exposes ShardedCounter and CounterMap.
"""Sharded counters (compiled core of :mod:`engine.counters`)."""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_FromStringAndSize
from cpython.pystate cimport PyThreadState, PyThreadState_Get
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.errno cimport errno
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy
from posix.mman cimport (MAP_ANONYMOUS, MAP_FAILED, MAP_PRIVATE, MAP_SHARED, PROT_READ,
                         PROT_WRITE, mmap, munmap)
from posix.time cimport nanosleep, timespec
from posix.unistd cimport getpid

from eng_atomic cimport *

import os
import uuid

from engine._shm import SHM_DIR, region_path
from engine.errors import Closed, EngineError, IncompatibleRegion

include "reserve.pxi"


cdef extern from "counter_layout.h" nogil:
    uint64_t ENG_COUNTER_MAGIC
    uint32_t ENG_COUNTER_VERSION
    uint32_t ENG_COUNTER_KIND_COUNTER
    uint32_t ENG_COUNTER_KIND_MAP
    uint32_t ENG_COUNTER_BLOCK
    uint32_t ENG_COUNTER_MAX_SHARDS
    uint32_t ENG_COUNTER_MAX_CAPACITY
    uint32_t ENG_COUNTER_KEY_MAX
    uint32_t ENG_SLOT_EMPTY
    uint32_t ENG_SLOT_READY
    uint32_t ENG_SLOT_BUSY
    uint32_t ENG_SLOT_DEAD

    ctypedef struct eng_counter_header:
        uint64_t magic          # ENG_COUNTER_MAGIC, stored last by the creator
        uint32_t version        # layout version
        uint32_t kind           # counter or map
        uint32_t shards         # cells per counter, a power of two
        uint32_t capacity       # map slots, a power of two (0: counter)
        uint64_t total_size     # bytes of the whole region
        uint64_t used           # map: keys inserted
        uint64_t created_ns     # wall clock at creation
        int32_t creator_pid     # informational
        uint32_t key_max        # inline key bytes per slot

    ctypedef struct eng_counter_slot:
        uint64_t state          # ENG_SLOT_* | claimer pid << 32 while busy
        uint64_t hash           # stable hash of (flags, key)
        uint32_t keylen         # key bytes used
        uint32_t flags          # 1: str key, 0: bytes key
        uint8_t key[1]          # ENG_COUNTER_KEY_MAX bytes in C

    uint64_t eng_counter_row_stride(uint32_t capacity) noexcept
    uint64_t eng_counter_region_size(uint32_t kind, uint32_t shards, uint32_t capacity) noexcept
    int eng_cell_add(int64_t *cell, int64_t n) noexcept
    void eng_cell_fetch_add(int64_t *cell, int64_t n) noexcept
    int64_t eng_cell_exchange(int64_t *cell, int64_t v) noexcept
    int64_t eng_cell_load(const int64_t *cell) noexcept
    void eng_cells_sum(const char *first, uint64_t stride, uint32_t n,
                       int64_t *hi_out, uint64_t *lo_out) noexcept
    uint32_t eng_counter_thread_tag() noexcept
    int eng_counter_install_atfork() noexcept
    uint32_t eng_counter_fork_generation() noexcept
    uint64_t eng_counter_hash(const uint8_t *key, uint32_t n, uint32_t flags) noexcept


if eng_counter_install_atfork() != 0:
    raise ImportError("engine._counter: pthread_atfork failed")

KEY_MAX = ENG_COUNTER_KEY_MAX
MAX_SHARDS = ENG_COUNTER_MAX_SHARDS
MAX_CAPACITY = ENG_COUNTER_MAX_CAPACITY
_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1


class CounterMapFull(EngineError, ValueError):
    """Every slot of a :class:`CounterMap` holds a key; a new key has no room.

    ``capacity`` is the number of slots.  Create the map again with a larger
    ``capacity`` (keep it about twice the number of keys you expect).
    """

    def __init__(self, name, capacity):
        self.name = name
        self.capacity = capacity
        super().__init__(
            f"counter map {name if name is not None else '(private)'!r} is full: all {capacity} slots hold keys; "
            "re-create it with a larger capacity (about 2x the expected keys)"
        )


# ---------------------------------------------------------------------------
# regions



def _next_pow2(n):
    p = 1
    while p < n:
        p <<= 1
    return p


def _default_shards(per_cpu, lo, hi):
    ncpu = os.cpu_count() or 1
    return max(lo, min(hi, _next_pow2(per_cpu * ncpu)))


def _check_shards(shards, default):
    if shards is None:
        return default
    if not isinstance(shards, int) or isinstance(shards, bool):
        raise TypeError(f"shards must be an int, not {type(shards).__name__}")
    if shards < 1 or shards > ENG_COUNTER_MAX_SHARDS:
        raise ValueError(f"shards must be in 1..{ENG_COUNTER_MAX_SHARDS}, got {shards}")
    return _next_pow2(shards)


def _check_capacity(capacity):
    if not isinstance(capacity, int) or isinstance(capacity, bool):
        raise TypeError(f"capacity must be an int, not {type(capacity).__name__}")
    if capacity < 2 or capacity > ENG_COUNTER_MAX_CAPACITY:
        raise ValueError(f"capacity must be in 2..{ENG_COUNTER_MAX_CAPACITY}, got {capacity}")
    return _next_pow2(capacity)


cdef object _int128(int64_t hi, uint64_t lo):
    """A Python int from a two's-complement 128-bit (hi, lo)."""
    if (hi == 0 and lo < (<uint64_t>1 << 63)) or (hi == -1 and lo >= (<uint64_t>1 << 63)):
        return <int64_t>lo
    return (<object>hi << 64) + <object>lo


@cython.final
cdef class _Mapping:
    """One mapped region: anonymous (private) or a file under /dev/shm."""
    cdef char *base            # start of the mapping, NULL once unmapped
    cdef size_t size           # bytes mapped
    cdef public object name    # shared name, None for private memory

    def __dealloc__(self):
        self.unmap()

    cdef int unmap(self) except -1:
        if self.base != NULL:
            munmap(self.base, self.size)
            self.base = NULL
        return 0

    cdef int map_fd(self, int fd, size_t size) except -1:
        cdef void *p
        if fd < 0:
            p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        else:
            p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
        if p == MAP_FAILED:
            err = errno
            raise OSError(err, f"mmap of {size} bytes failed: {os.strerror(err)}")
        self.base = <char *>p
        self.size = size
        return 0

    cdef eng_counter_header *header(self):
        return <eng_counter_header *>self.base


cdef int _init_header(char *base, uint32_t kind, uint32_t shards, uint32_t capacity,
                      uint64_t size) except -1:
    cdef eng_counter_header *h = <eng_counter_header *>base
    h.version = ENG_COUNTER_VERSION
    h.kind = kind
    h.shards = shards
    h.capacity = capacity
    h.total_size = size
    h.used = 0
    h.created_ns = <uint64_t>eng_wall_ns()
    h.creator_pid = <int32_t>os.getpid()
    h.key_max = ENG_COUNTER_KEY_MAX
    # release: whoever reads the magic sees every field above.
    eng_store_release_u64(&h.magic, ENG_COUNTER_MAGIC)
    return 0


cdef _Mapping _new_private(uint32_t kind, uint32_t shards, uint32_t capacity):
    cdef uint64_t size = eng_counter_region_size(kind, shards, capacity)
    cdef _Mapping m = _Mapping()
    m.map_fd(-1, size)
    _init_header(m.base, kind, shards, capacity, size)
    m.name = None
    return m


cdef _Mapping _create_shared(str name, uint32_t kind, uint32_t shards, uint32_t capacity):
    """Create the region under a temporary name, fill its header, then link it
    into place: an attacher never sees a half-initialised region, and link()
    fails if the name exists (exclusive create)."""
    path = region_path(name)
    cdef uint64_t size = eng_counter_region_size(kind, shards, capacity)
    tmp = os.path.join(os.path.dirname(path), f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    cdef _Mapping m = _Mapping()
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        os.fchmod(fd, 0o600)
        _reserve_file(fd, size)  # ENOSPC here, not SIGBUS in an add
        m.map_fd(fd, size)
        _init_header(m.base, kind, shards, capacity, size)
        os.link(tmp, path)
    except BaseException:
        m.unmap()
        raise
    finally:
        os.close(fd)
        os.unlink(tmp)
    m.name = name
    return m


_KIND_NAMES = {1: "ShardedCounter", 2: "CounterMap"}


def read_header(name):
    """Validate the region ``name`` and return its header as a dict.

    Raises :class:`engine.IncompatibleRegion` when the region is missing,
    foreign, truncated or corrupt.  Reads with ``pread``: nothing is mapped.
    """
    path = region_path(name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise IncompatibleRegion(name, f"no such region ({path}); create it first") from None
    try:
        return _validate(name, fd)
    finally:
        os.close(fd)


cdef dict _validate(str name, int fd):
    import stat as _stat
    import struct
    st = os.fstat(fd)
    if not _stat.S_ISREG(st.st_mode):
        raise IncompatibleRegion(name, "not a regular file")
    if st.st_size < ENG_COUNTER_BLOCK:
        raise IncompatibleRegion(name, f"truncated: {st.st_size} bytes, header needs {ENG_COUNTER_BLOCK}")
    raw = os.pread(fd, ENG_COUNTER_BLOCK, 0)
    if len(raw) < ENG_COUNTER_BLOCK:
        raise IncompatibleRegion(name, "truncated while reading the header")
    magic, version, kind, shards, capacity, total, used, created, pid, key_max = struct.unpack_from(
        "<QIIIIQQQiI", raw)
    if magic != ENG_COUNTER_MAGIC:
        raise IncompatibleRegion(name, "not a queue-engine counter region (bad magic)")
    if version != ENG_COUNTER_VERSION:
        raise IncompatibleRegion(
            name, f"layout version {version}, this build reads {ENG_COUNTER_VERSION}")
    if kind not in _KIND_NAMES:
        raise IncompatibleRegion(name, f"unknown kind {kind}")
    if shards < 1 or shards > ENG_COUNTER_MAX_SHARDS or shards & (shards - 1):
        raise IncompatibleRegion(name, f"corrupt header: shards={shards}")
    if key_max != ENG_COUNTER_KEY_MAX:
        raise IncompatibleRegion(name, f"corrupt header: key_max={key_max}")
    expect = eng_counter_region_size(kind, shards, capacity)
    if expect == 0:
        raise IncompatibleRegion(name, f"corrupt header: capacity={capacity} for kind {kind}")
    if total != expect:
        raise IncompatibleRegion(name, f"corrupt header: size field {total}, layout needs {expect}")
    if st.st_size != expect:
        raise IncompatibleRegion(
            name, f"truncated or padded: file has {st.st_size} bytes, layout needs {expect}")
    return {"name": name, "kind": _KIND_NAMES[kind], "version": version, "shards": shards,
            "capacity": capacity, "size_bytes": total, "used": used, "created_ns": created,
            "creator_pid": pid}


cdef _Mapping _attach_shared(str name, uint32_t kind):
    path = region_path(name)
    try:
        fd = os.open(path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise IncompatibleRegion(name, f"no such region ({path}); create it first") from None
    cdef _Mapping m = _Mapping()
    try:
        info = _validate(name, fd)
        if info["kind"] != _KIND_NAMES[kind]:
            raise IncompatibleRegion(
                name, f"region is a {info['kind']}, not a {_KIND_NAMES[kind]}")
        m.map_fd(fd, info["size_bytes"])
    finally:
        os.close(fd)
    m.name = name
    return m


# how _open_region gets its region
cdef enum:
    _OPEN_CREATE = 1          # create the shared region; FileExistsError if it exists
    _OPEN_ATTACH = 2          # attach an existing shared region
    _OPEN_EITHER = 3          # attach it, creating it first if it is missing


cdef _Mapping _open_region(object name, uint32_t kind, uint32_t shards, uint32_t capacity,
                           int how, bint same_shards):
    """The one way a ShardedCounter or CounterMap gets its mapping.

    ``how`` says create, attach or either; with either, ``name`` None means
    private memory (create/attach reject None like any non-str name), and
    ``same_shards`` (the caller asked for a shard count) refuses an existing
    region with a different one.
    """
    if how == _OPEN_EITHER and name is None:
        return _new_private(kind, shards, capacity)
    if how == _OPEN_ATTACH:
        return _attach_shared(name, kind)
    if how == _OPEN_CREATE:
        return _create_shared(name, kind, shards, capacity)
    region_path(name)   # a bad name is a ValueError/TypeError, not an attach attempt
    try:
        return _create_shared(name, kind, shards, capacity)
    except FileExistsError:
        pass
    cdef _Mapping m = _attach_shared(name, kind)
    if same_shards and m.header().shards != shards:
        raise IncompatibleRegion(name, f"exists with {m.header().shards} shards, asked for {shards}")
    return m


def unlink_region(name):
    """Remove the shared region ``name`` (mappings still open stay valid)."""
    os.unlink(region_path(name))


# ---------------------------------------------------------------------------
# ShardedCounter

cdef class ShardedCounter:
    """An int64 counter split into cache-line-padded shards.

    ``add(n)`` is one atomic add on the caller's shard (chosen by thread and
    process, so two adders rarely share a cache line); ``value()`` sums the
    shards.  Exact: once every adder has returned, ``value()`` is the sum of
    everything added, across threads and processes, negative adds included.
    A shard that would leave int64 raises ``OverflowError`` and is left
    unchanged; nothing ever wraps.

    ``ShardedCounter()`` lives in private memory (threads of this process);
    ``ShardedCounter.create(name)`` / ``ShardedCounter.attach(name)`` in a file
    under /dev/shm (mode 0600) that any process of the same user can attach;
    ``ShardedCounter(name)`` attaches, creating the region if it is missing.

    >>> c = ShardedCounter()
    >>> c.add(5); c.add(-2); c.value()
    3
    """

    cdef _Mapping _map          # keeps the region mapped
    cdef char *_cells           # first cell, NULL once closed
    cdef uint32_t _mask         # shards - 1 (shards is a power of two)
    cdef int64_t *_my_cell      # the cell of the thread in _my_ts (cache; NULL: none)
    cdef PyThreadState *_my_ts  # thread state _my_cell was chosen for
    cdef uint32_t _my_gen       # fork generation _my_cell was chosen in

    def __init__(self, name=None, shards=None):
        self._open(name, shards, _OPEN_EITHER)

    cdef int _open(self, object name, object shards, int how) except -1:
        cdef _Mapping m = _open_region(
            name, ENG_COUNTER_KIND_COUNTER, _check_shards(shards, _default_shards(4, 32, 1024)),
            0, how, shards is not None)
        self._map = m
        self._cells = m.base + ENG_COUNTER_BLOCK
        self._mask = m.header().shards - 1
        self._my_cell = NULL
        self._my_ts = NULL
        return 0

    @classmethod
    def create(cls, name, shards=None):
        """Create the shared counter ``name`` (``FileExistsError`` if it exists)."""
        cdef ShardedCounter self = cls.__new__(cls)
        self._open(name, shards, _OPEN_CREATE)
        return self

    @classmethod
    def attach(cls, name):
        """Attach the shared counter ``name``; ``IncompatibleRegion`` if it is
        missing, foreign, truncated or corrupt."""
        cdef ShardedCounter self = cls.__new__(cls)
        self._open(name, None, _OPEN_ATTACH)
        return self

    @staticmethod
    def unlink(name):
        """Remove the shared counter ``name``; handles already open keep working."""
        unlink_region(name)

    cdef inline int _check_open(self) except -1:
        if self._cells == NULL:
            raise Closed("counter is closed")
        return 0

    cdef inline int64_t *_cell_of_caller(self) except NULL:
        # The cached cell while the same thread of the same process calls again
        # (a compare of two words); otherwise pick it from the thread id.  Under
        # free threading two threads may race on the cache and one may add to
        # the other's cell: still exact (every add is atomic), merely shared.
        cdef PyThreadState *ts = PyThreadState_Get()
        if ts == self._my_ts and self._my_gen == eng_counter_fork_generation():
            return self._my_cell
        if self._cells == NULL:
            raise Closed("counter is closed")
        self._my_gen = eng_counter_fork_generation()
        self._my_cell = <int64_t *>(
            self._cells + <size_t>(eng_counter_thread_tag() & self._mask) * ENG_COUNTER_BLOCK)
        self._my_ts = ts
        return self._my_cell

    @cython.binding(False)
    def add(self, n=1):
        """Add ``n`` (an int, may be negative) with one atomic op on this thread's shard."""
        if type(n) is not int and not isinstance(n, int):
            # explicit: Cython's C conversion would accept a float via __int__
            raise TypeError(f"n must be an int, not {type(n).__name__}")
        cdef int64_t v = n
        if eng_cell_add(self._cell_of_caller(), v) != 0:
            raise OverflowError(f"adding {n} would take a shard of the counter out of int64")

    def value(self):
        """The sum of every shard.  ``OverflowError`` if the total leaves int64."""
        self._check_open()
        cdef int64_t hi
        cdef uint64_t lo
        eng_cells_sum(self._cells, ENG_COUNTER_BLOCK, self._mask + 1, &hi, &lo)
        v = _int128(hi, lo)
        if v < _INT64_MIN or v > _INT64_MAX:
            raise OverflowError(f"counter total {v} is outside int64")
        return v

    def reset(self):
        """Set the counter to zero and return the total it held.

        Each shard is swapped atomically, so an add racing the reset is counted
        exactly once: in the returned total or in the counter afterwards.
        """
        self._check_open()
        cdef uint32_t i
        total = 0
        for i in range(self._mask + 1):
            total += eng_cell_exchange(<int64_t *>(self._cells + <size_t>i * ENG_COUNTER_BLOCK), 0)
        return total

    def shard_values(self):
        """The value held by each shard (diagnostics)."""
        self._check_open()
        cdef uint32_t i
        return [eng_cell_load(<int64_t *>(self._cells + <size_t>i * ENG_COUNTER_BLOCK))
                for i in range(self._mask + 1)]

    def current_shard(self):
        """The shard this thread adds to."""
        return eng_counter_thread_tag() & self._mask

    @property
    def name(self):
        """The shared name, or None for a private counter."""
        return self._map.name if self._map is not None else None

    @property
    def shards(self):
        """Number of cells (a power of two)."""
        return self._mask + 1

    @property
    def closed(self):
        """True once :meth:`close` ran."""
        return self._cells == NULL

    def stats(self):
        """A dict: name, shared, shards, value, shard values, bytes mapped."""
        cells = self.shard_values()
        return {"name": self.name, "shared": self.name is not None, "shards": len(cells),
                "value": sum(cells), "shard_values": cells,
                "busy_shards": sum(1 for c in cells if c), "size_bytes": self._map.size}

    def checkpoint(self, log):
        """Append the current value to ``log`` (an :class:`engine.Log`) as a
        record; returns its offset.  :meth:`restore` reads it back."""
        from engine.counters import _checkpoint
        return _checkpoint(self, log)

    def restore(self, log):
        """Set the counter to the value of its latest checkpoint in ``log`` (a
        :class:`engine.Log` or a log directory); returns that value, or None
        (counter unchanged) when the log holds no checkpoint of it."""
        from engine.counters import _restore
        return _restore(self, log)

    def _set(self, int64_t v):
        """Reset then store ``v`` in shard 0 (restore; not atomic with adders)."""
        self._check_open()
        self.reset()
        eng_cell_add(<int64_t *>self._cells, v)   # cannot overflow: the cell is 0

    def close(self):
        """Unmap the counter (the shared region itself stays; see :meth:`unlink`)."""
        self._cells = NULL
        self._my_cell = NULL
        self._my_ts = NULL      # no thread state is NULL: the next add misses and raises Closed
        if self._map is not None:
            self._map.unmap()

    def __enter__(self):
        self._check_open()
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __reduce__(self):
        if self.name is None:
            raise TypeError("a private ShardedCounter cannot be pickled; use ShardedCounter.create(name)")
        return (type(self).attach, (self.name,))

    def __repr__(self):
        if self._cells == NULL:
            return f"<ShardedCounter {self.name!r} closed>"
        return f"<ShardedCounter {self.name!r} shards={self.shards} value={self.value()}>"


@cython.final
cdef class _AtomicCell:
    """The benchmark's single-shared-cell reference (not public API).

    Attaches a shared ShardedCounter region of one shard and adds to that one
    int64 with a plain atomic fetch_add (one ``lock xadd`` on x86): the
    strongest form of "every adder on one cache line", with no overflow check
    and no shard choice.  ``add`` has the same signature, argument checks and
    call path as :meth:`ShardedCounter.add`, so the two differ only in where
    the add lands; ``nop`` runs the same call and checks and writes nothing:
    the ceiling of any add made by one Python call per increment.
    """

    cdef _Mapping _map          # keeps the region mapped
    cdef int64_t *_cell         # the one cell, NULL once closed

    def __init__(self, name):
        cdef _Mapping m = _open_region(name, ENG_COUNTER_KIND_COUNTER, 1, 0, _OPEN_ATTACH, False)
        if m.header().shards != 1:
            raise IncompatibleRegion(name, f"has {m.header().shards} shards; the reference needs 1")
        self._map = m
        self._cell = <int64_t *>(m.base + ENG_COUNTER_BLOCK)

    @cython.binding(False)
    def add(self, n=1):
        """Atomically add ``n`` (an int) to the one shared cell."""
        if type(n) is not int and not isinstance(n, int):
            raise TypeError(f"n must be an int, not {type(n).__name__}")
        cdef int64_t v = n
        if self._cell == NULL:
            raise Closed("cell is closed")
        eng_cell_fetch_add(self._cell, v)

    @cython.binding(False)
    def nop(self, n=1):
        """The call and checks of :meth:`add` without the add."""
        if type(n) is not int and not isinstance(n, int):
            raise TypeError(f"n must be an int, not {type(n).__name__}")
        cdef int64_t v = n
        if self._cell == NULL:
            raise Closed("cell is closed")

    def value(self):
        """The cell's value."""
        if self._cell == NULL:
            raise Closed("cell is closed")
        return eng_cell_load(self._cell)

    def close(self):
        """Unmap the cell."""
        self._cell = NULL
        self._map.unmap()


# ---------------------------------------------------------------------------
# CounterMap

cdef timespec _NAP
_NAP.tv_sec = 0
_NAP.tv_nsec = 50000

cdef class CounterMap:
    """Many named int64 counters in one region: open addressing, lock-free.

    Keys are ``bytes`` or ``str`` (up to ``KEY_MAX`` = 104 bytes, utf-8 for
    str; ``"a"`` and ``b"a"`` are different keys, as in a dict), hashed with
    a stable hash so every process finds the same slot.  A new key claims its
    slot with a compare-and-swap; each key's count is sharded like a
    :class:`ShardedCounter` (one row of cells per shard), with the same
    exactness and overflow rules.  ``capacity`` slots (a power of two) hold at
    most that many keys; a new key beyond that raises :class:`CounterMapFull`.
    Keep ``capacity`` about twice the keys you expect so probes stay short.

    ``CounterMap()`` lives in private memory; ``CounterMap.create(name)`` /
    ``CounterMap.attach(name)`` in a file under /dev/shm (mode 0600);
    ``CounterMap(name)`` attaches the region as it exists (its capacity and
    shards win), creating it with the given ones if it is missing.

    >>> m = CounterMap(capacity=64)
    >>> m.add("GET /"); m.add("GET /", 2); m.get("GET /")
    3
    >>> m.top(1)
    [('GET /', 3)]
    """

    cdef _Mapping _map          # keeps the region mapped
    cdef eng_counter_header *_hdr  # header, NULL once closed
    cdef char *_slots           # slot 0
    cdef char *_rows            # row 0 (shard 0's cells)
    cdef uint64_t _stride       # bytes between two rows
    cdef uint32_t _cap_mask     # capacity - 1
    cdef uint32_t _shard_mask   # shards - 1
    cdef char *_my_row          # the row of the thread in _my_ts (cache; NULL: none)
    cdef PyThreadState *_my_ts  # thread state _my_row was chosen for
    cdef uint32_t _my_gen       # fork generation _my_row was chosen in

    def __init__(self, name=None, capacity=1024, shards=None):
        # the existing region's capacity and shards win (documented above)
        self._open(name, capacity, shards, _OPEN_EITHER)

    cdef int _open(self, object name, object capacity, object shards, int how) except -1:
        cdef uint32_t cap = 2 if how == _OPEN_ATTACH else _check_capacity(capacity)
        cdef _Mapping m = _open_region(
            name, ENG_COUNTER_KIND_MAP, _check_shards(shards, _default_shards(2, 8, 64)),
            cap, how, False)
        cdef eng_counter_header *h = m.header()
        self._map = m
        self._hdr = h
        self._slots = m.base + ENG_COUNTER_BLOCK
        self._rows = self._slots + <size_t>h.capacity * ENG_COUNTER_BLOCK
        self._stride = eng_counter_row_stride(h.capacity)
        self._cap_mask = h.capacity - 1
        self._shard_mask = h.shards - 1
        self._my_row = NULL
        self._my_ts = NULL
        return 0

    @classmethod
    def create(cls, name, capacity=1024, shards=None):
        """Create the shared map ``name`` (``FileExistsError`` if it exists)."""
        cdef CounterMap self = cls.__new__(cls)
        self._open(name, capacity, shards, _OPEN_CREATE)
        return self

    @classmethod
    def attach(cls, name):
        """Attach the shared map ``name``; ``IncompatibleRegion`` if it is
        missing, foreign, truncated or corrupt."""
        cdef CounterMap self = cls.__new__(cls)
        self._open(name, None, None, _OPEN_ATTACH)
        return self

    @staticmethod
    def unlink(name):
        """Remove the shared map ``name``; handles already open keep working."""
        unlink_region(name)

    cdef inline int _check_open(self) except -1:
        if self._hdr == NULL:
            raise Closed("counter map is closed")
        return 0

    cdef inline eng_counter_slot *_slot(self, uint32_t i) noexcept:
        return <eng_counter_slot *>(self._slots + <size_t>i * ENG_COUNTER_BLOCK)

    cdef inline int64_t *_cell(self, uint32_t slot, uint32_t shard) noexcept:
        return <int64_t *>(self._rows + <size_t>shard * self._stride + <size_t>slot * 8)

    cdef Py_ssize_t _find(self, object key, bint insert) except -2:
        """Slot index of ``key``, inserting it when ``insert``; -1 if absent."""
        cdef const char *kp
        cdef Py_ssize_t kl
        cdef uint32_t flags
        if type(key) is str or isinstance(key, str):
            kp = PyUnicode_AsUTF8AndSize(key, &kl)
            flags = 1
        elif type(key) is bytes or isinstance(key, bytes):
            kp = PyBytes_AS_STRING(key)
            kl = PyBytes_GET_SIZE(key)
            flags = 0
        else:
            raise TypeError(f"key must be str or bytes, not {type(key).__name__}")
        if kl > ENG_COUNTER_KEY_MAX:
            raise ValueError(f"key is {kl} bytes; keys are limited to {ENG_COUNTER_KEY_MAX} bytes")
        cdef uint64_t h = eng_counter_hash(<const uint8_t *>kp, <uint32_t>kl, flags)
        cdef uint32_t i = <uint32_t>h & self._cap_mask
        cdef uint32_t probes = 0
        cdef eng_counter_slot *s
        cdef uint64_t st, want
        cdef int64_t t0 = 0
        cdef int32_t owner
        while probes <= self._cap_mask:
            s = self._slot(i)
            # acquire: a READY state publishes the key written before it.
            st = eng_load_acquire_u64(&s.state)
            if <uint32_t>st == ENG_SLOT_READY:
                if (s.hash == h and s.keylen == <uint32_t>kl and s.flags == flags
                        and memcmp(s.key, kp, kl) == 0):
                    return i
            elif <uint32_t>st == ENG_SLOT_EMPTY:
                if not insert:
                    return -1
                want = (<uint64_t><uint32_t>self._my_pid() << 32) | ENG_SLOT_BUSY
                if eng_cas_u64(&s.state, &st, want):
                    s.hash = h
                    s.keylen = <uint32_t>kl
                    s.flags = flags
                    memcpy(s.key, kp, kl)
                    # release: key, hash and length are visible before READY.
                    eng_store_release_u64(&s.state, ENG_SLOT_READY)
                    # relaxed: `used` is a statistic, nothing is ordered by it.
                    eng_fetch_add_relaxed_u64(&self._hdr.used, 1)
                    return i
                continue   # lost the race: look at what the winner wrote
            elif <uint32_t>st == ENG_SLOT_BUSY:
                # Another process is writing this slot's key (ours may be it):
                # wait for READY, or mark the slot DEAD if the writer died.
                if t0 == 0:
                    t0 = eng_now_ns()
                owner = <int32_t>(st >> 32)
                if not eng_pid_alive(owner):
                    eng_cas_u64(&s.state, &st, ENG_SLOT_DEAD)
                    continue
                if eng_now_ns() - t0 > 5000000000:
                    raise EngineError(
                        f"counter map {self._map.name!r}: slot {i} has been claimed by live "
                        f"pid {owner} for over 5 s; is that process stopped?")
                nanosleep(&_NAP, NULL)
                continue
            # DEAD or an unknown state (a corrupt region): never matches, skip.
            i = (i + 1) & self._cap_mask
            probes += 1
        if insert:
            raise CounterMapFull(self._map.name, self._cap_mask + 1)
        return -1

    cdef inline int32_t _my_pid(self) noexcept:
        # Only on the insert path: getpid() is a real syscall on modern glibc.
        return <int32_t>getpid()

    cdef object _sum(self, uint32_t slot):
        cdef int64_t hi
        cdef uint64_t lo
        eng_cells_sum(<const char *>self._cell(slot, 0), self._stride, self._shard_mask + 1, &hi, &lo)
        v = _int128(hi, lo)
        if v < _INT64_MIN or v > _INT64_MAX:
            raise OverflowError(f"counter total {v} is outside int64")
        return v

    cdef inline char *_row_of_caller(self) noexcept:
        # As ShardedCounter._cell_of_caller: the caller's row, cached per
        # (thread state, fork generation); the caller checked the map is open.
        cdef PyThreadState *ts = PyThreadState_Get()
        if ts != self._my_ts or self._my_gen != eng_counter_fork_generation():
            self._my_gen = eng_counter_fork_generation()
            self._my_row = self._rows + <size_t>(
                eng_counter_thread_tag() & self._shard_mask) * self._stride
            self._my_ts = ts
        return self._my_row

    @cython.binding(False)
    def add(self, key, n=1):
        """Add ``n`` to the counter ``key`` (created at 0 on first use)."""
        self._check_open()
        if type(n) is not int and not isinstance(n, int):
            raise TypeError(f"n must be an int, not {type(n).__name__}")
        cdef int64_t v = n
        cdef Py_ssize_t i = self._find(key, True)
        if eng_cell_add(<int64_t *>(self._row_of_caller() + <size_t>i * 8), v) != 0:
            raise OverflowError(f"adding {n} would take a shard of counter {key!r} out of int64")

    def get(self, key, default=0):
        """The value of ``key``, or ``default`` if the key was never added."""
        self._check_open()
        cdef Py_ssize_t i = self._find(key, False)
        if i < 0:
            return default
        return self._sum(<uint32_t>i)

    def __getitem__(self, key):
        return self.get(key)

    def __contains__(self, key):
        self._check_open()
        return self._find(key, False) >= 0

    cdef object _key(self, eng_counter_slot *s):
        cdef uint32_t kl = s.keylen
        if kl > ENG_COUNTER_KEY_MAX:      # corrupt region: never read past the slot
            kl = ENG_COUNTER_KEY_MAX
        raw = PyBytes_FromStringAndSize(<const char *>s.key, kl)
        if s.flags & 1:
            return raw.decode("utf-8", "replace")
        return raw

    def items(self):
        """A list of ``(key, value)`` for every key, in slot order."""
        self._check_open()
        out = []
        cdef uint32_t i
        cdef eng_counter_slot *s
        for i in range(self._cap_mask + 1):
            s = self._slot(i)
            if <uint32_t>eng_load_acquire_u64(&s.state) == ENG_SLOT_READY:
                out.append((self._key(s), self._sum(i)))
        return out

    def keys(self):
        """A list of every key."""
        return [k for k, _ in self.items()]

    def __iter__(self):
        return iter(self.keys())

    def top(self, k=10):
        """The ``k`` largest counters as ``(key, value)``, largest first."""
        import heapq
        return heapq.nlargest(k, self.items(), key=lambda kv: kv[1])

    def __len__(self):
        self._check_open()
        cdef uint32_t i, n = 0
        for i in range(self._cap_mask + 1):
            if <uint32_t>eng_load_acquire_u64(&self._slot(i).state) == ENG_SLOT_READY:
                n += 1
        return n

    def reset(self):
        """Zero every counter (keys stay); returns the dict of drained values."""
        self._check_open()
        out = {}
        cdef uint32_t i, j
        cdef eng_counter_slot *s
        for i in range(self._cap_mask + 1):
            s = self._slot(i)
            if <uint32_t>eng_load_acquire_u64(&s.state) == ENG_SLOT_READY:
                total = 0
                for j in range(self._shard_mask + 1):
                    total += eng_cell_exchange(self._cell(i, j), 0)
                out[self._key(s)] = total
        return out

    @property
    def name(self):
        """The shared name, or None for a private map."""
        return self._map.name if self._map is not None else None

    @property
    def capacity(self):
        """Number of slots (the most keys the map can hold)."""
        return self._cap_mask + 1

    @property
    def shards(self):
        """Cells per key (a power of two)."""
        return self._shard_mask + 1

    @property
    def closed(self):
        """True once :meth:`close` ran."""
        return self._hdr == NULL

    def stats(self):
        """A dict: name, shared, capacity, shards, keys, dead slots, bytes mapped."""
        self._check_open()
        cdef uint32_t i, n = 0, dead = 0, st
        for i in range(self._cap_mask + 1):
            st = <uint32_t>eng_load_acquire_u64(&self._slot(i).state)
            if st == ENG_SLOT_READY:
                n += 1
            elif st != ENG_SLOT_EMPTY:
                dead += 1
        return {"name": self.name, "shared": self.name is not None,
                "capacity": self._cap_mask + 1, "shards": self._shard_mask + 1, "keys": n,
                "unusable_slots": dead, "load": <double>n / (self._cap_mask + 1),
                "size_bytes": self._map.size}

    def checkpoint(self, log):
        """Append every ``(key, value)`` to ``log`` (an :class:`engine.Log`) as
        one record; returns its offset."""
        from engine.counters import _checkpoint
        return _checkpoint(self, log)

    def restore(self, log):
        """Set every counter to its value in the latest checkpoint in ``log``;
        returns the restored dict, or None (map unchanged) if there is none."""
        from engine.counters import _restore
        return _restore(self, log)

    def close(self):
        """Unmap the map (the shared region itself stays; see :meth:`unlink`)."""
        self._hdr = NULL
        self._my_row = NULL
        self._my_ts = NULL
        if self._map is not None:
            self._map.unmap()

    def __enter__(self):
        self._check_open()
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __reduce__(self):
        if self.name is None:
            raise TypeError("a private CounterMap cannot be pickled; use CounterMap.create(name)")
        return (type(self).attach, (self.name,))

    def __repr__(self):
        if self._hdr == NULL:
            return f"<CounterMap {self.name!r} closed>"
        return f"<CounterMap {self.name!r} capacity={self.capacity} keys={len(self)}>"
