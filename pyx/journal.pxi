# Journal records of engine.txn: their kinds, their bytes on disk, and the
# reader of the records older releases wrote.  Included by txn.pyx, whose hot
# paths encode records in C; engine.txn decodes through _decode_record.
#
# In memory a record is a tuple whose first item is its kind (a REC_* letter
# below), e.g. (REC_PREPARED, txid, ops).  On disk each record is one log
# record in the journal format:
#
#   0x00          marker: never the first byte of a marshal record (below)
#   u8 format     JOURNAL_FORMAT; a record of a later format is refused by name
#   u8 kind       the kind's letter in ASCII
#   the record's other items (at most two), each a tagged value:
#     0x00 None     0x01 False     0x02 True
#     0x03 int      i64                        an int that fits 64 bits
#     0x04 int      u32 n, n bytes             two's complement, any size
#     0x05 float    f64 (IEEE 754 bits)
#     0x06 bytes    u32 n, n bytes             (a bytearray is written as bytes)
#     0x07 str      u32 n, n bytes of UTF-8    (lone surrogates kept)
#     0x08 tuple    u32 n, n values
#     0x09 list     u32 n, n values
#     0x0A dict     u32 n, n (key, value) pairs
#   every number little-endian; values nest at most _MAX_DEPTH levels deep.
#   Subclasses of these types are written as their base type; anything else is
#   a TypeError when the record is written, so no unreadable record is written.
#
# Releases before the journal format wrote marshal data (versions 2 and 4) of
# the same tuples, with "C" for both a commit decision and a commit mark.  A
# marshal record starts with a type code, a printable ASCII character with
# bit 7 set when the object may be referenced again ('(' or ')', 0x28/0x29 or
# 0xA8/0xA9, for these tuples) and never 0x00, so the marker tells the formats
# apart record by record: a journal written by an older release opens, and a
# generation holding both (written before and after an upgrade) replays in
# order.  The legacy reader is ours (the part of marshal these records use),
# so reading never depends on what a later Python's marshal still reads.
#
# Decoding is bounded by the record: every length and count is checked
# against the bytes left before anything is allocated (each value takes at
# least one byte), nesting is bounded, every loop consumes input.  Hostile
# bytes raise ValueError saying what is wrong, which engine.txn reports as
# CorruptLog naming the journal and the record.

from cpython.bool cimport PyBool_Check
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_Check, PyByteArray_GET_SIZE
from cpython.bytes cimport PyBytes_Check, PyBytes_CheckExact
from cpython.dict cimport PyDict_Check, PyDict_Next
from cpython.float cimport PyFloat_AS_DOUBLE, PyFloat_Check
from cpython.list cimport PyList_AsTuple, PyList_Check, PyList_CheckExact
from cpython.long cimport PyLong_Check, PyLong_CheckExact
from cpython.tuple cimport PyTuple_Check, PyTuple_CheckExact
from cpython.unicode cimport (PyUnicode_AsEncodedString, PyUnicode_Check, PyUnicode_CheckExact,
                              PyUnicode_DecodeLatin1, PyUnicode_DecodeUTF8, PyUnicode_READ_CHAR)
from libc.stdint cimport int32_t, uint64_t


# Record kinds: the first item of every record (one letter each).  A
# coordinator's journal holds INCARNATION, DECISION, REDO and ENDED; a
# participant's holds PREPARED, MARK, ABORTED and DONE.
REC_INCARNATION = "I"  # (I, incarnation): a coordinator incarnation began
REC_DECISION = "C"     # (C, txid, participant names): the coordinator decided commit
REC_ENDED = "E"        # (E, [txids]): every participant acknowledged these commits
REC_REDO = "R"         # (R, txid, ((name, start, values, keys or None), ...)): the coordinator
                       # decided commit of a txn whose participants are all LogParticipants
                       # that never heard of it: each one's batch (values: a non-empty list
                       # of bytes, keys: None or a list of bytes or None as long) goes to its
                       # log at offset start (engine.txn: commit by the coordinator's log)
REC_PREPARED = "P"     # (P, txid, ops): the participant voted yes and holds the ops
REC_MARK = "M"         # (M, txid, start): commit decided; a log participant's batch starts at start
REC_ABORTED = "A"      # (A, txid): the participant dropped the ops
REC_DONE = "D"         # (D, [txids]): the participant finished these commits

