"""What waking a sleeping thread costs on this machine.

    python bench/wake_cost.py [N]

Ping-pongs of N round trips (default 20,000), each a sleep and a wake-up on
both sides, in three placements: wherever the scheduler puts the two sides,
pinned to two CPUs (every wake-up crosses to the other CPU) and pinned to one
CPU (every wake-up stays on it):

* two threads of this process handing two locks back and forth
  (``engine.bench.machine.wake_round_trip``, which the bench's machine line
  also runs: each lock a futex-backed semaphore, the GIL passes with them);
* two processes handing a byte back and forth over two pipes (no GIL).

Prints each round trip's median time over 5 repetitions, and for the
threads the process's CPU (user + system) and voluntary context switches per
round trip.  Half a round trip is one wake-up: the latency from one side's
wake call to the other side running.

Why: a durable saga or transaction that waits for its record's sync sleeps
and is woken once per durable write, and then takes the GIL in turn with
the other woken threads.  With a few threads on few cores that chain of
wake-ups, not the disk, sets the rate, and what one wake-up costs is the
machine's: a virtual machine whose guest traps to the host to halt an idle
CPU and to send it the wake-up interrupt pays several times more for a
wake-up that crosses CPUs than for one that stays.
"""

import os
import statistics
import sys
import time
from typing import Optional, Tuple

from engine.bench.machine import pin_thread, wake_round_trip


def processes(n: int, cpus: Optional[Tuple[int, int]]) -> float:
    """Seconds per round trip between two processes over pipes."""
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    saved = os.sched_getaffinity(0) if cpus else None
    pid = os.fork()
    if pid == 0:
        try:
            pin_thread(cpus[1] if cpus else None)
            for _ in range(n):
                os.read(r1, 1)
                os.write(w2, b"x")
        finally:
            os._exit(0)
    try:
        pin_thread(cpus[0] if cpus else None)
        t0 = time.perf_counter()
        for _ in range(n):
            os.write(w1, b"x")
            os.read(r2, 1)
        dt = time.perf_counter() - t0
    finally:
        os.waitpid(pid, 0)
        if saved is not None:
            os.sched_setaffinity(0, saved)
        for fd in (r1, w1, r2, w2):
            os.close(fd)
    return dt / n


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    usable = sorted(os.sched_getaffinity(0))
    placements = [("unpinned", None)]
    if len(usable) > 1:
        placements.append((f"CPUs {usable[0]} and {usable[1]}", (usable[0], usable[1])))
    placements.append((f"CPU {usable[0]} only", (usable[0], usable[0])))
    for name, cpus in placements:
        th = [wake_round_trip(n, cpus) for _ in range(5)]
        pr = [processes(n, cpus) for _ in range(5)]
        rt = statistics.median(x[0] for x in th)
        cpu = statistics.median(x[1] for x in th)
        sw = statistics.median(x[2] for x in th)
        print(
            f"{name}: threads, lock ping-pong: round trip {rt * 1e6:.1f} us, CPU {cpu * 1e6:.1f} us "
            f"and {sw:.2f} voluntary context switches per round trip; processes, pipe "
            f"ping-pong: round trip {statistics.median(pr) * 1e6:.1f} us (medians of 5 x {n})"
        )


if __name__ == "__main__":
    main()
