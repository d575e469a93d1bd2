"""The versions section: engine.VersionedStore compare-and-set ``put`` and
``get`` against the same operations on a plain dict under a
``threading.Lock`` and on SQLite with a version column.

Every contender does exactly the same thing per message: a compare-and-set
of one key from version 1 to version 2 (``put(key, payload,
expected_version=1)``; for SQLite ``UPDATE kv SET value=?, version=version+1
WHERE key=? AND version=?`` checking ``rowcount == 1``), one distinct key per
message.  The keys are created at version 1 before the clock starts.  After
the clock stops every contender reads every value and version back; the
values, in key order, are digested by the harness (so a lost, doubled or
corrupted write fails the case) and every version must be 2.

The store runs with ``durability="none"`` (page cache: survives a process
crash, not a power loss) and automatic snapshots off (they run in a
background thread every ``snapshot_every`` writes, the case would measure
them too); SQLite runs in memory (``:memory:``, autocommit), the fair peer of
"none": it never touches a disk either.  It is used as its documentation
recommends for this workload: one connection, one cursor reused for every
statement (the statement itself is compiled once and served from the
connection's statement cache), and a ``WITHOUT ROWID`` table, which SQLite
advises for a non-integer primary key with small rows (one B-tree lookup per
update instead of two: key index, then rowid table).

The ``get`` case times one ``get(key)`` per message over the same keys,
against ``dict.get`` under the lock and a SQLite ``SELECT``.

The durable cases run the same compare-and-set with ``durability="always"``
(each ``put`` returns once its record is on stable storage) from 1 and from
8 threads sharing one store (the store appends under its lock and waits for
the sync outside it, so concurrent puts share syncs: the log's group
commit), against the same ``UPDATE`` on a SQLite file (WAL,
``synchronous=FULL``: an fsync per commit), autocommit, one connection per
thread.  ``bench/sync_counts.py --only put`` counts the syncs per put of both.
Both run in steady state (:func:`engine.bench.steady.run_steady`): a quarter
second of warm-up puts on keys of their own, on the store or database then
timed, threads that take the next key from a shared counter and stay busy
until the window closes, and a SQLite file whose WAL starts at full size.

Issue-4 targets (same run): CAS ``put`` >= 500,000/s and >= 10x the SQLite
update; ``get`` within 3x of the locked dict.
"""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
import threading
import time
from typing import Any, Dict, List, Literal, Tuple

from engine.bench.harness import (
    BUILD_HINT,
    THROUGHPUT,
    Case,
    Contender,
    Profile,
    Run,
    Target,
    Workload,
    digest,
)
from engine.bench.steady import presize_wal, run_steady, sqlite_wal

SECTION = "versions"
# the cases the quick profile runs (fewer cases, never shorter windows); --full runs all
# (the in-memory CAS cases are --full only: their sized SQLite peer alone costs the quick
# suite ~25 s; the durable one at 8 threads takes a few seconds)
QUICK = ("durable CAS put vs SQLite FULL, 8 threads",)

OURS = ("engine._log", "engine._versions")
SQLITE_PUT = "sqlite3 version column (:memory:)"
SQLITE_FULL = "sqlite3 version column, synchronous=FULL"
THREADS = 8
LOCKED_DICT = "dict + threading.Lock"


def _keys(n: int) -> List[bytes]:
    return [b"key:%010d" % i for i in range(n)]


def _warm_keys(n: int) -> List[bytes]:
    """Keys of the durable cases' warm-up puts (:mod:`engine.bench.steady`),
    apart from the timed ones and never read back."""
    return [b"warm:%09d" % i for i in range(n)]


def _check_versions(versions: List[int], who: str) -> None:
    bad = sum(1 for v in versions if v != 2)
    if bad:
        raise AssertionError(f"{who}: {bad} keys are not at version 2 after one CAS each")


# ---------------------------------------------------------------------------
# engine.VersionedStore
# ---------------------------------------------------------------------------


class _Ours:
    def __init__(self, n: int, durability: Literal["always", "none"] = "none") -> None:
        from engine.versions import VersionedStore

        self.dir = tempfile.mkdtemp(prefix="qe-bench-versions-")
        self.store = VersionedStore(
            self.dir, durability=durability, snapshot_every=None, segment_bytes=256 << 20
        )
        self.store.apply([("put", k, b"") for k in _keys(n)])  # every key at version 1

    def close(self) -> None:
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def ours_put(wl: Workload) -> Run:
    msgs = wl.payloads()
    keys = _keys(wl.count)
    o = _Ours(wl.count)
    try:
        put = o.store.put
        pairs = list(zip(keys, msgs))
        t0 = time.perf_counter_ns()
        for k, m in pairs:
            put(k, m, 1)
        t1 = time.perf_counter_ns()
        got = [o.store.get(k) for k in keys]
    finally:
        o.close()
    _check_versions([g[0] for g in got], "VersionedStore")
    return Run.timed(t0, t1, digest([g[1] for g in got]))


