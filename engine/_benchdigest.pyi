"""Type stub for engine._benchdigest (compiled from pyx/benchdigest.pyx):
the benchmark harness's delivery digest in C (engine.bench.harness.digest)."""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

def digest_list(
    messages: List[Any], weights: Any
) -> Optional[Tuple[int, int, Optional[bool]]]:
    """``(count, checksum, in_order)`` of ``messages`` (bytes-like, in the
    order received), or ``None`` when they are not all of one non-zero size
    (the caller's numpy path handles those).  ``weights`` has one weight per
    8-byte word of the size."""

def digest_rows(rows: Any, weights: Any) -> Tuple[int, int, Optional[bool]]:
    """``(count, checksum, in_order)`` of a C-contiguous ``(n, size)`` uint8
    array, one message per row (``n`` >= 1, ``size`` >= 1)."""
