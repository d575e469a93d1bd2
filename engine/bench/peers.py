"""Process plumbing for multi-process benchmark cases, and the peer
transports (multiprocessing, faster-fifo, pyzmq) the ring is measured against.

Every child runs ``fn(wl, barrier, *args)`` after pinning itself to a CPU; the
clock starts in the producer right after the start barrier (every process is
set up by then) and stops in each consumer after its last message. Children
digest what they received after stopping their clock and send back plain
tuples; the parent kills every child that is not done by the deadline, so a
lost message fails the case instead of hanging the run.

Producer functions return ``t0_ns``; consumer functions return
``(t_end_ns, count, checksum, in_order)``, or with a steady-state window
``(t_end_ns, count, checksum, in_order, t_warm_ns, n_warm)``: the consumer
stamps the clock once it holds its share of :func:`warm_count` messages, and
the window runs from there to its last message (start-up, connection set-up
and first-touch page faults stay outside it). Ping-pong pingers return
``(latencies_ns ndarray, count, checksum, in_order)``.

Every bounded transport gets the same buffer, :data:`BUFFER_BYTES`, smaller
than any sized workload, so a producer has to wait for its consumer.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import sys
import tempfile
import threading
import time
import traceback
import uuid
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np

from engine.bench.harness import Digest, Run, Workload, digest, digest_array
from engine.bench.machine import pin_thread

BATCH = 1024  # messages per put_many/get_many call, for every contender alike
BARRIER_TIMEOUT = 60.0
BUFFER_BYTES = 4 << 20  # every bounded buffer: our ring, faster-fifo, each pyzmq queue
FIFO_BYTES = BUFFER_BYTES  # faster-fifo buffer, the same size as our ring
# the largest buffer of any flow contender: pyzmq holds up to BUFFER_BYTES on
# each side (SNDHWM + RCVHWM), the case's volume rule counts both
FLOW_BUFFER_BYTES = 2 * BUFFER_BYTES
WARM_FRACTION = 10  # the first tenth of a stream (at most WARM_MAX messages) warms up
WARM_MAX = 200_000
WARMUP = 1000  # ping-pong round trips before the measured ones

ChildFn = Callable[..., Any]


# ---------------------------------------------------------------------------
# processes
# ---------------------------------------------------------------------------


def mp_context() -> Any:
    """fork on Linux (fast to start; children inherit the payloads), spawn
    elsewhere (macOS: fork is unsafe with system frameworks)."""
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    return mp.get_context(method)


PIN_ENV = "QE_BENCH_PIN"  # "0": never pin (queue-engine bench --no-pin)


def pinning() -> bool:
    """Whether benchmark processes pin themselves to CPUs (the default)."""
    return os.environ.get(PIN_ENV, "1") != "0"


def cpu_plan(n: int) -> List[Optional[int]]:
    """A CPU per process when there are at least ``n`` usable CPUs (one core
    each, no migrations: two processes on two cores stay on their own core,
    which makes runs repeatable); none otherwise (pinning two busy processes
    to one core would measure the scheduler, not the queue), or when
    :func:`pinning` is off."""
    if not pinning():
        return [None] * n
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return [None] * n
    if len(cpus) < n:
        return [None] * n
    return [cpus[i] for i in range(n)]


def _child(
    conn: Any, cpu: Optional[int], fn: ChildFn, wl: Workload, barrier: Any, args: tuple
) -> None:
    try:
        pin_thread(cpu)
        res = fn(wl, barrier, *args)
        conn.send(("ok", res))
    except BaseException as exc:  # reported to the parent, which fails the run
        try:
            barrier.abort()
        except Exception:
            pass
        conn.send(
            (
                "error",
                f"{fn.__name__}: {type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}",
            )
        )
    finally:
        conn.close()


def deadline_for(wl: Workload, per_second: float = 20_000.0) -> float:
    """Seconds a run may take before its children are killed: generous for
    the slowest peer (multiprocessing.Queue moves ~100k msg/s here)."""
    return 30.0 + wl.count / per_second + wl.nbytes / 50e6


def run_children(
    wl: Workload,
    roles: Sequence[Tuple[ChildFn, tuple]],
    timeout: Optional[float] = None,
) -> List[Any]:
    """Start one process per role (all behind one start barrier), return
    their results in role order; raise if any fails or the deadline passes."""
    ctx = mp_context()
    barrier = ctx.Barrier(len(roles))
    cpus = cpu_plan(len(roles))
    procs, conns = [], []
    timeout = deadline_for(wl) if timeout is None else timeout
    try:
        for i, (fn, args) in enumerate(roles):
            r, w = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_child, args=(w, cpus[i], fn, wl, barrier, args), daemon=True)
            p.start()
            w.close()
            procs.append(p)
            conns.append(r)
        deadline = time.monotonic() + timeout
        results: List[Any] = [None] * len(roles)
        pending = set(range(len(roles)))
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                names = ", ".join(roles[i][0].__name__ for i in sorted(pending))
                raise TimeoutError(f"no result after {timeout:.0f} s from {names} (lost messages?)")
            ready = mp.connection.wait([conns[i] for i in pending], timeout=min(left, 1.0))
            for c in ready:
                i = conns.index(c)
                try:
                    status, res = conns[i].recv()
                except EOFError:
                    raise RuntimeError(
                        f"{roles[i][0].__name__} died (exit code {procs[i].exitcode})"
                    ) from None
                if status != "ok":
                    raise RuntimeError(res)
                results[i] = res
                pending.discard(i)
        return results
    finally:
        for p in procs:
            p.join(timeout=2.0)
            if p.is_alive():
                p.kill()
                p.join()
        for c in conns:
            c.close()


def flow_run(
    wl: Workload,
    producer: Tuple[ChildFn, tuple],
    consumers: Sequence[Tuple[ChildFn, tuple]],
    timeout: Optional[float] = None,
) -> Run:
    """1 producer -> N consumers; time = last consumer end - producer start."""
    res = run_children(wl, [producer, *consumers], timeout)
    t0 = res[0]
    ends = res[1:]
    if len(ends) == 1:
        t1, count, checksum, in_order = ends[0][:4]
        d = Digest(count, checksum, in_order)
    else:
        d = Digest.combine(Digest(e[1], e[2], e[3]) for e in ends)
        t1 = max(e[0] for e in ends)
    window = None
    if all(len(e) == 6 for e in ends):
        # conservative for competing consumers: from the first consumer's
        # stamp, counting only what each received after its own stamp
        window = (min(e[4] for e in ends), sum(e[5] for e in ends))
    return Run.timed(t0, t1, d, window=window)


def pingpong_run(
    wl: Workload,
    pinger: Tuple[ChildFn, tuple],
    echo: Tuple[ChildFn, tuple],
    timeout: Optional[float] = None,
) -> Run:
    """Round trips: the pinger times each one and digests the echoes."""
    res = run_children(
        wl, [pinger, echo], timeout if timeout is not None else deadline_for(wl, 5_000.0)
    )
    lat, count, checksum, in_order = res[0]
    total = float(np.sum(lat)) / 1e9
    return Run(max(total, 1e-9), count, checksum, in_order, lat)


def warm_count(wl: Workload, n_consumers: int = 1) -> int:
    """Messages each of ``n_consumers`` receives before it stamps the start
    of its steady-state window."""
    return max(1, min(wl.count // WARM_FRACTION, WARM_MAX) // max(1, n_consumers))


def consumer_result(
    t1: int, received: Any, warm: Optional[Tuple[Optional[int], int]] = None
) -> Tuple[Any, ...]:
    """What a consumer child sends back (digest computed after its clock);
    ``warm=(t_warm_ns, n_warm)`` adds its window's start (``t_warm_ns`` None:
    the stream ended before the warm-up did, an empty window)."""
    d = digest(received)
    if warm is None:
        return (t1, d.count, d.checksum, d.in_order)
    t_w, n_w = warm
    if t_w is None:
        t_w, n_w = t1, d.count
    return (t1, d.count, d.checksum, d.in_order, t_w, n_w)


class RowSink:
    """Where an array consumer puts the rows it receives.

    One destination, allocated and touched before the clock starts: the timed
    region pays one copy per chunk and no page faults, and every array
    contender (ours and the peers) uses it alike. Rows beyond the workload
    (duplicates) are counted, not stored, so verification still sees them.
    """

    def __init__(self, wl: Workload) -> None:
        self.dst = np.empty((wl.count, wl.size), np.uint8)
        self.dst.fill(0)  # fault every page in now, not inside the clock
        self.n = 0
        self.extra = 0

    def add(self, rows: np.ndarray) -> None:
        k = len(rows)
        if k == 0:
            return
        room = len(self.dst) - self.n
        if k > room:
            self.extra += k - room
            k = room
        self.dst[self.n : self.n + k] = rows[:k]
        self.n += k

    def result(self, t1: int, warm: Optional[Tuple[Optional[int], int]] = None) -> Tuple[Any, ...]:
        d = digest_array(self.dst[: self.n])
        out: Tuple[Any, ...] = (t1, d.count + self.extra, d.checksum, d.in_order)
        if warm is not None:
            t_w, n_w = warm
            out += (t1, out[1]) if t_w is None else (t_w, n_w)
        return out


def ipc_endpoint() -> str:
    """A fresh ipc:// endpoint in a private temporary directory."""
    d = tempfile.gettempdir()
    return f"ipc://{d}/qe-bench-{os.getpid()}-{uuid.uuid4().hex[:10]}.sock"


