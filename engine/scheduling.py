"""Scheduling over rings: priority levels, key-ordered partitions, delayed delivery.

:class:`PriorityQueue`
    One ring per level (0 = most urgent, as in :class:`queue.PriorityQueue`).
    ``policy="strict"`` always serves the most urgent non-empty level;
    ``policy="weighted"`` shares service by ``weights[i]`` (deficit round robin
    by message count, or by payload bytes with ``by="bytes"``: each visit
    gives level i ``weights[i] * quantum`` bytes of credit, heads are read
    ahead to know their size). ``max_wait=seconds`` adds aging: every level
    message carries its enqueue time in an 8-byte header, and the head of a
    level 1..n-1 that has waited ``max_wait / 2`` is served before anything
    else (the longest-waiting first), so no message waits longer than ``max_wait`` behind a flood of more urgent ones
    as long as the consumer keeps up with the less urgent levels themselves
    (the bound the tests measure). Level 0 does not age: nothing outranks it,
    and aging its own backlog would turn an overloaded queue into one FIFO.

:class:`KeyedQueue`
    One ring per partition; ``put(msg, key=k)`` sends equal keys to the same
    partition (a hash that is the same in every process), so they are consumed
    in order, by one consumer per partition at a time (Kafka partitions).
    Consumers (``kq.consumer()``, in any process) form a group; see
    :class:`KeyedConsumer` for the rebalancing protocol.

Delayed delivery (both): ``put(msg, delay=seconds)`` or ``put(msg, at=t)``
with ``t`` a :func:`time.time` wall-clock time. The message travels in a
separate delay ring with its due time (CLOCK_MONOTONIC, converted from the
wall clock at put time); the consumer keeps it in a heap, invisible, and
serves it by its level as soon as it is due. It is never early (the wall
clock is read before the monotonic one, so rounding only makes it later);
a consumer blocked in ``get`` sleeps exactly until the next due time, so it
is late only by the futex wake-up (well under 10 ms on an idle machine).
``at`` is converted once: a wall-clock step after the put does not move it.

Shared between processes
    ``PriorityQueue.create(name, ...)`` (or ``PriorityQueue(..., name=name)``)
    creates a control region ``/dev/shm/NAME`` (mode 0600: configuration and
    the doorbell every consumer sleeps on) and the rings ``NAME.L0``... and
    ``NAME.delay``; ``PriorityQueue.attach(name)`` in another process reads the
    configuration from the region. The rings are single-producer: one process
    at a time puts (its first ``put`` takes the producer role), and
    ``max_consumers=1`` (default) means one consuming process; with more, the
    level rings use competing consumers (``mode="shared"``, at-most-once
    across a consumer crash, like the ring). ``close_put()`` (or ``close()``
    in the producer) ends the stream: consumers drain, then get ``Closed``.
    ``PriorityQueue.unlink(name)`` removes every file.

Durable
    ``PriorityQueue(..., durable=True, path=DIR)`` keeps one segment log per
    level (``DIR/L0``...) plus ``DIR/delay``: queued messages survive a crash
    or restart. Delivery is at-least-once: ``get`` hands a message out,
    ``ack()`` marks everything this consumer was handed so far as processed
    (a durable group commit per log); whatever was not acked is delivered
    again after a restart. See :class:`DurablePriorityQueue`.
    ``KeyedQueue(..., durable=True, path=DIR)`` keeps a log per partition
    (plus ``DIR/D<p>`` for its delayed messages) with the same consumer-group
    protocol; ``consumer.ack()`` commits (see :class:`DurableKeyedQueue`).
    On both, a delayed message survives a restart with its wall-clock due
    time, and an acked one is not delivered again even when it came due
    before older ones (see :class:`_DelayLog`).

Threads
    A handle's put side and get side may run on two different threads; two
    threads must not call ``get`` on the same handle at once (give each
    consumer thread its own handle: ``attach`` or ``kq.consumer()``).
    ``close()`` from another thread wakes a blocked ``get`` (``Closed``).
"""

from __future__ import annotations

import heapq
import json
import mmap
import os
import struct
import time
from collections import deque
from typing import Any, Callable, Dict, List, Literal, Optional, Sequence, Tuple, overload

from engine.errors import Closed, CorruptLog, EngineError, IncompatibleRegion, LogLocked, Timeout

from ._fsutil import atomic_write, check_durability, write_all
from ._log import _check_segment_bytes
from ._sched import (
    KIND_KEYED,
    KIND_PRIORITY,
    MAX_MEMBERS,
    MAX_PARTS,
    REGION_SIZE,
    _KQCore,
    _PQCore,
    _Region,
    delayed_record,
    now_ns,
    pid_alive,
    reserve_file,
    split_delayed,
    stable_hash,
)
from ._shm import SHM_DIR, region_path

__all__ = ["PriorityQueue", "KeyedQueue", "KeyedConsumer", "DurablePriorityQueue", "DurableKeyedQueue",
           "stable_hash"]

DEFAULT_CAPACITY = 1 << 20
_SUFFIX_ROOM = 20  # room for the suffix of a derived region (NAME.L63, NAME.P1023, NAME.delay)
_REBALANCE_EVERY = 0.05  # s: a busy member re-checks liveness / pending moves this often
_LOG_REREAD = 0.05  # s: a waiting durable queue re-reads its logs (appends ring no bell)


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def _shm_dir() -> str:
    return SHM_DIR


def _check_name(name: Any) -> str:
    return region_path(name, suffix_room=_SUFFIX_ROOM)


