"""Type stub for engine._txn (compiled from pyx/txn.pyx): the per-transaction
paths of :mod:`engine.txn` (Transaction, and the cores its Coordinator,
journals and participants subclass).

Hand-written: keep it in step with pyx/txn.pyx (tests run mypy over it).
"""

from __future__ import annotations

from collections import deque
from typing import (
    Any,
    Callable,
    Dict,
    Iterable,
    List,
    Literal,
    Optional,
    Sequence,
    Set,
    Tuple,
    final,
)

@final
class _Mutex:
    """A lock with ``threading.Lock``'s interface."""

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool: ...
    def release(self) -> None: ...
    def locked(self) -> bool: ...
    def __enter__(self) -> bool: ...
    def __exit__(self, *exc: object) -> Literal[False]: ...

REC_INCARNATION: str
REC_DECISION: str
REC_ENDED: str
REC_PREPARED: str
REC_MARK: str
REC_ABORTED: str
REC_DONE: str
REC_REDO: str
JOURNAL_FORMAT: int

def _set_crash_hook(hook: Optional[Callable[[str, Optional[str]], None]]) -> None: ...
def _encode(rec: Tuple[Any, ...]) -> bytes: ...
def _encode_record(kind: str, txid: str, body: Any) -> bytes: ...
def _decode_record(raw: Any, coordinator: bool) -> Tuple[Any, ...]: ...
def _journal_append(journal: _JournalCore, log: Any, rec: Tuple[Any, ...], durable: bool = True) -> None: ...
def _trust(*classes: type) -> None: ...
def _split_commits(cls: type) -> None: ...
def _as_bytes(x: Any, what: str) -> bytes: ...

class _JournalCore:
    log: Any
    sync: bool
    appended: int

@final
class Transaction:
    """One transaction of a :class:`engine.txn.Coordinator` (``coord.transaction()``)."""

    @property
    def txid(self) -> str: ...
    @property
    def _coord(self) -> _CoordCore: ...
    deadline: float
    state: str
    reason: Optional[str]
    _parts: Dict[Any, List[Any]]
    _doomed: bool
    def __init__(self, coord: _CoordCore, txid: str, deadline: float) -> None: ...
    def enlist(self, participant: Any, ops: Iterable[Any]) -> Transaction: ...
    def add(self, participant: Any, ops: Iterable[Any]) -> Transaction: ...
    @property
    def participants(self) -> List[Any]: ...
    def commit(self) -> None: ...
    def abort(self, reason: str = ...) -> None: ...
    def __enter__(self) -> Transaction: ...
    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None: ...

class _CoordCore:
    timeout: float
    _end_batch: int
    _compact_records: int
    @property
    def _lock(self) -> _Mutex: ...
    _journal: Any
    _pending: Dict[str, Tuple[str, ...]]
    _active: Dict[str, Transaction]
    _deciding: Dict[str, Tuple[str, ...]]
    _finishing: Set[str]
    _ended: List[str]
    _participants: Dict[str, Any]
    _registered: Optional[List[Any]]
    _recent: deque[Tuple[str, str, float]]
    _closed: bool
    stats_committed: int
    stats_aborted: int
    _inc: int
    _seq: int
    _prefix: str
    _redo_on: bool
    _redo: Dict[str, Tuple[Tuple[str, int, List[bytes], Optional[List[Optional[bytes]]]], ...]]
    _redo_unsynced: List[str]
    _redo_logs: Dict[int, List[Any]]
    _redo_stale: Set[str]
    def _redo_settle(self, force: bool) -> int: ...
    def transaction(self, timeout: Optional[float] = None) -> Transaction: ...
    def _commit(self, tx: Transaction) -> None: ...
    def _complete(self, txid: str, parts: Sequence[Any]) -> bool: ...
    def _stop_helper(self) -> None: ...

class _PartCore:
    name: str
    @property
    def _lock(self) -> _Mutex: ...
    _journal: Any
    _doubt: Dict[str, Any]
    _marks: Dict[str, Any]
    _done: List[str]
    _closed: bool
    _compact_records: int
    def prepare(self, txid: str, ops: Sequence[Any]) -> bool: ...
    def commit(self, txid: str) -> None: ...
    def _commit_many_py(self, txids: List[str]) -> List[Optional[BaseException]]: ...

class _LogPartCore(_PartCore):
    log: Any
    @property
    def _commit_lock(self) -> _Mutex: ...
    _commit_queue: List[List[Any]]
    _leader: bool
    _reserved: int
    @property
    def _redo_log(self) -> bool: ...
    def _settle(self) -> None: ...
    def _check(self, txid: str, ops: Sequence[Any]) -> Any: ...
