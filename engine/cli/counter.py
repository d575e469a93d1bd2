"""``queue-engine counter``: inspect shared counters and counter maps.

``counter show NAME`` prints a counter's value (or a map's keys, largest
first); ``counter ls`` lists the counter regions under /dev/shm.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("counter", help="inspect shared sharded counters and counter maps")
    sub = p.add_subparsers(dest="counter_command", metavar="ACTION")
    sub.required = True

    show = sub.add_parser("show", help="print a counter's value or a counter map's entries")
    show.add_argument("name", help="shared region name (as given to ShardedCounter.create)")
    show.add_argument("--top", type=int, default=50, help="map: show the N largest")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(func=_show)

    ls = sub.add_parser("ls", help="list counter regions under /dev/shm")
    ls.add_argument("--json", action="store_true", help="one JSON object per line")
    ls.set_defaults(func=_ls)


def _key_text(key: Any) -> str:
    return key if isinstance(key, str) else repr(key)


def _show(args: argparse.Namespace) -> int:
    from engine.counters import CounterMap, ShardedCounter, read_header
    from engine.errors import IncompatibleRegion

    try:
        info = read_header(args.name)
        if info["kind"] == "ShardedCounter":
            with ShardedCounter.attach(args.name) as c:
                st = c.stats()
                try:
                    value: Any = c.value()
                except OverflowError:
                    value = st["value"]
            out = {
                "name": args.name,
                "kind": "ShardedCounter",
                "value": value,
                "shards": st["shards"],
                "busy_shards": st["busy_shards"],
                "creator_pid": info["creator_pid"],
                "created_ns": info["created_ns"],
            }
            if args.json:
                print(json.dumps(out))
            else:
                print(f"{args.name}: {value}  ({st['shards']} shards, {st['busy_shards']} in use)")
            return 0
        with CounterMap.attach(args.name) as m:
            st = m.stats()
            top = m.top(args.top)
        if args.json:
            print(
                json.dumps(
                    {
                        "name": args.name,
                        "kind": "CounterMap",
                        "keys": st["keys"],
                        "capacity": st["capacity"],
                        "shards": st["shards"],
                        "top": [[_key_text(k), v] for k, v in top],
                    }
                )
            )
        else:
            print(
                f"{args.name}: {st['keys']} keys of {st['capacity']} slots, {st['shards']} shards"
            )
            width = max((len(_key_text(k)) for k, _ in top), default=0)
            for k, v in top:
                print(f"  {_key_text(k):<{width}}  {v}")
        return 0
    except (IncompatibleRegion, ValueError, TypeError) as exc:
        print(f"queue-engine counter show: {exc}", file=sys.stderr)
        return 1


def _ls(args: argparse.Namespace) -> int:
    from engine._counter import read_header
    from engine._shm import SHM_DIR
    from engine.errors import IncompatibleRegion

    rows = []
    d = SHM_DIR
    for entry in sorted(os.listdir(d)):
        if entry.startswith("."):
            continue
        try:
            if not os.path.isfile(os.path.join(d, entry)):
                continue
            info = read_header(entry)
        except (IncompatibleRegion, ValueError, OSError):
            continue
        rows.append(info)
    if args.json:
        for info in rows:
            print(json.dumps(info))
        return 0
    for info in rows:
        extra = (
            f" capacity={info['capacity']} keys={info['used']}"
            if info["kind"] == "CounterMap"
            else ""
        )
        print(
            f"{info['name']}  {info['kind']}  shards={info['shards']}{extra}  pid={info['creator_pid']}"
        )
    return 0
