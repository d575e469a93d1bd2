"""What machine a benchmark ran on: CPU model, cores, Python, kernel, package
versions. Everything here is best effort and never raises."""

from __future__ import annotations

import os
import platform
import sys
from typing import Any, Dict, Optional

# packages whose versions go into the report (distribution names)
PACKAGES = (
    "queue-engine",
    "numpy",
    "faster-fifo",
    "pyzmq",
    "persist-queue",
    "queuelib",
    "diskcache",
    "hdrhistogram",
    "matplotlib",
    "Cython",
)


def cpu_model() -> str:
    """The CPU model name ("unknown" if the OS does not say)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, val = line.partition(":")
                if key.strip() in ("model name", "Hardware", "Processor", "cpu model"):
                    return val.strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            import subprocess

            out = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"],
                capture_output=True,
                text=True,
                timeout=2,
            )
            if out.stdout.strip():
                return out.stdout.strip()
        except Exception:
            pass
    return platform.processor() or platform.machine() or "unknown"


def usable_cpus() -> int:
    """CPUs this process may run on (affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def package_version(dist: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return None


def machine_info() -> Dict[str, Any]:
    """A JSON-ready description of this machine and the software measured."""
    engine_version: Optional[str]
    try:
        from engine import __version__ as engine_version
    except Exception:  # pragma: no cover - partial tree
        engine_version = None
    try:
        load = list(os.getloadavg())
    except (AttributeError, OSError):
        load = None
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count() or 1,
        "usable_cpus": usable_cpus(),
        "machine": platform.machine(),
        "system": platform.system(),
        "kernel": platform.release(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "engine_version": engine_version,
        "packages": {p: package_version(p) for p in PACKAGES},
        "loadavg": load,
    }


def machine_line(info: Optional[Dict[str, Any]] = None) -> str:
    """One line for a table caption: CPU, cores, OS/kernel, Python."""
    info = info or machine_info()
    line = (
        f"{info['cpu_model']}, {info['usable_cpus']} CPUs usable, "
        f"{info['system']} {info['kernel']} ({info['machine']}), "
        f"{info['python_implementation']} {info['python']}"
    )
    load = info.get("loadavg")
    if load:
        # a busy machine skews every figure: say how busy it was
        line += f", load average {load[0]:.1f}"
    return line