cdef enum:
    _MARKER = 0x00           # first byte of a journal-format record
    _FORMAT = 1              # the format this release writes (and reads, with the marshal records)
    _MAX_DEPTH = 64          # nesting levels a value may have (the record's items are level 1)
    _U32_MAX = 0xFFFFFFFF    # largest length or count a u32 holds
    # the kinds' letters, as on disk
    _K_INCARNATION = 0x49    # "I"
    _K_DECISION = 0x43       # "C"
    _K_ENDED = 0x45          # "E"
    _K_REDO = 0x52           # "R"
    _K_PREPARED = 0x50       # "P"
    _K_MARK = 0x4D           # "M"
    _K_ABORTED = 0x41        # "A"
    _K_DONE = 0x44           # "D"
    # value tags
    _T_NONE = 0x00
    _T_FALSE = 0x01
    _T_TRUE = 0x02
    _T_INT64 = 0x03
    _T_BIGINT = 0x04
    _T_FLOAT = 0x05
    _T_BYTES = 0x06
    _T_STR = 0x07
    _T_TUPLE = 0x08
    _T_LIST = 0x09
    _T_DICT = 0x0A

JOURNAL_FORMAT = _FORMAT

# what each kind's items are (for messages), by letter
cdef dict _SHAPES = {
    _K_INCARNATION: "incarnation int",
    _K_DECISION: "txid str, participant names tuple or list",
    _K_ENDED: "txids list of str",
    _K_REDO: "txid str, non-empty tuple of (participant name str, start offset int >= 0, "
             "values non-empty list of bytes, keys None or list of bytes or None as long)",
    _K_PREPARED: "txid str, ops",
    _K_MARK: "txid str, start offset int >= 0",
    _K_ABORTED: "txid str",
    _K_DONE: "txids list of str",
}
# the kind str of each letter a journal may hold: coordinator, participant
cdef dict _COORD_KINDS = {_K_INCARNATION: REC_INCARNATION, _K_DECISION: REC_DECISION,
                          _K_ENDED: REC_ENDED, _K_REDO: REC_REDO}
cdef dict _PART_KINDS = {_K_PREPARED: REC_PREPARED, _K_MARK: REC_MARK, _K_ABORTED: REC_ABORTED,
                         _K_DONE: REC_DONE}
# marshal records' kind letters: "C" was the commit mark in a participant's journal
cdef dict _LEGACY_COORD_KINDS = {"I": REC_INCARNATION, "C": REC_DECISION, "E": REC_ENDED}
cdef dict _LEGACY_PART_KINDS = {"P": REC_PREPARED, "C": REC_MARK, "A": REC_ABORTED,
                                "D": REC_DONE}


cdef inline bint _is_int(object o) noexcept:
    return PyLong_Check(o) and not PyBool_Check(o)


cdef inline bint _is_offset(object o) noexcept:
    """``o`` is an int >= 0 (not a bool)."""
    cdef int overflow = 0
    cdef long long v
    if not _is_int(o):
        return False
    v = PyLong_AsLongLongAndOverflow(o, &overflow)  # cannot fail on an int
    return overflow > 0 or (overflow == 0 and v >= 0)


cdef bint _is_txid_list(object o) noexcept:
    cdef Py_ssize_t i, n
    cdef PyObject **items
    if not (PyList_Check(o) or PyTuple_Check(o)):
        return False
    n = PySequence_Fast_GET_SIZE(o)
    items = PySequence_Fast_ITEMS(o)
    for i in range(n):
        if not PyUnicode_Check(<object>items[i]):
            return False
    return True


cdef bint _is_bytes_list(object o, bint nones) noexcept:
    """``o`` is a list of bytes (or None where ``nones``)."""
    cdef Py_ssize_t i, n
    cdef PyObject **items
    if not PyList_Check(o):
        return False
    n = PySequence_Fast_GET_SIZE(o)
    items = PySequence_Fast_ITEMS(o)
    for i in range(n):
        if not (PyBytes_Check(<object>items[i]) or (nones and <object>items[i] is None)):
            return False
    return True


cdef int _is_redo(object o) except -1:
    """``o`` is a REDO record's batches: a non-empty tuple or list of
    ``(name str, start int >= 0, values, keys)``, values a non-empty list of
    bytes, keys None or a list of bytes or None as long as values."""
    cdef Py_ssize_t i, n
    cdef PyObject **items
    if not (PyTuple_Check(o) or PyList_Check(o)):
        return False
    n = PySequence_Fast_GET_SIZE(o)
    if n == 0:
        return False
    items = PySequence_Fast_ITEMS(o)
    for i in range(n):
        b = <object>items[i]
        if not ((PyTuple_Check(b) or PyList_Check(b)) and PySequence_Fast_GET_SIZE(b) == 4):
            return False
        name, start, values, keys = b
        if not (PyUnicode_Check(name) and _is_offset(start) and _is_bytes_list(values, False)
                and PySequence_Fast_GET_SIZE(values) > 0):
            return False
        if keys is not None and not (_is_bytes_list(keys, True)
                                     and PySequence_Fast_GET_SIZE(keys) == PySequence_Fast_GET_SIZE(values)):
            return False
    return True


