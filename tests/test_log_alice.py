"""ALICE's crash model for the log: crash images at every sync point, every
unsynced byte dropped, including the sync points recovery itself makes.

A sync hook (``engine._log._set_sync_hook``) snapshots the directory at each
sync point and says what became durable there: "data" (a segment, at an append or
a roll), "checkpoint" (the checkpoint file and the directory; a segment file
created since was synced at its creation), "recovery" (segments recovery
synced, and the directory).  The durable disk after sync point k keeps, of
each file, its content at the last sync point that covered it, and nothing
of a file no sync point covered: every unsynced byte and name is dropped.

For a sample of sync points of a ``durability="always"`` writer, recovery
runs on what the crash left: the page cache (a process crash: unsynced
records are still there) or the durable disk (a power loss).  Every durable
disk along recovery's own sync points (a crash during recovery) is opened
again, and so is the one after its last (a second crash right after it).
Each time: every record acknowledged before the first crash is there with
its exact bytes -- and after recovery finished, every record it published --
nothing corrupt, offsets dense, appends work, verify finds nothing.
"""

from __future__ import annotations

import os
import random
import shutil

import pytest

import engine
from engine import _log

SEG = 8192


def _value(off: int) -> bytes:
    return bytes([off % 251]) * (off % 89) + b"#%d" % off


def _snapshot(path):
    snap = {}
    for root, _dirs, names in os.walk(path):
        for name in names:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, path)
            if name in ("writer.lock", "notify") or name.startswith("."):
                continue
            with open(full, "rb") as f:
                snap[rel] = f.read()
    return snap


def _apply(durable, info, snap):
    """The durable disk after a sync point described by info, given the
    page-cache view snap at that moment."""
    d = dict(durable)
    kind = info["kind"]
    if kind == "data":
        name = f"{info['segment']:020d}.seg"
        d[name] = snap[name]
    elif kind == "group":
        name = os.path.join("groups", info["group"])
        d[name] = snap[name]
    elif kind in ("checkpoint", "recovery"):
        # these fsync the directory too: names created or removed are durable now
        if kind == "checkpoint":
            # a segment file created since the last sync point was fsynced
            # at creation (header, size); its records only by "data"
            name = f"{info['segment']:020d}.seg"
            covered = [name] if name not in d and name in snap else []
        else:
            covered = [n for n in info["segments"] if n in snap]
        for n in covered:
            d[n] = snap[n]
        for n in ("checkpoint", "meta", "truncations"):   # written durably (temp, fsync, rename)
            if n in snap:
                d[n] = snap[n]
        for n in list(d):
            if n not in snap:
                del d[n]                                  # removed, and the removal is durable
        for n in snap:
            if n.endswith((".idx", ".tix")):
                d[n] = snap[n]                            # never synced, rebuildable: any version
    return d


def _record(path, rng):
    """Sync points of a durable writer: [(info, durable disk after it, acked at
    that moment, page-cache view)]."""
    points = []
    durable = {}
    acked = [0]

    def hook(p, info):
        if p == path:
            nonlocal durable
            snap = _snapshot(path)
            durable = _apply(durable, info, snap)
            points.append((dict(info), durable, acked[0], snap))

    _log._set_sync_hook(hook)
    try:
        log = engine.Log(path, durability="always", segment_bytes=SEG)
        while log.next_offset < 500:
            n = log.next_offset
            if rng.random() < 0.6:
                log.append(_value(n))
                acked[0] = n + 1
            else:
                acked[0] = log.append_many([_value(n + i) for i in range(rng.randrange(1, 12))]).stop
        log._simulate_crash()
    finally:
        _log._set_sync_hook(None)
    return points


def _write(path, disk):
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    for name, data in disk.items():
        full = os.path.join(path, name)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "wb") as f:
            f.write(data)


def _recovery_points(path, durable):
    """Open (recover) the log at path, whose durable part is `durable`; the
    durable disks along recovery's sync points, and the offset it published."""
    out = []

    def hook(p, info):
        if p == path:
            nonlocal durable
            durable = _apply(durable, info, _snapshot(path))
            out.append(durable)

    _log._set_sync_hook(hook)
    try:
        log = engine.Log(path, durability="always", segment_bytes=SEG)
        published = log.next_offset
        log._simulate_crash()     # the second crash: right after recovery
    finally:
        _log._set_sync_hook(None)
    return out, published


def _check(path, must_have, what):
    with engine.Log(path, durability="always", segment_bytes=SEG) as log:
        n = log.next_offset
        assert n >= must_have, f"{what}: acknowledged {must_have}, recovered {n}"
        assert log.append(b"after") == n
    recs = list(engine.LogReader(path))
    assert [r.offset for r in recs] == list(range(n + 1)), what
    for r in recs[:-1]:
        assert r.value == _value(r.offset), f"{what}: offset {r.offset} corrupt"
    assert recs[-1].value == b"after"
    assert not [r for r in _log.verify(path) if r.error is not None], what


@pytest.mark.parametrize("seed", [3])
def test_crash_images_at_every_sync_point_including_recoverys(tmp_path, seed):
    rng = random.Random(seed)
    src = str(tmp_path / "src")
    points = _record(src, rng)
    assert len(points) > 100
    kinds = {p[0]["kind"] for p in points}
    assert {"data", "checkpoint"} <= kinds
    # every checkpoint point and a sample of the data points
    chosen = [i for i, p in enumerate(points) if p[0]["kind"] != "data"]
    chosen += rng.sample([i for i, p in enumerate(points) if p[0]["kind"] == "data"], 25)
    second = 0
    for i in sorted(set(chosen)):
        info, durable, must_have, view = points[i]
        for first, seen in (("process crash", view), ("power loss", durable)):
            d1 = str(tmp_path / "first")
            _write(d1, seen)
            rec_points, published = _recovery_points(d1, durable)
            assert rec_points, "recovery made nothing durable"
            assert published >= must_have
            # a crash at each of recovery's sync points; after its last one
            # (the checkpoint) everything it published must be durable
            for j, disk2 in enumerate(rec_points):
                d2 = str(tmp_path / "second")
                _write(d2, disk2)
                last = j == len(rec_points) - 1
                _check(d2, published if last else must_have,
                       f"sync point {i} ({info['kind']}), {first}, recovery sync point {j}")
                second += 1
    assert second > len(set(chosen))
