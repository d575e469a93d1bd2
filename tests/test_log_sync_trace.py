"""What the log's syncs cover, read from the fault shim's sync trace
(tests/faultkit.py, ``trace=True``: every successful fsync / fdatasync /
msync of a file under the test's directory, msync as a file range).

* A roll whose sync fails breaks the log, even for a record that would still
  fit in the old segment: the end marker written there was never synced.
* A roll whose new segment cannot be created (a full disk) leaves the old
  segment active with its synced mark below the end marker it wrote, so a
  record written over that marker later is synced in full -- a mark at the end
  marker's end would let the next sync start past the record's header, and a
  power loss would then leave the synced end marker where the acknowledged
  record was.
* A new log directory's name, and each new parent's, is fsynced in its
  parent; a failed fsync there removes what was created, so a retry syncs the
  names again.  So is the directory of every component built on logs.
"""

from __future__ import annotations

import mmap
import os

import faultkit
import pytest

pytestmark = pytest.mark.skipif(not faultkit.available(), reason="needs Linux and a C compiler")

PAGE = mmap.PAGESIZE
SEGHDR = 64   # eng_seg_header (pyx/log_layout.h)
RECHDR = 32   # eng_rec_header

# One record fills the first segment up to one header short of a page, so the
# end marker of the roll that follows takes exactly the last header's room of
# that page; the next record does not fit (a roll), a small one does.
ROLL = """
import os, struct, engine
d, page, seghdr, rechdr = {d!r}, {page}, {seghdr}, {rechdr}
out = {{}}
log = engine.Log(d, durability="interval", flush_interval=3600, segment_bytes=2 * page)
log.append(b"a" * (page - 2 * rechdr - seghdr))   # offset 0, ends at page - rechdr
log.flush()
arm()
try:
    log.append(b"b" * page)                       # too big for the rest: a roll
    out["big"] = "ok"
except Exception as exc:
    out["big"] = [type(exc).__name__, getattr(exc, "errno", None)]
out["trace_before_small"] = synced_so_far()
for name, call in (("small", lambda: log.append(b"c" * 100)), ("flush", log.flush)):
    try:
        out[name] = call()
    except Exception as exc:
        out[name] = [type(exc).__name__, getattr(exc, "errno", None)]
disarm()
# where offset 1 lies in the first segment (the page cache's view)
seg = os.path.join(d, "%020d.seg" % 0)
with open(seg, "rb") as f:
    data = f.read()
pos, where = seghdr, None
while pos + rechdr <= len(data):
    length, = struct.unpack_from("<I", data, pos)
    if length == 0:
        break
    off, = struct.unpack_from("<Q", data, pos + 8)
    if off == 1:
        where = [pos, length]
        break
    pos += (length + 7) & ~7
out["seg"] = os.path.realpath(seg)
out["where"] = where
try:
    log.close()
    out["close"] = "ok"
except Exception as exc:
    out["close"] = type(exc).__name__
with engine.Log(d, durability="interval") as log2:
    out["next"] = log2.next_offset
    log2.append(b"after")
out["values"] = [r.value for r in engine.LogReader(d)]
out["values"] = [v[:1].decode() + str(len(v)) for v in out["values"]]
report(out)
"""


def _roll(tmp_path, func, err):
    src = ROLL.format(d=str(tmp_path / "log"), page=PAGE, seghdr=SEGHDR, rechdr=RECHDR)
    return faultkit.run(src, prefix=str(tmp_path), func=func, nth=1, err=err, trace=True)


def test_a_failed_sync_at_a_roll_breaks_the_log(tmp_path):
    res = _roll(tmp_path, "msync", "EIO")   # the first sync after arming: the roll's
    assert res.rc == 0, res.stderr[-3000:]
    assert res.faults == [("msync", 1, "EIO")]
    rep = res.report
    assert rep["big"] == ["LogBroken", 5]
    # the small record fits where the unsynced end marker is: still refused
    assert rep["small"] == ["LogBroken", 5]
    assert rep["flush"] == ["LogBroken", 5]
    assert rep["close"] == "ok"
    # reopened from disk: the flushed record, nothing of the failed ones
    assert rep["next"] == 1
    assert rep["values"] == [f"a{PAGE - 2 * RECHDR - SEGHDR}", "a5"]


def _covered(trace, path, lo, hi):
    """True when the syncs in ``trace`` cover the bytes [lo, hi) of ``path``."""
    spans = []
    for t in trace:
        if t[1] != path:
            continue
        if t[0] in ("fsync", "fdatasync"):
            return True
        spans.append((t[2], t[2] + t[3]))
    at = lo
    for a, b in sorted(spans):
        if a <= at < b:
            at = b
    return at >= hi


