"""The compile cache volume, checked before a start compiles into it.

Inductor writes its generated code, the compiled libraries and their caches into
``TORCHINDUCTOR_CACHE_DIR`` as it compiles; a volume that runs out of space or turns read-only
then fails the compile, and the start with it. The cache only buys the next start its head
start, so a volume that cannot take a compile costs exactly that: this start compiles in the
container's own scratch space (``/tmp``, an emptyDir), says why in its log and in /readyz's
``optimizations.compile_cache_skipped``, and serves.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

# What one start may write: inductor's code and libraries for every admitted shape, the
# artifact bundle, AOTInductor packages. Hundreds of MiB for SDXL on a GPU; a floor well above.
MIN_FREE_BYTES = 1 << 30


def unusable(directory: Path, min_free: int = MIN_FREE_BYTES) -> str | None:
    """Why a start cannot compile into ``directory``, or None when it can."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-check-"):
            pass
        free = shutil.disk_usage(directory).free
    except OSError as exc:
        return f"cannot write to {directory}: {exc}"
    if free < min_free:
        return (f"{directory} has {free >> 20} MiB free, less than the {min_free >> 20} MiB "
                "a compile may write")
    return None
