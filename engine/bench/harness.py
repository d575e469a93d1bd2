"""The benchmark harness: data model, runner, delivery verification, statistics.

Section interface (stable; section owners write exactly this)
------------------------------------------------------------
A section is a module ``engine/bench/<name>.py`` listed in :data:`SECTIONS`::

    from engine.bench.harness import Case, Contender, Profile, Run, Workload, digest

    SECTION = "log"

    def cases(profile: Profile) -> list[Case]:
        wl = Workload(count=profile.count(quick=100_000, full=1_000_000), size=64)
        return [Case(
            name="append 1->1",
            description="append one record at a time, then read them all back",
            kind="throughput",            # or "latency"
            workload=wl,
            contenders=[
                Contender("engine.Log", _ours, ours=True, requires=("engine._log",)),
                Contender("persist-queue", _persist, requires=("persistqueue",)),
            ],
        )]

    def _ours(wl: Workload) -> Run:
        msgs = wl.payloads()                 # deterministic, built once, outside the clock
        ... setup (not timed) ...
        t0 = time.perf_counter_ns()
        ... the work; the consumer KEEPS what it received (a list) ...
        t1 = time.perf_counter_ns()
        d = digest(received)                 # OUTSIDE the timed region
        return Run.timed(t0, t1, d)          # seconds, count, checksum, in_order

Rules a contender follows:

* It moves ``wl.count`` messages, the payloads of :meth:`Workload.payloads`
  (or the rows of :meth:`Workload.array`), and returns a :class:`Run`.
* Only the work is timed: setup, teardown and process start stay outside
  ``seconds``. Across processes take ``time.perf_counter_ns()`` (system-wide
  monotonic on Linux/macOS) in the producer after a start barrier and in the
  consumer after the last message; the child digests what it received after
  its clock stops and sends ``(count, checksum, in_order, t_end)`` back.
* The runner compares ``count`` and ``checksum`` with the workload's; a lost,
  duplicated or corrupted message fails the case loudly (the command exits
  non-zero). :func:`digest` is order-independent and additive, so competing
  consumers digest their share and the parent adds them with
  :meth:`Digest.combine`.
* ``in_order``: ``True`` / ``False`` if the contender can tell (every
  :func:`digest` does, from the 8-byte sequence number each payload starts
  with), ``None`` if not. A case with ``ordered=True`` fails on ``False``.
* Latency cases: ``Run.latencies_ns`` holds one sample per round trip (ns);
  ``count``/``checksum`` cover the messages echoed back.
* ``requires`` lists import names; a contender whose imports are missing is
  skipped with ``skipped: NAME (pip install "queue-engine[bench]")``.
* Raise any exception to report a broken contender (it fails the case); guard
  every blocking wait with a timeout so a lost message cannot hang the run.
  :mod:`engine.bench.peers` has the process plumbing (``flow_run`` for 1->N
  with a start barrier, CPU pinning and a deadline; ``pingpong_run``;
  ``thread_run``; ``RowSink`` for array consumers) that sections may reuse.

Steady state (throughput cases)
-------------------------------
A rate is only worth quoting once start-up is over and the producer has had to
wait for its consumer. So every throughput run reports a *window*: the seconds
and messages after an in-run warm-up (``Run.timed(..., window=(t_warm_ns,
n_warm))``: the consumer stamps the clock once it has received its first
``n_warm`` messages; without it the window is the whole timed region). Before
its measured repetitions each contender runs once untimed as a warm-up, and,
unless ``--messages`` pins the count, that run sizes the contender's workload
so its window lasts about :data:`TARGET_WINDOW_S` (capped in memory by
:data:`SIZED_BYTES_CAP`). A run is *valid* when its window lasts at least
``Profile.min_window`` (:data:`MIN_WINDOW_S`) or moves at least
:data:`VOLUME_FACTOR` times ``Case.buffer_bytes`` (the largest buffer of any
contender); an invalid run is verified and recorded, flagged, and never
ranked. Every run's window goes into the JSON. The last sizing run counts
as repetition 0 when it ran at the final size after an earlier run, verified,
with a valid window (``reused`` in the JSON): a run it would only repeat.

Optional ``Case`` fields: ``unit`` ("msg/s", "MB/s" or "us"; MB/s ranks by
bandwidth), ``ordered=False`` for competing consumers, ``repeat`` (a fixed
repetition count), ``params`` (plots: ``{"sweep": "size" | "consumers",
"x": value, "group": title}``) and ``targets`` (:class:`Target` goals, e.g.
``Target("ratio", 25, "multiprocessing.Queue")``, reported met / NOT MET).
``buffer_bytes`` (see above) and ``sizable=False`` for a workload whose count
must not change. ``Contender(rank=False)`` is a reference row (a floor such as
plain function calls): measured and shown, never ranked.
A section may define ``QUICK``, the names of the cases the quick profile runs
(default: all); ``--full`` runs every case.
Add the section's module name to :data:`SECTIONS` when it lands.

The runner interleaves contenders across repetitions (A B C, A B C, ...) so
machine noise hits all of them alike, and reports the median and spread (min,
max, IQR) of msg/s and MB/s, and for latency p50/p90/p99/p99.9/max from an HDR
histogram of every sample of every repetition. The ratio is ours (best of the
``ours=True`` contenders) over the best peer: > 1 means we win, for rates and
for latencies (peer p50 / our p50).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import math
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

SCHEMA_VERSION = 1

# Section modules, in run order (ring first), one name per line. A module that
# does not exist yet is skipped; add a name here when its section lands.
SECTIONS: Tuple[str, ...] = (
    "ring",
    "log",
    "versions",
    "transactions",
    "counters",
    "scheduling",
    "saga",
    "txn",
    "bridge",
    "aio",
    "queues",
)

PIP_HINT = 'pip install "queue-engine[bench]"'


THROUGHPUT = "throughput"
# pip_hint for our own contenders: missing means an unbuilt source tree, not a missing extra
BUILD_HINT = "build it: pip install . (or python setup.py build_ext --inplace)"
LATENCY = "latency"

# steady-state windows (see the module docstring)
MIN_WINDOW_S = 0.25  # a throughput run's window must last this long (or move VOLUME_FACTOR buffers)
TARGET_WINDOW_S = 0.5  # what sizing aims for: a margin above the minimum for noisy machines
VOLUME_FACTOR = 4  # ... or move this many times the largest buffer of any contender
SIZED_BYTES_CAP = 160 << 20  # payload bytes of one sized workload (the payloads live in memory)
SIZED_COUNT_CAP = 1_500_000  # messages of one sized workload (past it the volume rule applies)
WARMUP_RUNS = 3  # at most this many warm-up (and sizing) runs per contender
P99_9_MIN_SAMPLES = 1000  # below this p99.9 is the max in disguise: not reported

_U64 = np.uint64
_MASK64 = (1 << 64) - 1


# ---------------------------------------------------------------------------
# profile and workload
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    """How big a run is: ``quick`` (the default: each section's ``QUICK``
    cases, 2 repetitions, about 90 s on 2 cores) or ``full`` (every case,
    5 repetitions); both size every throughput window alike.
    ``messages``/``repeat`` override every case (``messages`` turns sizing
    off, so its short runs are flagged invalid)."""

    full: bool = False
    messages: Optional[int] = None  # --messages N: every case's message count (no sizing)
    repeat: Optional[int] = None  # --repeat N: repetitions of every case
    min_window: float = MIN_WINDOW_S  # shortest valid throughput window (0: no minimum, no sizing)

    @property
    def sizing(self) -> bool:
        """Whether throughput workloads are sized to the window (not when
        ``--messages`` pins the count or there is no minimum)."""
        return self.messages is None and self.min_window > 0

    @property
    def name(self) -> str:
        return "full" if self.full else "quick"

    def count(self, quick: int, full: int) -> int:
        """The message count for a case: ``--messages`` if given, else the
        quick or full figure."""
        if self.messages is not None:
            return max(1, int(self.messages))
        return int(full if self.full else quick)

    def reps(self, quick: int = 2, full: int = 5) -> int:
        """Repetitions for a case: ``--repeat`` if given, else quick or full."""
        if self.repeat is not None:
            return max(1, int(self.repeat))
        return int(full if self.full else quick)


@dataclass(frozen=True)
class Workload:
    """``count`` messages of ``size`` bytes: an 8-byte little-endian sequence
    number (truncated for sizes < 8) followed by filler from ``seed``.

    Payload ``i`` depends only on ``(i, size, seed)``: a workload is the
    first ``count`` payloads of its ``(size, seed)`` pool, built once, grown
    when a larger count is asked for, and shared by every contender and every
    count that sizing tries (outside any timed region; forked children
    inherit it). ``expected`` is their :class:`Digest`.
    """

    count: int
    size: int
    seed: int = 0

    def __post_init__(self) -> None:
        if self.count < 1 or self.size < 1:
            raise ValueError(f"workload needs count >= 1 and size >= 1, got {self}")

    @property
    def nbytes(self) -> int:
        return self.count * self.size

    def array(self) -> np.ndarray:
        """All payloads as a read-only C-contiguous ``(count, size)`` uint8 array."""
        return _build_array(self.count, self.size, self.seed)

    def payloads(self) -> List[bytes]:
        """All payloads as a new list of shared ``bytes`` objects."""
        return _pool(self.size, self.seed).payloads(self.count)

    @property
    def expected(self) -> Digest:
        return _expected(self.count, self.size, self.seed)


POOL_BLOCK_BYTES = 4 << 20  # payload bytes generated per block (one generator per block)
POOLS_KEPT = 3  # (size, seed) pools kept alive (the least recently used goes first)


class _Pool:
    """Every payload of one ``(size, seed)`` built so far: rows as one
    read-only array and, once asked for, as ``bytes`` objects.

    Block ``b`` holds payloads ``b * block ...`` (``block`` payloads of
    ``size`` in :data:`POOL_BLOCK_BYTES`, at least one): filler from a
    generator seeded with ``(seed, b)``, then the sequence numbers, so a
    payload never depends on how many were built and growing the pool keeps
    the payloads already there (and their ``bytes`` objects)."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed
        self.block = max(1, POOL_BLOCK_BYTES // size)
        self.rows = np.empty((0, size), np.uint8)
        self.msgs: List[bytes] = []

    def array(self, count: int) -> np.ndarray:
        if count > len(self.rows):
            self._grow(count)
        return self.rows[:count]

    def payloads(self, count: int) -> List[bytes]:
        have = len(self.msgs)
        if count > have:
            buf = self.array(count)[have:].tobytes()
            size = self.size
            self.msgs.extend([buf[i : i + size] for i in range(0, len(buf), size)])
        return self.msgs[:count]

    def _grow(self, count: int) -> None:
        size, block = self.size, self.block
        old = len(self.rows)  # a whole number of blocks
        rows = np.empty((-(-count // block) * block, size), np.uint8)
        rows[:old] = self.rows
        k = min(8, size)
        for start in range(old, len(rows), block):
            rng = np.random.default_rng((self.seed, start // block))
            part = rows[start : start + block]
            part[:] = rng.integers(0, 256, size=part.shape, dtype=np.uint8)
            seq = np.arange(start, start + block, dtype="<u8").view(np.uint8).reshape(block, 8)
            part[:, :k] = seq[:, :k]
        rows.setflags(write=False)
        self.rows = rows


_POOLS: Dict[Tuple[int, int], _Pool] = {}


def _pool(size: int, seed: int) -> _Pool:
    pool = _POOLS.pop((size, seed), None) or _Pool(size, seed)
    _POOLS[(size, seed)] = pool  # most recently used last
    while len(_POOLS) > POOLS_KEPT:
        del _POOLS[next(iter(_POOLS))]
    return pool


def _build_array(count: int, size: int, seed: int) -> np.ndarray:
    return _pool(size, seed).array(count)


@functools.lru_cache(maxsize=8)
def _expected(count: int, size: int, seed: int) -> Digest:
    return digest_array(_build_array(count, size, seed))


# ---------------------------------------------------------------------------
# digest: order-independent, additive, sensitive to loss/duplication/corruption
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Digest:
    """What a consumer received: message count, checksum (sum mod 2**64 of a
    64-bit mix of each message), and whether sequence numbers rose strictly
    (``None`` when it cannot tell)."""

    count: int
    checksum: int
    in_order: Optional[bool] = None

    @staticmethod
    def combine(parts: Iterable[Digest]) -> Digest:
        """The digest of several consumers' shares (order is not defined
        across competing consumers, so ``in_order`` is ``None``)."""
        count = 0
        checksum = 0
        for p in parts:
            count += p.count
            checksum = (checksum + p.checksum) & _MASK64
        return Digest(count, checksum, None)


_WEIGHTS = np.random.default_rng(0x5EED).integers(1, 1 << 63, size=8192, dtype=np.uint64) | _U64(1)


def _fmix64(h: np.ndarray) -> np.ndarray:
    # murmur3 finaliser: makes the per-message hash non-linear, so a lost
    # message and a duplicated one cannot cancel out in the sum
    with np.errstate(over="ignore"):
        h ^= h >> _U64(33)
        h *= _U64(0xFF51AFD7ED558CCD)
        h ^= h >> _U64(33)
        h *= _U64(0xC4CEB9FE1A85EC53)
        h ^= h >> _U64(33)
    return h


_cdigest: Any  # the same digest computed in C, message by message (no joined copy)
try:
    from engine import _benchdigest as _cdigest
except ImportError:  # an unbuilt source tree: numpy alone
    _cdigest = None


@functools.lru_cache(maxsize=16)
def _weight_row(width: int) -> np.ndarray:
    """The weight of each of ``width`` 8-byte words, as :func:`digest_array`
    applies them chunk by chunk."""
    parts = [_weights(j0, min(512, width - j0)) for j0 in range(0, width, 512)]
    return np.ascontiguousarray(np.concatenate(parts), dtype=np.uint64)


def digest_array(rows: np.ndarray, ordered: bool = True) -> Digest:
    """Digest a ``(n, size)`` uint8 array (each row one message)."""
    rows = np.ascontiguousarray(rows)
    if rows.ndim != 2:
        raise ValueError("digest_array needs a 2-D array of rows")
    rows = rows.view(np.uint8).reshape(rows.shape[0], -1)
    n, size = rows.shape
    if n == 0:
        return Digest(0, 0, True)
    if _cdigest is not None and size > 0:
        count, checksum, in_order = _cdigest.digest_rows(rows, _weight_row((size + 7) // 8))
        return Digest(count, checksum, in_order if ordered else None)
    return _digest_array_numpy(rows, ordered)


def _digest_array_numpy(rows: np.ndarray, ordered: bool = True) -> Digest:
    """:func:`digest_array` in numpy: its definition (``rows`` a C-contiguous
    2-D uint8 array of at least one row)."""
    n, size = rows.shape
    pad = (-size) % 8
    if pad:
        rows = np.concatenate([rows, np.zeros((n, pad), np.uint8)], axis=1)
    words = rows.view("<u8")
    width = words.shape[1]
    # blocks of rows keep every temporary cache-sized (a GiB of rows would
    # otherwise make GiB-sized products: 9 s instead of 1 s for 2 GiB); the
    # checksum is a sum mod 2**64, so adding the blocks' sums gives the same value
    block = max(1, (4 << 20) // (8 * width))
    checksum = 0
    with np.errstate(over="ignore"):
        for i0 in range(0, n, block):
            part = words[i0 : i0 + block]
            h = np.full(len(part), (size * 0x9E3779B97F4A7C15) & _MASK64, dtype=np.uint64)
            # chunks of columns keep the temporary small for 64 KiB messages
            for j0 in range(0, width, 512):
                w = part[:, j0 : j0 + 512]
                h += (w * _weights(j0, w.shape[1])).sum(axis=1, dtype=np.uint64)
            checksum = (checksum + int(_fmix64(h).sum(dtype=np.uint64))) & _MASK64
    in_order: Optional[bool] = None
    if ordered:
        seq = words[:, 0].copy()
        if size < 8:
            if n <= 256**size:
                in_order = bool(np.all(np.diff(seq.astype(np.int64)) > 0)) if n > 1 else True
        else:
            in_order = bool(np.all(seq[1:] > seq[:-1])) if n > 1 else True
    return Digest(n, checksum, in_order)


def _weights(start: int, width: int) -> np.ndarray:
    if start + width <= _WEIGHTS.size:
        return _WEIGHTS[start : start + width]
    idx = np.arange(start, start + width) % _WEIGHTS.size
    return _WEIGHTS[idx] ^ _U64(start // _WEIGHTS.size + 1)


def digest(messages: Sequence[Any]) -> Digest:
    """Digest what a consumer received, in the order it received it.

    ``messages`` is a sequence of bytes-like objects (bytes, memoryview,
    numpy rows) or a 2-D uint8 array. Call it after stopping the clock.
    """
    if isinstance(messages, np.ndarray):
        return digest_array(messages)
    n = len(messages)
    if n == 0:
        return Digest(0, 0, True)
    if _cdigest is not None:
        msgs = messages if isinstance(messages, list) else list(messages)
        first = len(msgs[0])
        if first > 0:
            try:
                got = _cdigest.digest_list(msgs, _weight_row((first + 7) // 8))
            except (TypeError, BufferError, ValueError):
                got = None  # not all plain contiguous buffers: the numpy path below
            if got is not None:
                return Digest(*got)
    return _digest_numpy(messages)


def _digest_numpy(messages: Sequence[Any]) -> Digest:
    """:func:`digest` of a non-empty sequence by joining and digesting rows in numpy."""
    n = len(messages)
    lengths = set(map(len, messages))
    if len(lengths) == 1:
        size = lengths.pop()
        if size == 0:
            return Digest(n, (n * int(_fmix64(np.zeros(1, np.uint64))[0])) & _MASK64, None)
        buf = b"".join(messages)
        return digest_array(np.frombuffer(buf, np.uint8).reshape(n, size))
    # mixed sizes: digest each size group, then add (order only within a group)
    groups: Dict[int, List[Any]] = {}
    for m in messages:
        groups.setdefault(len(m), []).append(m)
    parts = [digest(g) for g in groups.values()]
    return Digest.combine(parts)


# ---------------------------------------------------------------------------
# runs, contenders, cases
# ---------------------------------------------------------------------------


@dataclass
class Run:
    """One timed run of one contender."""

    seconds: float  # the timed region only
    count: int  # messages delivered (digested outside the timed region)
    checksum: int  # Digest.checksum of what was delivered
    in_order: Optional[bool] = None  # True/False if the contender can tell
    latencies_ns: Optional[Sequence[int]] = None  # latency cases: one sample per round trip
    window_seconds: Optional[float] = None  # steady state: seconds after the in-run warm-up
    window_count: Optional[int] = None  # messages delivered in that window

    @classmethod
    def timed(
        cls,
        t0_ns: int,
        t1_ns: int,
        d: Digest,
        latencies_ns: Optional[Sequence[int]] = None,
        window: Optional[Tuple[int, int]] = None,
    ) -> Run:
        """A run from ``perf_counter_ns`` stamps and the consumer's digest;
        ``window=(t_warm_ns, n_warm)``: the consumer had ``n_warm`` messages
        at ``t_warm_ns``, and the steady-state window runs from there to
        ``t1_ns``."""
        run = cls((t1_ns - t0_ns) / 1e9, d.count, d.checksum, d.in_order, latencies_ns)
        if window is not None:
            t_warm, n_warm = window
            run.window_seconds = (t1_ns - t_warm) / 1e9
            run.window_count = d.count - n_warm
        return run

    def window(self) -> Tuple[float, int]:
        """(seconds, messages) of the steady-state window (the whole timed
        region when the contender reports no warm-up)."""
        if self.window_seconds is None or self.window_count is None:
            return self.seconds, self.count
        return self.window_seconds, self.window_count


RunFn = Callable[[Workload], Run]


@dataclass(frozen=True)
class Contender:
    """One implementation measured in a case."""

    name: str
    fn: RunFn
    ours: bool = False
    requires: Tuple[str, ...] = ()  # import names; missing => skipped
    pip_hint: str = PIP_HINT
    rank: bool = True  # False: a reference row (a floor), shown but never ranked

    def missing(self) -> List[str]:
        """The ``requires`` entries that cannot be imported here."""
        out = []
        for mod in self.requires:
            try:
                if importlib.util.find_spec(mod) is None:
                    out.append(mod)
                    continue
                importlib.import_module(mod)
            except Exception:
                out.append(mod)
        return out


@dataclass
class Case:
    """One comparison: every contender runs the same workload."""

    name: str
    description: str
    kind: str  # THROUGHPUT | LATENCY
    workload: Workload
    contenders: List[Contender]
    unit: str = "msg/s"  # the headline unit: "msg/s", "MB/s" or "us" (latency)
    ordered: bool = True  # a run that reports in_order=False fails
    repeat: Optional[int] = None  # default: profile.reps()
    params: Dict[str, Any] = field(default_factory=dict)  # for plots: {"sweep": "size", "x": 64}
    targets: List[Target] = field(default_factory=list)  # goals checked and reported
    buffer_bytes: int = 0  # the largest buffer of any contender (the volume rule for windows)
    sizable: bool = True  # False: the workload's count is fixed (no sizing to the window)
    max_bytes: Optional[int] = None  # sizing's cap on count x size (default SIZED_BYTES_CAP and
    # SIZED_COUNT_CAP, for payload lists); cases whose contenders build no list may go higher

    def __post_init__(self) -> None:
        if self.kind not in (THROUGHPUT, LATENCY):
            raise ValueError(f"case {self.name!r}: kind must be throughput or latency")


@dataclass(frozen=True)
class Target:
    """A goal for our best contender in a case, reported as met or not met.

    ``kind``: ``"ratio"`` (ours / ``peer``'s headline >= ``value``; latency:
    peer p50 / ours), ``"min_mb_per_s"`` (median MB/s >= ``value``),
    ``"min_msg_per_s"`` or ``"max_p50_ns"`` (p50 <= ``value`` ns).
    """

    kind: str
    value: float
    peer: Optional[str] = None  # the contender name, for "ratio"
    label: str = ""

    def describe(self) -> str:
        if self.label:
            return self.label
        if self.kind == "ratio":
            return f">= {self.value:g}x {self.peer}"
        if self.kind == "min_mb_per_s":
            return (
                f">= {self.value / 1000:g} GB/s"
                if self.value >= 1000
                else f">= {self.value:g} MB/s"
            )
        if self.kind == "min_msg_per_s":
            return f">= {self.value:g} msg/s"
        return f"p50 <= {self.value / 1000:g} us"


# ---------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------

PERCENTILES = (50.0, 90.0, 99.0, 99.9)


class LatencyHistogram:
    """An HDR histogram of latencies in ns (1 ns .. 1 h, 3 significant digits).

    Uses the ``hdrhistogram`` package when it is installed, else a log-linear
    numpy histogram with the same resolution (2048 sub-buckets per power of
    two: every value is recorded within 0.05 %).
    """

    _SUB_BITS = 11  # 2048 sub-buckets per octave

    def __init__(self) -> None:
        self._hdr: Any = None
        try:
            from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped,unused-ignore]

            self._hdr = HdrHistogram(1, 3_600_000_000_000, 3)
        except Exception:
            self._counts: Dict[int, int] = {}
        self.total = 0
        self.max = 0
        self.min = 0

    def record(self, samples_ns: Iterable[int]) -> None:
        arr = np.asarray(list(samples_ns) if not isinstance(samples_ns, np.ndarray) else samples_ns)
        if arr.size == 0:
            return
        arr = np.clip(arr.astype(np.int64), 1, None)
        mx = int(arr.max())
        mn = int(arr.min())
        self.max = max(self.max, mx)
        self.min = mn if self.total == 0 else min(self.min, mn)
        self.total += int(arr.size)
        if self._hdr is not None:
            vals, cnts = np.unique(arr, return_counts=True)
            for v, c in zip(vals.tolist(), cnts.tolist()):
                self._hdr.record_value(v, c)
            return
        keys = self._bucket(arr)
        vals, cnts = np.unique(keys, return_counts=True)
        for k, c in zip(vals.tolist(), cnts.tolist()):
            self._counts[k] = self._counts.get(k, 0) + c

    def _bucket(self, arr: np.ndarray) -> np.ndarray:
        # bucket key = (octave << SUB_BITS) | sub; values below 2**SUB_BITS exact
        sb = self._SUB_BITS
        v = arr.astype(np.uint64)
        octave = np.floor(np.log2(np.maximum(v, 1).astype(np.float64))).astype(np.int64)
        shift = np.maximum(octave - sb, 0)
        sub = (v >> shift.astype(np.uint64)).astype(np.int64)
        return (shift << (sb + 1)) | sub

    def _unbucket(self, key: int) -> int:
        sb = self._SUB_BITS
        shift = key >> (sb + 1)
        sub = key & ((1 << (sb + 1)) - 1)
        # report the bucket's upper edge (HDR reports highest-equivalent values)
        return ((sub + 1) << shift) - 1 if shift else sub

    def percentile(self, p: float) -> float:
        if self.total == 0:
            return math.nan
        if p >= 100.0:
            return float(self.max)
        if self._hdr is not None:
            return float(min(self._hdr.get_value_at_percentile(p), self.max))
        rank = max(1, int(math.ceil(p / 100.0 * self.total)))
        seen = 0
        for key in sorted(self._counts):
            seen += self._counts[key]
            if seen >= rank:
                return float(min(self._unbucket(key), self.max))
        return float(self.max)

    def summary(self) -> Dict[str, float]:
        """p50/p90/p99/p99.9/max/min in ns, plus the sample count."""
        out = {_pkey(p): self.percentile(p) for p in PERCENTILES}
        if self.total < P99_9_MIN_SAMPLES:
            out["p99_9"] = math.nan  # from fewer samples it is the max, not a p99.9
        out["max"] = float(self.max)
        out["min"] = float(self.min)
        out["samples"] = float(self.total)
        return out

    @property
    def backend(self) -> str:
        return "hdrhistogram" if self._hdr is not None else "numpy-log-linear"


def exact_percentiles(samples_ns: Sequence[int]) -> Dict[str, float]:
    """Exact p50/p90/p99/p99.9/max of one run's samples (the spread across
    repetitions; the headline figures come from the merged histogram)."""
    arr = np.asarray(samples_ns, dtype=np.float64)
    out = {_pkey(p): float(np.percentile(arr, p, method="inverted_cdf")) for p in PERCENTILES}
    if arr.size < P99_9_MIN_SAMPLES:
        out["p99_9"] = math.nan
    out["max"] = float(arr.max())
    return out


def _pkey(p: float) -> str:
    return "p" + (f"{p:g}".replace(".", "_") if p != int(p) else str(int(p)))


def _spread(values: Sequence[float]) -> Dict[str, float]:
    vals = sorted(values)
    if not vals:
        return {
            "median": math.nan,
            "min": math.nan,
            "max": math.nan,
            "q1": math.nan,
            "q3": math.nan,
        }
    if len(vals) >= 2:
        q1, _, q3 = statistics.quantiles(vals, n=4, method="inclusive")
    else:
        q1 = q3 = vals[0]
    return {
        "median": statistics.median(vals),
        "min": vals[0],
        "max": vals[-1],
        "q1": q1,
        "q3": q3,
    }


# ---------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------

OK = "ok"
FAILED = "FAILED"
SKIPPED = "skipped"


@dataclass
class RunRecord:
    """One repetition as measured and verified."""

    rep: int
    seconds: float
    count: int
    checksum: int
    in_order: Optional[bool]
    ok: bool
    error: Optional[str] = None
    latency_ns: Optional[Dict[str, float]] = None  # this run's exact percentiles (latency cases)
    window_seconds: Optional[float] = None  # the steady-state window (throughput)
    window_count: Optional[int] = None
    valid: bool = True  # False: the window was shorter than the minimum (never ranked)
    reused: bool = False  # repetition 0 is the contender's last warm-up run (see _warm_up)

    def rate(self) -> float:
        """Messages per second over the window (NaN when there is none)."""
        ws = self.window_seconds if self.window_seconds is not None else self.seconds
        wc = self.window_count if self.window_count is not None else self.count
        return wc / ws if ws and ws > 0 and wc > 0 else math.nan


@dataclass
class ContenderResult:
    """All repetitions of one contender in one case."""

    name: str
    ours: bool
    status: str = OK  # OK | FAILED | SKIPPED
    reason: Optional[str] = None  # skipped: the hint; FAILED: the first error
    runs: List[RunRecord] = field(default_factory=list)
    histogram: Optional[LatencyHistogram] = None
    rank: bool = True  # False: a reference row, never the best peer
    workload: Optional[Workload] = None  # the workload it ran (sized), if not the case's
    warmups: List[RunRecord] = field(default_factory=list)  # untimed warm-up/sizing runs

    def ok_runs(self) -> List[RunRecord]:
        return [r for r in self.runs if r.ok]

    def valid_runs(self) -> List[RunRecord]:
        """Verified runs whose window met the minimum: the ones that rank."""
        return [r for r in self.runs if r.ok and r.valid]

    def rates(self, size: int) -> Dict[str, Dict[str, float]]:
        """Spread of msg/s and MB/s over the valid runs (a reference row,
        never ranked: over every verified run)."""
        runs = self.valid_runs() if self.rank else self.ok_runs()
        msgs = [x for x in (r.rate() for r in runs) if math.isfinite(x)]
        mbs = [m * size / 1e6 for m in msgs]
        return {"msg_per_s": _spread(msgs), "mb_per_s": _spread(mbs)}

    def windows(self) -> Dict[str, Dict[str, float]]:
        """Spread of the runs' window seconds and messages (every verified run)."""
        ok = self.ok_runs()
        secs = [r.window_seconds if r.window_seconds is not None else r.seconds for r in ok]
        cnts = [float(r.window_count if r.window_count is not None else r.count) for r in ok]
        return {"seconds": _spread(secs), "messages": _spread(cnts)}

    def latency(self) -> Optional[Dict[str, float]]:
        return self.histogram.summary() if self.histogram is not None else None


@dataclass
class CaseResult:
    """One case after every repetition of every contender."""

    section: str
    case: Case
    contenders: List[ContenderResult]

    @property
    def failed(self) -> bool:
        return any(c.status == FAILED for c in self.contenders)

    @property
    def verified(self) -> bool:
        ran = [c for c in self.contenders if c.status != SKIPPED]
        return bool(ran) and not self.failed and all(c.runs for c in ran)

    def headline(self, c: ContenderResult) -> float:
        """The figure a contender is ranked by: median msg/s (MB/s if the
        case unit is MB/s) over its valid windows for throughput, p50 in ns
        for latency."""
        if c.status != OK or not c.valid_runs():
            return math.nan
        if self.case.kind == LATENCY:
            lat = c.latency()
            return lat["p50"] if lat else math.nan
        key = "mb_per_s" if self.case.unit in ("MB/s", "GB/s") else "msg_per_s"
        return c.rates(self.case.workload.size)[key]["median"]

    def _best(self, ours: bool) -> Optional[ContenderResult]:
        pool = [
            c
            for c in self.contenders
            if c.ours == ours and c.rank and c.status == OK and c.valid_runs()
        ]
        if not pool:
            return None
        if self.case.kind == LATENCY:
            return min(pool, key=self.headline)
        return max(pool, key=self.headline)

    @property
    def best_ours(self) -> Optional[ContenderResult]:
        return self._best(True)

    @property
    def best_peer(self) -> Optional[ContenderResult]:
        return self._best(False)

    @property
    def ratio(self) -> Optional[float]:
        """Ours over the best peer; > 1 means we win (latency: peer p50 / ours)."""
        o, p = self.best_ours, self.best_peer
        if o is None or p is None:
            return None
        ho, hp = self.headline(o), self.headline(p)
        if not (ho > 0 and hp > 0):
            return None
        return hp / ho if self.case.kind == LATENCY else ho / hp

    def ratio_spread(self) -> Optional[Dict[str, float]]:
        """The ratio per repetition (ours / best peer, runs paired by
        repetition, both valid): its median, min, max and quartiles."""
        o, p = self.best_ours, self.best_peer
        if o is None or p is None:
            return None
        if self.case.kind == LATENCY:
            po = {r.rep: r.latency_ns["p50"] for r in o.valid_runs() if r.latency_ns}
            pp = {r.rep: r.latency_ns["p50"] for r in p.valid_runs() if r.latency_ns}
            vals = [pp[k] / po[k] for k in po if k in pp and po[k] > 0]
        else:
            ro = {r.rep: r.rate() for r in o.valid_runs()}
            rp = {r.rep: r.rate() for r in p.valid_runs()}
            vals = [ro[k] / rp[k] for k in ro if k in rp and rp[k] > 0]
        vals = [v for v in vals if math.isfinite(v)]
        return _spread(vals) if vals else None

    def target_results(self) -> List[Dict[str, Any]]:
        """Each target: what it asks, what was measured, whether it is met
        (``met`` is ``None`` when ours or the named peer did not run)."""
        out = []
        ours = self.best_ours
        for t in self.case.targets:
            measured: Optional[float] = None
            if ours is not None:
                if t.kind == "ratio":
                    peer = next(
                        (c for c in self.contenders if c.name == t.peer and c.status == OK), None
                    )
                    if peer is not None:
                        ho, hp = self.headline(ours), self.headline(peer)
                        if ho > 0 and hp > 0:
                            measured = hp / ho if self.case.kind == LATENCY else ho / hp
                elif t.kind in ("min_mb_per_s", "min_msg_per_s"):
                    key = "mb_per_s" if t.kind == "min_mb_per_s" else "msg_per_s"
                    measured = ours.rates(self.case.workload.size)[key]["median"]
                elif t.kind == "max_p50_ns":
                    lat = ours.latency()
                    measured = lat["p50"] if lat else None
            if measured is not None and not math.isfinite(measured):
                measured = None
            met: Optional[bool] = None
            if measured is not None:
                met = measured <= t.value if t.kind == "max_p50_ns" else measured >= t.value
            out.append(
                {
                    "target": t.describe(),
                    "kind": t.kind,
                    "required": t.value,
                    "peer": t.peer,
                    "measured": measured,
                    "met": met,
                }
            )
        return out


@dataclass
class SuiteResult:
    """Everything one ``queue-engine bench`` invocation measured."""

    profile: Profile
    cases: List[CaseResult] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)  # "skipped: NAME (hint)" lines, deduplicated
    errors: List[str] = field(default_factory=list)  # sections that failed to build their cases
    notes: List[str] = field(default_factory=list)  # lines for the report's end (e.g. --check)
    checks: List[Any] = field(default_factory=list)  # CheckRow per case (--check)
    started_wall: float = 0.0
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        return bool(self.errors) or any(c.failed for c in self.cases)


# ---------------------------------------------------------------------------
# progress and the runner
# ---------------------------------------------------------------------------


class Progress:
    """A one-line progress display on stderr (plain lines when not a tty)."""

    def __init__(self, stream: Any = None, enabled: bool = True) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._width = 0
        self._t0 = time.monotonic()

    def update(self, text: str) -> None:
        if not self.enabled:
            return
        line = f"[{time.monotonic() - self._t0:6.1f}s] {text}"
        if self.tty:
            pad = max(0, self._width - len(line))
            self.stream.write("\r" + line + " " * pad)
            self._width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """A line that stays (skips, failures)."""
        if not self.enabled:
            return
        if self.tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self._width = 0
        self.stream.write(text + "\n")
        self.stream.flush()

    def done(self) -> None:
        if self.enabled and self.tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0


def verify(case: Case, run: Run, wl: Optional[Workload] = None) -> Optional[str]:
    """``None`` if the run delivered exactly the workload (``wl``, else the
    case's), else why not."""
    exp = (wl or case.workload).expected
    problems = []
    if run.count != exp.count:
        kind = "lost" if run.count < exp.count else "duplicated"
        problems.append(f"count {run.count} != {exp.count} ({kind} {abs(exp.count - run.count)})")
    if (run.checksum & _MASK64) != exp.checksum:
        problems.append(f"checksum {run.checksum:#018x} != {exp.checksum:#018x}")
    if case.ordered and run.in_order is False:
        problems.append("out of order")
    if not (run.seconds > 0 and math.isfinite(run.seconds)):
        problems.append(f"bad timing {run.seconds!r}")
    if run.window_seconds is not None and not (
        math.isfinite(run.window_seconds) and 0 <= (run.window_count or 0) <= run.count
    ):
        problems.append(f"bad window {run.window_seconds!r} s, {run.window_count!r} messages")
    if case.kind == LATENCY and (run.latencies_ns is None or len(run.latencies_ns) == 0):
        problems.append("no latency samples")
    return "; ".join(problems) or None


def window_valid(case: Case, profile: Profile, seconds: float, count: int) -> bool:
    """Whether a throughput window is long enough to rank: ``min_window``
    seconds, or ``VOLUME_FACTOR`` times the case's largest buffer."""
    if case.kind == LATENCY:
        return True
    if seconds >= profile.min_window:
        return True
    return case.buffer_bytes > 0 and count * case.workload.size >= VOLUME_FACTOR * case.buffer_bytes


_STEPS = (1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0)


def _round_up(n: float) -> int:
    """``n`` rounded up to 1, 1.5, 2, 2.5, 3, 4, 5, 6 or 8 x 10**k, so that
    contenders of similar speed share one (cached) workload."""
    if n <= 1:
        return 1
    k = 10 ** math.floor(math.log10(n))
    for step in _STEPS:
        if step * k >= n:
            return int(step * k)
    return int(10 * k)


def sized_workload(case: Case, wl: Workload, window_seconds: float) -> Workload:
    """The workload whose window would last :data:`TARGET_WINDOW_S`, from a
    run of ``wl`` whose window lasted ``window_seconds`` (never smaller than
    ``wl``; capped in memory, where the volume rule takes over)."""
    if not (window_seconds > 0 and math.isfinite(window_seconds)):
        return wl
    need = wl.count * TARGET_WINDOW_S / window_seconds
    if case.max_bytes is not None:
        cap = max(1, case.max_bytes // max(1, wl.size))
    else:
        cap = max(1, min(SIZED_COUNT_CAP, SIZED_BYTES_CAP // max(1, wl.size)))
    n = min(_round_up(need), max(cap, wl.count))
    if n <= wl.count:
        return wl
    return Workload(n, wl.size, wl.seed)


def resized_down(base: Workload, wl: Workload, window_seconds: float) -> Workload:
    """A smaller workload than ``wl`` whose window would last about
    :data:`TARGET_WINDOW_S` (from a run of ``wl`` whose window lasted
    ``window_seconds``), never below ``base``; ``wl`` when that is no smaller."""
    n = max(base.count, _round_up(wl.count * TARGET_WINDOW_S / window_seconds))
    if n >= wl.count:
        return wl
    return Workload(n, wl.size, wl.seed)


def _record(
    case: Case,
    profile: Profile,
    res: ContenderResult,
    rep: int,
    run: Optional[Run],
    why: Optional[str],
) -> RunRecord:
    if why is None and run is not None:
        ws, wc = run.window()
        rec = RunRecord(
            rep,
            run.seconds,
            run.count,
            run.checksum & _MASK64,
            run.in_order,
            True,
            window_seconds=ws,
            window_count=wc,
            valid=window_valid(case, profile, ws, wc),
        )
        if run.latencies_ns is not None and case.kind == LATENCY:
            rec.latency_ns = exact_percentiles(run.latencies_ns)
        return rec
    return RunRecord(
        rep,
        run.seconds if run else math.nan,
        run.count if run else -1,
        (run.checksum & _MASK64) if run else 0,
        run.in_order if run else None,
        False,
        why,
    )


def _attempt(case: Case, cont: Contender, wl: Workload) -> Tuple[Optional[Run], Optional[str]]:
    # the payloads and their digest exist before any clock (forked children inherit them)
    _ = wl.expected
    try:
        run = cont.fn(wl)
        if not isinstance(run, Run):
            raise TypeError(f"contender returned {type(run).__name__}, not Run")
        return run, verify(case, run, wl)
    except Exception as exc:  # a broken contender fails the case, loudly
        tb = traceback.format_exception_only(type(exc), exc)[-1].strip()
        return None, f"raised {tb}"


def _fail(res: ContenderResult, why: str, section: str, case: Case, progress: Progress) -> None:
    res.status = FAILED
    res.reason = why
    progress.message(f"FAILED: {section}: {case.name} - {res.name}: {why}")


def _warm_up(
    case: Case,
    section: str,
    profile: Profile,
    cont: Contender,
    res: ContenderResult,
    progress: Progress,
) -> None:
    """Untimed runs per contender before its repetitions that also size its
    workload: run, and while the window falls short of most of
    :data:`TARGET_WINDOW_S`, grow the workload and run again at the new size
    (a first, cold run is slower than the warm ones that follow, so one
    estimate undershoots). Reference rows are not sized.

    The last run counts as repetition 0 when it may: it ran at the size the
    repetitions use, after at least one earlier run of the contender (its
    warm-up), verified, with a valid window. It is the run repetition 0
    would repeat, so it is kept instead of discarded."""
    wl = case.workload
    rec: Optional[RunRecord] = None
    ran_final = False  # whether the last run was at the size the loop settled on
    for attempt in range(WARMUP_RUNS):
        progress.update(f"{section}: {case.name} - {cont.name} (warm-up, {wl.count:,} msgs)")
        run, why = _attempt(case, cont, wl)
        rec = _record(case, profile, res, -1 - attempt, run, why)
        res.warmups.append(rec)
        ran_final = True
        if why is not None:
            res.runs.append(rec)
            _fail(res, why, section, case, progress)
            return
        if not (profile.sizing and case.sizable and cont.rank):
            break
        ws = rec.window_seconds or 0.0
        if ws > 1.5 * TARGET_WINDOW_S and wl is not case.workload:
            # the estimate overshot (a first run that fit in the buffers, so
            # it never waited for its consumer): back toward the target, never
            # below the case's own count, so every contender's volume follows
            # its steady rate, not its start-up
            new = resized_down(case.workload, wl, ws)
            if new is wl:
                break
            wl = new
            ran_final = False
            continue
        if ws >= 0.8 * TARGET_WINDOW_S:
            break  # the warm runs that follow are faster, but not by 1.6x
        new = sized_workload(case, wl, ws)
        if new is wl:
            break  # capped: the volume rule decides
        wl = new
        ran_final = False
    res.workload = None if wl is case.workload else wl
    if ran_final and rec is not None and rec.ok and rec.valid and len(res.warmups) > 1:
        res.runs.append(dataclasses.replace(rec, rep=0, reused=True))


def _resize(
    case: Case, profile: Profile, cont: Contender, res: ContenderResult, wl: Workload, rec: Any
) -> bool:
    """Grow ``res``'s workload after a timed run whose window fell short;
    whether it grew (not when sizing is off or the size is capped)."""
    if not (profile.sizing and case.sizable and cont.rank):
        return False
    new = sized_workload(case, wl, rec.window_seconds or 0.0)
    if new is wl:
        return False
    res.workload = new
    return True


def run_case(
    case: Case,
    section: str,
    profile: Profile,
    progress: Optional[Progress] = None,
    skipped_lines: Optional[List[str]] = None,
) -> CaseResult:
    """Warm up (and size) each available contender, then run every one
    ``repeat`` times, interleaved, verifying each run. Never raises for a
    contender's failure: it is recorded."""
    progress = progress or Progress(enabled=False)
    results: List[ContenderResult] = []
    live: List[Tuple[Contender, ContenderResult]] = []
    for cont in case.contenders:
        res = ContenderResult(cont.name, cont.ours, rank=cont.rank)
        results.append(res)
        missing = cont.missing()
        if missing:
            res.status = SKIPPED
            res.reason = f"skipped: {cont.name} ({cont.pip_hint})"
            if skipped_lines is not None and res.reason not in skipped_lines:
                skipped_lines.append(res.reason)
                progress.message(res.reason)
            continue
        if case.kind == LATENCY:
            res.histogram = LatencyHistogram()
        live.append((cont, res))
    reps = case.repeat if case.repeat is not None else profile.reps()
    if profile.repeat is not None:
        reps = profile.reps()
    if profile.min_window > 0 and case.kind != LATENCY:
        for cont, res in live:
            _warm_up(case, section, profile, cont, res, progress)
    for rep in range(reps):
        for cont, res in live:
            if res.status == FAILED or any(r.rep == rep and r.reused for r in res.runs):
                continue
            wl = res.workload or case.workload
            progress.update(f"{section}: {case.name} - {cont.name} ({rep + 1}/{reps})")
            run, why = _attempt(case, cont, wl)
            rec = _record(case, profile, res, rep, run, why)
            res.runs.append(rec)
            if why is None and not rec.valid and _resize(case, profile, cont, res, wl, rec):
                # one slow warm-up (a disk hiccup, a busy core) sized the
                # workload too small: the short run stays recorded (invalid,
                # unranked) and the repetition runs again at the new size
                progress.update(f"{section}: {case.name} - {cont.name} ({rep + 1}/{reps}, resized)")
                run, why = _attempt(case, cont, res.workload or wl)
                rec = _record(case, profile, res, rep, run, why)
                res.runs.append(rec)
            if why is not None:
                _fail(res, why, section, case, progress)
            elif res.histogram is not None and run is not None and run.latencies_ns is not None:
                res.histogram.record(run.latencies_ns)
    return CaseResult(section, case, results)


def load_sections(only: Optional[Sequence[str]] = None) -> List[Tuple[str, Any]]:
    """``(name, module)`` for every section module that exists, in
    :data:`SECTIONS` order; ``only`` picks names (unknown names raise)."""
    wanted = list(SECTIONS) if not only else list(only)
    unknown = [n for n in wanted if n not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    out = []
    for name in SECTIONS:
        if name not in wanted:
            continue
        modname = f"engine.bench.{name}"
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as exc:
            if exc.name == modname:
                continue  # that section has not landed yet
            raise
        out.append((getattr(mod, "SECTION", name), mod))
    return out


def in_profile(mod: Any, case: Case, profile: Profile) -> bool:
    """Whether ``case`` runs in ``profile``: ``--full`` runs every case; the
    quick profile runs the names in the section's ``QUICK`` tuple (every
    case when the section has none). The quick suite stays short by running
    fewer cases, never shorter windows."""
    quick = getattr(mod, "QUICK", None)
    return profile.full or quick is None or case.name in quick


def run_suite(
    profile: Profile,
    only: Optional[Sequence[str]] = None,
    progress: Optional[Progress] = None,
    sections: Optional[List[Tuple[str, Any]]] = None,
) -> SuiteResult:
    """Run every case of every selected section."""
    progress = progress or Progress(enabled=False)
    suite = SuiteResult(profile, started_wall=time.time())
    t0 = time.monotonic()
    for name, mod in sections if sections is not None else load_sections(only):
        try:
            cases = list(mod.cases(profile))
        except Exception as exc:
            msg = f"FAILED: section {name}: cases() raised {type(exc).__name__}: {exc}"
            suite.errors.append(msg)
            progress.message(msg)
            continue
        for case in cases:
            if in_profile(mod, case, profile):
                suite.cases.append(run_case(case, name, profile, progress, suite.skipped))
    progress.done()
    suite.seconds = time.monotonic() - t0
    return suite


# ---------------------------------------------------------------------------
# --check: do the quick ratios hold at the --full volume?
# ---------------------------------------------------------------------------

# the sections --check reruns at the --full volume (their quick cases; the durable saga, txn and
# versions cases add about a minute on 2 cores)
CHECK_SECTIONS: Tuple[str, ...] = ("ring", "log", "saga", "txn", "versions")
CHECK_FACTOR = 1.3  # a quick ratio may differ from the full one by at most this factor


@dataclass
class CheckRow:
    """One case's quick ratio next to its ratio at the ``--full`` volume."""

    section: str
    case: str
    quick: Optional[float]
    full: Optional[float]
    quick_result: Optional[CaseResult] = None  # both runs, for the JSON
    full_result: Optional[CaseResult] = None

    @property
    def factor(self) -> Optional[float]:
        """max(quick/full, full/quick); ``None`` when either is missing."""
        q, f = self.quick, self.full
        if q is None or f is None or not (q > 0 and f > 0):
            return None
        return max(q / f, f / q)

    @property
    def ok(self) -> Optional[bool]:
        fac = self.factor
        return None if fac is None else fac <= CHECK_FACTOR

    def line(self) -> str:
        def r(x: Optional[float]) -> str:
            return "-" if x is None else f"{x:.3g}x"

        fac = self.factor
        verdict = {True: "holds", False: f"DIFFERS (> x{CHECK_FACTOR:g})", None: "not compared"}
        return (
            f"check {self.section}: {self.case}: quick {r(self.quick)}, full {r(self.full)}"
            + (f" (x{fac:.2f})" if fac is not None else "")
            + f" {verdict[self.ok]}"
        )


def run_check(
    quick: SuiteResult,
    sections: List[Tuple[str, Any]],
    progress: Optional[Progress] = None,
) -> List[CheckRow]:
    """Rerun every case of ``sections`` that ``quick`` ran, at the ``--full``
    volume (the full profile's message counts, the quick repetitions), and
    pair each quick ratio with the full one. Adds one note per case to
    ``quick.notes``; a full-volume case that fails verification fails the
    suite like any other."""
    p = quick.profile
    full = Profile(full=True, messages=p.messages, repeat=p.repeat, min_window=p.min_window)
    ran = {(cr.section, cr.case.name): cr for cr in quick.cases}
    rows: List[CheckRow] = []
    for name, mod in sections:
        try:
            cases = [c for c in mod.cases(full) if (name, c.name) in ran]
        except Exception as exc:
            quick.errors.append(f"FAILED: check {name}: cases() raised {type(exc).__name__}: {exc}")
            continue
        for case in cases:
            q = ran[(name, case.name)]
            # the repetitions the quick run gave this case: only the volume differs
            case.repeat = q.case.repeat if q.case.repeat is not None else p.reps()
            res = run_case(case, name, full, progress, quick.skipped)
            if res.failed:
                quick.cases.append(res)  # a failure at full volume fails the run
            rows.append(CheckRow(name, case.name, q.ratio, res.ratio, q, res))
    for row in rows:
        quick.notes.append(row.line())
    quick.checks = rows
    return rows
