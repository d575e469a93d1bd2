"""``queue-engine txn ls PATH``: in-doubt and recent transactions of a 2PC journal.

PATH is a coordinator's directory (the path given to ``engine.Coordinator``)
or a participant's journal (``<log>.txn``, or the ``state_path`` given to a
participant).  Reads only: safe while the owner runs in another process.

For a coordinator: transactions with a commit record and no end record yet
(*not ended*: some participant has not acknowledged and the coordinator's
``recover()`` resends commit, or the end record is still in the batch a live
coordinator writes every ``end_batch`` transactions), then the most recent
ended (committed) ones.  Aborted transactions leave no record (presumed abort).

For a participant: transactions *prepared* with no outcome recorded (in
doubt until the coordinator decides; done records are written in batches, so
a very recent one may be committed already, and after a crash opening the
participant sees applied effects in the resource and settles them), then
recent commits and aborts.

Exit status 0; 3 when a coordinator has unfinished transactions or a
participant has prepared ones older than ``--stale`` seconds (so a cron job
can alert); 1 when PATH is not a journal.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from engine.cli import when_utc


def register(subparsers: Any) -> None:
    """Add the ``txn`` sub-command to the ``queue-engine`` parser."""
    p = subparsers.add_parser("txn", help="inspect two-phase-commit journals (in-doubt, recent)")
    sub = p.add_subparsers(dest="txn_command", metavar="ACTION")
    sub.required = True
    ls = sub.add_parser(
        "ls",
        help="list in-doubt and recent transactions of a coordinator or participant journal",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
    )
    ls.add_argument("path", help="a Coordinator directory or a participant journal")
    ls.add_argument(
        "--limit", type=int, default=20, help="recent transactions to show"
    )
    ls.add_argument("--json", action="store_true", help="one JSON object per line")
    ls.add_argument(
        "--stale",
        type=float,
        default=60.0,
        help="participant journals: a prepared txn older than this many seconds "
        "counts as in doubt for the exit status",
    )
    ls.set_defaults(func=_ls)


def _ls(args: argparse.Namespace) -> int:
    from engine.errors import EngineError
    from engine.txn import summarize_journal

    try:
        info = summarize_journal(args.path, args.limit, args.stale)
    except (OSError, EngineError) as exc:
        print(f"queue-engine txn ls: {exc}", file=sys.stderr)
        return 1
    if args.json:
        for e in info["in_doubt"] + info["recent"]:
            print(json.dumps(e))
        return 3 if info["stale"] else 0
    print(
        f"{info['kind']} journal {info['path']} (id {info['id'][:12]}, "
        f"generation {info['generation']}"
        + (f", incarnation {info['incarnation']})" if "incarnation" in info else ")")
    )
    label = (
        "committed, not ended (unacknowledged, or its end record is still batched)"
        if info["kind"] == "coordinator"
        else "in doubt or unfinished"
    )
    print(f"{label}: {len(info['in_doubt'])}")
    for e in info["in_doubt"]:
        extra = ", ".join(e.get("participants", [])) or f"{e.get('ops', '?')} op(s)"
        print(f"  {e['txid']:<28} {e['state']:<11} {when_utc(e['time'])}  {extra}")
    print(
        f"recent: {len(info['recent'])}"
        + (" (aborts leave no record: presumed abort)" if info["kind"] == "coordinator" else "")
    )
    for e in info["recent"]:
        print(f"  {e['txid']:<28} {e['state']:<11} {when_utc(e['time'])}")
    return 3 if info["stale"] else 0
