"""Sharded counters: exactness, overflow, shared regions, corrupt regions,
the CounterMap against a dict model, checkpoint/restore, the aggregator, CLI."""

from __future__ import annotations

import multiprocessing as mp
import os
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import engine
from engine import CounterAggregator, CounterMap, ShardedCounter
from engine.counters import KEY_MAX, CounterMapFull

I64_MAX = (1 << 63) - 1
I64_MIN = -(1 << 63)
HEADER = 128


# ---------------------------------------------------------------- basics


def test_private_add_value_reset():
    c = ShardedCounter()
    assert c.name is None and c.value() == 0
    c.add()
    c.add(41)
    c.add(-50)
    assert c.value() == -8
    assert sum(c.shard_values()) == -8
    assert c.reset() == -8
    assert c.value() == 0
    c.close()
    assert c.closed
    with pytest.raises(engine.Closed):
        c.add(1)
    with pytest.raises(engine.Closed):
        c.value()


@pytest.mark.parametrize("bad", [1.5, "1", b"1", None, [1]])
def test_add_rejects_non_int(bad):
    c = ShardedCounter()
    with pytest.raises(TypeError):
        c.add(bad)
    assert c.value() == 0


def test_add_argument_outside_int64_is_overflow():
    c = ShardedCounter()
    with pytest.raises(OverflowError):
        c.add(1 << 63)
    with pytest.raises(OverflowError):
        c.add(I64_MIN - 1)
    assert c.value() == 0


def test_shards_rounded_to_power_of_two_and_validated():
    assert ShardedCounter(shards=5).shards == 8
    assert ShardedCounter(shards=1).shards == 1
    with pytest.raises(ValueError):
        ShardedCounter(shards=0)
    with pytest.raises(TypeError):
        ShardedCounter(shards="4")


def test_overflow_raises_and_leaves_the_shard_unchanged():
    c = ShardedCounter(shards=1)
    c.add(I64_MAX)
    with pytest.raises(OverflowError):
        c.add(1)
    assert c.value() == I64_MAX
    c.add(-I64_MAX)
    c.add(I64_MIN)
    with pytest.raises(OverflowError):
        c.add(-1)
    assert c.value() == I64_MIN


def test_total_leaving_int64_raises_in_value():
    c = ShardedCounter(shards=4096)
    c.add(I64_MAX)
    mine = c.current_shard()
    done = []

    def other():
        if c.current_shard() != mine:
            c.add(I64_MAX)
            done.append(True)

    for _ in range(50):
        t = threading.Thread(target=other)
        t.start()
        t.join()
        if done:
            break
    assert done, "no thread landed on another shard"
    with pytest.raises(OverflowError):
        c.value()
    # the exact total is still recoverable: reset drains it
    assert c.reset() == 2 * I64_MAX
    assert c.value() == 0


