"""Sharded counters: count from many threads and processes without a lock.

* :class:`ShardedCounter` -- one int64 counter split into cache-line-padded
  shards; ``add`` is one atomic op on the caller's shard, ``value`` sums them.
* :class:`CounterMap` -- many named counters in one (shared) region.
* :class:`CounterAggregator` -- counts that arrive as messages: senders
  coalesce increments and ship them over an :class:`engine.Ring`; one
  aggregator applies them in batches.

All three are exact: once every adder has returned (or every sender has
flushed and the aggregator drained), the value is the sum of everything
added.  Overflow raises ``OverflowError``; nothing wraps silently.

>>> from engine import ShardedCounter
>>> with ShardedCounter.create("hits") as hits:     # doctest: +SKIP
...     hits.add()
...     hits.value()
1
"""

from __future__ import annotations

import os
import struct
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from engine._counter import (
    KEY_MAX,
    CounterMap,
    CounterMapFull,
    ShardedCounter,
    read_header,
    region_path,
)
from engine.errors import Closed, CorruptLog

__all__ = [
    "ShardedCounter",
    "CounterMap",
    "CounterMapFull",
    "CounterAggregator",
    "CounterSender",
    "KEY_MAX",
    "read_header",
    "region_path",
]

Key = Union[str, bytes]

# ---------------------------------------------------------------------------
# checkpoint / restore over an engine.Log

_CKPT_PREFIX = b"qe-counter:"
_COUNTER_TAG = b"QEC1"
_MAP_TAG = b"QEM1"
_ENTRY = struct.Struct("<qBH")  # value, flags (1 = str key), key length


def _ckpt_key(obj: Union[ShardedCounter, CounterMap]) -> bytes:
    kind = b"map:" if isinstance(obj, CounterMap) else b"counter:"
    name = obj.name
    return _CKPT_PREFIX + kind + (name.encode() if name is not None else b"<private>")


def _encode_items(items: Iterable[Any]) -> bytes:
    parts = [_MAP_TAG]
    for key, value in items:
        raw = key.encode() if isinstance(key, str) else bytes(key)
        parts.append(_ENTRY.pack(value, 1 if isinstance(key, str) else 0, len(raw)))
        parts.append(raw)
    return b"".join(parts)


def _decode_items(buf: bytes, where: str) -> Dict[Key, int]:
    out: Dict[Key, int] = {}
    pos = len(_MAP_TAG)
    while pos < len(buf):
        if pos + _ENTRY.size > len(buf):
            raise CorruptLog(where, 0, "counter map checkpoint record is truncated")
        value, flags, klen = _ENTRY.unpack_from(buf, pos)
        pos += _ENTRY.size
        raw = bytes(buf[pos : pos + klen])
        if len(raw) != klen:
            raise CorruptLog(where, 0, "counter map checkpoint record is truncated")
        pos += klen
        out[raw.decode() if flags & 1 else raw] = value
    return out


def _checkpoint(obj: Union[ShardedCounter, CounterMap], log: Any) -> int:
    """Append ``obj``'s value(s) to ``log`` as one record keyed by its name."""
    if isinstance(obj, CounterMap):
        payload = _encode_items(obj.items())
    else:
        payload = _COUNTER_TAG + struct.pack("<q", obj.value())
    return int(log.append(payload, key=_ckpt_key(obj)))


def _latest(obj: Union[ShardedCounter, CounterMap], log: Any) -> Optional[Tuple[bytes, str]]:
    """The payload of the latest checkpoint of ``obj`` in ``log`` (a Log or a
    path), and where it is (for errors)."""
    from engine import LogReader

    want = _ckpt_key(obj)
    if isinstance(log, (str, os.PathLike)):
        reader = LogReader(log, start=0)
    else:
        log.flush()
        reader = log.reader(start=log.start_offset)
    found: Optional[Tuple[bytes, str]] = None
    where = os.fspath(log) if isinstance(log, (str, os.PathLike)) else str(getattr(log, "path", log))
    with reader:
        for rec in reader:
            if rec.key is not None and bytes(rec.key) == want:
                found = bytes(rec.value), f"{where} (record {rec.offset})"
    return found


