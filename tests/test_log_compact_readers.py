"""Readers in another process while the writer appends and compacts.

A child process follows the log from offset 0 with ``poll`` while the
writer appends keyed and keyless records, deletes keys and compacts after
every few rolls.  Every record the reader returns must be the one appended
at its offset, offsets strictly increasing; every keyless record and every
key's final record must reach it (compaction never removes those), and it
never sees an error.
"""

from __future__ import annotations

import multiprocessing as mp
import os

import engine

SEG = 8192


def _follow(path, end, q):
    out = []
    try:
        with engine.LogReader(path, start=0) as r:
            while True:
                rec = r.poll(timeout=5.0)
                if rec is None:
                    q.put(("timeout", out))
                    return
                out.append((rec.offset, None if rec.key is None else bytes(rec.key),
                            bytes(rec.value), rec.tombstone))
                if rec.offset >= end - 1:
                    break
        q.put(("ok", out))
    except Exception as exc:  # noqa: BLE001 - reported to the test
        q.put((repr(exc), out))


def test_a_following_reader_sees_a_consistent_log(tmp_path):
    path = str(tmp_path / "l")
    n = 3000
    model = []
    log = engine.Log(path, durability="none", segment_bytes=SEG, delete_retention=0)
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    child = ctx.Process(target=_follow, args=(path, n, q))
    child.start()
    try:
        passes = 0
        for i in range(n):
            if i % 97 == 50:
                key = b"k%d" % (i % 11)
                log.delete(key)
                model.append((key, b"", True))
            else:
                key = None if i % 13 == 0 else b"k%d" % (i % 11)
                value = b"%d:" % i * (1 + i % 7)
                log.append(value, key=key)
                model.append((key, value, False))
            if i % 150 == 149:
                log.compact()
                passes += 1
        log.flush()
        status, got = q.get(timeout=60)
        child.join(10)
    finally:
        if child.is_alive():
            child.kill()
        log.close()
    assert status == "ok", status
    assert passes >= 10
    offs = [o for o, *_ in got]
    assert offs == sorted(set(offs)) and offs[-1] == n - 1
    for off, key, value, tomb in got:
        assert (key, value, tomb) == model[off]
    seen = set(offs)
    last = {}
    for off, (key, _, _) in enumerate(model):
        if key is not None:
            last[key] = off
    for off, (key, _, _) in enumerate(model):
        if key is None or last[key] == off:
            assert off in seen, off
    assert os.path.isdir(path)
