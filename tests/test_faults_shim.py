"""The fault-injection shim itself: it numbers the workload's calls, fails
the chosen one with the chosen error, reaches the compiled log's calls
(msync / fdatasync / pwrite go through the PLT into the shim) and traces the
syncs that succeeded."""

from __future__ import annotations

import mmap

import faultkit
import pytest

pytestmark = pytest.mark.skipif(not faultkit.available(), reason="needs Linux and a C compiler")

WORKLOAD = """
import os, sys, engine
d = {d!r}
arm()
out = {{}}
try:
    log = engine.Log(d, durability="always", segment_bytes=8192)
    for i in range(150):
        log.append(b"x" * 100)
    log.close()
    out["ok"] = True
except Exception as exc:
    out["error"] = type(exc).__name__
    out["errno"] = getattr(exc, "errno", None)
disarm()
report(out)
"""


def test_counts_the_compiled_logs_calls(tmp_path):
    d = str(tmp_path / "log")
    res = faultkit.run(WORKLOAD.format(d=d), prefix=str(tmp_path))
    assert res.rc == 0, res.stderr
    assert res.report == {"ok": True}
    # 150 durable appends: one fdatasync each (pwrite path) plus rolls' msyncs
    assert res.counts["fdatasync"] >= 150
    assert res.counts["pwrite"] >= 150
    assert res.counts["msync"] >= 1      # the end markers of the rolls
    assert res.counts["fallocate"] >= 2  # a segment per roll
    assert res.counts["rename"] >= 2
    assert res.counts["all"] == sum(v for k, v in res.counts.items() if k != "all")
    assert res.faults == []


SYNCS = """
import os
fd = os.open({f!r}, os.O_RDWR | os.O_CREAT, 0o600)
arm()
seen = []
for i in range(5):
    try:
        os.fdatasync(fd)
        seen.append(0)
    except OSError as exc:
        seen.append(exc.errno)
disarm()
report(seen)
"""


@pytest.mark.parametrize("err,errno_", [("EIO", 5), ("ENOSPC", 28), ("EFBIG", 27)])
def test_fails_the_chosen_call(tmp_path, err, errno_):
    res = faultkit.run(SYNCS.format(f=str(tmp_path / "f")), prefix=str(tmp_path),
                       func="fdatasync", nth=3, err=err)
    assert res.rc == 0, res.stderr
    assert res.faults == [("fdatasync", 3, err)]
    assert res.report == [0, 0, errno_, 0, 0]
    res = faultkit.run(SYNCS.format(f=str(tmp_path / "f")), prefix=str(tmp_path),
                       func="fdatasync", nth=2, err=err, sticky=True)
    assert res.report == [0, errno_, errno_, errno_, errno_]


def test_the_log_fails_the_injected_sync(tmp_path):
    # the compiled module's fdatasync reaches the shim: a durable append raises
    res = faultkit.run(WORKLOAD.format(d=str(tmp_path / "log")), prefix=str(tmp_path),
                       func="fdatasync", nth=3, err="EIO")
    assert res.faults == [("fdatasync", 3, "EIO")]
    assert res.report["errno"] == 5


def test_short_write_and_the_all_sequence(tmp_path):
    d = str(tmp_path / "log")
    counted = faultkit.run(WORKLOAD.format(d=d), prefix=str(tmp_path))
    k = counted.counts["all"] // 2
    res = faultkit.run(WORKLOAD.format(d=str(tmp_path / "log2")), prefix=str(tmp_path),
                       func="all", nth=k, err="EIO")
    assert len(res.faults) == 1 and res.faults[0][1] == k
    res = faultkit.run(WORKLOAD.format(d=str(tmp_path / "log3")), prefix=str(tmp_path),
                       func="pwrite", nth=5, err="SHORT")
    assert res.faults == [("pwrite", 5, "SHORT")]
    assert res.report == {"ok": True}   # the log completes a short pwrite


def test_calls_outside_the_prefix_are_not_numbered(tmp_path):
    res = faultkit.run(WORKLOAD.format(d=str(tmp_path / "log")), prefix=str(tmp_path / "elsewhere"))
    assert res.rc == 0, res.stderr
    assert res.counts["fdatasync"] == 0 and res.counts["pwrite"] == 0


TRACED = """
import mmap, os
d = {d!r}
page = mmap.PAGESIZE
with open(os.path.join(d, "f"), "wb") as f:
    f.write(bytes(4 * page))
fd = os.open(os.path.join(d, "f"), os.O_RDWR)
m = mmap.mmap(fd, 3 * page, offset=page)   # file bytes [page, 4 * page)
arm()
m[page:page + 10] = b"x" * 10
m.flush(page, page)                          # msync of file bytes [2 * page, 3 * page)
os.fsync(fd)
os.fdatasync(fd)
dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
os.fsync(dfd)
disarm()
os.fsync(dfd)                                # not armed: not traced
report(page)
"""


def test_the_trace_names_each_synced_file_and_msync_range(tmp_path):
    d = str(tmp_path)
    res = faultkit.run(TRACED.format(d=d), prefix=d, trace=True)
    assert res.rc == 0, res.stderr
    page = res.report
    f = f"{d}/f"
    assert res.trace == [("msync", f, 2 * page, page), ("fsync", f), ("fdatasync", f), ("fsync", d)]


def test_a_failed_sync_is_not_traced(tmp_path):
    d = str(tmp_path)
    res = faultkit.run(TRACED.format(d=d), prefix=d, trace=True, func="fsync", nth=1, err="EIO")
    assert res.rc != 0 and "Input/output error" in res.stderr
    assert res.trace == [("msync", f"{d}/f", 2 * mmap.PAGESIZE, mmap.PAGESIZE)]   # the fsync raised
