"""File-system helpers every durable object shares: one durability check, one
full write, one directory fsync, one durable directory creation and one atomic
file replacement.

An atomic write leaves the file either old or new, never torn: the data goes
to a temp file in the same directory (named for this process and thread, so
concurrent writers never share one), is written whole (a short write is
retried, a write that makes no progress is ``ENOSPC``), fsynced, renamed over
the target, and the directory is fsynced so the rename itself survives a
power loss.  On any failure the temp file is removed: a full disk must not
also keep the half-written temp.
"""

from __future__ import annotations

import errno
import os
import threading
from typing import Iterable, Literal, Union

__all__ = [
    "DURABILITIES",
    "Durability",
    "atomic_write",
    "check_durability",
    "fsync_dir",
    "make_dirs",
    "write_all",
]

Durability = Literal["always", "interval", "none"]
DURABILITIES = ("always", "interval", "none")

BytesLike = Union[bytes, bytearray, memoryview]


def check_durability(durability: object) -> str:
    """``durability`` if it is one of :data:`DURABILITIES`; ``TypeError`` for
    a non-string, ``ValueError`` naming the choices otherwise."""
    if not isinstance(durability, str):
        raise TypeError(f"durability must be a str, not {type(durability).__name__}")
    if durability not in DURABILITIES:
        raise ValueError(f"durability must be 'always', 'interval' or 'none', not {durability!r}")
    return durability


def write_all(fd: int, data: BytesLike) -> None:
    """Write every byte of ``data`` to ``fd``, retrying short writes."""
    view = memoryview(data).cast("B")
    while view:
        n = os.write(fd, view)
        if n <= 0:
            raise OSError(errno.ENOSPC, "write made no progress")
        view = view[n:]


def fsync_dir(path: str) -> None:
    """fsync the directory ``path``, so the names in it (a create, a rename,
    an unlink) survive a power loss."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: str, mode: int = 0o700) -> list[str]:
    """Create the directory ``path`` and its missing parents (no error if it
    exists) and fsync the parent of each directory created, so the new names
    survive a power loss.  If one of those fsyncs fails, the directories this
    call created are removed again before the error is raised: a retry then
    creates and syncs them anew, instead of finding them present but never
    made durable.  Returns the directories created, deepest first."""
    made: list[str] = []
    d = os.path.abspath(path)
    while not os.path.isdir(d):
        made.append(d)
        d = os.path.dirname(d)
    os.makedirs(path, mode=mode, exist_ok=True)
    try:
        for d in made:
            fsync_dir(os.path.dirname(d))
    except BaseException:
        for d in made:
            try:
                os.rmdir(d)
            except OSError:
                pass
        raise
    return made


def atomic_write(
    directory: str, name: str, data: Union[BytesLike, Iterable[BytesLike]], durable: bool = True
) -> str:
    """Replace ``directory/name`` with ``data`` (bytes, or an iterable of
    chunks written in order) atomically; with ``durable`` it is on stable
    storage when this returns.  Returns the file's path."""
    final = os.path.join(directory, name)
    tmp = os.path.join(directory, f".{name}.{os.getpid()}.{threading.get_ident()}.tmp")
    chunks = (data,) if isinstance(data, (bytes, bytearray, memoryview)) else data
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            for chunk in chunks:
                write_all(fd, chunk)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if durable:
        fsync_dir(directory)
    return final
