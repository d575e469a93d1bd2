"""Fault sweeps of the JetStream bridge against a real nats-server: count
its file syscalls on the log directory once, then fail chosen calls k with
each errno (tests/faultkit.py), and check every time.

The forwarder (its group-offset commits and its reads of the log):

* no false success: ``run(until_caught_up=True)`` returns only with every
  record in the stream and the group committed to the log's end;
* nothing acknowledged is lost: every offset below the committed group
  offset is in the stream (a commit never runs ahead of the stream);
* nothing corrupt: the stream holds each record at most once, in log order,
  with its exact bytes, and the group file still reads;
* it works again: a forwarder run without faults completes the stream, each
  record exactly once.

The ingest (its appends to the log): a success means every message is in
the log; every message the consumer acknowledged (its ack floor) is in the
log after recovery; no message is logged twice or altered; a run without
faults logs the rest (redelivered after ``ack_wait``), each message once.

The default run fails the middle call of each function of the forwarder
and the middle write and sync of the ingest with EIO (seconds), and every
fsync of the forwarder at once: each commit fails, and the restart that finds
everything in the stream must still commit the group to the end.  The
``crash`` marker adds ENOSPC, EINTR and short writes at the first and last
calls too and prints the summary table
(``pytest -m crash -s tests/test_faults_bridge.py``).
"""

from __future__ import annotations

import faultkit
import pytest
from nats_servers import NatsServer, require_nats

pytestmark = [pytest.mark.skipif(not faultkit.available(), reason="needs Linux and a C compiler"),
              pytest.mark.timeout(300)]

N = 40

# The child scripts are formatted with url and n first, then (by faultkit.sweep)
# with d; each run has a stream of its own, named after its directory.
PRELUDE = """
import asyncio, hashlib, engine, nats, nats.js.errors
from engine.bridge import JetStreamForwarder, JetStreamIngest
d, url, n = {{d!r}}, {url!r}, {n}
tag = hashlib.sha1(d.encode()).hexdigest()[:12]
stream, subject = "FI" + tag, "fi." + tag
"""

FORWARD = PRELUDE + """
def val(o):
    return b"r%d-" % o + bytes([o % 251]) * (o % 23)
with engine.Log(d, durability="none", segment_bytes=4096) as log:   # the outbox, before arming
    log.append_many([val(o) for o in range(n)])
    log_id = log.log_id
def forward():
    # small batches and a commit after each: many commits to fail
    fwd = JetStreamForwarder(d, group="js", servers=url, stream=stream, subject=subject,
                             max_in_flight=8, commit_interval=0, ack_timeout=5.0)
    st = fwd.run(until_caught_up=True)
    return st.records
def committed():
    with engine.LogReader(d, group="js") as r:
        return r.committed() or 0
async def stream_offsets():
    nc = await nats.connect(servers=[url])
    try:
        js = nc.jetstream()
        try:
            info = await js.stream_info(stream)
        except nats.js.errors.NotFoundError:
            return []   # the forwarder failed before it created the stream
        got = []
        if info.state.messages == 0:
            return got
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            m = await js.get_msg(stream, seq)
            lid, _, off = (m.headers or dict()).get("Nats-Msg-Id", "").rpartition(":")
            got.append((lid, int(off) if off.isdigit() else -1, bytes(m.data or b"")))
        return got
    finally:
        await nc.close()
def bad_of(got):
    # records out of order, repeated, foreign or altered
    offs = [o for _, o, _ in got]
    return (sum(1 for lid, o, v in got if lid != log_id or o < 0 or o >= n or v != val(o))
            + sum(1 for a, b in zip(offs, offs[1:]) if b != a + 1)
            + (1 if offs and offs[0] != 0 else 0))
t = Tally()
arm()
ok, r = t.op(forward)
disarm()
out = t.as_dict()
out.update(lost=0, corrupt=0, works=False)
try:
    got = asyncio.run(stream_offsets())
    have = set(o for _, o, _ in got)
    c = committed()
    out["committed"], out["stream"] = c, len(got)
    # a success claims the whole log forwarded and committed
    if ok and (c != n or have != set(range(n))):
        out["false_success"] += 1
    out["lost"] = sum(1 for o in range(c) if o not in have)
    out["corrupt"] = bad_of(got)
    # no faults: the forwarder finishes the job, each record once, in order
    forward()
    got = asyncio.run(stream_offsets())
    out["works"] = ([o for _, o, _ in got] == list(range(n)) and bad_of(got) == 0
                    and committed() == n)
except Exception as exc:
    out["error"] = repr(exc)
report(out)
"""

