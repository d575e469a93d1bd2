"""Cross-process tailing and consumer groups resuming after a restart.

Real processes: a writer appends while readers in other processes follow
with ``poll`` (futex wake-ups through the log's ``notify`` file); every
record is checked (count, order, exact bytes via a checksum).  A group
consumer is SIGKILLed mid-stream and restarted: it resumes at its committed
offset and, together with the first run, sees every record (at-least-once).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.stress

N = 20000

WRITER = r"""
import sys, time, engine
path, n = sys.argv[1], int(sys.argv[2])
with engine.Log(path, durability="none", segment_bytes=1 << 16) as log:
    i = 0
    while i < n:
        k = min(n - i, 1 + i % 97)
        log.append_many([b"rec-%d-" % j * (1 + j % 5) for j in range(i, i + k)])
        i += k
        if i % 2000 < k:
            time.sleep(0.01)   # let the readers catch up and sleep
print("done", flush=True)
"""

READER = r"""
import sys, json, zlib, engine
path, n = sys.argv[1], int(sys.argv[2])
r = engine.LogReader(path, start=0)
crc, count, expect = 0, 0, 0
while count < n:
    rec = r.poll(timeout=20)
    if rec is None:
        break
    assert rec.offset == expect, (rec.offset, expect)
    assert rec.value == b"rec-%d-" % expect * (1 + expect % 5)
    crc = zlib.crc32(rec.value, crc)
    count += 1
    expect += 1
print(json.dumps({"count": count, "crc": crc}), flush=True)
"""

GROUP = r"""
import sys, json, engine
path, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
r = engine.LogReader(path, group="billing")
first = r.position
with open(out, "a") as f:
    f.write("start %d\n" % first)
    f.flush()
    while r.position < n:
        rec = r.poll(timeout=20)
        if rec is None:
            break
        f.write("%d\n" % rec.offset)
        if rec.offset % 100 == 99:
            f.flush()
            r.commit()       # processed, then commit: at-least-once
            f.write("commit %d\n" % r.position)
            f.flush()
print("finished", flush=True)
"""


def _env():
    # conftest already puts the package under test on PYTHONPATH for children
    return dict(os.environ)


def _ensure_log(path):
    import engine
    engine.Log(path, durability="none", segment_bytes=1 << 16).close()


def test_readers_in_other_processes_follow_the_writer(tmp_path):
    path = str(tmp_path / "log")
    _ensure_log(path)
    readers = [subprocess.Popen([sys.executable, "-c", READER, path, str(N)], stdout=subprocess.PIPE,
                                env=_env()) for _ in range(2)]
    time.sleep(0.3)  # readers start sleeping on an empty log
    writer = subprocess.Popen([sys.executable, "-c", WRITER, path, str(N)], stdout=subprocess.PIPE, env=_env())
    assert writer.communicate(timeout=120)[0].strip() == b"done"
    import zlib
    crc = 0
    for j in range(N):
        crc = zlib.crc32(b"rec-%d-" % j * (1 + j % 5), crc)
    for rp in readers:
        out, _ = rp.communicate(timeout=120)
        assert rp.returncode == 0
        assert json.loads(out) == {"count": N, "crc": crc}


def test_group_resumes_after_sigkill(tmp_path):
    path = str(tmp_path / "log")
    out = str(tmp_path / "seen.txt")
    _ensure_log(path)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, path, str(N)], stdout=subprocess.PIPE, env=_env())
    c1 = subprocess.Popen([sys.executable, "-c", GROUP, path, str(N), out], stdout=subprocess.PIPE, env=_env())
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if os.path.exists(out) and open(out).read().count("commit") >= 20:
            break
        time.sleep(0.02)
    c1.send_signal(signal.SIGKILL)
    c1.wait(timeout=30)
    assert c1.returncode == -signal.SIGKILL
    first_run = open(out).read().split("\n")
    commits = [int(x.split()[1]) for x in first_run if x.startswith("commit")]
    assert commits, "the consumer never committed"
    c2 = subprocess.Popen([sys.executable, "-c", GROUP, path, str(N), out], stdout=subprocess.PIPE, env=_env())
    assert c2.communicate(timeout=120)[0].strip() == b"finished"
    assert writer.communicate(timeout=120)[0].strip() == b"done"
    lines = open(out).read().split("\n")
    starts = [int(x.split()[1]) for x in lines if x.startswith("start")]
    assert starts[0] == 0
    # resumed at the last durable commit (the kill may land between write and commit)
    # (a kill between commit() and its log line means one more commit was stored)
    assert starts[1] in (commits[-1], commits[-1] + 100)
    assert starts[1] <= max(int(x) for x in first_run if x.strip().isdigit()) + 1
    seen = [int(x) for x in lines if x.strip().isdigit()]
    assert set(seen) == set(range(N))                 # at-least-once: nothing lost
    second = seen[len([x for x in first_run if x.strip().isdigit()]):]
    assert second == list(range(starts[1], N))        # in order from the commit
    import engine
    assert engine.LogReader(path, group="billing").position == N
