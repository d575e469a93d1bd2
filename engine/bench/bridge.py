"""Bench section "bridge": forwarding the log to a local NATS JetStream server.

Runs only when ``nats-server`` is on the PATH (``apt-get install nats-server``)
and nats-py is installed; the server is started here on a loopback port with
its own storage directory and stopped at exit.  Every contender publishes the
same 64-byte records with a ``Nats-Msg-Id`` and does not stop the clock before
JetStream has confirmed every record stored: the peers await an ack per
message; the forwarder chains each record to its predecessor
(``Nats-Expected-Last-Msg-Id``) and awaits the ack of each batch's last
record, which JetStream gives only if the whole batch was stored in order.
Delivery is verified by reading the stream back (outside the clock) and
digesting what it holds.
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, List, Optional

from .harness import THROUGHPUT, Case, Contender, Profile, Run, Target, Workload, digest

SECTION = "bridge"
# the cases the quick profile runs (fewer cases, never shorter windows); --full runs all
QUICK: tuple = ()  # --full only (a NATS server and a read-back per run)

_REQUIRES = ("nats", "engine._log")
_server: Optional[subprocess.Popen] = None
_url = ""
_streams = itertools.count()


def _nats_server() -> Optional[str]:
    return shutil.which("nats-server") or (
        "/usr/sbin/nats-server" if Path("/usr/sbin/nats-server").exists() else None
    )


def _ensure_server() -> str:
    global _server, _url
    if _server is not None and _server.poll() is None:
        return _url
    import socket

    exe = _nats_server()
    if exe is None:
        raise RuntimeError("nats-server is not on the PATH (apt-get install nats-server)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = tempfile.mkdtemp(prefix="qe-bench-nats-")
    _server = subprocess.Popen(
        [exe, "-js", "-sd", store, "-a", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def _stop() -> None:
        if _server is not None and _server.poll() is None:
            _server.terminate()
            _server.wait(5)
        shutil.rmtree(store, ignore_errors=True)

    atexit.register(_stop)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            time.sleep(0.05)
    _url = f"nats://127.0.0.1:{port}"
    return _url


async def _read_back(url: str, stream: str, subject: str, n: int) -> List[bytes]:
    import nats

    nc = await nats.connect(servers=[url])
    js = nc.jetstream()
    sub = await js.subscribe(subject, ordered_consumer=True)
    out = []
    try:
        for _ in range(n):
            msg = await sub.next_msg(timeout=10)
            out.append(msg.data)
        # anything more would be a duplicate
        try:
            extra = await sub.next_msg(timeout=0.2)
            out.append(extra.data)
        except Exception:
            pass
    finally:
        await sub.unsubscribe()
        await nc.close()
    return out


def _fresh_stream(url: str) -> tuple[str, str]:
    import nats

    k = next(_streams)
    stream, subject = f"BENCH{k}", f"bench.{k}"

    async def make() -> None:
        nc = await nats.connect(servers=[url])
        js = nc.jetstream()
        await js.add_stream(name=stream, subjects=[subject])
        await nc.close()

    asyncio.run(make())
    return stream, subject


def _delete_stream(url: str, stream: str) -> None:
    import nats

    async def drop() -> None:
        nc = await nats.connect(servers=[url])
        await nc.jetstream().delete_stream(stream)
        await nc.close()

    asyncio.run(drop())


def _verify(url: str, stream: str, subject: str, wl: Workload, t0: int, t1: int) -> Run:
    got = asyncio.run(_read_back(url, stream, subject, wl.count))
    _delete_stream(url, stream)
    return Run.timed(t0, t1, digest(got))


def _ours(wl: Workload) -> Run:
    from engine import Log
    from engine.bridge import JetStreamForwarder

    url = _ensure_server()
    stream, subject = _fresh_stream(url)
    with tempfile.TemporaryDirectory(prefix="qe-bench-bridge-") as tmp:
        with Log(Path(tmp) / "outbox", durability="none") as log:
            log.append_many(wl.payloads())
        fwd = JetStreamForwarder(
            Path(tmp) / "outbox",
            group="bench",
            servers=url,
            stream=stream,
            subject=subject,
            create_stream=False,
            max_in_flight=2048,
        )
        t0 = time.perf_counter_ns()
        fwd.run(until_caught_up=True)
        t1 = time.perf_counter_ns()
    return _verify(url, stream, subject, wl, t0, t1)


def _peer_publish_each(wl: Workload) -> Run:
    """The plain way: ``await js.publish`` per message (one ack round trip each)."""
    import nats

    url = _ensure_server()
    stream, subject = _fresh_stream(url)
    msgs = wl.payloads()

    async def go() -> tuple[int, int]:
        nc = await nats.connect(servers=[url])
        js = nc.jetstream()
        t0 = time.perf_counter_ns()
        for i, m in enumerate(msgs):
            await js.publish(subject, m, headers={"Nats-Msg-Id": str(i)})
        t1 = time.perf_counter_ns()
        await nc.close()
        return t0, t1

    t0, t1 = asyncio.run(go())
    return _verify(url, stream, subject, wl, t0, t1)


def _peer_publish_async(wl: Workload) -> Run:
    """nats-py's pipelined ``publish_async`` (no log, no offsets, no resume)."""
    import nats

    url = _ensure_server()
    stream, subject = _fresh_stream(url)
    msgs = wl.payloads()

    async def go() -> tuple[int, int]:
        nc = await nats.connect(servers=[url])
        js = nc.jetstream(publish_async_max_pending=2048)
        t0 = time.perf_counter_ns()
        futs: List[Any] = []
        for i, m in enumerate(msgs):
            futs.append(await js.publish_async(subject, m, headers={"Nats-Msg-Id": str(i)}))
        await asyncio.gather(*futs)
        t1 = time.perf_counter_ns()
        await nc.close()
        return t0, t1

    t0, t1 = asyncio.run(go())
    return _verify(url, stream, subject, wl, t0, t1)


