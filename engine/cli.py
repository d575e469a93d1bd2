"""The ``queue-engine`` command (also ``python -m engine``).

Each tool module defines ``register(subparsers)``, which adds its sub-command
and sets ``func`` (called with the parsed arguments, returning an exit code).
The command modules import the compiled core only inside their handlers, so
``queue-engine --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

# sub-command modules, in the order --help lists them
TOOLS = (
    "engine.bench.cli",
    "engine.ringtool",
    "engine.logtool",
    "engine.countertool",
    "engine.bridgetool",
    "engine.sagatool",
    "engine.txntool",
    "engine.statstool",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="queue-engine",
        description="Embedded queue engine: benchmark it, inspect rings, logs and counters.",
    )
    from engine import __version__

    parser.add_argument("--version", action="version", version=f"queue-engine {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in TOOLS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            # Only a partial source tree lacks a tool module; tests/test_cli.py
            # checks that an installed package has every one of them.
            if exc.name != name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `queue-engine log dump | head`: the reader went away; not an error.
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
