"""Shared fixtures: unique shared-memory names that are always unlinked, and
bounded helpers for multi-process tests."""

from __future__ import annotations

import os
import signal
import sys
import uuid
from pathlib import Path

import pytest

# Test helper modules (crashkit, nats_servers) live beside this file; with
# --import-mode=importlib pytest does not put this directory on sys.path.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

# Child processes (`python -c ...`, `python -m engine`) put their working
# directory first on sys.path; in the repository root that is the source tree's
# uncompiled `engine/`, not the package under test.  So children get the
# directory that holds the package these tests imported (site-packages for an
# installed wheel, the checkout for an in-place build) on PYTHONPATH, and every
# test runs from a scratch directory (fixture below).
import engine as _engine  # noqa: E402

_PKG_ROOT = str(Path(_engine.__file__).resolve().parent.parent)
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (_PKG_ROOT, os.environ.get("PYTHONPATH", "")) if p
)


@pytest.fixture(autouse=True, scope="session")
def _run_outside_the_source_tree(tmp_path_factory):
    old = os.getcwd()
    os.chdir(tmp_path_factory.getbasetemp())
    yield
    os.chdir(old)


@pytest.fixture
def shm_name(request):
    """A fresh /dev/shm name, removed after the test whatever happens."""
    name = f"qe-test-{os.getpid()}-{uuid.uuid4().hex[:10]}"
    yield name
    for path in Path("/dev/shm").glob(f"{name}*"):
        try:
            path.unlink()
        except FileNotFoundError:
            pass


@pytest.fixture
def sigint_raises():
    """SIGINT raises KeyboardInterrupt in the main thread for the test's
    duration, however pytest was started: a shell starts a background job with
    SIGINT ignored, and Python then installs no handler of its own, so a test
    that interrupts a blocked call would wait forever."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
