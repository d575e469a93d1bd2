"""Online backup of a data directory while its writers keep appending.

``engine.backup(src, dst)`` (``queue-engine backup SRC DST``) copies a
directory that holds logs, VersionedStores, a Coordinator and its
participants' journals, Saga logs, durable queues and consumer-group offsets,
into ``dst``; restoring is opening the copy.  SQLite's online backup API is
the model: the source stays in use, the copy is one consistent state of it.

What "consistent" means
-----------------------
Every log of the copy ends at a record boundary, and the logs agree with each
other: whatever one record in the copy depends on is in the copy too (a
participant's commit follows the coordinator's decision, which follows every
participant's ``prepared`` record; a VersionedStore snapshot describes a log
prefix the copy holds).

How: the cut at one instant T
-----------------------------
1. *Pin*.  For every log, read its anchor (the writer's ``published``
   position from the ``notify`` block: every record before it is complete and
   was published, so its timestamp is older than anything read later), then
   list its segments and keep an open descriptor on each, so neither retention
   nor a journal's compaction can delete what the copy needs.  Plain files
   (snapshots, queue metadata) are opened the same way.  For every journal
   (a directory with ``CURRENT`` and ``gen-NNNNNNNN/``), pin the generation
   ``CURRENT`` names.
2. *T* = ``time.time_ns()``.  Then read every journal's ``CURRENT`` again: if
   one changed since its pin, that compaction moved records written before T
   into a generation we did not pin, so the whole attempt starts again (at
   most ``_ATTEMPTS`` times, then :class:`engine.EngineError`).  Reading it
   right after T, not after the copy, is enough: appends before T went to the
   pinned generation, and the pinned descriptors keep it readable even when
   the compaction deletes it later.
3. *Cut*.  Each log is copied up to its last complete record whose timestamp
   is <= T (records carry the wall clock at append, never going back within a
   log).  The walk starts at the anchor: earlier records are older than T by
   construction, so only records appended during the backup are walked (by
   ``engine._log.cut_by_time``, with recovery's checks); everything else
   moves with ``os.copy_file_range``.
   Causality: if record B depends on A (A's append returned before B's
   timestamp was read) and B is in the copy (ts_B <= T), A completed before T,
   and every log is read after T, so A is in the copy of its log with
   ts_A < ts_B <= T.
4. *Derived state*.  Group offset files committed past a log's cut are clamped
   to it (at-least-once is kept: a consumer of the copy re-reads, never skips);
   each keeps its epoch, and the log's ``truncations`` file (which the epochs
   count) is copied as it is.
   A durable queue's list of acked delayed offsets loses entries past the
   cut.  VersionedStore snapshots written after the pin are not copied, and
   any covering more than the cut would be dropped; if no kept snapshot can
   be continued by the copied log (retention raced the pin), the attempt
   starts again.  Journals are pinned last, just before T.
5. *Finish*.  Each copied log gets a clean checkpoint at its cut (what a clean
   close leaves; the cut segment's index is left out and rebuilt by the
   scan that checks the checkpoint), lock, notify and scratch files are not
   copied, every log of the copy is checked with the CRC scan of
   ``queue-engine log verify``, and every file and directory is fsynced.
   ``backup.json`` (written last) marks a complete backup.

The one assumption: the system clock does not step backwards during the
backup (a step back would let a record appended after T carry a timestamp
<= T).  Timestamps are never compared across machines: T and every record
come from the same clock.

Incremental mode copies, per segment, only what the previous backup (recorded
in ``backup.json``: bytes copied and a CRC32C of the segment header and of
the 4 KiB before that point) does not hold: sealed segments already complete
are kept, the previous cut segment gets its new bytes appended.  A segment
whose fingerprint differs (the log was repaired or re-created) is copied
whole.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from ._fsutil import atomic_write, fsync_dir

# the log's own readers and writers of its files: this module knows none of
# their byte layouts
from ._log import (
    SEGMENT_HEADER_SIZE,
    _crc32c,
    cut_by_time,
    published_end,
    read_groups,
    scan_segment,
    write_clean_checkpoint,
    write_group,
)
from ._log import verify as verify_log
from .errors import CorruptLog, EngineError

__all__ = ["backup", "BackupReport"]

ProgressFn = Callable[[int, int], None]

_ATTEMPTS = 5                 # whole-backup retries when a journal compacts at T
_MANIFEST = "backup.json"     # written last: DST holds a complete backup
_MANIFEST_FORMAT = 1
_CHUNK = 64 << 20             # copy_file_range step (progress granularity)
_TAIL_FP = 4096               # bytes before a segment's copied end in its fingerprint
_clock = time.time_ns         # the instant T (tests replace it to act at T)

# a log directory's files (names only: their contents are engine._log's)
_SEG_RE = re.compile(r"^(\d{20})\.seg$")
_SEGHDR = SEGMENT_HEADER_SIZE
# never copied: the held lock, the live wake-up block, the checkpoint (the
# copy gets its own); elsewhere no *.lock file is copied either
_LOG_SKIP = {"writer.lock", "notify", "checkpoint"}
# the offsets from which recoveries and repairs may have changed the log; a
# group's epoch counts its entries, so the copy keeps it as it is (it is only
# ever appended to)
_TRUNCATIONS = "truncations"
# durable queues (a directory with queue.json): shared scratch regions that
# name live member processes; the queue re-creates them empty
_QUEUE_SCRATCH = {"bell", "group"}
_SNAP_RE = re.compile(r"^snap-(\d{20})\.snap$")   # engine.versions snapshots
_GEN_RE = re.compile(r"^gen-(\d{8})$")            # engine.txn journal generations


@dataclass
class BackupReport:
    """What :func:`backup` did.

    ``cut_ns``: the instant T the copy represents (wall-clock ns);
    ``bytes_copied``: bytes written into ``dst`` by this run (incremental runs
    count only new bytes); ``bytes_total``: bytes of log data the copy holds;
    ``throughput``: ``bytes_copied`` per second of copying (bytes/s);
    ``attempts``: 1 unless a journal compaction at T forced a retry.
    """

    src: str
    dst: str
    cut_ns: int
    incremental: bool
    logs: int = 0
    journals: int = 0
    segments: int = 0
    segments_kept: int = 0
    records: int = 0
    files: int = 0
    bytes_copied: int = 0
    bytes_total: int = 0
    groups_clamped: int = 0
    snapshots_dropped: int = 0
    attempts: int = 1
    seconds: float = 0.0
    copy_seconds: float = 0.0
    throughput: float = 0.0
    verified_segments: int = 0
    log_ends: Dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> Dict[str, Any]:
        """The report as a JSON-ready dict (``queue-engine backup --json``)."""
        return asdict(self)


class _Retry(Exception):
    """This attempt cannot give a consistent copy; start again."""


# ---------------------------------------------------------------- helpers


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: str, data: bytes, durable: bool = True) -> None:
    """A small file of the copy, written atomically; ``durable=False`` for
    what the log itself writes unsynced (its index files: checked when read,
    rebuilt when damaged)."""
    atomic_write(os.path.dirname(path), os.path.basename(path), data, durable)


def _read_fd(fd: int) -> bytes:
    out: List[bytes] = []
    pos = 0
    while True:
        chunk = os.pread(fd, 1 << 20, pos)
        if not chunk:
            return b"".join(out)
        out.append(chunk)
        pos += len(chunk)


class _Copier:
    """Moves byte ranges between descriptors and counts them for the report
    and the progress callback.  In the kernel where it can: copy_file_range
    (same file system), else sendfile (page cache to page cache across file
    systems), else pread/pwrite."""

    def __init__(self, progress: Optional[ProgressFn], total: int) -> None:
        self.progress = progress
        self.total = total
        self.copied = 0
        self.seconds = 0.0
        self._ways = [w for w in ("copy_file_range", "sendfile") if hasattr(os, w)] + ["pwrite"]

    def _step(self, src_fd: int, dst_fd: int, pos: int, n: int) -> int:
        while True:
            way = self._ways[0]
            try:
                if way == "copy_file_range":
                    return os.copy_file_range(src_fd, dst_fd, n, pos, pos)
                if way == "sendfile":
                    os.lseek(dst_fd, pos, os.SEEK_SET)  # sendfile writes at the file position
                    return os.sendfile(dst_fd, src_fd, pos, n)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                self._ways.pop(0)  # not between these files here: the next way
                continue
            data = os.pread(src_fd, min(n, 8 << 20), pos)
            view = memoryview(data)
            off = pos
            while view:
                k = os.pwrite(dst_fd, view, off)
                view, off = view[k:], off + k
            return len(data)

    def copy(self, src_fd: int, dst_fd: int, start: int, end: int) -> None:
        t0 = time.perf_counter()
        pos = start
        while pos < end:
            done = self._step(src_fd, dst_fd, pos, min(_CHUNK, end - pos))
            if done == 0:
                raise EngineError(f"source file ended at byte {pos} while {end} were expected; "
                                  "was it truncated during the backup?")
            pos += done
            self.copied += done
            if self.progress is not None:
                self.progress(self.copied, max(self.total, self.copied))
        self.seconds += time.perf_counter() - t0


# ---------------------------------------------------------------- pinning


@dataclass
class _Seg:
    base: int
    fd: int
    size: int
    path: str


@dataclass
class _PinnedLog:
    rel: str                      # path relative to src
    meta: bytes                   # the meta file
    log_id: bytes                 # 16 bytes, from meta
    segs: Dict[int, _Seg]         # base -> pinned segment
    anchor: Tuple[int, int]       # (segment base, position): records before it are <= T
    cut: Tuple[int, int] = (0, 0)  # (segment base, position) of the copy's end
    next_offset: int = 0          # offset after the copy's last record
    start_offset: int = 0         # first offset of the copy


def _open_seg(path: str, base: int) -> Optional[_Seg]:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None  # retention removed it meanwhile
    return _Seg(base, fd, os.fstat(fd).st_size, path)


def _list_bases(path: str) -> List[int]:
    out = []
    for name in os.listdir(path):
        m = _SEG_RE.match(name)
        if m:
            out.append(int(m.group(1)))
    return sorted(out)


def _pin_log(src: str, rel: str) -> _PinnedLog:
    path = os.path.join(src, rel)
    with open(os.path.join(path, "meta"), "rb") as f:
        meta = f.read(65536)
    try:
        import uuid

        log_id = uuid.UUID(json.loads(meta.decode())["log_id"]).bytes
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise CorruptLog(os.path.join(path, "meta"), 0, "unreadable meta file") from None
    note = published_end(path)  # before the listing: the anchor's segment is then listed
    segs: Dict[int, _Seg] = {}
    # newest first: key compaction rewrites segments oldest first and drops a
    # tombstone only after every older segment lost the key's older values, so
    # a newer segment pinned in its compacted form implies compacted older ones
    # (the other order could pin an old segment 0 and a compacted segment 3:
    # a deleted key's old value back)
    for base in reversed(_list_bases(path)):
        s = _open_seg(os.path.join(path, f"{base:020d}.seg"), base)
        if s is not None:
            segs[base] = s
    bases = sorted(segs)
    if note is not None and note[0] in segs:
        anchor = note
    elif bases:
        # no usable notify block: segments before the last listed one were
        # sealed before T; parse the last one from its start
        anchor = (bases[-1] if note is None or note[0] > bases[-1] else bases[0], _SEGHDR)
    else:
        anchor = (0, _SEGHDR)
    return _PinnedLog(rel, meta, log_id, segs, anchor)


def _read_current(path: str) -> Optional[Tuple[bytes, Dict[str, Any]]]:
    """A journal's CURRENT file: (its bytes, decoded), None if it has none."""
    try:
        with open(os.path.join(path, "CURRENT"), "rb") as f:
            raw = f.read(4096)
        cur = json.loads(raw.decode())
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError) as exc:
        raise EngineError(f"journal {path!r}: unreadable CURRENT file ({exc})") from None
    if not isinstance(cur, dict) or not isinstance(cur.get("gen"), int):
        raise EngineError(f"journal {path!r}: CURRENT names no generation")
    return raw, cur


