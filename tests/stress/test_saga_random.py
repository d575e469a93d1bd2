"""A randomized order/payment/stock workload: >= 1,000 sagas of 3-5 steps with
random failures (transient, business, permanent; in actions and in
compensations) and random SIGKILLs (during runs and during recovery).

Children forked by tests/crashkit.py run sagas until each is SIGKILLed at a
random crash point;
the next child first recovers, then goes on. At the end the parent recovers
and checks, against the sagas' own logs:

* every saga ended ``done`` or ``compensated`` (none left running, none stuck);
* every action took effect at most once per idempotency key, and an undo only
  ever follows its effect (a tombstone otherwise); a done saga has all its
  effects and no undo, a compensated one has every effect undone;
* every account equals what the done sagas alone imply (money and stock moved
  by compensated sagas came back exactly), and the totals are conserved:
  customers + escrow + merchant money, and warehouse + reserved + shipped stock.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter, defaultdict

import crashkit
import pytest

from engine import saga as saga_mod
from engine.saga import Saga, SagaState, SagaStuck, StepFailed, list_sagas

pytestmark = [pytest.mark.crash, pytest.mark.stress]

CUSTOMERS = 8
ITEMS = 4
MONEY0 = 3000
STOCK0 = 400
TARGET_SAGAS = 1000


class Transient(Exception):
    """A failure worth retrying (the network, a lock timeout...)."""


class Business(Exception):
    """A failure not worth retrying (insufficient funds, out of stock, declined)."""


def initial_accounts():
    acc = {f"cust:{c}": MONEY0 for c in range(CUSTOMERS)}
    acc.update({"escrow": 0, "merchant": 0, "orders": 0})
    for i in range(ITEMS):
        acc.update({f"stock:{i}": STOCK0, f"reserved:{i}": 0, f"shipped:{i}": 0})
    return acc


def deltas(step, ctx):
    """What each step moves; its compensation moves it back."""
    c, i, q, amt = ctx["c"], ctx["i"], ctx["q"], ctx["amt"]
    if step == "order":
        return {"orders": 1}
    if step == "charge":
        return {f"cust:{c}": -amt, "escrow": amt}
    if step == "reserve":
        return {f"stock:{i}": -q, f"reserved:{i}": q}
    if step == "ship":
        return {f"reserved:{i}": -q, f"shipped:{i}": q}
    if step == "settle":
        return {"escrow": -amt, "merchant": amt}
    raise AssertionError(step)


DEFINITIONS = {
    3: ["order", "charge", "reserve"],
    4: ["order", "charge", "reserve", "ship"],
    5: ["order", "charge", "reserve", "ship", "settle"],
}


class Store:
    """Accounts kept as an append-only ledger file (one os.write per line, so
    a SIGKILL never leaves half an effect): ``E key deltas`` applies,
    ``U key`` undoes the E of that key, ``T key`` is a tombstone (undone
    before it took effect: a late action is a no-op)."""

    def __init__(self, path, rng=None):
        self.path = path
        self.rng = rng
        self.acc = initial_accounts()
        self.effects = {}  # key -> deltas applied
        self.undone = set()
        self.lines = []
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    kind, key, *rest = line.split(" ", 2)
                    self._apply(kind, key.strip(), rest[0] if rest else None)
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def _apply(self, kind, key, payload):
        self.lines.append((kind, key))
        if kind == "E":
            d = json.loads(payload)
            self.effects[key] = d
            for a, v in d.items():
                self.acc[a] += v
        elif kind == "U":
            for a, v in self.effects[key].items():
                self.acc[a] -= v
            self.undone.add(key)
        elif kind == "T":
            self.undone.add(key)

    def _write(self, kind, key, payload=None):
        line = f"{kind} {key}" + (f" {payload}" if payload is not None else "") + "\n"
        os.write(self.fd, line.encode())
        self._apply(kind, key, payload)

    def action(self, step):
        def fn(sc):
            key, ctx = sc.key, sc.ctx
            if key in self.effects or key in self.undone:
                return True  # idempotent: it took effect already, or was cancelled
            saga_mod._crash_point(f"test.action:{step}")
            r = self.rng.random()
            if r < 0.08:
                raise Transient(f"{step}: try again")
            if r < 0.10:
                raise Business(f"{step}: declined")
            d = deltas(step, ctx)
            for a, v in d.items():
                if a != "escrow" and self.acc[a] + v < 0:
                    raise Business(f"{step}: not enough {a}")
            self._write("E", key, json.dumps(d))
            saga_mod._crash_point(f"test.applied:{step}")
            return True

        return fn

    def compensate(self, step):
        def fn(sc):
            key = sc.key
            if key in self.undone:
                return
            saga_mod._crash_point(f"test.undo:{step}")
            if self.rng.random() < 0.10:
                raise Transient(f"undo {step}: try again")
            self._write("U" if key in self.effects else "T", key)

        return fn

    def close(self):
        os.close(self.fd)


def open_sagas(base, store):
    out = {}
    for n, names in DEFINITIONS.items():
        s = Saga(
            os.path.join(base, f"saga{n}"),
            durability="none",
            segment_bytes=1 << 20,
            retries=2,
            compensate_retries=8,
            backoff=0.0,
            max_backoff=0.0,
        )
        for step in names:
            s.step(step, store.action(step), store.compensate(step), retry_on=Transient)
        out[n] = s
    return out


def worker(base, seed, quota):
    rng = random.Random(seed)
    store = Store(os.path.join(base, "ledger"), random.Random(seed + 1))
    sagas = open_sagas(base, store)
    for s in sagas.values():
        s.recover()
    begun = os.open(os.path.join(base, "begun"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    for _ in range(quota):
        n = rng.choice((3, 4, 5))
        ctx = {
            "c": rng.randrange(CUSTOMERS),
            "i": rng.randrange(ITEMS),
            "q": rng.randint(1, 4),
            "amt": rng.randint(5, 60),
        }
        os.write(begun, b".")
        try:
            sagas[n].run(ctx)
        except (StepFailed, SagaStuck):
            pass
    for s in sagas.values():
        s.close()
    store.close()


def test_random_sagas_with_crashes(tmp_path):
    base = str(tmp_path)
    rng = random.Random(20261126)
    kills = clean_exits = 0
    begun_file = os.path.join(base, "begun")
    while not os.path.exists(begun_file) or os.path.getsize(begun_file) < TARGET_SAGAS + 100:
        # die at a random crash point (the k-th hit of any), or finish the quota
        res = crashkit.run(
            worker,
            base,
            rng.randrange(1 << 30),
            40,
            crash_at=f"*#{rng.randint(1, 900)}",
            hooks=("engine.saga",),
            timeout=120,
        )
        if res.killed:
            kills += 1
        else:
            res.unwrap()
            clean_exits += 1
        assert kills + clean_exits < 400, "the workload makes no progress"

    # final recovery, nobody armed
    store = Store(os.path.join(base, "ledger"), random.Random(1))
    sagas = open_sagas(base, store)
    for s in sagas.values():
        infos = s.recover()
        assert all(i.state.finished for i in infos), infos
        assert s.unfinished() == []
        s.close()
    store.close()

    store = Store(os.path.join(base, "ledger"))
    store.close()
    per_key = Counter(store.lines)
    expected = initial_accounts()
    states = Counter()
    steps_seen = Counter()
    for n, names in DEFINITIONS.items():
        for info in list_sagas(os.path.join(base, f"saga{n}")):
            states[info.state] += 1
            assert info.steps == names
            for step in names:
                key = f"{info.saga_id}:{step}"
                assert per_key[("E", key)] <= 1 and per_key[("U", key)] <= per_key[("E", key)]
                assert per_key[("T", key)] <= 1 and per_key[("U", key)] + per_key[("T", key)] <= 1
                if info.state is SagaState.DONE:
                    assert per_key[("E", key)] == 1 and key not in store.undone, key
                else:
                    assert info.state is SagaState.COMPENSATED, info
                    assert per_key[("E", key)] == per_key[("U", key)], key
            if info.state is SagaState.DONE:
                steps_seen[n] += 1
                for step in names:
                    for a, v in deltas(step, info.ctx).items():
                        expected[a] += v
    total = sum(states.values())
    print(
        f"{total} sagas: {dict((k.value, v) for k, v in states.items())}, done by length "
        f"{dict(steps_seen)}, {kills} SIGKILLs, {clean_exits} clean exits"
    )
    # (a kill may come before a saga's first write: then it never began)
    assert total >= TARGET_SAGAS
    assert states[SagaState.DONE] >= 100 and states[SagaState.COMPENSATED] >= 100
    assert kills >= 20
    # every account is what the done sagas imply; nothing else moved anything
    assert store.acc == expected
    money = sum(v for a, v in store.acc.items() if a.startswith("cust:"))
    assert money + store.acc["escrow"] + store.acc["merchant"] == CUSTOMERS * MONEY0
    for i in range(ITEMS):
        moved = store.acc[f"stock:{i}"] + store.acc[f"reserved:{i}"] + store.acc[f"shipped:{i}"]
        assert moved == STOCK0
    # no effect belongs to a saga the logs do not know
    known = defaultdict(set)
    for kind, key in store.lines:
        known[kind].add(key.split(":")[0])
    all_ids = {i.saga_id for n in DEFINITIONS for i in list_sagas(os.path.join(base, f"saga{n}"))}
    assert known["E"] <= all_ids
