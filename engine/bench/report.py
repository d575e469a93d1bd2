"""Render a :class:`~engine.bench.harness.SuiteResult`: terminal table, JSON
(stable schema, ``schema_version``), Markdown for the README, PNG plots.

JSON schema (``schema_version`` 1; keys are only ever added, never renamed)::

    {
      "schema_version": 1, "tool": "queue-engine bench", "command": str,
      "profile": {"name": "quick"|"full", "full": bool, "messages": int|null, "repeat": int|null},
      "started": ISO-8601 UTC str, "seconds": float, "ok": bool,
      "latency_backend": "hdrhistogram"|"numpy-log-linear",
      "machine": {"cpu_model", "cpu_count", "usable_cpus", "machine", "system", "kernel",
                  "platform", "python", "python_implementation", "engine_version",
                  "packages": {dist: version|null}, "loadavg",
                  "thread_wake_us": {"cross_cpu": float|null, "same_cpu": float|null},
                  "free_page_reporting": "on"|"off"|"no virtio balloon"},
      "skipped": [str], "errors": [str],
      "min_window_s": float, "pinning": str, "notes": [str],
      "check": [{"section", "case", "quick_ratio", "full_ratio", "factor", "ok",  # --check
                 "quick_ratio_spread", "full_ratio_spread", "full_contenders": [...]}],
      "cases": [{
        "section", "name", "description", "kind": "throughput"|"latency", "unit",
        "ordered": bool, "params": {...},
        "workload": {"count", "size", "seed", "bytes", "checksum"},
        "buffer_bytes": int,
        "verified": bool, "failed": bool,
        "best_ours": str|null, "best_peer": str|null, "ratio": float|null,
        "ratio_spread": {"median", "min", "max", "q1", "q3"}|null,  # per repetition
        "targets": [{"target": str, "kind": str, "required": float, "peer": str|null,
                     "measured": float|null, "met": bool|null}],
        "contenders": [{
          "name", "ours": bool, "status": "ok"|"FAILED"|"skipped", "reason": str|null,
          "msg_per_s": {"median", "min", "max", "q1", "q3"},   # float|null each
          "mb_per_s":  {"median", "min", "max", "q1", "q3"},
          "latency_ns": {"p50", "p90", "p99", "p99_9", "max", "min", "samples"}|null,
          "rank": bool, "workload_count": int, "valid_runs": int,
          "window": {"seconds": {spread}, "messages": {spread}},
          "runs": [{"rep", "seconds", "count", "checksum", "in_order", "ok", "error",
                    "latency_ns": {"p50", "p90", "p99", "p99_9", "max"}|null,
                    "msg_per_s", "mb_per_s", "window_seconds", "window_count", "valid",
                    "reused": bool}],  # reused: rep 0 is the last warm-up run (also in warmups)
          "warmups": [the same as runs; rep -1, -2]
        }]
      }]
    }
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional, TextIO

from engine.bench.harness import (
    FAILED,
    LATENCY,
    OK,
    SCHEMA_VERSION,
    SKIPPED,
    VOLUME_FACTOR,
    CaseResult,
    ContenderResult,
    LatencyHistogram,
    RunRecord,
    SuiteResult,
)
from engine.bench.machine import machine_info, machine_line
from engine.bench.peers import cpu_plan, pinning

# ---------------------------------------------------------------------------
# number formatting
# ---------------------------------------------------------------------------


def _si(x: float) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    for div, suf in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suf}"
    return f"{x:.3g}"


def _us(ns: Optional[float]) -> str:
    if ns is None or not math.isfinite(ns):
        return "-"
    us = ns / 1000.0
    if us >= 100:
        return f"{us:.0f}"
    return f"{us:.3g}" if us >= 1 else f"{us:.2f}"


def _mb(x: float) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    if x >= 1000:
        return f"{x / 1000:.3g} GB/s"
    return f"{x:.3g} MB/s"


def _ratio(r: Optional[float]) -> str:
    if r is None or not math.isfinite(r):
        return "-"
    return f"{r:.3g}x" if r < 100 else f"{r:.0f}x"


def _size(n: int) -> str:
    if n >= 1024 and n % 1024 == 0:
        return f"{n // 1024} KiB"
    return f"{n} B"


def _measured(t: Dict[str, Any]) -> str:
    m = t["measured"]
    if m is None:
        return "-"
    if t["kind"] == "ratio":
        return _ratio(m)
    if t["kind"] == "min_mb_per_s":
        return _mb(m)
    if t["kind"] == "min_msg_per_s":
        return _si(m) + " msg/s"
    return _us(m) + " us"


def _met(t: Dict[str, Any]) -> str:
    return {True: "met", False: "NOT MET", None: "not measured"}[t["met"]]


def _verdict(cr: CaseResult) -> str:
    if cr.failed:
        return "FAILED"
    if cr.verified:
        return "verified"
    return "not run"


def _spread_text(cr: CaseResult) -> str:
    sp = cr.ratio_spread()
    if not sp:
        return ""
    return f" ({_ratio(sp['min'])}-{_ratio(sp['max'])} across repetitions)"


def _ratio_note(cr: CaseResult) -> str:
    r = cr.ratio
    bo, bp = cr.best_ours, cr.best_peer
    if r is None or bo is None or bp is None:
        return "no ratio (ours or every ranked peer missing or invalid)"
    if r >= 1:
        return f"ours {_ratio(r)}{_spread_text(cr)} vs best peer {bp.name}"
    return f"ours LOSES: {_ratio(r)}{_spread_text(cr)} of best peer {bp.name}"


def pinning_line() -> str:
    """How the benchmark's processes are placed, for the report."""
    if not pinning():
        return "CPU pinning: off (--no-pin)"
    if cpu_plan(2)[0] is None:
        return "CPU pinning: off (fewer than 2 usable CPUs)"
    return (
        "CPU pinning: each process of a multi-process case on its own CPU while there are "
        "enough CPUs (2 processes on 2 cores: one each), for repeatable runs"
    )