cdef int _check_shape(int kind, Py_ssize_t nitems, object a, object b) except -1:
    """Raise ValueError unless ``kind`` is a record kind and its ``nitems``
    items (``a``, ``b``) have the fields replay relies on."""
    cdef bint ok
    if kind == _K_PREPARED:
        ok = nitems == 2 and PyUnicode_Check(a)
    elif kind == _K_MARK:
        ok = nitems == 2 and PyUnicode_Check(a) and _is_offset(b)
    elif kind == _K_DECISION:
        ok = nitems == 2 and PyUnicode_Check(a) and (PyTuple_Check(b) or PyList_Check(b))
    elif kind == _K_REDO:
        ok = nitems == 2 and PyUnicode_Check(a) and _is_redo(b)
    elif kind == _K_ABORTED:
        ok = nitems == 1 and PyUnicode_Check(a)
    elif kind == _K_DONE or kind == _K_ENDED:
        ok = nitems == 1 and _is_txid_list(a)
    elif kind == _K_INCARNATION:
        ok = nitems == 1 and _is_int(a)
    else:
        raise ValueError(f"unknown record kind {chr(kind)!r}")
    if not ok:
        got = ", ".join([type(x).__name__ for x in (a, b)[:min(nitems, 2)]])
        raise ValueError(f"a {chr(kind)!r} record holds ({_SHAPES[kind]}), "
                         f"not ({got}{', ...' if nitems > 2 else ''})")
    return 0


# ---------------------------------------------------------------------------
# encoding: size the record, then write it into one bytes object


cdef inline char *_put_u32(char *p, uint32_t n) noexcept:
    p[0] = <char>(n & 0xFF)
    p[1] = <char>((n >> 8) & 0xFF)
    p[2] = <char>((n >> 16) & 0xFF)
    p[3] = <char>((n >> 24) & 0xFF)
    return p + 4


cdef inline char *_put_u64(char *p, uint64_t n) noexcept:
    cdef int i
    for i in range(8):
        p[i] = <char>((n >> (8 * i)) & 0xFF)
    return p + 8


cdef inline bytes _utf8(object s):
    """A non-ASCII str's UTF-8 (surrogates kept, so every str round-trips)."""
    return PyUnicode_AsEncodedString(s, "utf-8", "surrogatepass")


cdef inline Py_ssize_t _bigint_bytes(object o) except -1:
    """Bytes of ``o``'s two's complement (an int beyond 64 bits)."""
    return (int.bit_length(o) + 8) >> 3


cdef inline Py_ssize_t _u32_len(Py_ssize_t n) except -1:
    if n > _U32_MAX:
        raise ValueError(f"a value of {n} bytes or items is too large for a journal record")
    return n


cdef inline Py_ssize_t _sized_scalar(object o) noexcept:
    """Bytes of the common scalars (ASCII str, bytes, None, a 64-bit int), or
    -1 for any other value: inline, so a list of txids costs no call per item."""
    cdef Py_ssize_t n
    cdef int overflow = 0
    if PyUnicode_CheckExact(o) and PyUnicode_IS_ASCII(o):
        n = PyUnicode_GET_LENGTH(o)
        return 5 + n if n <= _U32_MAX else -1
    if PyBytes_CheckExact(o):
        n = PyBytes_GET_SIZE(o)
        return 5 + n if n <= _U32_MAX else -1
    if o is None:
        return 1
    if PyLong_CheckExact(o):
        PyLong_AsLongLongAndOverflow(o, &overflow)  # cannot fail on an int
        return 9 if overflow == 0 else -1
    return -1


cdef Py_ssize_t _sized(object o, int depth) except -1:
    """Bytes ``o`` takes as a tagged value; TypeError for a type a record cannot hold."""
    cdef Py_ssize_t n, m, total, i
    cdef PyObject **items
    n = _sized_scalar(o)
    if n >= 0:
        return n
    if (PyTuple_CheckExact(o) or PyList_CheckExact(o)) and depth < _MAX_DEPTH:
        n = PySequence_Fast_GET_SIZE(o)
        if n <= _U32_MAX:
            total = 5
            items = PySequence_Fast_ITEMS(o)
            for i in range(n):
                m = _sized_scalar(<object>items[i])
                total += m if m >= 0 else _sized(<object>items[i], depth + 1)
            return total
    return _sized_other(o, depth)  # the rest there keeps this function small


cdef inline int _nest(int depth, Py_ssize_t n) except -1:
    """A container at ``depth`` may hold ``n`` values (at depth + 1)."""
    if n and depth >= _MAX_DEPTH:
        raise ValueError(f"a journal record nests deeper than {_MAX_DEPTH} levels")
    return 0


