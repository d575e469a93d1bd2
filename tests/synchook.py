"""What the durable paths must wait for, seen through the log's sync hook.

``engine._log._set_sync_hook(hook)`` calls ``hook(path, info)`` after every
successful sync of any log in the process; ``info["next_offset"]`` is how far
that log is durable.  :class:`Durable` records it per log, so a test can ask,
at the moment a write returns, whether its record was already durable.
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Callable, Iterator, Optional

import engine._log as _logmod


def snapshot(path: str) -> dict:
    """The bytes of every data file of the log directory ``path`` (name ->
    contents): taken inside a sync hook, what a power loss right after that
    sync leaves of the log (its lock and notify files are not data)."""
    snap = {}
    for name in os.listdir(path):
        full = os.path.join(path, name)
        if name in ("writer.lock", "notify") or name.startswith(".") or not os.path.isfile(full):
            continue
        with open(full, "rb") as f:
            snap[name] = f.read()
    return snap


class Durable:
    """A sync hook: the durable end (next offset) of every log, as syncs report it.

    ``slow`` makes every sync take that much longer, so concurrent writers
    pile up behind it and meet in groups; ``after(path, end)`` is called after
    each sync; ``syncs`` counts the data syncs per log.
    """

    def __init__(self, slow: float = 0.0) -> None:
        self.ends: dict = {}
        self.syncs: dict = {}
        self.after: Optional[Callable[[str, int], None]] = None
        self._lock = threading.Lock()
        self._slow = slow

    def __call__(self, path, info) -> None:
        if self._slow:
            time.sleep(self._slow)
        n = info.get("next_offset")
        with self._lock:
            if info.get("kind") == "data":
                self.syncs[path] = self.syncs.get(path, 0) + 1
            if n is not None and n > self.ends.get(path, 0):
                self.ends[path] = n
        if n is not None and self.after is not None:
            self.after(path, n)

    def end(self, path) -> int:
        with self._lock:
            return self.ends.get(path, 0)

    def snapshot(self) -> dict:
        with self._lock:
            return dict(self.ends)


@contextlib.contextmanager
def installed(hook: Durable) -> Iterator[Durable]:
    """``hook`` is the process's sync hook inside the block."""
    _logmod._set_sync_hook(hook)
    try:
        yield hook
    finally:
        _logmod._set_sync_hook(None)


def run_threads(n: int, body: Callable[[int], None], what: str = "a thread") -> None:
    """Run ``body(k)`` for k in range(n) in n threads; re-raise the first error."""
    errors = []

    def run(k):
        try:
            body(k)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    ts = [threading.Thread(target=run, args=(k,)) for k in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    assert not any(t.is_alive() for t in ts), f"{what} never returned"
    if errors:
        raise errors[0]