CHAIN_BATCH = 1024  # records per acknowledged batch in the nats-py chain


def _peer_chain(wl: Workload) -> Run:
    """nats-py publishing the forwarder's own protocol: every record names its
    predecessor (``Nats-Expected-Last-Msg-Id``), plain publishes for all but
    the last record of each batch, and ``publish_async`` (an awaited ack) for
    the last, which JetStream stores only if the whole batch before it was
    stored in order. The acks of successive batches are pipelined like the
    forwarder's window. This is what the bridge would do on nats-py: the
    ratio against it is what the lean wire client (``engine._nats_wire``)
    buys."""
    import nats

    url = _ensure_server()
    stream, subject = _fresh_stream(url)
    msgs = wl.payloads()

    async def go() -> tuple[int, int]:
        nc = await nats.connect(servers=[url])
        js = nc.jetstream(publish_async_max_pending=64)
        publish = nc.publish
        t0 = time.perf_counter_ns()
        futs: List[Any] = []
        prev: Optional[str] = None
        n = len(msgs)
        for b0 in range(0, n, CHAIN_BATCH):
            last = min(n, b0 + CHAIN_BATCH) - 1
            for i in range(b0, last + 1):
                mid = str(i)
                hdr = {"Nats-Msg-Id": mid}
                if prev is not None:
                    hdr["Nats-Expected-Last-Msg-Id"] = prev
                if i == last:
                    futs.append(await js.publish_async(subject, msgs[i], headers=hdr))
                else:
                    await publish(subject, msgs[i], headers=hdr)
                prev = mid
        await asyncio.gather(*futs)  # a broken chain fails its batch's ack: raises
        t1 = time.perf_counter_ns()
        await nc.close()
        return t0, t1

    t0, t1 = asyncio.run(go())
    return _verify(url, stream, subject, wl, t0, t1)


def cases(profile: Profile) -> List[Case]:
    if _nats_server() is None:
        print(
            "bridge: skipped (nats-server is not on the PATH: apt-get install nats-server)",
            file=sys.stderr,
        )
        return []
    wl = Workload(count=profile.count(quick=6_000, full=100_000), size=64)
    hint = 'pip install "queue-engine[nats]"'
    return [
        Case(
            name="forward to JetStream (acked)",
            description="64 B log records published to a local JetStream stream, every "
            "record confirmed stored before the clock stops (ours and the nats-py chain: "
            "the chained ack of each batch; the other peers: an ack per message); read back "
            "and digested after",
            kind=THROUGHPUT,
            workload=wl,
            contenders=[
                Contender(
                    "JetStreamForwarder", _ours, ours=True, requires=_REQUIRES, pip_hint=hint
                ),
                Contender(
                    "nats-py chained batches (one ack per batch)",
                    _peer_chain,
                    requires=("nats",),
                    pip_hint=hint,
                ),
                Contender(
                    "nats-py publish_async", _peer_publish_async, requires=("nats",), pip_hint=hint
                ),
                Contender(
                    "nats-py publish (ack each)",
                    _peer_publish_each,
                    requires=("nats",),
                    pip_hint=hint,
                ),
            ],
            repeat=profile.reps(quick=1, full=3),
            targets=[Target("min_msg_per_s", 50_000)],
        )
    ]