def _display_name(c: ContenderResult) -> str:
    return c.name + ("" if c.rank else " (reference, not ranked)")


# ---------------------------------------------------------------------------
# terminal
# ---------------------------------------------------------------------------


def _count(c: ContenderResult, cr: CaseResult) -> int:
    return (c.workload or cr.case.workload).count


def _throughput_cells(cr: CaseResult, c: ContenderResult, min_window: float) -> List[str]:
    if c.status == SKIPPED:
        return ["skipped", "", "", "", "", ""]
    if c.status == FAILED and not c.ok_runs():
        return ["FAILED", "", "", "", "", ""]
    rates = c.rates(cr.case.workload.size)
    m, b = rates["msg_per_s"], rates["mb_per_s"]
    w = c.windows()
    window = f"{w['seconds']['median']:.3g} s / {_si(w['messages']['median'])}"
    valid = len(c.valid_runs())
    head = _si(m["median"]) + ("" if c.status == OK else " FAILED")
    if not valid and c.rank:
        head = f"INVALID (window < {min_window:g} s)"
    elif not valid:
        valid = len(c.ok_runs())  # a reference row: shown whatever its window
        head += " (short window)"
    return [
        head,
        _mb(b["median"]) if valid else "",
        f"{_si(m['min'])}-{_si(m['max'])}" if valid else "",
        window,
        f"{_count(c, cr):,}",
        f"{valid}/{len(c.ok_runs())}",
    ]


def _latency_cells(c: ContenderResult) -> List[str]:
    if c.status == SKIPPED:
        return ["skipped", "", "", "", "", ""]
    lat = c.latency()
    if not c.ok_runs() or not lat:
        return ["FAILED", "", "", "", "", ""]
    return [
        _us(lat["p50"]) + ("" if c.status == OK else " FAILED"),
        _us(lat["p90"]),
        _us(lat["p99"]),
        _us(lat["p99_9"]),
        _us(lat["max"]),
        f"{int(lat['samples'])}",
    ]


