"""The log under failing syscalls (fault-injection shim, tests/faultkit.py).

A failed sync breaks the writer (PostgreSQL's answer to "fsyncgate"): every
waiting and later append / append_many / flush raises ``LogBroken`` naming
the first error, ``close()`` still releases the directory, and reopening
recovers every acknowledged record from disk."""

from __future__ import annotations

import faultkit
import pytest

pytestmark = pytest.mark.skipif(not faultkit.available(), reason="needs Linux and a C compiler")

# One workload for every mode: append / append_many, flush now and then (not
# in "always"), until a call raises; then more calls, which must all raise;
# close, reopen in the same process, read everything back.
BROKEN = """
import time, engine
d, mode = {d!r}, {mode!r}
def val(i):
    return b"v%d-" % i + bytes([i % 251]) * (i % 61)
out = {{"first": None, "after_ok": 0, "after": [], "acked": 0}}
arm()
log = engine.Log(d, durability=mode, segment_bytes=8192, flush_interval=0.005)
acked = 0           # offsets below this were acknowledged (always: durable; else: flushed)
appended = 0
for i in range(400):
    try:
        if i % 5 == 4:
            r = log.append_many([val(appended + j) for j in range(3)])
            appended = r.stop
        else:
            appended = log.append(val(appended)) + 1
        if mode == "always":
            acked = appended
        elif i % 10 == 9:
            log.flush()
            acked = appended
        ok = True
    except Exception as exc:
        ok = False
        if out["first"] is None:
            out["first"] = [type(exc).__name__, getattr(exc, "errno", None), str(exc)]
        else:
            out["after"].append(type(exc).__name__)
    if ok and out["first"] is not None:
        out["after_ok"] += 1
    if mode == "interval":
        time.sleep(0.001)
for call in (lambda: log.append(b"x"), lambda: log.append_many([b"y"]), log.flush):
    try:
        call()
        if out["first"] is not None:
            out["after_ok"] += 1
    except Exception as exc:
        out["after"].append(type(exc).__name__)
try:
    log.close()
    out["close"] = "ok"
except Exception as exc:
    out["close"] = type(exc).__name__
disarm()
out["acked"] = acked
try:
    with engine.Log(d, durability=mode, segment_bytes=8192) as log2:
        n = log2.next_offset
        log2.append(b"after")
    recs = list(engine.LogReader(d))
    out["reopen"] = "ok"
    out["lost"] = [o for o in range(acked) if o >= len(recs) or recs[o].value != val(o)]
    out["dense"] = [r.offset for r in recs] == list(range(n + 1))
    out["last"] = recs[-1].value.decode()
except Exception as exc:
    out["reopen"] = repr(exc)
report(out)
"""


def _check_broken(res):
    assert res.rc == 0, res.stderr[-3000:]
    assert res.faults, "the fault was never reached"
    rep = res.report
    assert rep["first"] is not None, "the failed sync was never reported"
    assert rep["first"][0] == "LogBroken", rep["first"]
    assert rep["first"][1] == 5, rep["first"]                     # the original errno
    assert "Input/output error" in rep["first"][2] and "reopen" in rep["first"][2]
    assert rep["after_ok"] == 0, f"{rep['after_ok']} calls reported success after the failure"
    assert rep["after"] and set(rep["after"]) == {"LogBroken"}
    assert rep["close"] == "ok"
    assert rep["reopen"] == "ok", rep["reopen"]
    assert rep["lost"] == [] and rep["dense"] and rep["last"] == "after"


@pytest.mark.parametrize("mode,func,nth", [
    ("always", "fdatasync", 1),
    ("always", "fdatasync", 7),
    ("always", "msync", 1),       # the sync of a roll's end marker
    ("interval", "msync", 3),     # the background flusher's sync
    ("none", "msync", 2),         # flush()
])
def test_a_failed_sync_breaks_the_log(tmp_path, mode, func, nth):
    res = faultkit.run(BROKEN.format(d=str(tmp_path / "log"), mode=mode), prefix=str(tmp_path),
                       func=func, nth=nth, err="EIO")
    _check_broken(res)


def test_a_failed_pwrite_breaks_the_log(tmp_path):
    res = faultkit.run(BROKEN.format(d=str(tmp_path / "log"), mode="always"), prefix=str(tmp_path),
                       func="pwrite", nth=9, err="EIO")
    _check_broken(res)


THREADS = """
import threading, engine
d = {d!r}
arm()
log = engine.Log(d, durability="always", segment_bytes=1 << 20)
state = {{"failed": False, "ok_after": 0, "kinds": set()}}
lock = threading.Lock()
def work(t):
    for i in range(300):
        with lock:
            failed_before = state["failed"]
        try:
            log.append(b"t%d-%d" % (t, i))
            if failed_before:
                with lock:
                    state["ok_after"] += 1
        except Exception as exc:
            with lock:
                state["failed"] = True
                state["kinds"].add(type(exc).__name__)
ts = [threading.Thread(target=work, args=(t,)) for t in range(4)]
for t in ts: t.start()
for t in ts: t.join()
log.close()
disarm()
engine.Log(d).close()   # the lock was released
report({{"ok_after": state["ok_after"], "kinds": sorted(state["kinds"])}})
"""


def test_group_commit_waiters_fail_too(tmp_path):
    # appenders waiting on another thread's sync get its failure; nobody's
    # later sync acknowledges the batch whose sync failed
    res = faultkit.run(THREADS.format(d=str(tmp_path / "log")), prefix=str(tmp_path),
                       func="fdatasync", nth=20, err="EIO")
    assert res.rc == 0, res.stderr[-3000:]
    assert res.faults
    assert res.report["kinds"] == ["LogBroken"]
    assert res.report["ok_after"] == 0
