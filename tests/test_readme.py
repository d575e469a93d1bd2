"""The README's tour runs as written (against the installed package), and its
first lines are the two commands CI and users run."""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _text() -> str:
    if not README.exists():  # a wheel test run from outside the checkout
        pytest.skip("README.md is not beside the tests")
    return README.read_text()


def test_first_lines_are_the_two_commands():
    block = re.search(r"```sh\n(.*?)```", _text(), re.S).group(1).strip().splitlines()
    assert block[0].endswith('pip install ".[bench]" && queue-engine bench')
    assert block[1].endswith('pip install ".[test]" && pytest')
    ci = (README.parent / ".ci" / "run").read_text()
    assert block[1] in ci, ".ci/run must run the README's test command verbatim"


def test_tour_runs(tmp_path, monkeypatch):
    code = re.search(r"```python\n(.*?)```", _text(), re.S).group(1)
    name = f"qe-readme-{uuid.uuid4().hex[:8]}"
    code = code.replace('"orders"', repr(name)).replace('"hits"', repr(name + "-hits"))
    monkeypatch.chdir(tmp_path)
    try:
        exec(compile(code, str(README), "exec"), {"__name__": "readme_tour"})
    finally:
        for p in Path("/dev/shm").glob(f"{name}*"):
            os.unlink(p)
