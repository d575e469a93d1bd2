"""crashkit: kill a real process at a named crash point, then restart and check.

A small, reusable harness for crash tests (2PC, sagas, anything journaled).

The contract with the code under test
-------------------------------------
A module that supports crash points defines two functions:

* ``_crash_point(name, party=None)``, called at each step worth crashing at
  (before/after a durable write, before/after a message).  The full point name
  is ``name`` or ``name@party``.
* ``_arm_crash(spec, trace_path)``: die (``os.kill(os.getpid(), SIGKILL)``) at
  the point ``spec`` (``"point"`` = its first hit, ``"point#k"`` = its k-th
  hit); append every hit as a line ``point#k`` to ``trace_path`` (unbuffered,
  so the trace survives the kill).  ``spec=None`` and no trace disarm.

The same settings come from the environment (``ENGINE_CRASH_AT``,
``ENGINE_CRASH_TRACE``) for scenarios run as fresh interpreters
(:func:`run_subprocess`).  ``engine.txn`` implements this contract; list other
modules in ``hooks=`` (default :data:`HOOK_MODULES`).

How a crash test uses it
------------------------
::

    points = crashkit.trace(scenario, workdir)          # a clean run's points
    for p in points:
        res = crashkit.run(scenario, workdir, crash_at=p)
        assert res.killed                                 # SIGKILLed at p
        recover_and_check(workdir)                        # in the test process

:func:`run` forks the child from the test process, which has imported
everything already, so a kill costs a fork (milliseconds), not an
interpreter start.  The child returns a picklable value (or the traceback of
an exception) through a pipe.  Every wait is bounded (``timeout``): a child
that hangs is SIGKILLed and reported as a failure, never waited for forever.
"""

from __future__ import annotations

import importlib
import os
import pickle
import select
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

from engine import _crashpoints

HOOK_MODULES: Sequence[str] = ("engine.txn",)
"""Modules armed in the child (each must define ``_arm_crash``)."""

ALL_HOOK_MODULES: Sequence[str] = ("engine.txn", "engine.saga")
"""Every module with crash points."""

SimulatedCrash = _crashpoints.SimulatedCrash
"""Raised at a crash point armed by :func:`arm_in_process` (a BaseException)."""


def arm_in_process(spec: Optional[str], hooks: Sequence[str] = ALL_HOOK_MODULES) -> None:
    """Arm ``spec`` in this process to *raise* :class:`SimulatedCrash`.

    For in-process crash tests (hypothesis state machines): the exception
    unwinds to the test, which abandons every object without a clean close
    (their ``_simulate_crash()``), as a SIGKILL would, and reopens.  ``spec``
    as for :func:`run` (``"*#k"``: the k-th point hit from now); ``None``
    disarms.
    """
    for name in hooks:
        importlib.import_module(name)._arm_crash(spec, None, "raise" if spec else "kill")


def hits(hooks: Sequence[str] = ALL_HOOK_MODULES) -> int:
    """Crash points hit since the last arming (every module's points share one
    count, engine._crashpoints; ``hooks`` are imported so theirs exist)."""
    for n in hooks:
        importlib.import_module(n)
    return _crashpoints.hits.get("*", 0)


@dataclass
class ChildResult:
    """What a child run ended with."""

    killed: bool  # ended by SIGKILL (the crash point fired, or the timeout)
    exitcode: Optional[int]  # exit status if it exited normally
    value: Any = None  # the scenario's return value (clean exit only)
    error: Optional[str] = None  # the traceback if the scenario raised
    trace: List[str] = field(default_factory=list)  # points hit, "point#k", in order
    seconds: float = 0.0

    def unwrap(self) -> Any:
        """The value of a clean run; raise AssertionError otherwise."""
        if self.killed:
            raise AssertionError(f"child was SIGKILLed (trace tail: {self.trace[-5:]})")
        if self.error is not None or self.exitcode != 0:
            raise AssertionError(f"child failed (exit {self.exitcode}):\n{self.error}")
        return self.value


def _arm(hooks: Sequence[str], spec: Optional[str], trace_path: Optional[str]) -> None:
    for name in hooks:
        importlib.import_module(name)._arm_crash(spec, trace_path)


