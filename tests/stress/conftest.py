"""Fixtures shared by the multi-process and crash tests."""

import os
import pathlib
import shutil
import tempfile

import pytest


@pytest.fixture
def workdir(tmp_path):
    """A fresh directory on tmpfs (/dev/shm) when there is one.

    A SIGKILL keeps exactly what the page cache holds on any file system, so
    the crash tests lose nothing there, and they run ~10x faster than on a
    busy disk (directory creation, preallocation and the syncs of clean
    closes).  Power-loss tests, which need a real disk, use tmp_path.
    """
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    if base is None:
        yield tmp_path
        return
    d = tempfile.mkdtemp(prefix="qe-crash-test-", dir=base)
    try:
        yield pathlib.Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)