def _remove_endpoint(ep: str) -> None:
    try:
        os.unlink(ep[len("ipc://") :])
    except OSError:
        pass


def chunks(seq: Sequence[Any], n: int = BATCH) -> List[Sequence[Any]]:
    return [seq[i : i + n] for i in range(0, len(seq), n)]


# ---------------------------------------------------------------------------
# threads (one process)
# ---------------------------------------------------------------------------


def thread_run(
    wl: Workload,
    produce: Callable[[Any], None],
    consume: Callable[[], List[Any]],
    timeout: Optional[float] = None,
) -> Run:
    """Producer and consumer threads behind a start barrier."""
    barrier = threading.Barrier(2)
    box: dict = {}
    # Linux applies sched_setaffinity(0, ...) to the calling thread only, so
    # each thread pins itself; elsewhere this is a no-op
    cpus = cpu_plan(2) if sys.platform.startswith("linux") else [None, None]

    def prod() -> None:
        try:
            pin_thread(cpus[0])
            barrier.wait(BARRIER_TIMEOUT)
            box["t0"] = time.perf_counter_ns()
            produce(box)
        except BaseException as exc:
            box["perr"] = exc

    def cons() -> None:
        try:
            pin_thread(cpus[1])
            barrier.wait(BARRIER_TIMEOUT)
            out = consume()
            box["t1"] = time.perf_counter_ns()
            box["out"] = out
        except BaseException as exc:
            box["cerr"] = exc

    tp = threading.Thread(target=prod, daemon=True, name="bench-producer")
    tc = threading.Thread(target=cons, daemon=True, name="bench-consumer")
    tp.start()
    tc.start()
    limit = deadline_for(wl) if timeout is None else timeout
    tc.join(limit)
    tp.join(max(0.1, limit - 0.0))
    if tc.is_alive():
        raise TimeoutError(f"consumer thread still running after {limit:.0f} s (lost messages?)")
    for key in ("perr", "cerr"):
        if key in box:
            raise box[key]
    out, window = box["out"], None
    if isinstance(out, tuple):  # (received, (t_warm_ns, n_warm))
        out, (t_w, n_w) = out
        window = (t_w, n_w) if t_w is not None else (box["t1"], len(out))
    return Run.timed(box["t0"], box["t1"], digest(out), window=window)


