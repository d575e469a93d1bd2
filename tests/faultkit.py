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
         "rename", "open", "mmap", "pread")
ERRS = ("EIO", "ENOSPC", "EFBIG", "EINTR", "SHORT")

PRELUDE = """
import ctypes as _fi_ctypes, json as _fi_json, sys as _fi_sys
_fi_lib = _fi_ctypes.CDLL(None)
def arm():
    _fi_lib.qe_fi_arm(1)
def disarm():
    _fi_lib.qe_fi_arm(0)
def report(obj):
    _fi_sys.stdout.write("\\nFIREPORT " + _fi_json.dumps(obj) + "\\n")
    _fi_sys.stdout.flush()
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


def run(source: str, *, prefix: str, func: Optional[str] = None, nth: int = 0, err: str = "EIO",
        sticky: bool = False, timeout: float = 120.0, env: Optional[dict] = None) -> Result:
    """Run ``source`` in a child with the shim preloaded; fail call ``nth`` of ``func``
    (a name of FUNCS or "all") with ``err`` (one of ERRS).  ``func=None``: count only.
    Only calls on paths under ``prefix`` are numbered."""
    if func is not None and func != "all" and func not in FUNCS:
        raise ValueError(f"func must be one of {FUNCS} or 'all', not {func!r}")
    if err not in ERRS:
        raise ValueError(f"err must be one of {ERRS}, not {err!r}")
    with tempfile.TemporaryDirectory() as td:
        out = os.path.join(td, "counts")
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
    rep = None
    for line in p.stdout.splitlines():
        if line.startswith("FIREPORT "):
            rep = json.loads(line[len("FIREPORT "):])
    return Result(p.returncode, p.stdout, p.stderr, counts, faults, rep)
