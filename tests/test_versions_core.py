"""engine._versions: the compiled put/get path of VersionedStore, its lock,
the in-place entry reuse, and group commit of durable writes."""

from __future__ import annotations

import _thread
import gc
import sys
import threading
import time

import pytest

import engine
from engine._log import LogReader
from engine._versions import _Mutex, _StoreCore
from engine.versions import VersionedStore


def store(path, **kw):
    kw.setdefault("durability", "none")
    return VersionedStore(path, **kw)


def test_store_is_the_compiled_core(tmp_path):
    with store(tmp_path / "s") as s:
        assert isinstance(s, _StoreCore)
        # put/get are the core's (no Python frame per call)
        assert VersionedStore.put is _StoreCore.put and VersionedStore.get is _StoreCore.get
        assert "expected_version" in (VersionedStore.put.__doc__ or "")


# ---------------------------------------------------------------------------
# entries: reused in place only when nobody else holds them
# ---------------------------------------------------------------------------


def test_an_entry_a_reader_holds_never_changes(tmp_path):
    with store(tmp_path / "s") as s:
        s.put("k", b"one")
        held = s.get("k")
        assert s.put("k", b"two", 1) == 2
        assert held == (1, b"one")  # the reader's tuple was not reused
        assert s.get("k") == (2, b"two")
        # nobody holds the (2, b"two") entry now: the next puts may reuse it
        for i in range(3, 200):
            assert s.put("k", b"%d" % i, i - 1) == i
        got = s.get("k")
        assert got == (199, b"199")
        items = dict(s.items())  # holds every entry
        s.put("k", b"last", 199)
        assert items[b"k"] == (199, b"199") and got == (199, b"199")
        assert s.get("k") == (200, b"last")
    with store(tmp_path / "s") as s:
        assert s.get("k") == (200, b"last")


def test_reused_entries_count_references_right(tmp_path):
    # old versions and values are released exactly once: a value no one else
    # holds is freed, one someone holds stays alive and unchanged
    with store(tmp_path / "s") as s:
        kept = b"kept-" + b"x" * 100
        s.put("k", kept)
        base = sys.getrefcount(kept)
        for i in range(2, 1000):
            s.put("k", b"v%d" % i, i - 1)
        assert sys.getrefcount(kept) == base - 1  # only our local now
        assert kept == b"kept-" + b"x" * 100
        big = 10**30  # a version object that is not a cached small int
        s._data[b"big"] = (big, b"v")  # (as a snapshot of a long-lived store would load)
        refs = sys.getrefcount(big)
        assert s.put("big", b"w", big) == big + 1
        assert sys.getrefcount(big) == refs - 1
        assert s.get("big") == (big + 1, b"w")


def test_entries_written_by_put_are_not_tracked_by_the_gc(tmp_path):
    with store(tmp_path / "s") as s:
        s.put("new", b"1")  # a new entry
        assert not gc.is_tracked(s.get("new"))
        s.apply([("put", "b", b"1")])
        s.put("b", b"2", 1)  # replaces a tuple the Python layer made
        assert not gc.is_tracked(s.get("b"))
        assert s.get("b") == (2, b"2")


# ---------------------------------------------------------------------------
# the lock
# ---------------------------------------------------------------------------


def test_mutex_behaves_like_threading_lock():
    m = _Mutex()
    assert not m.locked()
    assert m.acquire() is True and m.locked()
    assert m.acquire(False) is False
    t0 = time.monotonic()
    assert m.acquire(True, 0.12) is False
    assert 0.1 <= time.monotonic() - t0 < 5
    m.release()
    assert not m.locked()
    with pytest.raises(RuntimeError):
        m.release()
    with m:
        assert m.locked()
        got = []
        t = threading.Thread(target=lambda: got.append(m.acquire(timeout=5)))
        t.start()
        time.sleep(0.1)
        assert got == []  # the other thread waits, with the GIL released
    t.join(10)
    assert got == [True] and m.locked()
    m.release()


def test_put_waiting_for_the_lock_can_be_interrupted(tmp_path):
    with store(tmp_path / "s") as s:
        s.put("k", b"v")
        taken = threading.Event()
        done = threading.Event()

        def holder():
            with s._lock:
                taken.set()
                time.sleep(0.2)
                _thread.interrupt_main()  # Ctrl-C while the main thread waits
                done.wait(10)

        t = threading.Thread(target=holder)
        t.start()
        taken.wait(10)
        t0 = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            s.put("k", b"w", 1)
        assert time.monotonic() - t0 < 3  # not stuck until the lock is free
        done.set()
        t.join(10)
        assert s.get("k") == (1, b"v")
        assert s.put("k", b"w", 1) == 2