def _q_threads(factory: Callable[[], Any]) -> Callable[[Workload], Run]:
    def fn(wl: Workload) -> Run:
        q = factory()
        msgs = wl.payloads()

        def produce(_box: Any) -> None:
            put = q.put
            for m in msgs:
                put(m)
            put(None)

        def consume() -> Any:
            out: List[Any] = []
            get = q.get
            append = out.append
            for _ in range(warm_count(wl)):
                m = get()
                if m is None:
                    return out, (None, 0)
                append(m)
            t_w = time.perf_counter_ns()
            while True:
                m = get()
                if m is None:
                    return out, (t_w, warm_count(wl))
                append(m)

        return thread_run(wl, produce, consume)

    return fn


threads_queue = _q_threads(queue.Queue)
threads_simplequeue = _q_threads(queue.SimpleQueue)


def _identity(b: Any) -> Any:
    return b


def fifo_queue(max_size_bytes: int = FIFO_BYTES) -> Any:
    """A faster-fifo Queue moving raw bytes (no pickling: identity dumps,
    ``bytes`` loads, so it is measured on the same work as our ring)."""
    import faster_fifo  # type: ignore[import-not-found,unused-ignore]

    return faster_fifo.Queue(max_size_bytes=max_size_bytes, loads=bytes, dumps=_identity)


