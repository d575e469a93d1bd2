"""The ring's hot-path cases against their closest peers, in one run.

Runs the ``queue-engine bench`` ring cases that measure per-message cost --
processes 1->1 put/get, processes 1->2 competing (``mode="shared"``) and
put_array/get_array rows -- and the ping-pong latency a spinning waiter
buys, with only engine.Ring and the peers named below,
through the same harness (steady-state windows, verified deliveries,
interleaved repetitions, medians).  It is the quick way to compare two
builds of the ring: the full suite also runs the slow peers.

Run: ``python bench/ring_hotpath.py [--repeat N]``.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import replace

from engine.bench import harness
from engine.bench import ring as ring_section

# case -> the contenders kept (ours and the peer each goal is quoted against)
KEEP = {
    "processes 1->1 put/get": ("engine.Ring", "pyzmq PUSH/PULL ipc"),
    "processes 1->2 competing": ('engine.Ring (mode="shared")', "pyzmq PUSH/PULL ipc"),
    "processes 1->1 arrays": ("engine.Ring put_array/get_array", "faster-fifo row blocks"),
    "ping-pong round trip": ("engine.Ring (2 spsc rings)", "pyzmq PAIR ipc"),
}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3, help="repetitions per contender")
    ap.add_argument("--only", default="", help="comma-separated case names (default: all three)")
    args = ap.parse_args(argv)
    want = [s.strip() for s in args.only.split(",") if s.strip()] or list(KEEP)
    profile = harness.Profile(full=True, repeat=args.repeat)
    for case in ring_section.cases(profile):
        if case.name not in want:
            continue
        keep = KEEP[case.name]
        case = replace(case, contenders=[c for c in case.contenders if c.name in keep])
        res = harness.run_case(case, ring_section.SECTION, profile)
        unit = case.unit or "msg/s"
        for c in res.contenders:
            fig = res.headline(c)
            runs = [r.rate() for r in c.valid_runs()]
            if unit == "MB/s":
                runs = [r * case.workload.size / 1e6 for r in runs]
            if unit == "us":  # latency: the headline is the p50 in ns, per run too
                fig /= 1000
                runs = [r.latency_ns["p50"] / 1000 for r in c.valid_runs() if r.latency_ns]
            d = 1 if unit == "us" else 0
            shown = ", ".join(f"{x:,.{d}f}" for x in runs if math.isfinite(x))
            print(f"{case.name:26} {c.name:34} median {fig:14,.{d}f} {unit}  runs [{shown}]"
                  + (f"  {c.reason}" if c.reason else ""))
        ratio = res.ratio
        print(f"{case.name:26} ratio ours/peer {ratio:.2f}" if ratio else f"{case.name}: no ratio")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