def test_threads_exact_mixed_signs():
    c = ShardedCounter()
    n = 50_000

    def work(k):
        add = c.add
        for i in range(n):
            add(k if i % 2 else -(k + 1))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(1, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert c.value() == sum((n // 2) * (k - (k + 1)) for k in range(1, 5))


def test_threads_use_different_shards():
    c = ShardedCounter(shards=1024)
    seen = set()
    lock = threading.Lock()
    barrier = threading.Barrier(4)

    def work():
        barrier.wait()  # alive together: distinct thread ids
        with lock:
            seen.add(c.current_shard())
        barrier.wait()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) >= 3  # thread ids are sequential: collisions are rare


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm-cache"])
def test_forked_child_picks_its_own_shard(shm_name, warm):
    c = ShardedCounter.create(shm_name, shards=4096)
    if warm:
        c.add(1)  # the parent's thread state and cell are now cached in the handle
    mine = c.current_shard()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            c.add(7)
            os.write(w, struct.pack("<i", c.current_shard()))
        finally:
            os._exit(0)
    os.close(w)
    child_shard = struct.unpack("<i", os.read(r, 4))[0]
    os.close(r)
    os.waitpid(pid, 0)
    assert child_shard != mine
    vals = c.shard_values()
    assert vals[mine] == (1 if warm else 0)
    assert vals[child_shard] == 7
    assert c.value() == 7 + (1 if warm else 0)


def test_reset_racing_adders_loses_nothing():
    c = ShardedCounter()
    drained = []
    stop = threading.Event()
    n = 100_000

    def adder():
        for _ in range(n):
            c.add(1)

    def resetter():
        while not stop.is_set():
            drained.append(c.reset())

    threads = [threading.Thread(target=adder) for _ in range(2)]
    r = threading.Thread(target=resetter)
    r.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    r.join()
    assert sum(drained) + c.value() == 2 * n


class ShardedCounterMachine(RuleBasedStateMachine):
    """One thread's adds land on one shard: the model is a single int64."""

    def __init__(self):
        super().__init__()
        self.c = ShardedCounter(shards=4)
        self.model = 0

    @rule(
        n=st.one_of(
            st.integers(-1000, 1000),
            st.integers(I64_MIN, I64_MAX),
            st.sampled_from([I64_MAX, I64_MIN, 1, -1]),
        )
    )
    def add(self, n):
        if I64_MIN <= self.model + n <= I64_MAX:
            self.c.add(n)
            self.model += n
        else:
            with pytest.raises(OverflowError):
                self.c.add(n)

    @rule()
    def reset(self):
        assert self.c.reset() == self.model
        self.model = 0

    @invariant()
    def same(self):
        assert self.c.value() == self.model
        values = self.c.shard_values()
        assert values[self.c.current_shard()] == self.model
        assert sum(1 for v in values if v) <= 1


TestShardedCounterModel = ShardedCounterMachine.TestCase
TestShardedCounterModel.settings = settings(max_examples=50, stateful_step_count=30, deadline=None)


# ---------------------------------------------------------------- shared regions


def test_shared_create_attach_unlink(shm_name):
    with ShardedCounter.create(shm_name, shards=8) as a:
        path = Path("/dev/shm") / shm_name
        assert path.stat().st_mode & 0o777 == 0o600
        assert a.name == shm_name and a.shards == 8
        with ShardedCounter.attach(shm_name) as b:
            b.add(10)
            a.add(-3)
            assert a.value() == b.value() == 7
            assert b.shards == 8
        with pytest.raises(FileExistsError):
            ShardedCounter.create(shm_name)
        # open-or-create attaches an existing region
        c = ShardedCounter(shm_name)
        assert c.value() == 7
        with pytest.raises(engine.IncompatibleRegion):
            ShardedCounter(shm_name, shards=16)
        st = a.stats()
        assert st["value"] == 7 and st["shared"] and st["shards"] == 8
        ShardedCounter.unlink(shm_name)
        assert not path.exists()
        a.add(1)  # the mapping outlives the name
        assert c.value() == 8
    with pytest.raises(engine.IncompatibleRegion):
        ShardedCounter.attach(shm_name)


def test_pickle_named_counter_attaches(shm_name):
    import pickle

    c = ShardedCounter.create(shm_name)
    c.add(3)
    d = pickle.loads(pickle.dumps(c))
    d.add(4)
    assert c.value() == 7
    with pytest.raises(TypeError):
        pickle.dumps(ShardedCounter())


@pytest.mark.parametrize("bad", ["", "a/b", ".hidden", "x" * 201, "nul\x00"])
def test_bad_names(bad):
    with pytest.raises(ValueError):
        ShardedCounter.create(bad)
    with pytest.raises(TypeError):
        ShardedCounter.create(5)


def test_attach_wrong_kind(shm_name):
    ShardedCounter.create(shm_name)
    with pytest.raises(engine.IncompatibleRegion, match="not a CounterMap"):
        CounterMap.attach(shm_name)


def _write(name, data: bytes):
    path = Path("/dev/shm") / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _valid_bytes(kind_cls, name, **kw):
    # hypothesis reuses the fixture's name across examples
    (Path("/dev/shm") / name).unlink(missing_ok=True)
    obj = kind_cls.create(name, **kw)
    data = (Path("/dev/shm") / name).read_bytes()
    obj.close()
    kind_cls.unlink(name)
    return data


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(max_size=4096))
def test_attach_random_bytes_fails_cleanly(shm_name, data):
    _write(shm_name, data)
    for cls in (ShardedCounter, CounterMap):
        with pytest.raises(engine.IncompatibleRegion):
            cls.attach(shm_name)


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    which=st.sampled_from(["counter", "map"]),
    pos=st.integers(0, HEADER - 1),
    byte=st.integers(0, 255),
    cut=st.one_of(st.none(), st.integers(0, 20000)),
    extra=st.integers(0, 300),
)
def test_attach_mutated_header_or_size(shm_name, which, pos, byte, cut, extra):
    cls = ShardedCounter if which == "counter" else CounterMap
    kw = {"shards": 4} if which == "counter" else {"capacity": 16, "shards": 4}
    good = _valid_bytes(cls, shm_name, **kw)
    data = bytearray(good)
    data[pos] = byte
    if cut is not None:
        data = data[:cut]
    data += b"\0" * extra
    _write(shm_name, bytes(data))
    # fields that matter: magic..total_size (0..31) and key_max (52..55)
    matters = (pos < 32 or 52 <= pos < 56) and byte != good[pos]
    try:
        obj = cls.attach(shm_name)
    except engine.IncompatibleRegion:
        return
    assert not matters, f"accepted a changed header byte at {pos}"
    # accepted: the layout must then be exactly the valid one (size unchanged,
    # the changed byte is informational or unchanged), and it must work
    assert len(data) == len(good)
    if which == "counter":
        obj.add(3)
        assert obj.value() == 3
    else:
        obj.add("k", 3)
        assert obj.get("k") == 3
    obj.close()


