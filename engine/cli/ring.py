"""``queue-engine ring``: list, inspect and remove shared rings.

``ring ls`` lists the regions under /dev/shm that carry the ring magic,
``ring stats NAME`` prints one ring's statistics (``--json`` for a machine),
``ring unlink NAME`` removes a region (refusing files that are not rings).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("ring", help="list, inspect and remove shared-memory rings")
    sub = p.add_subparsers(dest="ring_command", metavar="ACTION")
    sub.required = True

    ls = sub.add_parser("ls", help="list the rings under /dev/shm")
    ls.add_argument("--json", action="store_true", help="one JSON object per line")
    ls.set_defaults(func=_ls)

    st = sub.add_parser("stats", help="print a ring's statistics")
    st.add_argument("name", help="ring name (as given to Ring.create)")
    st.add_argument("--json", action="store_true", help="print JSON")
    st.set_defaults(func=_stats)

    un = sub.add_parser("unlink", help="remove a ring region (processes that map it keep it)")
    un.add_argument("name", help="ring name")
    un.add_argument("--missing-ok", action="store_true", help="no error if it does not exist")
    un.set_defaults(func=_unlink)


def _ls(args: argparse.Namespace) -> int:
    from engine._ring import list_rings

    rings = list_rings()
    if args.json:
        for r in rings:
            print(json.dumps(r))
        return 0
    if not rings:
        print("no rings")
        return 0
    print(f"{'NAME':<40} {'MODE':<10} {'CAPACITY':>12} {'CONSUMERS':>9}")
    for r in rings:
        print(f"{r['name']:<40} {r['mode']:<10} {r['capacity']:>12} {r['max_consumers']:>9}")
    return 0


def _stats(args: argparse.Namespace) -> int:
    import engine
    from engine.errors import IncompatibleRegion

    try:
        with engine.Ring.attach(args.name) as ring:
            st = ring.stats()
    except (IncompatibleRegion, ValueError) as exc:
        print(f"queue-engine ring stats: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(st))
        return 0
    for key, value in st.items():
        if key != "consumers":
            print(f"{key:>16}: {value}")
    for c in st["consumers"]:
        print(
            f"  consumer slot {c['slot']}: pid {c['pid']}{'' if c['alive'] else ' (dead)'}, "
            f"lag {c['lag_bytes']} B, got {c['messages_got']}, waits {c['waits']}"
        )
    return 0


def _unlink(args: argparse.Namespace) -> int:
    import engine
    from engine.errors import IncompatibleRegion

    try:
        engine.Ring.unlink(args.name, missing_ok=args.missing_ok)
    except (FileNotFoundError, IncompatibleRegion, ValueError) as exc:
        print(f"queue-engine ring unlink: {exc}", file=sys.stderr)
        return 1
    return 0
