"""Helpers shared by the ring-backed and the durable scheduling queues:
region names and files, due times, policy validation, awaitability."""

from __future__ import annotations

import json
import mmap
import os
import time
from typing import Any, Dict, List, Optional, Tuple

from engine.errors import IncompatibleRegion

from .._sched import (
    REGION_SIZE,
    _Region,
    create_mapped,
    now_ns,
)
from .._shm import SHM_DIR, region_path

DEFAULT_CAPACITY = 1 << 20
_SUFFIX_ROOM = 20  # room for the suffix of a derived region (NAME.L63, NAME.P1023, NAME.delay)
_REBALANCE_EVERY = 0.05  # s: a busy member re-checks liveness / pending moves this often
_LOG_REREAD = 0.05  # s: a waiting durable queue re-reads its logs (appends ring no bell)


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def _shm_dir() -> str:
    return SHM_DIR


def _check_name(name: Any) -> str:
    return region_path(name, suffix_room=_SUFFIX_ROOM)


def _create_region(name: Optional[str], kind: int, config: Dict[str, Any]) -> _Region:
    blob = json.dumps(config, sort_keys=True).encode()
    if name is None:
        mm = mmap.mmap(-1, REGION_SIZE)  # MAP_SHARED|MAP_ANONYMOUS: futex works on it
        reg = _Region(mm, None)
    else:
        path = _check_name(name)
        reg = _Region(create_mapped(path, REGION_SIZE), name)
    reg.initialize(kind, blob)
    return reg


def _attach_region(name: str, kind: int) -> Tuple[_Region, Dict[str, Any]]:
    path = _check_name(name)
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        if size != REGION_SIZE:
            raise IncompatibleRegion(name, f"file is {size} bytes, a scheduling region has {REGION_SIZE}")
        mm = mmap.mmap(fd, REGION_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    reg = _Region(mm, name)
    deadline = time.monotonic() + 2.0
    while True:
        blob = reg.validate(kind)
        if blob is not None:
            break
        if time.monotonic() > deadline:
            reg.close()
            raise IncompatibleRegion(name, "the creator never finished initializing it (no magic)")
        time.sleep(0.001)
    try:
        config = json.loads(blob.decode())
        if not isinstance(config, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError) as exc:
        reg.close()
        raise IncompatibleRegion(name, f"configuration is not valid JSON ({exc})") from None
    return reg, config


def _unlink_path(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def _due_ns(delay: Any, at: Any) -> int:
    """Monotonic due time of ``delay``/``at`` (wall clock read first: never early)."""
    wall = time.time_ns()
    now = now_ns()
    if delay is not None and at is not None:
        raise ValueError("give delay or at, not both")
    if delay is not None:
        d = float(delay)
        if d != d:
            raise ValueError("delay must be a number of seconds")
        return now + int(d * 1e9) if d > 0 else now
    a = float(at)
    if a != a:
        raise ValueError("at must be a wall-clock time in seconds (time.time())")
    return now + (int(a * 1e9) - wall)


def _wall_due_ns(delay: Any, at: Any) -> Optional[int]:
    """Wall-clock due time (ns) of ``delay``/``at`` for a durable delay log,
    or None if already due. Stored as wall-clock time because the monotonic
    clock restarts with the machine; never earlier than :func:`_due_ns`."""
    due = _due_ns(delay, at)
    now = now_ns()
    if due <= now:
        return None
    return time.time_ns() + (due - now)  # wall read after mono: only later


def _delay_key(wall_due: int, tag: int) -> bytes:
    """The key of a durable delay-log record: wall due (i64) + level/partition (u32)."""
    return wall_due.to_bytes(8, "little", signed=True) + tag.to_bytes(4, "little")


def _validate_policy(levels: Any, policy: Any, weights: Any, max_wait: Any) -> Tuple[int, str, Optional[List[int]], float]:
    if not isinstance(levels, int) or isinstance(levels, bool) or not 1 <= levels <= 64:
        raise ValueError(f"levels must be an int 1..64, not {levels!r}")
    if policy not in ("strict", "weighted"):
        raise ValueError(f"policy must be 'strict' or 'weighted', not {policy!r}")
    w: Optional[List[int]] = None
    if weights is not None:
        w = [int(x) for x in weights]
        if len(w) != levels or any(x < 1 for x in w):
            raise ValueError(f"weights must be {levels} positive integers (weights[i] for level i), not {weights!r}")
    elif policy == "weighted":
        # default: each level twice the share of the next
        w = [1 << (levels - 1 - i) for i in range(levels)]
    mw = 0.0
    if max_wait is not None:
        mw = float(max_wait)
        if not mw > 0 or mw != mw:
            raise ValueError(f"max_wait must be a positive number of seconds, not {max_wait!r}")
    return levels, policy, w, mw


def _validate_by(by: Any, policy: str, quantum: Any) -> None:
    if by not in ("count", "bytes"):
        raise ValueError(f"by must be 'count' or 'bytes', not {by!r}")
    if by == "bytes" and policy != "weighted":
        raise ValueError("by='bytes' shares service by payload bytes: it needs policy='weighted'")
    if not isinstance(quantum, int) or isinstance(quantum, bool) or not 1 <= quantum <= 1 << 30:
        raise ValueError(f"quantum must be 1..2**30 bytes, not {quantum!r}")


def _aging_threshold(max_wait: float) -> float:
    """Age at which a head is served first: half of max_wait, so the other
    half absorbs the consumer's own delays (a busy machine deschedules it for
    milliseconds) and the bound still holds."""
    return max_wait / 2.0


# ---------------------------------------------------------------------------
# asyncio
# ---------------------------------------------------------------------------


class _Awaitable:
    """``await q.aget()``, ``await q.aget_many(n)``, ``async for msg in q``:
    the consumer side without blocking the event loop (see :mod:`engine.aio`)."""

    def aget(self, timeout: Optional[float] = None) -> Any:
        """Coroutine: the next message (``engine.aio.aget``)."""
        from .. import aio

        return aio.aget(self, timeout)

    def aget_many(self, max: int = 1024, timeout: Optional[float] = None) -> Any:
        """Coroutine: up to ``max`` messages, waiting for the first one."""
        from .. import aio

        return aio.aget_many(self, max, timeout)

    def __aiter__(self) -> Any:
        """``async for msg in q``: every message until ``Closed``."""
        from .. import aio

        return aio.aiter_messages(self)


