"""The records a saga writes with the default codec: formatted from templates
(engine.saga's ``_T_*``), they must be the very bytes the JSON encoder makes
of the same records, so that every reader (recovery, ``saga ls``, events
subscribers, older builds) sees one format; and a plain saga (ints, strs,
``None``) must not pay the encoder per record (its CPU per saga bounds the
throughput of durable sagas in several threads)."""

from __future__ import annotations

import json

import pytest

import engine
import engine.saga as saga_mod
from engine.saga import Saga, SagaState, SagaStuck, StepFailed, list_sagas

STEPS = ("reserve", "charge", "deliver")

# contexts and results that go through every branch of the value encoding
VALUES = [
    0,
    -7,
    2**70,
    "",
    'quote " backslash \\ slash / tab \t newline \n',
    "é ü 中文 \x00 \x1f \u2028",
    "\ud800 lone surrogate",
    None,
    True,
    False,
    1.5,
    -0.0,
    1e300,
    [1, "a", None, [2.5, {}]],
    {"k": [1, 2], "é": {"z": None}, "": 0},
    (1, 2),
]
IDS = ["plain", 'q"uote', "back\\slash", "ünï\u2028cödé", "😀 emoji", "ctl\x01"]


class CountingEncoder:
    """Stands in for engine.saga's JSON encoder and counts its calls."""

    def __init__(self, real) -> None:
        self.real = real
        self.calls = 0

    def encode(self, obj):
        self.calls += 1
        return self.real.encode(obj)


def _records(path) -> list:
    with engine.LogReader(str(path), start=0) as r:
        return [(bytes(x.key), bytes(x.value)) for x in r]


def _script(saga: Saga, fail_at: dict, comp_fail: dict) -> None:
    """Declare the steps: each returns the value its ctx names; ``fail_at``
    (step -> error text) makes an action raise, ``comp_fail`` a compensation."""

    def action(name):
        def fn(sc):
            if name in fail_at:
                raise RuntimeError(fail_at[name])
            i = int(sc.saga_id.rsplit("-", 1)[1])
            return VALUES[(i + STEPS.index(name)) % len(VALUES)]

        return fn

    def undo(name):
        def fn(sc):
            if name in comp_fail:
                raise RuntimeError(comp_fail[name])

        return fn

    for name in STEPS:
        saga.step(name, action(name), undo(name), retries=0)


def _drive(saga: Saga, n: int) -> list:
    ends = []
    for i in range(n):
        sid = IDS[i % len(IDS)] + f"-{i}"
        try:
            saga.run(VALUES[i % len(VALUES)], saga_id=sid)
            ends.append((sid, "done"))
        except StepFailed:
            ends.append((sid, "compensated"))
        except SagaStuck:
            ends.append((sid, "stuck"))
    return ends


@pytest.mark.parametrize(
    "fail_at, comp_fail, end",
    [
        ({}, {}, "done"),
        ({"deliver": "no stock é"}, {}, "compensated"),
        ({"charge": 'card "declined"'}, {"reserve": "x"}, "stuck"),
    ],
)
def test_template_records_are_the_encoders_bytes(tmp_path, fail_at, comp_fail, end):
    """The same sagas with the default codec (templates) and with the same
    JSON codec passed explicitly (the encoder per record) write the same
    records, byte for byte, under the same keys; each is what the encoder
    makes of its own decoding; and the log folds to the same states."""
    logs = {}
    for name, codec in (("templates", None), ("encoder", saga_mod._JSON)):
        saga = Saga(
            tmp_path / name, durability="none", backoff=0, compensate_retries=0, codec=codec
        )
        _script(saga, fail_at, comp_fail)
        ends = _drive(saga, 2 * len(VALUES))
        saga.close()
        logs[name] = (_records(tmp_path / name), ends)
    (ours, ends), (theirs, ends2) = logs["templates"], logs["encoder"]
    assert ends == ends2 and {st for _, st in ends} == {end}
    assert len(ours) == len(theirs) > 0
    assert ours == theirs
    for _key, value in ours:
        assert value == saga_mod._json_dumps(json.loads(value))
    kinds = {json.loads(v)["t"] for _, v in ours}
    assert {"begin", "start", "end"} <= kinds
    assert "done" in kinds
    states = {i.saga_id: i.state for i in list_sagas(tmp_path / "templates")}
    assert states == {sid: SagaState(st) for sid, st in ends}


