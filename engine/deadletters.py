"""Dead letters of the durable scheduling queues: the messages a consumer
could not process in ``max_deliveries`` attempts (SQS ``maxReceiveCount``,
RabbitMQ ``x-delivery-limit``, JetStream ``MaxDeliver``).

Where they go
-------------
A durable :class:`~engine.scheduling.DurablePriorityQueue` or
:class:`~engine.scheduling.DurableKeyedQueue` opened with
``max_deliveries=N`` counts every hand-out of a message in its delivery
journal (see ``engine/scheduling/_deliveries.py``) *before* handing it out,
so a consumer killed while processing has used one delivery. A message
handed out N times that is nacked again, or that comes round once more
(after a crash), is not delivered: it is appended to the dead-letter log
``DIR/dlq`` (an :class:`engine.Log`) and then counts as processed.

Each dead letter is one record of that log: its key is the message's id in
the queue (``"<source log>:<offset>@<log id>"``, e.g. ``"L1:42@6f1c..."``),
its value a small header (``b"EQDL"``, u32 length of a JSON object) followed
by the message's payload. The JSON object holds what an operator needs:
the queue's kind, the source log and level/partition, the deliveries, the
wall-clock time of each (ns), the last nack's reason, when it was moved.
A message id is appended once: a consumer that crashes between the append
and its commit finds the id there on restart and does not append it again,
so a message is never both dead-lettered twice nor delivered again.

Managing them (``queue-engine dlq ls|show|replay|purge DIR``)
------------------------------------------------------------
The *head* (``DIR/dlq.head``, JSON written atomically) is the offset of the
first dead letter still pending: :func:`list_letters` shows the pending
ones (or all), :func:`purge` moves the head past them, :func:`replay`
appends each pending one to its level's (partition's) log as a new
message, with a fresh delivery count, then moves the head past it.

Replay is idempotent across crashes: each replayed record carries the key
``b"dlq-replay:<dlq log id>:<dlq offset>"``, and the head file also records
where every target log ended when it was written. A replay that starts
again (after a SIGKILL anywhere) first scans the target logs from those
ends for replay keys, and skips the dead letters found there: nothing is
lost (the head moves only after the appends are durable) and nothing is
appended twice. Replay appends to the queue's logs, so it needs their
writer role: stop the queue's producer first (``LogLocked`` otherwise).
"""

from __future__ import annotations

import json
import os
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from engine import _crashpoints as _cp
from engine.errors import CorruptLog, EngineError, LogLocked

from ._fsutil import Durability, atomic_write

DLQ_DIR = "dlq"
"""The dead-letter log's directory inside the queue's directory."""
HEAD_FILE = "dlq.head"
"""The replay/purge progress file inside the queue's directory."""
REPLAY_KEY = b"dlq-replay:"
"""Prefix of the key a replayed message carries in its level/partition log."""

_MAGIC = b"EQDL"
_LEN = struct.Struct("<I")
_MAX_META = 1 << 20
_LOCK_WAIT = 10.0  # s: how long a consumer waits for another one's append to the dlq
_REPLAY_BATCH = 256  # dead letters appended per durable step of a replay

PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class DeadLetter:
    """One dead letter (one record of ``DIR/dlq``).

    ``offset`` is its offset in the dead-letter log; ``id`` the message's id
    in the queue; ``source`` its log there (``"L1"``, ``"delay"``, ``"P3"``,
    ``"D3"``); ``target`` its level (priority queue) or partition (keyed
    queue), where :func:`replay` puts it back; ``deliveries`` how many times
    it was handed out, at the wall-clock times ``delivered_at`` (ns);
    ``reason`` the last nack's reason (None if it was never nacked: its
    consumers crashed or never acked); ``enqueued_at`` its put time and
    ``dead_at`` when it was moved here (ns); ``payload`` the message.
    """

    offset: int
    id: str
    kind: str
    source: str
    target: int
    deliveries: int
    delivered_at: List[int] = field(default_factory=list)
    reason: Optional[str] = None
    enqueued_at: int = 0
    dead_at: int = 0
    payload: bytes = b""

    def as_dict(self, payload: bool = False) -> Dict[str, Any]:
        """A JSON-ready dict; with ``payload``, the message as ``payload_hex``
        (and ``payload_text`` when it is valid UTF-8)."""
        out: Dict[str, Any] = {
            "offset": self.offset, "id": self.id, "kind": self.kind, "source": self.source,
            "target": self.target, "deliveries": self.deliveries, "delivered_at": list(self.delivered_at),
            "reason": self.reason, "enqueued_at": self.enqueued_at, "dead_at": self.dead_at,
            "size": len(self.payload),
        }
        if payload:
            out["payload_hex"] = self.payload.hex()
            try:
                out["payload_text"] = self.payload.decode("utf-8")
            except UnicodeDecodeError:
                pass
        return out


