"""Consumer-group administration: ``queue-engine log groups ls|describe|reset``
over engine.logadmin, and the use lock that makes a reset refuse while a
reader of the group is open in any process."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

import engine
from engine import logadmin
from engine.errors import EngineError


def _log(tmp_path, n=10):
    path = str(tmp_path / "log")
    with engine.Log(path, durability="none") as log:
        for i in range(n):
            log.append(b"v%d" % i)
    return path


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "engine", "log", "groups", *args],
                          capture_output=True, text=True, timeout=60)


def test_reset_moves_the_group_and_its_next_read(tmp_path):
    path = _log(tmp_path)
    with engine.LogReader(path, group="g") as r:
        for _ in range(7):
            next(iter(r))
        r.commit()
    assert logadmin.describe_group(path, "g")["committed"] == 7
    assert logadmin.reset_group(path, "g", to_offset=2) == 2
    with engine.LogReader(path, group="g") as r:
        assert bytes(next(iter(r)).value) == b"v2"
    assert logadmin.reset_group(path, "g", to_end=True) == 10
    with engine.LogReader(path, group="g") as r:
        assert r.poll(timeout=0) is None


def test_reset_to_time(tmp_path):
    path = str(tmp_path / "log")
    with engine.Log(path, durability="none") as log:
        log.append(b"old")
        time.sleep(0.01)
        cut = time.time_ns()
        time.sleep(0.01)
        log.append(b"new")
    assert logadmin.reset_group(path, "g", to_time=cut) == 1
    assert logadmin.reset_group(path, "g", to_time=time.time_ns() + 10**9) == 2


def test_reset_refuses_while_a_reader_of_the_group_is_open_in_another_process(tmp_path):
    path = _log(tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, engine; r = engine.LogReader(sys.argv[1], group='g'); "
         "print('open', flush=True); sys.stdin.read()", path],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        assert logadmin.describe_group(path, "g")["in_use"] is True
        with pytest.raises(EngineError, match="in use"):
            logadmin.reset_group(path, "g", to_offset=0)
        proc = _cli("reset", path, "g", "--to-offset", "0")
        assert proc.returncode == 1 and "in use" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
        # another group of the same log is free
        assert logadmin.reset_group(path, "other", to_offset=3) == 3
    finally:
        holder.stdin.close()
        holder.wait(10)
    assert logadmin.describe_group(path, "g")["in_use"] is False
    assert logadmin.reset_group(path, "g", to_offset=4) == 4


def test_a_reader_dropped_without_close_lets_go_of_its_group(tmp_path):
    path = _log(tmp_path)
    r = engine.LogReader(path, group="g")
    assert logadmin.describe_group(path, "g")["in_use"]
    del r
    assert not logadmin.describe_group(path, "g")["in_use"]


def test_cli_ls_describe_reset(tmp_path):
    path = _log(tmp_path)
    with engine.LogReader(path, group="billing") as r:
        next(iter(r))
        r.commit()
    ls = _cli("ls", path, "--json")
    assert ls.returncode == 0
    rows = [json.loads(line) for line in ls.stdout.splitlines()]
    assert rows == [{"group": "billing", "committed": 1, "lag": 9}]
    desc = _cli("describe", path, "billing", "--json")
    assert json.loads(desc.stdout)["in_use"] is False
    reset = _cli("reset", path, "billing", "--to-end", "--json")
    assert reset.returncode == 0 and json.loads(reset.stdout)["offset"] == 10
    assert _cli("reset", path, "billing").returncode == 2  # no target: usage error
    bad = _cli("reset", path, "bad/name", "--to-offset", "1")
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1
    missing = _cli("describe", str(tmp_path / "nothing"), "g")
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
