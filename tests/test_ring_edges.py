"""The ring's edges: object buffers, hostile cursors on the reaper and claim
paths, a stream closed under its producer, holders in other pid namespaces,
lost-message accounting, a MemoryError after a claim, near-2^64 cursors and
a racing takeover of a dead producer's role.

Offsets are those of ring_layout.h (static-asserted there)."""

from __future__ import annotations

import mmap
import multiprocessing as mp
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import engine
from engine.scheduling import KeyedQueue

BLOCK = 128
HEAD, PROD_PID, CLOSED = 128, 136, 140
LOST = 128 + 48
PROD_START, PROD_NS = 128 + 56, 128 + 64
TAIL = 256 + 8
CLAIM = 384
SLOT = 512  # slot i at SLOT + i * BLOCK
S_CURSOR, S_PID, S_STATE, S_CLAIM_END, S_START, S_NS = 0, 8, 12, 40, 48, 56
DATA = 4096  # header bytes for up to 28 consumers
MEMBER0 = 2688  # sched_layout.h: member slot 0 (token, pid, joined, delivered, start, ns)

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc")


def _poke(name, off, fmt, value):
    with open(f"/dev/shm/{name}", "r+b") as f, mmap.mmap(f.fileno(), 0) as mm:
        struct.pack_into(fmt, mm, off, value)


