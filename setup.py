"""Build the compiled core: every ``pyx/NAME.pyx`` becomes ``engine._NAME``.

Environment switches (all default off):

* ``ENGINE_DEBUG=1``    -O0 -g, ``ENGINE_DEBUG`` C asserts, Cython line tracing
                        (``CYTHON_TRACE_NOGIL``) and annotate HTML next to each .pyx.
* ``ENGINE_ANNOTATE=1`` only the annotate HTML (read it for every hot loop).
* ``ENGINE_SANITIZE=1`` -fsanitize=address,undefined (run with LD_PRELOAD of libasan).
* ``ENGINE_PORTABLE=1`` build the portable fallbacks of the C headers (no futex,
                        no CRC32C instructions) so that branch is compiled and tested.
* ``ENGINE_ONLY=ring,log`` build only these modules (developers' fast rebuilds).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup

HERE = Path(__file__).parent.resolve()


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


def _extensions() -> list[Extension]:
    debug = _flag("ENGINE_DEBUG")
    sanitize = _flag("ENGINE_SANITIZE")
    portable = _flag("ENGINE_PORTABLE")
    only = {n for n in os.environ.get("ENGINE_ONLY", "").split(",") if n}

    macros = [("ENGINE_DEBUG", "1" if debug else "0"), ("ENGINE_PORTABLE", "1" if portable else "0")]
    if debug:
        macros += [("CYTHON_TRACE_NOGIL", "1")]
    cflags = ["-O0", "-g"] if debug else ["-O3"]
    cflags += ["-std=gnu11", "-Wall", "-Wno-unused-function", "-Wno-unreachable-code"]
    if sys.platform == "darwin":
        cflags += ["-Wno-unreachable-code-fallthrough"]
    ldflags: list[str] = []
    if sanitize:
        cflags += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
        ldflags += ["-fsanitize=address,undefined"]

    exts = []
    for pyx in sorted((HERE / "pyx").glob("*.pyx")):
        if only and pyx.stem not in only:
            continue
        exts.append(
            Extension(
                f"engine._{pyx.stem}",
                [f"pyx/{pyx.name}"],
                include_dirs=["pyx"],
                define_macros=macros,
                extra_compile_args=cflags,
                extra_link_args=ldflags,
            )
        )
    directives = {
        "language_level": 3,
        "embedsignature": True,
        "cdivision": True,
    }
    if debug:
        directives.update({"linetrace": True, "profile": True})
    return cythonize(
        exts,
        compiler_directives=directives,
        annotate=debug or _flag("ENGINE_ANNOTATE"),
        include_path=["pyx"],
    )


setup(ext_modules=_extensions())
