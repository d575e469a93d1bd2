"""SIGKILL a real writer process at >= 200 random moments per durability mode.

A forked child (engine already imported, so each start is cheap) opens the
log, appends single records and batches, and reports through a pipe the
offset below which every append has returned.  The parent kills it at a
random moment (during open/recovery, appends, rolls, syncs), reopens the
log (recovery), and checks: every acknowledged record is there with its
exact key and value, offsets are dense, no record is corrupt, and appending
continues in the next child.
"""

from __future__ import annotations

import os
import random
import select
import signal
import struct
import time

import pytest

import engine
from engine import _log

pytestmark = [pytest.mark.crash, pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")]

SEG = 16384
KILLS = 200


def _value(off: int) -> bytes:
    return (b"%d|" % off) * (1 + off % 9)


def _key(off: int):
    return None if off % 3 == 0 else b"k%d" % (off % 17)


def _child(path, mode, wfd, seed):
    code = 0
    try:
        log = engine.Log(path, durability=mode, segment_bytes=SEG, flush_interval=0.005)
        rng = random.Random(seed)
        os.write(wfd, struct.pack("<q", -1))  # opened (recovery done)
        while True:
            n = log.next_offset
            if rng.random() < 0.5:
                log.append(_value(n), key=_key(n))
                done = n + 1
            else:
                k = rng.randrange(1, 40)
                r = log.append_many([_value(n + i) for i in range(k)], keys=[_key(n + i) for i in range(k)])
                done = r.stop
            os.write(wfd, struct.pack("<q", done))
    except BaseException:  # noqa: BLE001 - the parent sees the exit code
        code = 3
    finally:
        os._exit(code)


@pytest.mark.parametrize("mode", ["always", "interval", "none"])
def test_sigkill_at_random_moments(tmp_path, mode):
    path = str(tmp_path / "log")
    rng = random.Random(hash(mode) & 0xFFFF)
    verified = 0
    max_acked = 0
    kills_mid_run = 0
    t_end = time.monotonic() + 100
    for i in range(KILLS):
        assert time.monotonic() < t_end, "crash test ran out of its time budget"
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(rfd)
            _child(path, mode, wfd, rng.randrange(1 << 30))
        os.close(wfd)
        data = b""
        if rng.random() < 0.85:
            # mostly kill while appending; sometimes during open / recovery
            ready, _, _ = select.select([rfd], [], [], 30)
            assert ready, "child did not open the log within 30 s"
            data = os.read(rfd, 8)
        time.sleep(rng.choice([0, rng.uniform(0, 0.004), rng.uniform(0, 0.03)]))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status), f"child ended on its own (status {status}): it failed"
        while True:
            chunk = os.read(rfd, 1 << 16)
            if not chunk:
                break
            data += chunk
        os.close(rfd)
        acks = [a for a in struct.unpack(f"<{len(data) // 8}q", data[: len(data) // 8 * 8]) if a >= 0]
        if acks:
            kills_mid_run += 1
            max_acked = max(max_acked, max(acks))
        # recovery: every acknowledged record is there, exact, dense, nothing corrupt
        with engine.Log(path, durability=mode, segment_bytes=SEG) as log:
            n = log.next_offset
        assert n >= max_acked, f"kill {i}: acknowledged up to {max_acked}, recovered {n}"
        r = engine.LogReader(path, start=verified)
        got = r.read_many(n - verified + 10)
        assert [x.offset for x in got] == list(range(verified, n))
        for x in got:
            assert x.value == _value(x.offset) and x.key == _key(x.offset), x.offset
        r.close()
        verified = n
    assert kills_mid_run >= KILLS // 4  # kills that landed after at least one acknowledged append
    assert verified > KILLS  # appending continued across the kills
    assert all(res.error is None for res in _log.verify(path))
    full = list(engine.LogReader(path))
    assert [x.offset for x in full] == list(range(verified))