def _peek(name, off, fmt):
    with open(f"/dev/shm/{name}", "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
        return struct.unpack_from(fmt, mm, off)[0]


def _dead_pid():
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _my_ns():
    return os.stat("/proc/self/ns/pid").st_ino


def _in_child(fn):
    """fn() in a forked child; its exit status (a crash is a signal)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fn()
            code = 0
        finally:
            os._exit(code)
    return os.waitpid(pid, 0)[1]


def _fake_slot(name, i, *, pid, cursor, claim_end=0, ns=0, start=0):
    base = SLOT + i * BLOCK
    _poke(name, base + S_CURSOR, "<Q", cursor)
    _poke(name, base + S_CLAIM_END, "<Q", claim_end)
    _poke(name, base + S_START, "<Q", start)
    _poke(name, base + S_NS, "<Q", ns)
    _poke(name, base + S_PID, "<i", pid)
    _poke(name, base + S_STATE, "<I", 1)


# ---- 2. object buffers ------------------------------------------------------

OBJECT_DTYPES = [np.dtype(object), np.dtype([("a", "<i8"), ("o", "O")])]


@pytest.mark.parametrize("dt", OBJECT_DTYPES, ids=["object", "struct-with-object"])
@pytest.mark.parametrize("mode", ["spsc", "shared"])
def test_get_array_of_objects_is_a_type_error_and_consumes_nothing(mode, dt):
    def run():
        ring = engine.Ring(1 << 16, mode=mode)
        p, c = ring.producer(), ring.consumer()
        p.put(b"\x01" * 16)
        with pytest.raises(TypeError, match="Python objects"):
            c.get_array(4, dtype=dt)
        assert c.get(timeout=1) == b"\x01" * 16

    assert _in_child(run) == 0  # (a segfault shows as a signal)


@pytest.mark.parametrize("dt", OBJECT_DTYPES, ids=["object", "struct-with-object"])
def test_put_of_object_arrays_is_a_type_error(dt):
    ring = engine.Ring(1 << 16)
    p, c = ring.producer(), ring.consumer()
    arr = np.empty((3, 2), dtype=dt)
    for call in (lambda: p.put_array(arr), lambda: p.put(arr[0]), lambda: p.try_put(arr[0]),
                 lambda: p.put_many([arr[0]])):
        with pytest.raises(TypeError, match="Python objects"):
            call()
    assert c.try_get() is None and ring.stats()["messages_put"] == 0
    # a structured type whose field name has an 'O' in it holds no objects
    plain = np.zeros(2, dtype=[("Off", "<i4"), ("x", "<f4")])
    assert p.put_array(plain) == 2
    assert len(c.get_many(8)) == 2


# ---- 3. hostile cursors on the reaper path ------------------------------------

@pytest.mark.parametrize("mode", ["shared", "spsc"])
def test_unaligned_cursor_of_a_dead_consumer_is_not_followed(shm_name, mode):
    """A dead consumer's cursor 4 bytes before a lap boundary: following it
    would read a record header that straddles the end of the mapping."""
    engine.Ring.create(shm_name, capacity=4096, mode=mode).close()
    _poke(shm_name, HEAD, "<Q", 8192)
    # shared: nothing unclaimed; spsc: a floor a lap back, which the dead
    # consumer's cursor would raise (to an unaligned position) if followed
    _poke(shm_name, CLAIM if mode == "shared" else TAIL, "<Q", 8192 if mode == "shared" else 4096)
    _fake_slot(shm_name, 0, pid=_dead_pid(), cursor=8188)

    def run():
        ring = engine.Ring.attach(shm_name)
        ring.consumer().close()  # all slots taken: reaps the dead one first
        st = ring.stats()
        assert st["lost"] == 0
        if mode == "spsc":
            assert _peek(shm_name, TAIL, "<Q") == 4096  # the floor did not move to it

    assert _in_child(run) == 0


def test_counting_lost_records_stops_at_the_claimed_range(shm_name):
    """A dead consumer's claimed range whose record says it is longer than
    the range: counted as one, nothing read past it."""
    ring = engine.Ring.create(shm_name, capacity=4096, mode="shared")
    p = ring.producer()
    p.put(b"a" * 8)  # [0, 16)
    p.put(b"b" * 8)  # [16, 32)
    _poke(shm_name, DATA, "<I", 4000)  # the first record now claims 4008 bytes
    _poke(shm_name, CLAIM, "<Q", 32)
    _fake_slot(shm_name, 0, pid=_dead_pid(), cursor=0, claim_end=32)
    ring.consumer().close()
    assert ring.stats()["lost"] == 1


# ---- 7. lost counts only what a dead consumer may have claimed ----------------

def test_announced_but_unclaimed_position_is_not_lost(shm_name):
    ring = engine.Ring.create(shm_name, capacity=1 << 16, mode="shared", max_consumers=2)
    p, c = ring.producer(), ring.consumer()
    for i in range(5):
        p.put(b"%d" % i * 10)
    assert c.get(timeout=1) == b"0" * 10
    assert c.get(timeout=1) == b"1" * 10
    # slot 1: a consumer that announced position 0 (it read the claim
    # cursor there), lost the claim CAS to `c` and died before retrying
    _fake_slot(shm_name, 1, pid=_dead_pid(), cursor=0, claim_end=0)
    ring.consumer().close()  # no free slot: reaps the dead one, then takes its slot
    assert ring.stats()["lost"] == 0
    assert c.get_many(10) == [b"%d" % i * 10 for i in (2, 3, 4)]


def test_claimed_but_unfinished_batch_is_lost_and_counted(shm_name):
    ring = engine.Ring.create(shm_name, capacity=1 << 16, mode="shared", max_consumers=2)
    p, c = ring.producer(), ring.consumer()
    for i in range(4):
        p.put(b"%d" % i * 8)  # 16-byte records
    # slot 1 claimed [0, 32) (two records) and died while copying
    _poke(shm_name, CLAIM, "<Q", 32)
    _fake_slot(shm_name, 1, pid=_dead_pid(), cursor=0, claim_end=32)
    ring.consumer().close()
    assert ring.stats()["lost"] == 2
    assert c.get_many(10) == [b"2" * 8, b"3" * 8]


_MEMORY_SCRIPT = textwrap.dedent("""
    import resource, sys
    import engine
    mode_many = sys.argv[1] == "many"
    ring = engine.Ring(1 << 26, mode="shared", max_consumers=2)
    p, c = ring.producer(), ring.consumer()
    big = 30 << 20
    p.put(b"x" * big)
    p.put(b"y" * 8)
    with open("/proc/self/status") as f:
        vm = next(int(l.split()[1]) for l in f if l.startswith("VmSize:")) * 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (vm + (8 << 20), hard))
    try:
        (c.get_many(1) if mode_many else c.get(timeout=1))
    except MemoryError:
        pass
    else:
        print("no MemoryError"); sys.exit(2)
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    st = ring.stats()
    cur = st["consumers"][0]["cursor"]
    print("cursor", cur, "lost", st["lost"])
    assert cur is None, "the slot still announces the claimed message"
    assert st["lost"] == 1
    assert c.get(timeout=1) == b"y" * 8
