"""The aio section: an asyncio service answering requests.

Case: async round trip, 64-byte messages (quick 2k / --full 50k round trips).
A plain (blocking) pinger process sends one message and waits for the reply;
the echo process runs an asyncio loop that awaits the message and answers it.
Contenders differ only in the transport and in how the echo awaits:

* ``engine.Ring aget``: two spsc rings; the echo ``await c.aget()`` (the
  ``engine.aio`` waiter thread) and replies with ``p.put``;
* ``asyncio Unix socket streams``: a socketpair, the echo uses
  ``asyncio.open_unix_connection(sock=...)`` (``readexactly`` / ``write`` +
  ``drain``), the pinger a blocking socket;
* ``pyzmq asyncio PAIR ipc``: the echo uses ``zmq.asyncio`` (``await
  recv()`` / ``await send()``), the pinger a blocking zmq PAIR socket.

The echo always awaits with nothing ready (the pinger sends only after the
previous reply). Ours: the waiter thread spins ~50 us in ``Consumer.wait``
(GIL released, as a blocking ``get`` does) before it sleeps on the futex, so
a request that comes within that window skips the futex wake-up; one that
comes later pays it (the p90/p99 columns).
Target: our p50 at least 2x better than the Unix-socket pair.

Case: delayed delivery, awaited (quick 60 / --full 1,000 messages, each due
5 ms after its put): how late an awaited delayed message arrives, ours
(``KeyedQueue`` in shared memory, ``aio.aget``) against what one process
would write with asyncio alone (``loop.call_later`` + ``asyncio.Queue``).
"""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
import time
import uuid
from typing import Any, List

import numpy as np

from engine.bench import peers
from engine.bench.harness import (
    BUILD_HINT,
    LATENCY,
    Case,
    Contender,
    Profile,
    Run,
    Target,
    Workload,
    digest,
)
from engine.bench.peers import BARRIER_TIMEOUT, WARMUP

SECTION = "aio"
# the cases the quick profile runs (fewer cases, never shorter windows); --full runs all
QUICK = ("async round trip",)

RING = ("engine._ring",)
ZMQ = ("zmq",)
SIZE = 64
REPLY_TIMEOUT = 30.0  # a lost message fails the run instead of hanging it


def _ring_name() -> str:
    return f"qe-bench-aio-{os.getpid()}-{uuid.uuid4().hex[:10]}"


def _new_loop() -> asyncio.AbstractEventLoop:
    return asyncio.new_event_loop()


def _pingpong(wl: Workload, barrier: Any, send: Any, recv: Any, gap: float) -> Any:
    """peers._pingpong, with ``gap`` seconds of silence before each request
    (outside the clock) when ``gap > 0``: the echo is then asleep when the
    request comes, so every sample pays the full wake-up path."""
    if gap <= 0:
        return peers._pingpong(wl, barrier, send, recv)
    msgs = wl.payloads()
    barrier.wait(BARRIER_TIMEOUT)
    warm = msgs[0]
    for _ in range(WARMUP):
        send(warm)
        if recv() != warm:
            raise RuntimeError("warm-up echo differs")
    lat = np.empty(len(msgs), np.int64)
    out: List[Any] = []
    now = time.perf_counter_ns
    for i, m in enumerate(msgs):
        time.sleep(gap)
        t = now()
        send(m)
        r = recv()
        lat[i] = now() - t
        out.append(r)
    d = digest(out)
    return (lat, d.count, d.checksum, d.in_order)


# ---------------------------------------------------------------- engine.Ring


def _ring_ping(wl: Workload, barrier: Any, a: str, b: str, gap: float) -> Any:
    from engine import Ring

    ra, rb = Ring.attach(a), Ring.attach(b)
    p, c = ra.producer(), rb.consumer()
    try:
        return _pingpong(wl, barrier, p.put, lambda: c.get(REPLY_TIMEOUT), gap)
    finally:
        p.close()
        c.close()
        ra.close()
        rb.close()


def _ring_echo(wl: Workload, barrier: Any, a: str, b: str, gap: float) -> None:
    from engine import Ring

    ra, rb = Ring.attach(a), Ring.attach(b)
    c, p = ra.consumer(), rb.producer()

    async def serve() -> None:
        aget, put = c.aget, p.put
        for _ in range(WARMUP + wl.count):
            put(await aget(REPLY_TIMEOUT))

    loop = _new_loop()
    try:
        barrier.wait(BARRIER_TIMEOUT)
        loop.run_until_complete(serve())
    finally:
        loop.close()
        p.close()
        c.close()
        ra.close()
        rb.close()


