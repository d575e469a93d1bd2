"""Power-loss simulation: recovery from "crashed disks".

A sync hook (``engine._log._set_sync_hook``) snapshots the log directory at
every durable sync point of a ``durability="always"`` writer.  Each snapshot
is the durable image at that moment.  For crashes between sync k and sync
k+1 the test builds disks from image k plus what the kernel might also have
written: random garbage, zeroes, a truncated file, torn prefixes of the
records that came next, or a next segment file that appeared.  Recovery must
keep every record acknowledged before the crash with its exact bytes, return
nothing corrupt, keep offsets dense and accept new appends.  Where unsynced
records reached the disk around a lost sector (damage followed by valid
data), opening raises CorruptLog at a position past everything acknowledged,
and `repair --truncate` then keeps every acknowledged record.
"""

from __future__ import annotations

import os
import random

import pytest
from synchook import snapshot

import engine
from engine import _log

SEG = 8192
TRIALS = 110
DATA_FILES = (".seg", ".idx", ".tix")


def _value(off: int) -> bytes:
    return bytes([off % 251]) * (off % 97) + b"#%d" % off


def _record_run(path, rng):
    """Append under durability=always; returns [(info, snapshot, acked_before_next_sync)]."""
    snaps = []
    acked = [0]

    def hook(p, info):
        if p == path:
            snaps.append([dict(info), snapshot(path), None])
            if len(snaps) >= 2 and snaps[-2][2] is None:
                snaps[-2][2] = acked[0]

    _log._set_sync_hook(hook)
    try:
        log = engine.Log(path, durability="always", segment_bytes=SEG)
        while log.next_offset < 900:
            n = log.next_offset
            if rng.random() < 0.5:
                log.append(_value(n))
                acked[0] = n + 1
            else:
                k = rng.randrange(1, 25)
                acked[0] = log.append_many([_value(n + i) for i in range(k)]).stop
        log._simulate_crash()
    finally:
        _log._set_sync_hook(None)
    snaps[-1][2] = acked[0]
    return snaps


def _crashed_disk(rng, snaps, k):
    """Image k plus something the kernel may have written after it."""
    info, snap, _ = snaps[k]
    disk = dict(snap)
    nxt = snaps[k + 1][1] if k + 1 < len(snaps) else snap
    # the segment being appended to at sync k, and how far it was synced
    seg_names = sorted(n for n in disk if n.endswith(".seg"))
    active = seg_names[-1]
    synced = info["position"] if info.get("kind") == "data" and f"{info['segment']:020d}.seg" == active else 64
    img = bytearray(disk[active])
    choice = rng.randrange(6)
    if choice == 0:      # random garbage after the durable part
        a = rng.randrange(synced, len(img))
        b = min(len(img), a + rng.randrange(1, 3000))
        img[a:b] = rng.randbytes(b - a)
    elif choice == 1:    # zeroes over what was never synced
        img[synced:] = bytes(len(img) - synced)
    elif choice == 2:    # the file lost its tail (size not durable), maybe after later writes
        if active in nxt and rng.random() < 0.5:
            img[synced:] = nxt[active][synced:]
        img = img[: rng.randrange(synced, len(img) + 1)]
    elif choice == 3 and active in nxt:  # torn prefix of the next writes
        later = nxt[active]
        cut = rng.randrange(synced, len(later) + 1)
        img[synced:cut] = later[synced:cut]
        if rng.random() < 0.5 and cut + 8 < len(img):
            img[cut: cut + 8] = rng.randbytes(8)
    elif choice == 4:    # next writes, with one sector of them lost
        if active in nxt:
            later = nxt[active]
            img[synced:] = later[synced:]
            a = rng.randrange(synced, len(img))
            img[a: a + 512] = bytes(min(512, len(img) - a))
    else:                # a new segment file appeared (roll in flight), torn
        for name in nxt:
            if name.endswith(".seg") and name not in disk:
                new = bytearray(nxt[name])
                cut = rng.randrange(0, len(new) + 1)
                disk[name] = bytes(new[:cut]) + rng.randbytes(rng.randrange(0, 64))
    disk[active] = bytes(img)
    # index files are never synced: any version, or none
    for name in list(disk):
        if name.endswith((".idx", ".tix")) and rng.random() < 0.3:
            del disk[name]
    return disk


def _write_disk(path, disk):
    os.makedirs(path, exist_ok=True)
    for name, data in disk.items():
        with open(os.path.join(path, name), "wb") as f:
            f.write(data)


@pytest.mark.parametrize("seed", [1, 2])
def test_recovery_from_crashed_disks(tmp_path, seed):
    rng = random.Random(seed)
    src = str(tmp_path / "src")
    snaps = _record_run(src, rng)
    assert len(snaps) > 50
    checked = repaired = 0
    for trial in range(TRIALS):
        k = rng.randrange(len(snaps))
        must_have = snaps[k][2]
        assert must_have <= snaps[k][0].get("next_offset", must_have) or snaps[k][0]["kind"] != "data"
        disk = _crashed_disk(rng, snaps, k)
        d = str(tmp_path / f"crash{trial}")
        _write_disk(d, disk)
        try:
            engine.Log(d, durability="always", segment_bytes=SEG).close()
        except engine.CorruptLog as exc:
            # unsynced writes that reached the disk out of order (a lost
            # sector before later records): damage followed by valid data
            # is CorruptLog, never a torn tail; it lies past everything
            # acknowledged, so `repair --truncate` loses nothing acknowledged
            seg_base = int(os.path.basename(exc.segment)[:20])
            info = snaps[k][0]
            synced = info["position"] if info.get("kind") == "data" and info["segment"] == seg_base else 64
            assert seg_base >= snaps[k][0].get("segment", 0) and exc.position >= synced, (trial, exc)
            _log.repair_truncate(d)
            repaired += 1
        with engine.Log(d, durability="always", segment_bytes=SEG) as log:
            n = log.next_offset
            assert n >= must_have, f"trial {trial}: acknowledged {must_have}, recovered {n}"
            assert log.append(b"after") == n
        recs = list(engine.LogReader(d))
        assert [r.offset for r in recs] == list(range(n + 1))
        for r in recs[:-1]:
            assert r.value == _value(r.offset)
        assert recs[-1].value == b"after"
        bad = [res for res in _log.verify(d) if res.error is not None]
        assert not bad, (trial, k, bad)
        checked += 1
    assert checked == TRIALS
    assert repaired < TRIALS // 4
