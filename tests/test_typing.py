"""Types: the hand-written stubs and the package's own annotations.

One mypy run over one file that uses the public API the way DESIGN.md and
the READMEs show it (ring, log, scheduling, counters, versions, 2PC, asyncio),
plus a few misuses, each marked ``# E: <part of the expected message>``:
mypy must report exactly the marked lines, with those messages. So a stub
that drifts from its module (a missing method, a wrong return type, an
argument that became ``Any``) fails here.  A second run checks the package's
own code (``engine/``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

USAGE = '''\
from __future__ import annotations
from typing import List, Optional, Tuple, Union

import engine
from engine import aio
from engine._log import Record
from engine.counters import CounterAggregator, CounterMap, CounterMapFull, ShardedCounter

# ring
ring = engine.Ring(capacity=1 << 16)
p, c = ring.producer(), ring.consumer()
p.put(b"msg", timeout=None)
sent: bool = p.try_put(b"msg")
n_put: int = p.put_many([b"a", b"b"])
got: bytes = c.get(timeout=1.0)
maybe: Optional[bytes] = c.try_get()
batch: List[bytes] = c.get_many(1024)
ring.stats()
p.close(); c.close()

# log
log = engine.Log("data/orders", durability="always")
off: int = log.append(b"value", key=b"k")
reader = engine.LogReader("data/orders", group="billing")
for rec in reader:
    print(rec.offset, rec.timestamp, rec.key, rec.value)
polled: Optional[Record] = reader.poll(timeout=1.0)
reader.seek(0); reader.commit()

# scheduling
pq = engine.PriorityQueue(levels=3, policy="weighted", weights=[8, 3, 1], max_wait=0.5)
pq.put(b"x", priority=1)
pq.put(b"y", 2, delay=0.1)
m: bytes = pq.get(timeout=1.0)
opt: Optional[bytes] = pq.try_get()
ms: List[bytes] = pq.get_many(10)
pq.ack()
pq.close()
kq = engine.KeyedQueue(partitions=4, key=lambda msg: msg[:4])
kq.put(b"z", key="user", delay=0.5)
kc = kq.consumer()
b: bytes = kc.get(timeout=1.0)
kc.ack()
kc.close()
kq.close()
d = engine.DurablePriorityQueue(levels=2, path="/tmp/x", durability="none")
d.put(b"a", priority=1, at=0.0)
d.ack()
dk = engine.DurableKeyedQueue(partitions=2, path="/tmp/y", durability="none")
dk.put(b"a", key=1, delay=1.0)
dkm: List[bytes] = dk.get_many(8, timeout=0.1)
dk.ack()

# counters
sc: ShardedCounter = engine.ShardedCounter.create("x", shards=8)
sc.add(); sc.add(-3)
total: int = sc.value()
drained: int = sc.reset()
shards: int = sc.shards
name: Optional[str] = sc.name
with ShardedCounter() as private:
    private.add(1)
cm = CounterMap(capacity=64)
cm.add("k", 2); cm.add(b"k")
v: int = cm["k"]
top: List[Tuple[Union[str, bytes], int]] = cm.top(3)
size: int = len(cm)
agg = CounterAggregator(target=cm)
s = agg.sender(batch=16)
s.add("k", 1); s.flush(); s.close()
applied: int = agg.drain()
full: CounterMapFull

# versions and transactions
store = engine.VersionedStore("data/state")
ver: int = store.put(b"k", b"v", expected_version=3)
dedup = engine.Deduplicator("data/seen", window=1_000_000)
first: bool = dedup.first_time(b"id-1")
coord = engine.Coordinator("data/txlog")
err: engine.EngineError = engine.VersionConflict(b"k", 3, 4)

# asyncio
async def main() -> None:
    ring = engine.Ring(capacity=1 << 16)
    p, c = ring.producer(), ring.consumer()
    await p.aput(b"x", timeout=1.0)
    m: bytes = await c.aget(timeout=1.0)
    ms: List[bytes] = await c.aget_many(10)
    async for x in c:
        m = x
    r = engine.LogReader("d")
    rec: Optional[Record] = await r.apoll(timeout=1.0)
    async for rr in r:
        rec = rr
    ok: bool = c.wait(0.1) and p.wait_space(10, 0.1) and r.wait(0.1)
    m = await aio.aget(engine.PriorityQueue(levels=2), timeout=1.0)
    print(m, ms, rec, ok, aio.active_waits())

# misuse: each line must be reported, with this message
pq.put(b"x", priority="high")  # E: Argument "priority" to "put"
bad_get: int = pq.get()  # E: Incompatible types in assignment
sc.add("1")  # E: Argument 1 to "add" of "ShardedCounter"
bad_value: str = sc.value()  # E: Incompatible types in assignment
bad_off: str = log.append(b"v")  # E: Incompatible types in assignment

async def bad_async() -> None:
    n: int = await engine.Ring().consumer().aget()  # E: Incompatible types in assignment
'''

_ERROR = re.compile(r"usage\.py:(\d+): error: (.*)$")


def test_stubs_accept_typical_usage_and_reject_misuse(tmp_path):
    pytest.importorskip("mypy")
    usage = tmp_path / "usage.py"
    usage.write_text(USAGE)
    expected = {}
    for lineno, line in enumerate(USAGE.splitlines(), 1):
        if "  # E: " in line:
            expected[lineno] = line.split("  # E: ", 1)[1]
    assert len(expected) == 6
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--follow-imports=silent", "--cache-dir", str(tmp_path / "cache"),
         "--no-error-summary", "--hide-error-context", str(usage)],
        capture_output=True, text=True, cwd=str(Path(__file__).resolve().parents[1]),
    )
    reported = {}
    for line in out.stdout.splitlines():
        hit = _ERROR.search(line)
        if hit:
            reported.setdefault(int(hit.group(1)), []).append(hit.group(2))
    assert out.returncode in (0, 1), out.stdout + out.stderr  # 2: mypy itself failed
    unexpected = {k: v for k, v in reported.items() if k not in expected}
    assert not unexpected, f"typical usage rejected:\n{out.stdout}"
    for lineno, fragment in expected.items():
        assert any(fragment in msg for msg in reported.get(lineno, [])), (
            f"line {lineno} ({USAGE.splitlines()[lineno - 1].strip()}) not reported with {fragment!r}:\n{out.stdout}")




def test_package_code_type_checks(tmp_path):
    """mypy over the package's own code (engine/), not only a usage file."""
    pytest.importorskip("mypy")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache"), "engine"],
        capture_output=True, text=True, cwd=str(root),
    )
    assert out.returncode == 0, out.stdout + out.stderr


