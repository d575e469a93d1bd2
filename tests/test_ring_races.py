"""Races on the ring made deterministic: the interleaving is forced, not
hoped for.

1. A takeover of a dead producer's role that a racer wins while the taker
   is still checking the dead holder: the taker's liveness check reads
   /proc/DEAD/stat, which (in a user + mount namespace with a tmpfs over
   /proc) is a FIFO; the racer's writes to the producer block happen while
   the taker blocks on it.  The winner's start time must survive.
2. Shared-mode get_array with the region changed between its claim and its
   copy pass: numpy.empty (called after the claim CAS, before the copy) is
   wrapped to alter the region right there.  The copy must hand out exactly
   what it claimed or raise IncompatibleRegion; never other rows, a crash or
   a read outside the mapping.

Both run the ring in a child process: a crash there is a test failure, not a
dead test runner.  Offsets are those of ring_layout.h (static-asserted there).
"""

from __future__ import annotations

import mmap
import os
import struct
import subprocess
import sys
import textwrap

import pytest

import engine

PROD_PID, PROD_START = 128 + 8, 128 + 56

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc")


def _poke(name, off, fmt, value):
    with open(f"/dev/shm/{name}", "r+b") as f, mmap.mmap(f.fileno(), 0) as mm:
        struct.pack_into(fmt, mm, off, value)


