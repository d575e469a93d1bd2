"""The delivery journal of a durable queue's consumer group: per source log
(a level, a partition or a delay log), what happened to each message at or
above the group's committed offset.

File ``DIR/deliveries/<log>.<group>``: a header (magic, the log's id: a
journal written for an older incarnation of the log is obsolete), then
records appended in the order things happened::

    u32 length (whole record) | u32 crc32 of the rest | u8 kind | 3 pad
    u64 offset | i64 message timestamp | i64 time (wall ns) | i64 aux
    reason (utf-8, NACK only)

kinds: ``DELIVER`` (the message is about to be handed out),
``NACK`` (the consumer rejected it: aux is the wall-clock time before which
it is not delivered again, followed by the reason), ``DONE`` (acked while a
message below it is still held, so the group offset cannot cover it yet).

A message is named by its offset *and* its append timestamp: after the log
is cut (``log repair --truncate``, a backup's cut) its offsets are reused by
new messages, which the old records must not describe. A record whose
timestamp differs from the message's is stale and ignored (dropped).

``DELIVER`` is written (and fsynced, unless the queue's durability is
``"none"``) before the message is handed out, so a consumer killed while
processing has used up one delivery, as with SQS's receive count and
JetStream's ``MaxDeliver``. Records of offsets below the committed offset
are obsolete; the file is cut back to its header once every record is,
and rewritten without them (temp file, fsync, rename) once they outnumber
the live ones by thousands. A torn or damaged tail (a crash in the
middle of an append) ends the readable part; the next write rewrites the
file from what was read, so counts can only be lost to damage, never
invented.
"""

from __future__ import annotations

import os
import struct
import time
import zlib
from typing import Dict, Iterable, List, Optional, Tuple

from .._fsutil import atomic_write, write_all

_MAGIC = b"EQDLV001"
_REC = struct.Struct("<IIB3xQqqq")  # length, crc32, kind, offset, message ts, time, aux
_CRC_FROM = 8  # the crc covers the record from the kind on
_MAX_REASON = 4096  # bytes of a reason kept (a traceback is cut, not refused)

DELIVER = 1
NACK = 2
DONE = 3


def _record(kind: int, offset: int, ts: int, t: int, aux: int = 0, reason: bytes = b"") -> bytes:
    body = _REC.pack(_REC.size + len(reason), 0, kind, offset, ts, t, aux)[_CRC_FROM:] + reason
    return struct.pack("<II", _REC.size + len(reason), zlib.crc32(body)) + body


def clip_reason(reason: Optional[str]) -> Optional[str]:
    """``reason`` as stored: a str of at most ``_MAX_REASON`` utf-8 bytes."""
    if reason is None:
        return None
    if not isinstance(reason, str):
        raise TypeError(f"reason must be a str or None, not {type(reason).__name__}")
    raw = reason.encode("utf-8", "replace")
    if len(raw) <= _MAX_REASON:
        return reason
    return raw[:_MAX_REASON].decode("utf-8", "ignore")


def nack_delay_ns(delay: object) -> int:
    """``nack(delay=...)`` in ns (None: redeliver at once)."""
    if delay is None:
        return 0
    d = float(delay)  # type: ignore[arg-type]  # a TypeError names the bad value
    if not d >= 0 or d == float("inf"):
        raise ValueError(f"delay must be a number of seconds >= 0, not {delay!r}")
    return int(d * 1e9)


class Entry:
    """What the journal knows of one message."""

    __slots__ = ("ts", "times", "reason", "retry_at", "done")

    def __init__(self, ts: int) -> None:
        self.ts = ts  # the message's append timestamp (names it with the offset)
        self.times: List[int] = []  # wall ns of each delivery
        self.reason: Optional[str] = None  # the last nack's reason
        self.retry_at: Optional[int] = None  # wall ns it is not delivered before (nacked)
        self.done = False  # acked above a message still held