def message_id(source: str, offset: int, log_id: str) -> str:
    """The id of the message at ``offset`` of the queue log ``source``."""
    return f"{source}:{offset}@{log_id}"


def encode_letter(meta: Dict[str, Any], payload: bytes) -> bytes:
    """The value of a dead-letter record: header, JSON ``meta``, payload."""
    blob = json.dumps(meta, sort_keys=True).encode("utf-8")
    return _MAGIC + _LEN.pack(len(blob)) + blob + payload


def decode_letter(path: str, offset: int, key: Any, value: Any) -> DeadLetter:
    """Parse one record of the dead-letter log ``path``; ``CorruptLog`` for
    anything that is not a dead letter (never a crash on hostile bytes)."""
    raw = bytes(value)
    where = os.path.join(path, f"offset {offset}")
    if len(raw) < 8 or raw[:4] != _MAGIC:
        raise CorruptLog(where, 0, "not a dead letter (bad header)")
    (n,) = _LEN.unpack_from(raw, 4)
    if n > _MAX_META or 8 + n > len(raw):
        raise CorruptLog(where, 0, f"dead-letter metadata length {n} runs past the record")
    try:
        meta = json.loads(raw[8:8 + n].decode("utf-8"))
        if not isinstance(meta, dict):
            raise ValueError("not an object")
        times = [int(t) for t in meta.get("delivered_at", [])]
        reason = meta.get("reason")
        letter = DeadLetter(
            offset=offset, id=bytes(key).decode("utf-8") if key is not None else "",
            kind=str(meta["kind"]), source=str(meta["source"]), target=int(meta["target"]),
            deliveries=int(meta["deliveries"]), delivered_at=times,
            reason=None if reason is None else str(reason), enqueued_at=int(meta.get("enqueued_at", 0)),
            dead_at=int(meta.get("dead_at", 0)), payload=raw[8 + n:])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise CorruptLog(where, 0, f"dead-letter metadata is not valid ({exc})") from None
    if letter.kind not in ("priority", "keyed") or letter.target < 0:
        raise CorruptLog(where, 0, f"dead letter for {letter.kind!r} {letter.target}")
    return letter


