"""queue-engine: an embedded queue engine for Python.

A lock-free shared-memory ring and a crash-safe segment log, with scheduling,
version checks, two-phase commit, sagas and sharded counters on top.

Names are loaded on first use (PEP 562), so ``import engine`` stays cheap and
each compiled module loads only when its first name is asked for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    Closed,
    CorruptLog,
    EngineError,
    IncompatibleRegion,
    LogBroken,
    LogLocked,
    Timeout,
    TransactionAborted,
    VersionConflict,
)

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "Ring": "engine._ring",
    "Producer": "engine._ring",
    "Consumer": "engine._ring",
    "Log": "engine._log",
    "LogReader": "engine._log",
    "Record": "engine._log",
    "ShardedCounter": "engine.counters",
    "CounterMap": "engine.counters",
    "CounterAggregator": "engine.counters",
    "VersionedStore": "engine.versions",
    "Deduplicator": "engine.versions",
    "VersionGate": "engine.versions",
    "PriorityQueue": "engine.scheduling",
    "KeyedQueue": "engine.scheduling",
    "KeyedConsumer": "engine.scheduling",
    "DurablePriorityQueue": "engine.scheduling",
    "DurableKeyedQueue": "engine.scheduling",
    "Saga": "engine.saga",
    "Coordinator": "engine.txn",
    "Transaction": "engine.txn",
    "Participant": "engine.txn",
    "LogParticipant": "engine.txn",
    "StoreParticipant": "engine.txn",
    "OffsetParticipant": "engine.txn",
    "ParticipantServer": "engine.txn",
    "RemoteParticipant": "engine.txn",
    "Queue": "engine.queues",
    "JoinableQueue": "engine.queues",
    "SimpleQueue": "engine.queues",
    "backup": "engine.backups",
}

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
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
    from ._log import Log, LogReader, Record
    from ._ring import Consumer, Producer, Ring
    from .backups import backup
    from .counters import CounterAggregator, CounterMap, ShardedCounter
    from .queues import JoinableQueue, Queue, SimpleQueue
    from .saga import Saga
    from .scheduling import (
        DurableKeyedQueue,
        DurablePriorityQueue,
        KeyedConsumer,
        KeyedQueue,
        PriorityQueue,
    )
    from .txn import (
        Coordinator,
        LogParticipant,
        OffsetParticipant,
        Participant,
        ParticipantServer,
        RemoteParticipant,
        StoreParticipant,
        Transaction,
    )
    from .versions import Deduplicator, VersionedStore, VersionGate
