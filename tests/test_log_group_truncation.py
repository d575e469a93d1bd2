"""A consumer group whose committed offset the log no longer reaches (a
recovery cut records it had read, or `repair`) resumes at the first offset
that may have changed, with a warning: never ValueError forever, never a
silent skip of new records that reuse those offsets."""

from __future__ import annotations

import logging
import os
import struct

import engine
from engine import _log


def _lose_tail(d, from_record):
    """A power loss took the records from `from_record` on: zeros on disk."""
    seg = os.path.join(d, f"{0:020d}.seg")
    with open(seg, "rb") as f:
        data = f.read()
    pos, i = 64, 0
    while i < from_record:
        pos += (struct.unpack_from("<I", data, pos)[0] + 7) & ~7
        i += 1
    with open(seg, "r+b") as f:
        f.seek(pos)
        f.write(bytes(len(data) - pos))


def _consumed_then_crashed(d):
    log = engine.Log(d, durability="none", segment_bytes=1 << 16)
    for i in range(100):
        log.append(b"old-%d" % i)
    with engine.LogReader(d, group="g") as r:
        assert len(list(r)) == 100
        r.commit()
    log._simulate_crash()
    _lose_tail(d, 60)


def test_group_past_the_end_resumes_at_the_end(tmp_path, caplog):
    d = str(tmp_path / "log")
    _consumed_then_crashed(d)
    with engine.Log(d, durability="none", segment_bytes=1 << 16) as log:
        assert log.next_offset == 60
    with caplog.at_level(logging.WARNING, logger="engine"):
        r = engine.LogReader(d, group="g")
    assert r.position == 60
    assert "truncated" in caplog.text
    r.close()


def test_new_records_reusing_the_offsets_are_not_skipped(tmp_path, caplog):
    d = str(tmp_path / "log")
    _consumed_then_crashed(d)
    with engine.Log(d, durability="none", segment_bytes=1 << 16) as log:
        for i in range(60, 150):
            log.append(b"new-%d" % i)
    with caplog.at_level(logging.WARNING, logger="engine"):
        r = engine.LogReader(d, group="g")
    got = [rec.value for rec in r]
    assert got == [b"new-%d" % i for i in range(60, 150)]
    r.commit()
    r.close()
    # once it committed after the truncation, it resumes where it committed
    with engine.LogReader(d, group="g") as r:
        assert r.position == 150


def test_repair_counts_as_a_truncation(tmp_path):
    d = str(tmp_path / "log")
    with engine.Log(d, durability="none", segment_bytes=1 << 16) as log:
        for i in range(50):
            log.append(b"v%d" % i)
    with engine.LogReader(d, group="g") as r:
        list(r)
        r.commit()
    seg = os.path.join(d, f"{0:020d}.seg")
    with open(seg, "r+b") as f:   # damage offset 0's value: repair cuts everything
        f.seek(64 + 33)
        f.write(b"\xff")
    assert _log.repair_truncate(d) is not None
    with engine.Log(d, durability="none", segment_bytes=1 << 16) as log:
        for i in range(80):
            log.append(b"n%d" % i)
    with engine.LogReader(d, group="g") as r:
        assert r.position == 0
        assert [rec.value for rec in r][:2] == [b"n0", b"n1"]


def test_a_clean_group_is_untouched(tmp_path):
    d = str(tmp_path / "log")
    log = engine.Log(d, durability="none", segment_bytes=1 << 16)
    for i in range(30):
        log.append(b"v%d" % i)
    with engine.LogReader(d, group="g") as r:
        for _ in range(20):
            r.read()
        r.commit()
    log._simulate_crash()           # nothing lost: the group stays at 20
    engine.Log(d, durability="none", segment_bytes=1 << 16).close()
    with engine.LogReader(d, group="g") as r:
        assert r.position == 20 and r.committed() == 20