def _table(rows: List[List[str]], indent: str = "  ") -> List[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for r in rows:
        cells = [r[0].ljust(widths[0])] + [r[i].rjust(widths[i]) for i in range(1, len(r))]
        out.append(indent + "  ".join(cells).rstrip())
    return out


def render_terminal(
    suite: SuiteResult, color: Optional[bool] = None, info: Optional[Dict[str, Any]] = None
) -> str:
    """The human-readable table (ours rows start with ``*``; ratios against
    the best peer, bold on a colour terminal; a loss says ``LOSES``)."""
    if color is None:
        color = sys.stdout.isatty() and os.environ.get("NO_COLOR") is None
    bold = (lambda s: f"\x1b[1m{s}\x1b[0m") if color else (lambda s: s)
    red = (lambda s: f"\x1b[1;31m{s}\x1b[0m") if color else (lambda s: s)
    lines = [
        f"queue-engine bench ({suite.profile.name}) on {machine_line(info)}",
        "every run verified: message count + order-independent checksum of every payload",
        f"throughput: steady-state windows after a warm-up, >= {suite.profile.min_window:g} s "
        f"(or {VOLUME_FACTOR}x the largest buffer) to rank; {pinning_line()}",
        "",
    ]
    section = None
    for cr in suite.cases:
        if cr.section != section:
            section = cr.section
            lines.append(bold(f"== {section} =="))
        wl = cr.case.workload
        reps = max((len(c.runs) for c in cr.contenders), default=0)
        verdict = _verdict(cr)
        verdict = red(verdict) if cr.failed else verdict
        note = _ratio_note(cr)
        note = red(note) if "LOSES" in note else bold(note)
        lines.append(
            f"{cr.case.name}: {cr.case.description} "
            f"[{_size(wl.size)} messages, {reps} reps] {verdict}; {note}"
        )
        if cr.case.kind == LATENCY:
            rows = [["contender", "p50 us", "p90 us", "p99 us", "p99.9 us", "max us", "samples"]]
            for c in cr.contenders:
                rows.append([("* " if c.ours else "  ") + _display_name(c)] + _latency_cells(c))
        else:
            rows = [
                [
                    "contender",
                    "msg/s",
                    "bandwidth",
                    "min-max msg/s",
                    "window (median)",
                    "messages",
                    "valid runs",
                ]
            ]
            for c in cr.contenders:
                rows.append(
                    [("* " if c.ours else "  ") + _display_name(c)]
                    + _throughput_cells(cr, c, suite.profile.min_window)
                )
        lines.extend(_table(rows))
        for c in cr.contenders:
            if c.status == FAILED:
                lines.append(red(f"  FAILED {c.name}: {c.reason}"))
        for t in cr.target_results():
            line = f"  target {t['target']}: {_measured(t)} {_met(t)}"
            lines.append(bold(line) if t["met"] else red(line) if t["met"] is False else line)
        lines.append("")
    for s in suite.skipped:
        lines.append(s)
    for e in suite.errors:
        lines.append(red(e))
    n_fail = sum(1 for c in suite.cases if c.failed) + len(suite.errors)
    for note in suite.notes:
        lines.append(note)
    lines.append(
        f"{len(suite.cases)} cases in {suite.seconds:.1f} s: "
        + (red(f"{n_fail} FAILED") if n_fail else "all verified")
        + "  (* = queue-engine; ratio = ours / best peer, > 1 is a win)"
    )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# JSON
# ---------------------------------------------------------------------------


def _num(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _clean(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return _num(obj)


def _run_json(r: RunRecord, size: int) -> Dict[str, Any]:
    rate = r.rate() if r.ok else math.nan
    return {
        "rep": r.rep,
        "seconds": r.seconds,
        "count": r.count,
        "checksum": r.checksum,
        "in_order": r.in_order,
        "ok": r.ok,
        "error": r.error,
        "latency_ns": r.latency_ns,
        "msg_per_s": rate,
        "mb_per_s": rate * size / 1e6,
        "window_seconds": r.window_seconds,
        "window_count": r.window_count,
        "valid": r.valid,
        "reused": r.reused,
    }


def _contender_json(cr: CaseResult, c: ContenderResult) -> Dict[str, Any]:
    size = cr.case.workload.size
    rates = c.rates(size)
    return {
        "name": c.name,
        "ours": c.ours,
        "status": c.status,
        "reason": c.reason,
        "msg_per_s": rates["msg_per_s"],
        "mb_per_s": rates["mb_per_s"],
        "latency_ns": c.latency(),
        "rank": c.rank,
        "workload_count": _count(c, cr),
        "valid_runs": len(c.valid_runs()),
        "window": c.windows(),
        "runs": [_run_json(r, size) for r in c.runs],
        "warmups": [_run_json(r, size) for r in c.warmups],
    }


def to_json(
    suite: SuiteResult, command: Optional[str] = None, info: Optional[Dict[str, Any]] = None
) -> Dict[str, Any]:
    """The whole suite as a JSON-ready dict (see the module docstring)."""
    cases = []
    for cr in suite.cases:
        wl = cr.case.workload
        bo, bp = cr.best_ours, cr.best_peer
        cases.append(
            {
                "section": cr.section,
                "name": cr.case.name,
                "description": cr.case.description,
                "kind": cr.case.kind,
                "unit": cr.case.unit,
                "ordered": cr.case.ordered,
                "params": dict(cr.case.params),
                "workload": {
                    "count": wl.count,
                    "size": wl.size,
                    "seed": wl.seed,
                    "bytes": wl.nbytes,
                    "checksum": wl.expected.checksum,
                },
                "buffer_bytes": cr.case.buffer_bytes,
                "verified": cr.verified,
                "failed": cr.failed,
                "best_ours": bo.name if bo else None,
                "best_peer": bp.name if bp else None,
                "ratio": cr.ratio,
                "ratio_spread": cr.ratio_spread(),
                "targets": cr.target_results(),
                "contenders": [_contender_json(cr, c) for c in cr.contenders],
            }
        )
    p = suite.profile
    return _clean(
        {
            "schema_version": SCHEMA_VERSION,
            "tool": "queue-engine bench",
            "command": command if command is not None else " ".join(sys.argv),
            "profile": {"name": p.name, "full": p.full, "messages": p.messages, "repeat": p.repeat},
            "started": time.strftime(
                "%Y-%m-%dT%H:%M:%SZ", time.gmtime(suite.started_wall or time.time())
            ),
            "seconds": suite.seconds,
            "ok": not suite.failed,
            "latency_backend": LatencyHistogram().backend,
            "machine": info if info is not None else machine_info(),
            "skipped": list(suite.skipped),
            "errors": list(suite.errors),
            "min_window_s": p.min_window,
            "pinning": pinning_line(),
            "notes": list(suite.notes),
            "check": [
                {
                    "section": r.section,
                    "case": r.case,
                    "quick_ratio": r.quick,
                    "full_ratio": r.full,
                    "factor": r.factor,
                    "ok": r.ok,
                    "quick_ratio_spread": r.quick_result.ratio_spread() if r.quick_result else None,
                    "full_ratio_spread": r.full_result.ratio_spread() if r.full_result else None,
                    "full_contenders": (
                        [_contender_json(r.full_result, c) for c in r.full_result.contenders]
                        if r.full_result
                        else []
                    ),
                }
                for r in suite.checks
            ],
            "cases": cases,
        }
    )


def write_json(
    suite: SuiteResult,
    path: str,
    command: Optional[str] = None,
    info: Optional[Dict[str, Any]] = None,
) -> None:
    data = to_json(suite, command, info)
    if path == "-":
        json.dump(data, sys.stdout, indent=1, allow_nan=False)
        sys.stdout.write("\n")
        sys.stdout.flush()
        return
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|")


def render_markdown(
    suite: SuiteResult, command: Optional[str] = None, info: Optional[Dict[str, Any]] = None
) -> str:
    """Tables for the README: throughput and latency, ours in bold, the ratio
    against the best peer in bold on our row (a loss says so)."""
    cmd = command if command is not None else "queue-engine bench"
    out = [
        f"Measured with `{cmd}` on {machine_line(info)}; "
        f"{suite.profile.name} profile, medians of interleaved repetitions, "
        "every run verified (count + checksum). Throughput is the steady state: each run's "
        f"window starts after a warm-up and lasts >= {suite.profile.min_window:g} s (or moves "
        f"{VOLUME_FACTOR}x the largest buffer); the ratio's range is its spread across "
        f"repetitions. {pinning_line()}.",
        "",
    ]
    thr = [cr for cr in suite.cases if cr.case.kind != LATENCY]
    lat = [cr for cr in suite.cases if cr.case.kind == LATENCY]
    if thr:
        out += [
            "| Case | Contender | Messages | Window (median) | msg/s (median) | bandwidth | spread (min-max msg/s) | vs best peer (range) |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for cr in thr:
            wl = cr.case.workload
            first = True
            for c in cr.contenders:
                if c.status == SKIPPED:
                    continue
                case_cell = f"{_md_escape(cr.section)}: {_md_escape(cr.case.name)}" if first else ""
                if first and cr.failed:
                    case_cell += " **FAILED**"
                first = False
                name = _md_escape(_display_name(c))
                name = f"**{name}**" if c.ours else name
                count_cell = f"{_count(c, cr):,} x {_size(wl.size)}"
                if c.status == FAILED:
                    out.append(f"| {case_cell} | {name} | {count_cell} | | FAILED | | | |")
                    continue
                w = c.windows()["seconds"]["median"]
                rates = c.rates(wl.size)
                m, b = rates["msg_per_s"], rates["mb_per_s"]
                ratio = ""
                if c.ours and cr.best_ours is c and cr.ratio is not None:
                    ratio = f"**{_ratio(cr.ratio)}**" + (" (loses)" if cr.ratio < 1 else "")
                    sp = cr.ratio_spread()
                    if sp:
                        ratio += f" ({_ratio(sp['min'])}-{_ratio(sp['max'])})"
                if not c.valid_runs() and c.rank:
                    out.append(
                        f"| {case_cell} | {name} | {count_cell} | {w:.3g} s | invalid (short window) | | | |"
                    )
                    continue
                out.append(
                    f"| {case_cell} | {name} | {count_cell} | {w:.3g} s | {_si(m['median'])} | "
                    f"{_mb(b['median'])} | {_si(m['min'])}-{_si(m['max'])} | {ratio} |"
                )
        out.append("")
    if lat:
        out += [
            "| Latency case | Contender | samples | p50 µs | p90 µs | p99 µs | p99.9 µs | max µs | vs best peer (p50) |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for cr in lat:
            first = True
            for c in cr.contenders:
                if c.status == SKIPPED:
                    continue
                case_cell = f"{_md_escape(cr.section)}: {_md_escape(cr.case.name)}" if first else ""
                if first and cr.failed:
                    case_cell += " **FAILED**"
                first = False
                name = _md_escape(_display_name(c))
                name = f"**{name}**" if c.ours else name
                s = c.latency()
                if c.status == FAILED or not s:
                    out.append(f"| {case_cell} | {name} | | FAILED | | | | | |")
                    continue
                ratio = ""
                if c.ours and cr.best_ours is c and cr.ratio is not None:
                    ratio = f"**{_ratio(cr.ratio)}**" + (" (loses)" if cr.ratio < 1 else "")
                    sp = cr.ratio_spread()
                    if sp:
                        ratio += f" ({_ratio(sp['min'])}-{_ratio(sp['max'])})"
                out.append(
                    f"| {case_cell} | {name} | {int(s['samples']):,} | {_us(s['p50'])} | "
                    f"{_us(s['p90'])} | {_us(s['p99'])} | {_us(s['p99_9'])} | {_us(s['max'])} | {ratio} |"
                )
        out.append("")
    targets = [(cr, t) for cr in suite.cases for t in cr.target_results()]
    if targets:
        out += ["| Target | Case | Measured | |", "|---|---|---:|---|"]
        for cr, t in targets:
            met = {True: "met", False: "**not met**", None: "not measured"}[t["met"]]
            out.append(
                f"| {_md_escape(t['target'])} | {_md_escape(cr.section)}: {_md_escape(cr.case.name)} "
                f"| {_measured(t)} | {met} |"
            )
        out.append("")
    for note in suite.notes:
        out.append(note)
        out.append("")
    if suite.skipped:
        out.append(
            "Not installed here: "
            + "; ".join(s.replace("skipped: ", "") for s in suite.skipped)
            + "."
        )
        out.append("")
    return "\n".join(out)


# ---------------------------------------------------------------------------
# plots (matplotlib, Agg, imported only here)
# ---------------------------------------------------------------------------


def write_plots(suite: SuiteResult, directory: str) -> List[str]:
    """PNG charts: throughput by message size (log-log), latency percentiles
    (log y), scaling with consumers and with threads. Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    os.makedirs(directory, exist_ok=True)
    written: List[str] = []

    def grouped(pred: Callable[[CaseResult], bool]) -> Dict[str, List[CaseResult]]:
        groups: Dict[str, List[CaseResult]] = {}
        for cr in suite.cases:
            if pred(cr) and cr.case.kind != LATENCY:
                groups.setdefault(str(cr.case.params.get("group", cr.section)), []).append(cr)
        return groups

    def sweep(kind: str) -> Dict[str, List[CaseResult]]:
        return grouped(lambda cr: cr.case.params.get("sweep") == kind)

    def series(
        crs: List[CaseResult],
        key: str,
        x_of: Callable[[CaseResult], Any] = lambda cr: cr.case.params.get("x"),
        name_of: Callable[[Any], str] = lambda c: c.name,
    ) -> Dict[str, List[tuple]]:
        """name -> [(x, median, min, max, ours)] of the ranked contenders' ``key`` rate."""
        out: Dict[str, List[tuple]] = {}
        for cr in crs:
            x = x_of(cr)
            for c in cr.contenders:
                if c.status != OK or not c.valid_runs() or not c.rank:
                    continue
                r = c.rates(cr.case.workload.size)[key]
                out.setdefault(name_of(c), []).append((x, r["median"], r["min"], r["max"], c.ours))
        return out

    def draw(ax: Any, by_name: Dict[str, List[tuple]]) -> None:
        """One line per contender: medians with min-max bars, ours drawn thicker."""
        for name, pts in by_name.items():
            pts.sort()
            ax.errorbar(
                [p[0] for p in pts],
                [p[1] for p in pts],
                yerr=[[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]],
                marker="o",
                capsize=3,
                label=name,
                linewidth=2.5 if pts[0][4] else 1.2,
            )

    # throughput by message size
    for group, crs in sweep("size").items():
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
        for ax, key, label in (
            (ax1, "mb_per_s", "throughput (MB/s)"),
            (ax2, "msg_per_s", "messages per second"),
        ):
            draw(ax, series(crs, key))
            ax.set_xscale("log", base=2)
            ticks = sorted({int(cr.case.params.get("x", 0)) for cr in crs})
            ax.set_xticks(ticks)
            ax.set_xticklabels([_size(t).replace(" ", "\u202f") for t in ticks], fontsize=8)
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.set_yscale("log")
            ax.set_xlabel("message size (log scale)")
            ax.set_ylabel(label + ", log scale")
            ax.grid(True, which="both", alpha=0.3)
        ax1.legend(fontsize=8)
        fig.suptitle(f"{group}: throughput by message size (median, min-max bars)")
        fig.tight_layout()
        path = os.path.join(directory, f"throughput_by_size_{_slug(group)}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    # scaling with consumers
    for group, crs in sweep("consumers").items():
        fig, ax = plt.subplots(figsize=(7, 4.8))
        draw(ax, series(crs, "msg_per_s"))
        ax.set_yscale("log")
        ax.set_xlabel("consumer processes")
        ax.set_ylabel("messages per second (total, log scale)")
        ax.set_xticks(sorted({int(cr.case.params.get("x", 0)) for cr in crs}))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(f"{group}: scaling with consumers (median, min-max bars)")
        fig.tight_layout()
        path = os.path.join(directory, f"scaling_consumers_{_slug(group)}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    # scaling with threads (cases with params {"threads": n, "group": ...})
    for group, crs in grouped(lambda cr: "threads" in cr.case.params).items():
        if len(crs) < 2:
            continue  # one point is no curve (the quick profile runs one case)
        fig, ax = plt.subplots(figsize=(7, 4.8))
        # one series per peer across cases (ours carries the thread count in its name)
        draw(
            ax,
            series(
                crs,
                "msg_per_s",
                x_of=lambda cr: int(cr.case.params["threads"]),
                name_of=lambda c: "queue-engine" if c.ours else c.name,
            ),
        )
        ax.set_xscale("log", base=2)
        ticks = sorted({int(cr.case.params["threads"]) for cr in crs})
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(t) for t in ticks])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_yscale("log")
        ax.set_xlabel("threads (log scale)")
        ax.set_ylabel("transactions per second (log scale)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(f"{group}: by threads (median, min-max)", fontsize=10)
        fig.tight_layout()
        path = os.path.join(directory, f"scaling_threads_{_slug(group)}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    # latency percentiles
    lat = [cr for cr in suite.cases if cr.case.kind == LATENCY]
    for cr in lat:
        fig, ax = plt.subplots(figsize=(8, 4.8))
        labels = ["p50", "p90", "p99", "p99.9", "max"]
        keys = ["p50", "p90", "p99", "p99_9", "max"]
        for c in cr.contenders:
            s = c.latency()
            if c.status != OK or not s:
                continue
            ax.plot(
                labels,
                [s[k] / 1000.0 for k in keys],
                marker="o",
                label=c.name,
                linewidth=2.5 if c.ours else 1.2,
            )
        ax.set_yscale("log")
        ax.set_xlabel("percentile")
        ax.set_ylabel("round-trip latency (µs, log scale)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(
            f"{cr.section}: {cr.case.name} ({cr.case.workload.count:,} round trips x reps)"
        )
        fig.tight_layout()
        path = os.path.join(directory, f"latency_{_slug(cr.section + '_' + cr.case.name)}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    # headline: every throughput case, ratio of ours to best peer
    heads = [cr for cr in suite.cases if cr.ratio is not None and not cr.case.params.get("sweep")]
    if heads:
        fig, ax = plt.subplots(figsize=(9, 0.45 * len(heads) + 1.5))
        names = [f"{cr.section}: {cr.case.name}" for cr in heads]
        vals = [float(cr.ratio or 0.0) for cr in heads]
        ax.barh(names, vals, color=["tab:green" if v >= 1 else "tab:red" for v in vals])
        ax.axvline(1.0, color="black", linewidth=1)
        ax.set_xscale("log")
        ax.set_xlabel("queue-engine / best peer (x, log scale; > 1 = faster)")
        ax.invert_yaxis()
        ax.grid(True, axis="x", which="both", alpha=0.3)
        ax.set_title("ratio of queue-engine to the best installed peer")
        fig.tight_layout()
        path = os.path.join(directory, "ratios.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _slug(s: str) -> str:
    keep = [ch if ch.isalnum() else "_" for ch in s.lower()]
    return "_".join(filter(None, "".join(keep).split("_")))


def print_terminal(
    suite: SuiteResult, stream: Optional[TextIO] = None, info: Optional[Dict[str, Any]] = None
) -> None:
    stream = stream or sys.stdout
    stream.write(
        render_terminal(
            suite, color=stream.isatty() if hasattr(stream, "isatty") else False, info=info
        )
    )
    stream.flush()
