"""What machine a benchmark ran on: CPU model, cores, Python, kernel, package
versions, and two costs of the machine that bound some cases whatever the code
does: what waking a sleeping thread takes (:func:`thread_wake_us`) and whether
the host takes idle free memory back (:func:`free_page_reporting`).
Everything here is best effort and never raises."""

from __future__ import annotations

import glob
import os
import platform
import sys
import threading
import time
from typing import Any, Dict, Optional, Tuple

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


def pin_thread(cpu: Optional[int]) -> None:
    """Pin the calling thread to ``cpu`` (Linux applies sched_setaffinity(0,
    ...) to the calling thread only); ``None``, or an OS that cannot: leave
    it where it is."""
    if cpu is None:
        return
    try:
        os.sched_setaffinity(0, {cpu})
    except (AttributeError, OSError):
        pass


def wake_round_trip(n: int, cpus: Optional[Tuple[int, int]] = None) -> Tuple[float, float, float]:
    """Two threads hand two locks back and forth ``n`` times (each lock a
    futex-backed semaphore; the GIL passes with them). Returns seconds per
    round trip, the process's CPU seconds (user + system) per round trip and
    its voluntary context switches per round trip.  A round trip is two
    wake-ups: a sleeping thread woken and run, once each way.

    ``cpus``: the CPUs the two threads run on (the same one twice: each
    wake-up stays on that CPU; two: each crosses to the other CPU); ``None``:
    wherever the scheduler puts them.  The calling thread's CPU set is put
    back afterwards."""
    import _thread
    import resource

    a = _thread.allocate_lock()
    b = _thread.allocate_lock()
    a.acquire()
    b.acquire()

    def pong() -> None:
        pin_thread(cpus[1] if cpus else None)
        for _ in range(n):
            a.acquire()
            b.release()

    saved = os.sched_getaffinity(0) if cpus else None
    t = threading.Thread(target=pong, daemon=True)
    try:
        pin_thread(cpus[0] if cpus else None)
        t.start()
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        for _ in range(n):
            a.release()
            b.acquire()
        dt = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        t.join()
    finally:
        if saved is not None:
            os.sched_setaffinity(0, saved)
    cpu = r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
    return dt / n, cpu / n, (r1.ru_nvcsw - r0.ru_nvcsw) / n


def thread_wake_us(n: int = 2000) -> Dict[str, Optional[float]]:
    """Microseconds from one thread waking another to that thread running:
    half the median round trip of three :func:`wake_round_trip` runs (about
    0.1 s here), ``"cross_cpu"`` with the two threads on two CPUs and
    ``"same_cpu"`` with both on one (``None``: not measured, as
    ``"cross_cpu"`` on a single CPU).

    Every durable wait of a saga, transaction or versioned put is a sleep and
    such a wake-up, then a turn at the GIL, so with a few threads on few
    cores this, not the disk, can set their rate.  In a virtual machine a
    wake-up that crosses to an idle CPU can cost several times one that stays
    (the guest traps to the host to halt the idle CPU and to interrupt it)."""

    def half_median(cpus: Tuple[int, int]) -> Optional[float]:
        try:
            trips = sorted(wake_round_trip(n, cpus)[0] for _ in range(3))
        except Exception:
            return None
        return trips[1] / 2 * 1e6

    try:
        usable = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return {"cross_cpu": None, "same_cpu": None}
    return {
        "cross_cpu": half_median((usable[0], usable[1])) if len(usable) > 1 else None,
        "same_cpu": half_median((usable[0], usable[0])),
    }


def free_page_reporting() -> str:
    """``"on"`` when a virtio balloon with free page reporting (feature bit 5)
    is bound: a virtual machine whose host takes back memory the guest leaves
    free for a couple of seconds, so the next first touch of it waits for the
    host (``bench/first_touch.py`` measures what that costs); ``"off"`` for a
    balloon without it, ``"no virtio balloon"`` otherwise."""
    for dev in glob.glob("/sys/bus/virtio/devices/*"):
        try:
            with open(f"{dev}/device") as f:
                if int(f.read(), 16) != 5:  # virtio id 5: the memory balloon
                    continue
            with open(f"{dev}/features") as f:
                bits = f.read().strip()
        except (OSError, ValueError):
            continue
        return "on" if len(bits) > 5 and bits[5] == "1" else "off"
    return "no virtio balloon"


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
        "thread_wake_us": thread_wake_us(),
        "free_page_reporting": free_page_reporting(),
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
    wake = info.get("thread_wake_us") or {}
    if wake.get("cross_cpu") is not None:
        # what every blocking wait costs here (see thread_wake_us)
        line += f", thread wake-up {wake['cross_cpu']:.1f} µs across CPUs"
        if wake.get("same_cpu") is not None:
            line += f" ({wake['same_cpu']:.1f} µs on one)"
    elif wake.get("same_cpu") is not None:
        line += f", thread wake-up {wake['same_cpu']:.1f} µs"
    if info.get("free_page_reporting") == "on":
        line += ", host reclaims idle free memory (virtio-balloon free page reporting)"
    return line
