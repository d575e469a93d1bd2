"""Shared fixtures: unique shared-memory names that are always unlinked, and
bounded helpers for multi-process tests."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest


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
