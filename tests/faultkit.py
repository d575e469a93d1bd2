"""Fault injection for tests: run a workload in a child Python process with
``tests/faultinject/shim.c`` preloaded, number its file syscalls and fail one.

The shim is compiled with the system C compiler into a cache directory keyed
by its source hash (once per machine).  A workload is Python source run in a
child; it calls ``arm()`` before the part to number and ``disarm()`` after
(both defined by the prelude) and reports what it saw with ``report(obj)``
(one JSON line on stdout, the last one wins).

    counts = faultkit.run(SRC, prefix=d).counts          # count once
    for k in range(1, counts["fdatasync"] + 1):          # then fail each call
        res = faultkit.run(SRC, prefix=d2, func="fdatasync", nth=k, err="EIO")
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

SHIM_SRC = Path(__file__).resolve().parent / "faultinject" / "shim.c"
FUNCS = ("pwrite", "write", "fdatasync", "fsync", "msync", "fallocate", "ftruncate",
         "rename", "open", "mmap", "pread", "sync_file_range")
ERRS = ("EIO", "ENOSPC", "EFBIG", "EINTR", "SHORT")

PRELUDE = r"""
import ctypes as _fi_ctypes, json as _fi_json, os as _fi_os, sys as _fi_sys
_fi_lib = _fi_ctypes.CDLL(None)
_fi_lib.qe_fi_nfaults.restype = _fi_ctypes.c_long
FUNC = _fi_os.environ.get("QE_FI_FUNC", "")
ERR = _fi_os.environ.get("QE_FI_ERR", "")
def arm():
    _fi_lib.qe_fi_arm(1)
def disarm():
    _fi_lib.qe_fi_arm(0)
def nfaults():
    return _fi_lib.qe_fi_nfaults()
def synced_so_far():
    # lines of the sync trace so far (run(..., trace=True)): a workload
    # notes it before a step to tell that step's syncs from earlier ones
    try:
        with open(_fi_os.environ["QE_FI_TRACE"]) as f:
            return sum(1 for _ in f)
    except (KeyError, FileNotFoundError):
        return 0
def report(obj):
    _fi_sys.stdout.write("\nFIREPORT " + _fi_json.dumps(obj) + "\n")
    _fi_sys.stdout.flush()

class Tally:
    # Classifies a workload's calls under one injected fault.
    # false_success: calls that returned normally after the component said it
    # is broken (LogBroken); absorbed: calls that returned normally with a
    # fault inside them (retried or handled: EINTR, a short write completed,
    # a temp file thrown away) -- the reopen check then proves nothing was lost.
    def __init__(self):
        self.false_success = 0
        self.absorbed = 0
        self.raised = 0
        self.broken = False
        self.kinds = set()
    def op(self, fn, *args, **kw):
        before = nfaults()
        try:
            r = fn(*args, **kw)
            ok = True
        except Exception as exc:
            r, ok = exc, False
        fired = nfaults() > before
        if ok:
            if self.broken:
                self.false_success += 1
            elif fired:
                self.absorbed += 1
        else:
            self.raised += 1
            self.kinds.add(type(r).__name__)
            chain = [r, r.__cause__, r.__context__]
            if any(c is not None and type(c).__name__ == "LogBroken" for c in chain):
                self.broken = True
        return ok, r
    def release(self, fn, *args, **kw):
        # close(): no acknowledgment, so no false success (a broken
        # component must still let go of its files)
        try:
            fn(*args, **kw)
            return True
        except Exception as exc:
            self.kinds.add(type(exc).__name__)
            return False
    def as_dict(self):
        return {"false_success": self.false_success, "absorbed": self.absorbed,
                "raised": self.raised, "broken": self.broken, "kinds": sorted(self.kinds)}
