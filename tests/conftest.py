"""Shared fixtures: unique shared-memory names that are always unlinked, and
bounded helpers for multi-process tests."""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest

# Test helper modules (crashkit, nats_servers) live beside this file; with
# --import-mode=importlib pytest does not put this directory on sys.path.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


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