""")


@linux_only
@pytest.mark.parametrize("call", ["get", "many"])
def test_memory_error_after_a_claim_releases_the_slot(call):
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, call],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


# ---- 7. cursors near 2^64 ------------------------------------------------------

def test_record_past_head_near_the_top_of_the_cursor_range(shm_name):
    """pos + size wraps past 2^64: written as size > head - pos it cannot."""
    engine.Ring.create(shm_name, capacity=4096).close()
    pos = (1 << 64) - 112  # data offset 3984: a 112-byte record would end the area
    _poke(shm_name, HEAD, "<Q", pos + 16)  # one 16-byte record published...
    _poke(shm_name, TAIL, "<Q", pos)
    _poke(shm_name, DATA + 3984, "<I", 104)  # ...that says it is 112 bytes long
    _poke(shm_name, DATA + 3988, "<I", 0)
    c = engine.Ring.attach(shm_name).consumer()
    with pytest.raises(engine.IncompatibleRegion, match="crosses"):
        c.try_get()
    with pytest.raises(engine.IncompatibleRegion):
        c.get_view(timeout=0)


# ---- 5. a stream closed under its producer -------------------------------------

def test_put_on_a_ring_closed_under_the_producer_raises_closed(shm_name):
    """What a consumer does when it takes the producer for dead: `closed`
    is set while this producer holds the role. Nothing may be put silently."""
    ring = engine.Ring.create(shm_name, capacity=1 << 16)
    p, c = ring.producer(), ring.consumer()
    p.put(b"kept")
    _poke(shm_name, CLOSED, "<I", 1)
    for call in (lambda: p.put(b"x"), lambda: p.try_put(b"x"), lambda: p.put_many([b"x"]),
                 lambda: p.put_array(np.zeros((1, 8), np.uint8))):
        with pytest.raises(engine.Closed):
            call()
    assert c.get(timeout=1) == b"kept"
    with pytest.raises(engine.Closed):
        c.get(timeout=1)
    assert ring.stats()["messages_put"] == 1


def test_producer_waiting_for_room_sees_the_stream_closed(shm_name):
    ring = engine.Ring.create(shm_name, capacity=4096)
    p, _c = ring.producer(), ring.consumer()
    while p.try_put(b"f" * 100):
        pass
    _poke(shm_name, CLOSED, "<I", 1)
    t0 = time.monotonic()
    with pytest.raises(engine.Closed):
        p.put(b"f" * 100, timeout=5)
    assert time.monotonic() - t0 < 1


def _race_for_producer(name, go, out):
    ring = engine.Ring.attach(name)
    while not go.value:  # spin: an Event would wake the racers one by one
        pass
    try:
        p = ring.producer()
    except engine.EngineError as exc:
        out.put(("lost", os.getpid(), str(exc)))
        return
    out.put(("won", os.getpid(), ""))
    time.sleep(1.5)  # hold the role while the parent looks
    del p  # give the role back without ending the stream


def _start_time(pid):
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    return int(stat[stat.rfind(b")") + 2:].split()[19])


@linux_only
@pytest.mark.stress
def test_racing_takeover_keeps_the_winners_start_time(shm_name):
    """Racers take over a dead (zombie) producer's role at once. Checking
    the zombie reads /proc, so losers reach their clear of the start time
    after the winner stored its own: only the dead holder's may be cleared."""
    ctx = mp.get_context("fork")
    ring = engine.Ring.create(shm_name, capacity=1 << 16)
    bad = []
    for _round in range(4):
        zombie = subprocess.Popen(["true"])
        time.sleep(0.05)  # exited, not reaped: a zombie
        _poke(shm_name, PROD_START, "<Q", _start_time(zombie.pid))
        _poke(shm_name, PROD_PID, "<i", zombie.pid)
        go, out = ctx.Value("i", 0, lock=False), ctx.Queue()
        procs = [ctx.Process(target=_race_for_producer, args=(shm_name, go, out)) for _ in range(6)]
        for pr in procs:
            pr.start()
        time.sleep(0.3)
        go.value = 1
        results = [out.get(timeout=20) for _ in procs]
        winners = [pid for what, pid, _why in results if what == "won"]
        assert len(winners) == 1, results
        st = ring.stats()
        assert st["producer_pid"] == winners[0]
        if _peek(shm_name, PROD_START, "<Q") != _start_time(winners[0]):
            bad.append(_round)
        for pr in procs:
            pr.join(20)
        zombie.wait()
    assert not bad, f"the winner's start time was cleared by a loser in rounds {bad}"