def _create_region(name: Optional[str], kind: int, config: Dict[str, Any]) -> _Region:
    blob = json.dumps(config, sort_keys=True).encode()
    if name is None:
        mm = mmap.mmap(-1, REGION_SIZE)  # MAP_SHARED|MAP_ANONYMOUS: futex works on it
        reg = _Region(mm, None)
    else:
        path = _check_name(name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            reserve_file(fd, REGION_SIZE)
            mm = mmap.mmap(fd, REGION_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        os.close(fd)
        reg = _Region(mm, name)
    reg.initialize(kind, blob)
    return reg


def _attach_region(name: str, kind: int) -> Tuple[_Region, Dict[str, Any]]:
    path = _check_name(name)
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        if size != REGION_SIZE:
            raise IncompatibleRegion(name, f"file is {size} bytes, a scheduling region has {REGION_SIZE}")
        mm = mmap.mmap(fd, REGION_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    reg = _Region(mm, name)
    deadline = time.monotonic() + 2.0
    while True:
        blob = reg.validate(kind)
        if blob is not None:
            break
        if time.monotonic() > deadline:
            reg.close()
            raise IncompatibleRegion(name, "the creator never finished initializing it (no magic)")
        time.sleep(0.001)
    try:
        config = json.loads(blob.decode())
        if not isinstance(config, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError) as exc:
        reg.close()
        raise IncompatibleRegion(name, f"configuration is not valid JSON ({exc})") from None
    return reg, config


def _unlink_path(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def _due_ns(delay: Any, at: Any) -> int:
    """Monotonic due time of ``delay``/``at`` (wall clock read first: never early)."""
    wall = time.time_ns()
    now = now_ns()
    if delay is not None and at is not None:
        raise ValueError("give delay or at, not both")
    if delay is not None:
        d = float(delay)
        if d != d:
            raise ValueError("delay must be a number of seconds")
        return now + int(d * 1e9) if d > 0 else now
    a = float(at)
    if a != a:
        raise ValueError("at must be a wall-clock time in seconds (time.time())")
    return now + (int(a * 1e9) - wall)


def _wall_due_ns(delay: Any, at: Any) -> Optional[int]:
    """Wall-clock due time (ns) of ``delay``/``at`` for a durable delay log,
    or None if already due. Stored as wall-clock time because the monotonic
    clock restarts with the machine; never earlier than :func:`_due_ns`."""
    due = _due_ns(delay, at)
    now = now_ns()
    if due <= now:
        return None
    return time.time_ns() + (due - now)  # wall read after mono: only later


def _delay_key(wall_due: int, tag: int) -> bytes:
    """The key of a durable delay-log record: wall due (i64) + level/partition (u32)."""
    return wall_due.to_bytes(8, "little", signed=True) + tag.to_bytes(4, "little")


def _validate_policy(levels: Any, policy: Any, weights: Any, max_wait: Any) -> Tuple[int, str, Optional[List[int]], float]:
    if not isinstance(levels, int) or isinstance(levels, bool) or not 1 <= levels <= 64:
        raise ValueError(f"levels must be an int 1..64, not {levels!r}")
    if policy not in ("strict", "weighted"):
        raise ValueError(f"policy must be 'strict' or 'weighted', not {policy!r}")
    w: Optional[List[int]] = None
    if weights is not None:
        w = [int(x) for x in weights]
        if len(w) != levels or any(x < 1 for x in w):
            raise ValueError(f"weights must be {levels} positive integers (weights[i] for level i), not {weights!r}")
    elif policy == "weighted":
        # default: each level twice the share of the next
        w = [1 << (levels - 1 - i) for i in range(levels)]
    mw = 0.0
    if max_wait is not None:
        mw = float(max_wait)
        if not mw > 0 or mw != mw:
            raise ValueError(f"max_wait must be a positive number of seconds, not {max_wait!r}")
    return levels, policy, w, mw


def _validate_by(by: Any, policy: str, quantum: Any) -> None:
    if by not in ("count", "bytes"):
        raise ValueError(f"by must be 'count' or 'bytes', not {by!r}")
    if by == "bytes" and policy != "weighted":
        raise ValueError("by='bytes' shares service by payload bytes: it needs policy='weighted'")
    if not isinstance(quantum, int) or isinstance(quantum, bool) or not 1 <= quantum <= 1 << 30:
        raise ValueError(f"quantum must be 1..2**30 bytes, not {quantum!r}")


def _aging_threshold(max_wait: float) -> float:
    """Age at which a head is served first: half of max_wait, so the other
    half absorbs the consumer's own delays (a busy machine deschedules it for
    milliseconds) and the bound still holds."""
    return max_wait / 2.0


# ---------------------------------------------------------------------------
# asyncio
# ---------------------------------------------------------------------------


class _Awaitable:
    """``await q.aget()``, ``await q.aget_many(n)``, ``async for msg in q``:
    the consumer side without blocking the event loop (see :mod:`engine.aio`)."""

    def aget(self, timeout: Optional[float] = None) -> Any:
        """Coroutine: the next message (``engine.aio.aget``)."""
        from . import aio

        return aio.aget(self, timeout)

    def aget_many(self, max: int = 1024, timeout: Optional[float] = None) -> Any:
        """Coroutine: up to ``max`` messages, waiting for the first one."""
        from . import aio

        return aio.aget_many(self, max, timeout)

    def __aiter__(self) -> Any:
        """``async for msg in q``: every message until ``Closed``."""
        from . import aio

        return aio.aiter_messages(self)


# ---------------------------------------------------------------------------
# PriorityQueue
# ---------------------------------------------------------------------------


class PriorityQueue(_PQCore, _Awaitable):
    """Priority levels over rings (0 = most urgent).

    >>> pq = PriorityQueue(levels=3)
    >>> pq.put(b"later", priority=2); pq.put(b"now", priority=0)
    >>> pq.get(), pq.get()
    (b'now', b'later')

    Parameters: ``levels`` (1..64); ``policy`` ``"strict"`` or ``"weighted"``;
    ``weights`` (weights[i] for level i, positive ints; weighted default
    2**(levels-1-i)); ``max_wait`` seconds (aging, see the module docs);
    ``by`` ``"count"`` or ``"bytes"`` (weighted: share messages or payload
    bytes; ``quantum`` bytes of credit per visit and unit of weight);
    ``name`` (create a shared queue, see :meth:`create`); ``capacity`` bytes
    per level ring; ``max_consumers`` (consuming processes at once, 1: spsc
    rings); ``durable``/``path``/``durability`` (a :class:`DurablePriorityQueue`).

    Methods: ``put(msg, priority=0, delay=None, at=None)``,
    ``get(timeout=None)``, ``try_get()``, ``get_many(max=1024, timeout=0)``,
    ``close_put()``, ``close()``, ``stats()``; a context manager.
    One producer at a time (the rings are single-producer); put and get may
    run on different threads of one process.
    """

    @overload
    def __new__(cls, levels: int = ..., policy: str = ..., weights: Optional[Sequence[int]] = ...,
                max_wait: Optional[float] = ..., name: Optional[str] = ..., capacity: int = ...,
                durable: Literal[False] = ..., path: Optional[str] = ..., **kw: Any) -> PriorityQueue: ...

    @overload
    def __new__(cls, levels: int = ..., policy: str = ..., weights: Optional[Sequence[int]] = ...,
                max_wait: Optional[float] = ..., name: Optional[str] = ..., capacity: int = ..., *,
                durable: Literal[True], path: str, **kw: Any) -> DurablePriorityQueue: ...

    def __new__(cls, levels: int = 3, policy: str = "strict", weights: Optional[Sequence[int]] = None,
                max_wait: Optional[float] = None, name: Optional[str] = None,
                capacity: int = DEFAULT_CAPACITY, durable: bool = False, path: Optional[str] = None,
                **kw: Any) -> Any:
        if durable and not issubclass(cls, DurablePriorityQueue):
            cls = DurablePriorityQueue  # Python then runs DurablePriorityQueue.__init__
        return super().__new__(cls)

    def __init__(self, levels: int = 3, policy: str = "strict", weights: Optional[Sequence[int]] = None,
                 max_wait: Optional[float] = None, name: Optional[str] = None,
                 capacity: int = DEFAULT_CAPACITY, durable: bool = False, path: Optional[str] = None,
                 max_consumers: int = 1, by: str = "count", quantum: int = 4096) -> None:
        from ._ring import Ring

        levels, policy, w, mw = _validate_policy(levels, policy, weights, max_wait)
        _validate_by(by, policy, quantum)
        if not isinstance(max_consumers, int) or not 1 <= max_consumers <= 256:
            raise ValueError(f"max_consumers must be 1..256, not {max_consumers!r}")
        mode = "spsc" if max_consumers == 1 else "shared"
        config = {"levels": levels, "policy": policy, "weights": w, "max_wait": mw,
                  "capacity": int(capacity), "max_consumers": max_consumers, "by": by,
                  "quantum": int(quantum)}
        self._name = name
        self._rings: List[Any] = []
        self._producers: List[Any] = []
        self._consumers: List[Any] = []
        self._region: Optional[_Region] = None
        self._closed = False
        reg = _create_region(name, KIND_PRIORITY, config)
        try:
            if name is None:
                self._rings = [Ring(capacity, mode=mode, max_consumers=max_consumers) for _ in range(levels + 1)]
            else:
                for ring_name in self._ring_names(name, levels):
                    self._rings.append(Ring.create(ring_name, capacity, mode=mode, max_consumers=max_consumers))
        except BaseException:
            for r in self._rings:
                r.close()
            reg.close()
            if name is not None:
                PriorityQueue.unlink(name)
            raise
        self._setup(reg, config)

    def _setup(self, reg: _Region, config: Dict[str, Any]) -> None:
        self._region = reg
        self._config = config
        mw = float(config["max_wait"])
        self._core_setup(reg, config["levels"], config["policy"], config["weights"],
                         _aging_threshold(mw) if mw > 0 else 0.0,
                         config.get("by", "count") == "bytes", int(config.get("quantum", 4096)))

    @staticmethod
    def _ring_names(name: str, levels: int) -> List[str]:
        return [f"{name}.L{i}" for i in range(levels)] + [f"{name}.delay"]

    @classmethod
    def create(cls, name: str, levels: int = 3, policy: str = "strict",
               weights: Optional[Sequence[int]] = None, max_wait: Optional[float] = None,
               capacity: int = DEFAULT_CAPACITY, max_consumers: int = 1, by: str = "count",
               quantum: int = 4096) -> PriorityQueue:
        """Create a shared queue: region ``/dev/shm/NAME`` + rings ``NAME.L<i>``,
        ``NAME.delay`` (mode 0600). ``FileExistsError`` if NAME exists."""
        return cls(levels, policy, weights, max_wait, name=name, capacity=capacity,
                   max_consumers=max_consumers, by=by, quantum=quantum)

    @classmethod
    def attach(cls, name: str) -> PriorityQueue:
        """Open a queue another process created; its settings come from the
        region (validated: ``IncompatibleRegion`` for anything foreign)."""
        from ._ring import Ring

        reg, config = _attach_region(name, KIND_PRIORITY)
        try:
            levels, policy, w, mw = _validate_policy(config.get("levels"), config.get("policy"),
                                                     config.get("weights"), config.get("max_wait") or None)
            _validate_by(config.get("by", "count"), policy, config.get("quantum", 4096))
        except (ValueError, TypeError) as exc:
            reg.close()
            raise IncompatibleRegion(name, f"bad configuration: {exc}") from None
        self = super().__new__(cls)
        self._name = name
        self._rings = []
        self._producers = []
        self._consumers = []
        self._region = None
        self._closed = False
        try:
            self._rings = [Ring.attach(n) for n in cls._ring_names(name, levels)]
        except BaseException:
            for r in self._rings:
                r.close()
            reg.close()
            raise
        config = dict(config, levels=levels, policy=policy, weights=w, max_wait=mw)
        self._setup(reg, config)
        return self

    @staticmethod
    def unlink(name: str) -> None:
        """Remove a shared queue's region and rings (missing ones are fine)."""
        path = _check_name(name)
        levels = 64
        try:
            reg, config = _attach_region(name, KIND_PRIORITY)
            levels = int(config.get("levels", 64))
            reg.close()
        except (OSError, EngineError, ValueError):
            pass
        d = _shm_dir()
        for rn in PriorityQueue._ring_names(name, max(1, min(levels, 64))):
            _unlink_path(os.path.join(d, rn))
        _unlink_path(path)

    # -- lazily taken roles (a consumer-only process never takes the producer role)
    def _open_producers(self) -> None:
        if self._closed:
            raise Closed("the queue is closed")
        if not self._producers:
            self._producers = [r.producer() for r in self._rings]
        puts = [p.put for p in self._producers]
        self._core_set_producers(puts[:-1], puts[-1])

    def _open_consumers(self) -> None:
        if self._closed:
            raise Closed("the queue is closed")
        if not self._consumers:
            self._consumers = [r.consumer() for r in self._rings]
        cs = self._consumers
        self._core_set_consumers([c.try_get for c in cs[:-1]], [c.get_many for c in cs[:-1]],
                                 cs[-1].get_many)

    @property
    def levels(self) -> int:
        """Number of priority levels."""
        return int(self._config["levels"])

    @property
    def policy(self) -> str:
        """``"strict"`` or ``"weighted"``."""
        return str(self._config["policy"])

    @property
    def name(self) -> Optional[str]:
        """Shared name, or None for a private queue."""
        return self._name

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    def ack(self) -> None:
        """Nothing to acknowledge on a ring-backed queue (a message handed out
        is delivered: at-most-once across a crash); durable queues commit here.
        Present so code written for either kind runs on both."""
        if self._closed:
            raise Closed("the queue is closed")

    def close_put(self) -> None:
        """End the stream from the producer side: consumers (in any process)
        drain what is queued, delayed messages included, then get ``Closed``.
        ``EngineError`` in a process forked after this handle was opened."""
        if self._region is not None and not self._closed:
            self._region.check_fork("queue")
        for p in self._producers:
            p.close()
        if self._region is not None and not self._closed:
            self._region.force_bell()

    def close(self) -> None:
        """Release this handle: closes the producer role if held (so consumers
        drain, then get ``Closed``), the consumer slots and the mappings.
        Shared files stay until :meth:`unlink`. Idempotent. In a process
        forked after this handle was opened, only the handle is released: the
        roles and slots stay with the parent (the ring handles are inert)."""
        if self._closed:
            return
        self._closed = True
        self._core_close()
        for h in self._producers + self._consumers + self._rings:
            try:
                h.close()
            except Exception:  # noqa: BLE001 - best effort, every handle gets its close
                pass
        self._producers, self._consumers = [], []
        if self._region is not None:
            self._region.close()

    def __enter__(self) -> PriorityQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _doorbell(self) -> Tuple[Any, Optional[float]]:
        """What an awaiting ``engine.aio`` call sleeps on: the queue's bell
        (a put or delayed put by any process rings it), until a delayed
        message already held comes due."""
        return self._region, self._due_in()

    def stats(self) -> Dict[str, Any]:
        """Counters of this handle and the rings: per-level put/got, pending
        delayed messages, messages served early by aging, ring usage."""
        puts, gots, aged, held, due = self._core_counts()
        out: Dict[str, Any] = {
            "name": self._name, "levels": self.levels, "policy": self.policy,
            "weights": self._config.get("weights"), "max_wait": self._config.get("max_wait") or None,
            "put": puts, "got": gots, "aged": aged, "delayed_held": held, "due_local": due,
        }
        if not self._closed:
            rs = [r.stats() for r in self._rings]
            out["queued_bytes"] = [s.get("used") for s in rs[:-1]]
            out["delay_ring_bytes"] = rs[-1].get("used")
            out["rings"] = rs
        return out

    def __repr__(self) -> str:
        where = f"name={self._name!r}" if self._name else "private"
        return f"<PriorityQueue {where} levels={self._config['levels']} policy={self._config['policy']}>"


# ---------------------------------------------------------------------------
# KeyedQueue
# ---------------------------------------------------------------------------


class KeyedQueue(_KQCore, _Awaitable):
    """Key-ordered partitions over rings (Kafka partitions, in shared memory).

    >>> kq = KeyedQueue(partitions=4)
    >>> kq.put(b"a1", key="user-1"); kq.put(b"a2", key="user-1")
    >>> c = kq.consumer(); c.get(), c.get()
    (b'a1', b'a2')

    ``put(msg, key=None, delay=None, at=None)``: ``key`` (bytes, str or int;
    or computed by the ``key=`` function given at creation) picks the
    partition with :func:`stable_hash`; equal keys keep their order.
    ``consumer()`` joins the consumer group (up to 64 members); each member
    consumes only the partitions it owns (:class:`KeyedConsumer`).
    One producer at a time. Shared: ``KeyedQueue.create(name, partitions)``
    / ``KeyedQueue.attach(name)`` / ``KeyedQueue.unlink(name)``.
    ``capacity`` is bytes per partition ring (``delay_capacity`` per
    partition delay ring, default capacity / 8, at least 64 KiB);
    ``durable=True, path=DIR`` gives a :class:`DurableKeyedQueue`.
    ``close_put()`` ends the stream: consumers drain, then get ``Closed``.
    """

    @overload
    def __new__(cls, partitions: int = ..., key: Optional[Callable[[Any], Any]] = ...,
                name: Optional[str] = ..., capacity: int = ..., delay_capacity: Optional[int] = ...,
                durable: Literal[False] = ..., path: Optional[str] = ..., **kw: Any) -> KeyedQueue: ...

    @overload
    def __new__(cls, partitions: int = ..., key: Optional[Callable[[Any], Any]] = ...,
                name: Optional[str] = ..., capacity: int = ..., delay_capacity: Optional[int] = ..., *,
                durable: Literal[True], path: str, **kw: Any) -> DurableKeyedQueue: ...

    def __new__(cls, partitions: int = 4, key: Optional[Callable[[Any], Any]] = None,
                name: Optional[str] = None, capacity: int = DEFAULT_CAPACITY,
                delay_capacity: Optional[int] = None, durable: bool = False,
                path: Optional[str] = None, **kw: Any) -> Any:
        if durable and not issubclass(cls, DurableKeyedQueue):
            cls = DurableKeyedQueue  # Python then runs DurableKeyedQueue.__init__
        return super().__new__(cls)

    def __init__(self, partitions: int = 4, key: Optional[Callable[[Any], Any]] = None,
                 name: Optional[str] = None, capacity: int = DEFAULT_CAPACITY,
                 delay_capacity: Optional[int] = None, durable: bool = False,
                 path: Optional[str] = None) -> None:
        from ._ring import Ring

        if not isinstance(partitions, int) or isinstance(partitions, bool) or not 1 <= partitions <= MAX_PARTS:
            raise ValueError(f"partitions must be an int 1..{MAX_PARTS}, not {partitions!r}")
        if key is not None and not callable(key):
            raise TypeError("key must be a function msg -> key, or None")
        dcap = int(delay_capacity) if delay_capacity is not None else max(1 << 16, int(capacity) // 8)
        config = {"partitions": partitions, "capacity": int(capacity), "delay_capacity": dcap}
        self._name = name
        self._rings: List[Any] = []
        self._drings: List[Any] = []
        self._producers: List[Any] = []
        self._dproducers: List[Any] = []
        self._closed = False
        self._default: Optional[KeyedConsumer] = None
        self._members: List[KeyedConsumer] = []
        reg = _create_region(name, KIND_KEYED, config)
        try:
            if name is None:
                self._rings = [Ring(capacity) for _ in range(partitions)]
                self._drings = [Ring(dcap) for _ in range(partitions)]
            else:
                for p in range(partitions):
                    self._rings.append(Ring.create(f"{name}.P{p}", capacity))
                    self._drings.append(Ring.create(f"{name}.D{p}", dcap))
        except BaseException:
            for r in self._rings + self._drings:
                r.close()
            reg.close()
            if name is not None:
                KeyedQueue.unlink(name)
            raise
        self._region = reg
        self._config = config
        self._core_setup(reg, partitions, key)

    @classmethod
    def create(cls, name: str, partitions: int = 4, key: Optional[Callable[[Any], Any]] = None,
               capacity: int = DEFAULT_CAPACITY, delay_capacity: Optional[int] = None) -> KeyedQueue:
        """Create a shared keyed queue (``/dev/shm/NAME`` + ``NAME.P<i>``, ``NAME.D<i>``)."""
        return cls(partitions, key=key, name=name, capacity=capacity, delay_capacity=delay_capacity)

    @classmethod
    def attach(cls, name: str, key: Optional[Callable[[Any], Any]] = None) -> KeyedQueue:
        """Open a keyed queue created elsewhere (the key function, if any, is
        per process: pass the same one)."""
        from ._ring import Ring

        reg, config = _attach_region(name, KIND_KEYED)
        parts = config.get("partitions")
        if not isinstance(parts, int) or not 1 <= parts <= MAX_PARTS:
            reg.close()
            raise IncompatibleRegion(name, f"bad partitions in configuration: {parts!r}")
        self = super().__new__(cls)
        self._name = name
        self._rings, self._drings, self._producers, self._dproducers = [], [], [], []
        self._closed = False
        self._default = None
        self._members = []
        try:
            for p in range(parts):
                self._rings.append(Ring.attach(f"{name}.P{p}"))
                self._drings.append(Ring.attach(f"{name}.D{p}"))
        except BaseException:
            for r in self._rings + self._drings:
                r.close()
            reg.close()
            raise
        self._region = reg
        self._config = config
        self._core_setup(reg, parts, key)
        return self

    @staticmethod
    def unlink(name: str) -> None:
        """Remove a shared keyed queue's region and rings."""
        path = _check_name(name)
        parts = MAX_PARTS
        try:
            reg, config = _attach_region(name, KIND_KEYED)
            parts = int(config.get("partitions", MAX_PARTS))
            reg.close()
        except (OSError, EngineError, ValueError):
            pass
        d = _shm_dir()
        for p in range(max(1, min(parts, MAX_PARTS))):
            _unlink_path(os.path.join(d, f"{name}.P{p}"))
            _unlink_path(os.path.join(d, f"{name}.D{p}"))
        _unlink_path(path)

    @property
    def partitions(self) -> int:
        """Number of partitions."""
        return int(self._config["partitions"])

    @property
    def name(self) -> Optional[str]:
        """Shared name, or None for a private queue."""
        return self._name

    def _open_producers(self) -> None:
        if self._closed:
            raise Closed("the queue is closed")
        if not self._producers:
            self._producers = [r.producer() for r in self._rings]
            self._dproducers = [r.producer() for r in self._drings]
        self._core_set_producers([p.put for p in self._producers])

    def _put_later(self, msg: Any, p: int, delay: Any, at: Any) -> None:
        due = _due_ns(delay, at)
        if not self._producers:
            self._open_producers()
        if due <= now_ns():
            self._producers[p].put(msg)  # already due: an ordinary put, in key order
        else:
            self._dproducers[p].put(delayed_record(due, msg, p))
            self._region.add_delayed()
        self._region.ring_bell()

    def _open_partition(self, p: int) -> _Owned:
        """Open partition p for the member that now owns it."""
        return _Owned(p, self._rings[p].consumer(), self._drings[p].consumer())

    def consumer(self) -> KeyedConsumer:
        """Join the consumer group: a :class:`KeyedConsumer` that owns a share
        of the partitions (rebalanced as members join and leave)."""
        if self._closed:
            raise Closed("the queue is closed")
        c = KeyedConsumer(self)
        self._members.append(c)
        return c

    def _default_consumer(self) -> KeyedConsumer:
        """This handle's default consumer, joined on first use (the get side
        of both the ring-backed and the durable queue)."""
        if self._default is None:
            self._default = self.consumer()
        return self._default

    def get(self, timeout: Optional[float] = None) -> bytes:
        """``get`` of this handle's default consumer (joined on first use)."""
        return self._default_consumer().get(timeout)

    def try_get(self) -> Optional[bytes]:
        """``try_get`` of this handle's default consumer."""
        return self._default_consumer().try_get()

    def get_many(self, max: int = 1024, timeout: Optional[float] = 0) -> List[bytes]:
        """``get_many`` of this handle's default consumer."""
        return self._default_consumer().get_many(max, timeout)

    def ack(self) -> None:
        """``ack`` of this handle's default consumer, if it has one: durable
        queues commit what it was handed; rings have nothing to commit."""
        if self._default is not None:
            self._default.ack()

    def close_put(self) -> None:
        """End the stream: consumers drain their partitions, then get ``Closed``.
        ``EngineError`` in a process forked after this handle was opened."""
        if self._region is not None and not self._closed:
            self._region.check_fork("queue")
            if not self._producers:
                self._open_producers()
            for p in self._producers + self._dproducers:
                p.close()
            self._region.mark_closed()

    def close(self) -> None:
        """Leave the group (every consumer of this handle), give up the
        producer role (ending the stream) and unmap. Idempotent. In a process
        forked after this handle was opened, only the handle is released:
        membership, partitions and the stream stay with the parent."""
        if self._closed:
            return
        for c in list(self._members):
            c.close()
        inherited = self._region is not None and self._region.inherited
        if self._producers and not inherited:
            self.close_put()
        self._closed = True
        self._core_close()
        for h in self._producers + self._dproducers + self._rings + self._drings:
            try:
                h.close()
            except Exception:  # noqa: BLE001
                pass
        if self._region is not None:
            self._region.close()

    def __enter__(self) -> KeyedQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _awaited(self) -> KeyedConsumer:
        """The member an awaiting ``engine.aio`` call reads from: the same
        default member the synchronous get uses."""
        if self._default is None:
            self._default = self.consumer()
        return self._default

    def stats(self) -> Dict[str, Any]:
        """Partition owners, member pids and delivery counts, ring usage."""
        reg = self._region
        out: Dict[str, Any] = {"name": self._name, "partitions": self.partitions,
                               "put": self._put_count}
        if reg is None or self._closed:
            return out
        members = []
        for i in range(MAX_MEMBERS):
            tok, pid, _start, _ns = reg.member(i)
            if tok:
                members.append({"slot": i, "token": tok, "pid": pid, "delivered": reg.member_delivered(i)})
        out["members"] = members
        out["owners"] = [reg.owner(p) for p in range(self.partitions)]
        out["epoch"] = reg.epoch
        out["queued_bytes"] = [r.stats().get("used") for r in self._rings]
        return out

    def __repr__(self) -> str:
        where = f"name={self._name!r}" if self._name else "private"
        return f"<KeyedQueue {where} partitions={self._config['partitions']}>"


def _seconds_until(due_ns: int) -> float:
    """Seconds from now to the monotonic time ``due_ns``; at least 1 us, so
    a wait for something already due still returns at once."""
    return max(1e-6, (due_ns - now_ns()) / 1e9)


def _member_dead(pid: int, start: int, ns: int = 0) -> bool:
    """A group member's process is gone: exited, a zombie, or its pid now
    names another process (a start time that differs from the one recorded).
    pid 0 is a member between its token CAS and its pid store: alive. So is
    a member in another pid namespace (``ns`` known and not ours)."""
    if pid == 0:
        return False
    return not 0 < pid < 1 << 31 or not pid_alive(pid, start, ns)


class _Owned:
    """A partition this member owns: its ring consumers and held delayed messages."""

    __slots__ = ("p", "data", "delay", "try_get", "many", "eof", "deof", "heap", "_seq")

    # True: the delayed messages in ``heap`` exist only in this process, so the
    # partition is handed over only once they are delivered
    holds_delayed = True

    def __init__(self, p: int, data: Any, delay: Any) -> None:
        self.p = p
        self.data = data
        self.delay = delay
        self.try_get = data.try_get
        self.many = data.get_many
        self.eof = False
        self.deof = False
        self.heap: List[Tuple[int, int, bytes]] = []  # heapq (due, tie-breaker, payload)
        self._seq = 0

    def ack(self) -> None:
        """Commit what was handed out (durable partitions); rings have
        nothing to commit (at-most-once across a crash)."""

    def drain_delayed(self) -> None:
        """Move what the delay ring holds into ``heap`` (until it is closed)."""
        if self.deof:
            return
        heap = self.heap
        while True:
            try:
                recs = self.delay.get_many(1024, 0)
            except Closed:
                self.deof = True
                return
            if not recs:
                return
            for rec in recs:
                due, _p, payload = split_delayed(rec)
                self._seq += 1
                heapq.heappush(heap, (due, self._seq, payload))

    def pop_due(self, now: int, room: int, out: List[bytes]) -> int:
        """Append up to ``room`` delayed messages due at ``now`` to ``out``."""
        heap = self.heap
        n = 0
        while heap and heap[0][0] <= now and n < room:
            out.append(heapq.heappop(heap)[2])
            n += 1
        return n


class KeyedConsumer(_Awaitable):
    """One member of a KeyedQueue's consumer group.

    Protocol (all state in the control region, every step an atomic CAS):

    * **join**: CAS a free member slot to a fresh unique token (+ pid); bump
      the group epoch (every member is woken and rebalances).
    * **assignment**: every member computes the same target from the sorted
      tokens of the live members: partition ``p`` -> ``tokens[p % n]``.
    * **release**: a member that owns ``p`` but is no longer its target stops
      reading it (closes its ring slot: the ring keeps the unread rest for the
      next reader), then CASes the owner word ``token -> 0``. A partition with
      delayed messages this member still holds is released once they are
      delivered (they are in this process's memory).
    * **acquire**: the target CASes the owner word ``0 -> token``, or
      ``dead -> token`` when the owner's member slot is gone or its process no
      longer exists; only then does it open the ring. So ownership moves only
      after the previous owner stopped or died, and a key is never read by
      two members at once nor out of order.
    * **leave** (``close``): release every partition, free the slot, bump the
      epoch. **crash** (SIGKILL): any member notices the dead pid within
      ~50 ms while it runs ``get`` (or at its next call), frees the slot and
      bumps the epoch (a killed process counts as dead once its parent
      has reaped it: a zombie still holds its pid). The message the dead
      member had taken but not finished is lost (the ring is at-most-once across a crash); the next
      owner continues right after it, so order is kept.
    """

    def __init__(self, kq: Any) -> None:
        reg = kq._region
        if reg is None:
            raise Closed("the queue is closed")
        self._kq = kq
        self._reg: _Region = reg
        self._np = kq.partitions
        self._pid = os.getpid()
        self._owned: Dict[int, _Owned] = {}
        self._order: List[_Owned] = []
        self._rr = 0
        self._epoch = -1
        self._next_check = 0.0
        self._pending = False
        self._dseen = -1
        self._closed = False
        self._delivered = 0
        self._token = reg.new_token()
        self._slot = -1
        for _ in range(2):
            for i in range(MAX_MEMBERS):
                tok, _pid, _start, _ns = reg.member(i)
                if tok == 0 and reg.claim_member(i, 0, self._token, self._pid):
                    self._slot = i
                    break
            if self._slot >= 0 or not self._reap():
                break
        if self._slot < 0:
            raise EngineError(f"the consumer group is full ({MAX_MEMBERS} members); close a consumer first")
        reg.bump_epoch()

    # -- membership ----------------------------------------------------------
    def _reap(self) -> bool:
        """Free the slots of members whose process died. True if any."""
        reg = self._reg
        reaped = False
        for i in range(MAX_MEMBERS):
            tok, pid, start, ns = reg.member(i)
            if tok and tok != self._token and _member_dead(pid, start, ns):
                if reg.claim_member(i, tok, 0, 0):
                    reaped = True
        if reaped:
            reg.bump_epoch()
        return reaped

    def _gone(self, token: int) -> bool:
        """True if no member holds ``token`` now, or its process is dead.
        Tokens are never reused, so once gone, an owner stays gone."""
        reg = self._reg
        for i in range(MAX_MEMBERS):
            tok, pid, start, ns = reg.member(i)
            if tok == token:
                return tok != self._token and _member_dead(pid, start, ns)
        return True

    def _live(self) -> List[int]:
        reg = self._reg
        toks = []
        for i in range(MAX_MEMBERS):
            tok, _pid, _start, _ns = reg.member(i)
            if tok:
                toks.append(tok)
        toks.sort()
        return toks

    def _rebalance(self) -> None:
        reg = self._reg
        self._epoch = reg.epoch
        self._next_check = time.monotonic() + _REBALANCE_EVERY
        self._reap()
        live = self._live()
        me = self._token
        if me not in live:
            raise EngineError("this consumer was removed from its group (its slot was reaped)")
        n = len(live)
        pending = False
        # release first, so a partner waiting for them can go on
        for p, own in list(self._owned.items()):
            if live[p % n] != me:
                if own.heap and own.holds_delayed:
                    pending = True  # held delayed messages: release once delivered
                    continue
                self._drop(own)
                reg.cas_owner(p, me, 0)
                reg.force_bell()
        for p in range(self._np):
            if live[p % n] != me or p in self._owned:
                continue
            o = reg.owner(p)
            # ``live`` may be stale (a member that joined since owns it now):
            # only a fresh look at the member table may call an owner gone
            if o != 0 and not self._gone(o):
                pending = True  # the previous owner has not released it yet
                continue
            if not reg.cas_owner(p, o, me):
                pending = True
                continue
            try:
                own = self._kq._open_partition(p)
            except BaseException:
                reg.cas_owner(p, me, 0)
                raise
            self._owned[p] = own
        self._order = [self._owned[p] for p in sorted(self._owned)]
        self._pending = pending
        self._dseen = -1  # drain the delay rings of new partitions

    def _drop(self, own: _Owned) -> None:
        del self._owned[own.p]
        own.ack()  # durable: what was handed out counts as processed on a hand-over
        own.data.close()
        own.delay.close()

    def ack(self) -> None:
        """Durable queues: commit everything handed out so far (per owned
        partition, durably); after a crash the next owner re-delivers only
        what was not acked. Ring-backed queues: nothing to do."""
        for own in self._order:
            own.ack()

    @property
    def partitions(self) -> List[int]:
        """The partitions this member owns right now."""
        return sorted(self._owned)

    @property
    def token(self) -> int:
        """This member's unique token (the owner word of its partitions)."""
        return self._token

    # -- consumption -----------------------------------------------------------
    def _maintain(self) -> None:
        if self._closed:
            raise Closed("this consumer is closed")
        reg = self._reg
        reg.check_fork("keyed consumer")
        if reg.epoch != self._epoch or time.monotonic() >= self._next_check:
            self._rebalance()
        d = reg.delayed
        if d != self._dseen:
            self._dseen = d
            for own in self._order:
                own.drain_delayed()

    def _take(self, room: int, out: List[bytes]) -> int:
        order = self._order
        n = len(order)
        got = 0
        if n == 0:
            return 0
        now = -1
        for k in range(n):
            own = order[(self._rr + k) % n]
            if own.heap:
                if now < 0:
                    now = now_ns()
                if own.heap[0][0] <= now:
                    got += own.pop_due(now, room - got, out)
            if got >= room:
                break
            if own.eof:
                continue
            try:
                if room - got == 1:
                    m = own.try_get()
                    if m is not None:
                        out.append(m)
                        got += 1
                else:
                    ms = own.many(room - got, 0)
                    out.extend(ms)
                    got += len(ms)
            except Closed:
                own.eof = True
            if got >= room:
                self._rr = (self._rr + k + 1) % n
                break
        return got

    def _drained(self) -> bool:
        if not self._reg.closed or self._pending:
            return False
        for own in self._order:
            if own.heap or not own.eof or not own.deof:
                return False
        return True

    def _due_in(self) -> Optional[float]:
        """Seconds until the earliest delayed message this member holds comes
        due (None: it holds none). A waiting get sleeps no longer than this;
        so does an awaiting one (``engine.aio``)."""
        due = [own.heap[0][0] for own in self._order if own.heap]
        return _seconds_until(min(due)) if due else None

    def _doorbell(self) -> Tuple[Any, Optional[float]]:
        """What an awaiting ``engine.aio`` call sleeps on: the group's bell,
        for at most the rebalancing tick or until the next delayed message
        is due."""
        due_in = self._due_in()
        return self._reg, (_REBALANCE_EVERY if due_in is None else min(_REBALANCE_EVERY, due_in))

    def get_many(self, max: int = 1024, timeout: Optional[float] = 0) -> List[bytes]:
        """Up to ``max`` messages from the owned partitions (each partition's
        messages in order). ``timeout=0``: never blocks; else waits like ``get``
        for the first, returning ``[]`` on timeout."""
        if max < 1:
            raise ValueError(f"max must be >= 1, not {max}")
        out: List[bytes] = []
        self._maintain()
        self._take(max, out)
        if out:
            self._count(len(out))
            return out
        if timeout is not None and timeout == 0:
            if self._drained():
                raise Closed("the producer closed the queue and every message has been consumed")
            return out
        try:
            out.append(self.get(timeout))
        except Timeout:
            return out
        if max > 1:
            try:
                out += self.get_many(max - 1, 0)
            except Closed:
                pass  # the stream ended right after the first one: Closed comes next call
        return out

    def try_get(self) -> Optional[bytes]:
        """The next message of an owned partition, or None right now."""
        out: List[bytes] = []
        self._maintain()
        if self._take(1, out):
            self._count(1)
            return out[0]
        if self._drained():
            raise Closed("the producer closed the queue and every message has been consumed")
        return None

    def get(self, timeout: Optional[float] = None) -> bytes:
        """The next message of an owned partition, waiting up to ``timeout``
        seconds (``Timeout``); ``Closed`` once the producer closed and this
        member's partitions are drained."""
        deadline = None if timeout is None else time.monotonic() + float(timeout)
        reg = self._reg
        out: List[bytes] = []
        while True:
            self._maintain()
            if self._take(1, out):
                self._count(1)
                return out[0]
            seq = reg.arm()
            try:
                got = self._take(1, out)
                drained = not got and self._drained()
            except BaseException:
                reg.disarm()
                raise
            if got:
                reg.disarm()
                self._count(1)
                return out[0]
            if drained:
                reg.disarm()
                raise Closed("the producer closed the queue and every message has been consumed")
            wait = _REBALANCE_EVERY
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    reg.disarm()
                    raise Timeout(f"no message within {timeout} s")
                wait = min(wait, left)
            due_in = self._due_in()
            if due_in is not None:
                wait = min(wait, due_in)
            reg.sleep(seq, wait)

    def _count(self, n: int) -> None:
        self._delivered += n
        self._reg.add_delivered(self._slot, n)

    def close(self) -> None:
        """Leave the group: release every partition (the rest of each is read
        by its next owner), free the slot, wake the others. Idempotent.
        Delayed messages this member still holds (not yet due) are dropped:
        they live in this process's memory (ring-backed queues only)."""
        if self._closed:
            return
        self._closed = True
        reg = self._reg
        if reg.inherited:
            # forked child: the slot, the partitions and their ring slots
            # are the parent's; drop our references only
            self._owned, self._order = {}, []
            try:
                self._kq._members.remove(self)
            except ValueError:
                pass
            return
        try:
            for own in list(self._owned.values()):
                self._drop(own)
                reg.cas_owner(own.p, self._token, 0)
            self._order = []
            reg.claim_member(self._slot, self._token, 0, 0)
            reg.bump_epoch()
        except Closed:
            pass
        try:
            self._kq._members.remove(self)
        except ValueError:
            pass

    def __enter__(self) -> KeyedConsumer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------
# durable
# ---------------------------------------------------------------------------


_DONE_MAGIC = b"EQDONE01"
_DONE_ENTRY = struct.Struct("<QQ")  # offset, offset ^ _DONE_MASK: a torn or zeroed entry fails the check
_DONE_MASK = (1 << 64) - 1


def _open_log(log_dir: str, q: Any) -> Any:
    """Open (creating it if need be) one of a durable queue's logs with the
    queue's settings."""
    from ._log import Log

    return Log(log_dir, durability=q._durability, segment_bytes=q._segment_bytes)


class _DelayLog:
    """Consumer side of one durable delay log (``DIR/delay``, ``DIR/D<p>``).

    Records carry ``_delay_key(wall_due, tag)``. Delayed messages come due out
    of offset order, so the group's committed offset (everything below it is
    processed) can only move up to the oldest one still waiting. Those handed
    out and acked above it are listed in a side file (``done_path``: magic,
    the log's id, then 16-byte entries; written before ``ack`` returns) and
    skipped when the log is read again. So after a restart an acked delayed
    message is not delivered again, one handed out but not acked is, and one
    not yet due keeps its wall-clock due time (it is not delayed again).
    One process at a time consumes a delay log (the queue's group protocol).
    """

    def __init__(self, log_dir: str, done_path: str, group: str, sync: bool) -> None:
        from ._log import LogReader

        self.reader = LogReader(log_dir, group=group)
        self._dir = log_dir
        self._done_path = done_path
        self._sync = sync
        self._header = _DONE_MAGIC + str(self.reader.log_id).encode("ascii")
        self._committed = self.reader.committed() or 0
        self.handed: List[int] = []  # offsets handed out since the last ack
        self.done, self._file_ok, self._entries = self._load()

    def _load(self) -> Tuple[set, bool, int]:
        """(acked offsets >= committed, file can be appended to, entries in it)."""
        try:
            with open(self._done_path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return set(), False, 0
        h = len(self._header)
        if data[:h] != self._header:
            return set(), False, 0  # another log's list (the log was re-created): obsolete
        done = set()
        ok = (len(data) - h) % _DONE_ENTRY.size == 0
        n = 0
        for off, check in _DONE_ENTRY.iter_unpack(data[h:len(data) - (len(data) - h) % _DONE_ENTRY.size]):
            if off ^ check != _DONE_MASK:
                ok = False  # torn by a crash mid-append: rewrite before appending again
                continue
            n += 1
            if off >= self._committed:
                done.add(off)
        return done, ok, n

    def read(self, max_records: int) -> List[Tuple[int, int, int, int, bytes]]:
        """Up to ``max_records`` records not yet acked, as (monotonic due,
        offset, tag, timestamp, payload); ``[]`` only at the end of the log."""
        out: List[Tuple[int, int, int, int, bytes]] = []
        while len(out) < max_records:
            recs = self.reader.read_many(max_records - len(out))
            if not recs:
                break
            wall = time.time_ns()
            mono = now_ns()  # read after the wall clock: the conversion only makes it later
            for rec in recs:
                off = rec.offset
                if off in self.done:
                    continue
                key = rec.key
                if key is None or len(key) != 12:
                    raise CorruptLog(self._dir, 0, f"delayed record {off} has no due-time key")
                key = bytes(key)
                wall_due = int.from_bytes(key[:8], "little", signed=True)
                out.append((mono + (wall_due - wall), off, int.from_bytes(key[8:], "little"),
                            rec.timestamp, bytes(rec.value)))
        return out

    def ack(self, pending: Any) -> None:
        """Everything handed out so far is processed; ``pending`` are the
        offsets read but not handed out yet (still delayed, or due and queued)."""
        r = self.reader
        low = min(pending, default=r.position)
        new = [o for o in self.handed if o >= low and o not in self.done]
        self.handed = []
        if new:
            self.done.update(new)
            if self._file_ok:
                fd = os.open(self._done_path, os.O_WRONLY | os.O_APPEND, 0o600)
                try:
                    write_all(fd, b"".join(_DONE_ENTRY.pack(o, o ^ _DONE_MASK) for o in new))
                    if self._sync:
                        os.fsync(fd)
                finally:
                    os.close(fd)
                self._entries += len(new)
            else:
                self._rewrite()
        if low != self._committed:
            r.commit(low)  # durable (temp file, fsync, rename) before the list may drop entries below it
            self._committed = low
            if self.done and min(self.done) < low:
                self.done = {o for o in self.done if o >= low}
        if self._entries > 2 * len(self.done) + 256:
            self._rewrite()  # obsolete entries (below the committed offset) outnumber the live ones

    def _rewrite(self) -> None:
        d = os.path.dirname(self._done_path)
        os.makedirs(d, mode=0o700, exist_ok=True)
        body = self._header + b"".join(_DONE_ENTRY.pack(o, o ^ _DONE_MASK) for o in sorted(self.done))
        atomic_write(d, os.path.basename(self._done_path), body, self._sync)
        self._file_ok = True
        self._entries = len(self.done)

    def close(self) -> None:
        self.reader.close()


class DurablePriorityQueue(PriorityQueue):
    """PriorityQueue over segment logs: ``DIR/L<i>`` per level, ``DIR/delay``.

    Same API as :class:`PriorityQueue` plus :meth:`ack`. The producer (one
    process at a time: each log has a single writer) appends; a consumer reads
    with the consumer group ``group`` (default ``"pq"``) and at-least-once
    semantics: ``get`` hands a message out, ``ack()`` durably commits
    everything handed out so far. After a crash or restart, messages that were
    not acked are delivered again (in level order); acked ones never are.
    ``durability`` is the logs' (``"always"``: put returns after fsync;
    ``"none"``: survives a process crash, not a power loss).
    ``segment_bytes`` is the logs' segment size (see :class:`engine.Log`):
    each log preallocates one segment on disk as soon as it is opened, so a
    queue takes ``(levels + 1) * segment_bytes`` before its first message.
    """

    def __init__(self, levels: int = 3, policy: str = "strict", weights: Optional[Sequence[int]] = None,
                 max_wait: Optional[float] = None, name: Optional[str] = None,
                 capacity: int = DEFAULT_CAPACITY, durable: bool = True, path: Optional[str] = None,
                 durability: str = "always", group: str = "pq", by: str = "count",
                 quantum: int = 4096, segment_bytes: int = 16 << 20, **kw: Any) -> None:
        self._name = None
        self._closed = True  # until set up
        if path is None:
            raise ValueError("durable=True needs path= (a directory for the logs)")
        unknown = set(kw) - {"max_consumers"}
        if unknown:
            raise TypeError(f"unexpected arguments for a durable queue: {sorted(unknown)}")
        levels, policy, w, mw = _validate_policy(levels, policy, weights, max_wait)
        _validate_by(by, policy, quantum)
        self._by_bytes = by == "bytes"
        self._quantum = quantum
        self._visited = False
        check_durability(durability)
        _check_segment_bytes(segment_bytes)
        self._segment_bytes = segment_bytes
        self._path = os.fspath(path)
        os.makedirs(self._path, mode=0o700, exist_ok=True)
        meta = os.path.join(self._path, "queue.json")
        config = {"levels": levels, "policy": policy, "weights": w, "max_wait": mw}
        if os.path.exists(meta):
            with open(meta, encoding="utf-8") as f:
                old = json.load(f)
            if old.get("levels") != levels:
                raise ValueError(f"{self._path} holds a queue with {old.get('levels')} levels, not {levels}")
        else:
            atomic_write(self._path, "queue.json", json.dumps(config).encode())
        self._config = config
        self._n = levels
        self._policy = policy
        self._w = w or [1] * levels
        self._age_ns = int(_aging_threshold(mw) * 1e9) if mw > 0 else 0
        self._durability = durability
        self._group = group
        self._logs: Optional[List[Any]] = None
        self._readers: Optional[List[Any]] = None  # one per level
        self._dlog: Optional[_DelayLog] = None  # the delay log's consumer side
        # consumer state: read-ahead per level (log == levels: a due delayed message)
        self._buf: List[deque] = [deque() for _ in range(levels)]  # (ts, log, offset, payload)
        self._heap: List[Tuple[int, int, int, int, bytes]] = []  # heapq (due, offset, level, ts, payload)
        self._credit = [0] * levels
        self._rr = 0
        self._closed = False
        self._nput = [0] * levels
        self._ngot = [0] * levels
        bell = os.path.join(self._path, "bell")
        self._bell = self._open_bell(bell)
        self._region = self._bell  # the doorbell, under the name PriorityQueue uses (engine.aio)

    @staticmethod
    def _open_bell(path: str) -> _Region:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size != REGION_SIZE:
                # two processes may both get here: ftruncate to the size is
                # idempotent, and reserving allocates without touching data
                os.ftruncate(fd, REGION_SIZE)
                reserve_file(fd, REGION_SIZE)
            mm = mmap.mmap(fd, REGION_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        reg = _Region(mm, path)
        try:
            if reg.validate(KIND_PRIORITY) is None:
                reg.initialize(KIND_PRIORITY, b"{}")
        except IncompatibleRegion:
            reg.initialize(KIND_PRIORITY, b"{}")  # the bell is scratch state: reset it
        return reg

    def _log_dirs(self) -> List[str]:
        return [os.path.join(self._path, f"L{i}") for i in range(self._n)] + [os.path.join(self._path, "delay")]

    def _producer(self) -> List[Any]:
        if self._closed:
            raise Closed("the queue is closed")
        if self._logs is None:
            self._logs = [_open_log(d, self) for d in self._log_dirs()]
        return self._logs

    def _consumer(self) -> List[Any]:
        if self._closed:
            raise Closed("the queue is closed")
        if self._readers is None:
            from ._log import LogReader

            readers = []
            dirs = self._log_dirs()
            for d in dirs:
                if not os.path.exists(os.path.join(d, "meta")):
                    _open_log(d, self).close()  # create it empty
            for d in dirs[:-1]:
                readers.append(LogReader(d, group=self._group))
            try:
                self._dlog = _DelayLog(dirs[-1], os.path.join(self._path, "delay-acked", f"delay.{self._group}"),
                                       self._group, self._durability != "none")
            except BaseException:
                for r in readers:
                    r.close()
                raise
            self._readers = readers
        return self._readers

    def put(self, msg: Any, priority: int = 0, delay: Any = None, at: Any = None) -> None:
        """Append ``msg`` to level ``priority``'s log (durably, per ``durability``)."""
        if not isinstance(priority, int) or not 0 <= priority < self._n:
            raise ValueError(f"priority must be 0..{self._n - 1}, not {priority!r}")
        # the due time counts from the call, not from after the logs are opened
        wall_due = None if delay is None and at is None else _wall_due_ns(delay, at)
        logs = self._producer()
        if wall_due is not None:
            logs[-1].append(msg, key=_delay_key(wall_due, priority))
            self._nput[priority] += 1
            self._bell.add_delayed()
            self._bell.ring_bell()
            return
        logs[priority].append(msg)
        self._nput[priority] += 1
        self._bell.ring_bell()

    # -- consumer ------------------------------------------------------------
    def _fill(self) -> None:
        readers = self._consumer()
        for i in range(self._n):
            if not self._buf[i]:
                for rec in readers[i].read_many(256):
                    self._buf[i].append((rec.timestamp, i, rec.offset, bytes(rec.value)))
        heap = self._heap
        for entry in self._dlog.read(256):  # type: ignore[union-attr]  # opened by _consumer
            if entry[2] >= self._n:
                raise CorruptLog(self._dlog._dir, 0,  # type: ignore[union-attr]  # opened by _consumer
                                 f"delayed record {entry[1]} is for level {entry[2]} >= {self._n}")
            heapq.heappush(heap, entry)
        if heap:
            now = now_ns()
            while heap and heap[0][0] <= now:
                due, off, level, ts, payload = heapq.heappop(heap)
                self._buf[level].appendleft((ts, self._n, off, payload))

    def _take(self) -> Optional[bytes]:
        self._fill()
        buf = self._buf
        pick = -1
        if self._age_ns:
            now = time.time_ns()
            oldest = None
            for i in range(1, self._n):  # level 0 does not age (see PriorityQueue)
                if buf[i] and now - buf[i][0][0] >= self._age_ns and (oldest is None or buf[i][0][0] < oldest):
                    oldest, pick = buf[i][0][0], i
        if pick < 0:
            if self._policy == "strict":
                pick = next((i for i in range(self._n) if buf[i]), -1)
            elif self._by_bytes:
                pick = self._pick_bytes()
            else:
                i = self._rr
                for _ in range(self._n + 1):
                    if self._credit[i] <= 0:
                        self._credit[i] = self._w[i]
                    if buf[i]:
                        pick = i
                        self._credit[i] -= 1
                        self._rr = i if self._credit[i] > 0 else (i + 1) % self._n
                        break
                    self._credit[i] = 0
                    i = (i + 1) % self._n
        if pick < 0:
            return None
        _ts, log, off, payload = buf[pick].popleft()
        if log == self._n:
            self._dlog.handed.append(off)  # type: ignore[union-attr]  # a delayed one: acked by the side list
        self._ngot[pick] += 1
        return payload

    def _due_in(self) -> Optional[float]:
        """Seconds until the earliest delayed message read so far comes due
        (None: none waiting). A waiting get sleeps no longer than this; so
        does an awaiting one (``engine.aio``)."""
        return _seconds_until(self._heap[0][0]) if self._heap else None

    def _doorbell(self) -> Tuple[Any, Optional[float]]:
        """What an awaiting ``engine.aio`` call sleeps on: the queue's bell,
        for at most the log re-read tick (an append by another process rings
        no bell) or until the next delayed message is due."""
        due_in = self._due_in()
        return self._region, (_LOG_REREAD if due_in is None else min(_LOG_REREAD, due_in))

    def _core_counts(self) -> Tuple[List[int], List[int], int, int, List[int]]:
        """(put, got, aged, delayed held, 0s): the compiled queue's shape."""
        return list(self._nput), list(self._ngot), 0, len(self._heap), [0] * self._n

    def _pick_bytes(self) -> int:
        """Deficit round robin by payload bytes (as in the compiled queue)."""
        buf, n, i = self._buf, self._n, self._rr
        while True:
            any_ = False
            for _ in range(n):
                if buf[i]:
                    any_ = True
                    if not self._visited:
                        self._credit[i] += self._w[i] * self._quantum
                        self._visited = True
                    size = len(buf[i][0][3])
                    if size <= self._credit[i]:
                        self._credit[i] -= size
                        self._rr = i
                        return i
                else:
                    self._credit[i] = 0
                i = (i + 1) % n
                self._visited = False
            if not any_:
                self._rr = i
                return -1

    def try_get(self) -> Optional[bytes]:
        """The next message by policy, or None (not acked until :meth:`ack`)."""
        return self._take()

    def get(self, timeout: Optional[float] = None) -> bytes:
        """The next message by policy, waiting up to ``timeout`` (``Timeout``)."""
        deadline = None if timeout is None else time.monotonic() + float(timeout)
        reg = self._bell
        while True:
            m = self._take()
            if m is not None:
                return m
            seq = reg.arm()
            m = self._take()
            if m is not None:
                reg.disarm()
                return m
            wait = _LOG_REREAD  # the log writer may be another process
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    reg.disarm()
                    raise Timeout(f"no message within {timeout} s")
                wait = min(wait, left)
            due_in = self._due_in()
            if due_in is not None:
                wait = min(wait, due_in)
            reg.sleep(seq, wait)

    def get_many(self, max: int = 1024, timeout: Optional[float] = 0) -> List[bytes]:
        """Up to ``max`` messages in policy order (waits for the first unless timeout=0)."""
        out: List[bytes] = []
        if timeout is None or timeout > 0:
            try:
                out.append(self.get(timeout))
            except Timeout:
                return out
        while len(out) < max:
            m = self._take()
            if m is None:
                break
            out.append(m)
        return out

    def ack(self) -> None:
        """Durably mark every message handed out so far as processed: each
        log's group offset moves to its first message still held here."""
        readers = self._consumer()
        held_now: List[List[int]] = [[] for _ in range(self._n + 1)]
        for i in range(self._n):
            for _ts, log, off, _p in self._buf[i]:
                held_now[log].append(off)
        held_now[-1].extend(entry[1] for entry in self._heap)
        for j, r in enumerate(readers):
            low = min(held_now[j], default=r.position)
            if r.committed() != low:
                r.commit(low)
        self._dlog.ack(held_now[-1])  # type: ignore[union-attr]

    def close_put(self) -> None:
        """Close the logs (the producer role)."""
        if self._logs is not None:
            for lg in self._logs:
                lg.close()
            self._logs = None

    def close(self) -> None:
        """Close logs and readers (un-acked messages will be redelivered)."""
        if self._closed:
            return
        self.close_put()
        if self._readers is not None:
            for r in self._readers:
                r.close()
            self._readers = None
        if self._dlog is not None:
            self._dlog.close()
            self._dlog = None
        self._closed = True
        self._bell.close()

    def __enter__(self) -> DurablePriorityQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stats(self) -> Dict[str, Any]:
        """Per-level put/got of this handle and the messages held un-acked."""
        return {"path": self._path, "levels": self._n, "policy": self._policy, "put": list(self._nput),
                "got": list(self._ngot), "delayed_held": len(self._heap), "durable": True}


class _LogPartition:
    """The ring-consumer surface over a group reader of one partition log."""

    __slots__ = ("reader",)

    def __init__(self, reader: Any) -> None:
        self.reader = reader

    def try_get(self) -> Optional[bytes]:
        rec = self.reader.read()
        return None if rec is None else bytes(rec.value)

    def get_many(self, n: int, timeout: Any = 0) -> List[bytes]:
        return [bytes(r.value) for r in self.reader.read_many(n)]

    def ack(self) -> None:
        if not self.reader.closed and self.reader.committed() != self.reader.position:
            self.reader.commit()

    def close(self) -> None:
        self.reader.close()


class _LogDelay:
    """The delay log ``DIR/D<p>`` of a durable partition, read once it exists
    (the producer creates it with the partition's first delayed put)."""

    __slots__ = ("dir", "done_path", "group", "sync", "log")

    def __init__(self, log_dir: str, done_path: str, group: str, sync: bool) -> None:
        self.dir = log_dir
        self.done_path = done_path
        self.group = group
        self.sync = sync
        self.log: Optional[_DelayLog] = None

    def read(self) -> List[Tuple[int, int, int, int, bytes]]:
        """Every record not yet read or acked (see :meth:`_DelayLog.read`)."""
        if self.log is None:
            if not os.path.exists(os.path.join(self.dir, "meta")):
                return []
            self.log = _DelayLog(self.dir, self.done_path, self.group, self.sync)
        out: List[Tuple[int, int, int, int, bytes]] = []
        while True:
            got = self.log.read(1024)
            if not got:
                return out
            out += got

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
            self.log = None


class _DurableOwned(_Owned):
    """A durable partition: its group reader and its delay log. Delayed
    messages not yet due stay in the log (only read ahead here), so the
    partition can be handed over at once: the next owner reads them again
    with their original due times."""

    __slots__ = ()

    holds_delayed = False

    def ack(self) -> None:
        """Commit what was handed out: the data log's group offset, and the
        delay log's (plus its side list of delayed messages acked out of order)."""
        self.data.ack()
        log = self.delay.log
        if log is not None:
            log.ack([entry[1] for entry in self.heap])

    def drain_delayed(self) -> None:
        """Read new delay-log records into ``heap`` (a log never closes)."""
        heap = self.heap
        for due, off, tag, _ts, payload in self.delay.read():
            if tag != self.p:
                raise CorruptLog(self.delay.dir, 0, f"delayed record {off} is for partition {tag}, not {self.p}")
            heapq.heappush(heap, (due, off, payload))

    def pop_due(self, now: int, room: int, out: List[bytes]) -> int:
        """As :meth:`_Owned.pop_due`, noting each offset for the next ack."""
        heap = self.heap
        handed = self.delay.log.handed
        n = 0
        while heap and heap[0][0] <= now and n < room:
            _due, off, payload = heapq.heappop(heap)
            out.append(payload)
            handed.append(off)
            n += 1
        return n


class DurableKeyedQueue(KeyedQueue):
    """KeyedQueue over segment logs: ``DIR/P<i>`` per partition.

    Same group protocol as :class:`KeyedConsumer` (the control region is the
    file ``DIR/group``, shared by every process that opens DIR); each owner
    reads its partitions with the consumer group ``group`` and
    ``consumer.ack()`` commits what it was handed (a hand-over on rebalance
    commits too). After a crash, the next owner re-delivers what the dead
    one had not acked, in order. ``get`` never raises ``Closed``: a log has
    no end of stream; use a timeout.

    Delayed delivery (``put(msg, key=k, delay=s)`` or ``at=t``): the message
    goes to the partition's delay log ``DIR/D<p>`` with its wall-clock due
    time and is served by the partition's owner once due (never early; a
    blocked ``get`` sleeps until the next due time). It survives a crash or
    restart with its original due time, and ``ack`` covers it like any other
    message (an acked one is not delivered again, see :class:`_DelayLog`).
    As on rings, a delayed message is not ordered with its key's other
    messages: it is served when due.

    >>> kq = KeyedQueue(partitions=2, durable=True, path=d, durability="none")
    >>> kq.put(b"reminder", key="u1", delay=0.05); kq.put(b"now", key="u1")
    >>> c = kq.consumer(); c.get(timeout=1), c.get(timeout=1)
    (b'now', b'reminder')
    """

    def __init__(self, partitions: int = 4, key: Optional[Callable[[Any], Any]] = None,
                 name: Optional[str] = None, capacity: int = DEFAULT_CAPACITY,
                 delay_capacity: Optional[int] = None, durable: bool = True,
                 path: Optional[str] = None, durability: str = "always", group: str = "kq",
                 segment_bytes: int = 16 << 20) -> None:
        self._name = None
        self._closed = True  # until set up
        if path is None:
            raise ValueError("durable=True needs path= (a directory for the logs)")
        if not isinstance(partitions, int) or isinstance(partitions, bool) or not 1 <= partitions <= MAX_PARTS:
            raise ValueError(f"partitions must be an int 1..{MAX_PARTS}, not {partitions!r}")
        check_durability(durability)
        if key is not None and not callable(key):
            raise TypeError("key must be a function msg -> key, or None")
        _check_segment_bytes(segment_bytes)
        self._segment_bytes = segment_bytes
        self._path = os.fspath(path)
        os.makedirs(self._path, mode=0o700, exist_ok=True)
        meta = os.path.join(self._path, "queue.json")
        if os.path.exists(meta):
            with open(meta, encoding="utf-8") as f:
                old = json.load(f)
            if old.get("partitions") != partitions:
                raise ValueError(f"{self._path} holds a keyed queue with {old.get('partitions')} partitions, "
                                 f"not {partitions} (a different count would move keys)")
        else:
            atomic_write(self._path, "queue.json", json.dumps({"partitions": partitions}).encode())
        self._np = partitions
        self._keyfn = key
        self._durability = durability
        self._group = group
        self._logs: Optional[List[Any]] = None
        self._dlogs: Dict[int, Any] = {}  # partition -> its delay Log (producer side, opened on first use)
        self._closed = False
        self._members: List[KeyedConsumer] = []
        self._default: Optional[KeyedConsumer] = None
        self._nput = 0
        self._ndelayed = 0
        self._region = self._open_group(os.path.join(self._path, "group"))

    @staticmethod
    def _open_group(path: str) -> _Region:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size != REGION_SIZE:
                # two processes may both get here: ftruncate to the size is
                # idempotent, and reserving allocates without touching data
                os.ftruncate(fd, REGION_SIZE)
                reserve_file(fd, REGION_SIZE)
            mm = mmap.mmap(fd, REGION_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        reg = _Region(mm, path)
        try:
            ok = reg.validate(KIND_KEYED) is not None
        except IncompatibleRegion:
            ok = False
        if not ok:
            reg.initialize(KIND_KEYED, b"{}")
        return reg

    @property
    def partitions(self) -> int:
        """Number of partitions."""
        return self._np

    def _dirs(self) -> List[str]:
        return [os.path.join(self._path, f"P{p}") for p in range(self._np)]

    def partition_of(self, key: Any) -> int:
        """The partition a key maps to (stable across processes and runs)."""
        return int(stable_hash(key) % self._np)

    def put(self, msg: Any, key: Any = None, delay: Any = None, at: Any = None) -> None:
        """Append ``msg`` to its key's partition log (see KeyedQueue.put);
        with ``delay``/``at`` still in the future, to the partition's delay log."""
        if self._closed:
            raise Closed("the queue is closed")
        if key is None:
            if self._keyfn is None:
                raise TypeError("put() needs key= (or create the KeyedQueue with key=function)")
            key = self._keyfn(msg)
        # the due time counts from the call, not from after the logs are opened
        wall_due = None if delay is None and at is None else _wall_due_ns(delay, at)
        if self._logs is None:
            self._logs = [_open_log(d, self) for d in self._dirs()]
        p = stable_hash(key) % self._np
        if wall_due is not None:
            dlog = self._dlogs.get(p)
            if dlog is None:
                dlog = self._dlogs[p] = _open_log(self._delay_dir(p), self)
            dlog.append(msg, key=_delay_key(wall_due, p))
            self._nput += 1
            self._ndelayed += 1
            self._region.add_delayed()  # owners re-read their delay logs
            self._region.ring_bell()
            return
        self._logs[p].append(msg)
        self._nput += 1
        self._region.ring_bell()

    def _delay_dir(self, p: int) -> str:
        return os.path.join(self._path, f"D{p}")

    def _open_partition(self, p: int) -> _Owned:
        from ._log import LogReader

        d = self._dirs()[p]
        if not os.path.exists(os.path.join(d, "meta")):
            try:
                _open_log(d, self).close()  # create it empty
            except LogLocked:
                pass  # a producer has it open: it exists
        reader = LogReader(d, group=self._group)
        done = os.path.join(self._path, "delay-acked", f"D{p}.{self._group}")
        return _DurableOwned(p, _LogPartition(reader), _LogDelay(self._delay_dir(p), done, self._group,
                                                                 self._durability != "none"))

    def close_put(self) -> None:
        """Close the partition logs (the producer role)."""
        if self._logs is not None:
            for lg in self._logs:
                lg.close()
            self._logs = None
        for lg in self._dlogs.values():
            lg.close()
        self._dlogs = {}

    def close(self) -> None:
        """Leave the group (handing partitions over; what was handed out is
        committed), close the logs. Idempotent."""
        if self._closed:
            return
        for c in list(self._members):
            c.close()
        self.close_put()
        self._closed = True
        self._region.close()

    def __enter__(self) -> DurableKeyedQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stats(self) -> Dict[str, Any]:
        """Put count of this handle and the group's members."""
        out: Dict[str, Any] = {"path": self._path, "partitions": self._np, "put": self._nput,
                               "put_delayed": self._ndelayed, "durable": True}
        if not self._closed:
            reg = self._region
            out["members"] = [{"slot": i, "token": t, "pid": pid} for i in range(MAX_MEMBERS)
                              for t, pid, _start, _ns in [reg.member(i)] if t]
            out["owners"] = [reg.owner(p) for p in range(self._np)]
        return out