def ours_put_durable(threads: int) -> Any:
    """CAS puts with ``durability="always"`` from ``threads`` threads on one store."""

    def run(wl: Workload) -> Run:
        msgs = wl.payloads()
        keys = _keys(wl.count)
        warm = _warm_keys(2 * wl.count)  # run_steady runs fewer than 2 * count
        o = _Ours(wl.count, "always")
        try:
            o.store.apply([("put", k, b"") for k in warm])
            put = o.store.put

            def one(_k: int, i: int) -> None:
                put(keys[i], msgs[i], 1)

            t0, t1, _ = run_steady(
                threads, wl.count, one, lambda _k, j: put(warm[j], msgs[j % wl.count], 1)
            )
            got = [o.store.get(k) for k in keys]
        finally:
            o.close()
        _check_versions([g[0] for g in got], "VersionedStore")
        return Run.timed(t0, t1, digest([g[1] for g in got]))

    return run


def ours_get(wl: Workload) -> Run:
    msgs = wl.payloads()
    keys = _keys(wl.count)
    o = _Ours(wl.count)
    try:
        o.store.apply([("put", k, m, 1) for k, m in zip(keys, msgs)])
        get = o.store.get
        out: List[Any] = []
        append = out.append
        t0 = time.perf_counter_ns()
        for k in keys:
            append(get(k))
        t1 = time.perf_counter_ns()
    finally:
        o.close()
    _check_versions([g[0] for g in out], "VersionedStore")
    return Run.timed(t0, t1, digest([g[1] for g in out]))


# ---------------------------------------------------------------------------
# dict + threading.Lock: the same CAS, no log
# ---------------------------------------------------------------------------