class DeadLetterWriter:
    """Appends dead letters to ``DIR/dlq``, each message id at most once.

    Used by the durable queues' consumers, in any number of processes: each
    append opens the log's writer role for the moment it takes (waiting for
    another consumer's append, up to ``_LOCK_WAIT`` s), reads what was
    appended since its last look, and appends only an id not already there.
    """

    def __init__(self, queue_path: str, durability: Durability, segment_bytes: int) -> None:
        self._dir = os.path.join(queue_path, DLQ_DIR)
        self._durability = durability
        self._segment_bytes = segment_bytes
        self._reader: Any = None
        self._seen: set = set()

    def add(self, msg_id: str, meta: Dict[str, Any], payload: bytes) -> bool:
        """Append a dead letter unless ``msg_id`` is in the log already.
        True if appended. Returns once it is as durable as the queue."""
        from ._log import Log, LogReader

        deadline = time.monotonic() + _LOCK_WAIT
        while True:
            try:
                log = Log(self._dir, durability=self._durability, segment_bytes=self._segment_bytes)
                break
            except LogLocked:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.005)
        try:
            if self._reader is None:
                self._reader = LogReader(self._dir, start=0)
            while True:
                recs = self._reader.read_many(1024)
                if not recs:
                    break
                for rec in recs:
                    if rec.key is not None:
                        self._seen.add(bytes(rec.key).decode("utf-8", "replace"))
            if msg_id in self._seen:
                return False
            meta = dict(meta, dead_at=time.time_ns())
            log.append(encode_letter(meta, payload), key=msg_id.encode("utf-8"))
            self._seen.add(msg_id)
            return True
        finally:
            log.close()

    def close(self) -> None:
        """Release the reader (the writer role is only held inside :meth:`add`)."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None


# ---------------------------------------------------------------------------
# the queue directory: kind, head
# ---------------------------------------------------------------------------


def _queue_kind(path: str) -> Tuple[str, int]:
    """("priority", levels) or ("keyed", partitions) from ``DIR/queue.json``."""
    meta = os.path.join(path, "queue.json")
    try:
        with open(meta, encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError:
        raise EngineError(f"{path!r} is not a durable queue directory (no queue.json)") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise EngineError(f"{meta!r} is not valid JSON ({exc})") from None
    if isinstance(config, dict):
        for kind, name in (("priority", "levels"), ("keyed", "partitions")):
            n = config.get(name)
            if isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 1 << 16:
                return kind, n
    raise EngineError(f"{meta!r} describes neither a priority nor a keyed queue")


def _target_name(kind: str, target: int) -> str:
    return f"L{target}" if kind == "priority" else f"P{target}"


def _dlq_log_id(path: str) -> Optional[str]:
    try:
        with open(os.path.join(path, DLQ_DIR, "meta"), encoding="utf-8") as f:
            return str(json.load(f)["log_id"])
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptLog(os.path.join(path, DLQ_DIR, "meta"), 0, f"not a log's meta file ({exc})") from None


def _read_head(path: str, log_id: Optional[str]) -> Tuple[int, Dict[str, List[Any]]]:
    """(head offset, target log ends) of the dead-letter log ``log_id``; a
    head written for another incarnation of the log is ignored."""
    hp = os.path.join(path, HEAD_FILE)
    try:
        with open(hp, encoding="utf-8") as f:
            head = json.load(f)
    except FileNotFoundError:
        return 0, {}
    except (ValueError, UnicodeDecodeError) as exc:
        raise EngineError(f"{hp!r} is not valid JSON ({exc}); delete it to see every dead letter again") from None
    if not isinstance(head, dict) or head.get("log_id") != log_id:
        return 0, {}
    off, ends = head.get("head"), head.get("ends", {})
    if not isinstance(off, int) or off < 0 or not isinstance(ends, dict):
        raise EngineError(f"{hp!r} holds no valid head; delete it to see every dead letter again")
    return off, ends


def _write_head(path: str, log_id: str, head: int, ends: Dict[str, List[Any]], durable: bool) -> None:
    body = json.dumps({"log_id": log_id, "head": head, "ends": ends}, sort_keys=True).encode()
    atomic_write(path, HEAD_FILE, body, durable)


def _letters(path: str, start: int) -> List[DeadLetter]:
    from ._log import LogReader

    d = os.path.join(path, DLQ_DIR)
    out: List[DeadLetter] = []
    with LogReader(d) as r:
        end = r.end_offset
        if end is not None and start >= end:
            return out  # a head past the end: the log was cut (a backup's copy, a repair)
        if start > r.position:
            r.seek(start)
        while True:
            recs = r.read_many(1024)
            if not recs:
                return out
            out.extend(decode_letter(d, rec.offset, rec.key, rec.value) for rec in recs)


# ---------------------------------------------------------------------------
# ls / show / purge / replay
# ---------------------------------------------------------------------------


def list_letters(path: PathLike, include_done: bool = False) -> List[DeadLetter]:
    """The dead letters of the durable queue in ``path``: the pending ones
    (not replayed or purged yet), or every one still in the log with
    ``include_done``. Reads only: safe while the queue runs.

    >>> [(d.id, d.deliveries, d.reason) for d in list_letters(qdir)]
    [('L0:3@6f1c...', 5, 'bad input')]
    """
    path = os.fspath(path)
    _queue_kind(path)
    log_id = _dlq_log_id(path)
    if log_id is None:
        return []
    head, _ends = _read_head(path, log_id)
    return _letters(path, 0 if include_done else head)


def show_letter(path: PathLike, which: Union[int, str]) -> DeadLetter:
    """One dead letter, by its offset in the dead-letter log or its message
    id (pending or not); ``KeyError`` if there is none."""
    for letter in list_letters(path, include_done=True):
        if letter.offset == which or letter.id == which:
            return letter
    raise KeyError(f"no dead letter {which!r} in {os.fspath(path)!r}")


def purge(path: PathLike, before: Optional[int] = None) -> int:
    """Drop the pending dead letters (those below the offset ``before``,
    default all): the head moves past them, so they are neither listed as
    pending nor replayed. Returns how many were pending and are dropped."""
    path = os.fspath(path)
    _queue_kind(path)
    log_id = _dlq_log_id(path)
    if log_id is None:
        return 0
    head, ends = _read_head(path, log_id)
    pending = _letters(path, head)
    end = pending[-1].offset + 1 if pending else head
    if before is not None:
        if not isinstance(before, int) or isinstance(before, bool) or before < 0:
            raise ValueError(f"before must be an offset >= 0, not {before!r}")
        end = min(end, max(head, before))
    n = sum(1 for p in pending if p.offset < end)
    if end != head:
        _write_head(path, log_id, end, ends, True)
    return n


@dataclass
class ReplayReport:
    """What :func:`replay` did: ``replayed`` dead letters appended to the
    queue now, ``recovered`` found already appended by a replay that was
    interrupted (not appended again), ``head`` the new head offset."""

    replayed: int = 0
    recovered: int = 0
    head: int = 0

    def as_dict(self) -> Dict[str, int]:
        """A JSON-ready dict."""
        return {"replayed": self.replayed, "recovered": self.recovered, "head": self.head}


def _log_meta(d: str) -> Optional[Dict[str, Any]]:
    try:
        with open(os.path.join(d, "meta"), encoding="utf-8") as f:
            meta = json.load(f)
        return meta if isinstance(meta, dict) else None
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        return None


def _already_replayed(target_dir: str, start: int, dlq_id: str) -> set:
    """DLQ offsets whose replay is in ``target_dir`` at or after ``start``."""
    from ._log import LogReader

    prefix = REPLAY_KEY + dlq_id.encode("ascii") + b":"
    found: set = set()
    with LogReader(target_dir, start=start) as r:
        while True:
            recs = r.read_many(1024)
            if not recs:
                return found
            for rec in recs:
                key = rec.key
                if key is not None:
                    k = bytes(key)
                    if k.startswith(prefix) and k[len(prefix):].isdigit():
                        found.add(int(k[len(prefix):]))


def replay(path: PathLike, durability: Durability = "always", limit: Optional[int] = None,
           progress: Optional[Callable[[int], None]] = None) -> ReplayReport:
    """Put the pending dead letters back into the queue in ``path`` (each
    at the tail of its level's or partition's log, as a new message with a
    fresh delivery count), oldest first, and move the head past them.
    Idempotent across crashes (see the module docs). ``limit``: at most that
    many. ``LogLocked`` while the queue's producer runs: stop it first.
    ``progress(n)`` is called after each durable step with the count so far.
    """
    from ._fsutil import check_durability
    from ._log import Log

    path = os.fspath(path)
    check_durability(durability)
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
        raise ValueError(f"limit must be an int >= 0, not {limit!r}")
    kind, n_targets = _queue_kind(path)
    log_id = _dlq_log_id(path)
    report = ReplayReport()
    if log_id is None:
        return report
    head, ends = _read_head(path, log_id)
    report.head = head
    pending = _letters(path, head)
    if limit is not None:
        pending = pending[:limit]
    if not pending:
        return report
    for letter in pending:
        if letter.kind != kind or letter.target >= n_targets:
            raise CorruptLog(os.path.join(path, DLQ_DIR), 0, f"dead letter {letter.offset} is for {letter.kind} "
                             f"{letter.target}, not for this {kind} queue of {n_targets}")
    logs: Dict[str, Any] = {}
    sync = durability != "none"
    try:
        done: set = set()
        for name in sorted({_target_name(kind, lt.target) for lt in pending}):
            d = os.path.join(path, name)
            meta = _log_meta(d)
            lg = logs[name] = Log(d, durability=durability,
                                  segment_bytes=int(meta["segment_bytes"]) if meta else 16 << 20)
            end = ends.get(name)
            if isinstance(end, list) and len(end) == 2 and end[0] == lg.log_id and isinstance(end[1], int):
                start = max(end[1], lg.start_offset)
            else:
                start = lg.start_offset  # no end recorded for this log: scan it whole
            if start < lg.next_offset:
                done |= _already_replayed(d, start, log_id)
        # the ends before this run's appends are durable before the first one,
        # so a replay that starts again scans only what came after them
        ends = dict(ends)
        ends.update({name: [lg.log_id, lg.next_offset] for name, lg in logs.items()})
        _write_head(path, log_id, head, ends, sync)
        for i in range(0, len(pending), _REPLAY_BATCH):
            batch = pending[i:i + _REPLAY_BATCH]
            for letter in batch:
                if letter.offset in done:
                    report.recovered += 1
                    continue
                key = REPLAY_KEY + f"{log_id}:{letter.offset}".encode("ascii")
                logs[_target_name(kind, letter.target)].append(letter.payload, key=key)
                report.replayed += 1
                if _cp.armed:
                    _cp.point("dlq.replay.appended")
            for lg in logs.values():
                lg.flush()  # durable (per durability) before the head moves past them
            if _cp.armed:
                _cp.point("dlq.replay.flushed")
            report.head = batch[-1].offset + 1
            ends.update({name: [lg.log_id, lg.next_offset] for name, lg in logs.items()})
            _write_head(path, log_id, report.head, ends, sync)
            if _cp.armed:
                _cp.point("dlq.replay.head")
            if progress is not None:
                progress(report.replayed + report.recovered)
    finally:
        for lg in logs.values():
            lg.close()
    return report
