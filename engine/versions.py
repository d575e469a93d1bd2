"""Version checks over the segment log: a compare-and-set store, a durable
deduplicator, and a last-seen-version gate for messages.

``VersionedStore``
    A key -> ``(version, value)`` map whose every write is one record of an
    :class:`engine.Log`, so the store is rebuilt exactly when it is opened
    again, and any process can follow it read-only by tailing that log
    (:meth:`VersionedStore.follow`).  ``put(key, value, expected_version=v)``
    is a compare-and-set: it writes only if the key's version is ``v`` and
    raises :class:`engine.VersionConflict` otherwise, changing nothing.
    ``apply([...])`` is etcd's ``Txn``: every compare passes and every write is
    logged as ONE record, or nothing changes.

``Deduplicator``
    Remembers message ids durably within a bounded window (by count and/or
    age) so that a redelivered message is recognised after a restart.

``VersionGate``
    The message-level check: remembers the last version seen per key and
    rejects stale or out-of-order updates.

Versions
--------
Versions are per key, as in etcd: a missing key is version 0, every write
adds one (the first ``put`` gives version 1) and a delete removes the key, so
it is version 0 again and the next ``put`` gives version 1.  Use
``expected_version=0`` for "create only if absent".  ``store.revision`` is
the store-wide position (the log offset after the last write); it only grows
and is what a follower waits for.

Keys are ``bytes`` or ``str``; a ``str`` key is encoded as UTF-8, so ``"a"``
and ``b"a"`` are the same key and keys come back from :meth:`items` as
``bytes``.  Values are any bytes-like object (copied to ``bytes``).

The exactly-once recipe
-----------------------
The log delivers at least once: a consumer in a group (``LogReader(path,
group="billing")``) resumes at its last ``commit()``, so whatever it did
after that commit is delivered again after a crash.  An exactly-once
*effect* needs the effect and the proof that it happened to be durable as one
unit, which one ``VersionedStore.apply()`` is (one log record):

1. **Deduplicator + the store's offset.**  Put the input offset in the same
   ``apply()`` as the effect, and resume at the offset the store holds (it
   cannot disagree with the state).  The Deduplicator drops producer-side
   duplicates (the same message id appended twice, e.g. a retry); an id is
   marked *after* its effect, so after a crash re-mark the ids between the
   group's committed offset and the store's offset (``first_time`` is
   idempotent); commit the group after the mark (the commit only bounds what
   is re-read and lets retention go)::

       store = VersionedStore("state")
       seen = Deduplicator("seen", window=1_000_000)
       reader = LogReader("orders", group="billing")
       done = int(store.get("offset")[1] or b"0")
       reader.seek(reader.committed() or 0)
       while reader.position < done:              # applied, maybe not marked
           seen.first_time(reader.read().key)
       reader.seek(max(done, reader.position))
       for rec in reader:                         # (or poll() to follow)
           if rec.key not in seen:
               (vc, count), (vs, total) = store.get_many(["count", "sum"])
               store.apply([
                   ("put", "count", b"%d" % (int(count or 0) + 1), vc),
                   ("put", "sum", b"%d" % (int(total or 0) + amount(rec)), vs),
                   ("put", "offset", b"%d" % (rec.offset + 1)),
               ])
               seen.first_time(rec.key)
           if rec.offset % 64 == 63:              # now and then is enough
               reader.commit(rec.offset + 1)

2. **Store versions alone.**  Make each message id a create-only key in the
   same batch: ``("put", b"seen/" + id, b"", 0)``; a duplicate raises
   ``VersionConflict`` and changes nothing.  (Unbounded: delete old ids
   yourself, or use 1.)

3. **Idempotent by version.**  When every message carries the version it
   creates, ``put(key, value, expected_version=version - 1)`` applies it
   once; a redelivery raises ``VersionConflict`` (or use a
   :class:`VersionGate` for updates that may skip versions).

``tests/stress/test_exactly_once.py`` runs recipes 1 and 2 with the consumer
SIGKILLed mid-stream again and again, at random moments and inside each
crash window (after the effect, after the mark, after the commit), and checks
the final count and sum.

Threads and processes
---------------------
One ``VersionedStore`` per directory (the log's writer lock enforces it).
Its methods are safe to call from many threads: compare + append + apply run
under one lock, so of two CAS writers on the same version exactly one wins.
With ``durability="always"`` a write waits for its sync *after* releasing
that lock, so writers in several threads share one sync (group commit); the
flip side is that another thread's ``get`` may see a write a moment before
its ``put`` returns (a power loss in that moment loses it, as it loses any
write whose ``put`` has not returned yet; a process crash loses neither).
``get`` takes no lock: each single read sees a whole write.  For a view of
several keys that no batch is half-applied in, use :meth:`VersionedStore.get_many`
or :meth:`VersionedStore.items` (they take the lock).
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import threading
import time
import zlib
from collections import deque
from typing import (
    Any,
    Callable,
    Deque,
    Dict,
    Iterable,
    Iterator,
    List,
    Optional,
    Sequence,
    Set,
    Tuple,
    Union,
)

from ._fsutil import Durability, atomic_write, check_durability, make_dirs
from ._versions import _norm_key, _norm_value, _StoreCore
from .errors import Closed, CorruptLog, EngineError, LogBroken, Timeout, VersionConflict

__all__ = ["VersionedStore", "StoreFollower", "Deduplicator", "VersionGate"]

_logger = logging.getLogger("engine")

Key = Union[bytes, str]
MergeFn = Callable[[bytes, Optional[bytes], bytes], Optional[bytes]]

# ---------------------------------------------------------------------------
# record encoding
#
# put     key = the user key, value = the user value, both untouched: the put
#         path allocates nothing but the (version, value) tuple, and the new
#         version is not stored because replay derives it (previous + 1; a
#         put always adds one) from the snapshot it starts at.
# delete  no key; value = [op u8 = 2][old version u64] + user key
# batch   no key; value = [op u8 = 3][entries u32] + entries, each
#         [op u8][version u64][key len u32][value len u32] + key + value
#         (version = the new one for a put, the old one for a delete): ONE
#         record, so a crash leaves all of it or none.
# ---------------------------------------------------------------------------

_OP_PUT = 1
_OP_DEL = 2
_OP_TXN = 3
_DEL_HDR = struct.Struct("<BQ")  # op, old version
_TXN_HDR = struct.Struct("<BI")  # op, entry count
_TXN_ENTRY = struct.Struct("<BQII")  # op, version, key length, value length
_MISSING: Tuple[int, None] = (0, None)
_NEVER = 1 << 62  # a log offset never reached: no automatic snapshot

_LOG_DIR = "log"
_SNAP_PREFIX = "snap-"
_SNAP_SUFFIX = ".snap"
_SNAP_GROUP = "versions-snapshot"  # consumer group that pins the log from the oldest kept snapshot
_SNAP_MAGIC = b"QESNAP01"
_SNAP_FORMAT = 1
_SNAP_HEAD = struct.Struct("<8sIIQQ")  # magic, format, log-id length, covered offset, entries
_SNAP_ENTRY = struct.Struct("<IIQ")  # key length, value length, version
_SNAP_TAIL = struct.Struct("<I")  # crc32 of everything before it
_SNAP_KEEP = 2  # snapshots kept: if the newest is damaged, the older one + the log still rebuild


def _check_expected(expected: Any) -> None:
    if expected is not None and (type(expected) is not int or expected < 0):
        if isinstance(expected, int) and not isinstance(expected, bool) and expected >= 0:
            return
        raise TypeError(f"expected_version must be an int >= 0 or None, got {expected!r}")


def _corrupt(where: str, position: int, reason: str) -> CorruptLog:
    return CorruptLog(where, position, reason)


def _apply_record(
    data: Dict[bytes, Tuple[int, bytes]], rkey: Any, rvalue: Any, where: str, offset: int
) -> None:
    """Replay one log record into ``data`` (shared by open, reopen and followers)."""
    if rkey is not None:  # a put
        key = bytes(rkey)
        cur = data.get(key)
        data[key] = (1 if cur is None else cur[0] + 1, bytes(rvalue))
        return
    blob = bytes(rvalue)
    if not blob:
        raise _corrupt(where, offset, "empty record: not a VersionedStore write")
    op = blob[0]
    if op == _OP_DEL and len(blob) >= _DEL_HDR.size:
        data.pop(blob[_DEL_HDR.size :], None)
    elif op == _OP_TXN and len(blob) >= _TXN_HDR.size:
        _apply_txn(data, blob, _TXN_HDR.unpack_from(blob)[1], where, offset)
    else:
        raise _corrupt(where, offset, f"not a VersionedStore write (op {op}, {len(blob)} bytes)")


def _encode_txn(writes: Sequence[Tuple[int, bytes, int, bytes]]) -> bytes:
    parts = [_TXN_HDR.pack(_OP_TXN, len(writes))]
    pack = _TXN_ENTRY.pack
    for op, key, ver, value in writes:
        parts.append(pack(op, ver, len(key), len(value)))
        parts.append(key)
        parts.append(value)
    return b"".join(parts)


def _apply_txn(
    data: Dict[bytes, Tuple[int, bytes]], blob: bytes, count: int, where: str, offset: int
) -> None:
    # decode everything first: a damaged batch must change nothing
    pos = _TXN_HDR.size
    n = len(blob)
    entries = []
    esize = _TXN_ENTRY.size
    for _ in range(count):
        if pos + esize > n:
            raise _corrupt(where, offset, "truncated batch entry")
        op, ver, kl, vl = _TXN_ENTRY.unpack_from(blob, pos)
        pos += esize
        if kl > n - pos or vl > n - pos - kl:
            raise _corrupt(where, offset, "batch entry length beyond the record")
        key = blob[pos : pos + kl]
        pos += kl
        value = blob[pos : pos + vl]
        pos += vl
        if op not in (_OP_PUT, _OP_DEL):
            raise _corrupt(where, offset, f"unknown op {op} in batch")
        entries.append((op, key, ver, value))
    if pos != n:
        raise _corrupt(where, offset, "trailing bytes after the batch")
    for op, key, ver, value in entries:
        if op == _OP_PUT:
            data[key] = (ver, value)
        else:
            data.pop(key, None)


# ---------------------------------------------------------------------------
# snapshots
# ---------------------------------------------------------------------------


def _snap_name(offset: int) -> str:
    return f"{_SNAP_PREFIX}{offset:020d}{_SNAP_SUFFIX}"


def _remove_stale_temps(path: str) -> None:
    """Delete snapshot temp files a killed writer left (we hold the writer lock)."""
    for name in os.listdir(path):
        if name.startswith("." + _SNAP_PREFIX) and name.endswith(".tmp"):
            try:
                os.unlink(os.path.join(path, name))
            except FileNotFoundError:
                pass


def _list_snapshots(path: str) -> List[Tuple[int, str]]:
    """``(covered offset, file)`` of every snapshot in ``path``, newest first."""
    out = []
    try:
        names = os.listdir(path)
    except FileNotFoundError:
        return []
    for name in names:
        if name.startswith(_SNAP_PREFIX) and name.endswith(_SNAP_SUFFIX):
            digits = name[len(_SNAP_PREFIX) : -len(_SNAP_SUFFIX)]
            if len(digits) == 20 and digits.isdigit():
                out.append((int(digits), os.path.join(path, name)))
    out.sort(reverse=True)
    return out


def _write_snapshot(
    path: str,
    log_id: str,
    offset: int,
    items: Iterable[Tuple[bytes, Tuple[int, bytes]]],
    count: int,
    durable: bool = True,
) -> str:
    """Write a snapshot atomically (:func:`engine._fsutil.atomic_write`).

    ``durable=False`` (a ``durability="none"`` store) skips the fsyncs: the
    rename alone keeps it atomic through a process crash, as the log is."""

    def chunks() -> Iterator[bytes]:
        lid = log_id.encode("utf-8")
        crc = 0
        buf: List[bytes] = [
            _SNAP_HEAD.pack(_SNAP_MAGIC, _SNAP_FORMAT, len(lid), offset, count),
            lid,
        ]
        size = sum(map(len, buf))
        pack = _SNAP_ENTRY.pack
        written = 0
        for key, (ver, value) in items:
            buf.append(pack(len(key), len(value), ver))
            buf.append(key)
            buf.append(value)
            size += _SNAP_ENTRY.size + len(key) + len(value)
            written += 1
            if size >= 1 << 20:
                chunk = b"".join(buf)
                crc = zlib.crc32(chunk, crc)
                yield chunk
                buf.clear()
                size = 0
        if written != count:
            raise RuntimeError("snapshot changed while being written")
        chunk = b"".join(buf)
        crc = zlib.crc32(chunk, crc)
        yield chunk + _SNAP_TAIL.pack(crc)

    return atomic_write(path, _snap_name(offset), chunks(), durable)


def _read_snapshot(file: str, log_id: str) -> Tuple[int, Dict[bytes, Tuple[int, bytes]]]:
    """Load and check one snapshot; ``ValueError`` saying why if it is unusable."""
    with open(file, "rb") as f:
        blob = f.read()
    n = len(blob)
    if n < _SNAP_HEAD.size + _SNAP_TAIL.size:
        raise ValueError("truncated (shorter than its header)")
    (crc,) = _SNAP_TAIL.unpack_from(blob, n - _SNAP_TAIL.size)
    body = memoryview(blob)[: n - _SNAP_TAIL.size]
    if zlib.crc32(body) != crc:
        raise ValueError("checksum mismatch")
    magic, fmt, lid_len, offset, count = _SNAP_HEAD.unpack_from(blob, 0)
    if magic != _SNAP_MAGIC:
        raise ValueError("not a VersionedStore snapshot (bad magic)")
    if fmt != _SNAP_FORMAT:
        raise ValueError(f"unknown snapshot format {fmt}")
    pos = _SNAP_HEAD.size
    end = len(body)
    if lid_len > end - pos:
        raise ValueError("log id beyond the end")
    lid = bytes(body[pos : pos + lid_len]).decode("utf-8", "replace")
    pos += lid_len
    if lid != log_id:
        raise ValueError(f"belongs to log {lid!r}, not {log_id!r}")
    data: Dict[bytes, Tuple[int, bytes]] = {}
    esize = _SNAP_ENTRY.size
    for _ in range(count):
        if pos + esize > end:
            raise ValueError("truncated entry")
        kl, vl, ver = _SNAP_ENTRY.unpack_from(body, pos)
        pos += esize
        if kl > end - pos or vl > end - pos - kl:
            raise ValueError("entry length beyond the end")
        key = bytes(body[pos : pos + kl])
        pos += kl
        data[key] = (ver, bytes(body[pos : pos + vl]))
        pos += vl
    if pos != end:
        raise ValueError("trailing bytes after the last entry")
    if len(data) != count:
        raise ValueError("duplicate keys")
    return offset, data


def _load_state(
    path: str, log_id: str, start_offset: int, next_offset: int, quarantine: bool
) -> Tuple[int, Dict[bytes, Tuple[int, bytes]], int]:
    """The newest usable snapshot: ``(covered offset, data, snapshots rejected)``.

    A snapshot that fails its checks, or that the log cannot continue (it
    covers offsets the log no longer has, or lost), is skipped with a warning;
    with ``quarantine`` it is renamed ``*.corrupt`` so it is never tried again.
    Without any usable snapshot the state is rebuilt from the log's start,
    which must then be offset 0.
    """
    rejected = 0
    for offset, file in _list_snapshots(path):
        try:
            if offset > next_offset:
                raise ValueError(f"covers offsets up to {offset} but the log ends at {next_offset}")
            if offset < start_offset:
                raise ValueError(f"the log no longer holds offsets {offset}..{start_offset - 1}")
            covered, data = _read_snapshot(file, log_id)
            if covered != offset:
                raise ValueError(f"file name says offset {offset}, contents say {covered}")
            return offset, data, rejected
        except FileNotFoundError:
            continue  # pruned by the owner meanwhile (a follower racing a snapshot)
        except (OSError, ValueError) as exc:
            rejected += 1
            _logger.warning(
                "VersionedStore %s: snapshot %s unusable (%s); trying an older one / the log",
                path,
                file,
                exc,
            )
            if quarantine:
                try:
                    os.replace(file, file + ".corrupt")
                except OSError:
                    pass
    if start_offset > 0:
        raise CorruptLog(
            os.path.join(path, _LOG_DIR),
            start_offset,
            "no usable snapshot and the log no longer starts at offset 0; the store cannot be rebuilt",
        )
    return 0, {}, rejected


def _replay(reader: Any, data: Dict[bytes, Tuple[int, bytes]], where: str) -> int:
    n = 0
    while True:
        recs = reader.read_many(4096)
        if reader.skipped:
            # the log jumped over records retention deleted: the state would have a hole
            raise CorruptLog(
                where, reader.position, "records needed to rebuild the store were deleted"
            )
        if not recs:
            return n
        for rec in recs:
            _apply_record(data, rec.key, rec.value, where, rec.offset)
        n += len(recs)


# ---------------------------------------------------------------------------
# VersionedStore
# ---------------------------------------------------------------------------


class VersionedStore(_StoreCore):
    """A durable key -> ``(version, value)`` map with compare-and-set writes.

    ``path`` is a directory (created 0700 if missing) holding the log
    (``path/log``) and up to two snapshots.  ``durability`` is the log's:
    ``"always"`` returns from a write only once it is on stable storage;
    ``"interval"`` syncs every ``flush_interval`` s in the background;
    ``"none"`` survives a process crash (page cache) but not a power loss.

    ``snapshot_every``: after this many writes a snapshot is written in a
    background thread (the state is copied under the lock, serialised and
    fsynced outside it), so reopening replays at most about that many records.
    ``None`` turns automatic snapshots off (:meth:`snapshot` still works).
    The log keeps every record the older of the two kept snapshots does not
    cover, so a damaged newest snapshot still rebuilds exactly.

    ``segment_bytes`` is the log's segment size; one write (a put, or a whole
    ``apply`` batch) must fit in a segment, else ``ValueError`` and nothing
    changes.

    ``merge(key, current, proposed) -> value | None`` resolves a version
    conflict instead of raising: ``current`` is the value now stored (``None``
    if absent), the returned value is written at the next version, and
    ``None`` refuses (``VersionConflict`` is raised).  It runs outside the
    store's lock (it may read the store) and is called again if the key
    changes meanwhile.  Give it here for every write or per call.

    >>> with VersionedStore(tmp) as store:              # doctest: +SKIP
    ...     v = store.put("user:1", b"alice")          # 1
    ...     store.put("user:1", b"bob", expected_version=v)   # 2
    ...     store.get("user:1")                        # (2, b'bob')
    """

    def __init__(
        self,
        path: Union[str, os.PathLike[str]],
        durability: Durability = "always",
        snapshot_every: Optional[int] = 100_000,
        merge: Optional[MergeFn] = None,
        segment_bytes: int = 16 << 20,
        flush_interval: float = 0.05,
    ) -> None:
        from ._log import Log, LogReader

        check_durability(durability)
        if snapshot_every is not None and (type(snapshot_every) is not int or snapshot_every < 1):
            raise ValueError(f"snapshot_every must be an int >= 1 or None, got {snapshot_every!r}")
        if merge is not None and not callable(merge):
            raise TypeError("merge must be callable(key, current, proposed) or None")
        self._path = os.fspath(path)
        make_dirs(self._path)  # its name and each new parent's durable
        self._durability = durability
        self._snapshot_every = snapshot_every
        self._merge = merge
        # (_lock, _closed, _data, _append, _sync_log and _snap_at are fields
        # of the compiled _StoreCore, which runs put/get without this module)
        self._snap_thread: Optional[threading.Thread] = None
        self._snap_error: Optional[BaseException] = None
        # a forked child inherits this object: it may not write snapshots
        # into the parent's directory (its log refuses appends by itself)
        self._owner_pid = os.getpid()
        self._snapshots_written = 0
        self._conflicts = 0
        self._merges = 0
        logdir = os.path.join(self._path, _LOG_DIR)
        # "always": group commit across threads.  The log's own "always" syncs
        # inside append, i.e. under the store's lock, so concurrent writers
        # would take turns at one sync each.  Instead the log appends without
        # waiting ("interval" with the longest period: its background sync
        # practically never runs) and a write, once the lock is released,
        # waits for log.flush(end) (_wait_durable; end: past its record):
        # writers that appended meanwhile share that one sync (the log's
        # flush is group-committed).  flush(end) makes every record below end
        # durable, rolled segments included, in every mode: that contract is
        # all this relies on.
        group_commit = durability == "always"
        # retention_bytes=0: drop every sealed segment the snapshot group does not pin
        self._log = Log(
            logdir,
            durability="interval" if group_commit else durability,
            segment_bytes=segment_bytes,
            retention_bytes=0,
            retain_uncommitted=True,
            flush_interval=3600.0 if group_commit else flush_interval,
        )
        try:
            self._pin = _GroupPin(logdir, _SNAP_GROUP)
            if self._pin.committed() is None:
                self._pin.commit(self._log.start_offset)
            t0 = time.perf_counter()
            _remove_stale_temps(self._path)
            covered, data, rejected = _load_state(
                self._path, self._log.log_id, self._log.start_offset, self._log.next_offset, True
            )
            with LogReader(logdir, start=covered) as reader:
                replayed = _replay(reader, data, logdir)
        except BaseException:
            self._log.close()
            raise
        self._data = data
        self._append = self._log.append
        self._sync_log = self._log if group_commit else None
        self._final_revision = 0
        self._snap_offset = covered
        self._snap_at = covered + snapshot_every if snapshot_every is not None else _NEVER
        self._open_stats = {
            "snapshot_offset": covered,
            "replayed_records": replayed,
            "snapshots_rejected": rejected,
            "open_seconds": time.perf_counter() - t0,
        }
        if rejected:
            # a fresh good snapshot now, so the damaged one is not needed again
            self._snapshot_locked(wait=True)

    # -- reads -------------------------------------------------------------
    # get(key), __len__ and __contains__ are _StoreCore's (compiled)

    def get_many(self, keys: Iterable[Key]) -> List[Tuple[int, Optional[bytes]]]:
        """``get`` of several keys, read under the lock: no batch is seen half-applied."""
        norm = [_norm_key(k) for k in keys]
        with self._lock:
            self._check_broken()
            get = self._data.get
            return [get(k, _MISSING) for k in norm]

    def version(self, key: Key) -> int:
        """The version of ``key`` (0 if absent)."""
        return self.get(key)[0]

    def items(self) -> Iterator[Tuple[bytes, Tuple[int, bytes]]]:
        """``(key, (version, value))`` pairs of a consistent copy of the store."""
        with self._lock:
            self._check_broken()
            return iter(list(self._data.items()))

    def keys(self) -> List[bytes]:
        """The keys present now (bytes)."""
        with self._lock:
            self._check_broken()
            return list(self._data)

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.keys())

    @property
    def revision(self) -> int:
        """Store-wide position: the log offset after the last write (only grows)."""
        return self._final_revision if self._closed else self._log.next_offset

    @property
    def path(self) -> str:
        return self._path

    @property
    def closed(self) -> bool:
        return self._closed

    # -- writes ------------------------------------------------------------
    # put(key, value, expected_version=None, merge=None) is _StoreCore's
    # (compiled): the compare-and-set that passes never runs Python code;
    # the one that fails lands in _put_conflict below.

    def _put_conflict(
        self, key: bytes, value: bytes, expected: Any, merge: Optional[MergeFn]
    ) -> int:
        _check_expected(expected)
        merge = merge if merge is not None else self._merge
        get = self._data.get
        while True:
            cur = get(key, _MISSING)
            if cur[0] == expected:  # changed back meanwhile: a plain CAS again
                with self._lock:
                    if get(key, _MISSING)[0] == expected:
                        ver, off = self._write_locked(key, value, expected)
                    else:
                        continue
                self._wait_durable(off)
                return ver
            self._conflicts += 1
            if merge is None:
                raise VersionConflict(key, expected, cur[0])
            merged = merge(key, cur[1], value)
            if merged is None:
                raise VersionConflict(key, expected, cur[0])
            if type(merged) is not bytes:
                merged = _norm_value(merged)
            with self._lock:
                if get(key, _MISSING)[0] != cur[0]:
                    continue  # the key moved on while merge ran: merge against the newer value
                self._merges += 1
                ver, off = self._write_locked(key, merged, cur[0])
            self._wait_durable(off)
            return ver

    def _write_locked(self, key: bytes, value: bytes, ver: int) -> Tuple[int, int]:
        self._check_open()
        ver += 1
        try:
            off = self._append(value, key)
        except LogBroken as exc:
            self._note_broken(exc)
            raise
        self._data[key] = (ver, value)
        if off >= self._snap_at:
            self._snapshot_locked(wait=False)
        return ver, off

    def delete(self, key: Key, expected_version: Optional[int] = None) -> bool:
        """Remove ``key``; ``True`` if it was there.

        With ``expected_version`` it is a compare-and-delete (0 matches an
        absent key, which then stays absent); a mismatch raises
        :class:`VersionConflict` and changes nothing.  Deleting resets the
        key's version to 0.
        """
        k = _norm_key(key)
        _check_expected(expected_version)
        with self._lock:
            self._check_open()
            cur = self._data.get(k, _MISSING)
            if expected_version is not None and expected_version != cur[0]:
                self._conflicts += 1
                raise VersionConflict(k, expected_version, cur[0])
            if cur[1] is None:
                return False
            try:
                off = self._append(_DEL_HDR.pack(_OP_DEL, cur[0]) + k)
            except LogBroken as exc:
                self._note_broken(exc)
                raise
            del self._data[k]
            if off >= self._snap_at:
                self._snapshot_locked(wait=False)
        self._wait_durable(off)
        return True

    def apply(self, ops: Iterable[Sequence[Any]], *, merge: Optional[MergeFn] = None) -> List[int]:
        """Apply a batch all-or-nothing (etcd ``Txn``); return each op's resulting version.

        Each op is a tuple:

        * ``("put", key, value)`` or ``("put", key, value, expected_version)``
        * ``("delete", key)`` or ``("delete", key, expected_version)``
        * ``("check", key, expected_version)``: a compare only

        Ops see the effect of earlier ops of the same batch.  If any compare
        fails (and ``merge``, here or the store's, does not resolve a put),
        :class:`VersionConflict` is raised for the first failing op and nothing
        changes.  Otherwise every write becomes ONE log record: after a crash
        the batch is either all there or not at all.  ``merge`` runs under the
        store's lock here, so it must not call the store.
        """
        parsed = [_parse_op(op) for op in ops]
        merge = merge if merge is not None else self._merge
        with self._lock:
            self._check_open()
            get = self._data.get
            overlay: Dict[bytes, Tuple[int, Optional[bytes]]] = {}
            writes: List[Tuple[int, bytes, int, bytes]] = []
            result: List[int] = []
            for kind, key, value, expected in parsed:
                cur = overlay.get(key)
                if cur is None:
                    cur = get(key, _MISSING)
                ver = cur[0]
                if expected is not None and expected != ver:
                    if kind == "put" and merge is not None:
                        merged = merge(key, cur[1], value)
                        if merged is None:
                            self._conflicts += 1
                            raise VersionConflict(key, expected, ver)
                        value = merged if type(merged) is bytes else _norm_value(merged)
                        self._merges += 1
                    else:
                        self._conflicts += 1
                        raise VersionConflict(key, expected, ver)
                if kind == "put":
                    ver += 1
                    overlay[key] = (ver, value)
                    writes.append((_OP_PUT, key, ver, value))
                    result.append(ver)
                elif kind == "delete":
                    if cur[1] is not None:
                        overlay[key] = _MISSING
                        writes.append((_OP_DEL, key, ver, b""))
                    result.append(0)
                else:
                    result.append(ver)
            if not writes:
                return result
            try:
                if len(writes) == 1 and writes[0][0] == _OP_PUT:
                    off = self._append(writes[0][3], writes[0][1])
                else:
                    off = self._append(_encode_txn(writes))
            except LogBroken as exc:
                self._note_broken(exc)
                raise
            # puts become visible together (one dict.update); then the deletes
            data = self._data
            data.update({k: v for k, v in overlay.items() if v[1] is not None})  # type: ignore[misc]
            for k, v in overlay.items():
                if v[1] is None:
                    data.pop(k, None)
            if off >= self._snap_at:
                self._snapshot_locked(wait=False)
        self._wait_durable(off)
        return result

    # -- snapshots, lifecycle ----------------------------------------------

    def snapshot(self) -> int:
        """Write a snapshot now (waits for it); return the log offset it covers."""
        while True:
            self._join_snapshot_thread()
            with self._lock:
                self._check_open()
                if self._snapshot_running():
                    continue  # a writer started another one meanwhile
                self._snapshot_locked(wait=True)
                return self._snap_offset

    def _snapshot_running(self) -> bool:
        t = self._snap_thread
        return t is not None and t.is_alive()

    def _join_snapshot_thread(self) -> None:
        # never with the lock held: the thread takes it at its end
        t = self._snap_thread
        if t is not None:
            t.join()

    def _snapshot_locked(self, wait: bool) -> None:
        # called with the lock held; the copy is O(n) in C, the writing is not
        # under the lock.  wait=True only when no snapshot thread is running.
        if self._snapshot_running():
            # one at a time: try again a little later
            self._snap_at = self._log.next_offset + max(1, (self._snapshot_every or 1) // 8)
            return
        offset = self._log.next_offset
        copy = dict(self._data)
        self._snap_at = (
            offset + self._snapshot_every if self._snapshot_every is not None else _NEVER
        )
        if wait:
            self._write_snapshot(offset, copy, True)
        else:
            t = threading.Thread(
                target=self._write_snapshot,
                args=(offset, copy, False),
                name="VersionedStore-snapshot",
                daemon=True,
            )
            self._snap_thread = t
            t.start()

    def _write_snapshot(
        self, offset: int, copy: Dict[bytes, Tuple[int, bytes]], locked: bool
    ) -> None:
        try:
            durable = self._durability != "none"
            if durable:
                # the log must be durable up to the snapshot first, or a power
                # loss could leave a snapshot ahead of its log
                self._log.flush()
            _write_snapshot(self._path, self._log.log_id, offset, copy.items(), len(copy), durable)
            self._snap_offset = offset
            self._snapshots_written += 1
            if locked:
                self._prune_snapshots()
            else:
                with self._lock:
                    if not self._closed:
                        self._prune_snapshots()
        except BaseException as exc:  # reported by stats() and close()
            self._snap_error = exc
            _logger.error("VersionedStore %s: snapshot at %d failed: %r", self._path, offset, exc)

    def _prune_snapshots(self) -> None:
        snaps = _list_snapshots(self._path)
        keep = snaps[:_SNAP_KEEP]
        for _, file in snaps[_SNAP_KEEP:]:
            try:
                os.unlink(file)
            except FileNotFoundError:
                pass
        if len(keep) == _SNAP_KEEP:
            # the log is needed from the older kept snapshot on
            pin = keep[-1][0]
            if (self._pin.committed() or 0) < pin:
                self._pin.commit(pin)
                self._log.apply_retention()

    def flush(self) -> None:
        """Make every write so far durable (a no-op cost with ``always``)."""
        self._log.flush()

    def stats(self) -> Dict[str, Any]:
        """Counters: keys, revision, snapshots, conflicts, merges, log stats."""
        out: Dict[str, Any] = {
            "keys": len(self._data),
            "revision": self.revision,
            "durability": self._durability,
            "snapshot_offset": self._snap_offset,
            "snapshots_written": self._snapshots_written,
            "snapshot_error": repr(self._snap_error) if self._snap_error else None,
            "conflicts": self._conflicts,
            "merges": self._merges,
            "open": dict(self._open_stats),
        }
        if not self._closed:
            out["log"] = self._log.stats()
        return out

    def _check_open(self) -> None:
        if self._closed:
            raise Closed(f"VersionedStore {self._path!r} is closed")

    def close(self) -> None:
        """Finish a snapshot in flight, write a last one if writes happened since, close the log.

        In a forked child it only lets go of the inherited store: no
        snapshot, nothing written (the parent owns the directory)."""
        if os.getpid() != self._owner_pid:
            self._closed = True
            self._append = _closed_append
            self._log.close()  # inert in a child: drops the handle, touches no file
            return
        while True:
            self._join_snapshot_thread()
            with self._lock:
                if self._closed:
                    return
                if not self._snapshot_running():
                    self._close_locked()
                    return

    def _close_locked(self) -> None:
        try:
            if self._snapshot_every is not None and self._log.next_offset > self._snap_offset:
                self._snapshot_locked(wait=True)
        finally:
            self._final_revision = self._log.next_offset
            self._closed = True
            self._append = _closed_append
            self._log.close()

    def __enter__(self) -> VersionedStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._data)} keys, revision {self.revision}"
        return f"<VersionedStore {self._path!r} {state}>"

    @staticmethod
    def follow(path: Union[str, os.PathLike[str]]) -> StoreFollower:
        """A read-only view of the store at ``path`` that tails its log (any process)."""
        return StoreFollower(path)


class _GroupPin:
    """A consumer group used only for its committed offset: with the log's
    ``retain_uncommitted=True``, retention never deletes a segment holding
    offsets at or after it.  A reader is opened per call (rare) so that none
    stays open, mapping a segment that retention then could not free."""

    def __init__(self, logdir: str, group: str) -> None:
        self._logdir = logdir
        self._group = group

    def committed(self) -> Optional[int]:
        from ._log import LogReader

        with LogReader(self._logdir, group=self._group) as r:
            return r.committed()

    def commit(self, offset: int) -> None:
        from ._log import LogReader

        with LogReader(self._logdir, group=self._group) as r:
            r.commit(offset)


def _closed_append(value: Any, key: Any = None) -> int:
    raise Closed("VersionedStore is closed")


def _parse_op(op: Sequence[Any]) -> Tuple[str, bytes, bytes, Optional[int]]:
    if isinstance(op, (str, bytes)) or not isinstance(op, (tuple, list)) or not op:
        raise TypeError(f"each op must be a tuple like ('put', key, value), got {op!r}")
    kind = op[0]
    if kind == "put":
        if len(op) not in (3, 4):
            raise TypeError(f"put op is ('put', key, value[, expected_version]), got {op!r}")
        expected = op[3] if len(op) == 4 else None
        _check_expected(expected)
        return "put", _norm_key(op[1]), _norm_value(op[2]), expected
    if kind == "delete":
        if len(op) not in (2, 3):
            raise TypeError(f"delete op is ('delete', key[, expected_version]), got {op!r}")
        expected = op[2] if len(op) == 3 else None
        _check_expected(expected)
        return "delete", _norm_key(op[1]), b"", expected
    if kind == "check":
        if len(op) != 3 or op[2] is None:
            raise TypeError(f"check op is ('check', key, expected_version), got {op!r}")
        _check_expected(op[2])
        return "check", _norm_key(op[1]), b"", op[2]
    raise ValueError(f"op kind must be 'put', 'delete' or 'check', got {kind!r}")


# ---------------------------------------------------------------------------
# follower
# ---------------------------------------------------------------------------


class StoreFollower:
    """A read-only replica of a :class:`VersionedStore`, in any process.

    It loads the newest usable snapshot, then applies the store's log records
    in order, so it sees exactly the owner's versions, only later.  Nothing
    happens in the background: call :meth:`refresh` (apply what is there),
    :meth:`poll` (wait up to ``timeout`` for at least one new write) or
    :meth:`wait_for` (wait until it reaches a revision, or a key reaches a
    version).  If it falls so far behind that log retention dropped records it
    had not read, it reloads from the newest snapshot.
    """

    def __init__(self, path: Union[str, os.PathLike[str]]) -> None:
        self._path = os.fspath(path)
        self._logdir = os.path.join(self._path, _LOG_DIR)
        if not os.path.isdir(self._logdir):
            raise FileNotFoundError(errno.ENOENT, "no VersionedStore here", self._path)
        self._reader: Any = None
        self._closed = False
        self._reload()
        self.refresh()

    def _reload(self) -> None:
        from ._log import LogReader

        if self._reader is not None:
            self._reader.close()
            self._reader = None
        log_id = _read_log_meta(self._logdir)
        for attempt in range(100):
            try:
                covered, data, _ = _load_state(
                    self._path, log_id, _log_start(self._logdir), 1 << 62, False
                )
            except CorruptLog:
                # the owner may be between writing a snapshot and pruning
                # the log behind it: look again before giving up
                if attempt >= 20:
                    raise
                time.sleep(0.05)
                continue
            reader = LogReader(self._logdir, start=covered)
            if reader.skipped == 0:
                break
            # retention moved past the snapshot while we loaded it: load the newer one
            reader.close()
        else:
            raise EngineError(f"follower of {self._path!r} cannot catch up with log retention")
        self._reader = reader
        self._data: Dict[bytes, Tuple[int, bytes]] = data
        self._revision = covered

    def refresh(self) -> int:
        """Apply every write available now; return how many records were applied."""
        if self._closed:
            raise Closed(f"follower of {self._path!r} is closed")
        n = 0
        reader = self._reader
        while True:
            recs = reader.read_many(4096)
            if reader.skipped:
                # retention deleted records we had not read yet (the reader
                # jumped over them): start again from the newest snapshot
                self._reload()
                reader = self._reader
                n += 1
                continue
            if not recs:
                return n
            for rec in recs:
                _apply_record(self._data, rec.key, rec.value, self._logdir, rec.offset)
            self._revision = recs[-1].offset + 1
            n += len(recs)

    def poll(self, timeout: Optional[float] = 1.0) -> int:
        """Wait up to ``timeout`` s (``None``: forever) for new writes; apply them; return how many."""
        n = self.refresh()
        if n:
            return n
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = 1.0 if deadline is None else max(0.0, deadline - time.monotonic())
            rec = self._reader.poll(min(left, 1.0))
            if self._reader.skipped:
                self._reload()
                return 1 + self.refresh()
            if rec is not None:
                _apply_record(self._data, rec.key, rec.value, self._logdir, rec.offset)
                self._revision = rec.offset + 1
                return 1 + self.refresh()
            if deadline is not None and time.monotonic() >= deadline:
                return 0

    def wait_for(
        self,
        revision: Optional[int] = None,
        *,
        key: Optional[Key] = None,
        version: Optional[int] = None,
        timeout: Optional[float] = None,
    ) -> None:
        """Block until the follower reaches ``revision`` (``store.revision`` of
        the owner), or ``key`` reaches ``version``; raise ``engine.Timeout`` after
        ``timeout`` s."""
        if (revision is None) == (key is None):
            raise TypeError("wait_for needs either revision or key= (with version=)")
        if key is not None and version is None:
            raise TypeError("wait_for(key=...) needs version=")
        k = None if key is None else _norm_key(key)
        deadline = None if timeout is None else time.monotonic() + timeout

        def reached() -> bool:
            if k is None:
                return self._revision >= revision  # type: ignore[operator]
            return self._data.get(k, _MISSING)[0] >= version  # type: ignore[operator]

        self.refresh()
        while not reached():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise Timeout(
                    f"follower of {self._path!r} did not reach the wanted version in {timeout} s"
                )
            self.poll(0.5 if left is None else min(left, 0.5))

    def get(self, key: Key) -> Tuple[int, Optional[bytes]]:
        """``(version, value)`` as of the last refresh; ``(0, None)`` if absent."""
        if type(key) is not bytes:
            key = _norm_key(key)
        return self._data.get(key, _MISSING)

    def items(self) -> Iterator[Tuple[bytes, Tuple[int, bytes]]]:
        """``(key, (version, value))`` pairs as of the last refresh."""
        return iter(list(self._data.items()))

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return _norm_key(key) in self._data

    @property
    def revision(self) -> int:
        """The owner's ``revision`` this follower has reached."""
        return self._revision

    def close(self) -> None:
        """Close the log reader."""
        if not self._closed:
            self._closed = True
            self._reader.close()

    def __enter__(self) -> StoreFollower:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_log_meta(logdir: str) -> str:
    """The log id of ``logdir``, through a reader (no writer lock needed)."""
    from ._log import LogReader

    with LogReader(logdir, start=0) as r:
        lid = r.log_id
    if not lid:
        raise CorruptLog(os.path.join(logdir, "meta"), 0, "the log has no id")
    return str(lid)


def _log_start(logdir: str) -> int:
    """The first offset the log still holds (the oldest segment's base)."""
    bases = []
    for name in os.listdir(logdir):
        if name.endswith(".seg") and name[:-4].isdigit():
            bases.append(int(name[:-4]))
    return min(bases) if bases else 0


# ---------------------------------------------------------------------------
# Deduplicator
# ---------------------------------------------------------------------------

MsgId = Union[bytes, str, int]
_ID_INT = b"i"  # log key tag of an int id (bytes and str ids carry no key)


class Deduplicator:
    """Remembers message ids, durably, within a bounded window.

    ``first_time(msg_id)`` is ``True`` the first time an id is seen within the
    window and ``False`` for a repeat; the id is remembered before it returns
    (on stable storage with ``durability="always"``).  The window keeps the
    last ``window`` ids and (with ``max_age`` seconds) only ids younger than
    that; an id that fell out of the window counts as new again.  Ids are
    ``bytes``, ``str`` (UTF-8, equal to its bytes) or ``int``.

    Each new id is one record of an :class:`engine.Log` at ``path``; opening
    replays the log's window, and log retention drops segments holding only
    forgotten ids, so the directory stays bounded.  Memory: roughly 100 bytes
    + the id per remembered id.  Thread-safe.

    See the module docstring for the exactly-once recipe.
    """

    def __init__(
        self,
        path: Union[str, os.PathLike[str]],
        window: Optional[int] = 1_000_000,
        max_age: Optional[float] = None,
        durability: Durability = "always",
        segment_bytes: int = 16 << 20,
        flush_interval: float = 0.05,
    ) -> None:
        from ._log import Log, LogReader

        check_durability(durability)
        if window is not None and (type(window) is not int or window < 1):
            raise ValueError(f"window must be an int >= 1 or None, got {window!r}")
        if max_age is not None and not (isinstance(max_age, (int, float)) and max_age > 0):
            raise ValueError(f"max_age must be a number of seconds > 0 or None, got {max_age!r}")
        if window is None and max_age is None:
            raise ValueError(
                "give window and/or max_age: an unbounded Deduplicator would grow forever"
            )
        self._path = os.fspath(path)
        self._window = window if window is not None else 1 << 62
        self._max_age_ns = None if max_age is None else int(max_age * 1e9)
        self._lock = threading.Lock()
        self._closed = False
        self._log = Log(
            self._path,
            durability=durability,
            segment_bytes=segment_bytes,
            retention_bytes=0,
            retain_uncommitted=True,
            flush_interval=flush_interval,
        )
        self._seen: Set[Union[bytes, int]] = set()
        self._order: Deque[Union[bytes, int]] = deque()
        self._stamps: Optional[Deque[int]] = deque() if self._max_age_ns is not None else None
        self._repeats = 0
        try:
            self._pin = _GroupPin(self._path, "dedup-window")
            if self._pin.committed() is None:
                self._pin.commit(self._log.start_offset)
            t0 = time.perf_counter()
            replayed = self._replay(LogReader)
        except BaseException:
            self._log.close()
            raise
        self._open_seconds = time.perf_counter() - t0
        self._replayed = replayed
        self._pin_every = max(1024, min(self._window, 1 << 20) // 4)
        self._next_pin = self._log.next_offset + self._pin_every
        self._append = self._log.append

    def _replay(self, LogReader: Any) -> int:
        # only the last `window` records can still be remembered
        start = max(self._log.start_offset, self._log.next_offset - self._window)
        n = 0
        with LogReader(self._path, start=start) as reader:
            while True:
                recs = reader.read_many(4096)
                if not recs:
                    break
                for rec in recs:
                    mid: Union[bytes, int] = bytes(rec.value)
                    if rec.key is not None and bytes(rec.key) == _ID_INT:
                        mid = int(mid)
                    # expire as first_time did when it wrote this record, so an
                    # id that aged out and came back is remembered from its return
                    self._expire(rec.timestamp)
                    self._remember(mid, rec.timestamp)
                n += len(recs)
        self._expire(time.time_ns())
        return n

    def _remember(self, mid: Union[bytes, int], ts: int) -> None:
        if mid in self._seen:  # (only if an older, larger window wrote it twice)
            return
        self._seen.add(mid)
        self._order.append(mid)
        if self._stamps is not None:
            self._stamps.append(ts)
        if len(self._order) > self._window:
            self._seen.discard(self._order.popleft())
            if self._stamps is not None:
                self._stamps.popleft()

    def _expire(self, now: int) -> None:
        stamps = self._stamps
        if stamps is None:
            return
        limit = now - self._max_age_ns  # type: ignore[operator]
        while stamps and stamps[0] < limit:
            stamps.popleft()
            self._seen.discard(self._order.popleft())

    def first_time(self, msg_id: MsgId) -> bool:
        """``True`` (and remember it) if ``msg_id`` is not in the window, else ``False``."""
        mid = _norm_id(msg_id)
        with self._lock:
            if self._stamps is not None:
                self._expire(time.time_ns())
            if mid in self._seen:
                self._repeats += 1
                return False
            if type(mid) is int:
                off = self._append(b"%d" % mid, _ID_INT)
            else:
                off = self._append(mid)
            self._remember(mid, time.time_ns())
            if off >= self._next_pin:
                self._pin_locked(off + 1)
            return True

    def _pin_locked(self, next_offset: int) -> None:
        # let retention drop the segments that hold only forgotten ids
        self._next_pin = next_offset + self._pin_every
        oldest = next_offset - len(self._order)
        self._pin.commit(oldest)
        self._log.apply_retention()

    def __contains__(self, msg_id: object) -> bool:
        """Whether ``msg_id`` is remembered (does not remember it)."""
        mid = _norm_id(msg_id)
        with self._lock:
            if self._stamps is not None:
                self._expire(time.time_ns())
            return mid in self._seen

    def __len__(self) -> int:
        return len(self._order)

    def flush(self) -> None:
        """Make every id remembered so far durable."""
        self._log.flush()

    def stats(self) -> Dict[str, Any]:
        """Counters: remembered ids, repeats rejected, window settings, replay at open."""
        return {
            "remembered": len(self._order),
            "repeats": self._repeats,
            "window": None if self._window == 1 << 62 else self._window,
            "max_age": None if self._max_age_ns is None else self._max_age_ns / 1e9,
            "replayed_records": self._replayed,
            "open_seconds": self._open_seconds,
            "log": None if self._closed else self._log.stats(),
        }

    def close(self) -> None:
        """Close the log (every remembered id is already in it)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._append = _closed_append
            self._log.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Deduplicator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _norm_id(msg_id: Any) -> Union[bytes, int]:
    t = type(msg_id)
    if t is bytes or t is int:
        return msg_id
    if isinstance(msg_id, str):
        return msg_id.encode("utf-8")
    if isinstance(msg_id, bytes):
        return bytes(msg_id)
    if isinstance(msg_id, int) and not isinstance(msg_id, bool):
        return int(msg_id)
    raise TypeError(f"msg_id must be bytes, str or int, got {type(msg_id).__name__}")


# ---------------------------------------------------------------------------
# VersionGate
# ---------------------------------------------------------------------------


class VersionGate:
    """Last-seen version per key: reject stale and out-of-order updates.

    For messages that carry ``(key, version)``.  ``accept(key, version)`` is
    ``True`` (and records the version) when the update is newer than anything
    seen for that key, ``False`` when it is stale (a redelivery or an older
    update arriving late).  With ``strict=True`` an update must be exactly the
    next version (last + 1); a gap (an update missing in between) is refused
    too, so the consumer can wait for or fetch the missing one.
    :meth:`check` says which case an update is without recording it.

    Keys are any hashable values.  In memory only: persist :meth:`state` (e.g.
    in a :class:`VersionedStore`) and pass it back as ``initial`` to survive a
    restart.

    >>> gate = VersionGate()
    >>> gate.accept("k", 2), gate.accept("k", 1), gate.accept("k", 3)
    (True, False, True)
    """

    NEW = "new"
    STALE = "stale"
    GAP = "gap"

    def __init__(self, strict: bool = False, initial: Optional[Dict[Any, int]] = None) -> None:
        self._strict = bool(strict)
        self._last: Dict[Any, int] = dict(initial) if initial else {}
        self._lock = threading.Lock()
        self.rejected = 0  # updates refused so far

    def check(self, key: Any, version: int) -> str:
        """``"new"``, ``"stale"`` (version <= last seen) or ``"gap"`` (strict
        mode: version > last + 1).  Records nothing."""
        if type(version) is not int:
            raise TypeError(f"version must be an int, got {type(version).__name__}")
        try:
            last = self._last.get(key, 0)
        except TypeError:
            raise TypeError(f"key must be hashable, got {type(key).__name__}") from None
        if version <= last:
            return self.STALE
        if self._strict and version != last + 1:
            return self.GAP
        return self.NEW

    def accept(self, key: Any, version: int) -> bool:
        """Record ``version`` for ``key`` if it is new (see :meth:`check`); ``True`` if so."""
        with self._lock:
            if self.check(key, version) is self.NEW:
                self._last[key] = version
                return True
            self.rejected += 1
            return False

    def last_seen(self, key: Any) -> int:
        """The last version accepted for ``key`` (0 if none)."""
        return self._last.get(key, 0)

    def state(self) -> Dict[Any, int]:
        """A copy of ``{key: last version}`` to persist."""
        with self._lock:
            return dict(self._last)

    def __len__(self) -> int:
        return len(self._last)