def test_a_plain_saga_does_not_run_the_encoder_per_record(tmp_path, monkeypatch):
    """ints, strs and None in ctx and results: the saga's 8 records (begin,
    3 x start + done, end) come from the templates, no encoder call."""
    saga = Saga(tmp_path / "s", durability="none")
    for name in STEPS:
        saga.step(name, lambda sc: sc.ctx, lambda sc: None)
    counting = CountingEncoder(saga_mod._ENCODER)
    monkeypatch.setattr(saga_mod, "_ENCODER", counting)
    for ctx in (1, "two", None):
        before = saga.log.next_offset
        assert saga.run(ctx) == {n: ctx for n in STEPS}
        assert saga.log.next_offset - before == 2 * len(STEPS) + 2
    assert counting.calls == 0
    # a value the templates do not cover goes to the encoder (once: the ctx)
    saga.run(1.25)
    assert counting.calls == 1 + len(STEPS)  # the ctx in begin, each step's result
    saga.close()


def _world_saga(path, codec, world: dict):
    """Three steps acting on ``world`` (key -> result, survives crashes), each
    idempotent by key; a compensation removes the key."""
    saga = Saga(path, durability="none", backoff=0, codec=codec)

    def act(sc):
        world.setdefault(sc.key, [sc.ctx, sc.step])
        return world[sc.key]

    def undo(sc):
        world.pop(sc.key, None)

    for name in STEPS:
        saga.step(name, act, undo)
    return saga


@pytest.mark.parametrize("writer, reader", [("encoder", "templates"), ("templates", "encoder")])
def test_a_journal_crashed_at_every_point_recovers_under_the_other_writer(tmp_path, writer, reader):
    """A saga crashed (in-process, as a SIGKILL leaves it) at each of its
    crash points in turn, written by one writer (the JSON encoder per record,
    as a custom codec does, or the templates), is finished by a Saga with the
    other: done, with every step's effect exactly once, its results as the
    actions returned them, and every record of the log the encoder's bytes."""
    import crashkit

    codecs = {"encoder": saga_mod._JSON, "templates": None}
    seen = {"recovered": 0, "not begun": 0, "finished": 0}
    k = 1
    while True:
        path = tmp_path / f"k{k}"
        world: dict = {}
        saga = _world_saga(path, codecs[writer], world)
        crashkit.arm_in_process(f"*#{k}")
        try:
            saga.run({"n": k, "s": 'é"'}, saga_id=f"s{k}")
            crashed = False
        except crashkit.SimulatedCrash:
            crashed = True
            saga._simulate_crash()
        finally:
            crashkit.arm_in_process(None)
        if not crashed:
            saga.close()
            break
        again = _world_saga(path, codecs[reader], world)
        infos = {i.saga_id: i for i in again.recover()}
        states = {i.saga_id: i.state for i in list_sagas(path)}
        again.close()
        sid = f"s{k}"
        if sid in infos:  # unfinished at the crash: recovery finished it
            assert infos[sid].state is SagaState.DONE, (k, infos)
            assert infos[sid].results == {n: [{"n": k, "s": 'é"'}, n] for n in STEPS}
            seen["recovered"] += 1
        elif sid not in states:  # crashed before its first write: nothing ran
            assert states == {} and world == {}, (k, states, world)
            seen["not begun"] += 1
            k += 1
            continue
        else:  # crashed once its end was written: finished, nothing to recover
            seen["finished"] += 1
        assert states == {sid: SagaState.DONE}, (k, states)
        assert sorted(world) == sorted(f"s{k}:{n}" for n in STEPS), (k, world)
        for _key, value in _records(path):
            assert value == saga_mod._json_dumps(json.loads(value))
        k += 1
    # a crash before anything was written, at each durable write and each
    # call in between, and after the end was written
    assert seen["recovered"] >= 2 * len(STEPS) + 1 and seen["not begun"] and seen["finished"], seen