FIFO_END = b""  # end-of-stream marker (no workload message is empty)


def threads_faster_fifo(wl: Workload) -> Run:
    q = fifo_queue()
    msgs = wl.payloads()

    def produce(_box: Any) -> None:
        put = q.put
        for m in msgs:
            put(m, True, 30.0)
        put(FIFO_END, True, 30.0)

    def consume() -> Any:
        out: List[Any] = []
        get = q.get
        append = out.append
        for _ in range(warm_count(wl)):
            m = get(True, 30.0)
            if not m:
                return out, (None, 0)
            append(m)
        t_w = time.perf_counter_ns()
        while True:
            m = get(True, 30.0)
            if not m:
                return out, (t_w, warm_count(wl))
            append(m)

    return thread_run(wl, produce, consume)


# ---------------------------------------------------------------------------
# multiprocessing.Queue
# ---------------------------------------------------------------------------


def _mpq_producer(wl: Workload, barrier: Any, q: Any, n_consumers: int, batch: int) -> int:
    msgs = wl.payloads()
    barrier.wait(BARRIER_TIMEOUT)
    t0 = time.perf_counter_ns()
    put = q.put
    if batch:
        for ch in chunks(msgs, batch):
            put(list(ch))
    else:
        for m in msgs:
            put(m)
    for _ in range(n_consumers):
        put(None)
    q.close()
    q.join_thread()
    return t0


def _mpq_consumer(wl: Workload, barrier: Any, q: Any, batch: int, n_consumers: int) -> Any:
    barrier.wait(BARRIER_TIMEOUT)
    out: List[Any] = []
    get = q.get
    append = out.append
    warm = warm_count(wl, n_consumers)
    t_w: Optional[int] = None
    n_w = 0
    while True:
        if t_w is None and len(out) >= warm:
            t_w, n_w = time.perf_counter_ns(), len(out)
        m = get(timeout=30.0)
        if m is None:
            break
        if batch:
            out.extend(m)
        else:
            append(m)
    t1 = time.perf_counter_ns()
    return consumer_result(t1, out, (t_w, n_w))


def procs_mpqueue(n_consumers: int = 1) -> Callable[[Workload], Run]:
    def fn(wl: Workload) -> Run:
        q = mp_context().Queue()
        return flow_run(
            wl,
            (_mpq_producer, (q, n_consumers, 0)),
            [(_mpq_consumer, (q, 0, n_consumers))] * n_consumers,
        )

    return fn


# numpy batches pickled through multiprocessing.Queue: the usual way to ship arrays
def _mpq_array_producer(wl: Workload, barrier: Any, q: Any, rows: int) -> int:
    arr = wl.array()
    barrier.wait(BARRIER_TIMEOUT)
    t0 = time.perf_counter_ns()
    for i in range(0, len(arr), rows):
        q.put(arr[i : i + rows])
    q.put(None)
    q.close()
    q.join_thread()
    return t0


def _mpq_array_consumer(wl: Workload, barrier: Any, q: Any) -> Any:
    sink = RowSink(wl)
    warm = warm_count(wl)
    t_w: Optional[int] = None
    n_w = 0
    barrier.wait(BARRIER_TIMEOUT)
    while True:
        if t_w is None and sink.n >= warm:
            t_w, n_w = time.perf_counter_ns(), sink.n
        a = q.get(timeout=30.0)
        if a is None:
            break
        sink.add(a)
    t1 = time.perf_counter_ns()
    return sink.result(t1, (t_w, n_w))


def procs_mpqueue_array(rows: int = 8192) -> Callable[[Workload], Run]:
    def fn(wl: Workload) -> Run:
        q = mp_context().Queue()
        return flow_run(wl, (_mpq_array_producer, (q, rows)), [(_mpq_array_consumer, (q,))])

    return fn


# ---------------------------------------------------------------------------
# faster-fifo (raw bytes)
# ---------------------------------------------------------------------------


