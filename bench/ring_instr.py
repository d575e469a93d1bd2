"""Instructions per ``put`` and per ``get`` of engine.Ring, counted by callgrind.

Each loop runs in one process on a private ring (no scheduler, no other
core), at steady state, with the same 64-byte payloads as the bench.  A
loop runs twice, with N1 and N2 messages, under ``valgrind --tool=callgrind``;
the difference of the two instruction counts over N2 - N1 is the marginal
cost of one message: interpreter start-up, imports and the ring's creation
cancel out, the Python ``for`` loop that makes the calls does not.

  loop    ``for m in msgs: f(m)`` with a builtin that does nothing useful:
          the floor every per-call figure includes
  put     put N messages into a ring big enough for all of them
  putget  put 256, get 256, repeated: put + get of one message

  putarr  put_array of ARRAY_ROWS rows of 64 bytes, repeated
  arrays  put_array of ARRAY_ROWS rows, get_array of them, repeated

per put = put; per get = putget - put; per row of put_array = putarr,
of get_array = arrays - putarr.

Run: ``python bench/ring_instr.py [--ring-mode shared]`` (needs valgrind;
about a minute); ``--time`` runs the same loops without valgrind and prints
CPU nanoseconds per message instead (best of 7).
``python bench/ring_instr.py --child MODE N`` is the loop itself.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from typing import Dict

SIZE = 64
BATCH = 256
ARRAY_ROWS = 8192  # rows per put_array / get_array call, as in the bench
N1, N2 = 3 * ARRAY_ROWS, 15 * ARRAY_ROWS  # multiples of BATCH and ARRAY_ROWS


def _child(mode: str, n: int, ring_mode: str) -> int:
    """Run one loop of n messages; returns the process CPU ns it took."""
    import engine

    # one batch of payloads, sent n // BATCH times: building them costs the
    # same for every n, so it cancels out
    msgs = [i.to_bytes(8, "little") + bytes(SIZE - 8) for i in range(BATCH)]
    idle = [None] * BATCH
    ring = engine.Ring(capacity=1 << 24, mode=ring_mode)  # 16 MiB: N2 records fit
    p, c = ring.producer(), ring.consumer()
    put, get = p.put, c.get
    t0 = time.process_time_ns()
    if mode == "loop":
        f = len
        for _ in range(n // BATCH):
            for m in msgs:
                f(m)
    elif mode == "put":
        for _ in range(n // BATCH):
            for m in msgs:
                put(m)
    elif mode == "putget":
        for _ in range(n // BATCH):
            for m in msgs:
                put(m)
            for _ in idle:
                get()
    elif mode in ("putarr", "arrays"):
        import numpy as np

        rows = np.frombuffer(b"".join(msgs) * (ARRAY_ROWS // BATCH), dtype=np.uint8)
        rows = rows.reshape(ARRAY_ROWS, SIZE)
        put_array, get_array = p.put_array, c.get_array
        t0 = time.process_time_ns()  # the rows are built: time the calls only
        for _ in range(n // ARRAY_ROWS):
            put_array(rows)
            if mode == "arrays":
                get_array(ARRAY_ROWS)
    else:
        raise SystemExit(f"unknown mode {mode}")
    t = time.process_time_ns() - t0
    ring.close()
    return t


def _count(mode: str, n: int, ring_mode: str) -> int:
    cmd = [
        "valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
        sys.executable, __file__, "--ring-mode", ring_mode, "--child", mode, str(n),
    ]
    # one thread (numpy's BLAS workers would add a varying count), one hash seed
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    err = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stderr
    m = re.search(r"Collected : (\d+)", err)
    if not m:
        raise RuntimeError(f"no instruction count in callgrind's output:\n{err[-2000:]}")
    return int(m.group(1))


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ring-mode", default="spsc", choices=("spsc", "broadcast", "shared"))
    ap.add_argument("--time", action="store_true",
                    help="CPU ns per message instead (no valgrind; best of 7 runs of N2)")
    ap.add_argument("--child", nargs=2, metavar=("MODE", "N"))
    args = ap.parse_args(argv)
    if args.child:
        _child(args.child[0], int(args.child[1]), args.ring_mode)
        return 0
    per: Dict[str, float] = {}
    unit = "ns" if args.time else "instructions"
    for mode in ("loop", "put", "putget", "putarr", "arrays"):
        if args.time:
            per[mode] = min(_child(mode, N2, args.ring_mode) for _ in range(7)) / N2
        else:
            a, b = _count(mode, N1, args.ring_mode), _count(mode, N2, args.ring_mode)
            per[mode] = (b - a) / (N2 - N1)
        print(f"{mode:7} {per[mode]:8.1f} {unit} per message", flush=True)
    print(f"{unit} per put {per['put']:.1f} (loop floor {per['loop']:.1f}), "
          f"per get {per['putget'] - per['put']:.1f}; per row: put_array {per['putarr']:.1f}, "
          f"get_array {per['arrays'] - per['putarr']:.1f} ({ARRAY_ROWS} rows per call)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
