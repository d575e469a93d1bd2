"""``queue-engine bench``: run the benchmark suite and report it."""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any

EPILOG = """\
examples:
  queue-engine bench                          quick suite (about 2.5 min on 2 cores)
  queue-engine bench --full --json bench.json everything, every raw figure to a file
  queue-engine bench --only ring --markdown   the README table for the ring section
  queue-engine bench --full --plot plots/     PNG charts (needs matplotlib)
  queue-engine bench --check                  quick suite, then its ring, log, saga, txn and
                                              versions cases at the --full volume: do the
                                              quick ratios hold (within x1.3)?
  queue-engine bench --json - | jq .cases     the JSON on stdout (the table goes to stderr)

Throughput is measured in steady state: each run's window starts after a
warm-up and lasts >= 0.25 s; shorter runs are flagged invalid and not ranked.

Peers that are not installed are skipped: pip install "queue-engine[bench]".
The exit status is 1 when any run lost, duplicated or corrupted a message,
3 when --check finds a quick ratio that differs from the full one by > x1.3.
"""


def _positive(text: str) -> int:
    try:
        n = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1: {text!r}")
    return n


def register(sub: Any) -> None:
    """Add the ``bench`` sub-command to the ``queue-engine`` parser."""
    p = sub.add_parser(
        "bench",
        help="benchmark queue-engine against the installed peers (verified, same run)",
        description=(
            "Run every contender on the same workload in the same run, repeat it "
            "interleaved, verify every delivery (count + checksum), and report medians, "
            "spread, latency percentiles and the ratio of queue-engine to the best peer."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--full", action="store_true", help="more messages and repetitions, every sweep")
    p.add_argument("--only", metavar="SECTIONS", help="comma-separated sections, e.g. ring,log")
    p.add_argument(
        "--json",
        metavar="PATH",
        help="write every raw figure and the machine to PATH ('-': stdout, the table to stderr)",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="then rerun the ring, log, saga, txn and versions cases at the --full volume and "
        "report every ratio "
        "that differs from the quick one by more than x1.3",
    )
    p.add_argument(
        "--no-pin",
        action="store_true",
        help="do not pin benchmark processes to CPUs (pinned by default where there are enough)",
    )
    p.add_argument(
        "--markdown",
        metavar="PATH",
        nargs="?",
        const="-",
        help="write the Markdown tables (README) to PATH, or stdout instead of the terminal table",
    )
    p.add_argument(
        "--plot",
        metavar="DIR",
        help="write PNG charts into DIR (needs matplotlib; the size, consumer and thread sweeps run with --full)",
    )
    p.add_argument("--repeat", metavar="N", type=_positive, help="repetitions of every case")
    p.add_argument("--messages", metavar="N", type=_positive, help="messages per case")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress display on stderr")
    p.add_argument("--list", action="store_true", help="list sections and cases, run nothing")
    p.set_defaults(func=main)


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run (for the report captions)."""
    parts = ["queue-engine", "bench"]
    if args.full:
        parts.append("--full")
    if getattr(args, "check", False):
        parts.append("--check")
    if getattr(args, "no_pin", False):
        parts.append("--no-pin")
    for flag in ("only", "repeat", "messages", "json", "plot"):
        value = getattr(args, flag)
        if value is not None:
            parts += [f"--{flag}", str(value)]
    if args.markdown is not None:
        parts += ["--markdown"] + ([args.markdown] if args.markdown != "-" else [])
    return " ".join(shlex.quote(p) for p in parts)


def main(args: argparse.Namespace) -> int:
    """Handler: run, print, write; 1 if any case FAILED, 2 on bad usage."""
    import os

    from engine.bench import harness, peers, report
    from engine.bench.machine import machine_info

    if args.json == "-" and args.markdown == "-":
        print("queue-engine bench: --json - and --markdown - both want stdout", file=sys.stderr)
        return 2
    if args.no_pin:
        os.environ[peers.PIN_ENV] = "0"  # children inherit it

    profile = harness.Profile(full=args.full, messages=args.messages, repeat=args.repeat)
    only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else None
    try:
        sections = harness.load_sections(only)
    except ValueError as exc:
        print(f"queue-engine bench: {exc}", file=sys.stderr)
        return 2
    loaded = {getattr(mod, "__name__", "").rsplit(".", 1)[-1] for _, mod in sections}
    absent = [n for n in (only or []) if n not in loaded]
    if absent:
        print(
            f"queue-engine bench: section(s) not in this build yet: {', '.join(absent)}",
            file=sys.stderr,
        )
        return 2
    if not sections:
        print("queue-engine bench: no benchmark section is available", file=sys.stderr)
        return 2
    if args.list:
        for name, mod in sections:
            print(name)
            for case in mod.cases(profile):
                if not harness.in_profile(mod, case, profile):
                    continue
                names = ", ".join(c.name for c in case.contenders)
                print(
                    f"  {case.name} [{case.kind}, {case.workload.count:,} x {case.workload.size} B]: {names}"
                )
        return 0
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print(
                'queue-engine bench: --plot needs matplotlib (pip install "queue-engine[bench]")',
                file=sys.stderr,
            )
            return 2
    command = _command(args)
    progress = harness.Progress(enabled=not args.quiet)
    # before the run: the load average then is the machine's own background load
    info = machine_info()
    suite = harness.run_suite(profile, progress=progress, sections=sections)
    if args.check:
        check = [(n, m) for n, m in sections if n in harness.CHECK_SECTIONS]
        harness.run_check(suite, check, progress)
        progress.done()
    if args.markdown == "-":
        sys.stdout.write(report.render_markdown(suite, command, info))
    else:
        report.print_terminal(suite, stream=sys.stderr if args.json == "-" else None, info=info)
        if args.markdown:
            with open(args.markdown, "w", encoding="utf-8") as f:
                f.write(report.render_markdown(suite, command, info))
    if args.json:
        report.write_json(suite, args.json, command, info)
        if args.json != "-":
            print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        for path in report.write_plots(suite, args.plot):
            print(f"wrote {path}", file=sys.stderr)
    if suite.failed:
        print(
            "queue-engine bench: FAILED - a contender lost, duplicated or corrupted messages "
            "(see above)",
            file=sys.stderr,
        )
        return 1
    if any(r.ok is False for r in suite.checks):
        print(
            f"queue-engine bench: CHECK - a quick ratio differs from the --full one by more "
            f"than x{harness.CHECK_FACTOR:g} (see above)",
            file=sys.stderr,
        )
        return 3
    return 0