@dataclass
class _Plan:
    logs: Dict[str, _PinnedLog] = field(default_factory=dict)
    journals: Dict[str, Tuple[bytes, int]] = field(default_factory=dict)  # rel -> (CURRENT, gen)
    files: Dict[str, int] = field(default_factory=dict)     # rel -> pinned fd
    dirs: List[str] = field(default_factory=list)           # rel dirs to create

    def close(self) -> None:
        for lg in self.logs.values():
            for s in lg.segs.values():
                os.close(s.fd)
            lg.segs.clear()
        for fd in self.files.values():
            os.close(fd)
        self.files.clear()


def _is_log_dir(path: str, names: List[str]) -> bool:
    return "meta" in names and (any(_SEG_RE.match(n) for n in names) or "groups" in names)


def _pin_journal(src: str, rel: str, plan: _Plan) -> None:
    """Pin the generation a journal's CURRENT names (and that CURRENT)."""
    path = os.path.join(src, rel) if rel else src
    for _ in range(_ATTEMPTS):
        got = _read_current(path)
        if got is None:
            return
        raw, cur = got
        gen_rel = os.path.join(rel, f"gen-{cur['gen']:08d}")
        try:
            names = os.listdir(os.path.join(src, gen_rel))
        except FileNotFoundError:
            continue  # switched meanwhile
        if not _is_log_dir(os.path.join(src, gen_rel), names):
            return  # a journal being created: nothing written yet
        pinned = _pin_log(src, gen_rel)
        if _read_current(path) == got:
            plan.logs[gen_rel] = pinned
            plan.dirs.append(gen_rel)
            plan.journals[rel] = (raw, cur["gen"])
            return
        for s in pinned.segs.values():
            os.close(s.fd)
    raise EngineError(f"journal {path!r} keeps switching generations; try again")