class _LockedDict:
    """The least a thread-safe CAS map can be in Python."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data: Dict[bytes, Tuple[int, bytes]] = {}

    def put(self, key: bytes, value: bytes, expected_version: Any = None) -> int:
        with self._lock:
            cur = self._data.get(key)
            ver = 0 if cur is None else cur[0]
            if expected_version is not None and expected_version != ver:
                raise ValueError(f"version conflict on {key!r}")
            ver += 1
            self._data[key] = (ver, value)
            return ver

    def get(self, key: bytes) -> Tuple[int, Any]:
        with self._lock:
            return self._data.get(key, (0, None))


def dict_put(wl: Workload) -> Run:
    msgs = wl.payloads()
    keys = _keys(wl.count)
    d = _LockedDict()
    for k in keys:
        d.put(k, b"")
    put = d.put
    pairs = list(zip(keys, msgs))
    t0 = time.perf_counter_ns()
    for k, m in pairs:
        put(k, m, 1)
    t1 = time.perf_counter_ns()
    got = [d.get(k) for k in keys]
    _check_versions([g[0] for g in got], "dict + Lock")
    return Run.timed(t0, t1, digest([g[1] for g in got]))


def dict_get(wl: Workload) -> Run:
    msgs = wl.payloads()
    keys = _keys(wl.count)
    d = _LockedDict()
    for k, m in zip(keys, msgs):
        d.put(k, b"")
        d.put(k, m, 1)
    get = d.get
    out: List[Any] = []
    append = out.append
    t0 = time.perf_counter_ns()
    for k in keys:
        append(get(k))
    t1 = time.perf_counter_ns()
    _check_versions([g[0] for g in out], "dict + Lock")
    return Run.timed(t0, t1, digest([g[1] for g in out]))


# ---------------------------------------------------------------------------
# SQLite with a version column (in memory, autocommit)
# ---------------------------------------------------------------------------

_UPDATE = "UPDATE kv SET value=?, version=version+1 WHERE key=? AND version=?"


def _sqlite(keys: List[bytes]) -> sqlite3.Connection:
    db = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
    db.execute(
        "CREATE TABLE kv (key BLOB PRIMARY KEY, value BLOB NOT NULL, version INTEGER NOT NULL)"
        " WITHOUT ROWID"
    )
    db.execute("BEGIN")
    db.executemany("INSERT INTO kv VALUES (?, x'', 1)", [(k,) for k in keys])
    db.execute("COMMIT")
    return db


def _sqlite_read(db: sqlite3.Connection, keys: List[bytes]) -> List[Tuple[int, bytes]]:
    rows = dict((k, (v, val)) for k, val, v in db.execute("SELECT key, value, version FROM kv"))
    return [rows[k] for k in keys]


def sqlite_put(wl: Workload) -> Run:
    msgs = wl.payloads()
    keys = _keys(wl.count)
    db = _sqlite(keys)
    try:
        ex = db.cursor().execute  # one cursor for every statement
        pairs = list(zip(keys, msgs))
        t0 = time.perf_counter_ns()
        for k, m in pairs:
            if ex(_UPDATE, (m, k, 1)).rowcount != 1:
                raise AssertionError(f"sqlite: CAS of {k!r} failed")
        t1 = time.perf_counter_ns()
        got = _sqlite_read(db, keys)
    finally:
        db.close()
    _check_versions([g[0] for g in got], "SQLite")
    return Run.timed(t0, t1, digest([g[1] for g in got]))


def sqlite_put_full(threads: int) -> Any:
    """The same CAS on a SQLite file (WAL, ``synchronous=FULL``, autocommit),
    one connection per thread."""

    def run(wl: Workload) -> Run:
        msgs = wl.payloads()
        keys = _keys(wl.count)
        warm = _warm_keys(2 * wl.count)  # run_steady runs fewer than 2 * count
        tmp = tempfile.mkdtemp(prefix="qe-bench-versions-sqlite-")
        path = f"{tmp}/kv.db"

        dbs = [sqlite_wal(path, "FULL") for _ in range(threads)]
        try:
            presize_wal(dbs[0])
            dbs[0].execute(
                "CREATE TABLE kv (key BLOB PRIMARY KEY, value BLOB NOT NULL, "
                "version INTEGER NOT NULL) WITHOUT ROWID"
            )
            dbs[0].execute("BEGIN")
            dbs[0].executemany("INSERT INTO kv VALUES (?, x'', 1)", [(k,) for k in keys + warm])
            dbs[0].execute("COMMIT")

            def cas(k: int, key: bytes, msg: bytes) -> None:
                if dbs[k].execute(_UPDATE, (msg, key, 1)).rowcount != 1:
                    raise AssertionError(f"sqlite: CAS of {key!r} failed")

            t0, t1, _ = run_steady(
                threads,
                wl.count,
                lambda k, i: cas(k, keys[i], msgs[i]),
                lambda k, j: cas(k, warm[j], msgs[j % wl.count]),
            )
            got = _sqlite_read(dbs[0], keys)
        finally:
            for db in dbs:
                db.close()
            shutil.rmtree(tmp, ignore_errors=True)
        _check_versions([g[0] for g in got], "SQLite")
        return Run.timed(t0, t1, digest([g[1] for g in got]))

    return run


def sqlite_get(wl: Workload) -> Run:
    msgs = wl.payloads()
    keys = _keys(wl.count)
    db = _sqlite(keys)
    try:
        db.execute("BEGIN")
        db.executemany(_UPDATE, [(m, k, 1) for k, m in zip(keys, msgs)])
        db.execute("COMMIT")
        ex = db.cursor().execute
        out: List[Any] = []
        append = out.append
        sel = "SELECT version, value FROM kv WHERE key=?"
        t0 = time.perf_counter_ns()
        for k in keys:
            append(ex(sel, (k,)).fetchone())
        t1 = time.perf_counter_ns()
    finally:
        db.close()
    _check_versions([g[0] for g in out], "SQLite")
    return Run.timed(t0, t1, digest([g[1] for g in out]))


# ---------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------


def _ours(name: str, fn: Any) -> Contender:
    return Contender(name, fn, ours=True, requires=OURS, pip_hint=BUILD_HINT)


def cases(profile: Profile) -> List[Case]:
    """The versions cases for this profile."""
    n = profile.count(quick=20_000, full=300_000)
    durable = []
    for threads, count in (
        (1, profile.count(quick=400, full=2_000)),
        (THREADS, profile.count(quick=1_600, full=8_000)),
    ):
        x = f" x{threads}" if threads > 1 else ""
        durable.append(
            Case(
                "durable CAS put vs SQLite FULL" + (f", {threads} threads" if threads > 1 else ""),
                f"put(key, value, expected_version=1) -> 2 with durability='always' from "
                f"{threads} thread(s) sharing one store vs SQLite UPDATE ... WHERE key=? AND "
                "version=? on a file (WAL, synchronous=FULL), a connection per thread",
                THROUGHPUT,
                Workload(count, 64),
                [
                    _ours(f"engine.VersionedStore always{x}", ours_put_durable(threads)),
                    Contender(SQLITE_FULL + x, sqlite_put_full(threads)),
                ],
                targets=[Target("ratio", 3, SQLITE_FULL + x)] if threads > 1 else [],
            )
        )
    return [
        Case(
            "CAS put vs SQLite",
            "put(key, value, expected_version=1) -> 2, one distinct key per message, "
            "durability='none' vs SQLite UPDATE ... WHERE key=? AND version=? (in memory)",
            THROUGHPUT,
            Workload(n, 64),
            [
                _ours("engine.VersionedStore", ours_put),
                Contender(SQLITE_PUT, sqlite_put),
            ],
            targets=[
                Target("min_msg_per_s", 500_000),
                Target("ratio", 10, SQLITE_PUT),
            ],
        ),
        Case(
            "CAS put vs locked dict",
            "the same CAS against a dict under a threading.Lock, which persists nothing: "
            "the ratio is the price of logging every write",
            THROUGHPUT,
            Workload(n, 64),
            [
                _ours("engine.VersionedStore", ours_put),
                Contender(LOCKED_DICT, dict_put),
            ],
        ),
        Case(
            "get",
            "get(key) -> (version, value) of every key once",
            THROUGHPUT,
            Workload(n, 64),
            [
                _ours("engine.VersionedStore", ours_get),
                Contender(LOCKED_DICT, dict_get),
                Contender("sqlite3 SELECT (:memory:)", sqlite_get),
            ],
            targets=[Target("ratio", 1 / 3, LOCKED_DICT, label="within 3x of " + LOCKED_DICT)],
        ),
        *durable,
    ]
