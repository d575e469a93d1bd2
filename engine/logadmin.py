"""Read-only administration of a log directory: its stats and its consumer
groups, from any process, without the writer's lock.

``queue-engine log stats`` and ``engine.metrics.LogDirectory`` both report
:func:`log_stats`; ``queue-engine log groups`` reports :func:`group_offsets`.
"""

from __future__ import annotations

import os
from typing import Any, Dict

__all__ = ["group_offsets", "log_stats"]


def group_offsets(path: str) -> Dict[str, int]:
    """``{group: committed offset}`` of every consumer group of the log at
    ``path`` that has committed; unreadable group files are left out."""
    from engine import LogReader

    out: Dict[str, int] = {}
    gdir = os.path.join(path, "groups")
    if not os.path.isdir(gdir):
        return out
    for name in sorted(os.listdir(gdir)):
        if name.startswith("."):
            continue
        try:
            c = LogReader(path, group=name).committed()
        except (ValueError, OSError):
            continue
        if c is not None:
            out[name] = c
    return out


def log_stats(path: str) -> Dict[str, Any]:
    """Offsets, segments, bytes on disk, damaged segments and every group's
    committed offset and lag.  Verifies every segment (a CRC pass over the
    data); raises ``FileNotFoundError`` when ``path`` is not a directory."""
    from engine._log import verify

    if not os.path.isdir(path):
        raise FileNotFoundError(2, "no log directory here", path)
    results = verify(path)
    nxt = results[-1].next_offset if results else 0
    start = results[0].base_offset if results else 0
    size = 0
    for r in results:
        try:
            size += os.path.getsize(r.segment)
        except OSError:  # retention removed it meanwhile
            pass
    return {
        "path": path,
        "segments": len(results),
        "start_offset": start,
        "next_offset": nxt,
        "records": nxt - start,
        "disk_bytes": size,
        "damaged_segments": sum(1 for r in results if r.error),
        "groups": {
            g: {"committed": c, "lag": max(0, nxt - c)} for g, c in group_offsets(path).items()
        },
    }
