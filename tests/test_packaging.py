"""What the installed distribution says about itself is true."""

from __future__ import annotations

import importlib.metadata as md
import json

import pytest

import engine


def test_version_has_one_source():
    assert md.version("queue-engine") == engine.__version__


def test_metadata_claims_only_what_is_tested():
    meta = md.metadata("queue-engine")
    assert meta["License-Expression"] == "MIT"
    classifiers = meta.get_all("Classifier")
    assert "Typing :: Typed" in classifiers
    assert [c for c in classifiers if c.startswith("Operating System")] == [
        "Operating System :: POSIX :: Linux"
    ]
    assert not any("MacOS" in c or "Windows" in c for c in classifiers)
    assert meta.get_all("Project-URL")


def test_typed_marker_and_stubs_ship():
    direct = md.distribution("queue-engine").read_text("direct_url.json")
    if direct and json.loads(direct).get("dir_info", {}).get("editable"):
        pytest.skip("an editable install lists no package files (CI installs the wheel)")
    files = {str(f) for f in md.files("queue-engine") or ()}
    assert "engine/py.typed" in files
    for mod in (
        "_ring", "_log", "_counter", "_sched", "_txn", "_versions", "_mpq", "_benchdigest", "_saga",
    ):
        assert f"engine/{mod}.pyi" in files, mod
