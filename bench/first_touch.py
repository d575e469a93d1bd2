"""What a first write to fresh memory costs on this machine.

    python bench/first_touch.py [MIB] [ROUNDS]

Maps MIB (default 512) of anonymous memory, writes one byte per 4 KiB page
and unmaps it, ROUNDS times (default 4): once with the next round right
after the unmap, once with a 4 s pause between rounds.  Prints MB/s of first
touch per round.

Why: a log with durability "none" writes into pages the page cache takes from
the free pool, at the append rate times the record size (about 1 GB/s at
10 M appends/s of 96-byte frames).  In a virtual machine whose balloon
reports free pages to the host (virtio-balloon free page reporting), a page
freed and left idle for a couple of seconds goes back to the host, and the
next first touch waits for the host to supply it again: the pause rounds show
what that costs here.  Every contender of a bench case that writes fresh
memory pays it alike; it is the machine's, not the log's.
"""

import mmap
import sys
import time

import numpy as np


def rounds(mib: int, n: int, pause: float) -> list:
    rates = []
    for _ in range(n):
        m = mmap.mmap(-1, mib << 20)
        a = np.frombuffer(m, dtype=np.uint8)
        t = time.perf_counter()
        a[::4096] = 1
        rates.append(mib * 1.048576 / (time.perf_counter() - t))
        del a
        m.close()
        time.sleep(pause)
    return rates


def _reporting() -> str:
    """Whether a virtio balloon with free page reporting (feature bit 5) is bound."""
    import glob

    for dev in glob.glob("/sys/bus/virtio/devices/*"):
        try:
            with open(f"{dev}/device") as f:
                if int(f.read(), 16) != 5:  # virtio id 5: the memory balloon
                    continue
            with open(f"{dev}/features") as f:
                bits = f.read().strip()
        except OSError:
            continue
        return "on" if len(bits) > 5 and bits[5] == "1" else "off"
    return "no virtio balloon"


def main() -> None:
    mib = int(sys.argv[1]) if len(sys.argv) > 1 else 512
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    print(f"virtio-balloon free page reporting: {_reporting()}")
    for pause in (0.0, 4.0):
        got = ", ".join(f"{r:.0f}" for r in rounds(mib, n, pause))
        print(f"first touch of {mib} MiB, {pause:.0f} s between rounds: {got} MB/s")


if __name__ == "__main__":
    main()