def ours_ring(wl: Workload, gap: float = 0.0) -> Run:
    from engine import Ring

    a, b = _ring_name(), _ring_name()
    ra = Ring.create(a, capacity=1 << 16)
    rb = Ring.create(b, capacity=1 << 16)
    try:
        return peers.pingpong_run(wl, (_ring_ping, (a, b, gap)), (_ring_echo, (a, b, gap)))
    finally:
        ra.close()
        rb.close()
        Ring.unlink(a)
        Ring.unlink(b)


# ---------------------------------------------------------------- Unix socket


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError("echo closed the socket")
        buf += chunk
    return bytes(buf)


def _sock_ping(
    wl: Workload, barrier: Any, ping: socket.socket, echo: socket.socket, gap: float
) -> Any:
    echo.close()
    ping.settimeout(REPLY_TIMEOUT)
    size = wl.size
    try:
        return _pingpong(wl, barrier, ping.sendall, lambda: _recv_exactly(ping, size), gap)
    finally:
        ping.close()


def _sock_echo(
    wl: Workload, barrier: Any, ping: socket.socket, echo: socket.socket, gap: float
) -> None:
    ping.close()
    size = wl.size

    async def serve() -> None:
        reader, writer = await asyncio.open_unix_connection(sock=echo)
        for _ in range(WARMUP + wl.count):
            data = await asyncio.wait_for(reader.readexactly(size), REPLY_TIMEOUT)
            writer.write(data)
            await writer.drain()
        writer.close()

    loop = _new_loop()
    try:
        barrier.wait(BARRIER_TIMEOUT)
        loop.run_until_complete(serve())
    finally:
        loop.close()


def peer_unix_socket(wl: Workload, gap: float = 0.0) -> Run:
    ping, echo = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        return peers.pingpong_run(
            wl, (_sock_ping, (ping, echo, gap)), (_sock_echo, (ping, echo, gap))
        )
    finally:
        ping.close()
        echo.close()


# ---------------------------------------------------------------- zmq.asyncio


def _zmq_ping(wl: Workload, barrier: Any, addr: str, gap: float) -> Any:
    import zmq

    ctx = zmq.Context()
    s = ctx.socket(zmq.PAIR)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, int(REPLY_TIMEOUT * 1000))
    s.connect(addr)
    try:
        return _pingpong(wl, barrier, s.send, s.recv, gap)
    finally:
        s.close()
        ctx.term()


def _zmq_echo(wl: Workload, barrier: Any, addr: str, gap: float) -> None:
    import zmq
    import zmq.asyncio

    ctx = zmq.asyncio.Context()
    s = ctx.socket(zmq.PAIR)
    s.setsockopt(zmq.LINGER, 0)
    s.bind(addr)

    async def serve() -> None:
        for _ in range(WARMUP + wl.count):
            data = await asyncio.wait_for(s.recv(), REPLY_TIMEOUT)
            await s.send(data)

    loop = _new_loop()
    try:
        barrier.wait(BARRIER_TIMEOUT)
        loop.run_until_complete(serve())
    finally:
        loop.close()
        s.close()
        ctx.term()


def peer_zmq_asyncio(wl: Workload, gap: float = 0.0) -> Run:
    d = tempfile.mkdtemp(prefix="qe-bench-aio-")
    addr = f"ipc://{d}/pair"
    try:
        return peers.pingpong_run(wl, (_zmq_ping, (addr, gap)), (_zmq_echo, (addr, gap)))
    finally:
        try:
            os.unlink(f"{d}/pair")
        except OSError:
            pass
        os.rmdir(d)


# ---------------------------------------------------------------- cases

IDLE_GAP = 0.001  # s of silence before each request in the "idle echo" case


def ours_ring_idle(wl: Workload) -> Run:
    return ours_ring(wl, IDLE_GAP)


def peer_unix_socket_idle(wl: Workload) -> Run:
    return peer_unix_socket(wl, IDLE_GAP)


def peer_zmq_asyncio_idle(wl: Workload) -> Run:
    return peer_zmq_asyncio(wl, IDLE_GAP)


# ---------------------------------------------------------------- delayed delivery

DELAY = 0.005  # s: every message of the delayed-delivery case is due this long after its put


