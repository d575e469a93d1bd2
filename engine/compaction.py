"""Key compaction of a segment log (Kafka's ``cleanup.policy=compact``).

``Log(..., cleanup="compact")`` runs a pass after each segment roll;
``Log.compact()`` and ``queue-engine log compact PATH`` run one now.  A pass
keeps, in the sealed segments, the latest record of each key and every record
without a key, at their offsets.  A batch frame loses the inner records
removed (its offset deltas leave the gaps); each run of offsets removed
between kept frames becomes one hole frame (a bare 32-byte header whose span
covers the run, so the offset chain stays whole; readers skip it, and a
reader or group positioned in a gap continues at the next record kept).  The
latest record of a key is removed only when it is a tombstone
(``Log.delete``) older than ``delete_retention``.  The active segment is
never touched.

Crash safety, step by step:

* The evidence first: a record is removed only because a later record of its
  key exists, so everything the plan reads is made durable (``Log.flush``)
  and only records below the durable offset count.  A power loss can never
  keep the removal and lose the newer value.
* Only segments below the checkpoint's are rewritten (recovery trusts the
  checkpoint's byte position); the checkpoint moves to the active segment
  first.
* Each sealed segment is rewritten alone, oldest first: the copy goes to a
  temp file (``.<name>.compact.tmp``, removed by the next open) and is
  fdatasynced; the segment's index files (byte positions of the old file,
  rebuilt at the next open) go, and the directory is fsynced; a rename
  replaces the segment atomically; the directory is fsynced again before the
  next segment starts.  A SIGKILL anywhere
  leaves each segment old or new, and a new one only removed what later,
  durable records supersede.
* A tombstone is dropped only in a pass that has already rewritten every
  older segment (they hold no older record of its key any more), so dropping
  it can never bring an older value back.
* Readers that mapped a segment before its rename keep reading the old file
  (an unlinked inode stays valid while mapped).  Retention and compaction
  never run at the same time (``Log`` holds one lock for both), so a rename
  never resurrects a segment retention deleted.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, NamedTuple, Optional, Protocol, Set

from engine import _crashpoints as _cp
from engine._fsutil import fsync_dir
from engine._log import Log, LogReader, rewrite_compacted

__all__ = ["CompactionResult", "Entry", "Plan", "compact_log", "compact_path", "plan_removals"]

# crash points (tests/stress/test_log_compact_crash.py SIGKILLs at each):
# compact.planned, compact.after_copy, compact.after_index, compact.after_rename,
# compact.after_dirsync (each with @<segment base>)
_arm_crash = _cp.arm
_crash_point = _cp.point

MIN_DIRTY_RATIO = 0.5
"""A background pass runs once the sealed segments changed since the last
pass hold this share of the sealed bytes (Kafka's default)."""


class Entry(NamedTuple):
    """What the plan needs of one record (a plain tuple does as well)."""

    offset: int
    key: Optional[bytes]  # None: no key (always kept)
    tombstone: bool
    timestamp: int  # ns


class RecordLike(Protocol):
    """What the plan reads of a record: an :class:`Entry` or a log ``Record``."""

    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> Any: ...  # bytes or None (a copying reader's keys)
    @property
    def tombstone(self) -> bool: ...
    @property
    def timestamp(self) -> int: ...


@dataclass
class CompactionResult:
    """What one pass did."""

    segments_rewritten: int = 0
    records_removed: int = 0
    tombstones_removed: int = 0
    records_scanned: int = 0
    bytes_before: int = 0  # the input size of the segments this pass rewrites
    bytes_after: int = 0
    seconds: float = 0.0
    segments: List[int] = field(default_factory=list)  # bases rewritten, oldest first
    skipped: bool = False  # a background pass found too little changed (MIN_DIRTY_RATIO)

    def as_dict(self) -> Dict[str, object]:
        """The fields as a dict (for ``--json``)."""
        return {
            "segments_rewritten": self.segments_rewritten,
            "records_removed": self.records_removed,
            "tombstones_removed": self.tombstones_removed,
            "records_scanned": self.records_scanned,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "seconds": self.seconds,
            "segments": list(self.segments),
            "skipped": self.skipped,
        }


@dataclass
class Plan:
    """What a pass removes."""

    drop: Dict[int, Set[int]]  # sealed segment base -> offsets removed there
    tombstones: Dict[int, int]  # sealed segment base -> tombstones among them
    scanned: int  # records read


def plan_removals(
    records: Iterable[RecordLike], sealed: List[int], sealed_end: int, tombstone_before_ns: int
) -> Plan:
    """Which offsets of which sealed segment go.

    ``records`` are the durable records in offset order (anything with
    ``offset``, ``key``, ``tombstone`` and ``timestamp``: :class:`Entry`, a
    log ``Record``): the evidence, all of them, the active segment's
    included.  ``sealed`` are the sealed segments' bases, oldest first,
    ending at ``sealed_end`` (the active segment's base).  A keyed record
    goes when a later record of its key exists; the latest record of a key
    goes when it is a tombstone stamped before ``tombstone_before_ns`` (the
    caller rewrites segments oldest first, so every older record of its key
    is gone before the tombstone is).
    """
    latest: Dict[bytes, int] = {}
    in_sealed: List[RecordLike] = []
    scanned = 0
    for rec in records:
        scanned += 1
        key = rec.key
        if key is None:
            continue
        latest[key] = rec.offset
        if rec.offset < sealed_end:
            in_sealed.append(rec)
    plan = Plan({}, {}, scanned)
    seg = 0
    for rec in in_sealed:
        off = rec.offset
        if latest[rec.key] == off and not (rec.tombstone and rec.timestamp < tombstone_before_ns):
            continue
        while seg + 1 < len(sealed) and sealed[seg + 1] <= off:
            seg += 1  # in_sealed is in offset order
        plan.drop.setdefault(sealed[seg], set()).add(off)
        if rec.tombstone:
            plan.tombstones[sealed[seg]] = plan.tombstones.get(sealed[seg], 0) + 1
    return plan


def _scan(path: str, start: int, end: int) -> Iterator[RecordLike]:
    """The records in [start, end), holes skipped (the log's own reader)."""
    with LogReader(path, start=start) as r:
        while True:
            batch = r.read_many(4096)
            if not batch:
                return
            if batch[-1].offset >= end:
                yield from (rec for rec in batch if rec.offset < end)
                return
            yield from batch


def _sizes(path: str, bases: List[int]) -> Dict[int, int]:
    out = {}
    for b in bases:
        try:
            out[b] = os.stat(os.path.join(path, f"{b:020d}.seg")).st_size
        except FileNotFoundError:
            out[b] = 0
    return out


def compact_log(log: Log, now_ns: Optional[int] = None, force: bool = True) -> CompactionResult:
    """One compaction pass over ``log``'s sealed segments (``Log.compact``
    calls it with the log's maintenance lock held).  ``now_ns`` (tests) is
    the clock that ``delete_retention`` counts from.

    ``force=False`` (the passes ``cleanup="compact"`` runs after rolls) skips
    the pass (``skipped``) unless the sealed segments that changed since the
    last pass hold at least ``MIN_DIRTY_RATIO`` of the sealed bytes (Kafka's
    ``min.cleanable.dirty.ratio``): a pass reads every record kept, so
    running one per roll would cost a log's whole size per segment written.
    """
    t0 = time.perf_counter()
    res = CompactionResult()
    path = log.path
    log.flush()  # the evidence is durable before anything is removed
    sealed, sealed_end, evidence_end, log_id, delete_retention, _ = log._compaction_state()
    sizes = _sizes(path, sealed)
    clean = (log._compaction_memo or {}).get("clean", {})
    dirty = sum(n for b, n in sizes.items() if clean.get(b) != n)
    if not force and clean and dirty < MIN_DIRTY_RATIO * sum(sizes.values()):
        res.skipped = True
        res.seconds = time.perf_counter() - t0
        return res
    if sealed:
        now = time.time_ns() if now_ns is None else now_ns
        plan = plan_removals(_scan(path, sealed[0], evidence_end), sealed, sealed_end,
                             now - int(delete_retention * 1e9))
        res.records_scanned = plan.scanned
        if _cp.armed:
            _crash_point("compact.planned")
        for base in sealed:
            offsets = plan.drop.get(base)
            if not offsets:
                continue
            if log._compaction_state()[5]:
                break  # the log is closing: the rest waits for the next pass
            _rewrite_one(path, base, log_id, offsets, res)
            res.tombstones_removed += plan.tombstones.get(base, 0)
        else:
            log._compaction_memo = {"clean": _sizes(path, sealed)}
    res.seconds = time.perf_counter() - t0
    return res


def _rewrite_one(path: str, base: int, log_id: bytes, offsets: Set[int], res: CompactionResult) -> None:
    """Replace sealed segment ``base`` by its copy without ``offsets``, durably."""
    name = f"{base:020d}.seg"
    tmp = f".{name}.compact.tmp"
    try:
        removed, before, after = rewrite_compacted(path, base, log_id, offsets, tmp)
    except BaseException:
        try:
            os.unlink(os.path.join(path, tmp))  # a full disk, say: the segment stays as it was
        except FileNotFoundError:
            pass
        raise
    if _cp.armed:
        _crash_point("compact.after_copy", str(base))
    # the index files hold byte positions of the old file: gone (durably,
    # before the rename: an open trusts index files that exist) and rebuilt
    # by the next open; readers without them scan the (smaller) segment
    for ext in (".idx", ".tix"):
        try:
            os.unlink(os.path.join(path, f"{base:020d}{ext}"))
        except FileNotFoundError:
            pass
    fsync_dir(path)
    if _cp.armed:
        _crash_point("compact.after_index", str(base))
    os.rename(os.path.join(path, tmp), os.path.join(path, name))
    if _cp.armed:
        _crash_point("compact.after_rename", str(base))
    fsync_dir(path)
    if _cp.armed:
        _crash_point("compact.after_dirsync", str(base))
    res.segments_rewritten += 1
    res.segments.append(base)
    res.records_removed += removed
    res.bytes_before += before
    res.bytes_after += after


def compact_path(path: str, delete_retention: float = 86400.0) -> CompactionResult:
    """Compact the log at ``path`` while no writer runs (``queue-engine log compact``).

    Opens it as its writer (its lock, its recovery): :class:`engine.LogLocked`
    when a writer holds it; that writer compacts with ``Log.compact()``.
    """
    import json

    with open(os.path.join(path, "meta"), "rb") as f:
        segment_bytes = int(json.loads(f.read(65536).decode())["segment_bytes"])
    with Log(path, segment_bytes=segment_bytes, delete_retention=delete_retention) as log:
        return log.compact()
