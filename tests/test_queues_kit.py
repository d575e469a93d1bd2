"""Child-process functions for the queue tests (importable by name, so spawn
and forkserver children find them; no tests here)."""

from __future__ import annotations

import os
import queue
import time
import zlib
from typing import Any

import numpy as np

_POOL_Q: Any = None


def echo_child(q_in: Any, q_out: Any, n: int) -> None:
    """Get n messages from q_in and put each back on q_out, tagged with our pid."""
    for _ in range(n):
        q_out.put((os.getpid(), q_in.get(timeout=30)))


def produce(q: Any, pid_tag: int, n: int, arrays: bool = False) -> None:
    """Put (tag, seq, payload) for seq in range(n)."""
    for i in range(n):
        payload: Any = np.full(16, i, dtype=np.int64) if arrays and i % 7 == 0 else f"m{i}"
        q.put((pid_tag, i, payload), timeout=30)


def consume_until_none(q: Any, out: Any) -> None:
    """Get until a None sentinel; send everything got (in order) on out."""
    got = []
    while True:
        item = q.get(timeout=30)
        if item is None:
            break
        tag, seq, payload = item
        if isinstance(payload, np.ndarray):
            assert payload.tolist() == [seq] * 16, (tag, seq)
            payload = "array"
        got.append((tag, seq, payload))
    out.put(got)


def pool_init(q: Any) -> None:
    global _POOL_Q
    _POOL_Q = q


def pool_work(x: int) -> int:
    _POOL_Q.put(("pool", x * x))
    return x


# ---- differential conformance actors --------------------------------------


def _report(item: Any) -> Any:
    """A comparable form of a got item (numpy arrays by dtype, shape, bytes)."""
    tag, seq, payload = item
    if isinstance(payload, np.ndarray):
        payload = ("nd", payload.dtype.str, payload.shape, payload.tobytes())
    return (tag, seq, payload)


def _settle(q: Any) -> None:
    """Wait (bounded) until the queue is quiescent: multiprocessing's puts
    reach the pipe from a feeder thread, so empty() lags qsize() briefly."""
    deadline = time.monotonic() + 5
    while q.empty() != (q.qsize() == 0) and time.monotonic() < deadline:
        time.sleep(0.001)


def actor(q: Any, conn: Any) -> None:
    """Run the ops the parent sends, one at a time, and answer each with
    ("ok", value) or ("exc", exception class name)."""
    while True:
        cmd = conn.recv()
        if cmd is None:
            break
        op, arg = cmd
        try:
            if op == "put":
                item, mode = arg
                if mode == "nowait":
                    q.put_nowait(item)
                else:
                    q.put(item, True, 0.05)
                res: Any = None
            elif op == "get":
                res = _report(q.get_nowait() if arg == "nowait" else q.get(True, arg))
            elif op == "qsize":
                res = q.qsize()
            elif op == "empty":
                _settle(q)
                res = q.empty()
            elif op == "full":
                res = q.full()
            elif op == "task_done":
                q.task_done()
                res = None
            elif op == "join":
                q.join()
                res = None
            elif op == "close":
                q.close()
                res = None
            else:
                raise AssertionError(op)
            conn.send(("ok", res))
        except (queue.Empty, queue.Full, ValueError) as exc:
            conn.send(("exc", type(exc).__name__))


# ---- crash test workers ----------------------------------------------------


def crash_producer(q: Any, log_fd: int, tag: int) -> None:
    """Put (tag, seq, checksum, body) for seq = 0, 1, ... forever; after each
    put returns, append seq to the log (the parent's record of what was
    acknowledged).  Every incarnation of a producer has its own tag."""
    seq = 0
    while True:
        # every 16th message is big: its copy keeps the lock held long enough
        # for some kills to land inside the producers' and consumers' locks
        body = bytes([seq % 251]) * (seq % 3000 if seq % 16 else 300_000 + seq % 1000)
        q.put((tag, seq, zlib.crc32(body), body) if seq % 5 else
              (tag, seq, -1, np.full(seq % 500, seq, dtype=np.int32)), timeout=60)
        os.write(log_fd, seq.to_bytes(8, "little"))
        seq += 1


def crash_consumer(q: Any, log_fd: int) -> None:
    """Get messages forever, check each, append (tag, seq) to the log after get returns."""
    while True:
        items = q.get_many(timeout=60, max_messages_to_get=4) if os.getpid() % 2 else [q.get(timeout=60)]
        for tag, seq, check, body in items:
            if check == -1:
                assert isinstance(body, np.ndarray) and body.shape == (seq % 500,), (tag, seq)
                assert (body == seq).all(), (tag, seq)
            else:
                assert body == bytes([seq % 251]) * (seq % 3000 if seq % 16 else 300_000 + seq % 1000), (tag, seq)
                assert check == zlib.crc32(body), (tag, seq)
            os.write(log_fd, tag.to_bytes(4, "little") + seq.to_bytes(8, "little"))


def make_queue_and_exit(conn: Any) -> None:
    """Create a queue (kept referenced until the process ends) and report its name."""
    global _POOL_Q
    import engine

    _POOL_Q = engine.Queue()
    conn.send(_POOL_Q.name)
