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
from ..deadletters import DeadLetterWriter, message_id
from ._common import (
    _LOG_REREAD,
    DEFAULT_CAPACITY,
    _aging_threshold,
    _delay_key,
    _validate_by,
    _validate_policy,
    _wall_due_ns,
)
from ._deliveries import Journal, clip_reason, nack_delay_ns
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


def _check_max_deliveries(max_deliveries: Any) -> Optional[int]:
    if max_deliveries is None:
        return None
    if not isinstance(max_deliveries, int) or isinstance(max_deliveries, bool) or max_deliveries < 1:
        raise ValueError(f"max_deliveries must be an int >= 1 or None, not {max_deliveries!r}")
    return max_deliveries


def _journal(q: Any, log_name: str, log_id: Optional[str], committed: int) -> Journal:
    """The delivery journal of one of queue ``q``'s logs for its group."""
    path = os.path.join(q._path, "deliveries", f"{log_name}.{q._group}")
    return Journal(path, log_id or "", committed, q._durability != "none")


class _Rereader:
    """Reads handed-out messages again for a nack (they are not kept in
    memory until the ack): one reader per log, for the length of a ``with``."""

    def __init__(self) -> None:
        self._readers: Dict[str, Any] = {}

    def payload(self, log_dir: str, offset: int, ts: int) -> bytes:
        """The payload of the record (offset, ts) of the log ``log_dir``."""
        from .._log import LogReader

        r = self._readers.get(log_dir)
        if r is None:
            r = self._readers[log_dir] = LogReader(log_dir, start=offset)
        else:
            r.seek(offset)
        rec = r.read()
        if rec is None or rec.offset != offset or rec.timestamp != ts:
            raise CorruptLog(log_dir, 0, f"record {offset} changed since it was handed out")
        return bytes(rec.value)

    def __enter__(self) -> _Rereader:
        return self

    def __exit__(self, *exc: object) -> None:
        for r in self._readers.values():
            r.close()