def test_a_failing_log_append_releases_the_lock_and_changes_nothing(tmp_path):
    with store(tmp_path / "s", segment_bytes=8192) as s:
        s.put("k", b"v")
        for _ in range(3):
            with pytest.raises(ValueError, match="segment_bytes"):
                s.put("k", b"x" * 10_000, 1)
        assert not s._lock.locked()
        assert s.get("k") == (1, b"v") and s.revision == 1


def test_expected_version_is_compared_with_eq(tmp_path):
    class Weird:
        def __eq__(self, other):
            raise ArithmeticError("no")

        __hash__ = object.__hash__

    with store(tmp_path / "s") as s:
        s.put("k", b"v")
        assert s.put("k", b"w", 1.0) == 2  # 1.0 == 1, as before
        with pytest.raises(ArithmeticError):
            s.put("k", b"x", Weird())
        assert not s._lock.locked() and s.get("k") == (2, b"w")
        big = 10**30
        with pytest.raises(engine.VersionConflict) as e:
            s.put("k", b"x", big)
        assert (e.value.expected, e.value.actual) == (big, 2)
        with pytest.raises(TypeError):
            s.put("k", b"x", "2")


def test_closed_store_refuses_put(tmp_path):
    s = store(tmp_path / "s")
    s.put("k", b"v")
    s.close()
    for expected in (None, 1, 7):
        with pytest.raises(engine.Closed):
            s.put("k", b"w", expected)
    assert s.get("k") == (1, b"v")  # reads still see the last state


# ---------------------------------------------------------------------------
# durability="always": the sync runs outside the lock, shared by writers
# ---------------------------------------------------------------------------


def test_always_group_commits_and_every_put_returns_durable(tmp_path):
    n_threads, per = 8, 25
    path = tmp_path / "s"
    seen_durable = {}
    with VersionedStore(path, durability="always", snapshot_every=None) as s:
        log = s._log
        barrier = threading.Barrier(n_threads)
        errors = []

        def writer(t):
            try:
                barrier.wait(10)
                for i in range(per):
                    key = b"t%d-%d" % (t, i)
                    assert s.put(key, b"v%d" % i, 0) == 1
                    seen_durable[key] = log.durable_offset  # right after put returned
                    if i % 5 == 4:
                        assert s.delete(key, 1)
                        seen_durable[key + b"/del"] = log.durable_offset
                    if i % 7 == 0:
                        s.apply([("put", key + b"/a", b"a"), ("put", key + b"/b", b"b")])
                        seen_durable[key + b"/apply"] = log.durable_offset
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        ts = [threading.Thread(target=writer, args=(t,)) for t in range(n_threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(120)
        assert not errors, errors
        writes = s.revision
        syncs = s.stats()["log"]["syncs"]
        assert s.stats()["durability"] == "always"
    # where each write landed in the log
    offsets = {}
    with LogReader(str(path / "log"), start=0) as r:
        for rec in r.read_many(100_000):
            if rec.key is not None:
                offsets[bytes(rec.key)] = rec.offset
            else:
                blob = bytes(rec.value)
                if blob[0] == 2:  # a delete: the key follows the header
                    offsets[blob[9:] + b"/del"] = rec.offset
                else:  # a batch: [op][count u32], then [op][version u64][klen u32][vlen u32] key value
                    klen = int.from_bytes(blob[5 + 9 : 5 + 13], "little")
                    first = blob[5 + 17 : 5 + 17 + klen]  # b"t<t>-<i>/a"
                    offsets[first[:-2] + b"/apply"] = rec.offset
    assert len(offsets) == len(seen_durable) == writes
    for name, durable in seen_durable.items():
        assert durable > offsets[name], name  # on stable storage when the call returned
    # one sync per write is what the lock-held sync did; threads share them now
    assert syncs < writes, (syncs, writes)
    with VersionedStore(path, durability="always") as s:
        assert len(s) == n_threads * (per - per // 5 + 2 * len(range(0, per, 7)))


def test_always_single_writer_is_durable_too(tmp_path):
    with VersionedStore(tmp_path / "s", durability="always", snapshot_every=None) as s:
        for i in range(20):
            s.put("k", b"%d" % i)
            assert s._log.durable_offset == s.revision
        s.delete("k")
        assert s._log.durable_offset == s.revision


def test_close_while_a_writer_waits_for_its_sync(tmp_path):
    # a put whose sync has not run yet when another thread closes the store
    # returns normally: close() synced everything
    for _ in range(5):
        s = VersionedStore(tmp_path / "s", durability="always", snapshot_every=None)
        errors: list = []

        def writer(s=s, errors=errors):
            try:
                for i in range(50):
                    s.put(b"w", b"%d" % i)
            except engine.Closed:
                pass  # refused after close: fine
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        t = threading.Thread(target=writer)
        t.start()
        time.sleep(0.01)
        s.close()
        t.join(30)
        assert not errors, errors
        ver = s.get(b"w")[0]
        with VersionedStore(tmp_path / "s", durability="always") as s2:
            assert s2.get(b"w")[0] == ver
