"""Crash points: named moments at which a crash test kills this process.

The durable protocols (``engine.txn``, ``engine.saga`` and the compiled core
``engine._txn``) call :func:`point` at every step worth crashing at (before
and after each durable write, around each message or user call).  Unarmed, a
call site pays one attribute load: it tests :data:`armed` first::

    if _cp.armed:
        _cp.point("log.commit.after_mark", self.name)

Tests arm it (``tests/crashkit.py``) to SIGKILL the process at one point's
k-th hit, or to raise :class:`SimulatedCrash` there (in-process tests), and
to trace every hit.  The environment arms it at import too
(``ENGINE_CRASH_AT=<point>[#k]``, ``ENGINE_CRASH_TRACE=<file>``), for
scenarios run as fresh interpreters.  One state for the whole process: a
``"*#k"`` spec counts the hits of every module's points together.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Dict, Optional

armed = False  # a crash point or a trace is set
hits: Dict[str, int] = {}  # full point name -> hits since arming ("*": all points)
_at: Optional[str] = None  # full point name to die at, "*" (any point) or None
_nth = 1  # ... at its n-th hit
_raise = False  # raise SimulatedCrash instead of SIGKILL
_trace_fd = -1  # fd that receives every hit, one line "point#k" each (or -1)


class SimulatedCrash(BaseException):
    """Raised at an armed crash point in ``action="raise"`` mode (tests only).

    A ``BaseException``: no ``except Exception`` of a protocol catches it, so
    it unwinds to the test, which then abandons every object without a clean
    close (their ``_simulate_crash()``), as a SIGKILL would, and reopens.
    """


def arm(spec: Optional[str], trace_path: Optional[str] = None, action: str = "kill") -> None:
    """Arm the crash points: die at ``spec`` (``"point"``, ``"point#k"`` or ``"*#k"``).

    ``"point"`` is its first hit, ``"point#k"`` its k-th, ``"*#k"`` the k-th
    hit of any point.  ``action="kill"`` SIGKILLs the process there;
    ``action="raise"`` raises :class:`SimulatedCrash` instead.
    ``trace_path`` (optional) receives every hit as a line ``point#k``,
    written unbuffered so the trace survives the kill.  ``spec=None`` with no
    trace disarms.  Arming resets the hit counts.
    """
    global armed, _at, _nth, _raise, _trace_fd
    if action not in ("kill", "raise"):
        raise ValueError(f"action must be 'kill' or 'raise', not {action!r}")
    hits.clear()
    if _trace_fd >= 0:
        os.close(_trace_fd)
        _trace_fd = -1
    _at, _nth, _raise = None, 1, action == "raise"
    if spec:
        name, _, nth = spec.partition("#")
        _at = name or "*"
        _nth = int(nth) if nth else 1
    if trace_path:
        _trace_fd = os.open(trace_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    armed = _at is not None or _trace_fd >= 0
    from ._txn import _set_crash_hook

    _set_crash_hook(point if armed else None)  # the compiled core's points


def point(name: str, party: Optional[str] = None) -> None:
    """A named step of a protocol: crash here if armed for it.

    The full point name is ``name`` or ``name@party`` (a participant's name,
    a journal's kind), so a test can crash one party at one step.
    """
    if not armed:
        return
    full = name if party is None else f"{name}@{party}"
    n = hits.get(full, 0) + 1
    hits[full] = n
    every = hits.get("*", 0) + 1
    hits["*"] = every
    if _trace_fd >= 0:
        os.write(_trace_fd, f"{full}#{n}\n".encode())
    if (full == _at and n == _nth) or (_at == "*" and every == _nth):
        if _raise:
            raise SimulatedCrash(full)
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(10)  # pragma: no cover - the signal is delivered first


arm(os.environ.get("ENGINE_CRASH_AT"), os.environ.get("ENGINE_CRASH_TRACE"))