def _ff_producer(wl: Workload, barrier: Any, q: Any, n_consumers: int, batch: int) -> int:
    msgs = wl.payloads()
    # batches built before the clock: slicing the inherited payload list in
    # the forked child copy-on-writes every message page (a cost of fork, not
    # of the transport; engine.bench.ring does the same for ours)
    batches = chunks(msgs, batch) if batch else []
    barrier.wait(BARRIER_TIMEOUT)
    t0 = time.perf_counter_ns()
    if batch:
        put_many = q.put_many
        for ch in batches:
            put_many(ch, True, 30.0)
    else:
        put = q.put
        for m in msgs:
            put(m, True, 30.0)
    for _ in range(n_consumers):
        q.put(FIFO_END, True, 30.0)
    return t0


def _ff_consumer(wl: Workload, barrier: Any, q: Any, batch: int, n_consumers: int) -> Any:
    barrier.wait(BARRIER_TIMEOUT)
    out: List[Any] = []
    warm = warm_count(wl, n_consumers)
    t_w: Optional[int] = None
    n_w = 0
    if batch:
        get_many = q.get_many
        done = False
        while not done:
            if t_w is None and len(out) >= warm:
                t_w, n_w = time.perf_counter_ns(), len(out)
            got = get_many(True, 30.0, batch)
            for j, m in enumerate(got):
                if not m:
                    # the end markers are the producer's last messages: hand
                    # back any that belong to the other consumers
                    done = True
                    for _ in range(len(got) - j - 1):
                        q.put(FIFO_END, True, 30.0)
                    break
                out.append(m)
    else:
        get = q.get
        append = out.append
        for _ in range(warm):
            m = get(True, 30.0)
            if not m:
                break
            append(m)
        else:
            t_w, n_w = time.perf_counter_ns(), warm
            while True:
                m = get(True, 30.0)
                if not m:
                    break
                append(m)
    t1 = time.perf_counter_ns()
    return consumer_result(t1, out, (t_w, n_w))


def procs_faster_fifo(
    n_consumers: int = 1, batch: int = 0, get_batch: Optional[int] = None
) -> Callable[[Workload], Run]:
    """faster-fifo across processes: ``batch`` messages per ``put_many`` (0:
    one ``put`` each) and up to ``get_batch`` per ``get_many`` (default
    ``batch``; 0: one ``get`` each). faster-fifo's README recommends
    ``get_many`` on the consumer side: one lock and one wake-up per batch."""
    gb = batch if get_batch is None else get_batch

    def fn(wl: Workload) -> Run:
        q = fifo_queue()
        return flow_run(
            wl,
            (_ff_producer, (q, n_consumers, batch)),
            [(_ff_consumer, (q, gb, n_consumers))] * n_consumers,
        )

    return fn


def _ff_array_producer(wl: Workload, barrier: Any, q: Any, rows: int) -> int:
    arr = wl.array()
    barrier.wait(BARRIER_TIMEOUT)
    t0 = time.perf_counter_ns()
    for i in range(0, len(arr), rows):
        q.put(arr[i : i + rows].tobytes(), True, 30.0)
    q.put(FIFO_END, True, 30.0)
    return t0


def _ff_array_consumer(wl: Workload, barrier: Any, q: Any) -> Any:
    sink = RowSink(wl)
    warm = warm_count(wl)
    t_w: Optional[int] = None
    n_w = 0
    barrier.wait(BARRIER_TIMEOUT)
    while True:
        if t_w is None and sink.n >= warm:
            t_w, n_w = time.perf_counter_ns(), sink.n
        b = q.get(True, 30.0)
        if not b:
            break
        sink.add(np.frombuffer(b, np.uint8).reshape(-1, wl.size))
    t1 = time.perf_counter_ns()
    return sink.result(t1, (t_w, n_w))


def procs_faster_fifo_array(rows: int = 8192) -> Callable[[Workload], Run]:
    """Rows shipped as raw byte blocks of ``rows`` rows through faster-fifo."""

    def fn(wl: Workload) -> Run:
        q = fifo_queue()
        return flow_run(wl, (_ff_array_producer, (q, rows)), [(_ff_array_consumer, (q,))])

    return fn


# ---------------------------------------------------------------------------
# pyzmq PUSH/PULL over ipc://
# ---------------------------------------------------------------------------


