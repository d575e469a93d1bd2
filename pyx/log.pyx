"""The segment log: an append-only, memory-mapped, CRC-framed log on disk.

One writer per directory (:class:`Log`), any number of readers in any process
(:class:`LogReader`).  The on-disk layout is pinned by ``pyx/log_layout.h``.

Decisions (documented for users in the class docstrings):

* Plain iteration over a reader is file-like: it stops at the current end.
  ``poll(timeout)`` waits for the next record (futex, GIL released).
* ``copy=False`` readers return values (and keys) as read-only ``memoryview``
  slices of the segment mapping.  The mapping is an ``mmap.mmap`` object the
  views keep alive, so a view never dangles, even after the reader closed or
  retention deleted the file; its bytes never change (segments are
  append-only).  By contract a view is only guaranteed until the reader's next
  call.
* Retention never unmaps under a reader: it unlinks files, and a mapped file
  stays readable.  A reader whose next record was deleted before it got there
  (or that is asked for an offset below the log's start) jumps forward to the
  oldest record still there and counts the records jumped over in
  ``reader.skipped`` (Kafka's ``auto.offset.reset=earliest``).
* Timestamps are wall-clock nanoseconds made non-decreasing by the writer (a
  clock stepping back repeats the last timestamp), so ``seek_time`` is exact.
* Frames: ``append`` writes one plain frame (32-byte header, key, value);
  ``append_many`` packs up to 128 records (64 KiB) in one batch frame with
  one header and one CRC, each record a few varint bytes plus its key and
  value (68 bytes for a 64-byte value against 96), and keeps a plain frame
  where it would hold one record.  Everything that checks frames (CRC,
  padding, end marker, recovery rules, the published word) is the same for
  both; a batch frame covers the offsets [offset, offset + span), so every
  walker steps by its span, and readers, seeks and ``seek_time`` walk its
  inner records (index entries point at frame starts).  A frame is written
  and published whole, so a torn batch is dropped whole.  Segments of the
  first format (version 1: plain frames only) are still read and appended
  to; see ``log_layout.h``.
"""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_CheckBuffer, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.exc cimport PyErr_CheckSignals
from cpython.object cimport PyObject
from cpython.ref cimport Py_XDECREF
from cpython.pythread cimport (NOWAIT_LOCK, PyThread_acquire_lock, PyThread_allocate_lock,
                               PyThread_free_lock, PyThread_release_lock, PyThread_type_lock)
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libc.errno cimport EINTR, EIO, errno
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcpy, memmove, memset
from posix.types cimport off_t

from crc32c cimport eng_crc32c, eng_crc32c_have_hw, eng_crc32c_hw, eng_crc32c_init, eng_crc32c_sw, eng_crc32c_word_x3
from eng_atomic cimport *

import errno as _errno
import json as _json
import logging as _logging
import mmap as _mmap
import os as _os
import re as _re
import struct as _struct
import threading as _threading
import time as _time
import uuid as _uuid
import weakref as _weakref

from engine._fsutil import (atomic_write as _atomic_write, check_durability as _check_durability,
                            fsync_dir as _fsync_dir, make_dirs as _make_dirs)
from engine.errors import Closed, CorruptLog, EngineError, LogBroken, LogLocked

cdef extern from "log_layout.h" nogil:
    int ENG_LOG_FORMAT
    int ENG_LOG_FORMAT_MIN
    int ENG_SEG_VERSION
    int ENG_SEG_VERSION_MIN
    int ENG_REC_FLAG_EOS
    int ENG_REC_FLAG_KEY
    int ENG_REC_FLAG_BATCH
    int ENG_REC_FLAG_TOMBSTONE
    int ENG_REC_FLAG_HOLE
    int ENG_INNER_KEY
    int ENG_INNER_TOMBSTONE
    int ENG_INNER_KNOWN
    int ENG_REC_FLAGS_KNOWN
    int ENG_INDEX_INTERVAL
    uint32_t ENG_NOTIFY_MAGIC
    ctypedef struct eng_rec_header:
        uint32_t length
        uint32_t crc
        uint64_t offset
        int64_t timestamp_ns
        uint32_t key_len
        uint32_t flags
    int eng_log_sync_range(int fd, void *addr, size_t length) noexcept
    int ENG_LOG_PWRITE
    int eng_log_pwrite_all(int fd, const void *buf, size_t length, uint64_t off) noexcept
    ctypedef struct eng_log_zf:
        int fd
        uint64_t done
        uint64_t bytes
        uint32_t failed
        int err
    int eng_log_zf_start(eng_log_zf *z, uint64_t step, int64_t idle_ns) noexcept
    int eng_log_zf_retarget(eng_log_zf *z, int fd, uint64_t size, uint64_t done) noexcept
    void eng_log_zf_push(eng_log_zf *z, uint64_t target) noexcept
    void eng_log_zf_enter(eng_log_zf *z, uint64_t end) noexcept
    int eng_log_zf_stop(eng_log_zf *z) noexcept
    int eng_log_zf_fs_ok(int fd) noexcept
    int eng_log_datasync(int fd) noexcept
    ctypedef struct eng_notify:
        uint32_t magic
        uint32_t seq
        uint32_t waiters
        uint64_t active_base
        uint64_t published
        uint64_t published_next

cdef extern from "<sys/mman.h>" nogil:
    int msync(void *addr, size_t length, int flags)
    int MS_SYNC

cdef extern from *:
    """
    /* The writer's prefaulter (mapping path): a plain C thread, never holding
     * the GIL, keeps the active segment's pages from its mark `pf` up to the
     * appender's `target` faulted in and writable with MADV_POPULATE_WRITE
     * (Linux 5.14+), 256 KiB per call.  Only zero pages past the published
     * tail are touched, and populating never changes a byte, so it races with
     * no append.  `mu` is held around each madvise and by every change of the
     * mapping (retarget, stop), so the thread never touches an unmapped range.
     * The appender only stores `target` and bumps `seq` (no lock).
     * It also drops the page table entries of the segment a roll retired
     * (MADV_DONTNEED, between prefault steps): the pages stay in the page
     * cache, dirty ones stay dirty, and the munmap that follows on the
     * appending thread has no entries left to tear down (~4 ms for 64 MiB).
     *
     * Written blocks ahead: while the appender asks for it (`wb_on`: a log
     * synced often, a few KiB a sync), the thread also starts the writeback
     * of the zero pages it populated (sync_file_range WRITE, through its own
     * descriptor `fd`, never below `wb_from`: the appender's tail plus a
     * gap, past the pages it is filling).  On ext4 and xfs a fallocated segment is unwritten extents: a
     * sync whose pages lie in them converts them too (metadata, ~60 us more
     * a sync on ext4/virtio), and a sync every few KiB reaches a fresh page
     * every few syncs.  Written back ahead of time, the conversion goes with
     * one sync per chunk instead.  It only starts I/O of zeros past the tail
     * (no wait, no flush): what a crash leaves there reads as zeros either
     * way, a page the appender fills meanwhile is written again by its own
     * sync, and a device error reaches the appender's next sync (the file's
     * error state), where it belongs.  A refused call (EINVAL: a file system
     * without it) stops the writeback, nothing else. */
    #if defined(__linux__)
    #include <fcntl.h>
    #include <pthread.h>
    #include <sys/mman.h>
    #ifndef MADV_POPULATE_WRITE
    #define MADV_POPULATE_WRITE 23
    #endif
    #define ENG_LOG_PF_HAVE 1
    #else
    #define ENG_LOG_PF_HAVE 0
    #endif
    #define ENG_LOG_PF_CHUNK (256u << 10)
    #define ENG_LOG_ZAP_CHUNK (4u << 20)

    /* A record's CRC32C (its length word, then the n bytes after the crc
     * field; n is a multiple of 8) for the write path: one call, the length
     * word folded in, no lanes below 3 lanes' worth (the bytes of one append). */
    #if ENG_CRC_X86
    __attribute__((target("sse4.2")))
    static uint32_t eng_log_rec_crc_hw(uint32_t length, const uint8_t *p, size_t n) {
        uint64_t c = _mm_crc32_u32(0xFFFFFFFFu, length);
        for (const uint8_t *e = p + n; p < e; p += 8) {
            uint64_t w;
            memcpy(&w, p, 8);
            c = _mm_crc32_u64(c, w);
        }
        return ~(uint32_t)c;
    }
    #endif
    /* The offset append() returns, as a Python int, without an allocation
     * per call: *slot keeps the last one made; while nothing else refers to
     * it (reference count 1: a caller that kept the previous offset holds a
     * second reference) nobody can observe it, so its one 30-bit digit is
     * set to the new offset and it is returned again.  Only one-digit
     * positive values at least ENG_LOG_INT_MIN are ever reused (never a
     * shared small int, never a change of the digit count), only where the
     * int layout is the one below and the GIL guards the count; anything
     * else takes PyLong_FromLongLong.  Returns a new reference (NULL with an
     * exception set on MemoryError). */
    #define ENG_LOG_INT_MIN (1 << 10)
    #if !defined(Py_GIL_DISABLED) && !defined(PYPY_VERSION) && PYLONG_BITS_IN_DIGIT == 30
    #define ENG_LOG_INT_REUSE 1
    #if PY_VERSION_HEX >= 0x030C0000
    #define ENG_LOG_DIGIT0(o) (((PyLongObject *)(o))->long_value.ob_digit[0])
    #else
    #if PY_VERSION_HEX < 0x030B0000
    #include <longintrepr.h>
    #endif
    #define ENG_LOG_DIGIT0(o) (((PyLongObject *)(o))->ob_digit[0])
    #endif
    #else
    #define ENG_LOG_INT_REUSE 0
    #endif
    static PyObject *eng_log_offset_int(PyObject **slot, int64_t off) {
    #if ENG_LOG_INT_REUSE
        PyObject *o = *slot;
        int fits = off >= ENG_LOG_INT_MIN && off < ((int64_t)1 << 30);
        if (fits && o != NULL && Py_REFCNT(o) == 1) {
            ENG_LOG_DIGIT0(o) = (digit)off;
            Py_INCREF(o);
            return o;
        }
    #endif
        PyObject *n = PyLong_FromLongLong((long long)off);
    #if ENG_LOG_INT_REUSE
        if (n != NULL && fits && Py_REFCNT(n) == 1) {
            Py_INCREF(n);
            Py_XSETREF(*slot, n);
        }
    #endif
        return n;
    }

    /* Little-endian stores of the index files' fields (any host). */
    static inline void eng_log_put_le32(uint8_t *p, uint32_t v) {
        p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); p[2] = (uint8_t)(v >> 16); p[3] = (uint8_t)(v >> 24);
    }
    static inline void eng_log_put_le64(uint8_t *p, uint64_t v) {
        eng_log_put_le32(p, (uint32_t)v);
        eng_log_put_le32(p + 4, (uint32_t)(v >> 32));
    }

    static inline uint32_t eng_log_rec_crc(uint32_t length, const uint8_t *p, size_t n) {
    #if ENG_CRC_X86
        if (eng_crc32c_have_hw && n < 3 * ENG_CRC_LANE) return eng_log_rec_crc_hw(length, p, n);
    #endif
        return eng_crc32c(eng_crc32c(0, &length, 4), p, n);
    }

    typedef struct {
    #if ENG_LOG_PF_HAVE
        pthread_mutex_t mu;
        pthread_t thread;
    #endif
        uint8_t *p;          /* mapping of the active segment (NULL: none) */
        size_t size;         /* its bytes */
        size_t pf;           /* pages below this were populated */
        int fd;              /* its own descriptor of the active segment (-1: none) */
        size_t wb;           /* pages below this were written back, or are not to be */
        uint32_t wb_on;      /* atomic, appender: write back the pages populated */
        uint64_t wb_from;    /* atomic, appender: never write back below this */
        uint64_t wb_bytes;   /* statistics (atomic): bytes whose writeback it started */
        uint64_t target;     /* appender: populate up to here (atomic) */
        uint32_t seq;        /* futex word: bumped by every push and by stop */
        uint32_t stop;       /* atomic: the thread returns */
        uint32_t failed;     /* atomic: the kernel refused the advice; the thread returned */
        uint8_t *zap_p;      /* retired mapping whose entries go (NULL: none) */
        size_t zap_size;
        size_t zap_at;       /* bytes of it done */
        uint32_t zap_done;   /* atomic: the retired mapping has no entries left */
        int started;
    } eng_log_pf;

    #if ENG_LOG_PF_HAVE
    static void *eng_log_pf_main(void *arg) {
        eng_log_pf *f = (eng_log_pf *)arg;
        for (;;) {
            uint32_t seen = __atomic_load_n(&f->seq, __ATOMIC_ACQUIRE);
            int worked = 0;
            pthread_mutex_lock(&f->mu);
            if (__atomic_load_n(&f->stop, __ATOMIC_ACQUIRE)) {
                pthread_mutex_unlock(&f->mu);
                return NULL;
            }
            size_t hi = (size_t)__atomic_load_n(&f->target, __ATOMIC_ACQUIRE);
            if (hi > f->size) hi = f->size;
            hi &= ~(size_t)4095;
            if (f->p != NULL && f->pf < hi) {
                size_t lo = f->pf & ~(size_t)4095;
                if (hi - lo > ENG_LOG_PF_CHUNK) hi = lo + ENG_LOG_PF_CHUNK;
                if (madvise(f->p + lo, hi - lo, MADV_POPULATE_WRITE) != 0) {
                    __atomic_store_n(&f->failed, 1, __ATOMIC_RELEASE);
                    pthread_mutex_unlock(&f->mu);
                    return NULL;
                }
                f->pf = hi;
                worked = 1;
            } else if (f->p != NULL && f->fd >= 0 && f->wb < f->pf &&
                       __atomic_load_n(&f->wb_on, __ATOMIC_ACQUIRE)) {
                size_t from = (size_t)__atomic_load_n(&f->wb_from, __ATOMIC_ACQUIRE);
                size_t lo = (f->wb > from ? f->wb : from) & ~(size_t)4095;
                size_t end = f->pf;
                if (end > lo && end - lo > ENG_LOG_PF_CHUNK) end = lo + ENG_LOG_PF_CHUNK;
                if (end > lo) {
                    if (sync_file_range(f->fd, (off_t)lo, (off_t)(end - lo), SYNC_FILE_RANGE_WRITE) != 0) {
                        end = (size_t)-1;  /* refused: none from now on (the appender's syncs do it all) */
                    } else {
                        __atomic_fetch_add(&f->wb_bytes, (uint64_t)(end - lo), __ATOMIC_RELAXED);
                    }
                } else {
                    end = f->pf;
                }
                f->wb = end;
                worked = 1;
            } else if (f->zap_p != NULL) {
                size_t n = f->zap_size - f->zap_at;
                if (n > ENG_LOG_ZAP_CHUNK) n = ENG_LOG_ZAP_CHUNK;
                /* a failure leaves the entries to munmap: nothing lost */
                (void)madvise(f->zap_p + f->zap_at, n, MADV_DONTNEED);
                f->zap_at += n;
                if (f->zap_at >= f->zap_size) {
                    f->zap_p = NULL;
                    __atomic_store_n(&f->zap_done, 1, __ATOMIC_RELEASE);
                }
                worked = 1;
            }
            pthread_mutex_unlock(&f->mu);
            if (!worked) eng_futex_wait(&f->seq, seen, 100000000LL);
        }
    }
    #endif

    /* 0 once the thread runs; -1 where there is none (platform, pthread error). */
    static int eng_log_pf_start(eng_log_pf *f) {
    #if ENG_LOG_PF_HAVE
        if (f->started) return 0;
        f->fd = -1;
        if (pthread_mutex_init(&f->mu, NULL) != 0) return -1;
        if (pthread_create(&f->thread, NULL, eng_log_pf_main, f) != 0) {
            pthread_mutex_destroy(&f->mu);
            return -1;
        }
        f->started = 1;
        return 0;
    #else
        (void)f;
        return -1;
    #endif
    }

    /* Point the thread at a mapping (p may be NULL: none) and its file
     * (fd: a descriptor the thread owns from now on, -1: none); waits out a
     * call in flight on the previous one.  Returns the previous descriptor
     * (-1: none) for the caller to close. */
    static int eng_log_pf_retarget(eng_log_pf *f, uint8_t *p, size_t size, size_t pf, int fd) {
    #if ENG_LOG_PF_HAVE
        if (!f->started) return fd;
        pthread_mutex_lock(&f->mu);
        int old = f->fd;
        f->p = p;
        f->size = size;
        f->pf = pf;
        f->fd = fd;
        f->wb = pf;
        __atomic_store_n(&f->target, 0, __ATOMIC_RELEASE);
        __atomic_store_n(&f->wb_from, (uint64_t)pf, __ATOMIC_RELEASE);
        pthread_mutex_unlock(&f->mu);
        return old;
    #else
        (void)f; (void)p; (void)size; (void)pf;
        return fd;
    #endif
    }

    /* Hand the thread a retired mapping to drop the entries of; the caller
     * keeps it mapped until zap_done (or until eng_log_pf_stop returned). */
    static void eng_log_pf_zap(eng_log_pf *f, uint8_t *p, size_t size) {
    #if ENG_LOG_PF_HAVE
        if (!f->started) return;
        pthread_mutex_lock(&f->mu);
        f->zap_p = p;
        f->zap_size = size;
        f->zap_at = 0;
        __atomic_store_n(&f->zap_done, 0, __ATOMIC_RELEASE);
        pthread_mutex_unlock(&f->mu);
        __atomic_fetch_add(&f->seq, 1, __ATOMIC_SEQ_CST);
        eng_futex_wake(&f->seq, 1);
    #else
        (void)f; (void)p; (void)size;
    #endif
    }

    static inline uint64_t eng_log_pf_wb_bytes(eng_log_pf *f) {
        return __atomic_load_n(&f->wb_bytes, __ATOMIC_RELAXED);
    }

    /* Populate up to `target`; `wb_on`: write back what is populated, from
     * `wb_from` on (see above). */
    static inline void eng_log_pf_push(eng_log_pf *f, size_t target, int wb_on, size_t wb_from) {
        __atomic_store_n(&f->wb_from, (uint64_t)wb_from, __ATOMIC_RELEASE);
        __atomic_store_n(&f->wb_on, (uint32_t)(wb_on != 0), __ATOMIC_RELEASE);
        __atomic_store_n(&f->target, (uint64_t)target, __ATOMIC_RELEASE);
        __atomic_fetch_add(&f->seq, 1, __ATOMIC_SEQ_CST);
        eng_futex_wake(&f->seq, 1);
    }

    /* Stop and join the thread (idempotent); returns its descriptor (-1:
     * none) for the caller to close. */
    static int eng_log_pf_stop(eng_log_pf *f) {
    #if ENG_LOG_PF_HAVE
        if (!f->started) return -1;
        pthread_mutex_lock(&f->mu);
        f->p = NULL;
        f->zap_p = NULL;
        __atomic_store_n(&f->stop, 1, __ATOMIC_RELEASE);
        pthread_mutex_unlock(&f->mu);
        __atomic_fetch_add(&f->seq, 1, __ATOMIC_SEQ_CST);
        eng_futex_wake(&f->seq, 1);
        pthread_join(f->thread, NULL);
        pthread_mutex_destroy(&f->mu);
        f->started = 0;
        int fd = f->fd;
        f->fd = -1;
        return fd;
    #else
        (void)f;
        return -1;
    #endif
    }
    """
    int ENG_LOG_PF_HAVE
    uint32_t eng_log_rec_crc(uint32_t length, const uint8_t *p, size_t n) noexcept nogil
    object eng_log_offset_int(PyObject **slot, int64_t off)
    void eng_log_put_le32(uint8_t *p, uint32_t v) noexcept nogil
    void eng_log_put_le64(uint8_t *p, uint64_t v) noexcept nogil
    ctypedef struct eng_log_pf:
        uint8_t *p
        int fd
        int started
        uint32_t failed
        uint32_t zap_done
    int eng_log_pf_start(eng_log_pf *f) noexcept nogil
    void eng_log_pf_zap(eng_log_pf *f, uint8_t *p, size_t size) noexcept nogil
    int eng_log_pf_retarget(eng_log_pf *f, uint8_t *p, size_t size, size_t pf, int fd) noexcept nogil
    void eng_log_pf_push(eng_log_pf *f, size_t target, int wb_on, size_t wb_from) noexcept nogil
    int eng_log_pf_stop(eng_log_pf *f) noexcept nogil
    uint64_t eng_log_pf_wb_bytes(eng_log_pf *f) noexcept nogil

cdef extern from "<unistd.h>" nogil:
    int fdatasync(int fd)
    ssize_t pread(int fd, void *buf, size_t count, off_t offset)
    int fsync(int fd)

eng_crc32c_init()

_logger = _logging.getLogger("engine")
_aio_mod = None  # engine.aio, imported on first async call


def _aio():
    global _aio_mod
    if _aio_mod is None:
        from engine import aio
        _aio_mod = aio
    return _aio_mod


FORMAT_VERSION = ENG_LOG_FORMAT
SEGMENT_VERSION = ENG_SEG_VERSION
RECORD_HEADER_SIZE = 32
SEGMENT_HEADER_SIZE = 64
DEF_SEGMENT_BYTES = 64 << 20

cdef size_t _HDR = 32        # record header bytes
cdef size_t _SEGHDR = 64     # segment header bytes
cdef size_t _PAGE = _mmap.PAGESIZE
cdef size_t _MIN_SEGMENT = 4096
cdef size_t _STAGE_KEEP = 4 << 20    # staging buffer kept between calls up to this size
# mapping path: a background C thread keeps the pages from the tail up to
# _PF_AHEAD past it faulted in and writable (eng_log_pf), pushed each time the
# tail has moved _PF_STEP: a first write to a page of a fallocated segment
# costs ~1 us in the kernel (page allocated, zeroed, page_mkwrite), 25-50 ns
# per 96-byte append when the appending thread pays it
cdef size_t _PF_AHEAD = 4 << 20
cdef size_t _PF_STEP = 1 << 20
cdef size_t _PF_OFF = <size_t>-1     # _pf_due when no prefaulter runs
# and, while the log syncs often (at least _PF_WB_SYNCS syncs since the last
# push, at most _PF_WB_SYNC_BYTES of appends a sync on average), starts the
# writeback of the pages it populated, from _PF_WB_GAP past the tail (written
# blocks ahead, see eng_log_pf).  Measured here (bench/saga_threads.py
# --ab-writeback, ext4 on virtio): 8 threads' sagas, ~1.2 KiB a sync, synced
# in 163-250 us instead of 227-267 us, a median 1.06x the sagas/s
# (0.97-1.32x); a bulk log, syncing seldom, writes no zeros (they would
# double the bytes its device writes)
cdef uint64_t _PF_WB_SYNCS = 16
cdef size_t _PF_WB_SYNC_BYTES = 64 << 10
cdef size_t _PF_WB_GAP = 64 << 10
cdef bint _writeback_ahead = True    # test/bench hook: False keeps the prefaulter from writing back


def _set_writeback_ahead(on):
    """Test/bench hook: whether mapping-path logs start the writeback of the
    zero pages ahead of the tail while they sync often (see _PF_WB_SYNCS);
    read at each push of the prefaulter."""
    global _writeback_ahead
    _writeback_ahead = bool(on)
# largest key or value (its length fits the 32-bit length word); typed, so the
# check is a C comparison, not two Python integers made per call
cdef size_t _MAX_FIELD = 0xFFFF0000
# append_many: a batch frame holds at most this many records, so every
# offset delta is one varint byte (a 64 B value without a key: 68 bytes, plus
# a 32-byte header per 128 records: 68.3 bytes a record), and a seek inside a
# frame walks at most 127 inner records
cdef uint64_t _FRAME_RECORDS = 128
# ... and at most this many bytes (a record that alone would pass it goes in
# a plain frame, where its header is noise)
cdef size_t _FRAME_MAX = 64 << 10
# fewest bytes an inner record takes (body_len, attr, offset and ts deltas):
# bounds how many offsets a run of bytes can hold
cdef size_t _MIN_INNER = 4
# durable (pwrite) path: a background C thread writes zeros over the active
# segment from the tail up to _ZF_AHEAD past it, _ZF_STEP bytes a write, each
# write after _ZF_IDLE_NS without an append (eng_log_zf in log_layout.h: a sync
# into written blocks commits no extent change); pushed each time the tail has
# moved _ZF_PUSH.  Measured here (bench/log_zero_ahead.py, 1000 x 64 B
# batches, ext4 on virtio): bursts of 10 batches 5 ms apart, median batch
# 0.31-0.33 ms off, 0.27-0.30 ms on (floor/log 0.89-0.94 -> 0.92-1.03);
# back-to-back batches even within noise (the zeros wait for pauses; written
# during a burst they took its bandwidth: 0.65-0.85x of the floor, against
# 0.90-0.96x without zeros)
cdef size_t _ZF_AHEAD_DEF = 4 << 20
cdef size_t _ZF_STEP_DEF = 512 << 10
cdef size_t _ZF_AHEAD = _ZF_AHEAD_DEF
cdef size_t _ZF_MIN_AHEAD = 128 << 10  # a log's first window, doubled each push up to _ZF_AHEAD:
                                       # a small log (a journal's) costs few zeros
cdef size_t _ZF_STEP = _ZF_STEP_DEF
cdef size_t _ZF_PUSH = _ZF_STEP_DEF
cdef int64_t _ZF_IDLE_NS = 1_000_000
cdef size_t _ZF_OFF = <size_t>-1     # _zf_due when no zeroer runs
cdef bint _zero_ahead = True         # test/bench hook: False keeps the zeroer off
# a sync moves the checkpoint (the recovery point) at most this often: three
# more device flushes (temp file, rename, directory) a second
cdef int64_t _CKPT_EVERY_NS = 1_000_000_000


def _set_zero_ahead(on, ahead=None, step=None):
    """Test/bench hook: whether durable logs opened from now on zero ahead of
    the tail in the background (where the file system has unwritten
    extents), how far ahead at most and how many bytes a write (a multiple
    of 4096; the push distance follows it); None: the default."""
    global _zero_ahead, _ZF_AHEAD, _ZF_STEP, _ZF_PUSH
    if ahead is None:
        ahead = _ZF_AHEAD_DEF
    if step is None:
        step = _ZF_STEP_DEF
    if ahead <= 0 or step <= 0 or step % 4096:
        raise ValueError("ahead must be positive and step a positive multiple of 4096")
    _zero_ahead = bool(on)
    _ZF_AHEAD = ahead
    _ZF_STEP = step
    _ZF_PUSH = step

_SEG_RE = _re.compile(r"^(\d{20})\.seg$")
_GROUP_RE = _re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SEG_HEADER = _struct.Struct("<8sIIQQ16sqII")
_INDEX_HEADER = _struct.Struct("<8sQIIII")
_CHECKPOINT = _struct.Struct("<8sQQQII")
_GROUP = _struct.Struct("<8sQI")        # first format: magic, offset, crc
_GROUP2 = _struct.Struct("<8sQQI4x")    # magic, offset, epoch (truncations known at the reader's open), crc
_SEG_MAGIC = b"QELOGSG1"
_IDX_MAGIC = b"QELOGIX1"
_TIX_MAGIC = b"QELOGTX1"
_CKPT_MAGIC = b"QELOGCK1"
_GROUP_MAGIC = b"QELOGGR1"
_GROUP2_MAGIC = b"QELOGGR2"

