"""The saga section: what durability costs a 3-step saga.

Each workload message is one saga of three steps (reserve, charge, deliver);
the third step delivers the saga's payload (the harness's 64-byte message) to
a list that is digested after the clock stops, so a saga that ran twice, or
not at all, fails the case. The peer is the same three functions called one
after another, with no log: the ratio (ours / peer, < 1) is the overhead of
recording every step's start and outcome, durably or not.

Cases (quick / --full): durability "none" (2,000 / 50,000 sagas: the page
cache, survives a process crash), durability "always" (40 / 1,000 sagas:
msync + fdatasync before each step, n + 1 = 4 syncs per saga), and "always"
from 8 threads sharing one Saga (160 / 4,000 sagas: the log group-commits
concurrent sagas' syncs).
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from typing import Any, Callable, List, Literal, Tuple

from engine.bench.harness import THROUGHPUT, Case, Contender, Profile, Run, Workload, digest

SECTION = "saga"

OURS = ("engine._log", "engine.saga")
THREADS = 8


def _steps(payloads: List[bytes], out: List[bytes]) -> Tuple[Callable[..., Any], ...]:
    """The three steps; each takes the saga's index (plain calls) or a StepContext."""
    stock = [0]
    paid = [0]

    def reserve(i: int) -> int:
        stock[0] += 1
        return i

    def charge(i: int) -> int:
        paid[0] += 1
        return i

    def deliver(i: int) -> int:
        out.append(payloads[i])
        return i

    return reserve, charge, deliver


def _plain(wl: Workload) -> Run:
    payloads = wl.payloads()
    out: List[bytes] = []
    reserve, charge, deliver = _steps(payloads, out)
    t0 = time.perf_counter_ns()
    for i in range(wl.count):
        reserve(i)
        charge(i)
        deliver(i)
    t1 = time.perf_counter_ns()
    return Run.timed(t0, t1, digest(out))


def _saga(
    durability: Literal["always", "interval", "none"], threads: int = 1
) -> Callable[[Workload], Run]:
    def run(wl: Workload) -> Run:
        from engine.saga import Saga

        payloads = wl.payloads()
        out: List[bytes] = []
        reserve, charge, deliver = _steps(payloads, out)
        tmp = tempfile.mkdtemp(prefix="qe-bench-saga-")
        saga = Saga(f"{tmp}/saga", durability=durability)
        try:
            saga.step("reserve", lambda sc: reserve(sc.ctx), lambda sc: None)
            saga.step("charge", lambda sc: charge(sc.ctx), lambda sc: None)
            saga.step("deliver", lambda sc: deliver(sc.ctx), lambda sc: None)
            if threads == 1:
                t0 = time.perf_counter_ns()
                for i in range(wl.count):
                    saga.run(i)
                t1 = time.perf_counter_ns()
            else:
                errors: List[BaseException] = []
                start = threading.Barrier(threads + 1)

                def worker(k: int) -> None:
                    start.wait()
                    try:
                        for i in range(k, wl.count, threads):
                            saga.run(i)
                    except BaseException as exc:  # reported below, never lost
                        errors.append(exc)

                ts = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
                for t in ts:
                    t.start()
                start.wait()
                t0 = time.perf_counter_ns()
                for t in ts:
                    t.join()
                t1 = time.perf_counter_ns()
                if errors:
                    raise errors[0]
        finally:
            saga.close()
            shutil.rmtree(tmp, ignore_errors=True)
        return Run.timed(t0, t1, digest(out))

    return run


def cases(profile: Profile) -> List[Case]:
    """The saga cases: durability none, always, and always from 8 threads."""
    plain = Contender("plain calls (no log)", _plain)
    return [
        Case(
            name="3 steps, durability none",
            description="one saga = 3 logged steps (page cache), vs the 3 functions called directly",
            kind=THROUGHPUT,
            workload=Workload(profile.count(quick=2_000, full=50_000), 64),
            contenders=[
                Contender("engine.Saga none", _saga("none"), ours=True, requires=OURS),
                plain,
            ],
        ),
        Case(
            name="3 steps, durability always",
            description="one saga = 3 logged steps, 4 msync+fdatasync per saga, vs the 3 functions called directly",
            kind=THROUGHPUT,
            workload=Workload(profile.count(quick=40, full=1_000), 64),
            contenders=[
                Contender("engine.Saga always", _saga("always"), ours=True, requires=OURS),
                plain,
            ],
        ),
        Case(
            name=f"3 steps, durability always, {THREADS} threads",
            description=f"{THREADS} threads share one Saga: the log group-commits their syncs",
            kind=THROUGHPUT,
            workload=Workload(profile.count(quick=160, full=4_000), 64),
            ordered=False,  # threads interleave; count and checksum still cover every saga
            contenders=[
                Contender(
                    f"engine.Saga always x{THREADS}",
                    _saga("always", THREADS),
                    ours=True,
                    requires=OURS,
                ),
                plain,
            ],
        ),
    ]