# ---- 6. holders in another pid namespace ---------------------------------------

@linux_only
def test_consumer_in_another_pid_namespace_is_never_reaped(shm_name):
    ring = engine.Ring.create(shm_name, capacity=4096)
    p = ring.producer()
    # what a consumer in another container leaves: a pid that means nothing
    # here (dead in our namespace) and its namespace's inode
    _fake_slot(shm_name, 0, pid=_dead_pid(), cursor=0, ns=_my_ns() + 1)
    while p.try_put(b"f" * 100):
        pass
    with pytest.raises(engine.Timeout):
        p.put(b"f" * 100, timeout=0.5)  # the reaper ran: still gated by it
    with pytest.raises(engine.EngineError, match="slots are taken"):
        ring.consumer()
    assert ring.stats()["consumers"][0]["alive"] is True


@linux_only
def test_producer_in_another_pid_namespace_is_never_taken_for_dead(shm_name):
    ring = engine.Ring.create(shm_name, capacity=4096)
    c = ring.consumer()
    _poke(shm_name, PROD_NS, "<Q", _my_ns() + 1)
    _poke(shm_name, PROD_PID, "<i", _dead_pid())
    with pytest.raises(engine.EngineError, match="live producer"):
        ring.producer()
    with pytest.raises(engine.Timeout):
        c.get(timeout=0.5)  # not Closed: the consumer's check ran (every 0.1 s)
    assert not ring.stats()["closed"]


@linux_only
def test_group_member_in_another_pid_namespace_keeps_its_slot(shm_name):
    kq = KeyedQueue.create(shm_name, partitions=2)
    reg = kq._region
    assert reg.claim_member(0, 0, 999_999, 0)
    _poke(shm_name, MEMBER0 + 40, "<Q", _my_ns() + 1)
    _poke(shm_name, MEMBER0 + 8, "<q", _dead_pid())
    reg.bump_epoch()
    c = kq.consumer()
    with pytest.raises(engine.Timeout):
        c.get(timeout=0.3)
    assert 999_999 in [m["token"] for m in kq.stats()["members"]]
    c.close()
    kq.close()


_NS_CONSUMER = textwrap.dedent("""
    import sys, time, engine
    c = engine.Ring.attach(sys.argv[1]).consumer()
    print("ready", flush=True)
    sys.stdin.readline()
    c.close()
""")


@linux_only
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare")
def test_real_consumer_in_another_pid_namespace_is_not_reaped(shm_name):
    ring = engine.Ring.create(shm_name, capacity=4096)
    p = ring.producer()
    proc = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", _NS_CONSUMER, shm_name],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        if line.strip() != "ready":
            pytest.skip("unshare --pid is not permitted here")
        inner = ring.stats()["consumers"][0]
        assert inner["pid"] in (1, 2)  # its pid in its own namespace
        while p.try_put(b"f" * 100):
            pass
        with pytest.raises(engine.Timeout):
            p.put(b"f" * 100, timeout=0.5)  # reaper ran: the live consumer still gates
        assert ring.stats()["consumers"][0]["alive"] is True
    finally:
        proc.stdin.write("\n")
        proc.stdin.flush()
        proc.wait(10)
    assert ring.stats()["consumers"] == []  # its own close() released the slot
