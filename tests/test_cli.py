"""The installed command: every tool module is present and registers."""

from __future__ import annotations

import subprocess
import sys

import pytest

from engine import cli


@pytest.mark.parametrize("module", cli.TOOLS)
def test_every_tool_module_is_installed(module):
    # cli.build_parser skips a *missing* tool module (partial source trees);
    # an installed package must have every one of them.
    __import__(module)


def test_help_lists_every_command():
    out = subprocess.run(
        [sys.executable, "-m", "engine", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in ("bench", "ring", "log", "counter"):
        assert command in out


def test_unknown_command_fails_cleanly():
    proc = subprocess.run(
        [sys.executable, "-m", "engine", "no-such-command"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "invalid choice" in proc.stderr
