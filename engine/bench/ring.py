"""The ring section: engine.Ring against queue.Queue, queue.SimpleQueue,
multiprocessing.Queue/Pipe, faster-fifo and pyzmq on the same workload.

Every bounded contender gets the same 4 MiB buffer (``peers.BUFFER_BYTES``),
and every throughput run is a steady-state window (see
:mod:`engine.bench.harness`): the counts below are where sizing starts, and
each contender's workload grows until its window lasts ~0.4 s.

Cases, 64-byte messages (starting count quick / --full): threads 1->1 (20k /
1M); processes 1->1 single put/get (30k / 1M), faster-fifo also with its
``get_many`` consumer; processes 1->1 batch (put_many/get_many, 1024 per call
for every contender, the batches built before the clock for both); processes
1->2 competing consumers; put_array/get_array rows (1M / 4M); cross-process
ping-pong round-trip latency (10k / 100k round trips: even the quick run's
slowest peer answers for over 0.25 s, so both profiles sample the same steady
wake-up latency). The quick profile runs
the ``QUICK`` cases; --full adds the rest, a message-size sweep (1 B-64 KiB,
processes 1->1) and a consumer-count sweep (1-4, mode="shared") for the plots.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np

from engine.bench import peers
from engine.bench.harness import (
    BUILD_HINT,
    LATENCY,
    THROUGHPUT,
    Case,
    Contender,
    Profile,
    Run,
    Target,
    Workload,
)
from engine.bench.peers import BARRIER_TIMEOUT, BATCH, BUFFER_BYTES, FLOW_BUFFER_BYTES

SECTION = "ring"
# the cases the quick profile runs (fewer cases, never shorter windows); --full runs all
QUICK = (
    "processes 1->1 put/get",
    "processes 1->1 batch",
    "processes 1->1 arrays",
    "ping-pong round trip",
)

RING = ("engine._ring",)
FF = ("faster_fifo",)
ZMQ = ("zmq",)
CAPACITY = BUFFER_BYTES  # 4 MiB, the buffer every peer gets (smaller than any sized workload)
ARRAY_ROWS = 8192  # rows per put_array / get_array call (and per peer block)
SIZES = (1, 8, 64, 512, 4096, 16384, 65536)
CONSUMERS = (1, 2, 3, 4)


def _ring_name() -> str:
    return f"qe-bench-{os.getpid()}-{uuid.uuid4().hex[:10]}"


class _SharedRing:
    """A named ring for one run, unlinked whatever happens."""

    def __init__(self, mode: str = "spsc", consumers: int = 1, capacity: int = CAPACITY) -> None:
        from engine import Ring

        self.name = _ring_name()
        self.ring = Ring.create(self.name, capacity=capacity, mode=mode, max_consumers=consumers)

    def __enter__(self) -> str:
        return self.name

    def __exit__(self, *exc: Any) -> None:
        from engine import Ring

        try:
            self.ring.close()
        finally:
            try:
                Ring.unlink(self.name)
            except Exception:
                pass


def _batches(msgs: List[bytes]) -> List[Sequence[bytes]]:
    """The batch case's input: the payloads as lists of ``BATCH`` messages.

    Every batch producer (ours and faster-fifo's) builds them before the
    start barrier, like the payloads themselves: the payload list is
    inherited from the parent, and slicing it in the forked child increfs
    every message, which copy-on-writes every page of them (~30k page copies
    for 1M messages, ~100 ms on a 2-core VM, before the first put_many could
    run). That is a cost of fork, not of either transport; a program that
    calls put_many has its list already.
    """
    return peers.chunks(msgs, BATCH)


# ---------------------------------------------------------------------------
# ours: child roles
# ---------------------------------------------------------------------------


def _ours_producer(wl: Workload, barrier: Any, name: str, how: str) -> int:
    from engine import Ring

    ring = Ring.attach(name)
    p = ring.producer()
    msgs = wl.payloads() if how != "array" else None
    arr = wl.array() if how == "array" else None
    # the batches are workload, built before the clock (see _batches)
    batches = _batches(msgs) if how == "many" else None  # type: ignore[arg-type]
    barrier.wait(BARRIER_TIMEOUT)
    t0 = time.perf_counter_ns()
    if how == "single":
        put = p.put
        for m in msgs:  # type: ignore[union-attr]
            put(m)
    elif how == "many":
        put_many = p.put_many
        for ch in batches:  # type: ignore[union-attr]
            put_many(ch)
    else:
        put_array = p.put_array
        for i in range(0, len(arr), ARRAY_ROWS):  # type: ignore[arg-type]
            put_array(arr[i : i + ARRAY_ROWS])  # type: ignore[index]
    p.close()
    ring.close()
    return t0


def _ours_consumer(
    wl: Workload, barrier: Any, name: str, how: str, n_consumers: int = 1
) -> Tuple[Any, ...]:
    from engine import Closed, Ring

    ring = Ring.attach(name)
    c = ring.consumer()
    sink = peers.RowSink(wl) if how == "array" else None
    warm = peers.warm_count(wl, n_consumers)
    t_w: Optional[int] = None
    n_w = 0
    barrier.wait(BARRIER_TIMEOUT)
    if sink is not None:
        get_array = c.get_array
        add = sink.add
        try:
            while sink.n < warm:
                add(get_array(ARRAY_ROWS, np.uint8, None))
            t_w, n_w = time.perf_counter_ns(), sink.n
            while True:
                add(get_array(ARRAY_ROWS, np.uint8, None))
        except Closed:
            pass
        t1 = time.perf_counter_ns()
        c.close()
        ring.close()
        return sink.result(t1, (t_w, n_w))
    out: List[Any] = []
    try:
        if how == "single":
            get = c.get
            append = out.append
            for _ in range(warm):
                append(get())
            t_w, n_w = time.perf_counter_ns(), warm
            while True:
                append(get())
        else:
            get_many = c.get_many
            extend = out.extend
            while len(out) < warm:
                extend(get_many(BATCH, None))
            t_w, n_w = time.perf_counter_ns(), len(out)
            while True:
                extend(get_many(BATCH, None))
    except Closed:
        pass
    t1 = time.perf_counter_ns()
    c.close()
    ring.close()
    return peers.consumer_result(t1, out, (t_w, n_w))


def ours_procs(
    how: str = "single", n_consumers: int = 1, mode: Optional[str] = None
) -> Callable[[Workload], Run]:
    """Our ring across processes: ``how`` is single put/get, ``many``
    (put_many/get_many) or ``array``; spsc for one consumer, else shared."""
    mode = mode or ("spsc" if n_consumers == 1 else "shared")

    def fn(wl: Workload) -> Run:
        with _SharedRing(mode, n_consumers) as name:
            return peers.flow_run(
                wl,
                (_ours_producer, (name, how)),
                [(_ours_consumer, (name, how, n_consumers))] * n_consumers,
            )

    return fn


def ours_threads(wl: Workload) -> Run:
    from engine import Closed, Ring

    ring = Ring(capacity=CAPACITY, mode="spsc")
    p = ring.producer()
    c = ring.consumer()
    msgs = wl.payloads()

    def produce(_box: Any) -> None:
        put = p.put
        for m in msgs:
            put(m)
        p.close()

    def consume() -> Any:
        out: List[Any] = []
        get = c.get
        append = out.append
        t_w: Optional[int] = None
        try:
            for _ in range(peers.warm_count(wl)):
                append(get())
            t_w = time.perf_counter_ns()
            while True:
                append(get())
        except Closed:
            return out, (t_w, peers.warm_count(wl))

    try:
        return peers.thread_run(wl, produce, consume)
    finally:
        ring.close()


# ping-pong: two spsc rings, a (ping) and b (pong)
def _ours_ping(wl: Workload, barrier: Any, a: str, b: str) -> Any:
    from engine import Ring

    ra, rb = Ring.attach(a), Ring.attach(b)
    p, c = ra.producer(), rb.consumer()
    try:
        return peers._pingpong(wl, barrier, p.put, c.get)
    finally:
        p.close()
        c.close()
        ra.close()
        rb.close()


def _ours_echo(wl: Workload, barrier: Any, a: str, b: str) -> None:
    from engine import Ring

    ra, rb = Ring.attach(a), Ring.attach(b)
    c, p = ra.consumer(), rb.producer()
    try:
        peers._echo(wl, barrier, p.put, c.get)
    finally:
        p.close()
        c.close()
        ra.close()
        rb.close()


def ours_pingpong(wl: Workload) -> Run:
    with _SharedRing(capacity=1 << 16) as a, _SharedRing(capacity=1 << 16) as b:
        # the consumers register before the barrier; the echo registers on a
        return peers.pingpong_run(wl, (_ours_ping, (a, b)), (_ours_echo, (a, b)))


# ---------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------


def _flow_contenders(n_consumers: int = 1, shared: bool = False) -> List[Contender]:
    mode = "shared" if (shared or n_consumers > 1) else "spsc"
    suffix = ' (mode="shared")' if mode == "shared" else ""
    return [
        Contender(
            "engine.Ring" + suffix,
            ours_procs("single", n_consumers, mode),
            ours=True,
            requires=RING,
            pip_hint=BUILD_HINT,
        ),
        Contender("multiprocessing.Queue", peers.procs_mpqueue(n_consumers)),
        Contender("faster-fifo", peers.procs_faster_fifo(n_consumers), requires=FF),
        # faster-fifo at its best: single puts, its get_many on the consumer side
        Contender(
            "faster-fifo put + get_many",
            peers.procs_faster_fifo(n_consumers, 0, BATCH),
            requires=FF,
        ),
        Contender("pyzmq PUSH/PULL ipc", peers.procs_zmq(n_consumers), requires=ZMQ),
    ]


def cases(profile: Profile) -> List[Case]:
    """Every ring case for this profile."""
    # the starting count: the harness's warm-up grows each contender's
    # workload until its window lasts ~0.4 s, in quick and --full alike
    n = profile.count(quick=30_000, full=1_000_000)
    size = 64
    wl = Workload(n, size)
    out = [
        Case(
            "threads 1->1",
            "one producer thread, one consumer thread, put/get",
            THROUGHPUT,
            # faster-fifo and queue.Queue move < 100k msg/s between threads:
            # a smaller quick count keeps them from dominating the quick suite
            Workload(profile.count(quick=20_000, full=1_000_000), size),
            [
                Contender(
                    "engine.Ring", ours_threads, ours=True, requires=RING, pip_hint=BUILD_HINT
                ),
                Contender("queue.Queue", peers.threads_queue),
                Contender("queue.SimpleQueue", peers.threads_simplequeue),
                Contender("faster-fifo", peers.threads_faster_fifo, requires=FF),
            ],
            buffer_bytes=BUFFER_BYTES,
        ),
        Case(
            "processes 1->1 put/get",
            "one producer process, one consumer process, one message per call",
            THROUGHPUT,
            wl,
            _flow_contenders(1),
            buffer_bytes=FLOW_BUFFER_BYTES,
            targets=[
                Target("ratio", 25, "multiprocessing.Queue"),
                Target("ratio", 3, "pyzmq PUSH/PULL ipc"),
            ],
        ),
        Case(
            "processes 1->1 batch",
            f"put_many/get_many, {BATCH} messages per call, raw bytes, batches built before the clock",
            THROUGHPUT,
            wl,
            [
                Contender(
                    "engine.Ring put_many/get_many",
                    ours_procs("many"),
                    ours=True,
                    requires=RING,
                    pip_hint=BUILD_HINT,
                ),
                Contender(
                    "faster-fifo put_many/get_many", peers.procs_faster_fifo(1, BATCH), requires=FF
                ),
            ],
            buffer_bytes=BUFFER_BYTES,
            targets=[Target("ratio", 10, "faster-fifo put_many/get_many")],
        ),
        Case(
            "processes 1->2 competing",
            "one producer, two competing consumers: every message to exactly one",
            THROUGHPUT,
            # the slowest peers pay for two consumers on two cores: half the
            # quick count
            Workload(profile.count(quick=15_000, full=1_000_000), size),
            _flow_contenders(2),
            ordered=False,
            buffer_bytes=FLOW_BUFFER_BYTES,
        ),
        Case(
            "processes 1->1 arrays",
            f"64-byte rows, {ARRAY_ROWS} rows per call",
            THROUGHPUT,
            Workload(profile.count(quick=1_000_000, full=4_000_000), size),
            [
                Contender(
                    "engine.Ring put_array/get_array",
                    ours_procs("array"),
                    ours=True,
                    requires=RING,
                    pip_hint=BUILD_HINT,
                ),
                Contender(
                    "faster-fifo row blocks", peers.procs_faster_fifo_array(ARRAY_ROWS), requires=FF
                ),
                Contender("multiprocessing.Queue ndarray", peers.procs_mpqueue_array(ARRAY_ROWS)),
            ],
            unit="MB/s",
            buffer_bytes=BUFFER_BYTES,
            # rows travel as one array of unique rows (loss, duplication and order
            # stay checkable), held by the producer and again by the consumer's
            # sink: 512 MiB keeps a default run within a laptop's memory. At GB/s
            # that is a 0.1-0.2 s window, valid by the volume rule (128x the
            # 4 MiB buffers); short windows swing with the scheduler, so this
            # case runs more repetitions for a steady median (the quick profile
            # three, the first of them its last sizing run: each costs ~1 s of
            # 512 MiB copies and digests for a 0.1 s window)
            max_bytes=512 << 20,
            repeat=profile.reps(quick=3, full=7),
            targets=[Target("min_mb_per_s", 2000)],
        ),
        Case(
            "ping-pong round trip",
            "cross-process round trip of one 64-byte message, waiter spinning",
            LATENCY,
            Workload(
                profile.count(quick=10_000, full=100_000)
                if profile.messages is None
                else max(1, n // 10),
                size,
            ),
            [
                Contender(
                    "engine.Ring (2 spsc rings)",
                    ours_pingpong,
                    ours=True,
                    requires=RING,
                    pip_hint=BUILD_HINT,
                ),
                Contender("multiprocessing.Pipe", peers.pingpong_pipe),
                Contender("multiprocessing.Queue pair", peers.pingpong_mpqueue),
                Contender("pyzmq PAIR ipc", peers.pingpong_zmq, requires=ZMQ),
                Contender("faster-fifo pair", peers.pingpong_faster_fifo, requires=FF),
            ],
            unit="us",
            targets=[Target("max_p50_ns", 5000)],
        ),
    ]
    if profile.full:
        budget = 256 << 20  # bytes per size-sweep case: 64 KiB messages -> 4096 of them
        for s in SIZES:
            cnt = max(1000, min(profile.count(quick=100_000, full=100_000), budget // s))
            out.append(
                Case(
                    f"size sweep {s} B",
                    f"processes 1->1 put/get, {s}-byte messages",
                    THROUGHPUT,
                    Workload(cnt, s),
                    _flow_contenders(1),
                    buffer_bytes=FLOW_BUFFER_BYTES,
                    repeat=profile.reps(quick=3, full=3),
                    params={"sweep": "size", "x": s, "group": "ring processes 1->1"},
                )
            )
        for k in CONSUMERS:
            out.append(
                Case(
                    f"consumer sweep 1->{k}",
                    f"one producer, {k} competing consumer process(es)",
                    THROUGHPUT,
                    Workload(profile.count(quick=100_000, full=100_000), size),
                    _flow_contenders(k, shared=True),
                    ordered=k == 1,
                    buffer_bytes=FLOW_BUFFER_BYTES,
                    repeat=profile.reps(quick=3, full=3),
                    params={"sweep": "consumers", "x": k, "group": "ring processes 1->N"},
                )
            )
    return out
