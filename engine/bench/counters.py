"""The counters section: engine.ShardedCounter / CounterMap / CounterAggregator
against multiprocessing.Value (with its lock), a single shared atomic cell
(one int64 on one cache line, a plain atomic fetch_add, called the same way as
``ShardedCounter.add``: ``engine._counter._AtomicCell``), a threading.Lock
around a Python int, and multiprocessing.Manager().dict().

Each workload message is one increment (``add(1)``); a contender verifies the
exact final value itself and raises if it is off by one, so the harness's
count/checksum stand for "every increment counted exactly once".

Cases (quick / --full): add in 1 process (1M / 5M); 2 processes adding to one
counter against multiprocessing.Value (300k / 1M) and against the single
shared cell (2M / 8M); CounterMap against Manager().dict() (20k / 100k, 64
keys); the queue-fed aggregator, one sender process -> one aggregator, against
the same batching over multiprocessing.Queue (500k / 2M).

``python -m engine.bench.counters`` measures the floors of the 2-process
"sharded vs single cell" ratio on this machine, in one run: a C program (two
processes, ``lock add`` on one shared cache line vs on two separate lines,
spaced by a calibrated amount of other work), and the Python call ceiling (two
processes calling a compiled method that does the argument checks of ``add``
and writes nothing), next to the single shared cell and ShardedCounter.  One
Python call per increment costs more than the cache-line transfer it avoids
on a machine where the two cores share a cache, which bounds the ratio.
"""

from __future__ import annotations

import os
import queue
import threading
import time
import uuid
from typing import Any, List, Tuple

from engine.bench import peers
from engine.bench.harness import (
    BUILD_HINT,
    THROUGHPUT,
    Case,
    Contender,
    Profile,
    Run,
    Target,
    Workload,
)

SECTION = "counters"
# the cases the quick profile runs (fewer cases, never shorter windows); --full runs all
QUICK = ("add 2 processes vs multiprocessing.Value",)

OURS = ("engine._counter",)
KEYS = 64  # distinct keys in the CounterMap / aggregator cases
BATCH = 4096  # increments coalesced per aggregator message, for both contenders
SINGLE_CELL = "single shared atomic cell (fetch_add)"
MP_VALUE = "multiprocessing.Value + lock"


def _name() -> str:
    return f"qe-bench-ctr-{os.getpid()}-{uuid.uuid4().hex[:10]}"


def _verified(wl: Workload, t0: int, t1: int, got: int, expect: int, who: str) -> Run:
    if got != expect:
        raise AssertionError(f"{who}: counted {got}, expected exactly {expect}")
    exp = wl.expected
    return Run((t1 - t0) / 1e9, exp.count, exp.checksum, None)


def _keys() -> List[str]:
    return [f"key-{i:03d}" for i in range(KEYS)]


def _shares(n: int, parts: int) -> List[int]:
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


# ---------------------------------------------------------------------------
# one process
# ---------------------------------------------------------------------------


def ours_add_1p(wl: Workload) -> Run:
    from engine import ShardedCounter

    c = ShardedCounter()
    add = c.add
    rng = range(wl.count)
    t0 = time.perf_counter_ns()
    for _ in rng:
        add(1)
    t1 = time.perf_counter_ns()
    return _verified(wl, t0, t1, c.value(), wl.count, "ShardedCounter")


def mpvalue_add_1p(wl: Workload) -> Run:
    ctx = peers.mp_context()
    v = ctx.Value("q", 0)
    lock = v.get_lock()
    rng = range(wl.count)
    t0 = time.perf_counter_ns()
    for _ in rng:
        with lock:
            v.value += 1
    t1 = time.perf_counter_ns()
    return _verified(wl, t0, t1, v.value, wl.count, "multiprocessing.Value")


def lock_int_add_1p(wl: Workload) -> Run:
    lock = threading.Lock()
    box = [0]
    rng = range(wl.count)
    t0 = time.perf_counter_ns()
    for _ in rng:
        with lock:
            box[0] += 1
    t1 = time.perf_counter_ns()
    return _verified(wl, t0, t1, box[0], wl.count, "threading.Lock + int")


