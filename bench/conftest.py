"""Fixtures for the pytest-benchmark microbenchmarks in bench/.

Run them (developers' regression check, not the user-facing comparison):

    pytest bench/ --benchmark-only                      # measure
    pytest bench/ --benchmark-only --benchmark-save=base    # keep a baseline
    pytest bench/ --benchmark-only --benchmark-compare=0001 --benchmark-compare-fail=median:10%

Every benchmark verifies delivery with ``assert_delivered`` (count + the
harness's order-independent checksum, and order where promised), so a fast
wrong answer cannot win. Workloads are the harness's: an 8-byte sequence
number followed by seeded filler.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

import pytest

from engine.bench.harness import Workload, digest


@pytest.fixture
def workload() -> Callable[..., Workload]:
    """``workload(count, size=64)``: deterministic payloads, built once
    (``.payloads()`` list of bytes, ``.array()`` rows, ``.expected`` digest)."""

    def make(count: int, size: int = 64, seed: int = 0) -> Workload:
        wl = Workload(count, size, seed)
        _ = wl.expected  # build the payloads before any timing
        return wl

    return make


@pytest.fixture
def assert_delivered() -> Callable[..., None]:
    """``assert_delivered(received, wl, ordered=True)``: exactly the workload
    arrived (no loss, no duplicate, no corruption; in order if promised)."""

    def check(received: Sequence[Any], wl: Workload, ordered: bool = True) -> None:
        d = digest(received)
        exp = wl.expected
        assert d.count == exp.count, f"delivered {d.count} of {exp.count} messages"
        assert d.checksum == exp.checksum, "payload checksum differs (lost, duplicated or corrupted)"
        if ordered:
            assert d.in_order is not False, "messages arrived out of order"

    return check


@pytest.fixture
def shm_name() -> Any:
    """A fresh /dev/shm name, removed after the benchmark whatever happens."""
    name = f"qe-bench-{os.getpid()}-{uuid.uuid4().hex[:10]}"
    yield name
    for path in Path("/dev/shm").glob(f"{name}*"):
        try:
            path.unlink()
        except FileNotFoundError:
            pass