def test_attach_directory_and_empty_file(shm_name):
    _write(shm_name, b"")
    with pytest.raises(engine.IncompatibleRegion, match="truncated"):
        ShardedCounter.attach(shm_name)
    os.unlink(Path("/dev/shm") / shm_name)
    os.mkdir(Path("/dev/shm") / shm_name)
    try:
        with pytest.raises((engine.IncompatibleRegion, IsADirectoryError)):
            ShardedCounter.attach(shm_name)
    finally:
        os.rmdir(Path("/dev/shm") / shm_name)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(garbage=st.binary(min_size=1, max_size=512), at=st.integers(0, 16 * 128 - 1))
def test_map_with_garbage_slots_never_crashes(shm_name, garbage, at):
    good = bytearray(_valid_bytes(CounterMap, shm_name, capacity=16, shards=2))
    end = min(HEADER + at + len(garbage), HEADER + 16 * 128)
    good[HEADER + at : end] = garbage[: end - HEADER - at]
    _write(shm_name, bytes(good))
    m = CounterMap.attach(shm_name)
    items = m.items()
    for key, _ in items:
        assert len(key if isinstance(key, bytes) else key.encode("utf-8", "replace")) <= 3 * KEY_MAX
    before = m.get("fresh")
    try:
        m.add("fresh", 2)
    except CounterMapFull:
        assert m.stats()["keys"] + m.stats()["unusable_slots"] == 16
    else:
        assert m.get("fresh") == before + 2 and "fresh" in m
    m.stats()
    m.top(3)
    m.close()


def test_map_slot_of_dead_inserter_is_skipped(shm_name):
    m = CounterMap.create(shm_name, capacity=4, shards=2)
    # a process that dies right away: its pid is dead once reaped
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    dead = p.pid
    with open(Path("/dev/shm") / shm_name, "r+b") as f:
        for i in range(4):
            f.seek(HEADER + i * 128)
            f.write(struct.pack("<Q", (dead << 32) | 2))  # BUSY, claimed by the dead pid
    with pytest.raises(CounterMapFull):
        m.add("x")
    st_ = m.stats()
    assert st_["unusable_slots"] == 4 and st_["keys"] == 0


# ---------------------------------------------------------------- CounterMap


def test_counter_map_basics():
    m = CounterMap(capacity=64)
    m.add("GET /")
    m.add("GET /", 2)
    m.add(b"GET /", 5)
    m.add("neg", -4)
    assert m.get("GET /") == 3 and m["GET /"] == 3
    assert m.get(b"GET /") == 5
    assert m.get("missing") == 0 and m.get("missing", None) is None
    assert "neg" in m and "missing" not in m
    assert len(m) == 3
    assert m.top(2) == [(b"GET /", 5), ("GET /", 3)]
    assert sorted(m.items(), key=repr) == sorted(
        [("GET /", 3), (b"GET /", 5), ("neg", -4)], key=repr
    )
    with pytest.raises(TypeError):
        m.add(5)
    with pytest.raises(TypeError):
        m.add("k", 1.0)
    with pytest.raises(ValueError):
        m.add("x" * (KEY_MAX + 1))
    m.add("x" * KEY_MAX, 1)
    assert m.get("x" * KEY_MAX) == 1
    assert m.reset()["GET /"] == 3
    assert m.get("GET /") == 0 and len(m) == 4