def zmq_tune(s: Any, size: int) -> None:
    """pyzmq's throughput settings (the zguide and pyzmq docs): high-water
    marks that hold :data:`BUFFER_BYTES` of messages on each side instead of
    the default 1,000 messages, so the pipe never idles on a full queue."""
    import zmq

    hwm = max(1000, BUFFER_BYTES // max(1, size))
    s.setsockopt(zmq.SNDHWM, hwm)
    s.setsockopt(zmq.RCVHWM, hwm)


def zmq_zero_copy(size: int) -> bool:
    """Zero-copy only where it helps: pyzmq copies below its
    ``COPY_THRESHOLD`` (64 KiB) anyway, and for small messages the copy is
    cheaper than tracking a frame (pyzmq docs, "Performance")."""
    import zmq

    return size >= getattr(zmq, "COPY_THRESHOLD", 65536)


def _zmq_producer(
    wl: Workload, barrier: Any, ep: str, bound: Any, done: Any, n_consumers: int
) -> int:
    import zmq

    ctx = zmq.Context()
    s = ctx.socket(zmq.PUSH)
    s.setsockopt(zmq.LINGER, 5000)
    zmq_tune(s, wl.size)
    s.bind(ep)
    bound.set()
    msgs = wl.payloads()
    try:
        barrier.wait(BARRIER_TIMEOUT)
        t0 = time.perf_counter_ns()
        if zmq_zero_copy(wl.size):
            send = s.send
            for m in msgs:
                send(m, copy=False)
        else:
            send = s.send
            for m in msgs:
                send(m)
        # PUSH round-robins, so one consumer may get two end markers: repeat
        # them until every consumer reported done (extra ones are dropped)
        end = time.monotonic() + 30.0
        while done.value < n_consumers and time.monotonic() < end:
            try:
                s.send(b"", zmq.NOBLOCK)
            except zmq.Again:
                pass
            time.sleep(0.0005 if n_consumers > 1 else 0.05)
        return t0
    finally:
        s.close(linger=0)
        ctx.term()


def _zmq_consumer(
    wl: Workload, barrier: Any, ep: str, bound: Any, done: Any, n_consumers: int = 1
) -> Any:
    import zmq

    ctx = zmq.Context()
    s = ctx.socket(zmq.PULL)
    s.setsockopt(zmq.RCVTIMEO, 30_000)
    zmq_tune(s, wl.size)
    zero_copy = zmq_zero_copy(wl.size)
    warm = warm_count(wl, n_consumers)
    t_w: Optional[int] = None
    n_w = 0
    try:
        if not bound.wait(BARRIER_TIMEOUT):
            raise TimeoutError("producer never bound")
        s.connect(ep)
        time.sleep(0.05)  # let the connection complete before the clock starts
        barrier.wait(BARRIER_TIMEOUT)
        out: List[Any] = []
        recv = s.recv
        append = out.append
        if zero_copy:
            while True:
                if t_w is None and len(out) >= warm:
                    t_w, n_w = time.perf_counter_ns(), len(out)
                f = recv(copy=False)
                if not len(f):
                    break
                append(f.buffer)
        else:
            for _ in range(warm):
                m = recv()
                if not m:
                    break
                append(m)
            else:
                t_w, n_w = time.perf_counter_ns(), warm
                while True:
                    m = recv()
                    if not m:
                        break
                    append(m)
        t1 = time.perf_counter_ns()
        with done.get_lock():
            done.value += 1
        return consumer_result(t1, out, (t_w, n_w))
    finally:
        s.close(linger=0)
        ctx.term()


def procs_zmq(n_consumers: int = 1) -> Callable[[Workload], Run]:
    def fn(wl: Workload) -> Run:
        ctx = mp_context()
        ep = ipc_endpoint()
        bound = ctx.Event()
        done = ctx.Value("i", 0)
        try:
            return flow_run(
                wl,
                (_zmq_producer, (ep, bound, done, n_consumers)),
                [(_zmq_consumer, (ep, bound, done, n_consumers))] * n_consumers,
            )
        finally:
            _remove_endpoint(ep)

    return fn


# ---------------------------------------------------------------------------
# ping-pong round trips (one pinger process, one echo process)
# ---------------------------------------------------------------------------


def _pingpong(
    wl: Workload, barrier: Any, send: Callable[[Any], Any], recv: Callable[[], Any]
) -> Tuple[np.ndarray, int, int, Optional[bool]]:
    msgs = wl.payloads()
    barrier.wait(BARRIER_TIMEOUT)
    warm = msgs[0]
    for _ in range(WARMUP):
        send(warm)
        if recv() != warm:
            raise RuntimeError("warm-up echo differs")
    lat = np.empty(len(msgs), np.int64)
    out: List[Any] = []
    append = out.append
    now = time.perf_counter_ns
    for i, m in enumerate(msgs):
        t = now()
        send(m)
        r = recv()
        lat[i] = now() - t
        append(r)
    d = digest(out)
    return (lat, d.count, d.checksum, d.in_order)


def _echo(wl: Workload, barrier: Any, send: Callable[[Any], Any], recv: Callable[[], Any]) -> None:
    barrier.wait(BARRIER_TIMEOUT)
    for _ in range(WARMUP + wl.count):
        send(recv())


def _pipe_ping(wl: Workload, barrier: Any, conn: Any) -> Any:
    return _pingpong(wl, barrier, conn.send_bytes, conn.recv_bytes)


def _pipe_echo(wl: Workload, barrier: Any, conn: Any) -> None:
    _echo(wl, barrier, conn.send_bytes, conn.recv_bytes)


def pingpong_pipe(wl: Workload) -> Run:
    a, b = mp_context().Pipe(duplex=True)
    try:
        return pingpong_run(wl, (_pipe_ping, (a,)), (_pipe_echo, (b,)))
    finally:
        a.close()
        b.close()


def _mpq_ping(wl: Workload, barrier: Any, qa: Any, qb: Any) -> Any:
    return _pingpong(wl, barrier, qa.put, lambda: qb.get(timeout=30.0))


def _mpq_echo(wl: Workload, barrier: Any, qa: Any, qb: Any) -> None:
    _echo(wl, barrier, qb.put, lambda: qa.get(timeout=30.0))


def pingpong_mpqueue(wl: Workload) -> Run:
    ctx = mp_context()
    qa, qb = ctx.Queue(), ctx.Queue()
    return pingpong_run(wl, (_mpq_ping, (qa, qb)), (_mpq_echo, (qa, qb)))


def _ff_ping(wl: Workload, barrier: Any, qa: Any, qb: Any) -> Any:
    return _pingpong(wl, barrier, lambda m: qa.put(m, True, 30.0), lambda: qb.get(True, 30.0))


def _ff_echo(wl: Workload, barrier: Any, qa: Any, qb: Any) -> None:
    _echo(wl, barrier, lambda m: qb.put(m, True, 30.0), lambda: qa.get(True, 30.0))


def pingpong_faster_fifo(wl: Workload) -> Run:
    qa, qb = fifo_queue(1 << 20), fifo_queue(1 << 20)
    return pingpong_run(wl, (_ff_ping, (qa, qb)), (_ff_echo, (qa, qb)))


def _zmq_pair(ep: str, bind: bool, bound: Any) -> Tuple[Any, Any]:
    import zmq

    ctx = zmq.Context()
    s = ctx.socket(zmq.PAIR)
    s.setsockopt(zmq.RCVTIMEO, 30_000)
    s.setsockopt(zmq.LINGER, 0)
    if bind:
        s.bind(ep)
        bound.set()
    else:
        if not bound.wait(BARRIER_TIMEOUT):
            raise TimeoutError("pinger never bound")
        s.connect(ep)
    return ctx, s


def _zmq_ping(wl: Workload, barrier: Any, ep: str, bound: Any) -> Any:
    ctx, s = _zmq_pair(ep, True, bound)
    try:
        return _pingpong(wl, barrier, s.send, s.recv)
    finally:
        s.close(linger=0)
        ctx.term()


def _zmq_echo(wl: Workload, barrier: Any, ep: str, bound: Any) -> None:
    ctx, s = _zmq_pair(ep, False, bound)
    try:
        _echo(wl, barrier, s.send, s.recv)
    finally:
        s.close(linger=0)
        ctx.term()


def pingpong_zmq(wl: Workload) -> Run:
    ep = ipc_endpoint()
    bound = mp_context().Event()
    try:
        return pingpong_run(wl, (_zmq_ping, (ep, bound)), (_zmq_echo, (ep, bound)))
    finally:
        _remove_endpoint(ep)
