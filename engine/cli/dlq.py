"""``queue-engine dlq ls|show|replay|purge PATH``: the dead letters of a
durable queue (the messages its consumers failed ``max_deliveries`` times;
see ``engine.deadletters``).

PATH is the queue's directory (the ``path=`` of the durable PriorityQueue or
KeyedQueue); its dead letters are in ``PATH/dlq``. ``ls`` lists the pending
ones (``--all``: also those replayed or purged), with their deliveries and
last reason; ``show`` prints one, payload included; ``replay`` puts the
pending ones back at the tail of their level or partition, as new messages
(stop the queue's producer first: replay appends to its logs), and can be
run again after a crash without duplicating any; ``purge`` drops them.
``ls`` and ``show`` only read: safe while the queue runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from engine.cli import when_utc

_DURABILITIES = ("always", "interval", "none")


def register(subparsers: Any) -> None:
    """Add the ``dlq`` sub-command to the ``queue-engine`` parser."""
    p = subparsers.add_parser("dlq", help="dead letters of a durable queue: list, show, replay, purge",
                              description=__doc__.split("\n\n", 1)[1] if __doc__ else None)
    sub = p.add_subparsers(dest="dlq_command", metavar="ACTION")
    sub.required = True

    ls = sub.add_parser("ls", help="list the pending dead letters (deliveries, last reason)")
    ls.add_argument("path", help="the durable queue's directory")
    ls.add_argument("--all", action="store_true", help="also those already replayed or purged")
    ls.add_argument("--json", action="store_true", help="one JSON object per line")
    ls.set_defaults(func=_ls)

    show = sub.add_parser("show", help="one dead letter with its payload and delivery times")
    show.add_argument("path", help="the durable queue's directory")
    show.add_argument("which", help="its offset in the dead-letter log (from ls) or its message id")
    show.add_argument("--json", action="store_true", help="one JSON object (payload as hex and text)")
    show.set_defaults(func=_show)

    rp = sub.add_parser("replay", help="put the pending dead letters back into the queue (idempotent)")
    rp.add_argument("path", help="the durable queue's directory (its producer must be stopped)")
    rp.add_argument("--limit", type=int, default=None, help="replay at most N (the oldest first)")
    rp.add_argument("--durability", choices=_DURABILITIES, default="always",
                    help="of the appends to the queue's logs")
    rp.add_argument("--json", action="store_true", help="print the result as one JSON object")
    rp.set_defaults(func=_replay)

    pg = sub.add_parser("purge", help="drop the pending dead letters")
    pg.add_argument("path", help="the durable queue's directory")
    pg.add_argument("--before", type=int, default=None, help="only those below this dead-letter offset")
    pg.add_argument("--json", action="store_true", help="print the result as one JSON object")
    pg.set_defaults(func=_purge)


def _one_line(text: Any, width: int) -> str:
    s = " ".join(str(text).split()) if text is not None else "-"
    return s if len(s) <= width else s[:width - 3] + "..."


def _ls(args: argparse.Namespace) -> int:
    from engine.deadletters import list_letters

    letters = list_letters(args.path, include_done=args.all)
    if args.json:
        for d in letters:
            print(json.dumps(d.as_dict()))
        return 0
    print(f"{'OFFSET':>8}  {'SOURCE':6}  {'AT':>4}  {'DELIVERIES':>10}  {'DEAD AT':20}  {'SIZE':>8}  REASON")
    for d in letters:
        print(f"{d.offset:>8}  {d.source:6}  {d.target:>4}  {d.deliveries:>10}  {when_utc(d.dead_at):20}  "
              f"{len(d.payload):>8}  {_one_line(d.reason, 60)}")
    print(f"{len(letters)} {'dead letters' if args.all else 'pending dead letters'}")
    return 0


def _show(args: argparse.Namespace) -> int:
    from engine.deadletters import show_letter

    which: Any = int(args.which) if args.which.isdigit() else args.which
    try:
        d = show_letter(args.path, which)
    except KeyError:
        print(f"queue-engine dlq show: no dead letter {args.which!r} in {args.path!r}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(d.as_dict(payload=True)))
        return 0
    print(f"offset:       {d.offset}")
    print(f"id:           {d.id}")
    print(f"queue:        {d.kind}, {'level' if d.kind == 'priority' else 'partition'} {d.target} (log {d.source})")
    print(f"enqueued:     {when_utc(d.enqueued_at)}")
    print(f"deliveries:   {d.deliveries}")
    for t in d.delivered_at:
        print(f"  delivered   {when_utc(t)}  ({t} ns)")
    print(f"dead since:   {when_utc(d.dead_at)}")
    print(f"last reason:  {d.reason if d.reason is not None else '-'}")
    try:
        text = d.payload.decode("utf-8")
        print(f"payload:      {len(d.payload)} bytes: {text!r}")
    except UnicodeDecodeError:
        print(f"payload:      {len(d.payload)} bytes (hex): {d.payload.hex()}")
    return 0


def _replay(args: argparse.Namespace) -> int:
    from engine.deadletters import replay

    report = replay(args.path, durability=args.durability, limit=args.limit)
    if args.json:
        print(json.dumps(report.as_dict()))
    else:
        print(f"replayed {report.replayed} dead letters into {args.path}"
              + (f" ({report.recovered} already put back by an interrupted replay)" if report.recovered else ""))
    return 0


def _purge(args: argparse.Namespace) -> int:
    from engine.deadletters import purge

    n = purge(args.path, before=args.before)
    if args.json:
        print(json.dumps({"purged": n}))
    else:
        print(f"purged {n} dead letters from {args.path}")
    return 0
