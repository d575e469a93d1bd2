"""Administration of a log directory from any process, without the writer's
lock: its stats and its consumer groups (list, describe, reset).

``queue-engine log stats`` and ``engine.metrics.LogDirectory`` both report
:func:`log_stats`; ``queue-engine log groups`` is a thin layer over
:func:`group_offsets`, :func:`describe_group` and :func:`reset_group`.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional

__all__ = ["describe_group", "group_offsets", "log_stats", "reset_group"]


def group_offsets(path: str) -> Dict[str, int]:
    """``{group: committed offset}`` of every consumer group of the log at
    ``path`` that has committed."""
    from engine._log import read_groups

    return {name: off for name, (off, _epoch) in read_groups(path).items()}


def _end_offset(path: str) -> int:
    from engine._log import verify

    results = verify(path)
    return results[-1].next_offset if results else 0


def describe_group(path: str, group: str) -> Dict[str, Any]:
    """One group of the log at ``path``: its committed offset (None if it
    never committed), the log's end, the lag, and whether a reader of the
    group is open now (``in_use``)."""
    from engine._log import group_in_use, read_group

    if not os.path.isdir(path):
        raise FileNotFoundError(2, "no log directory here", path)
    got = read_group(path, group)
    end = _end_offset(path)
    committed = None if got is None else got[0]
    return {
        "path": path,
        "group": group,
        "committed": committed,
        "end_offset": end,
        "lag": None if committed is None else max(0, end - committed),
        "in_use": group_in_use(path, group),
    }


def reset_group(
    path: str,
    group: str,
    *,
    to_offset: Optional[int] = None,
    to_time: Optional[int] = None,
    to_end: bool = False,
) -> int:
    """Move ``group`` so its next read starts at ``to_offset``, at the first
    record stamped at or after ``to_time`` (ns since the epoch; the end if
    none is), or at the log's end (``to_end``).  Exactly one of the three.
    Refuses with ``EngineError`` while a reader of the group is open.
    Returns the offset the group now resumes at."""
    from engine._log import LogReader
    from engine._log import reset_group as _reset

    if sum(x is not None and x is not False for x in (to_offset, to_time, to_end)) != 1:
        raise ValueError("give exactly one of to_offset, to_time, to_end")
    if to_offset is not None:
        target = to_offset
    elif to_time is not None:
        with LogReader(path) as r:
            target = r.seek_time(to_time)
    else:
        target = _end_offset(path)
    _reset(path, group, target)
    return target


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