cdef Py_ssize_t _sized_other(object o, int depth) except -1:
    """_sized for the values it does not size itself."""
    cdef Py_ssize_t n, total, i
    cdef PyObject **items
    cdef PyObject *k
    cdef PyObject *v
    cdef int overflow = 0
    if PyUnicode_Check(o):
        n = PyUnicode_GET_LENGTH(o) if PyUnicode_IS_ASCII(o) else PyBytes_GET_SIZE(_utf8(o))
        return 5 + _u32_len(n)
    if PyBytes_Check(o):
        return 5 + _u32_len(PyBytes_GET_SIZE(o))
    if PyBool_Check(o):
        return 1
    if PyLong_Check(o):
        PyLong_AsLongLongAndOverflow(o, &overflow)
        return 9 if overflow == 0 else 5 + _u32_len(_bigint_bytes(o))
    if PyTuple_Check(o) or PyList_Check(o):
        n = _u32_len(PySequence_Fast_GET_SIZE(o))
        _nest(depth, n)
        total = 5
        items = PySequence_Fast_ITEMS(o)
        for i in range(n):
            total += _sized(<object>items[i], depth + 1)
        return total
    if PyFloat_Check(o):
        return 9
    if PyDict_Check(o):
        _nest(depth, _u32_len(len(<dict>o)))
        total = 5
        i = 0
        while PyDict_Next(o, &i, &k, &v):
            total += _sized(<object>k, depth + 1) + _sized(<object>v, depth + 1)
        return total
    if PyByteArray_Check(o):
        return 5 + _u32_len(PyByteArray_GET_SIZE(o))
    raise TypeError(
        "a journal record holds None, bool, int, float, str, bytes, tuple, list and dict, "
        f"not {type(o).__name__}"
    )


cdef inline char *_room(char *p, char *end, Py_ssize_t n) except NULL:
    """``p`` if ``n`` bytes fit before ``end`` (they do unless a value changed
    between _sized and _written, e.g. a list another thread appended to)."""
    if end - p < n:
        raise RuntimeError("a journal record changed while it was written")
    return p


cdef inline char *_put_data(char *p, char *end, uint8_t tag, const void *data,
                            Py_ssize_t n) except NULL:
    p = _room(p, end, 5 + n)
    p[0] = <char>tag
    p = _put_u32(p + 1, <uint32_t>n)
    memcpy(p, data, n)
    return p + n


cdef inline char *_written_scalar(object o, char *p, char *end) noexcept:
    """Write one of the scalars _sized_scalar sizes at ``p``; NULL for any
    other value or when it does not fit (_written then raises)."""
    cdef Py_ssize_t n
    cdef long long x
    cdef int overflow = 0
    if PyUnicode_CheckExact(o) and PyUnicode_IS_ASCII(o):
        n = PyUnicode_GET_LENGTH(o)
        if end - p < 5 + n:
            return NULL
        p[0] = _T_STR
        memcpy(_put_u32(p + 1, <uint32_t>n), PyUnicode_DATA(o), n)
        return p + 5 + n
    if PyBytes_CheckExact(o):
        n = PyBytes_GET_SIZE(o)
        if end - p < 5 + n:
            return NULL
        p[0] = _T_BYTES
        memcpy(_put_u32(p + 1, <uint32_t>n), PyBytes_AS_STRING(o), n)
        return p + 5 + n
    if o is None:
        if end - p < 1:
            return NULL
        p[0] = _T_NONE
        return p + 1
    if PyLong_CheckExact(o):
        x = PyLong_AsLongLongAndOverflow(o, &overflow)  # cannot fail on an int
        if overflow != 0 or end - p < 9:
            return NULL
        p[0] = _T_INT64
        return _put_u64(p + 1, <uint64_t>x)
    return NULL


cdef char *_written(object o, char *p, char *end) except NULL:
    """Write ``o`` (sized by _sized) at ``p``, not past ``end``; returns the end of it."""
    cdef Py_ssize_t n, i
    cdef PyObject **items
    cdef char *q = _written_scalar(o, p, end)
    if q != NULL:
        return q
    if PyTuple_CheckExact(o) or PyList_CheckExact(o):
        n = PySequence_Fast_GET_SIZE(o)
        items = PySequence_Fast_ITEMS(o)
        _room(p, end, 5)[0] = _T_TUPLE if PyTuple_CheckExact(o) else _T_LIST
        p = _put_u32(p + 1, <uint32_t>n)
        for i in range(n):
            q = _written_scalar(<object>items[i], p, end)
            p = q if q != NULL else _written(<object>items[i], p, end)
        return p
    return _written_other(o, p, end)  # the rest there keeps this function small