def run(
    fn: Callable[..., Any],
    *args: Any,
    crash_at: Optional[str] = None,
    trace: bool = False,
    timeout: float = 60.0,
    hooks: Sequence[str] = HOOK_MODULES,
) -> ChildResult:
    """Run ``fn(*args)`` in a forked child armed to die at ``crash_at``.

    With ``trace=True`` the result lists every crash point the child hit.
    Returns once the child is gone; a child still alive after ``timeout``
    seconds is SIGKILLed and :class:`TimeoutError` is raised.
    """
    tpath = None
    if trace:
        fd, tpath = tempfile.mkstemp(prefix="crashkit-", suffix=".trace")
        os.close(fd)
    rfd, wfd = os.pipe()
    t0 = time.monotonic()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # child: never returns into the test runner
        code = 1
        try:
            os.close(rfd)
            _arm(hooks, crash_at, tpath)
            try:
                payload = pickle.dumps((True, fn(*args)))
                code = 0
            except BaseException:
                payload = pickle.dumps((False, traceback.format_exc()))
            view = memoryview(payload)
            while view:
                n = os.write(wfd, view)
                view = view[n:]
        finally:
            os._exit(code)
    os.close(wfd)
    chunks = []
    deadline = t0 + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise TimeoutError(f"crashkit child {fn.__name__} ran over {timeout} s (killed)")
            ready, _, _ = select.select([rfd], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(rfd, 1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
    finally:
        os.close(rfd)
    _, status = os.waitpid(pid, 0)
    res = ChildResult(killed=False, exitcode=None, seconds=time.monotonic() - t0)
    if os.WIFSIGNALED(status):
        res.killed = os.WTERMSIG(status) == signal.SIGKILL
        res.exitcode = -os.WTERMSIG(status)
    else:
        res.exitcode = os.WEXITSTATUS(status)
    if chunks and not res.killed:
        ok, value = pickle.loads(b"".join(chunks))
        if ok:
            res.value = value
        else:
            res.error = value
    if tpath is not None:
        with open(tpath) as f:
            res.trace = [line.strip() for line in f if line.strip()]
        os.unlink(tpath)
    return res


def trace(
    fn: Callable[..., Any], *args: Any, timeout: float = 60.0, hooks: Sequence[str] = HOOK_MODULES
) -> List[str]:
    """The crash points a clean run of ``fn(*args)`` hits, in order (``point#k``).

    Fails (AssertionError) if the clean run itself fails.
    """
    res = run(fn, *args, trace=True, timeout=timeout, hooks=hooks)
    res.unwrap()
    return res.trace


def run_subprocess(
    argv: Sequence[str],
    crash_at: Optional[str] = None,
    trace_path: Optional[str] = None,
    timeout: float = 60.0,
    env: Optional[Dict[str, str]] = None,
) -> ChildResult:
    """Run a fresh interpreter (``argv``) armed through the environment.

    For scenarios that must not fork from the test process.  ``killed`` is
    True when the process died of SIGKILL.
    """
    e = dict(os.environ if env is None else env)
    e.pop("ENGINE_CRASH_AT", None)
    e.pop("ENGINE_CRASH_TRACE", None)
    if crash_at:
        e["ENGINE_CRASH_AT"] = crash_at
    if trace_path:
        e["ENGINE_CRASH_TRACE"] = trace_path
    t0 = time.monotonic()
    proc = subprocess.run(list(argv), env=e, timeout=timeout, capture_output=True, text=True)
    res = ChildResult(
        killed=proc.returncode == -signal.SIGKILL,
        exitcode=proc.returncode,
        value=proc.stdout,
        error=proc.stderr or None,
        seconds=time.monotonic() - t0,
    )
    if trace_path and os.path.exists(trace_path):
        with open(trace_path) as f:
            res.trace = [line.strip() for line in f if line.strip()]
    return res


def split_point(spec: str) -> tuple:
    """``"name@party#k"`` -> ``(name, party or None, k)``."""
    point, _, k = spec.partition("#")
    name, _, party = point.partition("@")
    return name, (party or None), int(k or 1)