def _lateness(msgs: List[bytes], put_later: Any, get: Any) -> Run:
    """Put each message due in DELAY (``put_later(i, msg)``), await it
    (``await get()``); one sample per message: arrival - due time. A message
    delivered early, or another than the one put, fails the run."""

    async def main() -> Any:
        lat = np.empty(len(msgs), np.int64)
        out: List[bytes] = []
        now = time.perf_counter_ns  # CLOCK_MONOTONIC, the clock the queue's delays use
        delay_ns = int(DELAY * 1e9)
        t0 = now()
        for i, m in enumerate(msgs):
            due = now() + delay_ns  # before the put: the put's own cost counts as lateness
            put_later(i, m)
            got = await get()
            lat[i] = now() - due
            if got != m or lat[i] < -1_000_000:  # 1 ms: clock reads straddle the put
                raise RuntimeError(f"message {i}: {len(got)} bytes, {lat[i] / 1e6:.3f} ms after its due time")
            out.append(got)
        return t0, now(), lat, out

    loop = _new_loop()
    try:
        t0, t1, lat, out = loop.run_until_complete(main())
    finally:
        loop.close()
    return Run.timed(t0, t1, digest(out), lat)


def ours_keyed_delayed(wl: Workload) -> Run:
    from engine import aio
    from engine.scheduling import KeyedQueue

    kq = KeyedQueue(partitions=2)
    try:
        return _lateness(
            wl.payloads(),
            lambda i, m: kq.put(m, key=i, delay=DELAY),
            lambda: aio.aget(kq, timeout=REPLY_TIMEOUT),
        )
    finally:
        kq.close()


def peer_asyncio_call_later(wl: Workload) -> Run:
    q: Any = None

    def put_later(i: int, m: bytes) -> None:
        nonlocal q
        loop = asyncio.get_running_loop()
        if q is None:
            q = asyncio.Queue()
        loop.call_later(DELAY, q.put_nowait, m)

    return _lateness(wl.payloads(), put_later, lambda: asyncio.wait_for(q.get(), REPLY_TIMEOUT))


def cases(profile: Profile) -> List[Case]:
    n = profile.count(quick=1_000, full=50_000)
    n_idle = profile.count(quick=150, full=5_000)
    n_delayed = profile.count(quick=60, full=1_000)
    return [
        Case(
            "async round trip",
            "blocking pinger process -> asyncio echo process awaiting each "
            "64-byte message (nothing ready when it awaits) -> reply",
            LATENCY,
            Workload(n, SIZE),
            [
                Contender(
                    "engine.Ring aget (2 spsc rings)",
                    ours_ring,
                    ours=True,
                    requires=RING,
                    pip_hint=BUILD_HINT,
                ),
                Contender("asyncio Unix socket streams", peer_unix_socket),
                Contender("pyzmq asyncio PAIR ipc", peer_zmq_asyncio, requires=ZMQ),
            ],
            unit="us",
            targets=[Target("ratio", 2, "asyncio Unix socket streams")],
        ),
        Case(
            "async round trip, idle echo",
            "the same with 1 ms of silence before each request: the echo's "
            "wait is asleep (futex / epoll) when the request comes",
            LATENCY,
            Workload(n_idle, SIZE),
            [
                Contender(
                    "engine.Ring aget (2 spsc rings)",
                    ours_ring_idle,
                    ours=True,
                    requires=RING,
                    pip_hint=BUILD_HINT,
                ),
                Contender("asyncio Unix socket streams", peer_unix_socket_idle),
                Contender("pyzmq asyncio PAIR ipc", peer_zmq_asyncio_idle, requires=ZMQ),
            ],
            unit="us",
        ),
        Case(
            "delayed delivery, awaited",
            f"put a message due in {DELAY * 1e3:g} ms, await it; the sample is how late it "
            "arrives. Ours: KeyedQueue.put(delay=) + aio.aget (shared memory, any process "
            "may put); peer: loop.call_later + asyncio.Queue (one process only)",
            LATENCY,
            Workload(n_delayed, SIZE),
            [
                Contender(
                    "engine.KeyedQueue delay + aget",
                    ours_keyed_delayed,
                    ours=True,
                    requires=RING,
                    pip_hint=BUILD_HINT,
                ),
                Contender("asyncio call_later + Queue", peer_asyncio_call_later),
            ],
            unit="us",
        ),
    ]
