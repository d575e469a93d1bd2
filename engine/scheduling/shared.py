"""The scheduling queues over shared-memory rings: :class:`PriorityQueue`,
:class:`KeyedQueue` and its members (:class:`KeyedConsumer`), in one process
or shared between processes (see the package docstring)."""

from __future__ import annotations

import heapq
import os
import time
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    List,
    Literal,
    Optional,
    Sequence,
    Tuple,
    overload,
)

from engine.errors import Closed, EngineError, IncompatibleRegion, Timeout

from .._sched import (
    KIND_KEYED,
    KIND_PRIORITY,
    MAX_MEMBERS,
    MAX_PARTS,
    _KQCore,
    _PQCore,
    _Region,
    delayed_record,
    now_ns,
    pid_alive,
    split_delayed,
)
from ._common import (
    _REBALANCE_EVERY,
    DEFAULT_CAPACITY,
    _aging_threshold,
    _attach_region,
    _Awaitable,
    _check_name,
    _create_region,
    _due_ns,
    _shm_dir,
    _unlink_path,
    _validate_by,
    _validate_policy,
)
from ._deliveries import clip_reason, nack_delay_ns

if TYPE_CHECKING:
    from .durable import DurableKeyedQueue, DurablePriorityQueue

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
        from .durable import DurablePriorityQueue

        if durable and not issubclass(cls, DurablePriorityQueue):
            cls = DurablePriorityQueue  # Python then runs DurablePriorityQueue.__init__
        return super().__new__(cls)

    def __init__(self, levels: int = 3, policy: str = "strict", weights: Optional[Sequence[int]] = None,
                 max_wait: Optional[float] = None, name: Optional[str] = None,
                 capacity: int = DEFAULT_CAPACITY, durable: bool = False, path: Optional[str] = None,
                 max_consumers: int = 1, by: str = "count", quantum: int = 4096) -> None:
        from .._ring import Ring

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
        from .._ring import Ring

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

    def nack(self, delay: Optional[float] = None, reason: Optional[str] = None) -> None:
        """Durable queues only (:meth:`DurablePriorityQueue.nack`): a ring
        hands each message out once, so there is nothing to redeliver."""
        raise EngineError(_NACK_NEEDS_DURABLE)

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
        from .durable import DurableKeyedQueue

        if durable and not issubclass(cls, DurableKeyedQueue):
            cls = DurableKeyedQueue  # Python then runs DurableKeyedQueue.__init__
        return super().__new__(cls)

    def __init__(self, partitions: int = 4, key: Optional[Callable[[Any], Any]] = None,
                 name: Optional[str] = None, capacity: int = DEFAULT_CAPACITY,
                 delay_capacity: Optional[int] = None, durable: bool = False,
                 path: Optional[str] = None) -> None:
        from .._ring import Ring

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
        from .._ring import Ring

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

    def nack(self, delay: Optional[float] = None, reason: Optional[str] = None) -> None:
        """Durable queues only (:meth:`KeyedConsumer.nack`)."""
        raise EngineError(_NACK_NEEDS_DURABLE)

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


_NACK_NEEDS_DURABLE = ("nack() needs a durable queue (durable=True, path=...): a ring-backed queue hands "
                       "each message out once and has nothing to redeliver")


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
        # heapq (due, tie-breaker, payload); a durable partition keeps more per entry
        self.heap: List[Tuple[Any, ...]] = []
        self._seq = 0

    def ack(self) -> None:
        """Commit what was handed out (durable partitions); rings have
        nothing to commit (at-most-once across a crash)."""

    def nack(self, delay_ns: int, reason: Optional[str]) -> None:
        """Redeliver what was handed out (durable partitions only)."""
        raise EngineError(_NACK_NEEDS_DURABLE)

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

    def nack(self, delay: Optional[float] = None, reason: Optional[str] = None) -> None:
        """Durable queues: reject every message this member was handed since
        its last ``ack``/``nack``; each is delivered again after ``delay``
        seconds (None: at once), by whoever owns its partition then, or goes
        to the dead-letter log once handed out ``max_deliveries`` times
        (see :class:`DurableKeyedQueue`). ``reason`` (str) is recorded.
        A partition handed over in between counts what it was handed as
        processed (as :meth:`ack` does): nack before a rebalance can happen.
        Ring-backed queues: ``EngineError``."""
        if self._closed:
            raise Closed("this consumer is closed")
        reason = clip_reason(reason)
        delay_ns = nack_delay_ns(delay)
        for own in self._order:
            own.nack(delay_ns, reason)

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