cdef char *_written_other(object o, char *p, char *end) except NULL:
    """_written for the values it does not write itself."""
    cdef Py_ssize_t n, i
    cdef PyObject **items
    cdef PyObject *k
    cdef PyObject *v
    cdef bytes b
    cdef long long x
    cdef int overflow = 0
    cdef double d
    cdef uint64_t bits
    if PyUnicode_Check(o):
        if PyUnicode_IS_ASCII(o):
            return _put_data(p, end, _T_STR, PyUnicode_DATA(o), PyUnicode_GET_LENGTH(o))
        b = _utf8(o)
        return _put_data(p, end, _T_STR, PyBytes_AS_STRING(b), PyBytes_GET_SIZE(b))
    if PyBytes_Check(o):
        return _put_data(p, end, _T_BYTES, PyBytes_AS_STRING(o), PyBytes_GET_SIZE(o))
    if PyBool_Check(o):
        _room(p, end, 1)[0] = _T_TRUE if o is True else _T_FALSE
        return p + 1
    if PyLong_Check(o):
        x = PyLong_AsLongLongAndOverflow(o, &overflow)
        if overflow == 0:
            _room(p, end, 9)[0] = _T_INT64
            return _put_u64(p + 1, <uint64_t>x)
        b = int.to_bytes(o, _bigint_bytes(o), "little", signed=True)
        return _put_data(p, end, _T_BIGINT, PyBytes_AS_STRING(b), PyBytes_GET_SIZE(b))
    if PyTuple_Check(o) or PyList_Check(o):
        n = PySequence_Fast_GET_SIZE(o)
        items = PySequence_Fast_ITEMS(o)
        _room(p, end, 5)[0] = _T_TUPLE if PyTuple_Check(o) else _T_LIST
        p = _put_u32(p + 1, <uint32_t>n)
        for i in range(n):
            p = _written(<object>items[i], p, end)
        return p
    if PyFloat_Check(o):
        d = PyFloat_AS_DOUBLE(o)
        memcpy(&bits, &d, 8)
        _room(p, end, 9)[0] = _T_FLOAT
        return _put_u64(p + 1, bits)
    if PyDict_Check(o):
        _room(p, end, 5)[0] = _T_DICT
        p = _put_u32(p + 1, <uint32_t>len(<dict>o))
        i = 0
        while PyDict_Next(o, &i, &k, &v):
            p = _written(<object>k, p, end)
            p = _written(<object>v, p, end)
        return p
    # a bytearray (the only other type _sized accepts)
    return _put_data(p, end, _T_BYTES, PyByteArray_AS_STRING(o), PyByteArray_GET_SIZE(o))


cdef inline char *_put_head(char *p, int kind) noexcept:
    p[0] = _MARKER
    p[1] = _FORMAT
    p[2] = <char>kind
    return p + 3


cdef inline int _kind_of(object kind) except -1:
    """The letter code of a kind str; ValueError for anything else."""
    if not PyUnicode_Check(kind) or PyUnicode_GET_LENGTH(kind) != 1:
        raise ValueError(f"a record kind is one of the REC_* letters, not {kind!r}")
    return <int>PyUnicode_READ_CHAR(kind, 0)


cpdef bytes _encode(object rec):
    """The journal bytes of ``rec``, a tuple ``(kind, items...)`` with ``kind``
    a ``REC_*`` letter; ValueError for a record of the wrong shape, TypeError
    for a value no record holds."""
    cdef Py_ssize_t n, i, nitems
    cdef bytes out
    cdef char *p
    cdef char *end
    cdef PyObject **items
    if not PyTuple_Check(rec) or PySequence_Fast_GET_SIZE(rec) == 0:
        raise TypeError(f"a journal record is a tuple (kind, items...), not {rec!r}")
    items = PySequence_Fast_ITEMS(rec)
    nitems = PySequence_Fast_GET_SIZE(rec) - 1
    cdef int kind = _kind_of(<object>items[0])
    _check_shape(kind, nitems, <object>items[1] if nitems > 0 else None,
                 <object>items[2] if nitems > 1 else None)
    n = 3
    for i in range(1, nitems + 1):
        n += _sized(<object>items[i], 1)
    out = PyBytes_FromStringAndSize(NULL, n)
    p = _put_head(PyBytes_AS_STRING(out), kind)
    end = PyBytes_AS_STRING(out) + n
    for i in range(1, nitems + 1):
        p = _written(<object>items[i], p, end)
    if p != end:
        raise RuntimeError("a journal record changed while it was written")
    return out


