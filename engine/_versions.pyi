"""Type stub for engine._versions (compiled from pyx/versions.pyx): the hot
path of :class:`engine.VersionedStore`.

Hand-written: keep it in step with pyx/versions.pyx (tests run mypy over it).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Literal, Optional, Tuple, Union, final

_Key = Union[bytes, str]
_MergeFn = Callable[[bytes, Optional[bytes], bytes], Optional[bytes]]

def _norm_key(key: Any) -> bytes: ...
def _norm_value(value: Any) -> bytes: ...

@final
class _Mutex:
    """The store's lock (``threading.Lock``'s interface)."""

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool: ...
    def release(self) -> None: ...
    def locked(self) -> bool: ...
    def __enter__(self) -> bool: ...
    def __exit__(self, *exc: object) -> Literal[False]: ...

class _StoreCore:
    """State and hot path of a VersionedStore (subclassed by it)."""

    _data: Dict[bytes, Tuple[int, bytes]]
    _append: Callable[..., int]
    _sync_log: Any
    _snap_at: int
    _closed: bool
    _broken: Optional[BaseException]
    @property
    def _lock(self) -> _Mutex: ...
    def _check_broken(self) -> None: ...
    def _note_broken(self, exc: BaseException) -> None: ...
    def get(self, key: _Key) -> Tuple[int, Optional[bytes]]: ...
    def put(
        self,
        key: _Key,
        value: Any,
        expected_version: Optional[int] = None,
        merge: Optional[_MergeFn] = None,
    ) -> int: ...
    def _wait_durable(self, off: int) -> None: ...
    def __len__(self) -> int: ...
    def __contains__(self, key: object, /) -> bool: ...