def _dead_letter(q: Any, journal: Journal, source: str, log_id: str, offset: int, target: int,
                 ts: int, payload: bytes, reason: Optional[str]) -> None:
    """Move the message at ``offset`` of ``source`` to the queue's dead-letter
    log (once per message id), with its delivery history."""
    n, times, last = journal.history(offset, ts)
    meta = {"kind": q._dlq_kind, "source": source, "target": target, "deliveries": n, "delivered_at": times,
            "reason": reason if reason is not None else last, "enqueued_at": ts}
    if q._dlq is None:
        q._dlq = DeadLetterWriter(q._path, q._durability, q._segment_bytes)
    q._dlq.add(message_id(source, offset, log_id), meta, payload)
    q._ndead += 1


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

    Failures: ``nack(delay=None, reason=None)`` rejects every message handed
    out since the last ``ack``/``nack``: each is delivered again (first in
    its level) once ``delay`` seconds have passed, also after a restart.
    ``max_deliveries=N`` bounds the attempts: each hand-out is counted
    durably *before* the message is returned (a consumer killed while
    processing has used one), and a message handed out N times that is
    nacked, or would be handed out once more, goes to the dead-letter log
    ``DIR/dlq`` with its history instead (see :mod:`engine.deadletters`,
    ``queue-engine dlq``). Counts and nacks are kept per consumer group in
    ``DIR/deliveries/``; a directory without one opens with fresh counts.

    >>> pq = PriorityQueue(levels=2, durable=True, path=d, max_deliveries=3)
    >>> pq.put(b"job"); m = pq.get(timeout=1)
    >>> pq.nack(delay=0.5, reason="backend down")   # retried in 0.5 s
    """

    def __init__(self, levels: int = 3, policy: str = "strict", weights: Optional[Sequence[int]] = None,
                 max_wait: Optional[float] = None, name: Optional[str] = None,
                 capacity: int = DEFAULT_CAPACITY, durable: bool = True, path: Optional[str] = None,
                 durability: str = "always", group: str = "pq", by: str = "count",
                 quantum: int = 4096, segment_bytes: int = 16 << 20,
                 max_deliveries: Optional[int] = None, **kw: Any) -> None:
        self._name = None
        self._closed = True  # until set up
        if path is None:
            raise ValueError("durable=True needs path= (a directory for the logs)")
        self._max_deliveries = _check_max_deliveries(max_deliveries)
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
        self._journals: List[Journal] = []  # per log (levels, then delay): deliveries, nacks
        self._log_ids: List[str] = []
        self._retry: List[Tuple[int, int, int, int, int, bytes]] = []  # heapq (due, log, offset, level, ts, payload)
        self._handed: List[Tuple[int, int, int, int]] = []  # (log, offset, level, ts) since ack/nack
        self._dead: List[Tuple[int, int, int]] = []  # (log, offset, ts) dead-lettered since the last ack
        self._dlq: Optional[DeadLetterWriter] = None
        self._dlq_kind = "priority"
        self._ndead = 0
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
            names = self._log_names()
            self._journals = [_journal(self, names[i], r.log_id, r.committed() or 0) for i, r in enumerate(readers)]
            self._journals.append(_journal(self, names[-1], self._dlog.reader.log_id, self._dlog._committed))
            self._log_ids = [r.log_id or "" for r in readers] + [self._dlog.reader.log_id or ""]
            self._readers = readers
        return self._readers

    def _log_names(self) -> List[str]:
        return [f"L{i}" for i in range(self._n)] + ["delay"]

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
        journals = self._journals
        wall = mono = 0
        for i in range(self._n):
            if not self._buf[i]:
                j = journals[i]
                for rec in readers[i].read_many(256):
                    off = rec.offset
                    e = j.get(off, rec.timestamp) if j.entries else None
                    if e is not None and e.done:
                        continue  # acked above a message that was still held
                    nb = None if e is None else e.retry_at
                    if nb is not None:
                        if not wall:
                            wall, mono = time.time_ns(), now_ns()
                        if nb > wall:  # nacked with a delay not over yet
                            heapq.heappush(self._retry, (mono + nb - wall, i, off, i, rec.timestamp, bytes(rec.value)))
                            continue
                    self._buf[i].append((rec.timestamp, i, off, bytes(rec.value)))
        heap = self._heap
        dj = journals[self._n]
        for entry in self._dlog.read(256):  # type: ignore[union-attr]  # opened by _consumer
            if entry[2] >= self._n:
                raise CorruptLog(self._dlog._dir, 0,  # type: ignore[union-attr]  # opened by _consumer
                                 f"delayed record {entry[1]} is for level {entry[2]} >= {self._n}")
            e = dj.get(entry[1], entry[3]) if dj.entries else None
            nb = None if e is None else e.retry_at
            if nb is not None:  # nacked: due no earlier than the nack's delay
                entry = (max(entry[0], now_ns() + nb - time.time_ns()),) + entry[1:]
            heapq.heappush(heap, entry)
        now = now_ns() if heap or self._retry else 0
        while heap and heap[0][0] <= now:
            due, off, level, ts, payload = heapq.heappop(heap)
            self._buf[level].appendleft((ts, self._n, off, payload))
        retry = self._retry
        if retry and retry[0][0] <= now:
            back = []
            while retry and retry[0][0] <= now:
                back.append(heapq.heappop(retry))
            # at the front of their levels, in (due, log, offset) order
            for _due, log, off, level, ts, payload in reversed(back):
                self._buf[level].appendleft((ts, log, off, payload))

    def _take(self, flush: bool = True) -> Optional[bytes]:
        """The next message to hand out, its delivery counted (on disk
        already unless ``flush`` is False: then the caller flushes before
        returning it); dead-letters the exhausted ones on the way."""
        md = self._max_deliveries
        while True:
            got = self._pick()
            if got is None:
                return None
            level, ts, log, off, payload = got
            if md is not None:
                j = self._journals[log]
                try:
                    if j.count(off, ts) >= md:
                        self._to_dlq(log, off, level, ts, payload, None)
                        continue
                    j.delivering(off, ts)
                    if flush:
                        j.flush()
                except BaseException:
                    # not handed out: back at the front of its level (a failed
                    # write may still have counted the delivery: never fewer)
                    self._buf[level].appendleft((ts, log, off, payload))
                    raise
            if log == self._n:
                self._dlog.handed.append(off)  # type: ignore[union-attr]  # a delayed one: acked by the side list
            self._handed.append((log, off, level, ts))
            self._ngot[level] += 1
            return payload

    def _to_dlq(self, log: int, off: int, level: int, ts: int, payload: bytes, reason: Optional[str]) -> None:
        _dead_letter(self, self._journals[log], self._log_names()[log], self._log_ids[log], off, level, ts,
                     payload, reason)
        self._dead.append((log, off, ts))
        if log == self._n:
            self._dlog.handed.append(off)  # type: ignore[union-attr]  # settled at the next ack

    def _flush_deliveries(self) -> None:
        for j in self._journals:
            j.flush()

    def _unhand(self, start: int, payloads: List[bytes]) -> None:
        """Put the messages handed out since ``len(self._handed) == start``
        (``payloads``, in the same order) back at the front of their levels,
        in order: their hand-out failed."""
        for (log, off, level, ts), payload in reversed(list(zip(self._handed[start:], payloads))):
            self._buf[level].appendleft((ts, log, off, payload))
            self._ngot[level] -= 1
            if log == self._n:
                self._dlog.handed.remove(off)  # type: ignore[union-attr]
        del self._handed[start:]

    def _pick(self) -> Optional[Tuple[int, int, int, int, bytes]]:
        """(level, ts, log, offset, payload) of the next message by policy."""
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
        ts, log, off, payload = buf[pick].popleft()
        return pick, ts, log, off, payload

    def _due_in(self) -> Optional[float]:
        """Seconds until the earliest delayed or nacked message read so far
        comes due (None: none waiting). A waiting get sleeps no longer than
        this; so does an awaiting one (``engine.aio``)."""
        due = [h[0][0] for h in (self._heap, self._retry) if h]
        return _seconds_until(min(due)) if due else None

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
        start = len(self._handed)
        if timeout is None or timeout > 0:
            try:
                out.append(self.get(timeout))
            except Timeout:
                return out
        try:
            while len(out) < max:
                m = self._take(flush=False)
                if m is None:
                    break
                out.append(m)
            self._flush_deliveries()  # counted on disk before any is returned
        except BaseException:
            self._unhand(start, out)  # none returned: none handed out
            raise
        return out

    def ack(self) -> None:
        """Durably mark every message handed out so far as processed: each
        log's group offset moves to its first message still held here
        (read ahead, delayed or nacked); those acked above it are listed in
        the log's delivery journal."""
        readers = self._consumer()
        self._flush_deliveries()
        n = self._n
        held_now: List[List[int]] = [[] for _ in range(n + 1)]
        for i in range(n):
            for _ts, log, off, _p in self._buf[i]:
                held_now[log].append(off)
        held_now[-1].extend(entry[1] for entry in self._heap)
        for entry in self._retry:
            held_now[entry[1]].append(entry[2])
        settled: List[List[Tuple[int, int]]] = [[] for _ in range(n)]
        for log, off, _level, ts in self._handed:
            if log < n:
                settled[log].append((off, ts))
        for log, off, ts in self._dead:
            if log < n:
                settled[log].append((off, ts))
        for j, r in enumerate(readers):
            low = min(held_now[j], default=r.position)
            above = [m for m in settled[j] if m[0] >= low]
            if above:
                self._journals[j].mark_done(above)  # before the commit that may drop what is below
            if r.committed() != low:
                r.commit(low)
            self._journals[j].forget_below(low)
        self._dlog.ack(held_now[-1])  # type: ignore[union-attr]
        self._journals[n].forget_below(self._dlog._committed)  # type: ignore[union-attr]
        self._handed = []
        self._dead = []

    def nack(self, delay: Optional[float] = None, reason: Optional[str] = None) -> None:
        """Reject every message handed out since the last ``ack``/``nack``:
        each is delivered again (first in its level) after ``delay`` seconds
        (None: at once), also after a restart. With ``max_deliveries``, one
        handed out that many times goes to the dead-letter log instead.
        ``reason`` (a str, kept up to 4 KiB) is recorded with it."""
        self._consumer()
        reason = clip_reason(reason)
        delay_ns = nack_delay_ns(delay)
        md = self._max_deliveries
        wall, mono = time.time_ns(), now_ns()
        handed, settled = self._handed, 0
        dirs = self._log_dirs()
        try:
            with _Rereader() as again:
                for log, off, level, ts in handed:  # one at a time: a failure leaves the rest handed out
                    j = self._journals[log]
                    payload = again.payload(dirs[log], off, ts)
                    if md is not None and j.count(off, ts) >= md:
                        self._to_dlq(log, off, level, ts, payload, reason)
                    else:
                        j.nacked(off, ts, reason, wall + delay_ns)
                        heapq.heappush(self._retry, (mono + delay_ns, log, off, level, ts, payload))
                    if log == self._n:
                        self._dlog.handed.remove(off)  # type: ignore[union-attr]  # held again, or settled by _to_dlq
                    settled += 1
        finally:
            del handed[:settled]
        self.ack()  # commits what the dead-lettered ones no longer hold back

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
        if self._dlq is not None:
            self._dlq.close()
            self._dlq = None
        self._closed = True
        self._bell.close()

    def __enter__(self) -> DurablePriorityQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stats(self) -> Dict[str, Any]:
        """Per-level put/got of this handle, the delayed and nacked messages
        it holds, and how many it moved to the dead-letter log."""
        return {"path": self._path, "levels": self._n, "policy": self._policy, "put": list(self._nput),
                "got": list(self._ngot), "delayed_held": len(self._heap), "nacked_held": len(self._retry),
                "dead_lettered": self._ndead, "max_deliveries": self._max_deliveries, "durable": True}


