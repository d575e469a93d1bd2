"""The delivery journal of a durable queue's consumer group: per source log
(a level, a partition or a delay log), what happened to each message at or
above the group's committed offset.

File ``DIR/deliveries/<log>.<group>``: a header (magic, the log's id: a
journal written for an older incarnation of the log is obsolete), then
records appended in the order things happened::

    u32 length (whole record) | u32 crc32 of the rest | u8 kind | 3 pad
    u64 offset | i64 time (wall ns) | i64 aux | reason (utf-8, NACK only)

kinds: ``DELIVER`` (the message is about to be handed out; aux unused),
``NACK`` (the consumer rejected it: aux is the wall-clock time before which
it is not delivered again, followed by the reason), ``DONE`` (acked while a
message below it is still held, so the group offset cannot cover it yet).

``DELIVER`` is written (and fsynced, unless the queue's durability is
``"none"``) before the message is handed out, so a consumer killed while
processing has used up one delivery, as with SQS's receive count and
JetStream's ``MaxDeliver``. Records of offsets below the committed offset
are obsolete; the file is rewritten without them (temp file, fsync, rename)
once they outnumber the live ones. A torn or damaged tail (a crash in the
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
_REC = struct.Struct("<IIB3xQqq")  # length, crc32, kind, offset, time, aux
_CRC_FROM = 8  # the crc covers the record from the kind on
_MAX_REASON = 4096  # bytes of a reason kept (a traceback is cut, not refused)

DELIVER = 1
NACK = 2
DONE = 3


def _record(kind: int, offset: int, t: int, aux: int = 0, reason: bytes = b"") -> bytes:
    body = _REC.pack(_REC.size + len(reason), 0, kind, offset, t, aux)[_CRC_FROM:] + reason
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


class Journal:
    """The delivery journal of one source log for one consumer group.

    One process at a time writes it: the process that consumes the log (the
    queue's group protocol hands a partition over only after its previous
    owner stopped or died). ``committed`` is the group's committed offset
    when the journal is opened; :meth:`forget_below` moves it.
    """

    def __init__(self, path: str, log_id: str, committed: int, sync: bool) -> None:
        self.path = path
        self._sync = sync
        self._header = _MAGIC + log_id.encode("ascii", "replace") + b"\n"
        self._committed = committed
        self.times: Dict[int, List[int]] = {}  # offset -> wall ns of each delivery
        self.reasons: Dict[int, str] = {}  # offset -> the last nack's reason
        self.retry_at: Dict[int, int] = {}  # offset -> wall ns it is not delivered before
        self.done: set = set()  # offsets acked above a held one
        self._pending: List[bytes] = []  # DELIVER records not written yet
        self._file_ok = False  # the file exists, is ours and ends with a whole record
        self._entries = 0
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
            length, crc, kind, off, t, aux = _REC.unpack_from(data, pos)
            if length < _REC.size or pos + length > end or zlib.crc32(data[pos + _CRC_FROM:pos + length]) != crc:
                ok = False  # torn by a crash mid-append (or damaged): what follows is not trusted
                break
            self._apply(kind, off, t, aux, data[pos + _REC.size:pos + length])
            self._entries += 1
            pos += length
        self._file_ok = ok

    def _apply(self, kind: int, off: int, t: int, aux: int, reason: bytes) -> None:
        if off < self._committed:
            return
        if kind == DELIVER:
            self.times.setdefault(off, []).append(t)
        elif kind == NACK:
            self.retry_at[off] = aux
            self.reasons[off] = reason.decode("utf-8", "replace")
        elif kind == DONE:
            self.done.add(off)

    def count(self, offset: int) -> int:
        """How many times the message at ``offset`` was handed out."""
        return len(self.times.get(offset, ()))

    def not_before(self, offset: int) -> Optional[int]:
        """Wall ns before which a nacked message is not delivered again (or None)."""
        return self.retry_at.get(offset)

    def history(self, offset: int) -> Tuple[int, List[int], Optional[str]]:
        """(deliveries, their wall-clock times in ns, the last nack's reason)."""
        times = list(self.times.get(offset, ()))
        return len(times), times, self.reasons.get(offset)

    # -- writing ---------------------------------------------------------------
    def delivering(self, offset: int) -> None:
        """Count one delivery of ``offset`` now; on disk at the next :meth:`flush`."""
        t = time.time_ns()
        self.times.setdefault(offset, []).append(t)
        self._pending.append(_record(DELIVER, offset, t))

    def flush(self) -> None:
        """Write (and sync) the deliveries counted since the last flush: call
        it before the messages are handed to the user."""
        if self._pending:
            recs, self._pending = self._pending, []
            self._write(recs)

    def nacked(self, offset: int, reason: Optional[str], retry_wall_ns: int) -> None:
        """Record a nack of ``offset`` (durably, with any pending deliveries)."""
        raw = (reason or "").encode("utf-8", "replace")[:_MAX_REASON]
        self.retry_at[offset] = retry_wall_ns
        self.reasons[offset] = raw.decode("utf-8", "replace")
        self._pending.append(_record(NACK, offset, time.time_ns(), retry_wall_ns, raw))
        self.flush()

    def mark_done(self, offsets: Iterable[int]) -> None:
        """Record ``offsets`` as processed (durably) though below them a
        message is still held, so the group offset cannot cover them yet."""
        new = [o for o in offsets if o >= self._committed and o not in self.done]
        if not new:
            return
        self.done.update(new)
        t = time.time_ns()
        self._pending.extend(_record(DONE, o, t) for o in new)
        self.flush()

    def forget_below(self, committed: int) -> None:
        """The group's committed offset moved to ``committed``: drop what is
        below it (rewriting the file once obsolete records dominate)."""
        if committed <= self._committed:
            return
        self._committed = committed
        for d in (self.times, self.reasons, self.retry_at):
            for o in [o for o in d if o < committed]:
                del d[o]
        self.done = {o for o in self.done if o >= committed}
        live = sum(len(v) for v in self.times.values()) + len(self.reasons) + len(self.done)
        if self._entries > 2 * live + 256:
            self._rewrite()

    def _write(self, recs: List[bytes]) -> None:
        if not self._file_ok:
            self._rewrite()  # the state in memory already holds what ``recs`` say
            return
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            write_all(fd, b"".join(recs))
            if self._sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        self._entries += len(recs)

    def _rewrite(self) -> None:
        """Replace the file with the live state (temp file, fsync, rename)."""
        recs: List[bytes] = []
        for off in sorted(self.times):
            recs.extend(_record(DELIVER, off, t) for t in self.times[off])
        for off in sorted(self.retry_at):
            recs.append(_record(NACK, off, 0, self.retry_at[off], self.reasons.get(off, "").encode("utf-8")))
        recs.extend(_record(DONE, o, 0) for o in sorted(self.done))
        d = os.path.dirname(self.path)
        os.makedirs(d, mode=0o700, exist_ok=True)
        atomic_write(d, os.path.basename(self.path), [self._header] + recs, self._sync)
        self._file_ok = True
        self._entries = len(recs)