@pytest.mark.parametrize("func,err,errno_", [
    ("fallocate", "ENOSPC", 28),   # the new segment's blocks: a full disk
    ("rename", "EIO", 5),          # the old segment's index file, before the new segment
])
def test_a_roll_that_cannot_create_its_segment_keeps_the_synced_mark_below_its_end_marker(
        tmp_path, func, err, errno_):
    res = _roll(tmp_path, func, err)
    assert res.rc == 0, res.stderr[-3000:]
    assert res.faults == [(func, 1, err)]
    rep = res.report
    assert rep["big"] == ["OSError", errno_]    # the roll did not happen: the log goes on in the old segment
    assert rep["small"] == 1 and rep["flush"] is None
    pos, length = rep["where"]
    # offset 1 was written over the end marker, its header in the page's last bytes
    assert pos == PAGE - RECHDR and length == RECHDR + 100
    # the syncs since it was written (flush) cover every byte of it
    after = res.trace[rep["trace_before_small"]:]
    assert after, "flush synced nothing"
    assert _covered(after, rep["seg"], pos, pos + length), \
        f"offset 1 at [{pos}, {pos + length}) of {rep['seg']} acknowledged, syncs since: {after}"
    assert rep["close"] == "ok"
    assert rep["next"] == 2
    assert rep["values"] == [f"a{PAGE - 2 * RECHDR - SEGHDR}", "c100", "a5"]


# Log(root/a/b/log) with root present: three new directories.
PARENTS = """
import engine
root = {root!r}
out = {{}}
arm()
try:
    engine.Log(root + "/a/b/log").close()
    out["first"] = "ok"
except Exception as exc:
    out["first"] = [type(exc).__name__, getattr(exc, "errno", None)]
import os
out["a_exists"] = os.path.exists(root + "/a")
out["trace_before_retry"] = synced_so_far()
engine.Log(root + "/a/b/log").close()   # a retry; the directory lock was never kept
disarm()
report(out)
"""


def _dir_syncs(trace):
    return [t[1] for t in trace if t[0] == "fsync" and os.path.isdir(t[1])]


def test_a_new_log_directory_fsyncs_each_new_name(tmp_path):
    root = os.path.realpath(tmp_path)
    res = faultkit.run(PARENTS.format(root=root), prefix=root, trace=True)
    assert res.rc == 0, res.stderr[-3000:]
    assert res.report["first"] == "ok"
    synced = _dir_syncs(res.trace[:res.report["trace_before_retry"]])
    # "log" in a/b, "b" in a, "a" in root
    for parent in (f"{root}/a/b", f"{root}/a", root):
        assert parent in synced, f"{parent} never fsynced; directory fsyncs: {synced}"


def test_a_failed_parent_fsync_leaves_nothing_a_retry_would_trust(tmp_path):
    root = os.path.realpath(tmp_path)
    # the first fsync under root: the deepest new parent's
    res = faultkit.run(PARENTS.format(root=root), prefix=root, func="fsync", nth=1, err="EIO",
                       trace=True)
    assert res.rc == 0, res.stderr[-3000:]
    assert res.faults == [("fsync", 1, "EIO")]
    rep = res.report
    assert rep["first"] == ["OSError", 5]
    assert rep["a_exists"] is False    # what the failed open created is gone
    synced = _dir_syncs(res.trace[rep["trace_before_retry"]:])
    for parent in (f"{root}/a/b", f"{root}/a", root):
        assert parent in synced, f"the retry never fsynced {parent}; directory fsyncs: {synced}"


# Each component in root/x/c with root present: "x" in root and "c" in x are new.
COMPONENT = """
import engine
p = {p!r}
arm()
obj = {make}
obj.close()
disarm()
report("ok")
"""


@pytest.mark.parametrize("make", [
    "engine.VersionedStore(p)",
    "engine.Coordinator(p)",
    "engine.Saga(p)",
    "engine.DurablePriorityQueue(path=p)",
    "engine.DurableKeyedQueue(path=p)",
])
def test_a_new_component_directory_fsyncs_each_new_name(tmp_path, make):
    root = os.path.realpath(tmp_path)
    res = faultkit.run(COMPONENT.format(p=f"{root}/x/c", make=make), prefix=root, trace=True)
    assert res.rc == 0 and res.report == "ok", res.stderr[-3000:]
    synced = _dir_syncs(res.trace)
    for parent in (f"{root}/x", root):
        assert parent in synced, f"{parent} never fsynced; directory fsyncs: {synced}"
