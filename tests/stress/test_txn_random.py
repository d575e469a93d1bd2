"""Randomized 2PC under random SIGKILLs: money is conserved, every txn is atomic.

Three :class:`engine.VersionedStore` "banks" hold four accounts each; every
transaction moves a random amount between two random accounts (often in two
different banks, so two store participants) and appends an audit record to an
:class:`engine.Log` (a third participant).  Three threads run transfers
concurrently in a forked child, which is SIGKILLed at a random crash point
(random step, random party, random hit count); the test process then restarts
everything, recovers, and checks after every crash:

* nothing is in doubt anywhere (participants and coordinator);
* the total of all balances is what it was at the start (money conserved);
* replaying the audit log from the initial balances gives exactly every
  balance and every key's version: a transaction is in the audit log iff all
  its store writes are in (atomicity across three resources), none twice;

and the next child continues from there, until >= 1,000 transactions committed.
Every journal compacts at the smallest threshold (16 records), so kills land
in journal switches and in replays that switch, with transactions in doubt;
every other child first reopens everything (replay) and closes it cleanly
before anyone resolves what is in doubt.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter

import crashkit
import pytest

from engine._log import Log, LogReader
from engine.errors import TransactionAborted
from engine.txn import Coordinator, LogParticipant, StoreParticipant
from engine.versions import VersionedStore

pytestmark = pytest.mark.crash


SEG = 1 << 16
BANKS = 3
ACCOUNTS = [b"acct%d" % i for i in range(4)]
START = 1000
TARGET = 1000
# the smallest allowed: every journal switches generations every few
# transactions, so kills land in switches, in replays that switch, and
# between generations, with transactions in doubt
COMPACT = 16


class Bank:
    def __init__(self, root: str, recover: bool = True) -> None:
        fresh = not os.path.exists(os.path.join(root, "ready"))
        self.stores = [
            VersionedStore(
                os.path.join(root, f"bank{i}"),
                durability="none",
                segment_bytes=SEG,
                snapshot_every=500,
            )
            for i in range(BANKS)
        ]
        self.audit = Log(os.path.join(root, "audit"), durability="none", segment_bytes=SEG)
        if fresh:
            for s in self.stores:
                s.apply([("put", a, b"%d" % START) for a in ACCOUNTS])
            with open(os.path.join(root, "ready"), "w"):
                pass
        self.coord = Coordinator(
            os.path.join(root, "coord"),
            durability="none",
            segment_bytes=SEG,
            end_batch=8,
            compact_records=COMPACT,
        )
        self.parts = [
            StoreParticipant(
                s,
                name=f"bank{i}",
                state_path=os.path.join(root, f"bank{i}.txn"),
                segment_bytes=SEG,
                compact_records=COMPACT,
            )
            for i, s in enumerate(self.stores)
        ]
        self.paudit = LogParticipant(
            self.audit, name="audit", segment_bytes=SEG, compact_records=COMPACT
        )
        if recover:
            self.coord.recover(self.parts + [self.paudit])

    def transfer(self, rng: random.Random) -> bool:
        (b1, a1), (b2, a2) = rng.sample([(b, a) for b in range(BANKS) for a in ACCOUNTS], 2)
        amount = rng.randint(1, 50)
        v1, bal1 = self.stores[b1].get(a1)
        v2, bal2 = self.stores[b2].get(a2)
        with self.coord.transaction(timeout=10) as tx:
            ops1 = [(a1, b"%d" % (int(bal1) - amount), v1)]
            ops2 = [(a2, b"%d" % (int(bal2) + amount), v2)]
            if b1 == b2:
                tx.enlist(self.parts[b1], ops1 + ops2)
            else:
                tx.enlist(self.parts[b1], ops1)
                tx.enlist(self.parts[b2], ops2)
            tx.enlist(
                self.paudit, [b"%s %d %s %d %s %d" % (tx.txid.encode(), b1, a1, b2, a2, amount)]
            )
        return True

    def close(self) -> None:
        for p in self.parts:
            p.close()
        self.paudit.close()
        self.coord.close()
        for s in self.stores:
            s.close()
        self.audit.close()


def workload(root: str, seed: int, limit: int) -> int:
    if seed % 2:
        # a restart that replays (finishing marked batches, maybe switching
        # journals) and closes cleanly before anyone resolves what is in doubt
        Bank(root, recover=False).close()
    bank = Bank(root)
    done = [0]
    lock = threading.Lock()

    def worker(k: int) -> None:
        rng = random.Random(seed * 31 + k)
        while done[0] < limit:
            try:
                bank.transfer(rng)
            except TransactionAborted:
                continue  # a version conflict or a locked key: a concurrent transfer won
            with lock:
                done[0] += 1

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    bank.close()
    return done[0]


def check(root: str) -> int:
    bank = Bank(root)
    try:
        assert [p.recover() for p in bank.parts + [bank.paudit]] == [[]] * (BANKS + 1)
        assert bank.coord.in_doubt() == []
        balances = {}
        versions = {}
        for b, s in enumerate(bank.stores):
            for a in ACCOUNTS:
                v, val = s.get(a)
                balances[(b, a)] = int(val)
                versions[(b, a)] = v
        assert sum(balances.values()) == BANKS * len(ACCOUNTS) * START  # money conserved
        model = {k: START for k in balances}
        mver = {k: 1 for k in balances}
        seen = set()
        with LogReader(bank.audit.path, start=0) as r:
            for rec in r:
                txid, b1, a1, b2, a2, amount = bytes(rec.value).split()
                assert txid not in seen, f"audit record of {txid!r} twice"
                seen.add(txid)
                k1, k2 = (int(b1), a1), (int(b2), a2)
                model[k1] -= int(amount)
                model[k2] += int(amount)
                mver[k1] += 1
                mver[k2] += 1
        assert model == balances, "a transaction is half applied (audit and stores disagree)"
        assert mver == versions, "store writes without an audit record (or the reverse)"
        return len(seen)
    finally:
        bank.close()


def test_random_crashes_conserve_money(workdir):
    tmp_path = workdir
    root = str(tmp_path / "bank")
    # the crash points a clean run of 30 transactions passes, with how often
    # each is hit there; a round (up to 80) dies at a drawn hit of a drawn one
    hits = Counter(p.split("#")[0] for p in crashkit.trace(workload, str(tmp_path / "t"), 1, 30))
    names = sorted(hits)
    assert len(names) >= 15, names
    rng = random.Random(7)
    committed = 0
    crashes = 0
    rounds = 0
    t0 = time.monotonic()
    while committed < TARGET:
        rounds += 1
        assert rounds < 200, "no progress"
        name = rng.choice(names)
        point = f"{name}#{rng.randint(1, 2 * hits[name])}"
        res = crashkit.run(
            workload, root, rounds, min(TARGET - committed + 10, 80), crash_at=point, timeout=120
        )
        if res.killed:
            crashes += 1
        else:
            res.unwrap()
        committed = check(root)
    print(
        f"\nrandom 2PC: {committed} transactions committed across {crashes} SIGKILLs "
        f"in {rounds} rounds, {time.monotonic() - t0:.1f} s"
    )
    assert committed >= TARGET
    assert crashes >= 15