def _peek(name, off, fmt):
    with open(f"/dev/shm/{name}", "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
        return struct.unpack_from(fmt, mm, off)[0]


def _start_time(pid):
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    return int(stat[stat.rfind(b")") + 2:].split()[19])


def _run(script, argv, prefix=(), timeout=60):
    """script in a fresh interpreter importing this very engine package (run
    from /, so no checkout in the working directory shadows it), behind the
    command `prefix`; (rc, stdout, stderr)."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(engine.__file__)))
    proc = subprocess.run(
        [*prefix, sys.executable, "-c", textwrap.dedent(script), *argv],
        capture_output=True, text=True, timeout=timeout, cwd="/",
        env={**os.environ, "PYTHONPATH": os.pathsep.join([here, *sys.path])},
    )
    return proc.returncode, proc.stdout, proc.stderr


# ---- 1. a racer wins the producer role while the taker checks the dead one ----

_TAKER = r"""
import ctypes, mmap, os, struct, sys, threading
import engine

name, dead, winner, wstart = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
PROD_PID, PROD_START = 128 + 8, 128 + 56
ring = engine.Ring.attach(name)
import engine._ring
print(engine._ring.__file__, file=sys.stderr)

# A private /proc: the taker's look at the dead holder opens a FIFO there.
libc = ctypes.CDLL(None, use_errno=True)
if libc.mount(b"none", b"/proc", b"tmpfs", 0, None) != 0:
    raise OSError(ctypes.get_errno(), "mount tmpfs on /proc")
os.makedirs(f"/proc/{dead}")
os.mkfifo(f"/proc/{dead}/stat")


def racer():
    # open() returns once the taker opened the FIFO: it read the producer
    # block (pid `dead`) and is checking that holder now.
    with open(f"/proc/{dead}/stat", "wb") as f:
        with open(f"/dev/shm/{name}", "r+b") as g, mmap.mmap(g.fileno(), 0) as mm:
            # what a winning racer leaves: its pid, then its start time
            struct.pack_into("<i", mm, PROD_PID, winner)
            struct.pack_into("<Q", mm, PROD_START, wstart)
        f.write(f"{dead} (holder) Z 1 1 1 0 -1 0".encode() + b" 0" * 30)  # a zombie: dead


t = threading.Thread(target=racer)
t.start()
try:
    ring.producer()
    print("took")
except engine.EngineError as e:
    print("refused", e)
t.join()
"""


def _userns_ok():
    try:
        return subprocess.run(["unshare", "-Urm", "true"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@linux_only
@pytest.mark.skipif(not _userns_ok(), reason="needs unshare -Urm (user and mount namespaces)")
def test_takeover_that_loses_the_race_keeps_the_winners_start_time(shm_name):
    """The producer block names a dead holder; a taker checks it, and while
    it does a racer wins the role (its pid, then its start time).  The
    taker must refuse (the winner is alive) and leave the winner's start
    time: only the dead holder's may be cleared.  Cleared, the record says
    "pid without start time", and once the winner dies and the kernel hands
    its pid to another process, that process holds the role for ever."""
    ring = engine.Ring.create(shm_name, capacity=4096)
    holder = subprocess.Popen(["sleep", "60"])     # the "dead" holder (a zombie in the taker's /proc)
    reused = subprocess.Popen(["sleep", "60"])     # the winner's pid, later reused by another process
    try:
        wstart = _start_time(reused.pid) + 1       # the winner's start: not the reuser's
        _poke(shm_name, PROD_START, "<Q", _start_time(holder.pid))
        _poke(shm_name, PROD_PID, "<i", holder.pid)
        rc, out, err = _run(
            _TAKER, [shm_name, str(holder.pid), str(reused.pid), str(wstart)],
            prefix=("unshare", "-Urm"),
        )
        assert rc == 0, err
        assert out.startswith("refused"), out + err  # the winner was alive
        assert _peek(shm_name, PROD_PID, "<i") == reused.pid
        start = _peek(shm_name, PROD_START, "<Q")
        # The winner has died; its pid now names another process (`reused`,
        # whose start time is not the winner's): the role is free.
        try:
            ring.producer().close()
            taken = "taken"
        except engine.EngineError as e:
            taken = f"refused: {e}"
        assert (start, taken) == (wstart, "taken"), (
            "a losing taker cleared the winner's start time, so a process reusing the "
            "winner's pid keeps the role")
    finally:
        for proc in (holder, reused):
            proc.kill()
            proc.wait()


# ---- 2. shared get_array: the region changes between claim and copy ---------

_GETTER = r"""
import mmap, os, struct, sys
import numpy as np
import engine
import engine._ring
print(engine._ring.__file__, file=sys.stderr)

name, tamper, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
CAP, SLOT0, DATA, REC_HDR, FLAG_PAD = 1 << 16, 512, 4096, 8, 1
rec = (REC_HDR + size + 7) & ~7
ring = engine.Ring.create(name, capacity=CAP, mode="shared", max_consumers=2)
p = ring.producer()
c = ring.consumer()
with open(f"/dev/shm/{name}", "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
    assert struct.unpack_from("<i", mm, SLOT0 + 8)[0] == os.getpid()  # we are slot 0
msgs = [bytes([k + 1]) * size for k in range(8)]
start = 0
if tamper == "pad_to_record":
    # two records, read; the next two wrap: a pad record fills the end
    p.put(msgs[6]); p.put(msgs[7])
    assert c.get_array(2).shape[0] == 2
    start = 2 * rec
for m in msgs[:2 if tamper == "pad_to_record" else 4]:
    p.put(m)
claimed = msgs[:2]


def alter(mm):
    if tamper == "cursor":
        # our slot's cursor, one record on: the rows are still [start, start + 2 rec)
        struct.pack_into("<Q", mm, SLOT0, start + rec)
    elif tamper == "pad_flag":
        # the second claimed record turns into a pad record (its length unchanged)
        struct.pack_into("<I", mm, DATA + start + rec + 4, FLAG_PAD)
    elif tamper == "pad_to_record":
        # the pad at the end turns into a record of the run's length: copying
        # it reads past the end of the data area
        assert struct.unpack_from("<I", mm, DATA + start + 4)[0] == FLAG_PAD
        struct.pack_into("<II", mm, DATA + start, size, 0)
    else:
        raise ValueError(tamper)


real_empty = np.empty
altered = []


def empty_then_alter(shape, *a, **kw):
    # called once the run is claimed, before the rows are copied
    if shape and shape[0]:
        np.empty = real_empty
        altered.append(shape)
        with open(f"/dev/shm/{name}", "r+b") as f, mmap.mmap(f.fileno(), 0) as mm:
            alter(mm)
    return real_empty(shape, *a, **kw)


np.empty = empty_then_alter
try:
    rows = c.get_array(2)
except engine.IncompatibleRegion as e:
    assert altered, "corrupt before the region was altered"
    print("corrupt", e)
else:
    assert altered, "get_array made no array between its claim and its copy"
    got = [bytes(r) for r in rows]
    print("rows", "claimed" if got == claimed else f"NOT the claimed rows: {[g[:2] for g in got]}")
"""


@linux_only
@pytest.mark.parametrize(
    ("tamper", "size", "verdict"),
    [
        # the copy starts where the claim started, not where the region says
        ("cursor", 16, "rows claimed"),
        # a record that became a pad of the wrong length: not followed
        ("pad_flag", 16, "corrupt"),
        # a pad that became a record running past the data area: not copied
        ("pad_to_record", 24 << 10, "corrupt"),
    ],
)
def test_shared_get_array_copy_pass_trusts_nothing_in_the_region(shm_name, tamper, size, verdict):
    """Claimed rows are copied from where the claim started, and every
    record header is checked again as it is copied."""
    rc, out, err = _run(_GETTER, [shm_name, tamper, str(size)])
    assert rc == 0, f"the getter died (status {rc}): {err[-2000:]}"
    assert out.startswith(verdict + ("\n" if verdict.startswith("rows") else " ")), out + err[-2000:]