def test_counter_map_full_names_capacity():
    m = CounterMap(capacity=8)
    for i in range(8):
        m.add(f"k{i}")
    with pytest.raises(CounterMapFull, match="8 slots") as ei:
        m.add("one more")
    assert ei.value.capacity == 8
    assert isinstance(ei.value, engine.EngineError) and isinstance(ei.value, ValueError)
    m.add("k3", 5)  # existing keys still work
    assert m.get("k3") == 6


def test_counter_map_overflow():
    m = CounterMap(capacity=8, shards=1)
    m.add("a", I64_MAX)
    with pytest.raises(OverflowError):
        m.add("a", 1)
    assert m.get("a") == I64_MAX


def test_counter_map_shared(shm_name):
    a = CounterMap.create(shm_name, capacity=32)
    b = CounterMap.attach(shm_name)
    a.add("x", 2)
    b.add("x", 3)
    b.add("y")
    assert a.get("x") == 5 and a.get("y") == 1 and len(a) == 2
    assert (Path("/dev/shm") / shm_name).stat().st_mode & 0o777 == 0o600
    with pytest.raises(engine.IncompatibleRegion, match="not a ShardedCounter"):
        ShardedCounter.attach(shm_name)


keys_st = st.one_of(st.text(max_size=6, alphabet="abcé"), st.binary(max_size=4).map(bytes))


class CounterMapMachine(RuleBasedStateMachine):
    """The CounterMap against a dict."""

    def __init__(self):
        super().__init__()
        self.m = CounterMap(capacity=16, shards=2)
        self.model: dict = {}

    @rule(key=keys_st, n=st.integers(-(10**12), 10**12))
    def add(self, key, n):
        if key not in self.model and len(self.model) >= 16:
            with pytest.raises(CounterMapFull):
                self.m.add(key, n)
            return
        self.m.add(key, n)
        self.model[key] = self.model.get(key, 0) + n

    @rule(key=keys_st)
    def get(self, key):
        assert self.m.get(key) == self.model.get(key, 0)
        assert (key in self.m) == (key in self.model)

    @precondition(lambda self: len(self.model) > 0)
    @rule()
    def reset(self):
        drained = self.m.reset()
        assert drained == self.model
        self.model = {k: 0 for k in self.model}

    @rule(k=st.integers(1, 5))
    def top(self, k):
        got = self.m.top(k)
        assert [v for _, v in got] == sorted(self.model.values(), reverse=True)[:k]

    @invariant()
    def same(self):
        assert len(self.m) == len(self.model)
        assert dict(self.m.items()) == self.model


TestCounterMapModel = CounterMapMachine.TestCase
TestCounterMapModel.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


# ---------------------------------------------------------------- processes (small)


def _proc_add(name, n, k):
    c = ShardedCounter.attach(name)
    add = c.add
    for i in range(n):
        add(k if i & 1 else -2 * k)
    c.close()


def _proc_map_add(name, n, seed):
    m = CounterMap.attach(name)
    for i in range(n):
        m.add(f"k{(i * 7 + seed) % 50}", 1 if i % 3 else -1)
    m.close()


