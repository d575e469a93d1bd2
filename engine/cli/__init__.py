"""The ``queue-engine`` command (also ``python -m engine``).

A thin layer over library functions: each module here defines
``register(subparsers)``, which adds one sub-command and sets ``func`` (called
with the parsed arguments, returning an exit code).  The modules import the
compiled core only inside their handlers, so ``queue-engine --help`` is
instant.

Exit status: 0 on success, 1 when the command failed (one line on stderr,
never a traceback), 2 for a usage error; some commands document a status of
their own (3: something needs attention).  ``--json`` always means JSON on
stdout: one object, or one object per line where the output is a stream or a
listing.  ``-v`` / ``-vv`` show the library's log messages (recovery, the
bridge) on stderr.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
from typing import Any, Optional, Sequence

# sub-command modules, in the order --help lists them
TOOLS = (
    "engine.bench.cli",
    "engine.cli.ring",
    "engine.cli.log",
    "engine.cli.counter",
    "engine.cli.bridge",
    "engine.cli.saga",
    "engine.cli.txn",
    "engine.cli.stats",
    "engine.cli.backup",
    "engine.cli.dlq",
)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default (unless the help already
    says what the default means); descriptions keep their lines."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "default" in text
            or action.default in (None, False, argparse.SUPPRESS)
            or (not action.option_strings and action.nargs not in ("?", "*"))
        ):
            return text
        return text + " (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """The parser of every (sub-)command: sub-parsers inherit its class."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    from engine import __version__

    parser = _Parser(
        prog="queue-engine",
        description="Embedded queue engine: benchmark it, inspect rings, logs, counters, "
        "transactions and sagas.",
    )
    parser.add_argument("--version", action="version", version=f"queue-engine {__version__}")
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="show the library's log messages on stderr: -v info, -vv debug "
        "(warnings are always shown)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in TOOLS:
        importlib.import_module(name).register(sub)
    return parser


def _configure_logging(verbose: int) -> None:
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("queue-engine: %(levelname)s %(name)s: %(message)s"))
    log = logging.getLogger("engine")
    log.addHandler(handler)
    log.setLevel(level)


def when_utc(ns: int) -> str:
    """A wall-clock time in ns as ``YYYY-MM-DD HH:MM:SSZ`` (``-`` for 0)."""
    if not ns:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ns / 1e9)) + "Z"


def error_line(exc: BaseException) -> str:
    """``exc`` as one line for a user: what failed and, for a file, which."""
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        return f"this needs the Python package {exc.name!r}, which is not installed"
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        text = f"{exc.strerror}: {exc.filename}"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def main(argv: Optional[Sequence[str]] = None) -> int:
    from engine.errors import EngineError

    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `queue-engine log dump | head`: the reader went away; not an error.
        sys.stderr.close()
        return 0
    except (EngineError, OSError, ValueError, TypeError, ImportError) as exc:
        print(f"queue-engine {args.command}: {error_line(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
