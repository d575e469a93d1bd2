"""The error model: every error the engine raises derives from :class:`EngineError`.

Each carries the values a caller needs to act (``VersionConflict.actual``,
``CorruptLog.segment``...) and its message says what to do next.  Bad
arguments are plain ``TypeError`` / ``ValueError`` naming the argument.
"""

from __future__ import annotations

from typing import Any, Optional

__all__ = [
    "EngineError",
    "Closed",
    "Timeout",
    "IncompatibleRegion",
    "LogLocked",
    "CorruptLog",
    "VersionConflict",
    "TransactionAborted",
    "LogBroken",
]


class EngineError(Exception):
    """Base of every error raised by queue-engine."""


class Closed(EngineError):
    """The ring, log or handle is closed: nothing more will arrive or be accepted.

    A consumer sees this only after it has drained every message put before
    the producer closed.
    """


class Timeout(EngineError, TimeoutError):
    """A blocking call ran out of time.  Also a ``TimeoutError``."""


class IncompatibleRegion(EngineError):
    """A shared region is missing, foreign, truncated or corrupt.

    ``name`` is the region, ``reason`` says which check failed.  Nothing was
    read outside the mapping; unlink the region (``queue-engine ring unlink``)
    and create it again if it is stale.
    """

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        super().__init__(f"shared region {name!r}: {reason}")


class LogLocked(EngineError):
    """Another writer holds the log directory (one writer at a time)."""

    def __init__(self, path: str, holder: Optional[int] = None) -> None:
        self.path = path
        self.holder = holder
        who = f" (held by pid {holder})" if holder else ""
        super().__init__(
            f"log {path!r} already has a writer{who}; close it first, or open a LogReader to read"
        )


class CorruptLog(EngineError):
    """A record failed its checks somewhere it may not be silently dropped.

    ``segment`` is the file, ``position`` the byte offset in it.  Run
    ``queue-engine log verify PATH`` to see the damage and
    ``queue-engine log repair --truncate PATH`` to cut the log there.
    """

    def __init__(self, segment: str, position: int, reason: str) -> None:
        self.segment = segment
        self.position = position
        self.reason = reason
        super().__init__(
            f"corrupt record in {segment} at byte {position}: {reason}; "
            "inspect with 'queue-engine log verify', cut with 'queue-engine log repair --truncate'"
        )


class VersionConflict(EngineError):
    """A compare-and-set found another version than the caller expected.

    Nothing was changed.  Re-read the key (``actual`` is its version now) and retry.
    """

    def __init__(self, key: Any, expected: Optional[int], actual: int) -> None:
        self.key = key
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"version conflict on {key!r}: expected version {expected}, found {actual}; "
            "re-read the key and retry"
        )


class TransactionAborted(EngineError):
    """The transaction was aborted (a participant voted no, timed out, or raised)."""

    def __init__(self, txid: Any, reason: str) -> None:
        self.txid = txid
        self.reason = reason
        super().__init__(f"transaction {txid} aborted: {reason}")


class LogBroken(EngineError, OSError):
    """A write or sync of the log failed: the writer refuses everything after it.

    After a failed ``fdatasync``/``msync``/``fsync`` the kernel may have dropped
    the dirty pages and reports the error only once, so a later sync that
    succeeds proves nothing (PostgreSQL's "fsyncgate").  Every waiting and later
    ``append``, ``append_many`` and ``flush`` raises this error, naming the
    first one (``cause``; ``errno`` is its errno, so it is also an ``OSError``).
    ``close()`` still releases the directory: reopen the log (``engine.Log``)
    to recover from what is on disk.
    """

    def __init__(self, path: str, cause: str, err: int) -> None:
        self.path = path
        self.cause = cause
        OSError.__init__(
            self, err, f"log {path!r} is broken: {cause}; nothing after that is acknowledged: "
            "close it and reopen the log to recover from what is on disk"
        )

    def __str__(self) -> str:
        return str(self.args[1])