cdef bytes _encode_rec(str kind, str txid, object body):
    """``_encode((kind, txid, body))`` without building the tuple: the shape
    of the per-transaction records (PREPARED, DECISION, MARK)."""
    cdef Py_ssize_t nt, nb
    cdef int k
    cdef int overflow = 0
    cdef long long x = 0
    cdef bytes out
    cdef char *p
    cdef char *end
    if (kind is None or txid is None or PyUnicode_GET_LENGTH(kind) != 1
            or not PyUnicode_IS_ASCII(txid) or PyUnicode_GET_LENGTH(txid) > _U32_MAX):
        return _encode((kind, txid, body))
    k = PyUnicode_READ_CHAR(kind, 0)
    if k == _K_MARK and PyLong_CheckExact(body):
        x = PyLong_AsLongLongAndOverflow(body, &overflow)  # cannot fail on an int
        if overflow != 0 or x < 0:
            return _encode((kind, txid, body))
        nb = 9
    elif k == _K_PREPARED or (k == _K_DECISION and (PyTuple_Check(body) or PyList_Check(body))):
        nb = _sized(body, 1)
    else:
        return _encode((kind, txid, body))  # checks the shape: raises, or takes it slowly
    nt = PyUnicode_GET_LENGTH(txid)
    out = PyBytes_FromStringAndSize(NULL, 8 + nt + nb)
    p = _put_head(PyBytes_AS_STRING(out), k)
    end = PyBytes_AS_STRING(out) + 8 + nt + nb
    p[0] = _T_STR
    memcpy(_put_u32(p + 1, <uint32_t>nt), PyUnicode_DATA(txid), nt)
    p += 5 + nt
    if k == _K_MARK:
        p[0] = _T_INT64
        p = _put_u64(p + 1, <uint64_t>x)
    else:
        p = _written(body, p, end)
    if p != end:
        raise RuntimeError("a journal record changed while it was written")
    return out


def _encode_record(kind, txid, body):
    """``_encode_rec`` for tests: must equal ``_encode((kind, txid, body))``."""
    return _encode_rec(kind, txid, body)


# ---------------------------------------------------------------------------
# decoding, both formats


cdef struct _Cursor:
    const unsigned char *p     # the next byte to read
    const unsigned char *end   # one past the record's last byte


cdef inline const unsigned char *_take(_Cursor *c, Py_ssize_t n) except NULL:
    """The next ``n`` bytes; ValueError if the record ends before them."""
    cdef const unsigned char *q = c.p
    if n < 0 or n > c.end - c.p:
        raise ValueError(f"truncated: {n} more bytes needed, {c.end - c.p} left")
    c.p += n
    return q


cdef inline uint32_t _u32(const unsigned char *q) noexcept:
    return <uint32_t>q[0] | (<uint32_t>q[1] << 8) | (<uint32_t>q[2] << 16) | (<uint32_t>q[3] << 24)


cdef inline uint64_t _u64(const unsigned char *q) noexcept:
    cdef uint64_t v = 0
    cdef int i
    for i in range(8):
        v |= (<uint64_t>q[i]) << (8 * i)
    return v


cdef inline Py_ssize_t _count(_Cursor *c, Py_ssize_t n, Py_ssize_t each) except -1:
    """``n`` (a count of values) if that many can still follow, at ``each`` bytes at least."""
    if n > (c.end - c.p) // each:
        raise ValueError(f"a count of {n} values with {c.end - c.p} bytes left")
    return n


cdef inline object _str_utf8(const unsigned char *q, Py_ssize_t n):
    return PyUnicode_DecodeUTF8(<const char *>q, n, "surrogatepass")


cdef object _read_value(_Cursor *c, int depth):
    """One tagged value of the journal format."""
    cdef const unsigned char *q
    cdef Py_ssize_t n, i
    cdef uint64_t bits
    cdef double d
    cdef list items
    cdef dict dct
    if depth > _MAX_DEPTH:
        raise ValueError(f"values nested deeper than {_MAX_DEPTH} levels")
    cdef int tag = _take(c, 1)[0]
    if tag == _T_STR:
        n = _u32(_take(c, 4))
        return _str_utf8(_take(c, n), n)
    if tag == _T_INT64:
        return <int64_t>_u64(_take(c, 8))
    if tag == _T_NONE:
        return None
    if tag == _T_TUPLE or tag == _T_LIST:
        n = _count(c, _u32(_take(c, 4)), 1)
        items = []
        for i in range(n):
            items.append(_read_value(c, depth + 1))
        return PyList_AsTuple(items) if tag == _T_TUPLE else items
    if tag == _T_BYTES:
        n = _u32(_take(c, 4))
        return PyBytes_FromStringAndSize(<const char *>_take(c, n), n)
    if tag == _T_FALSE:
        return False
    if tag == _T_TRUE:
        return True
    if tag == _T_BIGINT:
        n = _u32(_take(c, 4))
        return int.from_bytes(PyBytes_FromStringAndSize(<const char *>_take(c, n), n),
                              "little", signed=True)
    if tag == _T_FLOAT:
        bits = _u64(_take(c, 8))
        memcpy(&d, &bits, 8)
        return d
    if tag == _T_DICT:
        n = _count(c, _u32(_take(c, 4)), 2)
        dct = {}
        for i in range(n):
            k = _read_value(c, depth + 1)
            v = _read_value(c, depth + 1)
            try:
                dct[k] = v
            except TypeError:
                raise ValueError(f"a dict key of type {type(k).__name__}") from None
        return dct
    raise ValueError(f"unknown value tag 0x{tag:02x}")


