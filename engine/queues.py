"""Drop-in replacements for ``multiprocessing.Queue``, ``JoinableQueue`` and
``SimpleQueue``, on a shared-memory queue (``engine._mpq``).

Migrating is one import::

    from engine import Queue            # was: from multiprocessing import Queue
    q = Queue(maxsize=1000)             # capacity= sets the shared region's bytes
    Process(target=work, args=(q,)).start()
    q.put(("job", 1)); q.get(timeout=1.0)

What the classes add over multiprocessing's: ``put_many``/``get_many``
(faster-fifo's), ``aput``/``aget`` for asyncio, and robustness: a producer
or consumer killed in the middle of a call never wedges the queue nor
corrupts a message (see ``pyx/mpq.pyx``).

Where they differ (the documented part of the contract):

* ``put`` is synchronous: the message is in shared memory when it returns
  (multiprocessing hands it to a feeder thread), so there is no feeder
  thread to flush, ``join_thread``/``cancel_join_thread`` have nothing to
  wait for, and ``empty()`` is true/false at once after ``put``.
* The region holds ``capacity`` bytes (default 16 MiB): ``put`` waits for
  room when it is full even with ``maxsize=0`` (multiprocessing buffers
  without limit in the feeder thread), and a message larger than half of
  ``capacity`` is a ``ValueError``.
* A handle pickles anywhere (not only while spawning a process): the copy
  re-attaches to the region by name.  The region lives while its creating
  ``Queue`` object lives in the creating process (and never beyond the
  creating program: a resource tracker removes it after a SIGKILL), so keep
  the creator referenced while other processes still attach.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from multiprocessing.util import Finalize
from queue import Empty, Full
from typing import Any, Optional

from ._mpq import SHM_DIR, QueueCore

__all__ = ["Queue", "JoinableQueue", "SimpleQueue", "Empty", "Full", "DEFAULT_CAPACITY"]

DEFAULT_CAPACITY = 16 << 20
# an awaiting aget/aput sleeps in a worker thread at most this long per turn,
# so cancelling it never waits longer
_ASYNC_SLICE = 0.05
_PREFIX = "eq-"


def _new_name() -> str:
    return f"{_PREFIX}{os.getpid()}-{secrets.token_hex(8)}"


def _track(name: str) -> None:
    """Let multiprocessing's resource tracker remove the region if this
    program dies without doing it (SIGKILL included)."""
    from multiprocessing import resource_tracker

    resource_tracker.register("/" + name, "shared_memory")


def _release(name: str, creator: int) -> None:
    """Remove the region when its creator's handle goes (creator process only:
    a forked child's copy of the handle must not remove the parent's queue)."""
    if os.getpid() != creator:
        return
    try:
        os.unlink(os.path.join(SHM_DIR, name))
    except FileNotFoundError:
        pass
    from multiprocessing import resource_tracker

    try:
        resource_tracker.unregister("/" + name, "shared_memory")
    except Exception:  # the tracker is gone at interpreter exit; it has nothing to do then
        pass


def _rebuild(cls: Any, name: str) -> Any:
    """Unpickle a handle: attach to the region by name."""
    q = cls.__new__(cls)
    q._attach(name)
    q._finalizer = None
    return q


class Queue(QueueCore):
    """A process- and thread-safe FIFO of Python objects, with
    ``multiprocessing.Queue``'s interface.

    ``maxsize`` > 0 bounds the number of queued messages; ``capacity`` is the
    shared region's size in bytes (rounded up to a power of two; the largest
    message is half of it).  ``ctx`` is accepted for signature compatibility
    and ignored.

    >>> q = Queue()
    >>> q.put({"id": 1}); q.get()
    {'id': 1}
    """

    _FLAVOUR = "queue"

    def __init__(self, maxsize: int = 0, *, capacity: int = DEFAULT_CAPACITY, ctx: Any = None) -> None:
        if not isinstance(maxsize, int) or isinstance(maxsize, bool):
            raise TypeError(f"maxsize must be an int, got {type(maxsize).__name__}")
        if not isinstance(capacity, int) or isinstance(capacity, bool):
            raise TypeError(f"capacity must be an int (bytes), got {type(capacity).__name__}")
        name = _new_name()
        self._create(name, capacity, max(maxsize, 0), self._FLAVOUR)
        try:
            _track(name)
        except BaseException:
            _release(name, os.getpid())
            raise
        # multiprocessing's Finalize, not weakref.finalize: it also runs when a
        # multiprocessing child that created a queue exits (os._exit skips atexit)
        self._finalizer: Optional[Finalize] = Finalize(self, _release, args=(name, os.getpid()),
                                                       exitpriority=-10)

    def __reduce__(self) -> Any:
        return (_rebuild, (type(self), self._name))

    def __repr__(self) -> str:
        return f"<engine.{type(self).__name__} {self._name} maxsize={self._maxsize_value}>"

    @property
    def name(self) -> str:
        """The region's name (a file under /dev/shm while the creator lives)."""
        return str(self._name)

    @property
    def capacity(self) -> int:
        """The shared region's data bytes."""
        return int(self._capacity)

    @property
    def maxsize(self) -> int:
        """The message count limit (0: none)."""
        return int(self._maxsize_value)

    def close(self) -> None:
        """No more puts or gets through this handle (``ValueError`` after);
        other handles, in this process or others, keep working."""
        self._mark_closed()

    def join_thread(self) -> None:
        """Nothing to wait for (puts are synchronous); like multiprocessing,
        only allowed after ``close()``."""
        assert self._closed, f"Queue {self!r} not closed"

    def cancel_join_thread(self) -> None:
        """A no-op: no feeder thread holds unsent messages."""

    def stats(self) -> dict:
        """Counters of the shared region: capacity, used bytes, messages put and
        got, lock takeovers from dead holders."""
        return dict(self._stats())

    def __enter__(self) -> Queue:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    async def aget(self, timeout: Optional[float] = None) -> Any:
        """Await a message without blocking the event loop (``queue.Empty``
        after ``timeout`` s).  Cancel-safe: the message is taken in the loop
        thread, never by the helper thread that waits."""
        deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
        loop = asyncio.get_running_loop()
        while True:
            try:
                return self.get_nowait()
            except Empty:
                pass
            left = _ASYNC_SLICE if deadline is None else min(_ASYNC_SLICE, deadline - time.monotonic())
            if left <= 0:
                raise Empty
            await loop.run_in_executor(None, self._wait_readable, left)

    async def aput(self, obj: Any, timeout: Optional[float] = None) -> None:
        """Await room and put ``obj`` without blocking the event loop
        (``queue.Full`` after ``timeout`` s)."""
        deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
        loop = asyncio.get_running_loop()
        need = None
        while True:
            try:
                return self.put_nowait(obj)
            except Full:
                pass
            if need is None:
                need = self._record_bytes(obj)
            left = _ASYNC_SLICE if deadline is None else min(_ASYNC_SLICE, deadline - time.monotonic())
            if left <= 0:
                raise Full
            await loop.run_in_executor(None, self._wait_writable, left, need)


class JoinableQueue(Queue):
    """``multiprocessing.JoinableQueue``: a :class:`Queue` that counts
    unfinished tasks (every ``put`` adds one, ``task_done`` removes one) and
    whose ``join`` waits for none to be left."""

    _FLAVOUR = "joinable"

    def task_done(self) -> None:
        """Mark one message got earlier as processed (``ValueError`` if called
        more times than messages were put)."""
        self._task_done()

    def join(self) -> None:
        """Block until every message put has been marked done."""
        self._join(None)


class SimpleQueue(Queue):
    """``multiprocessing.SimpleQueue``: ``put``, ``get``, ``empty``, ``close``
    (the full :class:`Queue` interface is there too)."""

    _FLAVOUR = "simple"

    def __init__(self, *, capacity: int = DEFAULT_CAPACITY, ctx: Any = None) -> None:
        super().__init__(0, capacity=capacity, ctx=ctx)

