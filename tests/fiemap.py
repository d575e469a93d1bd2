"""FIEMAP for tests: which byte ranges of a file are unwritten (preallocated)
extents.  Linux only (ext4, xfs and others that report extents)."""

import array
import fcntl
import os

FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_UNWRITTEN = 0x800


def extents(path, sync=True):
    """(logical, length, flags) of every extent of `path`.  ``sync``: write
    the file's dirty pages back first (FIEMAP_FLAG_SYNC), so that what the
    page cache holds counts; without it, only what reached the disk."""
    out = []
    start = 0
    with open(path, "rb") as f:
        while True:
            n = 64
            buf = bytearray(32 + 56 * n)
            array_ = array.array("B", buf)
            flag = FIEMAP_FLAG_SYNC if sync else 0
            hdr = (
                start.to_bytes(8, "little")
                + (2**64 - 1 - start).to_bytes(8, "little")
                + flag.to_bytes(4, "little")
                + (0).to_bytes(4, "little")
                + n.to_bytes(4, "little")
                + (0).to_bytes(4, "little")
            )
            array_[:32] = array.array("B", hdr)
            fcntl.ioctl(f.fileno(), FS_IOC_FIEMAP, array_, True)
            got = int.from_bytes(bytes(array_[20:24]), "little")
            if got == 0:
                return out
            last = False
            for i in range(got):
                e = bytes(array_[32 + 56 * i : 32 + 56 * (i + 1)])
                logical = int.from_bytes(e[0:8], "little")
                length = int.from_bytes(e[16:24], "little")
                flags = int.from_bytes(e[40:44], "little")
                out.append((logical, length, flags))
                last = bool(flags & 0x1)  # FIEMAP_EXTENT_LAST
                start = logical + length
            if last:
                return out


def unwritten_in(path, lo, hi, sync=True):
    """Bytes of [lo, hi) of `path` that are unwritten (preallocated) extents."""
    n = 0
    for logical, length, flags in extents(path, sync):
        if flags & FIEMAP_EXTENT_UNWRITTEN:
            n += max(0, min(hi, logical + length) - max(lo, logical))
    return n


def has_unwritten_extents(d):
    """The file system under `d` keeps fallocated blocks as unwritten extents
    (ext4, xfs): the only place where initialising them can pay."""
    p = os.path.join(d, ".probe")
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.posix_fallocate(fd, 0, 1 << 20)
        try:
            return unwritten_in(p, 0, 1 << 20) > 0
        except OSError:
            return False
    finally:
        os.close(fd)
        os.unlink(p)
