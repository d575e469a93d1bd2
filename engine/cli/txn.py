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
import time
from typing import Any, Dict, List


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


def _when(ns: int) -> str:
    if not ns:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ns / 1e9)) + "Z"


def summarize(path: str, limit: int = 20, stale: float = 60.0) -> Dict[str, Any]:
    """What ``txn ls`` shows, as a dict: ``kind``, ``in_doubt`` and ``recent`` lists."""
    from engine.txn import read_journal

    cur, recs = read_journal(path, meta=True)
    kind = cur["kind"]
    doubt: List[Dict[str, Any]] = []
    recent: List[Dict[str, Any]] = []
    out: Dict[str, Any] = {"path": path, "kind": kind, "id": cur["id"], "generation": cur["gen"]}
    if kind == "coordinator":
        pending: Dict[str, Dict[str, Any]] = {}
        inc = 0
        for _off, ts, rec in recs:
            if rec[0] == "I":
                inc = max(inc, rec[1])
            elif rec[0] == "C":
                pending[rec[1]] = {
                    "txid": rec[1],
                    "state": "not ended",
                    "time": ts,
                    "participants": list(rec[2]),
                }
            elif rec[0] == "E":
                for t in rec[1]:
                    e = pending.pop(t, None)
                    if e is not None:
                        e["state"] = "committed"
                        e["ended"] = ts
                        recent.append(e)
        doubt = list(pending.values())
        out["incarnation"] = inc
        out["stale"] = len(doubt)
    else:
        prepared: Dict[str, Dict[str, Any]] = {}
        for _off, ts, rec in recs:
            if rec[0] == "P":
                ops = rec[2]
                n = (
                    len(ops[0])
                    if isinstance(ops, tuple) and ops and isinstance(ops[0], list)
                    else (len(ops) if isinstance(ops, list) else 1)
                )
                prepared[rec[1]] = {"txid": rec[1], "state": "prepared", "time": ts, "ops": n}
            elif rec[0] == "C" and rec[1] in prepared:
                # a commit mark: decided commit; the participant finishes it itself
                e = prepared.pop(rec[1])
                e["state"] = "committed"
                e["start_offset"] = rec[2]
                e["ended"] = ts
                recent.append(e)
            elif rec[0] in ("A", "D"):
                for t in [rec[1]] if rec[0] == "A" else rec[1]:
                    e = prepared.pop(t, None)
                    if e is not None:
                        e["state"] = "aborted" if rec[0] == "A" else "committed"
                        e["ended"] = ts
                        recent.append(e)
        doubt = list(prepared.values())
        now = time.time_ns()
        out["stale"] = sum(1 for e in doubt if now - e["time"] > stale * 1e9)
    out["in_doubt"] = doubt
    out["recent"] = recent[-limit:] if limit > 0 else []
    return out


def _ls(args: argparse.Namespace) -> int:
    from engine.errors import EngineError

    try:
        info = summarize(args.path, args.limit, args.stale)
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
        print(f"  {e['txid']:<28} {e['state']:<11} {_when(e['time'])}  {extra}")
    print(
        f"recent: {len(info['recent'])}"
        + (" (aborts leave no record: presumed abort)" if info["kind"] == "coordinator" else "")
    )
    for e in info["recent"]:
        print(f"  {e['txid']:<28} {e['state']:<11} {_when(e['time'])}")
    return 3 if info["stale"] else 0
