"""engine.versions: VersionedStore, StoreFollower, Deduplicator, VersionGate."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

import engine
from engine.versions import Deduplicator, StoreFollower, VersionedStore, VersionGate


def store(path, **kw):
    kw.setdefault("durability", "none")
    return VersionedStore(path, **kw)


def snaps(path):
    return sorted(p for p in os.listdir(path) if p.startswith("snap-") and p.endswith(".snap"))


def flip(file, pos, bit=0x10):
    with open(file, "r+b") as f:
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ bit]))


# ---------------------------------------------------------------------------
# basics
# ---------------------------------------------------------------------------


def test_public_names():
    assert engine.VersionedStore is VersionedStore
    assert engine.Deduplicator is Deduplicator
    assert engine.VersionGate is VersionGate


def test_get_put_versions(tmp_path):
    with store(tmp_path / "s") as s:
        assert s.get(b"k") == (0, None)
        assert s.version("k") == 0
        assert s.put(b"k", b"a") == 1
        assert s.put(b"k", b"b") == 2
        assert s.put(b"k", b"c", expected_version=2) == 3
        assert s.get(b"k") == (3, b"c")
        assert s.put(b"new", b"x", expected_version=0) == 1
        assert len(s) == 2 and b"k" in s and "new" in s and b"zz" not in s
        assert sorted(s) == [b"k", b"new"]
        assert dict(s.items()) == {b"k": (3, b"c"), b"new": (1, b"x")}


def test_conflict_changes_nothing(tmp_path):
    with store(tmp_path / "s") as s:
        s.put("k", b"a")
        rev = s.revision
        with pytest.raises(engine.VersionConflict) as ei:
            s.put("k", b"b", expected_version=5)
        e = ei.value
        assert (e.key, e.expected, e.actual) == (b"k", 5, 1)
        assert isinstance(e, engine.EngineError)
        with pytest.raises(engine.VersionConflict) as ei:
            s.put("absent", b"b", expected_version=1)
        assert ei.value.actual == 0
        with pytest.raises(engine.VersionConflict):
            s.put("k", b"b", expected_version=0)  # create-only on an existing key
        assert s.get("k") == (1, b"a") and "absent" not in s
        assert s.revision == rev  # nothing was logged
        assert s.stats()["conflicts"] == 3


def test_str_keys_are_utf8(tmp_path):
    with store(tmp_path / "s") as s:
        s.put("clé", b"1")
        assert s.get("clé".encode()) == (1, b"1")
        assert list(s) == ["clé".encode()]


@pytest.mark.parametrize("bad", [1, 1.5, None, ["k"], bytearray(b"k"), memoryview(b"k"), ("k",)])
def test_bad_keys(tmp_path, bad):
    with store(tmp_path / "s") as s:
        for call in (
            lambda: s.put(bad, b"v"),
            lambda: s.get(bad),
            lambda: s.delete(bad),
            lambda: s.apply([("put", bad, b"v")]),
            lambda: bad in s,
        ):
            with pytest.raises(TypeError, match="key"):
                call()
        assert len(s) == 0 and s.revision == 0


@pytest.mark.parametrize("bad", ["text", 5, None, 1.0, object()])
def test_bad_values(tmp_path, bad):
    with store(tmp_path / "s") as s:
        with pytest.raises(TypeError, match="value"):
            s.put("k", bad)
        with pytest.raises(TypeError, match="value"):
            s.apply([("put", "k", bad)])
        assert len(s) == 0 and s.revision == 0


def test_bytes_like_values_are_copied(tmp_path):
    np = pytest.importorskip("numpy")
    with store(tmp_path / "s") as s:
        buf = bytearray(b"abc")
        s.put("a", buf)
        buf[0] = ord("X")
        s.put("m", memoryview(b"hello")[1:3])
        s.put("n", np.arange(4, dtype=np.uint8))
        assert s.get("a") == (1, b"abc")
        assert s.get("m") == (1, b"el")
        assert s.get("n") == (1, bytes([0, 1, 2, 3]))
    with store(tmp_path / "s") as s:
        assert s.get("a") == (1, b"abc") and s.get("n")[1] == bytes([0, 1, 2, 3])


def test_bad_expected_version(tmp_path):
    with store(tmp_path / "s") as s:
        s.put("k", b"v")
        for bad in ("1", -1, 2.5):
            with pytest.raises(TypeError, match="expected_version"):
                s.put("k", b"w", expected_version=bad)
            with pytest.raises(TypeError, match="expected_version"):
                s.delete("k", expected_version=bad)
        assert s.get("k") == (1, b"v")


def test_delete(tmp_path):
    with store(tmp_path / "s") as s:
        assert s.delete("k") is False
        assert s.delete("k", expected_version=0) is False
        s.put("k", b"a")
        s.put("k", b"b")
        with pytest.raises(engine.VersionConflict) as ei:
            s.delete("k", expected_version=1)
        assert ei.value.actual == 2 and s.get("k") == (2, b"b")
        assert s.delete("k", expected_version=2) is True
        assert s.get("k") == (0, None) and len(s) == 0
        assert s.put("k", b"c", expected_version=0) == 1  # version restarts
    with store(tmp_path / "s") as s:
        assert s.get("k") == (1, b"c")


def test_apply_all_or_nothing(tmp_path):
    with store(tmp_path / "s") as s:
        s.put("a", b"1")
        s.put("b", b"1")
        rev = s.revision
        with pytest.raises(engine.VersionConflict) as ei:
            s.apply([("put", "a", b"2", 1), ("delete", "b"), ("put", "c", b"x", 3)])
        assert ei.value.key == b"c" and ei.value.expected == 3 and ei.value.actual == 0
        assert s.get("a") == (1, b"1") and s.get("b") == (1, b"1") and "c" not in s
        assert s.revision == rev
        with pytest.raises(engine.VersionConflict):
            s.apply([("put", "a", b"2"), ("check", "b", 7)])
        assert s.get("a") == (1, b"1") and s.revision == rev
        # ops see earlier ops of the batch; the whole batch is ONE record
        out = s.apply(
            [
                ("put", "a", b"2", 1),
                ("put", "a", b"3", 2),
                ("delete", "b", 1),
                ("put", "b", b"again", 0),
                ("check", "a", 3),
                ("put", "c", b"c"),
            ]
        )
        assert out == [2, 3, 0, 1, 3, 1]
        assert s.revision == rev + 1
        assert s.get("a") == (3, b"3") and s.get("b") == (1, b"again") and s.get("c") == (1, b"c")
        assert s.apply([]) == [] and s.apply([("check", "a", 3)]) == [3]
        assert s.revision == rev + 1  # compares only: nothing logged
    with store(tmp_path / "s") as s:
        assert s.get("a") == (3, b"3") and s.get("b") == (1, b"again") and s.get("c") == (1, b"c")


@pytest.mark.parametrize(
    "op",
    [
        "put",
        ("put", "k"),
        ("put", "k", b"v", 1, 2),
        ("delete",),
        ("check", "k"),
        ("check", "k", None),
        ("frob", "k"),
        [],
        b"put",
    ],
)
def test_apply_bad_ops(tmp_path, op):
    with store(tmp_path / "s") as s:
        s.put("k", b"v")
        with pytest.raises((TypeError, ValueError)):
            s.apply([("put", "x", b"1"), op])
        assert "x" not in s and s.revision == 1


def test_write_larger_than_a_segment_changes_nothing(tmp_path):
    with store(tmp_path / "s", segment_bytes=8192) as s:
        s.put("a", b"1")
        with pytest.raises(ValueError, match="segment_bytes"):
            s.put("a", b"x" * 10_000)
        with pytest.raises(ValueError, match="segment_bytes"):
            s.apply([("put", "b", b"y" * 5000), ("put", "c", b"z" * 5000)])
        assert s.get("a") == (1, b"1") and "b" not in s and s.revision == 1
    with store(tmp_path / "s", segment_bytes=8192) as s:
        assert dict(s.items()) == {b"a": (1, b"1")}


def test_merge(tmp_path):
    def concat(key, current, proposed):
        return (current or b"") + b"+" + proposed

    with store(tmp_path / "s", merge=concat) as s:
        s.put("k", b"a")
        assert s.put("k", b"b", expected_version=0) == 2  # merged, not raised
        assert s.get("k") == (2, b"a+b")
        assert s.put("new", b"n", expected_version=4) == 1
        assert s.get("new") == (1, b"+n")
        # per-call merge wins; None refuses
        with pytest.raises(engine.VersionConflict):
            s.put("k", b"c", 0, lambda k, c, p: None)
        assert s.get("k") == (2, b"a+b")
        assert s.apply([("put", "k", b"z", 0), ("put", "q", b"q")]) == [3, 1]
        assert s.get("k") == (3, b"a+b+z")
        st = s.stats()
        assert st["merges"] == 3
    with store(tmp_path / "s2") as s:
        s.put("k", b"a")
        seen = []

        def m(key, cur, prop):
            seen.append((key, cur, prop))
            return cur + prop

        assert s.put("k", b"b", 7, m) == 2
        assert seen == [(b"k", b"a", b"b")] and s.get("k") == (2, b"ab")
        with pytest.raises(engine.VersionConflict):
            s.put("k", b"b", expected_version=7)  # no store-level merge
        with pytest.raises(TypeError):
            VersionedStore(tmp_path / "s3", merge=42)


def test_merge_may_read_the_store(tmp_path):
    with store(tmp_path / "s") as s:
        s.put("k", b"1")
        s.put("other", b"9")

        def m(key, cur, prop):
            return cur + s.get("other")[1]  # runs outside the lock: no deadlock

        assert s.put("k", b"x", 0, m) == 2
        assert s.get("k") == (2, b"19")


def test_closed(tmp_path):
    s = store(tmp_path / "s")
    s.put("k", b"v")
    s.close()
    s.close()  # idempotent
    assert s.closed
    for call in (
        lambda: s.put("k", b"w"),
        lambda: s.delete("k"),
        lambda: s.apply([("put", "k", b"w")]),
        lambda: s.snapshot(),
    ):
        with pytest.raises(engine.Closed):
            call()
    assert s.revision == 1
    assert "closed" in repr(s)


def test_one_writer_per_directory(tmp_path):
    with store(tmp_path / "s"):
        with pytest.raises(engine.LogLocked):
            store(tmp_path / "s")


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="durability"):
        VersionedStore(tmp_path / "a", durability="sometimes")
    with pytest.raises(ValueError, match="snapshot_every"):
        VersionedStore(tmp_path / "b", snapshot_every=0)


def test_files_are_private(tmp_path):
    with store(tmp_path / "s", snapshot_every=3) as s:
        for i in range(10):
            s.put(f"k{i}", b"v")
        s.snapshot()
    assert (os.stat(tmp_path / "s").st_mode & 0o777) == 0o700
    for name in snaps(tmp_path / "s"):
        assert (os.stat(tmp_path / "s" / name).st_mode & 0o777) == 0o600


# ---------------------------------------------------------------------------
# durability: reopen, snapshots, corruption, retention
# ---------------------------------------------------------------------------


def test_reopen_rebuilds_exactly(tmp_path):
    expect = {}
    with store(tmp_path / "s", snapshot_every=None) as s:
        for i in range(300):
            k = b"k%d" % (i % 37)
            v = b"v%d" % i
            ver = s.put(k, v)
            expect[k] = (ver, v)
            if i % 11 == 0:
                s.delete(k)
                expect.pop(k)
        s.apply([("put", "t1", b"x"), ("delete", "k1"), ("put", "t2", b"y")])
        expect[b"t1"] = (1, b"x")
        expect[b"t2"] = (1, b"y")
        expect.pop(b"k1", None)
        assert dict(s.items()) == expect
        rev = s.revision
    assert snaps(tmp_path / "s") == []  # snapshot_every=None: none written
    with store(tmp_path / "s") as s:
        assert dict(s.items()) == expect
        assert s.revision == rev
        assert s.stats()["open"]["replayed_records"] == rev


def test_background_snapshots(tmp_path):
    with store(tmp_path / "s", snapshot_every=100, segment_bytes=4096) as s:
        for i in range(2000):
            s.put(b"k%d" % (i % 30), b"%06d" % i)
        s._join_snapshot_thread()
        st = s.stats()
        assert st["snapshots_written"] >= 1 and st["snapshot_error"] is None
        assert 0 < st["snapshot_offset"] <= 2000
        final = dict(s.items())
    with store(tmp_path / "s", segment_bytes=4096) as s:
        assert dict(s.items()) == final


def test_snapshots_bound_the_replay(tmp_path):
    with store(tmp_path / "s", snapshot_every=50) as s:
        for i in range(1000):
            s.put(b"k%d" % (i % 100), b"%d" % i)
        final = dict(s.items())
        time.sleep(0.05)
    files = snaps(tmp_path / "s")
    assert 1 <= len(files) <= 2  # at most two kept
    with store(tmp_path / "s", snapshot_every=50) as s:
        assert dict(s.items()) == final
        assert s.stats()["open"]["replayed_records"] == 0  # close wrote a final snapshot
        assert s.stats()["open"]["snapshot_offset"] == s.revision
        for i in range(30):
            s.put(b"x%d" % i, b"x")
        final = dict(s.items())
        s._snapshot_every = None  # simulate a crash-like stop without the closing snapshot
    with store(tmp_path / "s") as s:
        assert dict(s.items()) == final
        assert s.stats()["open"]["replayed_records"] == 30


@pytest.mark.parametrize("damage", ["flip-body", "flip-header", "truncate", "empty", "garbage"])
def test_corrupt_snapshot_rebuilds_from_log(tmp_path, damage, caplog):
    path = tmp_path / "s"
    with store(path, snapshot_every=None) as s:
        for i in range(200):
            s.put(b"k%d" % (i % 20), b"v%d" % i)
        s.snapshot()
        for i in range(10):
            s.put(b"late%d" % i, b"l")
        s.snapshot()
        final = dict(s.items())
    files = snaps(path)
    assert len(files) == 2
    for name in files:  # damage both: only the log can rebuild it
        f = path / name
        size = f.stat().st_size
        if damage == "flip-body":
            flip(f, size // 2)
        elif damage == "flip-header":
            flip(f, 3)
        elif damage == "truncate":
            os.truncate(f, size - 7)
        elif damage == "empty":
            os.truncate(f, 0)
        else:
            f.write_bytes(os.urandom(size))
    with caplog.at_level("WARNING", logger="engine"):
        with store(path) as s:
            assert dict(s.items()) == final
            st = s.stats()["open"]
            assert st["snapshots_rejected"] == 2
            assert st["snapshot_offset"] == 0
    assert "unusable" in caplog.text
    assert len(list(path.glob("*.corrupt"))) == 2
    with store(path) as s:  # a fresh good snapshot was written at open
        assert dict(s.items()) == final
        assert s.stats()["open"]["snapshots_rejected"] == 0


def test_newest_snapshot_corrupt_uses_older(tmp_path):
    path = tmp_path / "s"
    with store(path, snapshot_every=None) as s:
        for i in range(100):
            s.put(b"k%d" % i, b"v")
        s.snapshot()
        for i in range(100):
            s.put(b"k%d" % i, b"w")
        s.snapshot()
        final = dict(s.items())
    newest = path / snaps(path)[-1]
    flip(newest, newest.stat().st_size - 20)
    with store(path) as s:
        assert dict(s.items()) == final
        st = s.stats()["open"]
        assert st["snapshots_rejected"] == 1 and st["snapshot_offset"] == 100
        assert st["replayed_records"] == 100


def test_snapshot_of_another_store_is_rejected(tmp_path):
    with store(tmp_path / "a", snapshot_every=None) as a:
        a.put("only-in-a", b"1")
        a.snapshot()
    with store(tmp_path / "b", snapshot_every=None) as b:
        b.put("only-in-b", b"1")
    for name in snaps(tmp_path / "a"):
        os.replace(tmp_path / "a" / name, tmp_path / "b" / name)
    with store(tmp_path / "b") as b:
        assert dict(b.items()) == {b"only-in-b": (1, b"1")}
        assert b.stats()["open"]["snapshots_rejected"] == 1


def test_retention_keeps_what_snapshots_do_not_cover(tmp_path):
    path = tmp_path / "s"
    # tiny segments: the log rolls often and retention runs at every roll
    with store(path, snapshot_every=None, segment_bytes=4096) as s:
        for i in range(3000):
            s.put(b"k%d" % (i % 50), b"%06d" % i)
            if i % 200 == 199:
                s.snapshot()
        final = dict(s.items())
        st = s.stats()
        assert st["log"]["start_offset"] > 0, "retention never dropped anything"
        segs = st["log"]["segments"]
    assert segs < 3000 * 48 // 4096, "the log was not kept bounded"
    with store(path, segment_bytes=4096) as s:
        assert dict(s.items()) == final
    # damage the newest snapshot: the older one + the retained log still rebuild
    newest = path / snaps(path)[-1]
    flip(newest, newest.stat().st_size // 2)
    with store(path, segment_bytes=4096) as s:
        assert dict(s.items()) == final
        assert s.stats()["open"]["snapshots_rejected"] == 1


def test_unrecoverable_is_reported(tmp_path):
    path = tmp_path / "s"
    with store(path, snapshot_every=None, segment_bytes=4096) as s:
        for i in range(2000):
            s.put(b"k%d" % (i % 50), b"%06d" % i)
            if i % 200 == 199:
                s.snapshot()
        assert s.stats()["log"]["start_offset"] > 0
    for name in snaps(path):
        os.truncate(path / name, 10)
    with pytest.raises(engine.CorruptLog, match="cannot be rebuilt"):
        store(path, segment_bytes=4096)


def test_durability_always_and_interval(tmp_path):
    for mode in ("always", "interval"):
        with VersionedStore(tmp_path / mode, durability=mode, snapshot_every=None) as s:
            for i in range(20):
                s.put("k", b"%d" % i)
            assert s.stats()["durability"] == mode
        with VersionedStore(tmp_path / mode, durability=mode) as s:
            assert s.get("k") == (20, b"19")


# ---------------------------------------------------------------------------
# threads
# ---------------------------------------------------------------------------


def test_exactly_one_cas_writer_wins(tmp_path):
    rounds = 300
    with store(tmp_path / "s", snapshot_every=97) as s:
        barrier = threading.Barrier(2)
        wins = [[], []]
        errors = []

        def writer(me):
            try:
                for r in range(rounds):
                    barrier.wait(timeout=10)
                    try:
                        s.put("k", b"%d-%d" % (me, r), expected_version=r)
                        wins[me].append(r)
                    except engine.VersionConflict as e:
                        assert e.actual == r + 1
                    barrier.wait(timeout=10)  # both tried before the next round
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)
                barrier.abort()

        ts = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
        assert not errors, errors
        assert sorted(wins[0] + wins[1]) == list(range(rounds))  # exactly one per round
        ver, val = s.get("k")
        assert ver == rounds
        winner = 0 if rounds - 1 in wins[0] else 1
        assert val == b"%d-%d" % (winner, rounds - 1)
        assert s.revision == rounds
    with store(tmp_path / "s") as s:
        assert s.get("k") == (ver, val)


def test_cas_increment_from_threads(tmp_path):
    n_threads, per = 4, 250
    with store(tmp_path / "s", snapshot_every=64) as s:
        s.put("n", b"0")

        def worker():
            for _ in range(per):
                while True:
                    ver, val = s.get("n")
                    try:
                        s.put("n", b"%d" % (int(val) + 1), expected_version=ver)
                        break
                    except engine.VersionConflict:
                        pass

        ts = [threading.Thread(target=worker) for _ in range(n_threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
        assert s.get("n") == (1 + n_threads * per, b"%d" % (n_threads * per))
    with store(tmp_path / "s") as s:
        assert s.get("n") == (1 + n_threads * per, b"%d" % (n_threads * per))


def test_batches_are_never_seen_half_applied(tmp_path):
    # a writer moves a fixed total between two keys in batches; get_many always sees it whole
    with store(tmp_path / "s", snapshot_every=None) as s:
        s.apply([("put", "a", b"100"), ("put", "b", b"0")])
        stop = threading.Event()
        bad = []

        def reader():
            while not stop.is_set():
                (_, a), (_, b) = s.get_many(["a", "b"])
                if int(a) + int(b) != 100:
                    bad.append((a, b))

        t = threading.Thread(target=reader)
        t.start()
        for i in range(500):
            (va, a), (vb, b) = s.get_many(["a", "b"])
            move = 1 if i % 2 == 0 else -1
            s.apply(
                [
                    ("put", "a", b"%d" % (int(a) - move), va),
                    ("put", "b", b"%d" % (int(b) + move), vb),
                ]
            )
        stop.set()
        t.join(10)
        assert not bad


# ---------------------------------------------------------------------------
# followers
# ---------------------------------------------------------------------------


def test_follower_sees_the_same_versions(tmp_path):
    path = tmp_path / "s"
    with store(path, snapshot_every=25) as s:
        for i in range(60):
            s.put(b"k%d" % (i % 7), b"%d" % i)
        with VersionedStore.follow(path) as f:
            assert isinstance(f, StoreFollower)
            assert dict(f.items()) == dict(s.items()) and f.revision == s.revision
            s.put("k1", b"new")
            s.apply([("delete", "k2"), ("put", "z", b"z")])
            assert f.get("k1") != s.get("k1")  # nothing happens in the background
            assert f.refresh() == 2
            assert dict(f.items()) == dict(s.items()) and len(f) == len(s)
            assert "z" in f and "k2" not in f
            assert f.poll(0.05) == 0
            with pytest.raises(engine.Timeout):
                f.wait_for(s.revision + 1, timeout=0.1)

            def later():
                time.sleep(0.1)
                s.put("late", b"1")

            t = threading.Thread(target=later)
            t.start()
            f.wait_for(key="late", version=1, timeout=10)
            t.join()
            assert f.get("late") == (1, b"1") and f.revision == s.revision
            with pytest.raises(TypeError):
                f.wait_for()


def test_follower_missing_store(tmp_path):
    with pytest.raises(FileNotFoundError):
        VersionedStore.follow(tmp_path / "nothing")


def test_follower_survives_retention(tmp_path):
    path = tmp_path / "s"
    with store(path, snapshot_every=30, segment_bytes=4096) as s:
        s.put("first", b"1")
        with VersionedStore.follow(path) as f:
            for i in range(3000):
                s.put(b"k%d" % (i % 40), b"%06d" % i)
            # background snapshots may not have run yet (the puts hold the GIL):
            # two synchronous ones pin the log past its first segments
            s.snapshot()
            s.put("last", b"1")
            s.snapshot()
            assert s.stats()["log"]["start_offset"] > 1  # the follower's next record is gone
            f.refresh()
            assert dict(f.items()) == dict(s.items()) and f.revision == s.revision


def test_followers_race_snapshots_and_retention(tmp_path):
    # followers open and refresh while the owner snapshots and retention deletes
    # segments under them; every view must be a consistent prefix
    path = tmp_path / "s"
    with store(path, snapshot_every=20, segment_bytes=4096) as s:
        s.put("k0", b"1")
        done = threading.Event()
        errors = []

        def owner():
            try:
                for i in range(4000):
                    k = b"k%d" % (i % 13)
                    s.put(k, b"%d" % (s.get(k)[0] + 1))  # value == its version
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)
            finally:
                done.set()

        t = threading.Thread(target=owner)
        t.start()
        views = 0
        while not done.is_set():
            with VersionedStore.follow(path) as f:
                last = f.revision
                for _ in range(5):
                    f.refresh()
                    assert f.revision >= last
                    last = f.revision
                    assert all(int(v) == ver for _, (ver, v) in f.items())
                    views += 1
        t.join()
        assert not errors, errors
        assert views > 5
        assert s.stats()["log"]["start_offset"] > 0  # retention did delete under them
        with VersionedStore.follow(path) as f:
            f.wait_for(s.revision, timeout=10)
            assert dict(f.items()) == dict(s.items())


FOLLOWER_CHILD = r"""
import sys
from engine.versions import VersionedStore
f = VersionedStore.follow(sys.argv[1])
f.wait_for(key="done", version=1, timeout=30)
total = sum(int(v) for k, (ver, v) in f.items() if k.startswith(b"n"))
vers = sum(ver for k, (ver, v) in f.items() if k.startswith(b"n"))
print(total, vers, f.revision, flush=True)
"""


def test_follower_in_another_process(tmp_path):
    path = tmp_path / "s"
    with store(path, snapshot_every=100) as s:
        s.put("boot", b"1")
        child = subprocess.Popen(
            [sys.executable, "-c", FOLLOWER_CHILD, str(path)],
            stdout=subprocess.PIPE,
        )
        for i in range(500):
            s.put(b"n%d" % (i % 10), b"%d" % i)
        s.put("done", b"1")
        out, _ = child.communicate(timeout=60)
        total = sum(int(v) for k, (ver, v) in s.items() if k.startswith(b"n"))
        vers = sum(ver for k, (ver, v) in s.items() if k.startswith(b"n"))
        assert out.split() == [b"%d" % total, b"%d" % vers, b"%d" % s.revision]


# ---------------------------------------------------------------------------
# Deduplicator
# ---------------------------------------------------------------------------


def test_dedup_first_time(tmp_path):
    with Deduplicator(tmp_path / "d", window=100, durability="none") as d:
        assert d.first_time(b"a") is True
        assert d.first_time(b"a") is False
        assert d.first_time("a") is False  # str == its UTF-8 bytes
        assert d.first_time(1) is True
        assert d.first_time(b"1") is True  # an int id is not its text
        assert d.first_time(1) is False
        assert b"a" in d and 1 in d and b"zz" not in d
        assert b"zz" not in d  # __contains__ does not remember
        assert len(d) == 3
        assert d.stats()["repeats"] == 3
        for bad in (None, 1.5, ["x"], bytearray(b"x")):
            with pytest.raises(TypeError, match="msg_id"):
                d.first_time(bad)


def test_dedup_window_by_count_and_restart(tmp_path):
    path = tmp_path / "d"
    with Deduplicator(path, window=50, durability="none") as d:
        assert all(d.first_time(i) for i in range(120))
        assert len(d) == 50
        assert not any(d.first_time(i) for i in range(70, 120))
        assert d.first_time(69) is True  # fell out of the window; now 71..119 + 69
        assert d.first_time(70) is True  # evicted by 69's arrival; evicts 71
        assert 71 not in d and 72 in d
    with Deduplicator(path, window=50, durability="none") as d:
        assert len(d) == 50
        assert d.stats()["replayed_records"] == 50
        assert not any(d.first_time(i) for i in range(72, 120))
        assert d.first_time(69) is False and d.first_time(70) is False
        assert d.first_time(71) is True
    with pytest.raises(ValueError):
        Deduplicator(tmp_path / "x", window=None, max_age=None)
    with pytest.raises(ValueError):
        Deduplicator(tmp_path / "y", window=0)


def test_dedup_window_by_age(tmp_path):
    path = tmp_path / "d"
    with Deduplicator(path, window=None, max_age=0.3, durability="none") as d:
        assert d.first_time("old")
        time.sleep(0.4)
        assert d.first_time("young")
        assert "old" not in d and "young" in d
        assert d.first_time("old") is True  # remembered again, as new
    time.sleep(0.35)
    with Deduplicator(path, window=None, max_age=0.3, durability="none") as d:
        assert len(d) == 0  # every id aged out while closed
    with Deduplicator(path, window=None, max_age=60, durability="none") as d:
        assert len(d) == 2 and "young" in d and "old" in d  # a longer age remembers them all
    # an id that aged out and came back: replay expires by each record's own
    # time, so the returned copy is the live one and survives the reopen
    # (an age long enough that a slow close + reopen on a loaded machine fits in it)
    with Deduplicator(tmp_path / "d2", window=None, max_age=2.5, durability="none") as d:
        assert d.first_time("a")
        time.sleep(2.6)
        assert d.first_time("a")
    with Deduplicator(tmp_path / "d2", window=None, max_age=2.5, durability="none") as d:
        assert len(d) == 1 and "a" in d


def test_dedup_stays_bounded(tmp_path):
    path = tmp_path / "d"
    with Deduplicator(path, window=1000, durability="none", segment_bytes=8192) as d:
        for i in range(20000):
            assert d.first_time(b"id-%d" % i)
        st = d.stats()["log"]
        assert st["start_offset"] > 10000
        assert st["segments"] * 8192 < 20000 * 48 // 3
    with Deduplicator(path, window=1000, durability="none", segment_bytes=8192) as d:
        assert len(d) == 1000
        assert d.first_time(b"id-19999") is False
        assert d.first_time(b"id-19000") is False
        assert d.first_time(b"id-18999") is True


def test_dedup_threads(tmp_path):
    with Deduplicator(tmp_path / "d", window=10_000, durability="none") as d:
        firsts = []
        lock = threading.Lock()

        def worker():
            mine = [i for i in range(2000) if d.first_time(i)]
            with lock:
                firsts.extend(mine)

        ts = [threading.Thread(target=worker) for _ in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
        assert sorted(firsts) == list(range(2000))  # each id was new exactly once


def test_dedup_durable_always(tmp_path):
    with Deduplicator(tmp_path / "d", durability="always") as d:
        assert d.first_time("x")
    with Deduplicator(tmp_path / "d", durability="always") as d:
        assert not d.first_time("x")
        d.close()
        with pytest.raises(engine.Closed):
            d.first_time("y")


# ---------------------------------------------------------------------------
# VersionGate
# ---------------------------------------------------------------------------


def test_gate_rejects_stale_and_out_of_order():
    g = VersionGate()
    assert [g.accept("k", v) for v in (1, 3, 2, 3, 4, 1)] == [True, True, False, False, True, False]
    assert g.last_seen("k") == 4 and g.last_seen("other") == 0
    assert g.rejected == 3
    assert g.check("k", 9) == "new" and g.check("k", 4) == "stale"
    assert g.last_seen("k") == 4  # check records nothing


def test_gate_strict_refuses_gaps():
    g = VersionGate(strict=True)
    assert g.accept(("order", 7), 1)
    assert g.check(("order", 7), 3) == "gap"
    assert not g.accept(("order", 7), 3)
    assert g.accept(("order", 7), 2) and g.accept(("order", 7), 3)
    g2 = VersionGate(strict=True, initial=g.state())
    assert g2.last_seen(("order", 7)) == 3 and len(g2) == 1
    assert not g2.accept(("order", 7), 3)


def test_gate_bad_input():
    g = VersionGate()
    with pytest.raises(TypeError, match="key"):
        g.accept(["unhashable"], 1)
    with pytest.raises(TypeError, match="version"):
        g.accept("k", "1")


# ---------------------------------------------------------------------------
# crash: a writer SIGKILLed at random moments (snapshots in flight included)
# ---------------------------------------------------------------------------

CRASH_CHILD = r"""
import os, random, sys
from engine.versions import VersionedStore

