"""Quick and --full ratios side by side, from two ``queue-engine bench --json``
files (the same comparison ``--check`` makes in one run):

    queue-engine bench --json quick.json
    queue-engine bench --full --json full.json
    python bench/compare_ratios.py quick.json full.json

Prints, per case of the quick file, the ratio (ours / best peer) of each with its
spread across repetitions, and the factor between them (> x1.3 is flagged).
"""

from __future__ import annotations

import json
import sys
from typing import Any, Dict, Optional, Tuple

FACTOR = 1.3


def _ratios(path: str) -> Dict[Tuple[str, str], Dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return {(c["section"], c["name"]): c for c in data["cases"]}


def _fmt(c: Optional[Dict[str, Any]]) -> str:
    if c is None or c.get("ratio") is None:
        return "-"
    sp = c.get("ratio_spread") or {}
    rng = f" ({sp['min']:.3g}-{sp['max']:.3g})" if sp.get("min") is not None else ""
    return f"{c['ratio']:.3g}x{rng}"


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    quick, full = _ratios(argv[0]), _ratios(argv[1])
    print("| Case | best peer | quick ratio (range) | full ratio (range) | factor |")
    print("|---|---|---:|---:|---:|")
    worst = 1.0
    for key, q in quick.items():
        f = full.get(key)  # None: a case only the quick file ran
        fac = "-"
        if f is not None and q.get("ratio") and f.get("ratio"):
            x = max(q["ratio"] / f["ratio"], f["ratio"] / q["ratio"])
            worst = max(worst, x)
            fac = f"x{x:.2f}" + (" **differs**" if x > FACTOR else "")
        peer = (f or {}).get("best_peer") or q.get("best_peer") or "-"
        print(f"| {key[0]}: {key[1]} | {peer} | {_fmt(q)} | {_fmt(f)} | {fac} |")
    print(f"\nlargest factor x{worst:.2f} (goal: within x{FACTOR:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
