"""``queue-engine log``: inspect, follow, verify and repair a segment log directory.

* ``log dump PATH [--from N] [--count N] [--json]``: print records.
* ``log verify PATH [--json]``: check every segment (CRC, bounds, offsets,
  chaining); exit status 1 when anything is damaged.
* ``log stats PATH [--json]``: offsets, segments, bytes, consumer groups and their lag.
* ``log tail PATH [--from N] [--group G] [--count N]``: follow new records
  (default: from the current end) until Ctrl-C.
* ``log groups ls|describe|reset PATH [GROUP]``: consumer groups; ``reset``
  (``--to-offset N``, ``--to-time NS`` or ``--to-end``) refuses while a
  reader of the group is open.
* ``log repair PATH --truncate``: cut the log at its first damaged record
  (later records are lost: run ``verify`` first).
* ``log compact PATH [--delete-retention S] [--json]``: key compaction of the
  sealed segments (the latest record per key stays, at its offset); refuses
  while a writer holds the log.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, List, Optional


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("log", help="inspect, follow, verify and repair a segment log")
    sub = p.add_subparsers(dest="log_command", metavar="ACTION")
    sub.required = True

    dump = sub.add_parser("dump", help="print records")
    dump.add_argument("path", help="log directory")
    dump.add_argument("--from", dest="start", type=int, default=None, help="first offset (default: oldest)")
    dump.add_argument("--count", type=int, default=None, help="stop after N records")
    dump.add_argument("--json", action="store_true", help="one JSON object per line")
    dump.set_defaults(func=_dump)

    verify = sub.add_parser("verify", help="check every segment; exit 1 on damage")
    verify.add_argument("path", help="log directory")
    verify.add_argument("--json", action="store_true", help="print JSON")
    verify.set_defaults(func=_verify)

    stats = sub.add_parser("stats", help="offsets, segments, bytes, groups")
    stats.add_argument("path", help="log directory")
    stats.add_argument("--json", action="store_true", help="print JSON")
    stats.set_defaults(func=_stats)

    tail = sub.add_parser("tail", help="follow new records until Ctrl-C")
    tail.add_argument("path", help="log directory")
    tail.add_argument("--from", dest="start", type=int, default=None, help="first offset (default: the end)")
    tail.add_argument("--group", default=None, help="resume at this consumer group's offset (read-only)")
    tail.add_argument("--count", type=int, default=None, help="stop after N records")
    tail.add_argument("--json", action="store_true", help="one JSON object per line")
    tail.set_defaults(func=_tail)

    groups = sub.add_parser(
        "groups", help="consumer groups: list, describe, reset (kafka-consumer-groups style)"
    )
    gsub = groups.add_subparsers(dest="groups_command", metavar="ACTION")
    gsub.required = True
    gls = gsub.add_parser("ls", help="every committed group with its offset and lag")
    gls.add_argument("path", help="log directory")
    gls.add_argument("--json", action="store_true", help="one JSON object per line")
    gls.set_defaults(func=_groups_ls)
    gdesc = gsub.add_parser("describe", help="one group: committed offset, lag, in use")
    gdesc.add_argument("path", help="log directory")
    gdesc.add_argument("group", help="group name")
    gdesc.add_argument("--json", action="store_true", help="print JSON")
    gdesc.set_defaults(func=_groups_describe)
    greset = gsub.add_parser(
        "reset", help="move a group's committed offset (refused while a reader of it is open)"
    )
    greset.add_argument("path", help="log directory")
    greset.add_argument("group", help="group name")
    where = greset.add_mutually_exclusive_group(required=True)
    where.add_argument("--to-offset", type=int, default=None, metavar="N",
                       help="the group's next read starts at offset N")
    where.add_argument("--to-time", type=int, default=None, metavar="NS",
                       help="at the first record stamped at or after NS (ns since the epoch)")
    where.add_argument("--to-end", action="store_true",
                       help="at the log's end: skip everything appended so far")
    greset.add_argument("--json", action="store_true", help="print JSON")
    greset.set_defaults(func=_groups_reset)

    repair = sub.add_parser("repair", help="cut the log at its first damaged record")
    repair.add_argument("path", help="log directory")
    repair.add_argument("--truncate", action="store_true", required=True,
                        help="required: confirms that records after the damage are dropped")
    repair.set_defaults(func=_repair)

    compact = sub.add_parser("compact", help="keep the latest record per key in sealed segments")
    compact.add_argument("path", help="log directory")
    compact.add_argument("--delete-retention", type=float, default=86400.0, metavar="S",
                         help="drop tombstones older than S seconds (default: one day)")
    compact.add_argument("--json", action="store_true", help="print JSON")
    compact.set_defaults(func=_compact)


def _text(b: Optional[bytes]) -> Any:
    if b is None:
        return None
    try:
        s = bytes(b).decode("utf-8")
        if s.isprintable():
            return s
    except UnicodeDecodeError:
        pass
    return "0x" + bytes(b).hex()


def _print_record(rec: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"offset": rec.offset, "timestamp": rec.timestamp,
                          "key": _text(rec.key), "value": _text(rec.value)}))
    else:
        key = "" if rec.key is None else f" key={_text(rec.key)!r}"
        print(f"{rec.offset}\t{rec.timestamp}{key}\t{_text(rec.value)!r}")


def _dump(args: argparse.Namespace) -> int:
    from engine import LogReader
    from engine.errors import CorruptLog

    n = 0
    try:
        with LogReader(args.path, start=args.start) as r:
            for rec in r:
                if args.count is not None and n >= args.count:
                    break
                _print_record(rec, args.json)
                n += 1
    except CorruptLog as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _verify(args: argparse.Namespace) -> int:
    from engine._log import verify

    results = verify(args.path)
    bad = [r for r in results if r.error is not None]
    if args.json:
        print(json.dumps({
            "path": args.path,
            "segments": [{k: getattr(r, k) for k in r.__slots__} for r in results],  # type: ignore[attr-defined]  # a cdef class's fields
            "damaged": len(bad),
        }))
    else:
        for r in results:
            state = "ok" if r.error is None else f"DAMAGED at byte {r.error_position}: {r.error}"
            print(f"{os.path.basename(r.segment)}  records={r.records}  next={r.next_offset}  "
                  f"sealed={r.sealed}  {state}")
        print(f"{len(results)} segments, {len(bad)} damaged")
        if bad:
            print("cut the log at the first damage with: queue-engine log repair --truncate "
                  f"{args.path}", file=sys.stderr)
    return 1 if bad else 0


def _stats(args: argparse.Namespace) -> int:
    from engine.logadmin import log_stats

    out = log_stats(args.path)
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            if k != "groups":
                print(f"{k}: {v}")
        for g, v in out["groups"].items():
            print(f"group {g}: committed {v['committed']}, lag {v['lag']}")
    return 0


def _groups_ls(args: argparse.Namespace) -> int:
    from engine.logadmin import log_stats

    groups = log_stats(args.path)["groups"]
    for name, g in groups.items():
        if args.json:
            print(json.dumps({"group": name, **g}))
        else:
            print(f"{name}\tcommitted {g['committed']}\tlag {g['lag']}")
    if not groups and not args.json:
        print("no committed groups")
    return 0


def _groups_describe(args: argparse.Namespace) -> int:
    from engine.logadmin import describe_group

    out = describe_group(args.path, args.group)
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k}: {v}")
    return 0


def _groups_reset(args: argparse.Namespace) -> int:
    from engine.logadmin import reset_group

    at = reset_group(args.path, args.group, to_offset=args.to_offset, to_time=args.to_time,
                     to_end=args.to_end)
    if args.json:
        print(json.dumps({"path": args.path, "group": args.group, "offset": at}))
    else:
        print(f"group {args.group} now resumes at offset {at}")
    return 0


def _tail(args: argparse.Namespace) -> int:
    from engine import LogReader
    from engine._log import verify

    start = args.start
    if start is None and args.group is None:
        results: List[Any] = verify(args.path)
        start = results[-1].next_offset if results else 0
    n = 0
    with LogReader(args.path, start=start, group=args.group) as r:
        while args.count is None or n < args.count:
            rec = r.poll(timeout=1.0)
            if rec is None:
                continue
            _print_record(rec, args.json)
            sys.stdout.flush()
            n += 1
    return 0


def _repair(args: argparse.Namespace) -> int:
    from engine._log import repair_truncate

    bad = repair_truncate(args.path)
    if bad is None:
        print("nothing to repair: every segment is intact")
    else:
        print(f"cut {os.path.basename(bad.segment)} at byte {bad.error_position} ({bad.error}); "
              f"the log now ends at offset {bad.next_offset}")
    return 0


def _compact(args: argparse.Namespace) -> int:
    from engine.compaction import compact_path
    from engine.errors import LogLocked

    if args.delete_retention < 0:
        print("error: --delete-retention must be >= 0", file=sys.stderr)
        return 2
    try:
        res = compact_path(args.path, args.delete_retention)
    except LogLocked as exc:
        print(f"error: a writer holds {args.path} ({exc}); compact it from that writer "
              "(Log.compact() or cleanup='compact')", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(res.as_dict()))
    else:
        print(f"rewrote {res.segments_rewritten} segment(s): removed {res.records_removed} "
              f"record(s) ({res.tombstones_removed} tombstones) of {res.records_scanned} scanned; "
              f"{res.bytes_before} -> {res.bytes_after} bytes in {res.seconds:.3f} s")
    return 0