def _pin(src: str) -> _Plan:
    """Walk src: pin every log, journal generation and plain file (step 1).
    Journals last, just before T: the shorter the time from a journal's pin
    to T, the less likely a compaction in between forces a retry."""
    plan = _Plan()
    journals: List[str] = []
    try:
        stack = [""]
        while stack:
            rel = stack.pop()
            path = os.path.join(src, rel) if rel else src
            try:
                names = os.listdir(path)
            except FileNotFoundError:
                continue
            plan.dirs.append(rel)
            if _is_log_dir(path, names):
                plan.logs[rel] = _pin_log(src, rel)
                continue
            if "meta" not in names and any(_SEG_RE.match(n) for n in names):
                raise CorruptLog(os.path.join(path, "meta"), 0, "segments exist but the meta file is missing")
            journal = "CURRENT" in names
            if journal:
                journals.append(rel)
            queue_dir = "queue.json" in names
            for name in sorted(names):
                child = os.path.join(rel, name) if rel else name
                cpath = os.path.join(path, name)
                try:
                    st = os.lstat(cpath)
                except FileNotFoundError:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    if journal and _GEN_RE.match(name):
                        continue  # a journal: only its live generation (pinned below)
                    stack.append(child)
                    continue
                if not stat.S_ISREG(st.st_mode):
                    continue
                if name.startswith(".") and name.endswith(".tmp"):
                    continue  # a writer's temp file, never part of the state
                if journal and name == "CURRENT":
                    continue  # written from what the pin read
                if queue_dir and name in _QUEUE_SCRATCH:
                    continue
                if name.endswith(".lock"):
                    continue
                try:
                    plan.files[child] = os.open(cpath, os.O_RDONLY)
                except FileNotFoundError:
                    continue
        for rel in journals:
            _pin_journal(src, rel, plan)
        return plan
    except BaseException:
        plan.close()
        raise


