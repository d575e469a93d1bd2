"""The installed command: every sub-command registers, fails in one line,
and documents its options."""

from __future__ import annotations

import subprocess
import sys

import pytest

from engine import cli


@pytest.mark.parametrize("module", cli.TOOLS)
def test_every_tool_module_is_installed(module):
    __import__(module)


def test_help_lists_every_command():
    out = subprocess.run(
        [sys.executable, "-m", "engine", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in ("bench", "ring", "log", "counter", "bridge", "saga", "txn", "stats"):
        assert command in out


def test_unknown_command_fails_cleanly():
    proc = subprocess.run(
        [sys.executable, "-m", "engine", "no-such-command"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "invalid choice" in proc.stderr


def _actions(parser):
    """Every (sub-)parser below ``parser`` with its name path."""
    import argparse

    out = [((), parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += [((name, *path), p) for path, p in _actions(sub)]
    return out


def test_every_option_has_help_and_shows_its_default():
    import argparse

    missing = []
    for path, parser in _actions(cli.build_parser()):
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction,
                                   argparse._SubParsersAction)):
                continue
            if not action.help:
                missing.append(" ".join(path) + " " + "/".join(action.option_strings or [action.dest]))
    assert missing == []
    help_text = subprocess.run(
        [sys.executable, "-m", "engine", "txn", "ls", "--help"],
        capture_output=True, text=True, check=True,
    ).stdout
    assert "(default: 20)" in " ".join(help_text.split())


_MISSING = "/nonexistent/queue-engine-test/nothing-here"


# every command that reads a path or a name, run against one that does not exist
MISSING_CASES = [
    ["log", "dump", _MISSING],
    ["log", "verify", _MISSING],
    ["log", "stats", _MISSING],
    ["log", "tail", _MISSING, "--count", "1"],
    ["log", "repair", _MISSING, "--truncate"],
    ["ring", "stats", "qe-test-no-such-ring"],
    ["ring", "unlink", "qe-test-no-such-ring"],
    ["counter", "show", "qe-test-no-such-counter"],
    ["saga", "ls", _MISSING],
    ["txn", "ls", _MISSING],
    ["stats", "--no-rings", _MISSING],
]


def _run(args, **kw):
    return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True,
                          text=True, timeout=60, **kw)


@pytest.mark.parametrize("args", MISSING_CASES, ids=lambda a: " ".join(a[:2]))
def test_missing_path_is_one_line_and_exit_1(args):
    proc = _run(args)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[0].startswith("queue-engine ")


def _bad_inputs(tmp):
    notlog = tmp / "not-a-log"
    notlog.mkdir()
    (notlog / "meta").write_text("this is not a log's meta file")
    (notlog / "00000000000000000000.seg").write_bytes(b"\xff" * 4096)
    junk = tmp / "junk.txn"
    junk.mkdir()
    (junk / "CURRENT").write_text("{not json")
    return [
        ["log", "dump", str(notlog)],
        ["log", "verify", str(notlog)],
        ["log", "stats", str(notlog)],
        ["log", "repair", str(notlog), "--truncate"],
        ["saga", "ls", str(notlog)],
        ["txn", "ls", str(junk)],
        ["ring", "stats", "../escape"],
        ["counter", "show", "../escape"],
        ["stats", "--no-rings", str(notlog)],
    ]


def test_bad_input_is_one_line_and_exit_1(tmp_path):
    for args in _bad_inputs(tmp_path):
        proc = _run(args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1, (args, proc.returncode, proc.stderr)
        assert len(lines) == 1 and "Traceback" not in proc.stderr, (args, proc.stderr)


def test_verbose_shows_library_log_messages(tmp_path, monkeypatch):
    import logging

    seen = []
    configure = cli._configure_logging
    monkeypatch.setattr(cli, "_configure_logging", lambda v: seen.append(v))
    cli.main(["-vv", "ring", "ls", "--json"])
    assert seen == [2]
    configure(1)
    try:
        assert logging.getLogger("engine").getEffectiveLevel() == logging.INFO
    finally:
        log = logging.getLogger("engine")
        for h in list(log.handlers):
            if isinstance(h, logging.StreamHandler) and h.stream is sys.stderr:
                log.removeHandler(h)
        log.setLevel(logging.NOTSET)


def test_json_means_json_objects_on_stdout(tmp_path, shm_name):
    """``--json`` everywhere: stdout is JSON objects, one per line (a single
    object for a report, one per item for a listing or a stream)."""
    import json

    import engine

    log_dir = str(tmp_path / "log")
    with engine.Log(log_dir, durability="none") as log:
        log.append_many([b"a", b"b", b"c"])
    ring = engine.Ring.create(shm_name, 8192)
    counter = engine.ShardedCounter.create(shm_name + "-c", shards=2)
    try:
        cases = [
            ["log", "dump", log_dir, "--json"],
            ["log", "verify", log_dir, "--json"],
            ["log", "stats", log_dir, "--json"],
            ["ring", "ls", "--json"],
            ["ring", "stats", shm_name, "--json"],
            ["counter", "ls", "--json"],
            ["counter", "show", shm_name + "-c", "--json"],
        ]
        for args in cases:
            proc = _run(args)
            assert proc.returncode == 0, (args, proc.stderr)
            lines = proc.stdout.splitlines()
            assert lines, args
            for line in lines:
                assert isinstance(json.loads(line), dict), (args, line)
    finally:
        counter.close()
        engine.ShardedCounter.unlink(shm_name + "-c")
        ring.close()
        engine.Ring.unlink(shm_name)
