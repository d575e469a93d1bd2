# The benchmark harness's delivery digest, computed in C.
#
# engine.bench.harness.digest_array defines the digest with numpy: per message
# h = size * K + sum_j word_j * weight_j (64-bit little-endian words of the
# message, zero-padded to a multiple of 8 bytes, all arithmetic mod 2**64),
# then the murmur3 finaliser of h; the checksum is the sum of the finalised h
# of every message, and the order flag says whether the first words rose
# strictly.  These loops compute the same values straight from the delivered
# objects (bytes, or anything with a contiguous buffer) and from 2-D row
# arrays, without joining them into one buffer first: the harness digests
# tens of millions of delivered messages per suite.
"""Delivery digests in C for engine.bench.harness (same values as its numpy path)."""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_GET_SIZE
from libc.stdint cimport int64_t, uint8_t, uint64_t
from libc.string cimport memcpy, memset

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    static inline uint64_t qe_le64(const uint8_t *p) {
        uint64_t v;
        memcpy(&v, p, 8);
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        v = __builtin_bswap64(v);
    #endif
        return v;
    }
    static inline uint64_t qe_fmix64(uint64_t h) {
        h ^= h >> 33;
        h *= 0xFF51AFD7ED558CCDULL;
        h ^= h >> 33;
        h *= 0xC4CEB9FE1A85EC53ULL;
        h ^= h >> 33;
        return h;
    }
    """
    uint64_t qe_le64(const uint8_t *p) nogil
    uint64_t qe_fmix64(uint64_t h) nogil

cdef uint64_t GOLDEN = 0x9E3779B97F4A7C15ULL


@cython.boundscheck(False)
@cython.wraparound(False)
cdef inline uint64_t _hash(const uint8_t *p, Py_ssize_t size, const uint64_t *w,
                           uint64_t *first) noexcept nogil:
    cdef uint64_t h = <uint64_t>size * GOLDEN
    cdef Py_ssize_t full = size // 8
    cdef Py_ssize_t j
    cdef uint8_t tail[8]
    for j in range(full):
        h += qe_le64(p + 8 * j) * w[j]
    if size % 8:
        memset(tail, 0, 8)
        memcpy(tail, p + 8 * full, size % 8)
        h += qe_le64(tail) * w[full]
        if full == 0:
            first[0] = qe_le64(tail)
            return qe_fmix64(h)
    first[0] = qe_le64(p)
    return qe_fmix64(h)


cdef object _in_order(bint rising, Py_ssize_t n, Py_ssize_t size):
    # a sequence number of fewer than 8 bytes wraps: past 256**size messages
    # the order cannot be told
    if size < 8 and n > (<int64_t>1 << (8 * size)):
        return None
    return bool(rising)


@cython.boundscheck(False)
@cython.wraparound(False)
def digest_list(list messages, const uint64_t[::1] weights):
    """``(count, checksum, in_order)`` of ``messages`` (bytes-like, in the
    order received), or ``None`` when they are not all of one non-zero size
    (the caller's numpy path handles those).  ``weights`` has one weight per
    8-byte word of the size."""
    cdef Py_ssize_t n = len(messages)
    cdef Py_ssize_t i, size = -1, sz
    cdef uint64_t checksum = 0, first = 0, prev = 0
    cdef bint rising = True
    cdef bint held
    cdef Py_buffer view
    cdef const uint8_t *p
    cdef object m
    if n == 0:
        return None
    for i in range(n):
        m = messages[i]
        held = False
        if PyBytes_CheckExact(m):
            p = <const uint8_t *>PyBytes_AS_STRING(m)
            sz = PyBytes_GET_SIZE(m)
        else:
            PyObject_GetBuffer(m, &view, PyBUF_SIMPLE)
            held = True
            p = <const uint8_t *>view.buf
            sz = view.len
        try:
            if size < 0:
                size = sz
                if size == 0 or weights.shape[0] < (size + 7) // 8:
                    return None
            if sz != size:
                return None
            checksum += _hash(p, size, &weights[0], &first)
        finally:
            if held:
                PyBuffer_Release(&view)
        if i and first <= prev:
            rising = False
        prev = first
    return n, checksum, _in_order(rising, n, size)


@cython.boundscheck(False)
@cython.wraparound(False)
def digest_rows(const uint8_t[:, ::1] rows, const uint64_t[::1] weights):
    """``(count, checksum, in_order)`` of a C-contiguous ``(n, size)`` uint8
    array, one message per row (``n`` >= 1, ``size`` >= 1)."""
    cdef Py_ssize_t n = rows.shape[0], size = rows.shape[1], i
    cdef uint64_t checksum = 0, first = 0, prev = 0
    cdef bint rising = True
    if n == 0 or size == 0 or weights.shape[0] < (size + 7) // 8:
        raise ValueError("digest_rows needs rows of at least 1 byte and a weight per word")
    with nogil:
        for i in range(n):
            checksum += _hash(&rows[i, 0], size, &weights[0], &first)
            if i and first <= prev:
                rising = False
            prev = first
    return n, checksum, _in_order(rising, n, size)
