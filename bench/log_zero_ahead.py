"""Durable ``append_many`` with and without zeroing ahead of the tail.

    python bench/log_zero_ahead.py [BATCHES] [ROUNDS] [DIR] [AHEAD_MIB:STEP_KIB ...]

Each round times BATCHES (default 200) ``Log.append_many`` calls of 1,000
64-byte records with ``durability="always"`` (one pwrite + fdatasync each)
into a fresh log in DIR (default the system temp dir: use a real disk) with
the background zeroer off, then on for every AHEAD:STEP setting given
(default 4:512: zeros kept 4 MiB ahead, 512 KiB a write), then the floor
(``os.write`` of the joined batch + ``os.fdatasync`` into a plain file, as
``queue-engine bench --only log``'s reference row).  Rounds rotate so drift in
the device hits every variant.  Printed per variant: median ms per batch,
median and p90 of the per-batch latency, and floor time / its time (1.0: as
fast as the floor), median over ROUNDS (default 7).
"""

import os
import shutil
import statistics
import sys
import tempfile
import time

import engine
from engine import _log

SIZE = 64
BATCH = 1000
# ZA_GAP=SECONDS: sleep that long before every ZA_BURST batches (default 10),
# a service's bursts with idle time between them; the time per batch then
# counts only the calls
gap = float(os.environ.get("ZA_GAP", "0"))
burst = int(os.environ.get("ZA_BURST", "10"))


def _payloads(n):
    return [i.to_bytes(8, "little") + bytes(range(SIZE - 8)) for i in range(n)]


def log_round(d, batches, setting):
    path = os.path.join(d, "log")
    vals = _payloads(BATCH)
    if setting is None:
        _log._set_zero_ahead(False)
    else:
        _log._set_zero_ahead(True, setting[0] << 20, setting[1] << 10)
    lat = []
    log = engine.Log(path, durability="always")
    try:
        log.append_many(vals[:100])  # untimed: the segment exists and was synced once
        dt = 0.0
        for i in range(batches):
            if gap and i % burst == 0:
                time.sleep(gap)
            a = time.perf_counter()
            log.append_many(vals)
            lat.append(time.perf_counter() - a)
            dt += lat[-1]
        if log.durable_offset != log.next_offset or log.next_offset != 100 + batches * BATCH:
            raise AssertionError("not every record is durable")
    finally:
        log.close()
        _log._set_zero_ahead(True)
    shutil.rmtree(path)
    return dt / batches, lat


def floor_round(d, batches):
    path = os.path.join(d, "data")
    buf = b"".join(_payloads(BATCH))
    lat = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, buf[: 100 * SIZE])
        os.fdatasync(fd)
        dt = 0.0
        for i in range(batches):
            if gap and i % burst == 0:
                time.sleep(gap)
            a = time.perf_counter()
            os.write(fd, buf)
            os.fdatasync(fd)
            lat.append(time.perf_counter() - a)
            dt += lat[-1]
    finally:
        os.close(fd)
    os.unlink(path)
    return dt / batches, lat


def main(argv):
    batches = int(argv[1]) if len(argv) > 1 else 200
    rounds = int(argv[2]) if len(argv) > 2 else 7
    base = argv[3] if len(argv) > 3 else None
    settings = [tuple(int(x) for x in a.split(":")) for a in argv[4:]] or [(4, 512)]
    variants = [("off", None)] + [(f"ahead {a} MiB, step {s} KiB", (a, s)) for a, s in settings]
    d = tempfile.mkdtemp(dir=base)
    per = {name: [] for name, _ in variants}
    per["floor"] = []
    lats = {name: [] for name in per}
    ratios = {name: [] for name, _ in variants}
    try:
        for r in range(rounds):
            order = variants[r % len(variants):] + variants[: r % len(variants)]
            got = {}
            for name, setting in order:
                got[name], lat = log_round(d, batches, setting)
                lats[name] += lat
            got["floor"], lat = floor_round(d, batches)
            lats["floor"] += lat
            for name in got:
                per[name].append(got[name])
            for name, _ in variants:
                ratios[name].append(got["floor"] / got[name])
    finally:
        shutil.rmtree(d, ignore_errors=True)
    for name in per:
        lat = sorted(lats[name])
        line = (f"  {name:28s}: median {statistics.median(per[name]) * 1e3:.3f} ms/batch, "
                f"latency p50 {lat[len(lat) // 2] * 1e6:.0f} us p90 {lat[len(lat) * 9 // 10] * 1e6:.0f} us")
        if name in ratios:
            line += f", floor/log {statistics.median(ratios[name]):.3f}"
        print(line)


if __name__ == "__main__":
    main(sys.argv)
