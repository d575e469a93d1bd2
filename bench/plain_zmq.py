"""An independent steady-state measurement of pyzmq PUSH/PULL over ipc://,
written the way a user would, outside the benchmark harness: one producer
process, one consumer process, N 64-byte messages, default pyzmq settings
(``--hwm`` raises both high-water marks), no CPU pinning unless ``--pin``.
The consumer times from its ``--warm``-th message to its last one.

    python bench/plain_zmq.py                 # 1M x 64 B, 3 repetitions
    python bench/plain_zmq.py --messages 2000000 --hwm 65536 --pin

Prints one line per repetition and the median (msg/s), to compare with the
``pyzmq PUSH/PULL ipc`` row of ``queue-engine bench --only ring``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import tempfile
import time


def _producer(ep: str, n: int, size: int, hwm: int, ready: mp.Event, pin: int) -> None:
    import zmq

    if pin >= 0:
        os.sched_setaffinity(0, {pin})
    ctx = zmq.Context()
    s = ctx.socket(zmq.PUSH)
    if hwm:
        s.setsockopt(zmq.SNDHWM, hwm)
    msgs = [i.to_bytes(8, "little") + b"x" * (size - 8) for i in range(n)]
    if not ready.wait(60):
        raise TimeoutError("the consumer never bound")
    s.connect(ep)  # the consumer has bound: no reconnect race
    for m in msgs:
        s.send(m)
    s.send(b"")
    s.close(linger=-1)
    ctx.term()


def _consumer(
    ep: str, n: int, warm: int, hwm: int, ready: mp.Event, out: mp.Queue, pin: int
) -> None:
    import zmq

    if pin >= 0:
        os.sched_setaffinity(0, {pin})
    ctx = zmq.Context()
    s = ctx.socket(zmq.PULL)
    s.setsockopt(zmq.RCVTIMEO, 30_000)  # a lost message fails the run, never hangs it
    if hwm:
        s.setsockopt(zmq.RCVHWM, hwm)
    s.bind(ep)
    ready.set()
    got = []
    recv = s.recv
    for _ in range(warm):
        got.append(recv())
    t0 = time.perf_counter()
    while True:
        m = recv()
        if not m:
            break
        got.append(m)
    t1 = time.perf_counter()
    assert len(got) == n, (len(got), n)
    assert all(int.from_bytes(m[:8], "little") == i for i, m in enumerate(got))
    out.put((n - warm) / (t1 - t0))
    s.close(linger=0)
    ctx.term()


def once(n: int, size: int, hwm: int, pin: bool) -> float:
    ctx = mp.get_context("fork")
    ep = f"ipc://{tempfile.gettempdir()}/plain-zmq-{os.getpid()}-{time.monotonic_ns()}.sock"
    ready, out = ctx.Event(), ctx.Queue()
    cpus = sorted(os.sched_getaffinity(0)) if pin else []
    pc, cc = (cpus[0], cpus[1]) if len(cpus) >= 2 else (-1, -1)
    p = ctx.Process(target=_producer, args=(ep, n, size, hwm, ready, pc))
    c = ctx.Process(target=_consumer, args=(ep, n, n // 10, hwm, ready, out, cc))
    p.start()
    c.start()
    rate = out.get(timeout=120)
    p.join()
    c.join()
    try:
        os.unlink(ep[len("ipc://") :])
    except OSError:
        pass
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--messages", type=int, default=1_000_000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--hwm", type=int, default=0, help="SNDHWM/RCVHWM (0: pyzmq default 1000)")
    ap.add_argument("--pin", action="store_true", help="pin producer and consumer to CPUs 0 and 1")
    a = ap.parse_args()
    rates = []
    for i in range(a.repeat):
        r = once(a.messages, a.size, a.hwm, a.pin)
        rates.append(r)
        print(f"rep {i + 1}: {r / 1e6:.3f} M msg/s")
    print(
        f"plain pyzmq PUSH/PULL ipc, {a.messages:,} x {a.size} B, hwm={a.hwm or 'default'}, "
        f"pin={a.pin}: median {statistics.median(rates) / 1e6:.3f} M msg/s "
        f"(min {min(rates) / 1e6:.3f}, max {max(rates) / 1e6:.3f}); load {os.getloadavg()[0]:.1f}"
    )


if __name__ == "__main__":
    main()
