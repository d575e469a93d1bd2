"""A VersionedStore whose log broke refuses reads as it refuses writes.

A ``put`` whose record reached the log but whose sync failed raises
:class:`engine.LogBroken`: the write is not acknowledged.  The store's table
already holds it, so reads must refuse from then on too, or they would hand
out a value that may not survive a reopen.
"""

from __future__ import annotations

import faultkit
import pytest

pytestmark = pytest.mark.skipif(not faultkit.available(), reason="needs Linux and a C compiler")

SRC = """
import engine
st = engine.VersionedStore({d!r}, durability="always", segment_bytes=1 << 16)
st.put(b"k", b"old")
arm()
out = {{}}
try:
    st.put(b"k", b"new")
    out["put"] = "ok"
except engine.LogBroken:
    out["put"] = "LogBroken"
disarm()
for name, read in [("get", lambda: st.get(b"k")), ("get_many", lambda: st.get_many([b"k"])),
                   ("items", lambda: list(st.items())), ("keys", lambda: st.keys()),
                   ("contains", lambda: b"k" in st), ("len", lambda: len(st)),
                   ("version", lambda: st.version(b"k"))]:
    try:
        out[name] = repr(read())
    except engine.LogBroken:
        out[name] = "LogBroken"
try:
    st.put(b"k", b"newer")
    out["put2"] = "ok"
except engine.LogBroken:
    out["put2"] = "LogBroken"
st.close()
with engine.VersionedStore({d!r}, durability="always", segment_bytes=1 << 16) as st2:
    out["reopened"] = repr(st2.get(b"k"))
report(out)
"""


def test_reads_refuse_after_a_failed_sync(tmp_path):
    d = str(tmp_path / "s")
    res = faultkit.run(SRC.format(d=d), prefix=str(tmp_path), func="msync", nth=1, err="EIO")
    assert res.faults, "the put's sync was not reached: no fault fired"
    out = res.report
    assert isinstance(out, dict), res.stderr[-2000:]
    assert out["put"] == "LogBroken"
    for name in ("get", "get_many", "items", "keys", "contains", "len", "version", "put2"):
        assert out[name] == "LogBroken", (name, out)
    # the reopened store holds one of the two values, never anything else
    assert out["reopened"] in (repr((1, b"old")), repr((2, b"new"))), out
