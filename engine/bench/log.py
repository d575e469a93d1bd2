"""The log section: engine.Log / engine.LogReader against the on-disk queues
people reach for in Python: queuelib's ``FifoDiskQueue``, persist-queue's file
``Queue`` and ``SQLiteQueue``, and diskcache's ``Deque``, plus a plain-Python
``os.write`` + ``os.fdatasync`` reference for durable batches.

Every file lives in a fresh ``tempfile.TemporaryDirectory()`` under the system
temp dir (a real disk here, not tmpfs: the case descriptions print the path),
removed after each run. Every run reads back what it wrote, after its clock
stops, and the harness checks count, checksum and order of what came back.

Cases, 64-byte records (quick / --full):

* ``append`` one record per call, ``durability="none"``, against
  ``FifoDiskQueue.push`` (30k / 200k). Target: >= 5x queuelib.
* the same ``append`` against the per-put-persistence queues (1k / 10k: they
  manage 1-4k puts/s here, so the count is small for every contender):
  persist-queue ``Queue.put`` (its defaults: flush and an info-file rewrite
  per put, ``fsync`` every ``chunksize=100`` puts), ``SQLiteQueue.put``
  (``auto_commit=True``: WAL commit with SQLite's default
  ``synchronous=FULL``, an fsync per put) and ``Deque.append`` (one SQLite
  transaction per append).
* ``append_many`` of 1,000-record batches with ``durability="always"``
  (one sync per batch) against ``os.write`` of the joined batch +
  ``os.fdatasync`` per batch (20k / 200k), and against ``SQLiteQueue.put``
  (2k / 20k, its per-put fsync is slow; the reference runs there too).
  Every contender first writes one untimed warm-up batch of the same 100
  payloads (file creation and the first sync are setup, paid once per
  segment, i.e. per 64 MiB, by a log), dropped again on read-back.
  Targets: >= 0.95x the plain ``os.write`` reference (no log writes less than
  that floor except by writing fewer bytes: the floor writes the bare payloads,
  the log its frames too) and >= 300x SQLiteQueue.
* read back: ``LogReader`` iteration (``record.value``) against
  ``FifoDiskQueue.pop`` (30k / 200k), and against persist-queue
  ``Queue.get`` and diskcache ``Deque.popleft`` (1k / 10k); filling is
  untimed. Target: >= 5x queuelib.
* the verify/recovery scan, ``engine._log.verify(path)`` over a 128 MiB /
  1 GiB log of 64-byte records written untimed just before (its records'
  pages are in the page cache, dirty; the last segment's preallocated tail,
  never written, is not, as after any write). The unit is MB/s of record
  bytes (64-byte value + 32-byte frame = 96 bytes per record, the workload's
  size), so the segment headers and the preallocated tail it also reads are
  not counted. The scan runs on verify's default thread count (the CPUs
  the process may use, at most 4). Each run verifies its log several times
  in a row (:data:`SCAN_PASS_BYTES` of records in all: 4 x 1 GiB / 32 x
  128 MiB), every pass a whole scan of every record and tail, so that the
  run's window reaches the harness's 0.25 s minimum: a single pass over
  1 GiB at more than 4.3 GB/s would be too short to rank, and only the
  slower runs would count. Later passes find the records cached as the
  first does (the writes cached them); a scan that caches the tail it reads
  gets it cached from the second pass on. The workload's count is the
  records scanned (records x passes). Target: >= 1 GB/s.

The scan returns counts, not values, so it cannot be digested. Its workload
(:class:`_ScanWorkload`) expects the record count and a checksum of 0 ("not
measured"): the count the harness checks is the one the scan reports, and the
contender itself raises unless the scan also ends at the right next offset,
covers exactly the record bytes written and reports no error. (Building the
real digest of a 256 MiB / 1 GiB workload would cost seconds and gigabytes
for a number no scan could match.)
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, List

import numpy as np

from engine.bench.harness import (
    BUILD_HINT,
    THROUGHPUT,
    Case,
    Contender,
    Digest,
    Profile,
    Run,
    Target,
    Workload,
    digest,
    digest_array,
)

SECTION = "log"
# the cases the quick profile runs (fewer cases, never shorter windows); --full runs all
QUICK = (
    "append 64 B vs queuelib",
    "durable append_many vs os.write+fdatasync",
    "read back vs queuelib",
)

OURS = ("engine._log",)
QUEUELIB = ("queuelib",)
PERSIST = ("persistqueue",)
DISKCACHE = ("diskcache",)
SIZE = 64  # bytes per record value
BATCH = 1000  # records per append_many call / per reference write + sync
FRAME = 32  # bytes of framing per record without a key (engine._log.RECORD_HEADER_SIZE)
WARMUP = 100  # records written (and synced) untimed by every durable contender first
SCAN_FILL_BATCH = 8192  # records per append_many while writing the scan's log (untimed)
SCAN_PASS_BYTES = 4 << 30  # record bytes a verify-scan run scans: its log this many bytes over

QUEUELIB_FIFO = "queuelib FifoDiskQueue"
PQ_FILE = "persist-queue Queue (file)"
PQ_SQLITE = "persist-queue SQLiteQueue"
DISKCACHE_DEQUE = "diskcache Deque"
REFERENCE = "os.write + os.fdatasync per batch"


class _TempDir:
    """A fresh directory under the system temp dir for one run."""

    def __init__(self) -> None:
        self.path = tempfile.mkdtemp(prefix="qe-bench-log-")

    def __enter__(self) -> str:
        return self.path

    def __exit__(self, *exc: Any) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _fs_type(path: str) -> str:
    """The file system type of ``path`` from /proc/self/mounts ("" elsewhere):
    the case text says whether the syncs reached a disk or a tmpfs."""
    try:
        with open("/proc/self/mounts") as f:
            mounts = [line.split() for line in f]
    except OSError:
        return ""
    real = os.path.realpath(path)
    best, kind = "", ""
    for m in mounts:
        if len(m) < 3:
            continue
        mnt = m[1].replace("\\040", " ")
        inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
        if inside and len(mnt) >= len(best):
            best, kind = mnt, m[2]
    return kind


def _where() -> str:
    tmp = tempfile.gettempdir()
    kind = _fs_type(tmp)
    return f"files in a fresh directory under {tmp}" + (f" ({kind})" if kind else "")


def _chunks(msgs: List[bytes], n: int) -> List[List[bytes]]:
    return [msgs[i : i + n] for i in range(0, len(msgs), n)]


def _warmup(msgs: List[bytes]) -> List[bytes]:
    """The batch every durable contender writes before its clock starts (its
    file creation and first sync are setup); it is dropped on read-back."""
    return msgs[:WARMUP]


def _after_warmup(got: List[bytes], msgs: List[bytes]) -> List[bytes]:
    warm = _warmup(msgs)
    if got[: len(warm)] != warm:
        raise AssertionError("the warm-up batch did not come back first")
    return got[len(warm) :]


def _log_values(path: str) -> List[bytes]:
    """Every value in a log directory, in order (after the clock)."""
    from engine import LogReader

    with LogReader(path) as r:
        return [bytes(rec.value) for rec in r]


@dataclass(frozen=True)
class _ScanWorkload(Workload):
    """``count`` records of ``size`` on-disk bytes for the verify scan: what
    it expects is the record count; the checksum is not measured (0)."""

    passes: int = 1  # times the log of count // passes records is verified in a run

    @property
    def expected(self) -> Digest:
        return Digest(self.count, 0, None)


# ---------------------------------------------------------------------------
# ours
# ---------------------------------------------------------------------------


def ours_append(wl: Workload) -> Run:
    from engine import Log

    msgs = wl.payloads()
    with _TempDir() as d:
        path = os.path.join(d, "log")
        log = Log(path, durability="none")
        try:
            append = log.append
            t0 = time.perf_counter_ns()
            for m in msgs:
                append(m)
            t1 = time.perf_counter_ns()
        finally:
            log.close()
        got = _log_values(path)
    return Run.timed(t0, t1, digest(got))


def ours_append_many_always(wl: Workload) -> Run:
    from engine import Log

    msgs = wl.payloads()
    batches = _chunks(msgs, BATCH)
    with _TempDir() as d:
        path = os.path.join(d, "log")
        log = Log(path, durability="always")
        try:
            append_many = log.append_many
            append_many(_warmup(msgs))  # untimed: creates and syncs the first segment
            t0 = time.perf_counter_ns()
            for b in batches:
                append_many(b)
            t1 = time.perf_counter_ns()
            if log.durable_offset < log.next_offset:
                raise AssertionError(
                    f"durable offset {log.durable_offset} < {log.next_offset} after durable batches"
                )
        finally:
            log.close()
        got = _log_values(path)
    return Run.timed(t0, t1, digest(_after_warmup(got, msgs)))


def _fill_log(path: str, msgs: List[bytes]) -> None:
    from engine import Log

    with Log(path, durability="none") as log:
        for b in _chunks(msgs, SCAN_FILL_BATCH):
            log.append_many(b)


def ours_read(wl: Workload) -> Run:
    from engine import LogReader

    msgs = wl.payloads()
    with _TempDir() as d:
        path = os.path.join(d, "log")
        _fill_log(path, msgs)
        r = LogReader(path)
        try:
            out: List[Any] = []
            append = out.append
            t0 = time.perf_counter_ns()
            for rec in r:
                append(rec.value)
            t1 = time.perf_counter_ns()
        finally:
            r.close()
    return Run.timed(t0, t1, digest(out))


def _scan_values(count: int) -> List[bytes]:
    # distinct 64-byte values (sequence number + filler); the scan only reads
    # the frames, so a cycle of 8192 of them is enough
    n = min(count, SCAN_FILL_BATCH)
    fill = bytes(range(SIZE - 8))
    return [i.to_bytes(8, "little") + fill for i in range(n)]


def ours_scan(wl: Workload) -> Run:
    import engine._log as _log

    if wl.size != SIZE + FRAME or _log._record_size(SIZE) != wl.size:
        raise AssertionError(
            f"scan workload size {wl.size} is not the on-disk size of a {SIZE}-byte record "
            f"({_log._record_size(SIZE)})"
        )
    from engine import Log

    passes = getattr(wl, "passes", 1)
    if passes < 1 or wl.count % passes:
        raise AssertionError(f"scan workload of {wl.count} records scanned is not {passes} whole passes")
    count = wl.count // passes  # records in the log
    vals = _scan_values(count)
    with _TempDir() as d:
        path = os.path.join(d, "log")
        # single appends: one plain frame per record, the workload's size
        # (append_many would pack batch frames of ~68 bytes per record)
        with Log(path, durability="none") as log:
            append = log.append
            nv = len(vals)
            for i in range(count):
                append(vals[i % nv])
        scans = []
        t0 = time.perf_counter_ns()
        for _ in range(passes):
            scans.append(_log.verify(path))
        t1 = time.perf_counter_ns()
    problems = []
    for results in scans:  # every pass must find the whole log
        problems += _scan_problems(_log, results, count)
    if problems:
        raise AssertionError("verify scan: " + ", ".join(problems))
    # every record was found and CRC-checked by each pass; a scan returns
    # counts, not values, so there is no checksum to report (see _ScanWorkload)
    return Run((t1 - t0) / 1e9, sum(sum(s.records for s in results) for results in scans), 0, None)


def _scan_problems(_log: Any, results: List[Any], count: int) -> List[str]:
    """What one verify pass over a log of ``count`` records got wrong."""
    errors = [f"{s.segment}@{s.error_position}: {s.error}" for s in results if s.error]
    records = sum(s.records for s in results)
    last = max(results, key=lambda s: s.base_offset) if results else None
    header = _log.SEGMENT_HEADER_SIZE
    record_bytes = sum(s.end_position - header for s in results)
    problems = []
    if errors:
        problems.append("errors " + "; ".join(errors))
    if records != count:
        problems.append(f"{records} records scanned, {count} written")
    if last is None or last.next_offset != count:
        problems.append(f"next offset {last.next_offset if last else None} != {count}")
    if record_bytes != count * (SIZE + FRAME):
        problems.append(f"{record_bytes} record bytes scanned, {count * (SIZE + FRAME)} written")
    return problems


# ---------------------------------------------------------------------------
# peers
# ---------------------------------------------------------------------------


def queuelib_push(wl: Workload) -> Run:
    from queuelib import FifoDiskQueue

    msgs = wl.payloads()
    with _TempDir() as d:
        path = os.path.join(d, "q")
        q = FifoDiskQueue(path)
        try:
            push = q.push
            t0 = time.perf_counter_ns()
            for m in msgs:
                push(m)
            t1 = time.perf_counter_ns()
        finally:
            q.close()
        q = FifoDiskQueue(path)  # read back what it persisted
        try:
            got = _drain_queuelib(q)
        finally:
            q.close()
    return Run.timed(t0, t1, digest(got))


def _drain_queuelib(q: Any) -> List[bytes]:
    out: List[bytes] = []
    while True:
        m = q.pop()
        if m is None:
            return out
        out.append(m)


class _QueuelibFilled:
    """One FifoDiskQueue filled with a workload by ``push`` (untimed), kept
    as the template each read-back run copies: its pushes cost the read-back
    case a second per run, and every run pops its own fresh copy.  The copy
    writes each file's bytes through the page cache, as the pushes did (no
    reflink or in-kernel copy that would leave the pages uncached)."""

    def __init__(self) -> None:
        self.key: Any = None
        self.dir: Any = None

    def copy_to(self, wl: Workload, path: str) -> None:
        key = (wl.count, wl.size, wl.seed)
        if self.key != key:
            from queuelib import FifoDiskQueue

            self.drop()
            self.dir = _TempDir()
            q = FifoDiskQueue(os.path.join(self.dir.path, "q"))
            for m in wl.payloads():
                q.push(m)
            q.close()
            self.key = key
        src = os.path.join(self.dir.path, "q")
        os.mkdir(path)
        for name in sorted(os.listdir(src)):
            with open(os.path.join(src, name), "rb") as f:
                data = f.read()
            with open(os.path.join(path, name), "wb") as f:
                f.write(data)

    def drop(self) -> None:
        if self.dir is not None:
            self.dir.__exit__(None, None, None)
        self.dir = self.key = None


_QUEUELIB_FILLED = _QueuelibFilled()
atexit.register(_QUEUELIB_FILLED.drop)


def queuelib_pop(wl: Workload) -> Run:
    from queuelib import FifoDiskQueue

    with _TempDir() as d:
        path = os.path.join(d, "q")
        _QUEUELIB_FILLED.copy_to(wl, path)  # filled by push, untimed
        q = FifoDiskQueue(path)
        try:
            out: List[Any] = []
            append = out.append
            pop = q.pop
            rng = range(wl.count)
            t0 = time.perf_counter_ns()
            for _ in rng:
                append(pop())
            t1 = time.perf_counter_ns()
            if q.pop() is not None:
                raise AssertionError("FifoDiskQueue holds more than was pushed")
        finally:
            q.close()
    return Run.timed(t0, t1, digest(out))


def _pq_file(d: str) -> Any:
    import persistqueue

    # tempdir on the same file system: its info file is replaced by rename
    return persistqueue.Queue(os.path.join(d, "q"), tempdir=d)


def _drain_pq(q: Any, n: int) -> List[bytes]:
    return [q.get(block=False) for _ in range(n)]


def _pq_empty(q: Any) -> bool:
    import persistqueue

    try:
        q.get(block=False)
    except persistqueue.Empty:
        return True
    return False


def pq_file_put(wl: Workload) -> Run:
    msgs = wl.payloads()
    with _TempDir() as d:
        q = _pq_file(d)
        put = q.put
        t0 = time.perf_counter_ns()
        for m in msgs:
            put(m)
        t1 = time.perf_counter_ns()
        del q
        q = _pq_file(d)  # read back what it persisted
        got = _drain_pq(q, wl.count)
        if not _pq_empty(q):
            raise AssertionError("persist-queue Queue holds more than was put")
        del q
    return Run.timed(t0, t1, digest(got))


def pq_file_get(wl: Workload) -> Run:
    msgs = wl.payloads()
    with _TempDir() as d:
        q = _pq_file(d)
        for m in msgs:
            q.put(m)
        del q
        q = _pq_file(d)
        out: List[Any] = []
        append = out.append
        get = q.get
        rng = range(wl.count)
        t0 = time.perf_counter_ns()
        for _ in rng:
            append(get(block=False))
        t1 = time.perf_counter_ns()
        if not _pq_empty(q):
            raise AssertionError("persist-queue Queue holds more than was put")
        del q
    return Run.timed(t0, t1, digest(out))


def _pq_sqlite(d: str) -> Any:
    import persistqueue

    return persistqueue.SQLiteQueue(os.path.join(d, "sq"), auto_commit=True)


def _pq_sqlite_put(wl: Workload, warm: bool) -> Run:
    msgs = wl.payloads()
    with _TempDir() as d:
        q = _pq_sqlite(d)
        try:
            put = q.put
            if warm:
                for m in _warmup(msgs):
                    put(m)
            t0 = time.perf_counter_ns()
            for m in msgs:
                put(m)
            t1 = time.perf_counter_ns()
        finally:
            q.close()
        q = _pq_sqlite(d)  # read back what it committed
        try:
            got = _drain_pq(q, wl.count + (len(_warmup(msgs)) if warm else 0))
            if not _pq_empty(q):
                raise AssertionError("SQLiteQueue holds more than was put")
        finally:
            q.close()
    return Run.timed(t0, t1, digest(_after_warmup(got, msgs) if warm else got))


def pq_sqlite_put(wl: Workload) -> Run:
    return _pq_sqlite_put(wl, False)


def pq_sqlite_put_warm(wl: Workload) -> Run:
    """SQLiteQueue.put after the same untimed warm-up batch as the durable log."""
    return _pq_sqlite_put(wl, True)


def _deque(d: str) -> Any:
    import diskcache  # type: ignore[import-untyped,unused-ignore]

    return diskcache.Deque(directory=os.path.join(d, "dq"))


def _close_deque(dq: Any) -> None:
    dq.cache.close()


def diskcache_append(wl: Workload) -> Run:
    msgs = wl.payloads()
    with _TempDir() as d:
        dq = _deque(d)
        try:
            append = dq.append
            t0 = time.perf_counter_ns()
            for m in msgs:
                append(m)
            t1 = time.perf_counter_ns()
        finally:
            _close_deque(dq)
        dq = _deque(d)  # read back what it stored
        try:
            got = list(dq)
        finally:
            _close_deque(dq)
    return Run.timed(t0, t1, digest(got))


def diskcache_popleft(wl: Workload) -> Run:
    msgs = wl.payloads()
    with _TempDir() as d:
        dq = _deque(d)
        try:
            with dq.transact():  # one transaction: the fill is untimed anyway
                for m in msgs:
                    dq.append(m)
        finally:
            _close_deque(dq)
        dq = _deque(d)
        try:
            out: List[Any] = []
            append = out.append
            popleft = dq.popleft
            rng = range(wl.count)
            t0 = time.perf_counter_ns()
            for _ in rng:
                append(popleft())
            t1 = time.perf_counter_ns()
            if len(dq):
                raise AssertionError("diskcache Deque holds more than was appended")
        finally:
            _close_deque(dq)
    return Run.timed(t0, t1, digest(out))


_fdatasync: Callable[[int], None] = getattr(os, "fdatasync", os.fsync)


def reference_write_sync(wl: Workload) -> Run:
    """The least a durable batch append can be in Python: one ``os.write``
    of the joined batch and one ``os.fdatasync`` per batch, no framing."""
    msgs = wl.payloads()
    batches = _chunks(msgs, BATCH)
    with _TempDir() as d:
        path = os.path.join(d, "data")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            write, sync, join = os.write, _fdatasync, b"".join
            warm = join(_warmup(msgs))  # untimed, like every durable contender's
            if write(fd, warm) != len(warm):
                raise AssertionError("short write of the warm-up batch")
            sync(fd)
            t0 = time.perf_counter_ns()
            for b in batches:
                buf = join(b)
                view = memoryview(buf)
                while view:
                    view = view[write(fd, view) :]
                sync(fd)
            t1 = time.perf_counter_ns()
        finally:
            os.close(fd)
        with open(path, "rb") as f:
            data = f.read()
    # the file read back as rows (digested in place, no list of slices)
    warm = b"".join(_warmup(msgs))
    if data[: len(warm)] != warm:
        raise AssertionError("the warm-up batch did not come back first")
    body = len(data) - len(warm)
    if body % wl.size:
        raise AssertionError(f"{body} bytes after the warm-up batch: not whole records")
    rows = np.frombuffer(data, np.uint8, offset=len(warm)).reshape(-1, wl.size)
    return Run.timed(t0, t1, digest_array(rows))


# ---------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------


def _ours(name: str, fn: Any) -> Contender:
    return Contender(name, fn, ours=True, requires=OURS, pip_hint=BUILD_HINT)


def cases(profile: Profile) -> List[Case]:
    """The log cases for this profile."""
    where = _where()
    n = profile.count(quick=30_000, full=200_000)
    # the per-put-persistence peers manage 1-4k puts/s here: a small count
    # for every contender of their cases keeps the quick suite quick
    n_slow = profile.count(quick=500, full=10_000)
    n_sync = profile.count(quick=20_000, full=200_000)
    n_sqlite_sync = profile.count(quick=1_000, full=20_000)
    scan_bytes = (1 << 30) if profile.full else (128 << 20)
    scan_size = SIZE + FRAME
    n_scan = profile.count(quick=scan_bytes // scan_size, full=scan_bytes // scan_size)
    # --messages N: N records, one pass (a small log is for checking, not timing)
    scan_passes = 1 if profile.messages is not None else max(1, SCAN_PASS_BYTES // scan_bytes)
    append_none = _ours('engine.Log append (durability="none")', ours_append)
    reader = _ours("engine.LogReader iteration", ours_read)
    out = [
        Case(
            "append 64 B vs queuelib",
            'append(value) one record per call, durability="none" (page cache), against '
            f"FifoDiskQueue.push; {where}",
            THROUGHPUT,
            Workload(n, SIZE),
            [append_none, Contender(QUEUELIB_FIFO, queuelib_push, requires=QUEUELIB)],
            targets=[Target("ratio", 5, QUEUELIB_FIFO)],
        ),
        Case(
            "append 64 B vs per-put queues",
            'append(value), durability="none", against persist-queue Queue.put (defaults: '
            "flush + info-file rename per put, fsync every 100 puts), SQLiteQueue.put "
            "(auto_commit: an fsync per put) and diskcache Deque.append (a SQLite "
            f"transaction per append); {where}",
            THROUGHPUT,
            Workload(n_slow, SIZE),
            [
                append_none,
                Contender(PQ_FILE, pq_file_put, requires=PERSIST),
                Contender(PQ_SQLITE, pq_sqlite_put, requires=PERSIST),
                Contender(DISKCACHE_DEQUE, diskcache_append, requires=DISKCACHE),
            ],
        ),
        Case(
            "durable append_many vs os.write+fdatasync",
            f'append_many of {BATCH}-record batches, durability="always" (one sync per '
            f"batch), against os.write of the joined batch + os.fdatasync per batch in "
            f"plain Python; each contender first writes one untimed warm-up batch (file "
            f"creation, first sync); {where}",
            THROUGHPUT,
            Workload(n_sync, SIZE),
            [
                _ours('engine.Log append_many (durability="always")', ours_append_many_always),
                Contender(REFERENCE, reference_write_sync),
            ],
            targets=[Target("ratio", 0.95, REFERENCE, label=f">= 0.95x {REFERENCE} (the floor)")],
        ),
        Case(
            "durable append_many vs SQLiteQueue",
            f'append_many of {BATCH}-record batches, durability="always", against '
            f"SQLiteQueue.put (auto_commit: an fsync per put), and the plain-Python "
            f"{REFERENCE}; one untimed warm-up batch each; {where}",
            THROUGHPUT,
            Workload(n_sqlite_sync, SIZE),
            [
                _ours('engine.Log append_many (durability="always")', ours_append_many_always),
                Contender(PQ_SQLITE, pq_sqlite_put_warm, requires=PERSIST),
                Contender(REFERENCE, reference_write_sync),
            ],
            targets=[Target("ratio", 300, PQ_SQLITE)],
        ),
        Case(
            "read back vs queuelib",
            "iterate a closed log's values with LogReader (copies) against "
            f"FifoDiskQueue.pop; filling untimed; {where}",
            THROUGHPUT,
            Workload(n, SIZE),
            [reader, Contender(QUEUELIB_FIFO, queuelib_pop, requires=QUEUELIB)],
            targets=[Target("ratio", 5, QUEUELIB_FIFO)],
        ),
        Case(
            "read back vs per-put queues",
            "LogReader iteration against persist-queue Queue.get and diskcache "
            f"Deque.popleft; filling untimed; {where}",
            THROUGHPUT,
            Workload(n_slow, SIZE),
            [
                reader,
                Contender(PQ_FILE, pq_file_get, requires=PERSIST),
                Contender(DISKCACHE_DEQUE, diskcache_popleft, requires=DISKCACHE),
            ],
        ),
        Case(
            "verify scan",
            f"engine._log.verify(path) over a {scan_bytes >> 20} MiB log of {SIZE}-byte "
            f"records written untimed (records cached, preallocated tail not), verified "
            f"{scan_passes} time(s) per run; MB/s of record bytes scanned "
            f"({scan_size} per record: value + frame); {where}",
            THROUGHPUT,
            _ScanWorkload(n_scan * scan_passes, scan_size, passes=scan_passes),
            [_ours("engine._log.verify", ours_scan)],
            unit="MB/s",
            # the log is 256 MiB (quick) / 1 GiB (full) whatever the scan's speed
            sizable=False,
            targets=[Target("min_mb_per_s", 1000)],
        ),
    ]
    for case in out:
        # in-process readers and appenders move 3-7 M records/s: a 0.5 s
        # window takes more than the default cap of 1.5 M (payloads in memory)
        case.max_bytes = 256 << 20
    return out
