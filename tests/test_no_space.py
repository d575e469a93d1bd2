"""Out of space: a full /dev/shm or disk is an OSError(ENOSPC) where the
caller can handle it -- never SIGBUS on a store into a sparse mapping (which
kills the interpreter), never a lost or half-written record.

Each case runs in a child process inside its own mount namespace
(``unshare -m``) with small tmpfs mounts over /dev/shm and over a scratch
directory, so "full" is real and nothing outside the child is affected.
Needs root (CAP_SYS_ADMIN) for the mounts: CI runs as root.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.timeout(120)


def _can_mount() -> bool:
    if shutil.which("unshare") is None or not sys.platform.startswith("linux"):
        return False
    probe = "mount -t tmpfs -o size=64k tmpfs /dev/shm"
    return subprocess.run(["unshare", "-m", "sh", "-c", probe], capture_output=True).returncode == 0


needs_mounts = pytest.mark.skipif(not _can_mount(), reason="needs unshare -m and tmpfs mounts (root)")


def _run_full(tmp_path, body: str, shm_kib: int = 1024, dir_kib: int = 2048) -> str:
    """Run `body` in a child where /dev/shm has `shm_kib` KiB and the directory
    D (a name in the child's globals) `dir_kib` KiB; return its stdout."""
    d = tmp_path / "small"
    d.mkdir()
    script = tmp_path / "child.py"
    script.write_text("import errno, os, sys\nimport engine\nD = sys.argv[1]\n" + textwrap.dedent(body))
    sh = (
        f"mount -t tmpfs -o size={shm_kib}k tmpfs /dev/shm && "
        f"mount -t tmpfs -o size={dir_kib}k tmpfs {d} && "
        f'exec "{sys.executable}" {script} {d}'
    )
    res = subprocess.run(["unshare", "-m", "sh", "-c", sh], capture_output=True, text=True, timeout=100)
    # a SIGBUS shows here as returncode -7 (or 135 through the shell)
    assert res.returncode == 0, f"child exited {res.returncode}\n{res.stdout}\n{res.stderr}"
    return res.stdout


@needs_mounts
def test_full_shm_fails_at_create_and_a_ring_that_fits_works(tmp_path):
    out = _run_full(tmp_path, """
        def enospc(fn):
            try:
                fn()
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
                return
            raise AssertionError("created a region that does not fit")

        # larger than the whole tmpfs: refused at create, nothing left behind
        enospc(lambda: engine.Ring.create("big", capacity=4 << 20))
        enospc(lambda: engine.CounterMap.create("cmap", capacity=1 << 16))
        enospc(lambda: engine.PriorityQueue(levels=3, name="pq"))
        assert os.listdir("/dev/shm") == [], os.listdir("/dev/shm")

        # one that fits takes its pages at create: every page written, no SIGBUS
        r = engine.Ring.create("small", capacity=256 << 10)
        p, c = r.producer(), r.consumer()
        for lap in range(3):  # wrap around the ring: every byte of it is stored into
            msgs = [b"%08d" % (lap * 200 + i) + b"x" * 1000 for i in range(200)]
            for m in msgs:
                p.put(m, timeout=5)
                assert c.get(timeout=5) == m
        # with the tmpfs now full, the next region is refused, the ring still works
        enospc(lambda: engine.Ring.create("more", capacity=1 << 20))
        p.put(b"still here")
        assert c.get(timeout=1) == b"still here"
        print("ok")
        """)
    assert out.strip() == "ok"


@needs_mounts
def test_full_disk_stops_appends_with_enospc_and_loses_nothing(tmp_path):
    out = _run_full(tmp_path, """
        seg = 256 << 10
        filler = os.path.join(D, "filler")
        with open(filler, "wb") as f:  # leaves room for a few segments
            f.write(b"\\0" * (768 << 10))
        log = engine.Log(os.path.join(D, "log"), segment_bytes=seg, durability="always")
        vals = []
        try:
            while True:
                v = b"%08d" % len(vals) + os.urandom(500)
                assert log.append(v) == len(vals)
                vals.append(v)
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
        assert len(vals) > 100
        # the failed roll left no half-made segment behind
        assert not [n for n in os.listdir(os.path.join(D, "log")) if n.endswith(".tmp")]
        os.unlink(filler)  # room again: the same writer goes on, offsets dense
        for _ in range(300):
            v = b"%08d" % len(vals) + os.urandom(500)
            assert log.append(v) == len(vals)
            vals.append(v)
        log.close()
        got = [bytes(r.value) for r in engine.LogReader(os.path.join(D, "log"))]
        assert got == vals, (len(got), len(vals))
        assert [r.offset for r in engine.LogReader(os.path.join(D, "log"))] == list(range(len(vals)))
        print("ok", len(vals))
        """)
    assert out.startswith("ok ")


@needs_mounts
def test_close_on_a_full_disk_releases_the_writer_and_loses_nothing(tmp_path):
    out = _run_full(tmp_path, """
        path = os.path.join(D, "log")
        fillers = [os.path.join(D, "room")]  # given back at the end: room for a new segment
        with open(fillers[0], "wb") as f:
            f.write(b"\\0" * (512 << 10))
        log = engine.Log(path, segment_bytes=256 << 10, durability="always")
        vals = []
        try:
            while True:
                v = b"%08d" % len(vals) + os.urandom(500)
                log.append(v)
                vals.append(v)
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
        try:  # take the last free block too: close cannot write its index or checkpoint
            for i in range(10_000):
                fillers.append(os.path.join(D, f"filler{i}"))
                with open(fillers[-1], "wb") as f:
                    f.write(b"\\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
        try:
            log.close()
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
        assert log.closed
        with engine.LogReader(path) as r:  # readable while the disk is full
            assert [bytes(x.value) for x in r] == vals
        for f in fillers:
            if os.path.exists(f):
                os.unlink(f)
        log = engine.Log(path, segment_bytes=256 << 10)  # the writer lock was released
        assert log.next_offset == len(vals)
        log.append(b"after")
        log.close()
        with engine.LogReader(path) as r:
            assert [bytes(x.value) for x in r] == vals + [b"after"]
        print("ok", len(vals))
        """)
    assert out.startswith("ok ")