# ---------------------------------------------------------------- the cut


def _find_cut(src: str, lg: _PinnedLog, t_ns: int) -> None:
    """Set lg.cut: the end of the last complete record with timestamp <= T."""
    path = os.path.join(src, lg.rel)
    if not lg.segs:
        lg.cut = (0, 0)
        return
    base, pos = lg.anchor
    expect: Optional[int] = None  # the offset at the anchor: its record's own
    while True:
        seg = lg.segs[base]
        res = cut_by_time(seg.fd, pos, t_ns, expect)
        if res.records:
            pos, expect = res.end_position, res.next_offset
        if res.error is not None:
            if _in_progress(path, base, pos, expect, seg, t_ns):
                lg.cut = (base, pos)
                return
            continue  # completed while we read it: walk on from it
        if not res.sealed:
            lg.cut = (base, pos)  # the end of what is written, or a record after T
            return
        nxt = res.next_offset  # an end-of-segment marker at pos names the next segment
        if nxt not in lg.segs and nxt in _list_bases(path):
            s = _open_seg(os.path.join(path, f"{nxt:020d}.seg"), nxt)  # rolled during the walk
            if s is not None:
                lg.segs[nxt] = s
        if nxt not in lg.segs or nxt <= base:
            lg.cut = (base, pos)  # no next segment yet: end before the marker
            return
        base, pos, expect = nxt, _SEGHDR, nxt


def _in_progress(path: str, base: int, pos: int, expect: Optional[int], seg: _Seg, t_ns: int) -> bool:
    """The record at (base, pos) failed its checks.  True: the writer has not
    published it (in flight, or the torn tail of a killed writer).  False: it
    is whole now (it completed while we read it).  CorruptLog: the writer
    published it, so it is damage."""
    note = published_end(path)  # before the second look: what it calls published is final
    again = cut_by_time(seg.fd, pos, t_ns, expect)
    if again.error is None or again.records:
        return False
    if note is None:
        if base == max(_list_bases(path) or [base]):
            return True  # no published position to compare with: the last segment's tail
    elif note[0] == base and pos >= note[1]:
        return True
    raise CorruptLog(seg.path, pos, f"damaged record ({again.error}) in a part of the log its writer "
                     "already published; run 'queue-engine log verify' on the source")


