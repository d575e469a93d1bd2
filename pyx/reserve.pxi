# _reserve_file: size a file that is about to be memory-mapped *and allocate
# its blocks* (included by ring.pyx, counter.pyx, sched.pyx and log.pyx: one
# source; sched.pyx re-exports it to engine.scheduling as reserve_file).
#
# Why: ftruncate alone leaves the file sparse. When the filesystem has no room
# for a page the first store into it faults with SIGBUS, in the middle of a
# put or append, and the interpreter dies. That happens for real: a container's
# /dev/shm is 64 MiB by default, and a full disk does the same to a log
# segment. With the blocks allocated up front the failure is an OSError
# (ENOSPC) from create / open / the segment roll, where the caller can handle
# it. Filesystems that cannot allocate (no fallocate) get the plain ftruncate.

import errno as _rsv_errno
import mmap as _rsv_mmap
import os as _rsv_os


cdef _reserve_file(int fd, Py_ssize_t size):
    """Grow the file at fd to at least `size` bytes, blocks allocated; OSError
    (ENOSPC) when they do not fit."""
    try:
        _rsv_os.posix_fallocate(fd, 0, size)
    except AttributeError:  # no posix_fallocate on this platform (macOS)
        _rsv_os.ftruncate(fd, size)
    except OSError as exc:
        if exc.errno not in (_rsv_errno.EOPNOTSUPP, _rsv_errno.EINVAL, _rsv_errno.ENOSYS):
            raise
        _rsv_os.ftruncate(fd, size)


cdef object _create_mapped(str path, Py_ssize_t size, int flags):
    """Create the shared region file `path` (mode 0600, refusing one that
    exists), allocate its `size` bytes and map them with mmap `flags`; on any
    failure the file is removed again.  Returns the mmap."""
    fd = _rsv_os.open(path, _rsv_os.O_RDWR | _rsv_os.O_CREAT | _rsv_os.O_EXCL | _rsv_os.O_CLOEXEC, 0o600)
    try:
        _rsv_os.fchmod(fd, 0o600)  # umask may only have removed bits; be explicit
        _reserve_file(fd, size)  # ENOSPC here, not SIGBUS in a put
        return _rsv_mmap.mmap(fd, size, flags=flags)
    except BaseException:
        try:
            _rsv_os.unlink(path)
        except OSError:
            pass
        raise
    finally:
        _rsv_os.close(fd)
