"""``queue-engine backup SRC DST``: a consistent copy of a data directory while
its writers keep appending (``engine.backup``).

SRC may hold logs, VersionedStores, a Coordinator and its participants,
Saga logs, durable queues and consumer-group offsets; the copy is one state
of all of them at one instant, every log cut at a record boundary and checked
with the CRC scan of ``log verify``.  Restore by opening DST.  DST must be
missing or empty; ``--incremental`` updates an earlier backup in DST, copying
only new segments and new bytes.  Progress goes to stderr for large copies;
the closing line gives the copy's throughput.  Exit status 1 when the source
is damaged (CorruptLog) or DST is unsuitable.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

_PROGRESS_MIN = 256 << 20  # copies smaller than this show no progress line


def register(subparsers: Any) -> None:
    """Add the ``backup`` sub-command to the ``queue-engine`` parser."""
    p = subparsers.add_parser(
        "backup",
        help="consistent online copy of a data directory (restore: open the copy)",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
    )
    p.add_argument("src", help="the data directory to copy (writers may keep running)")
    p.add_argument("dst", help="where the copy goes: missing or empty, or an earlier backup with --incremental")
    p.add_argument("--incremental", action="store_true",
                   help="update the earlier backup in DST: copy only new segments and new bytes")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object on stdout")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress and no closing line")
    p.set_defaults(func=_backup)


class _Progress:
    """Rewrites one stderr line at most a few times a second."""

    def __init__(self) -> None:
        self.last = 0.0
        self.shown = False

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if total < _PROGRESS_MIN or (now - self.last < 0.25 and done < total):
            return
        self.last = now
        self.shown = True
        pct = 100.0 * done / total if total else 100.0
        print(f"\rbackup: {done / 1e6:,.0f} of {total / 1e6:,.0f} MB ({pct:.0f}%)",
              end="", file=sys.stderr, flush=True)

    def end(self) -> None:
        if self.shown:
            print(file=sys.stderr)


def _backup(args: argparse.Namespace) -> int:
    from engine.backups import backup

    prog = None if args.quiet else _Progress()
    try:
        report = backup(args.src, args.dst, incremental=args.incremental, progress=prog)
    finally:
        if prog is not None:
            prog.end()
    if args.json:
        print(json.dumps(report.as_dict()))
    elif not args.quiet:
        print(
            f"backup of {report.src} -> {report.dst}: {report.logs} logs ({report.journals} journals), "
            f"{report.records} records, {report.files} other files, cut at {report.cut_ns} ns; "
            f"copied {report.bytes_copied / 1e6:,.1f} MB of {report.bytes_total / 1e6:,.1f} MB "
            f"({report.segments_kept} segments kept) in {report.copy_seconds:.3f} s = "
            f"{report.throughput / 1e9:.2f} GB/s; verified {report.verified_segments} segments; "
            f"{report.seconds:.2f} s in all",
            file=sys.stderr,
        )
    return 0