"""


def available() -> bool:
    """True where the shim can be built and preloaded (Linux with a C compiler)."""
    return sys.platform.startswith("linux") and shutil.which(os.environ.get("CC", "cc")) is not None


_built: Optional[str] = None


def shim_path() -> str:
    """Path of the compiled shim, building it on first use."""
    global _built
    if _built is not None:
        return _built
    src = SHIM_SRC.read_bytes()
    tag = hashlib.sha256(src).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "queue-engine-faultinject"
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError:
        cache = Path(tempfile.gettempdir()) / f"queue-engine-faultinject-{os.getuid()}"
        cache.mkdir(parents=True, exist_ok=True)
    so = cache / f"shim-{tag}.so"
    if not so.exists():
        tmp = cache / f".shim-{tag}.{os.getpid()}.so"
        cc = os.environ.get("CC", "cc")
        subprocess.run([cc, "-O1", "-shared", "-fPIC", "-o", str(tmp), str(SHIM_SRC), "-ldl"],
                       check=True, capture_output=True)
        os.replace(tmp, so)
    _built = str(so)
    return _built


@dataclass
class Result:
    """What one child run did: exit status, output, the shim's counts and faults."""

    rc: int
    stdout: str
    stderr: str
    counts: dict = field(default_factory=dict)   # function -> calls numbered ("all": total)
    faults: list = field(default_factory=list)   # (function, k, err) of each injected fault
    report: Any = None                           # the workload's last report(obj)
    # with trace=True: the successful syncs of files under the prefix while
    # armed, in order: ("fsync"|"fdatasync", path) or ("msync", path, offset, length)
    trace: list = field(default_factory=list)


def run(source: str, *, prefix: str, func: Optional[str] = None, nth: int = 0, err: str = "EIO",
        sticky: bool = False, timeout: float = 120.0, env: Optional[dict] = None,
        trace: bool = False) -> Result:
    """Run ``source`` in a child with the shim preloaded; fail call ``nth`` of ``func``
    (a name of FUNCS or "all") with ``err`` (one of ERRS).  ``func=None``: count only.
    Only calls on paths under ``prefix`` are numbered.  ``trace``: record every
    successful sync of such a path while armed (``Result.trace``)."""
    if func is not None and func != "all" and func not in FUNCS:
        raise ValueError(f"func must be one of {FUNCS} or 'all', not {func!r}")
    if err not in ERRS:
        raise ValueError(f"err must be one of {ERRS}, not {err!r}")
    with tempfile.TemporaryDirectory() as td:
        out = os.path.join(td, "counts")
        trace_out = os.path.join(td, "trace")
        e = dict(os.environ)
        e.update(env or {})
        e.update({
            "LD_PRELOAD": shim_path(),
            "QE_FI_PREFIX": os.path.realpath(prefix),
            "QE_FI_FUNC": func or "",
            "QE_FI_NTH": str(nth if func else 0),
            "QE_FI_ERR": err,
            "QE_FI_STICKY": "1" if sticky else "0",
            "QE_FI_OUT": out,
        })
        if trace:
            e["QE_FI_TRACE"] = trace_out
        p = subprocess.run([sys.executable, "-c", PRELUDE + source], env=e, capture_output=True,
                           text=True, timeout=timeout)
        counts: dict = {}
        faults: list = []
        try:
            with open(out) as f:
                for line in f:
                    parts = line.split()
                    if parts[0] == "count":
                        counts[parts[1]] = int(parts[2])
                    elif parts[0] == "fault":
                        faults.append((parts[1], int(parts[2]), parts[3]))
        except FileNotFoundError:
            pass
        synced: list = []
        if trace and os.path.exists(trace_out):
            with open(trace_out) as f:
                for line in f:
                    kind, rest = line.rstrip("\n").split(" ", 1)
                    if kind == "msync":
                        path, off, length = rest.rsplit(" ", 2)
                        synced.append((kind, path, int(off), int(length)))
                    else:
                        synced.append((kind, rest))
    rep = None
    for line in p.stdout.splitlines():
        if line.startswith("FIREPORT "):
            rep = json.loads(line[len("FIREPORT "):])
    return Result(p.returncode, p.stdout, p.stderr, counts, faults, rep, synced)