def test_only_plain_sagas_take_the_forward_path(tmp_path):
    """``engine._saga.forward`` serves steps that run alone, synchronous, without a
    timeout, with the default codec's records; anything else the stages."""

    def declare(saga: Saga, **kw) -> Saga:
        saga.step("a", lambda sc: 1)
        saga.step("b", lambda sc: 2, **kw)
        return saga

    async def coro(sc):
        return 1

    assert declare(Saga(tmp_path / "plain", durability="none"))._plain
    assert not declare(Saga(tmp_path / "t", durability="none"), timeout=1.0)._plain
    assert not declare(Saga(tmp_path / "g", durability="none"), group="g")._plain
    assert not Saga(tmp_path / "n", durability="none")._plain  # no steps yet
    codec = Saga(tmp_path / "c", durability="none", codec=saga_mod._JSON)
    assert not declare(codec)._plain
    aio = Saga(tmp_path / "aio", durability="none").step("a", coro)
    assert not aio._plain
    for saga in (aio, codec):
        saga.close()


@pytest.mark.parametrize(
    "plan",
    [
        "ok",  # every step done at its first attempt
        "flaky",  # charge fails twice, then succeeds at its third (last) attempt
        "exhausted",  # charge fails at every attempt: 3 tries, then compensation
        "not-retried",  # charge raises an error outside retry_on: no retry
        "unencodable",  # charge returns a value the codec cannot encode
    ],
)
def test_the_forward_path_writes_what_the_stages_write(tmp_path, plan):
    """A plain saga's steps go through ``engine._saga.forward``; the same saga forced
    through the stages (``_run_stage``/``_attempts``) must write the same
    records, byte for byte, and end the same: attempt numbers, fail
    records and retry counts included."""
    logs = {}
    for path_name, plain in (("forward", True), ("stages", False)):
        calls: dict = {}

        def act(sc, calls=calls):
            calls[sc.key] = n = calls.get(sc.key, 0) + 1
            if sc.step == "charge":
                if plan == "flaky" and n <= 2:
                    raise ConnectionError(f"try {n}")
                if plan == "exhausted":
                    raise ConnectionError("down")
                if plan == "not-retried":
                    raise KeyError("no such card")
                if plan == "unencodable":
                    return object()
            return [sc.ctx, sc.step, sc.attempt]

        saga = Saga(tmp_path / path_name, durability="none", backoff=0, retries=2)
        for name in STEPS:
            saga.step(name, act, lambda sc: None, retry_on=ConnectionError)
        assert saga._plain
        saga._plain = plain
        ends = []
        for i in range(3):
            try:
                ends.append(saga.run({"i": i}, saga_id=f"s{i}"))
            except StepFailed as exc:
                ends.append((exc.step, exc.cause, exc.compensated))
        infos = [i.as_dict() for i in list_sagas(tmp_path / path_name)]
        for info in infos:  # (when it ran, not what it did)
            del info["begun_ns"], info["updated_ns"]
        saga.close()
        logs[path_name] = (_records(tmp_path / path_name), ends, infos, calls)
    assert logs["forward"] == logs["stages"]
    records, ends, _infos, calls = logs["forward"]
    kinds = [json.loads(v)["t"] for _, v in records]
    expect = {"ok": 1, "flaky": 3, "exhausted": 3, "not-retried": 1, "unencodable": 1}[plan]
    assert [calls[f"s{i}:charge"] for i in range(3)] == [expect] * 3
    assert kinds.count("fail") == 3 * {"ok": 0, "flaky": 2}.get(plan, expect)
    assert (plan in ("ok", "flaky")) == all(isinstance(e, dict) for e in ends)