path, durability = sys.argv[1], sys.argv[2]
s = VersionedStore(path, durability=durability, snapshot_every=40)
i = int(s.get("i")[1] or b"-1") + 1
os.write(1, b"start %d\n" % i)  # one write(2) per line: a kill never tears it
while True:
    rng = random.Random(i)  # op i is a function of i alone: the parent replays it
    ops = [("put", "i", b"%d" % i)]
    for _ in range(rng.randint(1, 3)):
        k = "k%d" % rng.randrange(12)
        if rng.random() < 0.2:
            ops.append(("delete", k))
        else:
            ops.append(("put", k, b"%d" % rng.randrange(10**6)))
    s.apply(ops)
    os.write(1, b"ack %d\n" % i)
    i += 1
"""


def _crash_model(upto):
    import random

    model = {}
    for i in range(upto + 1):
        rng = random.Random(i)
        writes = [(b"i", b"%d" % i)]
        for _ in range(rng.randint(1, 3)):
            k = b"k%d" % rng.randrange(12)
            if rng.random() < 0.2:
                writes.append((k, None))
            else:
                writes.append((k, b"%d" % rng.randrange(10**6)))
        for k, v in writes:
            if v is None:
                model.pop(k, None)
            else:
                model[k] = (model.get(k, (0, b""))[0] + 1, v)
    return model


@pytest.mark.crash
@pytest.mark.parametrize("durability", ["none", "always"])
def test_writer_killed_keeps_every_acknowledged_batch(tmp_path, durability):
    import random
    import signal

    rng = random.Random(durability)
    path = tmp_path / "s"
    acked = -1
    kills = 8 if durability == "none" else 4
    for _ in range(kills):
        child = subprocess.Popen(
            [sys.executable, "-c", CRASH_CHILD, str(path), durability],
            stdout=subprocess.PIPE,
        )
        target = acked + rng.randint(20, 150)
        for line in child.stdout:
            assert len(line.split()) == 2, line
            word, n = line.split()
            if word == b"ack":
                acked = int(n)
                if acked >= target:
                    time.sleep(rng.random() * 0.003)
                    child.send_signal(signal.SIGKILL)
                    break
        for line in child.stdout.read().splitlines():  # what it printed before dying
            word, n = line.split()
            if word == b"ack":
                acked = int(n)
        assert child.wait(timeout=60) == -signal.SIGKILL
        with VersionedStore(path, durability=durability) as s:
            stored = int(s.get("i")[1])
            # every acknowledged batch is there; at most the one in flight too
            assert stored in (acked, acked + 1), (stored, acked)
            assert dict(s.items()) == _crash_model(stored)
            assert not list(path.glob(".snap-*.tmp"))
        acked = stored