SYNC_FUNCS = ("fdatasync", "fsync", "msync")
WRITE_FUNCS = ("pwrite", "write", "fallocate", "ftruncate", "rename", "open", "mmap")


@dataclass
class Row:
    """One line of a sweep's summary: a component under one errno."""

    component: str
    err: str
    points: int = 0          # fault points swept (runs whose fault fired)
    false_success: int = 0
    lost: int = 0            # acknowledged records / writes not read back intact
    corrupt: int = 0         # records or values returned that were never written
    not_working: int = 0     # runs after which the component did not work again
    absorbed: int = 0        # faults handled without an error (retried, discarded temp)
    failures: list = field(default_factory=list)   # (func, k, report) of the bad runs


def sweep(component: str, source: str, base_dir: str, *, funcs=SYNC_FUNCS + WRITE_FUNCS,
          errs=("EIO", "ENOSPC", "EFBIG", "EINTR"), max_points: int = 6,
          timeout: float = 60.0) -> list:
    """Count the calls of ``source`` (formatted with ``d``, a fresh directory)
    once, then fail up to ``max_points`` of each function's calls (evenly
    spaced, first and last included) with each errno in turn.  The workload
    reports a dict with keys false_success, lost, corrupt, works, absorbed.
    Returns one Row per errno."""
    n = [0]

    def fresh():
        n[0] += 1
        d = os.path.join(base_dir, f"run{n[0]}")
        os.makedirs(d)
        return d

    d0 = fresh()
    counted = run(source.format(d=os.path.join(d0, "c")), prefix=d0, timeout=timeout)
    if counted.rc != 0 or not isinstance(counted.report, dict) or not counted.report.get("works"):
        raise AssertionError(f"{component}: the workload fails without faults: "
                             f"{counted.report} {counted.stderr[-3000:]}")
    rows = {e: Row(component, e) for e in errs}
    for func in funcs:
        total = counted.counts.get(func, 0)
        if total == 0:
            continue
        if total <= max_points:
            ks = list(range(1, total + 1))
        elif max_points == 1:
            ks = [(total + 1) // 2]   # the middle call: past the open, before the close
        else:
            ks = sorted({1 + (total - 1) * i // (max_points - 1) for i in range(max_points)})
        for err in errs:
            if err == "SHORT" and func not in ("pwrite", "write"):
                continue
            row = rows[err]
            for k in ks:
                dd = fresh()
                res = run(source.format(d=os.path.join(dd, "c")), prefix=dd, func=func, nth=k,
                          err=err, timeout=timeout)
                if not res.faults:
                    continue  # this run took another path (threads, timing): no fault fired
                row.points += 1
                rep = res.report if isinstance(res.report, dict) else None
                if res.rc != 0 or rep is None:
                    row.not_working += 1
                    row.failures.append((func, k, f"rc={res.rc} {res.stderr[-1500:]}"))
                    continue
                row.false_success += rep.get("false_success", 0)
                row.lost += rep.get("lost", 0)
                row.corrupt += rep.get("corrupt", 0)
                row.absorbed += rep.get("absorbed", 0)
                if not rep.get("works", False):
                    row.not_working += 1
                if rep.get("false_success") or rep.get("lost") or rep.get("corrupt") or not rep.get("works"):
                    row.failures.append((func, k, rep))
    return [rows[e] for e in errs]


def table(rows: list) -> str:
    """The summary table (markdown) of sweep rows."""
    out = ["| component | errno | fault points | false successes | acknowledged lost "
           "| corrupt returns | did not work again | handled (absorbed) |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r.component} | {r.err} | {r.points} | {r.false_success} | {r.lost} | "
                   f"{r.corrupt} | {r.not_working} | {r.absorbed} |")
    return "\n".join(out)