def _restore(obj: Union[ShardedCounter, CounterMap], log: Any) -> Any:
    found = _latest(obj, log)
    if found is None:
        return None
    payload, where = found
    if isinstance(obj, CounterMap):
        if not payload.startswith(_MAP_TAG):
            raise CorruptLog(where, 0, f"record keyed {_ckpt_key(obj)!r} is not a counter map checkpoint")
        values = _decode_items(payload, where)
        obj.reset()
        for key, value in values.items():
            obj.add(key, value)
        return values
    if len(payload) != 12 or not payload.startswith(_COUNTER_TAG):
        raise CorruptLog(where, 0, f"record keyed {_ckpt_key(obj)!r} is not a counter checkpoint")
    (value,) = struct.unpack_from("<q", payload, 4)
    obj._set(value)
    return value


# ---------------------------------------------------------------------------
# the queue-fed aggregator


def _encode_batch(pending: Dict[Any, int]) -> bytes:
    parts: List[bytes] = []
    for key, n in pending.items():
        if key is None:
            raw, flags = b"", 2
        elif isinstance(key, str):
            raw, flags = key.encode(), 1
        else:
            raw, flags = bytes(key), 0
        parts.append(_ENTRY.pack(n, flags, len(raw)))
        parts.append(raw)
    return b"".join(parts)


