"""Durable ``append_many`` against its floor, and bytes per record on disk.

    python bench/log_batch.py [BATCHES] [ROUNDS] [DIR]

Each round times BATCHES (default 200) ``Log.append_many`` calls of 1,000
64-byte records with ``durability="always"`` (one pwrite + fdatasync each),
then the floor: ``os.write`` of the same joined 64,000 bytes + one
``os.fdatasync`` per batch into a plain file (as ``queue-engine bench --only
log``'s reference row does).  Both write into fresh files in DIR (default
the system temp dir: use a real disk, not a tmpfs), each after one untimed
warm-up batch.  Rounds alternate the two so drift in the device hits both;
the ratio printed is floor time / log time per round (1.0: as fast as the
floor), median and best of ROUNDS (default 5).  Bytes per record: the
segment's bytes up to its last non-zero one, less its header, over the
records.
"""

import os
import shutil
import statistics
import sys
import tempfile
import time

import engine

SIZE = 64
BATCH = 1000


def _payloads(n):
    return [i.to_bytes(8, "little") + bytes(range(SIZE - 8)) for i in range(n)]


def log_round(d, batches):
    path = os.path.join(d, "log")
    vals = _payloads(BATCH)
    log = engine.Log(path, durability="always")
    try:
        log.append_many(vals[:100])  # untimed: the segment exists and was synced once
        t = time.perf_counter()
        for _ in range(batches):
            log.append_many(vals)
        dt = time.perf_counter() - t
    finally:
        log.close()
    (seg,) = [os.path.join(path, f) for f in os.listdir(path) if f.endswith(".seg")]
    with open(seg, "rb") as f:
        used = len(f.read().rstrip(b"\0")) - 64
    shutil.rmtree(path)
    return dt, used / (100 + batches * BATCH)


def floor_round(d, batches):
    path = os.path.join(d, "data")
    buf = b"".join(_payloads(BATCH))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, buf[: 100 * SIZE])
        os.fdatasync(fd)
        t = time.perf_counter()
        for _ in range(batches):
            view = memoryview(buf)
            while view:
                view = view[os.write(fd, view):]
            os.fdatasync(fd)
        dt = time.perf_counter() - t
    finally:
        os.close(fd)
    os.unlink(path)
    return dt


def main():
    batches = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    base = sys.argv[3] if len(sys.argv) > 3 else None
    ratios, logs, floors = [], [], []
    with tempfile.TemporaryDirectory(prefix="qe-log-batch-", dir=base) as d:
        for _ in range(rounds):
            lt, bpr = log_round(d, batches)
            ft = floor_round(d, batches)
            logs.append(lt)
            floors.append(ft)
            ratios.append(ft / lt)
    ms = 1e3 / batches
    print(f"durable append_many {BATCH} x {SIZE} B, {batches} batches x {rounds} rounds in {d}")
    print(f"  log   : median {statistics.median(logs) * ms:.3f} ms/batch")
    print(f"  floor : median {statistics.median(floors) * ms:.3f} ms/batch (os.write + os.fdatasync)")
    print(f"  floor/log ratio: median {statistics.median(ratios):.3f}, best {max(ratios):.3f}")
    print(f"  bytes per record on disk: {bpr:.2f}")


if __name__ == "__main__":
    main()