# in-process registry of directories with an open writer: fcntl/flock alone
# would let a second Log in the same process through on some platforms.
_open_writers = set()
_sync_hook = None

# scan / check outcomes
cdef enum:
    R_END = 0       # zero length word: nothing written here (yet)
    R_REC = 1       # a valid record
    R_EOS = 2       # a valid end-of-segment marker
    R_BAD = -1      # an invalid record (reason in *why)

# reasons for R_BAD
cdef enum:
    W_NONE = 0
    W_NO_ROOM = 1
    W_LENGTH = 2
    W_KEYLEN = 3
    W_FLAGS = 4
    W_CRC = 5
    W_OFFSET = 6
    W_EOS = 7
    W_SPAN = 8
    W_INNER = 9

_WHY = {
    W_NO_ROOM: "segment ends without an end-of-segment marker",
    W_LENGTH: "record length out of bounds",
    W_KEYLEN: "key length out of bounds",
    W_FLAGS: "unknown record flags",
    W_CRC: "CRC32C mismatch",
    W_OFFSET: "record offset out of sequence",
    W_EOS: "malformed end-of-segment marker",
    W_SPAN: "batch frame span out of bounds",
    W_INNER: "malformed records inside a batch frame",
}


cdef inline size_t _align8(size_t n) noexcept nogil:
    return (n + 7) & ~(<size_t>7)


cdef inline uint32_t _rec_crc(const uint8_t *rec, uint32_t length) noexcept nogil:
    # length word first, then everything after the crc field up to the padded end
    cdef uint32_t c = eng_crc32c(0, &length, 4)
    return eng_crc32c(c, rec + 8, _align8(length) - 8)


# ---- batch frames (see log_layout.h): varints and inner records.  Every
# read is bounds-checked against the frame: the bytes may be hostile.

ctypedef struct _Frame:
    uint64_t span       # offsets the frame covers (1 for a plain frame)
    uint64_t count      # records in it
    int64_t last_ts     # timestamp of its last record


ctypedef struct _Inner:
    size_t key          # position of the key
    size_t klen
    size_t value        # position of the value
    size_t vlen
    size_t next         # position after this inner record
    uint64_t delta      # offset - the frame's offset
    uint64_t tsd        # timestamp - the frame's timestamp
    uint32_t attr       # ENG_INNER_* bits


cdef inline int _uvarint(const uint8_t *p, size_t *at, size_t end, uint64_t *out) noexcept nogil:
    """Decode the unsigned LEB128 varint at p[at[0]], which must end before
    `end`: 0 (at[0] moves past it), or -1 when it runs past `end` or 64 bits."""
    cdef uint64_t v = 0
    cdef unsigned int shift = 0
    cdef size_t i = at[0]
    cdef uint8_t b
    while i < end:
        b = p[i]
        i += 1
        if shift == 63 and b > 1:
            return -1
        v |= (<uint64_t>(b & 0x7F)) << shift
        if b < 0x80:
            at[0] = i
            out[0] = v
            return 0
        shift += 7
        if shift > 63:
            return -1
    return -1


cdef inline size_t _varint_len(uint64_t v) noexcept nogil:
    cdef size_t n = 1
    while v >= 0x80:
        v >>= 7
        n += 1
    return n


cdef inline size_t _put_varint(uint8_t *q, uint64_t v) noexcept nogil:
    """Write v as an unsigned LEB128 varint at q; returns its bytes."""
    cdef size_t n = 0
    while v >= 0x80:
        q[n] = <uint8_t>(v | 0x80)
        v >>= 7
        n += 1
    q[n] = <uint8_t>v
    return n + 1


cdef inline int _inner_at(const uint8_t *p, size_t at, size_t end, _Inner *r) noexcept nogil:
    """Parse the inner record at p[at] of a batch body ending at `end`: 0, or
    -1 when it is malformed (a field runs past its record or the body, an
    unknown attr bit, a tombstone without a key or with a value)."""
    cdef uint64_t blen, klen = 0
    cdef size_t bend
    if _uvarint(p, &at, end, &blen) != 0 or blen == 0 or blen > end - at:
        return -1
    bend = at + <size_t>blen
    r.attr = p[at]
    at += 1
    if r.attr & ~(<uint32_t>ENG_INNER_KNOWN):
        return -1
    if _uvarint(p, &at, bend, &r.delta) != 0 or _uvarint(p, &at, bend, &r.tsd) != 0:
        return -1
    if r.attr & ENG_INNER_KEY:
        if _uvarint(p, &at, bend, &klen) != 0 or klen > bend - at:
            return -1
    elif r.attr & ENG_INNER_TOMBSTONE:
        return -1
    r.key = at
    r.klen = <size_t>klen
    r.value = at + <size_t>klen
    r.vlen = bend - r.value
    if r.attr & ENG_INNER_TOMBSTONE and r.vlen:
        return -1
    r.next = bend
    return 0


cdef inline int _inner_ok(const _Inner *r, uint64_t n, uint64_t prev_delta, uint64_t prev_tsd,
                          uint64_t span, int64_t base_ts) noexcept nogil:
    """1 when the n-th inner record (from 0) keeps the batch rules after the
    one before it: offset deltas strictly increasing and < span, timestamps
    non-decreasing and within int64."""
    if r.delta >= span or (n and r.delta <= prev_delta) or r.tsd < prev_tsd:
        return 0
    # base + tsd <= INT64_MAX, in uint64 arithmetic (base may be negative)
    return r.tsd <= <uint64_t>0x7FFFFFFFFFFFFFFF - <uint64_t>base_ts


cdef int _batch_walk(const uint8_t *p, size_t pos, uint32_t length, _Frame *fi) noexcept nogil:
    """Check every inner record of the batch frame at pos (header and CRC
    already checked): 0 with fi's count and last_ts filled in, -1 when any
    is malformed or the body is not exactly a run of inner records."""
    cdef const eng_rec_header *h = <const eng_rec_header *>(p + pos)
    cdef size_t at = pos + _HDR
    cdef size_t end = pos + length
    cdef uint64_t n = 0, prev_delta = 0, prev_tsd = 0
    cdef _Inner r
    while at < end:
        if _inner_at(p, at, end, &r) != 0 or not _inner_ok(&r, n, prev_delta, prev_tsd, h.key_len, h.timestamp_ns):
            return -1
        prev_delta = r.delta
        prev_tsd = r.tsd
        n += 1
        at = r.next
    if n == 0:
        return -1
    fi.count = n
    fi.last_ts = <int64_t>(<uint64_t>h.timestamp_ns + prev_tsd)
    return 0


cdef inline int _hdr_check(const eng_rec_header *h, uint32_t length) noexcept nogil:
    """Header fields that need no CRC: W_NONE or the reason they are bad."""
    if h.flags & ~(<uint32_t>ENG_REC_FLAGS_KNOWN):
        return W_FLAGS
    if h.flags & ENG_REC_FLAG_BATCH:
        if h.flags != <uint32_t>ENG_REC_FLAG_BATCH:
            return W_FLAGS
        if h.key_len == 0 or length - _HDR < _MIN_INNER:
            return W_SPAN
    elif h.flags & ENG_REC_FLAG_HOLE:
        # a bare header covering key_len removed offsets
        if h.flags != <uint32_t>ENG_REC_FLAG_HOLE or length != _HDR:
            return W_FLAGS
        if h.key_len == 0:
            return W_SPAN
    elif h.key_len > length - _HDR:
        return W_KEYLEN
    elif h.flags & ENG_REC_FLAG_TOMBSTONE and (not (h.flags & ENG_REC_FLAG_KEY) or length != _HDR + h.key_len):
        return W_FLAGS  # a tombstone has a key and no value
    return W_NONE


cdef inline int _frame_check(const uint8_t *p, size_t size, size_t pos, uint64_t expect,
                             bint check_crc, int *why, _Frame *fi) noexcept nogil:
    """Classify the frame at pos; never reads outside [0, size).  For R_REC
    fi says what the frame holds; with check_crc a batch frame's inner
    records are checked too (without, count is its span and last_ts its
    base timestamp: a probe)."""
    cdef uint32_t length
    cdef const eng_rec_header *h
    if pos > size or size - pos < _HDR:
        why[0] = W_NO_ROOM
        return R_BAD
    # acquire: pairs with the writer's release store of the length word
    length = eng_load_acquire_u32(<const uint32_t *>(p + pos))
    if length == 0:
        return R_END
    if length < _HDR or _align8(length) > size - pos:
        why[0] = W_LENGTH
        return R_BAD
    h = <const eng_rec_header *>(p + pos)
    why[0] = _hdr_check(h, length)
    if why[0] != W_NONE:
        return R_BAD
    if check_crc and _rec_crc(p + pos, length) != h.crc:
        why[0] = W_CRC
        return R_BAD
    if h.offset != expect:
        why[0] = W_OFFSET
        return R_BAD
    if h.flags & ENG_REC_FLAG_EOS:
        if length != _HDR or h.flags != <uint32_t>ENG_REC_FLAG_EOS:
            why[0] = W_EOS
            return R_BAD
        return R_EOS
    fi.last_ts = h.timestamp_ns
    if h.flags & ENG_REC_FLAG_BATCH:
        fi.span = h.key_len
        fi.count = h.key_len
        if check_crc and _batch_walk(p, pos, length, fi) != 0:
            why[0] = W_INNER
            return R_BAD
    elif h.flags & ENG_REC_FLAG_HOLE:
        fi.span = h.key_len
        fi.count = 0
    else:
        fi.span = 1
        fi.count = 1
    return R_REC


cdef inline int _rec_check(const uint8_t *p, size_t size, size_t pos, uint64_t expect,
                           bint check_crc, int *why) noexcept nogil:
    """_frame_check for callers that need only the class."""
    cdef _Frame fi
    return _frame_check(p, size, pos, expect, check_crc, why, &fi)


cdef inline size_t _check3(const uint8_t *p, size_t size, size_t pos, uint64_t expect) noexcept nogil:
    """Bytes taken by the three records at pos when all three are valid
    ordinary records (offsets expect, expect + 1, expect + 2), else 0: the
    scans' fast step, whose CRCs run interleaved.  0 says nothing about which
    check failed: the caller then classifies one record with _rec_check."""
    cdef const uint8_t *q[3]
    cdef size_t n[3]
    cdef uint32_t w[3]
    cdef uint32_t c[3]
    cdef const eng_rec_header *h
    cdef size_t at = pos
    cdef size_t padded
    cdef int i
    for i in range(3):
        if at > size or size - at < _HDR:
            return 0
        # acquire: pairs with the writer's release store of the length word
        w[i] = eng_load_acquire_u32(<const uint32_t *>(p + at))
        padded = _align8(w[i])
        h = <const eng_rec_header *>(p + at)
        if (w[i] < _HDR or padded > size - at or h.key_len > w[i] - _HDR
                or h.flags & ~(<uint32_t>ENG_REC_FLAG_KEY) or h.offset != expect + <uint64_t>i):
            return 0
        q[i] = p + at + 8
        n[i] = padded - 8
        at += padded
    eng_crc32c_word_x3(w, q, n, c)
    for i in range(3):
        if c[i] != (<const eng_rec_header *>(q[i] - 8)).crc:
            return 0
    return at - pos


cdef inline size_t _write_rec(uint8_t *p, size_t pos, uint64_t off, int64_t ts,
                              const char *k, uint32_t klen, uint32_t flags,
                              const char *v, size_t vlen) noexcept nogil:
    """Write one record at pos (room already checked); returns its padded size."""
    cdef eng_rec_header *h = <eng_rec_header *>(p + pos)
    cdef uint32_t length = <uint32_t>(_HDR + klen + vlen)
    cdef size_t padded = _align8(length)
    h.offset = off
    h.timestamp_ns = ts
    h.key_len = klen
    h.flags = flags
    if klen:
        memcpy(p + pos + _HDR, k, klen)
    if vlen:
        memcpy(p + pos + _HDR + klen, v, vlen)
    if padded != length:
        memset(p + pos + length, 0, padded - length)
    h.crc = eng_log_rec_crc(length, p + pos + 8, padded - 8)  # the same sum as _rec_crc
    # release: every byte above is visible before a reader can see the length
    eng_store_release_u32(&h.length, length)
    return padded


cdef inline size_t _seal_frame(uint8_t *f, uint64_t off, int64_t ts, uint32_t key_len,
                               uint32_t flags, uint32_t length) noexcept nogil:
    """Finish the frame at f whose body is in place: header, padding, CRC,
    then the length word (release); returns its padded size."""
    cdef eng_rec_header *h = <eng_rec_header *>f
    cdef size_t padded = _align8(length)
    h.offset = off
    h.timestamp_ns = ts
    h.key_len = key_len
    h.flags = flags
    if padded != length:
        memset(f + length, 0, padded - length)
    h.crc = _rec_crc(f, length)
    eng_store_release_u32(&h.length, length)
    return padded


cdef size_t _last_nonzero(const uint8_t *p, size_t pos, size_t size) noexcept nogil:
    """Index one past the last non-zero byte in [pos, size), or pos if all zero."""
    cdef size_t i = size
    while i > pos and (i & 7):
        if p[i - 1]:
            return i
        i -= 1
    # zeros are the common case (a segment's unwritten tail): 32 bytes a step
    while i >= pos + 32 and ((<const uint64_t *>(p + i - 8))[0] | (<const uint64_t *>(p + i - 16))[0] |
                             (<const uint64_t *>(p + i - 24))[0] | (<const uint64_t *>(p + i - 32))[0]) == 0:
        i -= 32
    while i >= pos + 8 and (<const uint64_t *>(p + i - 8))[0] == 0:
        i -= 8
    while i > pos:
        if p[i - 1]:
            return i
        i -= 1
    return pos


cdef Py_ssize_t _valid_after(const uint8_t *p, size_t size, size_t pos, uint64_t expect) noexcept nogil:
    """Position of a valid frame or end marker after pos (8-byte aligned,
    CRC32C correct, an offset that fits the bytes between: in [expect,
    expect + (q - pos) / _MIN_INNER]), or -1.  Damage followed by valid data
    is corruption, not a torn tail: a torn write leaves nothing valid after it."""
    cdef size_t end = _last_nonzero(p, pos, size)
    cdef size_t q = pos + 8
    cdef uint32_t length
    cdef const eng_rec_header *h
    cdef _Frame fi
    while q + _HDR <= end:
        length = (<const uint32_t *>(p + q))[0]
        if length >= _HDR and _align8(length) <= size - q:
            h = <const eng_rec_header *>(p + q)
            if (h.offset >= expect and h.offset - expect <= (q - pos) // _MIN_INNER
                    and _hdr_check(h, length) == W_NONE
                    and _rec_crc(p + q, length) == h.crc
                    and not (h.flags & ENG_REC_FLAG_BATCH and _batch_walk(p, q, length, &fi) != 0)):
                return <Py_ssize_t>q
        q += 8
    return -1


cdef int _sync_range(int fd, uint8_t *p, size_t lo, size_t hi) noexcept nogil:
    """Make the pages of [lo, hi) durable (see eng_log_sync_range); 0 or -1."""
    cdef size_t a = lo - (lo % _PAGE)
    return eng_log_sync_range(fd, p + a, hi - a if hi > a else 0)


def _set_sync_hook(fn):
    """Test hook: ``fn(log_dir, info)`` runs right after each durable sync point.

    ``info`` says what just became durable (``kind``: "data", "roll",
    "checkpoint", "group"; ``next_offset``: every offset below it is on stable
    storage).  Power-loss tests snapshot the directory there.  ``None`` clears it.
    """
    global _sync_hook
    if fn is not None and not callable(fn):
        raise TypeError("fn must be callable or None")
    _sync_hook = fn


cdef _call_hook(str path, dict info):
    if _sync_hook is not None:
        _sync_hook(path, info)


def _crc32c(data, impl="auto", crc=0):
    """CRC32C of a buffer with the chosen implementation ("auto", "hw", "sw").

    ``crc`` continues a previous value: ``_crc32c(b, crc=_crc32c(a)) == _crc32c(a + b)``.
    "hw" raises ``RuntimeError`` when the CPU (or a portable build) lacks the instruction.
    """
    cdef Py_buffer buf
    cdef uint32_t c
    if impl not in ("auto", "hw", "sw"):
        raise ValueError(f"impl must be 'auto', 'hw' or 'sw', not {impl!r}")
    if impl == "hw" and not eng_crc32c_have_hw:
        raise RuntimeError("no CRC32C instruction on this CPU or in this (portable) build")
    if not isinstance(crc, int) or not 0 <= crc <= 0xFFFFFFFF:
        raise ValueError("crc must be an int in [0, 2**32)")
    cdef int which = 1 if impl == "sw" else (2 if impl == "hw" else 0)
    c = crc
    PyObject_GetBuffer(data, &buf, PyBUF_SIMPLE)
    try:
        with nogil:
            if which == 1:
                c = eng_crc32c_sw(c, buf.buf, <size_t>buf.len)
            elif which == 2:
                c = eng_crc32c_hw(c, buf.buf, <size_t>buf.len)
            else:
                c = eng_crc32c(c, buf.buf, <size_t>buf.len)
    finally:
        PyBuffer_Release(&buf)
    return c


def _crc32c_hw_available():
    """True when the CRC32C instruction path is in use."""
    return bool(eng_crc32c_have_hw)


def _record_size(value_len, key_len=0):
    """Bytes one record takes in a segment (header + key + value, padded to 8)."""
    return int(_align8(_HDR + key_len + value_len))


# ---------------------------------------------------------------- small files

cdef _discard(str path):
    try:
        _os.unlink(path)
    except OSError:
        pass


cdef dict _read_meta(str path):
    mpath = _os.path.join(path, "meta")
    try:
        with open(mpath, "rb") as f:
            meta = _json.loads(f.read(65536).decode("utf-8"))
    except FileNotFoundError:
        raise
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptLog(mpath, 0, f"unreadable meta file ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") not in range(ENG_LOG_FORMAT_MIN, ENG_LOG_FORMAT + 1):
        raise CorruptLog(mpath, 0, f"unsupported log format {meta.get('format') if isinstance(meta, dict) else meta!r}")
    try:
        meta["log_uuid"] = _uuid.UUID(meta["log_id"])
        meta["segment_bytes"] = int(meta["segment_bytes"])
    except (KeyError, ValueError, TypeError):
        raise CorruptLog(mpath, 0, "meta file lacks a valid log_id / segment_bytes") from None
    return meta


cdef list _list_segments(str path):
    """Sorted base offsets of the segment files in path."""
    bases = []
    for name in _os.listdir(path):
        m = _SEG_RE.match(name)
        if m:
            bases.append(int(m.group(1)))
    bases.sort()
    return bases


cdef str _seg_name(uint64_t base):
    return f"{base:020d}.seg"


def _check_group(group):
    if not isinstance(group, str):
        raise TypeError(f"group must be a str, not {type(group).__name__}")
    if not _GROUP_RE.match(group):
        raise ValueError(f"group must match [A-Za-z0-9][A-Za-z0-9._-]*, at most 128 chars: {group!r}")


cdef object _read_group(str path, str group):
    """Committed offset of a group, or None if it never committed."""
    got = _read_group_epoch(path, group)
    return None if got is None else got[0]


cdef object _read_group_epoch(str path, str group):
    """(committed offset, epoch) of a group, or None if it never committed.
    The first file format has no epoch: 0."""
    gpath = _os.path.join(path, "groups", group)
    try:
        with open(gpath, "rb") as f:
            data = f.read(64)
    except FileNotFoundError:
        return None
    if len(data) == _GROUP.size:
        magic, off, crc = _GROUP.unpack(data)
        if magic != _GROUP_MAGIC or eng_crc32c(0, PyBytes_AS_STRING(data), 16) != crc:
            raise CorruptLog(gpath, 0, "group file fails its check")
        return off, 0
    if len(data) != _GROUP2.size:
        raise CorruptLog(gpath, 0, "group file has the wrong size")
    magic, off, epoch, crc = _GROUP2.unpack(data)
    if magic != _GROUP2_MAGIC or eng_crc32c(0, PyBytes_AS_STRING(data), 24) != crc:
        raise CorruptLog(gpath, 0, "group file fails its check")
    return off, epoch


# ---------------------------------------------------------------- truncations
# The `truncations` file lists, in order, the offset from which each unclean
# recovery or repair may have changed the log: records at or past it that a
# reader saw before may be gone, and new records may reuse their offsets.
# Truncation i (from 1) is epoch i.  A group commit stores the epoch its
# reader opened in; a group behind a later truncation whose committed offset
# is past that truncation resumes there (a logged reset), so it never skips
# the new records that reuse those offsets.