cdef tuple _read_record(_Cursor *c, bint coordinator):
    """A journal-format record, from its marker on."""
    cdef const unsigned char *q = _take(c, 3)
    cdef int fmt = q[1]
    cdef int kind = q[2]
    cdef list items
    if fmt != _FORMAT:
        raise ValueError(
            f"journal format {fmt}, and this release reads format {_FORMAT} "
            + ("(the journal was written by a later release: open it with that one)"
               if fmt > _FORMAT else "(no release wrote that format)")
        )
    kstr = (_COORD_KINDS if coordinator else _PART_KINDS).get(kind)
    if kstr is None:
        raise ValueError(f"a {chr(kind)!r} record in a "
                         f"{'coordinator' if coordinator else 'participant'} journal")
    items = [kstr]
    while c.p < c.end and len(items) < 3:
        items.append(_read_value(c, 1))
    if c.p != c.end:
        raise ValueError(f"{c.end - c.p} bytes after the record's items")
    _check_shape(kind, len(items) - 1, items[1] if len(items) > 1 else None,
                 items[2] if len(items) > 2 else None)
    return PyList_AsTuple(items)


# The legacy (marshal) format: type codes as marshal writes them.  Bit 7 of a
# code (FLAG_REF) registers the object for later TYPE_REF back-references,
# numbered in the order objects start.
cdef enum:
    _M_FLAG_REF = 0x80
    _M_NULL = 0x30          # "0": ends a dict
    _M_NONE = 0x4E          # "N"
    _M_FALSE = 0x46         # "F"
    _M_TRUE = 0x54          # "T"
    _M_INT = 0x69           # "i": i32
    _M_LONG = 0x6C          # "l": i32 digit count (sign = sign), 15-bit digits as u16
    _M_FLOAT = 0x67         # "g": f64
    _M_BYTES = 0x73         # "s": i32 n, n bytes
    _M_UNICODE = 0x75       # "u": i32 n, n bytes UTF-8
    _M_INTERNED = 0x74      # "t": as "u"
    _M_ASCII = 0x61         # "a": i32 n, n bytes
    _M_ASCII_INTERNED = 0x41  # "A"
    _M_SHORT_ASCII = 0x7A   # "z": u8 n, n bytes
    _M_SHORT_ASCII_INTERNED = 0x5A  # "Z"
    _M_TUPLE = 0x28         # "(": i32 n, n values
    _M_SMALL_TUPLE = 0x29   # ")": u8 n, n values
    _M_LIST = 0x5B          # "[": i32 n, n values
    _M_DICT = 0x7B          # "{": key, value pairs up to "0"
    _M_REF = 0x72           # "r": i32 index of a registered object

cdef object _PENDING = object()   # a registered container still being read


cdef inline Py_ssize_t _m_len(_Cursor *c) except -1:
    cdef int32_t n = <int32_t>_u32(_take(c, 4))
    if n < 0:
        raise ValueError(f"negative length {n}")
    return n


