"""Fault sweeps: count a component's file syscalls once, then fail each
chosen call k with each errno in turn (tests/faultkit.py), and check every
time: no false success (nothing reports success once the component said it
is broken), every acknowledged write is read back intact after reopening,
nothing corrupt is returned, and the component works again.

The default run fails the middle call of each function with EIO; the
``crash`` marker runs the wider sweep (the first and last call of each
function, EIO, ENOSPC, EFBIG, EINTR and short writes; six points each with
QE_FAULT_SWEEP=full) and prints the summary table
(``pytest -m crash -s tests/test_faults_sweep.py``)."""

from __future__ import annotations

import os

import faultkit
import pytest

pytestmark = pytest.mark.skipif(not faultkit.available(), reason="needs Linux and a C compiler")

FULL = os.environ.get("QE_FAULT_SWEEP") == "full"

# ---- workloads (formatted with d = a fresh directory; report a dict) -------

LOG = """
import time, engine
d, mode = {{d!r}}, {mode!r}
def val(o):
    return b"v%d-" % o + bytes([o % 251]) * (o % 61)
t = Tally()
acked = 0
arm()
ok, log = t.op(engine.Log, d, durability=mode, segment_bytes=4096, flush_interval=0.005)
if ok:
    for i in range(70):
        o = log.next_offset
        if i % 5 == 4:
            ok, r = t.op(log.append_many, [val(o + j) for j in range(3)])
            if ok and mode == "always":
                acked = r.stop
        else:
            ok, r = t.op(log.append, val(o))
            if ok and mode == "always":
                acked = r + 1
        if mode != "always" and i % 10 == 9:
            upto = log.next_offset
            ok, _ = t.op(log.flush)
            if ok:
                acked = upto
        if mode == "interval":
            time.sleep(0.001)
    t.release(log.close)
disarm()
out = t.as_dict()
out.update(lost=0, corrupt=0, works=False)
try:
    with engine.Log(d, durability=mode, segment_bytes=4096) as log2:
        end = log2.append(b"after")
    recs = list(engine.LogReader(d))
    got = dict((r.offset, r.value) for r in recs)
    out["lost"] = sum(1 for o in range(acked) if got.get(o) != val(o))
    out["corrupt"] = sum(1 for r in recs[:-1] if r.value != val(r.offset))
    out["works"] = [r.offset for r in recs] == list(range(end + 1)) and recs[-1].value == b"after"
except Exception as exc:
    out["error"] = repr(exc)
report(out)
"""

GROUPS = """
import engine
d = {d!r}
log = engine.Log(d, durability="none", segment_bytes=4096)
for i in range(120):
    log.append(b"g%d" % i)
log.close()
t = Tally()
acked = None
attempted = set()
arm()
ok, rd = t.op(engine.LogReader, d, group="g")
if ok:
    for i in range(12):
        for _ in range(10):
            t.op(rd.read)   # a read error raises (OSError): the position stays
        attempted.add(rd.position)
        ok, _ = t.op(rd.commit)
        if ok:
            acked = rd.position
    rd.close()
disarm()
out = t.as_dict()
out.update(lost=0, corrupt=0, works=False)
try:
    with engine.LogReader(d, group="g") as r2:
        c = r2.committed()
        out["lost"] = int(acked is not None and (c is None or c < acked))
        out["corrupt"] = int(c is not None and c not in attempted)
        rest = [rec.value for rec in r2]
        start = 0 if c is None else c
        r2.commit()
        out["works"] = rest == [b"g%d" % i for i in range(start, 120)] and r2.committed() == 120
except Exception as exc:
    out["error"] = repr(exc)
report(out)
"""

STORE = """
import engine
d = {d!r}
t = Tally()
acked = {{}}
tried = {{}}
arm()
ok, st = t.op(engine.VersionedStore, d, durability="always", segment_bytes=4096, snapshot_every=16)
if ok:
    for i in range(50):
        k = b"k%d" % (i % 7)
        v = b"v%d-" % i + b"x" * (i % 40)
        tried.setdefault(k, set()).add(v)
        ok, ver = t.op(st.put, k, v)
        if ok:
            acked[k] = (ver, v)
    t.release(st.close)
disarm()
out = t.as_dict()
out.update(lost=0, corrupt=0, works=False)
try:
    with engine.VersionedStore(d, durability="always", segment_bytes=4096) as s2:
        for k, (ver, v) in acked.items():
            gv, gval = s2.get(k)
            if gv < ver or (gv == ver and gval != v):
                out["lost"] += 1
        for k in s2.keys():
            if s2.get(k)[1] not in tried.get(k, ()):
                out["corrupt"] += 1
        s2.put(b"z", b"after")
        out["works"] = s2.get(b"z")[1] == b"after"
except Exception as exc:
    out["error"] = repr(exc)
report(out)
"""