_COMPILED = (
    "_ring", "_log", "_counter", "_sched", "_txn", "_versions", "_mpq", "_benchdigest", "_saga",
)


def test_stubs_match_the_compiled_modules(tmp_path):
    """``mypy.stubtest``: every name, signature and class in the hand-written
    ``.pyi`` stubs matches what the compiled module has at run time.  Cython
    adds pickling helpers and ``__test__`` to each module (allowlisted), and
    every ``cdef class`` is a PEP 800 disjoint base, which the stubs do not
    repeat."""
    pytest.importorskip("mypy")
    import engine

    allow = tmp_path / "allowlist.txt"
    allow.write_text("\n".join([
        r"engine\._\w+\.__test__",
        r"engine\._\w+\.(\w+\.)?__reduce_cython__",
        r"engine\._\w+\.(\w+\.)?__setstate_cython__",
    ]) + "\n")
    # stubs and runtime must be one copy: an installed package is found from
    # anywhere (not from site-packages itself, whose modules would shadow
    # mypy's own); a source-tree build is checked from its checkout
    parent = Path(engine.__file__).resolve().parents[1]
    where = parent if (parent / "pyproject.toml").exists() else tmp_path
    out = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "--ignore-disjoint-bases",
         "--allowlist", str(allow), *(f"engine.{m}" for m in _COMPILED)],
        capture_output=True, text=True, cwd=str(where),
        env={**os.environ, "MYPY_CACHE_DIR": str(tmp_path / "cache")},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"found in {len(_COMPILED)} modules" in out.stdout, out.stdout  # every one was checked