# ---------------------------------------------------------------------------
# two processes adding to one counter
# ---------------------------------------------------------------------------


def _timed_adds(add: Any, n: int, barrier: Any) -> Tuple[int, int]:
    # the one timed loop of the 2-process cases: n calls of add(1) after the barrier
    rng = range(n)
    barrier.wait(peers.BARRIER_TIMEOUT)
    t0 = time.perf_counter_ns()
    for _ in rng:
        add(1)
    return t0, time.perf_counter_ns()


def _child_add(wl: Workload, barrier: Any, name: str, n: int) -> Tuple[int, int]:
    from engine import ShardedCounter

    c = ShardedCounter.attach(name)
    try:
        return _timed_adds(c.add, n, barrier)
    finally:
        c.close()


def _child_mpvalue(wl: Workload, barrier: Any, v: Any, n: int) -> Tuple[int, int]:
    lock = v.get_lock()
    rng = range(n)
    barrier.wait(peers.BARRIER_TIMEOUT)
    t0 = time.perf_counter_ns()
    for _ in rng:
        with lock:
            v.value += 1
    t1 = time.perf_counter_ns()
    return t0, t1


def _child_cell(wl: Workload, barrier: Any, name: str, n: int, method: str) -> Tuple[int, int]:
    from engine._counter import _AtomicCell

    cell = _AtomicCell(name)
    try:
        # "add", or "nop" for the call ceiling
        return _timed_adds(getattr(cell, method), n, barrier)
    finally:
        cell.close()


def _span(res: List[Tuple[int, int]]) -> Tuple[int, int]:
    return min(r[0] for r in res), max(r[1] for r in res)


def ours_add_2p(shards: Any) -> Any:
    """2 processes adding to one shared ShardedCounter (``shards=1``: every
    adder on one cell, through the counter's own overflow-checked add)."""

    def run(wl: Workload) -> Run:
        from engine import ShardedCounter

        name = _name()
        c = ShardedCounter.create(name, shards=shards)
        try:
            roles = [(_child_add, (name, k)) for k in _shares(wl.count, 2)]
            t0, t1 = _span(peers.run_children(wl, roles))
            who = "ShardedCounter(shards=1)" if shards == 1 else "ShardedCounter"
            return _verified(wl, t0, t1, c.value(), wl.count, who)
        finally:
            c.close()
            ShardedCounter.unlink(name)

    run.__name__ = f"ours_add_2p_shards_{shards}"
    return run


def single_cell_2p(wl: Workload) -> Run:
    """2 processes doing one atomic fetch_add each on one int64 on one cache
    line (the peer of the sharding), called exactly like ShardedCounter.add."""
    return _cell_run(wl, "add")


def call_ceiling_2p(wl: Workload) -> Run:
    """2 processes making the same calls with the same argument checks and no
    write at all: no add made by one Python call per increment can beat it.
    Not a contender (nothing is counted); the floor tool and the bench tests
    report it.  Its Run counts the calls it made."""
    return _cell_run(wl, "nop")


def _cell_run(wl: Workload, method: str) -> Run:
    from engine import ShardedCounter

    name = _name()
    c = ShardedCounter.create(name, shards=1)
    try:
        roles = [(_child_cell, (name, k, method)) for k in _shares(wl.count, 2)]
        t0, t1 = _span(peers.run_children(wl, roles))
        expect = wl.count if method == "add" else 0
        got = c.value()
        if got != expect:
            raise AssertionError(f"single shared cell ({method}): counted {got}, expected {expect}")
        return Run((t1 - t0) / 1e9, wl.expected.count, wl.expected.checksum, None)
    finally:
        c.close()
        ShardedCounter.unlink(name)


def mpvalue_add_2p(wl: Workload) -> Run:
    v = peers.mp_context().Value("q", 0)
    roles = [(_child_mpvalue, (v, k)) for k in _shares(wl.count, 2)]
    t0, t1 = _span(peers.run_children(wl, roles))
    return _verified(wl, t0, t1, v.value, wl.count, "multiprocessing.Value")


# ---------------------------------------------------------------------------
# CounterMap against Manager().dict()
# ---------------------------------------------------------------------------


