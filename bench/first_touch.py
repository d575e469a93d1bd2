"""What a first write to a fresh page-cache page costs on this machine.

    python bench/first_touch.py [MIB] [ROUNDS]

Each round creates a file of MIB (default 256) in the temp directory,
preallocates it (``posix_fallocate``), maps it and faults every page in for
writing with one ``madvise(MADV_POPULATE_WRITE)``: what the log's prefaulter
does ahead of the tail of a ``durability="none"`` log.  Then it unmaps and
deletes the file, which frees the pages.  ROUNDS rounds (default 4) follow
each other at once, then ROUNDS rounds each after a 3 s pause.  Prints the
kernel's time per 4 KiB page for every round and, from the median, the most
96-byte appends per second such pages can feed (42 frames per page; the
log's single-append frame is 96 bytes for a 64-byte value).

Why: a log with durability "none" writes into pages the page cache takes from
the free pool, about 1 GB/s of them at 10 M appends/s.  In a virtual machine
whose balloon reports free pages to the host (virtio-balloon free page
reporting, said on the first line), a page freed and left idle for about two
seconds goes back to the host, and the next first touch waits for the host to
supply it again: the paused rounds show what that costs.  The rounds right
after each other reuse the pages the previous round freed.  Every contender
of a bench case that writes fresh memory pays the same; it is the machine's,
not the log's.
"""

import mmap
import os
import statistics
import sys
import tempfile
import time

from engine.bench.machine import free_page_reporting

MADV_POPULATE_WRITE = 23  # Linux 5.14+
PAGE = 4096
FRAME = 96  # bytes of one single-append frame for a 64-byte value


def one_round(mib: int) -> float:
    """Nanoseconds per page to fault a fresh preallocated file in for writing."""
    size = mib << 20
    with tempfile.TemporaryDirectory(prefix="first_touch_") as d:
        fd = os.open(os.path.join(d, "f"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
            with mmap.mmap(fd, size) as m:
                t = time.perf_counter_ns()
                m.madvise(MADV_POPULATE_WRITE)
                dt = time.perf_counter_ns() - t
        finally:
            os.close(fd)
    return dt / (size // PAGE)


def main() -> None:
    mib = int(sys.argv[1]) if len(sys.argv) > 1 else 256
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    print(f"virtio-balloon free page reporting: {free_page_reporting()}")
    for pause in (0.0, 3.0):
        got = []
        for _ in range(n):
            time.sleep(pause)
            got.append(one_round(mib))
        med = statistics.median(got)
        ceiling = PAGE / FRAME / med * 1e3  # M appends/s
        print(
            f"{mib} MiB of page cache faulted in, {pause:.0f} s pause before each round: "
            f"{', '.join(f'{g:.0f}' for g in got)} ns/page; median {med:.0f} ns/page "
            f"= {PAGE / med * 1e3:.0f} MB/s: one thread faulting such pages feeds "
            f"at most {ceiling:.1f} M appends/s of "
            f"{FRAME}-byte frames"
        )


if __name__ == "__main__":
    main()