cdef object _m_long(_Cursor *c):
    """marshal's "l": an int of 15-bit digits, least significant first."""
    cdef int32_t sn = <int32_t>_u32(_take(c, 4))
    cdef Py_ssize_t n = -(<Py_ssize_t>sn) if sn < 0 else sn
    cdef Py_ssize_t i, j = 0
    cdef uint32_t digit
    cdef uint64_t acc = 0
    cdef int nbits = 0
    _count(c, n, 2)
    cdef const unsigned char *q = _take(c, 2 * n)
    cdef bytearray mag = bytearray((15 * n + 7) // 8)
    cdef unsigned char *out = <unsigned char *>PyByteArray_AS_STRING(mag)
    for i in range(n):
        digit = q[2 * i] | (<uint32_t>q[2 * i + 1] << 8)
        if digit > 0x7FFF or (digit == 0 and i == n - 1):
            raise ValueError("bad long digits")
        acc |= (<uint64_t>digit) << nbits
        nbits += 15
        while nbits >= 8:
            out[j] = <unsigned char>(acc & 0xFF)
            j += 1
            acc >>= 8
            nbits -= 8
    if nbits > 0:
        out[j] = <unsigned char>acc
    v = int.from_bytes(mag, "little")
    return -v if sn < 0 else v


cdef object _legacy_value(_Cursor *c, list refs, int depth):
    """One value of marshal data, limited to the types journal records held."""
    cdef const unsigned char *q
    cdef Py_ssize_t n, i, slot = -1
    cdef uint64_t bits
    cdef double d
    cdef list items
    cdef dict dct
    cdef int32_t ref
    if depth > _MAX_DEPTH:
        raise ValueError(f"values nested deeper than {_MAX_DEPTH} levels")
    cdef int code = _take(c, 1)[0]
    cdef bint flag = (code & _M_FLAG_REF) != 0
    code &= ~_M_FLAG_REF
    if code == _M_NONE or code == _M_FALSE or code == _M_TRUE or code == _M_REF:
        if flag:
            raise ValueError(f"reference flag on type code {chr(code)!r}")
        if code == _M_NONE:
            return None
        if code == _M_REF:
            ref = <int32_t>_u32(_take(c, 4))
            if ref < 0 or ref >= len(refs) or refs[ref] is _PENDING:
                raise ValueError(f"bad back-reference {ref}")
            return refs[ref]
        return code == _M_TRUE
    if flag:
        slot = len(refs)
        refs.append(_PENDING)
    if code == _M_INT:
        v = <int32_t>_u32(_take(c, 4))
    elif code == _M_LONG:
        v = _m_long(c)
    elif code == _M_FLOAT:
        bits = _u64(_take(c, 8))
        memcpy(&d, &bits, 8)
        v = d
    elif code == _M_BYTES:
        n = _m_len(c)
        v = PyBytes_FromStringAndSize(<const char *>_take(c, n), n)
    elif code == _M_UNICODE or code == _M_INTERNED:
        n = _m_len(c)
        v = _str_utf8(_take(c, n), n)
    elif code == _M_ASCII or code == _M_ASCII_INTERNED:
        n = _m_len(c)
        v = PyUnicode_DecodeLatin1(<const char *>_take(c, n), n, NULL)
    elif code == _M_SHORT_ASCII or code == _M_SHORT_ASCII_INTERNED:
        n = _take(c, 1)[0]
        v = PyUnicode_DecodeLatin1(<const char *>_take(c, n), n, NULL)
    elif code == _M_TUPLE or code == _M_SMALL_TUPLE or code == _M_LIST:
        n = _take(c, 1)[0] if code == _M_SMALL_TUPLE else _m_len(c)
        _count(c, n, 1)
        items = []
        for i in range(n):
            items.append(_legacy_value(c, refs, depth + 1))
        v = items if code == _M_LIST else PyList_AsTuple(items)
    elif code == _M_DICT:
        dct = {}
        while _take(c, 1)[0] != _M_NULL:
            c.p -= 1  # (the byte was a value's code)
            k = _legacy_value(c, refs, depth + 1)
            val = _legacy_value(c, refs, depth + 1)
            try:
                dct[k] = val
            except TypeError:
                raise ValueError(f"a dict key of type {type(k).__name__}") from None
        v = dct
    else:
        raise ValueError(f"marshal type code {chr(code)!r} (0x{code:02x}), "
                         "which no journal record holds")
    if slot >= 0:
        refs[slot] = v
    return v


cdef tuple _read_legacy(_Cursor *c, bint coordinator):
    """A record written in marshal format by a release before the journal format."""
    cdef list refs = []
    rec = _legacy_value(c, refs, 0)
    if c.p != c.end:
        raise ValueError(f"{c.end - c.p} bytes after the record")
    if type(rec) is not tuple or len(<tuple>rec) == 0:
        raise ValueError("not a journal record (a tuple led by its kind)")
    kstr = (_LEGACY_COORD_KINDS if coordinator else _LEGACY_PART_KINDS).get(rec[0])
    if kstr is None:
        raise ValueError(f"a {rec[0]!r} record in a "
                         f"{'coordinator' if coordinator else 'participant'} journal")
    n = len(<tuple>rec) - 1
    _check_shape(_kind_of(kstr), n, rec[1] if n > 0 else None, rec[2] if n > 1 else None)
    return (kstr,) + rec[1:]


def _decode_record(raw, bint coordinator):
    """The record tuple in ``raw`` (one journal record's bytes, in the journal
    format or the marshal format of older releases), from a coordinator's
    journal or a participant's; ValueError saying what is wrong if it is not
    one of that journal's records."""
    cdef Py_buffer view
    cdef _Cursor c
    PyObject_GetBuffer(raw, &view, PyBUF_SIMPLE)
    try:
        if view.len == 0:
            raise ValueError("an empty record")
        c.p = <const unsigned char *>view.buf
        c.end = c.p + view.len
        if c.p[0] == _MARKER:
            return _read_record(&c, coordinator)
        return _read_legacy(&c, coordinator)
    finally:
        PyBuffer_Release(&view)
