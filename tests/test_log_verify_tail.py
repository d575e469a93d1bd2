"""verify() checks that every byte of a segment after its last record is
zero.  The part of that tail not in the page cache (a new segment's
preallocated space, a log at rest after a reboot) is read around the cache,
from its end back: whatever the bytes, cached or not, the result is the one
the whole-image scan gives, and the never-written tail is not pulled into
the page cache."""

import ctypes
import mmap
import os
import random
import sys

import faultkit
import pytest

import engine
from engine import _log

SEG = 8 << 20  # a tail of several MiB past a few records


def _segments(d):
    return sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".seg"))


def _fields(r):
    return (r.records, r.next_offset, r.end_position, r.sealed, r.error, r.error_position)


def _write(d, n=2000, segment_bytes=SEG):
    with engine.Log(d, durability="none", segment_bytes=segment_bytes) as log:
        for i in range(n):
            log.append(b"%06d" % i * 10)
    segs = _segments(d)
    assert len(segs) == 1
    return segs[0]


def _drop_cache(path):
    """Write the file's pages back and drop them from the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _put(path, at, data):
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, at)
    finally:
        os.close(fd)


def _whole(path):
    with open(path, "rb") as f:
        return _log.scan_segment(f.read())


def _resident_pages(path, start, end):
    """How many pages of [start, end) are in the page cache (mincore of a
    mapping never touched)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                          ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    n = (end - start) // mmap.PAGESIZE
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, end - start, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
        assert addr not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
    finally:
        os.close(fd)
    try:
        vec = (ctypes.c_ubyte * n)()
        assert libc.mincore(addr, end - start, vec) == 0, ctypes.get_errno()
        return sum(v & 1 for v in vec)
    finally:
        libc.munmap(addr, end - start)


def _portable_build():
    # the build of the portable fallbacks (.ci/portable exports it) reads tails the plain way
    return os.environ.get("ENGINE_PORTABLE", "0") not in ("", "0")


def _direct_io_here(path):
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    except OSError:
        return False
    os.close(fd)
    return hasattr(os, "O_DIRECT")


@pytest.mark.parametrize("where", [0.02, 0.5, 0.97, 1.0])
def test_a_stray_byte_on_disk_in_the_uncached_tail_is_found(tmp_path, where):
    d = str(tmp_path / "log")
    seg = _write(d)
    end = _whole(seg).end_position
    at = end + int((SEG - end - 1) * where)
    _put(seg, at, b"\x01")
    _drop_cache(seg)
    res = _log.verify(d)  # first: the whole-image read below caches every page
    whole = _whole(seg)
    assert whole.error is not None and whole.error_position == end
    assert _fields(res[0]) == _fields(whole)


def test_a_clean_uncached_tail_is_clean(tmp_path):
    d = str(tmp_path / "log")
    seg = _write(d)
    _drop_cache(seg)
    res = _log.verify(d)
    assert res[0].error is None and res[0].records == 2000
    assert _fields(res[0]) == _fields(_whole(seg))


def test_stray_bytes_in_partly_cached_tails_agree_with_the_whole_scan(tmp_path):
    """Random stray bytes; random pages of the tail read into the cache
    again (a window with some cached page is read the plain way)."""
    rng = random.Random(11)
    for i in range(12):
        d = str(tmp_path / f"log{i}")
        seg = _write(d, n=rng.choice([1, 500, 3000]))
        end = _whole(seg).end_position
        for _ in range(rng.choice([0, 0, 1, 3])):
            _put(seg, rng.randrange(end, SEG), bytes([rng.randrange(1, 256)]))
        _drop_cache(seg)
        with open(seg, "rb") as f:
            for _ in range(rng.randrange(0, 6)):
                f.seek(rng.randrange(0, SEG))
                f.read(rng.choice([1, 5000, 300_000]))
        res = _log.verify(d)
        assert _fields(res[0]) == _fields(_whole(seg)), i


def test_a_tail_that_is_not_whole_pages(tmp_path):
    """A segment whose size is no multiple of a page: its last bytes are
    checked too (a stray one among them is found)."""
    d = str(tmp_path / "log")
    seg = _write(d, segment_bytes=SEG - 4096 * 7 - 13)
    size = os.path.getsize(seg)
    assert size % 4096
    _drop_cache(seg)
    res = _log.verify(d)
    assert res[0].error is None
    assert _fields(res[0]) == _fields(_whole(seg))
    _put(seg, size - 1, b"\x07")
    _drop_cache(seg)
    res = _log.verify(d)
    whole = _whole(seg)
    assert whole.error is not None
    assert _fields(res[0]) == _fields(whole)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads around the page cache on Linux")
def test_the_never_written_tail_stays_out_of_the_page_cache(tmp_path):
    d = str(tmp_path / "log")
    seg = _write(d, segment_bytes=64 << 20)
    if _portable_build() or not _direct_io_here(seg) or mmap.PAGESIZE != 4096:
        # the portable build, or a filesystem that takes no O_DIRECT: the
        # tail is read the plain way (checked above); nothing to say about
        # the cache
        assert _log.verify(d)[0].error is None
        return
    _drop_cache(seg)
    end = _whole(seg).end_position  # caches the records (and the tail) again
    _drop_cache(seg)
    res = _log.verify(d)
    assert res[0].error is None
    # the records are read the plain way, with the kernel's readahead past
    # them (up to its window: a few MiB); the rest of the 64 MiB tail is not
    # cached by the check (a plain read caches all of it)
    lo = (end + 4095) // 4096 * 4096
    tail_pages = ((64 << 20) - lo) // 4096
    assert _resident_pages(seg, lo, 64 << 20) < tail_pages // 3


VERIFY_UNDER_FAULT = """
import os
from engine import _log
for p in {segs!r}:
    fd = os.open(p, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
arm()
res = _log.verify({d!r}, threads=1)
disarm()
report([r.error for r in res])
"""


@pytest.mark.skipif(not faultkit.available(), reason="needs Linux and a C compiler")
@pytest.mark.parametrize("sticky", [True, False])
def test_a_read_error_anywhere_in_the_tail_is_reported_or_read_again(tmp_path, sticky):
    """EIO on each read verify makes in turn (cached-around or not): never a
    crash, never a false finding; a lasting error (a damaged sector) is
    reported as unreadable, a passing one is read again by the plain check."""
    d = str(tmp_path / "log")
    with engine.Log(d, durability="none", segment_bytes=1 << 20) as log:
        for i in range(25000):
            log.append(b"%06d" % i * 10)
    segs = _segments(d)
    assert len(segs) == 3
    for p in segs:
        _drop_cache(p)
    src = VERIFY_UNDER_FAULT.format(d=d, segs=segs)
    n = faultkit.run(src, prefix=str(tmp_path)).counts.get("pread", 0)
    assert n >= 10
    for k in range(1, n + 1):
        res = faultkit.run(src, prefix=str(tmp_path), func="pread", nth=k, err="EIO", sticky=sticky)
        assert res.rc == 0, (k, res.stderr[-2000:])
        errors = [e for e in res.report if e is not None]
        assert all("unreadable" in e and "Input/output error" in e for e in errors), (k, errors)
        if sticky:
            assert errors, k
