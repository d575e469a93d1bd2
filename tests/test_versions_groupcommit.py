"""Durable ``VersionedStore`` writes (``durability="always"``): a write
returns only once its record is durable, and writers in several threads share
their syncs (the store appends under its lock and waits for the sync after
releasing it).

A sync hook (``engine._log._set_sync_hook``) tells how far the store's log is
durable after every sync; a wrapper around the store's append remembers, per
thread, the offset of the record it wrote last.
"""

from __future__ import annotations

import threading

import pytest
from synchook import Durable, installed, run_threads

import engine._log as _logmod
from engine.versions import VersionedStore


@pytest.fixture
def durable():
    with installed(Durable()) as hook:
        yield hook


def _store(path):
    """A durable store whose appends note their offset in a thread-local."""
    st = VersionedStore(str(path), durability="always", snapshot_every=None)
    mine = threading.local()
    real = st._append

    def append(value, key=None):
        off = real(value, key)
        mine.off = off
        return off

    st._append = append
    return st, mine


@pytest.mark.parametrize("threads", [1, 8])
def test_a_durable_write_returns_only_once_its_record_is_durable(tmp_path, durable, threads):
    """At the moment each put, compare-and-set put, delete and apply returns,
    the sync hook has already seen the log durable past the record it wrote."""
    st, mine = _store(tmp_path / "store")
    path = st._log.path
    early = []
    per = 20

    def check(what):
        if durable.end(path) <= mine.off:
            early.append((what, mine.off, durable.end(path)))

    def body(k):
        for i in range(per):
            key = b"k%d-%d" % (k, i)
            assert st.put(key, b"v1") == 1
            check("put")
            assert st.put(key, b"v2", expected_version=1) == 2
            check("cas put")
            st.apply([("put", key + b"/a", b"a"), ("put", key + b"/b", b"b")])
            check("apply")
            assert st.delete(key + b"/a", expected_version=1)
            check("delete")

    try:
        run_threads(threads, body, what="a write")
        assert all(st.get(b"k%d-%d" % (k, i)) == (2, b"v2")
                   for k in range(threads) for i in range(per))
    finally:
        st.close()
    assert early == []


def test_concurrent_puts_share_syncs(tmp_path):
    """Puts from 8 threads share the log's syncs: fewer syncs than puts."""
    hook = Durable(slow=0.002)
    _logmod._set_sync_hook(hook)
    threads, per = 8, 10
    st, _mine = _store(tmp_path / "store")
    try:
        st.apply([("put", b"k%d-%d" % (k, i), b"") for k in range(threads) for i in range(per)])
        before = st._log.stats()["syncs"]

        def body(k):
            for i in range(per):
                assert st.put(b"k%d-%d" % (k, i), b"v", expected_version=1) == 2

        run_threads(threads, body, what="a write")
        syncs = st._log.stats()["syncs"] - before
    finally:
        _logmod._set_sync_hook(None)
        st.close()
    assert 0 < syncs < threads * per, (syncs, threads * per)
