"""Where shared-memory regions live and which names they may have: one rule
for rings, counters, scheduling regions and queues.

A name is a file name under :data:`SHM_DIR` (``/dev/shm`` on Linux): 1 to
:data:`NAME_MAX` characters, no ``/``, no NUL, and not starting with ``.``
(dot-names are the engine's temp files).  A structure that derives several
regions from one name (``NAME.L0``, ``NAME.bell``, ...) asks for
``suffix_room`` so that every derived name fits too.
"""

from __future__ import annotations

import os
import tempfile

__all__ = ["NAME_MAX", "SHM_DIR", "region_path"]

SHM_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
NAME_MAX = 200


def region_path(name: object, suffix_room: int = 0) -> str:
    """The file that backs the shared region ``name``; ``TypeError`` for a
    non-string, ``ValueError`` saying the rule for a bad name."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, not {type(name).__name__}")
    limit = NAME_MAX - suffix_room
    if not name or len(name) > limit or "/" in name or "\0" in name or name.startswith("."):
        raise ValueError(
            f"name {name!r}: use 1-{limit} characters, no '/', no NUL, not starting with '.'"
        )
    return os.path.join(SHM_DIR, name)
