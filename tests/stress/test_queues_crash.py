"""SIGKILL producers and consumers of one engine.Queue at random moments,
>= 100 times, while the others keep going.

Every producer incarnation logs each seq after its put returned; every
consumer logs each (tag, seq) after its get returned and after checking the
message's content (a consumer that finds a corrupt message exits with an
error, which fails the test).  Afterwards:

* nothing was got twice, and each producer's messages came out in order;
* nothing acknowledged was lost beyond what killed consumers can account
  for: a consumer killed after its get returned (before it logged) loses at
  most the batch it held (<= 4 messages);
* nothing was got that its producer did not put: a message not acknowledged
  can only be the one a producer was putting when it died;
* the queue still works after the last kill: a fresh producer's messages
  all arrive.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import test_queues_kit as kit  # noqa: E402

import engine  # noqa: E402

pytestmark = pytest.mark.crash

KILLS = 120
PRODUCERS, CONSUMERS = 3, 3
BATCH = 4  # most messages a consumer holds between get returning and logging
TIME_LIMIT = 150.0


def _read_u64s(path):
    data = path.read_bytes()
    return [int.from_bytes(data[i:i + 8], "little") for i in range(0, len(data) - len(data) % 8, 8)]


def _read_pairs(path):
    data = path.read_bytes()
    usable = len(data) - len(data) % 12
    return [(int.from_bytes(data[i:i + 4], "little"), int.from_bytes(data[i + 4:i + 12], "little"))
            for i in range(0, usable, 12)]


def test_sigkill_producers_and_consumers(tmp_path):
    ctx = mp.get_context("fork")
    q = engine.Queue(capacity=1 << 21)
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    procs = {}  # pid -> (role, Process, log path, tag)
    next_tag = [0]
    consumer_kills = 0
    kills = 0
    failures = []

    def start(role):
        if role == "p":
            tag = next_tag[0]
            next_tag[0] += 1
            log = tmp_path / f"p{tag}.log"
        else:
            tag = None
            log = tmp_path / f"c{len(list(tmp_path.glob('c*.log')))}.log"
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        target, args = (kit.crash_producer, (q, fd, tag)) if role == "p" else (kit.crash_consumer, (q, fd))
        p = ctx.Process(target=target, args=args, daemon=True)
        p.start()
        os.close(fd)
        procs[p.pid] = (role, p, log, tag)

    def reap(pid, expect_kill):
        role, p, _, _ = procs.pop(pid)
        p.join(30)
        if p.exitcode != -signal.SIGKILL or not expect_kill:
            failures.append(f"{role} {pid} ended with {p.exitcode}")

    for _ in range(PRODUCERS):
        start("p")
    for _ in range(CONSUMERS):
        start("c")
    t0 = time.monotonic()
    while kills < KILLS and time.monotonic() - t0 < TIME_LIMIT:
        time.sleep(rng.uniform(0, 0.03))
        for pid, (role, p, _, _) in list(procs.items()):
            if not p.is_alive():  # died on its own: a corrupt message or a crash
                reap(pid, expect_kill=False)
                start(role)
        pid = rng.choice(list(procs))
        role = procs[pid][0]
        os.kill(pid, signal.SIGKILL)
        reap(pid, expect_kill=True)
        kills += 1
        consumer_kills += role == "c"
        start(role)
    assert kills >= 100, f"only {kills} kills in {TIME_LIMIT} s"

    # stop the producers, let the consumers drain, then stop them (idle in get)
    for pid, (role, _, _, _) in list(procs.items()):
        if role == "p":
            os.kill(pid, signal.SIGKILL)
            reap(pid, expect_kill=True)
    deadline = time.monotonic() + 60
    while q.qsize() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert q.qsize() == 0, "consumers stopped draining"
    # survivors keep going: a fresh producer's messages all arrive
    start("p")
    last_tag = next_tag[0] - 1
    time.sleep(0.5)
    for pid, (role, _, _, _) in list(procs.items()):
        if role == "p":
            os.kill(pid, signal.SIGKILL)
            reap(pid, expect_kill=True)
    deadline = time.monotonic() + 60
    while q.qsize() and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)  # the last gets' log writes
    for pid in list(procs):
        os.kill(pid, signal.SIGKILL)
        reap(pid, expect_kill=True)
    assert not failures, failures

    acked = {int(p.stem[1:]): _read_u64s(p) for p in tmp_path.glob("p*.log")}
    got = defaultdict(list)
    seen = set()
    for log in tmp_path.glob("c*.log"):
        last = {}
        for tag, seq in _read_pairs(log):
            assert (tag, seq) not in seen, f"message {tag}/{seq} got twice"
            seen.add((tag, seq))
            assert seq > last.get(tag, -1), f"producer {tag}'s messages out of order"
            last[tag] = seq
            got[tag].append(seq)
    lost = 0
    for tag, seqs in acked.items():
        assert seqs == list(range(len(seqs))), f"producer {tag}'s log is not 0..n"
        n_acked = len(seqs)
        extra = set(got[tag]) - set(range(n_acked))
        assert extra <= {n_acked}, f"producer {tag}: got messages it never put: {sorted(extra)[:5]}"
        lost += len(set(range(n_acked)) - set(got[tag]))
    assert lost <= BATCH * consumer_kills, f"{lost} acknowledged messages lost, {consumer_kills} consumer kills"
    assert len(acked[last_tag]) > 0 and set(range(len(acked[last_tag]))) <= set(got[last_tag])
    stats = q.stats()
    print(f"kills={kills} consumer_kills={consumer_kills} lost={lost} delivered={len(seen)} "
          f"takeovers={stats['producer_lock_takeovers']}+{stats['consumer_lock_takeovers']}")