INGEST = PRELUDE + """
def val(i):
    return b"m%d-" % i + bytes([i % 251]) * (i % 23)
async def publish():   # the stream to ingest, before arming
    nc = await nats.connect(servers=[url])
    try:
        js = nc.jetstream()
        await js.add_stream(name=stream, subjects=[subject])
        for i in range(n):
            await js.publish(subject, val(i), headers=dict([("Nats-Msg-Id", "id%d" % i)]))
    finally:
        await nc.close()
asyncio.run(publish())
def ingest():
    ing = JetStreamIngest(url, stream, "ing", d, subject=subject, batch=4, ack_wait=1.0)
    return ing.run(until_caught_up=True).records
async def acked():
    # the stream sequences the consumer acknowledged, all of them at or below the floor
    nc = await nats.connect(servers=[url])
    try:
        info = await nc.jetstream().consumer_info(stream, "ing")
        return info.ack_floor.stream_seq or 0
    except nats.js.errors.NotFoundError:
        return 0   # the ingest failed before it made its consumer
    finally:
        await nc.close()
def logged():
    # (message id, value) of each record, in log order
    return [(bytes(r.key).decode(), bytes(r.value)) for r in engine.LogReader(d)]
def bad_of(recs):
    ids = [k for k, _ in recs]
    return (sum(1 for k, v in recs if not k.startswith("id") or val(int(k[2:])) != v)
            + len(ids) - len(set(ids)))
t = Tally()
arm()
ok, r = t.op(ingest)
disarm()
out = t.as_dict()
out.update(lost=0, corrupt=0, works=False)
try:
    floor = asyncio.run(acked())
    engine.Log(d).close()    # recovery, as the next ingest would run it
    recs = logged()
    have = set(k for k, _ in recs)
    out["floor"], out["logged"] = floor, len(recs)
    if ok and have != set("id%d" % i for i in range(n)):
        out["false_success"] += 1
    # stream sequence s carries id s-1
    out["lost"] = sum(1 for s in range(1, floor + 1) if "id%d" % (s - 1) not in have)
    out["corrupt"] = bad_of(recs)
    # no faults: the rest arrives (redelivered after ack_wait), each once
    ingest()
    recs = logged()
    out["works"] = bad_of(recs) == 0 and set(k for k, _ in recs) == set("id%d" % i for i in range(n))
except Exception as exc:
    out["error"] = repr(exc)
report(out)
"""


@pytest.fixture
def nats_url(tmp_path_factory):
    exe = require_nats()
    server = NatsServer(exe, tmp_path_factory.mktemp("nats"), "fi").start()
    try:
        yield server.url
    finally:
        server.stop()


def _check(rows):
    bad = [(r.component, r.err, r.failures[:3]) for r in rows
           if r.false_success or r.lost or r.corrupt or r.not_working]
    assert not bad, bad
    assert sum(r.points for r in rows) > 0


def test_forwarder_commit_sweep_sampled(tmp_path, nats_url):
    rows = faultkit.sweep("JetStream forwarder", FORWARD.format(url=nats_url, n=N), str(tmp_path),
                          errs=("EIO",), max_points=1)
    _check(rows)


def test_a_forwarder_whose_commits_all_failed_commits_at_its_restart(tmp_path, nats_url):
    # every fsync under the log fails: each group commit fails, the records
    # still reach the stream, the run raises at its last commit; the restart
    # finds everything in the stream, sends nothing and must still commit
    d = tmp_path / "log"
    res = faultkit.run(FORWARD.format(url=nats_url, n=N).format(d=str(d)), prefix=str(tmp_path),
                       func="fsync", nth=1, err="EIO", sticky=True)
    assert res.rc == 0, res.stderr[-3000:]
    assert res.faults
    rep = res.report
    assert rep["kinds"] == ["OSError"] and rep["raised"] == 1
    assert rep["committed"] == 0 and rep["stream"] == N
    assert rep["false_success"] == rep["lost"] == rep["corrupt"] == 0
    assert rep["works"], rep


@pytest.mark.crash
def test_forwarder_commit_sweep_wide(tmp_path, nats_url):
    rows = faultkit.sweep("JetStream forwarder", FORWARD.format(url=nats_url, n=N), str(tmp_path),
                          errs=("EIO", "ENOSPC", "EINTR", "SHORT"), max_points=2)
    print("\n" + faultkit.table(rows))
    _check(rows)


def test_ingest_sweep_sampled(tmp_path, nats_url):
    # the appends' writes and syncs (a failed run waits ack_wait for its redelivery)
    rows = faultkit.sweep("JetStream ingest", INGEST.format(url=nats_url, n=N), str(tmp_path),
                          funcs=("pwrite", "fdatasync"), errs=("EIO",), max_points=1)
    _check(rows)



@pytest.mark.crash
def test_ingest_sweep_wide(tmp_path, nats_url):
    rows = faultkit.sweep("JetStream ingest", INGEST.format(url=nats_url, n=N), str(tmp_path),
                          errs=("EIO", "ENOSPC", "EINTR", "SHORT"), max_points=2)
    print("\n" + faultkit.table(rows))
    _check(rows)
