"""``queue-engine stats [--prometheus] [LOGDIR ...]``: the stats of every
shared ring under /dev/shm (as ``queue-engine ring ls`` finds them) and of the
log directories given, as JSON (default) or as OpenMetrics text
(``--prometheus``: the names ``engine.metrics`` exposes, e.g.
``engine_ring_messages_put_total{name="orders"}``), for a textfile collector
or a quick look. Read-only: attaching a ring registers nothing, and a log is
read without the writer's lock.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, List, Tuple


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "stats", help="stats of the shared rings and of log directories (JSON or OpenMetrics)"
    )
    p.add_argument("logs", nargs="*", metavar="LOGDIR", help="log directories to include")
    p.add_argument(
        "--prometheus", action="store_true", help="print OpenMetrics text instead of JSON"
    )
    p.add_argument("--no-rings", action="store_true", help="leave out the shared rings")
    p.set_defaults(func=_stats)


def _objects(args: argparse.Namespace) -> Tuple[List[Tuple[Any, str]], List[Any], int]:
    import engine
    from engine._ring import list_rings
    from engine.metrics import LogDirectory

    objs: List[Tuple[Any, str]] = []
    opened: List[Any] = []
    rc = 0
    if not args.no_rings:
        for info in list_rings():
            try:
                ring = engine.Ring.attach(info["name"])
            except (engine.EngineError, ValueError, OSError) as exc:
                print(f"queue-engine stats: ring {info['name']}: {exc}", file=sys.stderr)
                continue
            opened.append(ring)
            objs.append((ring, info["name"]))
    for path in args.logs:
        try:
            objs.append((LogDirectory(path), path))
        except OSError as exc:
            print(f"queue-engine stats: {exc}", file=sys.stderr)
            rc = 1
    return objs, opened, rc


def _stats(args: argparse.Namespace) -> int:
    from engine.cli import error_line
    from engine.errors import EngineError
    from engine.metrics import families, openmetrics_text

    objs, opened, rc = _objects(args)
    try:
        if args.prometheus:
            try:
                fams = families(objs)
            except EngineError as exc:  # a damaged log: say which, print nothing half-done
                print(f"queue-engine stats: {error_line(exc)}", file=sys.stderr)
                return 1
            sys.stdout.write(openmetrics_text(fams))
            return rc
        out = {}
        for obj, name in objs:
            try:
                out[name] = obj.stats()
            except (EngineError, OSError) as exc:
                out[name] = {"error": str(exc)}
                print(f"queue-engine stats: {name}: {error_line(exc)}", file=sys.stderr)
                rc = 1
        print(json.dumps(out, indent=1, default=str))
        return rc
    finally:
        for ring in opened:
            ring.close()
