"""``queue-engine ring``: list, inspect and remove shared rings.

``ring ls`` lists the regions under /dev/shm that carry the ring magic,
``ring stats NAME`` prints one ring's statistics (``--json`` for a machine),
``ring unlink NAME`` removes a region (refusing files that are not rings).
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
from typing import Any, Dict, List


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


def list_rings() -> List[Dict[str, Any]]:
    """Every file in the shared-memory directory that starts with the ring
    magic, with what its header says (unvalidated: see ``ring stats``)."""
    from engine._ring import MAGIC, MODES, SHM_DIR

    out: List[Dict[str, Any]] = []
    try:
        names = sorted(os.listdir(SHM_DIR))
    except OSError:
        return out
    for name in names:
        path = os.path.join(SHM_DIR, name)
        try:
            with open(path, "rb") as f:
                head = f.read(32)
            size = os.stat(path).st_size
        except OSError:
            continue
        if len(head) < 32 or struct.unpack_from("<Q", head, 0)[0] != MAGIC:
            continue
        version, _hsize, capacity, mode, nslots = struct.unpack_from("<IIQII", head, 8)
        out.append(
            {
                "name": name,
                "bytes": size,
                "version": version,
                "capacity": capacity,
                "mode": MODES[mode] if mode < len(MODES) else f"?{mode}",
                "max_consumers": nslots,
            }
        )
    return out


def _ls(args: argparse.Namespace) -> int:
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
