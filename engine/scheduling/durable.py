"""The durable scheduling queues: one segment log per level or partition
(:class:`DurablePriorityQueue`, :class:`DurableKeyedQueue`), at-least-once
with ``ack()``, delayed messages that survive a restart."""

from __future__ import annotations

import heapq
import json
import mmap
import os
import struct
import time
from collections import deque
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from engine.errors import Closed, CorruptLog, IncompatibleRegion, LogLocked, Timeout

from .._fsutil import atomic_write, check_durability, make_dirs, write_all
from .._log import _check_segment_bytes
from .._sched import (
    KIND_KEYED,
    KIND_PRIORITY,
    MAX_MEMBERS,
    MAX_PARTS,
    REGION_SIZE,
    _Region,
    now_ns,
    reserve_file,
    stable_hash,
)
from ._common import (
    _LOG_REREAD,
    DEFAULT_CAPACITY,
    _aging_threshold,
    _delay_key,
    _validate_by,
    _validate_policy,
    _wall_due_ns,
)
from .shared import (
    KeyedConsumer,
    KeyedQueue,
    PriorityQueue,
    _Owned,
    _seconds_until,
)

# ---------------------------------------------------------------------------
# durable
# ---------------------------------------------------------------------------


_DONE_MAGIC = b"EQDONE01"
_DONE_ENTRY = struct.Struct("<QQ")  # offset, offset ^ _DONE_MASK: a torn or zeroed entry fails the check
_DONE_MASK = (1 << 64) - 1


def _open_log(log_dir: str, q: Any) -> Any:
    """Open (creating it if need be) one of a durable queue's logs with the
    queue's settings."""
    from .._log import Log

    return Log(log_dir, durability=q._durability, segment_bytes=q._segment_bytes)


def _open_scratch_region(path: str, kind: int) -> _Region:
    """Open (creating it if need be) a durable queue's shared scratch region
    beside its logs: the doorbell, or the keyed group's membership.  Its
    contents are rebuilt by whoever uses them, so a missing or foreign one
    is initialised afresh."""
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
        ok = reg.validate(kind) is not None
    except IncompatibleRegion:
        ok = False
    if not ok:
        reg.initialize(kind, b"{}")
    return reg


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
        from .._log import LogReader

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
        make_dirs(d)
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
        make_dirs(self._path)  # its name and each new parent's durable
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
        return _open_scratch_region(path, KIND_PRIORITY)

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
            from .._log import LogReader

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
        make_dirs(self._path)  # its name and each new parent's durable
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
        return _open_scratch_region(path, KIND_KEYED)

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
        from .._log import LogReader

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
