"""The engine.queues annotations and the engine._mpq stub against typical
usage (mypy): a drop-in user's code type-checks, misuse is reported."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

USAGE = '''\
from __future__ import annotations
import asyncio
import queue
from typing import Any, List

import engine

q = engine.Queue(maxsize=10, capacity=1 << 20)
q.put(("job", 1)); q.put({"k": 1}, block=True, timeout=0.5); q.put_nowait(b"x")
item: Any = q.get(timeout=1.0)
item = q.get(False)
item = q.get_nowait()
q.put_many([1, 2, 3], timeout=1.0)
batch: List[Any] = q.get_many(timeout=1.0, max_messages_to_get=100)
n: int = q.qsize()
flags: bool = q.empty() or q.full()
name: str = q.name
q.close(); q.join_thread(); q.cancel_join_thread()
with engine.Queue() as q2:
    try:
        q2.get_nowait()
    except queue.Empty:
        pass

jq = engine.JoinableQueue()
jq.put(1); jq.get(); jq.task_done(); jq.join()
sq = engine.SimpleQueue()
sq.put(1); sq.get(); sq.empty(); sq.close()

async def main() -> None:
    a = engine.Queue()
    await a.aput(1, timeout=1.0)
    got: Any = await a.aget(timeout=1.0)

asyncio.run(main())

bad = engine.Queue(capacity="big")  # E: Argument "capacity"
q.put_many(5)  # E: Argument 1
size: str = q.qsize()  # E: Incompatible types
'''

_ERROR = re.compile(r"usage\.py:(\d+): error: (.*)$")


def test_queue_annotations_accept_usage_and_reject_misuse(tmp_path):
    pytest.importorskip("mypy")
    usage = tmp_path / "usage.py"
    usage.write_text(USAGE)
    expected = {i: line.split("  # E: ", 1)[1]
                for i, line in enumerate(USAGE.splitlines(), 1) if "  # E: " in line}
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--follow-imports=silent", "--cache-dir", str(tmp_path / "cache"),
         "--no-error-summary", "--hide-error-context", str(usage)],
        capture_output=True, text=True, cwd=str(Path(__file__).resolve().parents[1]),
    )
    assert out.returncode in (0, 1), out.stdout + out.stderr
    reported: dict = {}
    for line in out.stdout.splitlines():
        hit = _ERROR.search(line)
        if hit:
            reported.setdefault(int(hit.group(1)), []).append(hit.group(2))
    unexpected = {k: v for k, v in reported.items() if k not in expected}
    assert not unexpected, f"typical usage rejected:\n{out.stdout}"
    for lineno, fragment in expected.items():
        assert any(fragment in m for m in reported.get(lineno, [])), (lineno, fragment, out.stdout)