def test_two_processes_exact(shm_name):
    c = ShardedCounter.create(shm_name)
    ctx = mp.get_context("fork")
    n = 100_000
    procs = [ctx.Process(target=_proc_add, args=(shm_name, n, k)) for k in (1, 3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert c.value() == sum((n // 2) * (k - 2 * k) for k in (1, 3))


def test_counter_map_two_processes_exact(shm_name):
    m = CounterMap.create(shm_name, capacity=128)
    ctx = mp.get_context("fork")
    n = 20_000
    procs = [ctx.Process(target=_proc_map_add, args=(shm_name, n, s)) for s in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    expect: dict = {}
    for s in (0, 1):
        for i in range(n):
            k = f"k{(i * 7 + s) % 50}"
            expect[k] = expect.get(k, 0) + (1 if i % 3 else -1)
    assert dict(m.items()) == expect


# ---------------------------------------------------------------- checkpoint / restore


def test_checkpoint_restore_round_trip(tmp_path, shm_name):
    from engine import Log

    c = ShardedCounter()
    c.add(-123456789)
    m = CounterMap(capacity=32)
    m.add("a", 5)
    m.add(b"b", -7)
    with Log(str(tmp_path / "ckpt")) as log:
        off = c.checkpoint(log)
        m.checkpoint(log)
        c.add(1)
        c.checkpoint(log)  # the latest one wins
        assert isinstance(off, int)
    c2 = ShardedCounter()
    c2.add(99)  # replaced, not added to
    assert c2.restore(str(tmp_path / "ckpt")) == -123456788
    assert c2.value() == -123456788
    m2 = CounterMap(capacity=32)
    m2.add("zzz", 1)
    assert m2.restore(str(tmp_path / "ckpt")) == {"a": 5, b"b": -7}
    assert dict(m2.items()) == {"a": 5, b"b": -7, "zzz": 0}
    # a shared counter checkpoints under its own name
    s = ShardedCounter.create(shm_name)
    with Log(str(tmp_path / "ckpt")) as log:
        assert s.restore(log) is None
        s.add(5)
        s.checkpoint(log)
    s.reset()
    assert s.restore(str(tmp_path / "ckpt")) == 5 and s.value() == 5


# ---------------------------------------------------------------- aggregator


def test_aggregator_exact_private():
    agg = CounterAggregator(capacity=1 << 16)
    s = agg.sender(batch=100)
    expect: dict = {}
    for i in range(5000):
        key = f"k{i % 37}"
        n = (i % 5) - 2
        s.add(key, n)
        expect[key] = expect.get(key, 0) + n
        if i % 500 == 0:
            agg.drain()
    s.close()
    agg.run(poll=0.01)
    assert dict(agg.target.items()) == expect
    assert agg.senders_open == 0
    assert s.sent_messages >= 50


def test_aggregator_into_sharded_counter():
    target = ShardedCounter()
    agg = CounterAggregator(target=target, capacity=1 << 16)
    s = agg.sender(batch=64)
    for i in range(1000):
        s.add(None, 3 if i % 2 else -1)
    s.close()
    agg.run(poll=0.01)
    assert target.value() == 500 * 3 - 500
    with pytest.raises(TypeError):
        CounterAggregator(capacity=1 << 12).sender().add(None, 1.5)


# ---------------------------------------------------------------- CLI


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "engine", "counter", *args], capture_output=True, text=True
    )


def test_cli_counter_show(shm_name):
    c = ShardedCounter.create(shm_name, shards=4)
    c.add(42)
    out = _cli("show", shm_name)
    assert out.returncode == 0, out.stderr
    assert "42" in out.stdout
    js = _cli("show", "--json", shm_name)
    import json

    assert json.loads(js.stdout)["value"] == 42
    m_name = shm_name + "-map"
    m = CounterMap.create(m_name, capacity=16)
    m.add("alpha", 3)
    m.add("beta", 9)
    out = _cli("show", m_name)
    assert out.returncode == 0 and "beta" in out.stdout and "9" in out.stdout
    ls = _cli("ls")
    assert shm_name in ls.stdout and m_name in ls.stdout
    bad = _cli("show", shm_name + "-missing")
    assert bad.returncode == 1 and "no such region" in bad.stderr


def test_a_damaged_checkpoint_record_is_corrupt_log(tmp_path):
    """A counter checkpoint record that is not one is reported as corrupt
    data (CorruptLog naming the log and the record), not a bare EngineError."""
    from engine.counters import _ckpt_key

    path = str(tmp_path / "ckpt")
    m = CounterMap(capacity=16)
    c = ShardedCounter()
    with engine.Log(path, durability="none") as log:
        log.append(b"QEM1" + b"\x01", key=_ckpt_key(m))  # a truncated entry
        log.append(b"junk", key=_ckpt_key(c))
    for obj in (m, c):
        with pytest.raises(engine.CorruptLog, match="record 0|record 1"):
            obj.restore(path)
    m.close()
    c.close()