# ---------------------------------------------------------------- copying


def _fingerprint(fd: int, upto: int) -> Tuple[int, int]:
    head = os.pread(fd, _SEGHDR, 0)
    lo = max(_SEGHDR, upto - _TAIL_FP)
    tail = os.pread(fd, max(0, upto - lo), lo) if upto > lo else b""
    return int(_crc32c(head)), int(_crc32c(tail))


class _Run:
    """One attempt: copies a pinned plan into dst at cut T."""

    def __init__(self, src: str, dst: str, plan: _Plan, t_ns: int, report: BackupReport,
                 old_manifest: Dict[str, Any], copier: _Copier) -> None:
        self.src, self.dst, self.plan, self.t_ns = src, dst, plan, t_ns
        self.report = report
        self.old = old_manifest       # "segments": rel path -> {"copied", "sealed", "fp"}
        self.segments: Dict[str, Any] = {}
        self.copier = copier
        self.unsynced: List[str] = []  # segment files written, fsynced together at the end

    # -- logs

    def copy_log(self, lg: _PinnedLog) -> None:
        src_dir = os.path.join(self.src, lg.rel)
        dst_dir = os.path.join(self.dst, lg.rel)
        os.makedirs(dst_dir, mode=0o700, exist_ok=True)
        cut_base, cut_pos = lg.cut
        keep = {b for b in lg.segs if b <= cut_base}
        if lg.segs and cut_base not in lg.segs:
            keep = set()
        for name in os.listdir(dst_dir):
            m = _SEG_RE.match(name) or re.match(r"^(\d{20})\.(idx|tix)$", name)
            if m and int(m.group(1)) not in keep:
                os.unlink(os.path.join(dst_dir, name))  # left by an earlier backup
            elif name in _LOG_SKIP or (name.startswith(".") and name.endswith(".tmp")):
                os.unlink(os.path.join(dst_dir, name))
        _write_file(os.path.join(dst_dir, "meta"), lg.meta)
        for base in sorted(keep):
            seg = lg.segs[base]
            sealed = base != cut_base
            end = seg.size if sealed else cut_pos
            self._copy_segment(lg, seg, dst_dir, end, sealed)
            for ext in (".idx", ".tix"):
                sp = os.path.join(src_dir, f"{base:020d}{ext}")
                dp = os.path.join(dst_dir, f"{base:020d}{ext}")
                data = None
                if sealed:
                    try:
                        with open(sp, "rb") as f:
                            data = f.read()
                    except FileNotFoundError:
                        pass
                if data is not None:
                    _write_file(dp, data, durable=False)
                elif os.path.exists(dp):
                    os.unlink(dp)  # the cut segment's index: rebuilt at open
        self.report.logs += 1

    def _copy_segment(self, lg: _PinnedLog, seg: _Seg, dst_dir: str, end: int, sealed: bool) -> None:
        rel = os.path.join(lg.rel, f"{seg.base:020d}.seg")
        dpath = os.path.join(self.dst, rel)
        prev = self.old.get(rel)
        start = 0
        if prev is not None and os.path.exists(dpath):
            copied = int(prev.get("copied", 0))
            if (prev.get("fp") == list(_fingerprint(seg.fd, copied)) and copied <= end
                    and os.path.getsize(dpath) == seg.size and copied >= _SEGHDR):
                start = copied
        if start == 0 and os.path.exists(dpath):
            os.unlink(dpath)
        fd = os.open(dpath, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            if start == end and prev is not None and prev.get("sealed") == sealed:
                self.report.segments_kept += 1
            else:
                self.copier.copy(seg.fd, fd, start, end)
            if os.fstat(fd).st_size != seg.size:
                # the rest of a preallocated segment: zeros, and reserved so a
                # writer of the restored copy appends into allocated blocks
                os.ftruncate(fd, seg.size)
            if not sealed and hasattr(os, "posix_fallocate"):
                try:
                    os.posix_fallocate(fd, end, seg.size - end)
                except OSError:
                    pass  # no fallocate here (tmpfs on old kernels): the log reserves at open
        finally:
            os.close(fd)
        self.unsynced.append(dpath)
        self.segments[rel] = {"copied": end, "sealed": sealed, "fp": list(_fingerprint(seg.fd, end))}
        self.report.segments += 1
        self.report.bytes_total += end

    def _copy_groups(self, lg: _PinnedLog, src_dir: str, dst_dir: str) -> None:
        """The log's consumer-group offsets, each with its epoch, then its
        truncations file.  Read in that order: the file is only appended to,
        so the copy's holds every truncation a copied group's epoch counts."""
        groups = read_groups(src_dir)
        gdst = os.path.join(dst_dir, "groups")
        os.makedirs(gdst, mode=0o700, exist_ok=True)
        for name in os.listdir(gdst):
            if name not in groups:
                os.unlink(os.path.join(gdst, name))
        for name, (off, epoch) in groups.items():
            if off > lg.next_offset:
                # committed past the cut: the copy's consumer re-reads from the
                # cut (at-least-once), never skips what is appended there next
                off = lg.next_offset
                self.report.groups_clamped += 1
            write_group(dst_dir, name, off, epoch)
        tdst = os.path.join(dst_dir, _TRUNCATIONS)
        try:
            with open(os.path.join(src_dir, _TRUNCATIONS), "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            if os.path.exists(tdst):
                os.unlink(tdst)  # left by an earlier backup of a log since re-created
            return
        _write_file(tdst, raw)

    def finish_log(self, lg: _PinnedLog) -> None:
        """Verify the copied log and give it a clean checkpoint at its cut."""
        dst_dir = os.path.join(self.dst, lg.rel)
        results = verify_log(dst_dir)
        for r in results:
            if r.error is not None:
                raise CorruptLog(r.segment, r.error_position,
                                 f"the copy fails its check ({r.error}); the source is damaged there: "
                                 "run 'queue-engine log verify' on it")
            self.report.records += r.records
            self.report.verified_segments += 1
        if results:
            last = results[-1]
            if last.base_offset != lg.cut[0] or last.end_position != lg.cut[1]:
                raise EngineError(f"{dst_dir}: the copy ends at byte {last.end_position} of segment "
                                  f"{last.base_offset}, not at the cut {lg.cut}")
            lg.next_offset = last.next_offset
            lg.start_offset = results[0].base_offset
            write_clean_checkpoint(dst_dir, lg.cut[0], lg.cut[1], lg.next_offset)
        self.report.log_ends[lg.rel] = lg.next_offset

    # -- plain files

    def copy_files(self) -> None:
        for rel, fd in sorted(self.plan.files.items()):
            d, name = os.path.split(rel)
            raw = _read_fd(fd)
            data: Optional[bytes] = raw
            m = _SNAP_RE.match(name)
            store_log = self.plan.logs.get(os.path.join(d, "log"))
            if m and store_log is not None:
                if int(m.group(1)) > store_log.next_offset:
                    data = None  # describes records the copy does not hold
                    self.report.snapshots_dropped += 1
            elif os.path.basename(d) == "delay-acked":
                data = self._filter_done(os.path.dirname(d), name, raw)
            dpath = os.path.join(self.dst, rel)
            if data is None:
                if os.path.exists(dpath):
                    os.unlink(dpath)
                continue
            _write_file(dpath, data)
            self.report.files += 1
        self._check_stores()

    def _filter_done(self, qdir: str, name: str, data: bytes) -> bytes:
        """A delay log's acked-offset list keeps only offsets below its cut."""
        lg = self.plan.logs.get(os.path.join(qdir, name.split(".", 1)[0]))
        if lg is None:
            return data
        from .scheduling.durable import _DONE_ENTRY, _DONE_MAGIC

        if not data.startswith(_DONE_MAGIC):
            return data
        h = len(_DONE_MAGIC) + 36  # the magic, then the log's uuid as text
        out = [data[:h]]
        for i in range(h, len(data) - _DONE_ENTRY.size + 1, _DONE_ENTRY.size):
            off, _check = _DONE_ENTRY.unpack_from(data, i)
            if off < lg.next_offset:
                out.append(data[i:i + _DONE_ENTRY.size])
        return b"".join(out)

    def _check_stores(self) -> None:
        """Each VersionedStore of the copy must rebuild: its log starts at 0,
        or a kept snapshot covers a point the copied log continues from."""
        for rel, lg in self.plan.logs.items():
            d, name = os.path.split(rel)
            if name != "log" or lg.start_offset == 0:
                continue
            snaps = [int(m.group(1)) for n in os.listdir(os.path.join(self.dst, d) if d else self.dst)
                     if (m := _SNAP_RE.match(n))]
            if not snaps:
                continue  # not a VersionedStore (or one that never snapshotted)
            if not any(lg.start_offset <= s <= lg.next_offset for s in snaps):
                raise _Retry()  # retention raced the pin: pin again


# ---------------------------------------------------------------- the entry point


def _load_manifest(dst: str, src: str) -> Dict[str, Any]:
    path = os.path.join(dst, _MANIFEST)
    try:
        with open(path, "rb") as f:
            man = json.loads(f.read().decode())
    except FileNotFoundError:
        if os.listdir(dst):
            raise EngineError(f"{dst!r} is not empty and holds no complete backup ({_MANIFEST} is "
                              "missing: an earlier backup was interrupted?); use an empty directory") from None
        return {"segments": {}}
    except (ValueError, UnicodeDecodeError) as exc:
        raise EngineError(f"{path!r} is unreadable ({exc}); use an empty directory") from None
    if not isinstance(man, dict) or man.get("format") != _MANIFEST_FORMAT or not isinstance(
            man.get("segments"), dict):
        raise EngineError(f"{path!r} is not a queue-engine backup manifest")
    if man.get("src") != os.path.realpath(src):
        raise EngineError(f"{dst!r} holds a backup of {man.get('src')!r}, not of {src!r}")
    return man


def _remove_stale(dst: str, plan: _Plan) -> None:
    """Incremental: drop what the new copy no longer has (old journal
    generations, deleted logs and files)."""
    wanted_dirs = set(plan.dirs) | set(plan.logs)
    for dirpath, dirnames, filenames in os.walk(dst, topdown=True):
        rel = os.path.relpath(dirpath, dst)
        rel = "" if rel == "." else rel
        for dn in list(dirnames):
            child = os.path.join(rel, dn) if rel else dn
            if child not in wanted_dirs and not any(w.startswith(child + os.sep) for w in wanted_dirs):
                parent_log = rel in plan.logs
                if not (parent_log and dn == "groups"):
                    shutil.rmtree(os.path.join(dirpath, dn))
                    dirnames.remove(dn)
        if rel in plan.logs or (os.path.basename(rel) == "groups" and os.path.dirname(rel) in plan.logs):
            continue  # the log copier owns these
        for fn in filenames:
            child = os.path.join(rel, fn) if rel else fn
            if child not in plan.files and fn != _MANIFEST:
                os.unlink(os.path.join(dirpath, fn))


def _fsync_files(paths: List[str]) -> None:
    """fsync many files at once: concurrent fsyncs share the file system's
    journal commits (1428 segments of 64 KiB on the development VM: 6.5 s
    one at a time, 1.6-2.1 s together)."""
    if not paths:
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(16, len(paths))) as pool:
        list(pool.map(_fsync_file, paths))  # re-raises the first error


def _fsync_tree(dst: str) -> None:
    for dirpath, _dirnames, _filenames in os.walk(dst):
        fsync_dir(dirpath)
    fsync_dir(os.path.dirname(os.path.abspath(dst)))


def backup(src: Union[str, os.PathLike], dst: Union[str, os.PathLike], *, incremental: bool = False,
           verify: bool = True, progress: Optional[ProgressFn] = None) -> BackupReport:
    """Copy the data directory ``src`` into ``dst`` while its writers run.

    The copy is one consistent state of ``src`` at an instant T (see the
    module docstring): every log is cut at a record boundary, and a record is
    in the copy only if everything it depends on is.  Restoring is opening
    the copy with the same classes (``engine.Log``, ``VersionedStore``,
    ``Coordinator`` + ``recover``, ``Saga.recover``, the durable queues).

    ``dst`` must be missing or empty, or, with ``incremental=True``, hold an
    earlier complete backup of ``src`` (then only new segments and new bytes
    of the previous cut segment are copied).  ``verify`` (default on) checks
    every copied log with the CRC scan of ``queue-engine log verify`` before
    returning; turning it off skips that read pass (the cut position is then
    taken on trust).  ``progress(bytes_copied, bytes_expected)`` is called as
    data moves.  Raises :class:`engine.CorruptLog` when a source segment is
    damaged, :class:`engine.EngineError` when ``dst`` is unsuitable or the
    journals keep compacting at the cut.  Example::

        report = engine.backup("data", "/backups/data-0412")
        print(report.records, report.throughput / 1e9, "GB/s")
    """
    if not isinstance(src, (str, os.PathLike)) or not isinstance(dst, (str, os.PathLike)):
        raise TypeError("src and dst must be str or os.PathLike")
    src = os.path.abspath(os.fsdecode(os.fspath(src)))
    dst = os.path.abspath(os.fsdecode(os.fspath(dst)))
    if progress is not None and not callable(progress):
        raise TypeError("progress must be a callable(bytes_copied, bytes_expected) or None")
    if not os.path.isdir(src):
        raise FileNotFoundError(f"backup source {src!r} is not a directory")
    rs, rd = os.path.realpath(src), os.path.realpath(dst)
    if rd == rs or rd.startswith(rs + os.sep) or rs.startswith(rd + os.sep):
        raise ValueError(f"dst {dst!r} must be outside src {src!r} (and src outside dst)")
    t_start = time.perf_counter()
    os.makedirs(dst, mode=0o700, exist_ok=True)
    if incremental:
        manifest = _load_manifest(dst, src)
    else:
        if os.listdir(dst):
            raise EngineError(f"{dst!r} is not empty; use incremental=True (--incremental) to update "
                              "an earlier backup, or an empty directory")
        manifest = {"segments": {}}
    man_path = os.path.join(dst, _MANIFEST)
    if os.path.exists(man_path):
        os.unlink(man_path)  # until this run finishes, dst is not a complete backup
        fsync_dir(dst)
    report = BackupReport(src=src, dst=dst, cut_ns=0, incremental=incremental)
    copier = _Copier(progress, 0)
    for attempt in range(1, _ATTEMPTS + 1):
        report = BackupReport(src=src, dst=dst, cut_ns=0, incremental=incremental, attempts=attempt)
        plan = _pin(src)
        run: Optional[_Run] = None
        try:
            t_ns = _clock()
            report.cut_ns = t_ns
            if any((_read_current(os.path.join(src, rel)) or (b"",))[0] != raw
                   for rel, (raw, _gen) in plan.journals.items()):
                raise _Retry()
            for lg in plan.logs.values():
                _find_cut(src, lg, t_ns)
            copier.total = sum(s.size for lg in plan.logs.values() for b, s in lg.segs.items()
                               if b < lg.cut[0]) + sum(lg.cut[1] for lg in plan.logs.values())
            run = _Run(src, dst, plan, t_ns, report, manifest["segments"], copier)
            if incremental:
                _remove_stale(dst, plan)
            for rel in sorted(plan.dirs):
                os.makedirs(os.path.join(dst, rel), mode=0o700, exist_ok=True)
            for lg in plan.logs.values():
                run.copy_log(lg)
            for lg in plan.logs.values():
                if verify:
                    run.finish_log(lg)
                else:
                    _trusted_end(run, lg)
            # group offsets need each log's next offset: clamp after the check
            for lg in plan.logs.values():
                run._copy_groups(lg, os.path.join(src, lg.rel), os.path.join(dst, lg.rel))
            for rel, (raw, _gen) in plan.journals.items():
                _write_file(os.path.join(dst, rel, "CURRENT"), raw)
            report.journals = len(plan.journals)
            run.copy_files()
        except _Retry:
            if run is not None:
                manifest = {"segments": {**manifest["segments"], **run.segments}}
            if not incremental:
                for name in os.listdir(dst):
                    p = os.path.join(dst, name)
                    shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.unlink(p)
                manifest = {"segments": {}}
            continue
        finally:
            plan.close()
        assert run is not None
        _fsync_files(run.unsynced)
        _fsync_tree(dst)
        report.bytes_copied = copier.copied
        report.copy_seconds = copier.seconds
        report.throughput = copier.copied / copier.seconds if copier.seconds > 0 else 0.0
        report.seconds = time.perf_counter() - t_start
        _write_file(man_path, json.dumps({
            "format": _MANIFEST_FORMAT, "src": os.path.realpath(src), "cut_ns": report.cut_ns,
            "log_ends": report.log_ends, "segments": run.segments,
        }, indent=1).encode())
        fsync_dir(dst)
        return report
    raise EngineError(f"backup of {src!r}: the journals kept compacting at the cut in {_ATTEMPTS} attempts; "
                      "try again (or pause compaction)")


def _trusted_end(run: _Run, lg: _PinnedLog) -> None:
    """verify=False: take the cut's next offset from its last record header."""
    dst_dir = os.path.join(run.dst, lg.rel)
    if not lg.segs or lg.cut[0] not in lg.segs:
        return
    with open(os.path.join(dst_dir, f"{lg.cut[0]:020d}.seg"), "rb") as f:
        res = scan_segment(f.read(), lg.cut[0])  # the cut segment only: the rest is trusted
    if res.error is not None or res.end_position != lg.cut[1]:
        raise CorruptLog(res.segment, res.error_position, f"the copy fails its check ({res.error})")
    lg.next_offset = res.next_offset
    lg.start_offset = min(b for b in lg.segs if b <= lg.cut[0])
    write_clean_checkpoint(dst_dir, lg.cut[0], lg.cut[1], lg.next_offset)
    run.report.log_ends[lg.rel] = lg.next_offset
