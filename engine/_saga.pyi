"""Type stub for engine._saga (compiled from pyx/saga.pyx): the forward steps
of :mod:`engine.saga` (StepContext, the state they change, the default
codec's record templates and the loop that runs a plain saga's steps).

Hand-written: keep it in step with pyx/saga.pyx (tests run mypy over it).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, FrozenSet, List, Optional, Set, Tuple, final

T_BEGIN: bytes
T_START: bytes
T_CSTART: bytes
T_DONE: bytes
T_CDONE: bytes
T_END_DONE: bytes
PLAIN: FrozenSet[type]

def json_value(v: Any, dumps: Callable[[Any], bytes]) -> bytes:
    """``dumps(v)``, without the encoder for ints, strs and None."""

@final
class StepContext:
    """What an action or a compensation is called with.

    ``saga_id``; ``step`` (its name); ``key`` (``"<saga id>:<step>"``, the
    idempotency key, stable across retries, crashes and processes); ``ctx``
    (the saga's context); ``attempt`` (1, 2, ... across crashes too);
    ``results`` (step name -> result of the steps completed so far);
    ``result`` (compensations only: this step's action result, or ``None`` when
    the action's outcome is not known); ``compensating`` (True in a compensation).
    """

    saga_id: str
    step: str
    key: str
    ctx: Any
    attempt: int
    results: Dict[str, Any]
    result: Any
    compensating: bool
    def __init__(
        self,
        saga_id: str,
        step: str,
        ctx: Any,
        attempt: int,
        results: Dict[str, Any],
        result: Any = None,
        compensating: bool = False,
    ) -> None: ...

@final
class _Mutex:
    """A lock with ``threading.Lock``'s interface."""

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool: ...
    def release(self) -> None: ...
    def locked(self) -> bool: ...
    def __enter__(self) -> bool: ...
    def __exit__(self, *exc: object) -> bool: ...

class RunCore:
    """The state of one saga (engine.saga._Run adds the fold of its records
    and the views of it)."""

    id: str
    ctx: Any
    steps: List[str]
    state: Any
    results: Dict[str, Any]
    done: Set[str]
    uncertain: Set[str]
    inflight: Set[str]
    attempts: Dict[str, int]
    comp_done: Set[str]
    comp_order: List[str]
    comp_inflight: Set[str]
    comp_attempts: Dict[str, int]
    error: Optional[str]
    failed_step: Optional[str]
    stuck_step: Optional[str]
    n_attempts: int
    begin_offset: int
    begun_ns: int
    updated_ns: int
    lock: _Mutex
    pending: List[bytes]
    pending_kinds: List[str]
    key: bytes
    jid: bytes
    exc: Optional[BaseException]
    driving: bool
    def __init__(
        self, saga_id: str, ctx: Any, steps: List[str], offset: int, ts: int, state: Any
    ) -> None: ...
    def started(self, s: str, a: int) -> None:
        """A ``start`` record: attempt ``a`` of step ``s``'s action is in flight."""
    def succeeded(self, s: str, r: Any) -> None:
        """A ``done`` record: step ``s``'s action returned ``r``."""

def append_pending(saga: Any, run: RunCore) -> Tuple[int, List[bytes], str]:
    """Holding ``run.lock``: append every queued record of ``run`` in one
    ``append_many``; returns the end of the append, the records and, while
    crash points are armed, their kinds."""

def wrote(saga: Any, key: bytes, end: int, batch: List[bytes], kinds: str) -> None:
    """After ``append_pending``, the saga's lock released: return once the
    append is durable, then publish it to the saga's ``events``."""

def forward(
    saga: Any, run: RunCore, steps: List[Any], loop: Any
) -> Optional[Tuple[str, BaseException]]:
    """The forward steps of a plain saga; the first failure (step, error) or None."""