cdef list _read_truncations(str path):
    tpath = _os.path.join(path, "truncations")
    try:
        with open(tpath, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return []
    try:
        doc = _json.loads(raw.decode("utf-8"))
        offs = [int(o) for o in doc["offsets"]]
        body = _json.dumps(offs).encode()
        if eng_crc32c(0, PyBytes_AS_STRING(body), len(body)) != doc["crc"]:
            raise ValueError("crc")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise CorruptLog(tpath, 0, "truncations file fails its check") from None
    return offs


cdef _note_truncation(str path, uint64_t at):
    """Record (durably) that records from offset `at` on may have changed."""
    offs = _read_truncations(path)
    offs.append(int(at))
    body = _json.dumps(offs).encode()
    doc = {"offsets": offs, "crc": eng_crc32c(0, PyBytes_AS_STRING(body), len(body))}
    _atomic_write(path, "truncations", _json.dumps(doc).encode(), True)


cdef dict _all_groups(str path):
    gdir = _os.path.join(path, "groups")
    out = {}
    try:
        names = _os.listdir(gdir)
    except FileNotFoundError:
        return out
    for name in names:
        if _GROUP_RE.match(name):
            off = _read_group(path, name)
            if off is not None:
                out[name] = off
    return out



# ---------------------------------------------------------------- for backup
# What engine.backups needs to copy a live log without knowing its byte
# layouts: the group files, the published end, a record walk with recovery's
# checks, and a clean checkpoint.  The files' formats live only in this module.

def read_group(path, group):
    """``(committed offset, epoch)`` of consumer group ``group`` of the log
    directory ``path``, or None when it never committed.  The epoch is the
    number of truncations (see the ``truncations`` file) the committing
    reader knew of.  Raises CorruptLog when the group file fails its check."""
    _check_group(group)
    return _read_group_epoch(_os.fspath(path), group)


def read_groups(path):
    """Every committed group of the log directory ``path``:
    ``{name: (committed offset, epoch)}`` (see :func:`read_group`).  Files
    that are not group files (temp files) are left out."""
    path = _os.fspath(path)
    out = {}
    try:
        names = _os.listdir(_os.path.join(path, "groups"))
    except FileNotFoundError:
        return out
    for name in sorted(names):
        if not _GROUP_RE.match(name):
            continue
        try:
            got = _read_group_epoch(path, name)
        except IsADirectoryError:
            continue  # not a group file
        if got is not None:  # None: removed since the listing
            out[name] = got
    return out


cdef _write_group(str path, str group, uint64_t offset, uint64_t epoch):
    raw = _GROUP2.pack(_GROUP2_MAGIC, offset, epoch, 0)
    crc = eng_crc32c(0, PyBytes_AS_STRING(raw), 24)
    gdir = _os.path.join(path, "groups")
    _os.makedirs(gdir, mode=0o700, exist_ok=True)
    _atomic_write(gdir, group, raw[:24] + _struct.pack("<I", crc) + bytes(4), True)


cdef int _open_group_lock(str path, str group, int how) except -2:
    """The group's use lock (``groups/.GROUP.lock``) taken with ``flock(how)``
    (shared by every reader of the group, exclusive for a reset); -1 when
    ``how`` is non-blocking and someone holds it the other way."""
    import fcntl
    gdir = _os.path.join(path, "groups")
    _os.makedirs(gdir, mode=0o700, exist_ok=True)
    fd = _os.open(_os.path.join(gdir, f".{group}.lock"),
                  _os.O_RDWR | _os.O_CREAT | _os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, how)
    except OSError as exc:
        _os.close(fd)
        if exc.errno in (_errno.EWOULDBLOCK, _errno.EAGAIN, _errno.EACCES):
            return -1
        raise
    return fd


def group_in_use(path, group):
    """True while a ``LogReader(path, group=group)`` is open in any process."""
    _check_group(group)
    import fcntl
    fd = _open_group_lock(_os.fspath(path), group, fcntl.LOCK_EX | fcntl.LOCK_NB)
    if fd < 0:
        return True
    _os.close(fd)
    return False


def reset_group(path, group, offset):
    """Move group ``group`` of the log directory ``path`` to ``offset`` (its
    next read starts there), durably.  Refuses with :class:`EngineError`
    while a reader of the group is open in any process: stop its consumers
    first.  The stored epoch is the log's current truncation count."""
    _check_group(group)
    if not isinstance(offset, int) or isinstance(offset, bool):
        raise TypeError("offset must be an int")
    if offset < 0 or offset >= (1 << 64):
        raise ValueError(f"offset must be in [0, 2**64), not {offset}")
    import fcntl
    path = _os.fspath(path)
    _read_meta(path)  # a log directory, or FileNotFoundError / CorruptLog
    fd = _open_group_lock(path, group, fcntl.LOCK_EX | fcntl.LOCK_NB)
    if fd < 0:
        raise EngineError(f"group {group!r} of {path} is in use by an open reader; "
                          "stop its consumers, then reset")
    try:
        _write_group(path, group, offset, len(_read_truncations(path)))
    finally:
        _os.close(fd)


def write_group(path, group, offset, epoch):
    """Store group ``group``'s committed ``offset`` and ``epoch`` in the log
    directory ``path`` durably (temp file, fsync, rename, fsync directory),
    as :meth:`LogReader.commit` does."""
    _check_group(group)
    for name, v in (("offset", offset), ("epoch", epoch)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise TypeError(f"{name} must be an int")
        if v < 0 or v >= (1 << 64):
            raise ValueError(f"{name} must be in [0, 2**64), not {v}")
    _write_group(_os.fspath(path), group, offset, epoch)


def published_end(path):
    """``(segment base, byte position)`` of the log directory ``path``: every
    record of that segment before the position is complete and was published
    by its writer (a live one, or the last one before a crash).  None when the
    ``notify`` block is missing, of another format, or inconsistent (read
    while a roll updated it)."""
    cdef const eng_notify *n
    cdef uint64_t base, p
    cdef size_t pos
    try:
        with open(_os.path.join(_os.fspath(path), "notify"), "rb") as f:
            data = f.read(sizeof(eng_notify))
    except FileNotFoundError:
        return None
    if len(data) < <Py_ssize_t>sizeof(eng_notify):
        return None
    n = <const eng_notify *>PyBytes_AS_STRING(data)
    if n.magic != ENG_NOTIFY_MAGIC:
        return None
    base = n.active_base
    p = n.published
    pos = <size_t>(p & 0xFFFFFFFFu)
    if (p >> 32) != (base & 0xFFFFFFFFu) or pos < _SEGHDR or pos % 8:
        return None
    return int(base), int(pos)


cdef size_t _CUT_WINDOW = 1 << 20  # bytes read per step of cut_by_time on a descriptor


def cut_by_time(segment, position, ts_limit, expect=None):
    """Walk a segment's records from ``position`` while their timestamps are
    <= ``ts_limit``; returns a :class:`ScanResult` saying where to cut.

    ``segment``: an open file descriptor of the segment (read with pread, so
    a file that shrinks meanwhile reads short, never faults) or a buffer
    holding its image from byte 0.  ``position`` is a record boundary;
    ``expect`` the offset of the record there (None: that record's own, once
    its CRC checks).  Each frame is checked as recovery checks it (bounds,
    flags, CRC32C, offset sequence, a batch frame's inner records); a batch
    frame is taken whole, when its last record is stamped <= ``ts_limit``.  In the result, ``end_position`` is the
    cut (records before it are taken), ``records`` how many were taken,
    ``base_offset`` the offset at ``position`` and ``next_offset`` the offset
    after them.  The walk stops at:

    * the end of what is written (a zero length word), or a record stamped
      after ``ts_limit``: ``error`` None, ``sealed`` False;
    * the end-of-segment marker: ``sealed`` True, ``next_offset`` is then the
      next segment's base;
    * an invalid record: ``error`` says why (``error_position`` =
      ``end_position``).  Whether that is a tail still being written or
      damage is the caller's call, by :func:`published_end`.
    """
    cdef Py_buffer buf
    cdef const uint8_t *p
    cdef size_t pos = position
    cdef int64_t limit = ts_limit
    cdef size_t origin = 0, size = 0, local = 0, need = 0, fsize = 0, want, got
    cdef uint32_t length
    cdef uint64_t exp = 0
    cdef uint64_t n = 0
    cdef uint64_t adv = 0          # offsets the frames taken cover
    cdef _Frame fi
    cdef int r = R_END
    cdef int why = W_NONE
    cdef bint known = expect is not None
    cdef bint by_fd = isinstance(segment, int) and not isinstance(segment, bool)
    cdef bint whole = not by_fd    # the bytes held reach the end of the segment
    cdef bint short                # the record at `local` reaches past the bytes held
    cdef const eng_rec_header *h
    if known:
        exp = expect
    if by_fd:
        fsize = _os.fstat(segment).st_size
        data = b""
        origin = pos
    else:
        data = segment
    while True:
        short = False
        PyObject_GetBuffer(data, &buf, PyBUF_SIMPLE)
        try:
            p = <const uint8_t *>buf.buf
            size = <size_t>buf.len
            local = pos - origin  # origin is where the bytes held start: <= pos
            while not short:
                if not whole:
                    need = _HDR
                    if size - local >= 4:
                        length = (<const uint32_t *>(p + local))[0]
                        if length > _HDR:
                            need = _align8(length)
                    if size - local < need:
                        short = True
                        break
                if not known and local <= size and size - local >= _HDR:
                    exp = (<const eng_rec_header *>(p + local)).offset
                    known = True
                r = _frame_check(p, size, local, exp, True, &why, &fi)
                if r != R_REC:
                    break
                h = <const eng_rec_header *>(p + local)
                if fi.last_ts > limit:
                    # a batch frame is taken whole or not at all
                    r = R_END
                    break
                local += _align8(h.length)
                exp += fi.span
                adv += fi.span
                n += fi.count
            pos = origin + local
        finally:
            PyBuffer_Release(&buf)
        if not short:
            break
        # read on from the record at pos, at least all of it (never past the file)
        want = min(max(_CUT_WINDOW, need), fsize - pos if fsize > pos else 0)
        data = _os.pread(segment, want, pos) if want else b""
        origin = pos
        got = <size_t>len(data)
        whole = got < want or pos + got >= fsize
    name = "<fd>" if by_fd else "<buffer>"
    if r == R_BAD:
        return ScanResult(name, exp - adv, n, exp, pos, False, _WHY[why], pos, pos - position)
    return ScanResult(name, exp - adv, n, exp, pos, r == R_EOS, None, 0, pos - position)


def write_clean_checkpoint(path, segment_base, position, next_offset):
    """Write the checkpoint a clean close leaves into the log directory
    ``path``: the log ends at byte ``position`` of segment ``segment_base``,
    before offset ``next_offset``.  The next open trusts it (``was_clean``)
    after checking the records near it.  Durable (temp, fsync, rename)."""
    for name, v in (("segment_base", segment_base), ("position", position), ("next_offset", next_offset)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise TypeError(f"{name} must be an int")
        if v < 0 or v >= (1 << 64):
            raise ValueError(f"{name} must be in [0, 2**64), not {v}")
    if position < <Py_ssize_t>_SEGHDR or position % 8:
        raise ValueError(f"position must be a record boundary past the segment header, not {position}")
    _put_checkpoint(_os.fspath(path), segment_base, position, next_offset, True)


# ---------------------------------------------------------------- segments

@cython.final
def _sync_paths(list paths):
    """fdatasync each rolled segment file by path (its writer fd is closed);
    a segment removed by retention meanwhile needs no sync."""
    for path in paths:
        try:
            fd = _os.open(path, _os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            if hasattr(_os, "fdatasync"):
                _os.fdatasync(fd)
            else:
                _os.fsync(fd)
        finally:
            _os.close(fd)


cdef class _Seg:
    """One mapped segment file (writer: read/write, reader: read-only)."""
    cdef readonly str path         # file path
    cdef readonly uint64_t base    # base offset (from the header, equal to the name)
    cdef readonly int64_t created_ns  # header timestamp
    cdef readonly uint32_t version # header version: batch frames only from ENG_SEG_VERSION on
    cdef object _mm                # the mmap.mmap; views of it keep the mapping alive
    cdef object _view              # memoryview of _mm for zero-copy slices (lazy)
    cdef Py_buffer _buf            # export held while mapped: pins the mapping
    cdef bint _has_buf             # _buf is valid
    cdef uint8_t *p                # start of the mapping
    cdef size_t size               # mapped bytes (file size at map time)
    cdef int fd                    # open file descriptor (-1 once closed)
    cdef size_t synced             # writer: bytes up to here are durable
    # sparse index (C arrays, capacity fixed at open from the segment size)
    cdef uint32_t *ix_rel          # relative offsets
    cdef uint32_t *ix_pos          # positions
    cdef int64_t *ix_ts            # timestamps
    cdef size_t ix_n               # entries used
    cdef size_t ix_cap             # entries allocated
    cdef size_t ix_next            # next position at which an entry is due

    def __cinit__(self):
        self.fd = -1
        self.p = NULL

    def __dealloc__(self):
        self._unmap()
        free(self.ix_rel)
        free(self.ix_pos)
        free(self.ix_ts)

    cdef _unmap(self):
        if self._has_buf:
            PyBuffer_Release(&self._buf)
            self._has_buf = False
        self.p = NULL
        if self._mm is not None:
            self._view = None
            try:
                self._mm.close()
            except BufferError:
                pass  # a zero-copy view is alive: the mapping goes when it does
            self._mm = None
        if self.fd >= 0:
            _os.close(self.fd)
            self.fd = -1

    cdef int _alloc_index(self) except -1:
        cdef size_t cap = self.size // ENG_INDEX_INTERVAL + 2
        self.ix_rel = <uint32_t *>malloc(cap * sizeof(uint32_t))
        self.ix_pos = <uint32_t *>malloc(cap * sizeof(uint32_t))
        self.ix_ts = <int64_t *>malloc(cap * sizeof(int64_t))
        if self.ix_rel == NULL or self.ix_pos == NULL or self.ix_ts == NULL:
            raise MemoryError()
        self.ix_cap = cap
        self.ix_n = 0
        self.ix_next = 0
        return 0

    cdef inline void ix_note(self, uint64_t off, size_t pos, int64_t ts) noexcept nogil:
        if pos >= self.ix_next and self.ix_n < self.ix_cap:
            self.ix_rel[self.ix_n] = <uint32_t>(off - self.base)
            self.ix_pos[self.ix_n] = <uint32_t>pos
            self.ix_ts[self.ix_n] = ts
            self.ix_n += 1
            self.ix_next = pos + ENG_INDEX_INTERVAL

    cdef object view(self):
        if self._view is None:
            self._view = memoryview(self._mm)
        return self._view


cdef bytes _make_seg_header(uint64_t base, uint64_t seg_bytes, bytes log_id, int64_t created):
    head = _SEG_HEADER.pack(_SEG_MAGIC, ENG_SEG_VERSION, _SEGHDR, base, seg_bytes, log_id, created, 0, 0)
    crc = eng_crc32c(0, PyBytes_AS_STRING(head), 60)
    return head[:60] + _struct.pack("<I", crc)


cdef str _check_seg_header(const uint8_t *p, size_t size, object expected_base, object log_id,
                           uint64_t *base_out, int64_t *created_out, bint allow_short=False):
    """None if the header is valid, else the reason."""
    if size < _SEGHDR:
        return f"file too short for a segment header ({size} bytes)"
    raw = PyBytes_FromStringAndSize(<const char *>p, _SEGHDR)
    magic, ver, hsize, base, segb, lid, created, flags, crc = _SEG_HEADER.unpack(raw)
    if magic != _SEG_MAGIC:
        return "bad segment magic"
    if eng_crc32c(0, p, 60) != crc:
        return "segment header CRC32C mismatch"
    if not ENG_SEG_VERSION_MIN <= ver <= ENG_SEG_VERSION or hsize != _SEGHDR or flags != 0:
        return f"unsupported segment format {ver}"
    if expected_base is not None and base != expected_base:
        return f"segment header says base offset {base}, file name says {expected_base}"
    if log_id is not None and lid != log_id:
        return "segment belongs to another log (log id differs)"
    if segb != size and not (allow_short and segb > size):
        return f"segment file is {size} bytes, its header says {segb} (truncated or extended)"
    base_out[0] = base
    created_out[0] = created
    return None


cdef _Seg _map_seg(str path, bint writable, object expected_base, object log_id, bint strict,
                   bint allow_short=False):
    """Map a segment file and check its header (CorruptLog if strict, else None on a bad one)."""
    cdef _Seg s = _Seg.__new__(_Seg)
    cdef uint64_t base = 0
    cdef int64_t created = 0
    cdef int flags = PyBUF_WRITABLE if writable else PyBUF_SIMPLE
    s.path = path
    s.fd = _os.open(path, _os.O_RDWR if writable else _os.O_RDONLY)
    try:
        size = _os.fstat(s.fd).st_size
        if size < <Py_ssize_t>_SEGHDR:
            raise CorruptLog(path, 0, f"file too short for a segment header ({size} bytes)")
        if writable:
            s._mm = _mmap.mmap(s.fd, size)
        else:
            s._mm = _mmap.mmap(s.fd, size, prot=_mmap.PROT_READ)
        PyObject_GetBuffer(s._mm, &s._buf, flags)
        s._has_buf = True
        s.p = <uint8_t *>s._buf.buf
        s.size = <size_t>s._buf.len
        why = _check_seg_header(s.p, s.size, expected_base, log_id, &base, &created, allow_short)
        if why is not None:
            raise CorruptLog(path, 0, why)
        s.base = base
        s.created_ns = created
        s.version = (<const uint32_t *>(s.p + 8))[0]
        s._alloc_index()
    except CorruptLog:
        s._unmap()
        if strict:
            raise
        return None
    except BaseException:
        s._unmap()
        raise
    return s


cdef int _scan(_Seg s, size_t pos, uint64_t expect, bint index, size_t *pos_out,
               uint64_t *off_out, int64_t *ts_out, int *why) except? -2:
    """Walk valid frames from pos; returns R_END / R_EOS / R_BAD with where
    it stopped, the offset after the last frame and its last timestamp."""
    cdef const uint8_t *p = s.p
    cdef size_t size = s.size
    cdef int r = R_END
    cdef const eng_rec_header *h
    cdef int64_t ts = ts_out[0]
    cdef size_t end
    cdef _Frame fi
    with nogil:
        while True:
            end = pos + _check3(p, size, pos, expect)
            if end == pos:
                r = _frame_check(p, size, pos, expect, True, why, &fi)
                if r != R_REC:
                    break
                h = <const eng_rec_header *>(p + pos)
                if h.flags & (ENG_REC_FLAG_BATCH | ENG_REC_FLAG_HOLE):
                    if index and h.flags & ENG_REC_FLAG_BATCH:
                        s.ix_note(expect, pos, h.timestamp_ns)
                    ts = fi.last_ts
                    pos += _align8(h.length)
                    expect += fi.span
                    continue
                end = pos + _align8(h.length)
            while pos < end:
                h = <const eng_rec_header *>(p + pos)
                if index:
                    s.ix_note(expect, pos, h.timestamp_ns)
                ts = h.timestamp_ns
                pos += _align8(h.length)
                expect += 1
    pos_out[0] = pos
    off_out[0] = expect
    ts_out[0] = ts
    return r


# ---------------------------------------------------------------- scan results

class ScanResult:
    """What a verify / recovery scan of one segment found.

    ``error`` is ``None`` for a clean segment, else the reason, at byte
    ``error_position``.  ``sealed`` is true when the segment ends with its
    end-of-segment marker.
    """

    __slots__ = ("segment", "base_offset", "records", "next_offset", "end_position",
                 "sealed", "error", "error_position", "bytes_scanned")

    def __init__(self, segment, base_offset, records, next_offset, end_position, sealed,
                 error, error_position, bytes_scanned):
        self.segment = segment
        self.base_offset = base_offset
        self.records = records
        self.next_offset = next_offset
        self.end_position = end_position
        self.sealed = sealed
        self.error = error
        self.error_position = error_position
        self.bytes_scanned = bytes_scanned

    def __repr__(self):
        state = "ok" if self.error is None else f"ERROR at byte {self.error_position}: {self.error}"
        return (f"ScanResult({self.segment!r}, base={self.base_offset}, records={self.records}, "
                f"next={self.next_offset}, end={self.end_position}, sealed={self.sealed}, {state})")


cdef object _scan_buffer(const uint8_t *p, size_t size, str name, object expected_base, object log_id):
    """Full check of one segment image: header, every record, zeros after the end."""
    cdef uint64_t base = 0
    cdef int64_t created = 0
    cdef size_t pos = _SEGHDR
    cdef uint64_t expect
    cdef uint64_t n = 0
    cdef int r = R_END
    cdef int why = W_NONE
    cdef size_t tail, step
    cdef _Frame fi
    err = _check_seg_header(p, size, expected_base, log_id, &base, &created)
    if err is not None:
        return ScanResult(name, expected_base, 0, expected_base, 0, False, err, 0, min(size, _SEGHDR))
    expect = base
    with nogil:
        while True:
            step = _check3(p, size, pos, expect)
            if step:
                pos += step
                expect += 3
                n += 3
                continue
            r = _frame_check(p, size, pos, expect, True, &why, &fi)
            if r != R_REC:
                break
            pos += _align8((<const eng_rec_header *>(p + pos)).length)
            expect += fi.span
            n += fi.count
    if r == R_BAD:
        return ScanResult(name, base, n, expect, pos, False, _WHY[why], pos, pos)
    endpos = pos + (_HDR if r == R_EOS else 0)
    with nogil:
        tail = _last_nonzero(p, endpos, size)
    if tail != endpos:
        what = "end-of-segment marker" if r == R_EOS else "last record"
        return ScanResult(name, base, n, expect, pos, r == R_EOS,
                          f"non-zero bytes after the {what}", endpos, size)
    return ScanResult(name, base, n, expect, pos, r == R_EOS, None, 0, size)


def scan_segment(data, expected_base=None):
    """Check one segment image (any buffer: bytes, bytearray, mmap) completely.

    Verifies the header, the CRC, bounds and offset sequence of every record
    and that every byte after the last record (or end marker) is zero.  Never
    reads outside the buffer, whatever it holds.  Returns a :class:`ScanResult`.
    """
    cdef Py_buffer buf
    PyObject_GetBuffer(data, &buf, PyBUF_SIMPLE)
    try:
        return _scan_buffer(<const uint8_t *>buf.buf, <size_t>buf.len, "<buffer>", expected_base, None)
    finally:
        PyBuffer_Release(&buf)


cdef bint _writer_holds_lock(str path) except -1:
    """True while some writer holds the directory's lock: tested on the lock
    itself (a non-blocking shared flock), never by the pid written in it (a
    reused pid, or this very process, would look alive)."""
    import fcntl
    try:
        fd = _os.open(_os.path.join(path, "writer.lock"), _os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (_errno.EWOULDBLOCK, _errno.EAGAIN, _errno.EACCES):
                return True
            raise
        return False  # closing the fd drops the shared lock at once
    finally:
        _os.close(fd)


cdef object _live_published(str path, uint64_t base):
    """The published end of segment `base` while a writer holds the log and
    appends there, else None (see log_layout.h)."""
    cdef _Notify nt
    cdef uint64_t p
    if not _writer_holds_lock(path):
        return None
    nt = _open_notify(path, False)
    if nt is None:
        return None
    try:
        if eng_load_acquire_u32(&nt.n.magic) != ENG_NOTIFY_MAGIC or \
                eng_load_acquire_u64(&nt.n.active_base) != base:
            return None
        p = eng_load_acquire_u64(&nt.n.published)
        if (p >> 32) != (base & 0xFFFFFFFFu):
            return None
        return <size_t>(p & 0xFFFFFFFFu)
    finally:
        nt.close()


# verify reads a segment this much at a time into one buffer: the bytes are
# still in the L2 cache when their CRCs are checked, so memory is crossed once
# (a whole-segment buffer is zeroed, faulted in, filled and read back: four times)
cdef size_t _SCAN_WINDOW = 256 << 10

cdef extern from *:
    """
    /* The zero check of a segment's tail past its last record (mostly the
     * preallocated, never written part of the active segment), the fast way.
     * Read through the page cache, each page of it not cached yet is first
     * allocated and zero-filled there (~60 MiB of fresh zero pages for a new
     * segment: 10-300 ms on a busy machine) to be checked once and never used
     * again; and the readahead of each read fills the next 8 MiB the same way.
     * Here the tail is read from its end back to `start`, a window at a time:
     * a window none of whose pages is cached (mincore of a mapping never
     * touched) is read with O_DIRECT into `buf`, where an unwritten extent or
     * a hole is zero-filled by the filesystem without the page cache, and
     * written blocks come from the disk as a buffered read would bring them
     * (pages cached meanwhile are written back first: the bytes are the
     * file's current ones); any other window is read as before.  Reading
     * backwards, no read ever lands on the pages a readahead filled.
     * Returns 1 when a byte is not zero, 0 when none is, -1 when it could
     * not tell (no O_DIRECT or mincore, a failed or short read: the file
     * shrank, a damaged sector): the caller then checks the tail the plain
     * way, front to back, which reports what it finds there.  `buf`: `cap`
     * bytes, aligned to ENG_SCAN_ALIGN.  The fd must be the caller's own:
     * O_DIRECT is switched on for one read and off again. */
    #include <stdint.h>
    #include <errno.h>
    #include <fcntl.h>
    #include <sys/mman.h>
    #include <unistd.h>
    #define ENG_SCAN_ALIGN 4096
    #define ENG_SCAN_DIRECT_MAX (1 << 20)  /* bytes per window here: the mincore vector's size */
    #if defined(__linux__) && !ENGINE_PORTABLE && defined(O_DIRECT)
    #define ENG_SCAN_DIRECT 1
    #else
    #define ENG_SCAN_DIRECT 0
    #endif

    #if ENG_SCAN_DIRECT
    /* 1: no page of [off, off + n) is in the page cache, 0: some is, -1: unknown. */
    static int eng_scan_uncached(int fd, size_t off, size_t n) {
        unsigned char vec[ENG_SCAN_DIRECT_MAX / ENG_SCAN_ALIGN];
        size_t i;
        int r;
        void *m = mmap(NULL, n, PROT_READ, MAP_SHARED, fd, (off_t)off);
        if (m == MAP_FAILED) return -1;
        r = mincore(m, n, vec) == 0 ? 1 : -1;
        for (i = 0; r == 1 && i < n / ENG_SCAN_ALIGN; i++)
            if (vec[i] & 1) r = 0;
        munmap(m, n);
        return r;
    }

    static int eng_scan_all_zero(const uint8_t *p, size_t n) {
        uint64_t acc = 0, w;
        size_t i = 0;
        for (; i + 64 <= n; i += 64) {
            for (int k = 0; k < 64; k += 8) { memcpy(&w, p + i + k, 8); acc |= w; }
            if (acc) return 0;
        }
        for (; i < n; i++) acc |= p[i];
        return acc == 0;
    }
    #endif

    static int eng_scan_zero_tail(int fd, uint8_t *buf, size_t cap, size_t start, size_t end) {
    #if ENG_SCAN_DIRECT
        size_t chunk = cap < ENG_SCAN_DIRECT_MAX ? cap : ENG_SCAN_DIRECT_MAX;
        size_t hi = end, lo, n;
        ssize_t r;
        chunk -= chunk % ENG_SCAN_ALIGN;
        if (chunk == 0 || ((uintptr_t)buf % ENG_SCAN_ALIGN) || sysconf(_SC_PAGESIZE) != ENG_SCAN_ALIGN)
            return -1;
        while (hi > start) {
            lo = hi - start > chunk ? hi - chunk : start;
            if (lo > start && lo % ENG_SCAN_ALIGN) lo += ENG_SCAN_ALIGN - lo % ENG_SCAN_ALIGN;  /* n < chunk */
            n = hi - lo;
            if (lo % ENG_SCAN_ALIGN == 0 && n % ENG_SCAN_ALIGN == 0 && eng_scan_uncached(fd, lo, n) == 1) {
                int fl = fcntl(fd, F_GETFL);
                if (fl == -1 || fcntl(fd, F_SETFL, fl | O_DIRECT) == -1) return -1;
                r = pread(fd, buf, n, (off_t)lo);
                if (fcntl(fd, F_SETFL, fl) == -1) return -1;
            } else {
                r = pread(fd, buf, n, (off_t)lo);
            }
            if (r != (ssize_t)n) return -1;
            if (!eng_scan_all_zero(buf, n)) return 1;
            hi = lo;
        }
        return 0;
    #else
        (void)fd; (void)buf; (void)cap; (void)start; (void)end;
        return -1;
    #endif
    }

    /* The scan's window buffer: aligned for the direct reads above; NULL if out of memory. */
    static uint8_t *eng_scan_alloc(size_t n) {
        void *p = NULL;
        if (posix_memalign(&p, ENG_SCAN_ALIGN, n ? n : 1) != 0) return NULL;
        return (uint8_t *)p;
    }
    """
    int eng_scan_zero_tail(int fd, uint8_t *buf, size_t cap, size_t start, size_t end) noexcept nogil
    uint8_t *eng_scan_alloc(size_t n) noexcept nogil


cdef int _window_hold(int fd, uint8_t **win, size_t *cap, size_t *origin, size_t *held,
                      size_t at, size_t want, size_t fsize, size_t *bad_at) noexcept nogil:
    """Make the window (file bytes [origin, origin + held) in win) hold
    [at, at + want) of the file, or up to its end (origin <= at <= origin +
    held): keeps the bytes held from `at` on, grows the buffer if `want` needs
    it and reads as far as the buffer goes.  0, -1 when the file ends early
    (it shrank), -2 when out of memory, else the errno of a failed read
    (bad_at: the file position it started at)."""
    cdef size_t keep, lim
    cdef ssize_t n
    cdef uint8_t *q
    if want > fsize - at:
        want = fsize - at
    if at - origin[0] + want <= held[0]:
        return 0
    keep = origin[0] + held[0] - at
    if want > cap[0]:
        q = eng_scan_alloc(want)
        if q == NULL:
            return -2
        memcpy(q, win[0] + (at - origin[0]), keep)
        free(win[0])
        win[0] = q
        cap[0] = want
    elif keep:
        memmove(win[0], win[0] + (at - origin[0]), keep)
    origin[0] = at
    held[0] = keep
    lim = cap[0] if cap[0] < fsize - at else fsize - at
    while held[0] < lim:
        n = pread(fd, win[0] + held[0], lim - held[0], <off_t>(at + held[0]))
        if n < 0:
            if errno == EINTR:
                continue
            bad_at[0] = at + held[0]
            return errno if errno else EIO
        if n == 0:
            if held[0] < want:
                bad_at[0] = at + held[0]
                return -1
            break
        held[0] += <size_t>n
    return 0


cdef object _scan_fd(int fd, size_t fsize, str name, object expected_base, object log_id):
    """_scan_buffer of the segment file behind fd, read window by window
    (read, not mapped: a damaged sector is an EIO here, where a mapping would
    kill the process with SIGBUS).  A failed read is the segment's error."""
    cdef uint8_t *win = eng_scan_alloc(_SCAN_WINDOW)
    cdef size_t cap = _SCAN_WINDOW, origin = 0, held = 0, bad_at = 0
    cdef int fast = -1
    cdef size_t pos = _SEGHDR, local, need, endpos, step
    cdef uint64_t base = 0, expect, n = 0
    cdef int64_t created = 0
    cdef uint32_t length
    cdef int rc = 0, r = R_END, why = W_NONE
    cdef bint refill
    cdef _Frame fi
    if win == NULL:
        raise MemoryError()
    try:
        with nogil:
            rc = _window_hold(fd, &win, &cap, &origin, &held, 0, cap, fsize, &bad_at)
        if rc:
            return _read_failed(name, expected_base, rc, bad_at)
        err = _check_seg_header(win, fsize, expected_base, log_id, &base, &created)
        if err is not None:
            return ScanResult(name, expected_base, 0, expected_base, 0, False, err, 0, min(fsize, _SEGHDR))
        expect = base
        while True:
            refill = False
            with nogil:
                while True:
                    local = pos - origin
                    if origin + held < fsize:
                        # the record at pos must be held whole: the check
                        # below then sees what it would see in the whole file
                        need = _HDR
                        if held - local >= 4:
                            length = (<const uint32_t *>(win + local))[0]
                            if length > _HDR:
                                need = _align8(length)
                        if held - local < need:
                            refill = True
                            break
                    step = _check3(win, held, local, expect)
                    if step:
                        pos += step
                        expect += 3
                        n += 3
                        continue
                    r = _frame_check(win, held, local, expect, True, &why, &fi)
                    if r != R_REC:
                        break
                    pos += _align8((<const eng_rec_header *>(win + local)).length)
                    expect += fi.span
                    n += fi.count
                if refill:
                    rc = _window_hold(fd, &win, &cap, &origin, &held, pos,
                                      need if need > _SCAN_WINDOW else _SCAN_WINDOW, fsize, &bad_at)
            if not refill:
                break
            if rc:
                return _read_failed(name, expected_base, rc, bad_at)
        if r == R_BAD:
            return ScanResult(name, base, n, expect, pos, False, _WHY[why], pos, pos)
        # every byte after the last record (or end marker) must be zero: the
        # window's, then those after it, from the end back where that can
        # leave the page cache alone, else window by window as the records
        endpos = pos + (_HDR if r == R_EOS else 0)
        local = endpos - origin
        with nogil:
            while True:
                if _last_nonzero(win, local, held) != local:
                    rc = 1
                    break
                if origin + held >= fsize:
                    break
                if fast == -1:
                    fast = eng_scan_zero_tail(fd, win, cap, origin + held, fsize)
                    if fast != -1:
                        rc = fast
                        break
                    fast = -2  # the plain way from here on
                rc = _window_hold(fd, &win, &cap, &origin, &held, origin + held, _SCAN_WINDOW, fsize, &bad_at)
                if rc:
                    break
                local = 0
        if rc == 1:
            what = "end-of-segment marker" if r == R_EOS else "last record"
            return ScanResult(name, base, n, expect, pos, r == R_EOS,
                              f"non-zero bytes after the {what}", endpos, fsize)
        if rc:
            return _read_failed(name, expected_base, rc, bad_at)
        return ScanResult(name, base, n, expect, pos, r == R_EOS, None, 0, fsize)
    finally:
        free(win)


cdef object _read_failed(str name, object base, int rc, size_t at):
    """The ScanResult of a segment whose read failed (see _window_hold)."""
    if rc == -2:
        raise MemoryError()
    why = "file shrank while being read" if rc == -1 else f"unreadable at byte {at} ({_os.strerror(rc)})"
    return ScanResult(name, base, 0, base, at, False, why, at, at)


cdef size_t _PROBE_NEAR = 1 << 20  # clean open: bytes probed either side of the checkpoint


cdef _probe_readable(str spath, size_t start, size_t end=0):
    """CorruptLog when the segment cannot be read in [start, end) (end 0:
    the file's end) (EIO): the scan that follows reads it through a
    mapping, where the same damage would be a fatal SIGBUS."""
    fd = _os.open(spath, _os.O_RDONLY)
    try:
        size = _os.fstat(fd).st_size
        if end and end < size:
            size = end
        at = start - start % _PAGE
        while at < size:
            try:
                n = len(_os.pread(fd, min(size - at, 1 << 20), at))
            except OSError as exc:
                raise CorruptLog(spath, at, f"unreadable ({_os.strerror(exc.errno) if exc.errno else exc})") from None
            if n == 0:
                break
            at += n
    finally:
        _os.close(fd)


# verify scans segments on at most this many threads by default: a scan is
# bound by reading memory (the page cache), which a few threads share out;
# each more holds one more window and file descriptor
cdef int _VERIFY_THREADS_MAX = 4


def verify(path, threads=None):
    """Check every segment of a log directory; returns one :class:`ScanResult` each.

    Also checks that consecutive segments chain (each sealed segment's end
    marker names the next segment's base) and that only the last segment is
    unsealed.  Read-only: safe while a writer is running (the active
    segment's in-progress tail reads as its end).

    ``threads``: how many segments are scanned at once (each scan runs
    without the GIL); default: the CPUs this process may run on, at most 4.
    The results, and the first exception raised (in segment order), are the
    same whatever the count.
    """
    return _verify(_os.fspath(path), True, _verify_threads(threads))


cdef Py_ssize_t _usable_cpus():
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(_os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return _os.cpu_count() or 1


cdef int _verify_threads(object threads) except -1:
    """The thread count verify uses for `threads` (None: the default)."""
    if threads is None:
        return max(1, min(_usable_cpus(), _VERIFY_THREADS_MAX))
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ValueError(f"threads must be a positive int, not {threads!r}")
    return min(threads, 64)


cdef object _scan_path(str spath, uint64_t base, object lid):
    """The ScanResult of segment file `spath` (expected base `base`): the
    check verify runs on each segment, on any thread.  None for an empty file."""
    fd = _os.open(spath, _os.O_RDONLY)
    try:
        size = _os.fstat(fd).st_size
        if size == 0:
            return None
        return _scan_fd(fd, size, spath, base, lid)
    finally:
        _os.close(fd)


cdef list _scan_paths(list names, list bases, object lid, int threads):
    """_scan_path of every segment, `threads` at a time; the results in
    segment order.  An exception is raised once the segments before it are
    done, the first in segment order (as a serial scan would raise it), and
    no later segment is started after it."""
    cdef Py_ssize_t n = len(names)
    out = [None] * n
    if threads <= 1 or n <= 1:
        for i in range(n):
            out[i] = _scan_path(names[i], bases[i], lid)
        return out
    errs = [None] * n
    lock = _threading.Lock()
    state = [0, False]  # next segment to take, stop taking

    def work():
        while True:
            with lock:
                i = state[0]
                if i >= n or state[1]:
                    return
                state[0] = i + 1
            try:
                out[i] = _scan_path(names[i], bases[i], lid)
            except BaseException as exc:
                # segments are taken in order: every earlier one is taken
                # already and finishes, no later one starts
                errs[i] = exc
                state[1] = True
                return

    helpers = []
    try:
        for _ in range(min(threads, n) - 1):
            t = _threading.Thread(target=work, name="engine-verify", daemon=True)
            try:
                t.start()
            except RuntimeError:  # no thread to be had: the others do the work
                break
            helpers.append(t)
        work()
    finally:
        state[1] = True  # an interrupt here: the helpers start no further segment
        for t in helpers:
            t.join()
    for exc in errs:
        # an interrupt (KeyboardInterrupt, SystemExit) before any segment's error
        if exc is not None and not isinstance(exc, Exception):
            raise exc
    for exc in errs:
        if exc is not None:
            raise exc
    return out


cdef list _verify(str path, bint writer_may_run, int threads=1):
    """verify(); writer_may_run=False when the caller holds the lock itself
    (repair): no tail is then in progress."""
    meta = _read_meta(path)
    lid = meta["log_uuid"].bytes
    bases = _list_segments(path)
    names = [_os.path.join(path, _seg_name(base)) for base in bases]
    last = len(bases) - 1
    # the published end before the scan: bytes the scan finds past it are a
    # live writer's tail in progress; read after, it could cover bytes the
    # scan saw half-written
    pub = _live_published(path, bases[last]) if writer_may_run and bases else None
    results = _scan_paths(names, bases, lid, threads)
    for i, res in enumerate(results):
        if res is None:
            # an empty file: no header, nothing to chain
            results[i] = ScanResult(names[i], bases[i], 0, bases[i], 0, False, "empty segment file", 0, 0)
            continue
        if res.error is not None and i == last:
            # a live writer's unpublished tail (framed but not yet synced and
            # published) is in progress, not damage
            if pub is not None and res.error_position >= pub:
                res.error = None
                res.error_position = 0
        if res.error is None:
            if i != last and not res.sealed:
                res.error = "segment is not sealed but a later segment exists"
                res.error_position = res.end_position
            elif i != last and res.next_offset != bases[i + 1]:
                res.error = f"end marker names offset {res.next_offset}, next segment starts at {bases[i + 1]}"
                res.error_position = res.end_position
    return results


cdef size_t _put_hole(uint8_t *q, size_t out, uint64_t *start, uint64_t *span, int64_t ts) noexcept nogil:
    """Write the pending run of removed offsets as hole frames (a span is at
    most 32 bits); returns the new end.  The run is empty afterwards."""
    cdef uint64_t n
    while span[0]:
        n = span[0] if span[0] < 0xFFFFFFFFu else 0xFFFFFFFFu
        out += _seal_frame(q + out, start[0], ts, <uint32_t>n, ENG_REC_FLAG_HOLE, <uint32_t>_HDR)
        start[0] += n
        span[0] -= n
    return out


def rewrite_compacted(path, base, log_id, drop, tmp_name):
    """Write the compacted copy of sealed segment ``base`` of log ``path`` to
    ``path/tmp_name`` and make it durable (fdatasync); the caller renames it
    over the segment (engine.compaction).

    The records whose offsets are in ``drop`` go: a plain frame of one is
    left out, a batch frame is written again with its other inner records
    (byte for byte: the same offset, timestamp and span, so their deltas
    still hold), and each run of removed offsets becomes one hole frame
    (see log_layout.h).  Everything else, the end marker included, is
    copied byte for byte.  The file is cut to the bytes used and its header
    says so.  Returns (records removed, bytes before, bytes after).
    CorruptLog when the segment fails a check: nothing is written then.
    """
    cdef _Seg s
    cdef size_t pos = _SEGHDR, out = _SEGHDR, padded, at, end, fstart, kept
    cdef uint64_t expect, hole_start = 0, hole_span = 0
    cdef int64_t hole_ts = 0
    cdef int r, why = W_NONE
    cdef const eng_rec_header *h
    cdef _Frame fi
    cdef _Inner inner
    cdef uint8_t *q
    cdef Py_buffer ob
    cdef size_t removed = 0
    spath = _os.path.join(path, _seg_name(base))
    s = _map_seg(spath, False, base, log_id, True)
    expect = s.base
    buf = bytearray(s.size)
    PyObject_GetBuffer(buf, &ob, PyBUF_WRITABLE)
    try:
        q = <uint8_t *>ob.buf
        while True:
            r = _frame_check(s.p, s.size, pos, expect, True, &why, &fi)
            if r == R_EOS:
                out = _put_hole(q, out, &hole_start, &hole_span, hole_ts)
                memcpy(q + out, s.p + pos, _HDR)
                out += _HDR
                break
            if r != R_REC:
                raise CorruptLog(spath, pos, "a sealed segment ends without its end marker" if r == R_END
                                 else _WHY.get(why, "?"))
            h = <const eng_rec_header *>(s.p + pos)
            padded = _align8(h.length)
            if h.flags & ENG_REC_FLAG_BATCH:
                # the inner records kept, after a header written below
                fstart = out
                at = pos + _HDR
                end = pos + h.length
                kept = 0
                while at < end:
                    if _inner_at(s.p, at, end, &inner) != 0:  # checked by _frame_check: changed since
                        raise CorruptLog(spath, pos, _WHY[W_INNER])
                    if expect + inner.delta in drop:
                        removed += 1
                    else:
                        if not kept:
                            out = _put_hole(q, out, &hole_start, &hole_span, hole_ts)
                            fstart = out
                        memcpy(q + fstart + _HDR + kept, s.p + at, inner.next - at)
                        kept += inner.next - at
                    at = inner.next
                if kept:
                    out = fstart + _seal_frame(q + fstart, h.offset, h.timestamp_ns, h.key_len,
                                               ENG_REC_FLAG_BATCH, <uint32_t>(_HDR + kept))
                else:
                    if not hole_span:
                        hole_start = expect
                    hole_span += fi.span
                    hole_ts = fi.last_ts
            elif h.flags & ENG_REC_FLAG_HOLE or expect in drop:
                if not (h.flags & ENG_REC_FLAG_HOLE):
                    removed += 1
                if not hole_span:
                    hole_start = expect
                hole_span += fi.span
                hole_ts = h.timestamp_ns
            else:
                out = _put_hole(q, out, &hole_start, &hole_span, hole_ts)
                memcpy(q + out, s.p + pos, padded)
                out += padded
            pos += padded
            expect += fi.span
        memcpy(q, PyBytes_AS_STRING(_make_seg_header(s.base, out, log_id, s.created_ns)), _SEGHDR)
    finally:
        PyBuffer_Release(&ob)
        before = s.size
        s._unmap()
    tpath = _os.path.join(path, tmp_name)
    fd = _os.open(tpath, _os.O_WRONLY | _os.O_CREAT | _os.O_TRUNC, 0o600)
    try:
        view = memoryview(buf)[:out]
        done = 0
        while done < out:
            done += _os.write(fd, view[done:])
        _os.fdatasync(fd)
    finally:
        _os.close(fd)
    return removed, before, out


def repair_truncate(path):
    """Cut the log at its first invalid record (``queue-engine log repair --truncate``).

    Zeroes everything from the first invalid record of the first damaged
    segment and deletes every later segment (a segment whose header is
    damaged goes entirely; a truncated file is first grown back), then writes
    a checkpoint there.  Takes the writer lock.  Returns the first damage's
    ScanResult, or None when nothing was wrong.  Records after the cut are
    lost: run ``verify`` first and keep a copy if they matter.
    """
    path = _os.fspath(path)
    meta = _read_meta(path)
    lid = meta["log_uuid"].bytes
    first_bad = None
    lock_fd = _take_lock(path)
    try:
        for _pass in range(3):
            results = _verify(path, False)
            bad = next((r for r in results if r.error is not None), None)
            if bad is None:
                break
            if first_bad is None:
                first_bad = bad
            base = bad.base_offset
            spath = _os.path.join(path, _seg_name(base))
            for b in _list_segments(path):
                if b > base:
                    _remove_segment(path, b)
            for ext in (".idx", ".tix"):
                try:
                    _os.unlink(_os.path.join(path, f"{base:020d}{ext}"))
                except FileNotFoundError:
                    pass
            fd = _os.open(spath, _os.O_RDWR)
            try:
                size = _os.fstat(fd).st_size
                hdr = _os.pread(fd, 64, 0)
                ok_header = False
                if len(hdr) == 64:
                    magic, ver, hsize, hbase, segb, hlid, created, flags, crc = _SEG_HEADER.unpack(hdr)
                    ok_header = (magic == _SEG_MAGIC and hbase == base and hlid == lid
                                 and eng_crc32c(0, PyBytes_AS_STRING(hdr), 60) == crc
                                 and segb >= size and segb <= (1 << 32))
                if ok_header and segb > size:
                    _reserve_file(fd, segb)  # truncated: grow back, then look again
                    _os.fsync(fd)
                    continue
                if not ok_header:
                    _os.close(fd)
                    fd = -1
                    _remove_segment(path, base)
                    try:
                        _os.unlink(_os.path.join(path, "checkpoint"))
                    except FileNotFoundError:
                        pass
                    if not _list_segments(path):
                        _write_checkpoint(path, base, _SEGHDR, base, False)
                    continue
                cut = max(bad.error_position, _SEGHDR)
                zero = b"\0" * 65536
                p = cut
                while p < size:
                    n = min(len(zero), size - p)
                    _os.pwrite(fd, zero[:n], p)
                    p += n
                _os.fsync(fd)
            finally:
                if fd >= 0:
                    _os.close(fd)
            if bad.sealed or cut != bad.end_position:
                pass
            _write_checkpoint(path, base, cut, bad.next_offset, False)
        if first_bad is not None:
            _note_truncation(path, first_bad.next_offset)
        _fsync_dir(path)
    finally:
        _os.close(lock_fd)
    if first_bad is not None:
        _logger.warning("log %s: repaired by truncating %s at byte %d (%s)", path,
                        first_bad.segment, first_bad.error_position, first_bad.error)
    return first_bad


def _check_segment_bytes(segment_bytes):
    """Raise TypeError / ValueError unless ``segment_bytes`` is a valid
    segment size. Layers that open their logs lazily (the durable queues)
    call it up front, so a bad size fails at construction, not at first put."""
    if not isinstance(segment_bytes, int) or isinstance(segment_bytes, bool):
        raise TypeError("segment_bytes must be an int")
    if segment_bytes < <Py_ssize_t>_MIN_SEGMENT or segment_bytes > (1 << 32) - 4096:
        raise ValueError(f"segment_bytes must be in [{_MIN_SEGMENT}, 2**32 - 4096], not {segment_bytes}")


cdef _remove_segment(str path, uint64_t base):
    for ext in (".seg", ".idx", ".tix"):
        try:
            _os.unlink(_os.path.join(path, f"{base:020d}{ext}"))
        except FileNotFoundError:
            pass


include "reserve.pxi"


cdef int _take_lock(str path) except -1:
    import fcntl
    lpath = _os.path.join(path, "writer.lock")
    fd = _os.open(lpath, _os.O_RDWR | _os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = None
        try:
            holder = int(_os.pread(fd, 32, 0).decode().strip() or 0) or None
        except (ValueError, OSError, UnicodeDecodeError):
            pass
        _os.close(fd)
        if exc.errno in (_errno.EWOULDBLOCK, _errno.EAGAIN, _errno.EACCES):
            raise LogLocked(path, holder) from None
        raise
    try:
        # the pid is for messages only (LogLocked says who holds it): the
        # lock is the flock, so failing to write it fails nothing
        _os.ftruncate(fd, 0)
        _os.pwrite(fd, f"{_os.getpid()}\n".encode(), 0)
    except OSError:
        pass
    return fd


cdef object _read_checkpoint(str path):
    cpath = _os.path.join(path, "checkpoint")
    try:
        with open(cpath, "rb") as f:
            data = f.read(256)
    except FileNotFoundError:
        return None
    if len(data) != _CHECKPOINT.size:
        raise CorruptLog(cpath, 0, "checkpoint file has the wrong size")
    magic, base, pos, nxt, clean, crc = _CHECKPOINT.unpack(data)
    if magic != _CKPT_MAGIC or eng_crc32c(0, PyBytes_AS_STRING(data), 36) != crc:
        raise CorruptLog(cpath, 0, "checkpoint file fails its check")
    return (base, pos, nxt, clean)


cdef _put_checkpoint(str path, uint64_t base, uint64_t pos, uint64_t nxt, bint clean):
    """Write the checkpoint file durably (no sync hook: see _write_checkpoint)."""
    raw = _CHECKPOINT.pack(_CKPT_MAGIC, base, pos, nxt, 1 if clean else 0, 0)
    crc = eng_crc32c(0, PyBytes_AS_STRING(raw), 36)
    _atomic_write(path, "checkpoint", raw[:36] + _struct.pack("<I", crc), True)


cdef _write_checkpoint(str path, uint64_t base, uint64_t pos, uint64_t nxt, bint clean):
    _put_checkpoint(path, base, pos, nxt, clean)
    _call_hook(path, {"kind": "checkpoint", "segment": base, "position": pos, "next_offset": nxt})


cdef _write_index(str path, _Seg s, size_t covered):
    """Write .idx / .tix for s (rebuildable, so no fsync)."""
    cdef size_t i
    cdef bytes ent = PyBytes_FromStringAndSize(NULL, 8 * s.ix_n)
    cdef bytes tent = PyBytes_FromStringAndSize(NULL, 16 * s.ix_n)
    cdef uint8_t *e = <uint8_t *>PyBytes_AS_STRING(ent)
    cdef uint8_t *t = <uint8_t *>PyBytes_AS_STRING(tent)
    # a C loop: a roll writes the index of a whole segment (16k entries for
    # 64 MiB) on the appending thread
    for i in range(s.ix_n):
        eng_log_put_le32(e + 8 * i, s.ix_rel[i])        # "<II": rel, pos
        eng_log_put_le32(e + 8 * i + 4, s.ix_pos[i])
        eng_log_put_le64(t + 16 * i, <uint64_t>s.ix_ts[i])  # "<qII": ts, rel, pos
        eng_log_put_le32(t + 16 * i + 8, s.ix_rel[i])
        eng_log_put_le32(t + 16 * i + 12, s.ix_pos[i])
    for magic, body, ext in ((_IDX_MAGIC, ent, ".idx"), (_TIX_MAGIC, tent, ".tix")):
        head = _INDEX_HEADER.pack(magic, s.base, s.ix_n, covered,
                                  eng_crc32c(0, PyBytes_AS_STRING(body), len(body)), 0)
        hcrc = eng_crc32c(0, PyBytes_AS_STRING(head), 28)
        _atomic_write(path, f"{s.base:020d}{ext}", head[:28] + _struct.pack("<I", hcrc) + body, False)


cdef size_t _load_index(str path, _Seg s) except? 0:
    """Load .idx/.tix into s if present and consistent; returns the covered position (0: none)."""
    cdef size_t i, n, covered
    try:
        with open(_os.path.join(path, f"{s.base:020d}.idx"), "rb") as f:
            idx = f.read()
        with open(_os.path.join(path, f"{s.base:020d}.tix"), "rb") as f:
            tix = f.read()
    except FileNotFoundError:
        return 0
    if len(idx) < 32 or len(tix) < 32:
        return 0
    m1, b1, n1, c1, crc1, h1 = _INDEX_HEADER.unpack_from(idx)
    m2, b2, n2, c2, crc2, h2 = _INDEX_HEADER.unpack_from(tix)
    if (m1 != _IDX_MAGIC or m2 != _TIX_MAGIC or b1 != s.base or b2 != s.base or n1 != n2
            or c1 != c2 or len(idx) != 32 + 8 * n1 or len(tix) != 32 + 16 * n2
            or n1 > s.ix_cap or c1 > s.size
            or eng_crc32c(0, PyBytes_AS_STRING(idx), 28) != h1
            or eng_crc32c(0, PyBytes_AS_STRING(tix), 28) != h2
            or eng_crc32c(0, PyBytes_AS_STRING(idx) + 32, 8 * n1) != crc1
            or eng_crc32c(0, PyBytes_AS_STRING(tix) + 32, 16 * n2) != crc2):
        return 0
    n = n1
    covered = c1
    for i in range(n):
        rel, pos = _struct.unpack_from("<II", idx, 32 + 8 * i)
        ts, rel2, pos2 = _struct.unpack_from("<qII", tix, 32 + 16 * i)
        if rel2 != rel or pos2 != pos or pos < _SEGHDR or pos >= covered:
            s.ix_n = 0
            return 0
        s.ix_rel[i] = rel
        s.ix_pos[i] = pos
        s.ix_ts[i] = ts
    s.ix_n = n
    s.ix_next = (s.ix_pos[n - 1] + ENG_INDEX_INTERVAL) if n else 0
    return covered


cdef object _map_notify(str path, bint create):
    npath = _os.path.join(path, "notify")
    flags = _os.O_RDWR | (_os.O_CREAT if create else 0)
    try:
        fd = _os.open(npath, flags, 0o600)
    except FileNotFoundError:
        return None
    try:
        if _os.fstat(fd).st_size < 64:
            if not create:
                return None
            _os.ftruncate(fd, 64)
        mm = _mmap.mmap(fd, 64)
    finally:
        _os.close(fd)
    return mm


@cython.final
cdef class _Notify:
    """The shared `notify` block: futex word + waiter count."""
    cdef object _mm          # mmap of the 64-byte notify file
    cdef Py_buffer _buf      # export pinning the mapping
    cdef bint _has_buf       # _buf valid
    cdef eng_notify *n       # the block

    def __dealloc__(self):
        self.close()

    cdef close(self):
        if self._has_buf:
            PyBuffer_Release(&self._buf)
            self._has_buf = False
            self.n = NULL
        if self._mm is not None:
            self._mm.close()
            self._mm = None


cdef _Notify _open_notify(str path, bint create):
    cdef _Notify nt
    mm = _map_notify(path, create)
    if mm is None:
        return None
    nt = _Notify.__new__(_Notify)
    nt._mm = mm
    PyObject_GetBuffer(mm, &nt._buf, PyBUF_WRITABLE)
    nt._has_buf = True
    nt.n = <eng_notify *>nt._buf.buf
    if create:
        eng_store_release_u32(&nt.n.magic, ENG_NOTIFY_MAGIC)
    return nt


# ---------------------------------------------------------------- records

@cython.final
cdef class Record:
    """One record of the log.

    ``offset`` (dense, from 0; key compaction leaves gaps), ``timestamp``
    (wall-clock ns when appended, non-decreasing along the log), ``key``
    (``None`` when appended without one), ``value`` (``bytes``; a read-only
    ``memoryview`` for ``copy=False`` readers) and ``tombstone`` (a delete
    marker written by ``Log.delete``: its value is empty).
    ``len(record)`` is the value's length.
    """
    cdef readonly int64_t offset     # offset of the record
    cdef readonly int64_t timestamp  # wall-clock ns
    cdef readonly object key         # bytes / memoryview / None
    cdef readonly object value       # bytes / memoryview
    cdef readonly bint tombstone     # a delete marker (Log.delete)

    def __len__(self):
        return len(self.value)

    def __repr__(self):
        return f"Record(offset={self.offset}, timestamp={self.timestamp}, key={self.key!r}, value={bytes(self.value[:32])!r}{'...' if len(self.value) > 32 else ''})"

    def __eq__(self, other):
        cdef Record o
        if not isinstance(other, Record):
            return NotImplemented
        o = <Record>other
        return (self.offset == o.offset and self.timestamp == o.timestamp
                and self.key == o.key and self.value == o.value and self.tombstone == o.tombstone)

    __hash__ = None


# ---------------------------------------------------------------- writer

cdef int D_NONE = 0
cdef int D_INTERVAL = 1
cdef int D_ALWAYS = 2


def _compact_in_background(ref):
    """cleanup="compact": compaction passes after rolls, off the append path,
    until no roll happened during the last pass or the log closes."""
    log = ref()
    if log is None:
        return
    try:
        while (<Log>log)._compact_due and not (<Log>log)._compact_stop:
            (<Log>log)._compact_due = False
            (<Log>log)._compact_pass(False)
    except Closed:
        pass
    except Exception:  # noqa: BLE001 - a background failure must be seen, not kill the process
        _logger.exception("log %s: background compaction failed", (<Log>log)._path)


def _flusher(ref, stop, interval):
    while not stop.wait(interval):
        log = ref()
        if log is None:
            return
        try:
            (<Log>log)._flush_if_dirty()
        except Exception:  # noqa: BLE001 - a background failure must be seen, not kill the thread
            # the log is broken now (every later append raises it): say so once, stop
            _logger.exception("log %s: background flush failed", (<Log>log)._path)
            return
        log = None


cdef inline bint _bytes_of(object obj, Py_buffer *view, const char **p, size_t *n,
                           str what) except -1:
    """Pointer and length of a bytes-like object: ``bytes`` directly, anything
    else through the buffer protocol.  True when ``view`` was taken and must be
    released by the caller.  ``TypeError`` "<what>, not <type>" otherwise."""
    if PyBytes_CheckExact(obj):
        p[0] = PyBytes_AS_STRING(obj)
        n[0] = <size_t>PyBytes_GET_SIZE(obj)
        return False
    if not PyObject_CheckBuffer(obj):
        raise TypeError(f"{what}, not {type(obj).__name__}")
    PyObject_GetBuffer(obj, view, PyBUF_SIMPLE)
    p[0] = <const char *>view.buf
    n[0] = <size_t>view.len
    return True


ctypedef struct _Batch:
    bint open          # a batch frame is being framed at the writer's _pos
    size_t flen        # its bytes so far (header included)
    uint64_t count     # records in it
    uint64_t base      # its first offset
    int64_t ts         # its timestamp (one per append_many call)
    size_t l_ihl       # last record: bytes before its key
    size_t l_klen      # last record: key bytes
    size_t l_vlen      # last record: value bytes
    uint32_t l_flags   # last record: ENG_REC_FLAG_KEY or 0


cdef inline size_t _inner_body_len(uint64_t delta, uint32_t flags, size_t klen, size_t vlen) noexcept nogil:
    """body_len of an inner record (attr, offset delta, ts delta 0, key, value)."""
    cdef size_t n = 1 + _varint_len(delta) + 1 + vlen
    if flags:
        n += _varint_len(klen) + klen
    return n



# ---------------------------------------------------------------- group commit: sleepers
#
# A thread whose records a sync in flight may not cover sleeps in _sync_upto
# on a lock of its own (a _Sleeper), not on one condition variable for all.
# When the sync ends, the syncer wakes only the sleepers it covered (their
# targets are durable now) plus, if some are left and no sync runs, one of
# those to sync next; the others sleep on.
#
# The covered sleepers take the GIL in turn, in a hand-off chain (_Handoff):
# each thread releasing the GIL inside the log (to sleep or to sync) bumps
# the log's count of such releases, `passes`.  A woken sleeper holds a
# ticket, the count at which its turn comes, and on a machine with several
# CPUs waits for it spinning without the GIL (at most the spin budget), so
# that it takes the GIL as soon as the thread before it lets go of it,
# without sleeping again on the GIL's own condition variable.  At most two
# are in flight (woken, not yet holding the GIL): the next, spinning, and the
# one after it, woken by the thread that releases the GIL just before it
# does, while that CPU is still busy, so that it is runnable there when its
# turn comes instead of an idle CPU being woken then.  Every wake is made
# without the GIL.  A sleeper whose spin runs out (the thread before it held
# the GIL long, or released it outside the log: a step doing I/O) wakes the
# rest of the chain at once, unchained, and the spin budget halves (it grows
# back with the spins that do not run out): so a workload that leaves the
# log between syncs pays at most a short spin per chain.  On one CPU nobody
# spins (the spinner would only keep the GIL's holder from the CPU); a
# sleeper then takes the GIL when the scheduler runs it, and one that takes
# it with none in flight wakes the next, so that the chain never stalls.

cdef extern from "<sched.h>" nogil:
    int sched_yield()

cdef extern from "pythread.h":
    ctypedef enum _LockStatus "PyLockStatus":
        _LOCK_FAILURE "PY_LOCK_FAILURE"
        _LOCK_ACQUIRED "PY_LOCK_ACQUIRED"
        _LOCK_INTR "PY_LOCK_INTR"
    _LockStatus PyThread_acquire_lock_timed(PyThread_type_lock lock, long long microseconds,
                                            int intr_flag) nogil

cdef enum:
    _S_WAIT = 0    # asleep, waiting for a sync
    _S_DONE = 1    # woken: its target is durable, or the log broke (it leaves)
    _S_LEAD = 2    # woken to run the next sync (its target is not durable yet)

# one blocking slice of a sleep (us): then the GIL is taken for signals (Ctrl-C)
cdef long long _SLEEP_SLICE_US = 50_000
# how long a woken sleeper spins for the GIL's release in the log (ns): at
# most a few wake-ups' worth, so that a chain of threads whose work between
# syncs is short never sleeps twice, and a thread busy elsewhere costs the
# next one no more than this; halved by each spin that runs out (threads
# that leave the log for long between syncs: I/O), grown back by those that
# do not, never below the least
cdef int64_t _HANDOFF_SPIN_NS = 50_000
cdef int64_t _HANDOFF_SPIN_MIN_NS = 4_000



ctypedef struct _Handoff:
    # a log's hand-off chain of woken sleepers (see above); all but `passes`
    # read and changed with the GIL held
    uint64_t passes      # bumped (atomic) each time a thread releases the GIL in the log
    void *head           # borrowed _Sleepers still to wake, in order, linked by _next
    void *tail
    int in_flight        # woken, not yet holding the GIL
    bint spin            # woken sleepers spin (more than one CPU)
    int64_t budget_ns    # how long a woken sleeper spins at most (read without the GIL)
    uint64_t spun        # statistics: woken sleepers that spun for their turn
    uint64_t spun_out    # statistics: of those, spins that ran out (the chain woken at once)


@cython.final
cdef class _Sleeper:
    """One thread asleep in ``Log._sync_upto``: its lock is held while it
    sleeps (and between sleeps); the thread that wakes it releases it."""

    cdef PyThread_type_lock _lk    # held at rest; released to wake the sleeper
    cdef void *_next               # borrowed _Sleeper after it in the chain still to wake (or NULL)
    cdef _Handoff *_h              # the log's chain
    cdef uint64_t _ticket          # spin until _h.passes reaches this (set before _lk is released)
    cdef bint _spin                # spin at all (set before _lk is released)
    cdef uint64_t target           # the offset it waits to see durable
    cdef int role                  # _S_WAIT, _S_DONE or _S_LEAD (set before _lk is released)

    def __cinit__(self):
        self._lk = PyThread_allocate_lock()
        if self._lk == NULL:
            raise MemoryError("cannot allocate a lock")
        PyThread_acquire_lock(self._lk, NOWAIT_LOCK)

    def __dealloc__(self):
        if self._lk != NULL:
            PyThread_release_lock(self._lk)
            PyThread_free_lock(self._lk)
            self._lk = NULL

    cdef int sleep(self) except -1:
        """Block until woken (the GIL released, signals checked every slice),
        then wait for the GIL's release by the thread before it in the chain
        (``_await_turn``) and, holding the GIL, keep the chain going
        (``_took_gil``).  A signal handler's exception propagates with the
        lock not taken: the caller settles that (Log._sleep)."""
        cdef _LockStatus st
        cdef bint late = False
        cdef PyThread_type_lock wake = _h_release(self._h)
        while True:
            with nogil:
                _h_pass(self._h, wake)
                wake = NULL
                st = PyThread_acquire_lock_timed(self._lk, _SLEEP_SLICE_US, 0)
                if st == _LOCK_ACQUIRED:
                    late = self._await_turn()
            if st == _LOCK_ACQUIRED:
                self._took_gil(late)
                return 0
            PyErr_CheckSignals()

    cdef bint sleep_for(self, long long us) noexcept:
        """Block at most ``us`` microseconds (no signal checks: a short
        wait); True if woken (the chain kept going, as in ``sleep``)."""
        cdef _LockStatus st
        cdef bint late = False
        cdef PyThread_type_lock wake = _h_release(self._h)
        with nogil:
            _h_pass(self._h, wake)
            st = PyThread_acquire_lock_timed(self._lk, us, 0)
            if st == _LOCK_ACQUIRED:
                late = self._await_turn()
        if st == _LOCK_ACQUIRED:
            self._took_gil(late)
            return True
        return False

    cdef void sleep_through(self) noexcept:
        """``sleep`` without the signal checks: for a sleeper already picked
        for waking (its wake is on its way), so that the chain goes on."""
        cdef bint late
        cdef PyThread_type_lock wake = _h_release(self._h)
        with nogil:
            _h_pass(self._h, wake)
            PyThread_acquire_lock(self._lk, 1)
            late = self._await_turn()
        self._took_gil(late)

    cdef bint _await_turn(self) noexcept nogil:
        """Woken, without the GIL: spin until the log's GIL releases reach
        this sleeper's ticket, at most _HANDOFF_SPIN_NS, yielding the CPU
        now and then (the thread whose release it waits for may be queued
        behind it on this CPU).  True if the spin ran out."""
        cdef int64_t until
        cdef unsigned n = 0
        if not self._spin:
            return False
        until = eng_now_ns() + eng_load_relaxed_i64(&self._h.budget_ns)
        while <int64_t>(eng_load_acquire_u64(&self._h.passes) - self._ticket) < 0:
            eng_cpu_relax()
            n += 1
            if (n & 63) == 0:
                if eng_now_ns() > until:
                    return True
                sched_yield()
        return False

    cdef void _took_gil(self, bint late) noexcept:
        """Woken and holding the GIL: leave the in-flight count; ``late``
        (this one's spin ran out: the thread before it is busy outside the
        log): wake every sleeper still chained at once, unchained; otherwise,
        if none is in flight, wake the next so that one always is.  The wakes
        are made without the GIL."""
        cdef _Handoff *h = self._h
        cdef PyThread_type_lock lks[64]
        cdef int n, i
        h.in_flight -= 1
        if self._spin:
            h.spun += 1
            h.spun_out += late
            if late:
                h.budget_ns = max(h.budget_ns // 2, _HANDOFF_SPIN_MIN_NS)
            else:
                h.budget_ns = min(h.budget_ns + h.budget_ns // 8 + 1000, _HANDOFF_SPIN_NS)
        if late:
            while h.head != NULL:
                n = 0
                while h.head != NULL and n < 64:
                    lks[n] = _h_pop(h, 0, False)
                    n += 1
                with nogil:
                    for i in range(n):
                        PyThread_release_lock(lks[i])
        elif h.in_flight == 0 and h.head != NULL:
            lks[0] = _h_pop(h, eng_load_acquire_u64(&h.passes) + 1, h.spin)
            with nogil:
                PyThread_release_lock(lks[0])


cdef PyThread_type_lock _h_pop(_Handoff *h, uint64_t ticket, bint spin) noexcept:
    """Holding the GIL: take the first chained sleeper off the chain, in
    flight, to take the GIL once the log's GIL releases reach ``ticket``
    (``spin`` False: as soon as it runs).  Returns the lock whose release
    wakes it: the caller releases it, without the GIL where it can."""
    cdef _Sleeper w = <_Sleeper>h.head
    h.head = w._next
    if h.head == NULL:
        h.tail = NULL
    w._next = NULL
    w._ticket = ticket
    w._spin = spin
    h.in_flight += 1
    return w._lk


cdef PyThread_type_lock _h_release(_Handoff *h) noexcept:
    """Holding the GIL, just before this thread releases it in the log
    (_h_pass): the one in flight takes the GIL next; the sleeper after it is
    taken off the chain now (its ticket: that one's release), so that it
    wakes while this CPU is still busy and waits there, spinning, instead of
    an idle CPU being woken when its turn comes.  Returns its lock (or NULL)."""
    if h.head != NULL and h.in_flight <= 1:
        return _h_pop(h, eng_load_acquire_u64(&h.passes) + 1 + <uint64_t>h.in_flight, h.spin)
    return NULL


cdef inline void _h_pass(_Handoff *h, PyThread_type_lock wake) noexcept nogil:
    """The GIL just released in the log: let the sleeper in flight take it,
    then wake the one _h_release took off the chain (if any)."""
    eng_fetch_add_u64(&h.passes, 1)
    if wake != NULL:
        PyThread_release_lock(wake)


cdef int _wake_chain(_Handoff *h, list woken) except -1:
    """Holding the GIL: chain the _Sleepers of ``woken`` (roles set) after
    those still chained and, if none is in flight, wake the first (its turn:
    this thread's next GIL release in the log), without the GIL."""
    cdef _Sleeper w
    cdef PyThread_type_lock lk
    for w in woken:
        w._next = NULL
        if h.tail != NULL:
            (<_Sleeper>h.tail)._next = <void *>w
        else:
            h.head = <void *>w
        h.tail = <void *>w
    if h.in_flight == 0 and h.head != NULL:
        # the GIL is released here to wake it: that release is one of the
        # log's too, so its turn is the one after
        lk = _h_pop(h, eng_load_acquire_u64(&h.passes) + 2, h.spin)
        with nogil:
            _h_pass(h, lk)
    return 0


cdef class Log:
    """The single writer of a log directory (created if missing).

    ``durability`` says when an append counts as done:

    * ``"always"``: ``append``/``append_many`` return only after the record's
      bytes are on stable storage (Linux: written with ``pwrite``, then
      ``fdatasync``; elsewhere written
      through the mapping, ``msync(MS_SYNC)`` and ``fsync``) and, for a new
      segment, the file and directory were fsynced: an acknowledged record
      survives a process crash, a kernel crash and a power loss (as far as the
      disk honours flushes).  On Linux readers see a record only once it is
      durable.  Concurrent appenders in several threads are group-committed:
      appends made while a sync runs share the next sync.
    * ``"interval"``: a background thread syncs every ``flush_interval``
      seconds: a power loss loses at most the last interval; a process crash
      loses nothing.
    * ``"none"``: records go to the page cache only (the shared mapping): a
      process crash (even SIGKILL) loses nothing, a kernel crash or power loss
      may lose anything not yet written back by the kernel.  ``flush()``
      makes everything so far durable in every mode.

    After any crash, reopening recovers: it scans from the last checkpoint,
    keeps every valid record, syncs it before readers see it, and truncates
    a torn tail (logged on the ``"engine"`` logger).  A damaged record before
    the checkpoint, or one followed by any valid record or by a later
    segment holding records, raises :class:`engine.CorruptLog` instead of
    being skipped (``queue-engine log repair --truncate`` cuts it).

    If a write or a sync fails, the log is broken: that call and every
    waiting and later ``append``/``append_many``/``flush`` raise
    :class:`engine.LogBroken` naming the first error (the kernel may have
    dropped the unsynced pages, so no later success would be true).
    ``close()`` still releases the directory; reopen to recover.  A forked
    child cannot use its parent's writer (:class:`engine.Closed`).

    ``cleanup="compact"`` turns on key compaction after each segment roll, in
    a background thread (:meth:`compact`, :mod:`engine.compaction`): sealed
    segments keep the latest record of each key, at its offset; tombstones
    (:meth:`delete`) go once older than ``delete_retention`` seconds.
    ``cleanup="delete"`` (the default) leaves records to retention alone.

    One writer per directory: a second ``Log`` on the same directory (in this
    or another process) raises :class:`engine.LogLocked`.  Several threads may
    call ``append``/``append_many`` on one ``Log``.

    >>> with engine.Log("data/orders", durability="always") as log:
    ...     off = log.append(b"value", key=b"k")
    ...     offs = log.append_many([b"a", b"b"])
    """
    cdef str _path                # directory
    cdef str _real                # realpath, key of the in-process registry
    cdef int _lock_fd             # writer.lock, flock'ed
    cdef object _log_uuid         # uuid.UUID
    cdef bytes _log_id_bytes      # 16 raw bytes written into segment headers
    cdef _Seg _active             # segment being appended to
    cdef list _bases              # base offsets of all segments, oldest first
    cdef size_t _pos              # write position in _active (end of the last published record)
    cdef uint64_t _next           # next offset to assign
    cdef uint64_t _durable        # every offset below this is on stable storage
    cdef int64_t _last_ts         # last timestamp used (timestamps never go back)
    cdef int _durability          # D_NONE / D_INTERVAL / D_ALWAYS
    cdef size_t _segment_bytes    # size of new segments
    cdef object _retention_bytes  # int or None
    cdef object _retention_age    # float seconds or None
    cdef bint _retain_uncommitted # keep segments with offsets not yet committed by a group
    cdef double _flush_interval   # interval mode period (s)
    cdef bint _writing            # an append/roll is in progress (threads wait; GIL makes it atomic)
    cdef bint _closed             # close() ran
    cdef bint _syncing            # a sync is in flight (group commit)
    cdef object _cond             # threading.RLock guarding _syncing/_durable/_sleepers/_lead
    cdef list _sleepers           # the _Sleepers waiting for a sync (under _cond)
    cdef list _sleeper_pool       # _Sleepers at rest, for reuse
    cdef _Handoff _handoff        # the chain of woken sleepers (see _Sleeper)
    cdef _Sleeper _lead           # the sleeper woken to run the next sync, until it runs, or None
    cdef list _sync_targets       # the targets of the threads waiting in _sync_upto (changed
                                  # with the GIL held, not always _cond: list operations are atomic)
    cdef Py_ssize_t _sync_arrived # threads that began waiting since the last data sync ended
    cdef Py_ssize_t _sync_expect  # threads the last data sync served: expected back
    cdef int64_t _sync_run_ns     # how long the last data sync ran
    cdef int64_t _sync_total_ns   # statistics: how long the syncs counted by _n_syncs ran
    cdef int64_t _sync_end_ns     # when it ended
    cdef _Sleeper _gatherer       # the syncer gathering the writers it expects (_gather_us), or None
    cdef list _unsynced_old       # durability="none": paths of rolled segments not yet synced
    cdef object _stop             # threading.Event stopping the flusher
    cdef object _thread           # the interval flusher
    cdef _Notify _notify          # shared wake-up block
    cdef uint32_t *_waiters       # &notify.waiters (cached)
    cdef uint64_t _n_appends      # statistics
    cdef PyObject *_off_int       # append(): the int it returned last, owned (eng_log_offset_int)
    cdef uint64_t _n_syncs        # statistics
    cdef uint64_t _n_rolls        # statistics
    cdef uint64_t _recovered_bytes  # bytes zeroed by recovery at open
    cdef bint _pw                 # durable path: pwrite + fdatasync, publish after the sync (Linux, "always")
    cdef uint8_t *_stage          # pwrite path: records framed here, then written with one pwrite
    cdef size_t _stage_cap        # bytes allocated at _stage
    cdef size_t _stage_len        # bytes framed, not yet written
    cdef size_t _wpos             # pwrite path: bytes of _active handed to pwrite (<= _pos)
    cdef uint64_t _wnext          # pwrite path: offsets below this were handed to pwrite
    cdef object _broken           # str: the first failed write or sync; everything refuses (reopen recovers)
    cdef int _broken_errno        # its errno
    cdef bint _dir_dirty          # durability="none": segments created since the last dir fsync
    cdef object _ckpt_lock        # threading.Lock: one checkpoint write at a time, never moving back
    cdef uint64_t _ckpt_base      # segment and position of the last checkpoint written
    cdef uint64_t _ckpt_pos
    cdef int64_t _ckpt_ns         # when (monotonic ns): syncs move it at most every _CKPT_EVERY_NS
    cdef long _pid                # the process that opened the log (for the message)
    cdef bint _in_child           # set in a fork's child (os.register_at_fork): the handle is inert
    cdef bint _was_clean          # the last stop before this open was clean
    cdef bint _compact            # cleanup="compact": key compaction after each roll
    cdef double _delete_retention # seconds a latest tombstone stays before compaction drops it
    cdef object _maint            # threading.Lock: retention and compaction, one at a time
    cdef object _compactor        # background compaction thread (cleanup="compact") or None
    cdef bint _compact_stop       # close() asks the compaction thread to stop
    cdef bint _compact_due        # a roll since the compaction thread's last pass began
    cdef public object _compaction_memo  # engine.compaction's notes between passes (None: no pass yet)
    cdef size_t _pf_due           # mapping path: _pos at which the prefaulter is pushed next
    cdef bint _pf_wb              # mapping path: the prefaulter writes back what it populates
    cdef uint64_t _pf_syncs       # mapping path: _n_syncs at the last push
    cdef size_t _pf_at            # mapping path: _pos at the last push (_SEGHDR after a roll)
    cdef uint64_t _pf_wb_bytes    # statistics: writeback_ahead_bytes of prefaulters stopped
    cdef eng_log_pf *_pf          # the prefaulter (started by the first push; NULL: none); whatever
                                  # replaces or unmaps _active retargets it first (see _create_segment)
    cdef _Seg _retired            # segment a roll retired, kept mapped while the prefaulter drops its entries
    cdef eng_log_zf *_zf          # pwrite path: the zeroer ahead of the tail (NULL: none); a roll
                                  # declares its end marker to it, then retargets it (_zf_attach)
    cdef size_t _zf_due           # pwrite path: write end at which the zeroer is pushed next
    cdef size_t _zf_ahead         # pwrite path: how far past the tail the next push asks for zeros
    cdef object __weakref__

    def __cinit__(self):
        self._lock_fd = -1
        self._closed = True

    def __init__(self, path, durability="always", segment_bytes=DEF_SEGMENT_BYTES,
                 retention_bytes=None, retention_age=None, retain_uncommitted=True,
                 flush_interval=0.05, cleanup="delete", delete_retention=86400.0):
        if not isinstance(path, (str, bytes, _os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike, not {type(path).__name__}")
        path = _os.fsdecode(_os.fspath(path))
        _check_durability(durability)
        _check_segment_bytes(segment_bytes)
        if retention_bytes is not None:
            if not isinstance(retention_bytes, int) or isinstance(retention_bytes, bool):
                raise TypeError("retention_bytes must be an int or None")
            if retention_bytes < 0:
                raise ValueError("retention_bytes must be >= 0")
        if retention_age is not None:
            if not isinstance(retention_age, (int, float)) or isinstance(retention_age, bool):
                raise TypeError("retention_age must be a number of seconds or None")
            if retention_age < 0:
                raise ValueError("retention_age must be >= 0")
        if not isinstance(flush_interval, (int, float)) or isinstance(flush_interval, bool):
            raise TypeError("flush_interval must be a number of seconds")
        if not 0 < flush_interval <= 3600:
            raise ValueError("flush_interval must be in (0, 3600] seconds")
        if cleanup not in ("delete", "compact"):
            raise ValueError(f"cleanup must be 'delete' or 'compact', not {cleanup!r}")
        if not isinstance(delete_retention, (int, float)) or isinstance(delete_retention, bool):
            raise TypeError("delete_retention must be a number of seconds")
        if delete_retention < 0:
            raise ValueError("delete_retention must be >= 0")
        self._compact = cleanup == "compact"
        self._delete_retention = float(delete_retention)
        self._maint = _threading.Lock()
        self._path = path
        self._durability = {"none": D_NONE, "interval": D_INTERVAL, "always": D_ALWAYS}[durability]
        self._pw = self._durability == D_ALWAYS and ENG_LOG_PWRITE
        # the pwrite path never writes through the mapping
        self._pf_due = _PF_OFF if self._pw or not ENG_LOG_PF_HAVE else 0
        self._zf_due = _ZF_OFF
        self._zf_ahead = min(_ZF_MIN_AHEAD, _ZF_AHEAD)
        self._segment_bytes = (segment_bytes + 7) & ~7
        self._retention_bytes = retention_bytes
        self._retention_age = None if retention_age is None else float(retention_age)
        self._retain_uncommitted = bool(retain_uncommitted)
        self._flush_interval = flush_interval
        self._cond = _threading.RLock()
        self._sleepers = []
        self._sleeper_pool = []
        memset(&self._handoff, 0, sizeof(_Handoff))
        self._handoff.spin = _usable_cpus() > 1
        self._handoff.budget_ns = _HANDOFF_SPIN_NS
        self._ckpt_lock = _threading.Lock()
        self._pid = _os.getpid()
        self._unsynced_old = []
        self._bases = []

        # each new directory's entry must be durable too, or a power loss
        # takes the whole log with it
        _make_dirs(path)
        real = _os.path.realpath(path)
        if real in _open_writers:
            raise LogLocked(path, _os.getpid())
        self._lock_fd = _take_lock(path)
        _open_writers.add(real)
        self._real = real
        _live_writers.add(self)
        try:
            self._open()
        except BaseException:
            self._release()
            raise
        self._closed = False
        if self._durability == D_INTERVAL:
            self._stop = _threading.Event()
            self._thread = _threading.Thread(
                target=_flusher, args=(_weakref.ref(self), self._stop, self._flush_interval),
                name=f"engine-log-flush:{path}", daemon=True)
            self._thread.start()

    # ---- open / recovery

    cdef _open(self):
        path = self._path
        for name in _os.listdir(path):
            if name.endswith(".tmp") and name.startswith("."):
                try:
                    _os.unlink(_os.path.join(path, name))
                except FileNotFoundError:
                    pass
        try:
            meta = _read_meta(path)
        except FileNotFoundError:
            if _list_segments(path):
                raise CorruptLog(_os.path.join(path, "meta"), 0,
                                 "segments exist but the meta file is missing") from None
            meta = {"format": ENG_LOG_FORMAT, "log_id": str(_uuid.uuid4()),
                    "segment_bytes": int(self._segment_bytes), "created_ns": _time.time_ns()}
            _atomic_write(path, "meta", _json.dumps(meta).encode(), True)
            meta = _read_meta(path)
        if meta["segment_bytes"] != self._segment_bytes or meta["format"] != ENG_LOG_FORMAT:
            # an older format's log says it is this format's now: its new
            # segments may hold batch frames, which an older writer must refuse
            meta2 = {k: v for k, v in meta.items() if k != "log_uuid"}
            meta2["segment_bytes"] = int(self._segment_bytes)
            meta2["format"] = ENG_LOG_FORMAT
            _atomic_write(path, "meta", _json.dumps(meta2).encode(), True)
        self._log_uuid = meta["log_uuid"]
        self._log_id_bytes = self._log_uuid.bytes
        _os.makedirs(_os.path.join(path, "groups"), mode=0o700, exist_ok=True)
        self._notify = _open_notify(path, True)
        self._waiters = &self._notify.n.waiters
        self._recover()

    cdef _recover(self):
        cdef _Seg s = None
        cdef size_t pos, endpos, covered, tail
        cdef uint64_t expect, off_out
        cdef int64_t ts = 0
        cdef int r, why = W_NONE
        cdef uint64_t base = 0
        path = self._path
        bases = _list_segments(path)
        ck = _read_checkpoint(path)
        if not bases:
            nxt = 0 if ck is None else ck[2]
            self._bases = []
            self._create_segment(nxt, 0, True)
            self._next = nxt
            self._durable = nxt
            self._write_ckpt(False)
            self._was_clean = ck is None or bool(ck[3])
            return
        if ck is None:
            _logger.warning("log %s: no checkpoint; scanning every segment", path)
            ck_base, ck_pos, ck_next, clean = bases[0], _SEGHDR, bases[0], 0
        else:
            ck_base, ck_pos, ck_next, clean = ck
            if ck_base not in bases:
                if ck_base < bases[0]:
                    # retention deleted the checkpoint's segment: everything
                    # left was written after it, so nothing is known-good yet
                    ck_base, ck_pos, ck_next = bases[0], _SEGHDR, bases[0]
                else:
                    raise CorruptLog(_os.path.join(path, _seg_name(ck_base)), ck_pos,
                                     "the checkpoint's segment is missing")
        self._was_clean = bool(clean)
        walked = []  # segment files whose records recovery accepts past the checkpoint
        i = bases.index(ck_base)
        self._bases = bases[:i]
        for b in self._bases:
            self._check_sealed_index(b)
        # the checkpoint segment must be intact up to the checkpoint
        spath = _os.path.join(path, _seg_name(ck_base))
        # after a clean stop only the records near the checkpoint are read
        # (from the last index entry on); else the whole segment may be
        _probe_readable(spath, 0 if not clean else max(ck_pos, _PROBE_NEAR) - _PROBE_NEAR,
                        ck_pos + _PROBE_NEAR if clean else 0)
        s = _map_seg(spath, True, ck_base, self._log_id_bytes, False, True)
        if s is None:
            # tolerated only when the segment was created after the checkpoint
            # (a brand-new segment whose header never reached the disk)
            raise CorruptLog(spath, 0, "segment header damaged before the last checkpoint")
        if ck_pos < _SEGHDR or ck_pos > s.size:
            raise CorruptLog(spath, ck_pos, f"segment is shorter than the last checkpoint ({s.size} bytes)")
        covered = _load_index(path, s) if clean else 0
        if covered >= ck_pos:
            # from the last index entry, not the checkpoint: the last record's
            # timestamp (timestamps never go back) comes from the records
            if s.ix_n:
                pos = s.ix_pos[s.ix_n - 1]
                off_out = s.base + s.ix_rel[s.ix_n - 1]
            else:
                pos = _SEGHDR
                off_out = s.base
            ts = s.created_ns
            r = _scan(s, pos, off_out, True, &pos, &off_out, &ts, &why)
            if pos < ck_pos or (pos == ck_pos and off_out != ck_next):
                covered = 0  # a stale index: check everything from the start
        if covered < ck_pos:
            # (re)build the index from the start, verifying the known-good part
            s.ix_n = 0
            s.ix_next = 0
            ts = 0
            r = _scan(s, _SEGHDR, s.base, True, &pos, &off_out, &ts, &why)
            if pos < ck_pos or (pos == ck_pos and off_out != ck_next):
                raise CorruptLog(spath, pos, _WHY.get(why, "records end before the last checkpoint")
                                 if r == R_BAD else "records end before the last checkpoint")
        walked.append(spath)
        # walk forward through later segments
        while True:
            if r == R_EOS:
                # bytes after an end marker are never valid: garbage the kernel
                # wrote there before a power loss goes
                s = self._grow_back(s)
                self._zero_tail(s, pos + _HDR)
                nxt_base = off_out
                later = [b for b in bases if b > s.base]
                if later and later[0] == nxt_base:
                    self._seal(s, pos)
                    spath = _os.path.join(path, _seg_name(nxt_base))
                    _probe_readable(spath, 0)
                    s2 = _map_seg(spath, True, nxt_base, self._log_id_bytes, False, True)
                    if s2 is None:
                        self._check_no_records_after(s, later, pos)
                        _logger.warning("log %s: dropping segment %s with a damaged header (torn roll)",
                                        path, spath)
                        for b in later:
                            _remove_segment(path, b)
                        self._bases.append(s.base)
                        self._sync_recovered(walked)
                        self._create_segment(nxt_base, ts, True)
                        self._next = nxt_base
                        break
                    s = s2
                    walked.append(spath)
                    ts = max(ts, s.created_ns)
                    r = _scan(s, _SEGHDR, nxt_base, True, &pos, &off_out, &ts, &why)
                    continue
                for b in later:
                    _logger.warning("log %s: dropping segment %020d not chained to the log", path, b)
                    _remove_segment(path, b)
                self._seal(s, pos)
                self._sync_recovered(walked)
                self._create_segment(nxt_base, ts, True)
                self._next = nxt_base
                break
            # R_END or R_BAD: the log ends here, unless valid data follows:
            # then it is damage (CorruptLog; `repair --truncate` cuts it)
            later = [b for b in bases if b > s.base]
            q = _valid_after(s.p, s.size, pos, off_out)
            if q >= 0:
                raise CorruptLog(s.path, pos, f"{_WHY.get(why, 'a zero length word') if r == R_BAD else 'a zero length word'} "
                                 f"followed by a valid record at byte {q}: damage, not a torn tail")
            self._check_no_records_after(s, later, pos)
            for b in later:
                _logger.warning("log %s: dropping segment %020d (no records) after the torn tail of %s", path, b, s.path)
                _remove_segment(path, b)
            if r == R_BAD:
                _logger.warning("log %s: torn tail in %s at byte %d (%s) after the last checkpoint: truncated from offset %d",
                                path, s.path, pos, _WHY.get(why, "?"), off_out)
            self._zero_tail(s, pos)
            s = self._grow_back(s)
            self._active = s
            self._bases.append(s.base)
            self._pos = pos
            self._next = off_out
            break
        s = self._active
        # durable before visible: what recovery accepted (maybe only in the
        # page cache of a killed writer) is synced before readers see it and
        # before a checkpoint covers it.  A clean stop synced everything up
        # to its checkpoint: nothing to do unless records lie past it
        if not clean or len(walked) > 1 or self._pos != ck_pos or self._recovered_bytes:
            self._sync_recovered(walked)
        if not clean:
            # records past the recovered end may have been read before the
            # crash (see _note_truncation): groups past it resume here
            _note_truncation(path, self._next)
        s.synced = self._pos
        self._zf_attach(s, self._pos)  # beyond it: zeros, maybe still unwritten blocks
        self._durable = self._next
        self._wpos = self._pos
        self._wnext = self._next
        # published before active_base (see log_layout.h): readers trust length
        # words only below it, and everything recovered is complete
        self._publish(self._pos, self._next)
        eng_store_release_u64(&self._notify.n.active_base, s.base)
        self._last_ts = max(ts, s.created_ns)
        self._write_ckpt(False)

    cdef _sync_recovered(self, list paths):
        """fdatasync the segments recovery accepted and fsync the directory
        (a writer in "none" mode synced neither); a failure fails the open."""
        try:
            _sync_paths(paths)
            _fsync_dir(self._path)
        except OSError as exc:
            raise LogBroken(self._path, f"recovery could not sync {len(paths)} segment(s) "
                            f"({_os.strerror(exc.errno) if exc.errno else exc})",
                            exc.errno or _errno.EIO) from None
        _call_hook(self._path, {"kind": "recovery", "segments": [_os.path.basename(p) for p in paths]})
        del paths[:]

    cdef _check_no_records_after(self, _Seg s, list later, size_t pos):
        """CorruptLog when a later segment holds a record: the log cannot end
        in s (a roll syncs the end marker before the next segment exists)."""
        cdef _Seg s2
        cdef int why = W_NONE
        for b in later:
            spath = _os.path.join(self._path, _seg_name(b))
            s2 = _map_seg(spath, False, b, self._log_id_bytes, False, True)
            if s2 is not None and _rec_check(s2.p, s2.size, _SEGHDR, b, True, &why) in (R_REC, R_EOS):
                raise CorruptLog(s.path, pos, f"the segment ends without its end marker but segment "
                                 f"{_seg_name(b)} after it holds records: damage, not a torn tail")

    cdef _check_sealed_index(self, uint64_t base):
        """Rebuild the index files of a sealed segment when missing or stale."""
        cdef _Seg s
        cdef size_t pos
        cdef uint64_t off
        cdef int64_t ts = 0
        cdef int why = W_NONE
        stem = _os.path.join(self._path, f"{base:020d}")
        if _os.path.exists(stem + ".idx") and _os.path.exists(stem + ".tix"):
            return  # cheap check at every open; readers validate and fall back to a scan
        spath = _os.path.join(self._path, _seg_name(base))
        s = _map_seg(spath, False, base, self._log_id_bytes, False)
        if s is None:
            return  # damaged: readers and verify report it; recovery does not touch sealed data
        if _load_index(self._path, s):
            return
        s.ix_n = 0
        s.ix_next = 0
        if _scan(s, _SEGHDR, base, True, &pos, &off, &ts, &why) == R_EOS:
            _write_index(self._path, s, pos)

    cdef _Seg _grow_back(self, _Seg s):
        """A segment file shorter than its header says (its size never reached
        the disk before a power loss): grow it back, zero-filled, and remap."""
        cdef _Seg s2
        cdef size_t n_ix
        want = _SEG_HEADER.unpack(PyBytes_FromStringAndSize(<const char *>s.p, _SEGHDR))[4]
        if s.size >= want:
            return s
        _logger.warning("log %s: segment %s was truncated to %d bytes; extending it back",
                        self._path, s.path, s.size)
        fd = _os.open(s.path, _os.O_RDWR)
        try:
            _reserve_file(fd, want)
            _os.fsync(fd)
        finally:
            _os.close(fd)
        _call_hook(self._path, {"kind": "recovery", "segments": [_os.path.basename(s.path)]})
        n_ix = s.ix_n
        s2 = _map_seg(s.path, True, s.base, self._log_id_bytes, True)
        memcpy(s2.ix_rel, s.ix_rel, n_ix * sizeof(uint32_t))
        memcpy(s2.ix_pos, s.ix_pos, n_ix * sizeof(uint32_t))
        memcpy(s2.ix_ts, s.ix_ts, n_ix * sizeof(int64_t))
        s2.ix_n = n_ix
        s2.ix_next = s.ix_next
        return s2

    cdef _zero_tail(self, _Seg s, size_t pos):
        """Zero [pos, end of segment) where it is not zero already, durably."""
        cdef size_t tail
        if pos >= s.size:
            return
        tail = _last_nonzero(s.p, pos, s.size)
        if tail > pos:
            memset(s.p + pos, 0, tail - pos)
            self._recovered_bytes += tail - pos
            if _sync_range(s.fd, s.p, pos, tail) != 0:
                raise OSError(_errno.EIO, f"sync of {s.path} failed during recovery")
            _call_hook(self._path, {"kind": "recovery", "segments": [_os.path.basename(s.path)]})

    cdef _seal(self, _Seg s, size_t pos):
        """Bookkeeping for a sealed segment met during recovery."""
        if s.base not in self._bases:
            self._bases.append(s.base)
        if not _os.path.exists(_os.path.join(self._path, f"{s.base:020d}.idx")):
            _write_index(self._path, s, pos)

    cdef _create_segment(self, uint64_t base, int64_t min_ts, bint durable=False):
        """Create, preallocate and map segment `base`; it becomes _active.
        Synced (file and directory) unless durability="none" and not `durable`
        (recovery: the checkpoint written next names it)."""
        durable = durable or self._durability != D_NONE
        path = self._path
        name = _seg_name(base)
        final = _os.path.join(path, name)
        tmp = _os.path.join(path, f".{name}.{_os.getpid()}.tmp")
        created = max(_time.time_ns(), min_ts)
        fd = _os.open(tmp, _os.O_RDWR | _os.O_CREAT | _os.O_TRUNC, 0o600)
        try:
            try:
                _reserve_file(fd, self._segment_bytes)  # ENOSPC here: the log stays as it was
                _os.pwrite(fd, _make_seg_header(base, self._segment_bytes, self._log_id_bytes, created), 0)
                if durable:
                    _os.fsync(fd)
            finally:
                _os.close(fd)
            _os.replace(tmp, final)
        except BaseException:
            _discard(tmp)  # give back what fallocate took before it failed
            raise
        try:
            if durable:
                _fsync_dir(path)
            s = _map_seg(final, True, base, self._log_id_bytes, True)
        except BaseException:
            # no orphan: a segment nobody appends to would read as the log's
            # next segment at the following open
            _discard(final)
            raise
        s.synced = _SEGHDR
        self._zf_attach(s, _SEGHDR)
        if self._pf != NULL:
            # before the old mapping can go: the prefaulter moves to this one,
            # and starts before the first append reaches its pages
            self._pf_attach(s)
            self._pf_at = _SEGHDR
            eng_log_pf_push(self._pf, _SEGHDR + _PF_AHEAD, self._pf_wb, _SEGHDR + _PF_WB_GAP)
        self._active = s
        if self._pf_due != _PF_OFF:
            # the next push: the first one, or one step on
            self._pf_due = 0 if self._pf == NULL else _SEGHDR + _PF_STEP
        self._pos = _SEGHDR
        self._wpos = _SEGHDR
        self._wnext = base
        # release, in this order: the new segment's published end, then its
        # base (after the end marker of the previous segment and the new file)
        self._publish(_SEGHDR, base)
        eng_store_release_u64(&self._notify.n.active_base, base)
        self._bases.append(base)
        self._last_ts = max(self._last_ts, created)

    cdef _write_ckpt(self, bint clean):
        self._ckpt_at(self._active.base, self._pos, self._next, clean)

    cdef _ckpt_at(self, uint64_t base, size_t pos, uint64_t nxt, bint clean):
        """Write the checkpoint (base, pos, nxt): every record before it is
        durable and intact, so damage there is CorruptLog, never a torn tail.
        One writer at a time (syncing and rolling threads), never backwards."""
        with self._ckpt_lock:
            if (base, pos) < (self._ckpt_base, self._ckpt_pos) and not clean:
                return
            _write_checkpoint(self._path, base, pos, nxt, clean)
            self._ckpt_base = base
            self._ckpt_pos = pos
            self._ckpt_ns = eng_now_ns()

    cdef _release(self):
        if self._real is not None:
            _open_writers.discard(self._real)
            self._real = None
        if self._lock_fd >= 0:
            _os.close(self._lock_fd)
            self._lock_fd = -1

    def __dealloc__(self):
        free(self._stage)
        Py_XDECREF(self._off_int)
        if self._pf != NULL and not self._in_child:
            self._pf_halt()  # (a fork's child has no such thread and leaves the block)
        if self._zf != NULL and not self._in_child:
            self._zf_halt()  # (likewise)
        # not closed: no sync, just let go of the lock (the next open recovers)
        if self._real is not None:
            _open_writers.discard(self._real)
        if self._lock_fd >= 0:
            _os.close(self._lock_fd)

    # ---- appending

    cdef inline int _enter(self) except -1:
        """Take the writer flag (waits while another thread rolls)."""
        if self._in_child or self._closed or self._broken is not None or self._writing:
            return self._enter_slow()
        self._writing = True
        return 0

    cdef int _enter_slow(self) except -1:
        """_enter when the log is unusable or another thread holds the flag."""
        self._check_usable()
        while self._writing:
            # only possible while another thread is inside a roll (GIL released)
            _time.sleep(0.0001)
            if self._closed:
                raise Closed(f"log {self._path!r} is closed")
        self._writing = True
        return 0

    cdef int _check_usable(self) except -1:
        """Closed, LogBroken or (in a forked child) Closed unless appends may go on."""
        if self._in_child:
            raise Closed(f"log {self._path!r} was opened by process {self._pid}; this process "
                         "(a fork of it) may not use its writer: open the log anew here once "
                         "the parent has closed it")
        if self._closed:
            raise Closed(f"log {self._path!r} is closed")
        if self._broken is not None:
            raise LogBroken(self._path, self._broken, self._broken_errno)
        return 0

    cdef object _fail(self, int err, str what):
        """Mark the log broken by `what` (the first failure wins) and return the
        error to raise: after a failed write or sync nothing later may be
        acknowledged (the kernel may have dropped the pages and reports it once)."""
        if self._broken is None:
            self._broken = f"{what} ({_os.strerror(err) if err else 'error'})"
            self._broken_errno = err or _errno.EIO
            _logger.error("log %s: %s: the log is broken; reopen it to recover", self._path, self._broken)
        return LogBroken(self._path, self._broken, self._broken_errno)

    cdef inline void _wake(self) noexcept nogil:
        # StoreLoad: the published length must be ordered before reading the
        # waiter count (a reader increments it, then re-checks for a record)
        eng_fence_seqcst()
        if eng_load_relaxed_u32(self._waiters) != 0:
            eng_fetch_add_seqcst_u32(&self._notify.n.seq, 1)
            eng_futex_wake(&self._notify.n.seq, 0x7fffffff)

    cdef inline void _publish(self, size_t pos, uint64_t next_off) noexcept nogil:
        # release: the records below pos are complete before a reader can see it;
        # next_off (the offset after them) first, for readers' end_offset
        eng_store_release_u64(&self._notify.n.published_next, next_off + 1)
        eng_store_release_u64(&self._notify.n.published,
                              ((self._active.base & 0xFFFFFFFFu) << 32) | <uint64_t>pos)

    cdef inline void _publish_forward(self, size_t pos, uint64_t next_off) noexcept nogil:
        """_publish unless readers were shown more already (the pwrite path
        publishes unsynced records of _append_unsynced at once, and a sync
        that began before them publishes only what it covered).  Called with
        the GIL held, as every publish is: the test and the stores do not
        interleave with another publish."""
        if next_off + 1 > eng_load_relaxed_u64(&self._notify.n.published_next):
            self._publish(pos, next_off)

    cdef uint8_t *_stage_room(self, size_t need) except NULL:
        """Pwrite path: room for `need` more framed bytes in the staging buffer."""
        cdef size_t cap
        cdef uint8_t *p
        if self._stage_len + need > self._stage_cap:
            cap = self._stage_cap * 2 if self._stage_cap else 65536
            while cap < self._stage_len + need:
                cap *= 2
            p = <uint8_t *>realloc(self._stage, cap)
            if p == NULL:
                raise MemoryError()
            self._stage = p
            self._stage_cap = cap
        return self._stage

    cdef int _stage_flush(self) except -1:
        """Pwrite path: write the framed bytes at their place in the active
        segment (zeros ahead first, see log_layout.h).  Not durable, not
        published yet: ``_sync_upto`` does both."""
        cdef _Seg s = self._active
        cdef size_t n = self._stage_len
        cdef size_t at = self._wpos
        cdef size_t end = at + n
        cdef int rc = 0
        if n == 0:
            return 0
        self._stage_len = 0
        if self._zf != NULL:
            eng_log_zf_enter(self._zf, end)  # waits only where a zero write is in flight there
        rc = eng_log_pwrite_all(s.fd, self._stage, n, at)
        if rc != 0:
            rc = errno or _errno.EIO
            raise self._fail(rc, f"writing {s.path} failed at offset {self._wnext}")
        self._wpos = end
        if end >= self._zf_due:
            self._zf_wake(end)
        self._wnext = self._next
        if self._stage_cap > _STAGE_KEEP:
            free(self._stage)
            self._stage = NULL
            self._stage_cap = 0
        return 0

    cdef int _pf_wake(self) except -1:
        """Push the prefaulter _PF_AHEAD past the tail (started here the
        first time), due again _PF_STEP further on."""
        cdef eng_log_pf *f = self._pf
        if f == NULL:
            f = <eng_log_pf *>calloc(1, sizeof(eng_log_pf))
            if f == NULL:
                raise MemoryError()
            if eng_log_pf_start(f) != 0:
                free(f)
                self._pf_due = _PF_OFF  # no thread: appends fault pages in themselves
                return 0
            self._pf = f
            self._pf_attach(self._active)
        if f.failed:
            self._pf_due = _PF_OFF  # the kernel has no MADV_POPULATE_WRITE
            self._pf_halt()
            return 0
        if self._retired is not None and f.zap_done:
            self._retired = None  # its munmap is cheap now
        # written blocks ahead while the log syncs often, a few KiB a sync
        syncs = self._n_syncs - self._pf_syncs
        moved = self._pos - self._pf_at if self._pos > self._pf_at else 0
        self._pf_wb = (_writeback_ahead and syncs >= _PF_WB_SYNCS
                       and moved <= syncs * _PF_WB_SYNC_BYTES)
        self._pf_syncs = self._n_syncs
        self._pf_at = self._pos
        self._pf_due = self._pos + _PF_STEP
        eng_log_pf_push(f, self._pos + _PF_AHEAD, self._pf_wb, self._pos + _PF_WB_GAP)
        return 0

    cdef uint64_t _wb_ahead_bytes(self):
        return self._pf_wb_bytes + (0 if self._pf == NULL else eng_log_pf_wb_bytes(self._pf))

    cdef _pf_attach(self, _Seg s):
        """Point the prefaulter at segment `s` with a descriptor of its own
        for the writeback (none if dup fails: it only populates)."""
        cdef int fd, old
        try:
            fd = _os.dup(s.fd)  # (close-on-exec)
        except OSError:
            fd = -1
        with nogil:
            old = eng_log_pf_retarget(self._pf, s.p, s.size, _SEGHDR, fd)
        if old >= 0:
            _os.close(old)

    cdef inline int _room(self, size_t need) except -1:
        """Roll to a new segment unless `need` bytes (+ an end marker) fit."""
        if need + _HDR > self._segment_bytes - _SEGHDR:
            raise ValueError(f"value is too large for segment_bytes={self._segment_bytes} "
                             f"(a record takes {need} bytes); use a larger segment_bytes")
        if self._pos + need + _HDR > self._active.size:
            self._roll()
        return 0

    cdef _roll(self):
        cdef _Seg old = self._active
        cdef int rc
        cdef size_t endpos
        cdef int64_t ts = self._last_ts
        cdef int err
        if self._pw:
            self._stage_flush()  # the records framed so far belong to this segment
        if self._zf != NULL:
            eng_log_zf_enter(self._zf, self._pos + _HDR)
        _write_rec(old.p, self._pos, self._next, ts, NULL, 0, ENG_REC_FLAG_EOS, NULL, 0)
        endpos = self._pos + _HDR
        if self._durability != D_NONE:
            with nogil:
                rc = _sync_range(old.fd, old.p, old.synced, endpos)
                err = errno
            if rc != 0:
                raise self._fail(err, f"sync of {old.path} failed at its roll")
            if _sync_hook is not None:
                _call_hook(self._path, {"kind": "data", "segment": old.base, "position": endpos,
                                        "next_offset": self._next})
        try:
            _write_index(self._path, old, self._pos)
            self._create_segment(self._next, ts)
        except BaseException:
            # the roll did not happen (a full disk, say): the old segment stays
            # active, its end marker goes again and its synced mark stays below
            # it, so a smaller record written there later is synced in full
            eng_store_release_u32(<uint32_t *>(old.p + self._pos), 0)
            raise
        if self._durability != D_NONE:
            old.synced = endpos
        else:
            # no sync per roll in this mode, but flush() must still reach this
            # segment and the directory entry of the new one
            self._unsynced_old.append(old.path)
            self._dir_dirty = True
        self._n_rolls += 1
        if self._pf != NULL and old.p != NULL:
            # its page table entries go in the background; it is unmapped (by
            # the push that finds them gone, or at close) once they have
            # (this order: once the thread has the new one, it no longer
            # touches the one retired before, which may be unmapped then)
            eng_log_pf_zap(self._pf, old.p, old.size)
            self._retired = old
        if self._durability != D_NONE:
            self._durable = self._next
            try:
                self._write_ckpt(False)
            except OSError as exc:
                raise self._fail(exc.errno or _errno.EIO, f"writing the checkpoint of {self._path} failed")
        self._wake()
        if self._retention_bytes is not None or self._retention_age is not None:
            # never waits for a compaction in progress: the next roll retries
            if self._maint.acquire(False):
                try:
                    self._apply_retention()
                finally:
                    self._maint.release()
        if self._compact:
            self._compact_due = True  # a running pass goes round once more
        if self._compact and (self._compactor is None or not self._compactor.is_alive()):
            self._compactor = _threading.Thread(target=_compact_in_background,
                                                args=(_weakref.ref(self),),
                                                name=f"engine-log-compact:{self._path}", daemon=True)
            self._compactor.start()

    # a plain C method (no function object): CPython's call of a bound
    # builtin method is specialized, a Cython function's is not
    @cython.binding(False)
    @cython.embedsignature.format("clinic")  # __text_signature__: inspect.signature works
    def append(self, value, key=None):
        """Append one record; returns its offset.

        ``value`` and ``key`` are any C-contiguous buffers (bytes, bytearray,
        memoryview, numpy); ``key=None`` stores no key.  Returns once the
        record is as durable as ``durability`` says.
        """
        return self._append1(value, key, False)

    cdef object _append1(self, value, key, bint tombstone):
        """append(); ``tombstone``: a delete marker (a key, an empty value)."""
        cdef Py_buffer vb, kb
        cdef const char *v
        cdef const char *k = NULL
        cdef size_t vlen, klen = 0
        cdef bint vbuf = False, kbuf = False
        cdef uint32_t flags = 0
        cdef uint64_t off
        cdef int64_t ts
        cdef size_t need
        self._enter()
        try:
            vbuf = _bytes_of(value, &vb, &v, &vlen, "value must be a bytes-like object")
            if key is not None:
                flags = ENG_REC_FLAG_KEY
                kbuf = _bytes_of(key, &kb, &k, &klen, "key must be a bytes-like object or None")
            if tombstone:
                flags |= ENG_REC_FLAG_TOMBSTONE  # delete(): a key, an empty value
            if klen > _MAX_FIELD or vlen > _MAX_FIELD:
                raise ValueError("value is too large")
            need = _align8(_HDR + klen + vlen)
            self._room(need)
            ts = eng_wall_ns()
            if ts < self._last_ts:
                ts = self._last_ts
            self._last_ts = ts
            off = self._next
            self._active.ix_note(off, self._pos, ts)
            if self._pw:
                _write_rec(self._stage_room(need), self._stage_len, off, ts, k, <uint32_t>klen, flags, v, vlen)
                self._stage_len += need
                self._pos += need
                self._next = off + 1
                self._stage_flush()
            else:
                self._pos += _write_rec(self._active.p, self._pos, off, ts, k, <uint32_t>klen, flags, v, vlen)
                self._next = off + 1
                self._publish(self._pos, self._next)
                if self._pos >= self._pf_due:
                    self._pf_wake()
            self._n_appends += 1
        finally:
            if vbuf:
                PyBuffer_Release(&vb)
            if kbuf:
                PyBuffer_Release(&kb)
            self._writing = False
        if not self._pw:
            self._wake()  # the pwrite path publishes and wakes after its sync
        if self._durability == D_ALWAYS:
            self._sync_upto(off + 1)
        return eng_log_offset_int(&self._off_int, <int64_t>off)

    def delete(self, key):
        """Append a delete marker (tombstone) for ``key``; returns its offset.

        Readers see a record with ``tombstone=True`` and an empty value.  Key
        compaction (``cleanup="compact"``, :meth:`compact`) drops every older
        record of the key, and the marker itself once it is older than
        ``delete_retention`` seconds.
        """
        if key is None:
            raise TypeError("key must be a bytes-like object")
        return self._append1(b"", key, True)

    def append_many(self, values, keys=None):
        """Append a batch of records; returns the ``range`` of their offsets.

        One pass over ``values`` (any iterable of buffers; ``keys`` an iterable
        of the same length, items may be None), one sync for the whole batch
        under ``durability="always"``.  The records go in batch frames (one
        header and CRC for up to 128 records and 64 KiB, see ``log_layout.h``);
        a frame that would hold one record is a plain one.  A batch is not
        atomic across a crash: a prefix of its frames may survive an
        unacknowledged append_many (each frame whole or not at all).
        """
        return self._append_batch(values, keys, True)

    def _append_unsynced(self, values, keys=None):
        """:meth:`append_many` that returns without waiting for a sync in any
        durability mode, the records visible to readers at once.

        For a writer whose records are durable elsewhere until this log is
        (engine.txn: a committed transaction's batch, redone from the
        coordinator's journal after a crash): it makes them durable later
        with :meth:`flush` before it forgets them."""
        return self._append_batch(values, keys, False)

    cdef object _append_batch(self, values, keys, bint sync):
        """append_many; ``sync``: wait for the sync ``durability`` asks for."""
        cdef Py_buffer vb, kb
        cdef const char *v
        cdef const char *k
        cdef size_t vlen, klen
        cdef bint vbuf, kbuf
        cdef uint32_t flags
        cdef uint64_t first, end = 0
        cdef int64_t ts
        cdef Py_ssize_t i, n
        cdef size_t need, isz, blen
        cdef uint8_t *q
        cdef _Batch b
        cdef list vl, kl = None
        if isinstance(values, (bytes, bytearray, memoryview, str)):
            raise TypeError("values must be an iterable of bytes-like objects, not a single buffer")
        vl = values if type(values) is list else list(values)
        n = len(vl)
        if keys is not None:
            kl = keys if type(keys) is list else list(keys)
            if len(kl) != n:
                raise ValueError(f"keys has {len(kl)} items, values has {n}")
        self._enter()
        first = self._next
        b.open = False
        try:
            ts = eng_wall_ns()
            if ts < self._last_ts:
                ts = self._last_ts
            self._last_ts = ts
            b.ts = ts
            for i in range(n):
                vbuf = kbuf = False
                k = NULL
                klen = 0
                flags = 0
                value = vl[i]
                try:
                    vbuf = _bytes_of(value, &vb, &v, &vlen, "values must hold bytes-like objects")
                    if kl is not None:
                        key = kl[i]
                        if key is not None:
                            flags = ENG_REC_FLAG_KEY
                            kbuf = _bytes_of(key, &kb, &k, &klen,
                                             "keys must hold bytes-like objects or None")
                    if klen > _MAX_FIELD or vlen > _MAX_FIELD:
                        raise ValueError("value is too large")
                    if b.open:
                        blen = _inner_body_len(b.count, flags, klen, vlen)
                        isz = _varint_len(blen) + blen
                        if (b.count >= _FRAME_RECORDS or b.flen + isz > _FRAME_MAX
                                or self._pos + _align8(b.flen + isz) + _HDR > self._active.size):
                            self._batch_close(&b)
                    if not b.open:
                        blen = _inner_body_len(0, flags, klen, vlen)
                        isz = _varint_len(blen) + blen
                        need = _align8(_HDR + isz)
                        if (_HDR + isz > _FRAME_MAX or need + _HDR > self._segment_bytes - _SEGHDR
                                or self._active.version < <uint32_t>ENG_SEG_VERSION):
                            # a plain frame: a record too big to share a frame,
                            # or a segment of the older format
                            need = _align8(_HDR + klen + vlen)
                            self._room(need)
                            self._active.ix_note(self._next, self._pos, ts)
                            if self._pw:
                                if self._stage_len >= _STAGE_KEEP:
                                    self._stage_flush()  # bounded memory for huge batches
                                _write_rec(self._stage_room(need), self._stage_len, self._next, ts, k,
                                           <uint32_t>klen, flags, v, vlen)
                                self._stage_len += need
                                self._pos += need
                            else:
                                self._pos += _write_rec(self._active.p, self._pos, self._next, ts, k,
                                                        <uint32_t>klen, flags, v, vlen)
                            self._next += 1
                            continue
                        self._room(need)
                        if self._active.version < <uint32_t>ENG_SEG_VERSION:
                            raise AssertionError("rolled into a segment of the older format")
                        if self._pw and self._stage_len >= _STAGE_KEEP:
                            self._stage_flush()  # bounded memory for huge batches
                        b.open = True
                        b.flen = _HDR
                        b.count = 0
                        b.base = self._next
                        self._active.ix_note(self._next, self._pos, ts)
                    # the frame stays at _pos (_stage_len) until it is closed
                    if self._pw:
                        q = self._stage_room(_align8(b.flen + isz)) + self._stage_len
                    else:
                        q = self._active.p + self._pos
                    q += b.flen
                    q += _put_varint(q, blen)
                    q[0] = ENG_INNER_KEY if flags else 0
                    q += 1
                    q += _put_varint(q, b.count)
                    q[0] = 0  # ts delta: one timestamp for the call
                    q += 1
                    if flags:
                        q += _put_varint(q, klen)
                        if klen:
                            memcpy(q, k, klen)
                        q += klen
                    if vlen:
                        memcpy(q, v, vlen)
                    b.flen += isz
                    b.count += 1
                    b.l_ihl = isz - klen - vlen
                    b.l_klen = klen
                    b.l_vlen = vlen
                    b.l_flags = flags
                finally:
                    if vbuf:
                        PyBuffer_Release(&vb)
                    if kbuf:
                        PyBuffer_Release(&kb)
            self._n_appends += <uint64_t>n
        finally:
            try:
                # also after an error half way: the records framed so far
                # have their offsets, so they are written (a prefix survives)
                if b.open:
                    self._batch_close(&b)
                if self._pw:
                    self._stage_flush()
                elif self._next != first:
                    self._publish(self._pos, self._next)
                    if self._pos >= self._pf_due:
                        self._pf_wake()
            finally:
                # this call's records end here: once the flag is down other
                # threads append after them (also while we wait for the sync)
                end = self._next
                self._writing = False
                if end != first and not self._pw:
                    self._wake()
                elif end != first and not sync:
                    # written, not synced: readers see it now (a later sync
                    # makes it durable, and never publishes less)
                    self._publish_forward(self._wpos, self._wnext)
                    self._wake()
        if self._durability == D_ALWAYS and end != first and sync:
            self._sync_upto(end)
        return range(first, end)

    cdef void _batch_close(self, _Batch *b) noexcept:
        """Seal the open batch frame at _pos (_stage_len on the pwrite path)
        and move past it; a frame of one record becomes a plain frame."""
        cdef uint8_t *f
        cdef size_t padded, length
        if self._pw:
            f = self._stage + self._stage_len
        else:
            f = self._active.p + self._pos
        if b.count == 1:
            memmove(f + _HDR, f + _HDR + b.l_ihl, b.l_klen + b.l_vlen)
            length = _HDR + b.l_klen + b.l_vlen
            padded = _seal_frame(f, b.base, b.ts, <uint32_t>b.l_klen, b.l_flags, <uint32_t>length)
            if b.flen > padded:
                memset(f + padded, 0, b.flen - padded)  # the mapping stays zero past the end
        else:
            padded = _seal_frame(f, b.base, b.ts, <uint32_t>b.count, ENG_REC_FLAG_BATCH, <uint32_t>b.flen)
        if self._pw:
            self._stage_len += padded
        self._pos += padded
        self._next = b.base + b.count
        b.open = False

    # ---- syncing

    cdef _sync_upto(self, uint64_t target):
        """Block until every offset below target is durable (group commit).

        One thread syncs at a time (``_syncing``); one that finds a sync in
        flight sleeps (_sleep) until a sync covers its target, or until it is
        picked to run the next sync (see _Sleeper)."""
        cdef _Seg s
        cdef size_t lo, hi
        cdef uint64_t nxt
        cdef int rc = 0
        cdef bint pw
        cdef int err = 0
        cdef bint counted = False
        cdef PyThread_type_lock wake
        cdef bint gathered = False
        cdef bint held = True  # cond is held
        cdef bint mine = False  # took the gathering syncer's place: sync now
        cdef long long gather_us
        cdef int64_t t0, ts = 0, t1 = 0
        cond = self._cond
        cond.acquire()
        try:
            while True:
                # a failed sync anywhere (another thread's, the flusher's)
                # fails every waiter: a later sync's success proves nothing
                if self._broken is not None:
                    raise LogBroken(self._path, self._broken, self._broken_errno)
                if self._durable >= target:
                    break
                if not counted:
                    counted = True
                    if self._sync_targets is None:
                        self._sync_targets = []
                    self._sync_targets.append(target)
                    self._sync_arrived += 1
                    if self._gatherer is not None and self._sync_arrived >= self._sync_expect:
                        # everyone the gathering syncer waits for is here:
                        # this thread runs the sync in its place (_syncing
                        # stays set), the gatherer sleeps on until it ends
                        # (a hand-off less than waking it to sync)
                        self._sleepers.append(self._gatherer)
                        self._gatherer = None
                        gathered = mine = True
                if self._syncing and not mine:
                    if self._sleep(target, -1):
                        # a sync covered target (or the log broke); cond is not held
                        held = False
                        if self._broken is not None:
                            raise LogBroken(self._path, self._broken, self._broken_errno)
                        break
                    continue  # picked to sync next: cond is held again
                if not gathered:
                    gathered = True
                    gather_us = self._gather_us()
                    if gather_us >= 0:
                        # the gathering: sleep until the writers expected
                        # are here (the last of them syncs for all) or the
                        # time is up (this thread syncs)
                        if self._sleep(target, gather_us):
                            held = False
                            if self._broken is not None:
                                raise LogBroken(self._path, self._broken, self._broken_errno)
                            break
                        continue  # cond was released: look again
                olds = self._unsynced_old
                if olds or self._dir_dirty:
                    # durability="none": rolled segments first (their fds are
                    # closed), then the directory entries of the new ones
                    self._unsynced_old = []
                    self._dir_dirty = False
                    self._syncing = True
                    mine = False
                    cond.release()
                    try:
                        try:
                            _sync_paths(olds)
                            _fsync_dir(self._path)
                        except OSError as exc:
                            raise self._fail(exc.errno or _errno.EIO,
                                             f"syncing the rolled segments of {self._path} failed")
                    finally:
                        cond.acquire()
                        self._syncing = False
                    continue
                s = self._active
                lo = s.synced
                pw = self._pw
                # pwrite path: only what reached pwrite (a thread may be framing more)
                hi = self._wpos if pw else self._pos
                nxt = self._wnext if pw else self._next
                self._syncing = True
                mine = False
                cond.release()
                t0 = eng_now_ns()
                wake = _h_release(&self._handoff)
                try:
                    with nogil:
                        _h_pass(&self._handoff, wake)  # a woken sleeper may take the GIL
                        ts = eng_now_ns()
                        if pw:
                            rc = eng_log_datasync(s.fd)
                        else:
                            rc = _sync_range(s.fd, s.p, lo, hi)
                        err = errno
                        t1 = eng_now_ns()  # (before the GIL is taken back)
                finally:
                    cond.acquire()
                    if rc != 0:
                        # before any sleeper wakes: none may start a sync of its own
                        exc = self._fail(err, f"{'fdatasync' if pw else 'msync'} of {s.path} failed "
                                              f"with offsets from {self._durable} unsynced")
                    self._syncing = False
                    self._sync_end_ns = eng_now_ns()
                    self._sync_run_ns = self._sync_end_ns - t0
                    if rc == 0:
                        # those it serves append again soon: the next syncer gathers them
                        self._sync_expect = self._sync_served(nxt)
                        self._sync_arrived = 0
                if rc != 0:
                    raise exc  # (the sleepers wake below, and raise too)
                if hi > s.synced:
                    s.synced = hi
                if nxt > self._durable:
                    self._durable = nxt
                if pw and s is self._active:
                    # durable now: readers may see it (a roll meanwhile published the old segment whole)
                    self._publish_forward(hi, nxt)
                    self._wake()
                self._n_syncs += 1
                self._sync_total_ns += t1 - ts
                if (not self._pf_wb and self._pf_due != _PF_OFF
                        and self._n_syncs - self._pf_syncs >= _PF_WB_SYNCS):
                    self._pf_due = 0  # the next append pushes: writeback ahead may pay now
                if s is self._active and eng_now_ns() - self._ckpt_ns >= _CKPT_EVERY_NS:
                    # the recovery point follows the durable end (Kafka's
                    # recovery-point checkpoint): damage before it is never
                    # taken for a torn tail
                    self._syncing = True
                    cond.release()
                    try:
                        try:
                            self._ckpt_at(s.base, hi, nxt, False)
                        except OSError as exc:
                            raise self._fail(exc.errno or _errno.EIO,
                                             f"writing the checkpoint of {self._path} failed")
                    finally:
                        cond.acquire()
                        self._syncing = False
                if _sync_hook is not None:
                    _call_hook(self._path, {"kind": "data", "segment": s.base, "position": hi,
                                            "next_offset": nxt})
                # those it covered go (after the hook: it sees every sync
                # before the writes it covered return)
                self._wake_sleepers()
        finally:
            if counted:
                # (a list operation under the GIL: atomic, cond held or not)
                self._sync_targets.remove(target)
            if held:
                try:
                    # whatever way this thread leaves (its sync failed, an
                    # interrupt): no sleeper may be left without a syncer
                    if self._sleepers and not self._syncing:
                        self._wake_sleepers()
                finally:
                    cond.release()

    cdef bint _sleep(self, uint64_t target, long long gather_us) except -1:
        """With _cond held: sleep until woken.  True: a sync covered
        ``target`` or the log broke (_cond is not held on return); False:
        picked to run the next sync, or the gathering is over and this
        thread syncs (_cond held again).  An interrupt (a signal handler's
        exception) propagates with _cond held.

        ``gather_us`` < 0: a sync is in flight.  Otherwise this thread
        gathers (_gather_us): it holds the sync (``_syncing``) for up to
        ``gather_us`` while the writers expected append; the arrival that
        completes the gathering takes its place and syncs for all, and this
        thread sleeps on as any sleeper."""
        cdef _Sleeper w
        cdef bint held = False
        pool = self._sleeper_pool
        w = <_Sleeper>pool.pop() if pool else _Sleeper.__new__(_Sleeper)
        w._h = &self._handoff
        w.target = target
        w.role = _S_WAIT
        if gather_us >= 0:
            self._gatherer = w
            self._syncing = True  # no other thread syncs meanwhile; appends go on
        else:
            self._sleepers.append(w)
        cond = self._cond
        cond.release()
        try:
            if gather_us < 0 or not w.sleep_for(gather_us):
                if gather_us >= 0:
                    cond.acquire()
                    held = True
                    if self._gatherer is w:
                        # the time is up: sync with those that came
                        self._gatherer = None
                        self._syncing = False
                        pool.append(w)
                        return False
                    # taken over: in _sleepers now, until that sync ends
                    held = False
                    cond.release()
                w.sleep()
        except BaseException:
            if not held:
                cond.acquire()
            if self._gatherer is w:
                self._gatherer = None
                self._syncing = False  # (the caller's exit wakes a sleeper to sync)
            elif w.role == _S_WAIT:
                self._sleepers.remove(w)  # not picked: nobody releases its lock
            else:
                # picked: its wake is on its way; take it and pass it on
                w.sleep_through()
                if self._lead is w:
                    self._lead = None  # the caller's exit picks another
            pool.append(w)
            raise
        pool.append(w)
        if w.role == _S_LEAD:
            cond.acquire()
            self._lead = None
            return False
        return True

    cdef int _wake_sleepers(self) except -1:
        """With _cond held: wake the sleepers whose target is durable (all
        of them once the log broke) and, if others are left while no sync
        runs and none is on its way to run one, the first of those to run
        the next sync."""
        cdef _Sleeper w
        cdef list woken = []
        cdef list left = []
        cdef uint64_t durable = self._durable
        cdef bint broken = self._broken is not None
        for w in self._sleepers:
            if broken or w.target <= durable:
                w.role = _S_DONE
                woken.append(w)
            else:
                left.append(w)
        if left and not broken and not self._syncing and self._lead is None:
            w = <_Sleeper>left.pop(0)
            w.role = _S_LEAD
            self._lead = w
            woken.append(w)
        self._sleepers = left
        _wake_chain(&self._handoff, woken)
        return 0

    cdef Py_ssize_t _sync_served(self, uint64_t nxt):
        """How many of the waiting threads a sync up to ``nxt`` serves."""
        cdef Py_ssize_t n = 0
        for t in self._sync_targets:
            if <uint64_t>t <= nxt:
                n += 1
        return n

    cdef long long _gather_us(self):
        """Before a data sync, with _cond held: how long to wait (as long as
        the last sync ran, 5 ms at most) for the writers the last sync served
        to append again, so that one sync carries their records too; -1: do
        not wait (_sleep does the waiting).

        Without it the first waiter back syncs at once while the others are
        still framing their next records (they need the GIL it just released),
        and nearly every record gets a sync of its own.  PostgreSQL's
        commit_delay, only while siblings are expected: a lone writer, or one
        long after the last sync, never waits."""
        cdef int64_t now = eng_now_ns()
        cdef long long us
        if (self._sync_expect <= 1 or self._sync_arrived >= self._sync_expect
                or self._sync_run_ns <= 0 or now - self._sync_end_ns > self._sync_run_ns):
            return -1
        us = self._sync_run_ns // 1000
        if us > 5000:
            us = 5000
        return us

    cdef _flush_if_dirty(self):
        if not self._closed and self._durable < self._next:
            self._sync_upto(self._next)

    def flush(self, end=None):
        """Make every record appended so far durable (in every durability mode);
        with ``end`` (an offset, at most ``next_offset``), every record below it.

        A writer waiting for its own records passes the end of its append:
        it then returns with the first sync that covers them, not one that
        also covers what other threads appended after them.  Raises
        :class:`engine.LogBroken` once any write or sync has failed."""
        cdef uint64_t upto
        self._check_usable()
        if end is None:
            upto = self._next
        else:
            if not isinstance(end, int) or isinstance(end, bool):
                raise TypeError(f"end must be an int offset or None, not {type(end).__name__}")
            if end < 0 or end > self._next:
                raise ValueError(f"end must be in [0, next_offset={self._next}], not {end}")
            upto = end
        self._sync_upto(upto)

    def close(self):
        """Sync, write the clean-shutdown checkpoint and release the directory. Idempotent.

        On a broken log (:class:`engine.LogBroken`) it writes nothing more and
        still releases the directory, so the log can be reopened; a sync that
        fails in ``close`` itself raises, after the release.  In a forked child
        it only lets go of the inherited handle: the parent's files and lock
        are left alone."""
        if self._closed:
            return
        if self._in_child:
            self._drop_inherited()
            return
        self._pf_halt()
        self._zf_halt()
        if self._thread is not None:
            self._stop.set()
            if self._thread is not _threading.current_thread():
                self._thread.join()
            self._thread = None
        if self._compactor is not None:
            self._compact_stop = True
            if self._compactor is not _threading.current_thread():
                self._compactor.join()
            self._compactor = None
        if self._broken is not None:
            self._writing = True  # nothing more goes to the files
        else:
            self._enter()
        try:
            if self._broken is None:
                self._sync_upto(self._next)
                _write_index(self._path, self._active, self._pos)
                try:
                    self._write_ckpt(True)
                except OSError as exc:
                    raise self._fail(exc.errno or _errno.EIO, f"writing the checkpoint of {self._path} failed")
        finally:
            self._closed = True
            self._writing = False
            eng_fetch_add_seqcst_u32(&self._notify.n.seq, 1)
            eng_futex_wake(&self._notify.n.seq, 0x7fffffff)
            self._waiters = NULL
            self._notify.close()
            self._notify = None
            self._active = None
            self._release()

    cdef _pf_halt(self):
        """Stop the prefaulter and wait for it (it never takes the GIL); its
        mapping may go after this."""
        cdef eng_log_pf *f = self._pf
        cdef int fd
        self._pf_due = _PF_OFF
        if f != NULL:
            self._pf = NULL
            with nogil:
                fd = eng_log_pf_stop(f)
            self._pf_wb_bytes += eng_log_pf_wb_bytes(f)
            free(f)
            if fd >= 0:
                _os.close(fd)
        self._retired = None  # the thread no longer touches it

    cdef _zf_attach(self, _Seg s, size_t done):
        """Pwrite path: point the zeroer at segment `s`, [0, done) written
        (started here the first time).  No zeroer where the file system has
        no unwritten extents or O_DIRECT does not open: appends go on alone."""
        cdef int fd = -1
        cdef int old
        cdef eng_log_zf *z = self._zf
        if not self._pw or not _zero_ahead:
            return
        if z != NULL and z.failed:
            self._zf_halt()
            return
        try:
            fd = _os.open(s.path, _os.O_WRONLY | _os.O_CLOEXEC | getattr(_os, "O_DIRECT", 0))
        except OSError:
            fd = -1
        if fd >= 0 and (not hasattr(_os, "O_DIRECT") or not eng_log_zf_fs_ok(fd)):
            _os.close(fd)
            fd = -1
        if fd < 0:
            self._zf_halt()
            return
        if z == NULL:
            z = <eng_log_zf *>calloc(1, sizeof(eng_log_zf))
            if z == NULL:
                _os.close(fd)
                raise MemoryError()
            if eng_log_zf_start(z, _ZF_STEP, _ZF_IDLE_NS) != 0:
                free(z)
                _os.close(fd)
                return
            self._zf = z
        with nogil:
            old = eng_log_zf_retarget(z, fd, s.size, done)
        if old >= 0:
            _os.close(old)
        self._zf_wake(done)

    cdef int _zf_wake(self, size_t end) except -1:
        """Push the zeroer _zf_ahead past `end` (doubled each time up to
        _ZF_AHEAD), due again half that or _ZF_PUSH further on, whichever
        is less; a zeroer whose write failed is stopped (appends go on
        without it)."""
        if self._zf == NULL:
            self._zf_due = _ZF_OFF
            return 0
        if self._zf.failed:
            self._zf_halt()
            return 0
        self._zf_due = end + min(_ZF_PUSH, self._zf_ahead // 2)
        eng_log_zf_push(self._zf, end + self._zf_ahead)
        self._zf_ahead = min(self._zf_ahead * 2, _ZF_AHEAD)
        return 0

    cdef _zf_halt(self):
        """Stop the zeroer, wait for it and close its descriptor."""
        cdef eng_log_zf *z = self._zf
        cdef int fd
        self._zf_due = _ZF_OFF
        if z != NULL:
            self._zf = NULL
            with nogil:
                fd = eng_log_zf_stop(z)
            free(z)
            if fd >= 0:
                _os.close(fd)

    def _zero_ahead_state(self):
        """Test hook: (bytes the zeroer wrote, its `done` mark, errno of its
        failed write or 0), or None when none runs."""
        if self._zf == NULL:
            return None
        return (self._zf.bytes, self._zf.done, self._zf.err if self._zf.failed else 0)

    cdef _drop_inherited(self):
        """In a forked child: let go of the inherited handle without touching
        the parent's files (no sync, no checkpoint, no wake-up).  Closing the
        inherited lock fd does not release the parent's flock, which belongs
        to the open file description the parent still holds."""
        self._closed = True
        self._thread = None
        self._waiters = NULL
        if self._notify is not None:
            self._notify.close()
            self._notify = None
        self._active = None
        self._release()

    def _simulate_crash(self):
        """Test hook: stop like a SIGKILLed process (no sync, no checkpoint, no index).

        What was appended stays in the page cache, as after a real kill.
        """
        if self._closed:
            return
        self._pf_halt()
        self._zf_halt()
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        self._closed = True
        self._waiters = NULL
        self._notify.close()
        self._notify = None
        self._active = None
        self._release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- retention

    def apply_retention(self):
        """Delete the oldest segments beyond retention_bytes / retention_age now.

        Runs by itself at every segment roll.  Never deletes the active
        segment, nor (``retain_uncommitted=True``) a segment holding offsets a
        consumer group has not committed.  Returns the number of segments deleted.
        """
        self._check_usable()
        with self._maint:
            return self._apply_retention()

    cdef int _apply_retention(self) except -1:
        cdef int deleted = 0
        if self._retention_bytes is None and self._retention_age is None:
            return 0
        path = self._path
        protect = None
        if self._retain_uncommitted:
            groups = _all_groups(path)
            if groups:
                protect = min(groups.values())
        sizes = {}
        total = 0
        for b in self._bases:
            try:
                sizes[b] = _os.stat(_os.path.join(path, _seg_name(b))).st_size
            except FileNotFoundError:
                sizes[b] = 0
            total += sizes[b]
        now = _time.time_ns()
        while len(self._bases) > 1:
            b = self._bases[0]
            nb = self._bases[1]
            if protect is not None and nb > protect:
                break
            too_big = self._retention_bytes is not None and total > self._retention_bytes
            too_old = False
            if self._retention_age is not None:
                too_old = self._seg_created(nb) < now - int(self._retention_age * 1e9)
            if not (too_big or too_old):
                break
            _remove_segment(path, b)
            total -= sizes[b]
            del self._bases[0]
            deleted += 1
        return deleted

    # ---- key compaction (engine.compaction does the work)

    def compact(self):
        """Compact the sealed segments by key now; returns an
        :class:`engine.compaction.CompactionResult`.

        Keeps the latest record of each key (and every record without a key)
        at its offset; drops the latest record of a key when it is a
        tombstone older than ``delete_retention``.  The active segment is
        never touched.  Runs by itself after each roll with
        ``cleanup="compact"``.  Never runs at the same time as retention.
        """
        return self._compact_pass(True)

    def _compact_pass(self, force):
        """compact(); ``force=False`` (the background passes) skips a pass
        while little of the log changed since the last one."""
        from engine.compaction import compact_log
        self._check_usable()
        with self._maint:
            return compact_log(self, force=force)

    def _compaction_state(self):
        """For engine.compaction, after a flush: (the bases of the segments it
        may rewrite, oldest first; the base after them; the durable offset;
        log id bytes; delete_retention seconds; stop requested).

        Only segments below the checkpoint's: recovery trusts a checkpoint's
        byte position, which a rewrite would move.  So the checkpoint first
        moves to the start of the active segment when every record before it
        is durable (the flush made it so, unless a roll came in between)."""
        cdef uint64_t ab
        self._check_usable()
        ab = self._active.base
        if self._durable >= ab and self._ckpt_base < ab:
            self._ckpt_at(ab, _SEGHDR, ab, False)
        limit = self._ckpt_base
        return ([b for b in self._bases if b < limit], limit, self._durable, self._log_id_bytes,
                self._delete_retention, self._compact_stop)

    cdef int64_t _seg_created(self, uint64_t base) except? -1:
        try:
            with open(_os.path.join(self._path, _seg_name(base)), "rb") as f:
                head = f.read(64)
            return _SEG_HEADER.unpack(head)[6]
        except (OSError, _struct.error):
            return 0

    # ---- readers and inspection

    def reader(self, start=None, group=None, copy=True):
        """A :class:`LogReader` on this log (same arguments as ``LogReader``)."""
        return LogReader(self._path, start=start, group=group, copy=copy)

    def stats(self):
        """A dict: offsets, segments, bytes, durability, counters.

        ``writeback_ahead_bytes``: zero pages ahead of the tail whose
        writeback the prefaulter started while the log synced often (written
        blocks for the syncs to come, see ``_PF_WB_SYNCS``).
        ``syncs``: the group commit's data syncs (each makes every record
        appended before it durable); ``sync_seconds``: how long they ran in
        all, so ``sync_seconds / syncs`` is the disk's latency as the log
        sees it and its growth over a window of wall time, the share of that
        window the disk was busy with this log's syncs (near 1: the disk is
        the bound; well below it with writers waiting: the writers are).
        ``handoffs``: threads woken after a group-commit sync that waited
        (spinning) for the GIL's hand-off in the log; ``handoffs_late``: those
        whose wait ran out, because the thread before them held the GIL long
        or released it outside the log, after which the rest of that chain
        was woken at once."""
        total = 0
        for b in self._bases:
            try:
                total += _os.stat(_os.path.join(self._path, _seg_name(b))).st_size
            except FileNotFoundError:
                pass
        return {
            "path": self._path, "log_id": str(self._log_uuid),
            "durability": self.durability, "closed": self._closed,
            "start_offset": self.start_offset, "next_offset": self._next,
            "durable_offset": self._durable, "segments": len(self._bases),
            "segment_bytes": int(self._segment_bytes), "disk_bytes": total,
            "active_segment": None if self._active is None else self._active.path,
            "active_position": int(self._pos), "appends": self._n_appends,
            "syncs": self._n_syncs, "sync_seconds": self._sync_total_ns / 1e9,
            "rolls": self._n_rolls,
            "recovered_bytes": self._recovered_bytes, "was_clean": self._was_clean,
            "handoffs": self._handoff.spun, "handoffs_late": self._handoff.spun_out,
            "writeback_ahead_bytes": self._wb_ahead_bytes(),
        }

    @property
    def path(self):
        """The log directory."""
        return self._path

    @property
    def log_id(self):
        """The log's uuid (from ``meta``): segments of another log are refused."""
        return str(self._log_uuid)

    @property
    def next_offset(self):
        """Offset the next append gets."""
        return self._next

    @property
    def start_offset(self):
        """Offset of the oldest record still kept (retention moves it)."""
        return self._bases[0] if self._bases else self._next

    @property
    def durable_offset(self):
        """Every offset below this is on stable storage."""
        return self._durable

    @property
    def durability(self):
        """"always", "interval" or "none"."""
        return ("none", "interval", "always")[self._durability]

    @property
    def closed(self):
        """True after close()."""
        return self._closed

    def __repr__(self):
        return f"<engine.Log {self._path!r} next_offset={self._next} durability={self.durability}>"


_live_writers = _weakref.WeakSet()  # open Log objects of this process


def _after_fork_in_child():
    """A forked child must not hold the parent's writer lock: its copy of the
    lock fd would keep the lock after the parent closes.  Closing the copy
    leaves the parent's flock alone (it belongs to the open file description)."""
    cdef Log log
    for obj in list(_live_writers):
        log = <Log>obj
        log._in_child = True
        if log._lock_fd >= 0:
            _os.close(log._lock_fd)
            log._lock_fd = -1
        if log._zf != NULL and log._zf.fd >= 0:
            # the zeroer thread is the parent's alone: its descriptor goes,
            # its block stays (its mutex may be held by a thread not here)
            _os.close(log._zf.fd)
            log._zf.fd = -1
        if log._pf != NULL and log._pf.fd >= 0:
            _os.close(log._pf.fd)  # (the prefaulter's, likewise)
            log._pf.fd = -1
        log._real = None
    _open_writers.clear()


_os.register_at_fork(after_in_child=_after_fork_in_child)


# ---------------------------------------------------------------- readers

cdef class LogReader:
    """Reads a log directory from any process, while a writer appends.

    ``start`` is the first offset to read (default: the oldest record kept);
    ``group`` names a consumer group: the reader resumes at the group's
    committed offset (or ``start`` if it never committed) and ``commit()``
    stores its position durably (at-least-once: process, then commit).
    If the log lost records past the group's committed offset since (an
    unclean recovery cut a tail that readers had seen, or ``repair``), the
    group resumes at the first offset that may have changed, with a warning
    on the ``"engine"`` logger, so it never skips new records that reuse
    those offsets.

    Iterating (``for rec in reader``) returns records up to the current end
    and stops, like a file; ``poll(timeout)`` waits for the next record.
    With ``copy=False`` keys and values are read-only memoryviews into the
    mapping (no copy); by contract valid until the reader's next call.

    If retention deleted records before the reader got to them (or ``start``
    is below the log's start), the reader jumps to the oldest record kept and
    adds the records it jumped over to ``skipped``.  A damaged record raises
    :class:`engine.CorruptLog` (never skipped).
    """
    cdef str _path               # log directory
    cdef object _log_id          # 16 raw bytes of the log uuid
    cdef _Seg _seg               # segment being read (None: none found yet)
    cdef size_t _pos             # byte position of the next frame in _seg (or of the batch frame being read)
    cdef uint64_t _off           # next offset to return
    # inside a batch frame at _pos (see log_layout.h): _in > 0
    cdef size_t _in              # position of the next inner record (0: not inside a batch)
    cdef size_t _fend            # end of the batch body (unpadded)
    cdef uint64_t _fbase         # the batch's first offset
    cdef uint64_t _fspan         # offsets it covers
    cdef int64_t _fts            # its base timestamp
    cdef bint _copy              # copy values into bytes
    cdef object _group           # group name or None
    cdef _Notify _notify         # shared wake-up block (None until the writer made it)
    cdef uint64_t _skipped       # records jumped over (retention)
    cdef bint _closed            # close() ran
    cdef size_t _zero_checked    # position where a "zero length" was last checked against later segments
    cdef size_t _lim             # records of _seg below this are published (0: ask the notify block)
    cdef uint64_t _epoch         # truncations known when the reader opened (stored with commits)
    cdef int _group_fd           # the group's use lock, held shared while open (-1: none)

    def __cinit__(self):
        self._closed = True
        self._group_fd = -1

    def __dealloc__(self):
        if self._group_fd >= 0:  # a reader dropped without close() lets go of its group
            _os.close(self._group_fd)

    def __init__(self, path, start=None, group=None, copy=True):
        if not isinstance(path, (str, bytes, _os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike, not {type(path).__name__}")
        path = _os.fsdecode(_os.fspath(path))
        if start is not None and (not isinstance(start, int) or isinstance(start, bool)):
            raise TypeError("start must be an int or None")
        if start is not None and start < 0:
            raise ValueError(f"start must be >= 0, not {start}")
        if group is not None:
            _check_group(group)
        if not _os.path.isdir(path):
            raise FileNotFoundError(_errno.ENOENT, "no log directory here (create it with engine.Log)", path)
        try:
            meta = _read_meta(path)
        except FileNotFoundError:
            raise FileNotFoundError(_errno.ENOENT, "not a log directory (no meta file)", path) from None
        self._path = path
        self._log_id = meta["log_uuid"].bytes
        self._copy = bool(copy)
        self._group = group
        self._zero_checked = <size_t>-1
        self._notify = _open_notify(path, False)
        self._closed = False
        truncs = _read_truncations(path)
        self._epoch = len(truncs)
        if group is not None:
            import fcntl
            self._group_fd = _open_group_lock(path, group, fcntl.LOCK_SH)
            got = _read_group_epoch(path, group)
            if got is not None:
                start = self._group_start(got[0], got[1], truncs)
        self._seek(0 if start is None else start, start is not None)

    cdef object _group_start(self, uint64_t committed, uint64_t epoch, list truncs):
        """Where a group resumes: its committed offset, unless the log was
        truncated below it since (a later truncation, or the end is before
        it): then the first offset that may have changed, logged."""
        cdef uint64_t at = committed
        for t in truncs[epoch:]:
            if t < at:
                at = t
        if at == committed:
            end = self._end_offset_now()
            if end is not None and end < committed:
                at = end
        if at != committed:
            _logger.warning("log %s: group %r committed offset %d, but the log was truncated "
                            "below it (records from %d on may have changed); resuming at %d",
                            self._path, self._group, committed, at, at)
        return at

    cdef object _end_offset_now(self):
        """The log's end as the segment files say (None when unknown)."""
        cdef _Seg s
        cdef size_t pos
        cdef uint64_t off
        cdef int64_t ts = 0
        cdef int why = W_NONE
        bases = _list_segments(self._path)
        if not bases:
            return None
        s = self._open_seg(bases[-1])
        if s is None:
            return None
        _scan(s, _SEGHDR, s.base, False, &pos, &off, &ts, &why)
        return off

    cdef _check_open(self):
        if self._closed:
            raise Closed("reader is closed")

    cdef size_t _end_of(self, _Seg s) except? 0:
        """Where s's published records end (s.size: everywhere; see
        log_layout.h).  A length word alone proves a record complete only in
        a sealed segment: the durable path writes with pwrite."""
        cdef eng_notify *n
        cdef uint64_t a, p
        if self._notify is None:
            self._notify = _open_notify(self._path, False)
            if self._notify is None:
                return s.size  # no writer ever ran here
        n = self._notify.n
        if eng_load_acquire_u32(&n.magic) != ENG_NOTIFY_MAGIC:
            return s.size  # a writer of the first format: length words alone
        a = eng_load_acquire_u64(&n.active_base)
        if s.base < a:
            return s.size  # sealed
        if s.base > a:
            return _SEGHDR  # created, not announced yet
        # acquire after active_base: a roll stores the new published before the new base
        p = eng_load_acquire_u64(&n.published)
        if (p >> 32) != (s.base & 0xFFFFFFFFu):
            return s.size  # rolled since: sealed
        return <size_t>(p & 0xFFFFFFFFu)

    cdef _Seg _open_seg(self, uint64_t base):
        """Map segment `base` read-only (None if it does not exist)."""
        cdef _Seg s
        spath = _os.path.join(self._path, _seg_name(base))
        try:
            s = _map_seg(spath, False, base, self._log_id, True)
        except FileNotFoundError:
            return None
        return s

    cdef _seek(self, uint64_t offset, bint count_skip):
        """Position at offset (or the first kept offset after it)."""
        cdef _Seg s = None
        cdef size_t pos, i, lim
        cdef uint64_t expect
        cdef int r, why = W_NONE
        cdef _Frame fi
        for _attempt in range(100):
            bases = _list_segments(self._path)
            if not bases:
                raise FileNotFoundError(_errno.ENOENT, "log has no segments", self._path)
            cand = [b for b in bases if b <= offset]
            if not cand:
                if count_skip:
                    self._skipped += bases[0] - offset
                offset = bases[0]
                cand = [bases[0]]
            s = self._open_seg(cand[-1])
            if s is None:
                continue  # deleted by retention meanwhile: look again
            break
        else:
            raise OSError(_errno.EAGAIN, "segments kept disappearing while seeking", self._path)
        _load_index(self._path, s)
        pos = _SEGHDR
        expect = s.base
        lim = self._end_of(s)
        self._in = 0
        # last index entry at or before the offset
        i = s.ix_n
        while i > 0 and s.base + s.ix_rel[i - 1] > offset:
            i -= 1
        if i > 0:
            pos = s.ix_pos[i - 1]
            expect = s.base + s.ix_rel[i - 1]
            if _rec_check(s.p, s.size, pos, expect, False, &why) not in (R_REC, R_EOS):
                pos = _SEGHDR  # stale or damaged index: scan from the start
                expect = s.base
        while expect < offset:
            r = R_END if pos >= lim else _frame_check(s.p, s.size, pos, expect, True, &why, &fi)
            if r == R_REC:
                if expect + fi.span > offset and (<const eng_rec_header *>(s.p + pos)).flags & ENG_REC_FLAG_HOLE:
                    break  # removed records: reading goes on at the next one after the hole
                if expect + fi.span > offset:
                    # the offset is inside this batch frame: read on from its record there
                    self._seg = s
                    self._pos = pos
                    self._lim = 0
                    self._enter_batch(<const eng_rec_header *>(s.p + pos))
                    self._skip_in_batch(offset)
                    return
                pos += _align8((<const eng_rec_header *>(s.p + pos)).length)
                expect += fi.span
                continue
            if r == R_EOS:
                # the offset lives in a later segment (or past the end)
                s2 = self._open_seg(expect)
                if s2 is None:
                    if expect in _list_segments(self._path):
                        continue
                    raise ValueError(f"offset {offset} is beyond the end of the log (next offset {expect})")
                s = s2
                _load_index(self._path, s)
                pos = _SEGHDR
                lim = self._end_of(s)
                i = s.ix_n
                while i > 0 and s.base + s.ix_rel[i - 1] > offset:
                    i -= 1
                if i > 0 and _rec_check(s.p, s.size, s.ix_pos[i - 1], s.base + s.ix_rel[i - 1], False, &why) == R_REC:
                    pos = s.ix_pos[i - 1]
                    expect = s.base + s.ix_rel[i - 1]
                continue
            if r == R_END:
                raise ValueError(f"offset {offset} is beyond the end of the log (next offset {expect})")
            raise CorruptLog(s.path, pos, _WHY.get(why, "?"))
        self._seg = s
        self._pos = pos
        self._off = expect
        self._lim = 0

    cdef void _enter_batch(self, const eng_rec_header *h) noexcept:
        """Start reading the batch frame at _pos (checked whole by the caller)."""
        self._in = self._pos + _HDR
        self._fend = self._pos + h.length
        self._fbase = h.offset
        self._fspan = h.key_len
        self._fts = h.timestamp_ns
        self._off = h.offset

    cdef void _leave_batch(self) noexcept:
        """Move past the batch frame at _pos: the next frame's offset follows its span."""
        self._pos += _align8(self._fend - self._pos)
        self._off = self._fbase + self._fspan
        self._in = 0

    cdef int _inner(self, _Inner *r) except -1:
        """Parse the next inner record of the batch being read (bounds-checked
        again: the mapping is shared, so its bytes are never trusted twice)."""
        if (_inner_at(self._seg.p, self._in, self._fend, r) != 0 or r.delta >= self._fspan
                or self._fbase + r.delta < self._off):
            raise CorruptLog(self._seg.path, self._pos, _WHY[W_INNER])
        return 0

    cdef int _skip_in_batch(self, uint64_t offset) except -1:
        """Inside a batch: move to its first record at or after offset (past
        the frame when none is)."""
        cdef _Inner r
        while self._in < self._fend:
            self._inner(&r)
            if self._fbase + r.delta >= offset:
                self._off = offset
                return 0
            self._in = r.next
            self._off = self._fbase + r.delta + 1
        self._leave_batch()
        return 0

    cdef Record _record(self, _Seg s, uint64_t off, int64_t ts, size_t kpos, size_t klen, bint has_key,
                        size_t vpos, size_t vlen, bint tombstone):
        cdef Record rec = Record.__new__(Record)
        rec.offset = <int64_t>off
        rec.timestamp = ts
        rec.tombstone = tombstone
        if self._copy:
            rec.value = PyBytes_FromStringAndSize(<const char *>(s.p + vpos), vlen)
            rec.key = PyBytes_FromStringAndSize(<const char *>(s.p + kpos), klen) if has_key else None
        else:
            view = s.view()
            rec.value = view[vpos:vpos + vlen]
            rec.key = view[kpos:kpos + klen] if has_key else None
        return rec

    cdef Record _next_inner(self):
        """The next record of the batch being read."""
        cdef _Inner r
        cdef Record rec
        self._inner(&r)
        rec = self._record(self._seg, self._fbase + r.delta, <int64_t>(<uint64_t>self._fts + r.tsd),
                           r.key, r.klen, r.attr & ENG_INNER_KEY, r.value, r.vlen,
                           r.attr & ENG_INNER_TOMBSTONE)
        self._in = r.next
        self._off = self._fbase + r.delta + 1
        if self._in >= self._fend:
            self._leave_batch()
        return rec

    cdef Record _next(self):
        """The next record, or None at the current end."""
        cdef _Seg s
        cdef int r, why = W_NONE
        cdef const eng_rec_header *h
        cdef size_t klen, pos
        while True:
            if self._in:
                return self._next_inner()
            s = self._seg
            pos = self._pos
            if pos >= self._lim:
                self._lim = self._end_of(s)  # a load or two, once per published batch
            if pos >= self._lim:
                r = R_END
            else:
                r = _rec_check(s.p, s.size, pos, self._off, True, &why)
            if r == R_REC:
                h = <const eng_rec_header *>(s.p + pos)
                if h.flags & ENG_REC_FLAG_BATCH:
                    self._enter_batch(h)
                    continue
                if h.flags & ENG_REC_FLAG_HOLE:
                    # records key compaction removed: their offsets are skipped
                    self._pos = pos + _HDR
                    self._off += h.key_len
                    continue
                klen = h.key_len
                self._pos = pos + _align8(h.length)
                self._off += 1
                return self._record(s, h.offset, h.timestamp_ns, pos + _HDR, klen, h.flags & ENG_REC_FLAG_KEY,
                                    pos + _HDR + klen, h.length - _HDR - klen,
                                    h.flags & ENG_REC_FLAG_TOMBSTONE)
            if r == R_EOS:
                if not self._next_segment():
                    return None
                continue
            if r == R_END:
                if self._zero_checked != pos:
                    # A zero length word is the end of data, unless the writer
                    # already rolled past this segment: then the record (or
                    # end marker) here is damaged and must not read as "the end".
                    self._zero_checked = pos
                    if self._notify is None:
                        self._notify = _open_notify(self._path, False)
                    if self._notify is not None and eng_load_acquire_u32(&self._notify.n.magic) == ENG_NOTIFY_MAGIC:
                        # a load, no syscall: tailing readers meet a new tail per record
                        later = eng_load_acquire_u64(&self._notify.n.active_base) > s.base
                    else:
                        later = any(b > s.base for b in _list_segments(self._path))
                    if later and _rec_check(s.p, s.size, pos, self._off, True, &why) == R_END:
                        raise CorruptLog(s.path, pos, "segment ends without its end-of-segment "
                                         "marker but a later segment exists")
                    continue
                return None
            raise CorruptLog(s.path, pos, _WHY.get(why, "?"))

    cdef bint _next_segment(self) except -1:
        """Move past an end marker; False if the next segment is not there yet."""
        cdef _Seg s2
        cdef uint64_t nb = self._off
        s2 = self._open_seg(nb)
        if s2 is None:
            later = [b for b in _list_segments(self._path) if b > nb]
            if not later:
                return False  # the writer is creating it
            # retention deleted it before we got there: jump forward
            self._skipped += later[0] - nb
            self._seek(later[0], False)
            return True
        self._seg = s2
        self._pos = _SEGHDR
        self._lim = 0
        self._in = 0
        return True

    def __iter__(self):
        return self

    def __next__(self):
        """Next record; StopIteration at the current end (iteration does not wait)."""
        if self._closed:
            raise Closed("reader is closed")
        rec = self._next()
        if rec is None:
            raise StopIteration
        return rec

    def read(self):
        """The next record, or None at the current end (never waits)."""
        self._check_open()
        return self._next()

    def read_many(self, max_records=1024):
        """Up to max_records records available now (never waits)."""
        cdef Py_ssize_t i, n
        cdef list out = []
        self._check_open()
        if not isinstance(max_records, int):
            raise TypeError("max_records must be an int")
        if max_records < 0:
            raise ValueError("max_records must be >= 0")
        n = max_records
        for i in range(n):
            rec = self._next()
            if rec is None:
                break
            out.append(rec)
        return out

    def poll(self, timeout=1.0):
        """Wait up to timeout seconds (None: forever) for the next record; None on timeout.

        Sleeps on a futex in the log's ``notify`` file (GIL released, in
        slices of at most 50 ms so Ctrl-C works); the writer wakes sleepers
        only when some are registered.
        """
        cdef uint32_t seq
        cdef int64_t deadline = 0, now, slice_ns
        cdef eng_notify *n
        self._check_open()
        if timeout is not None:
            if not isinstance(timeout, (int, float)) or isinstance(timeout, bool):
                raise TypeError("timeout must be a number of seconds or None")
            if timeout < 0:
                raise ValueError("timeout must be >= 0 or None")
        rec = self._next()
        if rec is not None or timeout == 0:
            return rec
        if timeout is not None:
            deadline = eng_now_ns() + <int64_t>(timeout * 1e9)
        while True:
            if self._notify is None:
                self._notify = _open_notify(self._path, False)
            if self._notify is None:
                n = NULL
            else:
                n = self._notify.n
                # seq_cst: registering must precede the re-check (see _wake)
                eng_fetch_add_seqcst_u32(&n.waiters, 1)
            try:
                seq = eng_load_seqcst_u32(&n.seq) if n != NULL else 0
                rec = self._next()
                if rec is not None:
                    return rec
                now = eng_now_ns()
                if timeout is not None and now >= deadline:
                    return None
                slice_ns = 50_000_000
                if timeout is not None and deadline - now < slice_ns:
                    slice_ns = deadline - now
                with nogil:
                    if n != NULL:
                        eng_futex_wait(&n.seq, seq, slice_ns)
                    else:
                        eng_futex_wait(&seq, seq, slice_ns if slice_ns < 2_000_000 else 2_000_000)
            finally:
                if n != NULL:
                    eng_fetch_sub_seqcst_u32(&n.waiters, 1)
            PyErr_CheckSignals()

    cdef int _peek(self) except -1:
        """1 when ``read()`` has something to say now (a record, the next
        segment, damage to raise), 0 at the current end.  Moves nothing."""
        cdef _Seg s = self._seg
        cdef int why = W_NONE
        cdef int r = R_END
        if self._in:
            return 1  # a record left in the batch being read
        if self._pos < self._end_of(s):
            r = _rec_check(s.p, s.size, self._pos, self._off, False, &why)
        if r == R_END:
            # read() checks each end position once for a segment that ends early
            return self._zero_checked != self._pos
        if r == R_EOS:
            # the writer creates the next segment before it appends there
            return any(b > s.base for b in _list_segments(self._path))
        return 1

    def wait(self, timeout=None):
        """Wait up to ``timeout`` seconds (None: forever) until ``read()`` has
        a record, without consuming it: True then, False on timeout.

        Sleeps on the same futex as ``poll`` (GIL released, in slices of at
        most 50 ms, registered as a waiter so the writer's wake reaches it);
        made for ``engine.aio``'s waiter thread, so ``close()`` from another
        thread meanwhile is safe (``Closed``)."""
        cdef uint32_t seq
        cdef int64_t deadline = 0, now, slice_ns
        cdef eng_notify *n
        cdef _Notify nt
        self._check_open()
        if timeout is not None:
            if not isinstance(timeout, (int, float)) or isinstance(timeout, bool):
                raise TypeError("timeout must be a number of seconds or None")
            if timeout < 0:
                raise ValueError("timeout must be >= 0 or None")
        if self._peek():
            return True
        if timeout == 0:
            return False
        if timeout is not None:
            deadline = eng_now_ns() + <int64_t>(timeout * 1e9)
        while True:
            self._check_open()
            if self._notify is None:
                self._notify = _open_notify(self._path, False)
            nt = self._notify
            n = NULL if nt is None else nt.n
            if n != NULL:
                # seq_cst: registering must precede the re-check (see _wake)
                eng_fetch_add_seqcst_u32(&n.waiters, 1)
            try:
                seq = eng_load_seqcst_u32(&n.seq) if n != NULL else 0
                if self._peek():
                    return True
                now = eng_now_ns()
                if timeout is not None and now >= deadline:
                    return False
                slice_ns = 50_000_000
                if timeout is not None and deadline - now < slice_ns:
                    slice_ns = deadline - now
                with nogil:
                    if n != NULL:
                        eng_futex_wait(&n.seq, seq, slice_ns)
                    else:
                        eng_futex_wait(&seq, seq, slice_ns if slice_ns < 2_000_000 else 2_000_000)
            finally:
                # close() in another thread unmaps the block (and sets nt.n
                # to NULL) while we sleep: never touch it after that
                if n != NULL and nt.n != NULL:
                    eng_fetch_sub_seqcst_u32(&n.waiters, 1)
            PyErr_CheckSignals()

    def stats(self):
        """A dict: path, log id, group, position (next offset to read), the
        group's committed offset (None without a group or commit), records
        skipped by retention, closed."""
        return {"path": self._path, "log_id": self.log_id, "group": self._group,
                "position": self._off, "skipped": self._skipped, "closed": self._closed,
                "committed": None if self._group is None or self._closed else self.committed()}

    def apoll(self, timeout=None):
        """Coroutine: the next record, waiting without blocking the event
        loop (``engine.aio.apoll``); None on timeout (default: no limit)."""
        return _aio().apoll(self, timeout)

    def __aiter__(self):
        """``async for rec in reader``: tails the log (waits for new records)
        until the reader is closed."""
        return _aio().aiter_records(self)

    def seek(self, offset):
        """Continue reading at ``offset`` (ValueError past the end)."""
        self._check_open()
        if not isinstance(offset, int) or isinstance(offset, bool):
            raise TypeError("offset must be an int")
        if offset < 0:
            raise ValueError(f"offset must be >= 0, not {offset}")
        self._seek(offset, True)

    def seek_time(self, ts_ns):
        """Continue at the first record with timestamp >= ts_ns; returns its offset
        (the next offset to be written if every record is older)."""
        cdef _Seg s
        cdef size_t pos, i
        cdef uint64_t expect
        cdef int r, why = W_NONE
        cdef const eng_rec_header *h
        cdef _Frame fi
        cdef _Inner inner
        self._check_open()
        if not isinstance(ts_ns, int) or isinstance(ts_ns, bool):
            raise TypeError("ts_ns must be an int (nanoseconds since the epoch)")
        bases = _list_segments(self._path)
        # the last segment created at or before ts_ns holds the first record >= ts_ns
        # (or it is the first record of the next segment); headers are cheap
        chosen = bases[0] if bases else 0
        for b in bases:
            try:
                with open(_os.path.join(self._path, _seg_name(b)), "rb") as f:
                    created = _SEG_HEADER.unpack(f.read(64))[6]
            except (OSError, _struct.error):
                continue
            if created < ts_ns:
                chosen = b
            else:
                break
        self._seek(chosen, True)
        s = self._seg
        _load_index(self._path, s)
        i = s.ix_n
        while i > 0 and s.ix_ts[i - 1] >= ts_ns:
            i -= 1
        if i > 0 and s.base + s.ix_rel[i - 1] >= self._off and s.ix_pos[i - 1] < self._end_of(s) and \
                _rec_check(s.p, s.size, s.ix_pos[i - 1], s.base + s.ix_rel[i - 1], False, &why) == R_REC:
            self._pos = s.ix_pos[i - 1]
            self._off = s.base + s.ix_rel[i - 1]
            self._in = 0
        while True:
            if self._in:
                # inside a batch frame: its first record stamped >= ts_ns
                while self._in < self._fend:
                    self._inner(&inner)
                    if <int64_t>(<uint64_t>self._fts + inner.tsd) >= ts_ns:
                        self._off = self._fbase + inner.delta
                        return self._off
                    self._in = inner.next
                    self._off = self._fbase + inner.delta + 1
                self._leave_batch()
            s = self._seg
            pos = self._pos
            if pos >= self._end_of(s):
                return self._off
            r = _frame_check(s.p, s.size, pos, self._off, True, &why, &fi)
            if r == R_REC:
                h = <const eng_rec_header *>(s.p + pos)
                if fi.last_ts >= ts_ns and not (h.flags & ENG_REC_FLAG_HOLE):
                    if h.flags & ENG_REC_FLAG_BATCH:
                        self._enter_batch(h)
                        continue
                    return self._off
                self._pos = pos + _align8(h.length)
                self._off += fi.span
            elif r == R_EOS:
                if not self._next_segment():
                    return self._off
            elif r == R_END:
                return self._off
            else:
                raise CorruptLog(s.path, pos, _WHY.get(why, "?"))

    def commit(self, offset=None):
        """Store the group's position durably: records below ``offset`` (default:
        ``position``, everything returned so far) count as processed.

        Temp file, fsync, rename, fsync directory: a crash leaves the old or the
        new value.  Needs ``group``.
        """
        self._check_open()
        if self._group is None:
            raise ValueError("commit() needs a reader opened with group=...")
        if offset is None:
            offset = self._off
        elif not isinstance(offset, int) or isinstance(offset, bool):
            raise TypeError("offset must be an int or None")
        elif offset < 0:
            raise ValueError(f"offset must be >= 0, not {offset}")
        _write_group(self._path, self._group, offset, self._epoch)
        _call_hook(self._path, {"kind": "group", "group": self._group, "offset": offset})

    def committed(self):
        """The group's committed offset (None if it never committed)."""
        if self._group is None:
            raise ValueError("committed() needs a reader opened with group=...")
        return _read_group(self._path, self._group)

    def close(self):
        """Let go of the mappings (live zero-copy views keep theirs). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._seg = None
        if self._notify is not None:
            self._notify.close()
            self._notify = None
        if self._group_fd >= 0:
            _os.close(self._group_fd)
            self._group_fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def log_id(self):
        """The log's id (uuid string, from its meta file): what the bridge puts in message ids."""
        return str(_uuid.UUID(bytes=self._log_id)) if self._log_id is not None else None

    @property
    def position(self):
        """Offset of the next record this reader returns."""
        return self._off

    @property
    def end_offset(self):
        """The offset after the last record the writer has published: what
        :attr:`position` reaches once this reader has caught up, so
        ``end_offset - position`` is its lag in records.  A moment's snapshot
        (the writer goes on).  None when no writer has said: none ever opened
        the log, or one built before this property existed wrote it."""
        cdef uint64_t e
        self._check_open()
        if self._notify is None:
            self._notify = _open_notify(self._path, False)
            if self._notify is None:
                return None
        if eng_load_acquire_u32(&self._notify.n.magic) != ENG_NOTIFY_MAGIC:
            return None
        e = eng_load_acquire_u64(&self._notify.n.published_next)
        if e == 0:
            return None
        return max(e - 1, self._off)  # never behind what this reader already returned

    @property
    def group(self):
        """The consumer group, or None."""
        return self._group

    @property
    def skipped(self):
        """Records jumped over because retention had deleted them."""
        return self._skipped

    @property
    def closed(self):
        """True after close()."""
        return self._closed

    def __repr__(self):
        return f"<engine.LogReader {self._path!r} position={self._off} group={self._group!r}>"
