"""fork() with a live VersionedStore / Deduplicator: the child's inherited
objects are inert (writes raise Closed saying to open anew; close and exit
write nothing and keep no lock), the parent goes on untouched."""

from __future__ import annotations

import os
import time

import pytest

import engine

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")


def _files(d):
    out = {}
    for root, _dirs, names in os.walk(d):
        for n in names:
            if n in ("notify", "writer.lock"):
                continue
            p = os.path.join(root, n)
            with open(p, "rb") as f:
                out[p] = f.read()
    return out


@pytest.mark.parametrize("durability", ["always", "none"])
def test_versioned_store_is_inert_in_a_forked_child(tmp_path, durability):
    d = str(tmp_path / "store")
    store = engine.VersionedStore(d, durability=durability, snapshot_every=5)
    for i in range(12):
        store.put(b"k%d" % (i % 3), b"v%d" % i)
    store._join_snapshot_thread()
    before = _files(d)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            try:
                store.put(b"k0", b"child")
            except engine.Closed as exc:
                code = 0 if "fork" in str(exc) else 2
            store.close()
            del store
            os.write(w, b"x")
            time.sleep(1.0)  # alive while the parent closes and reopens
        finally:
            os._exit(code)
    os.read(r, 1)
    assert _files(d) == before     # the child wrote no snapshot, no checkpoint
    store.put(b"k0", b"parent")
    store.close()
    with engine.VersionedStore(d, durability=durability) as s2:   # not LogLocked
        assert s2.get(b"k0")[1] == b"parent"
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_deduplicator_is_inert_in_a_forked_child(tmp_path):
    d = str(tmp_path / "dedup")
    dd = engine.Deduplicator(d, window=100)
    assert dd.first_time("a")
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            try:
                dd.first_time("b")
            except engine.Closed:
                code = 0
            dd.close()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert dd.first_time("b") and not dd.first_time("a")
    dd.close()
    with engine.Deduplicator(d, window=100) as dd2:
        assert not dd2.first_time("b")
