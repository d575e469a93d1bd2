"""Where a ring consumer's time goes at steady state, 1->1 across processes.

The bench's 1->1 put/get case keeps every message it gets (it verifies them
afterwards), and at steady state its ring is full: the consumer is the slow
side, so the consumer's cost per message is the throughput.  This splits that
cost, in CPU time of the consumer process (robust to other load on the machine,
unlike wall-clock rates):

  steady   the bench's shape: a producer process puts N 64-byte messages one
           by one into a 4 MiB ring, this consumer gets and keeps them all;
           also the ring's fill level seen by the consumer (sampled) and its
           minor page faults
  batched  as ``steady``, but the producer puts lists of 1000 with
           ``put_many``, which publishes head once per 64 KiB: the most a
           producer batching its publication could save the consumer
  alone    the same gets and appends with no producer running (the ring is
           filled first, big enough for all): the consumer's own cost
  dropped  as ``alone``, but each message is dropped after ``get``: the
           ring's share, without the memory the kept results need

steady - alone is what the producer running beside it costs the consumer
(cache lines moving between cores); alone - dropped is what keeping the
results costs (fresh memory: page faults, allocation).

Run: ``python bench/ring_consumer_cost.py [--count N] [--repeat R]``; prints
the median of R runs of each.  CPU time still grows when the machine is
loaded (shared caches; on a VM, time the host takes the CPU away), so compare
runs of one sitting.
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import statistics
import sys
import time
from typing import Dict, List

SIZE = 64
CAPACITY = 4 << 20


def _msg(i: int) -> bytes:
    return i.to_bytes(8, "little") + bytes(SIZE - 8)


def _steady(n: int, batched: bool = False) -> Dict[str, float]:
    """Consumer CPU ns per message with a producer process beside it
    (putting one by one, or lists of 1000 with put_many if batched)."""
    import engine

    name = f"qe-bench-ccost-{os.getpid()}"
    ring = engine.Ring.create(name, capacity=CAPACITY)
    try:
        rd, wr = os.pipe()
        pid = os.fork()
        if pid == 0:  # producer
            try:
                os.close(rd)
                msgs = [_msg(i) for i in range(n)]
                p = engine.Ring.attach(name).producer()
                os.write(wr, b"x")
                if batched:
                    for i in range(0, n, 1000):
                        p.put_many(msgs[i : i + 1000])
                else:
                    put = p.put
                    for m in msgs:
                        put(m)
                p.close()
            finally:
                os._exit(0)
        os.close(wr)
        try:
            c = ring.consumer()
            os.read(rd, 1)
            os.close(rd)
            out: List[bytes] = []
            app, get = out.append, c.get
            warm = n // 5
            for _ in range(warm):
                app(get())
            lags = []
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            c0 = time.process_time_ns()
            left = n - warm
            while left:
                k = min(10000, left)
                for _ in range(k):
                    app(get())
                left -= k
                lags.append(ring.stats()["used_bytes"] or 0)
            cpu = time.process_time_ns() - c0
            flt = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
        except BaseException:
            # the producer would wait for room forever: it is ours to end
            os.kill(pid, signal.SIGKILL)
            raise
        finally:
            os.waitpid(pid, 0)
        assert len(out) == n and out[-1] == _msg(n - 1), "messages lost or reordered"
        c.close()
        return {
            "cpu_ns": cpu / (n - warm),
            "fill": statistics.median(lags) / CAPACITY,
            "faults_per_1k": flt * 1000 / (n - warm),
        }
    finally:
        ring.close()
        engine.Ring.unlink(name, missing_ok=True)


def _alone(n: int, keep: bool) -> float:
    """Consumer CPU ns per message from a ring filled beforehand."""
    import engine

    rec = (8 + SIZE + 7) & ~7
    cap = 1 << max(22, (n * rec - 1).bit_length())
    ring = engine.Ring(capacity=cap)
    p, c = ring.producer(), ring.consumer()
    for i in range(n):
        p.put(_msg(i))
    get = c.get
    if keep:
        out: List[bytes] = []
        app = out.append
        c0 = time.process_time_ns()
        for _ in range(n):
            app(get())
        t = time.process_time_ns() - c0
        assert out[-1] == _msg(n - 1)
    else:
        c0 = time.process_time_ns()
        for _ in range(n):
            get()
        t = time.process_time_ns() - c0
    ring.close()
    return t / n


def main(argv: List[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=1_000_000, help="messages per run")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each")
    args = ap.parse_args(argv)
    n = args.count
    steady: List[Dict[str, float]] = []
    batched: List[float] = []
    alone: List[float] = []
    dropped: List[float] = []
    for _ in range(args.repeat):  # interleaved: a change of load hits every kind alike
        steady.append(_steady(n))
        batched.append(_steady(n, batched=True)["cpu_ns"])
        alone.append(_alone(n, True))
        dropped.append(_alone(n, False))
    med = statistics.median
    s_cpu = med(r["cpu_ns"] for r in steady)
    a_cpu, d_cpu = med(alone), med(dropped)
    print(f"steady   {s_cpu:6.1f} ns/msg consumer CPU (ring {med(r['fill'] for r in steady):.0%} "
          f"full, {med(r['faults_per_1k'] for r in steady):.0f} minor faults per 1000 messages)")
    print(f"batched  {med(batched):6.1f} ns/msg (the producer publishing once per 64 KiB)")
    print(f"alone    {a_cpu:6.1f} ns/msg (gets + kept results, no producer)")
    print(f"dropped  {d_cpu:6.1f} ns/msg (gets only)")
    print(f"producer beside it {s_cpu - a_cpu:+.1f} ns/msg, keeping the results {a_cpu - d_cpu:+.1f} "
          f"ns/msg; consumer-bound ceiling {1e3 / s_cpu:.2f} M msg/s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