DEDUP = """
import engine
d = {d!r}
t = Tally()
acked = []
arm()
ok, dd = t.op(engine.Deduplicator, d, window=1000, durability="always", segment_bytes=4096)
if ok:
    for i in range(60):
        ok, first = t.op(dd.first_time, "m%d" % i)
        if ok and first:
            acked.append("m%d" % i)
    t.release(dd.close)
disarm()
out = t.as_dict()
out.update(lost=0, corrupt=0, works=False)
try:
    with engine.Deduplicator(d, window=1000, durability="always", segment_bytes=4096) as d2:
        out["lost"] = sum(1 for m in acked if d2.first_time(m))
        out["works"] = d2.first_time("new") and not d2.first_time("new")
except Exception as exc:
    out["error"] = repr(exc)
report(out)
"""

COORD = """
import os, engine
from engine import Coordinator, Log, LogParticipant, LogReader
d = {d!r}
SEG = 1 << 16
def world():
    made = []
    try:
        made.append(Coordinator(os.path.join(d, "coord"), durability="always", segment_bytes=SEG))
        made.append(Log(os.path.join(d, "a"), durability="always", segment_bytes=SEG))
        made.append(Log(os.path.join(d, "b"), durability="always", segment_bytes=SEG))
        made.append(LogParticipant(made[1], segment_bytes=SEG))
        made.append(LogParticipant(made[2], segment_bytes=SEG))
    except BaseException:
        for o in reversed(made):
            try:
                o.close()
            except Exception:
                pass
        raise
    return made
def values(name):
    with LogReader(os.path.join(d, name), start=0) as r:
        return [bytes(x.value) for x in r]
t = Tally()
acked = []
objs = []
arm()
ok, w = t.op(world)
if ok:
    objs = list(w)
    c, la, lb, pa, pb = w
    for i in range(12):
        def tx(i=i):
            with c.transaction() as tx:
                tx.enlist(pa, [b"a%d" % i])
                tx.enlist(pb, [b"b%d" % i])
        ok, _ = t.op(tx)
        if ok:
            acked.append(i)
for o in reversed(objs):
    t.release(o.close)
disarm()
out = t.as_dict()
out.update(lost=0, corrupt=0, works=False)
try:
    c, la, lb, pa, pb = world()
    c.recover([pa, pb])
    A, B = values("a"), values("b")
    out["lost"] = sum(1 for i in acked if b"a%d" % i not in A or b"b%d" % i not in B)
    # atomic: a transaction is in both logs or in neither; nothing else appears
    out["corrupt"] = sum(1 for i in range(12) if (b"a%d" % i in A) != (b"b%d" % i in B))
    out["corrupt"] += sum(1 for v in A + B if v[1:] not in [b"%d" % i for i in range(12)])
    with c.transaction() as tx:
        tx.enlist(pa, [b"a-after"])
        tx.enlist(pb, [b"b-after"])
    out["works"] = values("a")[-1] == b"a-after" and values("b")[-1] == b"b-after"
    for o in (pb, pa, lb, la, c):
        o.close()
except Exception as exc:
    out["error"] = repr(exc)
report(out)
"""