def _expected_map(n: int) -> dict:
    keys = _keys()
    out = dict.fromkeys(keys, n // KEYS)
    for i in range(n % KEYS):
        out[keys[i]] += 1
    return out


def ours_map_1p(wl: Workload) -> Run:
    from engine import CounterMap

    m = CounterMap(capacity=4 * KEYS)
    add = m.add
    keys = _keys()
    seq = [keys[i % KEYS] for i in range(wl.count)]
    t0 = time.perf_counter_ns()
    for k in seq:
        add(k)
    t1 = time.perf_counter_ns()
    got = dict(m.items())
    ok = got == _expected_map(wl.count)
    return _verified(wl, t0, t1, wl.count if ok else -1, wl.count, "CounterMap")


def manager_dict_1p(wl: Workload) -> Run:
    mgr = peers.mp_context().Manager()
    try:
        d = mgr.dict()
        keys = _keys()
        seq = [keys[i % KEYS] for i in range(wl.count)]
        get = d.get
        t0 = time.perf_counter_ns()
        for k in seq:
            d[k] = get(k, 0) + 1  # one process: no lock needed for exactness
        t1 = time.perf_counter_ns()
        got = dict(d.items())
    finally:
        mgr.shutdown()
    ok = got == _expected_map(wl.count)
    return _verified(wl, t0, t1, wl.count if ok else -1, wl.count, "Manager().dict()")


# ---------------------------------------------------------------------------
# the queue-fed aggregator: 1 sender process -> 1 aggregator process
# ---------------------------------------------------------------------------


def _child_sender(wl: Workload, barrier: Any, ring_name: str) -> int:
    from engine.counters import CounterSender

    s = CounterSender.attach(ring_name, batch=BATCH)
    add = s.add
    keys = _keys()
    seq = [keys[i % KEYS] for i in range(wl.count)]
    barrier.wait(peers.BARRIER_TIMEOUT)
    t0 = time.perf_counter_ns()
    for k in seq:
        add(k)
    s.close()
    return t0


def _child_aggregator(wl: Workload, barrier: Any, ring_name: str, map_name: str) -> int:
    from engine import CounterAggregator, CounterMap, Ring

    agg = CounterAggregator(Ring.attach(ring_name), target=CounterMap.attach(map_name))
    barrier.wait(peers.BARRIER_TIMEOUT)
    agg.run(max_messages=256, poll=0.05)
    t1 = time.perf_counter_ns()
    agg.close()
    return t1


def ours_aggregator(wl: Workload) -> Run:
    from engine import CounterMap, Ring

    ring_name, map_name = _name(), _name()
    ring = Ring.create(ring_name, capacity=1 << 22)
    m = CounterMap.create(map_name, capacity=4 * KEYS)
    try:
        res = peers.run_children(
            wl, [(_child_sender, (ring_name,)), (_child_aggregator, (ring_name, map_name))]
        )
        ok = dict(m.items()) == _expected_map(wl.count)
        return _verified(wl, res[0], res[1], wl.count if ok else -1, wl.count, "aggregator")
    finally:
        m.close()
        ring.close()
        CounterMap.unlink(map_name)
        Ring.unlink(ring_name)


class _QueueRing:
    """A multiprocessing.Queue dressed as a ring, so the peer runs the very same
    CounterSender / CounterAggregator code: only the transport differs."""

    max_message = 1 << 20

    def __init__(self, q: Any) -> None:
        self.q = q

    def producer(self) -> _QueueProducer:
        return _QueueProducer(self.q)

    def consumer(self) -> _QueueConsumer:
        return _QueueConsumer(self.q)


class _QueueProducer:
    def __init__(self, q: Any) -> None:
        self.q = q

    def put(self, msg: bytes, timeout: Any = None) -> None:
        self.q.put(msg)

    def close(self) -> None:
        self.q.put(None)  # end of stream


class _QueueConsumer:
    def __init__(self, q: Any) -> None:
        self.q = q
        self.closed = False

    def get_many(self, max: int = 1024, timeout: Any = 0) -> List[bytes]:
        from engine import Closed

        if self.closed:
            raise Closed("sender closed")
        out: List[bytes] = []
        try:
            m = self.q.get(timeout=timeout) if timeout else self.q.get_nowait()
        except queue.Empty:
            return out
        while True:
            if m is None:
                self.closed = True
                if out:
                    return out
                raise Closed("sender closed")
            out.append(m)
            if len(out) >= max:
                return out
            try:
                m = self.q.get_nowait()
            except queue.Empty:
                return out

    def close(self) -> None:
        pass


def _child_mpq_sender(wl: Workload, barrier: Any, q: Any) -> int:
    from engine.counters import CounterSender

    s = CounterSender(_QueueRing(q), batch=BATCH)
    add = s.add
    keys = _keys()
    seq = [keys[i % KEYS] for i in range(wl.count)]
    barrier.wait(peers.BARRIER_TIMEOUT)
    t0 = time.perf_counter_ns()
    for k in seq:
        add(k)
    s.close()
    return t0


def _child_mpq_aggregator(wl: Workload, barrier: Any, q: Any, map_name: str) -> int:
    from engine import CounterAggregator, CounterMap

    agg = CounterAggregator(_QueueRing(q), target=CounterMap.attach(map_name))
    barrier.wait(peers.BARRIER_TIMEOUT)
    agg.run(max_messages=256, poll=0.05)
    t1 = time.perf_counter_ns()
    agg.close()
    return t1


def mpqueue_aggregator(wl: Workload) -> Run:
    from engine import CounterMap

    q = peers.mp_context().Queue()
    map_name = _name()
    m = CounterMap.create(map_name, capacity=4 * KEYS)
    try:
        res = peers.run_children(
            wl, [(_child_mpq_sender, (q,)), (_child_mpq_aggregator, (q, map_name))]
        )
        ok = dict(m.items()) == _expected_map(wl.count)
        return _verified(wl, res[0], res[1], wl.count if ok else -1, wl.count, "mp.Queue-fed")
    finally:
        m.close()
        CounterMap.unlink(map_name)


# ---------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------


def _ours(name: str, fn: Any) -> Contender:
    return Contender(name, fn, ours=True, requires=OURS, pip_hint=BUILD_HINT)


def cases(profile: Profile) -> List[Case]:
    """Every counters case for this profile."""
    out = [
        Case(
            "add 1 process",
            "add(1) in a tight loop, one process (one message = one increment)",
            THROUGHPUT,
            Workload(profile.count(quick=500_000, full=5_000_000), 8),
            [
                _ours("engine.ShardedCounter", ours_add_1p),
                Contender(MP_VALUE, mpvalue_add_1p),
                Contender("threading.Lock + int", lock_int_add_1p),
            ],
            ordered=False,
            targets=[Target("min_msg_per_s", 15e6)],
        ),
        Case(
            "add 2 processes vs multiprocessing.Value",
            "two processes add(1) to one shared counter at once; aggregate rate",
            THROUGHPUT,
            Workload(profile.count(quick=150_000, full=1_000_000), 8),
            [
                _ours("engine.ShardedCounter", ours_add_2p(None)),
                Contender(MP_VALUE, mpvalue_add_2p),
            ],
            ordered=False,
            targets=[Target("ratio", 30, MP_VALUE)],
        ),
        Case(
            "add 2 processes vs single shared cell",
            "two processes add(1) at once: sharded cells vs one atomic int64 on one cache line "
            "(fetch_add, same call path); the bound on this machine: python -m engine.bench.counters",
            THROUGHPUT,
            Workload(profile.count(quick=2_000_000, full=8_000_000), 8),
            [
                _ours("engine.ShardedCounter", ours_add_2p(None)),
                Contender(SINGLE_CELL, single_cell_2p, requires=OURS, pip_hint=BUILD_HINT),
            ],
            ordered=False,
            targets=[Target("ratio", 2, SINGLE_CELL)],
        ),
        Case(
            "CounterMap vs Manager().dict()",
            f"one process, {KEYS} keys round robin, add(key)",
            THROUGHPUT,
            Workload(profile.count(quick=3_000, full=100_000), 8),
            [
                _ours("engine.CounterMap", ours_map_1p),
                Contender("multiprocessing.Manager().dict()", manager_dict_1p),
            ],
            ordered=False,
        ),
        Case(
            "aggregator 1 sender -> 1 aggregator",
            f"increments over a ring, coalesced {BATCH} per message, applied by another "
            f"process into a CounterMap ({KEYS} keys)",
            THROUGHPUT,
            Workload(profile.count(quick=500_000, full=2_000_000), 8),
            [
                _ours("engine.CounterAggregator (Ring)", ours_aggregator),
                Contender("multiprocessing.Queue-fed aggregator", mpqueue_aggregator),
            ],
            ordered=False,
        ),
    ]
    for case in out:
        # the contenders count increments, they keep no payloads (only the
        # expected digest builds count x 8 bytes once): sizing may go to the
        # 64 M increments a 0.8 s window takes at 80 M adds/s
        case.max_bytes = 512 << 20
    return out


# ---------------------------------------------------------------------------
# the floor of the 2-process ratio on this machine (python -m engine.bench.counters)
# ---------------------------------------------------------------------------

# Two processes (pinned to two CPUs when there are two) each do N rounds of
# `lock add` on their cell + a dependent multiply-add chain of `k` steps (work
# that touches no memory: a stand-in for the interpreter's cost of one call).
# "shared": both cells on one 64-byte line; "separate": 128 bytes apart.  Prints
# one line per spacing: the chain's ns per round alone, then ns per add per
# process on one line and on separate lines (medians of interleaved runs).
_FLOOR_C = r"""
#define _GNU_SOURCE
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static uint64_t now(void) {
    struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}
static inline uint64_t work(uint64_t x, int k) {
    for (int i = 0; i < k; i++) { x = x * 6364136223846793005ull + 1442695040888963407ull;
                                  __asm__ volatile("" : "+r"(x)); }
    return x;
}
static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b; return (x > y) - (x < y);
}
/* ns per round per process, the span of both processes */
static double run(char *m, int shared, long n, int k, int pin) {
    volatile uint32_t *ready = (uint32_t *)m;
    int64_t *cell[2] = {(int64_t *)(m + 256), (int64_t *)(m + (shared ? 264 : 384))};
    uint64_t *t = (uint64_t *)(m + 1024);
    *ready = 0; *cell[0] = 0; *cell[1] = 0;
    for (int p = 0; p < 2; p++) {
        if (fork() == 0) {
            if (pin) { cpu_set_t s; CPU_ZERO(&s); CPU_SET(p, &s); sched_setaffinity(0, sizeof s, &s); }
            __atomic_fetch_add(ready, 1, __ATOMIC_SEQ_CST);
            while (__atomic_load_n(ready, __ATOMIC_ACQUIRE) < 2) ;
            uint64_t x = (uint64_t)p, t0 = now();
            for (long i = 0; i < n; i++) { __atomic_fetch_add(cell[p], 1, __ATOMIC_RELAXED); x = work(x, k); }
            t[2 * p] = t0; t[2 * p + 1] = now(); t[4 + p] = x;
            _exit(0);
        }
    }
    while (wait(NULL) > 0) ;
    if (*cell[0] + *cell[1] != 2 * n) { fprintf(stderr, "lost adds\n"); exit(2); }
    uint64_t a = t[0] < t[2] ? t[0] : t[2], b = t[1] > t[3] ? t[1] : t[3];
    return (double)(b - a) / n;
}
int main(int argc, char **argv) {
    long n = atol(argv[1]); int reps = atoi(argv[2]), pin = atoi(argv[3]);
    char *m = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    for (int a = 4; a < argc; a++) {
        int k = atoi(argv[a]);
        long nk = (long)(n / (1.0 + k / 4.0));   /* about the same time per run at every spacing */
        uint64_t x = 1, t0 = now();
        x = work(x, k * 1000000);
        double alone = (double)(now() - t0) / 1e6 + (x == 42 ? 1e-9 : 0);
        double s[64], p[64];
        for (int r = 0; r < reps && r < 64; r++) { s[r] = run(m, 1, nk, k, pin); p[r] = run(m, 0, nk, k, pin); }
        qsort(s, reps, sizeof(double), cmp); qsort(p, reps, sizeof(double), cmp);
        printf("%d %.3f %.3f %.3f\n", k, alone, s[reps / 2], p[reps / 2]);
    }
    return 0;
}
"""


def cache_line_floor(
    steps: Tuple[int, ...] = (0, 4, 8, 12, 16, 24, 32, 48), n: int = 20_000_000, reps: int = 5
) -> List[dict]:
    """Run the C floor program (``n`` adds per process without spacing, fewer
    with, so every run takes about 0.1 s); one dict per spacing: ``work_ns`` (the work
    between two adds, alone), ``shared_ns`` / ``separate_ns`` (ns per add per
    process, both processes running) and ``ratio`` (separate over shared
    throughput).  Empty when no C compiler is found."""
    import shutil
    import subprocess
    import tempfile

    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        return []
    pin = "1" if peers.cpu_plan(2)[0] is not None else "0"
    with tempfile.TemporaryDirectory() as d:
        src, exe = os.path.join(d, "floor.c"), os.path.join(d, "floor")
        with open(src, "w") as f:
            f.write(_FLOOR_C)
        subprocess.run([cc, "-O2", "-o", exe, src], check=True, capture_output=True)
        out = subprocess.run(
            [exe, str(n), str(reps), pin, *map(str, steps)],
            check=True,
            capture_output=True,
            text=True,
            timeout=600,
        ).stdout
    rows = []
    for line in out.split("\n"):
        if line.strip():
            k, alone, sh, sep = line.split()
            rows.append(
                {
                    "steps": int(k),
                    "work_ns": float(alone),
                    "shared_ns": float(sh),
                    "separate_ns": float(sep),
                    "ratio": float(sh) / float(sep),
                }
            )
    return rows


def python_floor(n: int = 2_000_000, reps: int = 5) -> dict:
    """Medians (calls or adds per second, both processes together) of the
    call ceiling, the single shared cell and ShardedCounter, interleaved in one
    run, and the ratios that bound and measure the sharding's gain."""
    import statistics

    wl = Workload(n, 8)
    fns = {
        "ceiling": call_ceiling_2p,
        "single_cell": single_cell_2p,
        "sharded": ours_add_2p(None),
    }
    rates: dict = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            run = fn(wl)
            rates[k].append(run.count / run.seconds)
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {
        **{f"{k}_per_s": v for k, v in med.items()},
        "ns_per_call_per_process": 2e9 / med["ceiling"],
        "bound_vs_single_cell": med["ceiling"] / med["single_cell"],
        "sharded_vs_single_cell": med["sharded"] / med["single_cell"],
    }


def main() -> int:
    """Print the C floor and the Python floor of the 2-process ratio."""
    print(f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs")
    rows = cache_line_floor()
    if not rows:
        print("C floor: no C compiler (cc/gcc/clang) found; skipped")
    else:
        print(
            "C floor: 2 processes, lock add + W ns of other work per add (ns per add per process)"
        )
        print("     W   one line   separate lines   separate/one")
        for r in rows:
            print(
                f"{r['work_ns']:6.1f} {r['shared_ns']:10.1f} {r['separate_ns']:16.1f}"
                f" {r['ratio']:13.2f}x"
            )
    py = python_floor()
    print(
        "Python, 2 processes, one call per increment (M calls/s, both together):\n"
        f"  call ceiling (same call + checks, no write) {py['ceiling_per_s'] / 1e6:7.2f}"
        f"   ({py['ns_per_call_per_process']:.1f} ns per call per process)\n"
        f"  single shared cell (fetch_add)              {py['single_cell_per_s'] / 1e6:7.2f}\n"
        f"  ShardedCounter                              {py['sharded_per_s'] / 1e6:7.2f}\n"
        f"  bound on sharded / single cell: {py['bound_vs_single_cell']:.2f}x;"
        f" measured: {py['sharded_vs_single_cell']:.2f}x"
    )
    if rows:
        near = min(rows, key=lambda r: abs(r["work_ns"] - py["ns_per_call_per_process"]))
        print(
            f"C floor at the nearest spacing ({near['work_ns']:.0f} ns of work per add):"
            f" separate lines / one line = {near['ratio']:.2f}x"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