class CounterSender:
    """The sending side of a :class:`CounterAggregator`: coalesces increments
    locally and ships them as one ring message per ``batch`` adds.

    One sender per ring (a ring has a single producer).  Nothing is counted
    until :meth:`flush` (called every ``batch`` adds, and by :meth:`close`).
    """

    def __init__(self, ring: Any, batch: int = 4096, timeout: Optional[float] = None) -> None:
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        self._ring = ring
        self._producer = ring.producer()
        self._batch = batch
        self._timeout = timeout
        self._pending: Dict[Any, int] = {}
        self._adds = 0
        self.sent_messages = 0

    @classmethod
    def attach(cls, name: str, batch: int = 4096) -> CounterSender:
        """A sender on the shared ring ``name`` (made by ``CounterAggregator.create``)."""
        from engine import Ring

        return cls(Ring.attach(name), batch=batch)

    def add(self, key: Optional[Key] = None, n: int = 1) -> None:
        """Count ``n`` for ``key`` (``None``: the aggregator's single counter)."""
        if type(n) is not int and not isinstance(n, int):
            raise TypeError(f"n must be an int, not {type(n).__name__}")
        pending = self._pending
        pending[key] = pending.get(key, 0) + n
        self._adds += 1
        if self._adds >= self._batch:
            self.flush()

    def flush(self) -> None:
        """Send every coalesced increment (one message, split if the ring needs it)."""
        if not self._pending:
            self._adds = 0
            return
        items = list(self._pending.items())
        for key, n in items:
            if not (-(1 << 63) <= n < (1 << 63)):
                raise OverflowError(f"coalesced increment {n} for {key!r} leaves int64")
        limit = max(64, int(getattr(self._ring, "max_message", 1 << 16)))
        chunk: Dict[Any, int] = {}
        size = 0
        for key, n in items:
            klen = len(key.encode() if isinstance(key, str) else (key or b""))
            if chunk and size + _ENTRY.size + klen > limit:
                self._producer.put(_encode_batch(chunk), timeout=self._timeout)
                self.sent_messages += 1
                chunk, size = {}, 0
            chunk[key] = n
            size += _ENTRY.size + klen
        self._producer.put(_encode_batch(chunk), timeout=self._timeout)
        self.sent_messages += 1
        self._pending.clear()
        self._adds = 0

    def close(self) -> None:
        """Flush, then close the ring's producer (the aggregator drains and stops)."""
        try:
            self.flush()
        finally:
            self._producer.close()

    def __enter__(self) -> CounterSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CounterAggregator:
    """Counts that arrive as messages, applied in batches by one aggregator.

    Senders (:class:`CounterSender`, one per ring, in any thread or process)
    coalesce increments and put them on an :class:`engine.Ring`; the
    aggregator takes whole batches with ``get_many`` and applies each distinct
    key once per batch to ``target`` (a :class:`CounterMap`, or a
    :class:`ShardedCounter` when keys are ``None``).  This is the queue-based
    counter: the adders never touch shared counter memory, one consumer does.

    >>> agg = CounterAggregator()                      # private ring + map
    >>> s = agg.sender(); s.add("a", 2); s.add("a"); s.flush()
    >>> agg.drain()                                     # messages applied
    1
    >>> agg.target.get("a")
    3
    """

    def __init__(
        self,
        rings: Union[Any, Sequence[Any], None] = None,
        target: Union[CounterMap, ShardedCounter, None] = None,
        capacity: int = 1 << 20,
    ) -> None:
        from engine import Ring

        if rings is None:
            rings = [Ring(capacity=capacity)]
        elif not isinstance(rings, (list, tuple)):
            rings = [rings]
        self.rings = list(rings)
        self.target = target if target is not None else CounterMap(capacity=4096)
        self._consumers = [r.consumer() for r in self.rings]
        self._open = [True] * len(self._consumers)
        self.applied = 0  # increments (key, n) applied
        self.messages = 0

    @classmethod
    def create(
        cls,
        name: str,
        target: Union[CounterMap, ShardedCounter, None] = None,
        capacity: int = 1 << 20,
        senders: int = 1,
    ) -> CounterAggregator:
        """Shared rings ``name`` (one sender) or ``name.0`` .. ``name.{senders-1}``,
        for :meth:`CounterSender.attach` from other processes."""
        from engine import Ring

        names = [name] if senders == 1 else [f"{name}.{i}" for i in range(senders)]
        return cls([Ring.create(n, capacity=capacity) for n in names], target=target)

    def sender(self, index: int = 0, batch: int = 4096) -> CounterSender:
        """A sender on ring ``index`` (in this process)."""
        return CounterSender(self.rings[index], batch=batch)

    def _apply(self, msg: bytes) -> None:
        target = self.target
        pos, end = 0, len(msg)
        unpack = _ENTRY.unpack_from
        size = _ENTRY.size
        while pos < end:
            n, flags, klen = unpack(msg, pos)
            pos += size
            raw = msg[pos : pos + klen]
            pos += klen
            if flags == 2:
                if isinstance(target, CounterMap):
                    target.add(b"", n)
                else:
                    target.add(n)
            elif isinstance(target, ShardedCounter):
                target.add(n)
            else:
                target.add(raw.decode() if flags & 1 else bytes(raw), n)
            self.applied += 1
        self.messages += 1

    def drain(self, max_messages: int = 1024, timeout: Optional[float] = 0) -> int:
        """Apply every message available now (up to ``max_messages`` per ring);
        returns how many messages were applied.  ``timeout`` as in
        ``Consumer.get_many`` (first ring that has nothing waits that long)."""
        done = 0
        for i, consumer in enumerate(self._consumers):
            if not self._open[i]:
                continue
            try:
                batch = consumer.get_many(max_messages, timeout=timeout)
            except Closed:
                self._open[i] = False
                continue
            for msg in batch:
                self._apply(msg)
            done += len(batch)
        return done

    def run(self, max_messages: int = 1024, poll: float = 0.05) -> int:
        """Apply messages until every sender has closed its ring; returns the
        number of messages applied."""
        total = 0
        while any(self._open):
            total += self.drain(max_messages, timeout=poll)
        return total

    @property
    def senders_open(self) -> int:
        """Rings whose sender has not closed yet (or not been drained to Closed)."""
        return sum(self._open)

    def close(self) -> None:
        """Close the consumers (the target and the rings' regions stay)."""
        for c in self._consumers:
            c.close()

    def __enter__(self) -> CounterAggregator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