QUEUE = """
import engine
d, kind = {{d!r}}, {kind!r}
def make():
    if kind == "priority":
        return engine.PriorityQueue(levels=2, durable=True, path=d, durability="always", segment_bytes=1 << 16)
    return engine.KeyedQueue(partitions=2, durable=True, path=d, durability="always", segment_bytes=1 << 16)
def put(q, m, i):
    if kind == "priority":
        q.put(m, priority=i % 2)
    else:
        q.put(m, key=i % 3)
# one tally per level / key: each level and each partition has its own log,
# and one log breaking does not break the others
ts = [Tally() for _ in range(3)]
acked, tried = [], set()
arm()
ok, q = ts[0].op(make)
if ok:
    for i in range(30):
        m = b"m%03d" % i
        tried.add(m)
        ok, _ = ts[i % (2 if kind == "priority" else 3)].op(put, q, m, i)
        if ok:
            acked.append(m)
    ts[0].release(q.close)
disarm()
out = dict((k, sum(x.as_dict()[k] for x in ts)) for k in ("false_success", "absorbed", "raised"))
out.update(lost=0, corrupt=0, works=False)
try:
    q = make()
    c = q if kind == "priority" else q.consumer()
    got = []
    while True:
        m = c.try_get()
        if m is None:
            break
        got.append(bytes(m))
    out["lost"] = sum(1 for m in acked if m not in got)
    out["corrupt"] = sum(1 for m in got if m not in tried)
    put(q, b"after", 0)
    # a put that raised may still have landed (its record was written, its
    # sync failed): it may come now, before "after"
    for _ in range(40):
        m = bytes(c.get(timeout=5))
        if m == b"after":
            out["works"] = True
            break
        out["corrupt"] += m not in tried
    c.ack()
    out["got"] = len(got)
    q.close()
except Exception as exc:
    out["error"] = repr(exc)
report(out)
"""

SAGA = """
import engine
from engine.saga import Saga, SagaState, list_sagas
d = {d!r}
def make():
    s = Saga(d, durability="always", segment_bytes=1 << 16, retries=0, compensate_retries=1,
             backoff=0.001)
    s.step("a", lambda sc: "ra", lambda sc: None).step("b", lambda sc: "rb", lambda sc: None)
    return s
t = Tally()
acked, tried = [], set()
arm()
ok, sg = t.op(make)
if ok:
    for i in range(12):
        tried.add("s%d" % i)
        ok, _ = t.op(sg.run, None, saga_id="s%d" % i)
        if ok:
            acked.append("s%d" % i)
    t.release(sg.close)
disarm()
out = t.as_dict()
out.update(lost=0, corrupt=0, works=False)
try:
    sg2 = make()
    sg2.recover()
    infos = dict((x.saga_id, x) for x in list_sagas(d))
    out["lost"] = sum(1 for s in acked if s not in infos or infos[s].state != SagaState.DONE)
    out["corrupt"] = sum(1 for s in infos if s not in tried)
    # every saga begun is finished now, one way or the other
    out["corrupt"] += sum(1 for x in infos.values() if x.state not in (SagaState.DONE, SagaState.COMPENSATED))
    sg2.run(None, saga_id="after")
    out["works"] = any(x.saga_id == "after" and x.state == SagaState.DONE for x in list_sagas(d))
    sg2.close()
except Exception as exc:
    out["error"] = repr(exc)
report(out)
"""

COMPONENTS = {
    "Log always": LOG.format(mode="always"),
    "Log interval": LOG.format(mode="interval"),
    "Log none": LOG.format(mode="none"),
    "LogReader groups": GROUPS,
    "VersionedStore": STORE,
    "Deduplicator": DEDUP,
    "Coordinator + 2 LogParticipants": COORD,
    "Saga": SAGA,
    "durable PriorityQueue": QUEUE.format(kind="priority"),
    "durable KeyedQueue": QUEUE.format(kind="keyed"),
}


def _check(rows):
    bad = [(r.component, r.err, r.failures[:3]) for r in rows
           if r.false_success or r.lost or r.corrupt or r.not_working]
    assert not bad, bad
    assert sum(r.points for r in rows) > 0


@pytest.mark.parametrize("component", list(COMPONENTS))
def test_sweep_sampled(tmp_path, component):
    rows = faultkit.sweep(component, COMPONENTS[component], str(tmp_path), errs=("EIO",), max_points=1)
    _check(rows)


@pytest.mark.crash
@pytest.mark.parametrize("component", list(COMPONENTS))
def test_sweep_wide(tmp_path, component):
    errs = ("EIO", "ENOSPC", "EFBIG", "EINTR", "SHORT")
    rows = faultkit.sweep(component, COMPONENTS[component], str(tmp_path), errs=errs,
                          max_points=6 if FULL else 2)
    print("\n" + faultkit.table(rows))
    _check(rows)
