"""engine.Saga: order of actions and compensations, retries, timeouts, groups,
async steps, events, recovery in-process, bad input. Crash recovery with real
SIGKILLs is in tests/stress/test_saga_crash.py and test_saga_random.py."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import engine
from engine.errors import EngineError, LogLocked, Timeout
from engine.saga import Saga, SagaState, SagaStuck, StepFailed, list_sagas

NAMES = ["a", "b", "c", "d"]


class Recorder:
    """Records every call as (kind, step, key, attempt); failure plans per step."""

    def __init__(self):
        self.calls = []
        self.lock = threading.Lock()
        self.fail_action = {}  # step -> number of attempts that raise (10**9 = always)
        self.fail_comp = {}  # step -> number of compensation attempts that raise
        self.applied = {}  # key -> result of the action (its effect)

    def action(self, name):
        def fn(sc):
            with self.lock:
                self.calls.append(("do", name, sc.key, sc.attempt))
                left = self.fail_action.get(name, 0)
                if left:
                    self.fail_action[name] = left - 1
                    raise RuntimeError(f"{name} fails")
                self.applied[sc.key] = f"r-{name}"
            return f"r-{name}"

        return fn

    def compensate(self, name):
        def fn(sc):
            with self.lock:
                self.calls.append(("undo", name, sc.key, sc.attempt))
                left = self.fail_comp.get(name, 0)
                if left:
                    self.fail_comp[name] = left - 1
                    raise RuntimeError(f"undo {name} fails")
                # idempotent: undoing twice, or undoing what never happened, is a no-op
                self.applied.pop(sc.key, None)
                assert sc.result in (None, f"r-{name}")

        return fn

    def kinds(self):
        return [(k, n) for k, n, _, _ in self.calls]


def make(tmp_path, rec, names=NAMES, durability="none", **kw):
    kw.setdefault("backoff", 0.0)
    kw.setdefault("max_backoff", 0.0)
    kw.setdefault("segment_bytes", 1 << 20)  # the log preallocates a segment; keep tests' disk small
    saga = Saga(tmp_path / "saga", durability=durability, **kw)
    for n in names:
        saga.step(n, rec.action(n), rec.compensate(n))
    return saga


def test_exported():
    assert engine.Saga is Saga
    assert issubclass(StepFailed, EngineError) and issubclass(SagaStuck, EngineError)


@pytest.mark.parametrize("durability", ["always", "none"])
def test_success_order_results_and_keys(tmp_path, durability):
    rec = Recorder()
    with make(tmp_path, rec, durability=durability) as saga:
        out = saga.run({"order": 1}, saga_id="s1")
    assert out == {n: f"r-{n}" for n in NAMES}
    assert rec.kinds() == [("do", n) for n in NAMES]
    assert [k for _, _, k, _ in rec.calls] == [f"s1:{n}" for n in NAMES]
    assert sorted(rec.applied) == [f"s1:{n}" for n in NAMES]
    [info] = list_sagas(tmp_path / "saga")
    assert info.state is SagaState.DONE and info.done == NAMES and info.ctx == {"order": 1}
    assert info.results == out and info.attempts == len(NAMES)


@pytest.mark.parametrize("fail_at", range(len(NAMES)))
def test_failure_at_each_step_compensates_in_reverse(tmp_path, fail_at):
    rec = Recorder()
    rec.fail_action[NAMES[fail_at]] = 10**9
    with make(tmp_path, rec, retries=2) as saga:
        with pytest.raises(StepFailed) as ei:
            saga.run(None, saga_id="s")
    failing = NAMES[fail_at]
    expected = [("do", n) for n in NAMES[:fail_at]] + [("do", failing)] * 3
    expected += [("undo", n) for n in reversed(NAMES[:fail_at])]
    assert rec.kinds() == expected
    assert [a for k, n, _, a in rec.calls if n == failing] == [1, 2, 3]
    assert rec.applied == {}
    exc = ei.value
    assert exc.saga_id == "s" and exc.step == failing
    assert exc.compensated == list(reversed(NAMES[:fail_at]))
    assert "RuntimeError" in exc.cause and isinstance(exc.__cause__, RuntimeError)
    [info] = list_sagas(tmp_path / "saga")
    assert info.state is SagaState.COMPENSATED
    assert info.failed_step == failing and info.compensated == exc.compensated


def test_transient_failures_are_retried_with_same_key(tmp_path):
    rec = Recorder()
    rec.fail_action["b"] = 2
    with make(tmp_path, rec, retries=2) as saga:
        saga.run(saga_id="x")
    b_calls = [(k, a) for kind, n, k, a in rec.calls if n == "b"]
    assert b_calls == [("x:b", 1), ("x:b", 2), ("x:b", 3)]
    assert rec.kinds().count(("undo", "b")) == 0


def test_retry_on_limits_which_errors_are_retried(tmp_path):
    class Business(Exception):
        pass

    seen = []

    def charge(sc):
        seen.append(sc.attempt)
        raise Business("insufficient funds")

    saga = Saga(tmp_path / "s", durability="none", backoff=0)
    saga.step("charge", charge, lambda sc: None, retries=5, retry_on=ConnectionError)
    with pytest.raises(StepFailed, match="insufficient funds"):
        saga.run()
    assert seen == [1]
    saga.close()


def test_backoff_grows(tmp_path):
    stamps = []

    def flaky(sc):
        stamps.append(time.monotonic())
        if len(stamps) < 4:
            raise OSError("try again")

    saga = Saga(tmp_path / "s", durability="none", backoff=0.02, max_backoff=1.0)
    saga.step("x", flaky, None, retries=3)
    saga.run()
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    # 0.02, 0.04, 0.08 with jitter in [0.5, 1]
    assert gaps[0] >= 0.01 and gaps[1] >= 0.02 and gaps[2] >= 0.04
    saga.close()


def test_compensation_retried_then_succeeds(tmp_path):
    rec = Recorder()
    rec.fail_action["c"] = 10**9
    rec.fail_comp["a"] = 2
    with make(tmp_path, rec, retries=0, compensate_retries=3) as saga:
        with pytest.raises(StepFailed):
            saga.run(saga_id="q")
    assert (
        rec.kinds() == [("do", "a"), ("do", "b"), ("do", "c"), ("undo", "b")] + [("undo", "a")] * 3
    )
    assert rec.applied == {}


def test_stuck_is_reported_never_dropped_and_can_be_retried(tmp_path):
    rec = Recorder()
    rec.fail_action["c"] = 10**9
    rec.fail_comp["b"] = 10**9
    saga = make(tmp_path, rec, retries=0, compensate_retries=2)
    with pytest.raises(SagaStuck) as ei:
        saga.run(saga_id="st")
    assert ei.value.step == "b" and ei.value.failed_step == "c"
    # a stops being compensated at the stuck step: order is kept
    assert rec.kinds() == [("do", "a"), ("do", "b"), ("do", "c")] + [("undo", "b")] * 3
    assert [i.state for i in saga.unfinished()] == [SagaState.STUCK]
    [r] = saga.recover()  # not retried without retry_stuck
    assert r.state is SagaState.STUCK and r.stuck_step == "b"
    saga.close()
    # it survives a reopen, and `ls` shows it
    [info] = list_sagas(tmp_path / "saga")
    assert info.state is SagaState.STUCK and info.stuck_step == "b" and "undo b fails" in info.error
    rec.fail_comp.clear()
    saga = make(tmp_path, rec, retries=0)
    assert [i.saga_id for i in saga.unfinished()] == ["st"]
    [r] = saga.recover(retry_stuck=True)
    assert r.state is SagaState.COMPENSATED and r.compensated == ["b", "a"]
    assert rec.applied == {} and saga.unfinished() == []
    saga.close()
    [info] = list_sagas(tmp_path / "saga")
    assert info.state is SagaState.COMPENSATED


def test_timeout_counts_as_unknown_outcome_and_is_compensated(tmp_path):
    gate = threading.Event()
    undone = []

    def slow(sc):
        gate.wait(5)

    saga = Saga(tmp_path / "s", durability="none", backoff=0)
    saga.step("a", lambda sc: 1, lambda sc: undone.append("a"))
    saga.step("slow", slow, lambda sc: undone.append(("slow", sc.result)), timeout=0.05, retries=1)
    t0 = time.monotonic()
    with pytest.raises(StepFailed) as ei:
        saga.run()
    gate.set()
    assert time.monotonic() - t0 < 2
    assert isinstance(ei.value.__cause__, Timeout) and "timed out" in ei.value.cause
    # the timed-out step may have taken effect: compensated too (result unknown)
    assert undone == [("slow", None), "a"]
    assert ei.value.compensated == ["slow", "a"]
    saga.close()


def test_async_steps_with_run_and_arun(tmp_path):
    order = []

    async def a(sc):
        await asyncio.sleep(0)
        order.append(("a", sc.key))
        return 1

    async def undo_a(sc):
        order.append(("undo a", sc.result))

    async def boom(sc):
        raise ValueError("boom")

    async def slow(sc):
        await asyncio.sleep(5)

    saga = Saga(tmp_path / "s", durability="none", backoff=0)
    saga.step("a", a, undo_a).step("b", lambda sc: sc.results["a"] + 1, None)
    assert saga.run(saga_id="k") == {"a": 1, "b": 2}

    async def main():
        return await saga.arun(saga_id="k2")

    assert asyncio.run(main()) == {"a": 1, "b": 2}
    saga.step("c", boom, None, retries=0)
    with pytest.raises(StepFailed, match="boom"):
        saga.run(saga_id="k3")
    assert order == [("a", "k:a"), ("a", "k2:a"), ("a", "k3:a"), ("undo a", 1)]
    saga.close()

    saga = Saga(tmp_path / "t", durability="none", backoff=0)
    saga.step("slow", slow, None, timeout=0.05, retries=0)
    t0 = time.monotonic()
    with pytest.raises(StepFailed, match="timed out"):
        saga.run()
    assert time.monotonic() - t0 < 2
    saga.close()


def test_parallel_group_runs_concurrently_and_compensates(tmp_path):
    barrier = threading.Barrier(3, timeout=5)
    rec = Recorder()

    def meet(name):
        inner = rec.action(name)

        def fn(sc):
            barrier.wait()  # all three at once, or BrokenBarrierError
            return inner(sc)

        return fn

    saga = Saga(tmp_path / "s", durability="always", backoff=0)
    saga.step("first", rec.action("first"), rec.compensate("first"))
    for n in ("x", "y", "z"):
        saga.step(n, meet(n), rec.compensate(n), group="fan", retries=0)
    saga.step("last", rec.action("last"), rec.compensate("last"), retries=0)
    out = saga.run(saga_id="g")
    assert set(out) == {"first", "x", "y", "z", "last"}
    assert rec.kinds()[0] == ("do", "first") and rec.kinds()[-1] == ("do", "last")
    # now fail the step after the group: everything compensated in reverse declaration order
    barrier.reset()
    rec.calls.clear()
    rec.fail_action["last"] = 10**9
    with pytest.raises(StepFailed) as ei:
        saga.run(saga_id="g2")
    assert ei.value.compensated == ["z", "y", "x", "first"]
    assert rec.applied == {f"g:{n}": f"r-{n}" for n in ("first", "x", "y", "z", "last")}
    # one member of the group fails: the others finish, then all completed are undone
    barrier.reset()
    rec.fail_action.clear()
    rec.fail_action["y"] = 10**9
    barrier2 = threading.Barrier(2, timeout=5)
    saga2 = Saga(tmp_path / "s2", durability="none", backoff=0)
    saga2.step("first", rec.action("first"), rec.compensate("first"))
    saga2.step(
        "x", lambda sc: (barrier2.wait(), rec.action("x")(sc))[1], rec.compensate("x"), group="g"
    )
    saga2.step("y", rec.action("y"), rec.compensate("y"), group="g", retries=0)
    saga2.step(
        "z", lambda sc: (barrier2.wait(), rec.action("z")(sc))[1], rec.compensate("z"), group="g"
    )
    with pytest.raises(StepFailed) as ei:
        saga2.run(saga_id="g3")
    assert ei.value.step == "y" and ei.value.compensated == ["z", "x", "first"]
    assert not [k for k in rec.applied if k.startswith("g3:")]
    saga.close()
    saga2.close()


def test_group_must_be_consecutive(tmp_path):
    saga = Saga(tmp_path / "s", durability="none")
    saga.step("a", lambda sc: 1, group="g").step("b", lambda sc: 1)
    with pytest.raises(ValueError, match="group"):
        saga.step("c", lambda sc: 1, group="g")
    saga.close()


def test_events_hook_callable_and_log(tmp_path):
    got = []
    rec = Recorder()
    rec.fail_action["b"] = 10**9
    saga = Saga(tmp_path / "s", durability="none", backoff=0, events=got.append)
    saga.step("a", rec.action("a"), rec.compensate("a")).step("b", rec.action("b"), None, retries=0)
    with pytest.raises(StepFailed):
        saga.run({"n": 1}, saga_id="e")
    kinds = [(e["t"], e.get("s")) for e in got]
    assert kinds == [
        ("begin", None),
        ("start", "a"),
        ("done", "a"),
        ("start", "b"),
        ("fail", "b"),
        ("abort", "b"),
        ("cstart", "a"),
        ("cdone", "a"),
        ("end", None),
    ]
    assert got[-1]["st"] == "compensated" and all(e["id"] == "e" for e in got)
    saga.close()

    events = engine.Log(tmp_path / "events", durability="none")
    saga = Saga(tmp_path / "s2", durability="none", events=events)
    saga.step("a", lambda sc: 7)
    saga.run(saga_id="f")
    saga.close()
    events.close()
    with engine.LogReader(tmp_path / "events", start=0) as r:
        recs = [(bytes(x.key), json.loads(bytes(x.value))) for x in r]
    assert [v["t"] for _, v in recs] == ["begin", "start", "done", "end"]
    assert {k for k, _ in recs} == {b"f"} and recs[2][1]["r"] == 7


def test_broken_events_hook_does_not_stop_the_saga(tmp_path):
    def hook(e):
        raise RuntimeError("subscriber down")

    saga = Saga(tmp_path / "s", durability="none", events=hook)
    saga.step("a", lambda sc: 1)
    assert saga.run() == {"a": 1}
    saga.close()


def test_interrupted_run_is_recovered_forward(tmp_path):
    rec = Recorder()
    state = {"interrupt": True}

    def b(sc):
        rec.calls.append(("do", "b", sc.key, sc.attempt))
        if state["interrupt"]:
            raise KeyboardInterrupt  # not an Exception: the saga is left in flight
        return "r-b"

    saga = Saga(tmp_path / "s", durability="always", backoff=0)
    saga.step("a", rec.action("a"), rec.compensate("a")).step("b", b, rec.compensate("b"))
    saga.step("c", rec.action("c"), rec.compensate("c"))
    with pytest.raises(KeyboardInterrupt):
        saga.run({"v": 1}, saga_id="i")
    saga.close()
    [info] = list_sagas(tmp_path / "s")
    assert info.state is SagaState.RUNNING and info.done == ["a"] and info.current == "b"
    state["interrupt"] = False
    saga = Saga(tmp_path / "s", durability="always", backoff=0)
    saga.step("a", rec.action("a"), rec.compensate("a")).step("b", b, rec.compensate("b"))
    saga.step("c", rec.action("c"), rec.compensate("c"))
    [r] = saga.recover()
    assert r.state is SagaState.DONE and r.results == {"a": "r-a", "b": "r-b", "c": "r-c"}
    # a is not run again; b is retried with the same key and the next attempt number
    assert rec.kinds() == [("do", "a"), ("do", "b"), ("do", "b"), ("do", "c")]
    assert [(k, a) for _, n, k, a in rec.calls if n == "b"] == [("i:b", 1), ("i:b", 2)]
    assert saga.recover() == []
    saga.close()


def test_recover_skips_sagas_of_another_definition(tmp_path):
    saga = Saga(tmp_path / "s", durability="none")

    def stop(sc):
        raise KeyboardInterrupt

    saga.step("a", stop)
    with pytest.raises(KeyboardInterrupt):
        saga.run(saga_id="old")
    saga.close()
    saga = Saga(tmp_path / "s", durability="none")
    saga.step("other", lambda sc: 1)
    [r] = saga.recover()
    assert r.state is SagaState.RUNNING and "not recovered" in r.error
    saga.close()


def test_unencodable_ctx_and_result(tmp_path):
    undone = []
    saga = Saga(tmp_path / "s", durability="none", backoff=0)
    saga.step("a", lambda sc: 1, lambda sc: undone.append("a"))
    saga.step("b", lambda sc: object(), lambda sc: undone.append(("b", sc.result)))
    with pytest.raises(TypeError, match="ctx"):
        saga.run({"x": object()})
    assert list_sagas(tmp_path / "s") == []  # nothing was begun
    with pytest.raises(StepFailed, match="cannot be encoded") as ei:
        saga.run()
    # b took effect but its result could not be recorded: it is undone too
    assert undone == [("b", None), "a"] and ei.value.compensated == ["b", "a"]
    saga.close()


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="durability"):
        Saga(tmp_path / "s", durability="sometimes")
    with pytest.raises(ValueError, match="retries"):
        Saga(tmp_path / "s", retries=-1)
    with pytest.raises(ValueError, match="backoff"):
        Saga(tmp_path / "s", backoff=-1)
    with pytest.raises(TypeError, match="events"):
        Saga(tmp_path / "s", events=42)
    saga = Saga(tmp_path / "s", durability="none")
    with pytest.raises(ValueError, match="no steps"):
        saga.run()
    with pytest.raises(TypeError, match="name"):
        saga.step("", lambda sc: 1)
    with pytest.raises(TypeError, match="action"):
        saga.step("a", 42)
    with pytest.raises(TypeError, match="compensate"):
        saga.step("a", lambda sc: 1, 42)
    with pytest.raises(ValueError, match="timeout"):
        saga.step("a", lambda sc: 1, timeout=0)
    with pytest.raises(ValueError, match="retries"):
        saga.step("a", lambda sc: 1, retries=-2)
    with pytest.raises(TypeError, match="retry_on"):
        saga.step("a", lambda sc: 1, retry_on=(42,))
    saga.step("a", lambda sc: 1)
    with pytest.raises(ValueError, match="already"):
        saga.step("a", lambda sc: 1)
    with pytest.raises(TypeError, match="saga_id"):
        saga.run(saga_id=5)
    with pytest.raises(LogLocked):
        Saga(tmp_path / "s", durability="none")
    saga.close()
    with pytest.raises(engine.Closed):
        saga.run()


def test_garbage_records_are_skipped(tmp_path, caplog):
    saga = Saga(tmp_path / "s", durability="none")
    saga.step("a", lambda sc: 1)
    saga.run(saga_id="good")
    saga.close()
    log = engine.Log(tmp_path / "s", durability="none")
    for junk in (
        b"\xff\x00",
        b"[1,2]",
        b'{"t":"begin","id":"x"}',
        b'{"t":"begin","id":"y","steps":[1]}',
        b'{"t":"start","id":"nobody","s":"a"}',
        b'{"t":"end","id":"good","st":"weird"}',
        b'{"t":"done","id":5}',
        b'{"t":"nope","id":"good"}',
        b'{"t":"start","id":"good"}',
        b'{"t":"start","id":"good","s":"a","a":"x"}',
        b'{"t":"cstart","id":"good","s":"a","a":-1}',
        b'{"t":"fail","id":"good","s":"a","e":[1]}',
        b'{"t":"begin","id":"odd","steps":["a"],"ctx":null}',
        b'{"t":"cstart","id":"odd","s":"zz","a":1}',
        b"null",
        b"",
    ):
        log.append(junk)
    log.close()
    infos = list_sagas(tmp_path / "s")
    assert [(i.saga_id, i.state) for i in infos] == [
        ("good", SagaState.DONE),
        ("odd", SagaState.RUNNING),
    ]
    saga = Saga(tmp_path / "s", durability="none")
    saga.step("a", lambda sc: 1)
    # "odd" is a well-formed saga (its unknown step is ignored): recovered forward
    [r] = saga.recover()
    assert r.saga_id == "odd" and r.state is SagaState.DONE
    saga.close()


# ---------------------------------------------------------------------------
# model: any plan of transient/permanent failures gives exactly the model's calls
# ---------------------------------------------------------------------------


def model_calls(n_steps, retries, comp_retries, fail_action, fail_comp):
    """The calls a saga must make, by the rules of the module docstring."""
    calls, completed = [], []
    for i in range(n_steps):
        name = NAMES[i]
        fails = fail_action.get(name, 0)
        attempts = min(fails, retries + 1)
        calls += [("do", name)] * attempts
        if fails > retries:
            for c in reversed(completed):
                cf = fail_comp.get(c, 0)
                calls += [("undo", c)] * (min(cf, comp_retries + 1))
                if cf > comp_retries:
                    return calls, "stuck"
                calls.append(("undo", c))
            return calls, "compensated"
        calls.append(("do", name))
        completed.append(name)
    return calls, "done"


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    n=st.integers(1, 4),
    retries=st.integers(0, 2),
    comp_retries=st.integers(0, 2),
    fa=st.dictionaries(st.sampled_from(NAMES), st.integers(0, 4)),
    fc=st.dictionaries(st.sampled_from(NAMES), st.integers(0, 4)),
)
def test_any_failure_plan_matches_model(tmp_path_factory, n, retries, comp_retries, fa, fc):
    path = tmp_path_factory.mktemp("m")
    rec = Recorder()
    rec.fail_action = dict(fa)
    rec.fail_comp = dict(fc)
    expected, outcome = model_calls(n, retries, comp_retries, fa, fc)
    saga = make(path, rec, names=NAMES[:n], retries=retries, compensate_retries=comp_retries)
    try:
        if outcome == "done":
            saga.run(saga_id="m")
        else:
            with pytest.raises(StepFailed if outcome == "compensated" else SagaStuck):
                saga.run(saga_id="m")
    finally:
        saga.close()
    assert rec.kinds() == expected
    [info] = list_sagas(path / "saga")
    assert info.state.value == outcome
    if outcome != "stuck":
        applied = sorted(k.split(":")[1] for k in rec.applied)
        assert applied == (NAMES[:n] if outcome == "done" else [])
    shutil.rmtree(path)  # one directory per example: don't keep 60 of them


# ---------------------------------------------------------------------------
# queue-engine saga ls
# ---------------------------------------------------------------------------


def test_saga_ls(tmp_path, capsys):
    from engine import cli

    rec = Recorder()
    saga = make(tmp_path, rec, names=["a", "b"], retries=0, compensate_retries=0)
    saga.run(saga_id="ok1")
    rec.fail_action["b"] = 1
    with pytest.raises(StepFailed):
        saga.run(saga_id="comp1")
    rec.fail_action["b"] = 1
    rec.fail_comp["a"] = 1
    with pytest.raises(SagaStuck):
        saga.run(saga_id="stuck1")

    def stop(sc):
        raise KeyboardInterrupt

    saga.close()
    saga = Saga(tmp_path / "saga", durability="none")
    saga.step("a", stop).step("b", stop)
    with pytest.raises(KeyboardInterrupt):
        saga.run(saga_id="run1")
    saga.close()
    path = str(tmp_path / "saga")
    capsys.readouterr()
    assert cli.main(["saga", "ls", path]) == 3  # a saga is stuck
    out = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in out[1:-1]}
    assert rows["ok1"][:3] == ["done", "-", "2/2"]
    assert rows["comp1"][:3] == ["compensated", "-", "1/2"]
    assert rows["stuck1"][:3] == ["stuck", "a", "1/2"]
    assert rows["run1"][:3] == ["running", "a", "0/2"]
    assert out[-1] == "4 sagas: 1 running, 0 compensating, 1 done, 1 compensated, 1 stuck"
    assert cli.main(["saga", "ls", path, "--unfinished", "--json"]) == 3
    objs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(o["saga_id"], o["state"]) for o in objs] == [("stuck1", "stuck"), ("run1", "running")]
    assert cli.main(["saga", "ls", path, "--state", "done", "--json"]) == 3
    assert [json.loads(x)["saga_id"] for x in capsys.readouterr().out.splitlines()] == ["ok1"]
    assert cli.main(["saga", "ls", str(tmp_path / "missing")]) == 1
    assert "cannot read" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# compaction: the log forgets finished sagas, never an unfinished one
# ---------------------------------------------------------------------------


def test_compaction_keeps_unfinished_sagas(tmp_path):
    path = tmp_path / "s"

    def stop(sc):
        if sc.ctx == "stop":
            raise KeyboardInterrupt
        return sc.ctx

    def build(**kw):
        saga = Saga(path, durability="none", segment_bytes=8192, backoff=0, **kw)
        saga.step("a", lambda sc: 1, lambda sc: None).step("b", stop, lambda sc: None)
        return saga

    saga = build(retention_bytes=3 * 8192, compact_every=0)
    saga.run("x", saga_id="first-done")
    with pytest.raises(KeyboardInterrupt):
        saga.run("stop", saga_id="stays")  # unfinished: must survive compaction
    for i in range(400):
        saga.run(i)
    deleted = saga.compact()
    # nothing at or past the oldest unfinished saga is deleted: that is the first segment
    assert deleted == 0 and saga.log.start_offset == 0
    saga.close()
    # reopened (reading from the low-water mark), it is still there; a
    # definition whose b now fails compensates it
    saga = Saga(
        path,
        durability="none",
        segment_bytes=8192,
        backoff=0,
        retention_bytes=3 * 8192,
        compact_every=150,
    )
    assert [i.saga_id for i in saga.unfinished()] == ["stays"]
    saga.step("a", lambda sc: 1, lambda sc: None).step("b", lambda sc: 1 / 0, None, retries=0)
    [info] = saga.recover()
    assert info.state is SagaState.COMPENSATED
    for i in range(400):
        with pytest.raises(StepFailed):
            saga.run(i)  # compacts by itself every 150
    assert saga.log.start_offset > 0
    saga.compact()
    assert saga.unfinished() == []
    saga.close()
    infos = list_sagas(path)
    assert "first-done" not in {i.saga_id for i in infos}  # its segment is gone
    assert all(i.state.finished for i in infos) and len(infos) < 800
    # reopen reads from the low-water mark: nothing unfinished, nothing lost
    saga = build(retention_bytes=3 * 8192)
    assert saga.unfinished() == [] and saga.recover() == []
    saga.close()


def test_threads_share_one_saga_and_recover_leaves_live_runs_alone(tmp_path):
    rec = Recorder()
    gate = threading.Event()
    entered = threading.Event()

    def slow(sc):
        entered.set()
        gate.wait(5)
        return rec.action("slow")(sc)

    saga = Saga(tmp_path / "s", durability="none", backoff=0)
    for n in ("a", "b"):
        saga.step(n, rec.action(n), rec.compensate(n))
    errors = []

    def worker(k):
        try:
            for i in range(50):
                saga.run({"k": k, "i": i}, saga_id=f"t{k}-{i}")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    infos = list_sagas(tmp_path / "s")
    assert len(infos) == 200 and all(i.state is SagaState.DONE for i in infos)
    assert len(rec.applied) == 400
    saga.close()

    # a saga in flight in one thread is not driven by recover() in another
    saga = Saga(tmp_path / "s2", durability="none", backoff=0)
    saga.step("slow", slow, rec.compensate("slow"))
    t = threading.Thread(target=saga.run, kwargs={"saga_id": "live"})
    t.start()
    assert entered.wait(5)
    assert saga.recover() == []
    gate.set()
    t.join(5)
    assert [k for _, n, k, _ in rec.calls if n == "slow"] == ["live:slow"]
    saga.close()


# ---------------------------------------------------------------------------
# stateful: runs, interrupted runs, reopen and recover against a model
# ---------------------------------------------------------------------------

from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule  # noqa: E402

STEPS3 = ["a", "b", "c"]


class SagaMachine(RuleBasedStateMachine):
    """The model: for each saga id, which step keys are in effect, and its
    state (done / compensated / pending forward / pending backward). A saga
    is steered by its ctx: ``fail`` (a step whose action always raises),
    ``stop`` (a step whose action is interrupted once: KeyboardInterrupt, the
    saga stays in the log) and ``stop_undo`` (likewise for a compensation)."""

    def __init__(self):
        super().__init__()
        import tempfile

        self.dir = tempfile.mkdtemp(prefix="saga-sm-")
        self.effects = set()  # keys in effect (the "world")
        self.stops_used = set()  # (saga id, kind, step) interruptions already spent
        self.model = {}  # saga id -> expected final state once recovered
        self.pending = set()  # saga ids the model knows to be unfinished
        self.n = 0
        self.saga = None

    def _action(self, name):
        def fn(sc):
            stop = (sc.saga_id, "do", name)
            if sc.ctx.get("stop") == name and stop not in self.stops_used:
                self.stops_used.add(stop)
                raise KeyboardInterrupt
            if sc.ctx.get("fail") == name:
                raise RuntimeError("fails")
            self.effects.add(sc.key)
            return name

        return fn

    def _undo(self, name):
        def fn(sc):
            stop = (sc.saga_id, "undo", name)
            if sc.ctx.get("stop_undo") == name and stop not in self.stops_used:
                self.stops_used.add(stop)
                raise KeyboardInterrupt
            self.effects.discard(sc.key)

        return fn

    def _open(self):
        self.saga = Saga(f"{self.dir}/s", durability="none", retries=0, backoff=0)
        for n in STEPS3:
            self.saga.step(n, self._action(n), self._undo(n))

    @initialize()
    def start(self):
        self._open()

    @rule(
        fail=st.sampled_from([None, *STEPS3]),
        stop=st.sampled_from([None, *STEPS3]),
        stop_undo=st.sampled_from([None, *STEPS3]),
    )
    def run(self, fail, stop, stop_undo):
        self.n += 1
        sid = f"s{self.n}"
        ctx = {"fail": fail, "stop": stop, "stop_undo": stop_undo}
        order = STEPS3
        fail_i = order.index(fail) if fail else 99
        stop_i = order.index(stop) if stop else 99
        # undone in reverse, from the step before the failing one
        undo_stops = stop_undo is not None and order.index(stop_undo) < fail_i
        self.model[sid] = "done" if fail is None else "compensated"
        try:
            out = self.saga.run(ctx, saga_id=sid)
        except KeyboardInterrupt:
            assert stop_i <= fail_i or undo_stops
            self.pending.add(sid)
            return
        except StepFailed as exc:
            assert fail is not None and not (stop_i <= fail_i or undo_stops)
            assert exc.compensated == list(reversed(order[:fail_i]))
            return
        assert fail is None and stop is None and out == {n: n for n in STEPS3}

    @rule()
    def reopen(self):
        self.saga.close()
        self._open()
        assert {i.saga_id for i in self.saga.unfinished()} == self.pending

    @rule()
    def recover(self):
        # a recovery may be interrupted again (by a compensation's stop)
        try:
            infos = self.saga.recover()
        except KeyboardInterrupt:
            # the sagas recovered before the interruption are finished
            still = {i.saga_id for i in self.saga.unfinished()}
            assert still <= self.pending
            states = {i.saga_id: i.state.value for i in list_sagas(f"{self.dir}/s")}
            for sid in self.pending - still:
                assert states[sid] == self.model[sid], sid
            self.pending = still
            return
        for i in infos:
            assert i.state.value == self.model[i.saga_id], i
            self.pending.discard(i.saga_id)
        assert self.saga.unfinished() == [] and self.pending == set()

    @invariant()
    def world_matches(self):
        for sid, final in self.model.items():
            keys = {f"{sid}:{n}" for n in STEPS3}
            if sid in self.pending:
                continue  # mid-way: whatever prefix it reached
            expect = keys if final == "done" else set()
            assert keys & self.effects == expect, (sid, final, keys & self.effects)

    def teardown(self):
        import shutil

        if self.saga is not None:
            self.saga.close()
        shutil.rmtree(self.dir, ignore_errors=True)


SagaMachine.TestCase.settings = settings(max_examples=25, stateful_step_count=12, deadline=None)
test_saga_state_machine = SagaMachine.TestCase


_junk_value = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.text(max_size=3),
    st.sampled_from(["a", "b", "x", "done", "stuck", "compensated"]),
    st.lists(st.sampled_from(["a", "b", 1]), max_size=3),
)
_junk_record = st.one_of(
    st.binary(max_size=20),
    st.fixed_dictionaries(
        {
            "t": st.sampled_from(
                sorted(
                    [
                        "begin",
                        "start",
                        "done",
                        "fail",
                        "abort",
                        "cstart",
                        "cdone",
                        "cfail",
                        "end",
                        "retry",
                        "x",
                    ]
                )
            ),
            "id": st.sampled_from(["p", "q", 7]),
        },
        optional={
            "s": _junk_value,
            "a": _junk_value,
            "st": _junk_value,
            "e": _junk_value,
            "steps": _junk_value,
            "r": _junk_value,
            "u": _junk_value,
        },
    ).map(lambda d: json.dumps(d).encode()),
)


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(records=st.lists(_junk_record, max_size=40))
def test_hostile_saga_logs_never_break_open_ls_or_recover(tmp_path_factory, records):
    path = tmp_path_factory.mktemp("junk") / "s"
    log = engine.Log(path, durability="none", segment_bytes=1 << 16)
    for r in records:
        log.append(r)
    log.close()
    infos = list_sagas(path)
    assert {i.saga_id for i in infos} <= {"p", "q"}
    saga = Saga(path, durability="none", segment_bytes=1 << 16, backoff=0, compensate_retries=0)
    saga.step("a", lambda sc: 1, lambda sc: None).step("b", lambda sc: 2, lambda sc: None)
    for info in saga.recover():
        # each ends somewhere, or is reported as another definition's
        assert info.state is not SagaState.RUNNING or "not recovered" in (info.error or "")
    saga.close()