class Journal:
    """The delivery journal of one source log for one consumer group.

    One process at a time writes it: the process that consumes the log (the
    queue's group protocol hands a partition over only after its previous
    owner stopped or died). ``committed`` is the group's committed offset
    when the journal is opened; :meth:`forget_below` moves it. Every query
    names the message by (offset, timestamp).
    """

    def __init__(self, path: str, log_id: str, committed: int, sync: bool) -> None:
        self.path = path
        self._sync = sync
        self._header = _MAGIC + log_id.encode("ascii", "replace") + b"\n"
        self._committed = committed
        self.entries: Dict[int, Entry] = {}  # offset -> what is known of it
        self._pending: List[bytes] = []  # records not written yet
        self._file_ok = False  # the file exists, is ours and ends with a whole record
        self._written = 0  # records in the file
        self._load()

    # -- reading ---------------------------------------------------------------
    def _load(self) -> None:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return
        h = len(self._header)
        if data[:h] != self._header:
            return  # another incarnation of the log: obsolete, rewritten on first write
        pos, end, ok = h, len(data), True
        while pos < end:
            if end - pos < _REC.size:
                ok = False
                break
            length, crc, kind, off, ts, t, aux = _REC.unpack_from(data, pos)
            if length < _REC.size or pos + length > end or zlib.crc32(data[pos + _CRC_FROM:pos + length]) != crc:
                ok = False  # torn by a crash mid-append (or damaged): what follows is not trusted
                break
            if off >= self._committed:
                e = self._entry(off, ts)
                if kind == DELIVER:
                    e.times.append(t)
                elif kind == NACK:
                    e.retry_at = aux
                    e.reason = data[pos + _REC.size:pos + length].decode("utf-8", "replace")
                elif kind == DONE:
                    e.done = True
            self._written += 1
            pos += length
        self._file_ok = ok

    def _entry(self, off: int, ts: int) -> Entry:
        """The entry of (off, ts), replacing a stale one of an earlier message at off."""
        e = self.entries.get(off)
        if e is None or e.ts != ts:
            e = self.entries[off] = Entry(ts)
        return e

    def get(self, offset: int, ts: int) -> Optional[Entry]:
        """What is known of the message (offset, ts), or None (nothing, or
        only of an earlier message at that offset: dropped)."""
        e = self.entries.get(offset)
        if e is None:
            return None
        if e.ts != ts:
            del self.entries[offset]
            return None
        return e

    def count(self, offset: int, ts: int) -> int:
        """How many times the message (offset, ts) was handed out."""
        e = self.get(offset, ts)
        return 0 if e is None else len(e.times)

    def history(self, offset: int, ts: int) -> Tuple[int, List[int], Optional[str]]:
        """(deliveries, their wall-clock times in ns, the last nack's reason)."""
        e = self.get(offset, ts)
        if e is None:
            return 0, [], None
        return len(e.times), list(e.times), e.reason

    # -- writing ---------------------------------------------------------------
    def delivering(self, offset: int, ts: int) -> None:
        """Count one delivery of (offset, ts) now; on disk at the next :meth:`flush`."""
        t = time.time_ns()
        self._entry(offset, ts).times.append(t)
        self._pending.append(_record(DELIVER, offset, ts, t))

    def flush(self) -> None:
        """Write (and sync) the deliveries counted since the last flush: call
        it before the messages are handed to the user."""
        if self._pending:
            recs, self._pending = self._pending, []
            self._write(recs)

    def nacked(self, offset: int, ts: int, reason: Optional[str], retry_wall_ns: int) -> None:
        """Record a nack of (offset, ts) (durably, with any pending deliveries)."""
        raw = (reason or "").encode("utf-8", "replace")[:_MAX_REASON]
        e = self._entry(offset, ts)
        e.retry_at = retry_wall_ns
        e.reason = raw.decode("utf-8", "replace")
        self._pending.append(_record(NACK, offset, ts, time.time_ns(), retry_wall_ns, raw))
        self.flush()

    def mark_done(self, messages: Iterable[Tuple[int, int]]) -> None:
        """Record the messages (offset, ts) as processed (durably) though
        below them one is still held, so the group offset cannot cover them yet."""
        t = time.time_ns()
        for off, ts in messages:
            if off < self._committed:
                continue
            e = self._entry(off, ts)
            if not e.done:
                e.done = True
                self._pending.append(_record(DONE, off, ts, t))
        self.flush()

    def forget_below(self, committed: int) -> None:
        """The group's committed offset moved to ``committed``: drop what is
        below it (rewriting the file once obsolete records dominate)."""
        if committed <= self._committed:
            return
        self._committed = committed
        for o in [o for o in self.entries if o < committed]:
            del self.entries[o]
        if not self._written:
            return
        live = self._live()
        if live == 0 and self._file_ok and not self._pending:
            # every record is obsolete (the common case: all acked). The commit
            # that made them so is durable, so a crash may keep any of them
            os.truncate(self.path, len(self._header))
            self._written = 0
        elif self._written > 2 * live + 4096:
            self._rewrite()

    def _live(self) -> int:
        return sum(len(e.times) + (e.retry_at is not None) + e.done for e in self.entries.values())

    def _write(self, recs: List[bytes]) -> None:
        if not self._file_ok:
            self._rewrite()  # the state in memory already holds what ``recs`` say
            return
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC, 0o600)
            try:
                write_all(fd, b"".join(recs))
                if self._sync:
                    os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException:
            # part of it may be in the file (a torn record): the next write
            # replaces the file with the state in memory, which holds ``recs``
            self._file_ok = False
            raise
        self._written += len(recs)

    def _rewrite(self) -> None:
        """Replace the file with the live state (temp file, fsync, rename)."""
        recs: List[bytes] = []
        for off in sorted(self.entries):
            e = self.entries[off]
            recs.extend(_record(DELIVER, off, e.ts, t) for t in e.times)
            if e.retry_at is not None:
                recs.append(_record(NACK, off, e.ts, 0, e.retry_at, (e.reason or "").encode("utf-8")))
            if e.done:
                recs.append(_record(DONE, off, e.ts, 0))
        d = os.path.dirname(self.path)
        os.makedirs(d, mode=0o700, exist_ok=True)
        atomic_write(d, os.path.basename(self.path), [self._header] + recs, self._sync)
        self._pending = []
        self._file_ok = True
        self._written = len(recs)
