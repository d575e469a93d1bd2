"""``queue-engine saga ls PATH``: the sagas recorded in a saga log directory.

Shows each saga's state (running, compensating, done, compensated, stuck), the
step it is at, how many of its steps completed, its attempts and last error,
plus a count per state. Reads only: safe while the sagas run in another
process (a saga whose process died also shows as running or compensating until
``Saga.recover`` finishes it). The exit status is 0, or 3 when a saga is stuck
(so a cron job can alert on it), 1 when PATH cannot be read.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, List

from engine.cli import when_utc

_STATES = ("running", "compensating", "done", "compensated", "stuck")


def register(subparsers: Any) -> None:
    """Add the ``saga`` sub-command to the ``queue-engine`` parser."""
    p = subparsers.add_parser("saga", help="inspect saga logs (running, compensating, stuck...)")
    sub = p.add_subparsers(dest="saga_command", metavar="ACTION")
    sub.required = True
    ls = sub.add_parser(
        "ls",
        help="list the sagas of a saga log: running, compensating, finished and stuck",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
    )
    ls.add_argument("path", help="the saga log directory (the path given to engine.Saga)")
    ls.add_argument(
        "--state",
        action="append",
        choices=_STATES,
        help="only sagas in this state (repeatable)",
    )
    ls.add_argument(
        "--unfinished",
        action="store_true",
        help="only running, compensating and stuck sagas",
    )
    ls.add_argument("--limit", type=int, default=None, help="only the N most recent sagas")
    ls.add_argument("--json", action="store_true", help="one JSON object per line")
    ls.set_defaults(func=_ls)


def _ls(args: argparse.Namespace) -> int:
    from engine.errors import EngineError
    from engine.saga import list_sagas

    try:
        infos = list_sagas(args.path)
    except (EngineError, OSError, ValueError) as exc:
        print(f"queue-engine saga ls: cannot read {args.path!r}: {exc}", file=sys.stderr)
        return 1
    counts = {s: 0 for s in _STATES}
    for i in infos:
        counts[i.state.value] += 1
    shown: List[Any] = infos
    if args.unfinished:
        shown = [i for i in shown if not i.state.finished]
    if args.state:
        shown = [i for i in shown if i.state.value in args.state]
    if args.limit is not None:
        shown = shown[-args.limit :] if args.limit > 0 else []
    if args.json:
        for i in shown:
            print(json.dumps(i.as_dict()))
    else:
        print(
            f"{'SAGA':32}  {'STATE':12}  {'STEP':16}  {'DONE':>5}  {'TRIES':>5}  {'UPDATED':20}  ERROR"
        )
        for i in shown:
            step = i.current or "-"
            done = f"{len(i.done)}/{len(i.steps)}"
            err = (i.error or "").replace("\n", " ")
            if len(err) > 60:
                err = err[:57] + "..."
            print(
                f"{i.saga_id[:32]:32}  {i.state.value:12}  {step[:16]:16}  {done:>5}  "
                f"{i.attempts:>5}  {when_utc(i.updated_ns):20}  {err}"
            )
        summary = ", ".join(f"{counts[s]} {s}" for s in _STATES)
        print(f"{len(infos)} sagas: {summary}")
    return 3 if counts["stuck"] else 0