class _LogPartition:
    """The group reader of one partition log (read by :class:`_DurableOwned`)."""

    __slots__ = ("reader",)

    def __init__(self, reader: Any) -> None:
        self.reader = reader

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
    """A durable partition: its group reader, its delay log and their
    delivery journals. Delayed and nacked messages not yet due stay in the
    logs (only read ahead here, their due times on disk), so the partition
    can be handed over at once: the next owner reads them again with their
    due times. ``heap`` holds (due, source, offset, payload, ts) with
    source 0 for the partition log, 1 for its delay log."""

    __slots__ = ("q", "journal", "djournal", "handed", "dead")

    holds_delayed = False

    def __init__(self, p: int, data: _LogPartition, delay: _LogDelay, q: Any) -> None:
        self.p = p
        self.data = data
        self.delay = delay
        self.eof = False  # a log has no end of stream
        self.deof = False
        self.heap = []  # heapq (due, source, offset, payload, ts)
        self._seq = 0
        self.q = q
        r = data.reader
        self.journal = _journal(q, f"P{p}", r.log_id, r.committed() or 0)
        self.djournal: Optional[Journal] = None  # opened with the delay log
        self.handed: List[Tuple[int, int, int]] = []  # (source, offset, ts) since ack/nack
        self.dead: List[Tuple[int, int, int]] = []  # (source, offset, ts) dead-lettered since the last ack
        self.try_get = self._try_get
        self.many = self._many

    def _delay_journal(self) -> Journal:
        if self.djournal is None:
            log = self.delay.log
            self.djournal = _journal(self.q, f"D{self.p}", log.reader.log_id, log._committed)
        return self.djournal

    def _src(self, src: int) -> Tuple[Journal, str, str]:
        """(journal, log name, log id) of source 0 (partition) or 1 (delay)."""
        if src == 0:
            return self.journal, f"P{self.p}", self.data.reader.log_id or ""
        return self._delay_journal(), f"D{self.p}", self.delay.log.reader.log_id or ""

    # -- handing out -----------------------------------------------------------
    def _hand(self, src: int, off: int, payload: bytes, ts: int, out: List[bytes]) -> None:
        """Append the message to ``out`` with its delivery counted, or move it
        to the dead-letter log once it has been handed out max_deliveries times."""
        md = self.q._max_deliveries
        if md is not None:
            j = self.journal if src == 0 else self._delay_journal()
            if j.count(off, ts) >= md:
                self._to_dlq(src, off, payload, ts, None)
                return
            j.delivering(off, ts)
        out.append(payload)
        self.handed.append((src, off, ts))
        if src == 1:
            self.delay.log.handed.append(off)

    def _to_dlq(self, src: int, off: int, payload: bytes, ts: int, reason: Optional[str]) -> None:
        j, name, log_id = self._src(src)
        _dead_letter(self.q, j, name, log_id, off, self.p, ts, payload, reason)
        self.dead.append((src, off, ts))
        if src == 1:
            self.delay.log.handed.append(off)  # settled at the next ack

    def _flush(self) -> None:
        self.journal.flush()
        if self.djournal is not None:
            self.djournal.flush()

    def _unhand(self, start: int, out: List[bytes], out_start: int) -> None:
        """Take back the messages handed out since ``len(self.handed) ==
        start`` (and appended to ``out`` from ``out_start``): their hand-out
        failed. They wait in ``heap``, due now, so nothing commits past them."""
        for (src, off, ts), payload in zip(self.handed[start:], out[out_start:]):
            heapq.heappush(self.heap, (0, src, off, payload, ts))
            if src == 1:
                self.delay.log.handed.remove(off)
        del self.handed[start:]
        del out[out_start:]

    def _read(self, n: int, out: List[bytes]) -> None:
        """Up to ``n`` messages of the partition log into ``out``, skipping
        those acked out of order and holding back those nacked with a delay."""
        r = self.data.reader
        j = self.journal
        wall = mono = 0
        start, out_start = len(self.handed), len(out)
        try:
            while len(out) < n:
                recs = r.read_many(n - len(out))
                if not recs:
                    break
                for k, rec in enumerate(recs):
                    off = rec.offset
                    try:
                        e = j.get(off, rec.timestamp) if j.entries else None
                        if e is not None and e.done:
                            continue  # acked above a message that was still held
                        nb = None if e is None else e.retry_at
                        if nb is not None:
                            if not wall:
                                wall, mono = time.time_ns(), now_ns()
                            if nb > wall:
                                heapq.heappush(self.heap, (mono + nb - wall, 0, off, bytes(rec.value), rec.timestamp))
                                continue
                        self._hand(0, off, bytes(rec.value), rec.timestamp, out)
                    except BaseException:
                        # read but not handed out: held (due now), in order
                        for rest in recs[k:]:
                            heapq.heappush(self.heap, (0, 0, rest.offset, bytes(rest.value), rest.timestamp))
                        raise
            self._flush()  # counted on disk before any is returned
        except BaseException:
            self._unhand(start, out, out_start)
            raise

    def _try_get(self) -> Optional[bytes]:
        out: List[bytes] = []
        self._read(1, out)
        return out[0] if out else None

    def _many(self, n: int, timeout: Any = 0) -> List[bytes]:
        out: List[bytes] = []
        self._read(n, out)
        return out

    def drain_delayed(self) -> None:
        """Read new delay-log records into ``heap`` (a log never closes)."""
        heap = self.heap
        got = self.delay.read()
        if not got:
            return
        dj = self._delay_journal()
        for due, off, tag, ts, payload in got:
            if tag != self.p:
                raise CorruptLog(self.delay.dir, 0, f"delayed record {off} is for partition {tag}, not {self.p}")
            e = dj.get(off, ts) if dj.entries else None
            nb = None if e is None else e.retry_at
            if nb is not None:  # nacked: due no earlier than the nack's delay
                due = max(due, now_ns() + nb - time.time_ns())
            heapq.heappush(heap, (due, 1, off, payload, ts))

    def pop_due(self, now: int, room: int, out: List[bytes]) -> int:
        """As :meth:`_Owned.pop_due`, counting each delivery (dead-lettered
        ones are not returned)."""
        heap = self.heap
        n = 0
        start, out_start = len(self.handed), len(out)
        try:
            while heap and heap[0][0] <= now and n < room:
                entry = heapq.heappop(heap)
                _due, src, off, payload, ts = entry
                before = len(out)
                try:
                    self._hand(src, off, payload, ts, out)
                except BaseException:
                    heapq.heappush(heap, entry)  # not handed out: still held
                    raise
                n += len(out) - before
            self._flush()  # counted on disk before any is returned
        except BaseException:
            self._unhand(start, out, out_start)
            raise
        return n

    # -- settling --------------------------------------------------------------
    def ack(self) -> None:
        """Commit what was handed out: the data log's group offset (up to
        its first message still held: nacked ones wait in ``heap``; those
        acked above it go to its journal), and the delay log's (plus its
        side list of delayed messages acked out of order)."""
        self._flush()
        r = self.data.reader
        if not r.closed:
            low = min((e[2] for e in self.heap if e[1] == 0), default=r.position)
            above = [(off, ts) for src, off, ts in self.handed if src == 0 and off >= low]
            above += [(off, ts) for src, off, ts in self.dead if src == 0 and off >= low]
            if above:
                self.journal.mark_done(above)
            if r.committed() != low:
                r.commit(low)
            self.journal.forget_below(low)
        log = self.delay.log
        if log is not None:
            log.ack([e[2] for e in self.heap if e[1] == 1])
            if self.djournal is not None:
                self.djournal.forget_below(log._committed)
        self.handed = []
        self.dead = []

    def nack(self, delay_ns: int, reason: Optional[str]) -> None:
        """Reject what was handed out since the last ack/nack (see
        :meth:`DurableKeyedQueue.nack`)."""
        md = self.q._max_deliveries
        wall, mono = time.time_ns(), now_ns()
        handed, settled = self.handed, 0
        dirs = (os.path.join(self.q._path, f"P{self.p}"), self.delay.dir)
        try:
            with _Rereader() as again:
                for src, off, ts in handed:  # one at a time: a failure leaves the rest handed out
                    j = self.journal if src == 0 else self._delay_journal()
                    payload = again.payload(dirs[src], off, ts)
                    if md is not None and j.count(off, ts) >= md:
                        self._to_dlq(src, off, payload, ts, reason)
                    else:
                        j.nacked(off, ts, reason, wall + delay_ns)
                        heapq.heappush(self.heap, (mono + delay_ns, src, off, payload, ts))
                    if src == 1:
                        self.delay.log.handed.remove(off)  # held again, or settled by _to_dlq
                    settled += 1
        finally:
            del handed[:settled]
        self.ack()


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

    Failures: ``consumer.nack(delay=None, reason=None)`` (or ``kq.nack``)
    rejects what the member was handed since its last ack/nack: each is
    delivered again after ``delay`` seconds, like a delayed message (so not
    in order with its key's later messages), by whichever member owns the
    partition then. ``max_deliveries=N``: as :class:`DurablePriorityQueue`
    (counted durably before each hand-out; the N-th failed hand-out sends
    the message to ``DIR/dlq``). Every process that consumes the queue
    should pass the same N: it is a consumer setting, not stored in DIR.

    >>> kq = KeyedQueue(partitions=2, durable=True, path=d, durability="none")
    >>> kq.put(b"reminder", key="u1", delay=0.05); kq.put(b"now", key="u1")
    >>> c = kq.consumer(); c.get(timeout=1), c.get(timeout=1)
    (b'now', b'reminder')
    """

    def __init__(self, partitions: int = 4, key: Optional[Callable[[Any], Any]] = None,
                 name: Optional[str] = None, capacity: int = DEFAULT_CAPACITY,
                 delay_capacity: Optional[int] = None, durable: bool = True,
                 path: Optional[str] = None, durability: str = "always", group: str = "kq",
                 segment_bytes: int = 16 << 20, max_deliveries: Optional[int] = None) -> None:
        self._name = None
        self._closed = True  # until set up
        if path is None:
            raise ValueError("durable=True needs path= (a directory for the logs)")
        self._max_deliveries = _check_max_deliveries(max_deliveries)
        self._dlq: Optional[DeadLetterWriter] = None
        self._dlq_kind = "keyed"
        self._ndead = 0
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
        try:
            return _DurableOwned(p, _LogPartition(reader), _LogDelay(self._delay_dir(p), done, self._group,
                                                                     self._durability != "none"), self)
        except BaseException:
            reader.close()
            raise

    def nack(self, delay: Optional[float] = None, reason: Optional[str] = None) -> None:
        """``nack`` of this handle's default consumer, if it has one (see
        :meth:`KeyedConsumer.nack`)."""
        if self._default is not None:
            self._default.nack(delay, reason)

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
        if self._dlq is not None:
            self._dlq.close()
            self._dlq = None
        self._closed = True
        self._region.close()

    def __enter__(self) -> DurableKeyedQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stats(self) -> Dict[str, Any]:
        """Put count of this handle and the group's members."""
        out: Dict[str, Any] = {"path": self._path, "partitions": self._np, "put": self._nput,
                               "put_delayed": self._ndelayed, "dead_lettered": self._ndead,
                               "max_deliveries": self._max_deliveries, "durable": True}
        if not self._closed:
            reg = self._region
            out["members"] = [{"slot": i, "token": t, "pid": pid} for i in range(MAX_MEMBERS)
                              for t, pid, _start, _ns in [reg.member(i)] if t]
            out["owners"] = [reg.owner(p) for p in range(self._np)]
        return out
