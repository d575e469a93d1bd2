"""How late an awaited delayed message arrives (``engine.aio.aget``).

    python bench/delay_lateness.py [N] [DELAY_S]      # defaults: 40 messages, 0.03 s

For each queue kind (ring-backed and durable PriorityQueue and KeyedQueue),
put a message with ``delay=DELAY_S`` and await it, N times in a row; print the
median and worst lateness (arrival - put - delay) in ms. Every message must
arrive, once, never early: the run fails otherwise. A waiting consumer sleeps
until its next held message is due, so lateness is the wake-up cost, not a
polling period (it was up to 50 ms for keyed queues before that).
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time

import engine
from engine import aio

KINDS = ["priority", "priority-durable", "keyed", "keyed-durable"]


def lateness_ms(kind: str, n: int, delay: float) -> list:
    with tempfile.TemporaryDirectory(prefix="qe-bench-late-") as d:
        kw = {}
        if kind.endswith("durable"):
            kw = {"durable": True, "path": d + "/q", "durability": "none", "segment_bytes": 1 << 20}
        if kind.startswith("priority"):
            q = engine.PriorityQueue(levels=2, **kw)
        else:
            q = engine.KeyedQueue(partitions=2, **kw)
        late = []

        async def run() -> None:
            for i in range(n):
                msg = b"%08d" % i
                t = time.time()  # durable due times are wall-clock
                if kind.startswith("priority"):
                    q.put(msg, priority=1, delay=delay)
                else:
                    q.put(msg, key=i, delay=delay)
                got = await aio.aget(q, timeout=5)
                waited = time.time() - t
                if got != msg or waited < delay - 0.001:
                    raise SystemExit(f"{kind}: got {got!r} after {waited:.4f} s, expected {msg!r} after {delay} s")
                late.append((waited - delay) * 1e3)

        try:
            asyncio.run(run())
        finally:
            q.close()
    return late


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 40
    delay = float(sys.argv[2]) if len(sys.argv) > 2 else 0.03
    for kind in KINDS:
        late = lateness_ms(kind, n, delay)
        print(f"{kind:18s} late: median {statistics.median(late):6.2f} ms, max {max(late):6.2f} ms ({n} messages)")


if __name__ == "__main__":
    main()
